"""`linattn demo`: the README's main job, on a CPU in a few minutes.

1. regenerate every shipped spec into a scratch folder and check it matches `generated/`;
2. verify one spec's ops against the oracle (property-based, outputs, states, gradients);
3. run every op forward and backward on a small batch and report the time.
Later stages (a tiny model trained, sampled and evaluated) are added by the training issue.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import codegen, ops, registry, testing, verify


def run_demo(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    specs = registry.all_specs()
    scratch = out / "generated"
    codegen.regen(specs, scratch, builtin=True)
    stale = codegen.regen(specs, codegen.default_out_dir(), check=True)
    print(f"[1/3] regenerated {len(specs)} specs into {scratch}: "
          + ("identical to the package's generated/" if not stale else f"package copy is stale: {stale}"))
    rows.append(("regen", f"{len(specs)} specs", "ok" if not stale else "STALE", str(scratch)))

    spec = registry.load("gla")
    n = 3 if args.quick else 10
    res = verify.verify(spec, examples=n, max_T=48 if args.quick else 96)
    print(f"[2/3] verify {spec.name} ({n} examples per backend):")
    print(verify.table(res, verify.TOLERANCE[torch.float32]))
    rows.append(("verify gla", f"{n} examples x {len(res)} backends", "ok" if all(r.ok for r in res) else "FAIL", "-"))

    print("[3/3] every op, forward + backward, B=2 T=64 H=2 D=16 on", "cpu")
    for s in specs:
        case = testing.draw_case(s, B=2, T=64, heads=2, K=16, V=16, seed=1)
        for mode in ("chunk", "fused_recurrent"):
            op = getattr(ops, f"{mode}_{s.name}")
            leaves = {k: (v.requires_grad_() if v is not None else None) for k, v in case.tensors.items()}
            t = time.time()
            o, st = case.call(op, leaves)
            (o.sum() + st.sum()).backward()
            dt = time.time() - t
            ok = torch.isfinite(o).all().item()
            rows.append((f"{mode}_{s.name}", f"o {list(o.shape)}", "ok" if ok else "NON-FINITE", f"{dt * 1e3:.0f} ms"))
    print()
    print(f"{'step':<34} {'what':<34} {'status':<10} where / time")
    for r in rows:
        print(f"{r[0]:<34} {r[1]:<34} {r[2]:<10} {r[3]}")
    print(f"demo finished in {time.time() - t0:.0f} s; artefacts under {out.resolve()}")
    return 0 if all(r[2] == "ok" for r in rows) else 1
