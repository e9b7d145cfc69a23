"""RetNet: multi-scale retention blocks (:class:`linattn_dsl.layers.MultiScaleRetention`)."""

from __future__ import annotations

from linattn_dsl.layers import MultiScaleRetention

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class RetNetConfig(LinAttnConfig):
    model_type = "linattn_retnet"
    num_heads: int = 8
    expand_k: float = 1.0
    expand_v: float = 2.0
    use_output_gate: bool = True
    rope_theta: float = 10000.0


def retnet_mixer(config: RetNetConfig, layer_idx: int) -> MultiScaleRetention:
    return MultiScaleRetention(config.hidden_size, config.num_heads, config.expand_k, config.expand_v,
                               config.use_output_gate, config.rope_theta, config.norm_eps)


class RetNetModel(LinAttnModel):
    config_class = RetNetConfig
    build_mixer = staticmethod(retnet_mixer)


class RetNetForCausalLM(LinAttnForCausalLM):
    config_class = RetNetConfig
    model_class = RetNetModel
