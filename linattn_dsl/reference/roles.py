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

ROLE_SHAPES = {  # the full shape of each role, in the spec's head-dim symbols
    "query": ("B", "T", "HQ", "K"), "key": ("B", "T", "HQ", "K"), "value": ("B", "T", "H", "V"),
    "beta": ("B", "T", "H"), "a": ("B", "T", "H", "K"), "b": ("B", "T", "H", "K"),
    "skip": ("B", "T", "H", "V"),
}
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


def evaluate(bound: Bound, dtype: torch.dtype | None = None, exclude: tuple = ()) -> dict[str, torch.Tensor]:
    """Every role of the bound call (but those in ``exclude``) as a tensor of its full shape (see
    ROLE_SHAPES), in ``dtype`` (default: each role's natural promotion of its inputs)."""
    spec = bound.spec
    roles = spec.resolve(bound.switches, bound.present)
    out = {}
    for role, e in roles.items():
        if role not in exclude:
            syms = DECAY_SHAPES[spec.decay.kind] if role == "log_decay" else ROLE_SHAPES[role]
            out[role] = evaluate_expr(bound, e, syms, dtype)
    return out


def evaluate_expr(bound: Bound, e: sp.Expr, syms: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``e`` on the bound call's tensors, broadcast to the shape of ``syms`` (e.g. ("B", "T", "H"))."""
    spec = bound.spec
    target = [spec.head_dims.get(s, s) for s in syms]
    if isinstance(e, sp.Symbol) and bound.tensors.get(e.name) is not None and spec.dims(e.name) == tuple(target):
        t = bound.tensors[e.name]   # an input of the role's own shape (most roles): the tensor itself
        return t if dtype is None else t.to(dtype)
    layout = spec.layout(e)
    names, fn = _compile(e)
    vals = []
    for n in names:
        if n == ex.HEAD_INDEX:
            t = torch.arange(bound.size("H"), device=bound.device, dtype=torch.float64)
            dims = (spec.head_dims["H"],)
        else:
            t, dims = bound.tensors[n], spec.dims(n)
            if t is None:   # an absent optional input is zero
                t = torch.zeros([bound.sizes[d] for d in dims], device=bound.device, dtype=torch.float32)
        if dtype is not None:
            t = t.to(dtype)
        vals.append(t.reshape([bound.sizes[d] if d in dims else 1 for d in layout]))
    full = tuple(bound.sizes[d] for d in target)
    val = fn(*vals)
    if not isinstance(val, torch.Tensor):
        val = torch.tensor(float(val), device=bound.device, dtype=dtype or torch.float32)
    # the layout is a sub-sequence of the target dims: insert size-1 dims, then broadcast
    return val.reshape([bound.sizes[d] if d in layout else 1 for d in target]).expand(full)
