"""Bad input to the models, layers, configs and the `linattn` command: each case asserts the exception type
(``ValueError``; ``ConfigError`` / ``CheckpointError`` are ValueErrors) or, for the command, exit code 2 and
one ``linattn: error:`` line, and that the message names the argument, field or file.

The command runs in-process (``linattn_dsl.cli.main``) on tiny models: the whole file takes seconds.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import linattn_dsl
import linattn_dsl.models as M
from linattn_dsl import cli
from linattn_dsl import layers as L
from linattn_dsl.train.checkpoint import CheckpointError
from linattn_dsl.train.config import ConfigError, load_config

CORPUS = Path(linattn_dsl.__file__).parent / "data" / "shakespeare.jsonl"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- model configs

CONFIGS = [  # (config class, kwargs, what the message must name)
    (M.GLAConfig, dict(vocab_size=0), "vocab_size: expected a positive int, got 0"),
    (M.GLAConfig, dict(num_hidden_layers=0), "num_hidden_layers: expected a positive int, got 0"),
    (M.RetNetConfig, dict(num_hidden_layers=-1), "num_hidden_layers: expected a positive int, got -1"),
    (M.DeltaNetConfig, dict(hidden_size=-64), "hidden_size: expected a positive int, got -64"),
    (M.GLAConfig, dict(hidden_size=64.0), "hidden_size: expected a positive int, got 64.0"),
    (M.GLAConfig, dict(num_heads=0), "num_heads: expected a positive int, got 0"),
    (M.KDAConfig, dict(norm_eps=-1), "norm_eps: expected a positive number, got -1"),
    (M.GLAConfig, dict(expand_k=0), "expand_k: expected a positive number, got 0"),
    (M.GLAConfig, dict(expand_k=0.001), "expand_k: hidden_size \\* expand_k"),
    (M.GLAConfig, dict(num_heads=3), "num_heads: expected a divisor of key dim 512"),
    (M.RetNetConfig, dict(expand_v=-2.0), "expand_v: expected a positive number"),
    (M.RetNetConfig, dict(rope_theta=0), "rope_theta: expected a positive number"),
    (M.DeltaNetConfig, dict(conv_size=0), "conv_size: expected a positive int"),
    (M.Mamba2Config, dict(state_size=0), "state_size: expected a positive int, got 0"),
    (M.Mamba2Config, dict(head_dim=48), "num_heads: expected num_heads \\* head_dim = expand \\* hidden_size"),
    (M.Mamba2Config, dict(n_groups=3), "n_groups: expected a divisor of num_heads=32"),
    (M.Mamba2Config, dict(time_step_min=1.0), "time_step_min: expected <= time_step_max"),
    (M.RWKV7Config, dict(head_dim=100), "head_dim: expected a divisor of hidden_size=1024"),
    (M.RWKV7Config, dict(decay_low_rank_dim=0), "decay_low_rank_dim: expected a positive int"),
    (M.KDAConfig, dict(head_dim=0), "head_dim: expected a positive int"),
    (M.KDAConfig, dict(expand_v=0.001), "expand_v: head_dim \\* expand_v"),
    (M.GLAConfig, dict(initializer_range=-0.1), "initializer_range: expected a number >= 0"),
    (M.GLAConfig, dict(attn={"layers": [24]}), "attn.layers: indices \\[24\\] out of range"),
    (M.GLAConfig, dict(pad_token_id=-1), "pad_token_id: expected None or a token id in \\[0, vocab_size=32000\\)"),
    (M.GLAConfig, dict(vocab_size=100, eos_token_id=100), "eos_token_id: expected None or a token id"),
]


@pytest.mark.parametrize("config_class, kwargs, message", CONFIGS,
                         ids=[f"{c.__name__}-{next(iter(k))}={next(iter(k.values()))}" for c, k, _ in CONFIGS])
def test_config_rejects(config_class, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        config_class(**kwargs)


def test_config_from_dict_checks_too():
    with pytest.raises(ValueError, match="^hidden_size: expected a positive int"):
        M.GLAConfig.from_dict({"hidden_size": -1})


def test_every_family_default_config_builds():
    for config_class, _, _ in M.FAMILIES.values():
        config_class()


# ---------------------------------------------------------------- layers

HIDDEN = 32
LAYER_ARGS = [  # (layer factory, what the message must name)
    (lambda: L.GatedLinearAttention(hidden_size=0), "hidden_size: expected a positive int"),
    (lambda: L.MultiScaleRetention(HIDDEN, num_heads=0), "num_heads: expected a positive int"),
    (lambda: L.DeltaNet(HIDDEN, num_heads=2, expand_k=-1.0), "expand_k: expected a positive number"),
    (lambda: L.Mamba2(HIDDEN, head_dim=16, state_size=0), "state_size: expected a positive int"),
    (lambda: L.KimiDeltaAttention(HIDDEN, num_heads=2, head_dim=0), "head_dim: expected a positive int"),
    (lambda: L.RWKV7Attention(HIDDEN, head_dim=7), "head_dim: expected a divisor of hidden_size=32"),
    (lambda: L.RWKV7Attention(HIDDEN, head_dim=8, layer_idx=3, num_hidden_layers=2),
     "layer_idx: expected 0 <= layer_idx < num_hidden_layers=2"),
    (lambda: L.RWKV7FeedForward(HIDDEN, intermediate_size=0), "intermediate_size: expected a positive int or None"),
    (lambda: L.Attention(HIDDEN, num_heads=4, window_size=0), "window_size: expected a positive int or None"),
    (lambda: L.GatedLinearAttention(HIDDEN, num_heads=2, norm_eps=0.0), "norm_eps: expected a positive number"),
]


@pytest.mark.parametrize("factory, message", LAYER_ARGS, ids=[m.split(":")[0] for _, m in LAYER_ARGS])
def test_layer_rejects(factory, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        factory()


@pytest.mark.parametrize("x, mask, message", [
    (torch.randn(5, HIDDEN), None, "hidden_states: expected a floating tensor \\[batch, seq_len >= 1, hidden_size=32"),
    (torch.randn(2, 5, 16), None, "hidden_states: .*got a torch.float32 tensor of shape \\[2, 5, 16\\]"),
    (torch.randn(2, 0, HIDDEN), None, "hidden_states: .*seq_len >= 1"),
    (torch.randn(2, 5, HIDDEN), torch.ones(3, 5), "attention_mask: expected shape \\[2, >= 5\\]"),
    (torch.randn(2, 5, HIDDEN), torch.ones(2, 5, 1), "attention_mask: expected a tensor \\[batch"),
], ids=["2d", "wrong-hidden", "empty", "mask-batch", "mask-rank"])
def test_layer_forward_rejects(x, mask, message):
    layer = L.GatedLinearAttention(HIDDEN, num_heads=2)
    with pytest.raises(ValueError, match=f"^{message}"):
        layer(x, attention_mask=mask)


# ---------------------------------------------------------------- model forwards


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    config = M.GLAConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2)
    return M.GLAForCausalLM(config).eval()


IDS = torch.ones(2, 3, dtype=torch.long)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids: .*\\(one sequence: input_ids\\[None\\]\\), got a torch.int64 "
                                              "tensor of shape \\[3\\]"),
    (dict(input_ids=IDS.float()), "input_ids: expected an int64 / int32 tensor"),
    (dict(input_ids=IDS[:, :0]), "input_ids: expected .*seq_len >= 1"),
    (dict(input_ids=[[1, 2]]), "input_ids: expected .* got list"),
    (dict(input_ids=IDS, inputs_embeds=torch.randn(2, 3, 32)), "input_ids / inputs_embeds: expected exactly one"),
    (dict(inputs_embeds=torch.randn(2, 3, 16)), "inputs_embeds: expected a floating tensor .*hidden_size=32"),
    (dict(input_ids=IDS, attention_mask=torch.ones(3, 3)), "attention_mask: expected shape \\[2, 3\\]"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 5)), "attention_mask: expected shape \\[2, 3\\]"),
    (dict(input_ids=IDS, labels=torch.ones(2, 4, dtype=torch.long)), "labels: expected the shape of the input ids"),
    (dict(input_ids=IDS, position_ids=torch.arange(4)), "position_ids: expected a tensor \\[batch=2, seq_len=3\\]"),
    (dict(input_ids=IDS, cache={}), "cache: expected a LinAttnCache"),
], ids=["1d-ids", "float-ids", "empty", "list", "both", "embeds-size", "mask-batch", "mask-longer", "labels",
        "position-ids", "cache"])
def test_model_forward_rejects(lm, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        lm(**kwargs)


def test_mask_may_cover_the_cached_tokens_and_no_more(lm):
    cache = lm(input_ids=IDS, use_cache=True).cache  # 3 tokens seen
    with pytest.raises(ValueError, match=r"^attention_mask: expected shape \[2, 1..4\]"):
        lm(input_ids=IDS[:, :1], attention_mask=torch.ones(2, 5), cache=cache, use_cache=True)
    lm(input_ids=IDS[:, :1], attention_mask=torch.ones(2, 4, dtype=torch.long), cache=cache, use_cache=True)


# ---------------------------------------------------------------- training configs


@pytest.mark.parametrize("key, value, message", [
    ("model.hidden_size", -64, "model.hidden_size: expected a positive int, got -64"),
    ("model.num_heads", 3, "model.num_heads: expected a divisor"),
    ("model.expand_k", 0.0, "model.expand_k: expected a positive number"),
])
def test_training_config_names_the_model_field(tmp_path, key, value, message):
    text = tmp_path / "t.txt"
    text.write_text("x" * 100)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(None, [("data.files", [str(text)]), (key, value)])


# ---------------------------------------------------------------- the command, in-process


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of ``linattn ARGV``."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_error(code: int, err: str, message: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("linattn: error: "), err
    assert re.search(message, lines[0]), (message, lines[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step run of a tiny GLA on bytes with checkpoints at steps 1, 2, 3 and the export in final/."""
    base = tmp_path_factory.mktemp("run")
    text = base / "hamlet.txt"
    text.write_text(json.loads(CORPUS.read_text().splitlines()[0])["text"][:20_000])
    code = cli.main(train_args(base, text) + ["--training.steps=4", "--no-progress"])
    assert code == 0
    return base


def train_args(base: Path, text: Path) -> list[str]:
    return ["train", f"--job.dump_folder={base / 'run'}", f"--data.files=[\"{text}\"]", "--tokenizer.kind=byte",
            "--model.hidden_size=32", "--model.num_hidden_layers=1", "--model.num_heads=2", "--training.seq_len=32",
            "--training.batch_size=2", "--checkpoint.interval=1", "--checkpoint.keep_latest_k=3",
            "--metrics.plot=false", "--training.eval_interval=0"]


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, tmp_path / "copy")
    return tmp_path / "copy"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_train_without_config_says_what_to_pass(capsys):
    assert_error(*run_cli(capsys, "train"), r"--config: .*--config FILE.toml .*--data.files")


def test_resume_with_another_model_names_the_fields(run_dir, tmp_path, capsys):
    base = copy_run(run_dir, tmp_path)
    code, err = run_cli(capsys, *train_args(base, base / "hamlet.txt"), "--resume", "--training.steps=6",
                        "--model.hidden_size=64", "--model.num_hidden_layers=2")
    assert_error(code, err, r"--resume: .*step-3.*model.hidden_size = 32 there, 64 now; "
                            r"model.num_hidden_layers = 1 there, 2 now")
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "trainer_state.json"])
def test_resume_from_a_truncated_checkpoint_names_the_file(run_dir, tmp_path, capsys, name):
    base = copy_run(run_dir, tmp_path)
    truncate(base / "run" / "checkpoint" / "step-3" / name)
    code, err = run_cli(capsys, *train_args(base, base / "hamlet.txt"), "--resume", "--training.steps=6",
                        "--no-progress")
    assert_error(code, err, rf"step-3/{re.escape(name)}: cannot be read .*the previous checkpoint is \S*step-2")


def test_generate_from_a_truncated_export_names_the_file(run_dir, tmp_path, capsys):
    base = copy_run(run_dir, tmp_path)
    truncate(base / "run" / "final" / "model.safetensors")
    code, err = run_cli(capsys, "generate", base / "run" / "final", "--prompt", "x")
    assert_error(code, err, r"final/model.safetensors: cannot be read .*latest checkpoint is \S*step-3")
    assert isinstance(CheckpointError("x"), ValueError)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size: expected a positive int, got 0"),
    (["--include-path", "/nonexistent/tasks"], "--include-path: /nonexistent/tasks: no such folder"),
    (["--limit", "0"], "--limit: expected a positive number"),
    (["--num-fewshot", "-1"], "--num-fewshot: expected an int >= 0"),
    (["--metadata", "{oops"], "--metadata: not valid JSON"),
], ids=["batch-size", "include-path", "limit", "num-fewshot", "metadata"])
def test_eval_rejects_arguments(run_dir, capsys, args, message):
    code, err = run_cli(capsys, "eval", run_dir / "run" / "final", "--tasks", "linattn_shakespeare_mc", *args)
    assert_error(code, err, re.escape(message))


def test_eval_rejects_an_unknown_task_before_loading_the_model(run_dir, tmp_path, capsys):
    base = copy_run(run_dir, tmp_path)
    truncate(base / "run" / "final" / "model.safetensors")  # loading it would fail with another message
    code, err = run_cli(capsys, "eval", base / "run" / "final", "--tasks", "linattn_nosuchtask")
    assert_error(code, err, r"--tasks: unknown task\(s\) \['linattn_nosuchtask'\]; local tasks: .*_mc")


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}", "--tasks", "linattn_shakespeare_mc"], "MODEL_DIR: .*no config.json"),
    (["generate", "{tmp}", "--prompt", "x"], "MODEL_DIR: .*no config.json"),
    (["generate", "{tmp}", "--prompt", "x", "--top-p", "0"], "--top-p: expected 0 < top_p <= 1, got 0.0"),
    (["generate", "{tmp}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive int"),
    (["generate", "{tmp}", "--prompt", "x", "--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["verify", "retention", "--examples", "0"], "--examples: expected a positive int, got 0"),
    (["verify", "retention", "--max-t", "-5"], "--max-t: expected a positive int, got -5"),
    (["train", "--data.files=[\"/nonexistent/corpus.txt\"]"], "data.files: /nonexistent/corpus.txt: no such file"),
    (["train", "--config", "/nonexistent.toml"], "config file /nonexistent.toml: not found"),
], ids=["eval-dir", "generate-dir", "top-p", "max-new-tokens", "temperature", "examples", "max-t", "data-files",
        "config-file"])
def test_cli_rejects(tmp_path, capsys, argv, message):
    assert_error(*run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv]), message)


def test_verify_on_cuda_without_a_gpu_refuses_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where a generated spec would go
    spec = ROOT / "linattn_dsl" / "specs" / "gla.py"
    code, err = run_cli(capsys, "verify", spec, "--device", "cuda")
    assert_error(code, err, r"--device: got 'cuda'; expected 'cpu', or 'cuda' on a machine with a CUDA GPU")
    assert list(tmp_path.iterdir()) == []


def test_the_command_leaves_library_settings_as_they_were(capsys, tmp_path):
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), logging.getLogger("lm_eval").level)
    run_cli(capsys, "generate", tmp_path, "--prompt", "x")
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(),
            logging.getLogger("lm_eval").level) == before


def test_importing_the_package_changes_no_library_setting():
    """The quieting above is the command's, not the package's: importing every module leaves transformers',
    huggingface_hub's and logging's settings, warning filters and the environment as they were (the
    libraries the package imports are imported first: some add warning filters of their own on import)."""
    import subprocess
    import sys

    probe = """
import logging, os, warnings
import huggingface_hub.utils as hub, torch, transformers
import accelerate, hypothesis, jinja2, scipy.sparse, scipy.special, sympy, tokenizers
from transformers.utils import logging as hf
def snapshot():
    loggers = {n: getattr(logging.getLogger(n), "level", None) for n in ("", "transformers", "lm_eval", "accelerate")}
    return (hf.is_progress_bar_enabled(), hf.get_verbosity(), hub.are_progress_bars_disabled(), loggers,
            set(warnings.filters), dict(os.environ), torch.get_num_threads())
before = snapshot()
import linattn_dsl, linattn_dsl.models, linattn_dsl.layers, linattn_dsl.cli, linattn_dsl.demo, linattn_dsl.evaluate
import linattn_dsl.generate, linattn_dsl.train.trainer
after = snapshot()
assert before == after, [(a ^ b if isinstance(a, set) else (a, b)) for a, b in zip(before, after) if a != b]
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
