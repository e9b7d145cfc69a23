"""swiglu_linear against eager PyTorch in float64: output and every gradient, saved tensors, bad input.

Run plainly this tests the CPU PyTorch path; ``test_modules_interpreter.py`` re-runs it with
``TRITON_INTERPRET=1``, where fp32/bf16/fp16 CPU tensors go through the Triton kernels of the elementwise
parts (float64 stays on the eager path). fp32 against float64: one fp32 rounding per elementwise op and an
fp32 matmul over at most 70 channels, asserted at 1e-5."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn_dsl.modules import swiglu_linear

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _eager(g, u, w, b):
    return F.linear(F.silu(g) * u, w, b)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), inner=st.integers(1, 70), out=st.integers(1, 40),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_eager_float64(lead, inner, out, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(*lead, inner, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    u = torch.randn(*lead, inner, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(out, inner, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(out, generator=gen, dtype=torch.float64).requires_grad_() if with_bias else None
    params = [t for t in (g, u, w, b) if t is not None]
    y = swiglu_linear(g, u, w, b)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, params, dy)
    want_y = _eager(g, u, w, b)
    want = torch.autograd.grad(want_y, params, dy)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_bf16_and_autocast():
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(3, 7, 48, generator=gen) for _ in range(2))
    w = torch.randn(20, 48, generator=gen) / 7
    ref = [t.double().requires_grad_() for t in (g, u, w)]
    want = _eager(*ref, None)
    dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, ref, dy)
    # bf16 tensors: outputs and gradients in bf16 (8 bits of mantissa: 2e-2). Triton's interpreter stores
    # fp32 -> bf16 by truncation, not round-to-nearest, so its error per rounding is one ulp instead of half:
    # tolerances doubled
    tol = 2 if INTERPRET else 1
    xs = [t.bfloat16().requires_grad_() for t in (g, u, w)]
    y = swiglu_linear(*xs)
    grads = torch.autograd.grad(y, xs, dy.bfloat16())
    assert y.dtype == torch.bfloat16 and all(d.dtype == torch.bfloat16 for d in grads)
    torch.testing.assert_close(y.double(), want, rtol=2e-2 * tol, atol=2e-2 * tol)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=3e-2 * tol, atol=3e-2 * tol)
    # fp32 parameters under bf16 autocast: the projection runs in bf16, gradients come back in fp32
    xs = [t.clone().requires_grad_() for t in (g, u, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_linear(*xs)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, xs, dy.bfloat16())
    assert all(d.dtype == torch.float32 for d in grads)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=3e-2 * tol, atol=3e-2 * tol)


@settings(max_examples=6 if INTERPRET else 20, deadline=None)
@given(rows=st.integers(1, 300), inner=st.integers(1, 70), out=st.integers(1, 24),
       needs=st.sampled_from(["all", "weight", "gate", "up", "inputs"]), seed=st.integers(0, 2**16))
def test_fp32_matches_float64(rows, inner, out, needs, seed):
    """fp32 (the Triton kernels under the interpreter), with every subset of gradients asked for; rows x
    inner crosses the kernels' 2048-element blocks."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows, inner, generator=gen) * 3
    u = torch.randn(rows, inner, generator=gen)
    w = torch.randn(out, inner, generator=gen) / 5
    want_on = {"all": (1, 1, 1), "weight": (0, 0, 1), "gate": (1, 0, 0), "up": (0, 1, 0), "inputs": (1, 1, 0)}[needs]
    xs = [t.clone().requires_grad_(bool(f)) for t, f in zip((g, u, w), want_on)]
    ref = [t.double().requires_grad_(bool(f)) for t, f in zip((g, u, w), want_on)]
    y = swiglu_linear(*xs)
    want = _eager(*ref, None)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, [t for t in xs if t.requires_grad], dy.float())
    exp = torch.autograd.grad(want, [t for t in ref if t.requires_grad], dy)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()))


def test_saves_two_activations_not_four():
    """What the backward keeps: gate and up (and the weight), not silu(gate) and the product too."""
    g, u = (torch.randn(64, 96, requires_grad=True) for _ in range(2))
    w = torch.randn(32, 96, requires_grad=True)

    def saved_activation_elems(fn):
        seen = {}

        def pack(t):
            seen[t.data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(g, u, w, None)
        return sum(t.numel() for t in seen.values() if t.shape == g.shape)

    assert saved_activation_elems(swiglu_linear) == 2 * g.numel()
    assert saved_activation_elems(_eager) >= 3 * g.numel()


def test_bad_input():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up: expected the shape of gate"):
        swiglu_linear(g, torch.randn(4, 9), torch.randn(3, 8))
    with pytest.raises(ValueError, match="weight: expected shape"):
        swiglu_linear(g, g, torch.randn(3, 9))
    with pytest.raises(ValueError, match="bias: expected shape"):
        swiglu_linear(g, g, torch.randn(3, 8), torch.randn(4))
    with pytest.raises(ValueError, match="gate"):
        swiglu_linear(torch.ones(4, 8, dtype=torch.int64), g, torch.randn(3, 8))


def test_zz_triton_kernels_ran_when_interpreting():
    """Last in the file: under TRITON_INTERPRET=1 the fp32 tests above went through the Triton kernels."""
    import sys

    assert ("linattn_dsl.modules._swiglu_kernels" in sys.modules) == INTERPRET


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(16384, 2816, 1024), (3, 1, 5), (1000, 777, 33)])
def test_gpu_kernels_match_float64(shape):
    """bf16 at a 340M MLP's shape and at odd sizes through the CUDA kernels, against float64 eager."""
    rows, inner, out = shape
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(rows, inner, generator=gen) * 2, torch.randn(rows, inner, generator=gen)
    w = torch.randn(out, inner, generator=gen) / inner**0.5
    dy = torch.randn(rows, out, generator=gen)
    ref = [t.double().requires_grad_() for t in (g, u, w)]
    want = _eager(*ref, None)
    want_grads = torch.autograd.grad(want, ref, dy.double())
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):  # fp32: TF32 matmuls allowed
        xs = [t.to(dtype).cuda().requires_grad_() for t in (g, u, w)]
        y = swiglu_linear(*xs)
        grads = torch.autograd.grad(y, xs, dy.to(dtype).cuda())
        scale = want.abs().max().item()
        torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol * scale)
        for a, e in zip(grads, want_grads):
            torch.testing.assert_close(a.double().cpu(), e, rtol=tol, atol=tol * e.abs().max().item())
