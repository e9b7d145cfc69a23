"""ShortConvolution: the depthwise causal conv1d (kernel 4 or so) in front of q/k/v in linear attention.

For channel ``d`` and kernel ``w = weight[d, 0, :]`` of width ``W``::

    y[t, d] = act( sum_{k=0}^{W-1} w[k] * x[t - (W - 1) + k, d] + bias[d] )

where inputs before the start of a sequence are read from the conv state (``cache``) or are zero.

Conv state layout (``cache`` and ``final_state``): ``[N, D, W]`` holding the last ``W`` inputs of each
sequence, **oldest first** — ``cache[n, :, -1]`` is the most recent input. Only the last ``W - 1``
entries are read when continuing a sequence; ``step`` shifts the state left by one and writes the new
input at ``[..., -1]``. ``N`` is the batch size, or the number of packed sequences with ``cu_seqlens``.

Every input is handled as a packed batch of sequences: ``[B, T, D]`` is ``B`` sequences of length
``T`` laid end to end, so the batched and the ``cu_seqlens`` (varlen) cases share one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._triton_utils import (
    check_float,
    check_integer,
    check_last_dim,
    check_ndim,
    check_same_device,
    check_tensor,
    use_triton,
)

ACTIVATIONS = ("silu", "swish", None)


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def _packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq_idx [total], pos [total])``: each packed token's sequence and its position within it."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1][seq_idx]
    return seq_idx, pos


def _gather_index(
    seq_idx: torch.Tensor, pos: torch.Tensor, shift: int, width: int, n_cache_rows: int
) -> torch.Tensor:
    """Rows of ``[cache rows (N*W); x rows (total)]`` holding ``x[t - shift]`` of each token's sequence.

    A token at position ``pos < shift`` reads cache entry ``W + pos - shift`` of its sequence.
    """
    t = torch.arange(len(pos), device=pos.device)
    from_x = n_cache_rows + t - shift
    from_cache = seq_idx * width + width + pos - shift
    return torch.where(pos >= shift, from_x, from_cache)


def _final_state_index(cu_seqlens: torch.Tensor, width: int, n_cache_rows: int) -> torch.Tensor:
    """``[N, W]`` rows of ``[cache rows; x rows]`` holding the last ``W`` inputs of each sequence."""
    n = len(cu_seqlens) - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
    rel = lengths - width + torch.arange(width, device=cu_seqlens.device)[None, :]  # position in seq
    from_x = n_cache_rows + cu_seqlens[:-1, None] + rel
    from_cache = torch.arange(n, device=cu_seqlens.device)[:, None] * width + width + rel
    return torch.where(rel >= 0, from_x, from_cache)


def _conv_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    activation: str | None,
) -> torch.Tensor:
    """``x`` packed ``[total, D]``; ``weight`` ``[D, W]``; ``cache`` ``[N, D, W]`` or None."""
    total, dim = x.shape
    width = weight.shape[-1]
    n = len(cu_seqlens) - 1
    seq_idx, pos = _packed_positions(cu_seqlens, total)
    cache_rows = x.new_zeros(n * width, dim) if cache is None else cache.transpose(1, 2).reshape(-1, dim)
    rows = torch.cat([cache_rows.to(x.dtype), x]).float()
    y = x.new_zeros(total, dim, dtype=torch.float32)
    for k in range(width):
        shift = width - 1 - k
        y = y + weight[:, k].float() * rows[_gather_index(seq_idx, pos, shift, width, n * width)]
    if bias is not None:
        y = y + bias.float()
    return _act(y, activation).to(x.dtype)


def _final_state(x: torch.Tensor, cache: torch.Tensor | None, cu_seqlens: torch.Tensor, width: int):
    n, dim = len(cu_seqlens) - 1, x.shape[-1]
    cache_rows = x.new_zeros(n * width, dim) if cache is None else cache.transpose(1, 2).reshape(-1, dim)
    rows = torch.cat([cache_rows.to(x.dtype), x])
    return rows[_final_state_index(cu_seqlens, width, n * width)].transpose(1, 2)  # [N, D, W]


class ShortConvolution(nn.Module):
    """Depthwise causal conv1d over time with a decoding cache.

    ``weight`` is ``[hidden_size, 1, kernel_size]`` like ``nn.Conv1d(groups=hidden_size)``'s.
    See the module docstring for the conv-state layout.
    """

    def __init__(
        self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected a positive int, got {kernel_size}")
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default initialisation (fan_in = kernel_size for a depthwise conv)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
            f"activation={self.activation!r}"
        )

    def _check_cache(self, cache: torch.Tensor, n: int, x: torch.Tensor) -> None:
        check_float("cache", cache)
        want = (n, self.hidden_size, self.kernel_size)
        if tuple(cache.shape) != want:
            raise ValueError(f"cache: expected shape [N, D, W] = {list(want)}, got {list(cache.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        cache: torch.Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, T, D]`` -> ``(y [B, T, D], final_state [N, D, W] or None)``.

        ``cache``: conv state before ``x`` (``[N, D, W]``), to continue sequences. ``cu_seqlens``
        (``[N + 1]`` int, needs ``B == 1``): boundaries of packed sequences; nothing crosses them.
        ``mask`` (``[B, T]``, 1 keeps / 0 zeroes a token's input, e.g. left padding) multiplies ``x``.
        """
        check_float("x", x)
        check_ndim("x", x, 3, "[B, T, D]")
        check_last_dim("x", x, self.hidden_size, "hidden_size")
        batch, seqlen, dim = x.shape
        if cu_seqlens is not None:
            check_integer("cu_seqlens", cu_seqlens)
            check_ndim("cu_seqlens", cu_seqlens, 1, "[N + 1]")
            if batch != 1:
                raise ValueError(f"x: expected batch size 1 with cu_seqlens (packed sequences), got {batch}")
            if len(cu_seqlens) < 2:
                raise ValueError(f"cu_seqlens: expected at least 2 entries, got {cu_seqlens.tolist()}")
        if mask is not None:
            check_tensor("mask", mask)
            if tuple(mask.shape) != (batch, seqlen):
                raise ValueError(f"mask: expected shape [B, T] = {[batch, seqlen]}, got {list(mask.shape)}")
        check_same_device(x=x, weight=self.weight, cache=cache, cu_seqlens=cu_seqlens, mask=mask)
        varlen = cu_seqlens is not None
        if varlen and torch.compiler.is_compiling():   # reading the values would be a host sync: a device assert
            torch._assert_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == seqlen) & (cu_seqlens.diff() >= 0).all(),
                                f"cu_seqlens: expected non-decreasing offsets from 0 to T={seqlen}")
        elif varlen and (
            cu_seqlens[0].item() != 0 or cu_seqlens[-1].item() != seqlen or (cu_seqlens.diff() < 0).any()
        ):
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to T={seqlen}, got {cu_seqlens.tolist()}"
            )
        n = len(cu_seqlens) - 1 if varlen else batch
        if cache is not None:
            self._check_cache(cache, n, x)

        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        if seqlen == 1 and cache is not None and not varlen:
            # one decoding step: shift the state and dot it with the weights (4 small ops; the general path
            # builds index tensors for the final state, ~15 launches, which dominated a decode step)
            y, new_cache = self._step(x.reshape(batch, dim), cache.to(x.dtype))  # state in x's dtype, as below
            return y.reshape(batch, 1, dim), (new_cache if output_final_state else None)
        packed = x.reshape(batch * seqlen, dim)
        triton_path = use_triton(x)
        if varlen:
            cu = cu_seqlens.to(torch.int64)
        elif output_final_state or not triton_path:
            cu = torch.arange(batch + 1, device=x.device) * seqlen
        else:
            cu = None  # equal lengths: the kernels derive each token's sequence from T, no index tensors
        weight = self.weight[:, 0, :]
        if triton_path:
            from ._conv_kernels import conv_triton

            y = conv_triton(packed, weight, self.bias, cache, cu if varlen else None, self.activation, seqlen)
        else:
            y = _conv_torch(packed, weight, self.bias, cache, cu, self.activation)
        final_state = _final_state(packed, cache, cu, self.kernel_size) if output_final_state else None
        return y.reshape(batch, seqlen, dim), final_state

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``x [B, 1, D]`` or ``[B, D]``, ``cache [B, D, W]`` -> ``(y, new_cache)``.

        ``y`` has x's shape; ``new_cache`` is ``cache`` shifted left by one with ``x`` appended (a new
        tensor; ``cache`` is not modified).
        """
        check_float("x", x)
        check_ndim("x", x, (2, 3), "[B, 1, D] or [B, D]")
        if x.ndim == 3 and x.shape[1] != 1:
            raise ValueError(f"x: expected one token [B, 1, D], got shape {tuple(x.shape)}")
        check_last_dim("x", x, self.hidden_size, "hidden_size")
        check_tensor("cache", cache)
        self._check_cache(cache, x.shape[0], x)
        check_same_device(x=x, cache=cache, weight=self.weight)
        y, new_cache = self._step(x.reshape(x.shape[0], self.hidden_size), cache)
        return y.reshape(x.shape), new_cache

    def _step(self, x_t: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t [B, D]`` and ``cache [B, D, W]`` (checked) -> ``(y [B, D] in x's dtype, new cache)``."""
        new_cache = torch.cat([cache[..., 1:], x_t[..., None].to(cache.dtype)], dim=-1)
        y = (new_cache.float() * self.weight[:, 0, :].float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return _act(y, self.activation).to(x_t.dtype), new_cache
