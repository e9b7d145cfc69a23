"""Training config: a TOML file plus dotted overrides, with flame/torchtitan option names.

Sections and keys (defaults in :data:`SCHEMA`)::

    [job]          dump_folder, seed
    [model]        family = "gla" | "retnet" | ... , or spec = "path/to/my_spec.py" (a model registered from any
                   spec: linattn_dsl.models.register_spec), then any field of that config (hybrids: attn)
    [tokenizer]    kind = "byte" | "bpe" | "pretrained", path, vocab_size (bpe)
    [data]         files (text or jsonl), text_field, val_fraction, packed_documents (each batch as one packed
                   row with cu_seqlens: documents, EOS-ended, and blocks are separate sequences to the model)
    [training]     steps, seq_len, batch_size, gradient_accumulation_steps, max_norm, mixed_precision,
                   mixed_precision_reduce (the dtype of DDP's gradient all-reduce: float32, or bfloat16 to
                   send half the bytes; DDP only: under FSDP the accelerate config file sets the reduce
                   dtype), activation_checkpointing, compile, skip_nonfinite, eval_interval, eval_batches
    [optimizer]    name, lr, eps, weight_decay, beta1, beta2
    [lr_scheduler] warmup_steps, decay_type, lr_min
    [checkpoint]   interval, keep_latest_k
    [metrics]      log_freq, plot
    [parallelism]  context_parallel_degree (torchtitan's name: each sequence split across that many processes, the
                   world size = data parallel degree x it; training.seq_len must divide by it)

Every value is checked (unknown key, wrong type, missing file) before any work starts; the error names
the dotted key or the path.

Paths (``job.dump_folder``, ``data.files``, ``tokenizer.path``, ``model.spec``): one written in the config file is
relative to the config file's folder; one given on the command line (or a default) is relative to the current
directory, as any command-line path is.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from linattn_dsl.models import FAMILIES, LinAttnConfig
from linattn_dsl.models import spec_model


class ConfigError(ValueError):
    """A bad training config: the message names the dotted key or the path."""


# section -> key -> (type string, default). Type strings use the same spelling as the model configs.
SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "job": {"dump_folder": ("str", "runs/linattn"), "seed": ("int", 42)},
    "tokenizer": {"kind": ("str", "byte"), "path": ("str | None", None), "vocab_size": ("int", 2048)},
    "data": {"files": ("list[str]", []), "text_field": ("str", "text"), "val_fraction": ("float", 0.05),
             "packed_documents": ("bool", False)},
    "training": {
        "steps": ("int", 100), "seq_len": ("int", 128), "batch_size": ("int", 8),
        "gradient_accumulation_steps": ("int", 1), "max_norm": ("float", 1.0), "mixed_precision": ("str", "bf16"),
        "mixed_precision_reduce": ("str", "float32"), "activation_checkpointing": ("bool", False),
        "compile": ("bool", False), "skip_nonfinite": ("bool", True),
        "eval_interval": ("int", 0), "eval_batches": ("int", 8),
    },
    "optimizer": {"name": ("str", "AdamW"), "lr": ("float", 3e-4), "eps": ("float", 1e-8),
                  "weight_decay": ("float", 0.1), "beta1": ("float", 0.9), "beta2": ("float", 0.95),
                  "implementation": ("str", "fused")},
    "lr_scheduler": {"warmup_steps": ("int", 10), "decay_type": ("str", "cosine"), "lr_min": ("float", 0.1)},
    "checkpoint": {"interval": ("int", 0), "keep_latest_k": ("int", 2)},
    "metrics": {"log_freq": ("int", 1), "plot": ("bool", True)},
    "parallelism": {"context_parallel_degree": ("int", 1)},
}
CHOICES = {
    ("tokenizer", "kind"): ("byte", "bpe", "pretrained"),
    ("training", "mixed_precision"): ("bf16", "no"),
    ("training", "mixed_precision_reduce"): ("float32", "bfloat16"),
    ("optimizer", "name"): ("AdamW",),
    ("optimizer", "implementation"): ("fused", "foreach", "for-loop"),  # torchtitan's option and names
    ("lr_scheduler", "decay_type"): ("cosine", "linear", "constant"),
}
POSITIVE = {("training", k) for k in ("steps", "seq_len", "batch_size", "gradient_accumulation_steps")} | {
    ("optimizer", "lr"), ("tokenizer", "vocab_size"), ("metrics", "log_freq"),
    ("parallelism", "context_parallel_degree")}
PATHS = (("job", "dump_folder"), ("data", "files"), ("tokenizer", "path"), ("model", "spec"))
NON_NEGATIVE = {("training", "eval_interval"), ("training", "eval_batches"), ("lr_scheduler", "warmup_steps"),
                ("checkpoint", "interval"), ("checkpoint", "keep_latest_k"), ("optimizer", "weight_decay"),
                ("training", "max_norm"), ("lr_scheduler", "lr_min")}


def defaults() -> dict[str, dict[str, Any]]:
    cfg = {sec: {k: copy.deepcopy(v[1]) for k, v in keys.items()} for sec, keys in SCHEMA.items()}
    cfg["model"] = {"family": "gla"}
    return cfg


MODEL_KEYS = ("family", "spec")   # which model: not fields of its config


def model_classes(model: dict[str, Any]) -> tuple:
    """(Config, Model, ForCausalLM) of ``cfg["model"]``: its ``spec`` registered (once), else its ``family``."""
    if model.get("spec") is not None:
        from linattn_dsl.compiler.registry import SpecNotFound
        from linattn_dsl.compiler.spec import SpecError

        try:
            return spec_model.classes(spec_model.register_spec(model["spec"]))
        except (SpecNotFound, SpecError, ValueError) as e:
            raise ConfigError(f"model.spec: {e}") from None
    return FAMILIES[model["family"]]


def model_name(model: dict[str, Any]) -> str:
    """What a checkpoint records as the model's kind: the family, or the registered spec's model_type."""
    return model_classes(model)[0].model_type if model.get("spec") is not None else model["family"]


def model_fields(family_or_model) -> dict[str, str]:
    """Config fields a user may set for a family (or a ``cfg["model"]`` dict): name -> type string."""
    config_class = (model_classes(family_or_model)[0] if isinstance(family_or_model, dict)
                    else FAMILIES[family_or_model][0])
    # a spec file's model records its source (a shipped spec's records none)
    fields: dict[str, str] = {"spec_source": "None"} if hasattr(config_class, "spec_source") else {}
    for cls in reversed(config_class.__mro__):
        if issubclass(cls, LinAttnConfig):
            fields.update({k: v for k, v in cls.__dict__.get("__annotations__", {}).items()
                           if not v.startswith("ClassVar")})
    return fields


def type_ok(value: Any, type_str: str) -> bool:
    """Does ``value`` (from TOML) match a type string such as ``int | list[int] | None``?"""
    for alt in (a.strip() for a in type_str.split("|")):
        if alt == "None" and value is None:
            return True
        if alt == "bool" and isinstance(value, bool):
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if alt == "str" and isinstance(value, str):
            return True
        if alt.startswith("dict") and isinstance(value, dict):
            return True
        if alt.startswith("list[") and isinstance(value, list):
            return all(type_ok(v, alt[5:-1]) for v in value)
    return False


def parse_value(text: str) -> Any:
    """A command-line value as a TOML literal (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``{layers=[1]}``), else
    the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["--training.steps=10", "--optimizer.lr", "1e-3"]`` -> ``[("training.steps", 10), ("optimizer.lr", 1e-3)]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"{arg}: expected an override --section.key=value (e.g. --training.steps=100)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            key, text = arg[2:], args[i + 1]
            i += 2
        out.append((key, parse_value(text)))
    return out


def load_config(path: str | Path | None, overrides: list[tuple[str, Any]] = ()) -> dict[str, dict[str, Any]]:
    """Defaults, then the TOML file, then the overrides; validated. Raises :class:`ConfigError`."""
    cfg = defaults()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            user = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
        for sec, keys in user.items():
            if not isinstance(keys, dict):
                raise ConfigError(f"{sec}: expected a [section] table, got {keys!r}")
            if sec not in cfg:
                raise ConfigError(f"{sec}: unknown section; expected one of {sorted(cfg)}")
            cfg[sec].update(keys)
        for sec, key in PATHS:  # the file's own paths are relative to it
            if key in user.get(sec, {}):
                cfg[sec][key] = relative_to(path.parent, cfg[sec][key])
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] not in cfg:
            raise ConfigError(f"{key}: unknown section {parts[0]!r}; expected one of {sorted(cfg)}")
        target = cfg
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{key}: {p} is not a table")
        target[parts[-1]] = value
    validate(cfg)
    return cfg


def relative_to(base: Path, value: Any) -> Any:
    """``value`` (a path or a list of paths; anything else is left for :func:`validate` to reject) read
    relative to ``base``."""
    if isinstance(value, str):
        return value if os.path.isabs(value) else os.path.normpath(base / value)
    if isinstance(value, list):
        return [relative_to(base, v) for v in value]
    return value


def validate(cfg: dict[str, dict[str, Any]]) -> None:
    """Check every key, type, range and file (paths as given: :func:`load_config` resolved the file's)."""
    for sec, keys in SCHEMA.items():
        for key, value in cfg[sec].items():
            if key not in keys:
                raise ConfigError(f"{sec}.{key}: unknown key; expected one of {sorted(keys)}")
            type_str = keys[key][0]
            if not type_ok(value, type_str):
                raise ConfigError(f"{sec}.{key}: expected {type_str}, got {value!r}")
            if (sec, key) in CHOICES and value not in CHOICES[sec, key]:
                raise ConfigError(f"{sec}.{key}: expected one of {CHOICES[sec, key]}, got {value!r}")
            if (sec, key) in POSITIVE and value <= 0:
                raise ConfigError(f"{sec}.{key}: expected a positive number, got {value!r}")
            if (sec, key) in NON_NEGATIVE and value < 0:
                raise ConfigError(f"{sec}.{key}: expected a number >= 0, got {value!r}")
    cp, seq_len = cfg["parallelism"]["context_parallel_degree"], cfg["training"]["seq_len"]
    if seq_len % cp:
        raise ConfigError(f"parallelism.context_parallel_degree: {cp} does not divide training.seq_len={seq_len}; "
                          "each of the processes that split a sequence holds seq_len / degree of its tokens")
    if not 0 <= cfg["data"]["val_fraction"] < 1:
        raise ConfigError(f"data.val_fraction: expected 0 <= value < 1, got {cfg['data']['val_fraction']!r}")
    validate_model(cfg["model"])
    files = cfg["data"]["files"]
    if not files:
        raise ConfigError("data.files: expected at least one text or jsonl file (in the --config file, or "
                          "--data.files='[\"corpus.txt\"]')")
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"data.files: {f}: no such file")
    tok = cfg["tokenizer"]
    if tok["kind"] == "pretrained":
        if tok["path"] is None:
            raise ConfigError("tokenizer.path: required when tokenizer.kind = 'pretrained'")
        p = Path(tok["path"])
        if not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
            raise ConfigError(f"tokenizer.path: {tok['path']}: not a folder holding a Hugging Face tokenizer")
    elif tok["kind"] == "bpe" and tok["vocab_size"] < 300:
        raise ConfigError(f"tokenizer.vocab_size: expected >= 300 for a byte-level BPE, got {tok['vocab_size']}")


def validate_model(model: dict[str, Any]) -> None:
    spec = model.get("spec")
    if spec is not None:
        if not isinstance(spec, str) or not Path(spec).is_file():
            raise ConfigError(f"model.spec: expected the path of a spec file, got {spec!r}"
                              + (" (no such file)" if isinstance(spec, str) else ""))
        family = model_name(model)
    else:
        family = model.get("family")
        if family not in FAMILIES:
            raise ConfigError(f"model.family: expected one of {sorted(FAMILIES)}, got {family!r}")
    fields = model_fields(model)
    fields.pop("spec_source", None)
    for key, value in model.items():
        if key in MODEL_KEYS:
            continue
        if key not in fields:
            what = f"family {family!r}" if spec is None else f"the model of spec {spec!r}"
            raise ConfigError(f"model.{key}: unknown key for {what}; expected one of {sorted(fields)}")
        if not type_ok(value, fields[key]):
            raise ConfigError(f"model.{key}: expected {fields[key]}, got {value!r}")
    try:  # the family's own checks (sizes, heads that must divide, hybrid attn layers...): "field: ..." messages
        model_classes(model)[0](**{k: v for k, v in model.items() if k not in MODEL_KEYS})
    except (ValueError, TypeError) as e:
        field = re.match(r"[a-z_][\w.]*: ", str(e))  # messages start with the field they name
        raise ConfigError(f"model.{e}" if field else f"model: {e}") from None
