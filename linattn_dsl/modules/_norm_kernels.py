"""Triton kernels for :mod:`linattn_dsl.modules.norm` (imported lazily).

``x`` is viewed as ``[M, G, S]``: ``M`` rows of ``G`` groups of ``S`` channels (``G = 1`` unless
grouped). One forward program normalises a tile of rows of one group; one backward program walks a range
of rows of one group a tile at a time, accumulating ``d_weight`` in registers and writing one fp32 partial
per program.

With ``xhat = x * rstd`` (``rstd = 1 / sqrt(mean(x^2) + eps)``, or ``sum`` for the L2 norm) and
``dxhat = dy * act(g) * weight``::

    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))          (sum for L2)
    dweight = sum_rows dy * act(g) * xhat                    dg = dy * xhat * weight * act'(g)

Gate before the norm (``norm_before_gate=False``, Mamba2's): the normalised row is ``x' = x * act(g)``,
``y = x' * rstd(x') * weight``; with ``dx'`` the formula above for ``x'`` (``dxhat = dy * weight``)::

    dx = dx' * act(g)                                        dg = dx' * x * act'(g)

What the backward reads: the inputs (``x`` or ``x + residual``, ``g``), the statistics recomputed. A norm
with no weight, gate or residual (the L2 norm, an unweighted RMSNorm) keeps its output ``y`` (which is
``xhat``) and the per-row ``rstd`` instead: the consumer of ``y`` (a linear layer, a chunk op) usually
keeps ``y`` anyway, so the norm's input need not stay alive for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_power_of_2, num_programs_hint

_GATES = {None: 0, "swish": 1, "silu": 1, "sigmoid": 2}
MAX_GROUP = 65536


@triton.jit
def _norm_fwd_kernel(
    x_ptr, residual_ptr, gate_ptr, weight_ptr, y_ptr, residual_out_ptr, rstd_ptr,
    n_rows, n_groups, group_size, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, GATE: tl.constexpr, GATE_FIRST: tl.constexpr, STORE_RSTD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < group_size)
    offs = rows[:, None] * n_groups * group_size + group * group_size + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(residual_out_ptr + offs, x.to(residual_out_ptr.dtype.element_ty), mask=mask)
    if GATE != 0:
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATE == 1:
            act = g * tl.sigmoid(g)
        else:
            act = tl.sigmoid(g)
        if GATE_FIRST:
            x *= act
    stat = tl.sum(x * x, 1)
    if MEAN:
        stat = stat / group_size
    rstd = tl.rsqrt(stat + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows * n_groups + group, rstd, mask=rows < n_rows)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + group * group_size + cols, mask=cols < group_size, other=0.0).to(tl.float32)[None, :]
    if GATE != 0:
        if not GATE_FIRST:
            y *= act
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    x_ptr, gate_ptr, weight_ptr, dy_ptr, dresidual_out_ptr, dx_ptr, dgate_ptr, dweight_partial_ptr, rstd_ptr,
    n_rows, rows_per_program, n_groups, group_size, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, MEAN: tl.constexpr, HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, GATE: tl.constexpr, GATE_FIRST: tl.constexpr, FROM_OUTPUT: tl.constexpr,
):
    # FROM_OUTPUT (no weight, gate or residual): x_ptr holds the forward's output y = xhat and rstd_ptr its
    # per-row rstd; otherwise x_ptr holds the normalised input and rstd is recomputed
    pid = tl.program_id(0)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    cmask = cols < group_size
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + group * group_size + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dweight = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop bounds: int64 row offsets
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        mask = (rows[:, None] < row_end) & cmask[None, :]
        offs = rows[:, None] * n_groups * group_size + group * group_size + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATE != 0:
            g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            if GATE == 1:
                act = g * sig
                dact = sig * (1.0 + g * (1.0 - sig))
            else:
                act = sig
                dact = sig * (1.0 - sig)
        if FROM_OUTPUT:
            rstd = tl.load(rstd_ptr + rows * n_groups + group, mask=rows < row_end, other=0.0)[:, None]
            xhat = x
        else:
            xn = x
            if GATE != 0:
                if GATE_FIRST:
                    xn = x * act
            stat = tl.sum(xn * xn, 1)
            if MEAN:
                stat = stat / group_size
            rstd = tl.rsqrt(stat + eps)[:, None]
            xhat = xn * rstd
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATE != 0:
            if not GATE_FIRST:
                dgate = dy * xhat * dact
                if HAS_WEIGHT:
                    dgate *= weight
                tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
                dy = dy * act
        if HAS_WEIGHT:
            dweight += dy * xhat
            dxhat = dy * weight
        else:
            dxhat = dy
        proj = tl.sum(dxhat * xhat, 1)
        if MEAN:
            proj = proj / group_size
        dx = rstd * (dxhat - xhat * proj[:, None])
        if GATE != 0:
            if GATE_FIRST:   # dx is d(x * act(g)) here
                tl.store(dgate_ptr + offs, (dx * x * dact).to(dgate_ptr.dtype.element_ty), mask=mask)
                dx = dx * act
        if HAS_DRESIDUAL:
            dx += tl.load(dresidual_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dweight_partial_ptr + pid * n_groups * group_size + group * group_size + cols, tl.sum(dweight, 0),
                 mask=cmask)


def _launch_config(group_size: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): a program handles a [ROWS, BLOCK] tile; groups under 1024 channels take
    4096 // BLOCK rows, so short groups (L2 norm over heads of 128: 32 rows a program) do not leave most
    threads idle; wider groups take one row a program (two rows were no faster)."""
    block = next_power_of_2(group_size)
    rows = 1 if block >= 1024 else 4096 // block
    return block, rows, 4 if block <= 1024 else (8 if block <= 4096 else 16)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, gate, eps, mean, activation, group_size, norm_before_gate):
        shape = x.shape
        dim = shape[-1]
        group_size = group_size or dim
        n_groups = dim // group_size
        x2 = x.reshape(-1, dim).contiguous()
        rows = x2.shape[0]
        residual2 = None if residual is None else residual.reshape(-1, dim).contiguous()
        gate2 = None if gate is None else gate.reshape(-1, dim).contiguous()
        y = torch.empty_like(x2)
        residual_out = None if residual is None else torch.empty_like(residual2)
        # no weight, gate or residual: y is xhat, and the backward reads y and rstd instead of x
        from_output = weight is None and gate is None and residual is None
        rstd = torch.empty(rows, n_groups, dtype=torch.float32, device=x.device) if from_output else None
        gate_first = gate is not None and not norm_before_gate
        block, rows_tile, num_warps = _launch_config(group_size)
        if rows:
            _norm_fwd_kernel[(triton.cdiv(rows, rows_tile), n_groups)](
                x2, residual2, gate2, weight, y, residual_out, rstd, rows, n_groups, group_size, eps,
                BLOCK=block, ROWS=rows_tile, MEAN=mean, HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None, GATE=_GATES[activation if gate is not None else None],
                GATE_FIRST=gate_first, STORE_RSTD=from_output, num_warps=num_warps,
            )
        if from_output:
            ctx.save_for_backward(y, None, None, rstd)
        else:   # backward re-reads the normalised input: x, or x + residual (which is an output anyway)
            ctx.save_for_backward(x2 if residual is None else residual_out, weight, gate2, None)
        ctx.config = (eps, mean, activation if gate is not None else None, group_size, n_groups, block,
                      rows_tile, num_warps, shape, x.dtype, None if residual is None else residual.dtype, gate_first)
        if residual is None:
            return y.reshape(shape)
        return y.reshape(shape), residual_out.reshape(shape)

    @staticmethod
    def backward(ctx, dy, dresidual_out=None):
        normed_input, weight, gate, rstd = ctx.saved_tensors
        (eps, mean, activation, group_size, n_groups, block, rows_tile, num_warps, shape, x_dtype,
         residual_dtype, gate_first) = ctx.config
        dim = shape[-1]
        rows = normed_input.shape[0]
        dy = dy.reshape(-1, dim).contiguous()
        if dresidual_out is not None:
            dresidual_out = dresidual_out.reshape(-1, dim).contiguous()
        dx = torch.empty(rows, dim, dtype=x_dtype, device=dy.device)
        dgate = None if gate is None else torch.empty_like(gate)
        n_programs = max(1, min(triton.cdiv(rows, rows_tile), num_programs_hint(dy)))
        rows_per_program = triton.cdiv(triton.cdiv(rows, n_programs), rows_tile) * rows_tile if rows else rows_tile
        n_programs = max(1, triton.cdiv(rows, rows_per_program))
        dweight_partial = None
        if weight is not None:
            dweight_partial = torch.zeros(n_programs, dim, dtype=torch.float32, device=dy.device)
        if rows:
            _norm_bwd_kernel[(n_programs, n_groups)](
                normed_input, gate, weight, dy, dresidual_out, dx, dgate, dweight_partial, rstd,
                rows, rows_per_program, n_groups, group_size, eps,
                BLOCK=block, ROWS=rows_tile, MEAN=mean, HAS_DRESIDUAL=dresidual_out is not None,
                HAS_WEIGHT=weight is not None, GATE=_GATES[activation], GATE_FIRST=gate_first,
                FROM_OUTPUT=rstd is not None, num_warps=num_warps,
            )
        dweight = None if weight is None else dweight_partial.sum(0).to(weight.dtype)
        dresidual = None if residual_dtype is None else dx.to(residual_dtype).reshape(shape)
        dgate = None if dgate is None else dgate.reshape(shape)
        return dx.reshape(shape), dweight, dresidual, dgate, None, None, None, None, None


def norm_triton(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, mean: bool, residual: torch.Tensor | None,
    gate: torch.Tensor | None, activation: str, group_size: int | None, norm_before_gate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`linattn_dsl.modules.norm._norm` on CUDA tensors."""
    if (group_size or x.shape[-1]) > MAX_GROUP:
        raise ValueError(f"x: expected at most {MAX_GROUP} channels per normalised group on the Triton path, "
                         f"got {group_size or x.shape[-1]}")
    out = _NormFunction.apply(x, weight, residual, gate, float(eps), mean, activation, group_size, norm_before_gate)
    return (out, None) if residual is None else out
