"""Bad input to the ops and to the spec language: each case asserts the exception type and that the message
names the argument (ops: the message starts with ``<argument>:``; specs: ``SpecError.field``).

The ops' input policy (linattn_dsl/args.py, runtime.py): shapes, one dtype for the per-token inputs, fp32 or
that dtype for per-head parameters and the initial state, a finite scale > 0, no optional input that the
switches leave unused, packed sequences with B == 1, T = 0 answered before any backend, float64 refused on the
Triton kernels, and sign contracts under ``LINATTN_CHECK_INPUTS=1``. CPU tensors run on the PyTorch twin here;
a handful of cases run again under ``TRITON_INTERPRET=1`` in a fresh process (the flag must be set before the
generated modules import Triton).
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from linattn_dsl import ops, reference

from linattn_dsl.compiler import registry
from linattn_dsl.runtime.args import CHECK_ENV
from linattn_dsl.compiler.spec import Arg, Decay, If, Recurrence, SpecError, Transition

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def gla(B=1, T=8, H=2, K=4, V=4, dtype=F32):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    return [q, k, v, (-torch.rand(B, T, H, K, generator=g)).to(dtype)]


def gdp(n, B=1, T=8, H=2, K=4, V=4):
    """Gated DeltaProduct's inputs with n rows per token for k, v, beta."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, H, K, generator=g), torch.randn(B, T * n, H, K, generator=g),
            torch.randn(B, T * n, H, V, generator=g), -torch.rand(B, T, H, generator=g),
            torch.rand(B, T * n, H, generator=g)]


def kda(B=1, T=8, H=2, K=4, V=4, dtype=F32):
    q, k, v, g = gla(B, T, H, K, V, dtype)
    return [q, k, v, g, torch.rand(B, T, H).to(dtype)]


def mamba2(B=1, T=6, H=4, G=2, N=5, P=3, dtype=F32):
    x, dt = torch.randn(B, T, H, P, dtype=dtype), torch.randn(B, T, H, dtype=dtype)
    return [x, dt, -torch.rand(H), torch.randn(B, T, G, N, dtype=dtype), torch.randn(B, T, G, N, dtype=dtype)]


def rwkv7(B=1, T=8, H=2, K=4):
    r, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    return [r, -torch.rand(B, T, H, K), k, v, -kk, kk * torch.rand(B, T, H, K)]


def with_(args, i, x):
    """``args`` with its i-th positional input replaced."""
    args = list(args)
    args[i] = x(args[i]) if callable(x) else x
    return args


def positive_at(x, idx):
    x = x.clone()
    x[idx] = 5.0
    return x


# (id, call, exception, pattern the message must match: it names the argument first)
OP_CASES = [
    # shapes and ranks
    ("rank", lambda: ops.chunk_gla(*with_(gla(), 0, lambda q: q[0])), ValueError, r"^q: expected 4 dims"),
    ("rank_param", lambda: ops.chunk_mamba2(*with_(mamba2(), 2, torch.zeros(4, 1))), ValueError,
     r"^A: expected 1 dims \[H\]"),
    ("shape_k", lambda: ops.chunk_gla(*with_(gla(), 1, torch.randn(1, 8, 2, 5))), ValueError,
     r"^k: expected shape \[B, T, H, K\] = \[1, 8, 2, 4\], got \[1, 8, 2, 5\]"),
    ("shape_T", lambda: ops.fused_recurrent_gla(*with_(gla(), 3, -torch.rand(1, 7, 2, 4))), ValueError,
     r"^g: expected shape .* \(T is 8"),
    ("shape_param", lambda: ops.chunk_mamba2(*mamba2(), D=torch.ones(3)), ValueError,
     r"^D: expected shape \[H\] = \[4\], got \[3\]"),
    ("groups_divide", lambda: ops.chunk_delta_rule(*gla(H=3)[:2], torch.randn(1, 8, 4, 4), torch.rand(1, 8, 4)),
     ValueError, r"^q: its 3 heads must divide the 4 value heads"),
    ("empty_batch", lambda: ops.chunk_gla(*gla(B=0)), ValueError, r"^q: empty batch"),
    ("head_dim_K", lambda: ops.chunk_retention(*gla(K=320)[:3]), ValueError, r"^q: head dim K = 320 exceeds 256"),
    ("head_dim_V", lambda: ops.fused_recurrent_retention(*gla(V=300)[:3]), ValueError,
     r"^v: head dim V = 300 exceeds 256"),
    ("missing_input", lambda: ops.chunk_gla(*with_(gla(), 3, None)), ValueError, r"^g: required input of gla"),
    ("not_a_tensor", lambda: ops.chunk_gla(*with_(gla(), 3, [1.0])), ValueError, r"^g: expected a torch.Tensor"),
    ("devices", lambda: ops.chunk_gla(*with_(gla(), 1, lambda k: k.to("meta"))), ValueError,
     r"^k: is on meta but q is on cpu"),
    # dtypes
    ("int_value", lambda: ops.chunk_gla(*with_(gla(), 2, lambda v: v.long())), ValueError,
     r"^v: expected a floating-point tensor, got dtype torch.int64"),
    ("bool_gate", lambda: ops.chunk_gla(*with_(gla(), 3, lambda g: g < 0)), ValueError,
     r"^g: expected a floating-point tensor"),
    ("complex_param", lambda: ops.chunk_mamba2(*with_(mamba2(), 2, torch.zeros(4, dtype=torch.complex64))),
     ValueError, r"^A: expected a floating-point tensor"),
    ("mixed_bf16_value", lambda: ops.chunk_gla(*with_(gla(), 2, lambda v: v.bfloat16())), ValueError,
     r"^v: has dtype torch.bfloat16 but q has torch.float32; the per-token inputs of gla must share one dtype, "
     r"got q torch.float32, k torch.float32, v torch.bfloat16, g torch.float32"),
    ("mixed_f64_query", lambda: ops.fused_recurrent_gla(*with_(gla(), 0, lambda q: q.double())), ValueError,
     r"^k: has dtype torch.float32 but q has torch.float64"),
    ("fp32_gate_bf16_rest", lambda: ops.chunk_gla(*gla(dtype=BF16)[:3], -torch.rand(1, 8, 2, 4)), ValueError,
     r"^g: has dtype torch.float32 but q has torch.bfloat16"),
    ("mixed_beta", lambda: ops.chunk_kda(*with_(kda(), 4, lambda b: b.half())), ValueError,
     r"^beta: has dtype torch.float16"),
    ("param_fp16_beside_bf16", lambda: ops.chunk_mamba2(*with_(mamba2(dtype=BF16), 2, lambda a: a.half())),
     ValueError, r"^A: a per-head parameter of mamba2 must be torch.float32 or the per-token inputs' "
                 r"torch.bfloat16 \(the dtype of x\), got torch.float16"),
    ("param_f64_beside_fp32", lambda: ops.chunk_mamba2(*mamba2(), D=torch.ones(4, dtype=F64)), ValueError,
     r"^D: a per-head parameter of mamba2 must be torch.float32 \(the dtype of x\), got torch.float64"),
    ("param_bf16_beside_fp32", lambda: ops.chunk_mamba2(*mamba2(), dt_bias=torch.zeros(4, dtype=BF16)),
     ValueError, r"^dt_bias: a per-head parameter"),
    ("state_f64", lambda: ops.chunk_gla(*gla(), initial_state=torch.zeros(1, 2, 4, 4, dtype=F64)), ValueError,
     r"^initial_state: expected dtype torch.float32 \(the kernels' state type\), got torch.float64"),
    ("state_fp16_beside_bf16", lambda: ops.chunk_gla(*gla(dtype=BF16), initial_state=torch.zeros(1, 2, 4, 4,
                                                                                                   dtype=F16)),
     ValueError, r"^initial_state: expected dtype torch.float32 .* or the per-token inputs' torch.bfloat16"),
    ("state_int", lambda: ops.chunk_gla(*gla(), initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.int32)),
     ValueError, r"^initial_state: expected a floating-point tensor"),
    ("state_shape", lambda: ops.chunk_gla(*gla(), initial_state=torch.zeros(2, 2, 4, 4)), ValueError,
     r"^initial_state: expected shape \[N, H, K, V\] = \[1, 2, 4, 4\], got \[2, 2, 4, 4\]"),
    ("state_not_tensor", lambda: ops.chunk_gla(*gla(), initial_state=[[0.0]]), ValueError,
     r"^initial_state: expected shape .* got list"),
    # scale
    *[(f"scale_{name}", (lambda s: lambda: ops.chunk_gla(*gla(), scale=s))(s), ValueError,
       r"^scale: expected a positive number \(finite\) or None")
      for name, s in [("inf", float("inf")), ("nan", float("nan")), ("zero", 0), ("negative", -0.5),
                      ("bool", True), ("string", "0.5"), ("tensor", torch.tensor(0.5))]],
    # packed sequences
    ("cu_not_increasing", lambda: ops.chunk_gla(*gla(), cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError,
     r"^cu_seqlens: expected strictly increasing offsets from 0 to T = 8, got \[0, 5, 3, 8\]"),
    ("cu_empty_sequence", lambda: ops.chunk_gla(*gla(), cu_seqlens=torch.tensor([0, 5, 5, 8])), ValueError,
     r"^cu_seqlens: expected strictly increasing"),
    ("cu_short_of_T", lambda: ops.fused_recurrent_gla(*gla(), cu_seqlens=torch.tensor([0, 5])), ValueError,
     r"^cu_seqlens: expected strictly increasing offsets from 0 to T = 8"),
    ("cu_batch", lambda: ops.chunk_gla(*gla(B=2), cu_seqlens=torch.tensor([0, 8])), ValueError,
     r"^cu_seqlens: packed sequences need batch size B == 1, got B = 2"),
    ("cu_float", lambda: ops.chunk_gla(*gla(), cu_seqlens=torch.tensor([0.0, 8.0])), ValueError,
     r"^cu_seqlens: expected an integer"),
    ("cu_list", lambda: ops.chunk_gla(*gla(), cu_seqlens=[0, 8]), ValueError, r"^cu_seqlens: expected an integer"),
    ("cu_rank", lambda: ops.chunk_gla(*gla(), cu_seqlens=torch.tensor([[0, 8]])), ValueError,
     r"^cu_seqlens: expected shape \[N\+1\]"),
    ("cu_one_offset", lambda: ops.chunk_gla(*gla(), cu_seqlens=torch.tensor([0])), ValueError,
     r"^cu_seqlens: expected shape \[N\+1\] with N >= 1"),
    ("cu_T0", lambda: ops.chunk_gla(*gla(T=0), cu_seqlens=torch.tensor([0, 0])), ValueError,
     r"^cu_seqlens: T = 0 leaves nothing to pack"),
    # keywords and switches
    ("unknown_keyword", lambda: ops.chunk_gla(*gla(), chunk_size=64), TypeError,
     r"unexpected keyword argument 'chunk_size'"),
    ("switch_not_bool", lambda: ops.chunk_mamba2(*mamba2(), dt_softplus=1), ValueError,
     r"^dt_softplus: expected True or False, got 1"),
    ("output_final_state", lambda: ops.chunk_gla(*gla(), output_final_state="yes"), ValueError,
     r"^output_final_state: expected True or False"),
    # arguments a switch makes meaningless (derived from the spec: an optional input no role reads)
    ("A_log_without_gate", lambda: ops.chunk_kda(*kda(), A_log=torch.zeros(2)), ValueError,
     r"^A_log: passed, but kda does not use it with use_gate_in_kernel=False; pass A_log=None, or "
     r"use_gate_in_kernel=True to use it"),
    ("dt_bias_without_gate", lambda: ops.fused_recurrent_kda(*kda(), dt_bias=torch.zeros(2, 4),
                                                             use_qk_l2norm_in_kernel=True), ValueError,
     r"^dt_bias: passed, but kda does not use it with use_gate_in_kernel=False"),
    # the rewritten calls: sub-steps, the normalised output's wider state, read before the update
    ("num_householder_zero", lambda: ops.chunk_gated_delta_product(*gdp(2), 0), ValueError,
     r"^num_householder: expected a positive int, got 0"),
    ("num_householder_rows", lambda: ops.fused_recurrent_gated_delta_product(*gdp(2), 3), ValueError,
     r"^k: expected num_householder = 3 rows per token, 8 \* 3 = 24 along dim 1 \(as q has 8\), got 16"),
    ("linear_attn_state", lambda: ops.chunk_linear_attn(*gla()[:3], initial_state=torch.zeros(1, 2, 4, 4)),
     ValueError, r"^initial_state: expected shape \[N, H, K, V \+ 1\] = \[1, 2, 4, 5\], got \[1, 2, 4, 4\]"),
    ("rwkv6_bonus_shape", lambda: ops.chunk_rwkv6(*gla()[:3], gla()[3], torch.zeros(2, 5)), ValueError,
     r"^u: expected shape \[H, K\] = \[2, 4\], got \[2, 5\]"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_bad_op_input(call, exc, pattern, monkeypatch):
    monkeypatch.delenv(CHECK_ENV, raising=False)
    with pytest.raises(exc, match=pattern):
        call()


# ---- sign contracts (LINATTN_CHECK_INPUTS=1) ------------------------------------------------------------------

SIGN_CASES = [
    ("gla_g", lambda: ops.chunk_gla(*with_(gla(), 3, lambda g: positive_at(g, (0, 3, 1, 2)))),
     r"^g: must be <= 0 \(gla declares it nonpositive and relies on it\), got 5.0 at index \(0, 3, 1, 2\)"),
    ("gated_delta_g", lambda: ops.fused_recurrent_gated_delta_rule(
        *kda()[:3], positive_at(-torch.rand(1, 8, 2), (0, 0, 0)), torch.rand(1, 8, 2)), r"^g: must be <= 0"),
    ("mamba2_A", lambda: ops.chunk_mamba2(*with_(mamba2(), 2, lambda a: a.abs() + 0.1)), r"^A: must be <= 0"),
    ("rwkv7_w", lambda: ops.chunk_rwkv7(*with_(rwkv7(), 1, lambda w: positive_at(w, (0, 7, 1, 3)))),
     r"^w: must be <= 0 .* at index \(0, 7, 1, 3\)"),
    ("kda_g_without_gate", lambda: ops.chunk_kda(*with_(kda(), 3, lambda g: g.abs())), r"^g: must be <= 0"),
]


@pytest.mark.parametrize("call,pattern", [c[1:] for c in SIGN_CASES], ids=[c[0] for c in SIGN_CASES])
def test_sign_contract_violated(call, pattern, monkeypatch):
    monkeypatch.setenv(CHECK_ENV, "1")
    with pytest.raises(ValueError, match=pattern):
        call()
    monkeypatch.delenv(CHECK_ENV)   # off by default: the same call runs (its output is the caller's to judge)
    call()


def test_sign_contract_only_where_the_spec_relies_on_it(monkeypatch):
    monkeypatch.setenv(CHECK_ENV, "1")
    # KDA's g is a raw gate inside -exp(A_log) * softplus(g + dt_bias): any sign goes
    q, k, v, g, beta = kda()
    ops.chunk_kda(q, k, v, g.abs() + 1, beta, A_log=torch.zeros(2), use_gate_in_kernel=True)
    # -inf (a reset) and NaN are not sign violations (what the outputs make of them is the numerics' tests' part)
    g = g.clone()
    g[0, 2] = -float("inf")
    g[0, 5, 1, 1] = float("nan")
    ops.chunk_gla(q, k, v, g)
    ops.fused_recurrent_gla(q, k, v, g)
    # Mamba2's log-decay A * softplus(dt + dt_bias) relies on A only: dt of any sign is fine
    x, dt, A, Bm, C = mamba2()
    ops.fused_recurrent_mamba2(x, dt.abs() + 3, A, Bm, C, dt_softplus=False)


# ---- T = 0: empty outputs, the initial state as the final state, empty gradients ---------------------------

T0_CALLS = {
    "gla": lambda t: gla(B=2, T=0, dtype=t),
    "kda": lambda t: kda(B=2, T=0, dtype=t),
    "mamba2": lambda t: mamba2(B=2, T=0, dtype=t),
    "rwkv7": lambda t: [x.to(t) for x in rwkv7(B=2, T=0)],
    "retention": lambda t: gla(B=2, T=0, dtype=t)[:3],
    "rwkv6": lambda t: gla(B=2, T=0, dtype=t) + [torch.zeros(2, 4, dtype=t)],
}


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("name", sorted(T0_CALLS))
def test_no_tokens(name, mode):
    op = getattr(ops, f"{mode}_{name}")
    args = [x.requires_grad_() for x in T0_CALLS[name](F32)]
    o, s = op(*args, output_final_state=True)
    H, V = (4, 3) if name == "mamba2" else (2, 4)
    K = 5 if name == "mamba2" else 4
    assert o.shape == (2, 0, H, V) and o.dtype == F32
    assert s.shape == (2, H, K, V) and s.dtype == F32 and not s.any()
    h0 = torch.randn(2, H, K, V, requires_grad=True)
    o, s = op(*args, initial_state=h0, output_final_state=True)
    assert torch.equal(s, h0) and s is not h0
    (o.sum() + (2 * s).sum()).backward()
    assert torch.equal(h0.grad, torch.full_like(h0, 2.0))
    assert all(x.grad is not None and x.grad.shape == x.shape and not x.grad.any() for x in args)
    o, s = op(*T0_CALLS[name](BF16), initial_state=h0.detach())
    assert o.dtype == BF16 and o.shape == (2, 0, H, V) and s is None
    o_ref, s_ref = reference.run(registry.load(name), *T0_CALLS[name](F32), initial_state=h0.detach(),
                                 output_final_state=True)   # the oracle answers T = 0 the same way
    assert o_ref.shape == (2, 0, H, V) and torch.equal(s_ref, h0.detach())


# ---- the spec language ----------------------------------------------------------------------------------------

BASE = dict(name="s", inputs=dict(q="B T H K", k="B T H K", v="B T H V", a="B T H"), query="q", key="k", value="v")

SPEC_CASES = [
    ("abs", "decay.log", dict(decay=Decay.scalar(log="-abs(a)")), r"unknown function 'abs' in '-abs\(a\)'"),
    ("erf", "decay.log", dict(decay=Decay.scalar(log="-softplus(erf(a))")), r"unknown function 'erf'"),
    ("sin", "transition.beta", dict(transition=Transition.delta(beta="sin(a)")), r"unknown function 'sin'"),
    ("sympy_Abs", "decay.log", dict(decay=Decay.scalar(log="-Abs(a)")), r"unknown function 'Abs'"),
    ("max", "let.d", dict(let=dict(d="max(a, 0)")), r"unknown function 'max'"),
    ("in_if", "decay.log", dict(switches=dict(s=True), decay=Decay.scalar(log=If("s", "-cosh(a)", "-exp(a)"))),
     r"unknown function 'cosh'"),
    ("two_args", "decay.log", dict(decay=Decay.scalar(log="-softplus(a, a)")), r"softplus takes exactly 1 argument"),
    ("no_args", "transition.beta", dict(transition=Transition.delta(beta="sigmoid()")),
     r"sigmoid takes exactly 1 argument"),
    ("unknown_symbol", "decay.log", dict(decay=Decay.scalar(log="-softplus(zz)")), r"unknown symbol 'zz'"),
    ("sign_unproved", "decay.log", dict(decay=Decay.scalar(log="a")), r"cannot show that log-decay a is <= 0"),
    ("sign_bad", "inputs.a", dict(inputs=dict(BASE["inputs"], a=Arg("B T H", sign="negativeish"))),
     r"sign 'negativeish' is not one of"),
    ("scale_inf", "scale", dict(scale=float("inf")), r"positive number"),
]


@pytest.mark.parametrize("field,kw,pattern", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_bad_spec(field, kw, pattern):
    with pytest.raises(SpecError, match=pattern) as e:
        Recurrence(**{**BASE, **kw})
    assert e.value.field == field
    if "unknown function" in pattern:
        assert "the functions allowed are exp, log, logsigmoid, relu, sigmoid, softplus, sqrt, tanh" in str(e.value)


# ---- under the Triton interpreter (fresh process: TRITON_INTERPRET=1 before Triton is imported) ---------------

INTERPRETED = textwrap.dedent("""
    import json, os, torch
    from linattn_dsl import ops
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    g, beta = -torch.rand(1, 8, 2, 4), torch.rand(1, 8, 2)
    d = lambda *xs: [x.double() for x in xs]
    cases = {
        "float64": lambda: ops.chunk_gla(*d(q, k, v, g)),
        "float64_recurrent": lambda: ops.fused_recurrent_gated_delta_rule(*d(q, k, v, g[..., 0], beta)),
        "mixed_dtypes": lambda: ops.chunk_gla(q, k, v.half(), g),
        "scale_inf": lambda: ops.chunk_gla(q, k, v, g, scale=float("inf")),
        "A_log_without_gate": lambda: ops.chunk_kda(q, k, v, g, beta, A_log=torch.zeros(2)),
        "cu_not_increasing": lambda: ops.chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 6, 4, 8])),
        "sign": lambda: (os.environ.__setitem__("LINATTN_CHECK_INPUTS", "1"), ops.chunk_gla(q, k, v, -g))[1],
        # bf16 / fp16 are not refused under the interpreter (the kernels upcast): only float64 is
        "bf16": lambda: ops.fused_recurrent_gla(*(x.bfloat16() for x in (q, k, v, g))),
    }
    out = {}
    for name, call in cases.items():
        try:
            call()
            out[name] = ["ok", ""]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
    os.environ.pop("LINATTN_CHECK_INPUTS")
    h0 = torch.randn(1, 2, 4, 4)
    o, s = ops.chunk_gla(*(x[:, :0] for x in (q, k, v, g)), initial_state=h0, output_final_state=True)
    out["no_tokens"] = ["ok" if o.shape == (1, 0, 2, 4) and torch.equal(s, h0) else "wrong", ""]
    print("RESULT" + json.dumps(out))
""")

INTERPRETED_EXPECT = {
    "float64": r"^v: float64 inputs under TRITON_INTERPRET=1 .* unset TRITON_INTERPRET to use the float64 CPU path",
    "float64_recurrent": r"^v: float64 inputs under TRITON_INTERPRET=1",
    "mixed_dtypes": r"^v: has dtype torch.float16 but q has torch.float32",
    "scale_inf": r"^scale: expected a positive number \(finite\)",
    "A_log_without_gate": r"^A_log: passed, but kda does not use it",
    "cu_not_increasing": r"^cu_seqlens: expected strictly increasing",
    "sign": r"^g: must be <= 0",
}


@pytest.fixture(scope="module")
def interpreted():
    env = {k: v for k, v in os.environ.items() if k != CHECK_ENV} | {"TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("name", sorted(INTERPRETED_EXPECT))
def test_bad_input_under_the_interpreter(interpreted, name):
    kind, msg = interpreted[name]
    assert kind == "ValueError", (kind, msg)
    assert re.search(INTERPRETED_EXPECT[name], msg), msg


@pytest.mark.parametrize("name", ["no_tokens", "bf16"])
def test_accepted_under_the_interpreter(interpreted, name):
    assert interpreted[name][0] == "ok", interpreted[name]
