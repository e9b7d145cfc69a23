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

from linattn_dsl.modules import FusedRMSNormGated, ShortConvolution

from ._checks import POSITIVE, POSITIVE_INT, check_all, check_inputs
from ._utils import LowRank, apply_padding_mask, check_mode, init_values, pick_op, run_conv, split_heads, state_of


def kda_head_v_dim(head_dim: int, expand_v: float) -> int:
    """``int(head_dim * expand_v)``, at least 1."""
    head_v_dim = int(head_dim * expand_v)
    if head_v_dim < 1:
        raise ValueError(f"expand_v: head_dim * expand_v = {head_dim} * {expand_v} gives {head_v_dim} value channels "
                         f"per head; expected at least 1")
    return head_v_dim


class KimiDeltaAttention(nn.Module):
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
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim = head_dim
        self.head_v_dim = kda_head_v_dim(head_dim, expand_v)
        self.key_dim = num_heads * self.head_k_dim
        self.value_dim = num_heads * self.head_v_dim
        self.mode = check_mode(mode)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.q_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu")
        self.k_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu")
        self.v_conv1d = ShortConvolution(self.value_dim, conv_size, activation="silu")
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        use_cache: bool = False,
        **_,
    ) -> tuple[torch.Tensor, dict | None]:
        check_inputs(hidden_states, attention_mask, self.hidden_size)
        x = apply_padding_mask(hidden_states, attention_mask)
        new_state: dict = {}
        q = run_conv(self.q_conv1d, self.q_proj(x), cache, "q", use_cache, new_state)
        k = run_conv(self.k_conv1d, self.k_proj(x), cache, "k", use_cache, new_state)
        v = run_conv(self.v_conv1d, self.v_proj(x), cache, "v", use_cache, new_state)
        g_raw = self.f_proj(x)
        beta = torch.sigmoid(self.b_proj(x))

        kda = pick_op("kda", x.shape[1], self.training, self.mode)
        o, recurrent_state = kda(
            split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim),
            split_heads(g_raw, self.head_k_dim), beta,
            initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            A_log=self.A_log, dt_bias=self.dt_bias.view(self.num_heads, self.head_k_dim),
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        )
        o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        out = self.o_proj(o.reshape(*o.shape[:-2], self.value_dim))
        if not use_cache:
            return out, None
        new_state["recurrent_state"] = recurrent_state
        return out, new_state
