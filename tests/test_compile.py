"""torch.compile of the generated ops, layers and models (runtime/library.py: every op a torch.library custom op).

CPU, fp32, tiny shapes; ``backend="aot_eager"`` (Dynamo and AOT autograd, no Inductor code generation) with
``fullgraph=True``, so that a graph break fails the test. The compiled op runs the same eager code inside its custom
op (the generated PyTorch twin here), and its backward recomputes the forward and differentiates it: outputs agree
with eager to rounding of a different summation order at most (1e-6 absolute on O(1) values).
"""

from __future__ import annotations

import pytest
import torch

from linattn_dsl import ops
from linattn_dsl.generated import delta_rule, gated_delta_product, gla, kda, linear_attn, mamba2, rwkv6, rwkv7
from linattn_dsl.runtime import library

from test_models import make_model, prompt

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-6
B, T, H, K, V = 1, 6, 2, 4, 4


_SEED = [0]


def _r(*shape, sign=None):
    _SEED[0] += 1
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(_SEED[0]))
    if sign == "neg":
        x = -x.abs() * 0.5
    elif sign == "unit":
        x = x.sigmoid()
    return x.requires_grad_()


def _cases():
    """(id, generated module, mode, tensors, keywords of the op call): one per chunk form, and with switches,
    packed sequences, an initial / final state, sub-steps and read steps."""
    bt = (B, T, H)
    return [
        ("gla-additive-state", gla, "chunk",
         dict(q=_r(*bt, K), k=_r(*bt, K), v=_r(*bt, V), g=_r(*bt, K, sign="neg")),
         dict(initial_state=_r(1, H, K, V), output_final_state=True)),
        ("gla-recurrent-packed", gla, "fused_recurrent",
         dict(q=_r(*bt, K), k=_r(*bt, K), v=_r(*bt, V), g=_r(*bt, K, sign="neg")),
         dict(initial_state=_r(2, H, K, V), output_final_state=True, cu_seqlens=torch.tensor([0, 2, T]))),
        ("delta_rule-delta", delta_rule, "chunk",
         dict(q=_r(*bt, K), k=_r(*bt, K), v=_r(*bt, V), beta=_r(*bt, sign="unit")),
         dict(output_final_state=True)),
        ("rwkv7-general-packed", rwkv7, "chunk",
         dict(r=_r(*bt, K), w=_r(*bt, K, sign="neg"), k=_r(*bt, K), v=_r(*bt, V), a=_r(*bt, K) * 0.3,
              b=_r(*bt, K) * 0.3),
         dict(cu_seqlens=torch.tensor([0, 4, T]))),
        ("mamba2-switch-optional", mamba2, "chunk",
         dict(x=_r(*bt, V), dt=_r(*bt), A=_r(H, sign="neg"), B=_r(B, T, 1, K), C=_r(B, T, 1, K), D=_r(H),
              dt_bias=_r(H)),
         dict(switches=dict(dt_softplus=True), output_final_state=True)),
        ("linear_attn-normalize", linear_attn, "chunk",
         dict(q=_r(*bt, K).detach().abs().requires_grad_(), k=_r(*bt, K).detach().abs().requires_grad_(),
              v=_r(*bt, V)),
         dict(switches=dict(normalize=True), output_final_state=True)),
        ("gated_delta_product-substeps", gated_delta_product, "chunk",
         dict(q=_r(*bt, K), k=_r(B, 2 * T, H, K), v=_r(B, 2 * T, H, V), g=_r(*bt, sign="neg"),
              beta=_r(B, 2 * T, H, sign="unit")),
         dict(output_final_state=True, steps=2)),
        ("rwkv6-read-before", rwkv6, "fused_recurrent",
         dict(r=_r(*bt, K), k=_r(*bt, K), v=_r(*bt, V), w=_r(*bt, K, sign="neg"), u=_r(H, K)),
         dict(output_final_state=True)),
    ]


CASES = _cases()


def _leaves(tensors: dict, kw: dict):
    """Fresh leaves (the cases' tensors detached) for one run."""
    t = {n: x.detach().clone().requires_grad_(x.is_floating_point()) for n, x in tensors.items()}
    kw = dict(kw)
    if kw.get("initial_state") is not None:
        kw["initial_state"] = kw["initial_state"].detach().clone().requires_grad_()
    return t, kw


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_opcheck(case):
    _, mod, mode, tensors, kw = case
    tensors, kw = _leaves(tensors, kw)
    torch.library.opcheck(library.custom_op(mod, mode), library.arguments(mod, tensors, **kw))


def _public(mod, mode):
    return getattr(mod, f"{mode}_{mod.SIGNATURE.name}")


def _call(mod, mode, tensors, kw):
    kw = dict(kw)
    switches, steps = kw.pop("switches", {}), kw.pop("steps", None)
    sig = mod.SIGNATURE
    args = [tensors[n] for n in sig.required]
    if steps is not None:
        args.append(steps)
    optional = {n: tensors[n] for n in sig.optional if n in tensors}
    return _public(mod, mode)(*args, **kw, **optional, **switches)


def _loss(out):
    o, ht = out
    loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum()
    return loss if ht is None else loss + (ht ** 2).sum()


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 3, 4, 6)], ids=[CASES[i][0] for i in (0, 1, 3, 4, 6)])
def test_compiled_op_equals_eager(case):
    _, mod, mode, tensors, kw = case
    results = []
    for fn in (lambda t, k: _call(mod, mode, t, k),
               torch.compile(lambda t, k: _call(mod, mode, t, k), fullgraph=True, backend="aot_eager")):
        t, k = _leaves(tensors, kw)
        out = fn(t, k)
        leaves = [*t.values()] + ([k["initial_state"]] if k.get("initial_state") is not None else [])
        results.append((out, torch.autograd.grad(_loss(out), leaves)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled[0], eager[0], atol=ATOL, rtol=0)
    assert (compiled[1] is None) == (eager[1] is None)
    if eager[1] is not None:
        torch.testing.assert_close(compiled[1], eager[1], atol=ATOL, rtol=0)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_compiled_op_without_final_state_returns_none():
    q, k, v, g = (x.detach() for x in CASES[0][3].values())
    fn = torch.compile(lambda *a: ops.chunk_gla(*a), fullgraph=True, backend="aot_eager")
    o, ht = fn(q, k, v, g)
    assert ht is None
    torch.testing.assert_close(o, ops.chunk_gla(q, k, v, g)[0], atol=ATOL, rtol=0)


def test_checks_under_compile():
    """Shapes are checked while tracing (the binder on the fake tensors, its message inside torch.compile's
    error); the values of cu_seqlens when the compiled call runs, with the eager message."""
    q, k, v, g = (x.detach() for x in CASES[0][3].values())
    fn = torch.compile(lambda *a, **kw: ops.chunk_gla(*a, **kw), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"v: expected shape \[B, T, H, V\]"):
        fn(q, k, v[:, :, :1], g)
    with pytest.raises(ValueError, match="cu_seqlens: expected strictly increasing offsets"):
        fn(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 3, T]))


class _NotAContext:
    pass


NOT_A_CONTEXT = _NotAContext()


def test_cp_context_runs_eagerly_outside_the_graph():
    """A split call is no custom op: torch.compile breaks the graph there and runs it eagerly (here its own
    check of the context's type); with fullgraph=True it refuses."""
    q, k, v, g = (x.detach() for x in CASES[0][3].values())

    def fn(q, k, v, g):
        return ops.chunk_gla(q * 2, k, v, g, cp_context=NOT_A_CONTEXT)

    def whole(q, k, v, g):
        return ops.chunk_gla(q * 2, k, v, g, cp_context=NOT_A_CONTEXT)

    with pytest.raises(ValueError, match="cp_context: expected a context"):
        torch.compile(fn, backend="aot_eager")(q, k, v, g)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        torch.compile(whole, backend="aot_eager", fullgraph=True)(q, k, v, g)


def test_eager_calls_make_no_custom_op():
    """Eagerly an op runs its code directly: no custom op is made (nor its call's cost paid)."""
    q, k, v = (_r(B, T, H, K).detach() for _ in range(3))
    o, _ = kda.chunk_kda(q, k, v, _r(B, T, H, K, sign="neg").detach(), _r(B, T, H, sign="unit").detach())
    assert o.shape == (B, T, H, K)
    assert not any(key == kda._THIS.key for key, _ in library._OPS)


# ---------------------------------------------------------------- models


def _assert_compiled_step_equals_eager(model, step, *args) -> None:
    """``step(*args)`` (a training loss) eagerly and compiled (fullgraph, aot_eager): the loss within 1e-5 and
    every parameter's gradient within 1e-4."""
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        loss = fn(*args)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["gla", "mamba2"])
def test_compiled_training_step_equals_eager(family):
    model = make_model(family).train()
    ids = prompt(2, 12)
    labels = ids.clone()
    labels[0, :3] = -100
    _assert_compiled_step_equals_eager(model, lambda ids, labels: model(ids, labels=labels).loss, ids, labels)


@pytest.mark.parametrize("family", ["gated_deltanet", "rwkv7"])
def test_compiled_packed_training_step_equals_eager(family):
    """Packed documents (``cu_seqlens``; short convs and token shifts restart at each offset): the compiled step
    equals eager. Traced, the offsets' values are asserted on the device (reading them would be a host sync): bad
    offsets raise a RuntimeError naming cu_seqlens (on CUDA a device-side assert), before any layer reads them."""
    model = make_model(family).train()
    ids = prompt(1, 20)
    cu = torch.tensor([0, 7, 20])
    _assert_compiled_step_equals_eager(model, lambda ids, cu: model(ids, labels=ids, cu_seqlens=cu).loss, ids, cu)
    step = torch.compile(lambda ids, cu: model(ids, labels=ids, cu_seqlens=cu).loss, fullgraph=True,
                         backend="aot_eager")
    with pytest.raises(RuntimeError, match="cu_seqlens: expected strictly increasing offsets"):
        step(ids, torch.tensor([0, 9, 7, 20]))


@pytest.mark.parametrize("family,masked", [("gla", False), ("rwkv7", False), ("gla_hybrid", True)])
def test_compiled_decoding_step_equals_eager(family, masked):
    """The step of one new token with the cache of a prefill (use_cache=True), twice: logits and the cache the
    second step reads agree with eager; with ``masked``, a left-padded row and the attention mask generate passes."""
    model = make_model(family)
    ids = prompt(2, 8)
    mask = torch.ones_like(ids)
    if masked:
        mask[1, :2] = 0

    def call(tok, cache, m):
        return model(tok, cache=cache, use_cache=True, attention_mask=m if masked else None)

    step = torch.compile(call, fullgraph=True, backend="aot_eager")
    logits = []
    with torch.no_grad():
        for fn in (call, step):
            cache = model(ids[:, :6], use_cache=True, attention_mask=mask[:, :6] if masked else None).cache
            got = []
            for t in (6, 7):
                out = fn(ids[:, t:t + 1], cache, mask[:, :t + 1])
                cache = out.cache
                got.append(out.logits)
            assert cache.get_seq_length() == 8
            logits.append(torch.cat(got, 1))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
