"""ShortConvolution against F.conv1d, packed sequences, caches and one-token decoding.

Plain runs test the CPU PyTorch path; ``test_modules_interpreter.py`` re-runs this file under
``TRITON_INTERPRET=1`` (the Triton kernels). Tolerances: fp32 vs an fp64 reference, a sum of at most
``W`` products per output: 1e-5; weight gradients sum over all tokens: 1e-5 * tokens.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn_dsl.modules import ShortConvolution

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EXAMPLES = 5 if INTERPRET else 20
ATOL = 1e-5


def make_conv(dim, width, bias, activation, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    conv = ShortConvolution(dim, width, bias=bias, activation=activation).to(dtype)
    return conv


def ref_conv(x, weight, bias, activation, cache=None):
    """x [B, T, D]; weight [D, 1, W]; cache [B, D, W] (last W inputs, oldest first) -> [B, T, D]."""
    width = weight.shape[-1]
    xt = x.double().transpose(1, 2)
    left = xt.new_zeros(x.shape[0], x.shape[2], width - 1) if cache is None else cache.double()[..., 1:]
    y = F.conv1d(torch.cat([left, xt], -1), weight.double(), None if bias is None else bias.double(),
                 groups=x.shape[2])
    y = y.transpose(1, 2)
    return F.silu(y) if activation else y


def ref_final_state(x, width, cache=None):
    xt = x.double().transpose(1, 2)
    left = xt.new_zeros(x.shape[0], x.shape[2], width) if cache is None else cache.double()
    return torch.cat([left, xt], -1)[..., -width:]


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    batch=st.integers(1, 3),
    seqlen=st.integers(1, 40),
    dim=st.integers(1, 70),
    width=st.integers(1, 5),
    bias=st.booleans(),
    activation=st.sampled_from(["silu", None]),
    with_cache=st.booleans(),
    seed=st.integers(0, 99),
)
def test_forward_and_grads_match_conv1d(batch, seqlen, dim, width, bias, activation, with_cache, seed):
    conv = make_conv(dim, width, bias, activation, seed)
    x = torch.randn(batch, seqlen, dim, requires_grad=True)
    cache = torch.randn(batch, dim, width, requires_grad=True) if with_cache else None
    y, state = conv(x, cache=cache, output_final_state=True)
    params = [x, conv.weight] + ([conv.bias] if bias else []) + ([cache] if with_cache else [])
    refs = [p.detach().double().requires_grad_() for p in params]
    x_r, w_r = refs[0], refs[1]
    b_r = refs[2] if bias else None
    c_r = refs[-1] if with_cache else None
    y_ref = ref_conv(x_r, w_r, b_r, activation, c_r)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.double(), ref_final_state(x_r, width, c_r).detach(), atol=0, rtol=0)
    dy = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad((y.double() * dy).sum(), params)
    want = torch.autograd.grad((y_ref * dy).sum(), refs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=ATOL * batch * seqlen, rtol=1e-5)


def test_final_state_gradient_flows_to_inputs():
    conv = make_conv(6, 4, False, "silu")
    x = torch.randn(2, 3, 6, requires_grad=True)
    cache = torch.randn(2, 6, 4, requires_grad=True)
    _, state = conv(x, cache=cache, output_final_state=True)
    state.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(cache.grad[..., 3:], torch.ones(2, 6, 1))  # the 3 newest inputs are x
    assert torch.equal(cache.grad[..., :3], torch.zeros(2, 6, 3))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 13), min_size=1, max_size=5),
    width=st.integers(1, 5),
    with_cache=st.booleans(),
    seed=st.integers(0, 99),
)
def test_cu_seqlens_equals_separate_runs(lengths, width, with_cache, seed):
    dim = 19
    conv = make_conv(dim, width, True, "silu", seed)
    xs = [torch.randn(1, n, dim) for n in lengths]
    caches = [torch.randn(1, dim, width) for _ in lengths] if with_cache else [None] * len(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed = torch.cat(xs, 1).requires_grad_()
    cache = torch.cat(caches).requires_grad_() if with_cache else None
    y, state = conv(packed, cache=cache, output_final_state=True, cu_seqlens=cu)
    dy = torch.randn(y.shape)
    (y * dy).sum().backward()
    for i, (x_i, c_i) in enumerate(zip(xs, caches)):
        x_i = x_i.clone().requires_grad_()
        y_i, s_i = conv(x_i, cache=c_i, output_final_state=True)
        sl = slice(cu[i].item(), cu[i + 1].item())
        torch.testing.assert_close(y[:, sl], y_i, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(state[i:i + 1], s_i, atol=0, rtol=0)
        if lengths[i]:
            (g,) = torch.autograd.grad((y_i * dy[:, sl]).sum(), [x_i])
            torch.testing.assert_close(packed.grad[:, sl], g, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("bias", [False, True])
def test_step_by_step_decoding_equals_forward(bias):
    conv = make_conv(11, 4, bias, "silu")
    x = torch.randn(2, 9, 11)
    y_full, state_full = conv(x, output_final_state=True)
    cache = torch.zeros(2, 11, 4)
    for t in range(9):
        y_t, cache = conv.step(x[:, t] if t % 2 else x[:, t:t + 1], cache)
        assert y_t.shape == ((2, 11) if t % 2 else (2, 1, 11))
        torch.testing.assert_close(y_t.reshape(2, 11), y_full[:, t], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(cache, state_full, atol=0, rtol=0)


def test_prefill_then_decode_then_continue_equals_one_long_run():
    conv = make_conv(8, 4, True, None)
    x = torch.randn(3, 20, 8)
    y_full, state_full = conv(x, output_final_state=True)
    y1, state = conv(x[:, :7], output_final_state=True)
    y2, state = conv.step(x[:, 7:8], state)
    y3, state = conv(x[:, 8:10], cache=state, output_final_state=True)  # shorter than W - 1... and W
    y4, state = conv(x[:, 10:], cache=state, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2, y3, y4], 1), y_full, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state, state_full, atol=0, rtol=0)


def test_mask_zeroes_inputs():
    conv = make_conv(5, 3, False, "silu")
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    y, _ = conv(x, mask=mask)
    torch.testing.assert_close(y, conv(x * mask[..., None])[0], atol=0, rtol=0)


def test_half_precision():
    conv = make_conv(16, 4, True, "silu", dtype=torch.float16)
    x = torch.randn(2, 10, 16).half()
    y, _ = conv(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), ref_conv(x, conv.weight, conv.bias, "silu"), atol=1e-2, rtol=1e-2)


def test_bad_inputs_raise_value_error():
    conv = make_conv(8, 4, False, "silu")
    with pytest.raises(ValueError, match=r"x: expected shape \[B, T, D\], got 2-d tensor"):
        conv(torch.randn(3, 8))
    with pytest.raises(ValueError, match="x: expected last dim 8"):
        conv(torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        conv(torch.ones(1, 3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache: expected shape \[N, D, W\] = \[2, 8, 4\], got \[2, 8, 3\]"):
        conv(torch.randn(2, 3, 8), cache=torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="x: expected batch size 1 with cu_seqlens"):
        conv(torch.randn(2, 3, 8), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens: expected an integer tensor"):
        conv(torch.randn(1, 3, 8), cu_seqlens=torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to T=3"):
        conv(torch.randn(1, 3, 8), cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"mask: expected shape \[B, T\]"):
        conv(torch.randn(1, 3, 8), mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"x: expected one token \[B, 1, D\]"):
        conv.step(torch.randn(2, 3, 8), torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match="activation: expected one of"):
        ShortConvolution(8, activation="relu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            conv.cuda()(torch.randn(1, 3, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_conv_matches_fp32_torch():
    torch.manual_seed(0)
    conv = ShortConvolution(2048, 4, bias=True).cuda().bfloat16()
    x = torch.randn(4, 1024, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cache = torch.randn(4, 2048, 4, device="cuda", dtype=torch.bfloat16)
    y, state = conv(x, cache=cache, output_final_state=True)
    refs = [t.detach().float().requires_grad_() for t in (x, conv.weight, conv.bias)]
    y_ref = ref_conv(refs[0], refs[1], refs[2], "silu", cache.float()).float()
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)
    assert torch.equal(state, torch.cat([cache, x.detach().transpose(1, 2)], -1)[..., -4:])
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, conv.weight, conv.bias], dy)
    want = torch.autograd.grad(y_ref, refs, dy.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, atol=2e-2 * b.abs().max().item(), rtol=2e-2)
    # packed sequences on the GPU
    cu = torch.tensor([0, 100, 1000, 1024, 4096], device="cuda", dtype=torch.int32)
    xp = x.detach().reshape(1, 4096, 2048)
    yp, _ = conv(xp, cu_seqlens=cu)
    for i in range(4):
        a, b = cu[i].item(), cu[i + 1].item()
        torch.testing.assert_close(yp[:, a:b], conv(xp[:, a:b])[0], atol=1e-2, rtol=1e-2)


def test_zz_triton_kernels_ran_when_interpreting():
    """Last in the file: under TRITON_INTERPRET=1 the tests above went through the Triton kernels (and on
    a machine without CUDA, without the flag, they did not)."""
    import sys

    loaded = "linattn_dsl.modules._conv_kernels" in sys.modules
    if INTERPRET:
        assert loaded
    elif not torch.cuda.is_available():
        assert not loaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dim", [1, 67, 300])
def test_gpu_compiled_kernels_match_cpu_path_at_odd_sizes(width, dim):
    conv = make_conv(dim, width, True, "silu", seed=width)
    lengths = [0, 1, 70, 3, 200]
    cu = torch.tensor([0] + lengths).cumsum(0)
    x0 = torch.randn(1, sum(lengths), dim)
    cache0 = torch.randn(len(lengths), dim, width)
    dy = torch.randn(1, sum(lengths), dim)
    results = []
    for device in ("cpu", "cuda"):
        m = conv.to(device)
        m.zero_grad()
        x, cache = x0.clone().to(device).requires_grad_(), cache0.clone().to(device).requires_grad_()
        y, state = m(x, cache=cache, output_final_state=True, cu_seqlens=cu.to(device))
        (y * dy.to(device)).sum().backward()
        results.append([t.detach().cpu().clone() for t in (y, state, x.grad, cache.grad, m.weight.grad, m.bias.grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
