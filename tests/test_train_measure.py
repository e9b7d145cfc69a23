"""What the GPU benchmarks need from ``linattn_dsl.train``, checked on CPU with tiny models: throughput and
memory numbers (``train_summary.json``), another model through the same loop (``model_factory``), no export
on request, held-out evaluation with the same number of forwards on every process (a DDP/FSDP forward may
be collective), and a 2-process DDP run under ``torchrun`` (gloo) with a held-out set of one batch.
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
from linattn_dsl.models import RetNetConfig, RetNetForCausalLM
from linattn_dsl.train import trainer
from linattn_dsl.train.config import load_config

CORPUS = Path(linattn_dsl.__file__).parent / "data" / "shakespeare.jsonl"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    path.write_text(json.loads(CORPUS.read_text().splitlines()[0])["text"][:20_000])
    return path


def tiny(text_file: Path, dump: Path, **overrides) -> dict:
    base = {
        "job.dump_folder": str(dump), "data.files": [str(text_file)], "tokenizer.kind": "byte",
        "model.hidden_size": 32, "model.num_hidden_layers": 1, "model.num_heads": 2,
        "training.seq_len": 32, "training.batch_size": 2, "training.steps": 6, "lr_scheduler.warmup_steps": 1,
        "metrics.plot": False, "training.eval_batches": 1,
    }
    base.update(overrides)
    return load_config(None, list(base.items()))


def test_timing_skip_and_steady_throughput():
    assert [trainer.timing_skip(n) for n in (0, 1, 2, 19, 20, 200, 1000)] == [0, 0, 1, 1, 2, 10, 10]
    seconds = {1: 30.0, **{s: 0.5 for s in range(2, 12)}}  # a slow first step (compilation), then 10 x 0.5 s
    assert trainer.steady_tokens_per_s(seconds, 1000) == pytest.approx(2000.0)
    assert trainer.steady_tokens_per_s({1: 2.0}, 100) == pytest.approx(50.0)  # one step: nothing left out
    assert trainer.steady_tokens_per_s({}, 100) == 0.0


def test_summary_file_and_result_fields(text_file, tmp_path):
    result = trainer.train(tiny(text_file, tmp_path / "run"), progress=False)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert result.summary_path == tmp_path / "run" / "train_summary.json"
    assert summary == json.loads(json.dumps(result.summary()))
    assert summary["steps"] == 6 and summary["world_size"] == 1 and summary["timed_steps"] == 5
    assert summary["tokens_per_step"] == 2 * 32 and summary["num_params"] == result.num_params
    assert summary["steady_tokens_per_s"] > 0 and summary["first_step_s"] > 0
    assert summary["peak_memory_gib"] is None  # CPU
    assert sorted(result.step_seconds) == list(range(1, 7))
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_model_factory_trains_another_model_without_export(text_file, tmp_path):
    built = []

    def factory(cfg, tokenizer):
        assert cfg["model"]["family"] == "gla"  # the config still describes ours; the factory decides
        model = RetNetForCausalLM(RetNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                               num_heads=2, eos_token_id=tokenizer.eos_token_id))
        built.append(model)
        return model

    result = trainer.train(tiny(text_file, tmp_path / "run"), progress=False, model_factory=factory,
                           export_final=False)
    assert len(built) == 1 and result.num_params == sum(p.numel() for p in built[0].parameters())
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(list(result.losses.values()))))
    assert not (tmp_path / "run" / "final").exists()
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 6


class FakeAccelerator:
    """One process of ``world`` as evaluate_loss sees it; ``reduce`` keeps this process's totals."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")
        self.totals = []

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def reduce(self, tensor, reduction):
        self.totals.append(tensor.clone())
        return tensor


class CountingModel(torch.nn.Module):
    """Loss = mean of the batch's ids (so a batch's weight in the mean can be checked); counts forwards."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, labels, use_cache):
        self.calls += 1
        return type("Out", (), {"loss": input_ids.float().mean()})()


@pytest.mark.parametrize("n_val,batch_size,max_batches,world", [(5, 2, 8, 2), (1, 8, 4, 2), (7, 2, 3, 2),
                                                                 (9, 2, 8, 3), (4, 2, 8, 1)])
def test_evaluate_loss_same_forwards_on_every_process(n_val, batch_size, max_batches, world):
    val = torch.arange(n_val * 4).view(n_val, 4) % 97
    models, accs = [], []
    for rank in range(world):
        model, acc = CountingModel(), FakeAccelerator(rank, world)
        trainer.evaluate_loss(model, val, batch_size, max_batches, acc)
        models.append(model)
        accs.append(acc)
    batches = [val[i:i + batch_size] for i in range(0, n_val, batch_size)][:max_batches]
    assert len({m.calls for m in models}) == 1  # same number of forwards everywhere
    assert models[0].calls == -(-len(batches) // world)
    total = sum(a.totals[0] for a in accs)  # what an all-reduce(sum) would give every process
    expected = sum(b.float().mean() * len(b) for b in batches) / sum(len(b) for b in batches)
    assert (total[0] / total[1]).item() == pytest.approx(expected.item())
    assert total[1].item() == sum(len(b) for b in batches)


def test_ddp_two_processes_with_one_held_out_batch(text_file, tmp_path):
    """torchrun, 2 CPU processes (gloo): the held-out set is one batch, so the second process evaluates a
    weight-0 batch; the run ends, both processes agree on the loss, the summary counts both."""
    dump = tmp_path / "ddp"
    overrides = [f"--job.dump_folder={dump}", "--tokenizer.kind=byte", f"--data.files=[\"{text_file}\"]",
                 "--model.hidden_size=32", "--model.num_hidden_layers=1", "--model.num_heads=2",
                 "--training.seq_len=32", "--training.batch_size=2", "--training.steps=3",
                 "--training.eval_interval=2", "--training.eval_batches=1", "--data.val_fraction=0.001",
                 "--lr_scheduler.warmup_steps=1", "--metrics.plot=false", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                             os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "linattn_dsl.cli", "train", *overrides], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((dump / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_per_step"] == 2 * 2 * 32 and summary["steps"] == 3
    assert summary["val_loss"] is not None and summary["val_loss"] == summary["val_loss"]  # finite, not NaN
    log = [json.loads(line) for line in (dump / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val_loss" in log[1]
    assert "throughput:" in proc.stdout and "over 2 process(es)" in proc.stdout


def test_gla_340m_config():
    cfg = load_config(ROOT / "configs" / "gla_340m.toml")
    model, training = cfg["model"], cfg["training"]
    assert (model["family"], model["hidden_size"], model["num_hidden_layers"], model["num_heads"],
            model["vocab_size"]) == ("gla", 1024, 24, 4, 32000)
    assert (training["seq_len"], training["batch_size"], training["steps"]) == (2048, 8, 200)
    assert cfg["tokenizer"]["kind"] == "byte" and cfg["checkpoint"]["interval"] == 0
    assert Path(cfg["data"]["files"][0]).is_file()


@pytest.mark.parametrize("family", ["gla", "kda"])
def test_fsdp2_sharding_on_cpu(family, tmp_path):
    """FSDP2 as configs/accelerate_fsdp.yaml asks accelerate for it on GPUs (one fully_shard unit per decoder
    block plus the root), done with PyTorch's API on 2 CPU processes (gloo; accelerate itself runs CPU
    processes as DDP): the same step-1 loss as one unsharded copy fed the whole batch and every gathered
    gradient within 1e-5; a sharded checkpoint (one file per process) restored into a fresh sharded model and
    optimizer repeats step 2 exactly; the full state dict gathered from the shards has the unsharded copy's
    keys and values (1e-3 of each tensor's largest entry after two AdamW steps at lr 1e-2: AdamW divides each
    element's step by its own gradient scale, so an element whose gradient is near zero moves by up to lr on the
    rounding of the sharded reductions; the gradients themselves agree to 1e-5)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "distributed" / "fsdp2_cpu.py"), str(tmp_path / "ckpt"), family],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["sharded"] and r["world"] == 2 and r["same_keys"]
    assert r["loss1"] == pytest.approx(r["ref_loss1"], rel=1e-6) and r["grads_rel"] < 1e-5
    assert r["loss2"] == pytest.approx(r["ref_loss2"], rel=1e-6)
    assert r["resumed_loss2"] == r["loss2"]
    assert r["state_rel"] < 1e-3
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(r["files"])


def test_fsdp_two_processes_resume_and_export(text_file, tmp_path):
    """accelerate launch with the shipped FSDP config (2 CPU processes, gloo): an interrupted run (3 steps,
    checkpoint at step 2) resumed to step 4 repeats the losses of an uninterrupted 4-step run, and the export
    loads with AutoModelForCausalLM.

    On CPU accelerate does not apply the FSDP plugin (it does so for GPU process groups only): the processes run
    as DDP, every checkpoint holds the whole model, and the trainer says so. This covers the launch, checkpoint,
    resume and export path of the config, not the sharding itself."""
    from transformers import AutoModelForCausalLM

    fsdp_yaml = tmp_path / "fsdp.yaml"
    fsdp_yaml.write_text((ROOT / "configs" / "accelerate_fsdp.yaml").read_text().replace("use_cpu: false",
                                                                                          "use_cpu: true"))
    common = ["--tokenizer.kind=byte", f"--data.files=[\"{text_file}\"]", "--model.hidden_size=32",
              "--model.num_hidden_layers=2", "--model.num_heads=2", "--training.seq_len=32",
              "--training.batch_size=2", "--lr_scheduler.decay_type=constant", "--lr_scheduler.warmup_steps=0",
              "--training.mixed_precision=no", "--metrics.plot=false", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                             os.environ.get("PYTHONPATH")]))}

    def launch(dump, *extra):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp_yaml),
                               "-m", "linattn_dsl.cli", "train", *common, f"--job.dump_folder={dump}", *extra],
                              capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "runs these processes as MULTI_CPU" in proc.stderr
        return {r["step"]: r["loss"] for r in map(json.loads, (dump / "train_log.jsonl").read_text().splitlines())}

    whole = launch(tmp_path / "whole", "--training.steps=4")
    launch(tmp_path / "cut", "--training.steps=3", "--checkpoint.interval=2")
    resumed = launch(tmp_path / "cut", "--training.steps=4", "--checkpoint.interval=2", "--resume")
    assert sorted(whole) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(whole[step] - resumed[step]) <= 1e-6, (step, whole, resumed)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
