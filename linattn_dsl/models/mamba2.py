"""Mamba2: SSD blocks (:class:`linattn_dsl.layers.Mamba2`). ``num_heads * head_dim = expand * hidden_size``.

``use_mlp=False`` gives the original Mamba2 layout (and FLA's): mixer-only blocks ``x + mixer(norm(x))``, with
no SwiGLU MLP and no ``mlp_norm``; the default keeps an MLP in every block.
"""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import Mamba2
from linattn_dsl.layers._checks import BOOL, POSITIVE, POSITIVE_INT, POSITIVE_INT_OR_NONE
from linattn_dsl.layers._utils import GatedMLP
from linattn_dsl.layers.mamba2 import mamba2_num_heads

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class Mamba2Config(LinAttnConfig):
    model_type = "linattn_mamba2"
    num_heads: int | None = None  # None: expand * hidden_size // head_dim
    head_dim: int = 64
    state_size: int = 128
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    use_mlp: bool = True  # False: mixer-only blocks (no MLP, no mlp_norm)
    field_rules: ClassVar[dict[str, str]] = {
        "num_heads": POSITIVE_INT_OR_NONE, "head_dim": POSITIVE_INT, "state_size": POSITIVE_INT, "expand": POSITIVE_INT,
        "n_groups": POSITIVE_INT, "conv_kernel": POSITIVE_INT, "use_conv_bias": BOOL, "use_bias": BOOL,
        "time_step_min": POSITIVE, "time_step_max": POSITIVE, "time_step_floor": POSITIVE,
        "use_mlp": BOOL,
    }

    def check_sizes(self) -> None:
        self.num_heads = mamba2_num_heads(self.hidden_size, self.num_heads, self.head_dim, self.expand, self.n_groups,
                                          self.time_step_min, self.time_step_max)


def mamba2_mixer(config: Mamba2Config, layer_idx: int) -> Mamba2:
    return Mamba2(
        config.hidden_size, config.num_heads, config.head_dim, config.state_size, config.expand,
        config.n_groups, config.conv_kernel, config.use_conv_bias, config.use_bias, config.time_step_min,
        config.time_step_max, config.time_step_floor, config.norm_eps,
    )


def mamba2_mlp(config: Mamba2Config, layer_idx: int) -> GatedMLP | None:
    return GatedMLP(config.hidden_size, config.intermediate_size) if config.use_mlp else None


class Mamba2Model(LinAttnModel):
    config_class = Mamba2Config
    build_mixer = staticmethod(mamba2_mixer)
    build_mlp = staticmethod(mamba2_mlp)


class Mamba2ForCausalLM(LinAttnForCausalLM):
    model_class = Mamba2Model
