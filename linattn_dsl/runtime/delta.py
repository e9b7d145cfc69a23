"""Host side of the delta-rule chunk form: launching a spec's generated stages, and their autograd.

docs/chunk_math.md section 2. Per chunk the UT transform turns the delta rule into the additive form with
corrected values U = U' - W h[c]; the additive stages then run with U in V's place:

    gate_fwd (G) -> [scores_fwd + scores_diag PAIR (P = (k, k), A = (q, k), kg)] -> ut_fwd (Tm, W, U')
        -> state_fwd DELTA (h[c], U) -> output_fwd (v := U)
    backward: dv_bwd LOCAL (A^T dO) -> state_bwd DELTA (dS, dU) -> dqk_bwd [+ dqk_intra_bwd] (v := U)
        -> ut_bwd (dv, dbeta, dk of W and P) [-> dqk_intra_bwd(k, k, dP)] -> gate_bwd

The gate gradient uses dGpos: with the global rewrite S~ = E[-G] S the key appears as k E[+G] where it
reads the state (W, the rows of P) and as k E[-G] where it writes it (A, the state update, the columns
of P); dGpos = q dq + k dk_read - k dk_write, which ut_bwd and dqk_bwd write part by part.
"""

from __future__ import annotations

import torch
import triton

from . import host, tuning
from .args import Bound
from .host import BC, BT, gate_grads, group_sum, launch

MAX_K = 256


def forward_states(mod, gate, q, k, v, beta, gate_inputs, h0, L: host.Layout, scale, store_final, want_qg=False):
    """Every forward stage but the output: (G, P, Tm, w, h, vnew, ht, A, qg)."""
    rows, HQ, K, H, V, vector, half, dev, tk = host.sizes(mod, gate, q, v, L)
    G = host.run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=True)
    store = q.dtype if half else torch.float32
    P = A = None
    if vector:   # P[j, m] = sum_c k_jc k_mc E[G_jc - G_mc] (fp32: the triangular solve's input)
        P = torch.empty(rows, H, BT, dtype=torch.float32, device=dev)
        # and A[j, m] = scale sum_c q_jc k_mc E[G_jc - G_mc] (the output's), in the same pass, stored as its
        # readers round it (output_fwd, dv_bwd: operands of half products)
        A = torch.empty(rows, H, BT, dtype=store, device=dev)
    kg = torch.empty(rows, H, K, dtype=store, device=dev) if vector else None   # until state_fwd
    # and qg = Q * E[G] for output_fwd (in the products' operand type: output_fwd's numbers are unchanged, it
    # reads qg instead of Q and fp32 G; FLA's KDA forward keeps qg too); the recomputing backward needs none
    qg = torch.empty(rows, H, K, dtype=store, device=dev) if vector and want_qg else None
    # and ke = K * E[G], ut_fwd's operand of W, likewise (ut_fwd then reads no G and no K)
    ke = torch.empty(rows, H, K, dtype=store, device=dev) if vector else None
    if vector:   # (and kg = K * E[G_n - G] for state_fwd, by scores_diag)
        host.vector_scores(mod, q, k, G, A, P, kg, L, scale, H, HQ, K, half, qg=qg, ke=ke, tk=tk)
    # Tm is an operand of half products only, in ut_fwd's W, U' and in ut_bwd; the scalar decays' ut_fwd parks P
    # (fp32, the solve's input) in its rows, so they keep fp32
    Tm = torch.empty(rows, H, BT, dtype=store if vector else torch.float32, device=dev)
    w = torch.empty(rows, H, K, dtype=store, device=dev)
    u1 = torch.empty(rows, H, V, dtype=store, device=dev)
    launch(mod.ut_fwd, (L.NT, H), G, k=k if ke is None else ke, v=v, beta=beta, G=G, P=P, Tm=Tm, w=w, u=u1,
           **L.chunks, H=H, HQ=HQ, K=K, V=V, BT=BT, BC=BC, VECTOR=vector, HALF=half, KE=vector,
           DECAY=host.decays(mod), **tuning.launch("ut_fwd", tk))
    del ke
    h = torch.empty(L.NT, H, K, V, dtype=store, device=dev)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if store_final else None
    vnew = torch.empty_like(u1)
    o = tuning.launch("state_fwd", tk)
    launch(mod.state_fwd, (1, triton.cdiv(V, o["BV"]), L.N * H), G, k=k if kg is None else kg, v=u1, vs=None, G=G,
           h=h, h0=h0, ht=ht, w=w, vnew=vnew, **L.seqs, H=H, HQ=HQ, K=K, V=V, BT=BT, VECTOR=vector,
           USE_H0=h0 is not None, STORE_FINAL=store_final, HALF=half, VSCALE=False, DELTA=True, KG=vector,
           DECAY=host.decays(mod), **o)
    return G, P, Tm, w, h, vnew, ht, A, qg


def forward(mod, gate, L, scale, store_final, tensors, h0, gate_inputs, for_bwd=True):
    """(o, final state, what the backward keeps)."""
    q, k, v, beta = tensors
    G, P, Tm, w, h, vnew, ht, A, qg = forward_states(mod, gate, q, k, v, beta, gate_inputs, h0, L, scale, store_final,
                                                     want_qg=True)
    o, bad = host.output(mod, gate, q, k, vnew, None, None, G, h, A, L, scale, v.dtype, qg=qg)
    host.contain(mod, gate, L, scale, _step(mod, tensors), G, h, o, bad)
    return o, ht, (G, P, Tm, w, h, vnew, A)


def backward(mod, gate, L, scale, tensors, h0, gate_inputs, saved, do, dht, need_gate_grads):
    """Gradients of (q, k, v, beta), of h0 and of the gate inputs. ``saved``: forward's, or None (recompute)."""
    q, k, v, beta = tensors
    if saved is None:   # the step form's backward: the chunk backward, on a recomputed chunk forward
        G, P, Tm, w, h, vnew, _, A, _ = forward_states(mod, gate, q, k, v, beta, gate_inputs, h0, L, scale, False)
    else:
        G, P, Tm, w, h, vnew, A = saved
    rows, HQ, K, H, V, vector, half, dev, tk = host.sizes(mod, gate, q, v, L)
    do = do.contiguous()
    store = q.dtype if half else torch.float32
    # dvl = A^T dO: the intra-chunk part of dU
    dvl = torch.empty(rows, H, V, dtype=store, device=dev)
    ol = tuning.launch("dv_bwd_local", tk)
    launch(mod.dv_bwd, (triton.cdiv(V, ol["BV"]), L.NT, H), G, q=q, k=k, v=vnew, vs=None, dvs=None, sk=None,
           dsk=None, G=G, A=A, do=do, dhn=None, dv=dvl, **L.chunks, scale=scale, H=H, HQ=HQ, K=K, V=V, BT=BT,
           VECTOR=vector, HALF=half, VSCALE=False, SKIP=False, LOCAL=True, **ol)
    dhn = torch.empty_like(h)
    du = torch.empty(rows, H, V, dtype=store, device=dev)
    dh0 = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    o = tuning.launch("state_bwd", tk)
    launch(mod.state_bwd, (1, triton.cdiv(V, o["BV"]), L.N * H), G, q=q, k=k, w=w, G=G, do=do, dvl=dvl, du=du,
           dht=dht, dhn=dhn, dh0=dh0, **L.seqs, scale=scale, H=H, HQ=HQ, K=K, V=V, BT=BT, VECTOR=vector,
           USE_DHT=dht is not None, STORE_DH0=h0 is not None, HALF=half, DELTA=True, **o)
    del dvl
    dw = torch.empty(rows, H, K, dtype=store, device=dev)
    # vector decays: dqk leaves the inter-chunk parts of dq, dk and dA; dqk_intra_bwd finishes them below
    # with each chunk's gate carry formed from the states (precise; host.gate_grads)
    want_carry = need_gate_grads and bool(gate.grads)
    dq, dk_add, dA_or_dGpos, *carry = host.dqk(mod, gate, q, k, vnew, None, G, h, do, dhn, A, L, scale, du=du, dw=dw,
                                               defer_intra=vector, carry=want_carry)
    fold = not vector and HQ == H   # ut_bwd adds dqk's dk and stores the final dk
    dk_ut = torch.empty(rows, H, K, dtype=k.dtype if fold else torch.float32, device=dev)
    dv = torch.empty_like(v)
    dbeta = torch.empty(rows, H, dtype=torch.float32, device=dev)
    dP = torch.empty(rows, H, BT, dtype=torch.float32, device=dev) if vector else None
    gpos = torch.empty(rows, H, *((K,) if vector else ()), dtype=torch.float32, device=dev)   # dGpos's UT part
    launch(mod.ut_bwd, (L.NT, H), G, k=k, v=v, beta=beta, G=G, P=P, Tm=Tm, u=vnew, du=du, dw=dw, dk=dk_ut,
           dka=dk_add if fold else None, dv=dv, dbeta=dbeta, dP=dP, dGpos=gpos, **L.chunks, H=H, HQ=HQ, K=K, V=V,
           BT=BT, VECTOR=vector, HALF=half, ADD=fold, **tuning.launch("ut_bwd", tk))
    if vector:   # the intra-chunk parts of A (q, k) and P (k, k) in one pass, every sum done in the kernel
        host.intra_pairs(mod, q, k, G, dA_or_dGpos, dP, dq, dk_add, dk_ut, gpos, L, H, HQ, K, True, tk)
        dq, dk, dGpos = group_sum(dq, HQ).to(q.dtype), group_sum(dk_ut, HQ).to(k.dtype), gpos
    else:
        dk = dk_ut if fold else (dk_add.float() + group_sum(dk_ut, HQ)).to(k.dtype)
        dGpos = dA_or_dGpos + gpos
    dgate = gate_grads(mod, gate, gate_inputs, dGpos, L, K, carry[0]) if want_carry else [None] * len(gate_inputs)
    return (dq, dk, dv, dbeta.to(beta.dtype)), dh0, dgate


def _step(mod, tensors) -> host.Step:
    q, k, v, beta = tensors
    return host.Step("recurrent_delta_fwd", mod.recurrent_delta_fwd, q, k, v, dict(beta=beta))


def recurrent(mod, gate, L, scale, store_final, tensors, h0, gate_inputs):
    """The step form: (o, final state)."""
    return host.step_form(mod, gate, L, scale, store_final, _step(mod, tensors), h0, gate_inputs)


def run_triton(mod, variant, bound: Bound, mode: str):
    """An op call of a delta-rule spec on the generated Triton kernels (CUDA, or the interpreter)."""
    K = bound.size("K")
    if K > MAX_K:
        raise ValueError(f"key head dim: got {K}, the delta-rule kernels hold a whole key row in registers "
                         f"and support at most {MAX_K}")
    x = host.Prepared(mod, bound, variant, fuse=False)
    B, T, H, V = x.shape
    beta = torch.broadcast_to(x.roles["beta"].float(), (B, T, H)).reshape(B * T, H).contiguous()
    return x.finish(bound, *host.run_chunk(HOST, mod, variant, bound, mode, (x.q, x.k, x.v, beta), x))


HOST = host.Form(forward, recurrent, backward)
