"""Argument checks shared by the layers and the model configs: one spelling of each rule and of its error.

Every failure is a ``ValueError`` that starts with the argument's name, then what was expected and what
came (``hidden_size: expected a positive int, got -64``), so a model config and the layer it builds
report a bad size the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# what a rule says in the error message -> the test; "... or None" rules also accept None
RULES: dict[str, Callable[[Any], bool]] = {
    "a positive int": lambda v: _is_int(v) and v > 0,
    "an int >= 0": lambda v: _is_int(v) and v >= 0,
    "a positive number": lambda v: _is_number(v) and v > 0,
    "a number >= 0": lambda v: _is_number(v) and v >= 0,
    "a bool": lambda v: isinstance(v, bool),
}
POSITIVE_INT = "a positive int"
POSITIVE_INT_OR_NONE = "a positive int or None"
NON_NEGATIVE_INT = "an int >= 0"
POSITIVE = "a positive number"
NON_NEGATIVE = "a number >= 0"
BOOL = "a bool"


def check(name: str, value: Any, rule: str) -> Any:
    """``value`` if it satisfies ``rule`` (a key of :data:`RULES`, optionally ending in " or None")."""
    base = rule.removesuffix(" or None")
    if not (value is None and base != rule) and not RULES[base](value):
        raise ValueError(f"{name}: expected {rule}, got {value!r}")
    return value


def check_all(rules: Mapping[str, str], values: Mapping[str, Any]) -> None:
    """:func:`check` every ``name: rule`` of ``rules`` on ``values[name]`` (a layer passes its ``__init__``'s
    ``locals()``, a config its fields)."""
    for name, rule in rules.items():
        check(name, values[name], rule)


def describe(value: Any) -> str:
    """``a torch.float32 tensor of shape [2, 3]`` or the type's name: what a shape error says it got."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def check_hidden_states(hidden_states: Any, hidden_size: int, name: str = "hidden_states") -> None:
    """A layer's input: a floating tensor ``[B, T, hidden_size]``, ``T >= 1``."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3 or hidden_states.shape[1] < 1 \
            or hidden_states.shape[-1] != hidden_size or not hidden_states.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor [batch, seq_len >= 1, hidden_size={hidden_size}], "
                         f"got {describe(hidden_states)}")


def check_input_ids(input_ids: Any) -> None:
    """A model's ``input_ids``: an int64 / int32 tensor ``[B, T]``, ``T >= 1``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype not in (torch.int64, torch.int32):
        hint = " (one sequence: input_ids[None])" if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 1 else ""
        raise ValueError(f"input_ids: expected an int64 / int32 tensor [batch, seq_len >= 1]{hint}, "
                         f"got {describe(input_ids)}")


def check_position_ids(position_ids: Any, batch: int, seq_len: int) -> None:
    """``position_ids``: None, ``[B, T]`` (or ``[1, T]``) or ``[T]``."""
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.ndim not in (1, 2)
                                     or position_ids.shape[-1] != seq_len
                                     or (position_ids.ndim == 2 and position_ids.shape[0] not in (1, batch))):
        raise ValueError(f"position_ids: expected a tensor [batch={batch}, seq_len={seq_len}] or [seq_len], "
                         f"got {describe(position_ids)}")


def check_inputs(hidden_states: Any, attention_mask: torch.Tensor | None, hidden_size: int) -> None:
    """What every layer's ``forward`` checks first: ``hidden_states [B, T, hidden_size]`` and a mask
    ``[B, S]`` with ``S >= T`` (a layer does not know how many cached tokens the mask covers)."""
    check_hidden_states(hidden_states, hidden_size)
    check_attention_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1], None)


def check_attention_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int, past_len: int | None) -> None:
    """``attention_mask [B, S]`` (1 = token, 0 = left pad) over the new tokens and at most the ``past_len``
    cached ones before them (``None``: any number of cached tokens)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        raise ValueError(f"attention_mask: expected a tensor [batch, cached + new tokens], "
                         f"got {describe(attention_mask)}")
    longest = seq_len + past_len if past_len is not None else None
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len or \
            (longest is not None and attention_mask.shape[1] > longest):
        cols = f">= {seq_len}" if longest is None else f"{seq_len}" if longest == seq_len else f"{seq_len}..{longest}"
        raise ValueError(f"attention_mask: expected shape [{batch}, {cols}] ([batch, cached + new tokens]), "
                         f"got {list(attention_mask.shape)}")


def check_cu_seqlens(cu_seqlens: Any, batch: int, seq_len: int) -> None:
    """``cu_seqlens``: None, or the offsets ``[N + 1]`` (int32 / int64) of ``N`` documents packed into one row
    of ``seq_len`` tokens (FlashAttention's convention): ``0 = c_0 < c_1 < ... < c_N = seq_len``, batch size 1."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected an int32 / int64 tensor [N + 1] of document offsets (N >= 1), "
                         f"got {describe(cu_seqlens)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: expected the documents packed into one row (batch size 1, inputs "
                         f"[1, total tokens]), got batch size {batch}")
    if torch.compiler.is_compiling():   # reading the values would be a host sync: asserted on the device instead
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == seq_len) & (cu_seqlens.diff() > 0).all()
        torch._assert_async(ok, f"cu_seqlens: expected strictly increasing offsets from 0 to seq_len={seq_len} "
                                "(no empty document)")
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != seq_len or any(b <= a for a, b in zip(offsets, offsets[1:])):
        shown = offsets if len(offsets) <= 12 else [*offsets[:6], "...", *offsets[-6:]]
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to seq_len={seq_len} (no empty "
                         f"document), got {shown}")


def check_packed(cu_seqlens: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: Any,
                 use_cache: bool) -> None:
    """What packed documents (``cu_seqlens``, checked) exclude: padding (documents need none) and a decoding
    cache (the cache holds one state per batch row, a packed row holds several documents)."""
    if cu_seqlens is None:
        return
    if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all()):
        raise ValueError(f"attention_mask: expected none (or all ones) with cu_seqlens (packed documents need no "
                         f"padding), got {int((attention_mask == 0).sum())} padded positions")
    if cache is not None or use_cache:
        raise ValueError(f"cache / use_cache: expected no cache and use_cache=False with cu_seqlens (a cache holds "
                         f"one state per batch row; a packed row holds several documents), got "
                         f"cache={type(cache).__name__ if cache is not None else None}, use_cache={use_cache}")


def check_cp(cp_context: Any, batch: int, seq_len: int, cu_seqlens: Any, attention_mask: torch.Tensor | None,
             cache: Any, use_cache: bool) -> None:
    """What a context-parallel forward (``cp_context``, a sequence split across ranks) needs, checked on the host
    before any communication: a context from :func:`linattn_dsl.distributed.cp_context`, the packing given to it
    (not as ``cu_seqlens``) and covering ``world * seq_len`` tokens, no padding and no cache (context parallelism
    is for training and scoring; a cache holds the state of whole sequences)."""
    if cp_context is None:
        return
    from linattn_dsl.runtime.cp import CPContext

    if not isinstance(cp_context, CPContext):
        raise ValueError(f"cp_context: expected None or a context from linattn_dsl.distributed.cp_context(group, "
                         f"cu_seqlens), got {type(cp_context).__name__}")
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: with cp_context, pass the global packing to cp_context(group, cu_seqlens) "
                         "and leave cu_seqlens None (each rank's pieces follow from it)")
    if cache is not None or use_cache:
        raise ValueError(f"cache / use_cache: expected no cache and use_cache=False with cp_context (context "
                         f"parallelism is for training and scoring, not decoding), got "
                         f"cache={type(cache).__name__ if cache is not None else None}, use_cache={use_cache}")
    if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all()):
        raise ValueError(f"attention_mask: expected none (or all ones) with cp_context (pack documents with its "
                         f"cu_seqlens instead of padding), got {int((attention_mask == 0).sum())} padded positions")
    total = cp_context.world * seq_len
    if cp_context.cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cp_context: packed sequences (its cu_seqlens) need the documents in one row (batch "
                             f"size 1), got batch size {batch}")
        if cp_context.cu_seqlens[-1] != total:
            raise ValueError(f"cp_context: its cu_seqlens cover {cp_context.cu_seqlens[-1]} tokens, but its "
                             f"{cp_context.world} ranks of seq_len={seq_len} local tokens hold {total}; each rank "
                             f"passes total / world tokens")
