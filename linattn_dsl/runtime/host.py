"""The host library every chunk form shares: chunk bookkeeping, preparing a call's tensors, and the stages the
forms have in common (the gate stage forward and backward, the vector decays' scores, the additive output, dq / dk
of the additive stages). Each form's own module (additive.py, delta.py, general.py) wires them with its own
stages into its autograd Function. Launch configurations come from tuning.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass

import torch
import triton

from . import roles as roles_mod
from . import tuning
from .args import Bound
from .tuning import BC, BT, half_kind, pow2

# What a chunk op keeps for its backward. False (the default): its inputs only; the backward recomputes the chunk
# states h[c] and the other intermediates of every forward stage but the output (the gate's running sum, the vector
# decays' scores, the delta rule's UT products) with the same kernels, as FLA's chunk ops recompute h. The recompute
# is one more pass of those stages per backward; what it spares per token and layer, in the inputs' type: the states
# (H * K * V / 64 values: 8 KiB at RetNet-340M's 8 heads of 128 x 256), the fp32 running sum of a vector decay
# (H * K * 4 bytes) and for the delta rule its UT products (w, U, Tm, P). True keeps them (a faster backward).
# Set from LINATTN_KEEP_STATES=1 at import; keep_states() changes it around a forward; each call reads it.
KEEP_STATES = os.environ.get("LINATTN_KEEP_STATES", "0") == "1"


@contextlib.contextmanager
def keep_states(keep: bool = True):
    """Within the block, chunk ops called for training keep (``keep=True``) or recompute (``False``) their forward
    intermediates for the backward (:data:`KEEP_STATES`); the gradients are the same either way."""
    global KEEP_STATES
    before, KEEP_STATES = KEEP_STATES, bool(keep)
    try:
        yield
    finally:
        KEEP_STATES = before


# scores_diag's fast form: a diagonal sub-block whose decay across it (nats, any channel) is at most this goes
# through its first row as reference (its right factors up to E[60] ~ 1e26: finite in fp32 products)
DIAG_SPAN = 60.0


def diag_span(half: int) -> float:
    """The decay across a sub-block (nats) up to which its own pairs go through a reference row, for products
    whose operands are in the inputs' type: E[8] for fp16 (its range ends near E[11]), DIAG_SPAN otherwise."""
    return 8.0 if half == 2 else DIAG_SPAN


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


class Layout:
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

    @property
    def chunks(self) -> dict:
        """The offsets a stage with one program per chunk reads: the sequences' and each chunk's (sequence, index)."""
        return {"cu_seqlens": self.cu, "chunk_indices": self.chunk_indices}

    @property
    def seqs(self) -> dict:
        """The offsets a stage with one program per sequence reads (the state stages): the tokens' and chunks'."""
        return {"cu_seqlens": self.cu, "chunk_offsets": self.chunk_offsets}


def gate_inputs_of(bound: Bound, gate) -> list[torch.Tensor]:
    """Raw inputs of the log-decay expression, contiguous; absent optionals as zeros."""
    out = []
    for n in gate.inputs:
        t = bound.tensors[n]
        if t is None:
            t = torch.zeros([bound.sizes[d] for d in bound.spec.dims(n)], device=bound.device, dtype=torch.float32)
        out.append(t.contiguous())
    return out


def launch_key(mod, gate, q: torch.Tensor, V: int, L: Layout, H: int, value_scale: bool = False) -> tuning.Key:
    """The tuning table's key of a call's launches: its form, decay kind, dtype, head dims and sequences x heads."""
    return tuning.key(mod.FORM, gate.kind == "vector", q.dtype, q.shape[-1], V, L.N * H, q.device, value_scale)


def sizes(mod, gate, q: torch.Tensor, v: torch.Tensor, L: Layout, value_scale: bool = False) -> tuple:
    """What every stage of a call reads: (rows, HQ, K, H, V, vector decay, half kind, device, launch key)."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    return (rows, HQ, K, H, V, gate.kind == "vector", half_kind(q.dtype), q.device,
            launch_key(mod, gate, q, V, L, H, value_scale))


def run_gate(mod, gate, inputs, L: Layout, H: int, K: int, rows: int, cumsum: bool) -> torch.Tensor:
    vector = gate.kind == "vector"
    shape = (rows, H, K) if vector else (rows, H)
    G = torch.empty(shape, dtype=torch.float32, device=L.cu.device)
    o = tuning.launch("gate_fwd", tuning.Key(mod.FORM, vector, 0, K, 0))
    grid = (triton.cdiv(K, o["BK"]) if vector else 1, L.NT, H)
    launch(gate.fwd, grid, G, **_named(gate.inputs, inputs), G=G, **L.chunks, H=H, K=K, BT=BT, VECTOR=vector,
           CUMSUM=cumsum, **o)
    return G


def _named(names, tensors) -> dict:
    """A gate kernel's input pointers by name (its parameters are the spec's input names, ``<name>_ptr``)."""
    return {f"{n}_ptr": t for n, t in zip(names, tensors)}


@dataclass(frozen=True)
class Step:
    """A form's step-form launch (its fused_recurrent kernel), as step_form and contain take it: the stage name
    (tuning table), the kernel, ``q, k, v``, ``middle`` the form's own per-token tensors by name (None: a feature
    off, its pointer unread), whether v is scaled, and the kernel's feature switches."""

    stage: str
    kernel: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    middle: dict
    value_scale: bool = False
    flags: dict = None


def _run_step(mod, gate, L: Layout, scale, step: Step, g, o, h0, ht, programs: int, bad=None) -> None:
    rows, HQ, K = step.q.shape
    H, V = step.v.shape[1], step.v.shape[2]
    key = launch_key(mod, gate, step.q, V, L, H, step.value_scale)
    opts = tuning.launch(step.stage, key)
    nvo, rb = 1, 1
    if bad is not None:   # the containment pass: RB chunks per program
        nvo, rb = bad.shape[-1], tuning.launch("contain", key)["RB"]
        programs = triton.cdiv(programs, rb)
    launch(step.kernel, (triton.cdiv(V, opts["BV"]), programs * H), g, q=step.q, k=step.k, v=step.v, **step.middle,
           g=g, o=o, h0=h0, ht=ht, cu_seqlens=L.cu, chunk_indices=L.chunk_indices, bad=bad, scale=scale, H=H, HQ=HQ,
           NVO=nvo, K=K, V=V, VECTOR=gate.kind == "vector", USE_H0=h0 is not None, STORE_FINAL=ht is not None,
           BT=BT, NVB=pow2(nvo), CHUNK=bad is not None, NT=L.NT, RB=rb, **(step.flags or {}), **opts)


def step_form(mod, gate, L: Layout, scale, store_final, step: Step, h0, gate_inputs):
    """A form's step form (fused_recurrent), one program per value block, sequence and head, with the per-step
    log-decay g from gate_fwd. Returns (o, final state)."""
    rows, _, K = step.q.shape
    H, V = step.v.shape[1], step.v.shape[2]
    g = run_gate(mod, gate, gate_inputs, L, H, K, rows, cumsum=False)
    o = torch.empty(rows, H, V, dtype=step.v.dtype, device=step.q.device)
    ht = torch.empty(L.N, H, K, V, dtype=torch.float32, device=step.q.device) if store_final else None
    _run_step(mod, gate, L, scale, step, g, o, h0, ht, L.N)
    return o, ht


def contain(mod, gate, L: Layout, scale, step: Step, G, h, o, bad) -> None:
    """The chunk forward's containment pass: the chunks whose output holds a non-finite value (the output stage's
    ``bad`` [chunks, H, value blocks]) recomputed token by token from their chunk state h[c] by the step form
    (reading G, the chunk-local cumulative log-decay). A chunk's products form 0 * x_j for every row before a
    token j, so a NaN or inf x_j would reach those rows (0 * NaN = NaN); the step form reads no token ahead. The
    programs of the other chunks return at once: one launch that does nothing on finite inputs."""
    _run_step(mod, gate, L, scale, step, G, o, h, None, L.NT, bad)


def vector_scores(mod, q, k, G, A, P, kg, L, scale, H, HQ, K, half, qg=None, ke=None, tk: tuning.Key = None):
    """A (and, the delta form, P = the keys' own scores, and kg) of a vector decay in two launches:
    scores_fwd, the sub-blocks below the diagonal as products through reference rows, and scores_diag, the
    diagonal sub-blocks, one program per sub-block and head (which also writes qg = Q * E[G] for output_fwd and
    ke = K * E[G] for ut_fwd when given)."""
    pair = P is not None
    tk = tk or tuning.key(mod.FORM, True, q.dtype, K, 0)
    launch(mod.scores_fwd, (BT // BC - 1, L.NT, H), A, q=q, k=k, G=G, A=A, P=P, **L.chunks, scale=scale, H=H,
           HQ=HQ, K=K, BT=BT, BC=BC, HALF=half, PAIR=pair,
           **tuning.launch("scores_fwd_pair" if pair else "scores_fwd", tk))
    # one program per diagonal sub-block and head; SPAN: the largest decay across a sub-block (nats, per
    # channel) taken through its first row (right factors up to E[SPAN] in fp32); steeper blocks go per column
    launch(mod.scores_diag, (BT // BC, L.NT, H), A, q=q, k=k, G=G, A=A, P=P, kg=kg, qg=qg, ke=ke, **L.chunks,
           scale=scale, H=H, HQ=HQ, K=K, BT=BT, BC=BC, SPAN=DIAG_SPAN, DOT=int(half == 1), PAIR=pair,
           KG=kg is not None, QG=qg is not None, KE=ke is not None,
           **tuning.launch("scores_diag_pair" if pair else "scores_diag", tk))


def launch(kernel, grid, dummy: torch.Tensor, **args) -> None:
    """One stage's launch, every argument named as in its kernel's signature: the stage's tensors, the layout's
    offsets (``Layout.chunks`` / ``Layout.seqs``), sizes, feature switches and the tuning table's options. A
    pointer left None (a feature that is off, never read) is passed as ``dummy``. Within a compile-ahead pass
    (:func:`compile_ahead`) the kernel is compiled for these arguments, not launched."""
    args = {n: dummy if a is None else a for n, a in args.items()}
    (_warm_launch if _WARMING.get() else _launch_now)(kernel, grid, args)


def _launch_now(kernel, grid, args: dict) -> None:
    kernel[grid](**args)


def _warm_launch(kernel, grid, args: dict) -> None:
    kernel.warmup(grid=grid, **args)


# Compile ahead: a chunk op's first call of a kind (its module, variant, mode, dtypes, head dims, sequences, whether a
# gradient will follow) first walks its forward and backward hosts without launching anything, each launch handing
# its kernel to Triton's AsyncCompileMode, so the 8-20 kernels of a fwd+bwd compile, and their launchers build, in
# parallel threads (Triton releases the GIL in its passes; ptxas and the C compiler run as processes) instead of one
# after another at their first launch. (Compiling in forked children instead gains little over the threads and
# could hang: forking a process that has other threads.) The walk allocates what the call would and runs the hosts'
# few torch ops on those buffers; no value is read. Off with LINATTN_PARALLEL_COMPILE=0, on CPU (the interpreter
# compiles nothing), while a CUDA graph is captured, and where the installed Triton has no AsyncCompileMode.
PARALLEL_COMPILE = os.environ.get("LINATTN_PARALLEL_COMPILE", "1") != "0"
_WARMING: contextvars.ContextVar = contextvars.ContextVar("linattn_compile_ahead", default=False)
_WARMED: set = set()
AHEAD_FAILED: list = []   # walks that raised (kind, error): the calls compiled as they launched instead


def _compile_ahead_applies(device: torch.device) -> bool:
    if not PARALLEL_COMPILE or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or torch.cuda.is_current_stream_capturing():
        return False
    from triton.runtime import _async_compile

    return _async_compile.active_mode.get() is None


def _with_launcher(compile_fn):
    """A compile job that also builds the kernel's launcher. Triton 3.6 compiles a C launcher per kernel signature
    with the system's C compiler (cached on disk) at the kernel's first launch, one after another in the launching
    thread; built here, in parallel, that first launch finds it in the cache. Newer Tritons' launcher is generic and
    costs nothing here."""
    def job():
        kernel = compile_fn()
        try:
            triton.runtime.driver.active.launcher_cls(kernel.src, kernel.metadata)
        except Exception:   # the first launch builds it again and reports any real error
            pass
        return kernel
    return job


class _ThreadPool(concurrent.futures.ThreadPoolExecutor):
    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_with_launcher(fn), *args, **kwargs)


@contextlib.contextmanager
def _compile_pool():
    """Triton's AsyncCompileMode over a thread pool, every job building its kernel's launcher too; leaving it waits
    for every submitted compile."""
    with _ThreadPool(max_workers=min(16, os.cpu_count() or 1)) as pool:
        with triton.AsyncCompileMode(pool):
            yield


def compile_ahead(form: Form, mod, gate, L: Layout, scale, store_final: bool, recurrent: bool, for_bwd: bool,
                  args: tuple, n: int, grad: bool) -> None:
    """The compile-ahead walk of a call (see above) of ChunkFunction's arguments, once per kind of call. ``grad``:
    a backward will follow (its kernels are compiled too, for the ``dht`` that autograd will pass: a tensor exactly
    when the final state is returned). A walk that raises is dropped: the call itself then compiles as it launches
    and reports any real error."""
    tensors, h0, gate_inputs = args[:n], args[n], list(args[n + 1:])
    if not _compile_ahead_applies(tensors[0].device):
        return
    need_gate = grad and any(t.requires_grad for t in gate_inputs)
    kind = (mod.key, gate.tag, recurrent, for_bwd, grad, need_gate, KEEP_STATES, store_final, h0 is not None, L.N,
            tuple(None if t is None else (t.dtype, t.shape[1:]) for t in tensors), tuple(t.dtype for t in gate_inputs))
    if kind in _WARMED:
        return
    _WARMED.add(kind)
    token = _WARMING.set(True)
    try:
        with _compile_pool(), torch.no_grad():
            if recurrent:
                o, ht = form.recurrent(mod, gate, L, scale, store_final, tensors, h0, gate_inputs)
                saved = None
            else:
                o, ht, saved = form.forward(mod, gate, L, scale, store_final, tensors, h0, gate_inputs, for_bwd)
                saved = saved if KEEP_STATES else None
            if grad:
                form.backward(mod, gate, L, scale, tensors, h0, gate_inputs, saved, torch.empty_like(o),
                              None if ht is None else torch.empty_like(ht), need_gate)
    except Exception as e:   # the call itself compiles what is missing and raises what is real
        AHEAD_FAILED.append((kind, f"{type(e).__name__}: {str(e)[:300]}"))
    finally:
        _WARMING.reset(token)


def decays(mod) -> bool:
    """Whether the spec of a generated module has a decay: without one (the delta rule) G is all zeros and the
    forward kernels (DECAY=False) neither read it nor form its factors."""
    return mod.SIGNATURE.decay != "none"


def output(mod, gate, q, k, v, vs, sk, G, h, A, L, scale, out_dtype, qg=None):
    """(o of the chunk form, which of its tiles hold a non-finite value: ``contain``'s input); qg (vector decays):
    scores_diag's Q * E[G], read instead of q and G."""
    rows, HQ, K = q.shape
    H, V = v.shape[1], v.shape[2]
    o = torch.empty(rows, H, V, dtype=out_dtype, device=q.device)
    opts = tuning.launch("output_fwd", launch_key(mod, gate, q, V, L, H, vs is not None))
    bad = torch.empty(L.NT, H, triton.cdiv(V, opts["BV"]), dtype=torch.int8, device=q.device)
    launch(mod.output_fwd, (triton.cdiv(V, opts["BV"]), L.NT, H), G, q=q if qg is None else qg, k=k, v=v, vs=vs,
           sk=sk, G=G, h=h, A=A, o=o, bad=bad, **L.chunks, scale=scale, H=H, HQ=HQ, K=K, V=V, BT=BT,
           VECTOR=gate.kind == "vector", HALF=half_kind(q.dtype), VSCALE=vs is not None, SKIP=sk is not None,
           QG=qg is not None, DECAY=decays(mod), **opts)
    return o, bad


def intra_pairs(mod, q, k, G, dA, dP, dq, dk, dk2, dGpos, L, H, HQ, K, pair: bool, tk: tuning.Key):
    """The intra-chunk pair terms of dq, dk (and, ``pair``, the delta form's P's) of vector decays, in two
    launches: dqk_chunk_intra_bwd for the chunks whose decay across the whole chunk is <= DIAG_SPAN, as
    whole-chunk products, then dqk_intra_bwd for the steeper chunks, sub-block by sub-block."""
    o = tuning.launch("dqk_chunk_intra_bwd", tk)
    pairs = dict(q=q, k=k, G=G, dA=dA, dP=dP, dq=dq, dk=dk, dk2=dk2, dGpos=dGpos, **L.chunks, H=H, HQ=HQ, K=K, BT=BT,
                 PAIR=pair, CSPAN=DIAG_SPAN)
    launch(mod.dqk_chunk_intra_bwd, (triton.cdiv(K, o["BK"]), L.NT, H), G, **pairs, **o)
    o = tuning.launch("dqk_intra_bwd_pair" if pair else "dqk_intra_bwd", tk)
    launch(mod.dqk_intra_bwd, (triton.cdiv(K, o["BK"]), L.NT * (BT // BC // o["RB"]), H), G, **pairs, BC=BC,
           HALF=half_kind(q.dtype), **o)


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
    half = half_kind(q.dtype)
    BV = pow2(V)
    tk = launch_key(mod, gate, q, V, L, H, vs is not None)
    o = tuning.launch("dqk_bwd", tk)
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
    launch(mod.dqk_bwd, (NK, L.NT, H if vector else HQ), G, q=q, k=k, v=v, vs=vs, G=G, h=h, do=do, dhn=dhn, dq=dq,
           dk=dk, dA=dA, dGpos=dGpos, du=du, dw=dw, carry=carry, **L.chunks, scale=scale, H=H, HQ=HQ, K=K, V=V,
           BT=BT, BV=BV, VECTOR=vector, HALF=half, VSCALE=vs is not None, DELTA=du is not None,
           NG=1 if vector else H // HQ, CARRY=carry is not None, **o)
    if vector and defer_intra:
        return (dq, dk, dA, carry) if carry is not None else (dq, dk, dA)
    if vector:
        intra_pairs(mod, q, k, G, dA, dA, dq, dk, dk, dGpos, L, H, HQ, K, False, tk)
        dq, dk = group_sum(dq, HQ).to(q.dtype), group_sum(dk, HQ).to(k.dtype)
    else:
        dGpos = dGpos.sum(-1)
    return (dq, dk, dGpos, carry) if carry is not None else (dq, dk, dGpos)


def group_sum(x: torch.Tensor, HQ: int) -> torch.Tensor:
    """[rows, H, K] per value head -> [rows, HQ, K]: the value heads of a q/k head summed."""
    rows, H, K = x.shape
    return x if H == HQ else x.view(rows, HQ, H // HQ, K).sum(2)


def gate_grads(mod, gate, gate_inputs, dGpos, L, K, carry) -> list:
    """Gradients of the log-decay's raw inputs (gate_bwd: the reverse running sum, then the spec's derivatives)
    from dGpos (the cumulative log-decay's gradient per position, [rows, H(, K)]) and ``carry`` (dqk's: each
    chunk's sum over every later position formed from the states, [chunks, H, K] for vector decays, [chunks, H,
    key blocks] for scalar ones), so the running sums stay inside chunks (a running sum over the whole sequence
    rounds more as it grows: a per-head decay's gradient 1.0e-4 off vs 6.6e-6 at T=260)."""
    if not gate.grads:
        return [None] * len(gate_inputs)
    vector = gate.kind == "vector"
    H = dGpos.shape[1]
    bufs = _grad_buffers(gate, gate_inputs, dGpos)
    o = tuning.launch("gate_bwd", tuning.Key(mod.FORM, vector, 0, K, 0))
    grads = {f"d_{n}_ptr": b for n, b in zip(gate.inputs, bufs) if n in gate.grads}
    launch(gate.bwd, (triton.cdiv(K, o["BK"]) if vector else 1, L.NT, H), dGpos, **_named(gate.inputs, gate_inputs),
           **grads, dGpos=dGpos.contiguous(), carry=carry if vector else carry.sum(-1).contiguous(), **L.chunks,
           H=H, K=K, BT=BT, VECTOR=vector, **o)
    return [_reduce_to(bufs[i], gate.input_layouts[n], vector).reshape(gate_inputs[i].shape).to(
        gate_inputs[i].dtype) for i, n in enumerate(gate.inputs)]


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


class Prepared:
    """An op call's tensors as the stages take them: rows flattened, roles evaluated, dtypes set."""

    def __init__(self, mod, bound: Bound, variant, fuse: bool = True):
        spec = bound.spec
        rs = roles_mod.role_set(mod, bound)
        vs = rs.value_scale if fuse and variant.value_scale else None
        sk = rs.skip_scale if fuse and variant.skip_scale else None
        exclude = (("value",) if vs is not None else ()) + (("skip",) if sk is not None else ())
        from ..modules import l2_norm   # the fused norm (one Triton kernel per direction, fp32 inside)

        bound = roles_mod.with_l2norm_inputs(bound, rs, l2_norm)
        roles = roles_mod.evaluate(bound, rs, exclude)
        B, T = bound.sizes["B"], bound.sizes["T"]
        H, HQ, K, V = bound.size("H"), bound.size("HQ"), bound.size("K"), bound.size("V")
        self.vs = None
        if vs is not None:   # value = x * vs: the kernels scale x as they load it
            roles["value"] = bound.tensors[spec.value_input]
            self.vs = roles_mod.evaluate_code(bound, vs, roles_mod.SCALE_SHAPE, torch.float32).reshape(B * T, H)
            self.vs = self.vs.contiguous()
        self.sk = None
        if sk is not None:    # o += x * sk: added by the output stage
            self.sk = roles_mod.evaluate_code(bound, sk, roles_mod.SCALE_SHAPE, torch.float32).reshape(
                B * T, H).contiguous()
        q, k = roles["query"], roles["key"]
        if rs.qk_l2norm and not rs.l2norm_inputs:   # x / sqrt(sum x^2 + 1e-6), the oracle's formula
            q, k = l2_norm(q), l2_norm(k)
        dtype = bound.out_dtype
        self.q = q.to(dtype).reshape(B * T, HQ, K).contiguous()
        self.k = k.to(dtype).reshape(B * T, HQ, K).contiguous()
        self.v = roles["value"].to(dtype).reshape(B * T, H, V).contiguous()
        self.roles, self.shape = roles, (B, T, H, V)
        self.L = Layout(B, T, bound.cu_seqlens, self.q.device)
        self.h0 = bound.initial_state.float().contiguous() if bound.initial_state is not None else None
        self.gate_inputs = gate_inputs_of(bound, variant.gate)

    def finish(self, bound: Bound, o: torch.Tensor, ht):
        o = o.reshape(self.shape)
        if "skip" in self.roles:
            o = o + self.roles["skip"].to(o.dtype)
        return o, (ht if bound.output_final_state else None)




@dataclass(frozen=True)
class Form:
    """A chunk form's host functions, as ChunkFunction calls them:

    * ``forward(mod, gate, L, scale, store_final, tensors, h0, gate_inputs, for_bwd) -> (o, ht, saved)``;
    * ``recurrent(mod, gate, L, scale, store_final, tensors, h0, gate_inputs) -> (o, ht)``, the step form;
    * ``backward(mod, gate, L, scale, tensors, h0, gate_inputs, saved, do, dht, need_gate_grads) -> (grads of
      tensors, dh0, grads of gate inputs)``, ``saved`` None after the step form (the chunk states recomputed).
    """

    forward: object
    recurrent: object
    backward: object


class ChunkFunction(torch.autograd.Function):
    """(form tensors ..., h0, *gate inputs) -> (o, final state) of one chunk form: its forward (or step form) and
    its backward, on the rows-flattened tensors."""

    @staticmethod
    def forward(ctx, form, mod, gate, L, scale, store_final, recurrent, for_bwd, n, *args):
        tensors, h0, gate_inputs = args[:n], args[n], list(args[n + 1:])
        if recurrent:
            o, ht = form.recurrent(mod, gate, L, scale, store_final, tensors, h0, gate_inputs)
            saved = ()
        else:
            o, ht, saved = form.forward(mod, gate, L, scale, store_final, tensors, h0, gate_inputs, for_bwd)
            if not KEEP_STATES:
                saved = ()   # the backward recomputes them (KEEP_STATES)
        ctx.form, ctx.mod, ctx.gate, ctx.L, ctx.scale = form, mod, gate, L, scale
        ctx.recompute = recurrent or not KEEP_STATES
        ctx.n, ctx.n_gate = n, len(gate_inputs)
        ctx.save_for_backward(*args, *saved)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        t = ctx.saved_tensors
        n, m = ctx.n, ctx.n_gate
        tensors, h0, gate_inputs = t[:n], t[n], list(t[n + 1:n + 1 + m])
        saved = None if ctx.recompute else t[n + 1 + m:]
        if dht is not None:   # autograd may hand over an expanded (stride-0) tensor
            dht = dht.contiguous()
        grads, dh0, dgate = ctx.form.backward(ctx.mod, ctx.gate, ctx.L, ctx.scale, tensors, h0, gate_inputs, saved,
                                              do, dht, any(ctx.needs_input_grad[9 + n + 1:]))
        return (None,) * 9 + (*grads, dh0, *dgate)


def run_chunk(form: Form, mod, variant, bound: Bound, mode: str, tensors: tuple, x: Prepared):
    """A prepared call through ChunkFunction: (o, final state), rows-flattened."""
    args = (*tensors, x.h0, *x.gate_inputs)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    # the forward's intermediates are kept for the backward (else a forward may skip what only the backward reads:
    # a recomputing backward makes its own)
    for_bwd = KEEP_STATES and grad
    recurrent = mode == "fused_recurrent"
    compile_ahead(form, mod, variant.gate, x.L, bound.scale, bound.output_final_state, recurrent, for_bwd, args,
                  len(tensors), grad)
    return ChunkFunction.apply(form, mod, variant.gate, x.L, bound.scale, bound.output_final_state, recurrent,
                               for_bwd, len(tensors), *args)
