"""Hugging Face models: ``<Family>Config``, ``<Family>Model``, ``<Family>ForCausalLM`` per family.

Importing this package registers every family with ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` under ``model_type`` ``linattn_<family>``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel
from .cache import LinAttnCache
from .gla import GLAConfig, GLAForCausalLM, GLAModel

FAMILIES = {
    "gla": (GLAConfig, GLAModel, GLAForCausalLM),
}

for _config, _model, _lm in FAMILIES.values():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

__all__ = [
    "FAMILIES",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "LinAttnCache",
    "LinAttnConfig",
    "LinAttnForCausalLM",
    "LinAttnModel",
]
