"""Do the generated kernels' launches fit an H100/H200 (sm_90: 227 KiB of shared memory per block)?

A child process runs ops on the CPU with the Triton interpreter's launcher and records every kernel launch
the host code makes, without executing it (kernel, argument types, constexprs, num_warps/num_stages); this
process then compiles each one for sm_90 with the installed Triton's own ptxas, specialised as a real launch
is (16-byte aligned pointers), and reports the shared memory it needs. A launch that does not fit fails on
the GPU with OutOfResources; this finds it on a machine without a GPU. The numbers depend on the Triton
version: to check the GPU machine's, put that version first on PYTHONPATH.

    python -m benchmarks.sm90_fit [--specs kda rwkv7 ...] [--dims 256 ...] [--dtypes bfloat16 float32]
                                  [--modes chunk fused_recurrent] [--spills]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile

LIMIT = 232448  # bytes of shared memory a block may use on sm_90


def _sig(arg) -> str:
    import torch

    if isinstance(arg, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                      torch.int32: "i32", torch.int8: "i8", torch.float64: "fp64"}[arg.dtype]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -(2**31) <= arg < 2**31 else "i64"
    if isinstance(arg, float):
        return "fp32"
    raise TypeError(f"argument of type {type(arg).__name__}")


def record_launches(fn_call) -> list[dict]:
    """Call fn_call() (under TRITON_INTERPRET=1) with every kernel launch recorded instead of run."""
    from triton.runtime.interpreter import InterpretedFunction

    seen, launches = set(), []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        consts, sig = {}, {}
        for name in self.arg_names:
            if name not in bound:
                continue
            val = bound[name]
            if "constexpr" in str(params[name].annotation) or val is None:
                consts[name], sig[name] = val, "constexpr"
            else:
                sig[name] = _sig(val)
        launch = dict(module=self.fn.__module__, kernel=self.fn.__name__, sig=sig, consts=consts, opts=opts)
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)

    InterpretedFunction.run = run
    try:
        fn_call()
    finally:
        InterpretedFunction.run = original
    return launches


def _record(spec_names, dims, dtypes, modes=("chunk",), T=80, heads=1) -> list[dict]:
    import torch

    from linattn_dsl import ops

    from linattn_dsl.compiler import registry

    from linattn_dsl.reference import drawing as testing

    out = []
    for name in spec_names:
        spec = registry.load(name)
        for D in dims:
            for dtype in dtypes:
                case = testing.draw_case(spec, B=1, T=T, heads=heads, K=D, V=D, seed=0)
                tensors = {k: (v.to(getattr(torch, dtype)) if v is not None and v.dim() >= 3 else v)
                           for k, v in case.tensors.items()}
                for mode in modes:
                    op = getattr(ops, f"{mode}_{name}")

                    def call(op=op):
                        t = {k: (v.detach().requires_grad_() if v is not None and v.is_floating_point() else v)
                             for k, v in tensors.items()}
                        o, s = case.call(op, t)
                        (o.float().sum() + s.sum()).backward()

                    for launch in record_launches(call):
                        out.append(dict(launch, spec=name, D=D, dtype=dtype, mode=mode))
    return out


def _compile(launch: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    sig, names = launch["sig"], list(launch["sig"])
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in launch["consts"].items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(launch["opts"]))


def shared_bytes(launch: dict) -> int:
    return _compile(launch).metadata.shared


def registers(launch: dict) -> str:
    """ptxas -v's register and spill report of the launch's PTX (the wheel's own ptxas, sm_90a)."""
    import re

    import triton

    try:   # the ptxas Triton itself runs for sm_90 (newer Tritons ship two, the older one rejects their PTX)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except ImportError:
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(_compile(launch).asm["ptx"])
        err = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spilled"


def fit(specs, dims, dtypes, modes=("chunk",), heads=1) -> list[tuple[dict, int]]:
    """Every distinct launch of the ops of ``specs`` (``modes``: chunk, fused_recurrent; head dims ``dims``,
    ``dtypes`` names) fwd+bwd, with the shared memory (bytes) it needs on sm_90; the launches are recorded in
    a child process. ``heads``: of the recorded calls (the tuning table's choices depend on sequences x heads)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "benchmarks.sm90_fit", "--record", path, "--specs", *specs,
               "--dims", *map(str, dims), "--dtypes", *dtypes, "--modes", *modes, "--heads", str(heads)]
        subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(path) as f:
            launches = json.load(f)
    return [(launch, shared_bytes(launch)) for launch in launches]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--specs", nargs="+", default=["retention", "gla", "mamba2", "delta_rule", "kda", "rwkv7"])
    p.add_argument("--dims", nargs="+", type=int, default=[256, 128, 64])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--modes", nargs="+", default=["chunk", "fused_recurrent"], choices=["chunk", "fused_recurrent"])
    p.add_argument("--spills", action="store_true", help="also ptxas's registers and spill stores per launch")
    p.add_argument("--heads", type=int, default=1, help="heads of the recorded calls (128: a benchmark's 8 x 16)")
    p.add_argument("--record", help=argparse.SUPPRESS)  # child: write the recorded launches to this file
    a = p.parse_args(argv)
    if a.record:
        with open(a.record, "w") as f:
            json.dump(_record(a.specs, a.dims, a.dtypes, a.modes, heads=a.heads), f)
        return 0
    rows = fit(a.specs, a.dims, a.dtypes, a.modes, a.heads)
    for launch, need in rows:
        print(f"{launch['spec']:18s} {launch['mode']:15s} D={launch['D']:<4d} {launch['dtype']:9s} "
              f"{launch['kernel']:20s} "
              f"{str(launch['opts']):34s} {need:7d}{'' if need <= LIMIT else '  DOES NOT FIT'}"
              f"{'  ' + registers(launch) if a.spills else ''}", flush=True)
    bad = sum(need > LIMIT for _, need in rows)
    print(f"{len(rows)} launches compiled for sm_90, {bad} over {LIMIT} bytes of shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
