"""The launch table (linattn_dsl.runtime.tuning): every stage's launch is a pure function of its key, the choices
follow the sweeps they were measured on, and LINATTN_LAUNCH overrides are parsed by one typed parser."""

import pytest

from linattn_dsl.runtime import tuning
from linattn_dsl.runtime.tuning import Key


def _key(form="delta", vector=True, half=1, K=128, V=128, programs=128, sms=132, value_scale=False):
    return Key(form, vector, half, K, V, programs, sms, value_scale)


def test_every_stage_has_an_entry_and_is_a_pure_function_of_its_key():
    for stage, entry in tuning.TABLE.items():
        for k in (_key(), _key(half=0), _key(vector=False, K=64, V=64), _key(form="general", programs=32)):
            first, again = entry(k), entry(k)
            assert first == again, stage
            assert all(isinstance(v, int) for v in first.values()), stage


def test_state_passes_follow_the_h100_sweep():
    """Delta-form state passes: 8 warps only when their programs do not fill two per SM, the scalar-decay backward
    3 stages, the scalar-decay forward 2 once its programs fill every SM; half inputs with K <= 128 take value
    blocks of 64 when the programs at 64 still cover every SM; fp32 one stage."""
    bwd, fwd = tuning.TABLE["state_bwd"], tuning.TABLE["state_fwd"]
    assert bwd(_key(programs=32)) == dict(BK=128, BV=32, num_warps=8, num_stages=2)   # T=16384: 32 x 4 programs
    assert bwd(_key(vector=False, programs=256)) == dict(BK=128, BV=64, num_warps=4, num_stages=3)
    assert fwd(_key(programs=128)) == dict(BK=128, BV=128, num_warps=8)   # one wave of 128 on 132 SMs
    assert fwd(_key(vector=False, programs=32)) == dict(BK=128, BV=32)
    assert fwd(_key(vector=False, programs=128)) == dict(BK=128, BV=64, num_stages=2)
    assert fwd(_key(half=0)) == dict(BK=128, BV=32, num_stages=1)
    assert bwd(_key(K=256, V=256)) == dict(BK=256, BV=16, num_stages=2)


def test_stage_choices():
    assert tuning.TABLE["dqk_bwd"](_key()) == dict(BK=64, num_warps=8, num_stages=2)
    assert tuning.TABLE["dqk_bwd"](_key(form="additive", vector=False, value_scale=True)) == dict(BK=64,
                                                                                                  num_stages=2)
    assert tuning.TABLE["dqk_bwd"](_key(form="additive")) == dict(BK=64, num_warps=8)
    out = tuning.TABLE["output_fwd"]
    assert out(_key()) == dict(BK=128, BV=128)                       # the delta form reads qg
    assert out(_key(form="additive")) == dict(BK=32, BV=128)
    assert out(_key(form="additive", vector=False, value_scale=True)) == dict(BK=64, BV=64, num_warps=2)
    gs = tuning.TABLE["general_state_fwd"]
    assert gs(_key(form="general", programs=128)) == dict(BK=128, BV=128, num_warps=8, num_stages=2)
    assert gs(_key(form="general", programs=32)) == dict(BK=128, BV=32, num_warps=8, num_stages=3)
    assert gs(_key(form="general", half=0)) == dict(BK=128, BV=32, num_warps=8, num_stages=1)


def test_overrides(monkeypatch):
    k = _key()
    base = tuning.launch("ut_bwd", k)
    monkeypatch.setenv(tuning.ENV, "ut_bwd:num_warps=8,BV=64; dqk_bwd:maxnreg=168")
    assert tuning.launch("ut_bwd", k) == dict(base, num_warps=8, BV=64)
    assert tuning.launch("dqk_bwd", k)["maxnreg"] == 168
    for bad in ("nonsense:num_warps=4", "ut_bwd:warps=4", "ut_bwd:num_warps=four", "ut_bwd"):
        monkeypatch.setenv(tuning.ENV, bad)
        with pytest.raises(ValueError, match=tuning.ENV):
            tuning.launch("ut_bwd", k)
