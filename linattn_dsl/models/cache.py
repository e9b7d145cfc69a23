"""The models' decoding cache: one state dict per layer and a seen-token counter.

A layer's dict holds what that layer carries between calls (see :mod:`linattn_dsl.layers._utils`):
``recurrent_state [N, H, K, V]`` (fp32), ``conv_state`` (``{name: [N, D, W]}``), ``shift_state``
(RWKV7 token shift, ``[N, D]``), ``ffn_shift_state`` and ``attn_state = (k, v)`` (``[N, S, H, D]``).
Every tensor has the batch first, so beam search and batch editing are one ``index_select`` each.

transformers' own linear-attention cache layers are not used: they lose the state of layers without
a short conv (see HF_NOTES.md). ``crop`` cannot roll a recurrent state back and raises.

``static=True``: from the first one-token step after the prompt on, the states live in fixed buffers that the step
updates in place, captured in a CUDA graph on CUDA (:mod:`linattn_dsl.models.decode`; ``step`` holds them). A call
of several tokens, or one the step does not cover, first turns the buffers back into the dicts above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from linattn_dsl.layers.attention import StaticKV


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(value, fn) for value in obj)
    return obj


class LinAttnCache(Cache):
    """Per-layer state dicts plus the number of tokens seen (pads included)."""

    def __init__(self, num_layers: int, static: bool = False) -> None:
        super().__init__(layers=[])
        self._states: list[dict | None] = [None] * num_layers
        self.seen_tokens = 0
        self.static = static
        self.step = None   # models.decode.StaticStep while the states live in its buffers

    @property
    def states(self) -> list[dict | None]:
        """One state dict per layer (the step's buffers while a static step holds them)."""
        return self.step.states if self.step is not None else self._states

    @states.setter
    def states(self, states: list[dict | None]) -> None:
        self.step = None
        self._states = states

    def release_step(self) -> None:
        """Turn the static step's buffers back into per-layer dicts (before a call the step does not cover)."""
        if self.step is not None:
            self.states = self.step.dynamic_states(self.seen_tokens)

    # ---------------------------------------------------------------- what the model uses
    def __len__(self) -> int:
        return len(self._states) if self.step is None else self.step.num_layers

    def __getitem__(self, layer_idx: int) -> dict | None:
        return self.states[layer_idx]

    def __setitem__(self, layer_idx: int, state: dict | None) -> None:
        self.release_step()
        self._states[layer_idx] = state

    def __repr__(self) -> str:
        static = ", static=True" if self.static else ""
        return f"{type(self).__name__}(num_layers={len(self)}, seen_tokens={self.seen_tokens}{static})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    # ---------------------------------------------------------------- what generate() asks
    @property
    def is_linear(self) -> list[bool]:
        # False so that generate() slices already-seen tokens when a user continues from this cache.
        return [False] * len(self)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        for state in self.states:
            for tensor in _tensors(state):
                return tensor.shape[0]
        return -1

    def reset(self) -> None:
        self.states = [None] * len(self)
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                f"crop: a recurrent state cannot be rolled back (asked to remove {tokens_to_remove} tokens)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` of every state becomes row ``beam_idx[i]`` (in place in a static step's buffers)."""
        if self.step is not None:
            self.step.reorder(beam_idx)
            return
        self.states = [_map_tensors(s, lambda t: t.index_select(0, beam_idx.to(t.device))) for s in self.states]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.release_step()
        self.states = [_map_tensors(s, lambda t: t.repeat_interleave(repeats, dim=0)) for s in self.states]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.release_step()
        self.states = [_map_tensors(s, lambda t: t[indices]) for s in self.states]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, StaticKV):
        yield obj.k
        yield obj.v
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _tensors(value)
