"""Build the FLA checkpoint fixtures of ``tests/test_convert_fla.py``: one tiny model per FLA family.

For each family: an FLA 0.6.0 model (``fla.models``) from a small config and a fixed seed, its weights perturbed
(so that a wrong mapping changes the logits by far more than the tolerance), saved with FLA's own
``save_pretrained`` (``config.json`` + ``model.safetensors``: exactly what ``linattn convert --from-fla`` reads),
plus ``expected.safetensors`` holding ``input_ids [2, 16]`` and FLA's fp32 ``logits [2, 16, vocab]``.

FLA is not a dependency of linattn_dsl. Install it into a separate folder and run:

    pip install --no-deps --target /tmp/fla_site .wheels/whl/{flash_linear_attention,fla_core,einops}*.whl
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/fla_site python scripts/make_fla_fixtures.py [--out DIR] [FAMILY ...]

The models run on the CPU, FLA's Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, required). Two
things are patched so that they can: Triton's autotuner keeps the first config of each kernel (benchmarking needs
a GPU driver), and FLA's softmax attention (hybrid layers) gets a plain PyTorch ``flash_attn_func`` (flash-attn
needs CUDA). Mamba2 runs FLA's own PyTorch fallback (no Triton kernel on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

SEED = 0
SEQ_LEN = 16
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fla"
NOISE_STD = 0.1  # added to every parameter: FLA's own init (std 0.02, zero output projections) hides mistakes

COMMON = dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, intermediate_size=48)

# fixture name -> (FLA config class name, config fields); each folder is 85-135 kB (fp32)
FAMILIES: dict[str, tuple[str, dict]] = {
    "gla": ("GLAConfig", dict(COMMON, num_heads=2, expand_k=0.5, expand_v=1.0)),
    # short convs, a sliding-window GQA attention layer and tied embeddings: the hybrid / tying paths
    "gla_hybrid": ("GLAConfig", dict(COMMON, num_heads=2, use_short_conv=True, tie_word_embeddings=True,
                                     attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 8,
                                           "rope_theta": 500.0})),
    "retnet": ("RetNetConfig", dict(COMMON, num_heads=2, expand_k=1.0, expand_v=2.0)),
    # n_groups=1: on a CPU FLA 0.6.0 runs Mamba2's prefill in its PyTorch fallback (torch_forward), which tiles
    # the B / C groups over the heads (head h reads group h % n_groups) while its CUDA kernel and its own decoding
    # step give head h group h // (num_heads / n_groups), as ours does; one group is the same under both
    "mamba2": ("Mamba2Config", dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, num_heads=4, head_dim=16,
                                    state_size=8, n_groups=1, expand=2, chunk_size=16)),
    "rwkv7": ("RWKV7Config", dict(COMMON, head_dim=16, decay_low_rank_dim=8, gate_low_rank_dim=8,
                                  a_low_rank_dim=8, v_low_rank_dim=8)),
    "rwkv6": ("RWKV6Config", dict(COMMON, num_heads=2, expand_k=0.5, expand_v=1.0, proj_low_rank_dim=8,
                                  gate_low_rank_dim=8)),
    "kda": ("KDAConfig", dict(COMMON, num_heads=2, head_dim=16, expand_v=1.0)),
    "delta_net": ("DeltaNetConfig", dict(COMMON, num_heads=2)),
    "gated_deltanet": ("GatedDeltaNetConfig", dict(COMMON, num_heads=2, head_dim=16, expand_v=2.0)),
    # grouped value heads: 2 value heads share 1 q/k head
    "gated_deltanet_gva": ("GatedDeltaNetConfig", dict(COMMON, num_heads=1, num_v_heads=2, head_dim=16,
                                                      expand_v=1.0)),
    # FLA's Comba block leaves use_inner_decay, use_output_correction and correction_factor at the layer's
    # defaults (on, on, 1.0); T=16 runs its fused_recurrent kernel, whose correction reads the undecayed state
    "comba": ("CombaConfig", dict(COMMON, num_heads=2, head_dim=8, expand_v=2.0)),
    # 3 layers: the lower bounds' cumulative softmax lifts the forget gates of layers 1 and 2 (32 / 8 = 4 heads)
    "hgrn2": ("HGRN2Config", dict(COMMON, num_hidden_layers=3, expand_ratio=8)),
}


def patch_for_cpu() -> None:
    """Let FLA's Triton kernels and attention layers run on a CPU (see the module docstring)."""
    import triton.runtime.autotuner as autotuner

    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]

    import fla.layers.attn as fla_attn

    fla_attn.flash_attn_func = flash_attn_reference


def flash_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                         window_size: tuple[int, int] = (-1, -1), **_) -> torch.Tensor:
    """flash-attn's ``flash_attn_func`` on ``q [B, T, H, D]``, ``k, v [B, T, H_kv, D]`` in plain PyTorch: query
    head ``h`` reads kv head ``h // (H / H_kv)``; query ``i`` sees keys ``j <= i`` with ``i - j <= window_size[0]``
    (``-1``: no limit)."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[1])[:, None]
    j = torch.arange(k.shape[1])[None, :]
    allowed = j <= i if causal else torch.ones_like(i - j, dtype=torch.bool)
    if window_size[0] >= 0:
        allowed = allowed & (i - j <= window_size[0])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.float()).to(q.dtype)


def build(name: str):
    """The FLA model of fixture ``name``, its weights perturbed, in eval mode (fp32)."""
    import fla.models
    from transformers import AutoModelForCausalLM

    config_name, fields = FAMILIES[name]
    config = getattr(fla.models, config_name)(**fields)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * NOISE_STD)
    return model


def input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed ``[2, SEQ_LEN]`` input of every fixture."""
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(SEED + 2))


def make(name: str, out: Path) -> Path:
    """Write fixture ``name`` into ``out / name``; returns that folder."""
    from safetensors.torch import save_file

    import fla

    model = build(name)
    folder = out / name
    model.save_pretrained(folder)
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{name}: FLA gave non-finite logits")
    save_file({"input_ids": ids, "logits": logits.contiguous()}, folder / "expected.safetensors",
              # one key: safetensors orders several at random, and the file would change on every run
              metadata={"made_by": f"scripts/make_fla_fixtures.py, FLA {getattr(fla, '__version__', '?')}, "
                                   f"seed {SEED}, noise std {NOISE_STD}"})
    (folder / "generation_config.json").unlink(missing_ok=True)   # not needed by the converter
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", metavar="FAMILY",
                        help=f"fixtures to build (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--out", type=Path, default=FIXTURES, help=f"output folder (default: {FIXTURES})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.families if name not in FAMILIES]
    if unknown:
        parser.error(f"unknown FAMILY {unknown}; expected some of {', '.join(FAMILIES)}")
    if os.environ.get("TRITON_INTERPRET") != "1":   # the models are built and run on the CPU, GPU or not
        print("make_fla_fixtures: set TRITON_INTERPRET=1 (FLA's kernels in Triton's interpreter, on CPU tensors)",
              file=sys.stderr)
        return 2
    patch_for_cpu()
    for name in args.families or FAMILIES:
        folder = make(name, args.out)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{name}: {folder} ({size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
