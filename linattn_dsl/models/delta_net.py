"""DeltaNet: delta-rule blocks (:class:`linattn_dsl.layers.DeltaNet`)."""

from __future__ import annotations

from linattn_dsl.layers import DeltaNet

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


def delta_net_mixer(config: DeltaNetConfig, layer_idx: int) -> DeltaNet:
    return DeltaNet(config.hidden_size, config.num_heads, config.expand_k, config.expand_v, config.use_short_conv,
                    config.conv_size, config.use_beta, config.use_gate, config.norm_eps)


class DeltaNetModel(LinAttnModel):
    config_class = DeltaNetConfig
    build_mixer = staticmethod(delta_net_mixer)


class DeltaNetForCausalLM(LinAttnForCausalLM):
    config_class = DeltaNetConfig
    model_class = DeltaNetModel
