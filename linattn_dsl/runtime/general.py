"""Host side of the general (diagonal-plus-low-rank) chunk form: launching a spec's generated stages and
their autograd (CHUNK_MATH.md section 3; the kernels are general_fwd.py.j2 / general_bwd.py.j2).

    gate_fwd (G) -> general_scores_fwd (Aqk, Aqb, Lab, Lak) -> general_solve_fwd
        (Tm, Mak, Wa) -> general_state_fwd (h[c], R) -> general_output_fwd (o)
    backward: general_state_bwd (dS', dR) -> general_dv_bwd -> general_dqk_bwd [-> general_intra_bwd]
        -> general_dgate_bwd + gate_bwd (d log-decay inputs)
    fused_recurrent: general_recurrent_fwd; its backward recomputes the chunk states.

Roles other than the log-decay (q, k, v, a, b, skip) are evaluated in torch, so autograd carries their
gate expressions; the log-decay expression runs inside gate_fwd / gate_bwd.
"""

from __future__ import annotations

import torch
import triton

from .additive import (BC, BT, DIAG_SPAN, Prepared, _half, _pow2, _run_gate, _sm_count, diag_span, gate_grads,
                       launch_opts)
from .args import Bound


def _state_blocks(K: int, V: int, NH: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BK, BV, stages) of the sequential state passes over ``NH`` sequences x heads: the whole key dim in one
    block. Half inputs with K <= 128: the value block (32, 64 or 128) whose programs (NH per value block) take
    the fewest waves over the card's SMs, the smaller of a tie. Each program walks every chunk of its sequence,
    so a second wave costs a whole pass: H200, RWKV7 T=4096 (128 sequences x heads, V=128, one call):
    general_state_fwd 0.473 ms at BV 32 (512 programs), 0.287 at 128 (128 programs, 2 stages);
    general_state_bwd 0.519 -> 0.383. At T=16384 (32) BV 32 is one wave. Otherwise (fp32, K=256: sm_90 spills
    more at wider blocks) 4096 / BK. Software pipelining: prefetching the next chunks' [BT, K] tiles hides the
    loop's load latency, within the 227 KiB of shared memory of an H100 / H200 (sm_90, bf16 K=128: 196 KiB at
    depth 3 and BV 32, 208 KiB at depth 2 and BV 128; bf16 K=256 or fp32 K=128 take one stage)."""
    BK = max(16, triton.next_power_of_2(K))
    if dtype.itemsize == 2 and BK <= 128:
        sms = _sm_count(device)
        top = max(32, triton.next_power_of_2(V))
        BV = min((bv for bv in (32, 64, 128) if bv <= top), key=lambda bv: (-(-NH * triton.cdiv(V, bv) // sms), bv))
        BV = max(16, min(BV, triton.next_power_of_2(V)))
        return BK, BV, 3 if BK * BV <= 4096 else 2
    BV = max(16, min(triton.next_power_of_2(V), 4096 // BK, 64))
    return BK, BV, 3 if BK * dtype.itemsize <= 256 else 1


def _forward(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, store_final, output=False, for_bwd=True):
    """Every forward stage but the output: what the output and the backward need. Intermediates that
    the later stages only use as matrix-product operands are kept in the inputs' half type (if any).
    ``output``: the state pass may form the output too (general_state_fwd r1), returned as "o" then.
    Without ``for_bwd`` (no gradient wanted) what only the backward reads is not written: Tm, and h and R when
    the state pass forms the output."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    dev = q.device
    sd = torch.float32 if half == 0 else q.dtype
    G = _run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=True)
    Aqk, Aqb = (torch.empty(rows, H, BT, dtype=sd, device=dev) for _ in range(2))
    Lab, Lak = (torch.empty(rows, H, BT, dtype=torch.float32, device=dev) for _ in range(2))
    # H100 RWKV7 T=16384: 0.660 ms at 2 warps, 0.566 at 4 (without the diagonal sub-blocks); with them (H200,
    # session 13's sweep): 0.886 ms at BK 32, 0.798 at 16
    # RB 0 (the default; vector decays, the whole-chunk kernel on): not launched, general_chunk_scores_fwd forms the
    # steeper chunks' sub-block rows itself. Each program of this launch cost even when it returned at once: H200,
    # RWKV7 T=4096 (one call), 0.076 ms at r1 with no chunk steeper than the span; at r0 general_chunk_scores_fwd
    # 0.600 -> 0.630. (r1: launched; scalar decays always launch it.)
    o = launch_opts("general_scores_fwd", dict(RB=0, BK=_pow2(K, hi=16 if vector else 32),
                                               num_warps=4 if vector else 2))
    scores_launch = bool(o.pop("RB"))
    # and the rows decayed for the state passes, qg = Q * E[G], kg = K * E[G_n - G], bg = B * E[G_n - G]
    Wa, qg, kg, bg = (torch.empty(rows, H, K, dtype=sd, device=dev) for _ in range(4))
    Tm = torch.empty(rows, H, BT, dtype=torch.float32, device=dev)
    Mak = torch.empty(rows, H, BT, dtype=sd, device=dev)
    # H200 RWKV7 T=16384 (session 13's sweep): general_solve_fwd 1.181 ms at BK 32, 1.023 at 64
    # H200 RWKV7 T=4096 (session 15, one call): 0.547 ms at BK 64 / 4 warps, 0.446 at 32 / 2, 0.355 at 32 / 1,
    # 0.373 at 16 / 1, 0.577 at 128 / 4 (a chunk's [16, 16] sub-block products fill one warp). Tm, Mak and Wa from
    # whole [BT, BT] tiles instead (Tm = (I + N)(I + N^2) D, D the diagonal blocks' inverses, N = D Lab_off): 0.635
    # (fp32 inputs keep 64 / 4: sm_90 spills 1892 B at one warp)
    os_ = launch_opts("general_solve_fwd", dict(RB=0, BK=_pow2(K, hi=32 if half else 64), num_warps=1 if half else 4))
    solve_in_scores = bool(os_.pop("RB"))
    if vector:   # chunks whose decay across the whole chunk is <= the span: [BT, BK] x [BK, BT] products in one go
        # H200, RWKV7 T=16384 (one call): 0.836 ms at BK 32 / 8 warps, 0.600 at 32 / 4, 0.746 at 16 / 4, 0.826 at
        # 64 / 8; general_scores_fwd taking every chunk (r0) 1.458
        oc = launch_opts("general_chunk_scores_fwd", dict(RB=1, BK=_pow2(K, hi=32), num_warps=4))
        cspan = diag_span(half) if oc.pop("RB") else -1.0   # r0: off, general_scores_fwd takes every chunk
        # general_solve_fwd r1: the chunk kernel solves its chunks too (general_solve_fwd keeps the steeper ones)
        fuse_solve = cspan >= 0 and solve_in_scores
        fallback = cspan >= 0 and not scores_launch
        if cspan >= 0:
            mod.general_chunk_scores_fwd[(L.NT, H)](q, k, a, b, G, Aqk, Aqb, Lab, Lak, qg, kg, bg, Tm, Mak, Wa, L.cu,
                                                    L.chunk_indices, scale, H, HQ, K=K, BT=BT, HALF=half, CSPAN=cspan,
                                                    SOLVE=fuse_solve, BC=BC, SBK=os_["BK"], FALLBACK=fallback,
                                                    FBK=o["BK"], STORE_T=for_bwd, **oc)
    else:
        cspan, fuse_solve, fallback = -1.0, False, False
    if not fallback:
        mod.general_scores_fwd[(BT // BC, L.NT, H)](q, k, a, b, G, Aqk, Aqb, Lab, Lak, qg, kg, bg, L.cu,
                                                    L.chunk_indices, scale, H, HQ, K=K, BT=BT, BC=BC, VECTOR=vector,
                                                    HALF=half, SPAN=diag_span(half), CSPAN=cspan, **o)
    if not (fuse_solve and fallback):   # (the chunk kernel solved every chunk)
        mod.general_solve_fwd[(L.NT, H)](a, G, Lab, Lak, Tm, Mak, Wa, L.cu, L.chunk_indices, H,
                                         K=K, BT=BT, BC=BC, VECTOR=vector, HALF=half,
                                         CSPAN=cspan if fuse_solve else -1.0, STORE_T=for_bwd, **os_)
    del Lab, Lak
    h = torch.empty(L.NT, H, K, V, dtype=sd, device=dev)
    R = torch.empty(rows, H, V, dtype=sd, device=dev)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if store_final else None
    BKs, BVs, stages = _state_blocks(K, V, L.N * H, q.dtype, dev)
    # r1: the output formed in the state pass (general_output_fwd then not launched; its qg, Aqk, Aqb tiles take
    # the shared memory of one pipelining stage: sm_90 bf16 K=128 at 3 stages would need 292 KiB)
    fused = bool(launch_opts("general_state_fwd", dict(RB=0))["RB"]) and output
    stages = min(stages, 2 if fused else 3)
    so = launch_opts("general_state_fwd", dict(RB=0, BV=BVs, num_warps=8, num_stages=stages))
    so.pop("RB")
    o = torch.empty(rows, H, V, dtype=v.dtype, device=dev) if fused else None
    mod.general_state_fwd[(triton.cdiv(V, so["BV"]), L.N * H)](
        kg, bg, v, G, Wa, Mak, h, R, h0, ht, qg, Aqk, Aqb, o if fused else R, L.cu, L.chunk_offsets, scale, H, K=K,
        V=V, BT=BT, BK=BKs, VECTOR=vector, USE_H0=h0 is not None, STORE_FINAL=store_final, HALF=half, OUT=fused,
        STORE_H=for_bwd or not fused, **so)
    return dict(G=G, Aqk=Aqk, Aqb=Aqb, Tm=Tm, Mak=Mak, Wa=Wa, h=h, R=R, qg=qg, kg=kg, bg=bg, o=o), ht


def _output(mod, gate, q, v, st, L, scale):
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    o = torch.empty(rows, H, V, dtype=v.dtype, device=q.device)
    # H200 RWKV7 T=4096 (session 15): 0.297 ms at BK 64 / BV 64, 0.265 at 64 / 128, 0.237 at 128 / 128 (next call)
    # (fp32 inputs keep BK 64: sm_90 spills 40772 B at 128)
    oo = launch_opts("general_output_fwd", dict(BK=_pow2(K, hi=128 if _half(q.dtype) else 64), BV=_pow2(V, hi=128)))
    mod.general_output_fwd[(triton.cdiv(V, oo["BV"]), L.NT, H)](
        st["qg"], v, st["h"], st["R"], st["Aqk"], st["Aqb"], o, L.cu, L.chunk_indices, scale, H, K=K, V=V, BT=BT,
        HALF=_half(q.dtype), **oo)
    return o


def _recurrent(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, store_final):
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    g = _run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=False)
    o = torch.empty(rows, H, V, dtype=v.dtype, device=q.device)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    BK = max(16, triton.next_power_of_2(K))
    BV = min(_pow2(V), 32)
    mod.general_recurrent_fwd[(triton.cdiv(V, BV), L.N * H)](
        q, k, v, a, b, g, o, h0, ht, L.cu, scale, H, HQ, K=K, V=V, BK=BK, BV=BV, VECTOR=gate.kind == "vector",
        USE_H0=h0 is not None, STORE_FINAL=store_final)
    return o, ht


def _group_sum(x: torch.Tensor, HQ: int) -> torch.Tensor:
    """[rows, H, K] per value head -> [rows, HQ, K]: the value heads of one q/k head summed."""
    rows, H, K = x.shape
    return x if H == HQ else x.view(rows, HQ, H // HQ, K).sum(2)


def _backward(mod, gate, q, k, v, a, b, gate_inputs, h0, st, ht, do, dht, L, scale, need_gate_grads):
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    dev = q.device
    G, h = st["G"], st["h"]
    do = do.contiguous()
    dhn = torch.empty_like(h)
    dR = torch.empty(rows, H, V, dtype=torch.float32, device=dev)
    dh0 = torch.empty(L.N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    BKs, BVs, stages = _state_blocks(K, V, L.N * H, q.dtype, dev)
    so = launch_opts("general_state_bwd", dict(BV=BVs, num_warps=8, num_stages=stages))
    mod.general_state_bwd[(triton.cdiv(V, so["BV"]), L.N * H)](
        st["qg"], st["bg"], G, st["Wa"], st["Aqb"], do, dht, dhn, dR, dh0, L.cu, L.chunk_offsets, scale, H, K=K, V=V,
        BT=BT, BK=BKs, VECTOR=vector, USE_DHT=dht is not None, STORE_DH0=h0 is not None, HALF=half, **so)
    dv = torch.empty_like(v)
    BK, BV = _pow2(K), _pow2(V)
    mod.general_dv_bwd[(triton.cdiv(V, BV), L.NT, H)](
        st["kg"], st["Aqk"], st["Mak"], do, dhn, dR, dv, L.cu, L.chunk_indices, H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        HALF=half)
    # outputs per value head, in the inputs' dtypes unless grouped q/k heads are still to be summed
    qk_dtype = q.dtype if HQ == H else torch.float32
    outs = [torch.empty(rows, H, K, dtype=dt, device=dev) for dt in (qk_dtype, qk_dtype, a.dtype, b.dtype)]
    # vector decays: general_dqk_bwd leaves the state terms (fp32) to general_intra_bwd
    direct = [torch.empty(rows, H, K, dtype=torch.float32, device=dev) for _ in range(4)] if vector else outs
    NK = triton.cdiv(K, BK)
    # gate terms: vector decays get dGpos from general_intra_bwd; scalar decays X, Q per key block
    X, Q = (torch.empty(rows, H, NK, dtype=torch.float32, device=dev) for _ in range(2)) if not vector else (G, G)
    dmats = [torch.empty(rows, H, BT, dtype=torch.float32, device=dev) for _ in range(4)]
    # dY = Tm^T dR once, by general_dmat_bwd, for general_dqk_bwd's key blocks (which each formed it before)
    dY = torch.empty(rows, H, V, dtype=torch.float32 if half == 0 else q.dtype, device=dev)
    mod.general_dmat_bwd[(L.NT, H)](v, st["Tm"], st["R"], dR, do, *dmats, dY, L.cu, L.chunk_indices, scale, H, V=V,
                                    BT=BT, BV=BV, HALF=half,
                                    # H100 RWKV7 T=16384 bf16: 0.733 ms at 8 warps / 3 stages, 0.564 at 4 / 2
                                    **launch_opts("general_dmat_bwd", dict(num_warps=4 if half else 8, num_stages=2)))
    # each chunk's gate carry formed from the states (precise; additive.gate_grads)
    carry = torch.empty(L.NT, H, K if vector else NK, dtype=torch.float32, device=dev) \
        if need_gate_grads and gate.grads else None
    mod.general_dqk_bwd[(NK, L.NT, H)](
        q, k, a, b, v, G, dY, h, dhn, st["R"], do, *direct, *dmats, X, Q, G if carry is None else carry, L.cu,
        L.chunk_indices, scale, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV, VECTOR=vector, HALF=half,
        CARRY=carry is not None, **launch_opts("general_dqk_bwd", dict(num_warps=8, num_stages=3 if half else 2)))
    del dhn, dR, dY
    if vector:
        dGpos = torch.empty(rows, H, K, dtype=torch.float32, device=dev)
        # small programs, many per SM (H100, RWKV7 T=16384, the per-column diagonal loop: 29.3 ms at 8 warps
        # and BK 32, 16.5 at 4, 10.2 at 2, 9.0 at 1 warp and BK 16; the halves' [HB, HB, BK] tiles: 7.0 at 1
        # warp and BK 16, 8.4 at 2 warps and BK 32, 10.8 at 2 warps and BK 16, 20.9 at 4)
        # RB > 0: the diagonal sub-blocks' terms by general_intra_diag_bwd first (one program per sub-block and
        # head), and general_intra_bwd without them (no [HB, HB, BK] tiles); RB = 0 (LINATTN_LAUNCH
        # general_intra_diag_bwd:r0): all in one. H200, RWKV7 T=16384: 5.96 ms in one; 3.51 without the
        # diagonal + 1.88 for it by row programs (2 rows x 2 heads, exact per channel); without the diagonal's
        # tiles general_intra_bwd takes wider key blocks: 3.53 ms at BK 16 / 1 warp, 2.26 at 64 / 2 warps
        # One program per diagonal sub-block and head instead of the row programs (H200, RWKV7 T=16384, one
        # call): 1.914 -> 1.752 ms at BK 32 / 4 warps, 1.621 at 32 / 2 (1.821 at 16 / 2, 1.920 at 64 / 4);
        # next call: 1.617 at 32 / 2, 1.468 at 64 / 2
        # chunks whose decay across the whole chunk is <= CSPAN (RWKV7's always: >= -0.61 per step): every pair
        # term as [BT, BT] x [BT, BK] products through the chunk's start, in one launch; the two launches below
        # take the steeper chunks (sub-blocks through their reference rows, per channel inside steep ones)
        # H200, RWKV7 T=16384 (one call): 3.935 ms at BK 32 / 8 warps, 2.275 at 32 / 4 (sm_90 bf16 D=128: 255
        # registers and 52 B spilled there, none at 8 warps), 2.824 at 64 / 8, 3.791 at 16 / 4; the two old kernels
        # taking every chunk (r0) 2.387 + 1.521
        oc = launch_opts("general_chunk_intra_bwd", dict(RB=1, BK=_pow2(K, hi=32), num_warps=4))
        cspan = DIAG_SPAN if oc.pop("RB") else -1.0   # r0: off, the two launches below take every chunk
        if cspan >= 0:
            mod.general_chunk_intra_bwd[(triton.cdiv(K, oc["BK"]), L.NT, H)](
                q, k, a, b, G, *dmats, *direct, *outs, dGpos, L.cu, L.chunk_indices, H, HQ, K=K, BT=BT, CSPAN=cspan,
                DOT=int(half == 1), CARRY=carry is not None, **oc)
        # RB: sub-blocks per program (general_intra_diag_bwd r0: off). When the whole-chunk kernel takes most
        # chunks, these launches' programs return at once, and their number is the launch's cost (H200, RWKV7
        # T=4096, one call: general_intra_bwd 0.123 + general_intra_diag_bwd 0.084 ms at one sub-block each,
        # 0.034 + 0.024 at 4): 4 with the whole-chunk kernel on, 1 with it off (every chunk here: the most programs)
        rb = 4 if cspan >= 0 else 1
        od = launch_opts("general_intra_diag_bwd", dict(RB=rb, BK=_pow2(K, hi=64), num_warps=2))
        rbd = od.pop("RB")
        diag = rbd > 0
        opts = launch_opts("general_intra_bwd", dict(RB=rb, BK=_pow2(K, hi=64), num_warps=2) if diag
                           else dict(RB=rb, BK=16, num_warps=1))
        rbi = opts.pop("RB")
        if diag:
            mod.general_intra_diag_bwd[(BT // BC // rbd, L.NT, H)](
                q, k, a, b, G, *dmats, *direct, L.cu, L.chunk_indices, H, HQ, K=K, BT=BT, BC=BC, SPAN=DIAG_SPAN,
                DOT=int(half == 1), CSPAN=cspan, RB=rbd, **od)
        mod.general_intra_bwd[(triton.cdiv(K, opts["BK"]), L.NT * (BT // BC // rbi), H)](
            q, k, a, b, G, *dmats, *direct, *outs, dGpos, L.cu, L.chunk_indices, H, HQ, K=K, BT=BT, BC=BC,
            HALF=half, DIAG=not diag, CSPAN=cspan, RB=rbi, CARRY=carry is not None, **opts)
        del direct
    grads_in = [None] * len(gate_inputs)
    if need_gate_grads and gate.grads:
        if not vector:   # dGpos_t = X_t + Q_{t+1}, summed over key blocks
            X, Q = X.sum(-1, keepdim=True), Q.sum(-1, keepdim=True)
            dGpos = torch.empty_like(X)
            mod.general_dgate_bwd[(1, L.NT, H)](X, Q, dGpos, L.cu, L.chunk_indices, H, W=1, BT=BT, BW=16,
                                                CARRY=carry is not None)
            dGpos = dGpos[..., 0]
        grads_in = gate_grads(mod, gate, gate_inputs, dGpos, ht, dht, L, K, carry=carry)
    dq, dk, da, db = outs
    dq, dk = _group_sum(dq, HQ).to(q.dtype), _group_sum(dk, HQ).to(k.dtype)
    return dq, dk, dv, da, db, dh0, grads_in


class ChunkGeneral(torch.autograd.Function):
    """(q, k, v, a, b, h0, *gate inputs) -> (o, final state), rows flattened: q, k [rows, HQ, K],
    v [rows, H, V], a, b [rows, H, K], h0 [N, H, K, V] fp32 or None."""

    @staticmethod
    def forward(ctx, mod, gate, L, scale, store_final, recurrent, for_bwd, q, k, v, a, b, h0, *gate_inputs):
        if recurrent:
            o, ht = _recurrent(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, store_final)
            saved = ()
        else:
            st, ht = _forward(mod, gate, q, k, v, a, b, gate_inputs, h0, L, scale, store_final, output=True,
                              for_bwd=for_bwd)
            o = st["o"] if st["o"] is not None else _output(mod, gate, q, v, st, L, scale)
            saved = tuple(st[n] for n in _SAVED) if for_bwd else ()
        ctx.mod, ctx.gate, ctx.L, ctx.scale, ctx.recurrent = mod, gate, L, scale, recurrent
        ctx.n_gate = len(gate_inputs)
        ctx.save_for_backward(q, k, v, a, b, h0, ht, *gate_inputs, *saved)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        t = ctx.saved_tensors
        q, k, v, a, b, h0, ht = t[:7]
        gate_inputs = list(t[7:7 + ctx.n_gate])
        if ctx.recurrent:   # recompute the chunk states; the backward is the chunk backward (with the
            # chunk form's own final state in the gate's final-state term, as in the chunk op)
            st, ht = _forward(ctx.mod, ctx.gate, q, k, v, a, b, gate_inputs, h0, ctx.L, ctx.scale, ht is not None)
        else:
            st = dict(zip(_SAVED, t[7 + ctx.n_gate:]))
        if dht is not None and ht is None:
            dht = None
        if dht is not None:   # autograd may hand over an expanded (stride-0) tensor
            dht = dht.contiguous()
        dq, dk, dv, da, db, dh0, dgate = _backward(ctx.mod, ctx.gate, q, k, v, a, b, gate_inputs, h0, st, ht, do,
                                                   dht, ctx.L, ctx.scale, any(ctx.needs_input_grad[13:]))
        return (None,) * 7 + (dq, dk, dv, da, db, dh0, *dgate)


_SAVED = ("G", "Aqk", "Aqb", "Tm", "Mak", "Wa", "h", "R", "qg", "kg", "bg")


def run_triton(mod, variant, bound: Bound, mode: str):
    """An op call of a general-transition spec on the generated Triton kernels (CUDA, or the interpreter)."""
    x = Prepared(bound, variant, fuse=False)
    B, T, H, V = x.shape
    K = bound.size("K")
    a, b = (x.roles[r].to(x.q.dtype).reshape(B * T, H, K).contiguous() for r in ("a", "b"))
    tensors = (x.q, x.k, x.v, a, b, x.h0, *x.gate_inputs)
    # for_bwd: a gradient will be asked for (else the forward skips what only the backward reads)
    for_bwd = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    o, ht = ChunkGeneral.apply(mod, variant.gate, x.L, bound.scale, bound.output_final_state,
                               mode == "fused_recurrent", for_bwd, *tensors)
    return x.finish(bound, o, ht)
