"""A/B timing of one op from two generated modules in one process: a speed change is measured against its
baseline on the same card in the same run, and the two are checked to agree.

    git show HEAD~1:linattn_dsl/generated/rwkv7.py > ab_old.py      # the baseline, any file name
    python -m benchmarks.ab rwkv7 --old ab_old.py [--T 16384 4096]

The new side is the checkout's ``linattn_dsl/generated/<op>.py``. Both sides share this checkout's runtime; to
compare whole trees (host code and templates too) use ``benchmarks/ab_trees.py``. Inputs as in
``benchmarks/ops.py`` (bf16, B*T = 32768, H=16, D=128); timings are ``do_bench`` medians, old and new
interleaved twice.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # generated modules find themselves through sys.modules
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    import torch
    from triton.testing import do_bench

    from benchmarks.ops import make_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("op", help="a generated module with a chunk_<op> function (e.g. rwkv7, kda, delta_rule)")
    p.add_argument("--old", required=True, help="path of the baseline's generated module file")
    p.add_argument("--T", type=int, nargs="+", default=[16384, 4096])
    a = p.parse_args(argv)
    sides = {"old": _load(a.old, "linattn_ab_old"), "new": importlib.import_module(f"linattn_dsl.generated.{a.op}")}
    extra = {"scale": 1.0} if a.op == "rwkv7" else {}
    print(torch.cuda.get_device_name(), flush=True)
    for T in a.T:
        t = make_inputs(a.op, T)
        leaves = [x.requires_grad_() for x in t.values() if x.is_floating_point()]
        do, grads = None, {}
        for name in ("old", "new", "old", "new"):
            f = getattr(sides[name], f"chunk_{a.op}")

            def fwd(f=f):
                return f(*t.values(), **extra)[0]

            start = time.time()
            out = fwd()
            do = torch.randn_like(out) if do is None else do
            for x in leaves:
                x.grad = None
            out.backward(do)
            torch.cuda.synchronize()
            first = time.time() - start
            grads[name] = [out.float()] + [x.grad.float() for x in leaves]

            def fwd_bwd(fwd=fwd):
                for x in leaves:
                    x.grad = None
                fwd().backward(do)

            with torch.no_grad():
                ms_f = do_bench(fwd, warmup=10, rep=60, return_mode="median")
            ms_b = do_bench(fwd_bwd, warmup=10, rep=60, return_mode="median")
            print(f"{a.op} T={T} {name}: fwd {ms_f:.3f} ms, fwd+bwd {ms_b:.3f} ms (first call {first:.1f} s)",
                  flush=True)
        diff = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-6))
                   for x, y in zip(grads["new"], grads["old"]))
        print(f"{a.op} T={T}: output and gradients, new vs old, max relative difference {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
