"""The token-mixing layer of any spec, built from the plan ``linattn regen`` wrote into its generated module
(``LAYER``, from the spec file's layer declaration or the default derived from the spec:
:mod:`linattn_dsl.compiler.layer`). RetNet, GLA, DeltaNet, KDA and Gated DeltaNet are such layers.

    per op input:  proj  W x (full or low rank, bias) [-> short conv -> activation] -> transform * scale
                   param a learned tensor of the input's shape -> transform
                   const the same value at every position
                   normkey  kk = l2norm(W_kk x) per head; a = -kk, b = kk * sigmoid(W_b x)
                   derive   an expression of its base (any of the above), other inputs, learned parameters and
                            model-level rows (``layer_idx``'s row of a ModelParam), in dependency order
    q, k = l2norm(q), l2norm(k)                        (when declared in the layer)
    q, k = rope(q), rope(k)                            (with RoPE: positions after the tokens the state has seen)
    o, S = <spec op>(inputs..., initial_state=S)       (chunk to train or for long inputs, else fused_recurrent)
    out = W_o (rms_norm(o) * gate(W_g x))              (per head; the gate and the norm as declared)

Module names as FLA's: ``<input>_proj``, ``<input>_conv1d``, a parameter named after its input, ``g_proj``, the
declared norm name, ``o_proj``. Sizes: ``num_heads`` value heads H, q/k heads ``num_qk_heads`` (a spec that groups
them), key and value head dims as declared (``Size``: ``hidden_size * expand / num_heads`` by default). The
declaration's options (config fields) are the layer's keyword arguments.

A layer that reads a ModelParam gets it from its model: ``layer_idx`` (its index among the model's layers) and
``model_param`` (a callable, ``name -> [num_hidden_layers, width]`` parameter) are set by the model that builds it
(:class:`linattn_dsl.models.spec_model.SpecModel`); standing alone, its layers before the derivation's
``from_layer`` run, the others raise.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from linattn_dsl.modules import FusedRMSNormGated, RMSNorm, ShortConvolution, l2_norm

from ._checks import POSITIVE, POSITIVE_INT, check, check_all
from ._utils import LowRank, SequenceLayer, apply_rotary, check_mode, init_values, op_mode, positions_after_cache, \
    run_conv, seen_tokens, state_of

_TRANSFORMS = {
    None: lambda x: x,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "softplus": F.softplus,
    "-softplus": lambda x: -F.softplus(x),
    "exp": torch.exp,
    "-exp": lambda x: -torch.exp(x),
    "silu": F.silu,
    "relu": F.relu,
    "elu+1": lambda x: F.elu(x) + 1.0,
    "tanh": torch.tanh,
    "l2norm": l2_norm,
}


# ------------------------------------------------------------------ the plan's options


def _same(a, b) -> bool:
    """Equal, and both bools or neither (``True == 1`` is no match)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def resolve(node, values: dict):
    """The plan data ``node`` with every option replaced by its value in ``values`` (field -> value) and option
    arithmetic done (see :mod:`linattn_dsl.compiler.layer`)."""
    if isinstance(node, dict) and "$option" in node:
        value = values[node["$option"]]
        if "$values" not in node:
            return value
        return resolve(next(v for k, v in node["$values"] if _same(k, value)), values)
    if isinstance(node, dict) and "$op" in node:
        a, b = (resolve(x, values) for x in node["$args"])
        return a * b if node["$op"] == "*" else a / b
    if isinstance(node, dict):
        return {k: resolve(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, values) for v in node]
    return node


def check_option(name: str, value, entry: dict) -> None:
    """ValueError naming option ``name`` when ``value`` is not one it takes (its plan entry's rule or choices)."""
    if entry["rule"] is not None:
        check(name, value, entry["rule"])
    if entry["choices"] is not None and not any(_same(value, c) for c in entry["choices"]):
        raise ValueError(f"{name}: expected one of {entry['choices']}, got {value!r}")


def option_values(plan: dict, given: dict) -> dict:
    """Every option of ``plan``: its value in ``given`` or its default, checked. TypeError for a keyword that is no
    option."""
    unknown = sorted(set(given) - set(plan["options"]))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; this layer's options are {list(plan['options'])}")
    values = {name: given.get(name, entry["default"]) for name, entry in plan["options"].items()}
    for name, entry in plan["options"].items():
        check_option(name, values[name], entry)
    return values


def _factor_name(size: dict, fallback: str) -> str:
    factor = size["factor"]
    return factor["$option"] if isinstance(factor, dict) and "$option" in factor else fallback


def head_sizes(plan: dict, values: dict, hidden_size: int, num_heads: int) -> dict[str, int]:
    """The layer's sizes by role (``H`` value heads, ``HQ`` q/k heads, ``K`` / ``V`` head dims) for these option
    values; ValueError naming the field that makes them impossible."""
    sizes = {"H": num_heads}
    declared = plan["sizes"]
    names = {role: _factor_name(declared[role], f"{role} size") for role in ("K", "V") if declared[role]}
    split = {}
    for role in ("K", "V"):
        size = declared[role]
        if size is None or size["of"] == "key":
            continue
        factor = resolve(size["factor"], values)
        if size["of"] == "fixed":
            sizes[role] = factor
            continue
        dim, name = int(hidden_size * factor), names[role]
        if dim < num_heads:
            raise ValueError(f"{name}: hidden_size * {name} = {hidden_size} * {factor} gives {dim} channels, fewer "
                             f"than num_heads={num_heads}; expected at least one channel per head")
        split[role] = dim
    if any(dim % num_heads for dim in split.values()):
        dims = " and ".join(f"{'key' if role == 'K' else 'value'} dim {dim}" for role, dim in split.items())
        formulas = ", ".join(f"hidden_size * {names[role]}" for role in split)
        raise ValueError(f"num_heads: expected a divisor of {dims} ({formulas}), got {num_heads}")
    sizes.update({role: dim // num_heads for role, dim in split.items()})
    if declared["V"] is None:   # the spec's key and value share one symbol
        sizes["V"] = sizes["K"]
    elif declared["V"]["of"] == "key":
        factor = resolve(declared["V"]["factor"], values)
        dim = int(sizes["K"] * factor)
        if dim < 1:
            raise ValueError(f"{names['V']}: {names['K']} * {names['V']} = {sizes['K']} * {factor} gives {dim} value "
                             "channels per head; expected at least 1")
        sizes["V"] = dim
    qk_heads = None if declared["HQ"] is None else resolve(declared["HQ"], values)
    if qk_heads is not None and num_heads % qk_heads:
        raise ValueError(f"num_qk_heads: expected None or a positive divisor of num_heads={num_heads}, got "
                         f"{qk_heads!r}")
    sizes["HQ"] = num_heads if qk_heads is None else qk_heads
    return sizes


def model_params(plan: dict, values: dict, hidden_size: int, num_heads: int) -> dict[str, tuple[int, object]]:
    """The model-level parameters (ModelParam) the layers of ``plan`` read under these option values: name ->
    (width: channels per layer, initialiser)."""
    resolved = resolve(plan, values)
    sizes = head_sizes(plan, values, hidden_size, num_heads)
    out = {}
    for src in resolved["inputs"].values():
        if src["kind"] != "derive":
            continue
        for p in src["params"].values():
            if p["kind"] == "model":
                out[p["name"]] = (math.prod(sizes[d] for d in p["dims"]), p["init"])
    return out


# ------------------------------------------------------------------ the layer


class SpecLayer(SequenceLayer):
    """``[B, T, hidden] -> [B, T, hidden]`` through the op of a generated module ``module`` (its ``LAYER`` plan, see
    the module docstring); ``options``: the declaration's options (their defaults where not given)."""

    def __init__(self, module, hidden_size: int = 1024, num_heads: int = 4, norm_eps: float = 1e-5,
                 mode: str | None = None, **options) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT}, locals())
        plan = module.LAYER
        values = option_values(plan, options)
        check("norm_eps", norm_eps, POSITIVE)
        super().__init__()
        self.spec_name = module.SIGNATURE.name
        self._ops = {m: getattr(module, f"{m}_{self.spec_name}") for m in ("chunk", "fused_recurrent")}
        self.options = values
        self.plan = resolve(plan, values)
        sub = self.plan.get("substeps")
        for name, src in self.plan["inputs"].items():
            src["rows"] = sub["count"] if sub and name in sub["inputs"] else 1
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.sizes = head_sizes(plan, values, hidden_size, num_heads)
        self.num_qk_heads = self.sizes["HQ"]
        self.head_k_dim, self.head_v_dim = self.sizes["K"], self.sizes["V"]
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.rope_theta = self.plan["rope"]
        self.mode = check_mode(mode)
        self.layer_idx = 0                 # set by the model that builds the layer (it reads its ModelParam rows)
        self.model_param = None            # name -> the model's parameter [num_hidden_layers, width]
        sources = self.plan["inputs"].values()
        for kind in ("proj", "conv", "param"):   # the projections, then the convs, then the parameters
            for src in sources:
                self._build_source(src, kind)
        gate = self.plan["output_gate"]
        norm_eps = self.plan.get("norm_eps") or norm_eps   # the declaration's own, else the model's
        if gate is not None:
            self.g_proj = self._projection(self.value_dim, gate["rank"], gate["bias"])
            norm = FusedRMSNormGated(self._norm_width, eps=norm_eps, activation=gate["activation"])
        else:
            norm = RMSNorm(self._norm_width, eps=norm_eps) if self.plan["output_norm"] else None
        if norm is not None:
            self.add_module(self.plan["norm_name"], norm)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        init_values(self)

    @property
    def _norm_width(self) -> int:
        """The output norm's width: a head's values, or every head's (``output_norm="all"``)."""
        return self.value_dim if self.plan["output_norm"] == "all" else self.head_v_dim

    def _shape(self, src: dict) -> list[int]:
        return [self.sizes[d] for d in src["dims"] if d not in ("B", "T")]

    def _projection(self, width: int, rank, bias: bool) -> nn.Module:
        if rank is None:
            return nn.Linear(self.hidden_size, width, bias=bias)
        return LowRank(self.hidden_size, width, self.sizes.get(rank, rank), bias=bias)

    @staticmethod
    def _rows(src: dict) -> int:
        """Rows per token of an input: a sub-step input's count (``num_householder``), else 1."""
        return src.get("rows", 1)

    def _build_source(self, src: dict, part: str) -> None:
        """The modules of one input's source: its projection(s), its conv or its parameter (``part``); a
        derivation's: its base's, and its learned parameters (one per name)."""
        if src["kind"] == "derive":
            if src["base"] is not None:
                self._build_source(src["base"], part)
            for p in src["params"].values():
                if part == "param" and p["kind"] == "param" and p["name"] not in self._parameters:
                    self._build_source(p, part)
            return
        width = math.prod(self._shape(src)) * (self._rows(src) if src["kind"] != "param" else 1)
        if part == "param" and src["kind"] == "param":
            shape = [width] if src["flat"] else self._shape(src)
            self.register_parameter(src["name"], nn.Parameter(torch.zeros(shape)))
        elif part == "conv" and src["kind"] == "proj" and src["conv"]:
            self.add_module(f"{src['name']}_conv1d", ShortConvolution(
                width, self.plan["conv_size"], activation="silu" if _conv_silu(src) else None))
        elif part == "proj" and src["kind"] == "proj":
            self.add_module(f"{src['name']}_proj", self._projection(width, src["rank"], src["bias"]))
        elif part == "proj" and src["kind"] == "normkey":   # one shared kk projection, and b's gate
            if not hasattr(self, "kk_proj"):
                self.kk_proj = nn.Linear(self.hidden_size, width, bias=False)
            if src["sign"] > 0:
                self.add_module(f"{src['name']}_proj", nn.Linear(self.hidden_size, width, bias=False))

    def _params(self) -> list[dict]:
        """The plan entries of the layer's learned parameters: the inputs' and the derivations' (theirs and their
        bases')."""
        out = []
        for src in self.plan["inputs"].values():
            if src["kind"] == "derive":
                out += [p for p in src["params"].values() if p["kind"] == "param"]
                src = src["base"] or {"kind": None}
            if src["kind"] == "param":
                out.append(src)
        return out

    def special_init(self) -> dict:
        """The parameters' declared initialisers (zeros are the default): ones, normal(0, 0.02), log U(0.5, 4),
        Mamba's ``A_log`` (log U(1, 16)) and ``dt_bias`` (softplus^-1 of dt log-uniform in [0.001, 0.1], floored
        at 1e-4), or a number."""
        return {src["name"]: init_value(src["init"], self.get_parameter(src["name"])) for src in self._params()
                if src["init"] != "zeros"}

    def _input(self, src: dict, x: torch.Tensor, cache, use_cache: bool, new_state: dict, kk: list,
               cu_seqlens: torch.Tensor | None = None, cp_context=None) -> torch.Tensor:
        y = self._input_rows(src, x, cache, use_cache, new_state, kk, cu_seqlens, cp_context)
        return y.flatten(1, 2) if self._rows(src) > 1 else y   # n rows per token: the op takes [B, T * n, ...]

    def _input_rows(self, src: dict, x: torch.Tensor, cache, use_cache: bool, new_state: dict, kk: list,
                    cu_seqlens: torch.Tensor | None = None, cp_context=None) -> torch.Tensor | None:
        if src["kind"] == "derive":   # its base here (None without one); _derive computes the rest
            base = src["base"]
            return None if base is None else self._input_rows(base, x, cache, use_cache, new_state, kk, cu_seqlens,
                                                               cp_context)
        B, T = x.shape[:2]
        shape = self._shape(src)
        if self._rows(src) > 1:
            shape = [self._rows(src), *shape]
        if src["kind"] == "param":
            return _TRANSFORMS[src["transform"]](self.get_parameter(src["name"]).view(shape))
        if src["kind"] == "const":
            return x.new_full((B, T, *shape), src["value"])
        if src["kind"] == "normkey":
            if not kk:
                kk.append(l2_norm(self.kk_proj(x).reshape(B, T, *shape)))
            if src["sign"] < 0:
                return -kk[0]
            return kk[0] * torch.sigmoid(self.get_submodule(f"{src['name']}_proj")(x).reshape(B, T, *shape))
        y = self.get_submodule(f"{src['name']}_proj")(x)
        transform = src["transform"]
        if src["conv"]:
            y = run_conv(self.get_submodule(f"{src['name']}_conv1d"), y, cache, src["name"], use_cache, new_state,
                         cu_seqlens, cp_context)
            if src["activation"] == "relu":
                y = F.relu(y)
            elif _conv_silu(src) and src["activation"] == "identity":   # the transform ran in the conv
                transform = None
        y = _TRANSFORMS[transform](y.reshape(B, T, *shape))
        return y * src["scale"] if src["scale"] != 1.0 else y

    def mix(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
            position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, cp_context=None,
            **_) -> tuple[torch.Tensor, dict | None]:
        """With RoPE, ``position_ids [B, T]`` place it (default: after the tokens the state has seen, or within
        each packed document of ``cu_seqlens``, or at this rank's global positions under ``cp_context``)."""
        plan = self.plan
        new_state: dict = {}
        kk: list = []
        inputs = {n: self._input(src, x, cache, use_cache, new_state, kk, cu_seqlens, cp_context)
                  for n, src in plan["inputs"].items()}
        self._derive(inputs)
        turned = {plan["query"], plan["key"]} - {None}
        if plan["qk_l2norm"]:
            for n in turned:
                inputs[n] = l2_norm(inputs[n])
        if self.rope_theta is not None:
            positions = positions_after_cache(position_ids, x, cache, attention_mask, cu_seqlens, cp_context)
            for n in turned:
                inputs[n] = apply_rotary(inputs[n], positions, self.rope_theta)
        mode = op_mode(x.shape[1], self.training, self.mode, cp_context)
        required = [inputs.get(n) for n in plan["required"]]
        optional = {n: t for n, t in inputs.items() if n not in plan["required"]}
        if plan.get("substeps"):
            optional[plan["substeps"]["count_name"]] = plan["substeps"]["count"]
        o, recurrent_state = self._ops[mode](*required, **optional, **plan["switches"],
                                             initial_state=state_of(cache, "recurrent_state"),
                                             output_final_state=use_cache, cu_seqlens=cu_seqlens,
                                             cp_context=cp_context)
        norm = getattr(self, plan["norm_name"], None)
        if plan["output_norm"] == "all":   # one norm over every head's values
            o = o.reshape(*o.shape[:-2], 1, self.value_dim)
        if plan["output_gate"] is not None:
            o = norm(o, self.g_proj(x).reshape(*o.shape))
        elif norm is not None:
            o = norm(o)
        out = self.o_proj(o.reshape(*o.shape[:-2], self.value_dim))
        if not use_cache:
            return out, None
        state = {**new_state, "recurrent_state": recurrent_state}
        if self.rope_theta is not None:
            state["seen_tokens"] = seen_tokens(cache) + x.shape[1]
        return out, state


    # ------------------------------------------------------------------ derived inputs

    def _derive(self, inputs: dict) -> None:
        """Replace each derived input's base (in ``inputs``) by its expression's value, in dependency order; a
        per-token one in the dtype of the other per-token inputs (the op takes one)."""
        derived = [n for n, src in self.plan["inputs"].items() if src["kind"] == "derive"]
        if not derived:
            return
        plain = [t for n, t in inputs.items() if n not in derived and self.plan["inputs"][n]["dims"][:2] == ["B", "T"]]
        dtype = plain[0].dtype if plain else None
        done: set[str] = set()

        def visit(n: str) -> None:
            if n in done:
                return
            src = self.plan["inputs"][n]
            for a in src["reads"]:
                if a in derived:
                    visit(a)
            done.add(n)
            if self.layer_idx < src["from_layer"]:
                return   # the base as it is
            dims = src["dims"]
            values = {n: inputs[n]} if inputs[n] is not None else {}
            values.update({a: _aligned(inputs[a], self.plan["inputs"][a]["dims"], dims) for a in src["reads"]})
            for key, p in src["params"].items():
                values[key] = _aligned(self._param_value(p), p["dims"], dims)
            y = _compiled(src["code"])(values)
            if dims[:2] == ["B", "T"] and dtype is not None:
                y = y.to(dtype)
            inputs[n] = y

        for n in derived:
            visit(n)

    def _param_value(self, p: dict) -> torch.Tensor:
        """A derivation's parameter in its dims: this layer's (through its transform) or this layer's row of the
        model's (``rows`` applied)."""
        shape = [self.sizes[d] for d in p["dims"]]
        if p["kind"] == "param":
            return _TRANSFORMS[p["transform"]](self.get_parameter(p["name"]).view(shape))
        if self.model_param is None:
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}) reads the model's parameter "
                             f"{p['name']!r}: build it inside a model (linattn_dsl.models), which holds it")
        table = self.model_param(p["name"])
        if p["rows"] == "cumsoftmax":   # softmax over the layers, cumulative, minus the first row (0 at layer 0)
            table = table.softmax(0, dtype=torch.float32)
            table = table.cumsum(0) - table[0]
        return table[self.layer_idx].view(shape)


def init_value(init, p: torch.Tensor) -> torch.Tensor:
    """The initial value of parameter ``p`` under a plan's initialiser (see :meth:`SpecLayer.special_init`)."""
    if isinstance(init, (int, float)):
        return torch.full_like(p, float(init))
    if init == "zeros":
        return torch.zeros_like(p)
    if init == "ones":
        return torch.ones_like(p)
    if init == "normal":
        return torch.randn_like(p) * 0.02
    if init == "a_log":
        return torch.empty_like(p).uniform_(1.0, 16.0).log()
    if init == "dt_bias":
        dt = torch.exp(torch.rand_like(p) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp_min(1e-4)
        return dt + torch.log(-torch.expm1(-dt))
    return torch.empty_like(p).uniform_(0.5, 4.0).log()


def _aligned(t: torch.Tensor, dims: list[str], target: list[str]) -> torch.Tensor:
    """``t`` (of ``dims`` by role) viewed to broadcast over a value of ``target`` dims (the plan checked that its
    dims are a subsequence of the target's)."""
    if dims == target:
        return t
    return t.reshape([t.shape[dims.index(d)] if d in dims else 1 for d in target])


@functools.cache
def _compiled(code: str):
    """A derivation's PyTorch source (an expression of the dict ``x`` of its values), as a function of ``x``,
    compiled once."""
    return eval(f"lambda x: {code}", {"torch": torch, "__builtins__": {}})


def _conv_silu(src: dict) -> bool:
    """Does the short conv of a projected input end in silu: its activation, or (activation ``identity``) a silu
    transform that the conv runs fused?"""
    return src["activation"] == "silu" or (src["activation"] == "identity" and src["transform"] == "silu")


# spec name -> the layer class of its declaration (declared_layer)
DECLARED: dict[str, type[SpecLayer]] = {}


def declared_layer(spec_name: str, class_name: str, **defaults) -> type[SpecLayer]:
    """The layer class of a shipped spec's declaration: ``class_name(hidden_size, num_heads, *, <options>,
    norm_eps=1e-5, mode=None)``, a :class:`SpecLayer` of ``linattn_dsl.generated.<spec_name>``. ``defaults``:
    the layer's own defaults of ``hidden_size`` (1024) and ``num_heads`` (the declaration's)."""
    module = importlib.import_module(f"linattn_dsl.generated.{spec_name}")
    plan = module.LAYER
    hidden_default = defaults.get("hidden_size", 1024)
    heads_default = defaults.get("num_heads", plan["defaults"].get("num_heads", 4))

    def __init__(self, hidden_size: int = hidden_default, num_heads: int = heads_default, *,
                 norm_eps: float = 1e-5, mode: str | None = None, **options) -> None:
        SpecLayer.__init__(self, module, hidden_size, num_heads, norm_eps=norm_eps, mode=mode, **options)

    kw = inspect.Parameter.KEYWORD_ONLY
    __init__.__signature__ = inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("hidden_size", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=hidden_default),
        inspect.Parameter("num_heads", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=heads_default),
        *(inspect.Parameter(name, kw, default=entry["default"]) for name, entry in plan["options"].items()),
        inspect.Parameter("norm_eps", kw, default=1e-5), inspect.Parameter("mode", kw, default=None)])
    doc = (f"``[B, T, hidden] -> [B, T, hidden]``: the layer that ``linattn_dsl/specs/{spec_name}.py`` declares, "
           f"built by :class:`SpecLayer`; options {', '.join(plan['options']) or 'none'}.")
    cls = type(class_name, (SpecLayer,), {"__init__": __init__, "__doc__": doc, "__module__": "linattn_dsl.layers",
                                          "__qualname__": class_name})
    DECLARED[spec_name] = cls
    return cls
