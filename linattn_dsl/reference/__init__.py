"""The oracle: any spec, run one token at a time. The ground truth of every equivalence test.

    S_t = D_t S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        o_t = S_t^T (scale * q_t)

with ``D_t = diag(exp(g_t))``; the delta rule is ``S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} +
beta_t k_t v_t^T``. States are ``[N, H, K, V]``; autograd works through it. Log-decays are exact, none is
clamped: a log-decay of -inf forgets the state (and has a zero gradient, see ``cut_where_forgotten``).
"""

from __future__ import annotations

import dataclasses

import sympy as sp
import torch

from ..compiler import expr as ex
from ..compiler import lowering
from ..compiler.spec import Recurrence
from ..runtime.args import Bound, Signature
from ..runtime.args import bind as _bind
from ..runtime.twin import l2_normalize, step
from . import roles as gates


def cut_where_forgotten(spec: Recurrence, bound, g: torch.Tensor, dtype) -> torch.Tensor:
    """The log-decay role ``g`` again, its inputs cut from autograd where it is -inf (the state forgotten).
    There its gradient is 0 (exp(g) g' -> 0), but autograd would form 0 * inf = NaN wherever the expression's
    own derivative is infinite too (Mamba2's A * softplus(dt) at A = -inf: d/d dt = A * sigmoid(dt))."""
    forgotten = torch.isneginf(g.detach())
    if not g.requires_grad or not forgotten.any():
        return g
    e = spec.resolve(bound.switches, bound.present).log_decay
    names, fn = gates._compile(e)
    # every input broadcast to the decay's layout, so that each position has its own copy to cut
    shape = gates.DECAY_SHAPES[spec.decay.kind]
    full = []
    for n in names:
        if n == ex.HEAD_INDEX:   # the head index is no input: nothing to cut
            full.append(gates.evaluate_expr(spec, bound, sp.Symbol(n), shape, dtype))
        else:
            x = gates.evaluate_expr(spec, bound, spec.symbols[n], shape, dtype)
            full.append(torch.where(forgotten, x.detach(), x))
    return fn(*full)


def run(spec: Recurrence, *inputs, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, dtype=torch.float32, **keywords):
    """Run ``spec`` step by step in ``dtype``; same arguments and results as the spec's ops:
    ``(o [B, T, H, V] in the value's dtype, final_state [N, H, K, V] in dtype or None)``."""
    if len(inputs) > len(spec.inputs):
        raise ValueError(f"{spec.name} takes {len(spec.inputs)} positional inputs, got {len(inputs)}")
    tensors = dict(zip(spec.inputs, inputs))
    switches = {k: keywords.pop(k) for k in list(keywords) if k in spec.switches}
    n = keywords.pop(spec.substeps.count, 1) if spec.substeps is not None else None
    for k in list(keywords):
        if k not in spec.args:
            raise ValueError(f"{k}: not an argument of {spec.name}")
        tensors[k] = keywords.pop(k)
    if n is not None:   # the interleaved sequence of sub-steps, as the ops lower it
        from ..runtime import interleave, last_substeps

        tensors, cu_seqlens = interleave(signature(spec), tensors, n, cu_seqlens)
        o, ht = run_bound(spec, bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens),
                          dtype)
        return last_substeps(o, n), ht
    if spec.read == "before":   # a read step before each write step, as the ops lower it
        from ..runtime import read_before, split_reads

        tensors, cu_seqlens = split_reads(signature(spec), tensors, cu_seqlens)
        bound = bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens)
        o, ht = run_bound(spec, bound, dtype)
        return read_before(bound, o), ht
    bound = bind(spec, tensors, switches, scale, initial_state, output_final_state, cu_seqlens)
    return run_bound(spec, bound, dtype)


def signature(spec: Recurrence) -> Signature:
    """The binder's view of ``spec`` (what a generated module carries as ``SIGNATURE``)."""
    cache = spec.__dict__.setdefault("_signature", [])
    if not cache:
        cache.append(Signature(**lowering.signature_fields(spec)))
    return cache[0]


def bind(spec: Recurrence, tensors: dict, switches: dict | None = None, scale=None, initial_state=None,
         output_final_state: bool = False, cu_seqlens=None) -> Bound:
    """Check an op call on ``spec`` as its ops do (``runtime.args.bind``)."""
    return _bind(signature(spec), tensors, switches, scale, initial_state, output_final_state, cu_seqlens)


def run_bound(spec: Recurrence, bound: Bound, dtype=torch.float32):
    """The oracle on a bound call of ``spec``."""
    if spec.resolve(bound.switches).normalize:   # the keys' running sum z as one more value column
        from ..runtime import normalized

        return normalized(bound, lambda wide: _run_bound(spec, wide, dtype))
    return _run_bound(spec, bound, dtype)


def _run_bound(spec: Recurrence, bound: Bound, dtype):
    if bound.sizes["T"] == 0:   # nothing to step through: the ops' answer (empty o, the initial state)
        from ..runtime import no_tokens

        return no_tokens(bound)
    resolved = spec.resolve(bound.switches)
    if resolved.l2norm_inputs:   # normalised as given to the op, before any role reads them
        tensors = {**bound.tensors, **{n: l2_normalize(bound.tensors[n].to(dtype)) for n in resolved.l2norm_inputs}}
        bound = dataclasses.replace(bound, tensors=tensors)
    roles = gates.evaluate(spec, bound, dtype)
    if "log_decay" in roles:
        roles["log_decay"] = cut_where_forgotten(spec, bound, roles["log_decay"], dtype)
    H, HQ = bound.size("H"), bound.size("HQ")
    B, T, K, V = bound.sizes["B"], bound.sizes["T"], bound.size("K"), bound.size("V")
    q, k = roles["query"], roles["key"]
    if resolved.qk_l2norm and not resolved.l2norm_inputs:
        q, k = l2_normalize(q), l2_normalize(k)
    q, k = q.repeat_interleave(H // HQ, dim=2), k.repeat_interleave(H // HQ, dim=2)  # head h uses group h // (H/HQ)
    q = q * bound.scale
    v = roles["value"]
    g = roles.get("log_decay")
    if g is not None:   # constant [H] and scalar [B, T, H] decays act on every key channel alike
        g = g.reshape(*g.shape, 1) if spec.decay.kind == "scalar" else g
        g = g.reshape(1, 1, H, 1) if spec.decay.kind == "constant" else g
        g = g.expand(B, T, H, K)
    beta, a, b = roles.get("beta"), roles.get("a"), roles.get("b")

    spans = [(i, 0, T) for i in range(B)] if bound.cu_seqlens is None else \
        [(0, s, e) for s, e in zip(bound.cu_seqlens.tolist(), bound.cu_seqlens.tolist()[1:])]
    outs, finals = [], []
    for n, (i, start, end) in enumerate(spans):
        S = bound.initial_state[n].to(dtype) if bound.initial_state is not None else \
            torch.zeros(H, K, V, dtype=dtype, device=bound.device)
        for t in range(start, end):
            at = (lambda x: None if x is None else x[i, t])  # noqa: E731
            S, o_t = step(S, q[i, t], k[i, t], v[i, t], at(g), at(beta), at(a), at(b), spec.transition.kind)
            outs.append(o_t)
        finals.append(S)
    o = torch.stack(outs).reshape(B, T, H, V)
    if "skip" in roles:
        o = o + roles["skip"]
    final = torch.stack(finals) if bound.output_final_state else None
    return o.to(bound.out_dtype), final
