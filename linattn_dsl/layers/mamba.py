"""Mamba (Gu and Dao, 2023), the selective SSM layer, with transformers' ``MambaMixer`` parameter names.

    x, z       = split(W_in h)                               (d_inner each; in_proj)
    x          = silu(conv1d(x))                             (depthwise causal conv, width conv_kernel)
    dt, B, C   = split(W_x x)                                (time_step_rank, N, N; x_proj)
    delta      = softplus(W_dt dt + dt_bias),  A = -exp(A_log)     (dt_proj's weight; its bias is the op's dt_bias)
    h_t[d] = exp(delta_t[d] A[d]) h_{t-1}[d] + B_t delta_t[d] x_t[d],   y_t[d] = C_t^T h_t[d] + D[d] x_t[d]   (mamba op)
    out        = W_out (y * silu(z))

Every channel ``d`` of ``d_inner`` is a head of the ``mamba`` op with key size ``N`` (``state_size``) and one value
channel; ``B`` and ``C`` are shared by all channels (one group).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linattn_dsl.modules import ShortConvolution

from ._checks import POSITIVE, POSITIVE_INT, check_all
from ._utils import SequenceLayer, apply_padding_mask, check_mode, init_values, pick_op, run_conv, state_of
from .mamba2 import dt_bias_init


def mamba_time_step_rank(hidden_size: int, time_step_rank, time_step_min: float, time_step_max: float) -> int:
    """``time_step_rank`` (``"auto"`` or None: ``ceil(hidden_size / 16)``, as transformers' MambaConfig), checked;
    and the ``dt`` init range."""
    if time_step_min > time_step_max:
        raise ValueError(f"time_step_min: expected <= time_step_max={time_step_max}, got {time_step_min}")
    if time_step_rank is None or time_step_rank == "auto":
        return math.ceil(hidden_size / 16)
    if not isinstance(time_step_rank, int) or isinstance(time_step_rank, bool) or time_step_rank < 1:
        raise ValueError(f"time_step_rank: expected 'auto' or a positive int, got {time_step_rank!r}")
    return time_step_rank


class Mamba(SequenceLayer):
    """``[B, T, hidden] -> [B, T, hidden]``; ``d_inner = expand * hidden`` channels of ``state_size`` states each."""

    def __init__(
        self,
        hidden_size: int = 768,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        time_step_rank: int | str | None = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_scale: float = 1.0,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "state_size": POSITIVE_INT, "expand": POSITIVE_INT,
                   "conv_kernel": POSITIVE_INT, "time_step_min": POSITIVE, "time_step_max": POSITIVE,
                   "time_step_floor": POSITIVE, "time_step_scale": POSITIVE}, locals())
        super().__init__()
        self.hidden_size = hidden_size
        self.d_inner = expand * hidden_size
        self.state_size = state_size
        self.time_step_rank = mamba_time_step_rank(hidden_size, time_step_rank, time_step_min, time_step_max)
        self.time_step_range = (time_step_min, time_step_max, time_step_floor, time_step_scale)
        self.mode = check_mode(mode)

        self.in_proj = nn.Linear(hidden_size, 2 * self.d_inner, bias=use_bias)
        # weight [d_inner, 1, conv_kernel]: transformers' nn.Conv1d(groups=d_inner) weight, loaded as it is
        self.conv1d = ShortConvolution(self.d_inner, conv_kernel, bias=use_conv_bias, activation="silu")
        self.x_proj = nn.Linear(self.d_inner, self.time_step_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, state_size))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=use_bias)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        """mamba_ssm's (and transformers') init: ``A = -[1, 2, ..., N]`` for every channel (S4D real), ``D = 1``,
        ``dt_proj.weight`` uniform in ``±time_step_scale / sqrt(time_step_rank)``, ``dt_proj.bias =
        softplus^-1(dt)`` with ``dt`` log-uniform in [time_step_min, time_step_max] (floored)."""
        device = self.A_log.device
        dt_bias = dt_bias_init(self.d_inner, *self.time_step_range[:3], device=device)
        std = self.time_step_range[3] * self.time_step_rank ** -0.5
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=device)
        return {
            "A_log": torch.log(A).expand(self.d_inner, -1).clone(),
            "D": torch.ones(self.d_inner, device=device),
            "dt_proj.weight": torch.empty_like(self.dt_proj.weight, device=device).uniform_(-std, std),
            "dt_proj.bias": dt_bias,
        }

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        new_state: dict = {}
        x_ssm, z = self.in_proj(x).chunk(2, dim=-1)
        # in_proj's and the conv's biases make pads nonzero again: mask before and after the conv
        x_ssm = run_conv(self.conv1d, apply_padding_mask(x_ssm, attention_mask), cache, "x", use_cache, new_state,
                         cu_seqlens, cp_context)
        x_ssm = apply_padding_mask(x_ssm, attention_mask)
        dt, B, C = self.x_proj(x_ssm).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)

        mamba = pick_op("mamba", x.shape[1], self.training, self.mode, cp_context)
        y, recurrent_state = mamba(
            x_ssm.unsqueeze(-1), F.linear(dt, self.dt_proj.weight), -torch.exp(self.A_log),
            B.unsqueeze(-2), C.unsqueeze(-2),
            initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache,
            D=self.D, dt_bias=self.dt_proj.bias, dt_softplus=True, cu_seqlens=cu_seqlens, cp_context=cp_context,
        )
        out = self.out_proj(y.squeeze(-1) * F.silu(z))
        return out, ({**new_state, "recurrent_state": recurrent_state} if use_cache else None)
