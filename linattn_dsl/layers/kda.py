"""Kimi Delta Attention (Kimi Team, 2025): the delta rule with a per-channel decay.

    q, k, v = silu(conv1d(W_q x)), silu(conv1d(W_k x)), silu(conv1d(W_v x))   (short convs)
    g_raw   = W_f2 W_f1 x                                (rank head_v_dim)
    log_decay = -exp(A_log) * softplus(g_raw + dt_bias)  (inside the op)
    beta    = sigmoid(W_b x),   q, k = l2norm(q), l2norm(k)  (inside the op)
    S_t = (I - beta_t k_t k_t^T) diag(exp(log_decay_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (q_t / sqrt(d_k))
    out = W_o (rms_norm(o) * sigmoid(W_g2 W_g1 x))       (per head)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linattn_dsl.modules import FusedRMSNormGated

from ._checks import POSITIVE, POSITIVE_INT, check_all
from ._utils import LowRank, MultiHeadLayer, init_values, pick_op, split_heads, state_of


def kda_head_v_dim(head_dim: int, expand_v: float) -> int:
    """``int(head_dim * expand_v)``, at least 1."""
    head_v_dim = int(head_dim * expand_v)
    if head_v_dim < 1:
        raise ValueError(f"expand_v: head_dim * expand_v = {head_dim} * {expand_v} gives {head_v_dim} value channels "
                         f"per head; expected at least 1")
    return head_v_dim


class KimiDeltaAttention(MultiHeadLayer):
    """``[B, T, hidden] -> [B, T, hidden]``; see the module docstring for the equations."""

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 16,
        head_dim: int = 128,
        expand_v: float = 1.0,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT, "head_dim": POSITIVE_INT,
                   "expand_v": POSITIVE, "conv_size": POSITIVE_INT, "norm_eps": POSITIVE}, locals())
        super().__init__()
        self._init_qkv(hidden_size, num_heads, head_dim, kda_head_v_dim(head_dim, expand_v), mode)
        self._init_short_convs(conv_size)
        self.f_proj = LowRank(hidden_size, self.key_dim, self.head_v_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.key_dim))
        self.g_proj = LowRank(hidden_size, self.value_dim, self.head_v_dim, bias=True)
        self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        """``A`` uniform in [1, 16]; ``dt_bias = softplus^-1(dt)``, ``dt`` log-uniform in [1e-3, 0.1]."""
        device = self.A_log.device
        dt = torch.exp(torch.rand(self.key_dim, device=device) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3)).clamp_min(1e-4)
        return {
            "A_log": torch.log(torch.empty(self.num_heads, device=device).uniform_(1, 16)),
            "dt_bias": dt + torch.log(-torch.expm1(-dt)),
        }

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        new_state: dict = {}
        q, k, v = self._qkv(x, cache, use_cache, new_state, conv=True, cu_seqlens=cu_seqlens)
        g_raw = self.f_proj(x)
        beta = torch.sigmoid(self.b_proj(x))

        kda = pick_op("kda", x.shape[1], self.training, self.mode)
        o, recurrent_state = kda(
            split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim),
            split_heads(g_raw, self.head_k_dim), beta,
            initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            A_log=self.A_log, dt_bias=self.dt_bias.view(self.num_heads, self.head_k_dim),
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, cu_seqlens=cu_seqlens,
        )
        out = self._output(o, x, self.o_norm, gated=True)
        return out, ({**new_state, "recurrent_state": recurrent_state} if use_cache else None)
