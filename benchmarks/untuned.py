"""Specs nobody tuned (issue 28): three specs the repository does not ship, one per chunk form
(``benchmarks/specs/untuned_*.py``), against the shipped spec of the same form at the same shapes.

    python -m benchmarks.untuned --T 4096,16384 --D 128,64 --out DIR

Each spec is regenerated into a temporary folder through the public API (as a user's would be). bf16, B*T =
32768 tokens, 16 value heads of D (the untuned additive and delta specs group 4 query / key heads); inputs drawn
per role as the shipped ops' benchmark draws them. Each (spec, D) runs in its own process with an empty Triton
cache, so its first call is a cold compile. Printed: fwd and fwd+bwd ms (``do_bench`` medians), the first call,
and each untuned spec's ratio to its shipped counterpart; results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENS = 32768
PAIRS = {"untuned_additive": "gla", "untuned_delta": "gated_delta_rule", "untuned_general": "rwkv7"}


def _inputs(name: str, T: int, D: int, device="cuda"):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    B, H, HQ = TOKENS // T, 16, 4
    r = lambda *s: torch.randn(*s, device=device)   # noqa: E731
    unit = lambda x: F.normalize(x, dim=-1).to(torch.bfloat16)   # noqa: E731
    v = r(B, T, H, D).to(torch.bfloat16)
    if name == "gla":
        return dict(q=r(B, T, H, D).to(torch.bfloat16), k=r(B, T, H, D).to(torch.bfloat16), v=v,
                    g=(F.logsigmoid(r(B, T, H, D)) / 16).to(torch.bfloat16))
    if name == "untuned_additive":
        return dict(q=r(B, T, HQ, D).to(torch.bfloat16), k=r(B, T, HQ, D).to(torch.bfloat16), v=v,
                    a=(r(B, T, H) - 4).to(torch.bfloat16), c=r(H) * 0.5)
    if name == "gated_delta_rule":
        return dict(q=unit(r(B, T, H, D)), k=unit(r(B, T, H, D)), v=v, g=F.logsigmoid(r(B, T, H)).to(torch.bfloat16),
                    beta=torch.sigmoid(r(B, T, H)).to(torch.bfloat16))
    if name == "untuned_delta":
        return dict(q=unit(r(B, T, HQ, D)), k=unit(r(B, T, HQ, D)), v=v, bl=r(B, T, H).to(torch.bfloat16),
                    c=r(H) - 3)
    if name == "rwkv7":
        kk = F.normalize(r(B, T, H, D), dim=-1)
        return dict(r=r(B, T, H, D).to(torch.bfloat16), w=(-torch.exp(0.5 * r(B, T, H, D) - 2.5)).to(torch.bfloat16),
                    k=r(B, T, H, D).to(torch.bfloat16), v=v, a=(-kk).to(torch.bfloat16),
                    b=(kk * torch.rand(B, T, H, 1, device=device)).to(torch.bfloat16))
    if name == "untuned_general":
        kk = F.normalize(r(B, T, H, D), dim=-1)
        return dict(q=r(B, T, H, D).to(torch.bfloat16), k=r(B, T, H, D).to(torch.bfloat16), v=v,
                    x=(r(B, T, H) + 3).to(torch.bfloat16), kk=kk.to(torch.bfloat16), s=r(B, T, H).to(torch.bfloat16))
    raise ValueError(name)


def _op(name: str, folder: Path):
    if name in PAIRS.values():
        from linattn_dsl import ops

        return getattr(ops, f"chunk_{name}")
    from linattn_dsl.compiler import codegen, registry

    spec = registry.load(str(HERE / "specs" / f"{name}.py"))
    codegen.regen([spec], folder, builtin=False, index=False)
    sys.path.insert(0, str(folder))
    return getattr(__import__(name), f"chunk_{name}")


def _child(name: str, Ts: list[int], D: int) -> None:
    import torch

    from benchmarks.ops import time_fwd_bwd

    with tempfile.TemporaryDirectory() as tmp:
        f = _op(name, Path(tmp))
        for T in Ts:
            t = _inputs(name, T, D)
            times = time_fwd_bwd(lambda t: f(**t)[0], t)
            print(json.dumps(dict(op=name, T=T, D=D, **times)), flush=True)
            t = None
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--D", default="128,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--child", nargs=2, metavar=("NAME", "D"))
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], a.T, int(a.child[1]))
        return 0
    rows = []
    for D in a.D:
        for untuned, shipped in PAIRS.items():
            for name in (shipped, untuned):
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, TRITON_CACHE_DIR=cache)
                    cmd = [sys.executable, "-m", "benchmarks.untuned", "--child", name, str(D),
                           "--T", ",".join(map(str, a.T))]
                    try:
                        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
                        got = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
                        rows += got or [dict(op=name, D=D, error=res.stderr[-400:])]
                    except subprocess.TimeoutExpired:
                        rows.append(dict(op=name, D=D, error=f"timeout {a.timeout} s"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                date=time.strftime("%Y-%m-%d"), tokens=TOKENS)
    (out / "untuned.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}, bf16, B*T={TOKENS}, 16 value heads")
    print(f"{'op':<18} {'D':>4} {'T':>6} {'fwd ms':>8} {'fwd+bwd':>8} {'first s':>8} {'vs shipped':>12}")
    ok = {(r["op"], r["D"], r["T"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<18} {r['D']:>4}  ERROR {r['error'][-200:]}")
            continue
        ref = ok.get((PAIRS.get(r["op"], ""), r["D"], r["T"]))
        ratio = f"{r['fwd'] / ref['fwd']:.2f} / {r['fwd_bwd'] / ref['fwd_bwd']:.2f}" if ref else ""
        print(f"{r['op']:<18} {r['D']:>4} {r['T']:>6} {r['fwd']:>8.3f} {r['fwd_bwd']:>8.3f} {r['first']:>8.1f} "
              f"{ratio:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
