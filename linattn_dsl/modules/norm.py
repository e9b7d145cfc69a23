"""RMSNorm (with a fused residual add), gated RMSNorm (Mamba2 / GLA output norm) and L2 norm.

For a row ``x`` of ``n`` channels (one group of ``group_size`` channels when grouped)::

    rms_norm(x)      = x / sqrt(mean(x^2) + eps) * weight
    gated(x, g)      = rms_norm(x) * act(g),        act in {swish (= silu), sigmoid}
    gated(x, g)      = rms_norm(x * act(g))         (norm_before_gate=False: the gate first, as Mamba2's)
    l2_norm(x)       = x / sqrt(sum(x^2) + eps)

All statistics are computed in fp32; outputs have the input's dtype. CUDA tensors run one Triton kernel
per direction (``_norm_kernels.py``); CPU tensors run the plain differentiable PyTorch below.
"""

from __future__ import annotations

import torch
from torch import nn

from ._triton_utils import check_float, check_last_dim, check_same_device, check_tensor, use_triton

ACTIVATIONS = ("swish", "silu", "sigmoid")


# ------------------------------------------------------------------ PyTorch path (the reference math)


def _gate_torch(g: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.sigmoid(g) if activation == "sigmoid" else g * torch.sigmoid(g)


def _norm_torch(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, mean: bool, residual: torch.Tensor | None,
    gate: torch.Tensor | None, activation: str, group_size: int | None, norm_before_gate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(normed, x + residual or None)``; ``mean`` picks RMS (mean of squares) vs L2 (sum); with a gate,
    ``norm_before_gate`` multiplies ``act(gate)`` into the output (true) or into the normalised input."""
    out_dtype = x.dtype
    xf = x.float()
    new_residual = None
    if residual is not None:
        xf = xf + residual.float()
        new_residual = xf.to(residual.dtype)
    if gate is not None and not norm_before_gate:
        xf = xf * _gate_torch(gate.float(), activation)
    shape = xf.shape
    if group_size is not None:
        xf = xf.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    sq = xf.square()
    stat = sq.mean(-1, keepdim=True) if mean else sq.sum(-1, keepdim=True)
    y = (xf * torch.rsqrt(stat + eps)).reshape(shape)
    if weight is not None:
        y = y * weight.float()
    if gate is not None and norm_before_gate:
        y = y * _gate_torch(gate.float(), activation)
    return y.to(out_dtype), new_residual


# ------------------------------------------------------------------ dispatch


def _norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    mean: bool = True,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    activation: str = "swish",
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(normed, x + residual or None)``: the Triton kernels on CUDA, :func:`_norm_torch` elsewhere."""
    if use_triton(x):
        from ._norm_kernels import norm_triton

        return norm_triton(x, weight, eps, mean, residual, gate, activation, group_size, norm_before_gate)
    return _norm_torch(x, weight, eps, mean, residual, gate, activation, group_size, norm_before_gate)


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    check_float(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")


def _check_x(x: torch.Tensor, hidden_size: int | None = None) -> None:
    check_float("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected a tensor [..., hidden], got a 0-d tensor of shape {tuple(x.shape)}")
    if hidden_size is not None:
        check_last_dim("x", x, hidden_size, "hidden_size")


# ------------------------------------------------------------------ public API


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last dim; ``x`` is ``[..., D]``, any float dtype."""
    check_tensor("x", x)
    _check_x(x)
    return _norm(x, None, eps, mean=False)[0]


class L2Norm(nn.Module):
    """Module form of :func:`l2_norm`."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, optionally fused with the residual add before it.

    ``forward(x [..., hidden], residual=None, prenorm=False)``: with ``residual`` the normed input is
    ``x + residual`` (summed in fp32). Returns ``normed`` (x's dtype), or ``(normed, new_residual)``
    when ``prenorm`` is true, where ``new_residual = x + residual`` in residual's dtype (``x`` itself
    when no residual is given) — the input to the next block's residual add.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _check_x(x, self.hidden_size)
        if residual is not None:
            _check_like("residual", residual, x)
        check_same_device(x=x, residual=residual, weight=self.weight)
        y, new_residual = _norm(x, self.weight, self.eps, residual=residual)
        if not prenorm:
            return y
        return y, (x if new_residual is None else new_residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class FusedRMSNormGated(nn.Module):
    """``rms_norm(x) * weight * act(g)``, with ``act`` swish/silu or sigmoid; with ``norm_before_gate=False``
    the gate comes first: ``rms_norm(x * act(g)) * weight`` (Mamba2's).

    ``group_size`` normalises each group of ``group_size`` consecutive channels separately (Mamba2's
    grouped norm); ``None`` normalises all ``hidden_size`` channels together. ``x`` and ``g`` are
    ``[..., hidden_size]`` of one float dtype; the output has x's dtype. One fused kernel per direction on
    CUDA: the backward keeps only ``x`` and ``g`` (the statistics are recomputed).

    ``elementwise_affine=False`` holds no weight; ``forward``'s ``weight`` then passes one (``[hidden_size]``)
    that the caller owns, e.g. a layer whose checkpoints name it differently, or none.
    """

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, activation: str = "swish", group_size: int | None = None,
        norm_before_gate: bool = True, elementwise_affine: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if group_size is not None and (group_size <= 0 or hidden_size % group_size != 0):
            raise ValueError(
                f"group_size: expected a positive divisor of hidden_size={hidden_size}, got {group_size}"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.activation = activation
        self.group_size = None if group_size == hidden_size else group_size
        self.norm_before_gate = norm_before_gate
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        _check_x(x, self.hidden_size)
        _check_like("g", g, x)
        if weight is not None:
            if self.weight is not None:
                raise ValueError("weight: this norm holds its own weight (elementwise_affine=True); expected None")
            check_tensor("weight", weight)
            if tuple(weight.shape) != (self.hidden_size,):
                raise ValueError(f"weight: expected shape ({self.hidden_size},), got {tuple(weight.shape)}")
        weight = self.weight if weight is None else weight
        check_same_device(x=x, g=g, weight=weight)
        return _norm(
            x, weight, self.eps, gate=g, activation=self.activation, group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )[0]

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, activation={self.activation!r}, "
            f"group_size={self.group_size}, norm_before_gate={self.norm_before_gate}, "
            f"elementwise_affine={self.elementwise_affine}"
        )
