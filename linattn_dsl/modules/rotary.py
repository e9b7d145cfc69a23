"""Rotary position embedding (RoPE, rotate-half convention) on ``x [B, T, H, D]``.

For channel pair ``(i, i + D/2)`` of a token at position ``p``, with ``a = p * theta ** (-2i / D)``::

    y[i] = x[i] cos a - x[i + D/2] sin a,        y[i + D/2] = x[i + D/2] cos a + x[i] sin a

CUDA tensors run one Triton kernel per direction (``_rotary_kernels.py``: angles formed in the kernel,
fp32 arithmetic, output in x's dtype, only the positions saved for the backward); CPU tensors run the
plain differentiable PyTorch below (the kernel under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch

from ._triton_utils import check_float, check_integer, check_ndim, check_same_device, use_triton


def rotary_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """``theta ** (-2i / dim)`` for ``i < dim / 2`` (fp32). Not a buffer (nothing to restore on load); kept per
    (dim, theta, device) so a decoding step does not recompute it (4 small ops a call): shared, read-only."""
    args = (int(dim), float(theta), torch.device(device) if device is not None else torch.device("cpu"))
    if torch.compiler.is_compiling():   # traced: computed in the graph (torch.compile does not trace the cache)
        return _inv_freq.__wrapped__(*args)
    return _inv_freq(*args)


@functools.lru_cache(maxsize=32)
def _inv_freq(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def _rotary_torch(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = pos.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE on ``x [B, T, H, D]`` (``D`` even) at ``position_ids [B, T]`` or ``[T]`` (integers)."""
    check_float("x", x)
    check_ndim("x", x, 4, "[B, T, H, D]")
    check_integer("position_ids", position_ids)
    batch, seq_len, _, dim = x.shape
    if dim % 2:
        raise ValueError(f"x: rotary embedding needs an even head dim, got {dim}")
    if position_ids.ndim == 1:
        position_ids = position_ids[None]
    if position_ids.ndim != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids: expected shape [B, T] = [{batch}, {seq_len}] or [T] = [{seq_len}], "
                         f"got {tuple(position_ids.shape)}")
    if not theta > 0:
        raise ValueError(f"theta: expected a positive base, got {theta}")
    check_same_device(x=x, position_ids=position_ids)
    position_ids = position_ids.expand(batch, seq_len)
    inv_freq = rotary_inv_freq(dim, theta, x.device)
    if use_triton(x):
        from ._rotary_kernels import rotary_triton

        return rotary_triton(x, position_ids.reshape(-1).to(torch.int64).contiguous(), inv_freq)
    return _rotary_torch(x, position_ids, inv_freq)
