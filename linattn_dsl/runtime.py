"""What generated op modules call: spec loading, argument binding, backend dispatch."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import reference
from .args import MAX_HEAD_DIM, Bound
from .args import bind as _bind
from .registry import load as load_spec

__all__ = ["Gate", "Variant", "bind", "dispatch", "load_spec"]


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


def bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens) -> Bound:
    return _bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens,
                 max_head_dim=MAX_HEAD_DIM)


def dispatch(mode: str, bound: Bound, mod):
    """Run a bound op call on the backend for its device: the generated Triton kernels on CUDA (or on
    CPU under TRITON_INTERPRET=1), the generated PyTorch twin on CPU. Each form's host module
    (additive.py, delta.py, general.py) launches its stages."""
    form = getattr(mod, "FORM", None)
    on_triton = bound.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    variant = mod.VARIANTS[tuple(sorted(bound.switches.items()))]
    if form == "additive":
        from . import additive as host
    elif form == "delta":
        from . import delta as host
    elif form == "general":
        from . import general as host
    else:
        return reference.run_bound(bound)
    if on_triton:
        return host.run_triton(mod, variant, bound, mode)
    from . import additive

    return additive.run_torch(mod, variant, bound, mode)
