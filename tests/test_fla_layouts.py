"""FLA's Comba and HGRN2 layouts, declared in their spec files with the layer language's derived inputs
(``Derive``: an op input as an expression of its base source, other inputs and learned parameters) and model-level
parameters (``ModelParam``: one tensor of the model, a row per layer).

* bad declarations raise SpecError naming the field;
* the layers compute what FLA's do: Comba's p = k * sigmoid(decay), q = q - D * p and Mamba's gate, HGRN2's forget
  gate lifted by the cumulative softmax of the model's ``lower_bounds`` from layer 1 on (the op's inputs captured);
* FLA's options, config fields, defaults and parameter names; a saved HGRN2 loads in a fresh process.

The models train, generate and cache in tests/test_spec_models.py; FLA's checkpoints convert with equal logits in
tests/test_convert_fla.py (fixtures ``comba`` and ``hgrn2``).
"""

import json
import re
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import linattn_dsl.models as M
from linattn_dsl import Const, Derive, Layer, ModelParam, Param, Proj
from linattn_dsl.compiler import layer as layer_lang
from linattn_dsl.compiler import registry
from linattn_dsl.compiler.spec import SpecError
from linattn_dsl.layers import SpecLayer
from linattn_dsl.models import spec_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


def _tiny(model_type: str, layers: int = 2, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_heads=2,
                               initializer_range=0.3, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _op_inputs(mixer) -> dict:
    """Patch the layer's ops to record the inputs they are called with (and still run)."""
    seen: dict = {}
    ops = dict(mixer._ops)

    def record(mode):
        def op(*args, **kwargs):
            seen.update(zip(mixer.plan["required"], args))
            seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            return ops[mode](*args, **kwargs)
        return op
    mixer._ops = {mode: record(mode) for mode in ops}
    return seen


# ------------------------------------------------------------------ bad declarations

def _plan(spec_name: str, **layer):
    return layer_lang.plan(registry.load(spec_name), Layer(**layer))


QK = Proj(conv=True)


@pytest.mark.parametrize("spec_name, layer, field, why", [
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * zz", base=Proj()))), "inputs.g.expr", "unknown symbol 'zz'"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("erf(g)", base=Proj()))), "inputs.g.expr", "unknown function"),
    ("gated_delta_rule", dict(inputs=dict(beta=Derive("sigmoid(beta)"))), "inputs.beta.expr", "as base="),
    ("gated_delta_rule", dict(inputs=dict(beta=Derive("sigmoid(g)", base=Proj()))), "inputs.beta.base",
     "never reads beta"),
    ("gated_delta_rule", dict(inputs=dict(beta=Derive("sigmoid(g)", from_layer=1))), "inputs.beta.from_layer",
     "give base"),
    ("gated_delta_rule", dict(inputs=dict(beta=Derive("sigmoid(g)", from_layer=-1))), "inputs.beta.from_layer",
     "non-negative int"),
    # q / k of grouped heads [B, T, HQ, K] do not broadcast over beta [B, T, H]
    ("gated_delta_rule", dict(inputs=dict(beta=Derive("sigmoid(q)"))), "inputs.beta.expr", "does not broadcast"),
    # A_log: read by no role while use_gate_in_kernel is off, so the layer does not feed it
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * A_log", base=Proj()))), "inputs.g.expr", "does not feed"),
    ("gated_delta_rule", dict(inputs=dict(q=Derive("q + k", base=QK), k=Derive("q"))), "inputs.q",
     "cycle: q -> k -> q"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * v", base=Proj(), params=dict(v=Param())))),
     "inputs.g.params.v", "name of an op input"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(), params=dict(s=Const(1.0))))),
     "inputs.g.params.s", "expected Param(...) or ModelParam(...)"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(), params=dict(s=Param(dims="H X"))))),
     "inputs.g.params.s.dims", "unknown dim 'X'"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(), params=dict(s=Param(dims="H K"))))),
     "inputs.g.params.s", "do not broadcast"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(), params=dict(s=Param(init="twos"))))),
     "inputs.g.params.s.init", "unknown initialiser"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(),
                                                   params=dict(s=ModelParam("layers")))),),
     "inputs.g.params.s.name", "no model attribute"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(),
                                                   params=dict(s=ModelParam("bounds", rows="softmax")))),),
     "inputs.g.params.s.rows", "unknown rows"),
    # one model parameter, two declarations
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(), params=dict(s=ModelParam("bounds"))),
                                          beta=Derive("beta * s", base=Proj(),
                                                      params=dict(s=ModelParam("bounds", init="ones"))))),
     "inputs.beta.params.s", "model parameter 'bounds' declared again"),
    # one layer parameter name, two declarations; a parameter named like a module
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * s", base=Proj(), params=dict(s=Param())),
                                          beta=Derive("beta * s", base=Proj(), params=dict(s=Param(init="ones"))))),
     "inputs.beta.params.s", "declared again"),
    ("gated_delta_rule", dict(inputs=dict(g=Derive("g * o_proj", base=Proj(), params=dict(o_proj=Param())))),
     "inputs.g.params.o_proj", "taken by the output path"),
    # an op input's Param has the input's shape; a sub-step input cannot be derived
    ("gated_delta_rule", dict(switches=dict(use_gate_in_kernel=True), inputs=dict(A_log=Param(dims="H"))),
     "inputs.A_log.dims", "a Derive's params"),
    ("gated_delta_product", dict(inputs=dict(k=Derive("k * 2", base=Proj()))), "inputs.k", "sub-step input"),
])
def test_bad_derivations_name_the_field(spec_name, layer, field, why):
    with pytest.raises(SpecError, match=re.escape(field) + ".*" + re.escape(why)):
        _plan(spec_name, **layer)


def test_a_parameter_declared_alike_is_shared():
    """Two derivations naming one parameter with one declaration: one attribute of the layer; a derived input of
    a spec without any other change keeps its name-derived modules."""
    shared = dict(s=Param(init=0.5, dims="H"))
    plan = _plan("gated_delta_rule", inputs=dict(g=Derive("g * s", base=Proj(name="a"), params=shared),
                                                 beta=Derive("sigmoid(beta) * s", base=Proj(name="b"), params=shared)))
    from linattn_dsl.generated import gated_delta_rule as gen

    module = types.SimpleNamespace(**{n: getattr(gen, n) for n in ("SIGNATURE", "chunk_gated_delta_rule",
                                                                    "fused_recurrent_gated_delta_rule")}, LAYER=plan)
    layer = SpecLayer(module, hidden_size=32, num_heads=2)
    names = {n for n, _ in layer.named_parameters()}
    assert {"s", "a_proj.weight", "b_proj.weight"} <= names
    assert torch.equal(layer.s, torch.full((2,), 0.5))


# ------------------------------------------------------------------ Comba


def test_comba_layout_and_derived_inputs():
    """FLA's names, shapes and inits; the op sees p = k * sigmoid(decay), q = silu(conv(q_proj x)) - D * p and
    g = -exp(A_log) * softplus(a_proj x + dt_bias)."""
    model_type = M.register_spec("comba")
    config_class = spec_model.classes(model_type)[0]
    config = config_class()
    assert (config.num_heads, config.head_dim, config.expand_v, config.use_short_conv, config.use_output_gate,
            config.use_inner_decay, config.use_output_correction, config.correction_factor, config.conv_size) == \
        (6, 256, 2.0, True, True, True, True, 1.0, 4)
    model = _tiny(model_type, head_dim=8, correction_factor=0.02)
    mixer = model.model.layers[0].mixer
    shapes = {k: list(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {"q_proj.weight": [16, 32], "k_proj.weight": [16, 32], "v_proj.weight": [32, 32],
                      "a_proj.weight": [2, 32], "b_proj.weight": [2, 32], "q_conv1d.weight": [16, 1, 4],
                      "k_conv1d.weight": [16, 1, 4], "v_conv1d.weight": [32, 1, 4], "D": [2], "decay": [2],
                      "A_log": [2], "dt_bias": [2], "g_proj.weight": [32, 32], "o_norm.weight": [16],
                      "o_proj.weight": [32, 32]}
    assert torch.equal(mixer.decay, torch.ones(2)) and torch.equal(mixer.D, torch.full((2,), 0.02))
    with torch.no_grad():
        mixer.decay.copy_(torch.tensor([0.3, -1.0]))
        mixer.D.copy_(torch.tensor([0.5, 2.0]))
        x = torch.randn(1, 9, 32)
        seen = _op_inputs(mixer)
        mixer(x)
        k = mixer.k_conv1d(mixer.k_proj(x))[0].view(1, 9, 2, 8)   # the conv ends in silu
        q = mixer.q_conv1d(mixer.q_proj(x))[0].view(1, 9, 2, 8)
        p = k * torch.sigmoid(mixer.decay)[:, None]
        g = -mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias)
    torch.testing.assert_close(seen["p"], p)
    torch.testing.assert_close(seen["q"], q - mixer.D[:, None] * p)
    torch.testing.assert_close(seen["g"], g)
    torch.testing.assert_close(seen["beta"], torch.sigmoid(mixer.b_proj(x)))


def test_comba_options_off():
    """use_inner_decay / use_output_correction / use_output_gate / use_short_conv off: no decay (p = k), no D, a
    plain RMSNorm and no convs (silu on the projections), as FLA's layer."""
    model = _tiny(M.register_spec("comba"), head_dim=8, use_inner_decay=False, use_output_correction=False,
                  use_output_gate=False, use_short_conv=False)
    mixer = model.model.layers[0].mixer
    assert set(mixer.state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight",
                                       "b_proj.weight", "A_log", "dt_bias", "o_norm.weight", "o_proj.weight"}
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        seen = _op_inputs(mixer)
        mixer(x)
        k = F.silu(mixer.k_proj(x)).view(1, 5, 2, 8)
    torch.testing.assert_close(seen["p"], k)
    torch.testing.assert_close(seen["q"], F.silu(mixer.q_proj(x)).view(1, 5, 2, 8))


# ------------------------------------------------------------------ HGRN2


def test_hgrn2_lower_bounds():
    """model.lower_bounds [layers, H * K] (zeros at init); layer 0 keeps logsigmoid(f_proj x), layer i > 0 gets
    logaddexp(log(lb_i), log1p(-lb_i) + g) with lb the cumulative softmax over layers minus the first row."""
    model_type = M.register_spec("hgrn2")
    assert spec_model.classes(model_type)[0]().use_lower_bound is True
    model = _tiny(model_type, layers=3, expand_ratio=8)
    assert model.model.lower_bounds.shape == (3, 16) and not model.model.lower_bounds.any()
    with torch.no_grad():
        model.model.lower_bounds.normal_()
        soft = model.model.lower_bounds.softmax(0)
        lb = (soft.cumsum(0) - soft[0]).view(3, 2, 8)
        x = torch.randn(1, 7, 32)
        for i, block in enumerate(model.model.layers):
            mixer = block.mixer
            assert mixer.layer_idx == i
            seen = _op_inputs(mixer)
            mixer(x)
            g = F.logsigmoid(mixer.f_proj(x)).view(1, 7, 2, 8)
            want = g if i == 0 else torch.logaddexp(lb[i].log(), torch.log1p(-lb[i]) + g)
            torch.testing.assert_close(seen["g"], want)
    # its gradient reaches the model's parameter (layers 1 and 2 read it), the same under activation checkpointing
    model.train()
    ids = torch.randint(0, VOCAB, (1, 12))
    model(ids, labels=ids).loss.backward()
    grad = model.model.lower_bounds.grad.clone()
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.model.lower_bounds.grad, grad)
    plain = _tiny(model_type, expand_ratio=8, use_lower_bound=False)
    assert not any("lower_bounds" in k for k in plain.state_dict())


def test_hgrn2_layer_alone_needs_its_model():
    """A layer that reads a model parameter, built outside a model: its first layer runs, a later one says why it
    cannot."""
    from linattn_dsl.generated import hgrn2

    layer = SpecLayer(hgrn2, hidden_size=32, num_heads=2, expand_ratio=8)
    x = torch.randn(1, 4, 32)
    assert layer(x)[0].shape == x.shape
    layer.layer_idx = 1
    with pytest.raises(ValueError, match="reads the model's parameter 'lower_bounds'"):
        layer(x)


def test_hgrn2_saved_loads_in_a_fresh_process(tmp_path):
    """A shipped spec's model records no spec source: linattn_dsl.models.from_pretrained registers the spec its
    model_type names."""
    model = _tiny(M.register_spec("hgrn2"), expand_ratio=8)
    with torch.no_grad():
        model.model.lower_bounds.normal_()
    model.save_pretrained(tmp_path / "saved")
    assert "spec_source" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save((ids, model(ids).logits), tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch
        import linattn_dsl.models as M
        model = M.from_pretrained({str(tmp_path / "saved")!r}).eval()
        ids, ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref, atol=0, rtol=0)
        print("ok", type(model).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok HGRN2ForCausalLM" in r.stdout, r.stdout + r.stderr[-3000:]
