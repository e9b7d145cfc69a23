"""Pieces every layer shares: op choice (chunk vs fused_recurrent), padding masks, RoPE, low-rank maps.

Layer state: each layer's ``forward(hidden_states, attention_mask=None, cache=None, use_cache=False, ...)``
takes and returns its own state as a plain ``dict`` of tensors (``recurrent_state [N, H, K, V]`` fp32,
``conv_state`` (a dict of ``[N, D, W]`` conv states), ``shift_state [N, D]``, ``attn_state (k, v)``).
The model-level cache (:class:`linattn_dsl.models.cache.LinAttnCache`) keeps one such dict per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from linattn_dsl import ops
from linattn_dsl.modules import rotary_embedding, swiglu_linear

from ._checks import POSITIVE_INT, check_all

# Below this many tokens (and outside training) the step form is cheaper than the chunk plan.
FUSED_RECURRENT_MAX_LEN = 64
MODES = ("chunk", "fused_recurrent")


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode: expected None (automatic) or one of {MODES}, got {mode!r}")
    return mode


def pick_op(name: str, seq_len: int, training: bool, mode: str | None = None):
    """``linattn_dsl.ops.<mode>_<name>``: ``chunk`` to train or for long inputs, else ``fused_recurrent``."""
    if mode is None:
        mode = "fused_recurrent" if (not training and seq_len <= FUSED_RECURRENT_MAX_LEN) else "chunk"
    return getattr(ops, f"{mode}_{name}")


def apply_padding_mask(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the left-padding positions of ``x [B, T, ...]``.

    ``attention_mask [B, S]`` (1 = token, 0 = pad) covers past and current tokens, so its last ``T``
    columns belong to ``x``. Zero inputs leave conv and recurrent state at zero across the pads.
    """
    if attention_mask is None:
        return x
    seq_len = x.shape[1]
    mask = attention_mask[:, -seq_len:].to(x.dtype)
    return x * mask.reshape(*mask.shape, *([1] * (x.ndim - 2)))


def state_of(cache: dict | None, key: str):
    return None if cache is None else cache.get(key)


# ------------------------------------------------------------------ rotary position embedding


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half convention) on ``x [B, T, H, D]`` at ``position_ids [B, T]`` (or ``[T]``): the fused
    module (one Triton kernel per direction on CUDA, plain PyTorch on CPU)."""
    return rotary_embedding(x, position_ids, theta)


def default_position_ids(
    batch: int, seq_len: int, past_len: int, attention_mask: torch.Tensor | None, device
) -> torch.Tensor:
    """``[B, T]`` positions: counted over real tokens when a (left-padding) mask is given."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, -seq_len:]


# ------------------------------------------------------------------ small building blocks


class LowRank(nn.Module):
    """``up(act(down(x)))``: a rank-``rank`` map ``in -> out`` (FLA's / RWKV7's LoRA)."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str | None = None,
                 bias: bool = True) -> None:
        check_all({"in_features": POSITIVE_INT, "out_features": POSITIVE_INT, "rank": POSITIVE_INT}, locals())
        super().__init__()
        if activation not in (None, "tanh", "sigmoid"):
            raise ValueError(f"activation: expected None, 'tanh' or 'sigmoid', got {activation!r}")
        self.activation = activation
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.activation == "tanh":
            h = torch.tanh(h)
        elif self.activation == "sigmoid":
            h = torch.sigmoid(h)
        return self.up(h)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        check_all({"hidden_size": POSITIVE_INT, "intermediate_size": POSITIVE_INT}, locals())
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, **_) -> tuple[torch.Tensor, None]:
        # the product is recomputed in the backward: two [tokens, intermediate] tensors saved, not four
        return swiglu_linear(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias), None


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, H * D] -> [B, T, H, D]``."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


def run_conv(conv, x: torch.Tensor, cache: dict | None, key: str, use_cache: bool, new_state: dict):
    """Short conv over ``x [B, T, D]`` continuing ``cache['conv_state'][key]``; stores its new state."""
    conv_state = state_of(cache, "conv_state")
    prev = None if conv_state is None else conv_state.get(key)
    y, final = conv(x, cache=prev, output_final_state=use_cache)
    if use_cache:
        new_state.setdefault("conv_state", {})[key] = final
    return y


def init_values(module: nn.Module) -> None:
    """Copy a layer's ``special_init()`` values (``{dotted parameter name: tensor}``) into its parameters."""
    with torch.no_grad():
        for name, value in module.special_init().items():
            module.get_parameter(name).copy_(value)
