"""The general (diagonal-plus-low-rank) ops on a GPU at real shapes (skipped without CUDA; run on the GPU
machine).

* fp32 kernels vs the float64 oracle at T <= 300 (the oracle is a Python loop): RWKV7 and one spec per
  other decay kind (none, constant with grouped q/k heads, scalar), chunk and fused_recurrent, varlen;
* bf16 kernels vs our fp32 kernels at H=16, D=128, T=4096 and 16384, forward and every gradient: bf16
  inputs round at 2^-8 and the chunk products use bf16 operands, so 3e-2 relative;
* fused_recurrent vs chunk at 16k tokens in bf16 with log-decays down to -20 (finite, equal).
"""

import pytest
import torch
from _helpers import G_CONST, G_NONE, bf16_vs_fp32_errors, check_recurrent_equals_chunk, regen, to_cuda

from linattn_dsl import ops

from linattn_dsl.compiler import registry

from linattn_dsl.reference import drawing as testing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OTHER_SPECS = {  # one general spec per decay kind besides RWKV7's vector decay
    "g_none": G_NONE,
    "g_const": G_CONST,
    "g_scalar": 'from linattn_dsl import Arg, Decay, Recurrence, Transition\n'
                'spec = Recurrence(name="g_scalar", inputs=dict(q="B T H K", k="B T H K", v="B T H V", x="B T H", '
                'A=Arg("H", sign="nonpositive"), aa="B T H K", bq="B T H K"), query="q", key="k", '
                'value="v * softplus(x)", decay=Decay.scalar(log="A * softplus(x)"), '
                'transition=Transition.general(a="aa", b="bq"))\n',
}


def _spec_and_ops(name, tmp_path):
    if name in ("rwkv7", "comba"):
        return registry.load(name), getattr(ops, f"chunk_{name}"), getattr(ops, f"fused_recurrent_{name}")
    spec, mod = regen(tmp_path, name, OTHER_SPECS[name])
    return spec, getattr(mod, f"chunk_{name}"), getattr(mod, f"fused_recurrent_{name}")


@pytest.mark.parametrize("name", ["rwkv7", "comba", "g_none", "g_const", "g_scalar"])
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_fp32_vs_oracle(name, mode, tmp_path):
    spec, chunk, recurrent = _spec_and_ops(name, tmp_path)
    op = chunk if mode == "chunk" else recurrent
    # the last: log-decays down to -0.5 per step put full chunks on the whole-chunk kernels (the others' full
    # chunks are steeper than DIAG_SPAN: the sub-block kernels)
    for kw in (dict(B=2, T=300, heads=2, K=64, V=64), dict(seqlens=[100, 1, 170], heads=2, K=128, V=64),
               dict(B=1, T=200, heads=4, groups=2, K=96, V=32, log_decay_min=-20.0),
               dict(B=1, T=260, heads=2, K=64, V=64, log_decay_min=-0.5)):
        if "groups" in kw and spec.head_dims["HQ"] == spec.head_dims["H"]:
            kw = {k: v for k, v in kw.items() if k != "groups"}
        case = to_cuda(testing.draw_case(spec, **kw), torch.float32)
        errs = testing.compare(case, op)
        print(name, mode, kw, {k: f"{e:.1e}" for k, e in errs.items()})
        assert all(e < 1e-4 for e in errs.values()), (kw, errs)


# launch overrides a tuning run may set (LINATTN_LAUNCH, runtime/tuning.py): other key blocks, warps, registers and
# sub-blocks per program than the table's
@pytest.mark.parametrize("launch", ["general_intra_bwd:RB=1;general_intra_diag_bwd:RB=2;general_solve_fwd:BK=16",
                                    "general_intra_diag_bwd:BK=64,num_warps=4;general_intra_bwd:maxnreg=168;"
                                    "general_chunk_intra_bwd:BK=64,num_warps=8;general_chunk_scores_fwd:FBK=32,num_warps=8",
                                    "general_intra_bwd:BK=16,num_warps=1;general_state_fwd:BV=32,num_stages=1;"
                                    "general_state_bwd:BV=64"])
def test_launch_variants_vs_oracle(launch, monkeypatch):
    monkeypatch.setenv("LINATTN_LAUNCH", launch)
    spec = registry.load("rwkv7")
    for kw in (dict(B=2, T=300, heads=2, K=64, V=64), dict(seqlens=[100, 1, 170], heads=2, K=128, V=64),
               dict(B=1, T=200, heads=4, K=96, V=32, log_decay_min=-20.0)):
        errs = testing.compare(to_cuda(testing.draw_case(spec, **kw), torch.float32), ops.chunk_rwkv7)
        print(launch, kw, {k: f"{e:.1e}" for k, e in errs.items()})
        assert all(e < 1e-4 for e in errs.values()), (kw, errs)


# D=256 in bf16: the state passes at 1 pipelining stage (general._state_blocks), a path the others do not take;
# B=16 at T=1024 (256 sequences x heads): the state passes at BV 128 and 2 stages
@pytest.mark.parametrize("T,B,D", [(4096, 2, 128), (16384, 1, 128), (2048, 1, 64), (1024, 1, 256), (1024, 16, 128)])
def test_bf16_vs_fp32_real_shapes(T, B, D):
    spec = registry.load("rwkv7")
    case = to_cuda(testing.draw_case(spec, B=B, T=T, heads=16, K=D, V=D, log_decay_min=-1.0, seed=T), torch.float32)
    errs = bf16_vs_fp32_errors(case, ops.chunk_rwkv7, ("rwkv7", T, B, D))
    assert all(e < 3e-2 for e in errs.values()), errs


def test_recurrent_equals_chunk_and_extreme_gates_finite():
    spec = registry.load("rwkv7")
    check_recurrent_equals_chunk(spec, ops.chunk_rwkv7, ops.fused_recurrent_rwkv7)
