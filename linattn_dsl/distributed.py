"""Context parallelism on torch.distributed: a sequence split across the ranks of a process group.

    ctx = cp_context(group, cu_seqlens=global_cu)          # once per batch layout
    o, ht = chunk_gla(q_local, k_local, v_local, g_local, cp_context=ctx, output_final_state=True)

Every rank passes its contiguous slice of the tokens (the same number on every rank) and gets its slice of the
output; the split works for every spec (runtime/cp.py says how). The short convolution and the token shift
exchange their halo (the last tokens of the rank before) through :func:`halo`.
"""

from __future__ import annotations

import torch

from .runtime.cp import CPContext

__all__ = ["CPContext", "cp_context", "halo"]


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
    """The last ``width`` steps of the rank before (zeros on rank 0), and in the backward their gradient sent back."""

    @staticmethod
    def forward(ctx, x, width, group, rank, world):
        import torch.distributed as dist

        tail = x[:, -width:].contiguous()
        parts = [torch.empty_like(tail) for _ in range(world)]
        dist.all_gather(parts, tail, group=group)
        ctx.width, ctx.group, ctx.rank, ctx.world, ctx.T = width, group, rank, world, x.shape[1]
        return parts[rank - 1] if rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, dprev):
        import torch.distributed as dist

        parts = [torch.empty_like(dprev) for _ in range(ctx.world)]
        dist.all_gather(parts, dprev.contiguous(), group=ctx.group)
        dx = dprev.new_zeros(dprev.shape[0], ctx.T, *dprev.shape[2:])
        if ctx.rank + 1 < ctx.world:
            dx[:, -ctx.width:] = parts[ctx.rank + 1]
        return dx, None, None, None, None


def halo(x: torch.Tensor, width: int, ctx: CPContext) -> torch.Tensor:
    """``x [B, T_local, ...]``'s last ``width`` steps of the rank before this one (zeros on the first rank), the
    context a causal convolution or token shift needs at this rank's start; differentiable. Packed sequences
    that start at this rank's first token must not read it: the caller masks by the context's packing."""
    if width <= 0:
        return x[:, :0]
    if width > x.shape[1]:
        raise ValueError(f"x: a halo of {width} steps needs at least that many local tokens, got {x.shape[1]}")
    return _Halo.apply(x, width, ctx.group, ctx.rank, ctx.world)
