"""Issue 27's model-level GPU check: each family of the shelf at ~340M trains for 200 steps of ``linattn train``'s
loop (the settings of ``configs/gla_340m_gpu.toml``: batch 8 x 2048, bf16 autocast, AdamW, the shipped sample text)
and then generates:

    python -m benchmarks.shelf_train --out DIR [--families rwkv6,mamba] [--steps 200]

Per family, a config with that family's ``[model]`` (``SHELF``; the spec-declared families through ``model.spec``)
is written under ``DIR``, ``linattn train`` runs it, and ``linattn generate`` continues a prompt from the exported
model. Printed last: parameters, loss at the first and last logged steps, steady tokens/s, peak memory, and the
generated text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "gla_340m_gpu.toml"
SPECS = ROOT / "linattn_dsl" / "specs"
COMMON = dict(hidden_size=1024, num_hidden_layers=24, vocab_size=32000, fuse_linear_cross_entropy=True)
# ~340-400M each; head layouts as FLA's 340M configs of the family use them (Mamba: mamba-370m, 48 mixer blocks)
SHELF = {
    "rwkv6": dict(family="rwkv6", num_heads=4, expand_k=0.5, expand_v=1.0),
    "mamba": dict(family="mamba", num_hidden_layers=48, state_size=16, expand=2),
    "hgrn2": dict(spec=str(SPECS / "hgrn2.py"), num_heads=8, expand_ratio=128),
    "comba": dict(spec=str(SPECS / "comba.py"), num_heads=4, head_dim=128),
    "linear_attn": dict(spec=str(SPECS / "linear_attn.py"), num_heads=4),
    "gated_delta_product": dict(spec=str(SPECS / "gated_delta_product.py"), num_heads=4, expand_k=0.5,
                                expand_v=1.0, num_householder=2),
}


# --tiny (a check of the script on the CPU): small shapes, byte tokens, a few steps of 2 x 32 tokens
TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=512)
TINY_HEADS = {"rwkv6": dict(num_heads=2), "mamba": dict(num_hidden_layers=2, state_size=8),
              "hgrn2": dict(num_heads=2, expand_ratio=32), "comba": dict(num_heads=2, head_dim=32),
              "linear_attn": dict(num_heads=2), "gated_delta_product": dict(num_heads=2)}


def model_section(family: str, tiny: bool = False) -> dict:
    if tiny:
        return {**COMMON, **SHELF[family], **TINY, **TINY_HEADS[family]}
    return {**COMMON, **SHELF[family]}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def write_config(family: str, out: Path, steps: int, tiny: bool = False) -> Path:
    """``configs/gla_340m_gpu.toml`` with this family's ``[model]``, ``steps`` steps, paths made absolute and the
    run folder under ``out``."""
    cfg = tomllib.loads(BASE_CONFIG.read_text())
    cfg["model"] = model_section(family, tiny)
    if tiny:
        cfg["tokenizer"] = dict(kind="byte")
        cfg["training"].update(seq_len=32, batch_size=2, eval_batches=1)
        cfg["metrics"]["log_freq"] = 1
    cfg["job"]["dump_folder"] = str(out / family)
    cfg["data"]["files"] = [str((BASE_CONFIG.parent / f).resolve()) for f in cfg["data"]["files"]]
    cfg["training"].update(steps=steps, eval_interval=steps)
    cfg["lr_scheduler"]["warmup_steps"] = min(cfg["lr_scheduler"]["warmup_steps"], steps // 10)
    cfg["checkpoint"]["interval"] = steps
    text = "".join(f"[{section}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items()) + "\n"
                   for section, body in cfg.items())
    path = out / f"{family}.toml"
    path.write_text(text)
    return path


def summarize(family: str, run: Path) -> dict:
    row = dict(family=family)
    log = run / "train_log.jsonl"
    losses = []
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                losses.append((rec.get("step"), rec["loss"]))
    if losses:
        row.update(first_step=losses[0][0], first_loss=losses[0][1], last_step=losses[-1][0], last_loss=losses[-1][1])
    summary = run / "train_summary.json"
    if summary.exists():
        row.update({k: v for k, v in json.loads(summary.read_text()).items()
                    if k in ("num_params", "steady_tokens_per_s", "peak_memory_gib")})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(SHELF), type=lambda s: s.split(","))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--out", type=Path, default=Path("out/shelf_train"))
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a check of the script")
    a = p.parse_args(argv)
    unknown = [f for f in a.families if f not in SHELF]
    if unknown:
        p.error(f"--families: unknown {unknown}; expected some of {sorted(SHELF)}")
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in a.families:
        config = write_config(family, a.out, a.steps, a.tiny)
        run = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "train", "--config", str(config)],
                             capture_output=True, text=True, cwd=ROOT)
        (a.out / f"{family}.train.log").write_text(run.stdout + run.stderr)
        row = summarize(family, a.out / family)
        row["train_rc"] = run.returncode
        if run.returncode == 0:
            gen = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "generate", str(a.out / family / "final"),
                                  "--prompt", a.prompt, "--max-new-tokens", "32"], capture_output=True, text=True,
                                 cwd=ROOT)
            row["generate_rc"] = gen.returncode
            row["generated"] = (gen.stdout.strip() or gen.stderr.strip()[-300:])[-300:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        (a.out / "shelf_train.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{r['family']:>20} | params {r.get('num_params', '-')} | loss {r.get('first_loss', '-')} (step "
              f"{r.get('first_step', '-')}) -> {r.get('last_loss', '-')} (step {r.get('last_step', '-')}) | "
              f"tok/s {r.get('steady_tokens_per_s', '-')} | peak {r.get('peak_memory_gib', '-')} GiB | "
              f"{r.get('generated', '')[:80]!r}")
    return 0 if all(r["train_rc"] == 0 and r.get("generate_rc") == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
