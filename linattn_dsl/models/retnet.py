"""RetNet: multi-scale retention blocks (:class:`linattn_dsl.layers.MultiScaleRetention`)."""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import MultiScaleRetention
from linattn_dsl.layers._checks import BOOL, POSITIVE, head_dims

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class RetNetConfig(LinAttnConfig):
    model_type = "linattn_retnet"
    num_heads: int = 8
    expand_k: float = 1.0
    expand_v: float = 2.0
    use_output_gate: bool = True
    rope_theta: float = 10000.0
    field_rules: ClassVar[dict[str, str]] = {
        "expand_k": POSITIVE, "expand_v": POSITIVE, "use_output_gate": BOOL, "rope_theta": POSITIVE,
    }

    def check_sizes(self) -> None:
        head_dims(self.hidden_size, self.num_heads, self.expand_k, self.expand_v)


def retnet_mixer(config: RetNetConfig, layer_idx: int) -> MultiScaleRetention:
    return MultiScaleRetention(config.hidden_size, config.num_heads, config.expand_k, config.expand_v,
                               config.use_output_gate, config.rope_theta, config.norm_eps)


class RetNetModel(LinAttnModel):
    config_class = RetNetConfig
    build_mixer = staticmethod(retnet_mixer)


class RetNetForCausalLM(LinAttnForCausalLM):
    model_class = RetNetModel
