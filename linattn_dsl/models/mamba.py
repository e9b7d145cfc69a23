"""Mamba: selective-SSM blocks (:class:`linattn_dsl.layers.Mamba`), with transformers' ``MambaConfig`` field names.

The default ``use_mlp=False`` is Mamba's own layout (transformers' and FLA's): mixer-only blocks
``x + mixer(norm(x))`` with RMSNorms and a final norm; ``use_mlp=True`` adds a SwiGLU MLP to every block.
``linattn convert --from-hf-mamba`` (:func:`linattn_dsl.models.convert.convert_hf_mamba`) converts a checkpoint of
transformers' ``MambaForCausalLM`` (its ``layer_norm_epsilon`` is our ``norm_eps``).
"""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import Mamba
from linattn_dsl.layers._checks import BOOL, POSITIVE, POSITIVE_INT
from linattn_dsl.layers.mamba import mamba_time_step_rank

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel
from .mamba2 import mamba2_mlp


class MambaConfig(LinAttnConfig):
    model_type = "linattn_mamba"
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_rank: int | str = "auto"  # "auto": ceil(hidden_size / 16), filled in at construction
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    norm_eps: float = 1e-5  # transformers' layer_norm_epsilon
    use_mlp: bool = False  # True: a SwiGLU MLP (and mlp_norm) in every block
    field_rules: ClassVar[dict[str, str]] = {
        "state_size": POSITIVE_INT, "expand": POSITIVE_INT, "conv_kernel": POSITIVE_INT, "use_bias": BOOL,
        "use_conv_bias": BOOL, "time_step_min": POSITIVE, "time_step_max": POSITIVE, "time_step_floor": POSITIVE,
        "time_step_scale": POSITIVE, "use_mlp": BOOL,
    }

    def check_sizes(self) -> None:
        self.time_step_rank = mamba_time_step_rank(self.hidden_size, self.time_step_rank, self.time_step_min,
                                                   self.time_step_max)


def mamba_mixer(config: MambaConfig, layer_idx: int) -> Mamba:
    return Mamba(
        config.hidden_size, config.state_size, config.expand, config.conv_kernel, config.use_bias,
        config.use_conv_bias, config.time_step_rank, config.time_step_min, config.time_step_max,
        config.time_step_floor, config.time_step_scale,
    )


class MambaModel(LinAttnModel):
    config_class = MambaConfig
    build_mixer = staticmethod(mamba_mixer)
    build_mlp = staticmethod(mamba2_mlp)  # use_mlp: a SwiGLU MLP or none


class MambaForCausalLM(LinAttnForCausalLM):
    model_class = MambaModel
