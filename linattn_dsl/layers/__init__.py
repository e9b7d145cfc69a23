"""Token mixers ``(batch, seq, hidden) -> (batch, seq, hidden)`` built on :mod:`linattn_dsl.ops`.

Each layer's ``forward(hidden_states, attention_mask=None, cache=None, use_cache=False, ...)`` returns
``(out, state)``: ``cache``/``state`` is the layer's own state dict (see :mod:`._utils`), ``state`` is
None unless ``use_cache``. Layers run ``chunk_*`` ops to train or on long inputs and
``fused_recurrent_*`` ops when decoding or on short inputs (``mode=`` forces one). ``attention_mask``
``[B, S]`` (1 = token, 0 = left pad) zeroes pad inputs so they leave every state untouched. ``cu_seqlens``
``[N + 1]`` (with ``B == 1``) runs packed documents as separate sequences (see :mod:`._utils`).

``MultiScaleRetention``, ``GatedLinearAttention``, ``DeltaNet`` and ``KimiDeltaAttention`` are the layers their spec
files declare (``linattn_dsl/specs/retention.py``, ``gla.py``, ``delta_rule.py``, ``kda.py``), built by
:class:`SpecLayer`; their keywords are the declarations' options. ``Mamba``, ``Mamba2``, ``RWKV6Attention`` and
``RWKV7Attention`` are written by hand (docs/adding_a_spec.md says what a declaration cannot say for them).
"""

from .attention import Attention
from .mamba import Mamba
from .mamba2 import Mamba2
from .rwkv6 import RWKV6Attention, RWKV6FeedForward
from .rwkv7 import RWKV7Attention, RWKV7FeedForward
from .spec_layer import SpecLayer, declared_layer

MultiScaleRetention = declared_layer("retention", "MultiScaleRetention")
GatedLinearAttention = declared_layer("gla", "GatedLinearAttention")
DeltaNet = declared_layer("delta_rule", "DeltaNet", num_heads=4)
KimiDeltaAttention = declared_layer("kda", "KimiDeltaAttention", hidden_size=2048)

__all__ = [
    "Attention",
    "DeltaNet",
    "GatedLinearAttention",
    "KimiDeltaAttention",
    "Mamba",
    "Mamba2",
    "MultiScaleRetention",
    "RWKV6Attention",
    "RWKV6FeedForward",
    "RWKV7Attention",
    "RWKV7FeedForward",
    "SpecLayer",
]
