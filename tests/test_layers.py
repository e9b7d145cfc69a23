"""Layers on their own: shapes, gradients of every parameter, chunk == step form, state continuation,
left padding.

fp32 throughout. Tolerance 1e-4 absolute on outputs of size ~1: different op forms (chunk vs
fused_recurrent) or a split sequence reorder fp32 sums of a few dozen products per output.
"""

from __future__ import annotations

import pytest
import torch

from linattn_dsl import layers as L
from linattn_dsl.layers._utils import apply_rotary, split_heads

HIDDEN = 32
ATOL = 1e-4

LAYERS = {
    "retention": lambda: L.MultiScaleRetention(HIDDEN, num_heads=2),
    "gla": lambda: L.GatedLinearAttention(HIDDEN, num_heads=2),
    "gla_conv": lambda: L.GatedLinearAttention(HIDDEN, num_heads=2, use_short_conv=True, use_output_gate=False),
    "mamba2": lambda: L.Mamba2(HIDDEN, num_heads=4, head_dim=16, state_size=8, n_groups=2),
    "rwkv7": lambda: L.RWKV7Attention(HIDDEN, head_dim=8, decay_low_rank_dim=8, gate_low_rank_dim=8,
                                      a_low_rank_dim=8, v_low_rank_dim=4, first_layer=True),
    "rwkv7_later": lambda: L.RWKV7Attention(HIDDEN, head_dim=8, decay_low_rank_dim=8, gate_low_rank_dim=8,
                                            a_low_rank_dim=8, v_low_rank_dim=4, first_layer=False),
    "rwkv7_ffn": lambda: L.RWKV7FeedForward(HIDDEN, 64),
    "kda": lambda: L.KimiDeltaAttention(HIDDEN, num_heads=2, head_dim=16),
    "delta_net": lambda: L.DeltaNet(HIDDEN, num_heads=2),
    "delta_net_gated": lambda: L.DeltaNet(HIDDEN, num_heads=2, use_gate=True),
    "attention": lambda: L.Attention(HIDDEN, num_heads=4, num_kv_heads=2),
    "attention_window": lambda: L.Attention(HIDDEN, num_heads=4, num_kv_heads=1, window_size=3),
}
NAMES = list(LAYERS)
RECURRENT = [n for n in NAMES if not n.startswith(("attention", "rwkv7_ffn"))]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    layer = LAYERS[name]()
    with torch.no_grad():  # larger weights than the defaults, so state and padding bugs show
        for param in layer.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.3)
    return layer


def call(layer, x, **kwargs):
    """Run a layer; RWKV7 later layers get a first-layer value; returns ``(out, state)``."""
    if getattr(layer, "first_layer", True) is False:
        kwargs.setdefault("v_first", _v_first(layer, x))
    result = layer(x, **kwargs)
    return result[0], result[1]


def _v_first(layer, x):
    generator = torch.Generator().manual_seed(9)
    return torch.randn(*x.shape[:2], layer.value_dim, generator=generator)


def inputs(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_gradients_of_all_parameters(name):
    layer = make(name).train()
    x = inputs(2, 9).requires_grad_()
    out, state = call(layer, x)
    assert out.shape == x.shape and state is None
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, param in layer.named_parameters():
        assert param.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", RECURRENT)
def test_chunk_equals_fused_recurrent(name):
    """70 tokens: more than one chunk of 64, with a final state carried on by a second call."""
    layer = make(name)
    x = inputs(2, 70)
    with torch.no_grad():
        outs = {}
        for mode in ("chunk", "fused_recurrent"):
            layer.mode = mode
            first, state = call(layer, x, use_cache=True)
            second, _ = call(layer, x[:, :3], cache=state, use_cache=True,
                             position_ids=torch.arange(70, 73)[None].expand(2, -1))
            outs[mode] = torch.cat([first, second], 1)
    torch.testing.assert_close(outs["chunk"], outs["fused_recurrent"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, mode", [(n, m) for n in NAMES
                                        for m in (("chunk", "fused_recurrent") if n in RECURRENT else (None,))])
def test_state_continues_a_split_sequence(name, mode):
    layer = make(name).eval()
    if mode is not None:
        layer.mode = mode
    x = inputs(2, 12)
    kwargs = {}
    if getattr(layer, "first_layer", True) is False:
        kwargs["v_first"] = _v_first(layer, x)
    with torch.no_grad():
        full, _ = call(layer, x, **kwargs)
        parts, state = [], None
        for start, stop in ((0, 5), (5, 6), (6, 12)):
            part_kwargs = {k: v[:, start:stop] for k, v in kwargs.items()}
            out, state = call(layer, x[:, start:stop], cache=state, use_cache=True,
                              position_ids=torch.arange(start, stop)[None].expand(2, -1), **part_kwargs)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_leaves_state_untouched(name):
    layer = make(name).eval()
    x = inputs(1, 7)
    pad = 4
    padded = torch.cat([inputs(1, pad, seed=2) * 5, x], 1)  # pads carry garbage that must not leak
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 7)], 1).long()
    kwargs, padded_kwargs = {}, {}
    if getattr(layer, "first_layer", True) is False:
        kwargs["v_first"] = _v_first(layer, x)
        padded_kwargs["v_first"] = torch.cat([torch.zeros(1, pad, layer.value_dim), kwargs["v_first"]], 1)
    with torch.no_grad():
        alone, alone_state = call(layer, x, use_cache=True, **kwargs)
        out, state = call(layer, padded, attention_mask=mask, use_cache=True, **padded_kwargs)
    torch.testing.assert_close(out[:, pad:], alone, atol=ATOL, rtol=0)
    for key, value in alone_state.items():
        if key in ("attn_state", "seen_tokens"):
            continue  # the KV cache keeps the pad positions (masked, not dropped); the counter counts them
        torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_explicit_softmax(window):
    layer = make("attention_window" if window else "attention")
    x = inputs(2, 9)
    with torch.no_grad():
        out, _ = layer(x)
        pos = torch.arange(9)
        q = apply_rotary(split_heads(layer.q_proj(x), layer.head_dim), pos, layer.rope_theta)
        k = apply_rotary(split_heads(layer.k_proj(x), layer.head_dim), pos, layer.rope_theta)
        v = split_heads(layer.v_proj(x), layer.head_dim)
        groups = layer.num_heads // layer.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / layer.head_dim**0.5
        allowed = pos[None, :] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - pos[None, :] < window
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        expected = layer.o_proj(torch.einsum("bhij,bjhd->bihd", weights, v).flatten(-2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_heads"):
        L.GatedLinearAttention(HIDDEN, num_heads=3)
    with pytest.raises(ValueError, match="mode"):
        L.DeltaNet(HIDDEN, num_heads=2, mode="parallel")
    with pytest.raises(ValueError, match="num_kv_heads"):
        L.Attention(HIDDEN, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        L.Mamba2(HIDDEN, num_heads=3, head_dim=16)
    with pytest.raises(ValueError, match="v_first"):
        make("rwkv7_later")(inputs(1, 3))
