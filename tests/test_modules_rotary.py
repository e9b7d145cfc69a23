"""rotary_embedding (RoPE) against an fp64 reference built on complex rotations, forward and gradients.

Run plainly this tests the CPU PyTorch path; ``test_modules_interpreter.py`` re-runs it with
``TRITON_INTERPRET=1``, where CPU tensors go through the Triton kernel (backward = the same kernel with
the rotation reversed). Tolerances: fp32 vs fp64 — the angle ``p * inv_freq`` is formed in fp32 by both
paths, so the error is one fp32 rounding of the angle (relative 6e-8 of angles up to ~1e3 rad here:
~1e-4 absolute) plus fp32 products; asserted at 2e-4 absolute. fp16 outputs at 1e-2 (fp16 epsilon ~1e-3).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn_dsl.modules import rotary_embedding

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EXAMPLES = 6 if INTERPRET else 25


def ref_rotary(x, pos, theta):
    """fp64: view channel pairs (i, i + D/2) as complex numbers and multiply by exp(i * angle)."""
    x = x.double()
    dim = x.shape[-1]
    half = dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # fp32, as the op's
    if pos.ndim == 1:
        pos = pos[None].expand(x.shape[0], -1)
    angle = (pos.to(torch.float32)[..., None] * inv_freq).double()[:, :, None, :]  # [B, T, 1, D/2]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


@settings(max_examples=EXAMPLES, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 40), heads=st.integers(1, 4),
       half=st.sampled_from([1, 3, 8, 32, 65]), flat_pos=st.booleans(), offset=st.integers(0, 900),
       theta=st.sampled_from([10000.0, 500000.0, 10.0]), seed=st.integers(0, 2**16))
def test_matches_reference(batch, seq, heads, half, flat_pos, offset, theta, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, heads, 2 * half, generator=gen).requires_grad_()
    if flat_pos:
        pos = torch.arange(offset, offset + seq)
    else:
        pos = torch.randint(0, offset + seq, (batch, seq), generator=gen)
    y = rotary_embedding(x, pos, theta)
    assert y.dtype == x.dtype and y.shape == x.shape
    xr = x.detach().double().requires_grad_()
    want = ref_rotary(xr, pos, theta)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-4)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, x, dy.float())
    (ref,) = torch.autograd.grad(want, xr, dy)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-4)


def test_norm_preserved_and_position_zero_is_identity():
    x = torch.randn(2, 5, 3, 16)
    y = rotary_embedding(x, torch.arange(100, 105))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotary_embedding(x, torch.zeros(2, 5, dtype=torch.long)), x)


def test_half_precision_output():
    x = torch.randn(2, 17, 2, 64)
    pos = torch.arange(17)
    y = rotary_embedding(x.half(), pos)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), ref_rotary(x.half(), pos, 10000.0), rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise_value_error():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="even head dim"):
        rotary_embedding(torch.randn(1, 4, 2, 7), torch.arange(4))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, T, H, D\]"):
        rotary_embedding(torch.randn(4, 8), torch.arange(4))
    with pytest.raises(ValueError, match="position_ids: expected an integer"):
        rotary_embedding(x, torch.arange(4.0))
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        rotary_embedding(x, torch.arange(5))
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        rotary_embedding(x.long(), torch.arange(4))
    with pytest.raises(ValueError, match="theta"):
        rotary_embedding(x, torch.arange(4), theta=0.0)


def test_zz_triton_kernel_ran_when_interpreting():
    """Last in the file: under TRITON_INTERPRET=1 the tests above went through the Triton kernel."""
    import sys

    assert ("linattn_dsl.modules._rotary_kernels" in sys.modules) == INTERPRET


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(8, 2048, 8, 128), (1, 3, 5, 6), (2, 1000, 16, 64)])
def test_gpu_kernel_matches_cpu_path(shape):
    torch.manual_seed(0)
    batch, seq = shape[:2]
    x = torch.randn(*shape)
    pos = torch.randint(0, 4 * seq, (batch, seq))
    dy = torch.randn(*shape)
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 3e-2)):
        xc = x.to(dtype).cuda().requires_grad_()
        y = rotary_embedding(xc, pos.cuda())
        (dx,) = torch.autograd.grad(y, xc, dy.to(dtype).cuda())
        xr = x.to(dtype).double().requires_grad_()
        want = ref_rotary(xr, pos, 10000.0)
        (dref,) = torch.autograd.grad(want, xr, dy.double())
        torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(dx.double().cpu(), dref, rtol=tol, atol=tol)
