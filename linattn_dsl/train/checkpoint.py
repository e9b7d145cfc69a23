"""Atomic checkpoints: ``accelerator.save_state`` into ``.tmp-step-N``, then one ``os.replace`` to ``step-N``.

A run killed while writing leaves only a ``.tmp-*`` folder, which the next run deletes; the previous
``step-*`` folder is never touched until the new one is complete. A checkpoint holds the model,
optimiser, scheduler and RNG states (accelerate's files) and ``trainer_state.json`` (step, data position,
the model config it was trained with).

A file that cannot be read back (truncated by a full disk, copied in part) is reported by name, with the
checkpoint before it, as a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint (or exported model) file that cannot be read: the message names the file."""


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def remove_partial(folder: Path) -> None:
    """Delete what a run killed mid-save left behind."""
    for p in folder.glob(".tmp-step-*") if folder.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def save(accelerator: Accelerator, folder: Path, step: int, state: dict[str, Any], keep_latest_k: int) -> Path:
    """Write checkpoint ``step`` atomically and keep the latest ``keep_latest_k`` (0: keep all)."""
    final = folder / f"step-{step}"
    tmp = folder / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # written last: only a renamed folder holding it counts as a checkpoint (see `checkpoints`)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_latest_k > 0:
            for old in checkpoints(folder)[:-keep_latest_k]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path`` (step, data position, model config)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step number")
    except (OSError, ValueError) as e:
        raise CheckpointError(unreadable(path / STATE_FILE, e, previous(path))) from None
    return state


def load(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore what :func:`save` wrote into the prepared objects; returns the trainer state (step, data...).

    Raises :class:`CheckpointError` naming the file when one cannot be read."""
    state = read_state(path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # accelerate does not say which file failed: find it
        bad = first_unreadable(path)
        if bad is not None:
            raise CheckpointError(unreadable(bad[0], bad[1], previous(path))) from None
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(unreadable(Path(e.filename or path), e, previous(path))) from None
        raise
    return state


def previous(path: Path) -> Path | None:
    """The complete checkpoint before ``path`` in its folder, if one is kept."""
    earlier = [p for p in checkpoints(path.parent) if p.name != path.name
               and int(p.name.split("-")[1]) < int(path.name.split("-")[1])]
    return earlier[-1] if earlier else None


def unreadable(file: Path, error: BaseException, before: Path | None = None, checkpoint: bool = True) -> str:
    """One line: which file, why (the first sentence of the error), and what to do instead."""
    reason = str(error).strip().splitlines()[0].split(". ")[0][:200] if str(error).strip() else type(error).__name__
    text = f"{file}: cannot be read (truncated or corrupt? {reason})"
    if not checkpoint:
        return text
    if before is not None:
        return f"{text}; the previous checkpoint is {before}: delete or move {file.parent} and --resume from it"
    return f"{text}; no earlier checkpoint is kept: start again in another job.dump_folder"


def first_unreadable(folder: Path) -> tuple[Path, BaseException] | None:
    """The first file of ``folder`` that does not load (``*.safetensors``, ``*.bin`` / ``*.pt`` / ``*.pkl``,
    ``*.json``), with its error; ``None`` if every one loads. Reads each file whole: call it after a failure."""
    import torch
    from safetensors.torch import load_file

    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix in (".bin", ".pt", ".pkl"):
                torch.load(file, map_location="cpu", weights_only=False)  # the run's own files
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as e:
            return file, e
    return None


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
