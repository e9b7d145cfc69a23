"""RWKV6 (Finch): the layer (FLA's RWKV6 module and parameter names) and the ``rwkv6`` family's model.

Tiny fp32 models (hidden 32, 2 heads, 2 layers, vocab 64) with ``initializer_range=0.3``, so that a lost or
misplaced state changes the logits by whole units. Different paths (chunk vs step form, cached vs one full forward,
padded vs one prompt at a time, packed vs separate) agree to 2e-4 absolute; save/load is bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import linattn_dsl.models as M
from linattn_dsl.layers import RWKV6Attention, RWKV6FeedForward

VOCAB = 64
ATOL = 2e-4

pytestmark = pytest.mark.usefixtures("one_thread")

# FLA's RWKV6Attention parameter names, its LoRA's ``lora.0`` / ``lora.2`` written as our LowRank's down / up
# (as for RWKV7: linattn_dsl/models/convert.py maps them)
FLA_ATTENTION_KEYS = {
    "x_proj.0.mu": [32], "x_proj.0.linear.weight": [20, 32], "x_proj.2.weight": [32, 20], "x_bias": [5, 32],
    "r_proj.linear.weight": [16, 32], "w_proj.linear.down.weight": [8, 32], "w_proj.linear.up.weight": [16, 8],
    "w_proj.linear.up.bias": [16], "k_proj.linear.weight": [16, 32], "v_proj.linear.weight": [32, 32],
    "g_proj.linear.weight": [32, 32], "bonus": [2, 8], "g_norm.weight": [32], "g_norm.bias": [32],
    "o_proj.weight": [32, 32],
}
FLA_FFN_KEYS = {"key.mu": [32], "key.linear.weight": [128, 32], "value.weight": [32, 128],
                "receptance.mu": [32], "receptance.linear.weight": [32, 32]}


def make_model(seed: int = 0, **overrides) -> M.RWKV6ForCausalLM:
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, proj_low_rank_dim=4,
                  gate_low_rank_dim=8, initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(M.RWKV6Config(**kwargs)).eval()


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False, **kwargs).logits


# ---------------------------------------------------------------- config and layer


def test_family_registered_with_fla_defaults():
    assert M.FAMILIES["rwkv6"] == (M.RWKV6Config, M.RWKV6Model, M.RWKV6ForCausalLM)
    config = AutoConfig.for_model("linattn_rwkv6", hidden_size=64)
    assert isinstance(config, M.RWKV6Config)
    assert (config.expand_k, config.expand_v, config.num_heads, config.proj_low_rank_dim,
            config.gate_low_rank_dim, config.hidden_ratio) == (0.5, 1.0, 4, 32, 64, 3.5)
    assert (config.norm_type, config.pre_norm, config.norm_eps) == ("layer", True, 1e-5)
    assert config.intermediate_size == 224   # 64 * 3.5, a multiple of 32


def test_register_spec_refuses_the_family_name():
    with pytest.raises(ValueError, match="already registered"):
        M.register_spec("rwkv6")   # the hand-written family keeps its own model


@pytest.mark.parametrize("field, value, message", [
    ("expand_k", 0, "expand_k: expected a positive number, got 0"),
    ("expand_k", 0.3, "expand_k: expected hidden_size=32 \\* expand_k to be a positive int"),
    ("expand_v", 0.25, "expand_v: expected hidden_size \\* expand_v = 8 divisible by num_heads=3"),
    ("proj_low_rank_dim", 0, "proj_low_rank_dim: expected a positive int, got 0"),
    ("gate_low_rank_dim", 2.5, "gate_low_rank_dim: expected a positive int"),
    ("hidden_ratio", -1, "hidden_ratio: expected a positive number"),
    ("num_heads", 0, "num_heads: expected a positive int"),
])
def test_bad_config_fields_raise(field, value, message):
    kwargs = dict(hidden_size=32, num_heads=3 if field == "expand_v" else 2, expand_k=0.75 if field == "expand_v"
                  else 0.5)
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        M.RWKV6Config(**kwargs)


def test_parameter_names_are_fla_rwkv6s():
    model = make_model()
    block = model.model.layers[0]
    assert {n: list(p.shape) for n, p in block.mixer.named_parameters()} == FLA_ATTENTION_KEYS
    assert {n: list(p.shape) for n, p in block.mlp.named_parameters()} == FLA_FFN_KEYS
    assert hasattr(block, "pre_norm") and block.pre_norm.bias is not None   # FLA's norm_first LayerNorm
    assert model.model.layers[1].pre_norm is None
    layer = RWKV6Attention(hidden_size=32, num_heads=2, proj_low_rank_dim=4, gate_low_rank_dim=8)
    assert {n: list(p.shape) for n, p in layer.named_parameters()} == FLA_ATTENTION_KEYS
    assert {n: list(p.shape) for n, p in RWKV6FeedForward(32).named_parameters()} == FLA_FFN_KEYS


def test_layer_chunk_equals_fused_recurrent_with_padding():
    torch.manual_seed(0)
    layer = RWKV6Attention(hidden_size=32, num_heads=2, proj_low_rank_dim=4, gate_low_rank_dim=8).eval()
    x = torch.randn(2, 20, 32)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    outs = []
    for mode in ("chunk", "fused_recurrent"):
        layer.mode = mode
        with torch.no_grad():
            outs.append(layer(x, attention_mask=mask)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    with torch.no_grad():
        alone = layer(x[1:, 5:])[0]
    torch.testing.assert_close(outs[1][1:, 5:], alone, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the model


def test_loss_and_backward_finite():
    model = make_model().train()
    ids = prompt(2, 70)   # past the step form's limit: the chunk form
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("mixer.bonus", "mixer.x_bias", "mixer.w_proj.linear.up.bias", "mixer.x_proj.0.mu", "mlp.key.mu"):
        assert grads[f"model.layers.0.{name}"].abs().sum() > 0, name


def test_cache_layout():
    """What a layer keeps in the cache (that cached decoding equals the full forward: tests/test_models.py)."""
    model = make_model()
    ids = prompt(2, 24)
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        cache = model(ids[:, 10:11], cache=cache, use_cache=True).cache
    state = cache[0]
    assert sorted(state) == ["ffn_shift_state", "recurrent_state", "shift_state"]
    assert list(state["recurrent_state"].shape) == [2, 2, 8, 16]


def test_save_and_load_same_logits(tmp_path):
    model = make_model(expand_k=1.0, hidden_ratio=2.0)
    model.save_pretrained(tmp_path / "m")
    again = M.from_pretrained(tmp_path / "m").eval()
    assert isinstance(again, M.RWKV6ForCausalLM) and again.config.expand_k == 1.0
    assert again.config.intermediate_size == 64
    ids = prompt(2, 12)
    assert torch.equal(full_logits(model, ids), full_logits(again, ids))
