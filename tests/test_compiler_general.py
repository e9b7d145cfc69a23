"""The general (diagonal-plus-low-rank) chunk form (issue 5): generated code against the oracle, outputs,
final states and every gradient; fp32 tolerance 1e-4 relative.

* the generated PyTorch twin (the CPU backend), property-based with hypothesis;
* the generated Triton kernels under TRITON_INTERPRET=1 (tests/interpreted/check_general.py, in a
  subprocess so the flag does not leak): RWKV7 and one spec per other decay kind, chunk and
  fused_recurrent, T = 1, partial and several chunks, varlen, groups, initial state, -20 log-decays.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from _helpers import run_interpreted_check

from linattn_dsl import ops

from linattn_dsl.compiler import codegen, registry

from linattn_dsl.reference import drawing as testing, verify

HERE = Path(__file__).parent


def test_rwkv7_twin_matches_oracle():
    spec = registry.load("rwkv7")
    assert codegen.lowering.lower(spec).form == "general"
    res = verify.verify(spec, examples=25, max_T=100)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


def test_rwkv7_extreme_decay_finite_and_exact():
    spec = registry.load("rwkv7")
    case = testing.draw_case(spec, B=1, T=300, heads=2, K=16, V=8, log_decay_min=-20.0, seed=6)
    errs = testing.compare(case, ops.chunk_rwkv7)
    assert all(e < 1e-4 for e in errs.values()), errs


def test_general_form_reproduces_the_delta_rule():
    """a = e^g k, b = -beta k, v -> beta v turns the general form into the delta rule (docs/chunk_math.md)."""
    kda = registry.load("kda")
    case = testing.draw_case(kda, B=1, T=70, heads=2, K=8, V=8, seed=3, dtype=torch.float64)
    q, k, v, g, beta = (case.tensors[n] for n in ("q", "k", "v", "g", "beta"))
    o1, s1 = ops.chunk_kda(q, k, v, g, beta, scale=0.5, output_final_state=True)
    o2, s2 = ops.chunk_rwkv7(q, g, k, v * beta[..., None], torch.exp(g) * k, -beta[..., None] * k, scale=0.5,
                             output_final_state=True)
    # float64 inputs: both twins compute in float64, so they agree far below the fp32 bound
    assert testing.rel_err(o2, o1) < 1e-10 and testing.rel_err(s2, s1) < 1e-10


def test_interpreted_triton_kernels():
    """Runs tests/interpreted/check_general.py with TRITON_INTERPRET=1 in a fresh interpreter."""
    run_interpreted_check("general", timeout=1200)



def test_decay_input_gradients_precise_interpreted():
    """The decay-input gradients that once missed the fp32 bound on a GPU
    (benchmarks/experiments/gate_grad_precision.py: a constant decay through the general transition at T=260;
    -exp(c) at T=1, whose true dc is 0), under the interpreter at the fp32 bound of 1e-4."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.experiments.gate_grad_precision", "--check", "1e-4"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=HERE.parent)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dc" in r.stdout

def test_not_reproduced_names_every_differing_bit():
    """The GPU bf16 tests run each backward twice and compare bits (testing.not_reproduced)."""
    first = {"o": torch.ones(3), "da": torch.zeros(2)}
    second = {"o": torch.ones(3), "da": torch.tensor([0.0, 1e-30])}
    assert testing.not_reproduced(first, dict(first)) == []
    assert testing.not_reproduced(first, second) == ["da"]
