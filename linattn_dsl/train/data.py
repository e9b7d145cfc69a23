"""Training data from local files: read documents, tokenise, concatenate with EOS, pack into ``seq_len``
blocks, split off a held-out set, and serve batches in a deterministic order that can be resumed.

A ``.jsonl`` file holds one document per line (``{"text": ...}``, field set by ``data.text_field``); any
other file is one document of plain text.

With ``data.packed_documents`` a micro-batch goes to the model as one packed row with ``cu_seqlens``
(:func:`model_inputs`): each document (ending at its EOS) and each block's start is a sequence of its own, so no
state, convolution, token shift or attention crosses a document boundary, and the model ignores the target
across each boundary (the token after an EOS is not predicted from the document before it).

With context parallelism (``parallelism.context_parallel_degree``) the processes of one context-parallel group share
each micro-batch and each keeps its contiguous slice of every row (of the packed row), with the ``cp_context`` that
tells the model the split and the global packing (:func:`model_inputs`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


def read_documents(files: list[str], text_field: str = "text") -> Iterator[str]:
    for f in files:
        path = Path(f)
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"data.files: {f}:{n}: expected a JSON object with a "
                                         f"{text_field!r} string (data.text_field)") from None
                    yield doc
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def pack(files: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, text_field: str = "text") -> torch.Tensor:
    """All documents tokenised, each followed by EOS, concatenated and cut into blocks: ``[N, seq_len]`` int64
    (the tail shorter than a block is dropped)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in read_documents(files, text_field):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"data.files: {len(ids)} tokens in all, fewer than one block of training.seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle blocks with ``seed`` and hold out ``val_fraction`` of them (at least one when > 0): (train, val)."""
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * len(blocks))) if val_fraction > 0 else 0
    if n_val >= len(blocks):
        raise ValueError(f"data.val_fraction: {val_fraction} leaves no training block out of {len(blocks)}")
    return blocks[perm[n_val:]], blocks[perm[:n_val]]


def pack_rows(rows: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``[B, T]`` as one packed row: ``(input_ids [1, B * T], cu_seqlens [N + 1] int32)``, a document
    ending after each ``eos_token_id`` and at each block's end (a block may start or end inside a document)."""
    batch, seq_len = rows.shape
    after_eos = (rows.reshape(-1) == eos_token_id).nonzero().reshape(-1) + 1
    block_ends = torch.arange(batch + 1, device=rows.device) * seq_len
    cu_seqlens = torch.unique(torch.cat([block_ends, after_eos]))  # sorted; an EOS ending a block counts once
    return rows.reshape(1, -1), cu_seqlens.to(torch.int32)


def model_inputs(rows: torch.Tensor, eos_token_id: int | None = None, cp_group=None) -> dict:
    """The model's inputs for blocks ``[B, T]``: ``{"input_ids": rows}``, or with ``eos_token_id``
    (``data.packed_documents``) one packed row and its ``cu_seqlens`` (:func:`pack_rows`). With ``cp_group`` (the
    process group that splits each sequence): this process's slice of the ids, ``T / group size`` tokens of every
    row, and ``cp_context`` (:func:`linattn_dsl.distributed.cp_context`, holding the global ``cu_seqlens``); the
    labels to pass are the same slice."""
    if eos_token_id is None:
        inputs = {"input_ids": rows}
    else:
        input_ids, cu_seqlens = pack_rows(rows, eos_token_id)
        inputs = {"input_ids": input_ids, "cu_seqlens": cu_seqlens}
    if cp_group is None:
        return inputs
    from linattn_dsl.distributed import cp_context

    ctx = cp_context(cp_group, inputs.get("cu_seqlens"))
    ids = inputs["input_ids"]
    if ids.shape[1] % ctx.world:
        raise ValueError(f"rows: {ids.shape[1]} tokens per row do not split evenly over the {ctx.world} processes of "
                         "the context-parallel group")
    n = ids.shape[1] // ctx.world
    return {"input_ids": ids[:, ctx.rank * n:(ctx.rank + 1) * n], "cp_context": ctx}


class BlockSampler:
    """Micro-batches of ``batch_size`` blocks for one process of ``num_processes``.

    Epoch ``e`` visits the blocks in ``randperm(generator seeded seed + e)``; each micro-batch takes
    ``batch_size * num_processes`` consecutive indices, this process the slice ``rank``. The position
    (``epoch``, ``index``) is all a checkpoint needs to resume the same sequence of batches.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, rank: int = 0, num_processes: int = 1):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.per_epoch = len(blocks) // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(f"training.batch_size: {len(blocks)} training blocks are fewer than one batch of "
                             f"{batch_size} x {num_processes} process(es)")
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next_batch(self) -> torch.Tensor:
        """``[batch_size, seq_len]`` int64."""
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        start = (self.index * self.num_processes + self.rank) * self.batch_size
        self.index += 1
        return self.blocks[self._perm[start:start + self.batch_size]]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._perm = self._permutation()
