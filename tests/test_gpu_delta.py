"""The delta-rule ops on a GPU at real shapes (skipped without CUDA; run on the GPU machine).

The same three checks as tests/test_gpu_additive.py: fp32 kernels vs the float64 oracle (T <= 160),
bf16 vs our fp32 kernels at T up to 16384 with head dims 64/128/256 (3e-2 relative, every gradient),
fused_recurrent vs chunk with log-decays down to -20 at 16k tokens (finite, 3e-2).
"""

import pytest
import torch
from _helpers import bf16_vs_fp32_errors, check_recurrent_equals_chunk, to_cuda

from linattn_dsl import ops

from linattn_dsl.compiler import registry

from linattn_dsl.reference import drawing as testing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DELTA = ["delta_rule", "gated_delta_rule", "kda", "gated_delta_product"]


@pytest.mark.parametrize("name", DELTA)
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_fp32_vs_oracle(name, mode):
    spec = registry.load(name)
    # the oracle is a Python loop over tokens (slow on a GPU): three chunks are enough to cover every stage
    # the last: log-decays down to -0.5 per step put KDA's full chunks on dqk_chunk_intra_bwd
    for kw in (dict(B=2, T=150, heads=2, K=64, V=64), dict(seqlens=[70, 1, 90], heads=2, K=128, V=64),
               dict(B=1, T=140, heads=4, groups=2, K=32, V=32, log_decay_min=-20.0),
               dict(B=1, T=150, heads=2, K=64, V=64, log_decay_min=-0.5)):
        case = to_cuda(testing.draw_case(spec, **kw), torch.float32)
        errs = testing.compare(case, getattr(ops, f"{mode}_{name}"))
        assert all(e < 1e-4 for e in errs.values()), (kw, errs)


# launch overrides a tuning run may set (LINATTN_LAUNCH, runtime/tuning.py): the diagonal sub-blocks' key blocks and
# warps (scores_diag_pair: KDA's; scores_diag: GLA's, the additive form's, checked here with it), the whole-chunk
# backward's blocks, dqk_intra_bwd's sub-blocks per program; log-decays down to -20 per step send every full
# sub-block to scores_diag's per-column form (its span > DIAG_SPAN)
@pytest.mark.parametrize("name", ["kda", "gla"])
@pytest.mark.parametrize("launch", ["scores_diag_pair:BK=128,num_warps=4;scores_diag:BK=32,num_warps=1;"
                                    "dqk_chunk_intra_bwd:BK=64,num_warps=8",
                                    "scores_diag_pair:BK=32,num_warps=1;scores_diag:BK=128,num_warps=4;"
                                    "dqk_intra_bwd_pair:RB=1;dqk_intra_bwd:RB=2"])
def test_launch_variants_vs_oracle(name, launch, monkeypatch):
    monkeypatch.setenv("LINATTN_LAUNCH", launch)
    spec = registry.load(name)
    for kw in (dict(B=2, T=150, heads=2, K=64, V=64), dict(seqlens=[70, 1, 90], heads=2, K=128, V=64),
               dict(B=1, T=200, heads=2, K=128, V=64, log_decay_min=-20.0)):
        errs = testing.compare(to_cuda(testing.draw_case(spec, **kw), torch.float32), getattr(ops, f"chunk_{name}"))
        assert all(e < 1e-4 for e in errs.values()), (kw, errs)


@pytest.mark.parametrize("name", DELTA)
# B=32 x 4 heads: enough sequences x heads that the bf16 state passes take value blocks of 64 (delta._state_bv)
# and KDA's state_fwd 128 (delta._state_fwd_bv)
@pytest.mark.parametrize("T,B,D", [(4096, 2, 128), (16384, 1, 64), (2048, 1, 256), (512, 32, 128)])
def test_bf16_vs_fp32_real_shapes(name, T, B, D):
    spec = registry.load(name)
    case = to_cuda(testing.draw_case(spec, B=B, T=T, heads=4, K=D, V=D, seed=T), torch.float32)
    errs = bf16_vs_fp32_errors(case, getattr(ops, f"chunk_{name}"), (name, T, B, D), missing_grads_ok=True)
    assert all(e < 3e-2 for e in errs.values()), errs


@pytest.mark.parametrize("name", DELTA)
def test_recurrent_equals_chunk_and_extreme_gates_finite(name):
    spec = registry.load(name)
    check_recurrent_equals_chunk(spec, getattr(ops, f"chunk_{name}"), getattr(ops, f"fused_recurrent_{name}"))
