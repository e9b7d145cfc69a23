"""RWKV-6 "Finch" (Peng et al., 2024): time mixing with data-dependent token shift and decay, and its
channel-mixing feed-forward. Module and parameter names follow FLA's ``RWKV6Attention`` / ``RWKV6FeedForward``
(FLA's ``LoRA.lora.0`` / ``lora.2`` are our :class:`LowRank`'s ``down`` / ``up``).

Time mixing, with the token shift ``x_prev`` (the previous token's input) and ``delta = x_prev - x``:

    m_r, m_w, m_k, m_v, m_g = x_proj(x + delta * mu) + x_bias          (low-rank data-dependent mixes, tanh)
    r, k, v, g = W_c (x + delta * m_c)                                  (c = r, k, v, g)
    log_decay  = -exp(lora_w(x + delta * m_w))                         (per key channel, tanh low rank)
    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T   (scale 1, as FLA)
    out = W_o (group_norm_per_head(o) * swish(g))

Channel mixing:  ``out = sigmoid(W_r (x + delta * mu_r)) * W_value relu(W_key (x + delta * mu_k))^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, POSITIVE_INT_OR_NONE, check, check_all
from ._utils import LowRank, SequenceLayer, check_mode, init_values, pick_op, split_heads, state_of
from .rwkv7 import token_shift

MIXES = ("r", "w", "k", "v", "g")  # FLA's order of the five data-dependent mixes (rows of x_bias)


def rwkv6_sizes(hidden_size: int, expand_k: float, expand_v: float, num_heads: int) -> tuple[int, int]:
    """``(key_dim, value_dim)``: ``hidden_size * expand_k`` / ``* expand_v``, integers divisible by ``num_heads``."""
    sizes = []
    for name, expand in (("expand_k", expand_k), ("expand_v", expand_v)):
        width = hidden_size * expand
        if not math.isclose(width, round(width)) or round(width) < 1:
            raise ValueError(f"{name}: expected hidden_size={hidden_size} * {name} to be a positive int, "
                             f"got {width}")
        if round(width) % num_heads:
            raise ValueError(f"{name}: expected hidden_size * {name} = {round(width)} divisible by "
                             f"num_heads={num_heads}")
        sizes.append(round(width))
    return sizes[0], sizes[1]


def rwkv6_intermediate_size(hidden_size: int, hidden_ratio: float | None) -> int:
    """FLA's channel-mix width: ``hidden_size * hidden_ratio`` (3.5 by default) rounded up to a multiple of 32."""
    width = int(hidden_size * (3.5 if hidden_ratio is None else hidden_ratio))
    return 32 * ((width + 31) // 32)


class LerpLinear(nn.Module):
    """``linear(x + delta * mu)`` with a learned ``mu [in]`` (FLA's LerpLinear)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.mu = nn.Parameter(torch.zeros(in_features))

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.linear(x + delta * self.mu)


class DDLerpLinear(nn.Module):
    """``linear(x + delta * mu)`` with a data-dependent ``mu`` given per token (FLA's DDLerpLinear); ``linear`` is
    a plain map or, with ``low_rank_dim``, a tanh :class:`LowRank` with a bias."""

    def __init__(self, in_features: int, out_features: int, low_rank_dim: int | None = None) -> None:
        super().__init__()
        self.linear = (nn.Linear(in_features, out_features, bias=False) if low_rank_dim is None
                       else LowRank(in_features, out_features, low_rank_dim, activation="tanh"))

    def forward(self, x: torch.Tensor, mu: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.linear(x + delta * mu)


class RWKV6Attention(SequenceLayer):
    """RWKV6 time mixing, ``[B, T, hidden] -> [B, T, hidden]``; state ``recurrent_state``, ``shift_state``."""

    def __init__(
        self,
        hidden_size: int = 1024,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_heads: int = 4,
        proj_low_rank_dim: int = 32,
        gate_low_rank_dim: int = 64,
        layer_idx: int = 0,
        num_hidden_layers: int = 1,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "expand_k": POSITIVE, "expand_v": POSITIVE, "num_heads": POSITIVE_INT,
                   "proj_low_rank_dim": POSITIVE_INT, "gate_low_rank_dim": POSITIVE_INT,
                   "num_hidden_layers": POSITIVE_INT, "norm_eps": POSITIVE}, locals())
        if not 0 <= check("layer_idx", layer_idx, NON_NEGATIVE_INT) < num_hidden_layers:
            raise ValueError(f"layer_idx: expected 0 <= layer_idx < num_hidden_layers={num_hidden_layers}, "
                             f"got {layer_idx}")
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.key_dim, self.value_dim = rwkv6_sizes(hidden_size, expand_k, expand_v, num_heads)
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.proj_low_rank_dim = proj_low_rank_dim
        self.depth_ratio = layer_idx / (num_hidden_layers - 1) if num_hidden_layers > 1 else 0.0
        self.mode = check_mode(mode)

        self.x_proj = nn.Sequential(
            LerpLinear(hidden_size, proj_low_rank_dim * len(MIXES)),
            nn.Tanh(),
            nn.Linear(proj_low_rank_dim * len(MIXES), hidden_size, bias=False),
        )
        self.x_bias = nn.Parameter(torch.zeros(len(MIXES), hidden_size))
        self.r_proj = DDLerpLinear(hidden_size, self.key_dim)
        self.w_proj = DDLerpLinear(hidden_size, self.key_dim, low_rank_dim=gate_low_rank_dim)
        self.k_proj = DDLerpLinear(hidden_size, self.key_dim)
        self.v_proj = DDLerpLinear(hidden_size, self.value_dim)
        self.g_proj = DDLerpLinear(hidden_size, self.value_dim)
        self.bonus = nn.Parameter(torch.zeros(num_heads, self.head_k_dim))
        self.g_norm = nn.GroupNorm(num_heads, self.value_dim, eps=norm_eps, affine=True)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        """RWKV6's depth-dependent token-shift mixes, decay speeds (fast to slow) and bonus."""
        device = self.x_bias.device
        depth = 1.0 - self.depth_ratio  # 1 at the first layer, towards 0 at the last
        ramp = torch.arange(self.hidden_size, device=device, dtype=torch.float32) / self.hidden_size
        channel = torch.arange(self.key_dim, device=device, dtype=torch.float32) / max(1, self.key_dim - 1)
        powers = {"r": 0.5 * depth, "w": depth, "k": depth, "v": depth + 0.3 * self.depth_ratio, "g": 0.5 * depth}
        zigzag = ((torch.arange(self.key_dim, device=device) + 1) % 3 - 1).float() * 0.1
        return {
            "x_proj.0.mu": 1 - ramp**depth,
            "x_bias": torch.stack([1 - ramp ** powers[c] for c in MIXES]),
            "w_proj.linear.up.bias": -6 + 5 * channel ** (0.7 + 1.3 * self.depth_ratio),
            "bonus": (self.depth_ratio * (1 - channel) + zigzag).reshape(self.num_heads, self.head_k_dim),
        }

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        batch, seq_len, _hidden = x.shape
        delta = token_shift(x, state_of(cache, "shift_state"), cu_seqlens, cp_context) - x
        low = self.x_proj[1](self.x_proj[0](x, delta)).view(batch, seq_len, len(MIXES), self.proj_low_rank_dim)
        up = self.x_proj[2].weight.view(self.hidden_size, len(MIXES), self.proj_low_rank_dim)
        mixes = torch.einsum("btnr,hnr->btnh", low, up) + self.x_bias
        m_r, m_w, m_k, m_v, m_g = mixes.unbind(-2)
        r = self.r_proj(x, m_r, delta)
        w = self.w_proj(x, m_w, delta)
        k = self.k_proj(x, m_k, delta)
        v = self.v_proj(x, m_v, delta)
        g = self.g_proj(x, m_g, delta)
        if attention_mask is not None:  # pads write nothing (their inputs are zero already; as FLA, be explicit)
            v = v * attention_mask[:, -seq_len:, None].to(v.dtype)
        r, k, w = (split_heads(t, self.head_k_dim) for t in (r, k, w))
        v = split_heads(v, self.head_v_dim)
        # one dtype into the op: under autocast the projections give half, the decay with fp32 parameters fp32
        log_decay, k, v, u = (t.to(r.dtype) for t in (-torch.exp(w.float()), k, v, self.bonus))
        rwkv6 = pick_op("rwkv6", seq_len, self.training, self.mode, cp_context)
        o, recurrent_state = rwkv6(
            r, k, v, log_decay, u, scale=1.0, initial_state=state_of(cache, "recurrent_state"),
            output_final_state=use_cache, cu_seqlens=cu_seqlens, cp_context=cp_context,
        )
        o = self.g_norm(o.reshape(-1, self.value_dim)).reshape(batch, seq_len, self.value_dim)
        out = self.o_proj(o * F.silu(g))
        if not use_cache:
            return out, None
        return out, {"recurrent_state": recurrent_state, "shift_state": x[:, -1]}


class RWKV6FeedForward(SequenceLayer):
    """RWKV6 channel mixing: ``sigmoid(receptance(mix)) * value(relu(key(mix))^2)``; state ``ffn_shift_state``."""

    def __init__(self, hidden_size: int = 1024, hidden_ratio: float | None = None,
                 intermediate_size: int | None = None, layer_idx: int = 0, num_hidden_layers: int = 1) -> None:
        check_all({"hidden_size": POSITIVE_INT, "intermediate_size": POSITIVE_INT_OR_NONE,
                   "num_hidden_layers": POSITIVE_INT}, locals())
        if hidden_ratio is not None:
            check("hidden_ratio", hidden_ratio, POSITIVE)
        super().__init__()
        if intermediate_size is None:
            intermediate_size = rwkv6_intermediate_size(hidden_size, hidden_ratio)
        self.hidden_size = hidden_size
        self.depth_ratio = layer_idx / (num_hidden_layers - 1) if num_hidden_layers > 1 else 0.0
        self.key = LerpLinear(hidden_size, intermediate_size)
        self.value = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.receptance = LerpLinear(hidden_size, hidden_size)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        ramp = torch.arange(self.hidden_size, device=self.key.mu.device, dtype=torch.float32) / self.hidden_size
        depth = 1.0 - self.depth_ratio
        return {"key.mu": 1 - ramp**depth, "receptance.mu": 1 - ramp**depth}

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        delta = token_shift(x, state_of(cache, "ffn_shift_state"), cu_seqlens, cp_context) - x
        out = torch.sigmoid(self.receptance(x, delta)) * self.value(F.relu(self.key(x, delta)).square())
        return out, ({"ffn_shift_state": x[:, -1]} if use_cache else None)
