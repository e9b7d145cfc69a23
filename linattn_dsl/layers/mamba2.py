"""Mamba2 (Dao and Gu, ICML 2024), the SSD layer.

    z, xBC, dt = W_in x                                   (d_inner, d_inner + 2 G N, H)
    x, B, C    = split(silu(conv1d(xBC)))                 (depthwise causal conv, width 4)
    delta      = softplus(dt + dt_bias),  A = -exp(A_log)
    S_t = exp(A delta_t) S_{t-1} + B_t (x_t delta_t)^T,   y_t = S_t^T C_t + D x_t   (the mamba2 op)
    out = W_out (rms_norm_G(y * silu(z)) * w)             (gate, then a norm per group of d_inner / G channels)

The gate, the norm and ``* w`` run as one fused norm (FusedRMSNormGated, ``norm_before_gate=False``): its
backward keeps only y and z (a copy of z, so in_proj's output is freed), not the gated, normed and weighted
[tokens, d_inner] intermediates that separate eager steps keep.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linattn_dsl.modules import FusedRMSNormGated, ShortConvolution

from ._checks import POSITIVE, POSITIVE_INT, POSITIVE_INT_OR_NONE, check_all
from ._utils import SequenceLayer, apply_padding_mask, check_mode, init_values, pick_op, run_conv, split_heads, state_of


def mamba2_num_heads(hidden_size: int, num_heads: int | None, head_dim: int, expand: int, n_groups: int,
                     time_step_min: float, time_step_max: float) -> int:
    """``num_heads`` (``None``: ``expand * hidden_size // head_dim``), checked against ``num_heads * head_dim =
    expand * hidden_size`` and the ``n_groups`` that share B and C; and the ``dt`` init range."""
    if time_step_min > time_step_max:
        raise ValueError(f"time_step_min: expected <= time_step_max={time_step_max}, got {time_step_min}")
    d_inner = expand * hidden_size
    num_heads = d_inner // head_dim if num_heads is None else num_heads
    if num_heads < 1 or num_heads * head_dim != d_inner:
        raise ValueError(f"num_heads: expected num_heads * head_dim = expand * hidden_size = {d_inner}, "
                         f"got {num_heads} * {head_dim}")
    if num_heads % n_groups:
        raise ValueError(f"n_groups: expected a divisor of num_heads={num_heads}, got {n_groups}")
    return num_heads


def dt_bias_init(size: int, time_step_min: float, time_step_max: float, time_step_floor: float,
                 device=None) -> torch.Tensor:
    """Mamba's ``dt`` bias init: ``softplus^-1(dt)`` with ``dt`` log-uniform in [time_step_min, time_step_max],
    floored at ``time_step_floor`` (one value per entry of ``size``)."""
    dt = torch.exp(torch.rand(size, device=device) * (math.log(time_step_max) - math.log(time_step_min))
                   + math.log(time_step_min)).clamp_min(time_step_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2(SequenceLayer):
    """``[B, T, hidden] -> [B, T, hidden]``; ``num_heads * head_dim = expand * hidden`` (``d_inner``)."""

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int | None = None,
        head_dim: int = 64,
        state_size: int = 128,
        expand: int = 2,
        n_groups: int = 1,
        conv_kernel: int = 4,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT_OR_NONE, "head_dim": POSITIVE_INT,
                   "state_size": POSITIVE_INT, "expand": POSITIVE_INT, "n_groups": POSITIVE_INT,
                   "conv_kernel": POSITIVE_INT, "time_step_min": POSITIVE, "time_step_max": POSITIVE,
                   "time_step_floor": POSITIVE, "norm_eps": POSITIVE}, locals())
        super().__init__()
        self.d_inner = expand * hidden_size
        num_heads = mamba2_num_heads(hidden_size, num_heads, head_dim, expand, n_groups, time_step_min, time_step_max)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.state_size = state_size
        self.n_groups = n_groups
        self.time_step_range = (time_step_min, time_step_max, time_step_floor)
        self.mode = check_mode(mode)
        self.conv_dim = self.d_inner + 2 * n_groups * state_size

        self.in_proj = nn.Linear(hidden_size, self.d_inner + self.conv_dim + num_heads, bias=use_bias)
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, bias=use_conv_bias, activation="silu")
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        # Mamba2 gates before normalising (norm_before_gate=False): a per-group RMSNorm of y * silu(z), times
        # norm_weight; the weight stays the layer's parameter (state-dict key "norm_weight")
        self.norm = FusedRMSNormGated(self.d_inner, eps=norm_eps, activation="silu",
                                      group_size=self.d_inner // n_groups, norm_before_gate=False,
                                      elementwise_affine=False)
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=use_bias)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        """Mamba2's init: ``A`` uniform in [1, 16], ``D = 1``, ``dt_bias = softplus^-1(dt)`` with ``dt``
        log-uniform in [time_step_min, time_step_max] (floored)."""
        device = self.A_log.device
        dt_bias = dt_bias_init(self.num_heads, *self.time_step_range, device=device)
        return {
            "A_log": torch.log(torch.empty(self.num_heads, device=device).uniform_(1, 16)),
            "D": torch.ones(self.num_heads, device=device),
            "norm_weight": torch.ones(self.d_inner, device=device),
            "dt_bias": dt_bias,
        }

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        new_state: dict = {}
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        # the conv bias makes pads nonzero again: mask after the conv too
        xBC = run_conv(self.conv1d, xBC, cache, "xBC", use_cache, new_state, cu_seqlens, cp_context)
        xBC = apply_padding_mask(xBC, attention_mask)
        x_ssm, B, C = xBC.split([self.d_inner, self.n_groups * self.state_size,
                                 self.n_groups * self.state_size], dim=-1)

        mamba2 = pick_op("mamba2", x.shape[1], self.training, self.mode, cp_context)
        y, recurrent_state = mamba2(
            split_heads(x_ssm, self.head_dim), dt, -torch.exp(self.A_log),
            split_heads(B, self.state_size), split_heads(C, self.state_size),
            initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, cu_seqlens=cu_seqlens, cp_context=cp_context,
        )
        normed = self.norm(y.reshape(*y.shape[:-2], self.d_inner), z, weight=self.norm_weight)
        out = self.out_proj(normed)
        return out, ({**new_state, "recurrent_state": recurrent_state} if use_cache else None)
