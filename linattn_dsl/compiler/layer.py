"""How a token-mixing layer feeds a spec's op: the layer declaration of a spec file, and the default derived from
the spec alone.

A spec file may declare, next to ``spec``, ``layer = Layer(...)``: for each op input its source

* :class:`Proj`: a linear projection of the hidden states to the input's shape (full, or low rank), with or
  without bias, optionally through a short causal convolution and its activation, then a transform;
* :class:`Param`: a learned per-head / per-channel parameter (the input's own shape) with its initialiser;
* :class:`NormKey`: the general transition's contractive pair from one L2-normalised key ``kk`` per head:
  ``a = -kk``, ``b = kk * sigmoid(W x)``;

plus the q / k norm, the output path (per-head RMSNorm, an output gate, the output projection), the block
around the layer (an MLP or none) and the model name (``linattn_<name>``). Inputs the declaration leaves out
(and a spec file without one) get the default, role-aware so that a model is stable from its first step:

* a per-token input comes from a linear projection of the hidden states; one whose declared sign the spec relies
  on is produced through a transform that guarantees it (non-positive: ``logsigmoid(x) / 16``, negative:
  ``-softplus(x)``, non-negative: ``softplus(x)``); a role that is the bare input gets its bounding transform
  (beta: ``sigmoid``, a log-decay: ``logsigmoid(x) / 16``), a role the spec already bounds stays raw;
* q / k of a delta or general transition are L2-normalised (the spec's q/k-norm switch on, or in the layer);
* the general transition's ``a``, ``b`` given as bare inputs: :class:`NormKey`;
* a per-head or per-channel parameter: zeros, or ``-exp(p)`` with ``p = log U(0.5, 4)`` where its sign is
  non-positive or negative (``exp(p)`` for non-negative or positive);
* output: per-head RMSNorm, a swish output gate, the output projection; the block: pre-norm with a SwiGLU MLP.

:func:`plan` turns a spec and its declaration into plain data (``linattn regen`` writes it into the generated
module as ``LAYER``), which :class:`linattn_dsl.layers.SpecLayer` builds its modules from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from . import expr as ex
from .spec import BATCH, TIME, Recurrence, SpecError

TRANSFORMS = ("sigmoid", "logsigmoid", "softplus", "-softplus", "exp", "-exp", "silu", "relu", "elu+1", "l2norm",
              "tanh")
ACTIVATIONS = ("silu", "relu", "identity")
INITS = ("zeros", "ones", "normal", "log_uniform", "a_log", "dt_bias")
OUTPUT_GATES = ("swish", "sigmoid")


@dataclass(frozen=True)
class Proj:
    """A linear projection of the hidden states to the input's shape: full (``rank=None``) or through a rank-
    ``rank`` bottleneck, with or without ``bias``; with ``conv`` a short causal convolution (the config's
    ``conv_size``) and ``activation`` after it; then ``transform`` (one of TRANSFORMS, per head for ``l2norm``)
    times ``scale``."""

    rank: int | None = None
    bias: bool = False
    conv: bool = False
    activation: str = "silu"
    transform: str | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class Param:
    """A learned parameter of the input's own shape (per head, per head and channel), initialised by ``init``
    (zeros, ones, normal(0, 0.02), log_uniform: log U(0.5, 4); Mamba's a_log: log U(1, 16), and dt_bias: the
    inverse softplus of dt log-uniform in [0.001, 0.1]) and used through ``transform`` (None, ``exp``, ``-exp``,
    ``softplus``, ...)."""

    init: str = "zeros"
    transform: str | None = None


@dataclass(frozen=True)
class NormKey:
    """The general transition's ``a`` (``sign=-1``: ``-kk``) or ``b`` (``sign=1``: ``kk * sigmoid(W x)``, a
    projection of its own), ``kk`` one L2-normalised projection per head shared by both."""

    sign: int = -1


@dataclass(frozen=True)
class Layer:
    """A spec's token-mixing layer (see the module docstring). ``inputs``: op input name -> Proj / Param / NormKey
    (the rest derived); ``switches``: the op's switch values (default: the spec's, with a q/k-norm switch on for
    delta and general transitions); ``qk_norm``: "auto", None or "l2" (in the layer); ``output_gate``: "swish",
    "sigmoid" or None; ``output_norm``: True for the per-head RMSNorm; ``mlp``: the block's SwiGLU MLP (False:
    mixer-only blocks); ``name``: the model's name, ``linattn_<name>`` (default: the spec's name)."""

    inputs: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)
    qk_norm: str | None = "auto"
    output_gate: str | None = "swish"
    output_norm: bool = True
    mlp: bool = True
    name: str | None = None


def _error(spec: Recurrence, where: str, why: str) -> SpecError:
    return SpecError(spec.name, f"layer.{where}", why)


def _bare(e) -> str | None:
    return e.name if isinstance(e, sp.Symbol) and e.name != ex.HEAD_INDEX else None


def _check(spec: Recurrence, layer: Layer) -> None:
    if not isinstance(layer, Layer):
        raise _error(spec, "", f"expected a Layer(...), got {type(layer).__name__}")
    for n, src in layer.inputs.items():
        if n not in spec.args:
            raise _error(spec, f"inputs.{n}", f"names no input of the spec (inputs: {list(spec.args)})")
        if not isinstance(src, (Proj, Param, NormKey)):
            raise _error(spec, f"inputs.{n}", f"expected Proj(...), Param(...) or NormKey(...), got {src!r}")
        per_token = spec.dims(n)[:2] == (BATCH, TIME)
        if isinstance(src, (Proj, NormKey)) and not per_token:
            raise _error(spec, f"inputs.{n}", f"a projection of the hidden states needs a per-token input "
                                              f"([B, T, ...]); {n} is [{', '.join(spec.dims(n))}]: use Param")
        if isinstance(src, Param) and per_token:
            raise _error(spec, f"inputs.{n}", f"{n} is per token ([{', '.join(spec.dims(n))}]): use Proj, not Param")
        transform = getattr(src, "transform", None)
        if transform is not None and transform not in TRANSFORMS:
            raise _error(spec, f"inputs.{n}.transform", f"unknown transform {transform!r}; expected one of "
                                                         f"{TRANSFORMS}")
        if isinstance(src, Proj):
            if src.activation not in ACTIVATIONS:
                raise _error(spec, f"inputs.{n}.activation", f"unknown activation {src.activation!r}; expected "
                                                              f"one of {ACTIVATIONS}")
            if src.rank is not None and (not isinstance(src.rank, int) or src.rank < 1):
                raise _error(spec, f"inputs.{n}.rank", f"expected None or a positive int, got {src.rank!r}")
        if isinstance(src, Param) and src.init not in INITS:
            raise _error(spec, f"inputs.{n}.init", f"unknown initialiser {src.init!r}; expected one of {INITS}")
        if isinstance(src, NormKey) and src.sign not in (-1, 1):
            raise _error(spec, f"inputs.{n}.sign", f"expected -1 (a = -kk) or 1 (b = kk * sigmoid), got {src.sign!r}")
    for k, v in layer.switches.items():
        if k not in spec.switches or not isinstance(v, bool):
            raise _error(spec, f"switches.{k}", f"expected a switch of the spec ({sorted(spec.switches)}) set to "
                                                f"True or False, got {v!r}")
    if layer.qk_norm not in ("auto", None, "l2"):
        raise _error(spec, "qk_norm", f"expected 'auto', None or 'l2', got {layer.qk_norm!r}")
    if layer.output_gate not in (None, *OUTPUT_GATES):
        raise _error(spec, "output_gate", f"expected None or one of {OUTPUT_GATES}, got {layer.output_gate!r}")
    if layer.name is not None and (not isinstance(layer.name, str) or not layer.name.isidentifier()):
        raise _error(spec, "name", f"expected an identifier, got {layer.name!r}")


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


def plan(spec: Recurrence, layer: Layer | None = None) -> dict:
    """The layer of ``spec`` as plain data: per op input its source (``kind`` proj / param / normkey, or zeros for a
    required input no role reads; its dims by role, and the source's fields), the op's switches, whether the layer
    L2-normalises q / k, the output path, the block and the model name."""
    layer = Layer() if layer is None else layer
    _check(spec, layer)
    switches = dict(spec.switches)
    l2_switch = spec.qk_l2norm if isinstance(spec.qk_l2norm, str) else None
    needs_l2 = spec.transition.kind in ("delta", "general")
    if l2_switch is not None and needs_l2 and layer.qk_norm == "auto":
        switches[l2_switch] = True
    switches.update(layer.switches)
    roles = spec.resolve(switches)
    in_layer_l2 = layer.qk_norm == "l2" or (layer.qk_norm == "auto" and needs_l2 and not roles.qk_l2norm)
    used = spec.uses(switches)
    inputs = {}
    for n in spec.args:
        entry = {"dims": _dims(spec, n)}
        if n not in used:   # no role reads it under these switches: zeros for a required input, else left out
            if n in spec.inputs:
                inputs[n] = dict(entry, kind="zeros")
            continue
        src = layer.inputs.get(n) or _default_source(spec, n, roles, switches)
        if isinstance(src, Proj):
            entry.update(kind="proj", rank=src.rank, bias=src.bias, conv=src.conv, activation=src.activation,
                         transform=src.transform, scale=float(src.scale))
        elif isinstance(src, Param):
            entry.update(kind="param", init=src.init, transform=src.transform)
        else:
            if entry["dims"] != [BATCH, TIME, "H", "K"]:
                raise _error(spec, f"inputs.{n}", f"NormKey needs an input of shape [B, T, H, K] (per value head "
                                                  f"and key channel), got [{', '.join(spec.dims(n))}]")
            entry.update(kind="normkey", sign=src.sign)
        inputs[n] = entry
    return dict(name=layer.name or spec.name, inputs=inputs, switches=switches, required=list(spec.inputs),
                query=_bare(roles.query), key=_bare(roles.key), qk_l2norm=in_layer_l2, output_gate=layer.output_gate,
                output_norm=bool(layer.output_norm), mlp=bool(layer.mlp))
