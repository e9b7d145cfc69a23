"""``linattn convert --from-fla``: FLA 0.6.0 checkpoints give the same logits in our models.

The fixtures (``tests/fixtures/fla/<name>/``, written by ``scripts/make_fla_fixtures.py``) are tiny FLA models saved
with FLA's own ``save_pretrained`` (weights perturbed away from FLA's init), with FLA's fp32 logits for a fixed
input. FLA itself is not needed here, except by the opt-in live test at the end.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import linattn_dsl.models  # noqa: F401  (registers our model types with the Auto classes)
from linattn_dsl.cli import main as linattn
from linattn_dsl.models.convert import (
    build_config, convert_fla, family_of, map_checkpoint, our_classes, read_fla,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "fla"
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # fp32, FLA's kernels against ours

# fixture -> our model_type: the families that convert exactly
EXACT = {
    "gla": "linattn_gla", "gla_hybrid": "linattn_gla", "retnet": "linattn_retnet", "kda": "linattn_kda",
    "delta_net": "linattn_delta_net", "gated_deltanet": "linattn_gated_deltanet",
    "gated_deltanet_gva": "linattn_gated_deltanet",
}
# fixture -> a word of the reason it cannot be converted yet: FLA's block layout, which our configs cannot express
BLOCKED = {"mamba2": "mixer-only", "rwkv7": "LayerNorm"}


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / name / "expected.safetensors")


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def fla_copy(name: str, folder: Path, config_changes: dict | None = None) -> Path:
    """A copy of fixture ``name`` in ``folder`` with ``config_changes`` written into its config.json."""
    dst = folder / name
    shutil.copytree(FIXTURES / name, dst)
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------ exact conversions


@pytest.mark.parametrize("name", sorted(EXACT))
def test_converted_logits_match_fla(name, tmp_path, one_thread):
    dst = convert_fla(FIXTURES / name, tmp_path / "ours")
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert model.config.model_type == EXACT[name]
    assert model.lm_head.weight.dtype == torch.float32
    want = expected(name)
    torch.testing.assert_close(logits(model, want["input_ids"]), want["logits"], **TOLERANCE)


def test_hybrid_fixture_keeps_attention_and_tied_embeddings(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(convert_fla(FIXTURES / "gla_hybrid", tmp_path / "ours"))
    assert model.config.attn == {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 8,
                                 "rope_theta": 500.0}
    assert type(model.model.layers[1].mixer).__name__ == "Attention"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()


def test_cli_convert(tmp_path, capsys, one_thread):
    dst = tmp_path / "ours"
    assert linattn(["convert", "--from-fla", str(FIXTURES / "delta_net"), str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    want = expected("delta_net")
    torch.testing.assert_close(logits(model, want["input_ids"]), want["logits"], **TOLERANCE)


def test_sharded_bf16_checkpoint(tmp_path, one_thread):
    # a bf16 checkpoint in several shards (with their index): read whole, kept in bf16
    from huggingface_hub import save_torch_state_dict

    src = fla_copy("kda", tmp_path)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    save_torch_state_dict({k: v.bfloat16() for k, v in state.items()}, src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(convert_fla(src, tmp_path / "ours")).eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    want = expected("kda")
    assert (logits(model, want["input_ids"]).float() - want["logits"]).abs().max() < 0.1  # bf16 weights


# ------------------------------------------------------------------ families our configs cannot express yet


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_blocked_family_raises_naming_it(name, tmp_path):
    with pytest.raises(ValueError, match=rf"FLA {name}: cannot convert exactly yet: .*{BLOCKED[name]}"):
        convert_fla(FIXTURES / name, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def blocked_model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Our model for a blocked fixture (every parameter mapped but the block layout ignored) and the mapped
    state dict."""
    fla_config, state = read_fla(FIXTURES / name)
    fields, mapped = map_checkpoint(fla_config, state, blocked=False)
    family = family_of(fla_config)
    return our_classes(family)[2](build_config(family, fields)).eval(), mapped


def test_mamba2_converts_exactly_with_mixer_only_blocks(one_thread):
    # what our Mamba2 lacks is only a switch for mixer-only blocks: without each block's MLP, the logits match
    model, mapped = blocked_model("mamba2")
    for block in model.model.layers:
        block.mlp = None   # LinAttnBlock with mlp=None: out = x + mixer(norm(x))
        del block.mlp_norm
    model.load_state_dict(mapped, strict=True)
    want = expected("mamba2")
    torch.testing.assert_close(logits(model, want["input_ids"]), want["logits"], **TOLERANCE)


class LayerNormWithResidual(nn.LayerNorm):
    """LayerNorm called like our RMSNorm: ``norm(x, residual, prenorm=True) -> (norm(x + residual), x + residual)``."""

    def forward(self, x, residual=None, prenorm=False):
        if residual is not None:
            x = x + residual
        out = super().forward(x)
        return (out, x) if prenorm else out


def test_rwkv7_converts_exactly_with_layer_norms(one_thread):
    # what our RWKV7 lacks is only FLA's block norms: LayerNorms with a bias, and a pre-norm at layer 0; with them
    # put in, the mapped mixers and channel mixes give FLA's logits
    model, mapped = blocked_model("rwkv7")
    config = model.config
    layer_norm = lambda: LayerNormWithResidual(config.hidden_size, eps=config.norm_eps)
    for block in model.model.layers:
        block.attn_norm, block.mlp_norm = layer_norm(), layer_norm()
    model.model.norm = layer_norm()
    first = model.model.layers[0]
    first.pre_norm = layer_norm()
    first.register_forward_pre_hook(lambda block, args: (block.pre_norm(args[0]), *args[1:]))
    model.load_state_dict(mapped, strict=True)
    want = expected("rwkv7")
    torch.testing.assert_close(logits(model, want["input_ids"]), want["logits"], **TOLERANCE)


# ------------------------------------------------------------------ bad input


def test_missing_src(tmp_path):
    with pytest.raises(ValueError, match="SRC: .*no such folder"):
        convert_fla(tmp_path / "nothing", tmp_path / "ours")


def test_src_without_config_or_weights(tmp_path):
    src = fla_copy("gla", tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="SRC: .*no model.safetensors"):
        convert_fla(src, tmp_path / "ours")
    (src / "config.json").unlink()
    with pytest.raises(ValueError, match="SRC: .*no config.json"):
        convert_fla(src, tmp_path / "ours")


def test_unknown_model_type_is_named(tmp_path):
    src = fla_copy("gla", tmp_path, {"model_type": "hgrn2"})
    with pytest.raises(ValueError, match="model_type: FLA model_type 'hgrn2' has no converter"):
        convert_fla(src, tmp_path / "ours")


def test_dst_must_differ_from_src(tmp_path):
    src = fla_copy("gla", tmp_path)
    with pytest.raises(ValueError, match="DST: expected a folder other than SRC"):
        convert_fla(src, src)


@pytest.mark.parametrize("name, changes, named", [
    ("gla", {"num_kv_heads": 1}, "num_kv_heads=1"),
    ("gla", {"feature_map": "relu"}, "feature_map='relu'"),
    ("retnet", {"hidden_act": "powlu"}, "hidden_act='powlu'"),
    ("kda", {"safe_gate": True}, "safe_gate=True"),
    ("delta_net", {"qk_norm": "sum"}, "qk_norm='sum'"),
    ("gated_deltanet", {"use_gate": False}, "use_gate=False"),
    ("gla_hybrid", {"attn": {"layers": [1], "num_heads": 4, "qkv_bias": True}}, "qkv_bias"),
    ("gla_hybrid", {"attn": [{"layers": [0], "num_heads": 4}, {"layers": [1], "num_heads": 2}]},
     "2 attention settings"),
])
def test_options_our_models_lack_raise(name, changes, named, tmp_path):
    src = fla_copy(name, tmp_path, changes)
    model_type = json.loads((src / "config.json").read_text())["model_type"]
    with pytest.raises(ValueError, match=rf"FLA {model_type}: cannot convert exactly: .*{re.escape(named)}"):
        convert_fla(src, tmp_path / "ours")


def test_tensors_that_do_not_fit_raise(tmp_path):
    src = fla_copy("kda", tmp_path)
    state = load_file(src / "model.safetensors")
    del state["model.layers.0.attn.b_proj.weight"]
    state["model.layers.0.attn.extra.weight"] = torch.zeros(2)
    save_file(state, src / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not fit our model: missing: \['model.layers.0.mixer.b_proj.weight'\]; "
                                         r"not in our model: \['model.layers.0.mixer.extra.weight'\]"):
        convert_fla(src, tmp_path / "ours")


def test_cli_reports_errors(tmp_path, capsys):
    assert linattn(["convert", "--from-fla", str(tmp_path / "nothing"), str(tmp_path / "ours")]) == 2
    assert "linattn: error: SRC:" in capsys.readouterr().err


# ------------------------------------------------------------------ against FLA itself (opt-in)

LIVE = importlib.util.find_spec("fla") is not None and os.environ.get("LINATTN_LIVE_FLA") == "1"


@pytest.mark.skipif(not LIVE, reason="needs FLA importable (e.g. PYTHONPATH=/tmp/fla_site) and LINATTN_LIVE_FLA=1")
def test_live_fla(tmp_path):
    # FLA builds, saves and runs each model in a fresh process (its kernels in Triton's interpreter: the variable
    # stays out of this process); we convert what it saved and compare with its logits
    env = dict(os.environ, TRITON_INTERPRET="1")
    fla_out = tmp_path / "fla"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fla_fixtures.py"), "--out", str(fla_out),
                    *sorted(EXACT)], env=env, check=True, capture_output=True)
    for name in sorted(EXACT):
        model = AutoModelForCausalLM.from_pretrained(convert_fla(fla_out / name, tmp_path / "ours" / name)).eval()
        want = load_file(fla_out / name / "expected.safetensors")
        torch.testing.assert_close(logits(model, want["input_ids"]), want["logits"], **TOLERANCE, msg=name)
