"""Context parallelism through layers, models and training, on CPU processes (gloo).

* ``tests/distributed/cp_cpu.py`` under torchrun (2 processes): one training step of tiny models (short convs,
  token shifts, RoPE, hybrids with full and sliding-window attention) on packed documents and on plain rows, split
  over the processes, equals the unsplit step: loss, every gradient and every parameter after AdamW (1e-5).
* ``linattn train --parallelism.context_parallel_degree 2`` under torchrun (2 processes, packed documents, a hybrid
  with short convs) logs the losses and held-out loss of the same run on one process.
* Bad input: a degree that does not divide ``training.seq_len`` or the world size, a model from ``model_factory``
  without ``cp_context``, and a context that does not fit the model's inputs (each a ValueError naming it, found
  before any communication: no process group exists in these tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linattn_dsl
from linattn_dsl.models import FAMILIES
from linattn_dsl.runtime.cp import CPContext
from linattn_dsl.train import trainer
from linattn_dsl.train.config import ConfigError, load_config

CORPUS = Path(linattn_dsl.__file__).parent / "data" / "shakespeare.jsonl"
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_training_step_split_equals_unsplit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "distributed" / "cp_cpu.py")], capture_output=True, text=True,
                          env=env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world"] == 2 and len(result["cases"]) == 6 * 4
    for name, r in result["cases"].items():
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=TOL), name
        assert r["grads_rel"] < TOL, (name, r["worst_grad"], r["grads_rel"])
        assert r["params_rel"] < TOL, (name, r["params_rel"])
        assert r["no_grad"] == [], name


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Hamlet's first 12 kB as paragraphs, one jsonl document each (about 120 bytes): many document boundaries in
    every block, some of them across the processes' slices."""
    text = json.loads(CORPUS.read_text().splitlines()[0])["text"][:12_000]
    path = tmp_path_factory.mktemp("corpus") / "paragraphs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in text.split("\n\n") if d.strip()))
    return path


def overrides(documents: Path, dump: Path) -> dict:
    return {"job.dump_folder": str(dump), "data.files": [str(documents)], "tokenizer.kind": "byte",
            "model.family": "gla", "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_heads": 2,
            "model.use_short_conv": True, "model.attn": {"layers": [1], "num_heads": 2},
            "data.packed_documents": True, "training.seq_len": 32, "training.batch_size": 2, "training.steps": 3,
            "training.gradient_accumulation_steps": 2,
            "training.mixed_precision": "no", "lr_scheduler.warmup_steps": 1, "training.eval_interval": 3,
            "training.eval_batches": 1, "metrics.plot": False}


def toml(value) -> str:
    """A command-line override's value (a TOML literal)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def test_train_cli_context_parallel_equals_one_process(documents, tmp_path):
    """2 processes, context-parallel degree 2 (so data-parallel degree 1), with activation checkpointing (the
    blocks' collectives run again in the backward): the losses, gradient norms and held-out loss of the one-process
    run (each process reads the whole batch and keeps its half of the packed row)."""
    one = trainer.train(load_config(None, list(overrides(documents, tmp_path / "one").items())), progress=False,
                        export_final=False)
    dump = tmp_path / "cp"
    args = [f"--{k}={toml(v)}" for k, v in overrides(documents, dump).items()]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "linattn_dsl.cli", "train", *args, "--parallelism.context_parallel_degree", "2",
                           "--training.activation_checkpointing=true", "--no-progress"],
                          capture_output=True, text=True, env=env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (dump / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in one.log_path.read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for mine, theirs in zip(log, ref):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=TOL)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=TOL)
        assert mine["tokens"] == theirs["tokens"]
    assert log[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=TOL)
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_per_step"] == 2 * 2 * 32   # one data-parallel batch
    assert (dump / "final" / "config.json").is_file()


def test_context_parallel_groups(monkeypatch):
    """Ranks r with the same r // degree share a group; every process creates every group, in the same order."""
    made = []
    monkeypatch.setattr(trainer.dist, "new_group", lambda ranks: made.append(ranks) or tuple(ranks))
    assert trainer.context_parallel_group(1, 0, 4) is None and made == []
    assert trainer.context_parallel_group(2, 3, 4) == (2, 3)
    assert made == [[0, 1], [2, 3]]
    assert trainer.context_parallel_group(4, 1, 4) == (0, 1, 2, 3)


def test_degree_must_divide_seq_len(documents, tmp_path):
    cfg = {**overrides(documents, tmp_path / "run"), "training.seq_len": 30, "parallelism.context_parallel_degree": 4}
    with pytest.raises(ConfigError, match=r"parallelism.context_parallel_degree: 4 does not divide "
                                          r"training.seq_len=30"):
        load_config(None, list(cfg.items()))
    with pytest.raises(ConfigError, match="parallelism.context_parallel_degree: expected a positive number"):
        load_config(None, list({**cfg, "parallelism.context_parallel_degree": 0}.items()))


def test_degree_must_divide_world_size(documents, tmp_path, monkeypatch):
    """Found before any process group is made (torchrun's WORLD_SIZE): nothing is written."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(None, list({**overrides(documents, tmp_path / "run"),
                                  "parallelism.context_parallel_degree": 2}.items()))
    with pytest.raises(ConfigError, match="parallelism.context_parallel_degree: 2 does not divide the world size 3"):
        trainer.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_factory_model_must_take_cp_context():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, labels=None, use_cache=False, **kwargs):
            return None

    with pytest.raises(ConfigError, match=r"model_factory \(Plain\) takes no cp_context keyword"):
        trainer.check_split_model(2, Plain(), custom_model=True)
    trainer.check_split_model(1, Plain(), custom_model=True)


def context(world=2, rank=0, cu=None) -> CPContext:
    """A context as cp_context builds it, without a process group: the checks run before any communication."""
    return CPContext(group=None, rank=rank, world=world, cu_seqlens=None if cu is None else tuple(cu), backend="gloo")


@pytest.mark.parametrize("kwargs,inputs,message", [
    ({"cp_context": context(cu=[0, 10, 24])}, (1, 16), r"cp_context: its cu_seqlens cover 24 tokens, but its 2 ranks "
                                                        r"of seq_len=16 local tokens hold 32"),
    ({"cp_context": context(cu=[0, 10, 32])}, (2, 16), "cp_context: packed sequences .* batch size 2"),
    ({"cp_context": context(), "cu_seqlens": torch.tensor([0, 4, 16])}, (1, 16),
     "cu_seqlens: with cp_context, pass the global packing to cp_context"),
    ({"cp_context": context(), "use_cache": True}, (1, 16), "cache / use_cache: expected no cache"),
    ({"cp_context": context(), "attention_mask": torch.tensor([[0] + [1] * 15])}, (1, 16),
     "attention_mask: expected none .* with cp_context"),
    ({"cp_context": {"group": None}}, (1, 16), "cp_context: expected None or a context"),
])
def test_model_refuses_a_context_that_does_not_fit(kwargs, inputs, message):
    config_class, _, lm_class = FAMILIES["rwkv7"]
    model = lm_class(config_class(hidden_size=32, num_hidden_layers=1, head_dim=16, vocab_size=64))
    ids = torch.zeros(inputs, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, labels=ids, **kwargs)
    layer = model.model.layers[0].mixer   # the layers check the same
    with pytest.raises(ValueError, match=message):
        layer(torch.zeros(*inputs, 32), **kwargs)
