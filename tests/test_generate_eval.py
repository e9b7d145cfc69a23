"""Generation and lm-evaluation-harness on a tiny trained model (CPU): greedy generation equals the argmax
of full forwards; ``linattn generate`` streams; lm-eval's multiple-choice accuracy equals the accuracy
computed from the model's own log-likelihoods; every local task and a synthetic one run with a small
limit, through the Python API (``HFLM(pretrained=model, tokenizer=tok)``) and ``linattn eval``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import linattn_dsl
from linattn_dsl.eval_tasks import TASKS_DIR
from linattn_dsl.evaluate import evaluate_model
from linattn_dsl.generate import generate_text, load
from linattn_dsl.train import load_config, train

CORPUS = os.path.join(os.path.dirname(linattn_dsl.__file__), "data", "shakespeare.jsonl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer hybrid GLA (layer 1 softmax attention) on bytes, 25 steps of Hamlet: loss ~2.5."""
    base = tmp_path_factory.mktemp("gen")
    text = base / "hamlet.txt"
    text.write_text(json.loads(open(CORPUS).readline())["text"][:60_000])
    cfg = load_config(None, [
        ("job.dump_folder", str(base / "run")), ("data.files", [str(text)]), ("tokenizer.kind", "byte"),
        ("model.hidden_size", 64), ("model.num_hidden_layers", 2), ("model.num_heads", 2),
        ("model.attn", {"layers": [1], "num_heads": 2}), ("training.seq_len", 64), ("training.batch_size", 8),
        ("training.steps", 25), ("optimizer.lr", 5e-3), ("lr_scheduler.warmup_steps", 2), ("metrics.plot", False),
    ])
    return train(cfg, progress=False).final_dir


@pytest.fixture(scope="module")
def loaded(model_dir):
    torch.set_num_threads(1)
    return load(model_dir, device="cpu")


def test_greedy_generation_is_argmax_of_full_forwards(loaded):
    model, tok = loaded
    text = generate_text(model, tok, "HAMLET.\n", max_new_tokens=16, temperature=0)
    ids = tok("HAMLET.\n" + text, return_tensors="pt").input_ids
    n_prompt = len(tok("HAMLET.\n").input_ids)
    assert ids.shape[1] == n_prompt + 16  # bytes: decode/encode round-trips
    with torch.no_grad():
        logits = model(ids[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, n_prompt - 1:].argmax(-1), ids[0, n_prompt:])


def test_sampling_is_seeded_and_streams(loaded, capsys):
    model, tok = loaded
    a = generate_text(model, tok, "To be", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stream=True)
    out = capsys.readouterr().out
    assert out.startswith("To be") and a in out
    b = generate_text(model, tok, "To be", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a == b
    with pytest.raises(ValueError, match="top-p"):
        generate_text(model, tok, "x", top_p=0.0)


def test_cli_generate_streams_and_rejects_a_bad_dir(model_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "generate", str(model_dir), "--prompt", "KING.",
                          "--max-new-tokens", "10", "--temperature", "0"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    # bytes: 10 new tokens are 10 new characters (then the final newline); no library bars
    assert run.stdout.startswith("KING.") and len(run.stdout) == len("KING.") + 10 + 1
    assert "Loading weights" not in run.stderr, run.stderr
    bad = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "generate", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and "MODEL_DIR" in bad.stderr and "Traceback" not in bad.stderr


def choice_logprob(model, tok, context: str, choice: str) -> float:
    ctx, cont = tok(context).input_ids, tok(choice).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_python_api_multiple_choice_matches_own_loglikelihoods(loaded):
    """The documented path: HFLM(pretrained=model, tokenizer=tok) + simple_evaluate. lm-eval batches and
    left-pads; its accuracy must equal the one from one-at-a-time log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = loaded
    limit = 12
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    results = simple_evaluate(lm, tasks=["linattn_shakespeare_mc"], limit=limit, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    acc = results["results"]["linattn_shakespeare_mc"]["acc,none"]
    docs = [json.loads(line) for line in (TASKS_DIR / "shakespeare_mc.jsonl").read_text().splitlines()[:limit]]
    own = [max(range(4), key=lambda i: choice_logprob(model, tok, d["context"] + "\n", d["choices"][i])) == d["label"]
           for d in docs]
    assert acc == pytest.approx(sum(own) / limit, abs=1e-9)


def test_every_local_task_runs(loaded):
    model, tok = loaded
    results = evaluate_model(model, tok, ["linattn_shakespeare"], limit=3, batch_size=4)["results"]
    assert 0 <= results["linattn_shakespeare_mc"]["acc,none"] <= 1
    gen = results["linattn_shakespeare_gen"]["exact_match,first_word"]
    assert 0 <= gen <= 1
    ppl = results["linattn_shakespeare_ppl"]
    # a model at loss ~2.5 nats/byte: between 1 and 8 bits per byte, and the three metrics agree
    assert 1 < ppl["bits_per_byte,none"] < 8
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-6)
    assert ppl["word_perplexity,none"] > ppl["byte_perplexity,none"]


def test_synthetic_task_runs_offline(loaded, model_dir):
    model, tok = loaded
    results = evaluate_model(model, tok, ["niah_single_1"], limit=1, batch_size=1,
                             metadata={"max_seq_lengths": [1024], "tokenizer": str(model_dir)})["results"]
    scores = [v for k, v in results["niah_single_1"].items() if k.startswith("1024,")]
    assert scores and all(0 <= s <= 1 for s in scores)


def test_unknown_task_is_one_clear_error(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="unknown task.*linattn_nope.*linattn_shakespeare_mc"):
        evaluate_model(model, tok, ["linattn_nope"], limit=1)


def test_cli_eval_writes_results(model_dir, tmp_path):
    out = tmp_path / "results.json"
    # from a folder outside any git repository (lm-eval asks git for a commit hash there)
    run = subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "eval", str(model_dir), "--tasks",
                          "linattn_shakespeare_ppl,linattn_shakespeare_mc", "--limit", "2", "--output", str(out)],
                         capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "linattn_shakespeare_ppl" in run.stdout and "bits_per_byte" in run.stdout
    # our progress only: one bar per request type, none of lm-eval's bars, notes or git's complaint
    assert "loglikelihood:" in run.stderr and "loglikelihood (rolling):" in run.stderr
    for noise in ("Loading weights", "Running loglikelihood requests", "Tokenizing inputs", "`pretrained` model kwarg",
                  "Custom kwargs can be passed", "fatal: not a git repository"):
        assert noise not in run.stdout + run.stderr, run.stderr[-3000:]
    bpb = json.loads(out.read_text())["results"]["linattn_shakespeare_ppl"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and bpb > 0


def test_demo_trains_generates_evaluates(tmp_path, capsys):
    """`linattn demo --quick`: the loss falls, a sample and lm-eval scores are written, every artefact listed."""
    import argparse

    from linattn_dsl.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(argparse.Namespace(out=str(out), quick=True)) == 0
    printed = capsys.readouterr().out
    log = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert (out / "train" / "final" / "model.safetensors").is_file() and (out / "train" / "loss_curve.png").is_file()
    assert (out / "sample.txt").read_text().startswith("ROMEO.")
    scores = json.loads((out / "eval_results.json").read_text())
    assert set(scores) == {"linattn_shakespeare_mc", "linattn_shakespeare_ppl"}
    for path in ("train_log.jsonl", "loss_curve.png", "sample.txt", "eval_results.json", str(out / "generated")):
        assert path in printed
