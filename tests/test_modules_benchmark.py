"""benchmarks/modules.py imports and parses its arguments without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

# loaded by path: pytest puts tests/, not the repository root, on sys.path
_spec = importlib.util.spec_from_file_location(
    "benchmarks_modules", Path(__file__).parents[1] / "benchmarks" / "modules.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_argument_parsing_defaults_and_overrides(monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/bench-out")
    args = bench.parse_args([])
    assert args.out == "/tmp/bench-out" and args.only == ["lce", "norm", "conv", "swiglu"]
    assert (args.tokens, args.hidden, args.vocab, args.shape) == (32768, 2048, 128256, [8, 4096, 2048])
    monkeypatch.delenv("OUT")
    args = bench.parse_args(["--only", "conv", "--shape", "2", "64", "32", "--quick"])
    assert args.out == "./out" and args.only == ["conv"] and args.shape == [2, 64, 32] and args.quick


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_exits_with_message_without_cuda(capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path)]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
