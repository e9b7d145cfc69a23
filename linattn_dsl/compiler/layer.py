"""How a token-mixing layer feeds a spec's op: the layer declaration of a spec file, and the default derived from
the spec alone.

A spec file may declare, next to ``spec``, ``layer = Layer(...)``: for each op input its source

* :class:`Proj`: a linear projection of the hidden states to the input's shape (full, or low rank), with or
  without bias, optionally through a short causal convolution and its activation, then a transform;
* :class:`Param`: a learned per-head / per-channel parameter (the input's own shape) with its initialiser;
* :class:`Const`: a constant (DeltaNet without beta: ``beta = 1``);
* :class:`NormKey`: the general transition's contractive pair from one L2-normalised key ``kk`` per head:
  ``a = -kk``, ``b = kk * sigmoid(W x)``;
* :class:`Derive`: an expression of the input's own ``base`` source, other op inputs and learned parameters
  (:class:`Param` with ``dims``, or a :class:`ModelParam`: one parameter of the model, a row per layer), e.g.
  Comba's ``p = k * sigmoid(decay)`` and ``q = q - D * p``, Mamba's gate ``-exp(A_log) * softplus(g + dt_bias)``
  computed in the layer, HGRN2's per-layer lower bound of the forget gate;

plus the head sizes (:class:`Size`), RoPE on the query and key, the q / k norm, the output path (per-head
RMSNorm, an output :class:`Gate`, the output projection), the block around the layer (an MLP or none) and the model
name (``linattn_<name>``). Any value of a declaration may be an :class:`Option`: a field of the model's config
(and a keyword of the layer) with its default, used as the value or mapped to one. Inputs the declaration leaves
out (and a spec file without one) get the default, role-aware so that a model is stable from its first step:

* a per-token input comes from a linear projection of the hidden states; one whose declared sign the spec relies
  on is produced through a transform that guarantees it (non-positive: ``logsigmoid(x) / 16``, negative:
  ``-softplus(x)``, non-negative: ``softplus(x)``); a role that is the bare input gets its bounding transform
  (beta: ``sigmoid``, a log-decay: ``logsigmoid(x) / 16``), a role the spec already bounds stays raw;
* q / k of a delta or general transition are L2-normalised (the spec's q/k-norm switch on, or in the layer);
* the general transition's ``a``, ``b`` given as bare inputs: :class:`NormKey`;
* a per-head or per-channel parameter: zeros, or ``-exp(p)`` with ``p = log U(0.5, 4)`` where its sign is
  non-positive or negative (``exp(p)`` for non-negative or positive);
* output: per-head RMSNorm, a swish output gate, the output projection; the block: pre-norm with a SwiGLU MLP.

Module names follow FLA: input ``x``'s projection is ``x_proj`` and its conv ``x_conv1d`` (``Proj(name="gk")``:
``gk_proj``), a parameter is an attribute named after its input, the output gate's projection ``g_proj``, the norm
``Layer.norm_name``, the output projection ``o_proj``; an input left to its default name whose module name the
output path takes becomes ``<input>_in`` (a spec's ``g`` beside the output gate: ``g_in_proj``).

:func:`plan` turns a spec and its declaration into plain data (``linattn regen`` writes it into the generated
module as ``LAYER``), which :class:`linattn_dsl.layers.SpecLayer` builds its modules from; an option there is
``{"$option": field}`` (with ``"$values": [[option value, plan value], ...]``), arithmetic on options
``{"$op": "/", "$args": [...]}``, resolved when the layer is built (:func:`linattn_dsl.layers.spec_layer.resolve`).
A derived input's expression is in the plan as PyTorch source (``code``, its values read from a dict ``x``), so
that the layer runs it without the compiler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy as sp

from . import expr as ex
from .spec import BATCH, TIME, Recurrence, SpecError

TRANSFORMS = ("sigmoid", "logsigmoid", "softplus", "-softplus", "exp", "-exp", "silu", "relu", "elu+1", "l2norm",
              "tanh")
ACTIVATIONS = ("silu", "relu", "identity")
INITS = ("zeros", "ones", "normal", "log_uniform", "a_log", "dt_bias")   # or a number: that value everywhere
ROWS = (None, "cumsoftmax")   # how the layers' rows come from a ModelParam
ROLES = ("H", "HQ", "K", "V")   # the head dims a Param's / ModelParam's ``dims`` may name
OUTPUT_GATES = ("swish", "sigmoid")
OUTPUT_NORMS = (True, False, "all")   # per head, none, over every head together
SIZES = ("hidden", "key", "fixed")
HEAD_SIZES = ("K", "V")   # a rank may name a head dim
# the fields every model config has (linattn_dsl.models.LinAttnConfig); an option may not take their names, and
# Layer.defaults changes their defaults
SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size", "hidden_ratio",
                 "norm_eps", "norm_type", "pre_norm", "initializer_range", "tie_word_embeddings", "use_cache",
                 "fuse_linear_cross_entropy", "attn", "pad_token_id", "bos_token_id", "eos_token_id")
# the layer's keywords besides its options, and the config's record of a spec's source: no option takes them
RESERVED_OPTIONS = ("module", "mode", "spec_source")
# the attributes of a built layer (linattn_dsl.layers.SpecLayer) besides torch.nn.Module's: no module or parameter
# takes them
LAYER_ATTRIBUTES = ("plan", "options", "spec_name", "hidden_size", "num_heads", "num_qk_heads", "head_k_dim",
                    "head_v_dim", "key_dim", "value_dim", "sizes", "rope_theta", "mode", "training", "zero_pads",
                    "mix", "special_init", "layer_idx", "model_param")
# the attributes of a model (linattn_dsl.models.LinAttnModel) besides torch.nn.Module's: no ModelParam takes them
MODEL_ATTRIBUTES = ("embeddings", "layers", "norm", "config", "build_mixer", "build_mlp", "special_init",
                    "model_param", "dtype", "device", "name_or_path", "base_model", "main_input_name")


class _Arithmetic:
    """``*`` and ``/`` with numbers and other options: evaluated when the layer is built."""

    def __mul__(self, other):
        return Expr("*", (self, other))

    def __rmul__(self, other):
        return Expr("*", (other, self))

    def __truediv__(self, other):
        return Expr("/", (self, other))

    def __rtruediv__(self, other):
        return Expr("/", (other, self))


@dataclass(frozen=True)
class Option(_Arithmetic):
    """A declaration value chosen by the model's config: the config field (and layer keyword) ``field`` with its
    ``default``. Without ``values`` the field's value is the declaration's (a number, a bool or None; the config
    checks it: a bool, a positive int, a positive number, or a positive int or None, by the default's type); with
    ``values`` (the field's allowed values -> declaration values) it picks one, e.g.
    ``Option("use_beta", True, {True: Proj(transform="sigmoid"), False: Const(1.0)})``."""

    field: str
    default: Any = None
    values: dict | None = None


@dataclass(frozen=True)
class Expr(_Arithmetic):
    """``op`` ("*" or "/") of two numbers or options: ``1 / Option("gate_logit_normalizer", 16.0)``."""

    op: str
    args: tuple


@dataclass(frozen=True)
class Proj:
    """A linear projection of the hidden states to the input's shape: full (``rank=None``) or through a rank-
    ``rank`` bottleneck (an int, or "K" / "V": the key / value head dim), with or without ``bias``; with ``conv`` a
    short causal convolution (the config's ``conv_size``) and ``activation``, the conv's, after it; then
    ``transform`` (one of TRANSFORMS, per head for ``l2norm``; with or without a conv) times ``scale``. ``name``:
    the modules' stem, ``<name>_proj`` and ``<name>_conv1d`` (default: the input's name)."""

    rank: int | str | Option | None = None
    bias: bool | Option = False
    conv: bool | Option = False
    activation: str = "silu"
    transform: str | None = None
    scale: float | Option | Expr = 1.0
    name: str | None = None


@dataclass(frozen=True)
class Param:
    """A learned parameter of the input's own shape (per head, per head and channel; ``flat``: stored as one vector
    and viewed in that shape), an attribute named after the input, initialised by ``init`` (zeros, ones,
    normal(0, 0.02), log_uniform: log U(0.5, 4); Mamba's a_log: log U(1, 16), and dt_bias: the inverse softplus of
    dt log-uniform in [0.001, 0.1]; or a number, an Option's too: that value everywhere) and used through
    ``transform`` (None, ``exp``, ``-exp``, ``softplus``, ...). In a :class:`Derive`'s ``params`` it is an attribute
    named after its key, of shape ``dims`` (head dims by role: ``"H"``, ``"H K"``; ``HQ`` the q/k heads, ``K`` /
    ``V`` the head dims; default: the derived input's)."""

    init: str | float | Option = "zeros"
    transform: str | None = None
    flat: bool = False
    dims: str | None = None


@dataclass(frozen=True)
class ModelParam:
    """A learned parameter of the model (``model.<name>``, shape ``[num_hidden_layers, width]``, ``width`` the
    channels of ``dims``: the derived input's head dims by default), initialised by ``init`` as :class:`Param`;
    each layer reads its row, viewed in ``dims``: as stored (``rows=None``) or ``rows="cumsoftmax"``: softmax over
    the layers, cumulative sum, minus the first row (HGRN2's lower bounds: row 0 is zero, the rows rise towards 1
    with depth). Only a :class:`Derive` reads one."""

    name: str
    init: str | float | Option = "zeros"
    rows: str | None = None
    dims: str | None = None


@dataclass(frozen=True)
class Derive:
    """An op input computed in the layer: ``expr`` (the spec's expression language, plus ``log1p`` and
    ``logaddexp``) of

    * the input's own name: the value of ``base`` (a Proj / Param / Const / NormKey, or an Option choosing one)
      before the derivation;
    * the other op inputs' names: their values (after their own derivations, before the layer's q / k norm and
      RoPE);
    * ``params``' keys: a :class:`Param` (a learned parameter of the layer, an attribute named after its key) or a
      :class:`ModelParam` (this layer's row of a parameter of the model).

    A value of fewer dims broadcasts over the input's (``k * sigmoid(decay)``: ``decay [H]`` over ``[B, T, H, K]``).
    ``from_layer``: layers with a smaller index (counting every layer of the model) take the base as it is.
    Comba's ``p = Derive("k * sigmoid(decay)", params=dict(decay=Param(init="ones", dims="H")))``."""

    expr: str
    base: Any = None
    params: dict = field(default_factory=dict)
    from_layer: int = 0


@dataclass(frozen=True)
class Const:
    """An input held at ``value`` at every position (no module)."""

    value: float = 0.0


@dataclass(frozen=True)
class NormKey:
    """The general transition's ``a`` (``sign=-1``: ``-kk``) or ``b`` (``sign=1``: ``kk * sigmoid(W x)``, a
    projection of its own), ``kk`` one L2-normalised projection per head shared by both (``kk_proj``)."""

    sign: int = -1


@dataclass(frozen=True)
class Gate:
    """The output gate: ``rms_norm(o) * activation(g_proj x)`` per head, ``g_proj`` full (``rank=None``) or of rank
    ``rank`` (an int, or "K" / "V": a head dim), with or without ``bias``."""

    activation: str = "swish"
    rank: int | str | Option | None = None
    bias: bool | Option = False


@dataclass(frozen=True)
class Size:
    """A head dim: ``hidden_size * factor / num_heads`` (``Size.of_hidden``: FLA's expand_k / expand_v),
    ``int(key head dim * factor)`` (``Size.of_key``: KDA's expand_v) or ``factor`` itself (``Size.fixed``: KDA's
    head_dim)."""

    of: str
    factor: Any

    @classmethod
    def of_hidden(cls, factor) -> Size:
        return cls("hidden", factor)

    @classmethod
    def of_key(cls, factor) -> Size:
        return cls("key", factor)

    @classmethod
    def fixed(cls, dim) -> Size:
        return cls("fixed", dim)


@dataclass(frozen=True)
class Layer:
    """A spec's token-mixing layer (see the module docstring). ``inputs``: op input name -> Proj / Param / Const /
    NormKey / Derive or an Option choosing one (the rest derived); ``switches``: the op's switch values (default:
    the spec's, with a q/k-norm switch on for delta and general transitions); ``qk_norm``: "auto", None or "l2" (in
    the layer); ``rope``: RoPE's base on the query and key inputs (None: no RoPE); ``key_size`` / ``value_size``:
    the head dims (:class:`Size`; a spec whose key and value share a symbol uses the key's); ``qk_heads``: the q/k
    heads of a spec that groups them (None: ``num_heads``); ``conv_size``: the short convs' width (a config field
    only when a conv may be on); ``output_gate``: a :class:`Gate`, "swish", "sigmoid" or None; ``output_norm``:
    True for the per-head RMSNorm, "all" for one RMSNorm over every head's values together (HGRN2), False for none,
    named ``norm_name``, its epsilon ``norm_eps`` (None: the model's ``norm_eps``; HGRN2: FLA's fixed 1e-5);
    ``mlp``: the block's SwiGLU MLP (False: mixer-only blocks); ``defaults``: other defaults of the config's shared
    fields (``num_heads=16``); ``name``: the model's name, ``linattn_<name>`` (default: the spec's name); ``title``:
    its classes' prefix (``<title>Config``; default: the name in title case)."""

    inputs: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)
    qk_norm: str | None = "auto"
    rope: float | Option | None = None
    key_size: Size = Size.of_hidden(Option("expand_k", 0.5))
    value_size: Size = Size.of_hidden(Option("expand_v", 1.0))
    qk_heads: int | Option | None = Option("num_qk_heads", None)
    conv_size: int | Option = Option("conv_size", 4)
    output_gate: Gate | str | Option | None = "swish"
    output_norm: bool | str | Option = True
    norm_name: str = "o_norm"
    norm_eps: float | Option | None = None
    mlp: bool | Option = True
    defaults: dict = field(default_factory=dict)
    name: str | None = None
    title: str | None = None


def _error(spec: Recurrence, where: str, why: str) -> SpecError:
    return SpecError(spec.name, f"layer.{where}" if where else "layer", why)


def _bare(e) -> str | None:
    return e.name if isinstance(e, sp.Symbol) and e.name != ex.HEAD_INDEX else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rule(default) -> str:
    """The config's check of an option used as its own value, by its default's type."""
    if isinstance(default, bool):
        return "a bool"
    if default is None:
        return "a positive int or None"
    return "a positive int" if _is_int(default) else "a positive number"


def _obeys(value, rule: str) -> bool:
    """Does ``value`` pass ``rule`` (one of :func:`_rule`'s)?"""
    if rule == "a bool":
        return isinstance(value, bool)
    if rule == "a positive int or None":
        return value is None or (_is_int(value) and value > 0)
    return (_is_int(value) if rule == "a positive int" else _is_number(value)) and value > 0


def _type(values) -> str:
    """The config field's type (as a string) for these allowed values."""
    names = {"bool" if isinstance(v, bool) else "None" if v is None else type(v).__name__ for v in values}
    order = ("bool", "int", "float", "str", "None")
    return " | ".join(sorted(names, key=lambda n: order.index(n) if n in order else len(order)))


class _Planner:
    """Collects the options of one declaration while its values become plan data."""

    def __init__(self, spec: Recurrence) -> None:
        self.spec = spec
        self.options: dict[str, dict] = {}
        self.declared: dict[str, Option] = {}

    def fail(self, where: str, why: str) -> SpecError:
        return _error(self.spec, where, why)

    def value(self, where: str, v, convert, arithmetic: bool = False):
        """The plan form of declaration value ``v`` at ``where``; ``convert(where, value)`` turns a plain value into
        plan data (raising SpecError when it does not fit the place); ``arithmetic``: the place takes a number, so
        also ``*`` and ``/`` of options."""
        if isinstance(v, Option):
            return self.option(where, v, convert)
        if isinstance(v, Expr):
            if not arithmetic:
                raise self.fail(where, f"option arithmetic gives a number; this place takes none: {v!r}")
            return self.arithmetic(where, v)
        return convert(where, v)

    def arithmetic(self, where: str, e: Expr) -> dict:
        if e.op not in ("*", "/") or len(e.args) != 2:
            raise self.fail(where, f"expected option arithmetic with * or /, got {e!r}")
        args = []
        for a in e.args:
            if isinstance(a, Expr):
                args.append(self.arithmetic(where, a))
            elif isinstance(a, Option):
                args.append(self.option(where, a, _check_number(self)))
            else:
                args.append(_check_number(self)(where, a))
        return {"$op": e.op, "$args": args}

    def option(self, where: str, opt: Option, convert) -> dict:
        name = opt.field
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise self.fail(where, f"Option field: expected an identifier not starting with '_', got {name!r}")
        if name in SHARED_FIELDS or name in RESERVED_OPTIONS:
            raise self.fail(where, f"Option field {name!r} is a field every model (or every layer) has; give the "
                                   "option another name (Layer.defaults sets a shared field's default)")
        known = self.declared.get(name)
        if known is not None and known != opt:
            raise self.fail(where, f"Option {name!r} declared again with another default or values: {opt!r} vs "
                                   f"{known!r}")
        if opt.values is None:
            if not (opt.default is None or isinstance(opt.default, (bool, int, float))):
                raise self.fail(where, f"Option {name!r}: an option without values stands for a number, a bool or "
                                       f"None; got default {opt.default!r} (give values={{...}} to map it)")
            try:
                convert(where, opt.default)
            except SpecError as e:
                raise self.fail(where, f"Option {name!r} (no values: its value is used as is): its default does "
                                       f"not fit here: {e.why}") from None
            if not _obeys(opt.default, _rule(opt.default)):
                raise self.fail(where, f"Option {name!r}: its field takes {_rule(opt.default)} (by its default's "
                                       f"type), and the default is {opt.default!r}")
            node = {"$option": name}
            entry = {"default": opt.default, "rule": _rule(opt.default), "choices": None,
                     "type": _type([opt.default]) if opt.default is not None else "int | None"}
        else:
            if not isinstance(opt.values, dict) or not opt.values:
                raise self.fail(where, f"Option {name!r}: values: expected a non-empty dict (option value -> "
                                       f"declaration value), got {opt.values!r}")
            keys = list(opt.values)
            if not all(k is None or isinstance(k, (bool, int, float, str)) for k in keys):
                raise self.fail(where, f"Option {name!r}: values: expected bool, number, str or None keys, got "
                                       f"{keys!r}")
            if not any(_same(k, opt.default) for k in keys):
                raise self.fail(where, f"Option {name!r}: default {opt.default!r} is not one of its values' keys "
                                       f"{keys!r}")
            node = {"$option": name, "$values": [[k, self.value(f"{where}[{k!r}]", v, convert)]
                                                 for k, v in opt.values.items()]}
            entry = {"default": opt.default, "rule": "a bool" if set(map(repr, keys)) == {"True", "False"} else None,
                     "choices": keys, "type": _type(keys)}
        if known is None:
            self.declared[name] = opt
            self.options[name] = dict(entry, where=where)
        return node

    def candidates(self, node) -> list:
        """Every value a plan node may take (each option's allowed values, or its default)."""
        if isinstance(node, dict) and "$option" in node:
            if "$values" in node:
                return [c for _, v in node["$values"] for c in self.candidates(v)]
            entry = self.options[node["$option"]]
            return [False, True] if entry["rule"] == "a bool" else [entry["default"]]
        return [node]


def _same(a, b) -> bool:
    """Equal, and both bools or neither (``True == 1`` is no match)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


# ---- conversions of plain declaration values at each place: (where, value[, planner]) -> plan data


def _check_number(planner: _Planner):
    def convert(where, v):
        if not _is_number(v):
            raise planner.fail(where, f"expected a number, got {v!r}")
        return float(v)
    return convert


def _check_rule(planner: _Planner, rule: str):
    """A place taking a value of ``rule`` (a bool, a positive int, a positive number, a positive int or None)."""
    def convert(where, v):
        if not _obeys(v, rule):
            raise planner.fail(where, f"expected {rule}, got {v!r}")
        return float(v) if rule == "a positive number" else v
    return convert


def _check_choice(planner: _Planner, what: str, choices: tuple):
    def convert(where, v):
        if not any(_same(v, c) for c in choices):
            raise planner.fail(where, f"unknown {what} {v!r}; expected one of {choices}")
        return v
    return convert


def _check_rank(planner: _Planner):
    def convert(where, v):
        if v is None or v in HEAD_SIZES or (_is_int(v) and v > 0):
            return v
        raise planner.fail(where, f"expected None, a positive int or a head dim {HEAD_SIZES}, got {v!r}")
    return convert


_SIGNED = {"nonpositive": ("logsigmoid", 1 / 16), "negative": ("-softplus", 1.0), "nonnegative": ("softplus", 1.0),
           "positive": ("softplus", 1.0)}


def _default_source(spec: Recurrence, name: str, roles, switches: dict):
    """The default source of input ``name`` (see the module docstring)."""
    arg = spec.args[name]
    per_token = spec.dims(name)[:2] == (BATCH, TIME)
    contracts = spec.sign_contracts(switches)
    if not per_token:
        sign = arg.sign
        if sign in ("nonpositive", "negative"):
            return Param(init="log_uniform", transform="-exp")
        if sign in ("nonnegative", "positive"):
            return Param(init="log_uniform", transform="exp")
        return Param()
    if spec.transition.kind == "general" and name in (_bare(roles.a), _bare(roles.b)):
        return NormKey(sign=-1 if name == _bare(roles.a) else 1)
    if name in contracts:
        transform, scale = _SIGNED[contracts[name]]
        return Proj(transform=transform, scale=scale)
    if roles.beta is not None and name == _bare(roles.beta):
        return Proj(transform="sigmoid")
    if roles.log_decay is not None and name == _bare(roles.log_decay):
        return Proj(transform="logsigmoid", scale=1 / 16)
    return Proj()


def _dims(spec: Recurrence, name: str) -> list[str]:
    """An input's dims by role: B, T, then H (value heads), HQ (q/k heads), K or V."""
    inv = {sym: role for role, sym in reversed(list(spec.head_dims.items()))}
    return [d if d in (BATCH, TIME) else inv[d] for d in spec.dims(name)]


def _check_init(planner: _Planner):
    """A place taking an initialiser: one of INITS, or a number (that value everywhere)."""
    def convert(where, v):
        if _is_number(v):
            return float(v)
        if not isinstance(v, str) or v not in INITS:
            raise planner.fail(where, f"unknown initialiser {v!r}; expected one of {INITS} or a number")
        return v
    return convert


def _source(planner: _Planner, spec: Recurrence, n: str, dims: list[str], derive: bool = True):
    """The converter of input ``n``'s source (a Proj / Param / Const / NormKey, or with ``derive`` a Derive) into its
    plan entry."""
    per_token = dims[:2] == [BATCH, TIME]

    def convert(where, src):
        entry = {"dims": dims}
        if isinstance(src, Const):
            return dict(entry, kind="const", value=_check_number(planner)(f"{where}.value", src.value))
        if isinstance(src, Derive) and derive:
            return _derive(planner, spec, n, dims, where, src)
        if not isinstance(src, (Proj, Param, NormKey)):
            also = ", Derive(...)" if derive else ""
            raise planner.fail(where, f"expected Proj(...), Param(...), Const(...){also} or NormKey(...), got {src!r}")
        if isinstance(src, (Proj, NormKey)) and not per_token:
            raise planner.fail(where, f"a projection of the hidden states needs a per-token input ([B, T, ...]); "
                                      f"{n} is [{', '.join(spec.dims(n))}]: use Param")
        if isinstance(src, Param) and per_token:
            raise planner.fail(where, f"{n} is per token ([{', '.join(spec.dims(n))}]): use Proj, not Param")
        if not isinstance(src, NormKey):
            transform = planner.value(f"{where}.transform", src.transform,
                                      _check_choice(planner, "transform", (None, *TRANSFORMS)))
        if isinstance(src, Proj):
            if src.name is not None and (not isinstance(src.name, str) or not src.name.isidentifier()):
                raise planner.fail(f"{where}.name", f"expected an identifier, got {src.name!r}")
            return dict(entry, kind="proj", name=src.name,
                        rank=planner.value(f"{where}.rank", src.rank, _check_rank(planner)),
                        bias=planner.value(f"{where}.bias", src.bias, _check_rule(planner, "a bool")),
                        conv=planner.value(f"{where}.conv", src.conv, _check_rule(planner, "a bool")),
                        activation=planner.value(f"{where}.activation", src.activation,
                                                 _check_choice(planner, "activation", ACTIVATIONS)),
                        transform=transform,
                        scale=planner.value(f"{where}.scale", src.scale, _check_number(planner), arithmetic=True))
        if isinstance(src, Param):
            if not isinstance(src.flat, bool):
                raise planner.fail(f"{where}.flat", f"expected True or False, got {src.flat!r}")
            if src.dims is not None:
                raise planner.fail(f"{where}.dims", f"an op input's parameter has the input's shape; dims is for a "
                                                    f"Derive's params, got {src.dims!r}")
            return dict(entry, kind="param", name=None,
                        init=planner.value(f"{where}.init", src.init, _check_init(planner), arithmetic=True),
                        transform=transform, flat=src.flat)
        if src.sign not in (-1, 1):
            raise planner.fail(f"{where}.sign", f"expected -1 (a = -kk) or 1 (b = kk * sigmoid), got {src.sign!r}")
        if dims != [BATCH, TIME, "H", "K"]:
            raise planner.fail(where, f"NormKey needs an input of shape [B, T, H, K] (per value head and key "
                                      f"channel), got [{', '.join(spec.dims(n))}]")
        return dict(entry, kind="normkey", name=None, sign=src.sign)
    return convert


def _show(dims: list[str]) -> str:
    return f"[{', '.join(dims)}]"


def _broadcasts(dims: list[str], target: list[str]) -> bool:
    """Does a value of ``dims`` (by role) broadcast over one of ``target``: per token only into a per-token input,
    its head dims a subsequence of the target's, in order?"""
    per_token = dims[:2] == [BATCH, TIME]
    if per_token and target[:2] != [BATCH, TIME]:
        return False
    rest = iter(d for d in target if d not in (BATCH, TIME))
    return all(d in rest for d in dims if d not in (BATCH, TIME))


def _role_dims(planner: _Planner, spec: Recurrence, where: str, declared, default: list[str]) -> list[str]:
    """The head dims (by role) of a Derive's parameter: ``declared`` ("H", "H K"...; None: ``default``, the derived
    input's)."""
    if declared is None:
        return [d for d in default if d not in (BATCH, TIME)]
    if not isinstance(declared, str) or not declared.split():
        raise planner.fail(where, f"expected head dims by role {ROLES}, space-separated (\"H\", \"H K\"), got "
                                  f"{declared!r}")
    hd = spec.head_dims
    out = []
    for role in declared.split():
        if role not in ROLES:
            raise planner.fail(where, f"unknown dim {role!r}; expected some of {ROLES}")
        # the spec's K and V (H and HQ) may be one symbol: one role, as the inputs' dims name it
        role = "K" if role == "V" and hd["V"] == hd["K"] else "H" if role == "HQ" and hd["HQ"] == hd["H"] else role
        if role in out:
            raise planner.fail(where, f"dim {role!r} twice in {declared!r}")
        out.append(role)
    return out


def _derived_param(planner: _Planner, spec: Recurrence, key: str, dims: list[str]):
    """The converter of a Derive's parameter ``key`` (a Param or a ModelParam) into its plan entry."""
    def convert(where, p):
        if isinstance(p, Param):
            if not isinstance(p.flat, bool):
                raise planner.fail(f"{where}.flat", f"expected True or False, got {p.flat!r}")
            return {"kind": "param", "dims": _role_dims(planner, spec, f"{where}.dims", p.dims, dims),
                    "name": key, "init": planner.value(f"{where}.init", p.init, _check_init(planner), arithmetic=True),
                    "transform": planner.value(f"{where}.transform", p.transform,
                                               _check_choice(planner, "transform", (None, *TRANSFORMS))),
                    "flat": p.flat}
        if isinstance(p, ModelParam):
            if not isinstance(p.name, str) or not p.name.isidentifier() or p.name.startswith("_") \
                    or p.name in MODEL_ATTRIBUTES or p.name in _module_attributes():
                raise planner.fail(f"{where}.name", f"expected an identifier not starting with '_' that no model "
                                                    f"attribute has ({', '.join(MODEL_ATTRIBUTES)}...), got "
                                                    f"{p.name!r}")
            return {"kind": "model", "dims": _role_dims(planner, spec, f"{where}.dims", p.dims, dims),
                    "name": p.name, "init": planner.value(f"{where}.init", p.init, _check_init(planner),
                                                          arithmetic=True),
                    "rows": planner.value(f"{where}.rows", p.rows, _check_choice(planner, "rows", ROWS))}
        raise planner.fail(where, f"expected Param(...) or ModelParam(...), got {p!r}")
    return convert


def _derive(planner: _Planner, spec: Recurrence, n: str, dims: list[str], where: str, d: Derive) -> dict:
    """The plan entry of a Derive for input ``n`` (of ``dims``): its base, parameters, the op inputs it reads and its
    expression as PyTorch source."""
    if not isinstance(d.expr, str):
        raise planner.fail(f"{where}.expr", f"expected a string expression, got {d.expr!r}")
    if not isinstance(d.params, dict):
        raise planner.fail(f"{where}.params", f"expected a dict of name -> Param(...) / ModelParam(...), got "
                                              f"{d.params!r}")
    if not _is_int(d.from_layer) or d.from_layer < 0:
        raise planner.fail(f"{where}.from_layer", f"expected a non-negative int, got {d.from_layer!r}")
    substeps = set(spec.substeps.inputs) if spec.substeps is not None else set()
    if n in substeps:
        raise planner.fail(where, f"{n} is a sub-step input (several rows per token): it cannot be derived")
    params = {}
    for key, p in d.params.items():
        pw = f"{where}.params.{key}"
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise planner.fail(pw, f"expected an identifier not starting with '_', got {key!r}")
        if key in spec.args or key in ex.LAYER_FUNCTIONS or key == ex.HEAD_INDEX:
            raise planner.fail(pw, f"{key!r} is the name of an op input or a function; name the parameter otherwise")
        params[key] = planner.value(pw, p, _derived_param(planner, spec, key, dims))
    base = None if d.base is None else planner.value(f"{where}.base", d.base, _source(planner, spec, n, dims, False))
    symbols = {a: sp.Symbol(a) for a in (*spec.args, *params)}
    try:
        e = ex.parse(d.expr, symbols, ex.LAYER_FUNCTIONS)
    except ex.ExprSyntaxError as err:
        raise planner.fail(f"{where}.expr", str(err)) from None
    names = sorted(s.name for s in e.free_symbols)
    reads = [a for a in names if a in spec.args and a != n]
    if n in names and base is None:
        raise planner.fail(f"{where}.expr", f"reads {n} itself: give the value it derives from as base=...")
    if base is not None and n not in names and d.from_layer == 0:
        raise planner.fail(f"{where}.base", f"the expression {d.expr!r} never reads {n} (its base)")
    if d.from_layer > 0 and base is None:
        raise planner.fail(f"{where}.from_layer", "the layers before from_layer take the base: give base=...")
    for a in reads:
        if a in substeps:
            raise planner.fail(f"{where}.expr", f"reads {a}, a sub-step input (several rows per token)")
        if not _broadcasts(_dims(spec, a), dims):
            raise planner.fail(f"{where}.expr", f"reads {a} {_show(_dims(spec, a))}, which does not broadcast over "
                                                f"{n} {_show(dims)}")
    for key, node in params.items():
        for entry in planner.candidates(node):
            if not _broadcasts(entry["dims"], dims):
                raise planner.fail(f"{where}.params.{key}", f"dims {_show(entry['dims'])} do not broadcast over "
                                                            f"{n} {_show(dims)}")
    try:
        code = ex.to_code(e, {s: f"x[{s!r}]" for s in names}, ex.TORCH_FUNCS)
    except ex.ExprSyntaxError as err:
        raise planner.fail(f"{where}.expr", str(err)) from None
    return {"dims": dims, "kind": "derive", "name": None, "expr": str(e), "code": code, "base": base,
            "params": params, "reads": reads, "from_layer": d.from_layer}


def _gate(planner: _Planner):
    def convert(where, g):
        if g is None:
            return None
        if isinstance(g, str):
            g = Gate(activation=g)
        if not isinstance(g, Gate):
            raise planner.fail(where, f"expected None, a Gate(...) or one of {OUTPUT_GATES}, got {g!r}")
        return {"activation": planner.value(where, g.activation, _check_choice(planner, "output gate", OUTPUT_GATES)),
                "rank": planner.value(f"{where}.rank", g.rank, _check_rank(planner)),
                "bias": planner.value(f"{where}.bias", g.bias, _check_rule(planner, "a bool"))}
    return convert


def _size(planner: _Planner, role: str):
    def convert(where, s):
        if not isinstance(s, Size) or s.of not in SIZES:
            raise planner.fail(where, f"expected Size.of_hidden(...), Size.of_key(...) or Size.fixed(...), got {s!r}")
        if s.of == "key" and role == "K":
            raise planner.fail(where, "the key head dim cannot be a multiple of itself: use Size.of_hidden or "
                                      "Size.fixed")
        rule = "a positive int" if s.of == "fixed" else "a positive number"
        factor = planner.value(f"{where}.factor", s.factor, _check_rule(planner, rule), arithmetic=s.of != "fixed")
        return {"of": s.of, "factor": factor}
    return convert


def _module_attributes() -> set[str]:
    import torch

    return set(dir(torch.nn.Module))


def _entries(planner: _Planner, node) -> list[dict]:
    """The source entries a plan node may take (each option's values), a derivation's base in its place."""
    out = []
    for e in planner.candidates(node):
        if isinstance(e, dict) and e["kind"] == "derive":
            out += [] if e["base"] is None else _entries(planner, e["base"])
        elif isinstance(e, dict):
            out.append(e)
    return out


def _derivations(planner: _Planner, node) -> list[dict]:
    """The derivations a plan node may take."""
    return [e for e in planner.candidates(node) if isinstance(e, dict) and e["kind"] == "derive"]


def _names(planner: _Planner, inputs: dict, output: list[str]) -> None:
    """Give every projected input its module stem and every parameter its attribute, FLA-style, and check that no
    two modules share a name: an input left to its default name whose name is taken (by the output path, or an
    attribute every layer has) becomes ``<input>_in``; a declared name that is taken is a SpecError. A derivation's
    base is named as the input's source; its parameters are attributes named after their keys (declared alike,
    several derivations may share one)."""
    taken = dict.fromkeys(output, "the output path")
    reserved = set(LAYER_ATTRIBUTES) | _module_attributes()
    learned: dict[str, dict] = {}
    for n, node in inputs.items():
        entries = _entries(planner, node)
        declared = {e["name"] for e in entries if e["kind"] in ("proj", "normkey") and e["name"]}
        if len(declared) > 1:
            raise planner.fail(f"inputs.{n}.name", f"the values of one option name different modules {declared}")
        kinds = {e["kind"] for e in entries}
        conv = any(c is not False for e in entries if e["kind"] == "proj" for c in planner.candidates(e["conv"]))

        projected = any(e["kind"] == "proj" or (e["kind"] == "normkey" and e["sign"] > 0) for e in entries)

        def names(stem: str) -> list[str]:
            out = [f"{stem}_proj"] if projected else []
            return out + ([f"{stem}_conv1d"] if conv else []) + ([stem] if "param" in kinds else [])

        stem = declared.pop() if declared else n
        def clashes(stem: str) -> list[str]:
            return [m for m in names(stem) if m in taken or m in reserved or m.startswith("_")]

        clash = clashes(stem)
        if clash and stem == n and not any(e.get("name") for e in entries):
            stem = f"{n}_in"
            clash = clashes(stem)
        if clash:
            owner = taken.get(clash[0], "every layer")
            raise planner.fail(f"inputs.{n}", f"module name {clash[0]!r} is taken by {owner}; name the source "
                                              "otherwise (Proj(name=...))")
        taken.update(dict.fromkeys(names(stem), f"input {n!r}"))
        for e in entries:
            if e["kind"] in ("proj", "normkey", "param"):
                e["name"] = stem
        for d in _derivations(planner, node):
            for key, pnode in d["params"].items():
                for p in planner.candidates(pnode):
                    if p["kind"] != "param":
                        continue
                    if key in learned:
                        if learned[key] != p:
                            raise planner.fail(f"inputs.{n}.params.{key}", f"parameter {key!r} declared again "
                                                                           f"otherwise: {p} vs {learned[key]}")
                        continue
                    if key in taken or key in reserved:
                        raise planner.fail(f"inputs.{n}.params.{key}", f"name {key!r} is taken by "
                                                                       f"{taken.get(key, 'every layer')}")
                    learned[key] = p
                    taken[key] = f"a parameter of input {n!r}"


def _check_derivations(planner: _Planner, inputs: dict) -> None:
    """Every input a derivation reads is fed by the layer, no derivations read each other in a cycle (under any
    options), and a model-level parameter read in several places is declared alike."""
    reads: dict[str, set[str]] = {}
    model: dict[str, tuple[str, dict]] = {}
    for n, node in inputs.items():
        reads[n] = set()
        for d in _derivations(planner, node):
            for a in d["reads"]:
                if a not in inputs:
                    raise planner.fail(f"inputs.{n}.expr", f"reads {a}, an optional input that no role reads "
                                                           "under the layer's switches (the layer does not feed it)")
                reads[n].add(a)
            for key, pnode in d["params"].items():
                for p in planner.candidates(pnode):
                    if p["kind"] != "model":
                        continue
                    known = model.setdefault(p["name"], (n, p))
                    if known[1] != p:
                        raise planner.fail(f"inputs.{n}.params.{key}", f"model parameter {p['name']!r} declared "
                                                                       f"again otherwise (as input {known[0]!r}'s: "
                                                                       f"{known[1]} vs {p})")
    done: set[str] = set()

    def visit(n: str, path: list[str]) -> None:
        if n in path:
            cycle = path[path.index(n):] + [n]
            raise planner.fail(f"inputs.{cycle[0]}", f"derived inputs read each other in a cycle: "
                                                     f"{' -> '.join(cycle)}")
        if n in done:
            return
        for a in sorted(reads[n]):
            visit(a, path + [n])
        done.add(n)

    for n in inputs:
        visit(n, [])


def plan(spec: Recurrence, layer: Layer | None = None) -> dict:
    """The layer of ``spec`` as plain data: the options (config fields: default, check, type, where declared), the
    head sizes, per op input its source (``kind`` proj / param / const / normkey / derive, its dims by role, its
    module name and the source's fields), the op's switches, whether the layer L2-normalises q / k, RoPE, the output
    path, the block, the config's other defaults and the model name."""
    layer = Layer() if layer is None else layer
    if not isinstance(layer, Layer):
        raise _error(spec, "", f"expected a Layer(...), got {type(layer).__name__}")
    planner = _Planner(spec)
    for n in layer.inputs:
        if n not in spec.args:
            raise _error(spec, f"inputs.{n}", f"names no input of the spec (inputs: {list(spec.args)})")
    for k, v in layer.switches.items():
        if k not in spec.switches or not isinstance(v, bool):
            raise _error(spec, f"switches.{k}", f"expected a switch of the spec ({sorted(spec.switches)}) set to "
                                                f"True or False, got {v!r}")
    if layer.qk_norm not in ("auto", None, "l2"):
        raise _error(spec, "qk_norm", f"expected 'auto', None or 'l2', got {layer.qk_norm!r}")
    for where, name in (("name", layer.name), ("title", layer.title), ("norm_name", layer.norm_name)):
        if (name is not None or where == "norm_name") and (not isinstance(name, str) or not name.isidentifier()):
            raise _error(spec, where, f"expected an identifier, got {name!r}")
    if not isinstance(layer.defaults, dict) or not set(layer.defaults) <= set(SHARED_FIELDS):
        raise _error(spec, "defaults", f"expected a dict of the config's shared fields {SHARED_FIELDS}, got "
                                       f"{layer.defaults!r}")

    switches = dict(spec.switches)
    l2_switch = spec.qk_l2norm if isinstance(spec.qk_l2norm, str) else None
    needs_l2 = spec.transition.kind in ("delta", "general")
    if l2_switch is not None and needs_l2 and layer.qk_norm == "auto":
        switches[l2_switch] = True
    switches.update(layer.switches)
    roles = spec.resolve(switches)
    in_layer_l2 = layer.qk_norm == "l2" or (layer.qk_norm == "auto" and needs_l2 and not roles.qk_l2norm)

    hd = spec.head_dims
    sizes = {"K": planner.value("key_size", layer.key_size, _size(planner, "K")),
             "V": None if hd["K"] == hd["V"] else planner.value("value_size", layer.value_size, _size(planner, "V")),
             "HQ": None if hd["HQ"] == hd["H"] else planner.value(
                 "qk_heads", layer.qk_heads, _check_rule(planner, "a positive int or None"))}

    used = spec.uses(switches)
    inputs = {}
    for n in spec.args:
        dims = _dims(spec, n)
        if n not in used:   # no role reads it under these switches: zeros for a required input, else left out
            if n in spec.inputs:
                inputs[n] = {"dims": dims, "kind": "const", "value": 0.0}
            continue
        src = layer.inputs.get(n) or _default_source(spec, n, roles, switches)
        inputs[n] = planner.value(f"inputs.{n}", src, _source(planner, spec, n, dims))
    _check_derivations(planner, inputs)
    query, key = _bare(roles.query), _bare(roles.key)
    rope = None
    if layer.rope is not None:
        for role, n in (("query", query), ("key", key)):
            entries = planner.candidates(inputs[n]) if n in inputs else [None]
            if not all(isinstance(e, dict) and e["kind"] == "proj" and e["dims"][-1] == "K" for e in entries):
                raise _error(spec, "rope", f"RoPE turns the {role}: the spec's {role} must be one input, projected, "
                                           f"with the key dim last")
        rope = planner.value("rope", layer.rope, _check_rule(planner, "a positive number"), arithmetic=True)

    output_gate = planner.value("output_gate", layer.output_gate, _gate(planner))
    gated = any(g is not None for g in planner.candidates(output_gate))
    output = ["o_proj", layer.norm_name] + (["g_proj"] if gated else [])
    if spec.transition.kind == "general" and any(
            e["kind"] == "normkey" for node in inputs.values() for e in _entries(planner, node)):
        output.append("kk_proj")
    if layer.norm_name in set(LAYER_ATTRIBUTES) | _module_attributes() | {"o_proj", "g_proj", "kk_proj"}:
        raise _error(spec, "norm_name", f"expected a module name of its own, got {layer.norm_name!r}")
    _names(planner, inputs, output)

    convs = any(c is not False for node in inputs.values() for e in _entries(planner, node)
                if e["kind"] == "proj" for c in planner.candidates(e["conv"]))
    conv_size = planner.value("conv_size", layer.conv_size, _check_rule(planner, "a positive int")) if convs else None
    output_norm = planner.value("output_norm", layer.output_norm,
                                _check_choice(planner, "output norm", OUTPUT_NORMS))
    norm_eps = None if layer.norm_eps is None else planner.value(
        "norm_eps", layer.norm_eps, _check_rule(planner, "a positive number"), arithmetic=True)
    mlp = planner.value("mlp", layer.mlp, _check_rule(planner, "a bool"))
    substeps = None
    if spec.substeps is not None:   # sub-step inputs: projections n times as wide, n rows per token
        count = planner.value("substeps.count", Option(spec.substeps.count, 2), _check_rule(planner, "a positive int"))
        substeps = dict(inputs=list(spec.substeps.inputs), count=count, count_name=spec.substeps.count)
    name = layer.name or spec.name
    return dict(name=name, title=layer.title or "".join(p.capitalize() for p in name.split("_")),
                options=planner.options, defaults=dict(layer.defaults), sizes=sizes, conv_size=conv_size,
                inputs=inputs, switches=switches, required=list(spec.inputs), query=query, key=key,
                qk_l2norm=in_layer_l2, rope=rope, output_gate=output_gate, output_norm=output_norm,
                norm_name=layer.norm_name, norm_eps=norm_eps, mlp=mlp, substeps=substeps)
