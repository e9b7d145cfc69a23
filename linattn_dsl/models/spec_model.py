"""A Hugging Face model from any spec: :func:`register_spec` compiles the spec (once, into a cache keyed by its
source's hash: the compiler at registration time, never at op-call time), and registers ``<Name>Config`` /
``<Name>Model`` / ``<Name>ForCausalLM`` with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` under
``linattn_<name>``: the shipped families' blocks, hybrid ``attn`` field, cache, generation, save / load and
gradient checkpointing, with :class:`linattn_dsl.layers.SpecLayer` as the mixer.

The config records the spec's source (``spec_source``), so a saved folder registers itself:
:func:`from_pretrained` (and ``linattn generate`` / ``linattn eval``) loads it in a fresh process with no extra step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import ClassVar

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from linattn_dsl.layers import SpecLayer
from linattn_dsl.layers._checks import POSITIVE, POSITIVE_INT, head_dims

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel

CACHE_ENV = "LINATTN_CACHE"
# model_type -> (sha256 of the spec source, (Config, Model, ForCausalLM))
REGISTERED: dict[str, tuple[str, tuple]] = {}


def cache_dir() -> Path:
    """Where compiled specs are kept: ``$LINATTN_CACHE`` or ``~/.cache/linattn_dsl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "linattn_dsl")


class SpecConfig(LinAttnConfig):
    """The fields of a model registered from a spec (a subclass per spec sets ``model_type``): key / value widths
    ``expand_k`` / ``expand_v`` times ``hidden_size``, ``num_qk_heads`` q/k heads (None: ``num_heads``), the
    short convs' ``conv_size``, and the spec's source."""

    expand_k: float = 0.5
    expand_v: float = 1.0
    num_qk_heads: int | None = None
    conv_size: int = 4
    spec_source: str | None = None
    field_rules: ClassVar[dict[str, str]] = {"expand_k": POSITIVE, "expand_v": POSITIVE, "conv_size": POSITIVE_INT}

    def check_sizes(self) -> None:
        head_dims(self.hidden_size, self.num_heads, self.expand_k, self.expand_v)
        q = self.num_qk_heads
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q < 1 or self.num_heads % q):
            raise ValueError(f"num_qk_heads: expected None or a positive divisor of num_heads={self.num_heads}, "
                             f"got {q!r}")


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
        return _register_module(shipped, shipped.SPEC_SOURCE)
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
        return _register_module(shipped, source)
    module, sha = _load_spec_module(source, hint)
    return _register_module(module, source)


def _register_module(module, source: str) -> str:
    sha = hashlib.sha256(source.encode()).hexdigest()
    for model_type, (known, _) in REGISTERED.items():
        if known == sha:
            return model_type
    plan = module.LAYER
    model_type = f"linattn_{plan['name']}"
    if model_type in REGISTERED or model_type in _taken():
        raise ValueError(f"spec {module.SIGNATURE.name!r}: model_type {model_type!r} is already registered for "
                         "another spec; give the layer declaration another name (Layer(name=...))")
    title = "".join(part.capitalize() for part in plan["name"].split("_"))
    config_cls = type(f"{title}Config", (SpecConfig,), {"model_type": model_type, "spec_source": source,
                                                         "__module__": __name__,
                                                         "__annotations__": {"spec_source": "str | None"}})

    def mixer(config, layer_idx: int) -> SpecLayer:
        return SpecLayer(module, config.hidden_size, config.num_heads, config.expand_k, config.expand_v,
                         config.num_qk_heads, config.conv_size, config.norm_eps)

    body = {"config_class": config_cls, "build_mixer": staticmethod(mixer), "__module__": __name__}
    if not plan["mlp"]:
        body["build_mlp"] = staticmethod(lambda config, layer_idx: None)   # mixer-only blocks
    model_cls = type(f"{title}Model", (LinAttnModel,), body)
    lm_cls = type(f"{title}ForCausalLM", (LinAttnForCausalLM,), {"model_class": model_cls, "__module__": __name__})
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
    REGISTERED[model_type] = (sha, (config_cls, model_cls, lm_cls))
    return model_type


def _taken() -> set:
    """The model types of the shipped families."""
    from . import FAMILIES

    return {cfg.model_type for cfg, _, _ in FAMILIES.values()}


def classes(model_type: str) -> tuple:
    """(Config, Model, ForCausalLM) of a registered spec's model."""
    return REGISTERED[model_type][1]


def register_saved(path) -> str | None:
    """Register the spec a saved model folder records (its config's ``spec_source``), if any; its model_type."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    source = data.get("spec_source")
    if not source:
        return None
    model_type = data.get("model_type", "")
    if model_type in REGISTERED:
        return model_type
    return _register_source(source, model_type.removeprefix("linattn_") or "spec")


def from_pretrained(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)``, registering the spec the folder records first."""
    register_saved(path)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
