"""Generated Triton kernels of the additive form under the Triton interpreter (run with TRITON_INTERPRET=1).

Targeted cases rather than random ones: the interpreter runs a kernel in Python, about a second per
case at these sizes. Exits non-zero listing every case whose relative error exceeds 1e-4 (fp32) or
2e-2 (fp16 inputs).
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from linattn_dsl import ops  # noqa: E402

from linattn_dsl.compiler import registry  # noqa: E402

from linattn_dsl.reference import drawing as testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _helpers
from _helpers import draw_case_as, check_expanded_dht, record  # noqa: E402

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
    # HGRN2: the key 1 - exp(g) is a role of the gate input, its gradient through both roles
    ("hgrn2", dict(B=2, T=67, heads=2, K=16, V=8)),
    ("hgrn2", dict(seqlens=[5, 64, 11], heads=1, K=8, V=8, log_decay_min=-0.5)),
    # linear attention's normalised output: the state's extra column z through every stage, then o / (q^T z)
    ("linear_attn", dict(B=2, T=70, heads=2, K=16, V=8)),
    ("linear_attn", dict(seqlens=[5, 64, 11], heads=1, K=8, V=8, switches=dict(normalize=False))),
    # Mamba: one value channel per head (channel), a decay per channel and state index
    ("mamba", dict(B=2, T=70, heads=8, groups=1, K=16, V=1)),
    # RWKV6: the output before the token's update (a read step before each write step) plus the bonus u
    ("rwkv6", dict(B=2, T=40, heads=2, K=16, V=8)),
    ("rwkv6", dict(seqlens=[5, 30, 1], heads=1, K=8, V=8)),
]


def main() -> int:
    failures, n = [], 0
    for name, kw in CASES:
        spec = registry.load(name)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            if dtype == torch.float16 and kw.get("T", 0) > 70:
                continue
            case = draw_case_as(spec, dtype, seed=n, **kw)
            for mode in ("chunk", "fused_recurrent"):
                n += 1
                errs = testing.compare(case, getattr(ops, f"{mode}_{name}"))
                record(failures, f"{mode}_{name:<10} {str(dtype):<14} {kw}", errs, tol, (name, mode, kw))
    # the gate backward's running sums inside chunks from each chunk's carry, over packed sequences of many chunks
    for name, kw in (("gla", dict(seqlens=[5, 64, 11], heads=2, K=8, V=8)),
                     ("gla", dict(seqlens=[1090, 70], heads=1, K=8, V=4)),
                     ("mamba2", dict(seqlens=[30, 1, 50], heads=2, groups=1, K=8, V=8, optional_present=False))):
        n += 1
        case = testing.draw_case(registry.load(name), seed=n, **kw)
        errs = testing.compare(case, getattr(ops, f"chunk_{name}"))
        record(failures, f"chunk_{name:<10} {kw}", errs, 1e-4, (name, kw))
    # autograd hands the kernels an expanded (stride-0) gradient of the final state for `s.sum()`
    n += 1
    check_expanded_dht(failures, "gla", ops.chunk_gla, B=1, T=40, heads=2, K=16, V=16)
    print(f"{n - len(failures)} of {n} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
