"""Hugging Face models: ``<Family>Config``, ``<Family>Model``, ``<Family>ForCausalLM`` per family.

Importing this package registers every family with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` under
``model_type`` ``linattn_<family>``. RetNet, GLA, DeltaNet, KDA and Gated DeltaNet come from the layer declarations
of their spec files (:func:`register_spec`, :mod:`.spec_model`); Mamba, Mamba2, RWKV6 and RWKV7 are written
by hand (``mamba.py``, ``mamba2.py``, ``rwkv6.py``, ``rwkv7.py``). :func:`register_spec` registers a model for any spec,
:func:`from_pretrained` loads a saved one in a fresh process.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel
from .cache import LinAttnCache
from .mamba import MambaConfig, MambaForCausalLM, MambaModel
from .mamba2 import Mamba2Config, Mamba2ForCausalLM, Mamba2Model
from .rwkv6 import RWKV6Config, RWKV6ForCausalLM, RWKV6Model
from .rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from . import spec_model
from .spec_model import SpecConfig, from_pretrained, register_spec

# the hand-written families
for _config, _model, _lm in ((MambaConfig, MambaModel, MambaForCausalLM),
                             (Mamba2Config, Mamba2Model, Mamba2ForCausalLM),
                             (RWKV6Config, RWKV6Model, RWKV6ForCausalLM),
                             (RWKV7Config, RWKV7Model, RWKV7ForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

# families declared in their spec files (the layer built from the declaration: linattn_dsl.layers.SpecLayer)
RetNetConfig, RetNetModel, RetNetForCausalLM = spec_model.classes(register_spec("retention"))
GLAConfig, GLAModel, GLAForCausalLM = spec_model.classes(register_spec("gla"))
KDAConfig, KDAModel, KDAForCausalLM = spec_model.classes(register_spec("kda"))
DeltaNetConfig, DeltaNetModel, DeltaNetForCausalLM = spec_model.classes(register_spec("delta_rule"))

FAMILIES = {
    "retnet": (RetNetConfig, RetNetModel, RetNetForCausalLM),
    "gla": (GLAConfig, GLAModel, GLAForCausalLM),
    "mamba": (MambaConfig, MambaModel, MambaForCausalLM),
    "mamba2": (Mamba2Config, Mamba2Model, Mamba2ForCausalLM),
    "rwkv6": (RWKV6Config, RWKV6Model, RWKV6ForCausalLM),
    "rwkv7": (RWKV7Config, RWKV7Model, RWKV7ForCausalLM),
    "kda": (KDAConfig, KDAModel, KDAForCausalLM),
    "delta_net": (DeltaNetConfig, DeltaNetModel, DeltaNetForCausalLM),
    "gated_deltanet": spec_model.classes(register_spec("gated_delta_rule")),
}

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
    "MambaConfig",
    "MambaForCausalLM",
    "MambaModel",
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "Mamba2Model",
    "RWKV6Config",
    "RWKV6ForCausalLM",
    "RWKV6Model",
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
