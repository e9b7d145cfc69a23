"""Atomic checkpoints: ``accelerator.save_state`` into ``.tmp-step-N``, then one ``os.replace`` to ``step-N``.

A run killed while writing leaves only a ``.tmp-*`` folder, which the next run deletes; the previous
``step-*`` folder is never touched until the new one is complete. A checkpoint holds the model,
optimiser, scheduler and RNG states (accelerate's files) and ``trainer_state.json`` (step, data position).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


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


def load(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore what :func:`save` wrote into the prepared objects; returns the trainer state (step, data...)."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
