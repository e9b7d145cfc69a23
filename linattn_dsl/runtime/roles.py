"""Evaluating a call's roles from the torch code ``linattn regen`` emitted (the generated module's ``ROLES``).

Each input carries the dims its spec declares; a role's inputs are viewed so their dims line up (``[B, T, head,
feature]`` order, size 1 where absent) and combined by torch broadcasting, then broadcast to the role's full
shape (``ROLE_SHAPES``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .args import Bound

ROLE_SHAPES = {  # the full shape of each role, in the spec's head-dim symbols
    "query": ("B", "T", "HQ", "K"), "key": ("B", "T", "HQ", "K"), "value": ("B", "T", "H", "V"),
    "beta": ("B", "T", "H"), "a": ("B", "T", "H", "K"), "b": ("B", "T", "H", "K"),
    "skip": ("B", "T", "H", "V"),
}
SCALE_SHAPE = ("B", "T", "H")
HEAD_INDEX = "h"


@dataclass(frozen=True)
class RoleCode:
    """One role of a call: ``fn`` over its ``inputs`` (None: the role is that one input), its value's dims."""

    inputs: tuple
    layout: tuple
    fn: object = None


@dataclass(frozen=True)
class RoleSet:
    """The roles of one switch setting and set of present optional inputs (the log-decay is the gate stage's),
    with the additive form's fused value scale (value = x * s) and skip scale (skip = x * d) where fused."""

    roles: dict
    value_scale: RoleCode | None
    skip_scale: RoleCode | None
    qk_l2norm: bool
    l2norm_inputs: tuple = ()   # with qk_l2norm: these inputs are normalised, not the query and key roles


def with_l2norm_inputs(bound: Bound, rs: RoleSet, norm) -> Bound:
    """``bound`` with the inputs that ``rs`` L2-normalises (``l2norm_inputs``, when its switch is on) replaced by
    ``norm(input)``, for the roles to read."""
    if not (rs.qk_l2norm and rs.l2norm_inputs):
        return bound
    return replace(bound, tensors={**bound.tensors, **{n: norm(bound.tensors[n]) for n in rs.l2norm_inputs}})


def role_set(mod, bound: Bound) -> RoleSet:
    return mod.ROLES[(bound.spec.key(bound.switches), tuple(n for n in bound.spec.optional if n in bound.present))]


def evaluate(bound: Bound, rs: RoleSet, exclude: tuple = (), dtype: torch.dtype | None = None) -> dict:
    """Every role of ``rs`` but those in ``exclude``, each at its full shape (ROLE_SHAPES)."""
    return {r: evaluate_code(bound, c, ROLE_SHAPES[r], dtype) for r, c in rs.roles.items() if r not in exclude}


def evaluate_code(bound: Bound, c: RoleCode, syms: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``c`` on the bound call's tensors, broadcast to the shape of ``syms`` (e.g. ("B", "T", "H"))."""
    spec = bound.spec
    target = [spec.head_dims.get(s, s) for s in syms]
    if c.fn is None and bound.tensors.get(c.inputs[0]) is not None and spec.dims(c.inputs[0]) == tuple(target):
        t = bound.tensors[c.inputs[0]]   # an input of the role's own shape (most roles): the tensor itself
        return t if dtype is None else t.to(dtype)
    vals = []
    for n in c.inputs:
        if n == HEAD_INDEX:
            t = torch.arange(bound.size("H"), device=bound.device, dtype=torch.float64)
            dims = (spec.head_dims["H"],)
        else:
            t, dims = bound.tensors[n], spec.dims(n)
            if t is None:   # an absent optional input is zero
                t = torch.zeros([bound.sizes[d] for d in dims], device=bound.device, dtype=torch.float32)
        if dtype is not None:
            t = t.to(dtype)
        vals.append(t.reshape([bound.sizes[d] if d in dims else 1 for d in c.layout]))
    full = tuple(bound.sizes[d] for d in target)
    val = vals[0] if c.fn is None else c.fn(*vals)
    if not isinstance(val, torch.Tensor):
        val = torch.tensor(float(val), device=bound.device, dtype=dtype or torch.float32)
    # the layout is a sub-sequence of the target dims: insert size-1 dims, then broadcast
    return val.reshape([bound.sizes[d] if d in c.layout else 1 for d in target]).expand(full)
