"""RMSNorm, FusedRMSNormGated and l2_norm against fp64 PyTorch references, forward and gradients.

Run plainly these test the CPU PyTorch path; ``test_modules_interpreter.py`` re-runs this file with
``TRITON_INTERPRET=1``, where CPU tensors go through the Triton kernels.
Tolerances: fp32 inputs vs an fp64 reference agree to ~1e-6 relative (one fp32 reduction over at most a
few hundred channels), asserted at 1e-5 / 2e-5 (grads); fp16 outputs at 1e-2 (fp16's epsilon is ~1e-3
and the output is rounded once).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn_dsl.modules import FusedRMSNormGated, L2Norm, RMSNorm, l2_norm
from linattn_dsl.modules._triton_utils import use_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EXAMPLES = 6 if INTERPRET else 25
ATOL, GRAD_ATOL = 1e-5, 2e-5


def ref_norm(x, weight, eps, *, mean=True, residual=None, gate=None, activation="swish", group_size=None,
             norm_before_gate=True):
    x = x.double()
    if residual is not None:
        x = x + residual.double()
    if gate is not None and not norm_before_gate:
        g = gate.double()
        x = x * (torch.sigmoid(g) if activation == "sigmoid" else F.silu(g))
    shape = x.shape
    if group_size is not None:
        x = x.reshape(*shape[:-1], -1, group_size)
    stat = x.square().mean(-1, keepdim=True) if mean else x.square().sum(-1, keepdim=True)
    y = (x / torch.sqrt(stat + eps)).reshape(shape)
    if weight is not None:
        y = y * weight.double()
    if gate is not None and norm_before_gate:
        g = gate.double()
        y = y * (torch.sigmoid(g) if activation == "sigmoid" else F.silu(g))
    return y


def grads(out, inputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return torch.autograd.grad((out.double() * dy).sum(), inputs, allow_unused=True)


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def test_backend_matches_environment():
    assert use_triton(torch.empty(1)) == INTERPRET


@settings(max_examples=EXAMPLES, deadline=None)
@given(rows=st.integers(1, 9), hidden=st.integers(1, 300), affine=st.booleans(), seed=st.integers(0, 99))
def test_rmsnorm_matches_reference(rows, hidden, affine, seed):
    torch.manual_seed(seed)
    norm = RMSNorm(hidden, eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(hidden))
    x = leaf(2, rows, hidden, scale=3.0)
    y = norm(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    params = [x] + ([norm.weight] if affine else [])
    w_ref = norm.weight.detach().double().requires_grad_() if affine else None
    x_ref = x.detach().double().requires_grad_()
    y_ref = ref_norm(x_ref, w_ref, 1e-5)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    got = grads(y, params, seed)
    want = grads(y_ref, [x_ref] + ([w_ref] if affine else []), seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=GRAD_ATOL * max(1, rows), rtol=GRAD_ATOL)


@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.float64])
def test_rmsnorm_fused_residual(prenorm, residual_dtype):
    torch.manual_seed(0)
    hidden = 67
    norm = RMSNorm(hidden)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden) + 0.5)
    x, res = leaf(5, hidden), leaf(5, hidden, dtype=residual_dtype)
    out = norm(x, residual=res, prenorm=prenorm)
    y, new_res = out if prenorm else (out, None)
    x_ref, res_ref, w_ref = (t.detach().double().requires_grad_() for t in (x, res, norm.weight))
    y_ref = ref_norm(x_ref, w_ref, 1e-6, residual=res_ref)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    if prenorm:
        assert new_res.dtype == residual_dtype
        torch.testing.assert_close(new_res.double(), (x_ref + res_ref).detach(), atol=1e-6, rtol=1e-6)
        # gradients flow through both outputs: y and the residual stream
        gen = torch.Generator().manual_seed(1)
        d_res = torch.randn(new_res.shape, generator=gen, dtype=torch.float64)
        loss = (y.double() * 0.5).sum() + (new_res.double() * d_res).sum()
        loss_ref = (y_ref * 0.5).sum() + ((x_ref + res_ref) * d_res).sum()
        got = torch.autograd.grad(loss, [x, res, norm.weight])
        want = torch.autograd.grad(loss_ref, [x_ref, res_ref, w_ref])
    else:
        got, want = grads(y, [x, res, norm.weight]), grads(y_ref, [x_ref, res_ref, w_ref])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=GRAD_ATOL * 5, rtol=GRAD_ATOL)


# rows of groups x group_size channels, normalised per group or over the whole row
GROUPED_ROWS = dict(rows=st.integers(1, 7), groups=st.integers(1, 4), group_size=st.integers(1, 70),
                    grouped=st.booleans())


def test_rmsnorm_prenorm_without_residual_returns_x():
    norm = RMSNorm(8)
    x = torch.randn(3, 8)
    y, res = norm(x, prenorm=True)
    assert res is x
    torch.testing.assert_close(y.double(), ref_norm(x, norm.weight.detach(), 1e-6), atol=ATOL, rtol=ATOL)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    **GROUPED_ROWS,
    activation=st.sampled_from(["swish", "silu", "sigmoid"]),
    seed=st.integers(0, 99),
)
def test_gated_rmsnorm_matches_reference(rows, groups, group_size, grouped, activation, seed):
    torch.manual_seed(seed)
    hidden = groups * group_size
    norm = FusedRMSNormGated(hidden, eps=1e-5, activation=activation, group_size=group_size if grouped else None)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x, g = leaf(rows, hidden, scale=2.0), leaf(rows, hidden, scale=2.0)
    y = norm(x, g)
    x_ref, g_ref, w_ref = (t.detach().double().requires_grad_() for t in (x, g, norm.weight))
    y_ref = ref_norm(
        x_ref, w_ref, 1e-5, gate=g_ref, activation=activation, group_size=group_size if grouped else None
    )
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    got, want = grads(y, [x, g, norm.weight], seed), grads(y_ref, [x_ref, g_ref, w_ref], seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=GRAD_ATOL * max(1, rows), rtol=GRAD_ATOL)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    **GROUPED_ROWS,
    activation=st.sampled_from(["swish", "sigmoid"]),
    affine=st.sampled_from(["own", "passed", "none"]),
    seed=st.integers(0, 99),
)
def test_gate_before_norm_matches_reference(rows, groups, group_size, grouped, activation, affine, seed):
    """norm_before_gate=False: rms_norm(x * act(g)) * weight, the weight the module's, passed in, or none."""
    torch.manual_seed(seed)
    hidden = groups * group_size
    norm = FusedRMSNormGated(hidden, eps=1e-5, activation=activation, group_size=group_size if grouped else None,
                             norm_before_gate=False, elementwise_affine=affine == "own")
    weight = None
    if affine == "own":
        with torch.no_grad():
            norm.weight.copy_(torch.randn(hidden))
        weight = norm.weight
    elif affine == "passed":
        weight = leaf(hidden)
    x, g = leaf(rows, hidden, scale=2.0), leaf(rows, hidden, scale=2.0)
    y = norm(x, g, weight=weight if affine == "passed" else None)
    assert y.dtype == x.dtype and y.shape == x.shape
    inputs = [x, g] + ([weight] if weight is not None else [])
    refs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = ref_norm(refs[0], refs[2] if weight is not None else None, 1e-5, gate=refs[1], activation=activation,
                     group_size=group_size if grouped else None, norm_before_gate=False)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    for a, b in zip(grads(y, inputs, seed), grads(y_ref, refs, seed)):
        torch.testing.assert_close(a.double(), b, atol=GRAD_ATOL * max(1, rows), rtol=GRAD_ATOL)


@pytest.mark.parametrize("rows,hidden,group_size", [(700, 64, 32), (37, 2048, None)])
def test_gate_before_norm_many_rows(rows, hidden, group_size):
    """Row tiles that end mid-tile and backward programs that split the rows, with the gate before the norm."""
    torch.manual_seed(rows)
    x, g, w = leaf(rows, hidden), leaf(rows, hidden), leaf(hidden)
    norm = FusedRMSNormGated(hidden, group_size=group_size, norm_before_gate=False, elementwise_affine=False)
    out = norm(x, g, weight=w)
    want = ref_norm(x, w, norm.eps, gate=g, group_size=group_size, norm_before_gate=False)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    for a, b in zip(grads(out, [x, g, w]), grads(want, [x, g, w])):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5 * rows)


@settings(max_examples=EXAMPLES, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_l2_norm_matches_reference(shape, seed):
    torch.manual_seed(seed)
    x = leaf(*shape, scale=2.0)
    y = l2_norm(x, eps=1e-6)
    x_ref = x.detach().double().requires_grad_()
    y_ref = ref_norm(x_ref, None, 1e-6, mean=False)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(grads(y, [x], seed)[0].double(), grads(y_ref, [x_ref], seed)[0],
                               atol=GRAD_ATOL * 10, rtol=GRAD_ATOL)
    torch.testing.assert_close(L2Norm(1e-6)(x).double(), y_ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_half_precision_outputs(dtype):
    torch.manual_seed(0)
    x, g = torch.randn(4, 96).to(dtype), torch.randn(4, 96).to(dtype)
    norm = FusedRMSNormGated(96, group_size=32)
    y = norm(x, g)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref_norm(x, norm.weight.detach(), 1e-6, gate=g, group_size=32),
                               atol=1e-2, rtol=1e-2)
    y = RMSNorm(96)(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref_norm(x, None, 1e-6), atol=1e-2, rtol=1e-2)


def test_bad_inputs_raise_value_error():
    norm = RMSNorm(8)
    with pytest.raises(ValueError, match="x: expected last dim 8"):
        norm(torch.randn(3, 7))
    with pytest.raises(ValueError, match="x: expected a floating-point tensor, got dtype torch.int64"):
        norm(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"residual: expected the shape of x \(3, 8\), got \(2, 8\)"):
        norm(torch.randn(3, 8), residual=torch.randn(2, 8))
    with pytest.raises(ValueError, match="x: expected a torch.Tensor, got list"):
        l2_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="g: expected the shape of x"):
        FusedRMSNormGated(8)(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="group_size: expected a positive divisor of hidden_size=8, got 3"):
        FusedRMSNormGated(8, group_size=3)
    with pytest.raises(ValueError, match="activation: expected one of"):
        FusedRMSNormGated(8, activation="relu")
    with pytest.raises(ValueError, match="weight: this norm holds its own weight"):
        FusedRMSNormGated(8)(torch.randn(2, 8), torch.randn(2, 8), weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\), got \(4,\)"):
        FusedRMSNormGated(8, elementwise_affine=False)(torch.randn(2, 8), torch.randn(2, 8), weight=torch.ones(4))
    with pytest.raises(ValueError, match="0-d"):
        l2_norm(torch.tensor(1.0))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            norm(torch.randn(3, 8, device="cuda"), residual=torch.randn(3, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_norms_match_fp32_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 2048, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True)
    for module, args in [
        (RMSNorm(2048).cuda(), (x,)),
        (FusedRMSNormGated(2048, group_size=256).cuda(), (x, g)),
    ]:
        with torch.no_grad():
            module.weight.copy_(torch.rand(2048, device="cuda") + 0.5)
        y = module(*args)
        kwargs = {"gate": g, "group_size": 256} if len(args) == 2 else {}
        ref_inputs = [t.detach().float().requires_grad_() for t in (*args, module.weight)]
        y_ref = ref_norm(ref_inputs[0], ref_inputs[-1], module.eps,
                         **({"gate": ref_inputs[1], "group_size": 256} if kwargs else {})).float()
        torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=2e-2)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [*args, module.weight], dy)
        want = torch.autograd.grad(y_ref, ref_inputs, dy.float())
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b, atol=5e-2 * b.abs().max().item() ** 0.5, rtol=5e-2)
    y, new_res = RMSNorm(2048).cuda()(x, residual=res, prenorm=True)
    torch.testing.assert_close(new_res.float(), x.float() + res.float(), atol=2e-2, rtol=1e-2)
    z = l2_norm(x)
    torch.testing.assert_close(z.float(), F.normalize(x.float(), dim=-1, eps=0), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("rows,hidden,group_size", [(1000, 64, None), (513, 96, 32), (37, 2048, None)])
def test_many_rows_row_tiles(rows, hidden, group_size):
    """Enough rows that the kernels' row tiles (4096 // BLOCK rows a program under 1024 channels) end
    mid-tile and the backward's programs split the rows: residual, gate, weight and grouping together."""
    torch.manual_seed(rows)
    x, res, g = leaf(rows, hidden), leaf(rows, hidden), leaf(rows, hidden)
    norm = FusedRMSNormGated(hidden, group_size=group_size) if group_size else RMSNorm(hidden)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    if group_size:
        out, inputs = norm(x, g), [x, g, norm.weight]
        want = ref_norm(x, norm.weight, norm.eps, gate=g, group_size=group_size)
    else:
        out, new_res = norm(x, res, prenorm=True)
        inputs = [x, res, norm.weight]
        want = ref_norm(x, norm.weight, norm.eps, residual=res)
        torch.testing.assert_close(new_res.double(), x.double() + res.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    for a, b in zip(grads(out, inputs), grads(want, inputs)):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5 * rows)


def test_zz_triton_kernels_ran_when_interpreting():
    """Last in the file: under TRITON_INTERPRET=1 the tests above went through the Triton kernels."""
    import sys

    assert ("linattn_dsl.modules._norm_kernels" in sys.modules) == INTERPRET


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,hidden,group_size", [(1, 1, None), (3, 67, None), (5, 96, 32), (2, 5000, None),
                                                    (300, 128, 1)])
def test_gpu_compiled_kernels_match_cpu_path_at_odd_sizes(rows, hidden, group_size):
    torch.manual_seed(0)
    cases = [
        (RMSNorm(hidden), lambda m, x, g, r: m(x, residual=r, prenorm=True)),
        (RMSNorm(hidden, elementwise_affine=False), lambda m, x, g, r: m(x)),
        (FusedRMSNormGated(hidden, group_size=group_size), lambda m, x, g, r: m(x, g)),
        (FusedRMSNormGated(hidden, activation="sigmoid"), lambda m, x, g, r: m(x, g)),
        (FusedRMSNormGated(hidden, group_size=group_size, norm_before_gate=False), lambda m, x, g, r: m(x, g)),
        (L2Norm(), lambda m, x, g, r: m(x)),
    ]
    inputs = [torch.randn(rows, hidden) for _ in range(3)]
    for module, call in cases:
        if getattr(module, "weight", None) is not None:
            with torch.no_grad():
                module.weight.copy_(torch.randn(hidden))
        results = []
        for device in ("cpu", "cuda"):
            m = module.to(device)
            m.zero_grad()
            x, g, r = (t.detach().clone().to(device).requires_grad_() for t in inputs)
            out = call(m, x, g, r)
            out = out if isinstance(out, tuple) else (out,)
            sum(o.double().sin().sum() for o in out).backward()
            grads = [t.grad for t in (x, g, r, *m.parameters())]
            grads = [None if t is None else t.cpu().clone() for t in grads]  # clone: .to() moves .grad in place
            results.append([o.detach().cpu().clone() for o in out] + grads)
        for a, b in zip(*results):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
