"""Triton kernels for :class:`linattn_dsl.modules.ShortConvolution` (imported lazily).

Inputs are packed: ``x [total, D]`` holds sequences end to end. Token ``t`` belongs to sequence
``seq = seq_idx[t]`` spanning ``[cu[seq], cu[seq + 1])`` (varlen), or to ``seq = t // T`` of equal
lengths ``T`` (``VARLEN=False``: no index tensors at all); ``pos = t - start``. The input tap ``shift``
steps back from token ``t`` is ``x[t - shift]`` when ``pos >= shift``, else the conv state
``cache[seq, :, W + pos - shift]`` (zero without a cache).

Forward: a program computes a ``[BLOCK_T, BLOCK_D]`` tile of tokens and channels (``W`` shifted loads of
``x``, all but the first hitting L1/L2).

Backward, two passes (no saved activations; ``pre`` is recomputed from ``x``)::

    dpre[t]    = dy[t] * act'(pre[t])                      pass 1, stored in x's dtype (fp32 for fp32)
    dweight[k] = sum_t dpre[t] * tap(t, W-1-k)            pass 1, fp32 partials per program, summed on host
    dbias      = sum_t dpre[t]                             pass 1, likewise
    dcache[c] += weight[k] * dpre[t]   for taps that read the cache (pass 1, atomics: few tokens per sequence)
    dx[t]      = sum_s weight[W-1-s] * dpre[t+s]           pass 2, over the t + s in t's sequence

Storing ``dpre`` costs one extra write and read of an ``x``-sized tensor, but each pass is a streaming
kernel with ``W`` shifted (L1/L2-hitting) loads; both single-kernel alternatives were slower: recomputing
``pre`` at the ``W`` tokens ``t + s`` (``W^2`` loads, which spill registers at ``64 x 128`` tiles) and
shifting ``dpre`` inside a tile with ``tl.gather``. Offsets inside a tile are int32, relative to an int64 base
pointer per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import interpreting


@triton.jit
def _channels(dim, EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(d, d_ok)``: this program's channels ``[BLOCK_D]`` and which of them are ``< dim``."""
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_ok = tl.full([BLOCK_D], True, tl.int1)
    else:
        d_ok = d < dim
    return d, d_ok


@triton.jit
def _tokens(seq_idx_ptr, cu_ptr, t0, rows, total, seqlen, VARLEN: tl.constexpr):
    """``(t, valid, seq, pos, end)`` of the tokens ``t = t0 + rows`` (int64 ``[BLOCK_T]``), ``valid = t < total``."""
    t = t0 + rows
    valid = t < total
    if VARLEN:
        seq = tl.load(seq_idx_ptr + t, mask=valid, other=0).to(tl.int64)
        start = tl.load(cu_ptr + seq, mask=valid, other=0).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1, mask=valid, other=0).to(tl.int64)
    else:
        seq = t // seqlen
        start = seq * seqlen
        end = start + seqlen
    return t, valid, seq, t - start, end


@triton.jit
def _tap(x_base, cache_ptr, rows, d, d_ok, seq, pos, valid, dim,
         shift: tl.constexpr, WIDTH: tl.constexpr, HAS_CACHE: tl.constexpr):
    """``[BLOCK_T, BLOCK_D]`` fp32 input ``shift`` steps before the tokens at ``x_base + rows * dim``.

    ``pos``: the tokens' positions in their sequences; ``valid``: which rows are real tokens.
    """
    in_x = valid & (pos >= shift)
    offs = ((rows - shift) * dim)[:, None] + d[None, :]
    tap = tl.load(x_base + offs, mask=in_x[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_CACHE:
        if shift > 0:
            mask_c = (valid & (pos < shift))[:, None] & d_ok[None, :]
            cache_offs = (seq * dim * WIDTH + (WIDTH - shift) + pos)[:, None] + (d * WIDTH)[None, :]
            tap += tl.load(cache_ptr + cache_offs, mask=mask_c, other=0.0).to(tl.float32)
    return tap


@triton.jit
def _pre_activation(x_base, weight_ptr, bias_ptr, cache_ptr, rows, d, d_ok, seq, pos, valid, dim,
                    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``pre = sum_k weight[k] * tap(W-1-k) + bias``, fp32 ``[BLOCK_T, BLOCK_D]``."""
    pre = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        w_k = tl.load(weight_ptr + d * WIDTH + k, mask=d_ok, other=0.0).to(tl.float32)
        pre += w_k[None, :] * _tap(x_base, cache_ptr, rows, d, d_ok, seq, pos, valid, dim, WIDTH - 1 - k,
                                   WIDTH, HAS_CACHE)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    return pre


@triton.jit
def _conv_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, cache_ptr, seq_idx_ptr, cu_ptr, y_ptr,
    total, dim, seqlen,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr, SILU: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    rows = tl.arange(0, BLOCK_T)
    d, d_ok = _channels(dim, EVEN_D, BLOCK_D)
    t, valid, seq, pos, end = _tokens(seq_idx_ptr, cu_ptr, t0, rows, total, seqlen, VARLEN)
    pre = _pre_activation(x_ptr + t0 * dim, weight_ptr, bias_ptr, cache_ptr, rows, d, d_ok, seq, pos, valid, dim,
                          WIDTH, HAS_BIAS, HAS_CACHE, BLOCK_T, BLOCK_D)
    if SILU:
        pre = pre * tl.sigmoid(pre)
    offs = (rows * dim)[:, None] + d[None, :]
    tl.store(y_ptr + t0 * dim + offs, pre.to(y_ptr.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])


@triton.jit
def _conv_bwd_dpre_kernel(
    x_ptr, weight_ptr, bias_ptr, cache_ptr, seq_idx_ptr, cu_ptr, dy_ptr,
    dpre_ptr, dcache_ptr, dparams_partial_ptr,
    total, dim, seqlen,
    WIDTH: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CACHE: tl.constexpr,
    SILU: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, N_SUB: tl.constexpr,
):
    """``dpre = dy * act'(pre)`` of ``N_SUB`` consecutive tiles; one ``dweight``/``dbias`` partial for
    them; ``dcache`` (atomics). ``N_SUB`` is a constexpr (a runtime loop bound trips triton 3.6's
    interpreter)."""
    pid_t = tl.program_id(0)
    rows = tl.arange(0, BLOCK_T)
    d, d_ok = _channels(dim, EVEN_D, BLOCK_D)
    taps = tl.arange(0, W_POW2)
    dweight = tl.zeros([W_POW2, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(N_SUB):
        t0 = (pid_t.to(tl.int64) * N_SUB + i) * BLOCK_T
        t, valid, seq, pos, end = _tokens(seq_idx_ptr, cu_ptr, t0, rows, total, seqlen, VARLEN)
        x_base = x_ptr + t0 * dim
        offs = (rows * dim)[:, None] + d[None, :]
        mask = valid[:, None] & d_ok[None, :]
        pre = _pre_activation(x_base, weight_ptr, bias_ptr, cache_ptr, rows, d, d_ok, seq, pos, valid, dim,
                              WIDTH, HAS_BIAS, HAS_CACHE, BLOCK_T, BLOCK_D)
        dpre = tl.load(dy_ptr + t0 * dim + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre_ptr + t0 * dim + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        for k in tl.static_range(WIDTH):  # the same taps again (L1 hits, or the compiler reuses the loads)
            shift = WIDTH - 1 - k
            tap = _tap(x_base, cache_ptr, rows, d, d_ok, seq, pos, valid, dim, shift, WIDTH, HAS_CACHE)
            dweight += tl.where(taps[:, None] == k, tl.sum(dpre * tap, 0)[None, :], 0.0)
            if HAS_CACHE:
                if shift > 0:
                    w_k = tl.load(weight_ptr + d * WIDTH + k, mask=d_ok, other=0.0).to(tl.float32)
                    mask_c = (valid & (pos < shift))[:, None] & d_ok[None, :]
                    cache_offs = (seq * dim * WIDTH + (WIDTH - shift) + pos)[:, None] + (d * WIDTH)[None, :]
                    tl.atomic_add(dcache_ptr + cache_offs, w_k[None, :] * dpre, mask=mask_c)
        if HAS_BIAS:
            dbias += tl.sum(dpre, 0)
    partial = dparams_partial_ptr + pid_t.to(tl.int64) * (WIDTH + 1) * dim
    tl.store(partial + (taps * dim)[:, None] + d[None, :], dweight, mask=(taps < WIDTH)[:, None] & d_ok[None, :])
    if HAS_BIAS:
        tl.store(partial + WIDTH * dim + d, dbias, mask=d_ok)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, weight_ptr, seq_idx_ptr, cu_ptr, dx_ptr,
    total, dim, seqlen,
    WIDTH: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dx[t] = sum_s weight[W-1-s] * dpre[t+s]`` over the ``t + s`` in ``t``'s sequence."""
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    rows = tl.arange(0, BLOCK_T)
    d, d_ok = _channels(dim, EVEN_D, BLOCK_D)
    t, valid, seq, pos, end = _tokens(seq_idx_ptr, cu_ptr, t0, rows, total, seqlen, VARLEN)
    dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(WIDTH):
        w_s = tl.load(weight_ptr + d * WIDTH + (WIDTH - 1 - s), mask=d_ok, other=0.0).to(tl.float32)
        offs = ((rows + s) * dim)[:, None] + d[None, :]
        dpre = tl.load(dpre_ptr + t0 * dim + offs, mask=(valid & (t + s < end))[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        dx += w_s[None, :] * dpre
    offs = (rows * dim)[:, None] + d[None, :]
    tl.store(dx_ptr + t0 * dim + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])


# (BLOCK_T, BLOCK_D, num_warps) of the forward and the backward's dx pass; the dpre pass also has the number
# of time tiles per program. Tuned at [8 * 4096, 2048] bf16, W=4: BLOCK_D = 8 * 32 * num_warps keeps a tile's
# rows inside each thread, so the dpre pass's per-tile sums over tokens need no shuffles or cross-warp
# reductions.
FWD_CONFIG = (4, 1024, 4)
BWD_DPRE_CONFIG = (4, 1024, 4, 8)
BWD_DX_CONFIG = (16, 128, 4)


def _launch(dim: int, config: tuple[int, int, int]) -> tuple[int, int, int]:
    if interpreting():  # small tiles so small test shapes still span several programs
        return 16, 16, 1
    block_t, block_d, warps = config
    return block_t, min(block_d, triton.next_power_of_2(dim)), warps


class _ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, seq_idx, cu, seqlen, activation):
        total, dim = x.shape
        width = weight.shape[-1]
        y = torch.empty_like(x)
        flags = {"WIDTH": width, "HAS_BIAS": bias is not None, "HAS_CACHE": cache is not None,
                 "SILU": activation in ("silu", "swish"), "VARLEN": seq_idx is not None}
        block_t, block_d, warps = _launch(dim, FWD_CONFIG)
        if total and dim:
            grid = (triton.cdiv(total, block_t), triton.cdiv(dim, block_d))
            _conv_fwd_kernel[grid](x, weight, bias, cache, seq_idx, cu, y, total, dim, seqlen, **flags,
                                   EVEN_D=dim % block_d == 0, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(x, weight, bias, cache, seq_idx, cu)
        ctx.seqlen = seqlen
        ctx.flags = flags
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, cache, seq_idx, cu = ctx.saved_tensors
        total, dim = x.shape
        width = weight.shape[-1]
        flags = ctx.flags
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        # dpre in x's dtype (what eager autograd of a 16-bit conv + silu materialises too), fp32 for fp32
        dpre = torch.empty_like(x)
        dcache = None if cache is None else torch.zeros(cache.shape, dtype=torch.float32, device=x.device)
        block_t, block_d, warps = _launch(dim, BWD_DPRE_CONFIG[:3])
        n_sub = 2 if interpreting() else min(BWD_DPRE_CONFIG[3], triton.next_power_of_2(triton.cdiv(total, block_t)))
        grid = (triton.cdiv(total, block_t * n_sub), triton.cdiv(dim, block_d))
        # one fp32 partial per program row, each written in full by its programs: no zero fill
        dparams = torch.empty(grid[0], width + 1, dim, dtype=torch.float32, device=x.device)
        if total and dim:
            _conv_bwd_dpre_kernel[grid](x, weight, bias, cache, seq_idx, cu, dy, dpre, dcache, dparams,
                                        total, dim, ctx.seqlen, **flags,
                                        W_POW2=triton.next_power_of_2(width), EVEN_D=dim % block_d == 0,
                                        BLOCK_T=block_t, BLOCK_D=block_d, N_SUB=n_sub, num_warps=warps)
            block_t, block_d, warps = _launch(dim, BWD_DX_CONFIG)
            grid = (triton.cdiv(total, block_t), triton.cdiv(dim, block_d))
            _conv_bwd_dx_kernel[grid](dpre, weight, seq_idx, cu, dx, total, dim, ctx.seqlen, WIDTH=width,
                                      VARLEN=flags["VARLEN"], EVEN_D=dim % block_d == 0,
                                      BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
        dweight = dparams[:, :width].sum(0).t().to(weight.dtype)
        dbias = None if bias is None else dparams[:, width].sum(0).to(bias.dtype)
        dcache = None if cache is None else dcache.to(cache.dtype)
        return dx, dweight, dbias, dcache, None, None, None, None


def conv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    activation: str | None,
    seqlen: int = 1,
) -> torch.Tensor:
    """``x`` packed ``[total, D]``; ``weight [D, W]``; ``cache [N, D, W]`` or None.

    ``cu_seqlens [N + 1]`` (int64) for packed sequences of any lengths, or None for sequences of equal
    length ``seqlen`` laid end to end.
    """
    if cu_seqlens is None:
        seq_idx = None
    else:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=x.device, dtype=torch.int32),
                                          lengths, output_size=x.shape[0])
        cu_seqlens = cu_seqlens.contiguous()
    return _ShortConvFunction.apply(
        x.contiguous(), weight.contiguous(), bias, None if cache is None else cache.contiguous(),
        seq_idx, cu_seqlens, max(int(seqlen), 1), activation,
    )
