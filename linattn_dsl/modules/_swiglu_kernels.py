"""Triton kernels for :func:`linattn_dsl.modules.swiglu_linear` (imported lazily): the elementwise parts.

With ``s = sigmoid(g)``, ``h = g s u`` (= ``silu(g) u``) and ``dh = dout @ weight``::

    dg = dh u s (1 + g (1 - s))          du = dh g s

Forward: one pass writes ``h``. Backward: one pass reads ``g``, ``u`` and ``dh`` and writes ``h`` (for
``dweight = dout^T h``), ``dg`` and ``du``; fp32 arithmetic, outputs in the inputs' dtype. The eager
form of the same backward ran ~14 elementwise ops through fp32 copies (~6 GB of memory traffic per layer
at 16k tokens x 2816 channels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, h_ptr, dg_ptr, du_ptr, n, STORE_H: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    gs = g * s
    if STORE_H:
        tl.store(h_ptr + offs, (gs * u).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * gs).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` in ``g``'s dtype (``g``, ``u`` of one shape and dtype)."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK, num_warps=8)
    return h


def swiglu_bwd(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, store_h: bool):
    """``(h or None, dg, du)`` from ``g``, ``u`` and ``dh`` (one shape and dtype)."""
    g, u, dh = g.contiguous(), u.contiguous(), dh.contiguous()
    h = torch.empty_like(g) if store_h else None
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, dh, h if store_h else dg, dg, du, n, STORE_H=store_h,
                                                     BLOCK=BLOCK, num_warps=8)
    return h, dg, du
