"""The one-token decoding step on fixed buffers, captured in a CUDA graph.

A static cache (``LinAttnCache(static=True)``; on CUDA the model makes one when ``config.decode_cuda_graph``) keeps,
from the first one-token step after the prompt on, every layer's state in buffers that the step updates in place:

* recurrent, conv and token-shift states: the step computes each layer's new state as eagerly and copies it into
  the layer's buffer (``copy_``), so every layer, whatever it carries, needs nothing of its own;
* attention keys and values: :class:`~linattn_dsl.layers.attention.StaticKV`, a buffer of ``capacity`` columns
  (column ``j`` holds token ``j``, pads included) written at the step's column, attended under a mask of the
  valid columns (left pads out, the window applied); when the tokens reach the capacity the buffers double and the
  step is captured again.

The step's inputs are buffers too: the token ids, the RoPE positions, the column written and the valid columns
(from the attention mask generate passes). Filling them is a few device copies and no host sync; on CUDA the
step itself is one graph replay (the model's layers, its final norm and ``lm_head``), so the per-token host work
is that of transformers' ``generate`` loop (logits processors, stopping criteria). On the CPU the same step runs
eagerly on the same buffers (what the tests compare against the dynamic cache).

A step of a model without attention layers outlives its cache (:func:`step_for`): the next cache of the same batch
and state shapes (the next ``generate`` call; lm-eval makes many) loads its prompt's states into that step's buffers
and replays the graph already captured. A step is free once its cache is gone and it never handed its buffers out
as per-layer dicts (``release_step``); the most recent :data:`POOL` steps of a model are kept.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from linattn_dsl.layers.attention import StaticKV

from .cache import LinAttnCache, _tensors

# attention buffers hold twice the tokens so far (at least this many more), rounded up to a multiple of it
CAPACITY_STEP = 256
# steps kept per model for later caches of the same batch and state shapes (module docstring)
POOL = 4
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> [(layout, StaticStep)], oldest first


def _copy_into(static, new, where: str) -> None:
    """Copy the tensors of ``new`` (a layer's returned state) into ``static`` (its buffers), same structure."""
    if isinstance(static, torch.Tensor):
        if not isinstance(new, torch.Tensor) or new.shape != static.shape:
            raise RuntimeError(f"{where}: a one-token step returned {type(new).__name__} "
                               f"{list(getattr(new, 'shape', []))} for a state buffer {list(static.shape)}")
        if new is not static:
            static.copy_(new)
    elif isinstance(static, dict):
        for key, value in static.items():
            _copy_into(value, new[key], f"{where}.{key}")
    elif isinstance(static, (tuple, list)):
        for i, (a, b) in enumerate(zip(static, new)):
            _copy_into(a, b, f"{where}[{i}]")


def _buffers(state, seen: int, capacity: int, write: torch.Tensor, valid: torch.Tensor):
    """A layer's dynamic state as buffers: tensors cloned, an attention layer's ``(k, v)`` into a StaticKV."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(state, dict):
        out = {}
        for key, value in state.items():
            if key == "attn_state":
                out["attn_static"] = StaticKV.of(value[0], value[1], seen, capacity, write, valid)
            else:
                out[key] = _buffers(value, seen, capacity, write, valid)
        return out
    if isinstance(state, (tuple, list)):
        return type(state)(_buffers(v, seen, capacity, write, valid) for v in state)
    return state


def _layout(state):
    """What a layer's state must match for a pooled step's buffers to take it: its structure and every tensor's
    shape, dtype and device (other leaves, such as a RoPE layer's token count, are not read by the step)."""
    if isinstance(state, torch.Tensor):
        return (tuple(state.shape), state.dtype, state.device)
    if isinstance(state, dict):
        return tuple((key, _layout(value)) for key, value in state.items())
    if isinstance(state, (tuple, list)):
        return tuple(_layout(v) for v in state)
    return type(state).__name__


def step_for(model, cache: LinAttnCache, graphs: bool) -> StaticStep:
    """The static step for ``cache``'s first one-token call: a free pooled step of the same layout with the cache's
    states loaded into its buffers, else a new one (pooled unless the model has attention layers, whose buffers'
    capacity follows the prompt)."""
    states = cache.states
    if any(isinstance(s, dict) and "attn_state" in s for s in states):
        return StaticStep(model, cache, graphs)
    # a captured graph reads the weights where they were: a model moved or cast since gets a new step
    weights = tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))
    layout = (cache.batch_size, graphs, tuple(_layout(s) for s in states), weights)
    pool = _POOLS.setdefault(model, [])
    for i, (lay, step) in enumerate(pool):
        if lay == layout and step.free():
            step.adopt(cache)
            pool.append(pool.pop(i))
            return step
    step = StaticStep(model, cache, graphs)
    pool.append((layout, step))
    if len(pool) > POOL:
        drop = next((i for i, (_, st) in enumerate(pool) if st.free()), 0)
        pool.pop(drop)
    return step


def _dynamic(state, seen: int):
    """A layer's buffers as the dynamic cache holds them (what a multi-token call continues from)."""
    if isinstance(state, dict):
        out = {}
        for key, value in state.items():
            if key == "attn_static":
                out["attn_state"] = value.keys_so_far(seen)
            else:
                out[key] = _dynamic(value, seen)
        if "seen_tokens" in out:
            out["seen_tokens"] = seen
        return out
    if isinstance(state, (tuple, list)):
        return type(state)(_dynamic(v, seen) for v in state)
    return state


class StaticStep:
    """A model's one-token step over a batch of ``B`` rows on fixed buffers (module docstring)."""

    def __init__(self, model, cache: LinAttnCache, graphs: bool) -> None:
        self._model = weakref.ref(model)   # a pooled step must not keep its model alive
        self.owner = weakref.ref(cache)
        self.released = False
        seen = cache.seen_tokens
        states = cache.states
        batch = cache.batch_size
        device = next(model.parameters()).device
        has_attention = any(isinstance(s, dict) and "attn_state" in s for s in states)
        wanted = max(2 * seen, seen + CAPACITY_STEP)   # doubling: log2 captures over a generation
        self.capacity = CAPACITY_STEP * -(-wanted // CAPACITY_STEP) if has_attention else 0
        self.ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.write = torch.zeros(1, dtype=torch.int64, device=device)
        self.valid = torch.ones(batch, max(self.capacity, 1), dtype=torch.bool, device=device)
        self.states = [_buffers(s, seen, self.capacity, self.write, self.valid) for s in states]
        self.num_layers = len(states)
        self.logits = None
        self.graph = None
        if graphs:
            try:
                self._capture()
            except RuntimeError as e:   # a kernel or op that cannot be captured: the same step, eagerly
                self.graph = None
                torch.cuda.synchronize()
                warnings.warn(f"decoding step not captured in a CUDA graph ({type(e).__name__}: {str(e)[:200]}); "
                              "it runs eagerly on the same buffers", stacklevel=4)

    @property
    def model(self):
        return self._model()

    def free(self) -> bool:
        """Whether a new cache may take this step: its cache is gone and no caller holds its buffers as dicts."""
        return not self.released and self.owner() is None

    def adopt(self, cache: LinAttnCache) -> None:
        """Take ``cache``'s states (of this step's layout) into the buffers; the captured graph reads them as is."""
        for i, (static, new) in enumerate(zip(self.states, cache.states)):
            _copy_into(static, new, f"layer {i}")
        self.owner = weakref.ref(cache)

    # ------------------------------------------------------------------ the step
    def _run(self) -> None:
        view = LinAttnCache(self.num_layers)
        view.states = list(self.states)
        view.seen_tokens = 1   # any count > 0: positions come from self.pos
        out = self.model.model(input_ids=self.ids, cache=view, use_cache=True, position_ids=self.pos,
                               return_dict=True)
        for i, (static, new) in enumerate(zip(self.states, view.states)):
            _copy_into(static, new, f"layer {i}")
        self.logits = self.model.lm_head(out.last_hidden_state)

    def _capture(self) -> None:
        """Warm up on a side stream (compiles and tunes every kernel), put the buffers back, capture."""
        saved = [t.clone() for t in self._all_tensors()]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream().wait_stream(stream)
        finally:
            for t, s in zip(self._all_tensors(), saved):
                t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()

    def _all_tensors(self) -> list[torch.Tensor]:
        return [t for s in self.states for t in _tensors(s)] + [self.valid]

    def __call__(self, input_ids: torch.Tensor, seen: int, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, 1, vocab]`` of the next token ``input_ids [B, 1]`` after ``seen`` tokens; the buffers move
        on by one token."""
        self.ids.copy_(input_ids)
        if position_ids is not None:
            self.pos.copy_(position_ids.reshape(-1, 1).expand_as(self.pos))
        elif attention_mask is not None:   # positions count real tokens: left pads out (a short mask: the rest real)
            self.pos.copy_((seen - (attention_mask == 0).sum(-1, keepdim=True)).clamp_min(0))
        else:
            self.pos.fill_(seen)
        if self.capacity:
            self.write.fill_(seen)
            if attention_mask is not None:
                cols = min(attention_mask.shape[1], seen + 1)
                self.valid[:, seen + 1 - cols:seen + 1].copy_(attention_mask[:, -cols:].bool())
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        return self.logits.clone()

    # ------------------------------------------------------------------ what the cache asks
    def fits(self, seen: int) -> bool:
        return not self.capacity or seen < self.capacity

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row ``i`` of every buffer becomes row ``index[i]``, in place (the graph reads the same
        buffers)."""
        for t in self._all_tensors():
            t.copy_(t.index_select(0, index.to(t.device)))

    def dynamic_states(self, seen: int) -> list:
        """The buffers as per-layer dicts (sharing their tensors: the step is not pooled for another cache again)."""
        self.released = True
        return [_dynamic(s, seen) for s in self.states]
