"""Decoding latency at batch 1 (and the bare step at batch 64): our models through ``generate`` with and without
the CUDA-graphed step, a Llama of the same size through ``generate``, FLA's model through a greedy loop:

    python -m benchmarks.decode --families gla,gated_deltanet --prompts 128,1024,8192 --new-tokens 128 --out DIR

~340M (hidden 1024, 24 layers, vocab 32000), bf16 weights, random prompts, greedy. Per row: ms per new token
(``(t(n) - t(n / 2)) / (n / 2)``: the prefill and the step's capture left out), and whether the tokens equal the
reference path's (ours: graphed against eager; FLA's loop and Llama are not compared). ``step`` rows time the
graphed step alone (one replay plus its input copies) at batch 1 and 64. FLA's ``generate`` gives wrong tokens
under transformers 5.24 (BENCHMARKS.md), so FLA runs the loop of ``benchmarks.models.greedy_loop``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks import models as bm

BASE = dict(hidden_size=1024, num_hidden_layers=24, vocab_size=32000)
OURS = {"gla": dict(num_heads=4, expand_k=0.5, expand_v=1.0),
        "gated_deltanet": dict(num_heads=4, expand_k=0.5, expand_v=1.0)}
# FLA's configs of the same shapes: GLA's fields are ours; Gated DeltaNet: 4 heads of key width 128, value 256
FLA = {"gla": ("GLAConfig", "GLAForCausalLM", dict(num_heads=4, expand_k=0.5, expand_v=1.0)),
       "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM",
                          dict(num_heads=4, head_dim=128, expand_v=2.0))}
# Llama of about the same size: 16 heads of 64, SwiGLU 2816
LLAMA = dict(num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816, max_position_embeddings=16384)


def sync():
    torch.cuda.synchronize()


def per_token(run, n: int, reps: int = 2) -> tuple[float, object]:
    """ms per new token: the best of ``reps`` runs of n tokens minus the best of n / 2 tokens, over n - n / 2. Both
    runs pay the prefill and, graphed, the step's capture at the first new token: the difference is steps only."""
    def best(k):
        times, out = [], None
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            out = run(k)
            sync()
            times.append(time.perf_counter() - t)
        return min(times), out
    half = n // 2
    t1, _ = best(half)
    tn, out = best(n)
    return (tn - t1) / (n - half) * 1e3, out


def generate(model, prompt, n):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]


def build_ours(family, graphs: bool):
    from linattn_dsl.models import FAMILIES

    config_class, _, lm_class = FAMILIES[family]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = lm_class(config_class(**BASE, **OURS[family], decode_cuda_graph=graphs))
    return model.to(torch.bfloat16).eval()


def build_fla(family):
    import fla.models as fm

    cfg, cls, kw = FLA[family]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(fm, cls)(getattr(fm, cfg)(**BASE, **kw))
    return model.to(torch.bfloat16).eval()


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**BASE, **LLAMA))
    return model.to(torch.bfloat16).eval()


def params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def step_rows(model, family: str, batch: int, reps: int = 50) -> dict:
    """The graphed step alone after a 128-token prompt: ms per step and tokens/s at ``batch`` rows."""
    prompt = torch.randint(1, 32000, (batch, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(3):   # build + capture, then warm
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
    assert cache.step is not None and cache.step.graph is not None, "the step was not captured"
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
    sync()
    ms = (time.perf_counter() - t) / reps * 1e3
    del logits
    return dict(kind="step", family=family, batch=batch, ms_per_step=ms, tokens_per_s=batch / ms * 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default="gla,gated_deltanet", type=lambda s: s.split(","))
    p.add_argument("--prompts", default="128,1024,8192", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--new-tokens", type=int, default=128, dest="new_tokens")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "decode.json").write_text(json.dumps(rows, indent=1))

    n = args.new_tokens
    prompts = {T: torch.randint(1, 32000, (1, T), device="cuda", generator=torch.Generator("cuda").manual_seed(T))
               for T in args.prompts}
    emit(dict(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__,
              triton=__import__("triton").__version__, transformers=__import__("transformers").__version__))
    with torch.no_grad():
        if not args.no_llama:
            model = build_llama()
            for T, prompt in prompts.items():
                generate(model, prompt, 4)
                ms, _ = per_token(lambda k: generate(model, prompt, k), n)
                emit(dict(kind="generate", impl="llama", prompt=T, ms_per_token=ms, params_m=params(model)))
            model = None
        for family in args.families:
            eager, graphed = build_ours(family, False), build_ours(family, True)
            for T, prompt in prompts.items():
                generate(eager, prompt, 4)
                generate(graphed, prompt, 4)
                ms_e, tok_e = per_token(lambda k: generate(eager, prompt, k), n)
                ms_g, tok_g = per_token(lambda k: generate(graphed, prompt, k), n)
                emit(dict(kind="generate", impl="ours", family=family, prompt=T, ms_per_token=ms_g,
                          eager_ms_per_token=ms_e, same_tokens=bool(torch.equal(tok_e, tok_g)),
                          params_m=params(graphed)))
            eager = None
            for batch in (1, 64):
                emit(step_rows(graphed, family, batch))
            graphed = None
            if not args.no_fla:
                try:
                    model = build_fla(family)
                    for T, prompt in prompts.items():
                        bm.greedy_loop(model, "fla", prompt, 4)
                        ms, _ = per_token(lambda k: bm.greedy_loop(model, "fla", prompt, k), n)
                        emit(dict(kind="loop", impl="fla", family=family, prompt=T, ms_per_token=ms,
                                  params_m=params(model)))
                    model = None
                except Exception as e:   # FLA refusing a shape or the card: say so, keep the other rows
                    emit(dict(kind="error", impl="fla", family=family, error=f"{type(e).__name__}: {str(e)[:300]}"))
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
