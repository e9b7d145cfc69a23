"""GLA: Gated Linear Attention blocks (:class:`linattn_dsl.layers.GatedLinearAttention`)."""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import GatedLinearAttention
from linattn_dsl.layers._checks import BOOL, POSITIVE, POSITIVE_INT, head_dims

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class GLAConfig(LinAttnConfig):
    model_type = "linattn_gla"
    expand_k: float = 0.5
    expand_v: float = 1.0
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    field_rules: ClassVar[dict[str, str]] = {
        "expand_k": POSITIVE, "expand_v": POSITIVE, "use_short_conv": BOOL, "conv_size": POSITIVE_INT,
        "use_output_gate": BOOL, "gate_low_rank_dim": POSITIVE_INT, "gate_logit_normalizer": POSITIVE,
    }

    def check_sizes(self) -> None:
        head_dims(self.hidden_size, self.num_heads, self.expand_k, self.expand_v)


def gla_mixer(config: GLAConfig, layer_idx: int) -> GatedLinearAttention:
    return GatedLinearAttention(
        config.hidden_size, config.num_heads, config.expand_k, config.expand_v, config.use_short_conv,
        config.conv_size, config.use_output_gate, config.gate_low_rank_dim, config.gate_logit_normalizer,
        config.norm_eps,
    )


class GLAModel(LinAttnModel):
    config_class = GLAConfig
    build_mixer = staticmethod(gla_mixer)


class GLAForCausalLM(LinAttnForCausalLM):
    model_class = GLAModel
