"""Context parallelism on torch.distributed: a sequence split across the ranks of a process group.

    ctx = cp_context(group, cu_seqlens=global_cu)          # once per batch layout
    o, ht = chunk_gla(q_local, k_local, v_local, g_local, cp_context=ctx, output_final_state=True)

Every rank passes its contiguous slice of the tokens (the same number on every rank) and gets its slice of the
output; the split works for every spec (runtime/cp.py says how). What the layers and models need beyond the ops,
each a collective every rank of the group calls in the same order (all_gather / all_reduce only, which gloo has):

* :func:`past`: the tokens before this rank's first one (the short convolution's and the token shift's halo),
  zero where they belong to an earlier packed sequence than this rank's first token; differentiable.
* :func:`gather_sequence`: the whole sequence from every rank's slice (attention's keys and values);
  differentiable, its backward sums each slice's gradient on the rank that owns it.
* :func:`from_next`: the next rank's first step (the target of this rank's last token).
* :func:`group_sum`: a sum over the group (token counts).

and, on the host with no communication, :func:`local_cu_seqlens` (this rank's pieces of the packed sequences)
and :func:`positions` (global positions, or positions within each packed sequence).
"""

from __future__ import annotations

import torch

from .runtime.cp import CPContext, local_pieces

__all__ = ["CPContext", "cp_context", "from_next", "gather_sequence", "group_sum", "halo", "local_cu_seqlens",
           "past", "positions"]


def cp_context(group=None, cu_seqlens=None) -> CPContext:
    """The split of a sequence (or of packed sequences) across ``group`` (default: the whole world).

    ``cu_seqlens``: the offsets [N + 1] of the *global* packed sequences (an integer tensor or a list; the
    ops then take B == 1 and each rank total / world tokens), or None: every batch row is one sequence of
    world * T_local tokens. Raises ``ValueError`` before any communication where the arguments cannot work."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                         "first (torchrun sets up its environment)")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    world = dist.get_world_size(group)
    cu = None
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
                raise ValueError(f"cu_seqlens: expected a 1-d integer tensor [N + 1], got {cu_seqlens.dtype} of "
                                 f"shape {list(cu_seqlens.shape)}")
            cu = tuple(int(c) for c in cu_seqlens.tolist())
        else:
            cu = tuple(int(c) for c in cu_seqlens)
        if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0, at least one sequence, got "
                             f"{list(cu) if len(cu) <= 12 else list(cu[:6]) + ['...'] + list(cu[-6:])}")
        if cu[-1] % world:
            raise ValueError(f"cu_seqlens: its {cu[-1]} tokens do not split evenly over the group's {world} ranks "
                             f"(the contiguous layout gives every rank total / world tokens)")
    return CPContext(group=group, rank=rank, world=world, cu_seqlens=cu, backend=str(dist.get_backend(group)))


class _Halo(torch.autograd.Function):
    """The ``width`` steps before this rank's first one (zeros before the sequence's start); the backward sends each
    step's gradient back to the rank that holds it."""

    @staticmethod
    def forward(ctx, x, width, group, rank, world):
        import torch.distributed as dist

        T = x.shape[1]
        w = min(width, T)   # wider than a rank's tokens: whole slices of the ranks before, which lie end to end
        tail = x[:, T - w:].contiguous()
        parts = [torch.empty_like(tail) for _ in range(world)]
        dist.all_gather(parts, tail, group=group)
        pad = x.new_zeros(x.shape[0], width, *x.shape[2:])
        ctx.width, ctx.group, ctx.rank, ctx.world, ctx.T = width, group, rank, world, T
        return torch.cat([pad, *parts[:rank]], 1)[:, -width:]

    @staticmethod
    def backward(ctx, dprev):
        import torch.distributed as dist

        parts = [torch.empty_like(dprev) for _ in range(ctx.world)]
        dist.all_gather(parts, dprev.contiguous(), group=ctx.group)
        T, width, r = ctx.T, ctx.width, ctx.rank
        w = min(width, T)
        dtail = dprev.new_zeros(dprev.shape[0], w, *dprev.shape[2:])
        for s in range(r + 1, ctx.world):
            # rank s's halo covers global steps [s T - width, s T); this rank's tail [(r + 1) T - w, (r + 1) T)
            first = (r + 1) * T - w - (s * T - width)
            lo, hi = max(0, -first), min(w, width - first)
            if lo >= hi:
                break
            dtail[:, lo:hi] += parts[s][:, first + lo:first + hi]
        dx = dprev.new_zeros(dprev.shape[0], T, *dprev.shape[2:])
        dx[:, T - w:] = dtail
        return dx, None, None, None, None


def halo(x: torch.Tensor, width: int, ctx: CPContext) -> torch.Tensor:
    """``x [B, T_local, ...]``'s ``width`` steps before this rank's first one, ``[B, width, ...]`` (zeros before
    step 0 of the sequence; from several ranks when ``width > T_local``): the context a causal convolution or token
    shift needs at this rank's start; differentiable. Packed sequences that start on this rank must not read it:
    :func:`past` masks by the context's packing."""
    if width <= 0:
        return x[:, :0]
    return _Halo.apply(x, width, ctx.group, ctx.rank, ctx.world)


def past(x: torch.Tensor, width: int, ctx: CPContext) -> torch.Tensor:
    """:func:`halo`, with the steps that belong to an earlier packed sequence than this rank's first token zeroed
    (all of them when a sequence starts at that token): what a causal convolution of width ``width + 1`` reads
    before this rank's tokens, as it reads zeros before a sequence's start."""
    prev = halo(x, width, ctx)
    if ctx.cu_seqlens is None or width <= 0:
        return prev
    T = x.shape[1]
    start = ctx.cu_seqlens[local_pieces(list(ctx.cu_seqlens), ctx.rank * T, (ctx.rank + 1) * T)[0].seq]
    steps = torch.arange(ctx.rank * T - width, ctx.rank * T, device=x.device)
    keep = (steps >= start).to(prev.dtype)
    return prev * keep.view(1, width, *([1] * (prev.ndim - 2)))


def local_cu_seqlens(ctx: CPContext, tokens_local: int, device=None) -> torch.Tensor | None:
    """This rank's pieces of the context's packed sequences, as offsets ``[n + 1]`` (int64) into its
    ``tokens_local`` tokens (the first piece may have begun, the last may go on, on another rank); None without
    packing."""
    if ctx.cu_seqlens is None:
        return None
    pieces = local_pieces(list(ctx.cu_seqlens), ctx.rank * tokens_local, (ctx.rank + 1) * tokens_local)
    return torch.tensor([pieces[0].start] + [p.end for p in pieces], dtype=torch.int64, device=device)


def positions(ctx: CPContext, batch: int, tokens_local: int, device=None) -> torch.Tensor:
    """``[B, T_local]`` positions of this rank's tokens: global (``rank * T_local + i``), or within each packed
    sequence of the context (``[1, T_local]``)."""
    steps = torch.arange(ctx.rank * tokens_local, (ctx.rank + 1) * tokens_local, device=device)
    if ctx.cu_seqlens is None:
        return steps[None].expand(batch, -1)
    cu = torch.tensor(ctx.cu_seqlens, dtype=torch.int64, device=device)
    return (steps - cu[torch.searchsorted(cu, steps, right=True) - 1])[None]


class _Gather(torch.autograd.Function):
    """Every rank's slice along dim 1, end to end; the backward sums the gradient of each slice over the ranks
    (all_reduce) and keeps this rank's."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.T = group, rank, x.shape[1]
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, dy):
        import torch.distributed as dist

        dy = dy.contiguous()
        dist.all_reduce(dy, group=ctx.group)
        return dy[:, ctx.rank * ctx.T:(ctx.rank + 1) * ctx.T], None, None, None


def gather_sequence(x: torch.Tensor, ctx: CPContext) -> torch.Tensor:
    """``x [B, T_local, ...]`` of every rank of the group, ``[B, world * T_local, ...]`` (the whole sequence);
    differentiable."""
    return _Gather.apply(x, ctx.group, ctx.rank, ctx.world)


@torch.no_grad()
def from_next(x: torch.Tensor, ctx: CPContext, fill) -> torch.Tensor:
    """The next rank's first step of ``x [B, T_local, ...]``, ``[B, 1, ...]`` (``fill`` on the last rank)."""
    import torch.distributed as dist

    head = x[:, :1].contiguous()
    parts = [torch.empty_like(head) for _ in range(ctx.world)]
    dist.all_gather(parts, head, group=ctx.group)
    return parts[ctx.rank + 1] if ctx.rank + 1 < ctx.world else torch.full_like(head, fill)


@torch.no_grad()
def group_sum(x: torch.Tensor, ctx: CPContext) -> torch.Tensor:
    """``x`` summed over the ranks of the group (a new tensor)."""
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x, group=ctx.group)
    return x
