"""``linattn train``: argument parsing only; the work is in :mod:`.config` and :mod:`.trainer`.

Overrides use flame/torchtitan's dotted names, ``--training.steps=100`` or ``--training.steps 100``; any
argument of that shape is collected (argparse does not know the keys) and checked by
:func:`~linattn_dsl.train.config.load_config`, which names an unknown or mistyped key.
"""

from __future__ import annotations

import argparse
import types


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "train", help="train a model from a TOML config (flame-style --section.key=value overrides)",
        allow_abbrev=False,
        epilog="overrides: --job.dump_folder --training.steps --training.seq_len --training.batch_size "
               "--training.gradient_accumulation_steps --optimizer.lr --lr_scheduler.warmup_steps "
               "--checkpoint.interval --checkpoint.keep_latest_k --model.<any config field> --data.files "
               "--parallelism.context_parallel_degree (under torchrun: each sequence split across that many "
               "processes) ...",
    )
    s.add_argument("--config", default=None, help="TOML file (configs/tiny_cpu.toml is an example); paths in it "
                   "are relative to it, paths on the command line to the current directory")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in job.dump_folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=run, overrides=[])
    plain = s.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = plain(args, namespace)
        # argparse leaves unknown options in order: keep the --section.key ones (and their values) as overrides
        overrides, rest, wants_value = [], [], False
        for a in extras:
            if a.startswith("--") and "." in a.split("=", 1)[0]:
                overrides.append(a)
                wants_value = "=" not in a
            elif wants_value and not a.startswith("--"):
                overrides.append(a)
                wants_value = False
            else:
                rest.append(a)
                wants_value = False
        ns.overrides = list(overrides)
        return ns, rest

    s.parse_known_args = types.MethodType(parse_known_args, s)


def run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config, parse_overrides
    from .trainer import train

    overrides = parse_overrides(args.overrides)
    if args.config is None and not any(key == "data.files" for key, _ in overrides):
        raise ConfigError("--config: no training config given; pass --config FILE.toml (the repository's "
                          "configs/tiny_cpu.toml trains a tiny model on a CPU in minutes), or name the data "
                          "with --data.files='[\"corpus.txt\"]' and keep the defaults")
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if not result.is_main:
        return 0
    val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    last = max(result.losses) if result.losses else 0
    print(f"trained to step {last}: loss {result.losses.get(last, float('nan')):.4f}{val}")
    print(f"model + tokenizer: {result.final_dir}")
    print(f"log: {result.log_path}" + (f"; loss curve: {result.plot_path}" if result.plot_path else ""))
    memory = f", peak memory {result.peak_memory_gib:.2f} GiB" if result.peak_memory_gib is not None else ""
    print(f"throughput: {result.steady_tokens_per_s:,.0f} tokens/s over {result.world_size} process(es) "
          f"(first steps left out){memory}; {result.summary_path}")
    return 0
