"""Triton kernel for :mod:`linattn_dsl.modules.rotary` (imported lazily).

``x [B, T, H, D]`` is viewed as ``M = B*T*H`` rows of ``D`` channels; row ``m`` belongs to token
``m // H``, at position ``pos[m // H]``. With ``a = pos * inv_freq[i]`` (fp32, the same product the PyTorch
path forms) and the rotate-half pairing ``(x[i], x[i + D/2])``::

    y[i]       = x[i] cos a - x[i + D/2] sin a
    y[i + D/2] = x[i + D/2] cos a + x[i] sin a

The map is a rotation, so the backward is the same kernel with ``sin a`` negated: nothing is saved but
the positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_power_of_2


@triton.jit
def _rotary_kernel(
    x_ptr, y_ptr, pos_ptr, inv_freq_ptr, n_rows, heads, half,
    SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < half)
    pos = tl.load(pos_ptr + rows // heads, mask=row_ok, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle) * SIGN
    offs = rows[:, None] * (2 * half) + cols[None, :]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + offs + half, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, sign: int) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    heads, dim = x.shape[-2], x.shape[-1]
    n_rows = x.numel() // dim
    if n_rows == 0:
        return y
    block_h = next_power_of_2(dim // 2)
    block_m = max(1, min(64, 4096 // block_h))
    grid = (triton.cdiv(n_rows, block_m),)
    _rotary_kernel[grid](x, y, pos, inv_freq, n_rows, heads, dim // 2, SIGN=sign, BLOCK_M=block_m,
                         BLOCK_H=block_h, num_warps=4)
    return y


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, inv_freq):
        ctx.save_for_backward(pos, inv_freq)
        return _launch(x, pos, inv_freq, 1)

    @staticmethod
    def backward(ctx, dy):
        pos, inv_freq = ctx.saved_tensors
        return _launch(dy, pos, inv_freq, -1), None, None


def rotary_triton(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, D]``, ``pos [B * T]`` (int64, contiguous), ``inv_freq [D / 2]`` (fp32)."""
    return _RotaryFunction.apply(x, pos, inv_freq)
