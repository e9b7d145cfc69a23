"""The additive chunk form (issue 3): generated kernels vs the oracle, forward and every gradient.

* the generated PyTorch twin (the CPU backend), property-based with hypothesis;
* the generated Triton kernels under TRITON_INTERPRET=1 (subprocess, so the flag does not leak),
  on targeted small cases: T = 1, a partial chunk, several chunks, varlen, grouped heads, initial state;
* extreme gates (log-decay -20 per step) stay finite.
Tolerances: fp32 1e-4 relative to the float64 oracle (see linattn_dsl.reference.verify.TOLERANCE).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linattn_dsl import ops

from linattn_dsl.compiler import registry

from linattn_dsl.reference import drawing as testing, verify
from linattn_dsl.compiler.spec import Decay, Recurrence

ADDITIVE = ["retention", "gla", "mamba2"]
HERE = Path(__file__).parent


@pytest.mark.parametrize("name", ADDITIVE)
def test_torch_twin_matches_oracle(name):
    res = verify.verify(registry.load(name), examples=25, max_T=100)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


def test_no_decay_additive_spec_lowers(tmp_path):
    # a spec outside the shipped ones: plain causal linear attention with a value gate
    from linattn_dsl.compiler import codegen
    from linattn_dsl.cli import _import_file

    src = tmp_path / "plain_la.py"
    src.write_text("from linattn_dsl import Recurrence\n"
                   "spec = Recurrence(name='plain_la', inputs=dict(q='B T H K', k='B T H K', v='B T H V', z='B T H'),"
                   " query='q', key='k', value='v * sigmoid(z)')\n")
    spec = registry.load(str(src))
    codegen.regen([spec], tmp_path / "gen", builtin=False, index=False)
    mod = _import_file(tmp_path / "gen" / "plain_la.py")
    assert mod.FORM == "additive"
    res = verify.verify(spec, mod, examples=10, max_T=80)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


@pytest.mark.parametrize("name", ADDITIVE)
def test_extreme_gates_are_finite_cpu(name):
    spec = registry.load(name)
    case = testing.draw_case(spec, B=1, T=300, heads=2, K=8, V=8, log_decay_min=-20.0, seed=3)
    errs = testing.compare(case, getattr(ops, f"chunk_{name}"))
    assert all(e < 1e-4 for e in errs.values()), errs


def test_interpreted_triton_kernels():
    """Runs tests/interpreted/check_additive.py with TRITON_INTERPRET=1 in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(HERE / "interpreted" / "check_additive.py")], capture_output=True,
                       text=True, env=env, timeout=1800)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "cases passed" in r.stdout


def test_custom_constant_decay_with_parameter_gradient():
    spec = Recurrence(name="const_param", inputs=dict(q="B T H K", k="B T H K", v="B T H V", c="H"),
                      query="q", key="k", value="v", decay=Decay.constant(log="-exp(c)"))
    from linattn_dsl.compiler import codegen
    from linattn_dsl.cli import _import_file
    import tempfile

    d = Path(tempfile.mkdtemp())
    src = d / "const_param.py"
    src.write_text("from linattn_dsl import Decay, Recurrence\n"
                   "spec = Recurrence(name='const_param', inputs=dict(q='B T H K', k='B T H K', v='B T H V', c='H'),"
                   " query='q', key='k', value='v', decay=Decay.constant(log='-exp(c)'))\n")
    spec = registry.load(str(src))
    codegen.regen([spec], d / "gen", builtin=False, index=False)
    mod = _import_file(d / "gen" / "const_param.py")
    res = verify.verify(spec, mod, examples=10, max_T=80)
    assert all(r.ok for r in res), verify.table(res, 1e-4)
    assert torch.isfinite(torch.tensor(list(res[0].worst.values()))).all()


@pytest.mark.parametrize("name", ["retention", "mamba2"])
def test_64k_tokens_with_strong_decay_finite_cpu(name):
    """Issue 3: finite results for 64k-token sequences with log-decays down to -20 per step (CPU twin;
    the Triton kernels were checked the same way once under the interpreter, see BENCHMARKS/notes)."""
    spec = registry.load(name)
    case = testing.draw_case(spec, B=1, T=65536, heads=1, K=8, V=8, log_decay_min=-20.0, seed=5)
    leaves = {n: (x.requires_grad_() if x is not None else None) for n, x in case.tensors.items()}
    o, s = case.call(getattr(ops, f"chunk_{name}"), leaves)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves.values() if x is not None)


def test_launch_opts_defaults_and_overrides(monkeypatch):
    """LINATTN_LAUNCH (tuning runs) overrides warps (w), stages (s), the BK / BV blocks (k, v), RB (r, a
    launch's switch) and DOT (d, an operand type) of one named stage launch; other stages keep the defaults the
    host code gives."""
    from linattn_dsl.runtime.additive import launch_opts

    monkeypatch.delenv("LINATTN_LAUNCH", raising=False)
    assert launch_opts("general_intra_bwd", dict(BK=16, num_warps=1)) == dict(BK=16, num_warps=1)
    monkeypatch.setenv("LINATTN_LAUNCH", "general_intra_bwd:w2s3k32,ut_bwd:w8")
    assert launch_opts("general_intra_bwd", dict(BK=16, num_warps=1)) == dict(BK=32, num_warps=2, num_stages=3)
    assert launch_opts("ut_bwd") == dict(num_warps=8)
    assert launch_opts("scores_fwd_pair", dict(BK=32)) == dict(BK=32)
    # k, v and r only where the defaults name BK, BV, RB: r0 turns general_intra_diag_bwd off
    monkeypatch.setenv("LINATTN_LAUNCH", "general_intra_diag_bwd:r0k64w4,ut_bwd:r0k64v32")
    assert launch_opts("general_intra_diag_bwd", dict(RB=1, BK=32, num_warps=2)) == dict(RB=0, BK=64, num_warps=4)
    assert launch_opts("ut_bwd", dict(num_warps=2)) == dict(num_warps=2)
    assert launch_opts("dv_bwd_local", dict(BK=64, BV=64)) == dict(BK=64, BV=64)
    # m: Triton's maxnreg (registers per thread), for any launch
    monkeypatch.setenv("LINATTN_LAUNCH", "general_intra_bwd:m168")
    assert launch_opts("general_intra_bwd", dict(BK=16, num_warps=1)) == dict(BK=16, num_warps=1, maxnreg=168)
    # d: a whole-chunk kernel's operand type (DOT), only where the defaults name it
    monkeypatch.setenv("LINATTN_LAUNCH", "dqk_chunk_intra_bwd:d1k64w8,general_chunk_intra_bwd:d1r0")
    assert launch_opts("dqk_chunk_intra_bwd", dict(RB=1, BK=32, num_warps=4, DOT=3)) == dict(RB=1, BK=64, num_warps=8,
                                                                                            DOT=1)
    assert launch_opts("general_chunk_intra_bwd", dict(RB=1, BK=32, num_warps=4)) == dict(RB=0, BK=32, num_warps=4)


def test_launch_choices_follow_the_h100_sweep():
    """The launch rules measured by benchmarks/launch_sweep.py (BENCHMARKS.md, sessions 6 and 9): the state
    kernels of the delta form pick 8 warps only when their programs do not fill two per SM, the scalar-decay
    backward 3 stages and the scalar-decay forward 2 once its programs fill every SM; half inputs with K <= 128
    take value blocks of 64 when the programs at 64 still cover every SM; fp32 keeps one stage; the output pass of
    vector decays takes value blocks of 128 (session 10)."""
    from linattn_dsl.runtime.additive import _dqk_opts, _output_bv
    from linattn_dsl.runtime.delta import _state_bv, _state_fwd_bv, _state_opts

    cpu = torch.device("cpu")   # counted as 132 SMs (an H100)
    assert _state_opts(1, 128, True, True, 128, cpu) == dict(num_warps=8, num_stages=2)
    assert _state_opts(1, 128, True, False, 512, cpu) == dict(num_warps=4, num_stages=3)
    assert _state_opts(1, 128, False, True, 512, cpu) == dict(num_warps=8)
    assert _state_opts(1, 128, False, False, 128, cpu) == {}
    assert _state_opts(1, 128, False, False, 512, cpu) == dict(num_stages=2)
    assert _state_opts(1, 128, False, False, 256, cpu) == dict(num_stages=2)   # H200 delta rule T=4096 (session 13)
    assert _state_opts(0, 128, True, True, 128, cpu) == dict(num_stages=1)
    assert _state_opts(1, 256, True, True, 128, cpu) == dict(num_stages=2)
    assert _state_bv(128, 1, 128, 128, cpu) == 64    # B*T = 32768 at T=4096: 8 x 16 heads, 256 programs at 64
    assert _state_bv(128, 1, 32, 128, cpu) == 32     # T=16384: 64 programs at 64 would idle half the SMs
    assert _state_bv(128, 0, 128, 128, cpu) == 32    # fp32
    assert _state_bv(256, 1, 128, 256, cpu) == 16
    # state_fwd of vector decays: 128 when it leaves one wave on (nearly) every SM (KDA T=4096: 128 on 132)
    assert _state_fwd_bv(128, 1, True, 128, 128, cpu) == 128
    assert _state_fwd_bv(128, 1, False, 128, 128, cpu) == 64    # scalar decays: not measured at 128
    assert _state_fwd_bv(128, 1, True, 32, 128, cpu) == 32      # T=16384: 32 programs at 128
    assert _state_fwd_bv(128, 0, True, 128, 128, cpu) == 32     # fp32
    assert _dqk_opts(True, True, False) == dict(num_warps=8, num_stages=2)
    assert _dqk_opts(True, False, False) == dict(num_warps=8, num_stages=2)     # the delta rule (session 13)
    assert _dqk_opts(False, False, True) == dict(num_stages=2)
    assert _dqk_opts(False, True, False) == dict(num_warps=8)
    assert _output_bv(128, True) == 128 and _output_bv(128, False) == 64 and _output_bv(48, True) == 64


def test_launch_sweep_best_env_maps_profiled_names_to_launch_names():
    """benchmarks/launch_sweep.py turns each profiled kernel's best override into LINATTN_LAUNCH entries under
    every launch name it runs as, and leaves out kernels whose best is the default or an error row."""
    from benchmarks.launch_sweep import LAUNCH_NAMES, _best_env

    res = {"-": {"state_fwd": 1.0, "gate_fwd_v0": 0.2, "ut_bwd": 0.5},
           "w8": {"state_fwd": 0.7, "gate_fwd_v0": 0.3, "ut_bwd": 0.6},
           "s2": {"state_fwd": 0.8, "gate_fwd_v0": 0.1, "ut_bwd": 0.55},
           "s4": {"error": "OutOfResources"}}
    env = _best_env(res).split(",")
    assert set(env) == {"state_fwd:w8", "add_state_fwd:w8", "gate_fwd:s2"}
    assert all(e.split(":")[0] in LAUNCH_NAMES for e in env)
    # a targeted override ("name:spec", several joined by "+") counts only for the launches it names
    res["output_fwd:v128+ut_bwd:w4"] = {"state_fwd": 0.1, "output_fwd": 0.3, "ut_bwd": 0.4}
    res["-"]["output_fwd"] = 0.5
    env = _best_env(res).split(",")
    assert set(env) == {"state_fwd:w8", "add_state_fwd:w8", "gate_fwd:s2", "output_fwd:v128", "ut_bwd:w4"}


def test_launch_sweep_goes_on_in_a_fresh_process_after_a_device_fault(monkeypatch):
    """After an override faults on the device (the CUDA context is then unusable), the rest of the sweep runs
    in a child process; its JSON comes back, and a child that dies gives an error row per override."""
    import json
    import subprocess

    import benchmarks.launch_sweep as sweep

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = "[kda] s2: {...}\n" + json.dumps({"s2": {"ut_fwd": 0.5}, "s3": {"error": "OutOfResources"}})
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")
    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep._time_elsewhere("kda", 4096, ["s2", "s3"], 3) == {"s2": {"ut_fwd": 0.5},
                                                                   "s3": {"error": "OutOfResources"}}
    assert calls[0][-1] == "--overrides=s2,s3" and "--time-child" in calls[0]
    monkeypatch.setattr(sweep.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Segfault"))
    assert set(sweep._time_elsewhere("kda", 4096, ["w2", "w4"], 3)) == {"w2", "w4"}
