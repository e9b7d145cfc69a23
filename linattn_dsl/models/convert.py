"""Convert a checkpoint saved by FLA (flash-linear-attention 0.6, ``fla.models``), or by transformers'
``MambaForCausalLM``, into one of ours.

``convert_fla(src, dst)`` reads ``src`` (FLA's ``save_pretrained`` folder: ``config.json`` and ``model.safetensors``
or its shards), maps the config fields and the parameter names, checks every tensor against the model our
config builds (names and shapes, nothing left over on either side), and writes ``dst``, a folder
``AutoModelForCausalLM.from_pretrained`` loads (model_type ``linattn_<family>``). Tensors keep their dtype.

One :class:`Family` table per FLA model_type says how: the config fields (FLA's block layouts included: Mamba2's
mixer-only blocks are ``use_mlp=False``, RWKV7's LayerNorms and layer-0 pre-norm ``norm_type="layer"``,
``pre_norm=True``), the parameter renames inside the token mixer, and the FLA options our layers do not have (each a
:class:`Require`; FLA's defaults all pass). A checkpoint that cannot be converted exactly raises ``ValueError``
naming the family and the reason; nothing is loaded approximately. Comba and HGRN2 become the models their spec
files declare (``linattn_comba``, ``linattn_hgrn2``: FLA's names, HGRN2's ``model.lower_bounds`` included).

Parameter names, FLA -> ours (``<p>`` is FLA's backbone attribute, ``model`` or ``backbone``)::

    <p>.embeddings.*                   model.embeddings.*
    <p>.norm.* / <p>.norm_f.*          model.norm.*
    <p>.layers.i.<block part>.rest     model.layers.i.<our part>.rest     (Family.block: attn -> mixer ...)
    <p>.layers.i.attn.<mixer name>     model.layers.i.mixer.<our name>    (Family.mixer, linear-attention layers only;
                                                                          hybrid softmax-attention layers keep theirs)
    lm_head.weight                     lm_head.weight                     (absent when the embeddings are tied)

``convert_hf_mamba(src, dst)`` does the same for transformers' ``MambaForCausalLM`` (model_type ``mamba``) with the
table :data:`HF_MAMBA`: ``backbone.layers.i.norm`` -> ``model.layers.i.attn_norm``, ``backbone.norm_f`` ->
``model.norm``, the mixer's parameters under their own names and shapes (our conv weight is ``[d_inner, 1, k]`` as
HF's ``nn.Conv1d``), ``layer_norm_epsilon`` -> ``norm_eps``, mixer-only blocks (``use_mlp=False``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# our config fields copied from FLA's config under the same name (when FLA's config has them)
SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "norm_eps", "tie_word_embeddings",
                 "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id")
# the keys of one entry of FLA's hybrid ``attn`` config that ours has; ``qkv_bias`` must be False
ATTN_FIELDS = ("num_heads", "num_kv_heads", "window_size", "rope_theta")


@dataclass(frozen=True)
class Require:
    """An FLA config option our model has no equivalent for: ``ok(value, fla_config)`` must hold (a missing field
    reads as ``default``, FLA's default); ``expected`` says what passes, ``why`` what our layer lacks."""

    field: str
    ok: Callable[[Any, dict], bool]
    expected: str
    why: str
    default: Any = None


def equals(*allowed) -> Callable[[Any, dict], bool]:
    return lambda value, config: value in allowed


def same_as(other: str) -> Callable[[Any, dict], bool]:
    """None or the value of FLA's field ``other`` (grouped heads that are not grouped)."""
    return lambda value, config: value is None or value == config.get(other)


@dataclass(frozen=True)
class Family:
    """How one FLA model_type maps onto one of our families (a key of ``linattn_dsl.models.FAMILIES``).

    ``config``: our field -> FLA's field name, or a function of FLA's config (dict). ``block``: FLA's submodule of a
    block -> ours. ``mixer``: inside a linear-attention mixer, FLA's parameter name or module path -> ours (the
    longest matching module path wins; unmatched names stay). ``mlp_weight``: our parameter whose first dimension is
    ``intermediate_size``. ``source``: who saved the checkpoint, as errors name it."""

    ours: str
    config: dict[str, str | Callable[[dict], Any]]
    requires: tuple[Require, ...] = ()
    backbone: str = "model"
    final_norm: str = "norm"
    block: dict[str, str] = field(default_factory=lambda: {"attn": "mixer", "attn_norm": "attn_norm",
                                                           "mlp_norm": "mlp_norm", "mlp": "mlp"})
    mixer: dict[str, str] = field(default_factory=dict)
    mlp_weight: str | None = "mlp.gate_proj.weight"
    source: str = "FLA"


# options every FLA family with a SwiGLU MLP shares
SWIGLU = Require("hidden_act", equals("swish", "silu"), "'swish'", "our GatedMLP is SwiGLU only", "swish")
NO_ATTNRES = Require("attnres_block_size", equals(None), "None", "our blocks have no attention residuals")
AFFINE_NORMS = Require("elementwise_affine", equals(True), "true", "our output norms always have a weight", True)

FAMILIES: dict[str, Family] = {
    "gla": Family(
        ours="gla",
        config={"num_heads": "num_heads", "expand_k": "expand_k", "expand_v": "expand_v",
                "use_short_conv": "use_short_conv", "conv_size": "conv_size", "use_output_gate": "use_output_gate",
                # FLA's GLA block builds its layer with the layer's defaults for these two
                "gate_low_rank_dim": lambda c: 16, "gate_logit_normalizer": lambda c: 16.0},
        requires=(SWIGLU, NO_ATTNRES, AFFINE_NORMS,
                  Require("num_kv_heads", same_as("num_heads"), "None or num_heads",
                          "our GLA has no grouped k/v heads"),
                  Require("feature_map", equals(None), "None", "our GLA has no q/k feature map"),
                  Require("clamp_min", equals(None), "None", "our GLA does not clamp its log-decay")),
        mixer={"gk_proj.0": "gk_proj.down", "gk_proj.1": "gk_proj.up", "g_norm_swish_gate": "g_norm"},
    ),
    "retnet": Family(
        ours="retnet",
        # FLA's retention layer: RoPE base 10000 and no short convs, whatever the config says
        config={"num_heads": "num_heads", "expand_k": "expand_k", "expand_v": "expand_v",
                "use_output_gate": "use_output_gate", "rope_theta": lambda c: 10000.0},
        requires=(SWIGLU, NO_ATTNRES, AFFINE_NORMS,
                  Require("num_kv_heads", same_as("num_heads"), "None or num_heads",
                          "our retention has no grouped k/v heads"),
                  Require("feature_map", equals(None), "None", "our retention has no q/k feature map")),
        mixer={"g_norm_swish_gate": "g_norm"},
    ),
    "mamba2": Family(
        ours="mamba2",
        config={"num_heads": "num_heads", "head_dim": "head_dim", "state_size": "state_size", "expand": "expand",
                "n_groups": "n_groups", "conv_kernel": "conv_kernel", "use_conv_bias": "use_conv_bias",
                "use_bias": "use_bias", "time_step_min": "dt_min", "time_step_max": "dt_max",
                "time_step_floor": "dt_init_floor",
                # FLA's Mamba2 blocks are mixer-only: x + mixer(norm(x))
                "use_mlp": lambda c: False},
        requires=(Require("rmsnorm", equals(True), "true", "our Mamba2 always has its gated RMSNorm", True),
                  Require("norm_before_gate", equals(False), "false", "our Mamba2 gates before the norm", False),
                  Require("D_has_hdim", equals(False), "false", "our Mamba2's D is one value per head", False),
                  Require("dt_limit", lambda v, c: v is None or tuple(v) == (0.0, math.inf), "[0, inf]",
                          "our Mamba2 does not clamp dt"),
                  Require("hidden_act", equals("silu", "swish"), "'silu'", "our Mamba2's conv ends in silu", "silu")),
        backbone="backbone",
        final_norm="norm_f",
        block={"norm": "attn_norm", "mixer": "mixer"},
        mixer={"norm.weight": "norm_weight"},
        mlp_weight=None,
    ),
    "rwkv7": Family(
        ours="rwkv7",
        config={"head_dim": "head_dim", "decay_low_rank_dim": "decay_low_rank_dim",
                "gate_low_rank_dim": "gate_low_rank_dim", "a_low_rank_dim": "a_low_rank_dim",
                "v_low_rank_dim": "v_low_rank_dim",
                # FLA's RWKV7 blocks and final norm are LayerNorms (eps norm_eps); norm_first (default true) adds
                # a LayerNorm on the embeddings inside layer 0 that also feeds its residual
                "norm_type": lambda c: "layer", "pre_norm": lambda c: c.get("norm_first", True)},
        requires=(Require("hidden_act", equals("sqrelu"), "'sqrelu'", "our RWKV7 channel mix is relu^2", "sqrelu"),
                  Require("value_dim", lambda v, c: v is None or set(v if isinstance(v, list) else [v])
                          == {c.get("hidden_size")}, "None or hidden_size", "our RWKV7 has value_dim = hidden_size"),
                  # FLA gives layer 0 the value residual's source; ours gives it to the first RWKV7 layer
                  Require("attn", lambda v, c: v is None or 0 not in _attn_layers(v), "no attention at layer 0",
                          "our RWKV7 takes v_first from the first RWKV7 layer, FLA from layer 0"),
                  Require("norm_bias", equals(True), "true", "our LayerNorms always have a bias", True)),
        block={"pre_norm": "pre_norm", "attn": "mixer", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
               "ffn": "mlp"},
        mixer={f"{lora}.lora.{i}": f"{lora}.{part}" for lora in ("w_lora", "v_lora", "a_lora", "g_lora")
               for i, part in ((0, "down"), (2, "up"))},
        mlp_weight="mlp.key.weight",
    ),
    "rwkv6": Family(
        ours="rwkv6",
        config={"num_heads": "num_heads", "expand_k": "expand_k", "expand_v": "expand_v",
                "proj_low_rank_dim": "proj_low_rank_dim", "gate_low_rank_dim": "gate_low_rank_dim",
                "hidden_ratio": "hidden_ratio",
                # FLA's RWKV6 blocks and final norm are LayerNorms; norm_first adds one on layer 0's input
                "norm_type": lambda c: "layer", "pre_norm": lambda c: c.get("norm_first", True)},
        requires=(Require("hidden_act", equals("sqrelu"), "'sqrelu'", "our RWKV6 channel mix is relu^2", "sqrelu"),
                  Require("norm_bias", equals(True), "true", "our LayerNorms always have a bias", True)),
        block={"pre_norm": "pre_norm", "attn": "mixer", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
               "ffn": "mlp"},
        mixer={"w_proj.linear.lora.0": "w_proj.linear.down", "w_proj.linear.lora.2": "w_proj.linear.up"},
        mlp_weight="mlp.key.linear.weight",
    ),
    "kda": Family(
        ours="kda",
        config={"num_heads": "num_heads", "head_dim": "head_dim", "expand_v": "expand_v", "conv_size": "conv_size"},
        requires=(SWIGLU, NO_ATTNRES,
                  Require("num_v_heads", same_as("num_heads"), "None or num_heads",
                          "our KDA has no grouped value heads"),
                  Require("use_short_conv", equals(True), "true", "our KDA always has short convs", True),
                  Require("allow_neg_eigval", equals(False), "false", "our KDA keeps beta in (0, 1)", False),
                  Require("safe_gate", equals(False), "false", "our KDA has no safe-gate form", False),
                  Require("lower_bound", equals(None), "None", "our KDA does not bound its log-decay")),
        mixer={"f_proj.0": "f_proj.down", "f_proj.1": "f_proj.up", "g_proj.0": "g_proj.down", "g_proj.1": "g_proj.up"},
    ),
    "delta_net": Family(
        ours="delta_net",
        config={"num_heads": "num_heads", "expand_k": "expand_k", "expand_v": "expand_v",
                "use_short_conv": "use_short_conv", "conv_size": "conv_size", "use_beta": "use_beta",
                "use_gate": "use_gate"},
        requires=(SWIGLU, NO_ATTNRES,
                  Require("qk_activation", equals("silu"), "'silu'", "our DeltaNet's q/k activation is silu", "silu"),
                  Require("qk_norm", equals("l2"), "'l2'", "our DeltaNet L2-normalises q and k", "l2"),
                  Require("allow_neg_eigval", equals(False), "false", "our DeltaNet keeps beta in (0, 1)", False)),
    ),
    "gated_deltanet": Family(
        ours="gated_deltanet",
        # ours: num_heads value heads of hidden * expand_v / num_heads channels, num_qk_heads q/k heads of
        # hidden * expand_k / num_heads; FLA: num_heads q/k heads of head_dim, num_v_heads of head_dim * expand_v
        config={"num_heads": lambda c: _v_heads(c), "num_qk_heads": lambda c: c.get("num_heads", 6),
                "expand_k": lambda c: c.get("head_dim", 256) * _v_heads(c) / c.get("hidden_size", 2048),
                "expand_v": lambda c: (c.get("head_dim", 256) * c.get("expand_v", 2.0) * _v_heads(c)
                                       / c.get("hidden_size", 2048)),
                "conv_size": "conv_size"},
        requires=(SWIGLU, NO_ATTNRES,
                  Require("use_gate", equals(True), "true", "our Gated DeltaNet always has its output gate", True),
                  Require("use_short_conv", equals(True), "true", "our Gated DeltaNet always has short convs", True),
                  Require("allow_neg_eigval", equals(False), "false", "our Gated DeltaNet keeps beta in (0, 1)", False),
                  Require("output_gate_activation", equals("swish", "silu"), "'swish'",
                          "our Gated DeltaNet's output gate is swish", "swish")),
    ),
    # the models of linattn_dsl/specs/comba.py and hgrn2.py (registered on demand: our_classes); their layers take
    # FLA's names, so the mixers' parameters keep theirs
    "comba": Family(
        ours="comba",
        config={"num_heads": "num_heads", "head_dim": "head_dim", "expand_v": "expand_v",
                "use_short_conv": "use_short_conv", "conv_size": "conv_size", "use_output_gate": "use_output_gate",
                # FLA's Comba block builds its layer with the layer's defaults for these three, whatever the config
                # says: the inner decay and the output correction on, D initialised at 1
                "use_inner_decay": lambda c: True, "use_output_correction": lambda c: True,
                "correction_factor": lambda c: 1.0},
        requires=(SWIGLU, NO_ATTNRES,
                  Require("num_v_heads", same_as("num_heads"), "None or num_heads",
                          "our Comba has no grouped value heads")),
    ),
    "hgrn2": Family(
        ours="hgrn2",
        # FLA's HGRN2 layer takes its heads from expand_ratio (hidden_size // expand_ratio), whatever num_heads says
        config={"num_heads": lambda c: c.get("hidden_size", 2048) // (c.get("expand_ratio") or 128),
                "expand_ratio": "expand_ratio", "use_short_conv": "use_short_conv", "conv_size": "conv_size",
                "use_lower_bound": "use_lower_bound"},
        requires=(SWIGLU, NO_ATTNRES, AFFINE_NORMS,
                  Require("expand_ratio", lambda v, c: isinstance(v, int) and v > 0
                          and c.get("hidden_size", 2048) % v == 0, "a divisor of hidden_size",
                          "our HGRN2's heads of expand_ratio key channels cover hidden_size exactly", 128)),
    ),
}


# transformers' MambaForCausalLM (model_type "mamba"): its config fields carry our names but for the norms' epsilon
HF_MAMBA = Family(
    ours="mamba",
    config={**{name: name for name in ("state_size", "expand", "conv_kernel", "use_bias", "use_conv_bias",
                                       "time_step_rank", "time_step_min", "time_step_max", "time_step_floor",
                                       "time_step_scale")},
            "norm_eps": "layer_norm_epsilon", "use_mlp": lambda c: False},
    requires=(Require("hidden_act", equals("silu", "swish"), "'silu'", "our Mamba's conv ends in silu", "silu"),),
    backbone="backbone",
    final_norm="norm_f",
    block={"norm": "attn_norm", "mixer": "mixer"},
    mlp_weight=None,
    source="transformers",
)


def _v_heads(config: dict) -> int:
    """FLA Gated DeltaNet's value heads (its config's defaults: 6 heads of 256 channels, hidden 2048)."""
    return config.get("num_v_heads") or config.get("num_heads", 6)


def _attn_layers(attn: dict | list) -> list[int]:
    return [i for spec in (attn if isinstance(attn, list) else [attn]) for i in spec.get("layers", [])]


# ------------------------------------------------------------------ reading FLA's folder


def _special_floats(obj: dict) -> Any:
    """transformers writes inf / nan config values as ``{"__float__": "Infinity"}``."""
    if set(obj) == {"__float__"} and isinstance(obj["__float__"], str):
        return float(obj["__float__"])
    return obj


def read_fla(src: str | Path, saved_by: str = "FLA") -> tuple[dict, dict[str, torch.Tensor]]:
    """FLA's (or ``saved_by``'s) config (a dict) and state dict (``model.safetensors``, or the shards its index
    names)."""
    from safetensors.torch import load_file

    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"SRC: expected a folder saved by {saved_by}'s save_pretrained, got {str(src)!r} "
                         f"({'a file' if src.exists() else 'no such folder'})")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ValueError(f"SRC: {str(src)!r} has no config.json; expected a folder saved by {saved_by}'s "
                         "save_pretrained")
    config = json.loads(config_file.read_text(), object_hook=_special_floats)
    index = src / "model.safetensors.index.json"
    if index.is_file():   # sharded: the index names the files
        files = [src / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [src / "model.safetensors"]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        others = sorted(p.name for p in src.glob("*.bin"))
        raise ValueError(f"SRC: {str(src)!r} has no {absent[0]}"
                         + (f" (found {others}: save with safe_serialization=True)" if others else ""))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return config, state


# ------------------------------------------------------------------ the mapping


def family_of(fla_config: dict) -> Family:
    """The table for FLA's ``model_type``; ValueError naming it when there is none."""
    model_type = fla_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type: FLA model_type {model_type!r} has no converter; expected one of "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


def check_supported(family: Family, fla_config: dict) -> None:
    """ValueError listing every FLA option of this checkpoint our model lacks."""
    name = fla_config["model_type"]
    problems = [f"{r.field}={fla_config.get(r.field, r.default)!r} (expected {r.expected}: {r.why})"
                for r in family.requires if not r.ok(fla_config.get(r.field, r.default), fla_config)]
    if problems:
        raise ValueError(f"{family.source} {name}: cannot convert exactly: " + "; ".join(problems))


def attn_config(fla_config: dict) -> dict | None:
    """Our hybrid ``attn`` (one dict) from FLA's (a dict or a list of dicts with the same settings)."""
    attn = fla_config.get("attn")
    if attn is None:
        return None
    specs = attn if isinstance(attn, list) else [attn]
    name = fla_config["model_type"]
    if any(spec.get("qkv_bias", False) for spec in specs):
        raise ValueError(f"FLA {name}: cannot convert exactly: attn.qkv_bias=True (our hybrid attention config has "
                         "no q/k/v biases)")
    settings = {tuple((key, spec.get(key)) for key in ATTN_FIELDS) for spec in specs}
    if len(settings) > 1:
        raise ValueError(f"FLA {name}: cannot convert exactly: attn lists {len(specs)} attention settings "
                         f"{[dict(s) for s in settings]}; our config has one for every attention layer")
    return {"layers": sorted(_attn_layers(attn)), **dict(settings.pop())}


def our_config(family: Family, fla_config: dict, mapped: dict[str, torch.Tensor]) -> dict:
    """Our config fields (``model_type`` included) for this FLA checkpoint; ``mapped``: its state dict under our
    names (:func:`our_state`), which gives ``intermediate_size`` (FLA's families round their defaults differently)."""
    fields = {key: fla_config[key] for key in SHARED_FIELDS if key in fla_config}
    for ours, source in family.config.items():
        value = source(fla_config) if callable(source) else fla_config.get(source)
        if value is not None:
            fields[ours] = value
    fields["attn"] = attn_config(fla_config)
    if family.mlp_weight is not None:
        sizes = [t.shape[0] for k, t in sorted(mapped.items()) if k.endswith(f".{family.mlp_weight}")]
        if sizes:
            fields["intermediate_size"] = sizes[0]
    fields["model_type"] = our_classes(family)[0].model_type
    return fields


def _rename(table: dict[str, str], name: str) -> str:
    """``name`` with its longest prefix (a whole parameter name or module path) found in ``table`` replaced."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return name


def our_state(family: Family, fla_config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLA's state dict under our parameter names (shapes unchanged: :func:`check_state` fits them)."""
    attention_layers = set(_attn_layers(fla_config["attn"])) if fla_config.get("attn") else set()
    layer_key = re.compile(rf"{re.escape(family.backbone)}\.layers\.(\d+)\.(\w+)\.(.+)")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = layer_key.fullmatch(key)
        if match:
            index, part, rest = int(match[1]), match[2], match[3]
            part_ours = family.block.get(part, part)
            if part_ours == "mixer" and index not in attention_layers:
                rest = _rename(family.mixer, rest)
            new = f"model.layers.{index}.{part_ours}.{rest}"
        elif key.startswith(f"{family.backbone}.{family.final_norm}."):
            new = "model.norm." + key.removeprefix(f"{family.backbone}.{family.final_norm}.")
        elif key.startswith(f"{family.backbone}."):
            new = "model." + key.removeprefix(f"{family.backbone}.")
        else:
            new = key
        out[new] = tensor
    return out


def check_state(label: str, state: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                tied: bool) -> dict[str, torch.Tensor]:
    """``state`` fitted to ``expected`` (our model's parameter shapes): singleton dimensions dropped where that is
    the only difference (RWKV7's ``[1, 1, D]`` mixes), the tied ``lm_head.weight`` left to the embeddings.
    ValueError (starting with ``label``, e.g. ``FLA gla``) listing missing names, names with no place in our model,
    and shapes that differ."""
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    fitted, wrong = {}, []
    for key in sorted(state):
        tensor, shape = state[key], expected.get(key, state[key].shape)
        if tensor.shape != shape and tensor.squeeze().shape == torch.Size([d for d in shape if d != 1]):
            tensor = tensor.reshape(shape)
        if tensor.shape != shape:
            wrong.append(f"{key} {list(tensor.shape)} (expected {list(shape)})")
        fitted[key] = tensor
    if missing or unexpected or wrong:
        details = [f"{label}: {items[:8]}{' ...' if len(items) > 8 else ''}"
                   for label, items in (("missing", missing), ("not in our model", unexpected), ("shape", wrong))
                   if items]
        raise ValueError(f"{label}: the checkpoint's tensors do not fit our model: " + "; ".join(details))
    return fitted


def our_classes(family: Family) -> tuple[type, type, type]:
    """(Config, Model, ForCausalLM) of our family for this table (a shipped spec's model, registered here, where it
    is none of ``linattn_dsl.models.FAMILIES``)."""
    from . import FAMILIES as OURS
    from . import spec_model

    if family.ours in OURS:
        return OURS[family.ours]
    return spec_model.classes(spec_model.register_spec(family.ours))


def build_config(family: Family, fields: dict):
    """Our config object from :func:`our_config`'s fields."""
    return our_classes(family)[0](**{k: v for k, v in fields.items() if k != "model_type"})


def expected_shapes(family: Family, fields: dict) -> dict[str, torch.Size]:
    """Parameter names and shapes of our model for these config fields (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = our_classes(family)[2](build_config(family, fields))
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def map_checkpoint(fla_config: dict, state: dict[str, torch.Tensor],
                   family: Family | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our config fields and state dict for an FLA checkpoint, or one ``family``'s table reads (ValueError when it
    cannot be converted exactly)."""
    family = family or family_of(fla_config)
    check_supported(family, fla_config)
    mapped = our_state(family, fla_config, state)
    fields = our_config(family, fla_config, mapped)
    mapped = check_state(f"{family.source} {fla_config['model_type']}", mapped, expected_shapes(family, fields),
                         bool(fields.get("tie_word_embeddings")))
    return fields, mapped


def convert_fla(src: str | Path, dst: str | Path) -> Path:
    """Convert FLA's ``save_pretrained`` folder ``src`` into our folder ``dst`` (created; files in it replaced).
    Returns ``dst``. ValueError for a missing or unreadable ``src``, an FLA model_type with no converter, or a
    checkpoint using an option our model lacks."""
    return _convert(src, dst, "FLA", family_of)


def hf_mamba_family(config: dict) -> Family:
    """:data:`HF_MAMBA` for a transformers Mamba config; ValueError naming the model_type of any other."""
    if config.get("model_type") != "mamba":
        raise ValueError(f"model_type: expected 'mamba' (a folder saved by transformers' MambaForCausalLM), "
                         f"got {config.get('model_type')!r}")
    return HF_MAMBA


def convert_hf_mamba(src: str | Path, dst: str | Path) -> Path:
    """Convert the folder ``src`` saved by transformers' ``MambaForCausalLM.save_pretrained`` into our Mamba
    folder ``dst`` (created; files in it replaced). Returns ``dst``. ValueError for a missing or unreadable ``src``,
    a config that is not transformers' Mamba, or tensors that do not fit."""
    return _convert(src, dst, "transformers", hf_mamba_family)


def _convert(src: str | Path, dst: str | Path, saved_by: str, family_for: Callable[[dict], Family]) -> Path:
    from huggingface_hub import save_torch_state_dict

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST: expected a folder other than SRC, got {str(dst)!r}")
    source_config, state = read_fla(src, saved_by)
    family = family_for(source_config)
    fields, mapped = map_checkpoint(source_config, state, family)
    config = build_config(family, fields)
    config.architectures = [our_classes(family)[2].__name__]
    config.dtype = _dtype_name(state)   # the stored tensors' dtype: from_pretrained loads them as they are
    dst.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dst)
    save_torch_state_dict({k: v.contiguous() for k, v in mapped.items()}, dst, metadata={"format": "pt"})
    return dst


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    """The dtype most of the checkpoint's floating-point numbers have (``"float32"``, ``"bfloat16"``...)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return str(max(counts, key=counts.get, default=torch.float32)).removeprefix("torch.")
