"""Mamba (selective SSM): the layer, the ``mamba`` family's model, and ``linattn convert --from-hf-mamba``.

Tiny fp32 models (hidden 32, 2 layers, state 8, vocab 64) with ``initializer_range=0.3``, so that a lost or misplaced
state changes the logits by whole units. Different paths (chunk vs step form, cached vs one full forward, padded vs
one prompt at a time, packed vs separate) agree to 2e-4 absolute on logits of size ~10; the same path twice
(save/load) is bit-identical; transformers' own ``MambaForCausalLM`` (its slow PyTorch path) and the converted model
agree to 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import linattn_dsl.models as M
from linattn_dsl.cli import main as linattn
from linattn_dsl.layers import Mamba
from linattn_dsl.models.convert import convert_hf_mamba

VOCAB = 64
ATOL = 2e-4
HF_TOLERANCE = dict(atol=1e-4, rtol=1e-4)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, **overrides) -> M.MambaForCausalLM:
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, initializer_range=0.3,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(M.MambaConfig(**kwargs)).eval()


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False, **kwargs).logits


# ---------------------------------------------------------------- config and layer


def test_family_registered_with_hf_defaults():
    assert M.FAMILIES["mamba"] == (M.MambaConfig, M.MambaModel, M.MambaForCausalLM)
    config = AutoConfig.for_model("linattn_mamba", hidden_size=40)
    assert isinstance(config, M.MambaConfig)
    assert (config.state_size, config.expand, config.conv_kernel, config.norm_eps) == (16, 2, 4, 1e-5)
    assert config.time_step_rank == 3 and not config.use_mlp   # "auto": ceil(40 / 16); mixer-only blocks


@pytest.mark.parametrize("field, value, message", [
    ("state_size", 0, "state_size: expected a positive int, got 0"),
    ("expand", 1.5, "expand: expected a positive int, got 1.5"),
    ("conv_kernel", -1, "conv_kernel: expected a positive int"),
    ("time_step_rank", 0, "time_step_rank: expected 'auto' or a positive int, got 0"),
    ("time_step_rank", "big", "time_step_rank: expected 'auto' or a positive int, got 'big'"),
    ("time_step_min", 0.5, "time_step_min: expected <= time_step_max=0.1, got 0.5"),
    ("time_step_floor", 0.0, "time_step_floor: expected a positive number"),
    ("use_conv_bias", "yes", "use_conv_bias: expected a bool"),
    ("use_mlp", 1, "use_mlp: expected a bool"),
])
def test_bad_config_fields_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        M.MambaConfig(hidden_size=32, **{field: value})


def test_layer_parameters_and_init():
    layer = Mamba(hidden_size=32, state_size=8, expand=2, conv_kernel=3, use_bias=True, time_step_rank=4)
    shapes = {name: list(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "in_proj.weight": [128, 32], "in_proj.bias": [128], "conv1d.weight": [64, 1, 3], "conv1d.bias": [64],
        "x_proj.weight": [20, 64], "dt_proj.weight": [64, 4], "dt_proj.bias": [64], "A_log": [64, 8], "D": [64],
        "out_proj.weight": [32, 64], "out_proj.bias": [32],
    }
    torch.testing.assert_close(layer.A_log, torch.log(torch.arange(1.0, 9.0)).expand(64, -1))
    torch.testing.assert_close(layer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert layer.dt_proj.weight.abs().max() <= 4 ** -0.5


def test_layer_chunk_equals_fused_recurrent_and_mask_pads():
    torch.manual_seed(0)
    layer = Mamba(hidden_size=32, state_size=8, use_bias=True)
    x = torch.randn(2, 20, 32)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    outs = []
    for mode in ("chunk", "fused_recurrent"):
        layer.mode = mode
        with torch.no_grad():
            outs.append(layer(x, attention_mask=mask)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    with torch.no_grad():   # the pads (with in_proj's and the conv's biases) leave row 1 as if it started later
        alone = layer(x[1:, 5:])[0]
    torch.testing.assert_close(outs[1][1:, 5:], alone, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("use_mlp", [False, True])
def test_loss_and_backward_finite(use_mlp):
    model = make_model(use_mlp=use_mlp).train()
    assert hasattr(model.model.layers[0], "mlp_norm") == use_mlp
    ids = prompt(2, 70)   # past the step form's limit: the chunk form
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("A_log", "D", "dt_proj.bias", "x_proj.weight", "conv1d.weight"):
        assert grads[f"model.layers.0.mixer.{name}"].abs().sum() > 0, name


def test_cache_layout():
    """What a layer keeps in the cache (that cached decoding equals the full forward: tests/test_models.py)."""
    model = make_model()
    ids = prompt(2, 24)
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        cache = model(ids[:, 10:11], cache=cache, use_cache=True).cache
    state = cache[0]   # a channel is a head: [N, d_inner, state_size, 1]; the conv's state under "x"
    assert list(state["recurrent_state"].shape) == [2, 64, 8, 1] and list(state["conv_state"]) == ["x"]


def test_save_and_load_same_logits(tmp_path):
    model = make_model(time_step_rank=3, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "m")
    again = M.from_pretrained(tmp_path / "m").eval()
    assert isinstance(again, M.MambaForCausalLM) and again.config.time_step_rank == 3
    ids = prompt(2, 12)
    assert torch.equal(full_logits(model, ids), full_logits(again, ids))


# ---------------------------------------------------------------- linattn convert --from-hf-mamba


def hf_mamba(folder, tie: bool = True, **overrides):
    """A tiny random transformers MambaForCausalLM (weights moved off its init), saved in ``folder``."""
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                                      tie_word_embeddings=tie, use_bias=not tie, **overrides)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_converted_hf_mamba_matches_transformers(tie, tmp_path):
    hf = hf_mamba(tmp_path / "hf", tie)
    ours = AutoModelForCausalLM.from_pretrained(convert_hf_mamba(tmp_path / "hf", tmp_path / "ours")).eval()
    assert isinstance(ours, M.MambaForCausalLM) and ours.config.tie_word_embeddings == tie
    assert ours.config.norm_eps == hf.config.layer_norm_epsilon and ours.config.use_bias == (not tie)
    ids = prompt(2, 70)   # ours takes the chunk form here, the step form below
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **HF_TOLERANCE)
    start = prompt(1, 5)
    assert torch.equal(ours.generate(start, max_new_tokens=5, do_sample=False),
                       hf.generate(start, max_new_tokens=5, do_sample=False))


def test_cli_convert_from_hf_mamba(tmp_path, capsys):
    hf_mamba(tmp_path / "hf")
    assert linattn(["convert", "--from-hf-mamba", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "linattn_mamba"


def test_convert_refuses_what_is_not_an_hf_mamba_checkpoint(tmp_path):
    hf_mamba(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mamba2"}))
    with pytest.raises(ValueError, match=r"model_type: expected 'mamba' .*got 'mamba2'"):
        convert_hf_mamba(tmp_path / "hf", tmp_path / "ours")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="transformers mamba: cannot convert exactly: hidden_act='gelu'"):
        convert_hf_mamba(tmp_path / "hf", tmp_path / "ours")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["backbone.layers.1.mixer.A_log"]
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"transformers mamba: .*do not fit our model: "
                                         r"missing: \['model.layers.1.mixer.A_log'\]"):
        convert_hf_mamba(tmp_path / "hf", tmp_path / "ours")
    with pytest.raises(ValueError, match="SRC: .*no such folder"):
        convert_hf_mamba(tmp_path / "nothing", tmp_path / "ours")
    assert linattn(["convert", "--from-hf-mamba", str(tmp_path / "nothing"), str(tmp_path / "ours")]) == 2
