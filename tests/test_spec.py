"""The spec language: the shipped specs, and every SpecError path."""

import pytest

from linattn_dsl.compiler import registry
from linattn_dsl.compiler.spec import Arg, Decay, If, Recurrence, SpecError, Substeps, Transition

BASE = dict(name="s", inputs=dict(q="B T H K", k="B T H K", v="B T H V"), query="q", key="k", value="v")


def make(**kw):
    args = dict(BASE)
    args.update(kw)
    return Recurrence(**args)


def test_shipped_specs_and_their_kinds():
    kinds = {s.name: (s.decay.kind, s.transition.kind) for s in registry.all_specs()}
    assert kinds == {
        "retention": ("constant", "none"), "gla": ("vector", "none"), "mamba2": ("scalar", "none"),
        "rwkv7": ("vector", "general"), "kda": ("vector", "delta"), "delta_rule": ("none", "delta"),
        "gated_delta_rule": ("scalar", "delta"), "comba": ("scalar", "general"),
        "hgrn2": ("vector", "none"), "linear_attn": ("none", "none"),
        "mamba": ("vector", "none"), "gated_delta_product": ("scalar", "delta"),
        "rwkv6": ("vector", "none"),
    }


def test_positional_order_matches_design():
    order = {s.name: list(s.inputs) for s in registry.all_specs()}
    assert order["retention"] == ["q", "k", "v"]
    assert order["gla"] == ["q", "k", "v", "g"]
    assert order["mamba2"] == ["x", "dt", "A", "B", "C"]
    assert order["rwkv7"] == ["r", "w", "k", "v", "a", "b"]
    assert order["kda"] == ["q", "k", "v", "g", "beta"]
    assert order["delta_rule"] == ["q", "k", "v", "beta"]
    assert order["gated_delta_rule"] == ["q", "k", "v", "g", "beta"]
    assert order["comba"] == ["q", "k", "v", "p", "g", "beta"]   # FLA's chunk_comba
    assert order["hgrn2"] == ["q", "g", "v"]
    assert order["linear_attn"] == ["q", "k", "v"]   # FLA's chunk_linear_attn
    assert order["mamba"] == ["x", "dt", "A", "B", "C"]   # mamba_ssm's selective scan (u, delta, A, B, C)
    assert order["gated_delta_product"] == ["q", "k", "v", "g", "beta"]   # then num_householder, as FLA's
    assert order["rwkv6"] == ["r", "k", "v", "w", "u"]   # FLA's chunk_rwkv6
    m = registry.load("mamba2")
    assert list(m.optional) == ["D", "dt_bias"] and m.switches == {"dt_softplus": True} and m.scale == 1.0
    assert registry.load("rwkv7").scale == 1.0


def test_mamba2_roles_and_groups():
    m = registry.load("mamba2")
    r = m.resolve()
    assert str(r.value) == "x*softplus(dt + dt_bias)" and str(r.log_decay) == "A*softplus(dt + dt_bias)"
    assert m.head_dims == {"H": "H", "HQ": "G", "K": "N", "V": "P"}
    assert str(m.resolve(present=set()).value) == "x*softplus(dt)"
    assert m.resolve(present=set()).skip is None
    assert "relu" in m.describe() or str(m.resolve({"dt_softplus": False}).log_decay) == "A*Max(0, dt + dt_bias)"


def test_valid_minimal_and_user_spec_forms():
    s = make(decay=Decay.scalar(log="-softplus(a)"), inputs=dict(BASE["inputs"], a="B T H"),
             transition=Transition.delta(beta="sigmoid(a)"))
    assert s.decay_kind == "scalar" and s.transition_kind == "delta"
    make(decay=Decay.vector(log="logsigmoid(g)"), inputs=dict(BASE["inputs"], g="B T H K"))
    make(decay=Decay.constant(log="-exp(c)"), optional=dict(c="H"))


ERRORS = [
    ("name", dict(name="not a name")),
    ("inputs", dict(inputs={})),
    ("inputs.q", dict(inputs=dict(q="B T H K!", k="B T H K", v="B T H V"))),
    ("inputs.q", dict(inputs=dict(q="B T H K X", k="B T H K", v="B T H V"))),
    ("inputs.q", dict(inputs=dict(q=Arg("B T H K", sign="tiny"), k="B T H K", v="B T H V"))),
    ("inputs.q", dict(inputs=dict(q=3, k="B T H K", v="B T H V"))),
    ("inputs.x", dict(inputs=dict(BASE["inputs"], x="H T"))),
    ("inputs.x", dict(inputs=dict(BASE["inputs"], x="H K V"))),
    ("inputs.x", dict(inputs=dict(BASE["inputs"], x="Z"))),
    ("inputs.x", dict(inputs=dict(BASE["inputs"], x="B T K"))),        # K is a feature dim elsewhere
    ("inputs.h", dict(inputs=dict(BASE["inputs"], h="B T H"))),        # reserved: head index
    ("inputs.scale", dict(inputs=dict(BASE["inputs"], scale="B T H"))),
    ("optional.q", dict(optional=dict(q="H"))),                        # declared twice
    ("switches.flag", dict(switches=dict(flag=1))),
    ("decay", dict(decay=Decay("sideways", "x"))),
    ("decay.log", dict(decay=Decay.none().__class__("none", "q"))),
    ("decay.log", dict(decay=Decay.scalar(log=None))),
    ("decay.log", dict(decay=Decay.scalar(log="unknown_thing"))),
    ("decay.log", dict(decay=Decay.scalar(log="a +"), inputs=dict(BASE["inputs"], a="B T H"))),
    ("decay.log", dict(decay=Decay.scalar(log="softplus(a)"), inputs=dict(BASE["inputs"], a="B T H"))),
    ("decay.log", dict(decay=Decay.scalar(log="a"), inputs=dict(BASE["inputs"], a="B T H"))),
    ("decay.log", dict(decay=Decay.constant(log="log(1 + 2**(-h))"))),
    ("decay.log", dict(decay=Decay.constant(log="-softplus(a)"), inputs=dict(BASE["inputs"], a="B T H"))),
    ("decay.log", dict(decay=Decay.scalar(log="-softplus(a)"), inputs=dict(BASE["inputs"], a="B T H K"))),
    ("decay.log", dict(decay=Decay.vector(log="-softplus(a)"), inputs=dict(BASE["inputs"], a="B T H V"))),
    ("decay.log", dict(decay=Decay.scalar(log=If("nope", "-softplus(a)", "-exp(a)")),
                       inputs=dict(BASE["inputs"], a="B T H"))),
    ("transition", dict(transition=Transition("teleport"))),
    ("transition.beta", dict(transition=Transition("delta"))),
    ("transition.beta", dict(transition=Transition("none", beta="q"))),
    ("transition.a", dict(transition=Transition("general", b="k"))),
    ("transition.beta", dict(transition=Transition.delta(beta="q"))),   # beta must not vary over K
    ("transition.a", dict(transition=Transition.general(a="x", b="k"), inputs=dict(BASE["inputs"], x="B T H"))),
    ("scale", dict(scale=-1.0)),
    ("scale", dict(scale=float("inf"))),
    ("qk_l2norm", dict(qk_l2norm="missing_switch")),
    ("qk_l2norm", dict(qk_l2norm=3)),
    ("key", dict(inputs=dict(q="B T H K", k="B T H D", v="B T H V"))),  # shape symbols disagree
    ("query", dict(query="q * v")),                                      # mixes K and V features
    ("query", dict(inputs=dict(q="B T H", k="B T H K", v="B T H V"))),   # not [B, T, H, K]
    ("query", dict(query="q * h")),                                      # head index outside a constant decay
    ("skip", dict(skip="q")),                                            # does not broadcast to o
    ("let.q", dict(let=dict(q="k"))),
    ("let.d", dict(let=dict(d="k +"))),
    ("l2norm_inputs", dict(l2norm_inputs=("q", "k"))),                   # qk_l2norm is False
    ("l2norm_inputs", dict(l2norm_inputs=("x",), qk_l2norm=True)),       # not an input
    ("l2norm_inputs", dict(l2norm_inputs=("v",), qk_l2norm=True, inputs=dict(q="B T H K", k="B T H K", v="B T H V"))),
    ("l2norm_inputs", dict(l2norm_inputs=("g",), qk_l2norm=True, decay=Decay.vector(log="-softplus(g)"),
                           inputs=dict(BASE["inputs"], g="B T H K"))),  # read by the log-decay
    ("l2norm_inputs", dict(l2norm_inputs="q", qk_l2norm=True)),          # a string, not a tuple
    ("normalize", dict(normalize="nosuch")),                             # not a switch
    ("normalize", dict(normalize=1)),                                    # not a bool or a switch name
    ("normalize", dict(normalize=True, transition=Transition.delta(beta="b"), inputs=dict(BASE["inputs"], b="B T H"))),
    ("normalize", dict(normalize=True, value="v * x", inputs=dict(BASE["inputs"], x="B T H"))),  # not a bare input
    ("normalize", dict(normalize=True, optional=dict(u="B T H V"), skip="u")),   # another input on the value dim
    ("substeps", dict(substeps=("k",))),                                 # not a Substeps(...)
    ("substeps.inputs", dict(substeps=Substeps(inputs=("q", "k")))),     # the query reads a sub-step input
    ("substeps.inputs", dict(substeps=Substeps(inputs=("x",)))),         # not an input
    ("substeps.count", dict(substeps=Substeps(inputs=("k",), count="scale"))),   # an op argument already
    ("substeps", dict(substeps=Substeps(inputs=("k", "g")), decay=Decay.scalar(log="g"),
                      inputs=dict(BASE["inputs"], g=Arg("B T H", sign="nonpositive")))),   # the decay per sub-step
    ("substeps", dict(substeps=Substeps(inputs=("k",)), decay=Decay.scalar(log="-softplus(g)"),
                      inputs=dict(BASE["inputs"], g="B T H"))),          # the decay is an expression, not an input
    ("read", dict(read="later")),                                        # not a read
    ("bonus", dict(bonus="u", inputs=dict(BASE["inputs"], u="H K"))),    # a bonus needs read="before"
    ("bonus", dict(read="before", bonus="v")),                           # not [H, K] or [B, T, H, K]
    ("read", dict(read="before", transition=Transition.delta(beta="b"), inputs=dict(BASE["inputs"], b="B T H"))),
    ("read", dict(read="before", query="q * 2")),                        # the query is not an input of its own
]


@pytest.mark.parametrize("field,kw", ERRORS, ids=[f"{i}-{f}" for i, (f, _) in enumerate(ERRORS)])
def test_spec_errors_name_the_field(field, kw):
    with pytest.raises(SpecError) as e:
        make(**kw)
    assert e.value.field == field, str(e.value)
    assert f"spec '{kw.get('name', 's')}'" in str(e.value)


def test_spec_error_messages_say_why():
    with pytest.raises(SpecError, match="unknown symbol 'unknown_thing'"):
        make(decay=Decay.scalar(log="unknown_thing"))
    with pytest.raises(SpecError, match="can be positive"):
        make(decay=Decay.scalar(log="softplus(a)"), inputs=dict(BASE["inputs"], a="B T H"))
    with pytest.raises(SpecError, match="cannot show"):
        make(decay=Decay.scalar(log="a"), inputs=dict(BASE["inputs"], a="B T H"))
    with pytest.raises(SpecError, match="disagree"):
        make(inputs=dict(q="B T H K", k="B T H D", v="B T H V"))


def test_sympy_names_are_not_leaked():
    # `E`, `S`, `pi`, `gamma` are sympy objects; in a spec they are unknown unless declared
    for name in ("E", "S", "gamma", "pi"):
        with pytest.raises(SpecError, match="unknown symbol"):
            make(decay=Decay.scalar(log=f"-softplus({name})"))
    s = make(decay=Decay.scalar(log="-softplus(gamma)"), inputs=dict(BASE["inputs"], gamma="B T H"))
    assert s.resolve().log_decay.free_symbols == {s.symbols["gamma"]}


@pytest.mark.parametrize("text,fn", [("-abs(a)", "abs"), ("-softplus(erf(a))", "erf"), ("-sin(a) ** 2", "sin"),
                                     ("-Abs(a)", "Abs")])
def test_unknown_functions_are_spec_errors(text, fn):
    with pytest.raises(SpecError, match=rf"unknown function '{fn}' .* the functions allowed are exp, log, "
                                        "logsigmoid, relu, sigmoid, softplus, sqrt, tanh") as e:
        make(decay=Decay.scalar(log=text), inputs=dict(BASE["inputs"], a="B T H"))
    assert e.value.field == "decay.log"


def test_sign_contracts_are_the_signs_a_spec_relies_on():
    contracts = {(s.name, tuple(sorted(sw.items()))): s.sign_contracts(sw)
                 for s in registry.all_specs() for sw in s.variants()}
    assert contracts[("gla", ())] == {"g": "nonpositive"}
    assert contracts[("rwkv7", ())] == {"w": "nonpositive"}
    assert contracts[("mamba2", (("dt_softplus", True),))] == {"A": "nonpositive"}
    assert contracts[("retention", ())] == {} and contracts[("delta_rule", (("use_qk_l2norm_in_kernel", False),))] == {}
    # KDA's g: a log-decay without the in-kernel gate, a raw gate (any sign) with it
    kda = registry.load("kda")
    assert kda.sign_contracts({"use_gate_in_kernel": False}) == {"g": "nonpositive"}
    assert kda.sign_contracts({"use_gate_in_kernel": True}) == {}
    # a gate the spec proves (-softplus) relies on no sign; a declared sign it does not need is no contract
    s = make(decay=Decay.scalar(log="-softplus(a)"), inputs=dict(BASE["inputs"], a=Arg("B T H", sign="nonpositive")))
    assert s.sign_contracts() == {}
