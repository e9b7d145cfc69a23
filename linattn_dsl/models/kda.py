"""KDA: Kimi Delta Attention blocks (:class:`linattn_dsl.layers.KimiDeltaAttention`)."""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import KimiDeltaAttention
from linattn_dsl.layers._checks import POSITIVE, POSITIVE_INT
from linattn_dsl.layers.kda import kda_head_v_dim

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class KDAConfig(LinAttnConfig):
    model_type = "linattn_kda"
    num_heads: int = 16
    head_dim: int = 128
    expand_v: float = 1.0
    conv_size: int = 4
    field_rules: ClassVar[dict[str, str]] = {"head_dim": POSITIVE_INT, "expand_v": POSITIVE, "conv_size": POSITIVE_INT}

    def check_sizes(self) -> None:
        kda_head_v_dim(self.head_dim, self.expand_v)


def kda_mixer(config: KDAConfig, layer_idx: int) -> KimiDeltaAttention:
    return KimiDeltaAttention(config.hidden_size, config.num_heads, config.head_dim, config.expand_v,
                              config.conv_size, config.norm_eps)


class KDAModel(LinAttnModel):
    config_class = KDAConfig
    build_mixer = staticmethod(kda_mixer)


class KDAForCausalLM(LinAttnForCausalLM):
    model_class = KDAModel
