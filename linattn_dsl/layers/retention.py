"""RetNet's multi-scale retention (Sun et al., 2023).

    q, k = rope(W_q x), rope(W_k x)          key dim   = expand_k * hidden  (1)
    v, g = W_v x, W_g x                      value dim = expand_v * hidden  (2)
    S_t = gamma_h S_{t-1} + k_t v_t^T,  gamma_h = 1 - 2^(-5 - h)   (fixed per head, inside the op)
    o_t = S_t^T (q_t / sqrt(d_k))
    out = W_o (rms_norm(o) * swish(g))       (per head)
"""

from __future__ import annotations

import torch
from torch import nn

from linattn_dsl.modules import FusedRMSNormGated, RMSNorm

from ._checks import POSITIVE, POSITIVE_INT, check_all, check_inputs, head_dims
from ._utils import apply_padding_mask, apply_rotary, check_mode, default_position_ids, pick_op, split_heads, state_of


class MultiScaleRetention(nn.Module):
    """``[B, T, hidden] -> [B, T, hidden]``; see the module docstring for the equations."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        use_output_gate: bool = True,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT, "expand_k": POSITIVE, "expand_v": POSITIVE,
                   "rope_theta": POSITIVE, "norm_eps": POSITIVE}, locals())
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim, self.head_v_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.key_dim = self.head_k_dim * num_heads
        self.value_dim = self.head_v_dim * num_heads
        self.rope_theta = rope_theta
        self.mode = check_mode(mode)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.use_output_gate = use_output_gate
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.g_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation="swish")
        else:
            self.g_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        **_,
    ) -> tuple[torch.Tensor, dict | None]:
        """``position_ids [B, T]`` place RoPE (default: after the tokens the state has seen)."""
        check_inputs(hidden_states, attention_mask, self.hidden_size)
        x = apply_padding_mask(hidden_states, attention_mask)
        batch, seq_len, _ = x.shape
        if position_ids is None:
            past_len = 0 if cache is None else cache.get("seen_tokens", 0)
            position_ids = default_position_ids(batch, seq_len, past_len, attention_mask, x.device)
        q = apply_rotary(split_heads(self.q_proj(x), self.head_k_dim), position_ids, self.rope_theta)
        k = apply_rotary(split_heads(self.k_proj(x), self.head_k_dim), position_ids, self.rope_theta)
        v = split_heads(self.v_proj(x), self.head_v_dim)

        retention = pick_op("retention", seq_len, self.training, self.mode)
        o, recurrent_state = retention(
            q, k, v, initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache
        )
        if self.use_output_gate:
            o = self.g_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.g_norm(o)
        out = self.o_proj(o.reshape(batch, seq_len, self.value_dim))
        if not use_cache:
            return out, None
        seen = (0 if cache is None else cache.get("seen_tokens", 0)) + seq_len
        return out, {"recurrent_state": recurrent_state, "seen_tokens": seen}
