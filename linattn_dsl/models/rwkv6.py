"""RWKV6: time-mixing blocks (:class:`linattn_dsl.layers.RWKV6Attention`) with RWKV6's channel-mix FFN.

Config field names are FLA's ``RWKV6Config``'s (``expand_k``, ``expand_v``, ``num_heads``, ``proj_low_rank_dim``,
``gate_low_rank_dim``, ``hidden_ratio`` a float, 3.5). The defaults give FLA's layout: LayerNorms with a bias
(``norm_type="layer"``, eps 1e-5) in the blocks and at the end, and one more on the embeddings inside layer 0
(``pre_norm=True``, FLA's ``norm_first``). The channel mix is ``hidden_size * hidden_ratio`` wide, rounded up to a
multiple of 32, unless ``intermediate_size`` is given.
"""

from __future__ import annotations

from typing import ClassVar

from linattn_dsl.layers import RWKV6Attention, RWKV6FeedForward
from linattn_dsl.layers._checks import POSITIVE, POSITIVE_INT
from linattn_dsl.layers.rwkv6 import rwkv6_intermediate_size, rwkv6_sizes

from ._base import LinAttnConfig, LinAttnForCausalLM, LinAttnModel


class RWKV6Config(LinAttnConfig):
    model_type = "linattn_rwkv6"
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    proj_low_rank_dim: int = 32
    gate_low_rank_dim: int = 64
    hidden_ratio: float = 3.5
    norm_type: str = "layer"
    pre_norm: bool = True
    norm_eps: float = 1e-5
    field_rules: ClassVar[dict[str, str]] = {
        "expand_k": POSITIVE, "expand_v": POSITIVE, "proj_low_rank_dim": POSITIVE_INT,
        "gate_low_rank_dim": POSITIVE_INT, "hidden_ratio": POSITIVE,
    }

    def check_sizes(self) -> None:
        rwkv6_sizes(self.hidden_size, self.expand_k, self.expand_v, self.num_heads)
        if self.intermediate_size is None:
            self.intermediate_size = rwkv6_intermediate_size(self.hidden_size, self.hidden_ratio)


def rwkv6_mixer(config: RWKV6Config, layer_idx: int) -> RWKV6Attention:
    return RWKV6Attention(
        config.hidden_size, config.expand_k, config.expand_v, config.num_heads, config.proj_low_rank_dim,
        config.gate_low_rank_dim, layer_idx=layer_idx, num_hidden_layers=config.num_hidden_layers,
        norm_eps=config.norm_eps,
    )


def rwkv6_ffn(config: RWKV6Config, layer_idx: int) -> RWKV6FeedForward:
    return RWKV6FeedForward(config.hidden_size, config.hidden_ratio, config.intermediate_size, layer_idx=layer_idx,
                            num_hidden_layers=config.num_hidden_layers)


class RWKV6Model(LinAttnModel):
    config_class = RWKV6Config
    build_mixer = staticmethod(rwkv6_mixer)
    build_mlp = staticmethod(rwkv6_ffn)


class RWKV6ForCausalLM(LinAttnForCausalLM):
    model_class = RWKV6Model
