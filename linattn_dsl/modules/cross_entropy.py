"""Cross-entropy over a large vocabulary that never holds an fp32 copy of the logits.

For a row of logits ``l`` (``[V]``) and label ``y``, with ``z = logit_scale * l`` and
``lse = logsumexp(z)``::

    loss = (1 - eps) * (lse - z[y]) + eps * (lse - mean(z)) + lse_square_scale * lse^2
    dloss/dl = logit_scale * (softmax(z) * (1 + 2 * lse_square_scale * lse) - (1 - eps) * onehot(y) - eps / V)

``eps`` is ``label_smoothing`` (PyTorch's convention: the smoothed target puts ``eps / V`` on every
class); ``lse_square_scale`` is the z-loss of PaLM. Rows whose label is ``ignore_index`` contribute no
loss and no gradient; ``"mean"`` divides by the number of other rows (NaN when there are none, like
``F.cross_entropy``).

The forward pass computes each row's loss and gradient together — one Triton program per row looping
over the vocab on CUDA, chunks of rows in fp32 on CPU — and writes the gradient in the logits' dtype,
into a new buffer or, with ``inplace_backward=True``, over the logits themselves. Backward only scales
that buffer by the incoming gradient (in place: the graph can be backpropagated through once).
"""

from __future__ import annotations

import torch
from torch import nn

from ._triton_utils import check_float, check_integer, check_same_device, check_tensor, use_triton

REDUCTIONS = ("mean", "sum", "none")
_CPU_CHUNK_ELEMENTS = 1 << 20  # fp32 temporaries on the CPU path stay about this many elements


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses ``[N]`` (fp32) of ``logits [N, V]``; writes ``dloss_i / dlogits_i`` into ``grad_out``.

    ``grad_out`` (``[N, V]``, logits' dtype, may be ``logits`` itself) is skipped when None.
    """
    args = (ignore_index, label_smoothing, logit_scale, lse_square_scale)
    if use_triton(logits):
        from ._ce_kernels import cross_entropy_rows_triton

        return cross_entropy_rows_triton(logits, labels, *args, grad_out)
    return _cross_entropy_rows_torch(logits, labels, *args, grad_out)


def _cross_entropy_rows_torch(logits, labels, ignore_index, label_smoothing, logit_scale, lse_square_scale,
                              grad_out):
    n, vocab = logits.shape
    losses = logits.new_empty(n, dtype=torch.float32)
    chunk = max(1, _CPU_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        z = logits[rows].float() * logit_scale
        y = labels[rows].long()
        valid = y != ignore_index
        y_safe = torch.where(valid, y, 0)
        lse = torch.logsumexp(z, -1)
        z_target = z.gather(1, y_safe[:, None])[:, 0]
        loss = (1 - label_smoothing) * (lse - z_target) + lse_square_scale * lse.square()
        if label_smoothing:
            loss = loss + label_smoothing * (lse - z.mean(-1))
        losses[rows] = torch.where(valid, loss, 0.0)
        if grad_out is not None:
            grad = torch.exp(z.sub_(lse[:, None]))  # z is ours: reuse its memory for the softmax
            grad.mul_((1 + 2 * lse_square_scale * lse)[:, None])
            grad.sub_(label_smoothing / vocab)
            grad.scatter_add_(1, y_safe[:, None], grad.new_full((len(y), 1), label_smoothing - 1))
            grad.mul_(valid[:, None] * logit_scale)
            grad_out[rows] = grad
    return losses


def _reduce(losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / valid.sum() if reduction == "mean" else total


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, logit_scale, lse_square_scale, reduction,
                inplace_backward):
        grad = None
        if logits.requires_grad:
            grad = logits.detach() if inplace_backward else torch.empty_like(logits)
        losses = cross_entropy_rows(
            logits.detach(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
            logit_scale=logit_scale, lse_square_scale=lse_square_scale, grad_out=grad,
        )
        valid = labels != ignore_index
        ctx.reduction = reduction
        ctx.grad = grad
        ctx.n_valid = valid.sum() if reduction == "mean" else None
        return _reduce(losses, valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("FusedCrossEntropyLoss: the graph was already backpropagated through once")
        if ctx.reduction == "none":
            grad.mul_(grad_output[:, None].to(grad.dtype))
        else:
            scale = grad_output / ctx.n_valid if ctx.reduction == "mean" else grad_output
            grad.mul_(scale.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def check_labels(labels: torch.Tensor, leading: tuple[int, ...], vocab: int, ignore_index: int) -> None:
    check_integer("labels", labels)
    if tuple(labels.shape) != leading:
        raise ValueError(f"labels: expected shape {list(leading)} (the logits' leading dims), "
                         f"got {list(labels.shape)}")
    if torch.compiler.is_compiling():
        return   # the values' check reads them on the host (a sync and a graph break); skipped while traced
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {labels[bad][0].item()}")


class FusedCrossEntropyLoss(nn.Module):
    """``loss_fn(logits [..., V], labels [...]) -> loss`` (scalar, or ``labels``-shaped for ``"none"``).

    The loss is fp32. ``inplace_backward=True`` overwrites ``logits`` with the gradient in forward (saves
    one logits-sized buffer; the logits' values are lost).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        logit_scale: float = 1.0,
        lse_square_scale: float = 0.0,
        reduction: str = "mean",
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.logit_scale = float(logit_scale)
        self.lse_square_scale = float(lse_square_scale)
        self.reduction = reduction
        self.inplace_backward = inplace_backward

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_tensor("logits", logits)
        check_float("logits", logits)
        if logits.ndim < 1:
            raise ValueError(f"logits: expected shape [..., V], got a 0-d tensor of shape {tuple(logits.shape)}")
        check_tensor("labels", labels)
        check_same_device(logits=logits, labels=labels)
        check_labels(labels, tuple(logits.shape[:-1]), logits.shape[-1], self.ignore_index)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        if flat_logits.stride(-1) != 1:
            flat_logits = flat_logits.contiguous()
        loss = _CrossEntropyFunction.apply(
            flat_logits, labels.reshape(-1), self.ignore_index, self.label_smoothing, self.logit_scale,
            self.lse_square_scale, self.reduction, self.inplace_backward,
        )
        return loss.reshape(labels.shape) if self.reduction == "none" else loss

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_scale={self.logit_scale}, lse_square_scale={self.lse_square_scale}, "
                f"reduction={self.reduction!r}")
