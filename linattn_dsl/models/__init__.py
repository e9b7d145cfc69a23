"""Hugging Face models: ``<Family>Config``, ``<Family>Model``, ``<Family>ForCausalLM`` per family.

Importing this package registers every family with ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` under ``model_type`` ``linattn_<family>`` (``linattn_gated_deltanet`` through its spec
file's layer declaration); :func:`register_spec` registers a model for
any spec (:mod:`.spec_model`), :func:`from_pretrained` loads a saved one in a fresh process.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel
from .cache import LinAttnCache
from .delta_net import DeltaNetConfig, DeltaNetForCausalLM, DeltaNetModel
from .gla import GLAConfig, GLAForCausalLM, GLAModel
from .kda import KDAConfig, KDAForCausalLM, KDAModel
from .mamba2 import Mamba2Config, Mamba2ForCausalLM, Mamba2Model
from .retnet import RetNetConfig, RetNetForCausalLM, RetNetModel
from .rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from . import spec_model
from .spec_model import SpecConfig, from_pretrained, register_spec

FAMILIES = {
    "retnet": (RetNetConfig, RetNetModel, RetNetForCausalLM),
    "gla": (GLAConfig, GLAModel, GLAForCausalLM),
    "mamba2": (Mamba2Config, Mamba2Model, Mamba2ForCausalLM),
    "rwkv7": (RWKV7Config, RWKV7Model, RWKV7ForCausalLM),
    "kda": (KDAConfig, KDAModel, KDAForCausalLM),
    "delta_net": (DeltaNetConfig, DeltaNetModel, DeltaNetForCausalLM),
}

for _config, _model, _lm in FAMILIES.values():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

# families declared in their spec file (the layer built from its declaration: linattn_dsl.layers.SpecLayer)
FAMILIES["gated_deltanet"] = spec_model.classes(register_spec("gated_delta_rule"))

__all__ = [
    "FAMILIES",
    "DeltaNetConfig",
    "DeltaNetForCausalLM",
    "DeltaNetModel",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "KDAConfig",
    "KDAForCausalLM",
    "KDAModel",
    "LinAttnCache",
    "LinAttnConfig",
    "LinAttnForCausalLM",
    "LinAttnModel",
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "Mamba2Model",
    "RWKV7Config",
    "RWKV7ForCausalLM",
    "RWKV7Model",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetModel",
    "SpecConfig",
    "from_pretrained",
    "register_spec",
]
