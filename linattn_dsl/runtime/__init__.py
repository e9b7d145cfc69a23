"""What generated op modules call: argument binding, backend dispatch, and the plain data they are made of.

Nothing here imports the compiler or sympy: a generated module carries everything its ops need (its
``SIGNATURE``, ``ROLES``, ``GATES``, ``VARIANTS`` and kernels), decided at ``linattn regen``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .args import MAX_HEAD_DIM, Bound, Signature
from .args import bind as _bind
from .roles import RoleCode, RoleSet
from .rewrites import interleave, last_substeps, normalized, read_before, split_reads
from .stages import FORMS

__all__ = ["Gate", "Module", "RoleCode", "RoleSet", "Signature", "Variant", "bind", "call", "dispatch", "interleave",
           "last_substeps", "no_tokens", "on_triton", "read_before", "run", "split_reads", "warn_if_stale"]


@dataclass(frozen=True)
class Gate:
    """The log-decay stage of a plan variant, as the generated module records it."""

    tag: str
    kind: str                 # scalar | vector
    inputs: list
    input_layouts: dict       # input -> token_feature | token | head | head_feature
    grads: list               # inputs with a generated derivative
    fwd: object = None        # the stage's kernels: gate_fwd_<tag>, gate_bwd_<tag> (Triton) and their torch twins
    bwd: object = None
    fwd_torch: object = None
    bwd_torch: object = None


@dataclass(frozen=True)
class Variant:
    switches: dict
    gate: Gate
    value_scale: bool = False   # value = x * s(token, head): fused into the stage kernels
    skip_scale: bool = False    # skip = x * d(token, head): fused into the output stage


class Module:
    """A generated module's namespace as the hosts read it (``mod.state_fwd``, ``mod.FORM``): a view of its
    globals (live: a patched kernel is seen), so a generated module works imported from any folder, registered
    in ``sys.modules`` or not."""

    def __init__(self, namespace: dict):
        self._namespace = namespace
        # the name of the module's custom ops (runtime.library): the spec's name, made unique in the process
        self.key = _claim(self, getattr(namespace.get("SIGNATURE"), "name", "op"))

    def __getattr__(self, name: str):
        try:
            return self._namespace[name]
        except KeyError:
            raise AttributeError(name) from None


_CLAIMED: set = set()                                                   # every key handed out
MODULES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()    # key -> Module


def _claim(mod: Module, name: str) -> str:
    """A key for a generated module's custom ops: the spec's name, with a suffix where a module of the same spec
    (another folder, a reload) took it first; a key is never handed out twice, as the ops' names stay registered
    with torch. Nothing is registered until a call is traced (runtime.library)."""
    base = re.sub(r"\W", "_", name) or "op"
    key, i = base, 1
    while key in _CLAIMED:
        i += 1
        key = f"{base}_{i}"
    _CLAIMED.add(key)
    MODULES[key] = mod
    return key


_WARNED: set = set()


def warn_if_stale(module: str, sha256: str, source: tuple) -> None:
    """Called by a generated module on import: where its spec's source is at hand (the shipped spec's module, or
    the user's spec file at the path it was generated from) and no longer matches what was generated, say so
    once. The module keeps working from what it embeds."""
    kind, where = source
    try:
        if kind == "module":
            found = importlib.util.find_spec(where)
            path = Path(found.origin) if found is not None and found.origin else None
        else:
            path = Path(where)
        if path is None or not path.is_file():
            return
        text = path.read_text()
    except (OSError, ImportError, ValueError):
        return
    if hashlib.sha256(text.encode()).hexdigest() != sha256 and module not in _WARNED:
        _WARNED.add(module)
        warnings.warn(f"{module}: generated from an earlier version of its spec ({path}); it runs what it was "
                      "generated from. Run `linattn regen` to bring it up to date.", stacklevel=3)


def on_triton(bound: Bound) -> bool:
    """Whether a call runs on the generated Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    rather than on the generated PyTorch twin (CPU)."""
    return bound.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, cp_context=None,
         steps_per_token=1, values=True) -> Bound:
    """Check an op call (args.bind: shapes, dtypes, switches, scale, state, packing, the split), then what its
    backend cannot compute: float64 on the Triton kernels, which compute in fp32 at most."""
    bound = _bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens,
                  max_head_dim=MAX_HEAD_DIM, cp_context=cp_context, steps_per_token=steps_per_token, values=values)
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


def call(mod: Module, mode: str, tensors: dict, switches: dict, scale, initial_state, output_final_state, cu_seqlens,
         cp_context=None, steps=None):
    """A generated op's body: its call run eagerly (:func:`run`). While torch.compile traces it, the call is
    one node of the graph instead, the module's custom op (runtime.library), except a split call
    (``cp_context``), which runs eagerly outside the graph (a graph break: collectives and an object argument).
    ``steps``: the sub-step count of a sub-step spec (``Signature.substeps``), else None."""
    if torch.compiler.is_compiling():
        from . import library   # imported while tracing only: it needs torch._dynamo, slow to import

        return library.traced(mod, mode, tensors, switches, scale, initial_state, output_final_state, cu_seqlens,
                               cp_context, steps)
    return run(mod, mode, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, cp_context, steps)


def run(mod: Module, mode: str, tensors: dict, switches: dict, scale, initial_state, output_final_state, cu_seqlens,
        cp_context=None, steps=None, backend=None, values=True):
    """An op call, eagerly: the spec's rewrites of the call (a sub-step spec's interleaved steps, a read-before
    spec's read and write steps: runtime.rewrites), binding (:func:`bind`) and ``backend`` (by default
    :func:`dispatch`; runtime.library passes one that only makes the outputs' shapes, with ``values=False``).
    Returns (o, final_state or None)."""
    sig = mod.SIGNATURE
    backend = backend or dispatch
    if sig.substeps:
        tensors, cu_seqlens = interleave(sig, tensors, steps, cu_seqlens)
        bound = bind(sig, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, cp_context,
                     steps, values)
        o, final_state = backend(mode, bound, mod)
        return last_substeps(o, steps), final_state
    if sig.read == "before":
        tensors, cu_seqlens = split_reads(sig, tensors, cu_seqlens)
        bound = bind(sig, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, cp_context, 2,
                     values)
        o, final_state = backend(mode, bound, mod)
        return read_before(bound, o), final_state
    bound = bind(sig, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, cp_context,
                 values=values)
    return backend(mode, bound, mod)


def dispatch(mode: str, bound: Bound, mod: Module):
    """Run a bound op call on the backend for its device: the generated Triton kernels on CUDA (or on CPU under
    TRITON_INTERPRET=1), the generated PyTorch twin on CPU. Each chunk form's host module (additive.py, delta.py,
    general.py) launches its stages. A call without tokens (T = 0) is answered here, before any backend. A split
    call (``cp_context``) runs as one wide local call and the scan over ranks (runtime.cp)."""
    if bound.spec.normalizes(bound.switches):
        return normalized(bound, lambda wide: _split(mode, wide, mod))
    return _split(mode, bound, mod)


def _split(mode: str, bound: Bound, mod: Module):
    if bound.cp is None:
        return _dispatch(mode, bound, mod)
    from . import cp

    ctx, factor = bound.cp
    terms = None
    if mod.FORM == "additive":   # a diagonal transition: its map and the outputs' dependence on it in closed form
        from . import twin

        variant = mod.VARIANTS[tuple(sorted(bound.switches.items()))]
        terms = lambda local, dtype: twin.decay_terms(mod, variant, local, dtype)   # noqa: E731
    return cp.run(bound, ctx, factor, lambda local: _dispatch(mode, replace(local, cp=None), mod), terms)


def _dispatch(mode: str, bound: Bound, mod: Module):
    if bound.sizes["T"] == 0:
        return no_tokens(bound)
    variant = mod.VARIANTS[tuple(sorted(bound.switches.items()))]
    if not on_triton(bound):
        from . import twin

        return twin.run_torch(mod, variant, bound, mode)
    host = importlib.import_module(f"{__name__}.{FORMS[mod.FORM].host}")
    return host.run_triton(mod, variant, bound, mode)

