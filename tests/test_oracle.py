"""The oracle against closed forms, in float64 (agreement to ~1e-10 relative)."""

import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import regen

from linattn_dsl import ops, reference

from linattn_dsl.compiler import registry

from linattn_dsl.reference import drawing as testing
from linattn_dsl.compiler.spec import Decay, Recurrence, Transition

TOL = 1e-10
shapes = st.fixed_dictionaries(dict(B=st.integers(1, 2), T=st.integers(1, 24), H=st.integers(1, 3),
                                     K=st.integers(1, 6), V=st.integers(1, 6), seed=st.integers(0, 999)))
ADDITIVE = Recurrence(name="additive", inputs=dict(q="B T H K", k="B T H K", v="B T H V"),
                      query="q", key="k", value="v")


def _qkv(p):
    g = torch.Generator().manual_seed(p["seed"])
    return [torch.randn(p["B"], p["T"], p["H"], d, generator=g, dtype=torch.float64)
            for d in (p["K"], p["K"], p["V"])]


def _masked(q, k, v, log_decay_bth, scale):
    """o = ((q k^T) * exp(G_i - G_j) * causal) v, the decay-masked matrix form."""
    G = log_decay_bth.cumsum(1)                                   # [B, T, H]
    diff = G[:, :, None, :] - G[:, None, :, :]                    # [B, Ti, Tj, H]
    T = q.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, :, :, None]
    mask = torch.where(causal, torch.exp(torch.where(causal, diff, 0.0)), 0.0)
    scores = torch.einsum("bihk,bjhk->bijh", q * scale, k) * mask
    return torch.einsum("bijh,bjhv->bihv", scores, v)


def close(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) < TOL


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_additive_no_decay_is_causal_linear_attention(p):
    q, k, v = _qkv(p)
    o, _ = reference.run(ADDITIVE, q, k, v, dtype=torch.float64)
    ref = _masked(q, k, v, torch.zeros(q.shape[:3], dtype=torch.float64), p["K"] ** -0.5)
    assert close(o, ref)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_constant_decay_retention_is_decay_masked(p):
    q, k, v = _qkv(p)
    o, _ = reference.run(registry.load("retention"), q, k, v, dtype=torch.float64)
    gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(p["H"], dtype=torch.float64)))
    ref = _masked(q, k, v, gamma.expand(p["B"], p["T"], p["H"]), p["K"] ** -0.5)
    assert close(o, ref)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from([-0.1, -3.0, -20.0]))
def test_scalar_decay_is_decay_masked(p, gmin):
    q, k, v = _qkv(p)
    g = torch.rand(q.shape[:3], dtype=torch.float64, generator=torch.Generator().manual_seed(p["seed"])) * gmin
    o, _ = reference.run(registry.load("gated_delta_rule"), q, k, v, g, torch.zeros_like(g), dtype=torch.float64)
    assert torch.isfinite(o).all()
    spec = Recurrence(name="ssd", inputs=dict(q="B T H K", k="B T H K", v="B T H V", g="B T H"),
                      query="q", key="k", value="v", decay=Decay.scalar(log="-softplus(g)"))
    graw = torch.log(torch.expm1(-g).clamp_min(1e-300))   # softplus(graw) = -g
    o2, _ = reference.run(spec, q, k, v, graw, dtype=torch.float64)
    ref = _masked(q, k, v, g, p["K"] ** -0.5)
    assert close(o2, ref)
    # gated delta rule with beta = 0 is this additive... minus its writes: with beta = 0 nothing is written
    assert o.abs().max() == 0


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_delta_rule_with_beta_zero_keeps_the_state(p):
    q, k, v = _qkv(p)
    beta = torch.zeros(q.shape[:3], dtype=torch.float64)
    h0 = torch.randn(p["B"], p["H"], p["K"], p["V"], dtype=torch.float64)
    o, s = reference.run(registry.load("delta_rule"), q, k, v, beta, initial_state=h0, output_final_state=True,
                         dtype=torch.float64)
    assert torch.equal(s, h0)
    assert close(o, torch.einsum("bthk,bhkv->bthv", q * p["K"] ** -0.5, h0))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(registry.builtin_names())), st.lists(st.integers(1, 9), min_size=1, max_size=4),
       st.integers(0, 999))
def test_varlen_packing_equals_separate_runs(name, lens, seed):
    spec = registry.load(name)
    case = testing.draw_case(spec, seqlens=lens, heads=2, K=4, V=3, dtype=torch.float64, seed=seed)
    o, s = case.call(lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw))
    bounds = case.cu_seqlens.tolist()
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        sub = testing.Case(spec, case.tokens(a, b), case.switches, case.initial_state[n:n + 1], None,
                           substeps=case.substeps)
        o_n, s_n = sub.call(lambda *a_, **kw: reference.run(spec, *a_, dtype=torch.float64, **kw))
        assert torch.allclose(o[:, a:b], o_n, rtol=1e-12, atol=1e-12)
        assert torch.allclose(s[n:n + 1], s_n, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(registry.builtin_names())), st.integers(2, 20), st.data())
def test_initial_state_continuation_equals_one_long_run(name, T, data):
    spec = registry.load(name)
    split = data.draw(st.integers(1, T - 1))
    case = testing.draw_case(spec, B=2, T=T, heads=2, K=4, V=3, dtype=torch.float64, seed=T)

    def run(c):
        return c.call(lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw))

    o, s = run(case)
    halves = []
    h = case.initial_state
    for a, b in ((0, split), (split, T)):
        o_p, h = run(testing.Case(spec, case.tokens(a, b), case.switches, h, None, substeps=case.substeps))
        halves.append(o_p)
    assert torch.allclose(torch.cat(halves, 1), o, rtol=1e-10, atol=1e-12)
    assert torch.allclose(h, s, rtol=1e-10, atol=1e-12)


def test_grouped_heads_share_groups():
    # head h uses q/k group h // (H / G): running grouped equals repeating q/k explicitly
    spec = registry.load("delta_rule")
    case = testing.draw_case(spec, B=1, T=7, heads=4, groups=2, K=4, V=3, dtype=torch.float64)
    o, _ = case.call(lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw))
    t = dict(case.tensors)
    t["q"], t["k"] = t["q"].repeat_interleave(2, 2), t["k"].repeat_interleave(2, 2)
    o2, _ = testing.Case(spec, t, case.switches, case.initial_state, None).call(
        lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw))
    assert torch.allclose(o, o2, rtol=1e-12, atol=1e-12)


def test_general_transition_reduces_to_delta_rule():
    # a = exp(g) * k, b = -beta k, v -> beta v (docs/chunk_math.md) turns the general form into the delta rule
    kda, rwkv = registry.load("kda"), registry.load("rwkv7")
    case = testing.draw_case(kda, B=1, T=9, heads=2, K=4, V=3, dtype=torch.float64)
    q, k, v, g, beta = (case.tensors[n] for n in ("q", "k", "v", "g", "beta"))
    o1, s1 = reference.run(kda, q, k, v, g, beta, scale=0.5, output_final_state=True, dtype=torch.float64)
    o2, s2 = reference.run(rwkv, q, g, k, v * beta[..., None], torch.exp(g) * k, -beta[..., None] * k,
                           scale=0.5, output_final_state=True, dtype=torch.float64)
    assert torch.allclose(o1, o2, rtol=1e-12, atol=1e-12) and torch.allclose(s1, s2, rtol=1e-12, atol=1e-12)


def test_autograd_through_the_oracle():
    spec = registry.load("mamba2")
    case = testing.draw_case(spec, B=1, T=5, heads=2, K=3, V=2, dtype=torch.float64)
    leaves = {k: x.requires_grad_() for k, x in case.tensors.items()}
    o, s = case.call(lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw), leaves)
    (o.sum() + s.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves.values())

    def f(A):
        t = dict(case.tensors, A=A)
        return testing.Case(spec, t, case.switches, case.initial_state, None).call(
            lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw))[0].sum()
    assert torch.autograd.gradcheck(f, (case.tensors["A"].detach().clone().requires_grad_(),))


def test_transition_kinds_of_family():
    assert {Transition.none().kind, Transition.delta("b").kind, Transition.general("a", "b").kind} == \
        {"none", "delta", "general"}


def test_forgetting_step_has_zero_gradient_with_head_index_in_the_gate():
    """A log-decay of -inf (a reset) forgets the state exactly; the gate inputs' gradients there are 0, also
    when the expression's own derivative is infinite and when it reads the head index."""
    from linattn_dsl.compiler.spec import Arg

    spec = Recurrence(name="reset_gate", inputs=dict(q="B T H K", k="B T H K", v="B T H V",
                                                     a=Arg("H", sign="nonpositive"), dt="B T H"),
                      query="q", key="k", value="v", decay=Decay.scalar(log="a * (h + 1) * softplus(dt)"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.tensor([-0.5, -float("inf")], dtype=torch.float64, requires_grad=True)
    dt = torch.randn(1, 6, 2, generator=g, dtype=torch.float64).requires_grad_()
    o, s = reference.run(spec, q, k, v, a, dt, output_final_state=True, dtype=torch.float64)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(dt.grad).all()
    assert torch.equal(dt.grad[..., 1], torch.zeros_like(dt.grad[..., 1]))   # head 1 forgets every step
    # head 1 keeps only the current token: o_t = (q_t . k_t) v_t
    expect = (q[..., 1, :] * k[..., 1, :]).sum(-1, keepdim=True) * v[..., 1, :] * 3 ** -0.5
    assert torch.allclose(o[..., 1, :], expect, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(st.booleans(), st.integers(0, 2 ** 16))
def test_comba_oracle_is_fla_formula(l2norm, seed):
    """The Comba spec (the general transition with a = p, b = -beta k, key beta k) against its recurrence stepped
    here as FLA's kernels step it (chunk_comba, fused_recurrent_comba: correct the value through p against the
    state before its decay, decay, write beta k (v - p^T S_{t-1})^T; FLA's naive_recurrent_comba, which corrects
    against the decayed state, disagrees with them); with the switch, q, k and p are L2-normalised first. float64,
    1e-12."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k, p = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    ld = -torch.rand(B, T, H, generator=g, dtype=torch.float64) * 2
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    spec = registry.load("comba")
    o, ht = reference.run(spec, q, k, v, p, ld, beta, initial_state=h0, output_final_state=True,
                          dtype=torch.float64, use_qk_l2norm_in_kernel=l2norm)
    if l2norm:
        q, k, p = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k, p))
    S, outs = h0.clone(), []
    for t in range(T):
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", p[:, t], S))
        S = S * ld[:, t, :, None, None].exp() + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    torch.testing.assert_close(o, torch.stack(outs, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht, S, rtol=1e-12, atol=1e-12)


NORMALIZED_GLA = (  # a decayed spec with the normalised output and feature maps in its roles
    'from linattn_dsl import Decay, Recurrence\n'
    'spec = Recurrence(name="normalized_gla", inputs=dict(q="B T H K", k="B T H K", v="B T H V", g="B T H K"), '
    'query="exp(q)", key="exp(k)", value="v", decay=Decay.vector(log="-softplus(g)"), normalize=True)\n')
_GENERATED: dict = {}


def _normalized_gla():
    """(spec, generated module) of NORMALIZED_GLA, compiled once per session."""
    if not _GENERATED:
        _GENERATED["gla"] = regen(tempfile.mkdtemp(prefix="linattn_oracle_"), "normalized_gla", NORMALIZED_GLA)
    return _GENERATED["gla"]


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["linear_attn", "normalized_gla"]), st.integers(0, 2 ** 16))
def test_normalized_output_is_the_ratio_with_the_keys_running_sum(name, seed):
    """normalize: o_t = q^T S_t / (q^T z_t + 1e-10), z_t the keys' running sum under the same decay, z the state's
    last column; the oracle against this loop (float64, 1e-12), and the ops (the CPU twin: the value input widened
    by a ones column) against the oracle (fp32, 1e-5) with every gradient, for a decayed spec with feature maps in
    its roles too."""
    spec, mod = (registry.load(name), None) if name == "linear_attn" else _normalized_gla()
    g = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k = (torch.rand(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    gate = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, K, V + 1, generator=g, dtype=torch.float64)
    h0[..., -1] = h0[..., -1].abs() + 1
    inputs = (q, k, v) if name == "linear_attn" else (q, k, v, gate)
    o, ht = reference.run(spec, *inputs, initial_state=h0, output_final_state=True, dtype=torch.float64)
    fq, fk = (q, k) if name == "linear_attn" else (q.exp(), k.exp())
    decay = torch.ones_like(gate) if name == "linear_attn" else torch.exp(-torch.nn.functional.softplus(gate))
    S, z, outs = h0[..., :V].clone(), h0[..., V].clone(), []
    for t in range(T):
        S = decay[:, t, :, :, None] * S + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = decay[:, t] * z + fk[:, t]
        qs = fq[:, t] * K ** -0.5
        outs.append(torch.einsum("bhk,bhkv->bhv", qs, S) / ((qs * z).sum(-1, keepdim=True) + 1e-10))
    torch.testing.assert_close(o, torch.stack(outs, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht, torch.cat([S, z[..., None]], -1), rtol=1e-12, atol=1e-12)
    case = testing.draw_case(spec, B=2, T=37, heads=2, K=8, V=4, seed=seed)
    assert case.initial_state.shape[-1] == 5
    for op in ((ops.chunk_linear_attn, ops.fused_recurrent_linear_attn) if mod is None
               else (mod.chunk_normalized_gla, mod.fused_recurrent_normalized_gla)):
        errs = testing.compare(case, op)
        assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize("V", [3, 7, 8])
def test_normalized_call_widens_the_value_to_whole_vectors(V):
    """The normalised call runs on a value of V + 1 columns rounded up to a multiple of 8 (every row 16-byte
    aligned): the ones column at V, zero columns after it, the initial state padded with zero columns; the caller
    still sees a [K, V + 1] final state and a [.., V] output."""
    from linattn_dsl.generated import linear_attn
    from linattn_dsl.runtime.args import bind
    from linattn_dsl.runtime.rewrites import NORMALIZER_ALIGN, normalized

    sig = linear_attn.SIGNATURE
    B, T, H, K = 1, 5, 2, 4
    q, k, v = torch.rand(B, T, H, K), torch.rand(B, T, H, K), torch.randn(B, T, H, V)
    h0 = torch.rand(B, H, K, V + 1)
    bound = bind(sig, dict(q=q, k=k, v=v), initial_state=h0, output_final_state=True)
    seen = {}

    def run(wide):
        W = wide.tensors[sig.value_input].shape[-1]
        seen.update(W=W, v=wide.tensors[sig.value_input], h0=wide.initial_state, size=wide.size("V"))
        return torch.ones(B, T, H, W), torch.arange(B * H * K * W, dtype=torch.float32).reshape(B, H, K, W)

    o, ht = normalized(bound, run)
    W = seen["W"]
    assert W % NORMALIZER_ALIGN == 0 and V + 1 <= W < V + 1 + NORMALIZER_ALIGN and seen["size"] == W
    torch.testing.assert_close(seen["v"][..., :V], v)
    assert (seen["v"][..., V] == 1).all() and (seen["v"][..., V + 1:] == 0).all()
    torch.testing.assert_close(seen["h0"][..., :V + 1], h0)
    assert (seen["h0"][..., V + 1:] == 0).all()
    assert o.shape == (B, T, H, V) and ht.shape == (B, H, K, V + 1) and ht.is_contiguous()
    torch.testing.assert_close(ht, torch.arange(B * H * K * W, dtype=torch.float32).reshape(B, H, K, W)[..., :V + 1])
    assert bound.initial_state is h0 and bound.tensors["v"] is v   # the caller's call is left as it was


@settings(max_examples=10, deadline=None)
@given(st.booleans(), st.integers(0, 2 ** 16))
def test_mamba_oracle_is_the_selective_scan(softplus, seed):
    """The mamba spec against Mamba's selective scan stepped here (float64, 1e-12): per channel d,
    h = exp(delta A[d]) * h + delta B x[d], y = C^T h + D[d] x[d], delta = softplus(dt + dt_bias) (or relu)."""
    g = torch.Generator().manual_seed(seed)
    B, T, Dn, N = 2, 7, 3, 4
    x, dt = torch.randn(B, T, Dn, generator=g, dtype=torch.float64), torch.randn(B, T, Dn, generator=g,
                                                                                 dtype=torch.float64)
    A = -torch.rand(Dn, N, generator=g, dtype=torch.float64) * 2
    Bm, Cm = (torch.randn(B, T, N, generator=g, dtype=torch.float64) for _ in range(2))
    D, dt_bias = (torch.randn(Dn, generator=g, dtype=torch.float64) for _ in range(2))
    y, ht = reference.run(registry.load("mamba"), x[..., None], dt, A, Bm[:, :, None], Cm[:, :, None], D=D,
                          dt_bias=dt_bias, dt_softplus=softplus, output_final_state=True, dtype=torch.float64)
    delta = torch.nn.functional.softplus(dt + dt_bias) if softplus else torch.relu(dt + dt_bias)
    h, outs = torch.zeros(B, Dn, N, dtype=torch.float64), []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * x[:, t, :, None]
        outs.append((h * Cm[:, t, None, :]).sum(-1) + D * x[:, t])
    torch.testing.assert_close(y[..., 0], torch.stack(outs, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht[..., 0], h, rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2 ** 16))
def test_gated_delta_product_is_n_delta_steps_per_token(n, seed):
    """Gated DeltaProduct (Substeps): per token the decay once, then n delta-rule steps with their own keys, values
    and betas, the output after the last; the oracle of the interleaved sequence against this loop (FLA's naive
    form, float64, 1e-12), and the ops (CPU twin) against the oracle with every gradient (fp32, 1e-5)."""
    spec = registry.load("gated_delta_product")
    g = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 2, 6, 2, 4, 3
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T * n, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T * n, H, V, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T * n, H, generator=g, dtype=torch.float64)
    ld = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    o, ht = reference.run(spec, q, k, v, ld, beta, num_householder=n, initial_state=h0, output_final_state=True,
                          dtype=torch.float64)
    S, outs = h0.clone(), []
    for t in range(T):
        S = S * ld[:, t, :, None, None].exp()
        for j in range(t * n, t * n + n):
            u = v[:, j] - torch.einsum("bhk,bhkv->bhv", k[:, j], S)
            S = S + beta[:, j, :, None, None] * k[:, j, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    torch.testing.assert_close(o, torch.stack(outs, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht, S, rtol=1e-12, atol=1e-12)
    case = testing.draw_case(spec, seqlens=[3, 9], heads=2, K=8, V=4, seed=seed, substeps=n)
    for op in (ops.chunk_gated_delta_product, ops.fused_recurrent_gated_delta_product):
        errs = testing.compare(case, op)
        assert all(e < 1e-5 for e in errs.values()), errs


@settings(max_examples=10, deadline=None)
@given(st.booleans(), st.integers(0, 2 ** 16))
def test_rwkv6_reads_the_state_before_the_update(packed, seed):
    """read="before" with a bonus (RWKV6): o_t = scale r^T (S_{t-1} + diag(u) k v^T), S_t = diag(e^w) S_{t-1}
    + k v^T; the oracle of the read/write sequence against this loop (FLA's naive form, float64, 1e-12, packed
    sequences too), and the ops (CPU twin) against the oracle with every gradient (fp32, 1e-5)."""
    spec = registry.load("rwkv6")
    g = torch.Generator().manual_seed(seed)
    B, T, H, K, V = (1, 9, 2, 4, 3) if packed else (2, 7, 2, 4, 3)
    r, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    w = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    u = torch.randn(H, K, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 4, 9]) if packed else None
    N = 2 if packed else B
    h0 = torch.randn(N, H, K, V, generator=g, dtype=torch.float64)
    o, ht = reference.run(spec, r, k, v, w, u, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                          dtype=torch.float64)
    spans = [(b, 0, T) for b in range(B)] if cu is None else [(0, 0, 4), (0, 4, 9)]
    outs, finals = torch.zeros_like(o), []
    for n, (b, a, e) in enumerate(spans):
        S = h0[n].clone()
        for t in range(a, e):
            kv = k[b, t, :, :, None] * v[b, t, :, None, :]
            outs[b, t] = torch.einsum("hk,hkv->hv", r[b, t] * K ** -0.5, S + u[:, :, None] * kv)
            S = w[b, t, :, :, None].exp() * S + kv
        finals.append(S)
    torch.testing.assert_close(o, outs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht, torch.stack(finals), rtol=1e-12, atol=1e-12)
    case = testing.draw_case(spec, seqlens=[3, 9] if packed else None, heads=2, K=8, V=4, seed=seed)
    for op in (ops.chunk_rwkv6, ops.fused_recurrent_rwkv6):
        errs = testing.compare(case, op)
        assert all(e < 1e-5 for e in errs.values()), errs
