"""DeltaNet (Yang et al., NeurIPS 2024): the delta rule.

    q, k, v = silu(conv1d(W_q x)), silu(conv1d(W_k x)), silu(conv1d(W_v x))   (short convs)
    q, k    = l2norm(q), l2norm(k)                      (inside the op)
    beta    = sigmoid(W_b x)                            (per head)
    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_k))
    out = W_o rms_norm(o)          (per head; with use_gate: rms_norm(o) * swish(W_g x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import POSITIVE, POSITIVE_INT, check_all, head_dims
from ._utils import MultiHeadLayer, pick_op, split_heads, state_of


class DeltaNet(MultiHeadLayer):
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
        self._init_qkv(hidden_size, num_heads, *head_dims(hidden_size, num_heads, expand_k, expand_v), mode)
        self.use_beta = use_beta
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self._init_short_convs(conv_size)
        self.use_gate = use_gate
        self.o_norm = self._output_norm(use_gate, norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        new_state: dict = {}
        q, k, v = self._qkv(x, cache, use_cache, new_state, conv=self.use_short_conv, cu_seqlens=cu_seqlens)
        if not self.use_short_conv:  # the silu the convs would end in
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        if self.use_beta:
            beta = torch.sigmoid(self.b_proj(x))
        else:
            beta = x.new_ones(*x.shape[:2], self.num_heads)

        delta_rule = pick_op("delta_rule", x.shape[1], self.training, self.mode)
        o, recurrent_state = delta_rule(
            split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim),
            beta, initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens,
        )
        out = self._output(o, x, self.o_norm, self.use_gate)
        return out, ({**new_state, "recurrent_state": recurrent_state} if use_cache else None)
