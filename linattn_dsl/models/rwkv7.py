"""RWKV7: time-mixing blocks (:class:`linattn_dsl.layers.RWKV7Attention`) with RWKV7's channel-mix FFN.

The first RWKV7 layer (the first index not in ``attn.layers``) provides the value residual ``v_first``.
``norm_type="layer", pre_norm=True`` (fields of every config) give RWKV-7's own layout, FLA's too: LayerNorms with a
bias in the blocks and at the end, and one more on the embeddings inside layer 0 (RWKV's ``ln0``).
"""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import RWKV7Attention, RWKV7FeedForward
from linattn_dsl.layers._checks import POSITIVE_INT
from linattn_dsl.layers.rwkv7 import rwkv7_num_heads

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class RWKV7Config(LinAttnConfig):
    model_type = "linattn_rwkv7"
    head_dim: int = 64
    decay_low_rank_dim: int = 64
    gate_low_rank_dim: int = 128
    a_low_rank_dim: int = 64
    v_low_rank_dim: int = 16
    field_rules: ClassVar[dict[str, str]] = {
        "head_dim": POSITIVE_INT, "decay_low_rank_dim": POSITIVE_INT, "gate_low_rank_dim": POSITIVE_INT,
        "a_low_rank_dim": POSITIVE_INT, "v_low_rank_dim": POSITIVE_INT,
    }

    def check_sizes(self) -> None:
        self.num_heads = rwkv7_num_heads(self.hidden_size, self.head_dim)  # set by head_dim, not chosen
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size


def rwkv7_mixer(config: RWKV7Config, layer_idx: int) -> RWKV7Attention:
    first = min(i for i in range(config.num_hidden_layers) if not config.is_attention_layer(i))
    return RWKV7Attention(
        config.hidden_size, config.head_dim, config.decay_low_rank_dim, config.gate_low_rank_dim,
        config.a_low_rank_dim, config.v_low_rank_dim, first_layer=layer_idx == first, layer_idx=layer_idx,
        num_hidden_layers=config.num_hidden_layers, norm_eps=config.norm_eps,
    )


def rwkv7_ffn(config: RWKV7Config, layer_idx: int) -> RWKV7FeedForward:
    return RWKV7FeedForward(config.hidden_size, config.intermediate_size)


class RWKV7Model(LinAttnModel):
    config_class = RWKV7Config
    build_mixer = staticmethod(rwkv7_mixer)
    build_mlp = staticmethod(rwkv7_ffn)


class RWKV7ForCausalLM(LinAttnForCausalLM):
    model_class = RWKV7Model
