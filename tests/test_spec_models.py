"""A model from any spec (linattn_dsl.models.register_spec): the layer derived from the spec alone or declared in
its file, registered with the Auto classes; loss and backward, greedy generation equal to the argmax of the full
forward, decoding with the cache equal to the full forward, left padding, save / load in a fresh process, training
through `linattn train --model.spec`, and clear errors for bad declarations."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from test_random_specs import spec_sources
from transformers import AutoConfig, AutoModelForCausalLM

import linattn_dsl.models as M
from linattn_dsl.compiler.spec import SpecError
from linattn_dsl.models import spec_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(spec_model.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "linattn_cache"))


def _write(folder: Path, name: str, source: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def _tiny(model_type: str, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2,
                               initializer_range=0.3, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _check_model(model) -> None:
    """Loss and backward; greedy generate == argmax of the full forward; the cache continues the full forward."""
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model.generate(ids[:, :6], max_new_tokens=10, do_sample=False)
        assert torch.equal(model(out).logits[:, 5:-1].argmax(-1), out[:, 6:])
        full = model(ids).logits
        step = model(ids[:, :16], use_cache=True)
        cache, pieces = step.cache, [step.logits]
        for t in range(16, 24):   # token by token: the fused_recurrent op and the conv / state caches
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = step.cache
            pieces.append(step.logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-4, rtol=2e-4)


_COUNTER = iter(range(10**6))


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(spec_sources())
def test_default_layer_of_drawn_specs(tmp_path_factory, source):
    name = f"drawn_model_{next(_COUNTER)}"
    path = _write(tmp_path_factory.mktemp("spec"), name, source.replace('name="drawn"', f'name="{name}"'))
    model_type = M.register_spec(path)
    assert model_type == f"linattn_{name}"
    assert M.register_spec(path) == model_type   # the same source again: the same type
    _check_model(_tiny(model_type))


DECLARED = '''
    from linattn_dsl import Arg, Decay, Layer, NormKey, Param, Proj, Recurrence, Transition

    spec = Recurrence(
        name="rwkvish",
        inputs=dict(r="B T H K", w="B T H K", k="B T H K", v="B T H V", a="B T H K", b="B T H K"),
        optional=dict(D="H"),
        query="r", key="k", value="v", skip="D * v",
        decay=Decay.vector(log="-exp(-0.5) * sigmoid(w)"),
        transition=Transition.general(a="a", b="b"),
    )
    layer = Layer(
        inputs=dict(r=Proj(conv=True), w=Proj(rank=8, bias=True), k=Proj(conv=True, activation="identity"),
                    a=NormKey(sign=-1), b=NormKey(sign=1), D=Param(init="ones")),
        qk_norm=None, output_gate="sigmoid", mlp=False, name="my_rwkvish",
    )
'''


def test_declared_layer_saves_and_loads_in_a_fresh_process(tmp_path):
    path = _write(tmp_path, "rwkvish", DECLARED)
    model_type = M.register_spec(str(path))
    assert model_type == "linattn_my_rwkvish"
    model = _tiny(model_type)
    keys = set(model.state_dict())
    mixer = "model.layers.0.mixer."
    assert {mixer + k for k in ("r_proj.weight", "r_conv1d.weight", "w_proj.down.weight", "w_proj.up.bias",
                                "kk_proj.weight", "b_proj.weight", "D", "g_proj.weight", "o_norm.weight")} <= keys
    assert not any(".mlp." in k for k in keys)   # mixer-only blocks
    assert torch.equal(model.model.layers[0].mixer.D, torch.ones(2))
    _check_model(model)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["spec_source"] == path.read_text()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save((ids, model(ids).logits), tmp_path / "ref.pt")
    path.unlink()   # the saved folder carries the spec
    code = textwrap.dedent(f"""
        import os, torch
        os.environ["{spec_model.CACHE_ENV}"] = {str(tmp_path / "fresh_cache")!r}
        import linattn_dsl.models as M
        model = M.from_pretrained({str(tmp_path / "saved")!r}).eval()
        ids, ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref)
        print("ok", type(model).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok MyRwkvishForCausalLM" in r.stdout, r.stdout + r.stderr[-3000:]


GDN = '''
    from linattn_dsl import Arg, Decay, Recurrence, Transition
    spec = Recurrence(name="plain_gdn", inputs=dict(q="B T H K", k="B T H K", v="B T H V",
                      g=Arg("B T H", sign="nonpositive"), beta="B T H"),
                      query="q", key="k", value="v", decay=Decay.scalar(log="g"),
                      transition=Transition.delta(beta="beta"))
'''


def test_default_derivation_is_role_aware(tmp_path):
    """A bare non-positive log-decay gets logsigmoid / 16, a bare beta a sigmoid, q / k of the delta rule their L2
    norm in the layer (the spec has no switch for it)."""
    from linattn_dsl.compiler import layer, registry

    plan = layer.plan(registry.load(str(_write(tmp_path, "plain_gdn", GDN))))
    assert plan["inputs"]["g"]["transform"] == "logsigmoid" and plan["inputs"]["g"]["scale"] == 1 / 16
    assert plan["inputs"]["beta"]["transform"] == "sigmoid"
    assert plan["inputs"]["q"]["transform"] is None and plan["qk_l2norm"] and (plan["query"], plan["key"]) == ("q", "k")
    # FLA-style module names; the output gate's g_proj is taken, so the input g's projection is g_in_proj
    assert [plan["inputs"][n]["name"] for n in ("q", "g", "beta")] == ["q", "g_in", "beta"]
    kda = layer.plan(registry.load("kda"))   # a q/k-norm switch: switched on instead
    assert kda["switches"]["use_qk_l2norm_in_kernel"] and not kda["qk_l2norm"]
    mamba2 = layer.plan(registry.load("mamba2"))   # A <= 0 per head: -exp of a learned log
    assert mamba2["inputs"]["A"] == dict(dims=["H"], kind="param", name="A", init="log_uniform", transform="-exp",
                                         flat=False)


def test_left_padding_matches_one_prompt_at_a_time(tmp_path):
    model_type = M.register_spec(_write(tmp_path, "plain_gdn", GDN))
    model = _tiny(model_type)
    a = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():   # min_new_tokens: no sequence stops early at the end-of-text token
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        alone = [model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False) for x in (a, b)]
    assert torch.equal(out[0, 9:], alone[0][0, 9:]) and torch.equal(out[1, 9:], alone[1][0, 6:])


def _declared(decl: str) -> str:
    """GDN with the layer declaration ``decl`` (every layer name imported)."""
    return GDN + f"    from linattn_dsl import Const, Gate, Layer, Option, Param, Proj, Size\n    layer = {decl}\n"


@pytest.mark.parametrize("source,field", [
    (GDN + "    from linattn_dsl import Layer, Proj\n    layer = Layer(inputs=dict(x=Proj()))\n", "layer.inputs.x"),
    (GDN + "    from linattn_dsl import Layer, Proj\n    layer = Layer(inputs=dict(g=Proj(transform='cube')))\n",
     "layer.inputs.g.transform"),
    (GDN + "    from linattn_dsl import Layer, Param\n    layer = Layer(inputs=dict(q=Param()))\n", "layer.inputs.q"),
    (GDN + "    from linattn_dsl import Layer, Proj\n    layer = Layer(inputs=dict(q=Proj(activation='gelu')))\n",
     "layer.inputs.q.activation"),
    (GDN + "    from linattn_dsl import Layer\n    layer = Layer(output_gate='tanh')\n", "layer.output_gate"),
    # options: a shared config field's name, a default that is no key of its values, a source with no values,
    # one field declared twice differently, a non-int rank, arithmetic where no number goes, an HF config name
    (_declared("Layer(inputs=dict(q=Proj(conv=Option('hidden_size', True))))"), "layer.inputs.q.conv"),
    (_declared("Layer(output_gate=Option('gated', 'yes', {True: 'swish', False: None}))"), "layer.output_gate"),
    (_declared("Layer(inputs=dict(beta=Option('use_beta', True)))"), "layer.inputs.beta"),
    (_declared("Layer(inputs=dict(q=Proj(conv=Option('c', True)), k=Proj(conv=Option('c', False))))"),
     "layer.inputs.k.conv"),
    (_declared("Layer(inputs=dict(g=Proj(rank=Option('r', 1.5))))"), "layer.inputs.g.rank"),
    (_declared("Layer(inputs=dict(q=Proj(conv=1 / Option('c', 2.0))))"), "layer.inputs.q.conv"),
    (_declared("Layer(inputs=dict(q=Proj(bias=Option('return_dict', False))))"), "layer.inputs.q.bias"),
    (_declared("Layer(inputs=dict(beta=Option('b', True, {True: Proj(transform='sigmoid'), False: Param()})))"),
     "layer.inputs.beta[False]"),
    (_declared("Layer(rope=Option('rope_theta', 0.0))"), "layer.rope"),
    (_declared("Layer(inputs=dict(g=Proj(scale=2 * Option('sharpness', -1.0))))"), "layer.inputs.g.scale"),
    (_declared("Layer(key_size=Size.of_key(0.5))"), "layer.key_size"),
    # module names: a declared stem the output path takes; a norm named like a projection
    (_declared("Layer(inputs=dict(q=Proj(name='o')))"), "layer.inputs.q"),
    (_declared("Layer(norm_name='g_proj')"), "layer.norm_name"),
    (_declared("Layer(defaults=dict(num_layers=2))"), "layer.defaults"),
])
def test_bad_declarations_name_the_field(tmp_path, source, field):
    with pytest.raises(SpecError, match=re.escape(field)):
        M.register_spec(_write(tmp_path, "plain_gdn", source))


OPTIONS = _declared("""Layer(
        inputs=dict(q=Proj(conv=Option("use_short_conv", False)), k=Proj(conv=Option("use_short_conv", False)),
                    g=Proj(rank=Option("gate_rank", 4), transform="logsigmoid", scale=1 / Option("normalizer", 8.0)),
                    beta=Option("use_beta", True, {True: Proj(name="b", transform="sigmoid"), False: Const(1.0)})),
        rope=Option("rope_theta", 500.0),
        key_size=Size.of_hidden(Option("expand_k", 1.0)),
        output_gate=Option("use_gate", True, {True: Gate("sigmoid", rank="V", bias=True), False: None}),
        defaults=dict(num_heads=2),
        name="opt_gdn")""")


def test_options_become_config_fields_and_layer_keywords(tmp_path):
    """Each Option is a config field with its default and check; its value picks the modules (and their names) the
    layer builds; RoPE keeps its position across cached steps."""
    model_type = M.register_spec(_write(tmp_path, "plain_gdn", OPTIONS))
    config_class = M.spec_model.classes(model_type)[0]
    config = config_class()
    assert (config.use_short_conv, config.gate_rank, config.normalizer, config.use_beta, config.rope_theta,
            config.expand_k, config.use_gate, config.num_heads) == (False, 4, 8.0, True, 500.0, 1.0, True, 2)
    assert config.spec_source == (tmp_path / "plain_gdn.py").read_text()   # a spec file's model carries it
    for field, value, message in (("use_beta", 1, "use_beta: expected a bool"),
                                  ("gate_rank", 0, "gate_rank: expected a positive int"),
                                  ("normalizer", -1.0, "normalizer: expected a positive number"),
                                  ("expand_k", 0.01, "expand_k: hidden_size \\* expand_k")):
        with pytest.raises(ValueError, match=f"^{message}"):
            config_class(hidden_size=32, **{field: value})
    model = _tiny(model_type, use_short_conv=True, use_beta=False, eos_token_id=None)   # no early stop
    keys = {k.removeprefix("model.layers.0.mixer.") for k in model.state_dict() if ".layers.0.mixer." in k}
    assert keys == {"q_proj.weight", "q_conv1d.weight", "k_proj.weight", "k_conv1d.weight", "v_proj.weight",
                    "g_in_proj.down.weight", "g_in_proj.up.weight", "A_log", "dt_bias", "g_proj.down.weight",
                    "g_proj.up.weight", "g_proj.up.bias", "o_norm.weight", "o_proj.weight"} - {"A_log", "dt_bias"}
    _check_model(model)
    plain = _tiny(model_type, use_gate=False)
    assert not any("g_proj" in k for k in plain.state_dict()) and any("b_proj" in k for k in plain.state_dict())


def test_declared_layer_classes_take_the_options_as_keywords():
    import torch.nn as nn

    from linattn_dsl import layers as L
    from linattn_dsl.compiler.layer import LAYER_ATTRIBUTES

    layer = L.DeltaNet(32, num_heads=2, use_beta=False, use_gate=True)
    assert not hasattr(layer, "b_proj") and isinstance(layer.g_proj, nn.Linear) and layer.num_heads == 2
    with pytest.raises(TypeError, match="use_gates"):
        L.DeltaNet(32, num_heads=2, use_gates=True)
    with pytest.raises(ValueError, match="^use_beta: expected a bool"):
        L.DeltaNet(32, num_heads=2, use_beta="no")
    # the names a declaration may not give a module or parameter: every attribute of a built layer
    own = {n for n in dir(layer) if not n.startswith("_")} - set(dir(nn.Module)) \
        - {n for n, _ in layer.named_children()} - {n for n, _ in layer.named_parameters(recurse=False)}
    assert own <= set(LAYER_ATTRIBUTES), own - set(LAYER_ATTRIBUTES)


def test_shipped_configs_carry_no_spec_source():
    for config_class, _, _ in M.FAMILIES.values():
        assert "spec_source" not in config_class().to_dict(), config_class.__name__


def test_a_registered_name_with_another_spec_is_refused(tmp_path):
    M.register_spec(_write(tmp_path, "plain_gdn", GDN))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="already registered"):
        M.register_spec(_write(other, "plain_gdn", GDN.replace("beta=\"beta\"", "beta=\"sigmoid(beta)\"")))
    with pytest.raises(ValueError, match="already registered"):
        M.register_spec("mamba2")   # the hand-written family keeps its own model
    with pytest.raises(ValueError, match="already registered"):   # a declared family's name is its spec's
        M.register_spec(_write(other, "gla_again", GDN.replace('name="plain_gdn"', 'name="gla_again"')
                               + "    from linattn_dsl import Layer\n    layer = Layer(name='gla')\n"))
    assert M.register_spec("gla") == "linattn_gla"   # the shipped spec: its family's model


def test_train_from_a_spec_file(tmp_path):
    from linattn_dsl.train import trainer
    from linattn_dsl.train.config import load_config

    corpus = Path(M.__file__).parents[1] / "data" / "shakespeare.jsonl"
    text = tmp_path / "hamlet.txt"
    text.write_text(json.loads(corpus.read_text().splitlines()[0])["text"][:30_000])
    spec = _write(tmp_path, "plain_gdn", GDN)
    cfg = load_config(None, [("job.dump_folder", str(tmp_path / "run")), ("data.files", [str(text)]),
                             ("tokenizer.kind", "byte"), ("model.spec", str(spec)), ("model.hidden_size", 64),
                             ("model.num_hidden_layers", 2), ("model.num_heads", 2), ("training.seq_len", 64),
                             ("training.batch_size", 4), ("training.steps", 20), ("optimizer.lr", 3e-3),
                             ("lr_scheduler.warmup_steps", 2), ("metrics.plot", False), ("training.eval_batches", 2)])
    result = trainer.train(cfg, progress=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 20 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["model_type"] == "linattn_plain_gdn" and "plain_gdn" in saved["spec_source"]


def test_linattn_new_writes_a_spec_that_becomes_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "new", "started", "--out", str(tmp_path / "s.py")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "s.py").is_file(), r.stderr
    again = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "new", "started", "--out",
                            str(tmp_path / "s.py")], capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr
    model_type = M.register_spec(tmp_path / "s.py")
    assert model_type == "linattn_started"
    _check_model(_tiny(model_type, num_qk_heads=1))


def test_shipped_comba_declares_its_model():
    """Comba's declared layer (FLA's layout: derived p and q, Mamba's gate in the layer; tests/test_fla_layouts.py):
    its model trains, generates and caches like the families; q, k and p are normalised by the op's switch."""
    model_type = M.register_spec("comba")
    assert model_type == "linattn_comba"
    model = _tiny(model_type, head_dim=8)
    mixer = model.model.layers[0].mixer
    assert {"q_proj", "k_proj", "a_proj", "b_proj", "q_conv1d", "g_proj", "o_proj"} <= set(dict(mixer.named_children()))
    assert "p_proj" not in dict(mixer.named_children())   # p = k * sigmoid(decay)
    assert mixer.plan["switches"] == {"use_qk_l2norm_in_kernel": True}
    _check_model(model)


def test_shipped_hgrn2_declares_its_model():
    """HGRN2 (the key 1 - exp(g) tied to the forget gate): heads of expand_ratio key channels, one RMSNorm over
    every head's output together (output_norm="all"), no output gate, the model's lower bounds lifting the forget
    gates of layers 1 and 2; trains, generates and caches."""
    model_type = M.register_spec("hgrn2")
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_heads=2,
                               initializer_range=0.3, expand_ratio=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.model.lower_bounds.normal_()
    mixer = model.model.layers[0].mixer
    assert (mixer.head_k_dim, mixer.head_v_dim) == (8, 16)
    assert {"q_proj", "f_proj", "i_proj", "g_norm", "o_proj"} == set(dict(mixer.named_children()))
    assert mixer.g_norm.weight.shape == (32,) and mixer.g_norm.eps == 1e-5   # FLA's fixed epsilon
    _check_model(model)
    _check_model(_tiny(model_type, expand_ratio=8, use_short_conv=True, use_lower_bound=False))


def test_shipped_linear_attn_declares_its_model():
    """Linear attention's normalised output through a model: positive features (elu + 1), the state one column
    wider (z) in the cache; trains, generates and caches."""
    model_type = M.register_spec("linear_attn")
    model = _tiny(model_type)
    _check_model(model)
    with torch.no_grad():
        cache = model(torch.zeros(1, 5, dtype=torch.long), use_cache=True).cache
    mixer = model.model.layers[0].mixer
    assert cache[0]["recurrent_state"].shape == (1, 2, mixer.head_k_dim, mixer.head_v_dim + 1)


def test_shipped_gated_delta_product_model():
    """Gated DeltaProduct's default layer: k, v and beta projected num_householder times as wide, n rows per
    token into the op; trains, generates and caches (one token: n delta steps)."""
    model_type = M.register_spec("gated_delta_product")
    model = _tiny(model_type, num_householder=3)
    mixer = model.model.layers[0].mixer
    assert mixer.k_proj.out_features == 3 * mixer.q_proj.out_features
    assert mixer.beta_proj.out_features == 3 * 2
    _check_model(model)


def test_rwkv6_is_the_hand_written_family():
    """RWKV6's model type belongs to the hand-written family (FLA's RWKV6 layout, tests/test_rwkv6_model.py):
    registering the shipped spec's default-layer model under that name is refused."""
    assert M.FAMILIES["rwkv6"][0].model_type == "linattn_rwkv6"
    with pytest.raises(ValueError, match="already registered"):
        M.register_spec("rwkv6")
