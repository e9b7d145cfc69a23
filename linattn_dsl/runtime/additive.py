"""Host side of the additive chunk form (docs/chunk_math.md section 1): its stages' launches and backward.

    gate_fwd (G = chunk cumsum of g) -> state_fwd (h[c]) -> [scores_fwd + scores_diag (vector A)] -> output_fwd
    backward: state_bwd (dS) -> dv_bwd -> dqk_bwd [-> dqk_chunk_intra_bwd, dqk_intra_bwd] -> gate_bwd
    fused_recurrent: recurrent_fwd; its backward recomputes the chunk states.

The tensors are rows-flattened ([rows, heads, dim]); ``vs`` (or None) scales v per token and head as the kernels
load it, ``sk`` (or None) adds the skip term ``sk * v`` to the output (Mamba2's fused ``x * softplus(dt)``,
``D x``).
"""

from __future__ import annotations

import torch
import triton

from . import host, tuning
from .args import Bound
from .host import BT, gate_grads, launch

def forward_states(mod, gate, q, k, v, vs, gate_inputs, h0, L, scale, store_final):
    """gate_fwd, state_fwd and (vector) scores_fwd + scores_diag: what both the output and the backward need."""
    rows, HQ, K, H, V, vector, half, _, tk = host.sizes(mod, gate, q, v, L, vs is not None)
    G = host.run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=True)
    h = torch.empty(L.NT, H, K, V, dtype=torch.float32 if half == 0 else q.dtype, device=q.device)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    o = tuning.launch("add_state_fwd", tk)
    launch(mod.state_fwd, (triton.cdiv(K, o["BK"]), triton.cdiv(V, o["BV"]), L.N * H), G, k=k, v=v, vs=vs, G=G, h=h,
           h0=h0, ht=ht, w=None, vnew=None, **L.seqs, H=H, HQ=HQ, K=K, V=V, BT=BT, VECTOR=vector,
           USE_H0=h0 is not None, STORE_FINAL=store_final, HALF=half, VSCALE=vs is not None, DELTA=False, KG=False,
           DECAY=host.decays(mod), **o)
    A = None
    if vector:
        # in the inputs' half type when they have one: its readers (output_fwd, dv_bwd) round it to that type for
        # their products anyway, so only the bytes change
        A = torch.empty(rows, H, BT, dtype=q.dtype if half else torch.float32, device=q.device)
        host.vector_scores(mod, q, k, G, A, None, None, L, scale, H, HQ, K, half, tk=tk)
    return G, h, ht, A


def forward(mod, gate, L, scale, store_final, tensors, h0, gate_inputs, for_bwd=True):
    """(o, final state, what the backward keeps)."""
    q, k, v, vs, sk = tensors
    G, h, ht, A = forward_states(mod, gate, q, k, v, vs, gate_inputs, h0, L, scale, store_final)
    o, bad = host.output(mod, gate, q, k, v, vs, sk, G, h, A, L, scale, v.dtype)
    host.contain(mod, gate, L, scale, _step(mod, tensors), G, h, o, bad)
    return o, ht, (G, h, A)


def _step(mod, tensors) -> host.Step:
    q, k, v, vs, sk = tensors
    return host.Step("recurrent_fwd", mod.recurrent_fwd, q, k, v, dict(vs=vs, sk=sk), vs is not None,
                     dict(VSCALE=vs is not None, SKIP=sk is not None))


def recurrent(mod, gate, L, scale, store_final, tensors, h0, gate_inputs):
    """The step form: (o, final state)."""
    return host.step_form(mod, gate, L, scale, store_final, _step(mod, tensors), h0, gate_inputs)


def backward(mod, gate, L, scale, tensors, h0, gate_inputs, saved, do, dht, need_gate_grads):
    """Gradients of (q, k, v, vs, sk), of h0 and of the gate inputs. ``saved``: forward's, or None (recompute)."""
    q, k, v, vs, sk = tensors
    if saved is None:   # the step form's backward: the chunk backward, on recomputed chunk states
        G, h, _, A = forward_states(mod, gate, q, k, v, vs, gate_inputs, h0, L, scale, False)
    else:
        G, h, A = saved
    rows, HQ, K, H, V, vector, half, _, tk = host.sizes(mod, gate, q, v, L, vs is not None)
    do = do.contiguous()
    dhn = torch.empty_like(h)
    dh0 = torch.empty(L.N, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    o = tuning.launch("add_state_bwd", tk)
    launch(mod.state_bwd, (triton.cdiv(K, o["BK"]), triton.cdiv(V, o["BV"]), L.N * H), G, q=q, k=None, w=None, G=G,
           do=do, dvl=None, du=None, dht=dht, dhn=dhn, dh0=dh0, **L.seqs, scale=scale, H=H, HQ=HQ, K=K, V=V, BT=BT,
           VECTOR=vector, USE_DHT=dht is not None, STORE_DH0=h0 is not None, HALF=half, DELTA=False, **o)
    dv = torch.empty_like(v)
    o = tuning.launch("dv_bwd", tk)
    NV = triton.cdiv(V, o["BV"])
    dvs = torch.empty(rows, H, NV, dtype=torch.float32, device=q.device) if vs is not None else None
    dsk = torch.empty(rows, H, NV, dtype=torch.float32, device=q.device) if sk is not None else None
    launch(mod.dv_bwd, (NV, L.NT, H), G, q=q, k=k, v=v, vs=vs, dvs=dvs, sk=sk, dsk=dsk, G=G, A=A, do=do, dhn=dhn,
           dv=dv, **L.chunks, scale=scale, H=H, HQ=HQ, K=K, V=V, BT=BT, VECTOR=vector, HALF=half,
           VSCALE=vs is not None, SKIP=sk is not None, LOCAL=False, **o)
    # with each chunk's gate carry formed from the states (precise; see host.gate_grads)
    carry = need_gate_grads and bool(gate.grads)
    dq, dk, dGpos, *c = host.dqk(mod, gate, q, k, v, vs, G, h, do, dhn, A, L, scale, carry=carry)
    dgate = gate_grads(mod, gate, gate_inputs, dGpos, L, K, c[0]) if carry else [None] * len(gate_inputs)
    dvs = dvs.sum(-1) if dvs is not None else None
    dsk = dsk.sum(-1) if dsk is not None else None
    return (dq, dk, dv, dvs, dsk), dh0, dgate


def run_triton(mod, variant, bound: Bound, mode: str):
    """An op call on the generated Triton kernels (CUDA, or the interpreter on CPU)."""
    x = host.Prepared(mod, bound, variant)
    return x.finish(bound, *host.run_chunk(HOST, mod, variant, bound, mode, (x.q, x.k, x.v, x.vs, x.sk), x))


HOST = host.Form(forward, recurrent, backward)
