"""Host side of the general (diagonal-plus-low-rank) chunk form: launching a spec's generated stages and
their autograd (docs/chunk_math.md section 3; the kernels come from the general_* stage templates).

    gate_fwd (G) -> general_scores_fwd (Aqk, Aqb, Lab, Lak) -> general_solve_fwd
        (Tm, Mak, Wa) -> general_state_fwd (h[c], R) -> general_output_fwd (o)
    backward: general_state_bwd (dS', dR) -> general_dv_bwd -> general_dmat_bwd -> general_dqk_bwd
        [-> general_chunk_intra_bwd, general_intra_diag_bwd, general_intra_bwd] -> general_dgate_bwd + gate_bwd
    fused_recurrent: general_recurrent_fwd; its backward recomputes the chunk states.

Roles other than the log-decay (q, k, v, a, b, skip) are evaluated in torch, so autograd carries their
gate expressions; the log-decay expression runs inside gate_fwd / gate_bwd.
"""

from __future__ import annotations

import torch
import triton

from . import host, tuning
from .args import Bound
from .host import BC, BT, DIAG_SPAN, diag_span, gate_grads, group_sum, launch

_SAVED = ("G", "Aqk", "Aqb", "Tm", "Mak", "Wa", "h", "R", "qg", "kg", "bg")


def forward_states(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, store_final, for_bwd=True):
    """Every forward stage but the output: what the output and the backward need. Intermediates that the later
    stages only use as matrix-product operands are kept in the inputs' half type (if any). Without ``for_bwd`` (no
    gradient wanted) what only the backward reads (Tm) is not written."""
    rows, HQ, K, H, V, vector, half, dev, tk = host.sizes(mod, gate, q, v, L)
    sd = torch.float32 if half == 0 else q.dtype
    G = host.run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=True)
    Aqk, Aqb = (torch.empty(rows, H, BT, dtype=sd, device=dev) for _ in range(2))
    Lab, Lak = (torch.empty(rows, H, BT, dtype=torch.float32, device=dev) for _ in range(2))
    # and the rows decayed for the state passes, qg = Q * E[G], kg = K * E[G_n - G], bg = B * E[G_n - G]
    Wa, qg, kg, bg = (torch.empty(rows, H, K, dtype=sd, device=dev) for _ in range(4))
    Tm = torch.empty(rows, H, BT, dtype=torch.float32, device=dev)
    Mak = torch.empty(rows, H, BT, dtype=sd, device=dev)
    scores = dict(q=q, k=k, a=a, b=b, G=G, Aqk=Aqk, Aqb=Aqb, Lab=Lab, Lak=Lak, qg=qg, kg=kg, bg=bg, **L.chunks,
                  scale=scale, H=H, HQ=HQ, K=K, BT=BT, BC=BC, HALF=half)
    if vector:
        # the chunks whose decay across the whole chunk is within the span in one go; the steeper chunks' sub-block
        # rows by the same kernel, one after the other (FBK their key block)
        launch(mod.general_chunk_scores_fwd, (L.NT, H), G, **scores, CSPAN=diag_span(half),
               **tuning.launch("general_chunk_scores_fwd", tk))
    else:
        launch(mod.general_scores_fwd, (BT // BC, L.NT, H), G, **scores, VECTOR=vector, SPAN=diag_span(half),
               CSPAN=-1.0, **tuning.launch("general_scores_fwd", tk))
    launch(mod.general_solve_fwd, (L.NT, H), G, a=a, G=G, Lab=Lab, Lak=Lak, Tm=Tm, Mak=Mak, Wa=Wa, **L.chunks, H=H,
           K=K, BT=BT, BC=BC, VECTOR=vector, HALF=half, STORE_T=for_bwd, **tuning.launch("general_solve_fwd", tk))
    del Lab, Lak
    h = torch.empty(L.NT, H, K, V, dtype=sd, device=dev)
    R = torch.empty(rows, H, V, dtype=sd, device=dev)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if store_final else None
    so = tuning.launch("general_state_fwd", tk)
    launch(mod.general_state_fwd, (triton.cdiv(V, so["BV"]), L.N * H), G, kg=kg, bg=bg, v=v, G=G, Wa=Wa, Mak=Mak, h=h,
           R=R, h0=h0, ht=ht, **L.seqs, H=H, K=K, V=V, BT=BT, VECTOR=vector, USE_H0=h0 is not None,
           STORE_FINAL=store_final, HALF=half, **so)
    return dict(G=G, Aqk=Aqk, Aqb=Aqb, Tm=Tm, Mak=Mak, Wa=Wa, h=h, R=R, qg=qg, kg=kg, bg=bg), ht


def output(mod, gate, q, v, st, L, scale):
    """(o, which of its tiles hold a non-finite value: host.contain's input)."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    o = torch.empty(rows, H, V, dtype=v.dtype, device=q.device)
    oo = tuning.launch("general_output_fwd", host.launch_key(mod, gate, q, V, L, H))
    bad = torch.empty(L.NT, H, triton.cdiv(V, oo["BV"]), dtype=torch.int8, device=q.device)
    launch(mod.general_output_fwd, (triton.cdiv(V, oo["BV"]), L.NT, H), o, qg=st["qg"], v=v, h=st["h"], R=st["R"],
           Aqk=st["Aqk"], Aqb=st["Aqb"], o=o, bad=bad, **L.chunks, scale=scale, H=H, K=K, V=V, BT=BT,
           HALF=tuning.half_kind(q.dtype), **oo)
    return o, bad


def forward(mod, gate, L, scale, store_final, tensors, h0, gate_inputs, for_bwd=True):
    """(o, final state, what the backward keeps: nothing without ``for_bwd``)."""
    q, k, v, a, b = tensors
    st, ht = forward_states(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, store_final, for_bwd=for_bwd)
    o, bad = output(mod, gate, q, v, st, L, scale)
    host.contain(mod, gate, L, scale, _step(mod, tensors), st["G"], st["h"], o, bad)
    return o, ht, (tuple(st[n] for n in _SAVED) if for_bwd else ())


def _step(mod, tensors) -> host.Step:
    q, k, v, a, b = tensors
    return host.Step("general_recurrent_fwd", mod.general_recurrent_fwd, q, k, v, dict(a=a, b=b))


def recurrent(mod, gate, L, scale, store_final, tensors, h0, gate_inputs):
    """The step form: (o, final state)."""
    return host.step_form(mod, gate, L, scale, store_final, _step(mod, tensors), h0, gate_inputs)


def backward(mod, gate, L, scale, tensors, h0, gate_inputs, saved, do, dht, need_gate_grads):
    """Gradients of (q, k, v, a, b), of h0 and of the gate inputs. ``saved``: forward's, or None (recompute)."""
    q, k, v, a, b = tensors
    if saved is None:   # the step form's backward: the chunk backward, on recomputed chunk states
        st, _ = forward_states(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, False)
    else:
        st = dict(zip(_SAVED, saved))
    rows, HQ, K, H, V, vector, half, dev, tk = host.sizes(mod, gate, q, v, L)
    G, h = st["G"], st["h"]
    do = do.contiguous()
    dhn = torch.empty_like(h)
    dR = torch.empty(rows, H, V, dtype=torch.float32, device=dev)
    dh0 = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    so = tuning.launch("general_state_bwd", tk)
    launch(mod.general_state_bwd, (triton.cdiv(V, so["BV"]), L.N * H), G, qg=st["qg"], bg=st["bg"], G=G, Wa=st["Wa"],
           Aqb=st["Aqb"], do=do, dht=dht, dhn=dhn, dR=dR, dh0=dh0, **L.seqs, scale=scale, H=H, K=K, V=V, BT=BT,
           VECTOR=vector, USE_DHT=dht is not None, STORE_DH0=h0 is not None, HALF=half, **so)
    dv = torch.empty_like(v)
    o = tuning.launch("general_dv_bwd", tk)
    launch(mod.general_dv_bwd, (triton.cdiv(V, o["BV"]), L.NT, H), G, kg=st["kg"], Aqk=st["Aqk"], Mak=st["Mak"],
           do=do, dhn=dhn, dR=dR, dv=dv, **L.chunks, H=H, K=K, V=V, BT=BT, HALF=half, **o)
    # outputs per value head, in the inputs' dtypes unless grouped q/k heads are still to be summed
    qk_dtype = q.dtype if HQ == H else torch.float32
    outs = {n: torch.empty(rows, H, K, dtype=dt, device=dev)
            for n, dt in zip(("dq", "dk", "da", "db"), (qk_dtype, qk_dtype, a.dtype, b.dtype))}
    # vector decays: general_dqk_bwd leaves the state terms (fp32) to general_intra_bwd
    direct = {n: torch.empty(rows, H, K, dtype=torch.float32, device=dev) for n in outs} if vector else outs
    outs_o = {f"{n}_o": t for n, t in outs.items()}   # the intra stages' names for the final gradients
    oq = tuning.launch("general_dqk_bwd", tk)
    NK = triton.cdiv(K, oq["BK"])
    # gate terms: vector decays get dGpos from general_intra_bwd; scalar decays X, Q per key block
    X, Q = (torch.empty(rows, H, NK, dtype=torch.float32, device=dev) for _ in range(2)) if not vector else (G, G)
    dmats = {n: torch.empty(rows, H, BT, dtype=torch.float32, device=dev) for n in ("dAqk", "dAqb", "dLab", "dLak")}
    # dY = Tm^T dR once, by general_dmat_bwd, for general_dqk_bwd's key blocks (which each formed it before)
    dY = torch.empty(rows, H, V, dtype=torch.float32 if half == 0 else q.dtype, device=dev)
    launch(mod.general_dmat_bwd, (L.NT, H), G, v=v, Tm=st["Tm"], R=st["R"], dR=dR, do=do, **dmats, dY=dY, **L.chunks,
           scale=scale, H=H, V=V, BT=BT, HALF=half, **tuning.launch("general_dmat_bwd", tk))
    # each chunk's gate carry formed from the states (precise; host.gate_grads)
    carry = torch.empty(L.NT, H, K if vector else NK, dtype=torch.float32, device=dev) \
        if need_gate_grads and gate.grads else None
    launch(mod.general_dqk_bwd, (NK, L.NT, H), G, q=q, k=k, a=a, b=b, v=v, G=G, dY=dY, h=h, dhn=dhn, R=st["R"], do=do,
           **direct, **dmats, X=X, Q=Q, carry=carry, **L.chunks, scale=scale, H=H, HQ=HQ, K=K, V=V, BT=BT,
           VECTOR=vector, HALF=half, CARRY=carry is not None, **oq)
    del dhn, dR, dY
    if vector:
        dGpos = torch.empty(rows, H, K, dtype=torch.float32, device=dev)
        # the chunks whose decay across the whole chunk is <= DIAG_SPAN (RWKV7's always: >= -0.61 per step): every
        # pair term as [BT, BT] x [BT, BK] products through the chunk's start, in one launch; the two launches
        # below take the steeper chunks: the diagonal sub-blocks (one program per sub-block and head), then the
        # sub-blocks below them through their reference rows
        oc = tuning.launch("general_chunk_intra_bwd", tk)
        intra = dict(q=q, k=k, a=a, b=b, G=G, **dmats, **direct, **L.chunks, H=H, HQ=HQ, K=K, BT=BT, CSPAN=DIAG_SPAN)
        launch(mod.general_chunk_intra_bwd, (triton.cdiv(K, oc["BK"]), L.NT, H), G, **intra, **outs_o, dGpos=dGpos,
               CARRY=carry is not None, **oc)
        od = tuning.launch("general_intra_diag_bwd", tk)
        launch(mod.general_intra_diag_bwd, (BT // BC // od["RB"], L.NT, H), G, **intra, BC=BC, SPAN=DIAG_SPAN,
               DOT=int(half == 1), **od)
        oi = tuning.launch("general_intra_bwd", tk)
        launch(mod.general_intra_bwd, (triton.cdiv(K, oi["BK"]), L.NT * (BT // BC // oi["RB"]), H), G, **intra,
               **outs_o, dGpos=dGpos, BC=BC, HALF=half, CARRY=carry is not None, **oi)
        del direct
    dgate = [None] * len(gate_inputs)
    if carry is not None:
        if not vector:   # dGpos_t = X_t + Q_{t+1}, summed over key blocks
            X, Q = X.sum(-1, keepdim=True), Q.sum(-1, keepdim=True)
            dGpos = torch.empty_like(X)
            launch(mod.general_dgate_bwd, (1, L.NT, H), G, X=X, Q=Q, dGpos=dGpos, **L.chunks, H=H, W=1, BT=BT,
                   CARRY=True, **tuning.launch("general_dgate_bwd", tk))
            dGpos = dGpos[..., 0]
        dgate = gate_grads(mod, gate, gate_inputs, dGpos, L, K, carry)
    dq, dk, da, db = outs.values()
    dq, dk = group_sum(dq, HQ).to(q.dtype), group_sum(dk, HQ).to(k.dtype)
    return (dq, dk, dv, da, db), dh0, dgate


def run_triton(mod, variant, bound: Bound, mode: str):
    """An op call of a general-transition spec on the generated Triton kernels (CUDA, or the interpreter)."""
    x = host.Prepared(mod, bound, variant, fuse=False)
    B, T, H, V = x.shape
    K = bound.size("K")
    a, b = (x.roles[r].to(x.q.dtype).reshape(B * T, H, K).contiguous() for r in ("a", "b"))
    return x.finish(bound, *host.run_chunk(HOST, mod, variant, bound, mode, (x.q, x.k, x.v, a, b), x))


HOST = host.Form(forward, recurrent, backward)
