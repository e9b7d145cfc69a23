"""benchmarks/models.py and benchmarks/train_scaling.py on CPU with tiny configs: the scheduler, the
measurements, the agreement check and the tables work end to end (the numbers themselves are GPU work).
FLA's models need CUDA: without the ``fla`` package their rows must say so instead of failing the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pytest puts tests/, not the repository root, on sys.path
from benchmarks import models as bench  # noqa: E402
from benchmarks import train_scaling  # noqa: E402
from linattn_dsl.models import FAMILIES as OURS  # noqa: E402

HAS_FLA = importlib.util.find_spec("fla") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def test_340m_configs_have_the_advertised_shape():
    for family in bench.FAMILIES:
        kw = bench.model_kwargs(family, "340m")
        assert (kw["hidden_size"], kw["num_hidden_layers"], kw["vocab_size"]) == (1024, 24, 32000)
        config = OURS[family][0](**kw)  # valid for our config classes (head dims, mamba2 heads...)
        assert config.fuse_linear_cross_entropy
    assert bench.model_kwargs("gla", "340m")["num_heads"] == 4
    # Mamba2 in FLA's layout: mixer-only blocks, twice the layers, the parameter count of FLA's 48-layer model
    kw = bench.model_kwargs("mamba2_fla", "340m")
    assert kw["num_hidden_layers"] == 48 and kw["use_mlp"] is False
    with torch.device("meta"):
        model = bench.build_ours("mamba2_fla", kw)
    assert 380e6 < sum(p.numel() for p in model.parameters()) < 385e6   # FLA's: 382.4M
    assert bench.model_kwargs("gla", "340m", loss="plain", layers=6)["num_hidden_layers"] == 6
    assert not bench.model_kwargs("gla", "340m", loss="plain")["fuse_linear_cross_entropy"]


def test_train_and_decode_measurements_on_a_tiny_model():
    args = types.SimpleNamespace(device="cpu", batch=2, seq=32, steps=2, warmup=1, optimizer="adamw", prompt=8,
                                 new_tokens=4)
    model, notes = bench.build("ours", "gla", bench.model_kwargs("gla", "tiny"), "cpu", torch.float32)
    assert notes == []
    train = bench.train_bench(model, args)
    assert train["train_tokens_per_s"] > 0 and train["train_peak_gib"] is None and train["optimizer"] == "adamw"
    decode = bench.decode_bench(model, "ours", args)
    assert decode["generate_matches_loop"] is True  # generate and the hand loop make the same greedy tokens
    assert decode["loop_ms_per_token"] > 0 and decode["generate_ms_per_token"] > 0


def test_agreement_rows():
    rows = bench.agreement("gla", "cpu", ["fp32", "bf16"])
    fp32, bf16 = rows
    assert fp32["logits_rel"] == 0.0 and fp32["ok"]  # the same backend on the same device
    assert 0 < bf16["logits_rel"] < bench.TOLERANCE["bf16"][0] and bf16["ok"]
    assert "model.embeddings.weight" in bf16["grad_rel"] and "lm_head.weight" in bf16["grad_rel"]
    assert not bf16["grads_missing"]
    text = bench.table([], rows, dict(card="cpu", torch="x", date="d", settings=dict(
        size="small", dtype="bf16", batch=1, seq=1, optimizer="none", loss="plain", steps=1, warmup=1, prompt=1,
        new_tokens=1)))
    assert "agreement" in text and "gla" in text


def test_orchestrator_end_to_end_on_cpu(tmp_path):
    """The whole schedule on CPU: ours timed, FLA rows (an error without the fla package), the training loop
    through benchmarks.train_scaling, results.json and the table."""
    out = tmp_path / "out"
    loop_args = ("--model.hidden_size=32 --model.num_hidden_layers=1 --model.num_heads=2 --model.vocab_size=300 "
                 "--training.seq_len=32 --training.batch_size=2 --data.val_fraction=0.01")
    cmd = [sys.executable, "-m", "benchmarks.models", "--device", "cpu", "--tiny", "--families", "gla",
           "--impls", "ours,fla", "--no-agreement", "--steps", "1", "--warmup", "1", "--batch", "1", "--seq", "32",
           "--prompt", "8", "--new-tokens", "3", "--loop-config", "configs/gla_340m.toml", "--loop-steps", "2",
           "--loop-args", loop_args, "--budget", "900", "--out", str(out)]
    if HAS_FLA:
        cmd[cmd.index("ours,fla")] = "ours"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    ours = next(r for r in results["rows"] if r["impl"] == "ours")
    assert ours["family"] == "gla" and ours["train_tokens_per_s"] > 0 and ours["generate_matches_loop"]
    assert ours["concurrent"] is False  # nothing ran beside it
    loop = {r["run"]: r for r in results["loop"]}
    assert loop["ours_1gpu"]["steps"] == 2 and loop["ours_1gpu"]["steady_tokens_per_s"] > 0
    if not HAS_FLA:
        fla = next(r for r in results["rows"] if r["impl"] == "fla")
        assert "not installed" in fla["error"] and "not installed" in loop["fla_1gpu"]["error"]
    table = (out / "table.txt").read_text()
    assert table.strip() in proc.stdout and "ours_1gpu" in table and "training loop" in table
    assert (out / "logs" / "time-ours-gla.log").is_file()


def test_train_scaling_summary_ratios(tmp_path, capsys):
    def summary(name, world, tps):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_summary.json").write_text(json.dumps(dict(
            steps=200, world_size=world, tokens_per_step=16384 * world, num_params=374_000_000,
            steady_tokens_per_s=tps, timed_steps=190, tokens_per_s_overall=tps * 0.9, peak_memory_gib=20.0,
            first_step_s=12.0, final_loss=2.5, val_loss=2.6)))
        return str(tmp_path / name)

    runs = [summary("ours_1gpu", 1, 100_000.0), summary("ours_2gpu", 2, 190_000.0), summary("fla_1gpu", 1, 80_000.0),
            str(tmp_path / "missing")]
    assert train_scaling.main(["summary", *runs]) == 0
    text = capsys.readouterr().out
    assert "DDP scaling ours_2gpu / ours_1gpu: 1.90x on 2 processes (95% efficiency)" in text
    assert "ours / FLA tokens/s through the same loop, one card: 1.25" in text
    assert "missing" in text and "ERROR" in text


def test_fla_config_mapping(monkeypatch):
    """Our field names go to FLA's config where it has them; the loss flags never both on (FLA refuses that);
    FLA's Mamba2 gets twice the layers. FLA's config classes are stood in for (no fla package in CI)."""

    class GLAConfig:
        def __init__(self, hidden_size=2048, num_hidden_layers=24, num_heads=4, expand_k=0.5, vocab_size=32000,
                     fuse_cross_entropy=True, fuse_linear_cross_entropy=False, **kwargs):
            if fuse_cross_entropy and fuse_linear_cross_entropy:
                raise ValueError("both loss flags on")
            self.__dict__.update(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_heads=num_heads,
                                 expand_k=expand_k, vocab_size=vocab_size, fuse_cross_entropy=fuse_cross_entropy,
                                 fuse_linear_cross_entropy=fuse_linear_cross_entropy, extra=kwargs)

    class KDAConfig:  # no fused linear cross-entropy in FLA's KDA config
        def __init__(self, hidden_size=2048, num_hidden_layers=24, num_heads=16, head_dim=128, vocab_size=32000,
                     fuse_cross_entropy=True, **kwargs):
            self.__dict__.update(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_heads=num_heads,
                                 fuse_cross_entropy=fuse_cross_entropy, extra=kwargs)

    class Mamba2Config(KDAConfig):
        pass

    fake = types.ModuleType("fla.models")
    fake.GLAConfig, fake.KDAConfig, fake.Mamba2Config = GLAConfig, KDAConfig, Mamba2Config
    package = types.ModuleType("fla")
    package.models = fake
    monkeypatch.setitem(sys.modules, "fla", package)
    monkeypatch.setitem(sys.modules, "fla.models", fake)

    cfg, dropped = bench.fla_config("gla", bench.model_kwargs("gla", "340m"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_heads, cfg.vocab_size) == (1024, 24, 4, 32000)
    assert cfg.fuse_linear_cross_entropy and not cfg.fuse_cross_entropy and cfg.extra == {}
    assert dropped == ["expand_v", "hidden_ratio"]  # fields the stand-in lacks are reported, not passed
    cfg, _ = bench.fla_config("gla", bench.model_kwargs("gla", "340m", loss="plain"))
    assert not cfg.fuse_linear_cross_entropy and not cfg.fuse_cross_entropy
    cfg, dropped = bench.fla_config("kda", bench.model_kwargs("kda", "340m"))
    assert cfg.fuse_cross_entropy and "fuse_linear_cross_entropy" not in dropped
    assert "fuse_linear_cross_entropy (FLA's fuse_cross_entropy instead)" in dropped
    cfg, _ = bench.fla_config("mamba2", bench.model_kwargs("mamba2", "340m"))
    assert cfg.num_hidden_layers == 48


def test_memsnap_peak_breakdown_replays_the_trace():
    from benchmarks import memsnap

    def fr(name, line):
        return [{"filename": "/x/torch/_tensor.py", "line": 1, "name": "op"},
                {"filename": f"/w/linattn_dsl/{name}.py", "line": line, "name": "f"}]

    trace = [dict(action="alloc", addr=1, size=100, frames=fr("a", 1)),
             dict(action="alloc", addr=2, size=200, frames=fr("b", 2)),
             dict(action="free_requested", addr=1, size=100),
             dict(action="free_completed", addr=1, size=100),
             dict(action="alloc", addr=3, size=50, frames=fr("a", 1)),
             dict(action="free_completed", addr=2, size=200),
             dict(action="free_completed", addr=3, size=50)]
    snap = {"device_traces": [trace],
            "segments": [{"device": 0, "blocks": [{"address": 9, "size": 1000, "state": "active_allocated",
                                                    "frames": fr("w", 7)},
                                                   {"address": 3, "size": 50, "state": "inactive"}]}]}
    b = memsnap.peak_breakdown(snap)
    assert b["peak"] == 1300 and b["base"] == 1000 and b["live_at_peak"] == 300 and b["peak_event"] == 1
    assert [(w.split(" ")[0], n, c) for w, n, c in b["at_peak"]] == [("linattn_dsl/b.py:2", 200, 1),
                                                                      ("linattn_dsl/a.py:1", 100, 1)]
    assert b["base_by"][0][1:] == (1000, 1)
    text = memsnap.report(b, "t")
    assert "linattn_dsl/b.py:2 f" in text and "GiB" in text


def test_shelf_train_configs_and_a_tiny_run(tmp_path):
    """benchmarks/shelf_train.py: every shelf family's ~340M [model] is valid and 330-420M parameters (meta device);
    one family runs the whole script on the CPU (--tiny: train a few steps, export, generate)."""
    from benchmarks import shelf_train
    from linattn_dsl.train.config import model_classes, validate_model

    for family in shelf_train.SHELF:
        model = shelf_train.model_section(family)
        validate_model(model)
        config_class, _, lm_class = model_classes(model)
        with torch.device("meta"):
            lm = lm_class(config_class(**{k: v for k, v in model.items() if k not in ("family", "spec")}))
        assert 330e6 < sum(p.numel() for p in lm.parameters()) < 420e6, family
    assert shelf_train.main(["--tiny", "--steps", "3", "--families", "comba", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "shelf_train.json").read_text())
    assert row["last_step"] == 3 and row["generated"].startswith("ROMEO:")
