"""Training speed of a model made from a spec file alone (the default layer derivation) beside the hand-declared
family closest to it, same shapes, same process, interleaved rounds:

    python -m benchmarks.spec_model_speed --spec benchmarks/specs/gla_default.py --family gla --rounds 3

~340M (hidden 1024, 24 layers, vocab 32000, 4 heads, key width 0.5, value width 1.0, MLP ratio 4), bf16
parameters, batch 8 x 2048, forward + backward of the fused causal-LM loss (``benchmarks.models.train_bench``).
Prints each model's parameter count, median tokens/s over the rounds and peak memory, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks import models as bm


def build(kind: str, target: str, kwargs: dict, device: str):
    """``kind`` "family": a shipped family by name; "spec": a spec file, registered and built by its model type."""
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "family":
            model = bm.build_ours(target, kwargs)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            from linattn_dsl.models import register_spec

            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(register_spec(target), **kwargs))
    return model.to(torch.bfloat16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--family", default="gla")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a check of the script on CPU)")
    a = p.parse_args(argv)
    a.optimizer = "none"
    size = "tiny" if a.tiny else "340m"
    fam = bm.model_kwargs(a.family, size, "fused", a.layers)
    shared = {k: fam[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "expand_k",
                                  "expand_v", "hidden_ratio", "fuse_linear_cross_entropy") if k in fam}
    sides = {a.family: ("family", a.family, fam), f"spec {a.spec}": ("spec", a.spec, shared)}
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    params = {}
    for r in range(a.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            model = build(*sides[name], a.device)
            params[name] = sum(t.numel() for t in model.parameters())
            rows[name].append(bm.train_bench(model, a))
            del model
            if a.device == "cuda":
                torch.cuda.empty_cache()
            print(f"round {r + 1} {name}: {rows[name][-1]['train_tokens_per_s']:.0f} tokens/s", file=sys.stderr,
                  flush=True)
    print(f"{'model':>40} | params M | tokens/s (median of rounds) | peak GiB | first step s")
    tps = {}
    for name, rs in rows.items():
        tps[name] = statistics.median(x["train_tokens_per_s"] for x in rs)
        peak = rs[-1]["train_peak_gib"]
        print(f"{name:>40} | {params[name] / 1e6:8.1f} | {tps[name]:27.0f} | {peak or 0:8.2f} | "
              f"{rs[0]['train_first_step_s']:.1f}")
    fam_name, spec_name = list(sides)
    print(f"spec / family tokens/s: {tps[spec_name] / tps[fam_name]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
