"""The lm head and the cross-entropy loss, fused in chunks of tokens so full logits never exist.

For each chunk of ``C`` tokens the forward pass computes ``logits = logit_scale * (hidden @ weight.T +
bias)`` (``[C, V]``, hidden's dtype), the chunk's losses and ``dloss/dlogits`` (written over the chunk's
logits by :func:`~linattn_dsl.modules.cross_entropy.cross_entropy_rows`), and from it the chunk's
gradients::

    d_hidden[chunk] = dlogits @ weight           d_weight += dlogits.T @ hidden[chunk]   (fp32)
    d_bias += dlogits.sum(0)                     (fp32)

Backward scales these by the incoming gradient (and ``1 / n_valid`` for ``"mean"``). Peak extra memory
is one ``[C, V]`` logits chunk plus ``d_hidden`` and an fp32 ``d_weight``, against the full ``[N, V]`` logits
and their gradient of the eager lm head and loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._triton_utils import check_float, check_ndim, check_same_device, check_tensor
from .cross_entropy import check_labels, cross_entropy_rows

REDUCTIONS = ("mean", "sum")


def default_chunk_size(n_tokens: int, vocab: int, max_logits: int = 1 << 26) -> int:
    """The largest power of two of tokens whose logits fit ``max_logits`` elements (128 MiB in bf16; 2048 tokens
    at a 32000 vocab, FLA's chunk at 16k tokens). The loss runs at the end of the forward, when every layer's
    saved tensors are held, so the chunk's logits add to the step's peak; the chunk's matmuls ([2048, hidden] x
    [hidden, 32000]) are large enough to keep the GPU busy."""
    fitting = max(1, max_logits // max(vocab, 1))
    return max(1, min(n_tokens, 1 << (fitting.bit_length() - 1)))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 ``acc``; bf16/fp16 operands accumulate in fp32 without a temporary
    where PyTorch's ``addmm(out_dtype=)`` exists (CUDA, torch >= 2.8)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc += a @ b


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, weight, bias, ignore_index, label_smoothing, logit_scale, reduction,
                chunk_size):
        n_tokens = hidden.shape[0]
        need_dh, need_dw = hidden.requires_grad, weight.requires_grad
        need_db = bias is not None and bias.requires_grad
        dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        hidden = hidden.detach()
        weight = weight.detach().to(hidden.dtype)  # the matmuls run in hidden's dtype
        bias = None if bias is None else bias.detach().to(hidden.dtype)
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_db else None
        need_grad = need_dh or need_dw or need_db
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, n_tokens))
            h = hidden[rows]
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            losses = cross_entropy_rows(
                logits, labels[rows], ignore_index=ignore_index, label_smoothing=label_smoothing,
                logit_scale=logit_scale, grad_out=logits if need_grad else None,
            )
            loss += losses.sum()
            dlogits = logits  # now holds dloss/d(hidden @ weight.T + bias), logit_scale included
            if need_dh:
                torch.mm(dlogits, weight, out=d_hidden[rows])
            if need_dw:
                _addmm_fp32_(d_weight, dlogits.T, h)
            if need_db:
                d_bias += dlogits.sum(0, dtype=torch.float32)
        if reduction == "mean":
            n_valid = (labels != ignore_index).sum()
            loss = loss / n_valid
            ctx.scale = 1.0 / n_valid.float()
        else:
            ctx.scale = None
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = dtypes
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("FusedLinearCrossEntropyLoss: the graph was already backpropagated through once")
        scale = grad_output if ctx.scale is None else grad_output * ctx.scale
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                g = g.mul_(scale.to(g.dtype)).to(dtype)
            out.append(g)
        d_hidden, d_weight, d_bias = out
        return d_hidden, None, d_weight, d_bias, None, None, None, None, None


class FusedLinearCrossEntropyLoss(nn.Module):
    """``loss_fn(hidden [N, D], labels [N], weight [V, D], bias=None [V]) -> loss`` (fp32 scalar).

    ``hidden`` may also be ``[..., D]`` with ``labels [...]``. ``chunk_size`` tokens (or ``N /
    num_chunks``) go through the lm head at a time; by default a chunk's logits hold at most 2^26
    elements (see :func:`default_chunk_size`). ``weight`` and ``bias`` are cast to hidden's dtype for the matmul.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        logit_scale: float = 1.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
        num_chunks: int | None = None,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS} (gradients are computed in forward), "
                             f"got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
        if chunk_size is not None and num_chunks is not None:
            raise ValueError(f"chunk_size / num_chunks: expected at most one, got {chunk_size} and {num_chunks}")
        for name, value in (("chunk_size", chunk_size), ("num_chunks", num_chunks)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.logit_scale = float(logit_scale)
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.num_chunks = num_chunks

    def _chunk_size(self, n_tokens: int, vocab: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        if self.num_chunks is not None:
            return max(1, math.ceil(n_tokens / self.num_chunks))
        return default_chunk_size(n_tokens, vocab)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_float("hidden", hidden)
        check_float("weight", weight)
        check_tensor("labels", labels)
        if hidden.ndim < 1:
            raise ValueError(f"hidden: expected shape [N, D], got a 0-d tensor of shape {tuple(hidden.shape)}")
        check_ndim("weight", weight, 2, "[V, D]")
        dim = hidden.shape[-1]
        vocab = weight.shape[0]
        if weight.shape[1] != dim:
            raise ValueError(f"weight: expected shape [V, D] with D={dim} (hidden's last dim), "
                             f"got {list(weight.shape)}")
        if bias is not None:
            check_float("bias", bias)
            if tuple(bias.shape) != (vocab,):
                raise ValueError(f"bias: expected shape [V] = [{vocab}], got {list(bias.shape)}")
        check_same_device(hidden=hidden, labels=labels, weight=weight, bias=bias)
        check_labels(labels, tuple(hidden.shape[:-1]), vocab, self.ignore_index)
        flat_hidden = hidden.reshape(-1, dim)
        chunk = self._chunk_size(flat_hidden.shape[0], vocab)
        # under autocast the lm-head matmuls run in the autocast dtype, as an eager ``hidden @ weight.T``
        # would; the function itself runs with autocast off (its matmuls write into preallocated buffers)
        device_type = flat_hidden.device.type
        if torch.is_autocast_enabled(device_type):
            flat_hidden = flat_hidden.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _LinearCrossEntropyFunction.apply(
                flat_hidden, labels.reshape(-1), weight, bias, self.ignore_index, self.label_smoothing,
                self.logit_scale, self.reduction, chunk,
            )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_scale={self.logit_scale}, reduction={self.reduction!r}, chunk_size={self.chunk_size}, "
                f"num_chunks={self.num_chunks}")
