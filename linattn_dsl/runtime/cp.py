"""Context parallelism: a sequence split across the ranks of a process group, for every spec and chunk form.

Every form updates the state column by column, ``S_t = A_t S_{t-1} + k_t w_t^T`` with ``A_t`` a K x K map that
reads no value (a decay, a delta or a general transition), so a rank's segment acts on the state it receives
as an affine map, ``S_out = M S_in + S_loc``, and its outputs are ``o_t = o_loc_t + Q_t S_in`` with
``Q_t = scale * q_t^T M_t``. The delta and general forms get all of them from one local call: the value input
widened by K zero columns and the first local sequence's initial state by the identity in those columns, so the
wide final state is ``[S_loc | M]`` and the wide output ``[o_loc | Q]``. The additive form's map is diagonal,
``M_t = diag(exp(G_t))`` with G the running sum of the log-decay, so its Q and M come in closed form from the
generated role and gate code and its local call keeps its width. The ranks all-gather their last sequence's
``[S_loc | M]`` (fp32), each runs the scan over ranks up to itself for the state it receives, and corrects its
first sequence's outputs and final state with a matrix product. The backward is the reverse scan of the state
gradient (one all-gather of each rank's incoming-state gradient). Nothing here knows a spec.

Layout: contiguous. Each rank passes its own T_local tokens (every rank the same T_local): without packing,
every batch row is one sequence of world * T_local tokens; with the context's ``cu_seqlens`` (the global
packing, B == 1), sequences may cross any number of rank boundaries. ``initial_state`` has one row per global
sequence; the final state (``output_final_state``) too, filled on the rank that holds the sequence's end and
zero on the others (``CPContext.final_rows`` names them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .args import Bound

# the chunk forms the column rule above holds for (a form added later states its own split rule or is refused)
SPLIT_FORMS = ("additive", "delta", "general")
WIDE_LIMIT = 256   # the widest value dim one wide call passes (the kernels' MAX_HEAD_DIM); wider goes in parts


@dataclass(frozen=True)
class CPContext:
    """A process group and the global packing of the sequences split across it (built by
    :func:`linattn_dsl.distributed.cp_context`)."""

    group: object
    rank: int
    world: int
    cu_seqlens: tuple | None    # global packed offsets in tokens, on the host; None: every batch row one sequence
    backend: str

    def num_seqs(self, batch: int) -> int:
        return batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def final_rows(self, tokens_local: int, batch: int = 1) -> list[int]:
        """The global sequences whose final state this rank returns (their last token is here)."""
        if self.cu_seqlens is None:
            return list(range(batch)) if self.rank == self.world - 1 else []
        lo, hi = self.rank * tokens_local, (self.rank + 1) * tokens_local
        return [i for i, end in enumerate(self.cu_seqlens[1:]) if lo < end <= hi]


@dataclass(frozen=True)
class _Piece:
    seq: int        # global sequence index
    start: int      # local step offsets [start, end)
    end: int
    cont: bool      # began on an earlier rank
    ends: bool      # ends on this rank


def local_pieces(cu: list[int], lo: int, hi: int) -> list[_Piece]:
    """The sequences of global offsets ``cu`` that overlap the steps [lo, hi), clipped to them."""
    out = []
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if b > lo and a < hi:
            out.append(_Piece(i, max(a, lo) - lo, min(b, hi) - lo, a < lo, b <= hi))
    return out


def _carry_kinds(cu: list[int] | None, world: int, steps: int) -> list[str]:
    """Per rank, what crosses its right boundary: "pass" (its only sequence came in and goes on: S_out = M S_in +
    S_loc), "start" (its last sequence began here and goes on: S_out = S_loc) or "none"."""
    if cu is None:
        return ["start"] + ["pass"] * (world - 2) + ["none"] if world > 1 else ["none"]
    kinds = []
    for r in range(world):
        p = local_pieces(cu, r * steps, (r + 1) * steps)
        last = p[-1]
        kinds.append("none" if last.ends else ("pass" if last.cont and len(p) == 1 else "start"))
    return kinds


class _Combine(torch.autograd.Function):
    """The scan over ranks: this rank's wide final state of its last sequence ``[R, H, K, V + K]`` (fp32) in, the
    state its first sequence receives ``[R, H, K, V]`` out. Backward: the reverse scan of the state gradient."""

    @staticmethod
    def forward(ctx, wide, kinds, rank, group, V):
        import torch.distributed as dist

        parts = [torch.empty_like(wide) for _ in kinds]
        dist.all_gather(parts, wide.contiguous(), group=group)
        carries = []   # carries[s]: what rank s passes on
        carry = torch.zeros_like(wide[..., :V])
        for s, kind in enumerate(kinds[:rank]):
            S, M = parts[s][..., :V], parts[s][..., V:]
            carry = M @ carry + S if kind == "pass" else (S if kind == "start" else torch.zeros_like(carry))
            carries.append(carry)
        ctx.save_for_backward(*[p[..., V:] for p in parts], *carries)
        ctx.kinds, ctx.rank, ctx.group, ctx.V = kinds, rank, group, V
        return carry.clone()

    @staticmethod
    def backward(ctx, dh):
        import torch.distributed as dist

        W, r = len(ctx.kinds), ctx.rank
        saved = ctx.saved_tensors   # once: activation checkpointing unpacks each saved tensor only once
        Ms, carries = saved[:W], saved[W:]
        dhs = [torch.empty_like(dh) for _ in range(W)]
        dist.all_gather(dhs, dh.contiguous(), group=ctx.group)
        # d carry_s (what rank s passes on) = dh_{s+1} + (rank s+1 passes: M_{s+1}^T d carry_{s+1})
        d = torch.zeros_like(dh)
        for s in range(W - 2, r - 1, -1):
            nxt = ctx.kinds[s + 1]
            d = dhs[s + 1] + (Ms[s + 1].transpose(-1, -2) @ d if nxt == "pass" else 0)
        kind = ctx.kinds[r]
        dS = d if kind in ("pass", "start") else torch.zeros_like(d)
        dM = d @ carries[r - 1].transpose(-1, -2) if kind == "pass" and r > 0 else torch.zeros_like(Ms[r])
        return torch.cat([dS, dM], -1), None, None, None, None


def check_type(ctx) -> None:
    """``cp_context`` is a context (args.bind asks first: the initial state's rows depend on it)."""
    if not isinstance(ctx, CPContext):
        raise ValueError(f"cp_context: expected a context from linattn_dsl.distributed.cp_context(group, "
                         f"cu_seqlens), got {type(ctx).__name__}")


def check(bound: Bound, ctx: CPContext, cu_seqlens, steps_per_token: int = 1) -> int:
    """Everything a split call needs agreed before any communication; returns the steps per token (the op's call
    of a sub-step or read-before spec carries several steps per token: the generated op says how many)."""
    check_type(ctx)
    if bound.spec.form not in SPLIT_FORMS:
        raise ValueError(f"cp_context: the {bound.spec.form} form of {bound.spec.name} has no split rule "
                         f"(forms with one: {', '.join(SPLIT_FORMS)})")
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: with cp_context, pass the global packing to cp_context(group, cu_seqlens) "
                         "and leave the op's cu_seqlens None")
    dev = bound.device
    if ctx.backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"cp_context: its group's backend is nccl, which needs CUDA tensors; the inputs are on "
                         f"{dev}")
    if ctx.cu_seqlens is None:
        return steps_per_token
    if bound.sizes["B"] != 1:
        raise ValueError(f"cp_context: packed sequences (its cu_seqlens) need batch size B == 1, got "
                         f"B = {bound.sizes['B']}")
    T, total = bound.sizes["T"], ctx.cu_seqlens[-1]
    if T * ctx.world != total * steps_per_token:
        got = T if steps_per_token == 1 else f"{T / steps_per_token:g} ({T} steps of {steps_per_token} per token)"
        per = total // ctx.world if total % ctx.world == 0 else total / ctx.world
        raise ValueError(f"cp_context: its cu_seqlens pack {total} tokens over its {ctx.world} ranks, so the inputs "
                         f"on each rank expect T = total / world = {per} tokens; got T = {got}")
    return steps_per_token


def run(bound: Bound, ctx: CPContext, factor: int, call, terms=None):
    """The split call: ``call(bound)`` runs one ordinary (local) call of the op's backend. ``terms(bound, dtype)``
    (the additive form, whose map is diagonal): the query per value head times the scale and the per-step
    log-decay, from which the map and the outputs' dependence on the incoming state follow in closed form, so the
    local call keeps its own width; without it, the local call is widened (the module's docstring)."""
    V, K = bound.size("V"), bound.size("K")
    H, B, T = bound.size("H"), bound.sizes["B"], bound.sizes["T"]
    if ctx.cu_seqlens is None:
        pieces = [_Piece(b, 0, T, ctx.rank > 0, ctx.rank == ctx.world - 1) for b in range(B)]
        cu_g, R = None, B
    else:
        cu_g = [c * factor for c in ctx.cu_seqlens]
        pieces, R = local_pieces(cu_g, ctx.rank * T, (ctx.rank + 1) * T), 1
    kinds = _carry_kinds(cu_g, ctx.world, T)
    f32 = torch.float32 if bound.out_dtype != torch.float64 else torch.float64
    local_cu = None
    if ctx.cu_seqlens is not None:
        local_cu = torch.tensor([pieces[0].start] + [p.end for p in pieces], dtype=torch.int64, device=bound.device)
    first = pieces[0]
    given = _initial_states(bound, pieces, f32)
    if terms is None:
        o, S, Q, M = _wide(bound, pieces, given, local_cu, call, ctx.cu_seqlens is None, f32)
    else:
        o, S, Q, M = _diagonal(bound, first, given, local_cu, call, terms, f32)
    # the scan: the state this rank's first sequence (each row's, without packing) receives
    last = S[-R:] if ctx.cu_seqlens is not None else S
    h_in = _Combine.apply(torch.cat([last, M], -1), kinds, ctx.rank, ctx.group, V)
    head = (o[:, first.start:first.end].to(f32) + torch.einsum("bthk,bhkv->bthv", Q, h_in)).to(o.dtype)
    out = torch.cat([head, o[:, first.end:]], 1) if first.end < T else head
    final = None
    if bound.output_final_state:
        fixed = S[:R] + M @ h_in           # the first sequence's, with its incoming state
        S = torch.cat([fixed, S[R:]]) if len(pieces) > R else fixed
        final = torch.zeros(ctx.num_seqs(B), H, K, V, dtype=S.dtype, device=bound.device)
        ending = [i for i, p in enumerate(pieces) if p.ends]
        if ending:
            idx = torch.tensor([pieces[i].seq for i in ending], device=bound.device)
            final = final.index_copy(0, idx, S[ending])
    return out, final


def _initial_states(bound: Bound, pieces: list, dtype) -> torch.Tensor:
    """``[pieces, H, K, V]``: each local sequence's given initial state, zeros for one that came in (the scan
    supplies its state) or without one."""
    H, K, V, h0 = bound.size("H"), bound.size("K"), bound.size("V"), bound.initial_state
    zeros = torch.zeros(H, K, V, dtype=dtype, device=bound.device)
    return torch.stack([h0[p.seq].to(dtype) if h0 is not None and not p.cont else zeros for p in pieces])


def _wide(bound: Bound, pieces: list, given, cu, call, per_row: bool, f32):
    """Any form: one local call with the value widened by K zero columns and the identity in those columns of the
    first sequence's initial state (every row's without packing). Returns (o [B, T, H, V], the local final states
    [pieces, H, K, V], Q [B, T_first, H, K] and the first sequence's map M [R, H, K, K], in f32)."""
    V, K, H = bound.size("V"), bound.size("K"), bound.size("H")
    eye = torch.eye(K, dtype=f32, device=bound.device).expand(H, K, K)
    cols = [eye if i == 0 or per_row else torch.zeros_like(eye) for i in range(len(pieces))]
    init = torch.cat([given, torch.stack(cols)], -1)
    name = bound.spec.value_input
    v = bound.tensors[name]
    o, ht = _wide_call(call, bound, name, torch.cat([v, v.new_zeros(*v.shape[:-1], K)], -1), init, cu, V + K)
    first = pieces[0]
    R = len(pieces) if per_row else 1
    return (o[..., :V], ht[..., :V].to(f32), o[:, first.start:first.end, :, V:].to(f32),
            ht[:R, :, :, V:].to(f32))


def _diagonal(bound: Bound, first: _Piece, given, cu, call, terms, f32):
    """The additive form: the plain local call, and from the log-decay's running sum G over the first sequence,
    Q_t = scale q_t * exp(G_t) and M = diag(exp(G_last)). Returns what :func:`_wide` returns."""
    o, ht = call(replace(bound, initial_state=given, output_final_state=True, cu_seqlens=cu))
    q, g = terms(bound, f32)
    G = g[:, first.start:first.end].cumsum(1)                              # [B or 1, T_first, H, W], <= 0
    K = bound.size("K")
    M = torch.diag_embed(torch.exp(G[:, -1]).expand(*G.shape[:1], G.shape[2], K))
    return o, ht.to(f32), q[:, first.start:first.end] * torch.exp(G), M


def _wide_call(call, bound: Bound, name: str, wide_v, init, cu, width: int):
    """One local call with the widened value and state; in parts of at most WIDE_LIMIT value columns."""
    spec = bound.spec
    cuts = list(range(0, width, WIDE_LIMIT)) + [width]
    os_, hs = [], []
    for a, b in zip(cuts, cuts[1:]):
        part = replace(bound, tensors={**bound.tensors, name: wide_v[..., a:b].contiguous()},
                       sizes={**bound.sizes, spec.head_dims["V"]: b - a}, initial_state=init[..., a:b].contiguous(),
                       output_final_state=True, cu_seqlens=cu)
        o, h = call(part)
        os_.append(o)
        hs.append(h)
    return (os_[0], hs[0]) if len(os_) == 1 else (torch.cat(os_, -1), torch.cat(hs, -1))
