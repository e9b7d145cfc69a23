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
from linattn_dsl.models.convert import convert_fla

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "fla"
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # fp32, FLA's kernels against ours

# fixture -> our model_type: every family converts exactly
EXACT = {
    "gla": "linattn_gla", "gla_hybrid": "linattn_gla", "retnet": "linattn_retnet", "kda": "linattn_kda",
    "delta_net": "linattn_delta_net", "gated_deltanet": "linattn_gated_deltanet",
    "gated_deltanet_gva": "linattn_gated_deltanet", "mamba2": "linattn_mamba2", "rwkv7": "linattn_rwkv7",
    "rwkv6": "linattn_rwkv6", "comba": "linattn_comba", "hgrn2": "linattn_hgrn2",
}


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


# ------------------------------------------------------------------ FLA's block layouts


def test_mamba2_blocks_are_mixer_only(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(convert_fla(FIXTURES / "mamba2", tmp_path / "ours"))
    assert model.config.use_mlp is False
    assert all(block.mlp is None and not hasattr(block, "mlp_norm") for block in model.model.layers)


def test_rwkv7_layer_norms_and_pre_norm(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(convert_fla(FIXTURES / "rwkv7", tmp_path / "ours"))
    assert model.config.norm_type == "layer" and model.config.pre_norm is True
    first, second = model.model.layers
    assert isinstance(first.pre_norm, nn.LayerNorm) and second.pre_norm is None
    for norm in (first.pre_norm, first.attn_norm, second.mlp_norm, model.model.norm):
        assert isinstance(norm, nn.LayerNorm) and norm.eps == 1e-5   # FLA's norm_eps for all of them


def test_rwkv7_without_norm_first(tmp_path):
    # FLA's norm_first=False: no layer-0 pre_norm in its checkpoint, none in ours
    src = fla_copy("rwkv7", tmp_path, {"norm_first": False})
    state = load_file(src / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".pre_norm." not in k}, src / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(convert_fla(src, tmp_path / "ours"))
    assert model.config.pre_norm is False and model.model.layers[0].pre_norm is None


def test_comba_takes_the_layer_defaults_fla_uses(tmp_path):
    # FLA's Comba block leaves the inner decay, the output correction and D's init at its layer's defaults, whatever
    # its config says: its checkpoints always hold decay and D
    src = fla_copy("comba", tmp_path, {"use_inner_decay": False, "use_output_correction": False,
                                       "correction_factor": 0.02})
    model = AutoModelForCausalLM.from_pretrained(convert_fla(src, tmp_path / "ours")).eval()
    assert (model.config.use_inner_decay, model.config.use_output_correction) == (True, True)
    want = expected("comba")
    torch.testing.assert_close(logits(model, want["input_ids"]), want["logits"], **TOLERANCE)


def test_hgrn2_lower_bounds_and_heads(tmp_path):
    # the model-level lower_bounds keep FLA's name; FLA's layer takes its heads from expand_ratio, not num_heads
    model = AutoModelForCausalLM.from_pretrained(convert_fla(fla_copy("hgrn2", tmp_path, {"num_heads": 3}),
                                                             tmp_path / "ours"))
    assert model.config.num_heads == 4 and model.model.lower_bounds.shape == (3, 32)
    # without use_lower_bound FLA's checkpoint has none, and ours neither
    src = fla_copy("hgrn2", tmp_path / "plain", {"use_lower_bound": False})
    state = load_file(src / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.lower_bounds"}, src / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(convert_fla(src, tmp_path / "plain_ours"))
    assert model.config.use_lower_bound is False and not hasattr(model.model, "lower_bounds")


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
    src = fla_copy("gla", tmp_path, {"model_type": "hgrn"})
    with pytest.raises(ValueError, match="model_type: FLA model_type 'hgrn' has no converter"):
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
    ("mamba2", {"norm_before_gate": True}, "norm_before_gate=True"),
    ("rwkv7", {"norm_bias": False}, "norm_bias=False"),
    ("comba", {"num_v_heads": 4}, "num_v_heads=4"),
    ("hgrn2", {"expand_ratio": 5}, "expand_ratio=5"),
    ("hgrn2", {"elementwise_affine": False}, "elementwise_affine=False"),
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
