"""Pieces every layer shares: the ``forward`` prologue, op choice (chunk vs fused_recurrent), padding masks,
RoPE, low-rank maps and short convs with their cached state.

Layer state: each layer's ``forward(hidden_states, attention_mask=None, cache=None, use_cache=False, ...)``
takes and returns its own state as a plain ``dict`` of tensors (``recurrent_state [N, H, K, V]`` fp32,
``conv_state`` (a dict of ``[N, D, W]`` conv states), ``shift_state [N, D]``, ``attn_state (k, v)``).
The model-level cache (:class:`linattn_dsl.models.cache.LinAttnCache`) keeps one such dict per layer.

Packed documents: ``forward(..., cu_seqlens=[N + 1] offsets)`` with ``hidden_states [1, total, hidden]`` runs
``N`` documents laid end to end as separate sequences (FlashAttention's convention): the ops, the short convs,
the token shifts and attention all restart at each offset, so no state crosses a document boundary. Packed
documents take no padding mask and no cache (:func:`._checks.check_packed`).

Context parallelism: ``forward(..., cp_context=ctx)`` (:func:`linattn_dsl.distributed.cp_context`) runs this rank's
contiguous slice of a sequence split across ranks (with the context's ``cu_seqlens``: of packed documents, which may
cross rank boundaries). The op runs its split form (chunk mode when the layer picks), the short convs and token shifts
read the previous ranks' last tokens (:func:`linattn_dsl.distributed.past`), RoPE takes global positions and
attention attends the keys of every rank before (:func:`linattn_dsl.distributed.gather_sequence`). For training and
scoring: no cache, no padding (:func:`._checks.check_cp`).

Memory in training: a layer's chunk op keeps only its inputs for the backward and recomputes its chunk states and
other forward intermediates there (as FLA's ops do); ``LINATTN_KEEP_STATES=1`` or ``with
linattn_dsl.runtime.host.keep_states():`` keeps them instead, for a faster backward at more memory (per token and
layer, in the inputs' dtype: ``H * K * V / 64`` values of states, plus the fp32 running sum of a vector decay and the
delta rule's UT products; :data:`linattn_dsl.runtime.host.KEEP_STATES`). The gradients are the same either way.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from linattn_dsl import distributed, ops
from linattn_dsl.modules import rotary_embedding, swiglu_linear
from linattn_dsl.modules.conv import _packed_positions

from ._checks import POSITIVE_INT, check_all, check_cp, check_cu_seqlens, check_inputs, check_packed

# Below this many tokens (and outside training) the step form is cheaper than the chunk plan.
FUSED_RECURRENT_MAX_LEN = 64
MODES = ("chunk", "fused_recurrent")


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode: expected None (automatic) or one of {MODES}, got {mode!r}")
    return mode


def op_mode(seq_len: int, training: bool, mode: str | None = None, cp_context=None) -> str:
    """``mode``, or by default ``chunk`` to train, for long inputs or a split sequence (``cp_context``), else
    ``fused_recurrent``."""
    if mode is not None:
        return mode
    short = not training and seq_len <= FUSED_RECURRENT_MAX_LEN and cp_context is None
    return "fused_recurrent" if short else "chunk"


def pick_op(name: str, seq_len: int, training: bool, mode: str | None = None, cp_context=None):
    """``linattn_dsl.ops.<mode>_<name>`` for :func:`op_mode`'s mode."""
    return getattr(ops, f"{op_mode(seq_len, training, mode, cp_context)}_{name}")


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


def seen_tokens(cache: dict | None) -> int:
    """How many tokens a RoPE layer's state has seen (0 without a cache)."""
    return 0 if cache is None else cache.get("seen_tokens", 0)


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


def document_positions(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[1, T]`` positions of packed documents (offsets ``cu_seqlens [N + 1]``): each restarts at 0."""
    return _packed_positions(cu_seqlens.to(torch.int64), seq_len)[1][None]


def positions_after_cache(position_ids: torch.Tensor | None, x: torch.Tensor, cache: dict | None,
                          attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                          cp_context=None) -> torch.Tensor:
    """``position_ids``, or by default the positions of ``x [B, T, ...]`` after the tokens ``cache`` has seen
    (with ``cu_seqlens``: within each packed document; with ``cp_context``: this rank's global positions, or within
    each of the context's packed documents)."""
    if position_ids is not None:
        return position_ids
    if cp_context is not None:
        return distributed.positions(cp_context, x.shape[0], x.shape[1], x.device)
    if cu_seqlens is not None:
        return document_positions(cu_seqlens, x.shape[1])
    return default_position_ids(x.shape[0], x.shape[1], seen_tokens(cache), attention_mask, x.device)


# ------------------------------------------------------------------ layer bases


class SequenceLayer(nn.Module):
    """Base of the layers: :meth:`forward` checks the inputs and zeroes the left pads, then calls the subclass's
    ``mix(x, attention_mask, cache, use_cache, cu_seqlens=..., **kwargs) -> (out, state or None)``, the layer's
    equations on checked inputs ``x [B, T, hidden]`` (pads zeroed unless ``zero_pads`` is False)."""

    hidden_size: int
    zero_pads: ClassVar[bool] = True  # False: ``mix`` sees the pads as given (Attention masks them as keys)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        cp_context=None,
        **kwargs,
    ) -> tuple:
        """``hidden_states [B, T, hidden]``, ``attention_mask [B, S]`` (1 = token, 0 = left pad) over the cached
        and new tokens, ``cache``: this layer's state dict. Returns ``(out [B, T, hidden], new state or None)``.
        ``cu_seqlens [N + 1]`` (int, with ``B == 1``): offsets of packed documents, run as separate sequences.
        ``cp_context``: this rank's slice of a sequence split across ranks (module docstring).
        Other keywords (``position_ids``, ``v_first``) go to :meth:`mix`, which ignores those it does not use."""
        check_inputs(hidden_states, attention_mask, self.hidden_size)
        check_cu_seqlens(cu_seqlens, hidden_states.shape[0], hidden_states.shape[1])
        check_packed(cu_seqlens, attention_mask, cache, use_cache)
        check_cp(cp_context, hidden_states.shape[0], hidden_states.shape[1], cu_seqlens, attention_mask, cache,
                 use_cache)
        if cu_seqlens is not None or cp_context is not None:
            attention_mask = None  # all ones (checked): nothing to mask
        x = apply_padding_mask(hidden_states, attention_mask) if self.zero_pads else hidden_states
        return self.mix(x, attention_mask, cache, use_cache, cu_seqlens=cu_seqlens, cp_context=cp_context, **kwargs)


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


def run_conv(conv, x: torch.Tensor, cache: dict | None, key: str, use_cache: bool, new_state: dict,
             cu_seqlens: torch.Tensor | None = None, cp_context=None):
    """Short conv over ``x [B, T, D]`` continuing ``cache['conv_state'][key]``; stores its new state. With
    ``cu_seqlens`` each packed document starts from zeros. With ``cp_context`` the conv state of this rank's first
    sequence (of each row without packing) is the previous ranks' last tokens (:func:`linattn_dsl.distributed.past`),
    the context's later documents on this rank start from zeros."""
    if cp_context is not None:
        cu_seqlens = distributed.local_cu_seqlens(cp_context, x.shape[1], x.device)
        width = conv.kernel_size
        before = distributed.past(x, width - 1, cp_context)           # [B, W - 1, D]
        first = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), before], 1).transpose(1, 2)   # [B, D, W]
        rest = 0 if cu_seqlens is None else len(cu_seqlens) - 2       # the packed documents that start here
        prev = torch.cat([first, first.new_zeros(rest, *first.shape[1:])]) if rest else first
        return conv(x, cache=prev, cu_seqlens=cu_seqlens)[0]
    conv_state = state_of(cache, "conv_state")
    prev = None if conv_state is None else conv_state.get(key)
    y, final = conv(x, cache=prev, output_final_state=use_cache, cu_seqlens=cu_seqlens)
    if use_cache:
        new_state.setdefault("conv_state", {})[key] = final
    return y


def init_values(module: nn.Module) -> None:
    """Copy a layer's ``special_init()`` values (``{dotted parameter name: tensor}``) into its parameters."""
    with torch.no_grad():
        for name, value in module.special_init().items():
            module.get_parameter(name).copy_(value)
