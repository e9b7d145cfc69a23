"""Decay spikes and non-finite inputs on a GPU (skipped without CUDA; run on the GPU machine).

* fp32 kernels vs the float64 oracle with per-step log-decays of -inf, -1e30, -1e4 and -50 at the first
  token, on both sides of a chunk boundary, inside a chunk (one channel only) and at the last token:
  outputs, final states and every gradient within 1e-4 relative (the op tests' fp32 bound);
* bf16 at T=4096: a NaN or inf at token t changes no output before t and nothing of the other sequence (its
  outputs and final state), bit for bit against the same call without it; the rows of t's own chunk before it
  are recomputed by the chunk form's containment pass (the step form) and agree to bf16 rounding (2e-2).
"""

import pytest
import torch

from linattn_dsl import ops

from linattn_dsl.compiler import registry

from linattn_dsl.reference import drawing as testing
from linattn_dsl.runtime.tuning import BT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# the plain log-decay input of each shipped spec that takes one per token
LOG_DECAY_INPUT = {"gla": "g", "kda": "g", "gated_delta_rule": "g", "rwkv7": "w"}
ALL = ["retention", "gla", "mamba2", "kda", "delta_rule", "gated_delta_rule", "rwkv7"]


def _cuda(case, dtype):
    case.tensors = {k: (v.to("cuda", dtype if v.dim() >= 3 else torch.float32) if v is not None else None)
                    for k, v in case.tensors.items()}
    case.initial_state = case.initial_state.cuda() if case.initial_state is not None else None
    case.cu_seqlens = case.cu_seqlens.cuda() if case.cu_seqlens is not None else None
    return case


@pytest.mark.parametrize("name", sorted(LOG_DECAY_INPUT) + ["mamba2"])
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_decay_spikes_vs_oracle(name, mode):
    spec = registry.load(name)
    case = testing.draw_case(spec, B=2, T=300, heads=2, K=64, V=64, seed=3)
    if name == "mamba2":   # a per-head decay rate: head 0 forgets everything at every token
        case.tensors["A"][0] = -float("inf")
    else:
        g = case.tensors[LOG_DECAY_INPUT[name]]
        for t, value in ((0, -float("inf")), (63, -float("inf")), (64, -1e4), (200, -1e30), (299, -50.0)):
            if t == 200 and g.dim() == 4:
                g[:, t, :, 3] = value       # one key channel only
            else:
                g[:, t] = value
    errs = testing.compare(_cuda(case, torch.float32), getattr(ops, f"{mode}_{name}"))
    assert all(e < 1e-4 for e in errs.values()), errs


def _poison_targets():
    """(spec, input, value) for each spec: NaN in its value input, inf in its key input, NaN in the raw input of its
    log-decay (Mamba2's dt, which also scales the values); specs without a per-token gate input have two."""
    out = []
    for name in ALL:
        spec = registry.load(name)
        out += [(name, spec.value_input, "nan"), (name, spec.resolve(spec.switch_values()).key.name, "inf")]
        gate = LOG_DECAY_INPUT.get(name, "dt" if name == "mamba2" else None)
        if gate is not None:
            out.append((name, gate, "nan"))
    return out


@pytest.mark.parametrize("name, target, value", _poison_targets())
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_nonfinite_stays_where_it_is(name, target, value, mode):
    spec = registry.load(name)
    case = _cuda(testing.draw_case(spec, B=2, T=4096, heads=4, K=128, V=128, seed=5), torch.bfloat16)
    op = getattr(ops, f"{mode}_{name}")
    t0 = 2000   # inside a chunk (2000 % 64 = 16)
    clean_o, clean_s = case.call(op)
    poisoned = dict(case.tensors)
    poisoned[target] = case.tensors[target].clone()
    poisoned[target][0, t0] = float(value)
    o, s = case.call(op, poisoned)
    start = t0 - t0 % BT   # t0's chunk: its earlier rows come from the containment pass in the chunk form
    assert torch.equal(o[0, :start], clean_o[0, :start]), f"{target} at token {t0} changed earlier chunks"
    near, ref = o[0, start:t0].float(), clean_o[0, start:t0].float()
    assert torch.isfinite(near).all() and (near - ref).norm() <= 2e-2 * ref.norm(), f"{target}: rows {start}..{t0}"
    assert torch.equal(o[1], clean_o[1]) and torch.equal(s[1], clean_s[1]), "another sequence changed"
    assert not torch.isfinite(o[0, t0:]).all()
