"""The spec language: a recurrence written as data.

Every spec describes, per head, the recurrence

    S_t = D_t S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        o_t = S_t^T (scale * q_t)

with a decay ``D_t = diag(exp(g_t))`` of one of four kinds and a transition of one of three kinds
(DESIGN.md). Roles (query, key, value, log-decay, beta, a, b, skip) are sympy expressions of the
spec's named inputs; each input declares its shape with symbols (``"B T H K"``) so that ops can
validate arguments and expressions can be broadcast. A spec carries no kernel knowledge.

A spec is checked when it is built; every problem raises :class:`SpecError` naming the field.
"""

from __future__ import annotations

import itertools
import keyword
import math
from dataclasses import dataclass, field
from functools import cached_property

import sympy as sp

from . import expr as ex

DECAY_KINDS = ("none", "constant", "scalar", "vector")
TRANSITION_KINDS = ("none", "delta", "general")
SIGNS = ("positive", "negative", "nonpositive", "nonnegative")
BATCH, TIME = "B", "T"


class SpecError(ValueError):
    """An invalid spec. ``field`` names the offending part of the spec."""

    def __init__(self, spec: str, field: str, why: str):
        self.spec, self.field, self.why = spec, field, why
        super().__init__(f"spec {spec!r}: {field}: {why}")


@dataclass(frozen=True)
class Arg:
    """An input tensor: its shape in symbols (``"B T H K"``) and, optionally, a sign the op's
    contract promises (used to prove a log-decay is ``<= 0``)."""

    shape: str
    sign: str | None = None


@dataclass(frozen=True)
class If:
    """``then`` when the boolean keyword ``switch`` of the op is true, else ``otherwise``."""

    switch: str
    then: str
    otherwise: str


@dataclass(frozen=True)
class Decay:
    kind: str = "none"
    log: str | If | None = None

    @classmethod
    def none(cls) -> Decay:
        return cls("none", None)

    @classmethod
    def constant(cls, log: str | If) -> Decay:
        """One log-decay per head; may use ``h``, the head index."""
        return cls("constant", log)

    @classmethod
    def scalar(cls, log: str | If) -> Decay:
        """One log-decay per token and head (``[B, T, H]``)."""
        return cls("scalar", log)

    @classmethod
    def vector(cls, log: str | If) -> Decay:
        """One log-decay per token, head and key channel (``[B, T, H, K]``)."""
        return cls("vector", log)


@dataclass(frozen=True)
class Transition:
    kind: str = "none"
    beta: str | If | None = None
    a: str | If | None = None
    b: str | If | None = None

    @classmethod
    def none(cls) -> Transition:
        return cls("none")

    @classmethod
    def delta(cls, beta: str | If) -> Transition:
        """``S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T``."""
        return cls("delta", beta=beta)

    @classmethod
    def general(cls, a: str | If, b: str | If) -> Transition:
        """``S_t = D_t S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``."""
        return cls("general", a=a, b=b)


@dataclass(frozen=True)
class Roles:
    """A spec with its switches fixed and its absent optional inputs set to zero: every role is a
    sympy expression of input symbols (``let`` bindings expanded)."""

    query: sp.Expr
    key: sp.Expr
    value: sp.Expr
    log_decay: sp.Expr | None
    beta: sp.Expr | None
    a: sp.Expr | None
    b: sp.Expr | None
    skip: sp.Expr | None
    qk_l2norm: bool
    l2norm_inputs: tuple = ()
    normalize: bool = False

    def items(self):
        for name in ("query", "key", "value", "log_decay", "beta", "a", "b", "skip"):
            e = getattr(self, name)
            if e is not None:
                yield name, e


@dataclass(frozen=True)
class Substeps:
    """Several transition steps per token (Gated DeltaProduct's Householder products): ``inputs`` carry ``n``
    rows per token (``[B, T * n, ...]``, ``n`` the op's argument ``count``); each token applies its log-decay
    once, then ``n`` steps of the transition and write, and reads its output after the last. Lowered to the
    chunk math of the interleaved sequence (T * n steps, the decay on each token's first), as FLA does."""

    inputs: tuple
    count: str = "num_householder"


@dataclass(frozen=True)
class Recurrence:
    """A recurrence spec. Inputs keep their declaration order: it is the op's positional order.

    ``qk_l2norm`` (True, or a switch's name) L2-normalises the query and key roles over the key dim; with
    ``l2norm_inputs`` it normalises those inputs instead (each over its last dim, the key dim), before any role
    reads them: a key role that scales its input (Comba's ``beta * k``) keeps its scale.

    ``read="before"`` (RWKV6): the output reads the state before the token's update, plus with ``bonus`` (an input
    ``[H, K]`` or ``[B, T, H, K]``) a per-channel bonus for the current token,
    ``o_t = scale q_t^T (S_{t-1} + diag(bonus) k_t v_t^T)``; lowered to the additive chunk math of the sequence
    with a read step before each write step (query, key and log-decay bare per-token inputs).

    ``normalize`` (True, or a switch's name): the normalised output of linear attention,
    ``o_t = q_t^T S_t / (q_t^T z_t + 1e-10)`` with ``z_t`` the keys' running sum under the same decay; ``z``
    travels with the state as one more value column, ``[K, V + 1]`` (initial and final states alike)."""

    name: str
    inputs: dict
    query: str
    key: str
    value: str
    decay: Decay = field(default_factory=Decay.none)
    transition: Transition = field(default_factory=Transition.none)
    optional: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)
    let: dict = field(default_factory=dict)
    skip: str | If | None = None
    scale: float | None = None
    qk_l2norm: bool | str = False
    l2norm_inputs: tuple = ()
    normalize: bool | str = False
    substeps: Substeps | None = None
    read: str = "after"
    bonus: str | None = None
    doc: str = ""

    def __post_init__(self):
        _check(self)

    # ---- shapes -------------------------------------------------------------------------------
    @cached_property
    def args(self) -> dict[str, Arg]:
        """All tensor inputs, required first, as :class:`Arg`."""
        out = {}
        for n, a in list(self.inputs.items()) + list(self.optional.items()):
            out[n] = a if isinstance(a, Arg) else Arg(a)
        return out

    def dims(self, name: str) -> tuple[str, ...]:
        return tuple(self.args[name].shape.split())

    @cached_property
    def dim_roles(self) -> dict[str, str]:
        """Each shape symbol's role: 'batch', 'time', 'head' or 'feature'."""
        return _dim_roles(self)

    def layout(self, e: sp.Expr) -> tuple[str, ...]:
        """The dims of an expression's value, broadcast from its inputs, in [B, T, head, feature]
        order. The head index ``h`` contributes the value-head dim."""
        return _layout(self, e, "expression")

    @property
    def head_dims(self) -> dict[str, str]:
        """Symbols of the value heads ``H``, q/k heads ``HQ``, key dim ``K`` and value dim ``V``."""
        return self.head_dims_raw

    # ---- symbols and variants -----------------------------------------------------------------
    @cached_property
    def symbols(self) -> dict[str, sp.Symbol]:
        syms = {}
        for n, a in self.args.items():
            assumptions = {"real": True}
            if a.sign:
                assumptions[a.sign] = True
            syms[n] = sp.Symbol(n, **assumptions)
        syms[ex.HEAD_INDEX] = sp.Symbol(ex.HEAD_INDEX, integer=True, nonnegative=True)
        return syms

    @property
    def decay_kind(self) -> str:
        return self.decay.kind

    @property
    def transition_kind(self) -> str:
        return self.transition.kind

    def switch_values(self, **given: bool) -> dict[str, bool]:
        vals = dict(self.switches)
        for k, v in given.items():
            if k not in self.switches:
                raise KeyError(k)
            vals[k] = bool(v)
        return vals

    def resolve(self, switches: dict | None = None, present: frozenset | set | None = None) -> Roles:
        """The spec's roles for given switch values and present optional inputs (default: all)."""
        sw = self.switch_values(**(switches or {}))
        present = frozenset(self.optional) if present is None else frozenset(present)
        key = (tuple(sorted(sw.items())), present)
        cache = self.__dict__.setdefault("_roles_cache", {})
        if key not in cache:
            cache[key] = self._resolve(sw, present)
        return cache[key]

    def _resolve(self, sw: dict, present: frozenset, symbols: dict | None = None) -> Roles:
        symbols = self.symbols if symbols is None else symbols
        zero = {symbols[n]: sp.S.Zero for n in self.optional if n not in present}
        env = dict(symbols)
        for n, text in self.let.items():
            env[n] = self._parse(text, f"let.{n}", env, sw)

        def role(text, where):
            if text is None:
                return None
            e = self._parse(text, where, env, sw).subs(zero)
            return e

        skip = role(self.skip, "skip")
        if skip is not None and skip == 0:
            skip = None
        l2 = self.qk_l2norm if isinstance(self.qk_l2norm, bool) else sw[self.qk_l2norm]
        return Roles(
            query=role(self.query, "query"), key=role(self.key, "key"), value=role(self.value, "value"),
            log_decay=role(self.decay.log, "decay.log"), beta=role(self.transition.beta, "transition.beta"),
            a=role(self.transition.a, "transition.a"), b=role(self.transition.b, "transition.b"),
            skip=skip, qk_l2norm=l2, l2norm_inputs=tuple(self.l2norm_inputs) if l2 else (),
            normalize=self.normalize if isinstance(self.normalize, bool) else sw[self.normalize],
        )

    def uses(self, switches: dict | None = None) -> frozenset:
        """The inputs that the roles (and the bonus) read under these switch values (every optional input present): an
        optional input outside it is meaningless with these switches (KDA's ``A_log`` without
        ``use_gate_in_kernel``)."""
        sw = self.switch_values(**(switches or {}))
        cache = self.__dict__.setdefault("_uses_cache", {})
        key = tuple(sorted(sw.items()))
        if key not in cache:
            free = set().union(*(e.free_symbols for _, e in self.resolve(sw).items()))
            cache[key] = frozenset(n for n in self.args if self.symbols[n] in free or n == self.bonus)
        return cache[key]

    def sign_contracts(self, switches: dict | None = None, present: frozenset | set | None = None) -> dict:
        """The inputs whose declared sign (``Arg(shape, sign=...)``) the resolved roles rely on under these
        switch values and present optional inputs, by name: the signs the caller must keep. A declared
        sign is relied on when, without it, the log-decay could no longer be shown ``<= 0`` or some role
        would read differently (sympy simplified with it). KDA's ``g`` is a log-decay without
        ``use_gate_in_kernel`` (its sign is a contract) and a raw gate with it (any sign goes)."""
        sw = self.switch_values(**(switches or {}))
        present = frozenset(self.optional) if present is None else frozenset(present)
        cache = self.__dict__.setdefault("_sign_cache", {})
        key = (tuple(sorted(sw.items())), present)
        if key not in cache:
            roles = self.resolve(sw, present)
            free = set().union(*(e.free_symbols for _, e in roles.items()))
            out = {}
            for n, a in self.args.items():
                s = self.symbols[n]
                if a.sign is None or s not in free:
                    continue
                u = sp.Symbol(n, real=True)     # the same input without its sign
                alt = self._resolve(sw, present, dict(self.symbols, **{n: u}))
                relied = alt.log_decay is not None and alt.log_decay.is_nonpositive is not True
                relied = relied or any(e.xreplace({s: u}) != getattr(alt, r) for r, e in roles.items())
                if relied:
                    out[n] = a.sign
            cache[key] = out
        return cache[key]

    def _parse(self, text, where, env, sw) -> sp.Expr:
        if isinstance(text, If):
            if text.switch not in sw:
                raise SpecError(self.name, where, f"If() names switch {text.switch!r}, which is not one of "
                                f"the spec's switches {sorted(sw)}")
            text = text.then if sw[text.switch] else text.otherwise
        try:
            return ex.parse(text, env)
        except ex.ExprSyntaxError as e:
            raise SpecError(self.name, where, str(e)) from None

    def variants(self):
        """Every combination of switch values, as dicts."""
        names = sorted(self.switches)
        for vals in itertools.product([False, True], repeat=len(names)):
            yield dict(zip(names, vals))

    @cached_property
    def value_input(self) -> str:
        """The input whose dtype ``o`` takes: the first ``[B, T, H, V]`` input of the value role."""
        want = ("B", "T", self.head_dims["H"], self.head_dims["V"])
        for n in self.args:
            if self.symbols[n] in self.resolve().value.free_symbols and self.dims(n) == want:
                return n
        raise SpecError(self.name, "value", "no input has the value's shape [B, T, H, V]")

    def describe(self) -> str:
        """A readable summary for ``linattn show``."""
        hd = self.head_dims
        lines = [f"spec {self.name}: decay={self.decay.kind}, transition={self.transition.kind}"]
        if self.doc:
            lines.append("  " + self.doc.strip().splitlines()[0])
        lines.append("  inputs (positional):")
        for n in self.inputs:
            a = self.args[n]
            lines.append(f"    {n:<10} [{', '.join(a.shape.split())}]" + (f"  ({a.sign})" if a.sign else ""))
        if self.optional:
            lines.append("  optional (keyword, default None = 0):")
            for n in self.optional:
                lines.append(f"    {n:<10} [{', '.join(self.args[n].shape.split())}]")
        for n, v in self.switches.items():
            lines.append(f"  switch {n}={v}")
        r = self.resolve()
        for role, e in r.items():
            lines.append(f"  {role:<10} = {e}    [{', '.join(self.layout(e))}]")
        lines.append(f"  scale      = {self.scale if self.scale is not None else 'K ** -0.5'}")
        if self.normalize is not False:
            lines.append(f"  normalised output: {self.normalize} (state [num_seqs, H, K, V + 1])")
        lines.append(f"  q/k L2 norm: {self.qk_l2norm}"
                     + (f" (of the inputs {', '.join(self.l2norm_inputs)})" if self.l2norm_inputs else ""))
        lines.append(f"  state      = [num_seqs, {hd['H']}, {hd['K']}, {hd['V']}]")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Validation


OP_ARGUMENTS = ("scale", "initial_state", "output_final_state", "cu_seqlens")
READS = ("after", "before")


def _check_read(spec: Recurrence) -> None:
    name = spec.name
    if spec.read not in READS:
        raise SpecError(name, "read", f"expected one of {READS}, got {spec.read!r}")
    if spec.bonus is not None:
        if spec.read != "before":
            raise SpecError(name, "bonus", "a bonus for the current token needs read='before' (with 'after' the "
                                           "output already reads the token's own write)")
        dims = spec.dims(spec.bonus) if spec.bonus in spec.args else None
        hd = spec.head_dims_raw
        if dims not in ((hd["H"], hd["K"]), (BATCH, TIME, hd["H"], hd["K"])):
            raise SpecError(name, "bonus", f"expected an input of shape [H, K] or [B, T, H, K] "
                                           f"([{hd['H']}, {hd['K']}]), got {spec.bonus!r}"
                                           + (f" [{', '.join(dims)}]" if dims else ""))
    if spec.read == "after":
        return
    if spec.transition.kind != "none" or spec.normalize is not False or spec.substeps is not None \
            or spec.qk_l2norm is not False:
        raise SpecError(name, "read", "read='before' is lowered for the additive form (transition 'none') without "
                                      "normalize, substeps or qk_l2norm")
    for sw in spec.variants() if spec.switches else [{}]:
        r = spec.resolve(sw)
        for role, e in (("query", r.query), ("key", r.key), ("log_decay", r.log_decay)):
            if e is not None and not (e.is_Symbol and spec.dims(e.name)[:2] == (BATCH, TIME)):
                raise SpecError(name, "read", f"read='before' needs the {role} to be a per-token input of its own, "
                                              f"got {e}")


def _check_substeps(spec: Recurrence) -> None:
    name, sub = spec.name, spec.substeps
    if sub is None:
        return
    if not isinstance(sub, Substeps) or not isinstance(sub.inputs, tuple) or not sub.inputs:
        raise SpecError(name, "substeps", f"expected Substeps(inputs=(...), count=...), got {sub!r}")
    if not isinstance(sub.count, str) or not sub.count.isidentifier() or sub.count in (
            set(spec.args) | set(spec.switches) | set(OP_ARGUMENTS)):
        raise SpecError(name, "substeps.count", f"expected an argument name of its own, got {sub.count!r}")
    for n in sub.inputs:
        if n not in spec.inputs or spec.dims(n)[:2] != (BATCH, TIME):
            raise SpecError(name, "substeps.inputs", f"{n!r}: expected a required per-token input ([B, T, ...])")
    for sw in spec.variants() if spec.switches else [{}]:
        r = spec.resolve(sw)
        read = {s.name for s in r.query.free_symbols} & set(sub.inputs)
        if read:
            raise SpecError(name, "substeps.inputs", f"the query reads {sorted(read)}: a token reads its output "
                                                     "once, after its last sub-step")
        if r.log_decay is None:
            continue
        bare = r.log_decay.is_Symbol and spec.dims(r.log_decay.name)[:2] == (BATCH, TIME)
        if not bare or r.log_decay.name in sub.inputs:
            raise SpecError(name, "substeps", f"the log-decay {r.log_decay} must be a per-token input of its own, "
                                              "not a sub-step input: it applies on each token's first sub-step "
                                              "and is zero on the others")
    if not any(n not in sub.inputs and spec.dims(n)[:2] == (BATCH, TIME) for n in spec.inputs):
        raise SpecError(name, "substeps.inputs", "at least one per-token input must have one row per token")


def _check_normalize(spec: Recurrence) -> None:
    name, norm = spec.name, spec.normalize
    if isinstance(norm, str) and norm not in spec.switches:
        raise SpecError(name, "normalize", f"names switch {norm!r}, not one of {sorted(spec.switches)}")
    if not isinstance(norm, (bool, str)):
        raise SpecError(name, "normalize", "must be True, False or the name of a switch")
    if norm is False:
        return
    if spec.transition.kind != "none":
        raise SpecError(name, "normalize", f"the normalised output is the additive form's (transition 'none'); "
                                           f"this spec's transition is {spec.transition.kind!r}")
    v_sym = spec.head_dims_raw["V"]
    for sw in spec.variants() if spec.switches else [{}]:
        r = spec.resolve(sw)
        if r.normalize and (r.value != spec.symbols[spec.value_input] or r.skip is not None):
            raise SpecError(name, "normalize", f"the normaliser rides as a value column: the value role must be an "
                                               f"input of its own and there may be no skip term (value "
                                               f"{r.value}, skip {r.skip})")
    others = [n for n in spec.args if n != spec.value_input and v_sym in spec.dims(n)]
    if others:
        raise SpecError(name, "normalize", f"{others} use the value dim {v_sym!r}, which the normaliser's column "
                                           f"widens; only the value input may")


def _check_l2norm_inputs(spec: Recurrence) -> None:
    name, ins = spec.name, spec.l2norm_inputs
    if not isinstance(ins, (tuple, list)) or not all(isinstance(n, str) for n in ins):
        raise SpecError(name, "l2norm_inputs", f"expected a tuple of input names, got {ins!r}")
    if ins and spec.qk_l2norm is False:
        raise SpecError(name, "l2norm_inputs", "names inputs to normalise, but qk_l2norm is False (set it to True "
                                               "or to a switch)")
    key_dim = spec.head_dims_raw["K"]
    for n in ins:
        if n not in spec.args:
            raise SpecError(name, "l2norm_inputs", f"{n!r} is not an input of the spec (inputs: {list(spec.args)})")
        dims = spec.dims(n)
        if dims[:2] != (BATCH, TIME) or len(dims) != 4 or dims[-1] != key_dim:
            raise SpecError(name, "l2norm_inputs", f"{n!r} is [{', '.join(dims)}]; a normalised input is per "
                                                   f"token and head, over the key dim: [B, T, heads, K]")
    if ins and spec.decay.log is not None:
        for sw in spec.variants() if spec.switches else [{}]:
            log = spec.resolve(sw).log_decay
            read = {s.name for s in log.free_symbols} & set(ins) if log is not None else set()
            if read:
                raise SpecError(name, "l2norm_inputs", f"{sorted(read)} feed the log-decay, which reads inputs as "
                                                       "given; normalise only inputs the other roles read")

def _dim_roles(spec: Recurrence) -> dict[str, str]:
    roles: dict[str, str] = {}

    def claim(sym, role, where):
        if sym in (BATCH, TIME) and role not in ("batch", "time"):
            raise SpecError(spec.name, where, f"shape symbol {sym!r} is reserved for batch/time and must "
                            "lead a per-token shape ('B T ...')")
        old = roles.get(sym)
        if old is not None and old != role:
            raise SpecError(spec.name, where, f"shape symbol {sym!r} is a {old} dim elsewhere but a {role} "
                            "dim here: shape symbols disagree")
        roles[sym] = role

    params = []
    for n, a in spec.args.items():
        toks = a.shape.split()
        where = f"inputs.{n}" if n in spec.inputs else f"optional.{n}"
        if not toks or any(not t.isidentifier() for t in toks) or len(set(toks)) != len(toks):
            raise SpecError(spec.name, where, f"shape {a.shape!r} must be distinct space-separated symbols")
        if toks[:2] == [BATCH, TIME]:
            rest = toks[2:]
            if len(rest) > 2:
                raise SpecError(spec.name, where, f"shape {a.shape!r}: per-token inputs are 'B T H' or "
                                "'B T H D' (at most a head and a feature dim after B T)")
            claim(BATCH, "batch", where)
            claim(TIME, "time", where)
            for t, role in zip(rest, ("head", "feature")):
                claim(t, role, where)
        else:
            if BATCH in toks or TIME in toks:
                raise SpecError(spec.name, where, f"shape {a.shape!r}: 'B' and 'T' may only lead a shape, as 'B T ...'")
            if len(toks) > 2:
                raise SpecError(spec.name, where, f"shape {a.shape!r}: parameters are 'H' or 'H D'")
            if len(toks) == 2:
                claim(toks[0], "head", where)
                claim(toks[1], "feature", where)
            else:
                params.append((toks[0], where))
    for t, where in params:
        if t not in roles:
            raise SpecError(spec.name, where, f"shape symbol {t!r} appears in no per-token input, so its "
                            "size cannot be known")
    return roles


def _layout(spec: Recurrence, e: sp.Expr, where: str) -> tuple[str, ...]:
    roles = spec.dim_roles
    slot: dict[str, str] = {}
    for s in sorted(e.free_symbols, key=lambda s: s.name):
        if s.name == ex.HEAD_INDEX:
            dims = (spec.head_dims_raw["H"],)
        else:
            dims = spec.dims(s.name)
        for d in dims:
            r = roles[d]
            if slot.get(r, d) != d:
                raise SpecError(spec.name, where, f"{e} mixes shape symbols {slot[r]!r} and {d!r} as its "
                                f"{r} dim: shape symbols disagree")
            slot[r] = d
    return tuple(slot[r] for r in ("batch", "time", "head", "feature") if r in slot)


def _raw_head_dims(spec: Recurrence) -> dict[str, str]:
    """Value-head and key/value dims read from the raw query and value expressions (no ``h``)."""
    sw = {k: v for k, v in spec.switches.items()}
    env = dict(spec.symbols)
    for n, text in spec.let.items():
        env[n] = spec._parse(text, f"let.{n}", env, sw)
    out = {}
    for role, text in (("query", spec.query), ("value", spec.value)):
        e = spec._parse(text, role, env, sw)
        if ex.HEAD_INDEX in {s.name for s in e.free_symbols}:
            raise SpecError(spec.name, role, "the head index h may only appear in a constant decay")
        lay = _layout(spec, e, role)   # no head index here, so no head dims are needed yet
        if len(lay) != 4 or lay[:2] != (BATCH, TIME):
            raise SpecError(spec.name, role, f"{role} {e} has dims {list(lay)}; expected [B, T, heads, dim]")
        out[role] = lay
    return {"H": out["value"][2], "HQ": out["query"][2], "K": out["query"][3], "V": out["value"][3]}


def _check(spec: Recurrence) -> None:
    name = spec.name
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise SpecError(str(name), "name", "must be a Python identifier (it names the ops chunk_<name>)")
    if not spec.inputs:
        raise SpecError(name, "inputs", "a spec needs at least one input")
    seen: dict[str, str] = {}
    for group, names in (("inputs", spec.inputs), ("optional", spec.optional), ("switches", spec.switches),
                         ("let", spec.let)):
        for n in names:
            if not isinstance(n, str) or not n.isidentifier() or keyword.iskeyword(n):
                raise SpecError(name, f"{group}.{n}", "names must be Python identifiers")
            if n in ex.RESERVED or n in ("scale", "initial_state", "output_final_state", "cu_seqlens"):
                raise SpecError(name, f"{group}.{n}", f"{n!r} is reserved (a function name, the head index "
                                "h, or an op keyword)")
            if n in seen:
                raise SpecError(name, f"{group}.{n}", f"{n!r} is already declared in {seen[n]}")
            seen[n] = group
    for n, a in list(spec.inputs.items()) + list(spec.optional.items()):
        if not isinstance(a, (str, Arg)):
            raise SpecError(name, f"inputs.{n}", f"expected a shape string or Arg, got {type(a).__name__}")
        if isinstance(a, Arg) and a.sign is not None and a.sign not in SIGNS:
            raise SpecError(name, f"inputs.{n}", f"sign {a.sign!r} is not one of {SIGNS}")
    for n, v in spec.switches.items():
        if not isinstance(v, bool):
            raise SpecError(name, f"switches.{n}", f"default must be True or False, got {v!r}")
    if spec.decay.kind not in DECAY_KINDS:
        raise SpecError(name, "decay", f"kind {spec.decay.kind!r} is not one of {DECAY_KINDS}")
    if (spec.decay.kind == "none") != (spec.decay.log is None):
        raise SpecError(name, "decay.log", "a 'none' decay takes no log-decay; every other kind needs one")
    t = spec.transition
    if t.kind not in TRANSITION_KINDS:
        raise SpecError(name, "transition", f"kind {t.kind!r} is not one of {TRANSITION_KINDS}")
    need = {"none": (), "delta": ("beta",), "general": ("a", "b")}[t.kind]
    for f in ("beta", "a", "b"):
        if (getattr(t, f) is not None) != (f in need):
            raise SpecError(name, f"transition.{f}", f"a {t.kind!r} transition "
                            + ("needs" if f in need else "takes no") + f" {f!r}")
    if spec.scale is not None and (not isinstance(spec.scale, (int, float)) or not spec.scale > 0
                                   or not math.isfinite(spec.scale)):
        raise SpecError(name, "scale", f"must be None (meaning K ** -0.5) or a positive number, got {spec.scale!r}")
    if isinstance(spec.qk_l2norm, str) and spec.qk_l2norm not in spec.switches:
        raise SpecError(name, "qk_l2norm", f"names switch {spec.qk_l2norm!r}, not one of {sorted(spec.switches)}")
    if not isinstance(spec.qk_l2norm, (bool, str)):
        raise SpecError(name, "qk_l2norm", "must be True, False or the name of a switch")

    spec.dim_roles  # noqa: B018 - validates shapes
    object.__setattr__(spec, "head_dims_raw", _raw_head_dims(spec))
    hd = spec.head_dims_raw
    _check_l2norm_inputs(spec)
    _check_normalize(spec)
    _check_substeps(spec)
    _check_read(spec)

    for sw in spec.variants() if spec.switches else [{}]:
        r = spec.resolve(sw)
        for role, e in r.items():
            if role == "log_decay":
                continue
            if ex.HEAD_INDEX in {s.name for s in e.free_symbols}:
                raise SpecError(name, role, "the head index h may only appear in a constant decay")
        lq, lk, lv = spec.layout(r.query), spec.layout(r.key), spec.layout(r.value)
        if lk != lq:
            raise SpecError(name, "key", f"key dims {list(lk)} disagree with query dims {list(lq)}")
        if lv[:3] != (BATCH, TIME, hd["H"]) or lv != spec.layout(r.value):
            raise SpecError(name, "value", f"value dims {list(lv)} changed with switches")
        H, HQ, K = hd["H"], hd["HQ"], hd["K"]
        per_head_ok = {H} | ({HQ} if HQ == H else set())

        def check_layout(where, e, allowed_feature, allow_bt=True):
            lay = spec.layout(e)
            for d in lay:
                r_ = spec.dim_roles[d]
                if r_ in ("batch", "time") and not allow_bt:
                    raise SpecError(name, where, f"{e} varies over {d!r}, but a {spec.decay.kind} decay may "
                                    "only depend on the head")
                if r_ == "head" and d not in per_head_ok:
                    raise SpecError(name, where, f"{e} has head dim {d!r}; expected the value heads {H!r}")
                if r_ == "feature" and d != allowed_feature:
                    want = f"feature dim {allowed_feature!r}" if allowed_feature else "no feature dim"
                    raise SpecError(name, where, f"{e} has feature dim {d!r}; expected {want}: shape "
                                    "symbols disagree with the kind")
            return lay

        if r.log_decay is not None:
            kind = spec.decay.kind
            check_layout("decay.log", r.log_decay, K if kind == "vector" else None, allow_bt=kind != "constant")
            _check_nonpositive(spec, r.log_decay)
        if r.beta is not None:
            check_layout("transition.beta", r.beta, None)
        for f in ("a", "b"):
            e = getattr(r, f)
            if e is not None:
                lay = check_layout(f"transition.{f}", e, K)
                if len(lay) != 4:
                    raise SpecError(name, f"transition.{f}", f"{e} has dims {list(lay)}; expected [B, T, H, {K}]")
        if r.skip is not None:
            lay = spec.layout(r.skip)
            if not set(lay) <= set(lv):
                raise SpecError(name, "skip", f"skip dims {list(lay)} do not broadcast to the output {list(lv)}")


def _check_nonpositive(spec: Recurrence, e: sp.Expr) -> None:
    ok = e.is_nonpositive
    if ok is True:
        return
    if ok is None and e.free_symbols <= {spec.symbols[ex.HEAD_INDEX]}:
        # A constant decay of the head index alone: sympy's assumptions cannot bound e.g.
        # log(1 - 2**(-5 - h)); check it numerically for every head a model could have.
        f = sp.lambdify(spec.symbols[ex.HEAD_INDEX], e, "math")
        try:
            vals = [float(f(i)) for i in range(1024)]
        except (ValueError, OverflowError, ZeroDivisionError):
            vals = [float("nan")]
        if all(math.isfinite(v) and v <= 0 for v in vals):
            return
        ok = False
    if ok is False:
        raise SpecError(spec.name, "decay.log", f"log-decay {e} can be positive (decay > 1 would blow up "
                        "the state); it must be <= 0")
    raise SpecError(spec.name, "decay.log", f"cannot show that log-decay {e} is <= 0; declare the sign "
                    "of its inputs with Arg(shape, sign='nonpositive') or write it so that it is "
                    "(e.g. -exp(.) * softplus(.), logsigmoid(.))")
