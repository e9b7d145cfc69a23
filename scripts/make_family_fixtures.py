"""Build the fixtures of ``tests/test_family_fixtures.py``: one tiny model per shipped family (and variant), its
config, weights and fp32 logits, so that a change of how the layers are built can be shown to keep every
parameter name, shape and number.

For each case: the family's config from a few small fields, a model from a fixed seed with noise added to every
parameter (the default init's small weights and all-ones norms would hide a misplaced gate or norm), saved as

    tests/fixtures/families/<case>/config.json          the config (``to_dict()``)
    tests/fixtures/families/<case>/model.safetensors    the state dict
    tests/fixtures/families/<case>/expected.safetensors input_ids [2, 24], logits in eval mode (the
                                                        fused_recurrent ops) and in train mode (the chunk ops)
    tests/fixtures/families/defaults.json               each family's default config (``Config().to_dict()``)

The committed fixtures were written by the code from before the shipped families were built from their layer
declarations: rewriting them after a change would compare the code with itself. Run on a CPU (the ops run their
generated PyTorch chunk plan there):

    python scripts/make_family_fixtures.py [--out DIR] [CASE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 0
NOISE_STD = 0.1
BATCH, SEQ_LEN = 2, 24
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "families"

COMMON = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, intermediate_size=16, num_heads=2)
VARIANT = dict(COMMON, num_hidden_layers=1)   # the options' other values: one layer is enough (fixture size)

# case -> (family: a key of linattn_dsl.models.FAMILIES, config fields); each folder is 40-100 kB
CASES: dict[str, tuple[str, dict]] = {
    "retnet": ("retnet", dict(COMMON)),
    "retnet_no_output_gate": ("retnet", dict(VARIANT, use_output_gate=False, rope_theta=500.0)),
    "gla": ("gla", dict(COMMON)),
    "gla_short_conv": ("gla", dict(VARIANT, use_short_conv=True, conv_size=3, use_output_gate=False,
                                   gate_low_rank_dim=4, gate_logit_normalizer=8.0)),
    "delta_net": ("delta_net", dict(COMMON)),
    "delta_net_gate": ("delta_net", dict(VARIANT, use_gate=True, use_beta=False)),
    "delta_net_no_conv": ("delta_net", dict(VARIANT, use_short_conv=False, expand_v=2.0)),
    "kda": ("kda", dict(COMMON, head_dim=8, expand_v=1.5)),
    "gated_deltanet": ("gated_deltanet", dict(COMMON, num_qk_heads=1)),
}


def build(case: str):
    """The case's model (eval mode), built from the current code with the fixed seed and noise."""
    import linattn_dsl.models as M

    family, fields = CASES[case]
    config = M.FAMILIES[family][0](**fields)
    torch.manual_seed(SEED)
    model = M.FAMILIES[family][2](config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * NOISE_STD)
    return model.eval()


def input_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(SEED + 1))


def logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits in eval mode (fused_recurrent ops for 24 tokens) and in train mode (chunk ops)."""
    with torch.no_grad():
        model.eval()
        recurrent = model(ids, use_cache=False).logits
        model.train()
        chunk = model(ids, use_cache=False).logits
        model.eval()
    return recurrent, chunk


def write(case: str, out: Path) -> int:
    model = build(case)
    ids = input_ids(model.config.vocab_size)
    recurrent, chunk = logits(model, ids)
    folder = out / case
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = config_dict(model.config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    save_file({"input_ids": ids, "logits": recurrent, "logits_chunk": chunk}, folder / "expected.safetensors")
    return sum(f.stat().st_size for f in folder.iterdir())


def config_dict(config) -> dict:
    """``config.to_dict()`` without the transformers version (it changes with the install, not the code)."""
    fields = config.to_dict()
    fields.pop("transformers_version", None)
    return fields


def write_defaults(out: Path) -> int:
    import linattn_dsl.models as M

    families = sorted({family for family, _ in CASES.values()})
    defaults = {family: config_dict(M.FAMILIES[family][0]()) for family in families}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "defaults.json"
    path.write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"default: all of {list(CASES)}")
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; expected some of {list(CASES)}")
    torch.set_num_threads(1)
    total = 0
    if not args.cases or set(args.cases) == set(CASES):
        total += write_defaults(args.out)
    for case in args.cases or list(CASES):
        size = write(case, args.out)
        total += size
        print(f"{case}: {size / 1024:.0f} kB")
    print(f"total {total / 1024:.0f} kB")


if __name__ == "__main__":
    main()
