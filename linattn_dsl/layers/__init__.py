"""Token mixers ``(batch, seq, hidden) -> (batch, seq, hidden)`` built on :mod:`linattn_dsl.ops`.

Each layer's ``forward(hidden_states, attention_mask=None, cache=None, use_cache=False, ...)`` returns
``(out, state)``: ``cache``/``state`` is the layer's own state dict (see :mod:`._utils`), ``state`` is
None unless ``use_cache``. Layers run ``chunk_*`` ops to train or on long inputs and
``fused_recurrent_*`` ops when decoding or on short inputs (``mode=`` forces one).
"""

from .attention import Attention
from .gla import GatedLinearAttention

__all__ = ["Attention", "GatedLinearAttention"]
