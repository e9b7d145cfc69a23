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

from ._checks import POSITIVE, POSITIVE_INT, check_all, head_dims
from ._utils import MultiHeadLayer, apply_rotary, pick_op, positions_after_cache, seen_tokens, split_heads, state_of


class MultiScaleRetention(MultiHeadLayer):
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
        self._init_qkv(hidden_size, num_heads, *head_dims(hidden_size, num_heads, expand_k, expand_v), mode)
        self.rope_theta = rope_theta
        self.use_output_gate = use_output_gate
        self.g_norm = self._output_norm(use_output_gate, norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        """``position_ids [B, T]`` place RoPE (default: after the tokens the state has seen, or within each packed
        document of ``cu_seqlens``)."""
        position_ids = positions_after_cache(position_ids, x, cache, attention_mask, cu_seqlens)
        q = apply_rotary(split_heads(self.q_proj(x), self.head_k_dim), position_ids, self.rope_theta)
        k = apply_rotary(split_heads(self.k_proj(x), self.head_k_dim), position_ids, self.rope_theta)
        v = split_heads(self.v_proj(x), self.head_v_dim)

        retention = pick_op("retention", x.shape[1], self.training, self.mode)
        o, recurrent_state = retention(
            q, k, v, initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
        )
        out = self._output(o, x, self.g_norm, self.use_output_gate)
        if not use_cache:
            return out, None
        return out, {"recurrent_state": recurrent_state, "seen_tokens": seen_tokens(cache) + x.shape[1]}
