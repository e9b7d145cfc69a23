"""DeltaNet (Yang et al., NeurIPS 2024): the delta rule.

    q, k, v = silu(conv1d(W_q x)), silu(conv1d(W_k x)), silu(conv1d(W_v x))   (short convs)
    q, k    = l2norm(q), l2norm(k)                      (inside the op)
    beta    = sigmoid(W_b x)                            (per head)
    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_k))
    out = W_o rms_norm(o)          (per head; with use_gate: rms_norm(o) * swish(W_g x))
"""

from __future__ import annotations

import torch
from torch import nn

from linattn_dsl.modules import FusedRMSNormGated, RMSNorm, ShortConvolution

from ._checks import POSITIVE, POSITIVE_INT, check_all, check_inputs, head_dims
from ._utils import apply_padding_mask, check_mode, pick_op, run_conv, split_heads, state_of


class DeltaNet(nn.Module):
    """``[B, T, hidden] -> [B, T, hidden]``; see the module docstring for the equations."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_beta: bool = True,
        use_gate: bool = False,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT, "expand_k": POSITIVE, "expand_v": POSITIVE,
                   "conv_size": POSITIVE_INT, "norm_eps": POSITIVE}, locals())
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_k_dim, self.head_v_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.key_dim = self.head_k_dim * num_heads
        self.value_dim = self.head_v_dim * num_heads
        self.mode = check_mode(mode)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.use_beta = use_beta
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu")
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu")
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, activation="silu")
        self.use_gate = use_gate
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation="swish")
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

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
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q = run_conv(self.q_conv1d, q, cache, "q", use_cache, new_state)
            k = run_conv(self.k_conv1d, k, cache, "k", use_cache, new_state)
            v = run_conv(self.v_conv1d, v, cache, "v", use_cache, new_state)
        else:
            q, k, v = torch.nn.functional.silu(q), torch.nn.functional.silu(k), torch.nn.functional.silu(v)
        if self.use_beta:
            beta = torch.sigmoid(self.b_proj(x))
        else:
            beta = x.new_ones(*x.shape[:2], self.num_heads)

        delta_rule = pick_op("delta_rule", x.shape[1], self.training, self.mode)
        o, recurrent_state = delta_rule(
            split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim),
            beta, initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            use_qk_l2norm_in_kernel=True,
        )
        if self.use_gate:
            o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        out = self.o_proj(o.reshape(*o.shape[:-2], self.value_dim))
        if not use_cache:
            return out, None
        new_state["recurrent_state"] = recurrent_state
        return out, new_state
