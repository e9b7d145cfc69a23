"""``linattn generate MODEL_DIR --prompt TEXT``: sample from a saved model, printing tokens as they come.

``MODEL_DIR`` is a ``save_pretrained`` folder with its tokenizer (what ``linattn train`` exports).
``--temperature 0`` is greedy decoding; otherwise sampling with ``--top-p`` nucleus filtering.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("generate", help="generate text from a trained model, streaming tokens")
    s.add_argument("model_dir", help="a save_pretrained folder holding the model and its tokenizer")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64, dest="max_new_tokens")
    s.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    s.add_argument("--top-p", type=float, default=0.95, dest="top_p")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=run)


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"MODEL_DIR: {model_dir}: no config.json (expected a save_pretrained folder)")
    return path


def load(model_dir: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a ``save_pretrained`` folder; ``linattn_dsl.models`` is imported
    first so that ``model_type`` ``linattn_*`` resolves (a model from a spec registers the spec its config
    records). A file that cannot be read raises
    :class:`~linattn_dsl.train.checkpoint.CheckpointError` naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import linattn_dsl.models
    from linattn_dsl.train import checkpoint

    path = check_model_dir(model_dir)
    linattn_dsl.models.spec_model.register_saved(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # transformers does not always say which file: find it
        bad = checkpoint.first_unreadable(path)
        if bad is None:
            raise
        message = checkpoint.unreadable(bad[0], bad[1], checkpoint=False)
        last = checkpoint.latest(path.parent / "checkpoint")  # linattn train's layout: final/ beside checkpoint/
        if last is not None:
            message += (f"; the run's latest checkpoint is {last}: `linattn train --resume` with the run's config "
                        f"trains on from it and exports again")
        raise checkpoint.CheckpointError(message) from None
    return model, tokenizer


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected a positive int, got {max_new_tokens}")
    if not temperature >= 0:  # NaN too
        raise ValueError(f"--temperature: expected a number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p: expected 0 < top_p <= 1, got {top_p}")


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int = 0, stream: bool = False) -> str:
    """The continuation of ``prompt`` (new text only). ``stream``: print prompt and tokens to stdout as
    they are generated (transformers' ``TextStreamer``)."""
    import torch
    from transformers import TextStreamer

    check_sampling(max_new_tokens, temperature, top_p)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:  # an empty prompt: start from the document separator
        inputs = {"input_ids": torch.tensor([[tokenizer.eos_token_id]], device=model.device)}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)  # before the model loads
    model, tokenizer = load(args.model_dir)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                  stream=True)
    sys.stdout.flush()
    return 0
