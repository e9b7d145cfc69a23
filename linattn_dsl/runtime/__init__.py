"""What generated op modules call: spec loading, argument binding, backend dispatch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import reference
from .args import MAX_HEAD_DIM, Bound
from .args import bind as _bind
from ..compiler.registry import load as load_spec

__all__ = ["Gate", "Variant", "bind", "dispatch", "load_spec", "no_tokens", "on_triton"]


@dataclass(frozen=True)
class Gate:
    """The log-decay stage of a plan variant, as the generated module records it."""

    tag: str
    kind: str                 # scalar | vector
    inputs: list
    input_layouts: dict       # input -> token_feature | token | head | head_feature
    grads: list               # inputs with a generated derivative


@dataclass(frozen=True)
class Variant:
    switches: dict
    gate: Gate
    value_scale: bool = False   # value = x * s(token, head): fused into the stage kernels
    skip_scale: bool = False    # skip = x * d(token, head): fused into the output stage


def on_triton(bound: Bound) -> bool:
    """Whether a call runs on the generated Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    rather than on the generated PyTorch twin (CPU)."""
    return bound.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens) -> Bound:
    """Check an op call (args.bind: shapes, dtypes, switches, scale, state, packing), then what its backend
    cannot compute: float64 on the Triton kernels, which compute in fp32 at most."""
    bound = _bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens,
                  max_head_dim=MAX_HEAD_DIM)
    if bound.out_dtype == torch.float64 and on_triton(bound):
        name = bound.spec.value_input
        if bound.device.type == "cuda":
            raise ValueError(f"{name}: float64 inputs on {bound.device}: the Triton kernels compute in float32 at "
                             "most; cast the inputs to float32 (or run float64 on the CPU)")
        raise ValueError(f"{name}: float64 inputs under TRITON_INTERPRET=1 would run on the Triton kernels, which "
                         "compute in float32 at most; unset TRITON_INTERPRET to use the float64 CPU path")
    return bound


class _NoTokens(torch.autograd.Function):
    """A call with T = 0: an empty output, and the initial state (zeros without one) as the final state.
    No output reads an input, so every input's gradient is zero (empty for per-token inputs); the final
    state's gradient passes to the initial state."""

    @staticmethod
    def forward(ctx, o_shape, o_dtype, state_shape, state_dtype, h0, *tensors):
        ctx.h0_dtype = None if h0 is None else h0.dtype
        ctx.save_for_backward(*tensors)
        dev = tensors[0].device
        o = torch.empty(o_shape, dtype=o_dtype, device=dev)
        ht = torch.zeros(state_shape, dtype=state_dtype, device=dev) if h0 is None else h0.to(state_dtype, copy=True)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        tensors = ctx.saved_tensors
        dh0 = None
        if ctx.h0_dtype is not None and ctx.needs_input_grad[4]:
            dh0 = None if dht is None else dht.to(ctx.h0_dtype)
        grads = [torch.zeros_like(t) if need else None for t, need in zip(tensors, ctx.needs_input_grad[5:])]
        return (None, None, None, None, dh0, *grads)


def no_tokens(bound: Bound):
    """T = 0, the same on every backend: ``o`` [B, 0, H, V] in the value's dtype, and the final state (with
    ``output_final_state``) the initial state, or zeros, in float32 (float64 for float64 inputs)."""
    H, K, V = bound.size("H"), bound.size("K"), bound.size("V")
    tensors = [t for t in bound.tensors.values() if t is not None]
    state_dtype = torch.float64 if bound.out_dtype == torch.float64 else torch.float32
    o, ht = _NoTokens.apply((bound.sizes["B"], 0, H, V), bound.out_dtype, (bound.num_seqs, H, K, V), state_dtype,
                            bound.initial_state, *tensors)
    return o, (ht if bound.output_final_state else None)


def dispatch(mode: str, bound: Bound, mod):
    """Run a bound op call on the backend for its device: the generated Triton kernels on CUDA (or on
    CPU under TRITON_INTERPRET=1), the generated PyTorch twin on CPU. Each form's host module
    (additive.py, delta.py, general.py) launches its stages. A call without tokens (T = 0) is answered
    here, before any backend."""
    if bound.sizes["T"] == 0:
        return no_tokens(bound)
    form = getattr(mod, "FORM", None)
    variant = mod.VARIANTS[tuple(sorted(bound.switches.items()))]
    if form == "additive":
        from . import additive as host
    elif form == "delta":
        from . import delta as host
    elif form == "general":
        from . import general as host
    else:
        return reference.run_bound(bound)
    if on_triton(bound):
        return host.run_triton(mod, variant, bound, mode)
    from . import twin

    return twin.run_torch(mod, variant, bound, mode)
