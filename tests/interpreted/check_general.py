"""Generated Triton kernels of the general (diagonal-plus-low-rank) form under the Triton interpreter
(run with TRITON_INTERPRET=1).

RWKV7 (vector decay) and one spec per other decay kind (none, constant, scalar; written to a temporary
folder and regenerated), on targeted small cases: T = 1, partial chunks, several chunks, varlen,
grouped q/k heads, initial state, log-decays down to -20, head dims that are not powers of two.
Chunk and fused_recurrent, forward and every gradient against the float64 oracle. Exits non-zero
listing every case whose relative error exceeds 1e-4 (fp32) or 2e-2 (fp16 inputs).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from linattn_dsl import ops, reference  # noqa: E402

from linattn_dsl.compiler import registry  # noqa: E402

from linattn_dsl.reference import drawing as testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _helpers
from _helpers import G_CONST, G_NONE, draw_case_as, check_expanded_dht, record, regen  # noqa: E402

# one spec per decay kind besides RWKV7's vector decay, with the features the host must handle:
# gate expressions, value gates, grouped q/k heads, skip terms, scale, q/k L2 norm
SPECS = {
    "g_none": G_NONE,
    "g_const": G_CONST,
    "g_scalar": 'from linattn_dsl import Arg, Decay, Recurrence, Transition\n'
                'spec = Recurrence(name="g_scalar", inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", x="B T H", '
                'y="B T H", A=Arg("H", sign="nonpositive"), aa="B T H K", bq="B T H K"), query="q", key="k", '
                'value="v * softplus(x)", decay=Decay.scalar(log="A * softplus(x * y)"), '
                'transition=Transition.general(a="aa", b="bq"))\n',
    "g_vector": 'from linattn_dsl import Decay, Recurrence, Transition\n'
                'spec = Recurrence(name="g_vector", inputs=dict(q="B T H K", k="B T H K", v="B T H V", x="B T H K", '
                'y="B T H K", aa="B T H K", bq="B T H K"), query="q", key="k", value="v", '
                'decay=Decay.vector(log="-softplus(x - y) * sigmoid(y)"), scale=1.0, '
                'transition=Transition.general(a="aa", b="bq"), qk_l2norm=True)\n',
}

CASES = [  # (spec, draw_case keywords, dtypes, fused_recurrent gradients too)
    ("rwkv7", dict(B=1, T=1, heads=1, K=16, V=16), ("fp32",), True),
    ("rwkv7", dict(B=2, T=70, heads=2, K=16, V=8), ("fp32", "fp16"), False),
    ("rwkv7", dict(seqlens=[5, 64, 11], heads=1, K=8, V=8, log_decay_min=-20.0), ("fp32",), True),
    ("rwkv7", dict(B=1, T=130, heads=1, K=20, V=8, log_decay_min=-20.0, with_initial_state=False), ("fp32",), False),
    ("rwkv7", dict(B=1, T=40, heads=1, K=80, V=72), ("fp32",), False),
    ("g_none", dict(B=1, T=67, heads=2, K=16, V=8), ("fp32",), False),
    ("g_const", dict(B=1, T=67, heads=4, groups=2, K=16, V=8, log_decay_min=-20.0), ("fp32", "fp16"), True),
    ("g_scalar", dict(seqlens=[30, 1, 50], heads=2, groups=1, K=80, V=8), ("fp32",), True),
    ("g_vector", dict(B=1, T=66, heads=2, K=16, V=16, optional_present=False), ("fp32",), False),
    # (appended last: the cases above keep their seeds) more than 16 chunks in a sequence: the gate
    # backward's running sum over chunk totals takes several 16-chunk steps (gate_chunk_carry), vector and scalar
    ("rwkv7", dict(seqlens=[1100, 3, 1030], heads=1, K=8, V=8), ("fp32",), False),
    ("g_scalar", dict(seqlens=[1090, 5], heads=1, groups=1, K=8, V=8), ("fp32",), False),
    # mild log-decays (down to -0.5 per step: at most 32 nats across a chunk, within DIAG_SPAN): full chunks
    # followed by more rows take the whole-chunk kernels (general_chunk_scores_fwd, general_chunk_intra_bwd),
    # with the gate term that crosses into the next chunk; the cases above (log-decays down to -5 or -20) send
    # every full chunk to the sub-block kernels
    ("rwkv7", dict(B=2, T=200, heads=2, K=16, V=8, log_decay_min=-0.5), ("fp32",), True),
    ("rwkv7", dict(seqlens=[130, 1, 70], heads=1, K=20, V=8, log_decay_min=-0.5), ("fp32",), False),
    ("g_vector", dict(B=1, T=140, heads=2, K=16, V=16, log_decay_min=-0.5), ("fp32",), False),
    # Comba: the shipped scalar-decay general spec, key beta * k and its inputs q, k, p normalised by the switch
    ("comba", dict(B=2, T=70, heads=2, K=16, V=8, switches=dict(use_qk_l2norm_in_kernel=True)), ("fp32",), True),
    ("comba", dict(seqlens=[64, 1, 30], heads=1, K=16, V=16, log_decay_min=-0.5), ("fp32",), False),
]
DTYPES = {"fp32": (torch.float32, 1e-4), "fp16": (torch.float16, 2e-2)}
# launch switches whose other side the defaults do not take in CASES: general_scores_fwd launched (r1; the default
# r0 leaves steeper chunks to general_chunk_scores_fwd), the solve inside the chunk scores kernel (r1); chunk
# mode, on CASES[i] for these i (partial chunks in fp32 and fp16, mild full chunks)
# launch overrides a tuning run may set (LINATTN_LAUNCH): other key blocks and sub-blocks per program than the table's
SWITCHES = [("general_chunk_intra_bwd:BK=16;general_intra_bwd:RB=1,BK=16;general_intra_diag_bwd:RB=2", (1, 6)),
            ("general_solve_fwd:BK=16;general_chunk_scores_fwd:FBK=32", (12, 13))]


def _ops(tmp: Path) -> dict:
    """name -> (spec, chunk op, fused_recurrent op)."""
    out = {n: (registry.load(n), getattr(ops, f"chunk_{n}"), getattr(ops, f"fused_recurrent_{n}"))
           for n in ("rwkv7", "comba")}
    for name, src in SPECS.items():
        spec, mod = regen(tmp, name, src)
        assert mod.FORM == "general", (name, mod.FORM)
        out[name] = (spec, getattr(mod, f"chunk_{name}"), getattr(mod, f"fused_recurrent_{name}"))
    return out


def _draw(spec, kw: dict, dt: str, seed: int):
    return draw_case_as(spec, DTYPES[dt][0], seed, **kw)


def _check(label: str, name: str, spec, case, op, kw: dict, dt: str, grads: bool, failures: list) -> None:
    """Compare ``op`` on ``case`` with the oracle, print the worst error, record a failure."""
    dtype, tol = DTYPES[dt]
    errs = testing.compare(case, op, grads=grads)
    if dtype != torch.float32:
        # per-head parameters sum terms of both signs over every token: half-precision
        # operands do not bound their relative error; they are checked in fp32
        errs = {k: e for k, e in errs.items() if k[1:] not in spec.args or spec.dims(k[1:])[:2] == ("B", "T")}
    record(failures, f"{label:<16} {name:<9} {dt:<5} {kw}", errs, tol, (name, label, kw))


def main() -> int:
    failures, n = [], 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        table = _ops(Path(d))
        for name, kw, dtypes, recurrent_grads in CASES:
            spec, chunk, recurrent = table[name]
            for dt in dtypes:
                case = _draw(spec, kw, dt, seed=n)
                for mode, op in (("chunk", chunk), ("fused_recurrent", recurrent)):
                    n += 1
                    _check(mode, name, spec, case, op, kw, dt, mode == "chunk" or recurrent_grads, failures)
        for launch, picks in SWITCHES:
            os.environ["LINATTN_LAUNCH"] = launch
            for i in picks:
                name, kw, dtypes, _ = CASES[i]
                spec, chunk, _ = table[name]
                for dt in dtypes:
                    n += 1
                    _check(launch, name, spec, _draw(spec, kw, dt, seed=100 + i), chunk, kw, dt, True, failures)
            del os.environ["LINATTN_LAUNCH"]
    # autograd hands the kernels an expanded (stride-0) gradient of the final state for `s.sum()`
    n += 1
    check_expanded_dht(failures, "rwkv7", ops.chunk_rwkv7, B=1, T=20, heads=1, K=16, V=16)
    spec = registry.load("rwkv7")
    # under torch.no_grad the forward skips what only the backward reads (Tm): the output and final state must
    # not change
    case = testing.draw_case(spec, B=1, T=150, heads=2, K=16, V=8, log_decay_min=-0.5, seed=11)
    o_ref, s_ref = case.call(lambda *a, **kw: reference.run(spec, *a, **kw))
    with torch.no_grad():
        o, s_ = case.call(ops.chunk_rwkv7)
    n += 1
    err = max(testing.rel_err(o, o_ref), testing.rel_err(s_, s_ref))
    print(f"chunk_rwkv7 under no_grad: worst {err:.2e}")
    if not err <= 1e-4:
        failures.append(("rwkv7", "chunk", "no_grad", err))
    print(f"{n - len(failures)} of {n} cases passed ({time.time() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
