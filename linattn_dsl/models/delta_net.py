"""DeltaNet: delta-rule blocks (:class:`linattn_dsl.layers.DeltaNet`)."""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import DeltaNet
from linattn_dsl.layers._checks import BOOL, POSITIVE, POSITIVE_INT, head_dims

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class DeltaNetConfig(LinAttnConfig):
    model_type = "linattn_delta_net"
    num_heads: int = 16
    expand_k: float = 1.0
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    use_beta: bool = True
    use_gate: bool = False
    field_rules: ClassVar[dict[str, str]] = {
        "expand_k": POSITIVE, "expand_v": POSITIVE, "use_short_conv": BOOL, "conv_size": POSITIVE_INT,
        "use_beta": BOOL, "use_gate": BOOL,
    }

    def check_sizes(self) -> None:
        head_dims(self.hidden_size, self.num_heads, self.expand_k, self.expand_v)


def delta_net_mixer(config: DeltaNetConfig, layer_idx: int) -> DeltaNet:
    return DeltaNet(config.hidden_size, config.num_heads, config.expand_k, config.expand_v, config.use_short_conv,
                    config.conv_size, config.use_beta, config.use_gate, config.norm_eps)


class DeltaNetModel(LinAttnModel):
    config_class = DeltaNetConfig
    build_mixer = staticmethod(delta_net_mixer)


class DeltaNetForCausalLM(LinAttnForCausalLM):
    model_class = DeltaNetModel
