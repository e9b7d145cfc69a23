"""Host side of the delta-rule chunk form: launching a spec's generated stages, and their autograd.

CHUNK_MATH.md section 2. Per chunk the UT transform turns the delta rule into the additive form with
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

from .additive import (BC, BT, Prepared, _half, _Layout, _or, _output, _pow2, _run_gate, _sm_count, chunk_intra,
                       decays, dqk, gate_grads, group_sum, launch_opts, vector_scores)
from .args import Bound

MAX_K = 256


def _full(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


def _state_bv(BK: int, half: int, seqs_heads: int, V: int, device: torch.device) -> int:
    """Value block of the sequential state kernels, which hold the whole key dim: smaller for big K; 64 when
    the programs it leaves (sequences x heads x value blocks) still cover every SM. H100, B*T = 32768, H = 16,
    V = 128, T=4096 (256 programs at 64): KDA state_fwd 0.471 -> 0.342 ms and state_bwd 0.868 -> 0.717, delta
    rule 0.335 -> 0.282 and 0.452 -> 0.374 (session 9); T=16384 keeps 32 (64 programs at 64 would idle half
    the SMs). fp32 inputs keep 32 (not measured)."""
    if BK > 128:
        return 16
    return 64 if half and seqs_heads * triton.cdiv(V, 64) >= _sm_count(device) else 32


def _state_fwd_bv(BK: int, half: int, vector: bool, seqs_heads: int, V: int, device: torch.device) -> int:
    """state_fwd's value block: vector decays (8 warps, one program per SM: 192 KiB of shared memory at 128)
    take 128 when its programs still occupy nearly every SM, one wave instead of two: KDA T=4096 (128 programs
    on 132 SMs) 0.341 -> 0.294 ms (H100, session 10's sweep, v128; the delta rule's v128 launches failed
    there, and state_bwd got slower, 0.715 -> 0.919, so both keep _state_bv)."""
    if half and vector and BK <= 128 and V >= 128 and seqs_heads * triton.cdiv(V, 128) >= 0.96 * _sm_count(device):
        return 128
    return _state_bv(BK, half, seqs_heads, V, device)


def _state_opts(half: int, BK: int, bwd: bool, vector: bool, programs: int, device: torch.device) -> dict:
    """Launch of the sequential state kernels (one program per sequence, head and value block).

    Software pipelining within sm_90's 227 KiB of shared memory (compiled for sm_90 with aligned pointers,
    triton 3.6, vector decays: bf16 K=128 177-185 KiB at depth 3; bf16 K=256 328-336 KiB at depth 3, 197-205
    at depth 2; fp32 K=128 249-305 KiB at depth 3, 40 KiB at depth 1; see benchmarks/sm90_fit.py).
    bf16/fp16 with K <= 128, measured on an H100 (benchmarks/launch_sweep.py; 4 warps and 3 stages before),
    B*T = 32768, H = 16, V = 128 (128 programs at T=16384, 512 at T=4096):
    * state_bwd, 2 stages, and 8 warps when the programs do not fill two per SM, else 4: delta rule
      0.987 -> 0.832 ms (T=16384, 8 warps) and 0.595 (T=4096, 4 warps; 0.839 at 8); KDA 2.060 -> 1.147 and
      0.860 (1.128 at 8 warps);
    * state_fwd of vector decays 8 warps: KDA 1.008 -> 0.737 ms (T=16384), 0.725 (T=4096; 0.976 at 4); the
      scalar decays' stays at 4 warps (0.551 / 0.343 ms; 0.530 / 0.499 at 8).
    (These times are of session 6's kernel bodies; BENCHMARKS.md has session 7's, whose launches were not
    swept again.)"""
    if not half:
        return dict(num_stages=1)
    if BK > 128:
        return dict(num_stages=2)
    if bwd:   # scalar decays at 3 stages: delta rule 0.709 -> 0.502 ms (T=16384, H100; session 9)
        return dict(num_warps=8 if programs < 2 * _sm_count(device) else 4, num_stages=2 if vector else 3)
    if vector:
        return dict(num_warps=8)
    # scalar decays: 2 stages when the programs fill the SMs (delta rule T=4096, 512 programs: 0.365 ->
    # 0.337 ms; H100, session 9; 256 programs: 0.250 -> 0.227, H200, session 13), Triton's 3 below that
    # (T=16384, 128 programs: 0.356, 0.463 at 2; H100, session 9)
    return dict(num_stages=2) if programs >= _sm_count(device) else {}


def _forward(mod, gate, q, k, v, beta, gate_inputs, h0, L: _Layout, scale, store_final, want_qg=False):
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    dev = q.device
    G = _run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=True)
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
        vector_scores(mod, q, k, G, A, P, kg, L, scale, H, HQ, K, half, qg=qg, ke=ke)
    BK = _full(K)
    # Tm is an operand of half products only, in ut_fwd's W, U' and in ut_bwd; the scalar decays' ut_fwd parks P
    # (fp32, the solve's input) in its rows, so they keep fp32
    Tm = torch.empty(rows, H, BT, dtype=store if vector else torch.float32, device=dev)
    w = torch.empty(rows, H, K, dtype=store, device=dev)
    u1 = torch.empty(rows, H, V, dtype=store, device=dev)
    mod.ut_fwd[(L.NT, H)](_or(ke, k), v, beta, G, _or(P, G), Tm, w, u1, L.cu, L.chunk_indices, H, HQ, K=K, V=V,
                          BT=BT, BC=BC, BK=BK, BKW=_pow2(K), BV=_pow2(V), VECTOR=vector, HALF=half, KE=vector,
                          DECAY=decays(mod),
                          # H100, T=16384, 4 warps before: delta rule 0.984 -> 0.730 ms, KDA 0.941 -> 0.722
                          # and KDA 1 -> 2 stages: 0.709 -> 0.676 ms (H100, T=16384)
                          **launch_opts("ut_fwd", dict(num_warps=2, num_stages=2 if vector else 3)))
    del ke
    h = torch.empty(L.NT, H, K, V, dtype=store, device=dev)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if store_final else None
    vnew = torch.empty_like(u1)
    BV = launch_opts("state_fwd", dict(BV=_state_fwd_bv(BK, half, vector, L.N * H, V, dev)))["BV"]
    mod.state_fwd[(1, triton.cdiv(V, BV), L.N * H)](
        _or(kg, k), u1, G, G, h, h0, ht, w, vnew, L.cu, L.chunk_offsets, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV,
        VECTOR=vector, USE_H0=h0 is not None, STORE_FINAL=store_final, HALF=half, VSCALE=False, DELTA=True, KG=vector,
        DECAY=decays(mod),
        **launch_opts("state_fwd", _state_opts(half, BK, False, vector, L.N * H * triton.cdiv(V, BV), dev)))
    return G, P, Tm, w, h, vnew, ht, A, qg


def _backward(mod, gate, saved, do, dht, L: _Layout, scale, need_gate_grads):
    q, k, v, beta, gate_inputs, h0, G, P, Tm, w, h, vnew, ht, A = saved
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    dev = q.device
    do = do.contiguous()
    BK = _full(K)
    store = q.dtype if half else torch.float32
    # dvl = A^T dO: the intra-chunk part of dU
    dvl = torch.empty(rows, H, V, dtype=store, device=dev)
    # 2 warps: H100, delta rule T=16384, 0.254 -> 0.209 ms (4 warps before)
    ol = launch_opts("dv_bwd_local", dict(BK=_pow2(K), BV=_pow2(V), num_warps=2))
    mod.dv_bwd[(triton.cdiv(V, ol["BV"]), L.NT, H)](q, k, vnew, G, G, G, G, G, _or(A, G), do, G, dvl, L.cu,
                                                    L.chunk_indices, scale, H, HQ, K=K, V=V, BT=BT, VECTOR=vector,
                                                    HALF=half, VSCALE=False, SKIP=False, LOCAL=True, **ol)
    dhn = torch.empty_like(h)
    du = torch.empty(rows, H, V, dtype=store, device=dev)
    dh0 = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    BV = launch_opts("state_bwd", dict(BV=_state_bv(BK, half, L.N * H, V, dev)))["BV"]
    mod.state_bwd[(1, triton.cdiv(V, BV), L.N * H)](
        q, k, w, G, do, dvl, du, dht, dhn, dh0, L.cu, L.chunk_offsets, scale, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV,
        VECTOR=vector, USE_DHT=dht is not None, STORE_DH0=h0 is not None, HALF=half, DELTA=True,
        **launch_opts("state_bwd", _state_opts(half, BK, True, vector, L.N * H * triton.cdiv(V, BV), dev)))
    del dvl
    dw = torch.empty(rows, H, K, dtype=store, device=dev)
    # vector decays: dqk leaves the inter-chunk parts of dq, dk and dA; dqk_intra_bwd finishes them below
    # with each chunk's gate carry formed from the states (precise; additive.gate_grads)
    dq, dk_add, dA_or_dGpos, *carry = dqk(mod, gate, q, k, vnew, None, G, h, do, dhn, A, L, scale, du=du, dw=dw,
                                          defer_intra=vector, carry=need_gate_grads and bool(gate.grads))
    carry = carry[0] if carry else None
    fold = not vector and HQ == H   # ut_bwd adds dqk's dk and stores the final dk
    dk_ut = torch.empty(rows, H, K, dtype=k.dtype if fold else torch.float32, device=dev)
    dv = torch.empty_like(v)
    dbeta = torch.empty(rows, H, dtype=torch.float32, device=dev)
    dP = torch.empty(rows, H, BT, dtype=torch.float32, device=dev) if vector else None
    gpos = torch.empty(rows, H, *((K,) if vector else ()), dtype=torch.float32, device=dev)   # dGpos's UT part
    mod.ut_bwd[(L.NT, H)](k, v, beta, G, _or(P, G), Tm, vnew, du, dw, dk_ut, dk_add if fold else G, dv, dbeta,
                          _or(dP, G), gpos, L.cu, L.chunk_indices, H, HQ, K=K, V=V, BT=BT, BK=_pow2(K), BV=_pow2(V),
                          VECTOR=vector, HALF=half, ADD=fold,
                          # H100, T=16384, 8 warps before: delta rule 0.888 -> 0.558 ms, KDA 1.066 -> 0.834
                          **launch_opts("ut_bwd", dict(num_warps=4)))
    if vector:   # the intra-chunk parts of A (q, k) and P (k, k) in one pass, every sum done in the kernel
        # H100, KDA T=16384: 5.09 ms at BK 64 and 4 warps, 3.87 at BK 32 (scores_fwd: 1.43 -> 1.23 ms, 2 warps)
        cspan = chunk_intra(mod, q, k, G, dA_or_dGpos, dP, dq, dk_add, dk_ut, gpos, L, H, HQ, K, pair=True)
        # RB: sub-blocks per program (programs that return at once, for the chunks dqk_chunk_intra_bwd takes, still
        # cost: H200 KDA T=4096 0.203 ms at one sub-block each, 0.105 at 2, 0.055 at 4); 1 with that kernel off
        opts = launch_opts("dqk_intra_bwd_pair", dict(BK=_pow2(K, hi=32), num_warps=4, RB=4 if cspan >= 0 else 1))
        rb = opts.pop("RB")
        mod.dqk_intra_bwd[(triton.cdiv(K, opts["BK"]), L.NT * (BT // BC // rb), H)](
            q, k, G, dA_or_dGpos, dP, dq, dk_add, dk_ut, gpos, L.cu, L.chunk_indices, H, HQ, K=K, BT=BT, BC=BC,
            HALF=half, PAIR=True, CSPAN=cspan, RB=rb, **opts)
        dq, dk, dGpos = group_sum(dq, HQ).to(q.dtype), group_sum(dk_ut, HQ).to(k.dtype), gpos
    else:
        dk = dk_ut if fold else (dk_add.float() + group_sum(dk_ut, HQ)).to(k.dtype)
        dGpos = dA_or_dGpos + gpos
    grads_in = gate_grads(mod, gate, gate_inputs, dGpos, ht, dht, L, K, carry=carry) if need_gate_grads \
        else [None] * len(gate_inputs)
    return dq, dk, dv, dbeta.to(beta.dtype), dh0, grads_in


class ChunkDelta(torch.autograd.Function):
    """(q, k, v, beta, h0, *gate inputs) -> (o, final state) of the delta rule."""

    @staticmethod
    def forward(ctx, mod, gate, L, scale, store_final, recurrent, q, k, v, beta, h0, *gate_inputs):
        if recurrent:
            o, ht = _recurrent(mod, gate, q, k, v, beta, gate_inputs, h0, L, scale, store_final)
            saved = ()
        else:
            G, P, Tm, w, h, vnew, ht, A, qg = _forward(mod, gate, q, k, v, beta, gate_inputs, h0, L, scale,
                                                       store_final, want_qg=True)
            o = _output(mod, gate, q, k, vnew, None, None, G, h, A, L, scale, v.dtype, qg=qg)
            del qg
            saved = (G, P, Tm, w, h, vnew, A)
        ctx.mod, ctx.gate, ctx.L, ctx.scale, ctx.recurrent = mod, gate, L, scale, recurrent
        ctx.save_for_backward(q, k, v, beta, h0, ht, *gate_inputs, *saved)
        ctx.n_gate = len(gate_inputs)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        t = ctx.saved_tensors
        q, k, v, beta, h0, ht = t[:6]
        gate_inputs = list(t[6:6 + ctx.n_gate])
        if ctx.recurrent:   # recompute the chunk forward; the backward is the chunk backward
            G, P, Tm, w, h, vnew, ht_, A, _ = _forward(ctx.mod, ctx.gate, q, k, v, beta, gate_inputs, h0, ctx.L,
                                                       ctx.scale, True)
            ht = ht if ht is not None else ht_
        else:
            G, P, Tm, w, h, vnew, A = t[6 + ctx.n_gate:]
        if dht is not None and ht is None:
            dht = None
        if dht is not None:
            dht = dht.contiguous()
        saved = (q, k, v, beta, gate_inputs, h0, G, P, Tm, w, h, vnew, ht, A)
        dq, dk, dv, dbeta, dh0, dgate = _backward(ctx.mod, ctx.gate, saved, do, dht, ctx.L, ctx.scale,
                                                  any(ctx.needs_input_grad[11:]))
        return (None, None, None, None, None, None, dq, dk, dv, dbeta, dh0, *dgate)


def _recurrent(mod, gate, q, k, v, beta, gate_inputs, h0, L, scale, store_final):
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    g = _run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=False)
    o = torch.empty(rows, H, V, dtype=v.dtype, device=q.device)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    BV = min(_pow2(V), 32)
    mod.recurrent_delta_fwd[(triton.cdiv(V, BV), L.N * H)](q, k, v, beta, g, o, h0, ht, L.cu, scale, H, HQ, K=K,
                                                           V=V, BK=_full(K), BV=BV, VECTOR=gate.kind == "vector",
                                                           USE_H0=h0 is not None, STORE_FINAL=store_final)
    return o, ht


def run_triton(mod, variant, bound: Bound, mode: str):
    """An op call of a delta-rule spec on the generated Triton kernels (CUDA, or the interpreter)."""
    K = bound.size("K")
    if K > MAX_K:
        raise ValueError(f"key head dim: got {K}, the delta-rule kernels hold a whole key row in registers "
                         f"and support at most {MAX_K}")
    x = Prepared(bound, variant, fuse=False)
    B, T, H, V = x.shape
    beta = torch.broadcast_to(x.roles["beta"].float(), (B, T, H)).reshape(B * T, H).contiguous()
    o, ht = ChunkDelta.apply(mod, variant.gate, x.L, bound.scale, bound.output_final_state,
                             mode == "fused_recurrent", x.q, x.k, x.v, beta, x.h0, *x.gate_inputs)
    return x.finish(bound, o, ht)
