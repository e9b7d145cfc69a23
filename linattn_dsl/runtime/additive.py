"""Host side of the additive chunk form: launching a spec's generated stages, and their autograd.

The kernels come from ``generated/<spec>.py``; this module only allocates buffers, computes grids and
wires forward and backward stages together (CHUNK_MATH.md section 1):

    gate_fwd (G = chunk cumsum of g) -> state_fwd (h[c]) -> [scores_fwd + scores_diag (vector A)] -> output_fwd
    backward: state_bwd (dS) -> dv_bwd -> dqk_bwd [-> dqk_intra_bwd] -> gate_bwd (dg -> d inputs)
"""

from __future__ import annotations

import functools
import os
import re

import torch
import triton

from ..reference import roles as gates_mod
from .args import Bound
from .twin import fused_scale as _fused

BT, BC = 64, 16
# scores_diag's fast form: a diagonal sub-block whose decay across it (nats, any channel) is at most this goes
# through its first row as reference (its right factors up to E[60] ~ 1e26: finite in fp32 products)
DIAG_SPAN = 60.0


def diag_span(half: int) -> float:
    """The decay across a sub-block (nats) up to which its own pairs go through a reference row, for products
    whose operands are in the inputs' type: E[8] for fp16 (its range ends near E[11]), DIAG_SPAN otherwise."""
    return 8.0 if half == 2 else DIAG_SPAN


def launch_opts(kernel: str, defaults: dict | None = None) -> dict:
    """num_warps / num_stages of a stage launch: the defaults given here, or an override for tuning runs
    from LINATTN_LAUNCH, e.g. ``dqk_bwd:w8s2,ut_bwd:w8`` (w = warps, s = stages, m = Triton's maxnreg, the
    registers a thread may hold; k and v = the BK and BV blocks; r = RB, a launch's switch: general_intra_diag_bwd
    r0 off (general_intra_bwd forms the diagonal sub-blocks too), gate_bwd r1 one program per sequence walking
    its chunks and r0 three passes parallel over chunks, a whole-chunk kernel's r0 off; d = DOT, the operand
    type of a whole-chunk kernel's products (_odot: 0 ieee, 1 bf16, 2 fp16, 3 tf32). k, v, r, d apply only to
    launches whose defaults name them)."""
    opts = dict(defaults or {})
    for item in os.environ.get("LINATTN_LAUNCH", "").split(","):
        name, _, spec = item.partition(":")
        if name == kernel:
            for key, val in re.findall(r"([wskvrmd])(\d+)", spec):
                opt = {"w": "num_warps", "s": "num_stages", "k": "BK", "v": "BV", "r": "RB", "m": "maxnreg",
                       "d": "DOT"}[key]
                if key in "wsm" or opt in opts:
                    opts[opt] = int(val)
    return opts


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _half(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


@functools.lru_cache(maxsize=64)
def _dense_tables(B: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cu, chunk_offsets, chunk_indices)`` of ``B`` sequences of ``T`` tokens: pure functions of the shape,
    kept (read-only: kernels only read them), so repeated calls of one shape (every decoding step) launch
    none of their ~9 small ops."""
    n_per = -(-T // BT)
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int64, device=device)
    offsets = torch.arange(0, (B + 1) * n_per, n_per, dtype=torch.int64, device=device)[: B + 1]
    seq = torch.arange(B, device=device).repeat_interleave(n_per)
    within = torch.arange(n_per, device=device).repeat(B)
    return cu, offsets, torch.stack([seq, within], 1).to(torch.int64).contiguous()


class _Layout:
    """Sequence bookkeeping shared by every stage: flattened rows, chunk offsets and indices."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device):
        if cu_seqlens is None:
            self.cu, self.chunk_offsets, self.chunk_indices = _dense_tables(B, T, torch.device(device))
            self.N = B
            self.NT = B * -(-T // BT)
        else:
            self.cu = cu_seqlens.to(torch.int64)
            lens = self.cu[1:] - self.cu[:-1]
            n_chunks = (lens + BT - 1) // BT
            self.N = lens.numel()
            self.chunk_offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
            self.NT = int(self.chunk_offsets[-1].item())
            seq = torch.arange(self.N, device=device).repeat_interleave(n_chunks)
            within = torch.arange(self.NT, device=device) - self.chunk_offsets[seq]
            self.chunk_indices = torch.stack([seq, within], 1).to(torch.int64).contiguous()


def _gate_inputs(bound: Bound, gate) -> list[torch.Tensor]:
    """Raw inputs of the log-decay expression, contiguous; absent optionals as zeros."""
    out = []
    for n in gate.inputs:
        t = bound.tensors[n]
        if t is None:
            t = torch.zeros([bound.sizes[d] for d in bound.spec.dims(n)], device=bound.device, dtype=torch.float32)
        out.append(t.contiguous())
    return out


def _run_gate(mod, gate, inputs, L: _Layout, H: int, K: int, rows: int, cumsum: bool) -> torch.Tensor:
    vector = gate.kind == "vector"
    shape = (rows, H, K) if vector else (rows, H)
    G = torch.empty(shape, dtype=torch.float32, device=L.cu.device)
    BK = _pow2(K) if vector else 16
    grid = (triton.cdiv(K, BK) if vector else 1, L.NT, H)
    getattr(mod, f"gate_fwd_{gate.tag}")[grid](*inputs, G, L.cu, L.chunk_indices, H, K=K, BT=BT, BK=BK,
                                               VECTOR=vector, CUMSUM=cumsum, **launch_opts("gate_fwd"))
    return G


def _forward_states(mod, gate, q, k, v, vs, gate_inputs, h0, L, scale, store_final):
    """gate_fwd, state_fwd and (vector) scores_fwd + scores_diag: what both the output and the backward need."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    G = _run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=True)
    h = torch.empty(L.NT, H, K, V, dtype=torch.float32 if half == 0 else q.dtype, device=q.device)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    BK, BV = _pow2(K), _pow2(V)
    mod.state_fwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), L.N * H)](
        k, v, _or(vs, G), G, h, h0, ht, G, G, L.cu, L.chunk_offsets, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV,
        VECTOR=vector, USE_H0=h0 is not None, STORE_FINAL=store_final, HALF=half, VSCALE=vs is not None, DELTA=False,
        KG=False, DECAY=decays(mod), **launch_opts("add_state_fwd"))
    A = None
    if vector:
        # in the inputs' half type when they have one: its readers (output_fwd, dv_bwd) round it to that type for
        # their products anyway, so only the bytes change (FLA keeps its Aqk in k's dtype too)
        A = torch.empty(rows, H, BT, dtype=q.dtype if half else torch.float32, device=q.device)
        vector_scores(mod, q, k, G, A, None, None, L, scale, H, HQ, K, half)
    return G, h, ht, A


def vector_scores(mod, q, k, G, A, P, kg, L, scale, H, HQ, K, half, qg=None, ke=None):
    """A (and, the delta form, P = the keys' own scores, and kg) of a vector decay in two launches:
    scores_fwd, the sub-blocks below the diagonal as products through reference rows, and scores_diag, the
    diagonal sub-blocks, one program per sub-block and head (which also writes qg = Q * E[G] for output_fwd and
    ke = K * E[G] for ut_fwd when given)."""
    pair = P is not None
    name = "scores_fwd_pair" if pair else "scores_fwd"
    mod.scores_fwd[(BT // BC - 1, L.NT, H)](q, k, G, A, _or(P, A), L.cu, L.chunk_indices, scale, H, HQ, K=K, BT=BT,
                                        BC=BC, HALF=half, PAIR=pair,
                                        **launch_opts(name, dict(BK=_pow2(K, hi=32), num_warps=2 if pair else 1)))
    # one program per diagonal sub-block and head; SPAN: the largest decay across a sub-block (nats, per
    # channel) taken through its first row (right factors up to E[SPAN] in fp32); steeper blocks go per column.
    # H200, T=4096 (bf16, B*T = 32768, 16 heads of 128): KDA 0.340 ms at BK 64 / 2 warps, 0.333 at 32 / 1;
    # GLA 0.198 -> 0.163 (session 11's row programs: 0.628 and 0.514). GLA's scores_fwd: 0.322 at BK 64 / 4
    # warps, 0.267 at 32 / 1
    o = launch_opts(name.replace("fwd", "diag"), dict(BK=_pow2(K, hi=32), num_warps=1))
    mod.scores_diag[(BT // BC, L.NT, H)](q, k, G, A, _or(P, A), _or(kg, A), _or(qg, A), _or(ke, A), L.cu,
                                         L.chunk_indices, scale, H, HQ, K=K, BT=BT, BC=BC, SPAN=DIAG_SPAN,
                                         DOT=int(half == 1), PAIR=pair, KG=kg is not None, QG=qg is not None,
                                         KE=ke is not None, **o)


def _or(x, dummy):
    """A pointer argument that a disabled feature never reads."""
    return dummy if x is None else x


def decays(mod) -> bool:
    """Whether the spec of a generated module has a decay: without one (the delta rule) G is all zeros and the
    forward kernels (DECAY=False) neither read it nor form its factors."""
    spec = getattr(mod, "SPEC", None)
    return spec is None or spec.decay.kind != "none"


def _output_bv(V: int, vector: bool) -> int:
    """output_fwd's value block: up to 128 for vector decays (their A is read, not formed: one program per chunk
    and head reads it once; H100, KDA T=4096: 0.402 -> 0.374 ms), up to 64 otherwise (scalar decays form A =
    q k^T per program; 128 not measured: that sweep run failed in the state passes)."""
    return _pow2(V, hi=128 if vector else 64)


def _output(mod, gate, q, k, v, vs, sk, G, h, A, L, scale, out_dtype, qg=None):
    """o of the chunk form; qg (vector decays): scores_diag's Q * E[G], read instead of q and G."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    o = torch.empty(rows, H, V, dtype=out_dtype, device=q.device)
    # with a value scale (Mamba2), H100 sweep: 2 warps, 1.027 -> 0.895 ms (T=16384), 1.030 -> 0.899 (T=4096)
    # key block, H200 T=4096: vector decays reading q and G (GLA) 64 -> 32, 0.290 -> 0.251 ms; reading qg (KDA)
    # 64 -> 128, 0.192 -> 0.184; scalar decays keep 64
    bk = _pow2(K, hi=128 if qg is not None else 32 if gate.kind == "vector" else 64)
    opts = launch_opts("output_fwd", dict(BK=bk, BV=_output_bv(V, gate.kind == "vector"),
                                          **(dict(num_warps=2) if vs is not None else {})))
    BK, BV = opts.pop("BK"), opts.pop("BV")
    mod.output_fwd[(triton.cdiv(V, BV), L.NT, H)](_or(qg, q), k, v, _or(vs, G), _or(sk, G), G, h, _or(A, G), o,
                                                  L.cu, L.chunk_indices, scale, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                                  VECTOR=gate.kind == "vector", HALF=_half(q.dtype),
                                                  VSCALE=vs is not None, SKIP=sk is not None, QG=qg is not None,
                                                  DECAY=decays(mod), **opts)
    return o


def _backward(mod, gate, saved, do, dht, L, scale, need_gate_grads):
    q, k, v, vs, sk, gate_inputs, h0, G, h, ht, A = saved
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    BK, BV = _pow2(K), _pow2(V)
    NK = triton.cdiv(K, BK)
    do = do.contiguous()
    dhn = torch.empty_like(h)
    dh0 = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    mod.state_bwd[(NK, triton.cdiv(V, BV), L.N * H)](
        q, q, q, G, do, do, do, dht, dhn, dh0, L.cu, L.chunk_offsets, scale, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV,
        VECTOR=vector, USE_DHT=dht is not None, STORE_DH0=h0 is not None, HALF=half, DELTA=False,
        **launch_opts("add_state_bwd"))
    dv = torch.empty_like(v)
    NV = triton.cdiv(V, BV)
    dvs = torch.empty(rows, H, NV, dtype=torch.float32, device=q.device) if vs is not None else None
    dsk = torch.empty(rows, H, NV, dtype=torch.float32, device=q.device) if sk is not None else None
    mod.dv_bwd[(NV, L.NT, H)](q, k, v, _or(vs, G), _or(dvs, G), _or(sk, G), _or(dsk, G), G, _or(A, G), do, dhn, dv,
                              L.cu, L.chunk_indices, scale, H, HQ, K=K, V=V, BT=BT, BK=BK, BV=BV, VECTOR=vector,
                              HALF=half, VSCALE=vs is not None, SKIP=sk is not None, LOCAL=False,
                              # H100 sweep (4 warps, 3 stages before), T=16384 / 4096: scalar decays 2 warps
                              # (retention 0.409 -> 0.346 / 0.347 ms, Mamba2 1.342 -> 1.208 / 1.212), vector
                              # decays 2 stages (GLA 0.475 -> 0.414, 0.478 -> 0.411)
                              **launch_opts("dv_bwd", dict(num_stages=2) if vector else dict(num_warps=2)))
    # with each chunk's gate carry formed from the states (precise; see gate_grads)
    dq, dk, dGpos, *carry = dqk(mod, gate, q, k, v, vs, G, h, do, dhn, A, L, scale,
                                carry=need_gate_grads and bool(gate.grads))
    carry = carry[0] if carry else None
    grads_in = gate_grads(mod, gate, gate_inputs, dGpos, ht, dht, L, K, carry=carry) if need_gate_grads \
        else [None] * len(gate_inputs)
    return dq, dk, dv, (dvs.sum(-1) if dvs is not None else None), (dsk.sum(-1) if dsk is not None else None), \
        dh0, grads_in


def _dqk_opts(delta: bool, vector: bool, vscale: bool) -> dict:
    """dqk_bwd's launch, from per-kernel sweeps on an H100 (benchmarks/launch_sweep.py; B*T = 32768, H = 16,
    D = 128, T = 16384 / 4096; 4 warps and 3 stages before):
    * delta-rule form (it also reads dU and writes dW): 8 warps, and 2 stages for vector decays (KDA 0.907 ->
      0.762 ms; the scalar delta rule 1.068 -> 1.118 at 2 stages, kept at 3);
    * additive form: 8 warps (retention 1.209 -> 0.931 / 1.197 -> 0.933 ms, GLA 0.647 -> 0.620 / 0.648 ->
      0.620); with a value scale (Mamba2) 2 stages instead (2.627 -> 1.729 / 2.636 -> 1.673; 8 warps 2.375).
    (H200, session 13: with the value heads per group a compile-time constant, the scalar delta rule's dqk_bwd
    holds 128 registers instead of 252 at 8 warps, and 2 stages then fit two programs per SM: T=4096
    0.951 -> 0.803 ms at 3 stages, 0.590 at 2.)"""
    if delta:
        return dict(num_warps=8, num_stages=2)
    return dict(num_stages=2) if vscale and not vector else dict(num_warps=8)


def chunk_intra(mod, q, k, G, dA, dP, dq, dk, dk2, dGpos, L, H, HQ, K, pair):
    """dqk_chunk_intra_bwd: dqk_intra_bwd's sums for the chunks whose decay across the whole chunk is <=
    DIAG_SPAN, as whole-chunk products (dqk_intra_bwd, launched after it with the span returned here, keeps
    the steeper chunks). Operands: exact fp32 for fp32 inputs (tf32 put dq 4e-4 off the oracle, H200), tf32
    for half ones."""
    # H200, KDA T=4096 (one call): 2.729 ms at BK 32 / 8 warps, 1.710 at 32 / 4, 2.022 at 64 / 8, 2.272 at 16 / 4;
    # the old kernel alone (r0) 3.864; bf16 operands (d1) 2.568 at 32 / 8, 1.781 at 64 / 8
    o = launch_opts("dqk_chunk_intra_bwd", dict(RB=1, BK=_pow2(K, hi=32), num_warps=4, DOT=3 if _half(q.dtype) else 0))
    if not o.pop("RB"):
        return -1.0   # r0: off, dqk_intra_bwd takes every chunk
    mod.dqk_chunk_intra_bwd[(triton.cdiv(K, o["BK"]), L.NT, H)](
        q, k, G, dA, dP, dq, dk, dk2, dGpos, L.cu, L.chunk_indices, H, HQ, K=K, BT=BT, PAIR=pair, CSPAN=DIAG_SPAN,
        **o)
    return DIAG_SPAN


def dqk(mod, gate, q, k, v, vs, G, h, do, dhn, A, L, scale, du=None, dw=None, defer_intra=False, carry=False):
    """dq, dk (inputs' dtype, groups summed) and dGpos = q dq - k dk (fp32, per value head, [rows, H(, K)];
    the intra pairs without their diagonal) of the additive form with values ``v`` (times ``vs``), states ``h``
    and state gradients ``dhn``; with ``du``, also fills ``dw`` = du h^T (the delta form). ``defer_intra``
    (vector decays, the delta form): (dq, dk, dA) instead, the inter-chunk parts (fp32, per value head) and the
    intra-chunk scores' gradient, for the delta form's dqk_intra_bwd to finish together with its own
    intra-chunk part. ``carry``: also (last) each chunk's gate carry formed from the states, gate_grads'
    ``carry`` (fp32 [chunks, H, K] for vector decays, [chunks, H, key blocks] for scalar ones):
    sum_j k_j dk_j(state terms) + E[G_n] sum_v h dhn, the sum of dGpos over every later position (the delta
    form's too: its values v are then the corrected ones, U' = U - W h)."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    vector = gate.kind == "vector"
    half = _half(q.dtype)
    BV = _pow2(V)
    o = launch_opts("dqk_bwd", dict(BK=_pow2(K), **_dqk_opts(du is not None, vector, vs is not None)))
    NK = triton.cdiv(K, o["BK"])
    carry = torch.empty(L.NT, H, K if vector else NK, dtype=torch.float32, device=q.device) if carry else None
    if vector:
        dq = torch.empty(rows, H, K, dtype=torch.float32, device=q.device)
        dk = torch.empty_like(dq)
        dA = torch.empty(rows, H, BT, dtype=torch.float32, device=q.device)
        dGpos = torch.empty(rows, H, K, dtype=torch.float32, device=q.device)
    else:   # groups are summed in the kernel, in the inputs' dtype
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dA = dq
        dGpos = torch.empty(rows, H, NK, dtype=torch.float32, device=q.device)
    mod.dqk_bwd[(NK, L.NT, H if vector else HQ)](q, k, v, _or(vs, G), G, h, do, dhn, dq, dk, dA, dGpos, _or(du, G),
                                                 _or(dw, G), _or(carry, G), L.cu, L.chunk_indices, scale, H, HQ, K=K,
                                                 V=V, BT=BT, BV=BV, VECTOR=vector, HALF=half, VSCALE=vs is not None,
                                                 DELTA=du is not None, NG=1 if vector else H // HQ,
                                                 CARRY=carry is not None, **o)
    if vector and defer_intra:
        return (dq, dk, dA, carry) if carry is not None else (dq, dk, dA)
    if vector:
        # H200, GLA T=4096: BK 64 -> 32, 2.760 -> 2.491 ms
        cspan = chunk_intra(mod, q, k, G, dA, dA, dq, dk, dk, dGpos, L, H, HQ, K, pair=False)
        # RB: sub-blocks per program; 4 when dqk_chunk_intra_bwd takes the chunks it can (this launch's programs
        # then mostly return at once, and their number is its cost: H200 KDA T=4096, dqk_intra_bwd_pair 0.203 ms
        # at 1, 0.105 at 2, 0.055 at 4), 1 when it is off (every chunk here: the most programs)
        opts = launch_opts("dqk_intra_bwd", dict(BK=_pow2(K, hi=32), RB=4 if cspan >= 0 else 1))
        rb = opts.pop("RB")
        mod.dqk_intra_bwd[(triton.cdiv(K, opts["BK"]), L.NT * (BT // BC // rb), H)](
            q, k, G, dA, dA, dq, dk, dk, dGpos, L.cu, L.chunk_indices, H, HQ, K=K, BT=BT, BC=BC, HALF=half,
            PAIR=False, CSPAN=cspan, RB=rb, **opts)
        dq, dk = group_sum(dq, HQ).to(q.dtype), group_sum(dk, HQ).to(k.dtype)
    else:
        dGpos = dGpos.sum(-1)
    return (dq, dk, dGpos, carry) if carry is not None else (dq, dk, dGpos)


def group_sum(x: torch.Tensor, HQ: int) -> torch.Tensor:
    """[rows, H, K] per value head -> [rows, HQ, K]: the value heads of a q/k head summed."""
    rows, H, K = x.shape
    return x if H == HQ else x.view(rows, HQ, H // HQ, K).sum(2)


def gate_grads(mod, gate, gate_inputs, dGpos, ht, dht, L, K, carry=None) -> list:
    """Gradients of the log-decay's raw inputs from dGpos (the cumulative log-decay's gradient per
    position) and the final-state term sum_v S_T dS_T: gate_bwd (reverse cumsum, sympy chain rule).
    ``carry`` (dqk's, [chunks, H, K] or [chunks, H, key blocks]): each chunk's sum over every later position
    formed from the states, so the running sums stay inside chunks. Without it, the running sum over the
    sequence of dGpos and dfinal: its rounding grows with the sequence (a per-head decay's gradient 1.0e-4 vs
    6.6e-6 at T=260, benchmarks/gate_direct_form.py)."""
    grads_in = [None] * len(gate_inputs)
    if not gate.grads:
        return grads_in
    vector = gate.kind == "vector"
    H = dGpos.shape[1]
    gate_bwd = getattr(mod, f"gate_bwd_{gate.tag}")
    if carry is not None:
        bufs = _grad_buffers(gate, gate_inputs, dGpos)
        BKg = _pow2(K) if vector else 16
        gate_bwd[(triton.cdiv(K, BKg) if vector else 1, L.NT, H)](
            *gate_inputs, *bufs, dGpos.contiguous(), carry if vector else carry.sum(-1).contiguous(), L.cu,
            L.chunk_indices, H, K=K, BT=BT, BK=BKg, VECTOR=vector, WALK=False)
        return [_reduce_to(bufs[i], gate.input_layouts[n], vector).reshape(gate_inputs[i].shape).to(
            gate_inputs[i].dtype) for i, n in enumerate(gate.inputs)]
    if dht is not None and ht is not None:
        dfinal = (ht * dht).sum(-1)
        dfinal = dfinal if vector else dfinal.sum(-1)
    else:
        dfinal = torch.zeros((L.N, H, K) if vector else (L.N, H), dtype=torch.float32, device=dGpos.device)
    bufs = _grad_buffers(gate, gate_inputs, dGpos)
    dGpos = dGpos.contiguous()
    BKg = _pow2(K) if vector else 16
    nk = triton.cdiv(K, BKg) if vector else 1
    # the reverse running sum: with one program per sequence, head and key block filling at least half the card,
    # each walks its sequence's chunks from the last (H200, T=4096, 8 x 16 programs: KDA 0.190 ms); with fewer,
    # three passes, two of them parallel over chunks: chunk totals, the sequences' running sums over chunk
    # totals (NB chunks a step), then every chunk's rows (RWKV7 T=16384, 2 x 16: 0.535 -> 0.248 ms)
    opts = launch_opts("gate_bwd", dict(RB=int(L.N * H * nk >= _sm_count(dGpos.device) // 2)))
    if opts.pop("RB"):
        gate_bwd[(nk, L.N, H)](*gate_inputs, *bufs, dGpos, dfinal.contiguous(), L.cu, L.chunk_indices, H, K=K, BT=BT,
                               BK=BKg, VECTOR=vector, WALK=True, **opts)
    else:
        W = K if vector else 1
        BW = _pow2(W, hi=128)
        totals = torch.empty(L.NT, H, W, dtype=torch.float32, device=dGpos.device)
        carry = torch.empty_like(totals)
        mod.gate_chunk_totals[(triton.cdiv(W, BW), L.NT, H)](dGpos, totals, L.cu, L.chunk_indices, H, W=W, BT=BT,
                                                             BW=BW)
        mod.gate_chunk_carry[(triton.cdiv(W, BW), L.N, H)](totals, dfinal.contiguous(), carry, L.chunk_offsets, H,
                                                           W=W, NB=16, BW=BW)
        gate_bwd[(nk, L.NT, H)](*gate_inputs, *bufs, dGpos, carry, L.cu, L.chunk_indices, H, K=K, BT=BT, BK=BKg,
                                VECTOR=vector, WALK=False, **opts)
    for i, n in enumerate(gate.inputs):
        grads_in[i] = _reduce_to(bufs[i], gate.input_layouts[n], vector).reshape(gate_inputs[i].shape).to(
            gate_inputs[i].dtype)
    return grads_in


def _grad_buffers(gate, gate_inputs, dGpos: torch.Tensor) -> list[torch.Tensor]:
    """gate_bwd's outputs, one per input at the decay's layout (dGpos's shape): in the input's own dtype where
    that layout is the input's (gate_bwd's store rounds, as a cast would, and no cast kernel follows), fp32 where
    the host still sums them down to the input's shape."""
    vector = gate.kind == "vector"
    own = "token_feature" if vector else "token"
    return [torch.empty(dGpos.shape, dtype=x.dtype if gate.input_layouts[n] == own else torch.float32,
                        device=dGpos.device) for n, x in zip(gate.inputs, gate_inputs)]


def _reduce_to(buf: torch.Tensor, layout: str, vector: bool) -> torch.Tensor:
    """Sum a gradient written at the decay's layout ([rows, H(, K)]) down to an input's layout."""
    if layout == "token_feature":
        return buf
    if layout == "token":
        return buf.sum(-1) if vector else buf
    if layout == "head":
        return buf.sum(0).sum(-1) if vector else buf.sum(0)
    return buf.sum(0)   # head_feature


class ChunkAdditive(torch.autograd.Function):
    """(q, k, v, vs, sk, h0, *gate inputs) -> (o, final state); ``vs`` (or None) scales v per token and
    head; ``sk`` (or None) adds the skip term ``sk * v`` to the output."""

    @staticmethod
    def forward(ctx, mod, gate, L, scale, store_final, recurrent, q, k, v, vs, sk, h0, *gate_inputs):
        if recurrent:
            o, ht = _recurrent(mod, gate, q, k, v, vs, sk, gate_inputs, h0, L, scale, store_final, v.dtype)
            saved = None
        else:
            G, h, ht, A = _forward_states(mod, gate, q, k, v, vs, gate_inputs, h0, L, scale, store_final)
            o = _output(mod, gate, q, k, v, vs, sk, G, h, A, L, scale, v.dtype)
            saved = (G, h, A)
        ctx.mod, ctx.gate, ctx.L, ctx.scale, ctx.recurrent = mod, gate, L, scale, recurrent
        ctx.save_for_backward(q, k, v, vs, sk, h0, ht, *gate_inputs, *(saved if saved else ()))
        ctx.n_gate = len(gate_inputs)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        t = ctx.saved_tensors
        q, k, v, vs, sk, h0, ht = t[:7]
        gate_inputs = list(t[7:7 + ctx.n_gate])
        if ctx.recurrent:   # recompute the chunk states; the backward is the chunk backward
            G, h, ht_, A = _forward_states(ctx.mod, ctx.gate, q, k, v, vs, gate_inputs, h0, ctx.L, ctx.scale, True)
            ht = ht if ht is not None else ht_
        else:
            G, h, A = t[7 + ctx.n_gate:]
        if dht is not None and ht is None:
            dht = None
        if dht is not None:   # autograd may hand over an expanded (stride-0) tensor
            dht = dht.contiguous()
        dq, dk, dv, dvs, dsk, dh0, dgate = _backward(ctx.mod, ctx.gate, (q, k, v, vs, sk, gate_inputs, h0, G, h, ht, A),
                                                     do, dht, ctx.L, ctx.scale, any(ctx.needs_input_grad[12:]))
        return (None, None, None, None, None, None, dq, dk, dv, dvs, dsk, dh0, *dgate)


def _recurrent(mod, gate, q, k, v, vs, sk, gate_inputs, h0, L, scale, store_final, out_dtype):
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    g = _run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=False)
    o = torch.empty(rows, H, V, dtype=out_dtype, device=q.device)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    BK = max(16, triton.next_power_of_2(K))
    BV = min(_pow2(V), 32)
    mod.recurrent_fwd[(triton.cdiv(V, BV), L.N * H)](q, k, v, _or(vs, g), _or(sk, g), g, o, h0, ht, L.cu, scale, H,
                                                     HQ, K=K, V=V, BK=BK, BV=BV, VECTOR=gate.kind == "vector",
                                                     USE_H0=h0 is not None, STORE_FINAL=store_final,
                                                     VSCALE=vs is not None, SKIP=sk is not None,
                                                     **launch_opts("recurrent_fwd"))
    return o, ht


class Prepared:
    """An op call's tensors as the stages take them: rows flattened, roles evaluated, dtypes set."""

    def __init__(self, bound: Bound, variant, fuse: bool = True):
        spec = bound.spec
        key = (tuple(sorted(bound.switches.items())), bound.present)
        scale_expr = _fused(spec, key, "value") if fuse and variant.value_scale else None
        skip_expr = _fused(spec, key, "skip") if fuse and variant.skip_scale else None
        exclude = ("log_decay",) + (("value",) if scale_expr is not None else ()) \
            + (("skip",) if skip_expr is not None else ())
        roles = gates_mod.evaluate(bound, exclude=exclude)
        B, T = bound.sizes["B"], bound.sizes["T"]
        H, HQ, K, V = bound.size("H"), bound.size("HQ"), bound.size("K"), bound.size("V")
        self.vs = None
        if scale_expr is not None:   # value = x * vs: the kernels scale x as they load it
            roles["value"] = bound.tensors[spec.value_input]
            self.vs = gates_mod.evaluate_expr(bound, scale_expr, ("B", "T", "H"), torch.float32).reshape(B * T, H)
            self.vs = self.vs.contiguous()
        self.sk = None
        if skip_expr is not None:    # o += x * sk: added by the output stage
            self.sk = gates_mod.evaluate_expr(bound, skip_expr, ("B", "T", "H"), torch.float32).reshape(
                B * T, H).contiguous()
        q, k = roles["query"], roles["key"]
        if spec.resolve(bound.switches).qk_l2norm:
            # the fused norm (one Triton kernel per direction, fp32 inside): x / sqrt(sum x^2 + 1e-6), the
            # oracle's formula; eager, it was 5 ops per tensor each way, with their outputs kept for the backward
            from ..modules import l2_norm
            q, k = l2_norm(q), l2_norm(k)
        dtype = bound.out_dtype
        self.q = q.to(dtype).reshape(B * T, HQ, K).contiguous()
        self.k = k.to(dtype).reshape(B * T, HQ, K).contiguous()
        self.v = roles["value"].to(dtype).reshape(B * T, H, V).contiguous()
        self.roles, self.shape = roles, (B, T, H, V)
        self.L = _Layout(B, T, bound.cu_seqlens, self.q.device)
        self.h0 = bound.initial_state.float().contiguous() if bound.initial_state is not None else None
        self.gate_inputs = _gate_inputs(bound, variant.gate)

    def finish(self, bound: Bound, o: torch.Tensor, ht):
        o = o.reshape(self.shape)
        if "skip" in self.roles:
            o = o + self.roles["skip"].to(o.dtype)
        return o, (ht if bound.output_final_state else None)


def run_triton(mod, variant, bound: Bound, mode: str):
    """An op call on the generated Triton kernels (CUDA, or the interpreter on CPU)."""
    x = Prepared(bound, variant)
    o, ht = ChunkAdditive.apply(mod, variant.gate, x.L, bound.scale, bound.output_final_state,
                                mode == "fused_recurrent", x.q, x.k, x.v, x.vs, x.sk, x.h0, *x.gate_inputs)
    return x.finish(bound, o, ht)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"

