"""Evaluating a spec's role expressions on tensors (the oracle's way, and the CPU fallback).

Each input carries the dims its spec declares; an expression's inputs are viewed so their dims line up
(``[B, T, head, feature]`` order, size 1 where absent) and combined by torch broadcasting.
"""

from __future__ import annotations

from functools import cache

import sympy as sp
import torch

from ..compiler import expr as ex
from ..compiler.spec import Recurrence
from ..runtime.args import Bound
from ..runtime.roles import ROLE_SHAPES, RoleCode, evaluate_code

DECAY_SHAPES = {"constant": ("H",), "scalar": ("B", "T", "H"), "vector": ("B", "T", "H", "K")}


@cache
def _compile(e: sp.Expr) -> tuple:
    names = sorted(s.name for s in e.free_symbols)
    src = ex.to_code(e, {n: n for n in names}, ex.TORCH_FUNCS)
    fn = eval(f"lambda {', '.join(names)}: {src}", {"torch": torch})  # noqa: S307 - our own printer's output
    return names, fn


def role_shape(spec: Recurrence, role: str, sizes: dict) -> tuple[int, ...]:
    hd = spec.head_dims
    syms = DECAY_SHAPES[spec.decay.kind] if role == "log_decay" else ROLE_SHAPES[role]
    return tuple(sizes[hd.get(s, s)] for s in syms)


def evaluate(spec: Recurrence, bound: Bound, dtype: torch.dtype | None = None,
             exclude: tuple = ()) -> dict[str, torch.Tensor]:
    """Every role of the bound call (but those in ``exclude``) as a tensor of its full shape (see
    ROLE_SHAPES), in ``dtype`` (default: each role's natural promotion of its inputs)."""
    roles = spec.resolve(bound.switches, bound.present)
    out = {}
    for role, e in roles.items():
        if role not in exclude:
            syms = DECAY_SHAPES[spec.decay.kind] if role == "log_decay" else ROLE_SHAPES[role]
            out[role] = evaluate_expr(spec, bound, e, syms, dtype)
    return out


def evaluate_expr(spec: Recurrence, bound: Bound, e: sp.Expr, syms: tuple,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``e`` on the bound call's tensors, broadcast to the shape of ``syms`` (e.g. ("B", "T", "H")): the
    expression compiled here from sympy, its inputs lined up and broadcast as the runtime does it."""
    if isinstance(e, sp.Symbol) and e.name != ex.HEAD_INDEX:
        code = RoleCode((e.name,), spec.layout(e))
    else:
        names, fn = _compile(e)
        code = RoleCode(tuple(names), spec.layout(e), fn)
    return evaluate_code(bound, code, syms, dtype)
