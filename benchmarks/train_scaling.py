"""Issue 8 on GPUs: the ~340M GLA through ``linattn train``'s loop, on one card and under DDP, and FLA
0.6.0's GLAForCausalLM through the very same loop (``linattn_dsl.train.trainer.train(model_factory=...)``).

    python -m benchmarks.train_scaling run --impl fla --config configs/gla_340m.toml [--section.key=value ...]
    python -m benchmarks.train_scaling warm --impl fla --config configs/gla_340m.toml   # 2 short steps
    python -m benchmarks.train_scaling summary RUN_DIR [RUN_DIR ...]

``run --impl ours`` is ``linattn train`` itself (the same function); ``--impl fla`` builds FLA's model of
the family in ``[model]`` (same field names; FLA's defaults for the rest) and trains it with the same data,
optimizer, schedule, bf16 autocast and DDP. Both leave ``train_summary.json`` (steady tokens/s over all
processes, peak CUDA memory of rank 0) in ``job.dump_folder``. ``summary`` prints one row per run folder
and the ratios: 2-process / 1-process tokens/s of the same implementation (DDP scaling), ours / FLA.
``warm`` compiles and autotunes FLA's kernels (Triton keeps them on disk) with 2 steps of batch 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def fla_factory(cfg: dict, tokenizer):
    from benchmarks.models import build_fla

    kwargs = {k: v for k, v in cfg["model"].items() if k != "family"}
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                      else tokenizer.eos_token_id)
    model, dropped = build_fla(cfg["model"]["family"], kwargs)
    if dropped:
        print(f"FLA's config has no field for: {', '.join(dropped)}", flush=True)
    return model


def run(argv: list[str], warm: bool) -> int:
    from linattn_dsl.train.cli import register
    from linattn_dsl.train.config import load_config, parse_overrides
    from linattn_dsl.train.trainer import train

    p = argparse.ArgumentParser(prog="benchmarks.train_scaling run", allow_abbrev=False)
    p.add_argument("--impl", choices=("ours", "fla"), default="ours")
    p.add_argument("--no-export", action="store_true", help="no save_pretrained at the end")
    ns, rest = p.parse_known_args(argv)
    top = argparse.ArgumentParser(prog="benchmarks.train_scaling run")
    register(top.add_subparsers(dest="cmd"))  # linattn train's parser: --config, --no-progress, --section.key=value
    targs = top.parse_args(["train", *rest])
    overrides = parse_overrides(targs.overrides)
    if warm:
        overrides += [("training.steps", 2), ("training.batch_size", 2), ("training.eval_batches", 1),
                      ("lr_scheduler.warmup_steps", 1), ("metrics.plot", False)]
    cfg = load_config(targs.config, overrides)
    result = train(cfg, resume=targs.resume, progress=not targs.no_progress,
                   model_factory=fla_factory if ns.impl == "fla" else None,
                   export_final=not (ns.no_export or warm))
    if result.is_main:
        print("RESULT " + json.dumps(dict(result.summary(), impl=ns.impl, dump=str(result.dump_folder))), flush=True)
    return 0


def summary(folders: list[str]) -> int:
    rows = []
    for f in folders:
        path = Path(f) / "train_summary.json"
        if not path.is_file():
            rows.append(dict(run=Path(f).name, error=f"no {path}"))
            continue
        rows.append(dict(json.loads(path.read_text()), run=Path(f).name))
    print(f"{'run':<16} {'procs':>5} {'params M':>8} {'tok/s':>9} {'tok/s/GPU':>9} {'peak GiB':>8} "
          f"{'first s':>7} {'steps':>5} {'loss':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:<16} ERROR {r['error']}")
            continue
        peak = f"{r['peak_memory_gib']:8.2f}" if r.get("peak_memory_gib") is not None else f"{'-':>8}"
        print(f"{r['run']:<16} {r['world_size']:>5} {r['num_params'] / 1e6:8.1f} {r['steady_tokens_per_s']:9,.0f} "
              f"{r['steady_tokens_per_s'] / r['world_size']:9,.0f} {peak} {r['first_step_s'] or 0:7.1f} "
              f"{r['steps']:>5} {r['final_loss'] or float('nan'):6.3f}")
    ok = [r for r in rows if "error" not in r]
    by = {r["run"]: r for r in ok}
    for r in ok:  # scaling: a run with more processes against the 1-process run of the same implementation
        if r["world_size"] > 1:
            stem = r["run"].split("_")[0]   # ours_2gpu, ours_2gpu_bf16reduce -> ours (ours_1gpu)
            base = next((b for b in ok if b["world_size"] == 1 and b["run"].split("_")[0] == stem), None)
            if base:
                ratio = r["steady_tokens_per_s"] / base["steady_tokens_per_s"]
                print(f"DDP scaling {r['run']} / {base['run']}: {ratio:.2f}x on {r['world_size']} processes "
                      f"({ratio / r['world_size']:.0%} efficiency)")
    if "ours_1gpu" in by and "fla_1gpu" in by:
        print(f"ours / FLA tokens/s through the same loop, one card: "
              f"{by['ours_1gpu']['steady_tokens_per_s'] / by['fla_1gpu']['steady_tokens_per_s']:.2f}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "warm", "summary"):
        print(__doc__)
        return 2
    if argv[0] == "summary":
        return summary(argv[1:])
    return run(argv[1:], warm=argv[0] == "warm")


if __name__ == "__main__":
    sys.exit(main())
