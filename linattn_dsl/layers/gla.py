"""Gated Linear Attention (Yang et al., ICML 2024).

    q, k = W_q x, W_k x                       key dim   = expand_k * hidden  (0.5)
    v, g = W_v x, W_g x                       value dim = expand_v * hidden  (1.0)
    log_decay = logsigmoid(W_up W_down x) / 16          (rank-16 gate)
    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_k))
    out = W_o (rms_norm(o) * swish(g))                  (per head)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import POSITIVE, POSITIVE_INT, check_all, head_dims
from ._utils import LowRank, MultiHeadLayer, pick_op, split_heads, state_of


class GatedLinearAttention(MultiHeadLayer):
    """``[B, T, hidden] -> [B, T, hidden]``; see the module docstring for the equations."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT, "expand_k": POSITIVE, "expand_v": POSITIVE,
                   "conv_size": POSITIVE_INT, "gate_low_rank_dim": POSITIVE_INT, "gate_logit_normalizer": POSITIVE,
                   "norm_eps": POSITIVE}, locals())
        super().__init__()
        self._init_qkv(hidden_size, num_heads, *head_dims(hidden_size, num_heads, expand_k, expand_v), mode)
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gk_proj = LowRank(hidden_size, self.key_dim, gate_low_rank_dim, bias=True)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self._init_short_convs(conv_size)
        self.use_output_gate = use_output_gate
        self.g_norm = self._output_norm(use_output_gate, norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        new_state: dict = {}
        q, k, v = self._qkv(x, cache, use_cache, new_state, conv=self.use_short_conv, cu_seqlens=cu_seqlens)
        log_decay = F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer

        gla = pick_op("gla", x.shape[1], self.training, self.mode)
        o, recurrent_state = gla(
            split_heads(q, self.head_k_dim),
            split_heads(k, self.head_k_dim),
            split_heads(v, self.head_v_dim),
            split_heads(log_decay, self.head_k_dim),
            initial_state=state_of(cache, "recurrent_state"),
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
        )
        out = self._output(o, x, self.g_norm, self.use_output_gate)
        return out, ({**new_state, "recurrent_state": recurrent_state} if use_cache else None)
