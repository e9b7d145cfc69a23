"""swiglu_linear against eager PyTorch in float64: output and every gradient, saved tensors, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn_dsl.modules import swiglu_linear


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
    # bf16 tensors: outputs and gradients in bf16 (8 bits of mantissa: 2e-2)
    xs = [t.bfloat16().requires_grad_() for t in (g, u, w)]
    y = swiglu_linear(*xs)
    grads = torch.autograd.grad(y, xs, dy.bfloat16())
    assert y.dtype == torch.bfloat16 and all(d.dtype == torch.bfloat16 for d in grads)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2)
    # fp32 parameters under bf16 autocast: the projection runs in bf16, gradients come back in fp32
    xs = [t.clone().requires_grad_() for t in (g, u, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_linear(*xs)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, xs, dy.bfloat16())
    assert all(d.dtype == torch.float32 for d in grads)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2)


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
