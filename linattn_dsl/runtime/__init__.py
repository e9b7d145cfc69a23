"""What generated op modules call: argument binding, backend dispatch, and the plain data they are made of.

Nothing here imports the compiler or sympy: a generated module carries everything its ops need (its
``SIGNATURE``, ``ROLES``, ``GATES``, ``VARIANTS`` and kernels), decided at ``linattn regen``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .args import MAX_HEAD_DIM, Bound, Signature
from .args import bind as _bind
from .roles import RoleCode, RoleSet
from .stages import FORMS

__all__ = ["Gate", "Module", "RoleCode", "RoleSet", "Signature", "Variant", "bind", "dispatch", "interleave",
           "last_substeps", "no_tokens", "on_triton", "read_before", "split_reads", "warn_if_stale"]


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

    def __getattr__(self, name: str):
        try:
            return self._namespace[name]
        except KeyError:
            raise AttributeError(name) from None


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


def interleave(sig: Signature, tensors: dict, n, cu_seqlens):
    """A call of a sub-step spec (``Signature.substeps``: inputs with ``n`` rows per token) as the call of the
    interleaved sequence of T * n steps: the other per-token inputs repeated n times, except the log-decay input,
    which keeps its value on each token's first step and is zero on the others (the decay applies once per token);
    ``cu_seqlens`` times n. Returns (tensors, cu_seqlens); ``last_substeps`` picks the outputs."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{sig.substep_count}: expected a positive int, got {n!r}")
    per_token = [k for k in sig.required if tuple(sig.args[k][:2]) == ("B", "T")]
    ref = next(k for k in per_token if k not in sig.substeps)
    if not isinstance(tensors.get(ref), torch.Tensor) or tensors[ref].dim() < 2:
        return tensors, cu_seqlens   # the binder names what is wrong
    T = tensors[ref].shape[1]
    out = dict(tensors)
    for k in per_token:
        x = tensors[k]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            continue
        if k in sig.substeps:
            if x.shape[1] != T * n:
                raise ValueError(f"{k}: expected {sig.substep_count} = {n} rows per token, {T} * {n} = {T * n} "
                                 f"along dim 1 (as {ref} has {T}), got {x.shape[1]}")
        elif x.shape[1] == T:
            if k == sig.decay_input:
                wide = x.new_zeros(x.shape[0], T, n, *x.shape[2:])
                wide[:, :, 0] = x
                out[k] = wide.flatten(1, 2)
            else:
                out[k] = x.repeat_interleave(n, dim=1)
    if n > 1 and isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens * n
    return out, cu_seqlens


def last_substeps(o: torch.Tensor, n: int) -> torch.Tensor:
    """The outputs of an interleaved call at each token's last sub-step."""
    return o[:, n - 1::n]


def split_reads(sig: Signature, tensors: dict, cu_seqlens):
    """A read-before spec's call (``Signature.read == "before"``) as the call of a sequence of 2 T steps: step 2t
    reads (no decay, no write: its output is q_t^T S_{t-1}), step 2t + 1 writes (token t's decay and k v^T).
    The key and log-decay inputs are zero on read steps, every other per-token input repeated; ``cu_seqlens``
    doubled. Returns (tensors, cu_seqlens); ``read_before`` takes the outputs."""
    out = dict(tensors)
    for k in sig.required + sig.optional:
        x = tensors.get(k)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(sig.args[k][:2]) != ("B", "T"):
            continue
        if k in (sig.key_input, sig.decay_input):
            wide = x.new_zeros(x.shape[0], x.shape[1], 2, *x.shape[2:])
            wide[:, :, 1] = x
            out[k] = wide.flatten(1, 2)
        else:
            out[k] = x.repeat_interleave(2, dim=1)
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens * 2
    return out, cu_seqlens


def read_before(bound: Bound, o: torch.Tensor) -> torch.Tensor:
    """The outputs of a ``split_reads`` call at its read steps, plus the bonus of the current token's own write,
    scale * (q_t . bonus . k_t) v_t (per value head; grouped q/k heads repeated)."""
    sig = bound.spec
    o = o[:, 0::2]
    if sig.bonus is None:
        return o
    q, k = bound.tensors[sig.query][:, 0::2], bound.tensors[sig.key_input][:, 1::2]
    v = bound.tensors[sig.value_input][:, 0::2]
    u = bound.tensors[sig.bonus]
    u = u[:, 0::2] if u.dim() == 4 else u
    groups = v.shape[2] // q.shape[2]
    at = torch.promote_types(o.dtype, torch.float32)
    w = (q.to(at) * k.to(at) * u.to(at) if u.dim() == 4 or groups == 1 else None)
    if w is None:   # a per-value-head bonus with grouped q/k heads
        w = (q.to(at) * k.to(at)).repeat_interleave(groups, dim=2) * u.to(at)
    elif groups > 1:
        w = w.repeat_interleave(groups, dim=2)
    return (o.to(at) + bound.scale * w.sum(-1, keepdim=True) * v.to(at)).to(o.dtype)


NORMALIZER_EPS = 1e-10   # added to the normalised output's denominator (FLA's chunk_linear_attn adds the same)


def normalized(bound: Bound, run):
    """A call with the normalised output (``Signature.normalize``): ``run`` on the call with the value input
    widened by a column of ones, whose state column is z (the keys' running sum under the decay) and whose output
    column is the denominator q^T z; then o = numerator / (denominator + NORMALIZER_EPS), in at least fp32."""
    spec = bound.spec
    name, V = spec.value_input, bound.size("V")
    v = bound.tensors[name]
    wide = replace(bound, tensors={**bound.tensors, name: torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)},
                   sizes={**bound.sizes, spec.head_dims["V"]: V + 1})
    o, ht = run(wide)
    at = torch.promote_types(o.dtype, torch.float32)
    return (o[..., :V].to(at) / (o[..., V:].to(at) + NORMALIZER_EPS)).to(o.dtype), ht


def dispatch(mode: str, bound: Bound, mod: Module):
    """Run a bound op call on the backend for its device: the generated Triton kernels on CUDA (or on CPU under
    TRITON_INTERPRET=1), the generated PyTorch twin on CPU. Each chunk form's host module (additive.py, delta.py,
    general.py) launches its stages. A call without tokens (T = 0) is answered here, before any backend."""
    if bound.spec.normalizes(bound.switches):
        return normalized(bound, lambda wide: _dispatch(mode, wide, mod))
    return _dispatch(mode, bound, mod)


def _dispatch(mode: str, bound: Bound, mod: Module):
    if bound.sizes["T"] == 0:
        return no_tokens(bound)
    variant = mod.VARIANTS[tuple(sorted(bound.switches.items()))]
    if not on_triton(bound):
        from . import twin

        return twin.run_torch(mod, variant, bound, mode)
    host = importlib.import_module(f"{__name__}.{FORMS[mod.FORM].host}")
    return host.run_triton(mod, variant, bound, mode)
