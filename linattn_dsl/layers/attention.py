"""Softmax attention for hybrid models: RoPE, grouped KV heads, optional sliding window.

    q, k, v = W_q x, W_k x, W_v x        (num_heads query heads, num_kv_heads key/value heads)
    q, k = rope(q), rope(k)
    o_i = softmax_j<=i(q_i k_j^T / sqrt(d) + mask_ij) v_j,   mask: causal, left padding, window
    out = W_o o

Packed documents (``cu_seqlens``): each document attends only within itself, RoPE positions restart at 0 in
each, and the window counts within the document.

Context parallelism (``cp_context``, this rank's slice of a split sequence): RoPE at global positions (within each
of the context's packed documents), then every rank's keys and values gathered (one all-gather; the backward sums
each rank's gradient on the rank that owns the keys), and this rank's queries attend the keys before them: each
row's (each of its packed documents') keys up to its own last query, causal and windowed as without the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import POSITIVE, POSITIVE_INT, POSITIVE_INT_OR_NONE, check_all
from linattn_dsl import distributed

from ._utils import SequenceLayer, apply_rotary, positions_after_cache, seen_tokens, split_heads, state_of


@dataclass
class StaticKV:
    """Keys and values of a one-token decoding step on fixed buffers (:mod:`linattn_dsl.models.decode`):
    ``k, v [B, capacity, H_kv, D]``, column ``j`` holding token ``j`` (pads included); ``write [1]`` the column of the
    step's token and ``valid [B, capacity]`` the columns that are not left pads (both shared by every layer, set
    before each step)."""

    k: torch.Tensor
    v: torch.Tensor
    write: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, seen: int, capacity: int, write: torch.Tensor,
           valid: torch.Tensor) -> StaticKV:
        """Buffers holding a dynamic ``attn_state``: its keys are the last ``k.shape[1]`` of ``seen`` tokens."""
        kb = k.new_zeros(k.shape[0], capacity, *k.shape[2:])
        vb = v.new_zeros(v.shape[0], capacity, *v.shape[2:])
        kb[:, seen - k.shape[1]:seen] = k
        vb[:, seen - v.shape[1]:seen] = v
        return cls(kb, vb, write, valid)

    def keys_so_far(self, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dynamic ``attn_state`` of these buffers after ``seen`` tokens (all of them: a windowed layer's next
        call masks and trims)."""
        return self.k[:, :seen].clone(), self.v[:, :seen].clone()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
               enable_gqa: bool) -> torch.Tensor:
        """Write ``k, v [B, 1, H_kv, D]`` at the step's column; ``o [B, 1, H, D]`` of ``q [B, 1, H, D]`` over the
        columns up to it that are valid (the step's own always) and inside the window."""
        self.k.index_copy_(1, self.write, k)
        self.v.index_copy_(1, self.write, v)
        cols = torch.arange(self.k.shape[1], device=q.device)
        allowed = (cols <= self.write) & (self.valid | (cols == self.write))
        if window is not None:
            allowed = allowed & (self.write - cols < window)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2),
                                           attn_mask=allowed[:, None, None, :], enable_gqa=enable_gqa)
        return o.transpose(1, 2)


class Attention(SequenceLayer):
    """``[B, T, hidden] -> [B, T, hidden]`` through ``F.scaled_dot_product_attention``.

    State: ``attn_state = (k, v)``, each ``[B, S, num_kv_heads, head_dim]`` (RoPE applied), trimmed to
    the last ``window_size - 1`` tokens when a window is set; ``seen_tokens`` places RoPE when no
    ``position_ids`` are given.
    """

    zero_pads = False  # pad keys are masked out; a pad query attends only itself

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        window_size: int | None = None,
        rope_theta: float = 10000.0,
        qkv_bias: bool = False,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT, "num_kv_heads": POSITIVE_INT_OR_NONE,
                   "window_size": POSITIVE_INT_OR_NONE, "rope_theta": POSITIVE}, locals())
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads:
            raise ValueError(f"num_heads: expected a divisor of hidden_size={hidden_size}, got {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.window_size = window_size
        self.rope_theta = rope_theta
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def mix(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        """``position_ids [B, T]`` place RoPE (default: after the tokens the cache has seen, or within each packed
        document of ``cu_seqlens``, or at this rank's global positions under ``cp_context``)."""
        batch, seq_len, _ = hidden_states.shape
        past = state_of(cache, "attn_state")
        static = state_of(cache, "attn_static")
        position_ids = positions_after_cache(position_ids, hidden_states, cache, attention_mask, cu_seqlens,
                                             cp_context)
        q = apply_rotary(split_heads(self.q_proj(hidden_states), self.head_dim), position_ids, self.rope_theta)
        k = apply_rotary(split_heads(self.k_proj(hidden_states), self.head_dim), position_ids, self.rope_theta)
        v = split_heads(self.v_proj(hidden_states), self.head_dim)
        if static is not None:   # a one-token step on fixed buffers (models.decode)
            o = static.attend(q, k, v, self.window_size, self.num_kv_heads != self.num_heads)
            return self.o_proj(o.reshape(batch, seq_len, self.hidden_size)), cache
        if cp_context is not None:  # no cache and no padding (checked by forward)
            o = self._split_attention(q, k, v, cp_context)
            return self.o_proj(o.reshape(batch, seq_len, self.hidden_size)), None
        if cu_seqlens is not None:  # no cache and no padding (checked by forward)
            o = self._packed_attention(q, k, v, cu_seqlens)
            return self.o_proj(o.reshape(batch, seq_len, self.hidden_size)), None
        if past is not None:
            k = torch.cat([past[0], k], dim=1)
            v = torch.cat([past[1], v], dim=1)

        # Without padding or window, SDPA's own causal mask (a fresh prompt) or none (one new token sees
        # every key) keeps its fused kernels.
        unmasked = attention_mask is None and self.window_size is None
        is_causal = unmasked and k.shape[1] == seq_len
        needs_mask = not unmasked or (k.shape[1] != seq_len and seq_len > 1)
        mask = self._mask(batch, seq_len, k.shape[1], attention_mask, hidden_states.device) if needs_mask else None
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, self.hidden_size))
        if not use_cache:
            return out, None
        if self.window_size is not None:
            # Keep window_size - 1 past keys: with the next query itself that is a full window.
            start = max(0, k.shape[1] - (self.window_size - 1))
            k, v = k[:, start:], v[:, start:]
        return out, {"attn_state": (k, v), "seen_tokens": seen_tokens(cache) + seq_len}

    def _packed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``o [1, T, num_heads, head_dim]`` of packed documents (``q [1, T, H, D]``, ``k, v [1, T, H_kv, D]``):
        one causal SDPA per document, so memory grows with the documents' lengths, not with ``T ** 2``."""
        outs = []
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            q_doc, k_doc, v_doc = (t[:, start:end].transpose(1, 2) for t in (q, k, v))
            mask = None if self.window_size is None else self._mask(1, end - start, end - start, None, q.device)
            outs.append(F.scaled_dot_product_attention(q_doc, k_doc, v_doc, attn_mask=mask, is_causal=mask is None,
                                                       enable_gqa=self.num_kv_heads != self.num_heads))
        return torch.cat(outs, dim=2).transpose(1, 2)

    def _split_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        """``o [B, T, num_heads, head_dim]`` of this rank's queries ``q [B, T, H, D]`` against the keys and values of
        every rank up to this one (``k, v [B, T, H_kv, D]`` here, gathered): each query sees the keys of its row (its
        packed document) up to itself."""
        T = q.shape[1]
        start = ctx.rank * T                                            # this rank's first global step
        kv = distributed.gather_sequence(torch.cat([k, v], -1), ctx)   # [B, world * T, H_kv, 2 D]: one collective
        k_all, v_all = kv.split(self.head_dim, -1)
        cu = distributed.local_cu_seqlens(ctx, T)
        if cu is None:   # each row one sequence from global step 0
            pieces = [(0, T, 0)]
        else:            # (local queries [a, b), the global step of their document's first key)
            bounds = cu.tolist()
            first = max(c for c in ctx.cu_seqlens if c <= start)   # where this rank's first document began
            pieces = [(a, b, first if j == 0 else start + a) for j, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        outs = []
        for a, b, key0 in pieces:
            kv_len = start + b - key0   # the document's keys up to its last query here
            mask = self._mask(q.shape[0], b - a, kv_len, None, q.device)   # queries: the last b - a of the keys
            outs.append(F.scaled_dot_product_attention(
                q[:, a:b].transpose(1, 2), k_all[:, key0:key0 + kv_len].transpose(1, 2),
                v_all[:, key0:key0 + kv_len].transpose(1, 2), attn_mask=mask,
                enable_gqa=self.num_kv_heads != self.num_heads))
        return torch.cat(outs, dim=2).transpose(1, 2)

    def _mask(self, batch: int, seq_len: int, kv_len: int, attention_mask, device) -> torch.Tensor:
        """Boolean ``[B, 1, T, S]``: True where query ``i`` may attend key ``j``.

        Queries are the last ``T`` of the ``kv_len`` keys. A query always sees itself, so padded
        queries (which attend no real key) give finite values instead of NaN.
        """
        q_pos = torch.arange(kv_len - seq_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.window_size is not None:
            allowed = allowed & (q_pos - k_pos < self.window_size)
        allowed = allowed[None, None].expand(batch, 1, seq_len, kv_len)
        if attention_mask is not None:
            key_mask = attention_mask[:, -kv_len:].bool()[:, None, None, :]
            allowed = (allowed & key_mask) | (q_pos == k_pos)[None, None]
        return allowed
