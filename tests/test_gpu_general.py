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

from linattn_dsl import ops

from linattn_dsl.compiler import codegen, registry

from linattn_dsl.reference import drawing as testing
from linattn_dsl.cli import _import_file

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OTHER_SPECS = {  # one general spec per decay kind besides RWKV7's vector decay
    "g_none": 'from linattn_dsl import Recurrence, Transition\n'
              'spec = Recurrence(name="g_none", inputs=dict(q="B T H K", k="B T H K", v="B T H V", aa="B T H K", '
              'bq="B T H K"), query="q", key="k", value="v", transition=Transition.general(a="aa", b="bq"))\n',
    "g_const": 'from linattn_dsl import Decay, Recurrence, Transition\n'
               'spec = Recurrence(name="g_const", inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", aa="B T H K", '
               'bq="B T H K", c="H"), optional=dict(D="H"), skip="D * v", query="q", key="k", value="v", '
               'decay=Decay.constant(log="-softplus(c) - 0.01"), scale=0.3, '
               'transition=Transition.general(a="aa", b="bq"))\n',
    "g_scalar": 'from linattn_dsl import Arg, Decay, Recurrence, Transition\n'
                'spec = Recurrence(name="g_scalar", inputs=dict(q="B T H K", k="B T H K", v="B T H V", x="B T H", '
                'A=Arg("H", sign="nonpositive"), aa="B T H K", bq="B T H K"), query="q", key="k", '
                'value="v * softplus(x)", decay=Decay.scalar(log="A * softplus(x)"), '
                'transition=Transition.general(a="aa", b="bq"))\n',
}


def _to(case, dtype):
    case.tensors = {k: (v.to("cuda", dtype if v.dim() >= 3 else torch.float32) if v is not None else None)
                    for k, v in case.tensors.items()}
    if case.initial_state is not None:
        case.initial_state = case.initial_state.cuda()
    if case.cu_seqlens is not None:
        case.cu_seqlens = case.cu_seqlens.cuda()
    return case


def _spec_and_ops(name, tmp_path):
    if name == "rwkv7":
        return registry.load(name), ops.chunk_rwkv7, ops.fused_recurrent_rwkv7
    (tmp_path / f"{name}.py").write_text(OTHER_SPECS[name])
    spec = registry.load(str(tmp_path / f"{name}.py"))
    codegen.regen([spec], tmp_path / "gen", builtin=False, index=False)
    mod = _import_file(tmp_path / "gen" / f"{name}.py")
    return spec, getattr(mod, f"chunk_{name}"), getattr(mod, f"fused_recurrent_{name}")


@pytest.mark.parametrize("name", ["rwkv7", "g_none", "g_const", "g_scalar"])
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
        case = _to(testing.draw_case(spec, **kw), torch.float32)
        errs = testing.compare(case, op)
        print(name, mode, kw, {k: f"{e:.1e}" for k, e in errs.items()})
        assert all(e < 1e-4 for e in errs.values()), (kw, errs)


# launch choices a sweep may adopt (benchmarks/launch_sweep.py): general_intra_diag_bwd:r0 switches the diagonal
# sub-blocks' own kernel off (general_intra_bwd then forms them too); general_state_fwd:r1 forms the output in
# the state pass; general_solve_fwd:r1 solves in the whole-chunk scores kernel, general_scores_fwd:r0 leaves
# the steeper chunks to it too (not launched); general_intra_bwd / general_intra_diag_bwd r4: four sub-blocks per
# program; the whole-chunk kernels' r0 hands every chunk to the sub-block
# kernels (the path chunks steeper than DIAG_SPAN take)
@pytest.mark.parametrize("launch", ["general_scores_fwd:r0,general_solve_fwd:r1,general_state_fwd:r1,"
                                    "general_intra_bwd:r4,general_intra_diag_bwd:r4",
                                    "general_intra_diag_bwd:k64w4,general_scores_fwd:k64w2,general_intra_bwd:m168,"
                                    "general_chunk_intra_bwd:k64w8,general_chunk_scores_fwd:k16w8,general_state_fwd:r1",
                                    "general_intra_diag_bwd:r0,general_scores_fwd:k16w1,general_chunk_intra_bwd:r0,"
                                    "general_chunk_scores_fwd:r0,gate_bwd:r1"])
def test_launch_variants_vs_oracle(launch, monkeypatch):
    monkeypatch.setenv("LINATTN_LAUNCH", launch)
    spec = registry.load("rwkv7")
    for kw in (dict(B=2, T=300, heads=2, K=64, V=64), dict(seqlens=[100, 1, 170], heads=2, K=128, V=64),
               dict(B=1, T=200, heads=4, K=96, V=32, log_decay_min=-20.0)):
        errs = testing.compare(_to(testing.draw_case(spec, **kw), torch.float32), ops.chunk_rwkv7)
        print(launch, kw, {k: f"{e:.1e}" for k, e in errs.items()})
        assert all(e < 1e-4 for e in errs.values()), (kw, errs)


# D=256 in bf16: the state passes at 1 pipelining stage (general._state_blocks), a path the others do not take;
# B=16 at T=1024 (256 sequences x heads): the state passes at BV 128 and 2 stages
@pytest.mark.parametrize("T,B,D", [(4096, 2, 128), (16384, 1, 128), (2048, 1, 64), (1024, 1, 256), (1024, 16, 128)])
def test_bf16_vs_fp32_real_shapes(T, B, D):
    spec = registry.load("rwkv7")
    case = _to(testing.draw_case(spec, B=B, T=T, heads=16, K=D, V=D, log_decay_min=-1.0, seed=T), torch.float32)

    # both runs see the same (bf16-rounded) values, so the comparison measures the kernels alone
    rounded = {k: v.to(torch.bfloat16) for k, v in case.tensors.items()}

    def run(dtype):
        t = {k: v.to(dtype).detach().requires_grad_() for k, v in rounded.items()}
        h0 = case.initial_state.detach().clone().requires_grad_()
        o, s = case.call(ops.chunk_rwkv7, t, h0)
        gen = torch.Generator(device="cuda").manual_seed(0)
        do = torch.randn(o.shape, device="cuda", generator=gen)
        ((o.float() * do).sum() + s.sum()).backward()
        return dict(o=o.float(), final_state=s, dinitial_state=h0.grad, **{f"d{k}": t[k].grad.float() for k in t})

    ref, got = run(torch.float32), run(torch.bfloat16)
    assert not testing.not_reproduced(got, run(torch.bfloat16))   # the same bits again
    errs = {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-2)) for k in ref}
    print("rwkv7", T, B, D, {k: f"{e:.1e}" for k, e in errs.items()})
    assert all(torch.isfinite(x).all() for x in got.values())
    assert all(e < 3e-2 for e in errs.values()), errs


def test_recurrent_equals_chunk_and_extreme_gates_finite():
    spec = registry.load("rwkv7")
    case = _to(testing.draw_case(spec, B=1, T=16384, heads=2, K=128, V=128, log_decay_min=-20.0, seed=1),
               torch.bfloat16)
    o1, s1 = case.call(ops.chunk_rwkv7)
    o2, s2 = case.call(ops.fused_recurrent_rwkv7)
    assert torch.isfinite(o1).all() and torch.isfinite(s1).all()
    assert float((o1.float() - o2.float()).abs().max() / o2.float().abs().max()) < 3e-2
    assert float((s1 - s2).abs().max() / s2.abs().max()) < 3e-2
