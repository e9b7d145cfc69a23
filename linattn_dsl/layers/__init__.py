"""Token mixers ``(batch, seq, hidden) -> (batch, seq, hidden)`` built on :mod:`linattn_dsl.ops`.

Each layer's ``forward(hidden_states, attention_mask=None, cache=None, use_cache=False, ...)`` returns
``(out, state)``: ``cache``/``state`` is the layer's own state dict (see :mod:`._utils`), ``state`` is
None unless ``use_cache``. Layers run ``chunk_*`` ops to train or on long inputs and
``fused_recurrent_*`` ops when decoding or on short inputs (``mode=`` forces one). ``attention_mask``
``[B, S]`` (1 = token, 0 = left pad) zeroes pad inputs so they leave every state untouched. ``cu_seqlens``
``[N + 1]`` (with ``B == 1``) runs packed documents as separate sequences (see :mod:`._utils`).
"""

from .attention import Attention
from .delta_net import DeltaNet
from .gla import GatedLinearAttention
from .kda import KimiDeltaAttention
from .mamba2 import Mamba2
from .retention import MultiScaleRetention
from .rwkv7 import RWKV7Attention, RWKV7FeedForward
from .spec_layer import SpecLayer

__all__ = [
    "Attention",
    "DeltaNet",
    "GatedLinearAttention",
    "KimiDeltaAttention",
    "Mamba2",
    "MultiScaleRetention",
    "RWKV7Attention",
    "RWKV7FeedForward",
    "SpecLayer",
]
