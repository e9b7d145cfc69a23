"""Calls the spec language lowers onto the chunk math of another sequence (each decided at ``linattn regen`` and
recorded in the generated module's ``Signature``), so that every form, decay kind and backend has them:

* ``normalize`` (linear attention): the value input widened by a column of ones, whose state column is the keys'
  running sum z; the output divided by that column afterwards;
* ``substeps`` (Gated DeltaProduct): n steps per token, the call of the interleaved sequence of T * n steps;
* ``read="before"`` (RWKV6): a read step before each write step, the call of a sequence of 2 T steps, plus the
  current token's bonus.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .args import Bound, Signature

NORMALIZER_EPS = 1e-10   # added to the normalised output's denominator (FLA's chunk_linear_attn adds the same)
NORMALIZER_ALIGN = 8     # the widened value's columns, a multiple of this (16 bytes of bf16)


def normalized(bound: Bound, run):
    """A call with the normalised output (``Signature.normalize``): ``run`` on the call with the value input
    widened by a column of ones, whose state column is z (the keys' running sum under the decay) and whose output
    column is the denominator q^T z; then o = numerator / (denominator + NORMALIZER_EPS), in at least fp32. Zero
    columns after the ones round the wide value up to a multiple of 8 (``NORMALIZER_ALIGN``), so that every row
    of it, of the output and of the state starts 16-byte aligned and the kernels load and store whole vectors; the
    kernels round their value tiles up to a power of two anyway, so these columns cost no more tiles. The state
    stays [K, V + 1] outside (the initial state padded with zero columns, the final state cut back)."""
    spec = bound.spec
    name, V = spec.value_input, bound.size("V")
    v = bound.tensors[name]
    W = -(-(V + 1) // NORMALIZER_ALIGN) * NORMALIZER_ALIGN
    extra = torch.zeros(W - V, dtype=v.dtype, device=v.device)
    extra[0] = 1
    h0 = bound.initial_state
    if h0 is not None and W > V + 1:
        h0 = torch.nn.functional.pad(h0, (0, W - V - 1))
    wide = replace(bound, tensors={**bound.tensors, name: torch.cat([v, extra.expand(*v.shape[:-1], -1)], -1)},
                   sizes={**bound.sizes, spec.head_dims["V"]: W}, initial_state=h0)
    o, ht = run(wide)
    if ht is not None and W > V + 1:
        ht = ht[..., :V + 1].contiguous()
    at = torch.promote_types(o.dtype, torch.float32)
    return (o[..., :V].to(at) / (o[..., V:V + 1].to(at) + NORMALIZER_EPS)).to(o.dtype), ht


def _spread(x: torch.Tensor, n: int, slot: int | None) -> torch.Tensor:
    """``x [B, T, ...]`` over T * n steps: every token's value repeated n times (``slot`` None), or only at step
    ``slot`` of the token's n, zero at the others."""
    if slot is None:
        return x.repeat_interleave(n, dim=1)
    wide = x.new_zeros(x.shape[0], x.shape[1], n, *x.shape[2:])
    wide[:, :, slot] = x
    return wide.flatten(1, 2)


def _per_token(sig: Signature, tensors: dict) -> list[str]:
    """The per-token inputs ([B, T, ...]) passed as tensors (the binder names anything else that is wrong)."""
    return [k for k in sig.args if tuple(sig.args[k][:2]) == ("B", "T") and isinstance(tensors.get(k), torch.Tensor)
            and tensors[k].dim() >= 2]


def interleave(sig: Signature, tensors: dict, n, cu_seqlens):
    """A call of a sub-step spec (``Signature.substeps``: inputs with ``n`` rows per token) as the call of the
    interleaved sequence of T * n steps: the other per-token inputs repeated n times, except the log-decay input,
    which keeps its value on each token's first step and is zero on the others (the decay applies once per token);
    ``cu_seqlens`` times n. Returns (tensors, cu_seqlens); ``last_substeps`` picks the outputs."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{sig.substep_count}: expected a positive int, got {n!r}")
    per_token = _per_token(sig, tensors)
    ref = next((k for k in per_token if k not in sig.substeps), None)
    if ref is None:
        return tensors, cu_seqlens
    T = tensors[ref].shape[1]
    out = dict(tensors)
    for k in per_token:
        x = tensors[k]
        if k in sig.substeps:
            if x.shape[1] != T * n:
                raise ValueError(f"{k}: expected {sig.substep_count} = {n} rows per token, {T} * {n} = {T * n} "
                                 f"along dim 1 (as {ref} has {T}), got {x.shape[1]}")
        elif x.shape[1] == T:
            out[k] = _spread(x, n, 0 if k == sig.decay_input else None)
    if isinstance(cu_seqlens, torch.Tensor):
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
    for k in _per_token(sig, tensors):
        out[k] = _spread(tensors[k], 2, 1 if k in (sig.key_input, sig.decay_input) else None)
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens * 2
    return out, cu_seqlens


def read_before(bound: Bound, o: torch.Tensor) -> torch.Tensor:
    """The outputs of a ``split_reads`` call at its read steps, plus the current token's own write weighted by
    the bonus u (per value head and key channel): scale * sum_k(q_t u k_t) v_t."""
    sig = bound.spec
    o = o[:, 0::2]
    if sig.bonus is None:
        return o
    at = torch.promote_types(o.dtype, torch.float32)
    q, k = bound.tensors[sig.query][:, 0::2].to(at), bound.tensors[sig.key_input][:, 1::2].to(at)
    v, u = bound.tensors[sig.value_input][:, 0::2].to(at), bound.tensors[sig.bonus].to(at)
    u = u[:, 0::2] if u.dim() == 4 else u
    qk = (q * k).repeat_interleave(v.shape[2] // q.shape[2], dim=2)   # q/k heads to value heads
    return (o.to(at) + bound.scale * (qk * u).sum(-1, keepdim=True) * v).to(o.dtype)
