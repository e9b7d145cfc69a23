"""Where the seconds of an op's first call go: for each op, one fresh process per mode (the values of
LINATTN_PARALLEL_COMPILE: the walk on ``1``, off ``0``) with an empty Triton cache runs the first fwd+bwd
of ``benchmarks/ops.py``'s inputs and reports the call's seconds, the compile-ahead walk's seconds, and every kernel
Triton compiled (its stage times from Triton's compilation listener, and the thread that compiled it).

    python -m benchmarks.compile_profile --ops retention gla --T 4096 [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(op: str, T: int) -> None:
    import importlib.util

    import torch
    import triton

    from linattn_dsl.runtime import host

    spec = importlib.util.spec_from_file_location("bench_ops_inputs", HERE / "ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    compiled = []
    start = time.perf_counter()

    def listener(src, metadata, metadata_group, times, cache_hit, **_):
        name = getattr(getattr(src, "fn", None), "__name__", str(src)[:40])
        try:
            stages = {"init": times.ir_initialization, **dict(times.lowering_stages)}
        except (AttributeError, TypeError):   # another Triton's timer: the total only
            stages = {"all": 0}
        compiled.append(dict(kernel=name, thread=threading.current_thread().name, end=time.perf_counter() - start,
                             total=sum(stages.values()) / 1e6, stages={k: v / 1e6 for k, v in stages.items()},
                             cache_hit=cache_hit))

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        knobs.compilation.listener = listener
    walks = []
    inner = host.compile_ahead

    def timed(*a, **k):
        t0 = time.perf_counter()
        inner(*a, **k)
        walks.append((t0 - start, time.perf_counter() - start))

    host.compile_ahead = timed
    fn = bench.get_fn("ours", op)
    t = bench.make_inputs(op, T)
    for x in t.values():
        if x.is_floating_point():
            x.requires_grad_()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(t)
    t_fwd = time.perf_counter() - start
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(json.dumps(dict(op=op, first=time.perf_counter() - start, fwd_returned=t_fwd, walks=walks,
                          kernels=compiled, listener=knobs is not None)))


def _report(rows: list[dict], file=sys.stdout) -> None:
    for r in rows:
        ks = r["kernels"]
        serial = sum(k["total"] for k in ks)
        big = max(ks, key=lambda k: k["total"]) if ks else None
        walk = sum(e - s for s, e in r["walks"])
        slowest = f"{big['kernel']} {big['total']:.2f} s" if big else "-"
        print(f"{r['op']:>18} {r['mode']:>8} | first {r['first']:6.2f} s, walk {walk:5.2f} s, {len(ks)} kernels, "
              f"compile sum {serial:6.2f} s, slowest {slowest}", file=file)
        for k in sorted(ks, key=lambda k: -k["total"]):
            st = ", ".join(f"{n} {v:.2f}" for n, v in k["stages"].items())
            print(f"{'':>20} {k['kernel']:<28} {k['total']:5.2f} s done at {k['end']:5.2f} [{k['thread'][:14]}] {st}",
                  file=file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", default=["retention", "gla", "mamba2", "delta_rule", "gated_delta_rule",
                                                 "kda", "rwkv7"])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--out", type=Path)
    p.add_argument("--modes", nargs="+", default=["1", "0"], help="LINATTN_PARALLEL_COMPILE values")
    p.add_argument("--child", nargs=2)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], int(a.child[1]))
        return 0
    rows = []
    for op in a.ops:
        for mode in a.modes:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TRITON_CACHE_DIR=cache, LINATTN_PARALLEL_COMPILE=mode)
                res = subprocess.run([sys.executable, "-m", "benchmarks.compile_profile", "--child", op, str(a.T)],
                                     env=env, capture_output=True, text=True)
            if res.returncode:
                print(f"{op} mode {mode}: exit {res.returncode}\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["mode"] = {"1": "walk", "0": "serial"}.get(mode, mode)
            rows.append(row)
            _report([row])
            sys.stdout.flush()
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "compile_profile.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
