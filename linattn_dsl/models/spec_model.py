"""A Hugging Face model from any spec: :func:`register_spec` compiles the spec (once, into a cache keyed by its
source's hash: the compiler at registration time, never at op-call time), and registers ``<Title>Config`` /
``<Title>Model`` / ``<Title>ForCausalLM`` with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` under
``linattn_<name>``: the shared pre-norm blocks, hybrid ``attn`` field, cache, generation, save / load and gradient
checkpointing, with :class:`linattn_dsl.layers.SpecLayer` as the mixer. The config's fields: the shared ones
(:class:`LinAttnConfig`, with the declaration's ``defaults``) and one per option of the layer declaration.

A spec file's model records the spec's source in its config (``spec_source``), so a saved folder registers itself:
:func:`from_pretrained` (and ``linattn generate`` / ``linattn eval``) loads it in a fresh process with no extra step.
A shipped spec's model (RetNet, GLA, DeltaNet, KDA, Gated DeltaNet: registered when ``linattn_dsl.models`` is
imported) records none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig

from linattn_dsl.layers import SpecLayer
from linattn_dsl.layers._utils import GatedMLP
from linattn_dsl.layers.spec_layer import DECLARED, check_option, head_sizes, init_value, model_params, resolve

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel

CACHE_ENV = "LINATTN_CACHE"
# model_type -> (sha256 of the spec source, (Config, Model, ForCausalLM))
REGISTERED: dict[str, tuple[str, tuple]] = {}


def cache_dir() -> Path:
    """Where compiled specs are kept: ``$LINATTN_CACHE`` or ``~/.cache/linattn_dsl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "linattn_dsl")


class SpecConfig(LinAttnConfig):
    """The base of a spec's model config: a subclass per spec sets ``model_type``, ``layer_plan`` (the generated
    module's ``LAYER``) and one field per option of the plan; the options and the head sizes they give are checked
    here, each failure a ValueError naming the field."""

    layer_plan: ClassVar[dict] = {"options": {}}

    def option_values(self) -> dict:
        return {name: getattr(self, name) for name in type(self).layer_plan["options"]}

    def check_sizes(self) -> None:
        plan, values = type(self).layer_plan, self.option_values()
        for name, entry in plan["options"].items():
            check_option(name, values[name], entry)
        if "sizes" in plan:
            head_sizes(plan, values, self.hidden_size, self.num_heads)


class SpecModel(LinAttnModel):
    """The backbone of a spec's model: :class:`LinAttnModel` with the model-level parameters its layers'
    derivations read (``ModelParam``: ``[num_hidden_layers, width]`` under the declared name, as FLA's HGRN2
    ``lower_bounds``), registered before the layers; each :class:`SpecLayer` gets its index and
    :meth:`model_param`."""

    def _model_params(self, config) -> dict:
        return model_params(type(config).layer_plan, config.option_values(), config.hidden_size, config.num_heads)

    def _mixer(self, config, layer_idx: int):
        if layer_idx == 0:   # registered as the first layer is built, before any layer reads them
            for name, (width, _) in self._model_params(config).items():
                self.register_parameter(name, nn.Parameter(torch.zeros(config.num_hidden_layers, width)))
        mixer = super()._mixer(config, layer_idx)
        if isinstance(mixer, SpecLayer):
            mixer.layer_idx = layer_idx
            mixer.model_param = self.model_param
        return mixer

    def model_param(self, name: str) -> nn.Parameter:
        """The model-level parameter ``name`` (``[num_hidden_layers, width]``)."""
        return self.get_parameter(name)

    def special_init(self) -> dict:
        return {name: init_value(init, self.get_parameter(name))
                for name, (_, init) in self._model_params(self.config).items()}


def _load_spec_module(source: str, name_hint: str):
    """The generated module of a spec source: compiled once into the cache (by the source's sha256), imported
    from there under no registered name."""
    from linattn_dsl.compiler import codegen, registry

    sha = hashlib.sha256(source.encode()).hexdigest()
    folder = cache_dir() / "specs" / f"{name_hint}-{sha[:16]}"
    src = folder / "spec.py"
    if not src.is_file() or src.read_text() != source:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "spec.py.tmp"
        tmp.write_text(source)
        tmp.replace(src)
    spec = registry.load(str(src))
    gen = folder / "gen"
    codegen.regen([spec], gen, builtin=False, index=False)
    loader = importlib.util.spec_from_file_location(f"linattn_spec_{spec.name}_{sha[:16]}", gen / f"{spec.name}.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module, sha


def _shipped(name: str):
    """The generated module of a shipped spec (no compiling: ``linattn_dsl.generated`` holds it), or None."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    if importlib.util.find_spec(f"linattn_dsl.specs.{name}") is None:
        return None
    return importlib.import_module(f"linattn_dsl.generated.{name}")


def register_spec(spec_or_path) -> str:
    """Register a model for a spec: a spec file's path, a shipped spec's name, or a ``Recurrence`` loaded from a
    file. Returns its ``model_type`` (``linattn_<name>``, the layer declaration's name or the spec's). Registering
    the same source again returns the same type; another spec under a registered name is a ValueError."""
    shipped = _shipped(spec_or_path)
    if shipped is not None:   # compiled already, into linattn_dsl/generated/
        return _register_module(shipped, shipped.SPEC_SOURCE, shipped=True)
    from linattn_dsl.compiler import registry
    from linattn_dsl.compiler.spec import Recurrence

    if isinstance(spec_or_path, Recurrence):
        source = registry.spec_source(spec_or_path)
        hint = spec_or_path.name
    else:
        path = str(spec_or_path)
        spec = registry.load(path)   # SpecNotFound / SpecError with the reason
        source = registry.spec_source(spec)
        hint = spec.name
    return _register_source(source, hint)


def _register_source(source: str, hint: str) -> str:
    sha = hashlib.sha256(source.encode()).hexdigest()
    for model_type, (known, _) in REGISTERED.items():
        if known == sha:
            return model_type
    shipped = _shipped(hint)
    if shipped is not None and shipped.SPEC_SHA256 == sha:   # a shipped spec's source: its generated module
        return _register_module(shipped, source, shipped=True)
    module, sha = _load_spec_module(source, hint)
    return _register_module(module, source)


def _config_class(module, plan: dict, model_type: str, source: str | None) -> type:
    """The config class of a spec's model: the declaration's defaults of shared fields and a field per option
    (with ``spec_source`` unless the spec is shipped). SpecError naming an option that takes a name the config
    already has."""
    from linattn_dsl.compiler.spec import SpecError

    annotations, body = {}, {"model_type": model_type, "layer_plan": plan, "__module__": __name__}
    for name, value in plan["defaults"].items():
        annotations[name] = LinAttnConfig.__annotations__[name]
        body[name] = value
    for name, entry in plan["options"].items():
        if hasattr(PreTrainedConfig, name) or name in LinAttnConfig.__annotations__:
            raise SpecError(module.SIGNATURE.name, f"layer.{entry['where']}", f"Option field {name!r} is a field "
                            "every model config has; give the option another name")
        annotations[name] = entry["type"]
        body[name] = entry["default"]
    if source is not None:
        annotations["spec_source"] = "str | None"
        body["spec_source"] = source
    body["__annotations__"] = annotations
    return type(f"{plan['title']}Config", (SpecConfig,), body)


def _register_module(module, source: str, shipped: bool = False) -> str:
    sha = hashlib.sha256(source.encode()).hexdigest()
    for model_type, (known, _) in REGISTERED.items():
        if known == sha:
            return model_type
    plan = module.LAYER
    model_type = f"linattn_{plan['name']}"
    config_cls = _config_class(module, plan, model_type, None if shipped else source)
    if model_type in REGISTERED or _taken(model_type):
        raise ValueError(f"spec {module.SIGNATURE.name!r}: model_type {model_type!r} is already registered for "
                         "another spec; give the layer declaration another name (Layer(name=...))")
    options = list(plan["options"])
    # a shipped spec's layer class (linattn_dsl.layers.MultiScaleRetention ...), else the plain SpecLayer
    layer_cls = DECLARED.get(module.SIGNATURE.name) if shipped else None
    build = layer_cls or partial(SpecLayer, module)

    def mixer(config, layer_idx: int) -> SpecLayer:
        return build(config.hidden_size, config.num_heads, norm_eps=config.norm_eps,
                     **{name: getattr(config, name) for name in options})

    def mlp(config, layer_idx: int):
        return GatedMLP(config.hidden_size, config.intermediate_size) if resolve(plan["mlp"], config.option_values()) \
            else None

    title = plan["title"]
    model_cls = type(f"{title}Model", (SpecModel,), {"config_class": config_cls, "build_mixer": staticmethod(mixer),
                                                         "build_mlp": staticmethod(mlp), "__module__": __name__})
    lm_cls = type(f"{title}ForCausalLM", (LinAttnForCausalLM,), {"model_class": model_cls, "__module__": __name__})
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
    REGISTERED[model_type] = (sha, (config_cls, model_cls, lm_cls))
    return model_type


def _taken(model_type: str) -> bool:
    """Is ``model_type`` registered with AutoConfig already (a hand-written family's, or transformers' own)?"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def classes(model_type: str) -> tuple:
    """(Config, Model, ForCausalLM) of a registered spec's model."""
    return REGISTERED[model_type][1]


def register_saved(path) -> str | None:
    """Register the spec a saved model folder records (its config's ``spec_source``), or the shipped spec its
    model_type names (``linattn_comba``: ``comba``), if any; its model_type."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    source = data.get("spec_source")
    model_type = data.get("model_type", "")
    if model_type in REGISTERED:
        return model_type
    if not source:
        if _taken(model_type):   # registered already (a hand-written family's, or one registered on import)
            return model_type
        shipped = _shipped(model_type.removeprefix("linattn_")) if model_type.startswith("linattn_") else None
        if shipped is None or f"linattn_{shipped.LAYER['name']}" != model_type:
            return None
        return _register_module(shipped, shipped.SPEC_SOURCE, shipped=True)
    return _register_source(source, model_type.removeprefix("linattn_") or "spec")


def from_pretrained(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)``, registering the spec the folder records first."""
    register_saved(path)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
