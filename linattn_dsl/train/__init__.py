"""Training: ``linattn train --config FILE.toml [--section.key=value ...]`` or, from Python::

    from linattn_dsl.train import load_config, train
    result = train(load_config("configs/tiny_cpu.toml", [("training.steps", 50)]))
    result.final_dir  # save_pretrained folder, loadable with AutoModelForCausalLM

Modules: :mod:`.config` (TOML + overrides, validation), :mod:`.tokenizer`, :mod:`.data` (packing,
split, resumable order), :mod:`.trainer` (the loop), :mod:`.checkpoint` (atomic), :mod:`.report` (log, plot),
:mod:`.cli`. Nothing heavy is imported until used, so ``linattn --help`` stays fast.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("load_config", "ConfigError"):
        from . import config

        return getattr(config, name)
    if name in ("train", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["ConfigError", "TrainResult", "load_config", "train"]
