"""Training (``linattn_dsl.train``) on CPU with tiny models: the loss falls; a killed run resumed from its
checkpoint reproduces the losses of an uninterrupted run (to 1e-6; on one CPU thread they are in fact
bit-identical); a crash while writing a checkpoint leaves the previous one loadable; bad configs fail
with one error naming the key or path before any work; the export loads with AutoModelForCausalLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linattn_dsl.models  # noqa: F401
from linattn_dsl.train import checkpoint, config, data, report, trainer
from linattn_dsl.train.config import ConfigError, load_config, parse_overrides
from linattn_dsl.train.tokenizer import byte_tokenizer, train_bpe

CORPUS = Path(linattn_dsl.__file__).parent / "data" / "shakespeare.jsonl"
RESUME_ATOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # one thread also keeps the runs bit-identical


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 60 kB of Hamlet as a plain text file."""
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    hamlet = json.loads(CORPUS.read_text().splitlines()[0])["text"]
    path.write_text(hamlet[:60_000])
    return path


def tiny(text_file: Path, dump: Path, **overrides) -> dict:
    """A 2-layer GLA (hidden 64) on bytes, seq_len 64."""
    base = {
        "job.dump_folder": str(dump), "data.files": [str(text_file)], "tokenizer.kind": "byte",
        "model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_heads": 2,
        "training.seq_len": 64, "training.batch_size": 4, "training.steps": 12, "optimizer.lr": 3e-3,
        "lr_scheduler.warmup_steps": 2, "metrics.plot": False, "training.eval_batches": 2,
    }
    base.update(overrides)
    return load_config(None, list(base.items()))


class Interrupt(Exception):
    pass


def interrupt_at(stop: int):
    def on_step(step: int, record: dict) -> None:
        if step == stop:
            raise Interrupt(f"simulated kill after step {stop}")
    return on_step


@pytest.fixture(scope="module")
def uninterrupted(text_file, tmp_path_factory):
    """12 steps, 2 micro-batches each, a checkpoint every 4 steps: the reference run."""
    cfg = tiny(text_file, tmp_path_factory.mktemp("ref") / "run", **{
        "training.gradient_accumulation_steps": 2, "checkpoint.interval": 4, "checkpoint.keep_latest_k": 2,
        "training.eval_interval": 6, "metrics.plot": True})
    return trainer.train(cfg, progress=False)


def test_loss_decreases_and_artefacts(uninterrupted):
    losses = [uninterrupted.losses[s] for s in sorted(uninterrupted.losses)]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.0  # ~ln(257) at init
    assert last < first - 1.0, losses
    log = report.read_log(uninterrupted.log_path)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert [r["step"] for r in log if "val_loss" in r] == [6, 12]
    assert log[-1]["val_loss"] < log[5]["val_loss"] + 0.5
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in log)
    assert uninterrupted.plot_path is not None and uninterrupted.plot_path.stat().st_size > 1000
    # keep_latest_k=2 of the checkpoints at steps 4 and 8 (none at the last step: the export is final)
    assert [p.name for p in checkpoint.checkpoints(uninterrupted.checkpoint_dir)] == ["step-4", "step-8"]


def test_resume_reproduces_uninterrupted_losses(uninterrupted, text_file, tmp_path):
    overrides = {"training.gradient_accumulation_steps": 2, "checkpoint.interval": 4, "checkpoint.keep_latest_k": 2,
                 "training.eval_interval": 6, "metrics.plot": True}
    cfg = tiny(text_file, tmp_path / "run", **overrides)
    with pytest.raises(Interrupt):
        trainer.train(cfg, on_step=interrupt_at(10), progress=False)  # killed after step 10: last checkpoint is 8
    assert checkpoint.latest(tmp_path / "run" / "checkpoint").name == "step-8"
    resumed = trainer.train(tiny(text_file, tmp_path / "run", **overrides), resume=True, progress=False)
    assert sorted(resumed.losses) == [9, 10, 11, 12]
    for step, loss in resumed.losses.items():
        assert abs(loss - uninterrupted.losses[step]) <= RESUME_ATOL, (step, loss, uninterrupted.losses[step])
    # the log of the resumed run reads like the uninterrupted one (steps 9, 10 of the killed run dropped)
    log, ref = report.read_log(resumed.log_path), report.read_log(uninterrupted.log_path)
    assert [r["step"] for r in log] == list(range(1, 13))
    for a, b in zip(log, ref):
        assert abs(a["loss"] - b["loss"]) <= RESUME_ATOL and a["lr"] == b["lr"]
    assert abs(resumed.val_loss - uninterrupted.val_loss) <= RESUME_ATOL
    # and the exported weights are the same
    a = AutoModelForCausalLM.from_pretrained(resumed.final_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(uninterrupted.final_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in b)


def test_fresh_run_refuses_a_folder_with_checkpoints(uninterrupted, text_file):
    with pytest.raises(ConfigError, match="job.dump_folder"):
        trainer.train(tiny(text_file, uninterrupted.dump_folder), progress=False)


def test_crash_during_checkpoint_keeps_previous(uninterrupted, text_file, tmp_path, monkeypatch):
    cfg = tiny(text_file, tmp_path / "run", **{"training.gradient_accumulation_steps": 2,
                                              "checkpoint.interval": 4, "training.eval_interval": 6})
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(str(f))
        if "step-8" in str(f):
            raise KeyboardInterrupt("simulated kill while writing checkpoint 8")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "run" / "checkpoint"
    assert any(".tmp-step-8" in c for c in calls)
    assert (ckpt_dir / ".tmp-step-8").is_dir()  # the half-written one
    assert checkpoint.latest(ckpt_dir).name == "step-4"  # ... is not taken for a checkpoint
    # step-4 is complete and loads
    state = json.loads((ckpt_dir / "step-4" / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 4 and state["data"] == {"epoch": 0, "index": 8}
    resumed = trainer.train(tiny(text_file, tmp_path / "run", **{"training.gradient_accumulation_steps": 2,
                                                                "checkpoint.interval": 4,
                                                                "training.eval_interval": 6}),
                            resume=True, progress=False)
    assert not (ckpt_dir / ".tmp-step-8").exists()
    assert sorted(resumed.losses) == list(range(5, 13))
    for step, loss in resumed.losses.items():
        assert abs(loss - uninterrupted.losses[step]) <= RESUME_ATOL


def test_export_loads_with_automodel_and_generates(uninterrupted):
    model = AutoModelForCausalLM.from_pretrained(uninterrupted.final_dir).eval()
    tok = AutoTokenizer.from_pretrained(uninterrupted.final_dir)
    assert type(model).__name__ == "GLAForCausalLM" and model.config.vocab_size == len(tok) == 257
    assert model.config.eos_token_id == tok.eos_token_id == 256
    ids = tok("HAMLET.\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 12)
    # greedy generation with the cache == argmax of full forwards
    with torch.no_grad():
        logits = model(out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:].argmax(-1), out[0, ids.shape[1]:])


def test_skip_nonfinite_step(text_file, tmp_path, monkeypatch):
    build = trainer.build_model

    def build_poisoned(cfg, tok):
        model = build(cfg, tok)
        calls = {"n": 0}

        def hook(module, args, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] == 3 else output  # the 3rd forward: step 3
        model.model.embeddings.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_poisoned)
    result = trainer.train(tiny(text_file, tmp_path / "run", **{"training.steps": 5, "data.val_fraction": 0.0}),
                           progress=False)
    log = report.read_log(result.log_path)
    assert [r.get("skipped", False) for r in log] == [False, False, True, False, False]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if not r.get("skipped"))
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_losses(text_file, tmp_path):
    runs = [trainer.train(tiny(text_file, tmp_path / f"run{ac}", **{"training.steps": 3,
                                                                    "training.activation_checkpointing": ac}),
                          progress=False) for ac in (False, True)]
    for s in (1, 2, 3):
        assert abs(runs[0].losses[s] - runs[1].losses[s]) <= 1e-5


@pytest.mark.parametrize("model", [
    {"model.family": "delta_net", "model.num_heads": 2},
    {"model.family": "mamba2", "model.num_heads": None, "model.head_dim": 16, "model.state_size": 16,
     "model.attn": {"layers": [1], "num_heads": 2}},
])
def test_other_families_and_hybrids_train(text_file, tmp_path, model):
    result = trainer.train(tiny(text_file, tmp_path / "run", **{"training.steps": 2, **model}), progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert loaded.config.model_type == f"linattn_{model['model.family']}"


# ---- data and tokenizers ----

def test_pack_split_and_resumable_order(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc", "de", "fghij"]) + "\n")
    tok = byte_tokenizer()
    blocks = data.pack([str(docs)], tok, seq_len=4)
    flat = blocks.flatten().tolist()
    eos = tok.eos_token_id
    assert flat == [97, 98, 99, eos, 100, 101, eos, 102, 103, 104, 105, 106][: len(flat)] and blocks.shape == (3, 4)
    train_blocks, val_blocks = data.split(blocks, 0.3, seed=0)
    assert len(train_blocks) == 2 and len(val_blocks) == 1
    again = data.split(blocks, 0.3, seed=0)
    assert torch.equal(again[0], train_blocks)
    big = torch.arange(40).view(20, 2)
    a = data.BlockSampler(big, batch_size=3, seed=1)
    seen = [a.next_batch() for _ in range(9)]  # 6 batches per epoch: crosses into epoch 1
    b = data.BlockSampler(big, batch_size=3, seed=1)
    for _ in range(4):
        b.next_batch()
    c = data.BlockSampler(big, batch_size=3, seed=1)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c.next_batch(), s) for s in seen[4:])
    # two processes take disjoint halves of each global batch
    r0, r1 = data.BlockSampler(big, 3, 1, rank=0, num_processes=2), data.BlockSampler(big, 3, 1, 1, 2)
    x, y = r0.next_batch(), r1.next_batch()
    assert not set(x[:, 0].tolist()) & set(y[:, 0].tolist())


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'text'"):
        data.pack([str(bad)], byte_tokenizer(), seq_len=2)


def test_byte_and_bpe_tokenizers_round_trip(tmp_path):
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler — in the mind"
    byte = byte_tokenizer()
    assert byte(text[:5])["input_ids"] == list(text[:5].encode())
    bpe = train_bpe([CORPUS.read_text()[:200_000]], vocab_size=400)
    assert len(bpe) == 400 and bpe.eos_token_id == 0
    for tok, name in ((byte, "byte"), (bpe, "bpe")):
        tok.save_pretrained(tmp_path / name)
        again = AutoTokenizer.from_pretrained(tmp_path / name)
        ids = again(text)["input_ids"]
        assert ids == tok(text)["input_ids"] and again.decode(ids) == text
    assert len(bpe(text)["input_ids"]) < len(text.encode()) * 0.7


# ---- config ----

def test_overrides_parse_flame_style():
    got = parse_overrides(["--training.steps=10", "--optimizer.lr", "1e-3", "--model.attn={layers=[1], num_heads=2}",
                           "--data.files=[\"a.txt\"]", "--job.dump_folder", "out/x", "--training.compile=true"])
    assert got == [("training.steps", 10), ("optimizer.lr", 1e-3), ("model.attn", {"layers": [1], "num_heads": 2}),
                   ("data.files", ["a.txt"]), ("job.dump_folder", "out/x"), ("training.compile", True)]
    with pytest.raises(ConfigError, match="steps"):
        parse_overrides(["steps=3"])


def test_toml_file_and_overrides(tmp_path, text_file, monkeypatch):
    (tmp_path / "configs").mkdir()
    toml = tmp_path / "configs" / "c.toml"
    toml.write_text(f'[job]\ndump_folder = "../runs/c"\n[model]\nfamily = "retnet"\nhidden_size = 32\n'
                    f'[data]\nfiles = ["{text_file.name}"]\n[training]\nsteps = 7\n')
    (tmp_path / "configs" / text_file.name).write_text("x" * 100)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the file's paths do not depend on where the command runs
    cfg = load_config(toml, [("training.steps", 9), ("model.num_heads", 2)])
    assert cfg["training"]["steps"] == 9 and cfg["model"] == {"family": "retnet", "hidden_size": 32, "num_heads": 2}
    # every path in the file is relative to the file
    assert cfg["data"]["files"] == [str(tmp_path / "configs" / text_file.name)]
    assert cfg["job"]["dump_folder"] == str(tmp_path / "runs" / "c")
    assert cfg["optimizer"]["lr"] == config.SCHEMA["optimizer"]["lr"][1]
    # a path on the command line is relative to the current directory
    (tmp_path / "elsewhere" / "local.txt").write_text("y" * 100)
    cfg = load_config(toml, [("job.dump_folder", "out"), ("data.files", ["local.txt"])])
    assert cfg["job"]["dump_folder"] == "out" and cfg["data"]["files"] == ["local.txt"]
    with pytest.raises(ConfigError, match="data.files: c.toml: no such file"):
        load_config(toml, [("data.files", ["c.toml"])])  # beside the config file, but not here


@pytest.mark.parametrize("key, value, message", [
    ("training.stepz", 3, "training.stepz: unknown key"),
    ("training.steps", "ten", r"training.steps: expected int, got 'ten'"),
    ("training.steps", 0, "training.steps: expected a positive"),
    ("optimizer.lr", "fast", "optimizer.lr: expected float"),
    ("trainer.steps", 3, "trainer.steps: unknown section"),
    ("model.hidden_sise", 64, "model.hidden_sise: unknown key for family 'gla'"),
    ("model.hidden_size", 6.5, "model.hidden_size: expected int"),
    ("model.family", "transformer", "model.family: expected one of"),
    ("model.attn", {"layers": [7]}, "attn.layers: indices \\[7\\] out of range"),
    ("data.files", ["/nonexistent/corpus.txt"], "data.files: /nonexistent/corpus.txt: no such file"),
    ("tokenizer.kind", "pretrained", "tokenizer.path: required"),
    ("lr_scheduler.decay_type", "step", "lr_scheduler.decay_type: expected one of"),
    ("training.mixed_precision_reduce", "fp8", "training.mixed_precision_reduce: expected one of"),
    ("optimizer.implementation", "apex", "optimizer.implementation: expected one of"),
])
def test_bad_config_names_the_key(text_file, tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny(text_file, tmp_path / "run", **{key: value})
    assert not (tmp_path / "run").exists()  # nothing was started

@pytest.mark.parametrize("implementation, flags", [("fused", {"fused": True}), ("foreach", {"foreach": True}),
                                                    ("for-loop", {"foreach": False})])
def test_optimizer_implementation(implementation, flags):
    cfg = config.defaults()
    cfg["optimizer"]["implementation"] = implementation
    opt = trainer.build_optimizer(cfg, torch.nn.Linear(4, 3))
    assert all(opt.defaults[k] == v for k, v in flags.items())
    assert cfg["optimizer"] == {**config.defaults()["optimizer"], "implementation": implementation}


def test_bf16_reduce_without_cuda_is_a_clear_error(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a GPU machine
    with pytest.raises(ConfigError, match="training.mixed_precision_reduce: 'bfloat16' needs CUDA"):
        trainer.train(tiny(text_file, tmp_path / "run", **{"training.mixed_precision_reduce": "bfloat16"}),
                      progress=False)


def test_cli_train_and_bad_config_errors(text_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--tokenizer.kind=byte", f"--data.files=[\"{text_file}\"]", "--model.hidden_size", "32",
              "--model.num_hidden_layers=1", "--training.seq_len=32", "--training.batch_size=2",
              "--lr_scheduler.warmup_steps=1", "--metrics.plot=false"]

    def train(*args):
        return subprocess.run([sys.executable, "-m", "linattn_dsl.cli", "train", *common, *args],
                              capture_output=True, text=True, env=env, timeout=300)

    dump = tmp_path / "cli"
    ok = train(f"--job.dump_folder={dump}", "--training.steps=3", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "trained to step 3" in ok.stdout and (dump / "final" / "config.json").is_file()
    assert "Writing model shards" not in ok.stderr, ok.stderr  # transformers' bar: off inside the command
    # (every kind of bad value is checked in-process above; two through the CLI for the exit code and message)
    for args, message in [(["--training.stepz=3"], "training.stepz: unknown key"),
                          (["--data.files=[\"missing.txt\"]"], "data.files: missing.txt: no such file")]:
        bad = train(f"--job.dump_folder={tmp_path / 'bad'}", *args)
        assert bad.returncode == 2, bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr
        assert not (tmp_path / "bad").exists()


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1] / "configs"
    tiny_cpu = load_config(root / "tiny_cpu.toml")
    assert tiny_cpu["model"]["attn"]["layers"] == [2]  # a hybrid
    # relative to the file, as its comment says: runs/ at the top of the repository, from any directory
    assert Path(tiny_cpu["job"]["dump_folder"]).resolve() == root.parent / "runs" / "tiny_cpu"
    assert Path(tiny_cpu["data"]["files"][0]).resolve() == root.parent / "linattn_dsl" / "data" / "shakespeare.jsonl"
    samba = load_config(root / "samba_cpu.toml")   # Mamba2 blocks with sliding-window attention between them
    assert samba["model"]["family"] == "mamba2" and samba["model"]["attn"]["window_size"] == 64
    gpu = load_config(root / "gla_340m_gpu.toml")
    model, training = gpu["model"], gpu["training"]
    assert (model["hidden_size"], model["num_hidden_layers"], training["seq_len"]) == (1024, 24, 2048)
