"""Random decay spikes and non-finite inputs against the oracle (issue 29, items 2, 3 and 5).

Hypothesis places, in small calls (T up to 150, head dims 16 or 32, one to three packed sequences):
* log-decay spikes of -inf, -1e30, -1e4, -50 or a mild -0.5, at the first token, on both sides of a chunk
  boundary, at the last token or anywhere, several in one chunk, in every key channel or in one; outputs,
  final states and every gradient must match the float64 oracle within 1e-4 relative (fp32). A spec whose
  log-decay is an expression gets the spike through its raw input (KDA's gate ``-exp(A_log) softplus(g +
  dt_bias)`` through ``g``; Mamba2 through ``A`` for a whole head and through ``dt`` for a token; drawn specs
  through a per-head ``c`` and a token's ``x``);
* one NaN, +inf or -inf at a token t of one sequence, in its value, key, query, a gate input, beta, a or b:
  every output before t must match the oracle, so must every output and final state the oracle has finite
  (a query's NaN spoils one output; -inf in a log-decay or in Mamba2's dt spoils none), none the oracle has
  non-finite may come out finite (a NaN dropped), and the other sequences' outputs and final states must be
  bit for bit those of the same call without it.
Backends: the generated Triton kernels under TRITON_INTERPRET=1 (chunk and fused_recurrent, a fresh process
each: the flag must be set before the kernels are imported) and the CPU twin (chunk, this process). Also
bf16 inputs under the interpreter against the oracle at the bf16 bound (verify.TOLERANCE, 5e-2).
Run this file as a script (``TRITON_INTERPRET=1 python tests/test_spikes.py chunk nonfinite``) for one
interpreted backend and property (spikes, nonfinite or bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zlib
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from linattn_dsl import reference

from linattn_dsl.compiler import codegen, registry

from linattn_dsl.reference import drawing as testing, verify

TOL = 1e-4
BT = 64   # the kernels' chunk size: spikes go on both sides of its boundaries
SPIKES = [float("-inf"), -1e30, -1e4, -50.0, -0.5]
NONFINITE = [float("nan"), float("inf"), float("-inf")]

# Specs written here rather than shipped: a per-head constant decay taken as an input, with the delta rule
# (-inf for a head when c = +inf), and a scalar decay expression with the general transition.
DRAWN = {
    "drawn_constant_delta": 'from linattn_dsl import Decay, Recurrence, Transition\n'
                            'spec = Recurrence(name="drawn_constant_delta", inputs=dict(q="B T H K", k="B T H K", '
                            'v="B T H V", c="H", bb="B T H"), query="q", key="k", value="v", '
                            'decay=Decay.constant(log="-softplus(c) - 0.01"), '
                            'transition=Transition.delta(beta="sigmoid(bb)"))\n',
    "drawn_scalar_general": 'from linattn_dsl import Decay, Recurrence, Transition\n'
                            'spec = Recurrence(name="drawn_scalar_general", inputs=dict(q="B T H K", k="B T H K", '
                            'v="B T H V", x="B T H", y="B T H", aa="B T H K", bq="B T H K"), query="q", key="k", '
                            'value="v", decay=Decay.scalar(log="-softplus(x - y) * sigmoid(y)"), '
                            'transition=Transition.general(a="aa", b="bq"), scale=1.0)\n',
}

# subject: (spec, switches, decay spike inputs, non-finite targets). A spike input is (name, how, floor):
# "log" takes the log-decay itself, "neg" its negation (the log-decay then grows like the spike, through a
# softplus), and a spike below ``floor`` is put in as ``floor`` (Mamba2's dt also scales the value).
SUBJECTS = {
    "retention": ("retention", {}, [], ["v", "k", "q"]),
    "gla": ("gla", {}, [("g", "log", None)], ["v", "k", "q", "g"]),
    "mamba2": ("mamba2", {}, [("A", "log", None), ("dt", "neg", -1e4)], ["x", "B", "C", "dt"]),
    "kda": ("kda", {}, [("g", "log", None)], ["v", "k", "q", "g", "beta"]),
    "kda_gate": ("kda", {"use_gate_in_kernel": True}, [("g", "neg", None)], ["v", "g"]),
    "delta_rule": ("delta_rule", {}, [], ["v", "k", "q", "beta"]),
    "gated_delta_rule": ("gated_delta_rule", {}, [("g", "log", None)], ["v", "k", "q", "g", "beta"]),
    "rwkv7": ("rwkv7", {}, [("w", "log", None)], ["v", "k", "r", "w", "a", "b"]),
    "drawn_constant_delta": ("drawn_constant_delta", {}, [("c", "neg", None)], ["v", "k", "bb"]),
    "drawn_scalar_general": ("drawn_scalar_general", {}, [("x", "neg", None)], ["v", "x", "aa", "bq"]),
}
WITH_DECAY = [s for s, (_, _, spikes, _) in SUBJECTS.items() if spikes]


_TMP = tempfile.TemporaryDirectory(prefix="linattn_spikes_")   # removed when the process exits


@cache
def _drawn_module(name: str):
    """A drawn spec regenerated into a temporary folder: (spec, generated module)."""
    from linattn_dsl.cli import _import_file

    d = Path(_TMP.name) / name
    d.mkdir()
    (d / f"{name}.py").write_text(DRAWN[name])
    spec = registry.load(str(d / f"{name}.py"))
    codegen.regen([spec], d / "gen", builtin=False, index=False)
    return spec, _import_file(d / "gen" / f"{name}.py")


def _spec_and_op(subject: str, mode: str):
    spec_name = SUBJECTS[subject][0]
    if spec_name in DRAWN:
        spec, mod = _drawn_module(spec_name)
        return spec, getattr(mod, f"{mode}_{spec_name}")
    from linattn_dsl import ops

    return registry.load(spec_name), getattr(ops, f"{mode}_{spec_name}")


@st.composite
def layouts(draw):
    """(B, T, seqlens or None, K, V): dense batches or packed sequences, T up to 150."""
    K, V = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
    if draw(st.booleans()):
        seqlens = draw(st.lists(st.integers(1, 80), min_size=1, max_size=3))
        return 1, sum(seqlens), seqlens, K, V
    return draw(st.integers(1, 2)), draw(st.integers(1, 150)), None, K, V


def _positions(draw, start: int, end: int) -> list[int]:
    """1 to 4 token positions in [start, end): chunk edges, the ends, or anywhere."""
    edges = [start, end - 1] + [p for c in range(start + BT, end, BT) for p in (c - 1, c)]
    pick = st.one_of(st.sampled_from(edges), st.integers(start, end - 1))
    return sorted(set(draw(st.lists(pick, min_size=1, max_size=4))))


def _draw_call(draw, subject: str, spec):
    B, T, seqlens, K, V = draw(layouts())
    sw = SUBJECTS[subject][1]
    case = testing.draw_case(spec, B=B, T=T, heads=2, K=K, V=V, seqlens=seqlens, switches=sw,
                             with_initial_state=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    spans = [(b, 0, T) for b in range(B)] if seqlens is None else \
        [(0, s, e) for s, e in zip(case.cu_seqlens.tolist(), case.cu_seqlens.tolist()[1:])]
    return case, spans


def _apply_spike(case, spec, name: str, how: str, floor, value: float, batch: int, rows: list[int], draw):
    x = case.tensors[name].clone()
    value = max(value, floor) if floor is not None else value
    put = value if how == "log" else -value
    if spec.dims(name) == (spec.head_dims["H"],):   # a per-head input: one head forgets at every token
        x[draw(st.integers(0, x.shape[0] - 1))] = put
    elif x.dim() == 4 and draw(st.booleans()):        # one key channel only
        x[batch, rows, :, draw(st.integers(0, x.shape[-1] - 1))] = put
    else:
        x[batch, rows] = put
    case.tensors[name] = x


def check_decay_spikes(subject: str, mode: str, data) -> None:
    spec, op = _spec_and_op(subject, mode)
    case, spans = _draw_call(data.draw, subject, spec)
    for _ in range(data.draw(st.integers(1, 2))):
        name, how, floor = data.draw(st.sampled_from(SUBJECTS[subject][2]))
        batch, start, end = data.draw(st.sampled_from(spans))
        value = data.draw(st.sampled_from(SPIKES))
        _apply_spike(case, spec, name, how, floor, value, batch, _positions(data.draw, start, end), data.draw)
    errs = testing.compare(case, op)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{subject} {mode}: {bad} (note {case.note})"


def _oracle(case):
    t = {n: (x.double() if x is not None else None) for n, x in case.tensors.items()}
    h0 = case.initial_state.double() if case.initial_state is not None else None
    bound = reference.bind(case.spec, t, case.switches, case.scale, h0, True, case.cu_seqlens)
    return reference.run_bound(case.spec, bound, torch.float64)


def _finite_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """testing.rel_err over the entries where ``ref`` is finite."""
    m = torch.isfinite(ref)
    return testing.rel_err(x[m], ref[m]) if m.any() else 0.0


def check_nonfinite(subject: str, mode: str, data) -> None:
    spec, op = _spec_and_op(subject, mode)
    case, spans = _draw_call(data.draw, subject, spec)
    target = data.draw(st.sampled_from(SUBJECTS[subject][3]))
    seq = data.draw(st.integers(0, len(spans) - 1))
    batch, start, end = spans[seq]
    t = data.draw(st.sampled_from(_positions(data.draw, start, end)))
    value = data.draw(st.sampled_from(NONFINITE))
    with torch.no_grad():
        clean_o, clean_s = case.call(op)
        x = case.tensors[target].clone()
        x[batch, t] = value
        case.tensors[target] = x
        o, s = case.call(op)
        ref_o, ref_s = _oracle(case)
    where = f"{subject} {mode}: {target}[{batch}, {t}] = {value} (note {case.note})"
    # this sequence: its outputs before t are the oracle's, and so is whatever else the oracle has finite
    # (a query's NaN spoils one output; a log-decay of -inf, or Mamba2's dt = -inf, spoils none)
    err = testing.rel_err(o[batch, start:t], ref_o[batch, start:t]) if t > start else 0.0
    assert err <= TOL, f"{where}: outputs before t off by {err:.2e}"
    err = _finite_err(o[batch, start:end], ref_o[batch, start:end])
    assert err <= TOL, f"{where}: outputs where the oracle is finite off by {err:.2e}"
    err = _finite_err(s[seq], ref_s[seq])
    assert err <= TOL, f"{where}: final state where the oracle's is finite off by {err:.2e}"
    lost = torch.isfinite(o[batch, start:end]) & ~torch.isfinite(ref_o[batch, start:end])
    assert not lost.any(), f"{where}: {int(lost.sum())} outputs finite where the oracle's are not (a NaN dropped)"
    # every other sequence: untouched, bit for bit
    for other, (b, s0, e0) in enumerate(spans):
        if other != seq:
            assert torch.equal(o[b, s0:e0], clean_o[b, s0:e0]), f"{where}: sequence {other}'s outputs changed"
            assert torch.equal(s[other], clean_s[other]), f"{where}: sequence {other}'s final state changed"


def check_bf16(subject: str, mode: str) -> dict:
    """Relative errors of bf16 inputs (per-head parameters stay fp32) against the oracle."""
    spec, op = _spec_and_op(subject, mode)
    case = testing.draw_case(spec, B=1, T=70, heads=2, K=16, V=16, switches=SUBJECTS[subject][1], seed=3)
    case.tensors = {k: (v.to(torch.bfloat16) if v is not None and v.dim() >= 3 else v) for k, v in case.tensors.items()}
    return testing.compare(case, op)


# examples per subject and property: the interpreter runs a call with its backward in a few seconds
EXAMPLES = {"spikes": 3, "nonfinite": 3}
PROPERTIES = {"spikes": (check_decay_spikes, WITH_DECAY), "nonfinite": (check_nonfinite, list(SUBJECTS))}


def _run(prop: str, subject: str, mode: str) -> None:
    """``prop``'s examples for one subject and backend; each (property, subject) draws from its own seed."""
    check = PROPERTIES[prop][0]

    @settings(max_examples=EXAMPLES[prop], deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate])   # no shrinking: each example is seconds of interpreter
    @seed(zlib.crc32(f"{prop}/{subject}".encode()))
    @given(st.data())
    def run(data):
        check(subject, mode, data)

    run()


def main(mode: str, prop: str) -> int:
    """One property (or ``bf16``) for one interpreted backend; prints one line per subject."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    failures = 0
    if prop == "bf16":
        for subject in ("gla", "mamba2", "gated_delta_rule", "rwkv7"):
            errs = check_bf16(subject, mode)
            bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= verify.TOLERANCE[torch.bfloat16]}
            failures += bool(bad)
            worst = max(errs.values())
            print(f"{mode} bf16 {subject}: worst {worst:.2e}" + (f" FAIL {bad}" if bad else ""), flush=True)
    else:
        for subject in PROPERTIES[prop][1]:
            try:
                _run(prop, subject, mode)
                print(f"{mode} {prop} {subject}: ok", flush=True)
            except AssertionError as e:
                failures += 1
                print(f"{mode} {prop} {subject}: FAIL {str(e).splitlines()[0]}", flush=True)
    print(f"{failures} failing")
    return 1 if failures else 0


HERE = Path(__file__).parent


@pytest.mark.parametrize("mode, prop", [
    ("chunk", "spikes"), ("fused_recurrent", "spikes"), ("chunk", "nonfinite"), ("fused_recurrent", "nonfinite"),
    ("chunk", "bf16"), ("fused_recurrent", "bf16")])
def test_interpreted_triton(mode, prop):
    """The generated Triton kernels under TRITON_INTERPRET=1, in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(HERE / "test_spikes.py"), mode, prop], capture_output=True, text=True,
                       env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "0 failing" in r.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the CPU twin runs without the interpreter")
@pytest.mark.parametrize("subject", WITH_DECAY)
def test_twin_decay_spikes(subject):
    _run("spikes", subject, "chunk")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the CPU twin runs without the interpreter")
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_twin_nonfinite(subject):
    _run("nonfinite", subject, "chunk")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))


CONTAIN_GROUPS = """
import torch, torch.nn.functional as F
from linattn_dsl import ops
torch.manual_seed(0)
B, T, H, K = 2, 300, 2, 16
q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
kk, beta = F.normalize(k, dim=-1), torch.rand(B, T, H)
g = F.logsigmoid(torch.randn(B, T, H, K)) / 4
calls = {"gla": lambda v: ops.chunk_gla(q, k, v, g)[0],
         "delta_rule": lambda v: ops.chunk_delta_rule(q, kk, v, beta)[0],
         "rwkv7": lambda v: ops.chunk_rwkv7(q, -torch.exp(g), k, v, -kk, kk * beta[..., None])[0]}
bad = v.clone()
bad[1, 150, 0, 3] = float("nan")   # chunk 2: the middle of the second group of two chunks
for name, f in calls.items():
    clean, got = f(v), f(bad)
    assert torch.equal(got[:, :128], clean[:, :128]) and torch.equal(got[0], clean[0]), name
    err = float((got[1, 128:150] - clean[1, 128:150]).abs().max() / clean[1, 128:150].abs().max())
    assert err < 1e-5, (name, err)
    print(name, "ok", err)
"""


def test_interpreted_containment_groups():
    """The containment pass with two chunks per program (LINATTN_LAUNCH contain:RB=2; three groups at T=300), a
    NaN in the middle group's flagged chunk, one spec per chunk form: every earlier chunk and the other sequence
    bit for bit, the flagged chunk's rows before the NaN recomputed (fp32, 1e-5)."""
    env = dict(os.environ, TRITON_INTERPRET="1", LINATTN_LAUNCH="contain:RB=2")
    r = subprocess.run([sys.executable, "-c", CONTAIN_GROUPS], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(" ok ") == 3, r.stdout
