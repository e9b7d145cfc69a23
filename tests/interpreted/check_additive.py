"""Generated Triton kernels of the additive form under the Triton interpreter (run with TRITON_INTERPRET=1).

Targeted cases rather than random ones: the interpreter runs a kernel in Python, about a second per
case at these sizes. Exits non-zero listing every case whose relative error exceeds 1e-4 (fp32) or
2e-2 (fp16 inputs).
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from linattn_dsl import ops  # noqa: E402

from linattn_dsl.compiler import registry  # noqa: E402

from linattn_dsl.reference import drawing as testing  # noqa: E402

CASES = [  # (spec, draw_case keywords)
    ("retention", dict(B=1, T=1, heads=1, K=8, V=8)),
    ("retention", dict(B=2, T=70, heads=2, K=16, V=8)),
    ("gla", dict(B=1, T=1, heads=2, K=8, V=4)),
    ("gla", dict(B=2, T=67, heads=2, K=16, V=16)),
    ("gla", dict(seqlens=[5, 64, 11], heads=2, K=8, V=8)),
    ("gla", dict(B=1, T=130, heads=1, K=20, V=8, log_decay_min=-20.0)),
    ("gla", dict(B=1, T=40, heads=1, K=80, V=72, with_initial_state=True)),
    ("mamba2", dict(B=2, T=70, heads=4, groups=2, K=16, V=8)),
    ("mamba2", dict(seqlens=[30, 1, 50], heads=2, groups=1, K=8, V=8, optional_present=False)),
    ("mamba2", dict(B=1, T=65, heads=2, K=8, V=8, switches=dict(dt_softplus=False), log_decay_min=-20.0)),
    # mild decays (at most 7.5 nats across a sub-block): scores_diag forms every sub-block as products (the
    # -20 case above sends every full one per column). Last, so the cases above keep their seeds
    ("gla", dict(B=1, T=70, heads=2, K=16, V=8, log_decay_min=-0.5)),
]


def main() -> int:
    failures, n = [], 0
    for name, kw in CASES:
        spec = registry.load(name)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            if dtype == torch.float16 and kw.get("T", 0) > 70:
                continue
            case = testing.draw_case(spec, seed=n, **kw)
            case.tensors = {k: (v.to(dtype) if v is not None and v.dim() >= 3 else v) for k, v in case.tensors.items()}
            for mode in ("chunk", "fused_recurrent"):
                n += 1
                errs = testing.compare(case, getattr(ops, f"{mode}_{name}"))
                bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= tol}
                worst = max(errs.values())
                print(f"{mode}_{name:<10} {str(dtype):<14} {kw}  worst {worst:.2e}" + (f"  FAIL {bad}" if bad else ""))
                if bad:
                    failures.append((name, mode, kw, bad))
    # the gate backward's two forms (gate_bwd r1: one program per sequence walks its chunks; r0: three passes
    # parallel over chunks), whichever the card's size picks for the cases above
    for walk in ("r1", "r0"):
        os.environ["LINATTN_LAUNCH"] = f"gate_bwd:{walk}"
        for name, kw in (("gla", dict(seqlens=[5, 64, 11], heads=2, K=8, V=8)),
                         ("gla", dict(seqlens=[1090, 70], heads=1, K=8, V=4)),
                         ("mamba2", dict(seqlens=[30, 1, 50], heads=2, groups=1, K=8, V=8, optional_present=False))):
            n += 1
            case = testing.draw_case(registry.load(name), seed=n, **kw)
            errs = testing.compare(case, getattr(ops, f"chunk_{name}"))
            bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= 1e-4}
            print(f"chunk_{name:<10} gate_bwd:{walk} {kw}  worst {max(errs.values()):.2e}"
                  + (f"  FAIL {bad}" if bad else ""))
            if bad:
                failures.append((name, walk, kw, bad))
        del os.environ["LINATTN_LAUNCH"]
    # autograd hands the kernels an expanded (stride-0) gradient of the final state for `s.sum()`
    spec = registry.load("gla")
    case = testing.draw_case(spec, B=1, T=40, heads=2, K=16, V=16, seed=7)
    grads = []
    for op in (lambda *a, **kw: __import__("linattn_dsl.reference").reference.run(spec, *a, **kw), ops.chunk_gla):
        leaves = {k_: v_.detach().clone().requires_grad_() for k_, v_ in case.tensors.items()}
        o, s_ = case.call(op, leaves)
        (o.sum() + s_.sum()).backward()
        grads.append([leaves[k_].grad for k_ in sorted(leaves)])
    n += 1
    err = max(testing.rel_err(a, b) for a, b in zip(grads[1], grads[0]))
    print(f"chunk_gla with expanded d(final_state): worst {err:.2e}")
    if not err <= 1e-4:
        failures.append(("gla", "chunk", "expanded dht", err))
    print(f"{n - len(failures)} of {n} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
