"""The delta-rule chunk form (issue 4): the generated PyTorch twin (UT transform per chunk) and the
generated Triton stages (under the interpreter, in a subprocess) against the oracle: outputs, final
states and every gradient; fp32 tolerance 1e-4 relative. GPU shapes: tests/test_gpu_delta.py.
"""

import pytest
import torch
from _helpers import assert_matches_oracle, regen, run_interpreted_check, verify_interpreted

from linattn_dsl import ops

from linattn_dsl.compiler import codegen, registry

from linattn_dsl.reference import drawing as testing, verify

DELTA = ["delta_rule", "gated_delta_rule", "kda"]


@pytest.mark.parametrize("name", DELTA)
def test_torch_twin_matches_oracle(name):
    spec = registry.load(name)
    assert codegen.lowering.lower(spec).form == "delta"
    res = verify.verify(spec, examples=25, max_T=100)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


@pytest.mark.parametrize("name", DELTA)
def test_extreme_gates_and_unit_keys_are_finite(name):
    assert_matches_oracle(registry.load(name), getattr(ops, f"chunk_{name}"), B=1, T=300, heads=2, K=16, V=8,
                          log_decay_min=-20.0, seed=4)


def test_beta_up_to_two_negative_eigenvalues(tmp_path):
    """beta = 2 sigmoid(b) lets I - beta k k^T have eigenvalue down to -1 (keys of norm 1)."""
    spec, mod = regen(tmp_path, "delta2", "from linattn_dsl import Decay, Recurrence, Transition\n"
                      "spec = Recurrence(name='delta2', inputs=dict(q='B T H K', k='B T H K', v='B T H V', "
                      "b='B T H', a='B T H'), query='q', key='k', value='v', qk_l2norm=True,\n"
                      "    decay=Decay.scalar(log='-softplus(a)'), "
                      "transition=Transition.delta(beta='2 * sigmoid(b)'))\n")
    case = testing.draw_case(spec, B=2, T=200, heads=2, K=16, V=8, seed=2)
    case.tensors["b"] = torch.full_like(case.tensors["b"], 8.0)    # beta ~ 2: the hardest case
    errs = testing.compare(case, mod.chunk_delta2)
    assert all(e < 1e-4 for e in errs.values()), errs
    res = verify.verify(spec, mod, examples=10, max_T=80)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


def test_gated_delta_rule_needed_no_template_change():
    """gated_delta_rule is only a spec: its generated module comes from the same stage templates as
    delta_rule and kda, and no template or runtime file names it."""
    from pathlib import Path

    import linattn_dsl

    specs = [registry.load(n) for n in DELTA]
    names = {s.name: codegen.templates_for(codegen.lowering.lower(s).form, s.decay.kind == "vector") for s in specs}
    assert names["delta_rule"] == names["gated_delta_rule"]   # kda adds only the per-channel decays' stages
    assert set(names["gated_delta_rule"]) < set(names["kda"])
    package = Path(linattn_dsl.__file__).parent
    for f in [*codegen.template_dir().glob("*.j2"), *package.glob("*.py"), *(package / "runtime").glob("*.py"),
              *(package / "compiler").glob("*.py")]:
        assert "gated_delta" not in f.read_text(), f


def test_interpreted_triton_kernels():
    """Runs tests/interpreted/check_delta.py with TRITON_INTERPRET=1 in a fresh interpreter: the
    generated delta-rule Triton stages (forward, backward, recurrent) against the float64 oracle."""
    run_interpreted_check("delta", timeout=2400)


_DECAYS = {"none": "Decay.none()", "constant": "Decay.constant(log='-0.1 * (h + 1)')",
           "scalar": "Decay.scalar(log='logsigmoid(a)')", "vector": "Decay.vector(log='-exp(c) * softplus(gv)')"}


def _delta_source(decay: str, beta: str, grouped: bool, l2: bool) -> str:
    hk = "HK" if grouped else "H"
    inputs = dict(q=f"B T {hk} K", k=f"B T {hk} K", v="B T H V", bb="B T H")
    if decay == "scalar":
        inputs["a"] = "B T H"
    if decay == "vector":
        inputs.update(gv="B T H K", c="H")
    return ("from linattn_dsl import Decay, Recurrence, Transition\n"
            f"spec = Recurrence(name='drawn', inputs={inputs!r}, query='q', key='k', value='v',\n"
            f"                  decay={_DECAYS[decay]}, transition=Transition.delta(beta={beta!r}),\n"
            f"                  qk_l2norm={l2})\n")


def test_drawn_delta_specs_under_the_triton_interpreter(tmp_path):
    """Delta-rule specs drawn by hypothesis over decay kind x beta expression x groups x q/k norm,
    regenerated into a temporary folder and verified through their generated Triton kernels
    (TRITON_INTERPRET=1, fresh process): the proof that a delta variant needs only a spec."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    sources = []

    @settings(max_examples=4, derandomize=True, deadline=None, database=None)
    @given(st.sampled_from(list(_DECAYS)), st.sampled_from(["sigmoid(bb)", "2 * sigmoid(bb)"]), st.booleans(),
           st.booleans())
    def draw(decay, beta, grouped, l2):
        sources.append(_delta_source(decay, beta, grouped, l2))

    draw()
    # every decay kind at least once, whatever hypothesis drew
    sources += [_delta_source(d, "sigmoid(bb)", d == "vector", False) for d in _DECAYS
                if not any(_DECAYS[d] in s for s in sources)]
    r = verify_interpreted(sources, tmp_path, timeout=2400, form="delta")
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("triton-interpret") >= 2 * len(sources)
