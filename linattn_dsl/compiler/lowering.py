"""The lowering: from a spec to the plan of chunk stages and the hooks the stage templates inline.

For each switch variant of a spec the plan fixes
* which chunk form applies (docs/chunk_math.md: additive for transition 'none'),
* the gate stage: the log-decay expression printed as Triton and as torch code, with its symbolic
  derivative with respect to every raw input (sympy), and how each input is loaded at the decay's layout,
* which roles are plain inputs and which are expressions evaluated before the core stages.
Absent optional inputs are passed as zeros, so variants differ only by switch values.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import sympy as sp

from . import expr as ex
from .spec import Recurrence

FORMS = {"none": "additive", "delta": "delta", "general": "general"}

# Every backend clamps a per-step log-decay below this to it (a NaN stays NaN): E[-30] ~ 9e-14 forgets the
# state as fully as -inf does at fp32 precision, while keeping the chunk's cumulative sums small enough that
# the differences G_i - G_j of positions after a reset keep their precision (a -1e4 step would cost
# ulp(1e4) ~ 1e-3 in every later decay factor of its chunk, -inf a NaN). The gradient below the floor is 0.
LOG_DECAY_FLOOR = -30.0


@dataclass
class GatePlan:
    """The log-decay stage of one variant: ``G = cumsum(g)`` forward, ``d inputs`` backward."""

    tag: str
    kind: str                       # constant | scalar | vector
    expr: sp.Expr
    inputs: list[str]               # raw inputs of the expression (spec order)
    input_layouts: dict[str, str]   # name -> 'token_feature' | 'token' | 'head' | 'head_feature'
    loads_vector: list[str] = field(default_factory=list)
    loads_scalar: list[str] = field(default_factory=list)
    expr_code: str = ""
    torch_code: str = ""
    grads: list[tuple[str, str]] = field(default_factory=list)
    torch_grads: list[tuple[str, str]] = field(default_factory=list)   # the same derivatives as torch code
    floor: float = LOG_DECAY_FLOOR     # see LOG_DECAY_FLOOR

    @property
    def expr_text(self) -> str:
        return str(self.expr)

    @property
    def grad_inputs(self) -> list[str]:
        return [n for n, _ in self.grads]


@dataclass
class Variant:
    switches: dict
    gate: GatePlan
    plain_roles: dict               # role -> input name, for roles that are a bare input
    value_scale: sp.Expr | None = None   # value = X * value_scale, value_scale per (token, head): fused
    skip_scale: sp.Expr | None = None    # skip = X * skip_scale (Mamba2's D x): fused into the output stage


def skip_scale(spec: Recurrence, roles) -> sp.Expr | None:
    """``d`` when the skip term is the value input times a per-(token, head) factor and the kernels
    see that input (value = X or value = X * s)."""
    if roles.skip is None or (roles.value != spec.symbols[spec.value_input] and value_scale(spec, roles.value) is None):
        return None
    return value_scale(spec, roles.skip)


def value_scale(spec: Recurrence, value: sp.Expr) -> sp.Expr | None:
    """``s`` when the value is the value input times a per-(token, head) factor ``s`` (Mamba2's
    ``x * softplus(dt + dt_bias)``): the stage kernels then scale v as they load it, and nothing of
    the value's size is materialised."""
    x = spec.symbols[spec.value_input]
    if value == x:
        return None
    rest = sp.simplify(value / x)
    if x in rest.free_symbols or not rest.free_symbols:
        return None
    feature = {d for d in spec.layout(rest) if spec.dim_roles[d] == "feature"}
    return None if feature else rest


@dataclass
class Plan:
    spec: Recurrence
    form: str
    variants: list[Variant]
    gates: list[GatePlan]

    def variant(self, switches: dict) -> Variant:
        for v in self.variants:
            if v.switches == switches:
                return v
        raise KeyError(switches)


def _layout_kind(spec: Recurrence, name: str) -> str:
    roles = [spec.dim_roles[d] for d in spec.dims(name)]
    return {("batch", "time", "head", "feature"): "token_feature", ("batch", "time", "head"): "token",
            ("head",): "head", ("head", "feature"): "head_feature"}[tuple(roles)]


_LOADS_VECTOR = {
    "token_feature": "x_{n} = tl.load({n}_ptr + (rows[:, None] * H + i_h) * K + cols[None, :], mask=mask, "
                     "other=0.0).to(tl.float32)",
    "token": "x_{n} = tl.load({n}_ptr + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)[:, None]",
    "head": "x_{n} = tl.load({n}_ptr + i_h).to(tl.float32)",
    "head_feature": "x_{n} = tl.load({n}_ptr + i_h * K + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]",
}
_LOADS_SCALAR = {
    "token": "x_{n} = tl.load({n}_ptr + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)",
    "head": "x_{n} = tl.load({n}_ptr + i_h).to(tl.float32)",
}


def _gate_plan(spec: Recurrence, e: sp.Expr, tag: str) -> GatePlan:
    kind = "vector" if spec.decay.kind == "vector" else "scalar"   # constant and none: per-head scalars
    inputs = [n for n in spec.args if spec.symbols[n] in e.free_symbols]
    layouts = {n: _layout_kind(spec, n) for n in inputs}
    names = {n: f"x_{n}" for n in inputs}
    names[ex.HEAD_INDEX] = "h"
    g = GatePlan(tag=tag, kind=kind, expr=e, inputs=inputs, input_layouts=layouts)
    g.expr_code = ex.to_code(e, names, ex.TRITON_FUNCS)
    g.torch_code = ex.to_code(e, {**{n: f"x_{n}" for n in inputs}, ex.HEAD_INDEX: "h"}, ex.TORCH_FUNCS)
    g.loads_vector = [_LOADS_VECTOR[layouts[n]].format(n=n) for n in inputs] if kind == "vector" else []
    g.loads_scalar = [_LOADS_SCALAR[layouts[n]].format(n=n) for n in inputs] if kind != "vector" else []
    for n in inputs:
        d = sp.diff(e, spec.symbols[n])
        g.grads.append((n, ex.to_code(d, names, ex.TRITON_FUNCS)))
        g.torch_grads.append((n, ex.to_code(d, names, ex.TORCH_FUNCS)))
    return g


def lower(spec: Recurrence) -> Plan:
    """The chunk plan of every switch variant of ``spec``."""
    form = FORMS[spec.transition.kind]
    gates: dict[str, GatePlan] = {}
    variants = []
    for sw in (spec.variants() if spec.switches else [{}]):
        roles = spec.resolve(sw)
        log_decay = roles.log_decay if roles.log_decay is not None else sp.S.Zero   # no decay: g = 0
        key = sp.srepr(log_decay)
        if key not in gates:
            gates[key] = _gate_plan(spec, log_decay, f"v{len(gates)}")
        gate = gates[key]
        plain = {r: e.name for r, e in roles.items() if e.is_Symbol and r != "log_decay"}
        variants.append(Variant(switches=dict(sw), gate=gate, plain_roles=plain,
                                value_scale=value_scale(spec, roles.value), skip_scale=skip_scale(spec, roles)))
    return Plan(spec=spec, form=form, variants=variants, gates=list(gates.values()))


# ---- what the runtime needs of a spec, as plain data and torch code (emitted into the generated module) ----
def _present_sets(spec: Recurrence) -> list[tuple[str, ...]]:
    names = list(spec.optional)
    bits = itertools.product([False, True], repeat=len(names))
    return [tuple(n for n, on in zip(names, b) if on) for b in bits]


def signature_fields(spec: Recurrence) -> dict:
    """The spec as the binder checks calls against it (``runtime.args.Signature``'s fields): names, dims, head
    dims, switches, defaults, which inputs each switch setting reads, and the sign contracts per switch setting
    and set of present optional inputs."""
    variants = list(spec.variants()) if spec.switches else [{}]
    return dict(
        name=spec.name, args={n: spec.dims(n) for n in spec.args}, required=tuple(spec.inputs),
        switches=dict(spec.switches), head_dims=dict(spec.head_dims), query=spec.query,
        value_input=spec.value_input, scale=spec.scale, decay=spec.decay.kind, form=FORMS[spec.transition.kind],
        normalize=spec.normalize,
        substeps=tuple(spec.substeps.inputs) if spec.substeps else (),
        substep_count=spec.substeps.count if spec.substeps else None,
        decay_input=_bare_decay_input(spec) if spec.substeps or spec.read == "before" else None,
        read=spec.read, bonus=spec.bonus,
        key_input=str(spec.resolve(next(iter(variants))).key) if spec.read == "before" else None,
        uses={_switch_key(sw): tuple(n for n in spec.args if n in spec.uses(sw)) for sw in variants},
        signs={(_switch_key(sw), p): spec.sign_contracts(sw, p) for sw in variants for p in _present_sets(spec)},
    )


def _bare_decay_input(spec: Recurrence) -> str | None:
    """The per-token input that is the log-decay under every switch setting (a sub-step spec's, checked)."""
    names = {spec.resolve(sw).log_decay for sw in (spec.variants() if spec.switches else [{}])} - {None}
    return next(iter(names)).name if names else None


def _switch_key(sw: dict) -> tuple:
    return tuple(sorted(sw.items()))


@dataclass
class RoleCode:
    """A role (or fused scale) of a call as torch code: ``code`` over the variables ``x_<input>`` (and ``h``,
    the head index), the inputs it reads, and the dims of its value (broadcast from its inputs)."""

    inputs: tuple
    layout: tuple
    code: str | None      # None: the role is the input itself


def _role_code(spec: Recurrence, e: sp.Expr) -> RoleCode:
    names = tuple(sorted(s.name for s in e.free_symbols))
    layout = spec.layout(e)
    if isinstance(e, sp.Symbol) and e.name != ex.HEAD_INDEX:
        return RoleCode(names, layout, None)
    code = ex.to_code(e, {n: (n if n == ex.HEAD_INDEX else f"x_{n}") for n in names}, ex.TORCH_FUNCS)
    return RoleCode(names, layout, code)


def role_sets(spec: Recurrence, plan: Plan) -> dict:
    """Per switch setting and set of present optional inputs: the torch code of every role but the log-decay
    (the gate stage's), the additive form's fused value / skip scales where the variant fuses them, and the
    q/k L2 norm switch."""
    out = {}
    for v in plan.variants:
        for present in _present_sets(spec):
            roles = spec.resolve(v.switches, frozenset(present))
            codes = {r: _role_code(spec, e) for r, e in roles.items() if r != "log_decay"}
            vs = sk = None
            if plan.form == "additive" and v.value_scale is not None:
                e = value_scale(spec, roles.value)
                vs = _role_code(spec, e) if e is not None else None
            if plan.form == "additive" and v.skip_scale is not None:
                e = skip_scale(spec, roles)
                sk = _role_code(spec, e) if e is not None else None
            out[(_switch_key(v.switches), present)] = dict(roles=codes, value_scale=vs, skip_scale=sk,
                                                           qk_l2norm=roles.qk_l2norm,
                                                           l2norm_inputs=roles.l2norm_inputs)
    return out
