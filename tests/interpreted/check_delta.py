"""Generated Triton kernels of the delta-rule form under the Triton interpreter (TRITON_INTERPRET=1).

Targeted cases (the interpreter runs a kernel in Python: seconds per case at these sizes): one token,
partial sub-blocks and chunks, several chunks, packed sequences, grouped heads, initial state, key/value
dims that are not powers of two, log-decays down to -20, beta up to 2, the in-kernel KDA gate and q/k
L2 norm. Outputs, final state and every gradient against the float64 oracle; exits non-zero listing
every case whose relative error exceeds 1e-4 (fp32) or 2e-2 (fp16 inputs).
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

KDA_GATE = dict(use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)
CASES = [  # (spec, draw_case keywords, modes)
    ("delta_rule", dict(B=1, T=1, heads=1, K=8, V=8), ("chunk", "fused_recurrent")),
    ("delta_rule", dict(B=2, T=70, heads=2, K=16, V=8), ("chunk", "fused_recurrent")),
    ("delta_rule", dict(B=1, T=40, heads=1, K=20, V=12, with_initial_state=True), ("chunk",)),
    ("gated_delta_rule", dict(B=1, T=40, heads=4, groups=2, K=16, V=8), ("chunk", "fused_recurrent")),
    ("gated_delta_rule", dict(B=1, T=130, heads=1, K=16, V=16, log_decay_min=-20.0), ("chunk",)),
    ("gated_delta_rule", dict(seqlens=[30, 1, 50], heads=2, K=8, V=8, with_initial_state=True),
     ("chunk", "fused_recurrent")),
    ("kda", dict(B=1, T=1, heads=1, K=8, V=8), ("chunk", "fused_recurrent")),
    ("kda", dict(B=1, T=70, heads=2, K=16, V=8, log_decay_min=-20.0), ("chunk", "fused_recurrent")),
    ("kda", dict(seqlens=[5, 64, 11], heads=2, K=8, V=8, with_initial_state=True), ("chunk",)),
    ("kda", dict(B=1, T=40, heads=4, groups=2, K=24, V=8, switches=KDA_GATE), ("chunk", "fused_recurrent")),
    ("kda", dict(B=1, T=33, heads=1, K=80, V=72), ("chunk",)),
    # mild decays (at most 7.5 nats across a sub-block): scores_diag forms every sub-block as products (the
    # -20 case above sends every full one per column). Last, so the cases above keep their seeds
    ("kda", dict(B=1, T=70, heads=2, K=16, V=8, log_decay_min=-0.5), ("chunk",)),
    # Gated DeltaProduct: 3 delta steps per token, the decay on each token's first (the interleaved sequence)
    ("gated_delta_product", dict(B=2, T=30, heads=2, K=16, V=8, substeps=3), ("chunk", "fused_recurrent")),
    ("gated_delta_product", dict(seqlens=[5, 30, 1], heads=1, K=8, V=8, substeps=2,
                                 switches=dict(use_qk_l2norm_in_kernel=True)), ("chunk",)),
]


def main() -> int:
    failures, n = [], 0
    for name, kw, modes in CASES:
        spec = registry.load(name)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            if dtype == torch.float16 and kw.get("T", 0) > 40:
                continue
            case = draw_case_as(spec, dtype, seed=n, **kw)
            for mode in modes:
                n += 1
                errs = testing.compare(case, getattr(ops, f"{mode}_{name}"))
                record(failures, f"{mode}_{name:<16} {str(dtype):<14} {kw}", errs, tol, (name, mode, kw))
    # beta up to 2 (negative eigenvalues) and keys of norm 1: the triangular solve stays accurate
    spec = registry.load("delta_rule")
    case = testing.draw_case(spec, B=1, T=64, heads=1, K=16, V=8, seed=3)
    case.tensors["k"] = torch.nn.functional.normalize(case.tensors["k"], dim=-1)
    case.tensors["beta"] = 2 * torch.rand_like(case.tensors["beta"]) ** 0.25
    n += 1
    errs = testing.compare(case, ops.chunk_delta_rule)
    record(failures, "chunk_delta_rule beta in (0, 2), unit keys:", errs, 1e-4, ("delta_rule", "chunk", "beta 2"))
    # autograd may hand the kernels an expanded (stride-0) gradient of the final state for `s.sum()`
    n += 1
    check_expanded_dht(failures, "kda", ops.chunk_kda, B=1, T=40, heads=2, K=16, V=16)
    print(f"{n - len(failures)} of {n} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
