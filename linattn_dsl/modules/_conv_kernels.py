"""Triton kernels for :class:`linattn_dsl.modules.ShortConvolution` (imported lazily).

Inputs are packed: ``x [total, D]`` holds sequences end to end, ``seq_idx [total]`` names each token's
sequence and ``seq_start [N]`` its first token, so ``pos = t - seq_start[seq_idx[t]]``. The input tap
``shift`` steps back from token ``t`` is ``x[t - shift]`` when ``pos >= shift``, else the conv state
``cache[seq, :, W + pos - shift]`` (zero without a cache). A program handles a ``[BLOCK_T, BLOCK_D]``
tile of tokens and channels.

Backward, with ``dpre[u] = dy[u] * act'(pre[u])`` recomputed for the ``W`` tokens ``u = t + s`` that read
``x[t]`` (no saved activations)::

    dx[t]      = sum_s weight[W-1-s] * dpre[t+s]          (t + s in t's sequence)
    dweight[k] = sum_t dpre[t] * tap(t, W-1-k)            dbias = sum_t dpre[t]
    dcache[c] += weight[k] * dpre[t]   for taps that read the cache (atomics: few tokens per sequence)

``dweight``/``dbias`` are written as one fp32 partial per time block and summed on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import interpreting


@triton.jit
def _tap(x_ptr, cache_ptr, t, d, seq, pos, dim, valid, shift, WIDTH: tl.constexpr, HAS_CACHE: tl.constexpr):
    """``[BLOCK_T, BLOCK_D]`` fp32 input ``shift`` steps before tokens ``t`` (from x or the conv state)."""
    in_x = pos >= shift
    mask_x = (valid & in_x)[:, None] & (d < dim)[None, :]
    tap = tl.load(x_ptr + (t - shift)[:, None] * dim + d[None, :], mask=mask_x, other=0.0).to(tl.float32)
    if HAS_CACHE:
        mask_c = (valid & (pos < shift))[:, None] & (d < dim)[None, :]
        cache_offs = seq[:, None] * dim * WIDTH + d[None, :] * WIDTH + (WIDTH + pos - shift)[:, None]
        tap += tl.load(cache_ptr + cache_offs, mask=mask_c, other=0.0).to(tl.float32)
    return tap


@triton.jit
def _conv_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, cache_ptr, seq_idx_ptr, seq_start_ptr, y_ptr,
    total, dim,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = t < total
    d_mask = d < dim
    seq = tl.load(seq_idx_ptr + t, mask=valid, other=0).to(tl.int64)
    pos = t - tl.load(seq_start_ptr + seq, mask=valid, other=0)
    pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        w_k = tl.load(weight_ptr + d * WIDTH + k, mask=d_mask, other=0.0).to(tl.float32)
        pre += w_k[None, :] * _tap(x_ptr, cache_ptr, t, d, seq, pos, dim, valid, WIDTH - 1 - k, WIDTH, HAS_CACHE)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        pre = pre * tl.sigmoid(pre)
    tl.store(y_ptr + t[:, None] * dim + d[None, :], pre.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & d_mask[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, weight_ptr, bias_ptr, cache_ptr, seq_idx_ptr, seq_start_ptr, dy_ptr,
    dx_ptr, dcache_ptr, dparams_partial_ptr,
    total, dim,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = t < total
    d_mask = d < dim
    seq = tl.load(seq_idx_ptr + t, mask=valid, other=0).to(tl.int64)
    pos = t - tl.load(seq_start_ptr + seq, mask=valid, other=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(WIDTH):
        # token u = t + s reads x[t] through tap k = W-1-s; it must lie in t's sequence
        u = t + s
        u_valid = valid & (u < total)
        u_valid = u_valid & (tl.load(seq_idx_ptr + u, mask=u_valid, other=-1).to(tl.int64) == seq)
        pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            w_k = tl.load(weight_ptr + d * WIDTH + k, mask=d_mask, other=0.0).to(tl.float32)
            pre += w_k[None, :] * _tap(x_ptr, cache_ptr, u, d, seq, pos + s, dim, u_valid, WIDTH - 1 - k,
                                       WIDTH, HAS_CACHE)
        if HAS_BIAS:
            pre += bias[None, :]
        dpre = tl.load(dy_ptr + u[:, None] * dim + d[None, :], mask=u_valid[:, None] & d_mask[None, :],
                       other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        w_s = tl.load(weight_ptr + d * WIDTH + (WIDTH - 1 - s), mask=d_mask, other=0.0).to(tl.float32)
        dx += w_s[None, :] * dpre
        if s == 0:  # this tile's own outputs: parameter and conv-state gradients
            partial = dparams_partial_ptr + pid_t.to(tl.int64) * dim * (WIDTH + 1) + d * (WIDTH + 1)
            for k in tl.static_range(WIDTH):
                shift = WIDTH - 1 - k
                tap = _tap(x_ptr, cache_ptr, t, d, seq, pos, dim, valid, shift, WIDTH, HAS_CACHE)
                tl.store(partial + k, tl.sum(dpre * tap, 0), mask=d_mask)
                if HAS_CACHE and shift > 0:
                    w_k = tl.load(weight_ptr + d * WIDTH + k, mask=d_mask, other=0.0).to(tl.float32)
                    mask_c = (valid & (pos < shift))[:, None] & d_mask[None, :]
                    cache_offs = seq[:, None] * dim * WIDTH + d[None, :] * WIDTH + (WIDTH + pos - shift)[:, None]
                    tl.atomic_add(dcache_ptr + cache_offs, w_k[None, :] * dpre, mask=mask_c)
            tl.store(partial + WIDTH, tl.sum(dpre, 0), mask=d_mask)
    tl.store(dx_ptr + t[:, None] * dim + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=valid[:, None] & d_mask[None, :])


def _blocks(dim: int) -> tuple[int, int]:
    if interpreting():  # small tiles so small test shapes still span several programs
        return 16, 16
    return 64, min(128, triton.next_power_of_2(dim))


class _ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, seq_idx, seq_start, activation):
        total, dim = x.shape
        width = weight.shape[-1]
        y = torch.empty_like(x)
        block_t, block_d = _blocks(dim)
        grid = (triton.cdiv(total, block_t), triton.cdiv(dim, block_d))
        flags = {"WIDTH": width, "HAS_BIAS": bias is not None, "HAS_CACHE": cache is not None,
                 "SILU": activation in ("silu", "swish"), "BLOCK_T": block_t, "BLOCK_D": block_d}
        if total and dim:
            _conv_fwd_kernel[grid](x, weight, bias, cache, seq_idx, seq_start, y, total, dim, **flags)
        ctx.save_for_backward(x, weight, bias, cache, seq_idx, seq_start)
        ctx.launch = (grid, flags)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, cache, seq_idx, seq_start = ctx.saved_tensors
        grid, flags = ctx.launch
        total, dim = x.shape
        width = weight.shape[-1]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dcache = None if cache is None else torch.zeros(cache.shape, dtype=torch.float32, device=x.device)
        dparams = torch.zeros(grid[0], dim, width + 1, dtype=torch.float32, device=x.device)
        if total and dim:
            _conv_bwd_kernel[grid](x, weight, bias, cache, seq_idx, seq_start, dy, dx, dcache, dparams,
                                   total, dim, **flags)
        dparams = dparams.sum(0)
        dweight = dparams[:, :width].to(weight.dtype)
        dbias = None if bias is None else dparams[:, width].to(bias.dtype)
        dcache = None if cache is None else dcache.to(cache.dtype)
        return dx, dweight, dbias, dcache, None, None, None


def conv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    activation: str | None,
) -> torch.Tensor:
    """``x`` packed ``[total, D]``; ``weight [D, W]``; ``cache [N, D, W]`` or None; ``cu_seqlens [N + 1]``."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=x.device, dtype=torch.int32), lengths,
                                      output_size=x.shape[0])
    return _ShortConvFunction.apply(
        x.contiguous(), weight.contiguous(), bias, None if cache is None else cache.contiguous(),
        seq_idx, cu_seqlens[:-1].contiguous(), activation,
    )
