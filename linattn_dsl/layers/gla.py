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

from linattn_dsl.modules import FusedRMSNormGated, RMSNorm, ShortConvolution

from ._checks import POSITIVE, POSITIVE_INT, check_all, check_inputs, head_dims
from ._utils import LowRank, apply_padding_mask, check_mode, pick_op, run_conv, split_heads, state_of


class GatedLinearAttention(nn.Module):
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
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim, self.head_v_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.key_dim = self.head_k_dim * num_heads
        self.value_dim = self.head_v_dim * num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.mode = check_mode(mode)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.gk_proj = LowRank(hidden_size, self.key_dim, gate_low_rank_dim, bias=True)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu")
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu")
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, activation="silu")
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
        **_,
    ) -> tuple[torch.Tensor, dict | None]:
        """``hidden_states [B, T, hidden]``, ``attention_mask [B, S]`` (left padding), ``cache``: this
        layer's state dict. Returns ``(out [B, T, hidden], new state or None)``."""
        check_inputs(hidden_states, attention_mask, self.hidden_size)
        x = apply_padding_mask(hidden_states, attention_mask)
        new_state: dict = {}
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q = run_conv(self.q_conv1d, q, cache, "q", use_cache, new_state)
            k = run_conv(self.k_conv1d, k, cache, "k", use_cache, new_state)
            v = run_conv(self.v_conv1d, v, cache, "v", use_cache, new_state)
        log_decay = F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer

        gla = pick_op("gla", x.shape[1], self.training, self.mode)
        o, recurrent_state = gla(
            split_heads(q, self.head_k_dim),
            split_heads(k, self.head_k_dim),
            split_heads(v, self.head_v_dim),
            split_heads(log_decay, self.head_k_dim),
            initial_state=state_of(cache, "recurrent_state"),
            output_final_state=use_cache,
        )
        if self.use_output_gate:
            o = self.g_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.g_norm(o)
        out = self.o_proj(o.reshape(*o.shape[:-2], self.value_dim))
        if not use_cache:
            return out, None
        new_state["recurrent_state"] = recurrent_state
        return out, new_state
