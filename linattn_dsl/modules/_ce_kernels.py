"""Triton kernel for :func:`linattn_dsl.modules.cross_entropy.cross_entropy_rows` (imported lazily).

One program per row, two passes over the vocab in blocks of ``BLOCK_V``: an online logsumexp (and the
sum of the logits, for label smoothing), then the gradient, written in the gradient buffer's dtype (which
may be the logits buffer itself: each block is read before it is overwritten). See ``cross_entropy.py``
for the math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import interpreting, next_power_of_2


@triton.jit
def _cross_entropy_row_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    losses_ptr,
    stride_logits,
    stride_grad,
    vocab,
    ignore_index,
    label_smoothing,
    logit_scale,
    lse_square_scale,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    offs = tl.arange(0, BLOCK_V)

    # pass 1: running max, running sum of exp(z - max), sum of z
    z_max = float("-inf")
    sum_exp = 0.0
    sum_z = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        mask = cols < vocab
        z = tl.load(logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * logit_scale
        new_max = tl.maximum(z_max, tl.max(z, 0))
        sum_exp = sum_exp * tl.exp(z_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        z_max = new_max
        sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = z_max + tl.log(sum_exp)

    z_target = tl.load(logits_ptr + target).to(tl.float32) * logit_scale
    loss = (1.0 - label_smoothing) * (lse - z_target) + lse_square_scale * lse * lse
    loss += label_smoothing * (lse - sum_z / vocab)
    tl.store(losses_ptr + row, tl.where(valid, loss, 0.0))

    # pass 2: dloss/dlogits = scale * (softmax(z) * (1 + 2 lam lse) - (1 - eps) onehot - eps / V)
    if WRITE_GRAD:
        grad_ptr += row * stride_grad
        softmax_coef = 1.0 + 2.0 * lse_square_scale * lse
        row_scale = tl.where(valid, logit_scale, 0.0)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            mask = cols < vocab
            z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            grad = tl.exp(z - lse) * softmax_coef - label_smoothing / vocab
            grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
            tl.store(grad_ptr + cols, (grad * row_scale).to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    n, vocab = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if grad_out is not None and grad_out.stride(-1) != 1:
        raise ValueError(f"grad_out: expected unit stride over the vocab, got strides {grad_out.stride()}")
    # small blocks under the interpreter so small test vocabs still take several blocks
    block_v = min(next_power_of_2(vocab), 64 if interpreting() else 4096)
    _cross_entropy_row_kernel[(n,)](
        logits,
        logits if grad_out is None else grad_out,
        labels.contiguous(),
        losses,
        logits.stride(0),
        logits.stride(0) if grad_out is None else grad_out.stride(0),
        vocab,
        ignore_index,
        float(label_smoothing),
        float(logit_scale),
        float(lse_square_scale),
        BLOCK_V=block_v,
        WRITE_GRAD=grad_out is not None,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return losses
