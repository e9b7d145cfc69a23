"""The additive chunk form (issue 3): generated kernels vs the oracle, forward and every gradient.

* the generated PyTorch twin (the CPU backend), property-based with hypothesis;
* the generated Triton kernels under TRITON_INTERPRET=1 (subprocess, so the flag does not leak),
  on targeted small cases: T = 1, a partial chunk, several chunks, varlen, grouped heads, initial state;
* extreme gates (log-decay -20 per step) stay finite.
Tolerances: fp32 1e-4 relative to the float64 oracle (see linattn_dsl.reference.verify.TOLERANCE).
"""

import pytest
import torch
from _helpers import assert_matches_oracle, regen, run_interpreted_check

from linattn_dsl import ops

from linattn_dsl.compiler import registry

from linattn_dsl.reference import drawing as testing, verify
from linattn_dsl.compiler.spec import Decay, Recurrence

ADDITIVE = ["retention", "gla", "mamba2"]


@pytest.mark.parametrize("name", ADDITIVE)
def test_torch_twin_matches_oracle(name):
    res = verify.verify(registry.load(name), examples=25, max_T=100)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


def test_no_decay_additive_spec_lowers(tmp_path):
    # a spec outside the shipped ones: plain causal linear attention with a value gate
    spec, mod = regen(tmp_path, "plain_la", "from linattn_dsl import Recurrence\n"
                      "spec = Recurrence(name='plain_la', inputs=dict(q='B T H K', k='B T H K', v='B T H V', "
                      "z='B T H'), query='q', key='k', value='v * sigmoid(z)')\n")
    assert mod.FORM == "additive"
    res = verify.verify(spec, mod, examples=10, max_T=80)
    assert all(r.ok for r in res), verify.table(res, 1e-4)


@pytest.mark.parametrize("name", ADDITIVE)
def test_extreme_gates_are_finite_cpu(name):
    assert_matches_oracle(registry.load(name), getattr(ops, f"chunk_{name}"), B=1, T=300, heads=2, K=8, V=8,
                          log_decay_min=-20.0, seed=3)


def test_interpreted_triton_kernels():
    """Runs tests/interpreted/check_additive.py with TRITON_INTERPRET=1 in a fresh interpreter."""
    run_interpreted_check("additive", timeout=1800)


def test_custom_constant_decay_with_parameter_gradient():
    spec = Recurrence(name="const_param", inputs=dict(q="B T H K", k="B T H K", v="B T H V", c="H"),
                      query="q", key="k", value="v", decay=Decay.constant(log="-exp(c)"))
    import tempfile

    spec, mod = regen(tempfile.mkdtemp(), "const_param", "from linattn_dsl import Decay, Recurrence\n"
                      "spec = Recurrence(name='const_param', inputs=dict(q='B T H K', k='B T H K', v='B T H V', "
                      "c='H'), query='q', key='k', value='v', decay=Decay.constant(log='-exp(c)'))\n")
    res = verify.verify(spec, mod, examples=10, max_T=80)
    assert all(r.ok for r in res), verify.table(res, 1e-4)
    assert torch.isfinite(torch.tensor(list(res[0].worst.values()))).all()


@pytest.mark.parametrize("name", ["retention", "mamba2"])
def test_64k_tokens_with_strong_decay_finite_cpu(name):
    """Issue 3: finite results for 64k-token sequences with log-decays down to -20 per step (CPU twin)."""
    spec = registry.load(name)
    case = testing.draw_case(spec, B=1, T=65536, heads=1, K=8, V=8, log_decay_min=-20.0, seed=5)
    leaves = {n: (x.requires_grad_() if x is not None else None) for n, x in case.tensors.items()}
    o, s = case.call(getattr(ops, f"chunk_{name}"), leaves)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves.values() if x is not None)


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
