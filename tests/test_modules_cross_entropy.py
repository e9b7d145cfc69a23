"""FusedCrossEntropyLoss and FusedLinearCrossEntropyLoss against fp64 F.cross_entropy references.

Plain runs test the CPU PyTorch path; ``test_modules_interpreter.py`` re-runs this file under
``TRITON_INTERPRET=1`` (the Triton cross-entropy kernel). Tolerances: fp32 logits vs an fp64 reference,
one logsumexp over at most a few hundred classes: 1e-5 relative on losses and gradients; the linear
variant adds an fp32 matmul over D <= 40 (2e-5), and d_weight sums over all tokens.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn_dsl.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EXAMPLES = 6 if INTERPRET else 30
IGNORE = -100


def ref_ce(logits, labels, *, ignore_index=IGNORE, label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
           reduction="mean"):
    z = logits.double() * logit_scale
    per_row = F.cross_entropy(z, labels.long(), ignore_index=ignore_index, label_smoothing=label_smoothing,
                              reduction="none")
    valid = labels != ignore_index
    per_row = per_row + lse_square_scale * torch.logsumexp(z, -1).square() * valid
    if reduction == "none":
        return per_row
    return per_row.sum() / valid.sum() if reduction == "mean" else per_row.sum()


def make_labels(n, vocab, ignore_frac, gen):
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < ignore_frac, IGNORE, labels)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    n=st.integers(1, 10),
    vocab=st.integers(1, 300),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    logit_scale=st.sampled_from([1.0, 0.5]),
    lse_square_scale=st.sampled_from([0.0, 1e-3]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 99),
)
def test_cross_entropy_matches_reference(n, vocab, ignore_frac, label_smoothing, logit_scale, lse_square_scale,
                                         reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 4).float().requires_grad_()
    labels = make_labels(n, vocab, ignore_frac, gen)
    labels[0] = 0  # at least one valid row, so "mean" is finite
    opts = {"label_smoothing": label_smoothing, "logit_scale": logit_scale,
            "lse_square_scale": lse_square_scale, "reduction": reduction}
    loss = FusedCrossEntropyLoss(**opts)(logits, labels)
    logits_ref = logits.detach().double().requires_grad_()
    loss_ref = ref_ce(logits_ref, labels, **opts)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    dloss = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(loss, logits, dloss.float())
    (grad_ref,) = torch.autograd.grad(loss_ref, logits_ref, dloss)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-6, rtol=1e-5)


def test_ignored_rows_have_zero_loss_and_grad_and_mean_skips_them():
    logits = torch.randn(4, 33, requires_grad=True)
    labels = torch.tensor([3, IGNORE, 32, IGNORE])
    per_row = FusedCrossEntropyLoss(reduction="none", label_smoothing=0.2)(logits, labels)
    assert per_row[1] == 0 and per_row[3] == 0
    loss = FusedCrossEntropyLoss(label_smoothing=0.2)(logits, labels)
    torch.testing.assert_close(loss, per_row[[0, 2]].mean())
    loss.backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 33))
    all_ignored = FusedCrossEntropyLoss()(torch.randn(2, 5), torch.full((2,), IGNORE))
    assert torch.isnan(all_ignored)  # 0 / 0, like F.cross_entropy


def test_leading_dims_and_custom_ignore_index():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 17, generator=gen, requires_grad=True)
    labels = torch.randint(0, 17, (2, 3), generator=gen)
    labels[0, 1] = 5
    loss = FusedCrossEntropyLoss(ignore_index=5, reduction="none")(logits, labels)
    assert loss.shape == (2, 3)
    ref = ref_ce(logits.reshape(-1, 17), labels.reshape(-1), ignore_index=5, reduction="none")
    torch.testing.assert_close(loss.double().reshape(-1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gradient_in_logits_dtype_and_inplace(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 130, generator=gen).to(dtype)
    labels = torch.randint(0, 130, (6,), generator=gen)
    logits_ref = base.double().requires_grad_()
    ref = ref_ce(logits_ref, labels, label_smoothing=0.1)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 gradient rounding: 2^-11 relative
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf, as lm-head logits are
        loss = FusedCrossEntropyLoss(label_smoothing=0.1, inplace_backward=inplace)(logits, labels)
        torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-3 if dtype == torch.float16 else 1e-5,
                                   rtol=1e-3)
        if inplace:  # forward wrote d(loss)/d(logits) over the logits
            assert not torch.equal(logits.detach(), base)
        loss.backward()
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.double(), logits_ref.grad, atol=tol, rtol=tol)


def test_no_grad_forward_writes_nothing():
    logits = torch.randn(3, 10)
    copy = logits.clone()
    loss = FusedCrossEntropyLoss(inplace_backward=True)(logits, torch.tensor([1, 2, 3]))
    assert torch.equal(logits, copy) and loss.ndim == 0


# ---------------------------------------------------------------------------------- linear + CE


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    n=st.integers(1, 12),
    dim=st.integers(1, 40),
    vocab=st.integers(1, 150),
    chunk=st.sampled_from([None, 1, 3, "num_chunks=2"]),
    with_bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    logit_scale=st.sampled_from([1.0, 0.7]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 99),
)
def test_linear_cross_entropy_matches_reference(n, dim, vocab, chunk, with_bias, ignore_frac, label_smoothing,
                                                logit_scale, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).requires_grad_()
    bias = torch.randn(vocab, generator=gen).requires_grad_() if with_bias else None
    labels = make_labels(n, vocab, ignore_frac, gen)
    labels[-1] = vocab - 1
    chunk_opts = {"num_chunks": 2} if chunk == "num_chunks=2" else {"chunk_size": chunk}
    loss_fn = FusedLinearCrossEntropyLoss(label_smoothing=label_smoothing, logit_scale=logit_scale,
                                          reduction=reduction, **chunk_opts)
    loss = loss_fn(hidden, labels, weight, bias)
    params = [hidden, weight] + ([bias] if with_bias else [])
    refs = [p.detach().double().requires_grad_() for p in params]
    logits_ref = F.linear(refs[0], refs[1], refs[2] if with_bias else None)
    loss_ref = ref_ce(logits_ref, labels, label_smoothing=label_smoothing, logit_scale=logit_scale,
                      reduction=reduction)
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-5, rtol=2e-5)
    got = torch.autograd.grad(loss * 1.5, params)
    want = torch.autograd.grad(loss_ref * 1.5, refs)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-5 * (n if reduction == "sum" else 1), rtol=2e-5)


def test_linear_cross_entropy_half_precision_and_leading_dims():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=gen).half().requires_grad_()
    weight = (torch.randn(100, 32, generator=gen) / 6).half().requires_grad_()
    labels = torch.randint(0, 100, (2, 5), generator=gen)
    loss = FusedLinearCrossEntropyLoss(chunk_size=4)(hidden, labels, weight)
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    loss_ref = ref_ce(F.linear(refs[0], refs[1]).reshape(-1, 100), labels.reshape(-1))
    torch.testing.assert_close(loss.double(), loss_ref, atol=5e-3, rtol=5e-3)
    got = torch.autograd.grad(loss, [hidden, weight])
    want = torch.autograd.grad(loss_ref, refs)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.double(), b, atol=2e-3, rtol=2e-2)


def test_linear_cross_entropy_under_autocast():
    """fp32 hidden and weight under bf16 autocast (as in a training loop): the matmuls run in bf16, the
    gradients come back in the parameters' fp32; a bug once made the d_hidden matmul refuse its fp32 buffer."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 32, generator=gen).requires_grad_()
    weight = (torch.randn(100, 32, generator=gen) / 6).requires_grad_()
    labels = torch.randint(0, 100, (2, 6), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FusedLinearCrossEntropyLoss(chunk_size=5)(hidden, labels, weight)
    loss.backward()
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    loss_ref = ref_ce(F.linear(refs[0], refs[1]).reshape(-1, 100), labels.reshape(-1))
    loss_ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss_ref, atol=2e-2, rtol=2e-2)  # bf16 operands: 8 bits
    for t, r in zip((hidden, weight), refs):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad.double(), r.grad, atol=2e-3, rtol=5e-2)


def test_linear_cross_entropy_frozen_weight():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    loss = FusedLinearCrossEntropyLoss()(hidden, torch.arange(4), weight)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_bad_inputs_raise_value_error():
    ce = FusedCrossEntropyLoss()
    with pytest.raises(ValueError, match="labels: expected an integer tensor"):
        ce(torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="logits: expected a floating-point tensor"):
        ce(torch.ones(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: expected shape \[3\]"):
        ce(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 5\) or ignore_index=-100, got 7"):
        ce(torch.randn(3, 5), torch.tensor([0, 7, -100]))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        FusedCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing: expected a float in"):
        FusedCrossEntropyLoss(label_smoothing=1.5)
    lce = FusedLinearCrossEntropyLoss()
    h, y, w = torch.randn(3, 8), torch.zeros(3, dtype=torch.long), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, D\] with D=8"):
        lce(h, y, torch.randn(10, 7))
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, D\], got 1-d"):
        lce(h, y, torch.randn(10))
    with pytest.raises(ValueError, match=r"bias: expected shape \[V\] = \[10\], got \[9\]"):
        lce(h, y, w, torch.randn(9))
    with pytest.raises(ValueError, match="hidden: expected a floating-point tensor"):
        lce(h.long(), y, w)
    with pytest.raises(ValueError, match="labels: expected an integer tensor"):
        lce(h, y.float(), w)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        FusedLinearCrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="chunk_size: expected a positive int, got 0"):
        FusedLinearCrossEntropyLoss(chunk_size=0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            lce(h.cuda(), y, w.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_cross_entropy_and_memory():
    torch.manual_seed(0)
    n, vocab = 4096, 32000 + 7
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16) * 3
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[::7] = IGNORE
    opts = {"label_smoothing": 0.1, "lse_square_scale": 1e-4}
    ref_logits = logits.float().requires_grad_()
    ref = ref_ce(ref_logits, labels, **opts)  # fp64 reference; big but fine on an H100
    ref.backward()
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = FusedCrossEntropyLoss(**opts)(x, labels)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1.1 * x.numel() * x.element_size()  # one bf16 gradient buffer, no fp32 copy
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.float(), ref_logits.grad.float(), atol=1e-6, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_linear_cross_entropy():
    torch.manual_seed(0)
    n, dim, vocab = 4096, 1024, 32000 + 7
    hidden = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, dim, device="cuda") / 32).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[::5] = IGNORE
    loss = FusedLinearCrossEntropyLoss(label_smoothing=0.1)(hidden, labels, weight)
    loss.backward()
    refs = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    ref = F.cross_entropy(F.linear(refs[0], refs[1]), labels, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss.float(), ref.detach(), atol=1e-2, rtol=1e-2)
    for got, want in zip((hidden.grad, weight.grad), refs):
        rel = (got.float() - want.grad).norm() / want.grad.norm()
        assert rel < 2e-2, rel


def test_zz_triton_kernels_ran_when_interpreting():
    """Last in the file: under TRITON_INTERPRET=1 the tests above went through the Triton kernels."""
    import sys

    assert ("linattn_dsl.modules._ce_kernels" in sys.modules) == INTERPRET


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab", [1, 7, 4097, 50000])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_compiled_kernel_matches_cpu_path_at_odd_sizes(vocab, reduction):
    gen = torch.Generator().manual_seed(vocab)
    logits0 = torch.randn(33, vocab, generator=gen) * 5
    labels0 = make_labels(33, vocab, 0.3, gen)
    labels0[0] = 0
    opts = {"label_smoothing": 0.1, "logit_scale": 0.8, "lse_square_scale": 1e-3, "reduction": reduction}
    results = []
    for device in ("cpu", "cuda"):
        logits = logits0.clone().to(device).requires_grad_()
        loss = FusedCrossEntropyLoss(**opts)(logits, labels0.to(device))
        loss.sum().backward()
        results.append([loss.detach().cpu(), logits.grad.cpu()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    h0 = torch.randn(33, 48, generator=gen)
    w0 = torch.randn(vocab, 48, generator=gen) / 7
    results = []
    for device in ("cpu", "cuda"):
        h, w = h0.clone().to(device).requires_grad_(), w0.clone().to(device).requires_grad_()
        loss = FusedLinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=8)(h, labels0.to(device), w)
        loss.backward()
        results.append([loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
