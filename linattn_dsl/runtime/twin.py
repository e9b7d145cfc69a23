"""The CPU backend: a spec's generated PyTorch twin, launched stage by stage as the Triton host modules launch
the kernels (additive.py, delta.py, general.py), with an explicit backward per chunk form.

The stages are the torch functions generated from compiler/templates/torch_*.py.j2 (named after the Triton
stages they mirror, with a ``_torch`` suffix); this module chunks the tensors, wires the stages together and
wraps them as ``torch.autograd.Function``s:

    additive: gate_fwd -> state_fwd (h[c]) -> scores_fwd (A) -> output_fwd
        backward: state_bwd (dhn) -> dv_bwd -> dqk_bwd (dq, dk, dGpos, gate carry) -> gate_revsum -> gate_bwd
    delta:    gate_fwd -> ut_fwd (P, Tm, W, U') -> state_fwd with W (h[c], U) -> scores_fwd -> output_fwd (v := U)
        backward: dv_bwd local (A^T dO) -> state_bwd with W (dhn, dU) -> dqk_bwd (v := U, dw) -> ut_bwd
        -> gate_revsum -> gate_bwd
    general:  gate_fwd -> general_scores_fwd -> general_solve_fwd -> general_state_fwd (h[c], R)
        -> general_output_fwd; backward: general_state_bwd (dhn, dR) -> general_dv_bwd -> general_dmat_bwd
        -> general_dqk_bwd -> general_dgate_bwd -> gate_revsum -> gate_bwd

Chunks are BT = 64 rows, as the kernels'. fp32 inputs (and bf16 / fp16 ones) compute in fp32, float64 inputs
in float64. :func:`stages` returns every stage's output of one call, in the kernels' layouts.
"""

from __future__ import annotations

import torch

from . import roles as roles_mod
from .args import Bound

BT = 64   # the chunk size: additive.BT, the kernels'


def compute_dtype(bound: Bound) -> torch.dtype:
    """float64 when any input is float64, else fp32 (half inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in bound.tensors.values()) \
        else torch.float32


class Layout:
    """Chunk bookkeeping of one call: the N sequences, each padded with zero rows to NC chunks of BT rows.

    Dense calls (no cu_seqlens) are a reshape; packed ones gather rows into their sequence's chunks."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device):
        self.B, self.T = B, T
        if cu_seqlens is None:
            self.N, self.NC = B, -(-T // BT)
            self.pos = self.gather = None
            self.n_chunks = [self.NC] * B
            self.starts = None
        else:
            cu = cu_seqlens.tolist()
            lens = [e - s for s, e in zip(cu, cu[1:])]
            self.N = len(lens)
            self.n_chunks = [-(-n // BT) for n in lens]
            self.NC = max(self.n_chunks)
            width = self.NC * BT
            # the slot of every packed row in [N * NC * BT], and for every slot its row (T: a zero row)
            self.pos = torch.cat([torch.arange(n, device=device) + i * width for i, n in enumerate(lens)])
            self.gather = torch.full((self.N * width,), T, dtype=torch.long, device=device)
            self.gather[self.pos] = torch.arange(T, device=device)
            self.starts = torch.tensor(cu[:-1], device=device).repeat_interleave(torch.tensor(lens, device=device))
        self.lasts = None if cu_seqlens is None else cu_seqlens[1:] - 1

    def chunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, Hx, *D] -> [N, NC, Hx, BT, *D], zero rows after each sequence's end."""
        B, T, Hx, *D = x.shape
        if self.pos is None:
            x = torch.nn.functional.pad(x, (0, 0) * (len(D) + 1) + (0, self.NC * BT - T))
            return x.reshape(B, self.NC, BT, Hx, *D).transpose(2, 3)
        rows = torch.cat([x[0], x.new_zeros(1, Hx, *D)])
        return rows[self.gather].reshape(self.N, self.NC, BT, Hx, *D).transpose(2, 3)

    def unchunk(self, x: torch.Tensor) -> torch.Tensor:
        """[N, NC, Hx, BT, *D] -> [B, T, Hx, *D]."""
        N, NC, Hx, _, *D = x.shape
        x = x.transpose(2, 3).reshape(N, NC * BT, Hx, *D)
        if self.pos is None:
            return x[:, :self.T]
        return x.reshape(N * NC * BT, Hx, *D)[self.pos][None]

    def chunks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-chunk tensors [N, NC, *] -> the kernels' [chunks, *] (sequence by sequence, padding chunks out)."""
        return torch.cat([x[n, :c] for n, c in enumerate(self.n_chunks)])

    def poisoned(self, bad: torch.Tensor) -> torch.Tensor:
        """Rows at or after a sequence's first non-finite row, per head: bad [B, T, H] -> bool [B, T, H]."""
        seen = bad.to(torch.int32).cumsum(1)
        if self.starts is not None:   # counts restart at each packed sequence
            before = torch.cat([seen.new_zeros(1, 1, seen.shape[2]), seen[:, :-1]], 1)
            seen = seen - before[:, self.starts]
        return seen > 0

    def final_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A per-row [B, T, H] tensor at each sequence's last row: [N, H]."""
        return rows[:, -1] if self.lasts is None else rows[0, self.lasts]


def _align(t: torch.Tensor, layout: str, vector: bool) -> torch.Tensor:
    """View a raw gate input so it broadcasts against the decay's [B, T, H(, K)] layout."""
    if layout == "token":
        return t[..., None] if vector else t
    if layout == "head":
        return t.reshape(1, 1, -1, 1) if vector else t.reshape(1, 1, -1)
    if layout == "head_feature":
        return t[None, None]
    return t


class _Call:
    """What every stage of one call shares: the generated module, its gate, sizes, chunk layout, dtype, and the
    rows whose outputs a non-finite input poisons."""

    def __init__(self, mod, gate, bound: Bound, dtype: torch.dtype):
        self.mod, self.gate, self.dtype = mod, gate, dtype
        self.B, self.T = bound.sizes["B"], bound.sizes["T"]
        self.H, self.HQ = bound.size("H"), bound.size("HQ")
        self.K, self.V = bound.size("K"), bound.size("V")
        self.scale, self.device = bound.scale, bound.device
        self.vector = gate.kind == "vector"
        self.L = Layout(self.B, self.T, bound.cu_seqlens, bound.device)
        self.poison = None   # bool [B, T, H] or None: rows at / after a non-finite input, per value head
        self.seq_poison = None

    # ---- the gate stage: the log-decay from its raw inputs, and the chain rule back into them -------------
    def _gate_args(self, gate_inputs):
        xs = [_align(t.to(self.dtype), self.gate.input_layouts[n], self.vector)
              for n, t in zip(self.gate.inputs, gate_inputs)]
        head = torch.arange(self.H, dtype=self.dtype, device=self.device)
        return xs, head.reshape(1, 1, self.H, *([1] if self.vector else []))

    def log_decay(self, gate_inputs) -> torch.Tensor:
        """g [B, T, H, W] (W = K vector, 1 scalar): gate_fwd's expression, floored."""
        xs, head = self._gate_args(gate_inputs)
        g = self.gate.fwd_torch(*xs, head)
        if self.vector:
            return g.expand(self.B, self.T, self.H, self.K)
        return g.expand(self.B, self.T, self.H)[..., None]

    def gate_grads(self, gate_inputs, dg: torch.Tensor) -> list:
        """d inputs of the log-decay from dg [B, T, H, W], each in its input's shape and dtype (gate_bwd)."""
        xs, head = self._gate_args(gate_inputs)
        if not self.vector:
            dg = dg[..., 0]
        ds = self.gate.bwd_torch(*xs, head, dg)
        return [d.sum_to_size(x.shape).reshape(t.shape).to(t.dtype) for d, x, t in zip(ds, xs, gate_inputs)]

    # ---- non-finite inputs ----------------------------------------------------------------------------
    def sanitise(self, tensors: list) -> list:
        """Per-token inputs [B, T, Hx, ...] (Hx = HQ or H; None skipped) with their non-finite entries zeroed.

        The chunk form mixes every row of a chunk through masked products (0 * NaN = NaN), so a NaN at token t
        would reach the outputs before t. Instead the rows at and after a sequence's first non-finite input
        (per value head) are computed from zeros there and their outputs set to NaN afterwards (``poison``);
        outputs before t are then exactly those of the finite inputs. Finite calls (the usual case) pay one
        sum per input for the check."""
        present = [t for t in tensors if t is not None]
        if all(torch.isfinite(t.sum()) for t in present):
            return tensors
        bad = torch.zeros(self.B, self.T, self.H, dtype=torch.bool, device=present[0].device)
        for t in present:
            b = ~torch.isfinite(t)
            b = b.reshape(self.B, self.T, t.shape[2], -1).any(-1)
            bad |= b.repeat_interleave(self.H // t.shape[2], 2) if t.shape[2] != self.H else b
        if not bad.any():   # the check's sum overflowed on finite values
            return tensors
        self.poison = self.L.poisoned(bad)
        self.seq_poison = self.L.final_rows(self.poison)
        return [None if t is None else torch.where(torch.isfinite(t), t, 0.0) for t in tensors]

    def poison_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A per-row result [B, T, Hx, ...] set to NaN on the poisoned rows (of any of a q/k head's value heads)."""
        if self.poison is None or x is None:
            return x
        p = self.poison
        if x.shape[2] != self.H:
            p = p.reshape(self.B, self.T, x.shape[2], -1).any(-1)
        return x.masked_fill(p.reshape(*p.shape, *([1] * (x.dim() - 3))), float("nan"))

    def poison_states(self, s: torch.Tensor) -> torch.Tensor:
        """A per-sequence state [N, H, K, V] set to NaN for the sequences and heads with a poisoned row."""
        if self.poison is None or s is None:
            return s
        return s.masked_fill(self.seq_poison[..., None, None], float("nan"))

    def clear_poisoned(self, do: torch.Tensor, dht: torch.Tensor | None):
        """The output gradients with the poisoned rows' (constant NaN outputs) zeroed."""
        if self.poison is None:
            return do, dht
        do = do.masked_fill(self.poison[..., None], 0.0)
        return do, (dht.masked_fill(self.seq_poison[..., None, None], 0.0) if dht is not None else None)

    # ---- heads and chunks ---------------------------------------------------------------------------
    def chunk_heads(self, x: torch.Tensor) -> torch.Tensor:
        """A q/k-head tensor [B, T, HQ, K] chunked, its heads expanded to the value heads."""
        c = self.L.chunk(x)
        return c if self.HQ == self.H else c.repeat_interleave(self.H // self.HQ, 2)

    def unchunk_heads(self, dx: torch.Tensor) -> torch.Tensor:
        """The gradient of chunk_heads: [N, NC, H, BT, K] -> [B, T, HQ, K], value heads summed per group."""
        if self.HQ != self.H:
            N, NC, H, R, K = dx.shape
            dx = dx.reshape(N, NC, self.HQ, H // self.HQ, R, K).sum(3)
        return self.L.unchunk(dx)

    def gate_backward(self, gate_inputs, dGpos, carry) -> tuple[torch.Tensor, list]:
        """gate_revsum then gate_bwd: (dg [B, T, H, W], the gate inputs' gradients)."""
        dg = self.poison_rows(self.L.unchunk(self.mod.gate_revsum_torch(dGpos, carry)))
        return dg, self.gate_grads(gate_inputs, dg)


# ---- the three chunk forms: forward and backward stages ------------------------------------------------
def additive_forward(c: _Call, q, k, x, vs, sk, g, h0) -> dict:
    """Chunked inputs (q, k heads expanded; x the value input, the value x * vs when vs is given): the stage
    outputs G, h, ht, A, v (the values), o [N, NC, H, BT, V]."""
    m = c.mod
    G = m.gate_cumsum_torch(g)
    v = x * vs[..., None] if vs is not None else x
    h, ht, _ = m.state_fwd_torch(k, v, G, h0)
    A = m.scores_fwd_torch(q, k, G, c.scale)
    o = m.output_fwd_torch(q, v, G, h, A, c.scale)
    if sk is not None:
        o = o + x * sk[..., None]
    return dict(G=G, h=h, ht=ht, A=A, v=v, o=o)


def additive_backward(c: _Call, q, k, x, vs, sk, st, do, dht, carry: bool) -> dict:
    """From the chunked do and dht (or None): dhn, dh0, dq, dk (per value head), dv, dvs, dsk, dGpos and (with
    ``carry``) each chunk's gate carry."""
    m = c.mod
    G, h, A, v = st["G"], st["h"], st["A"], st["v"]
    dhn, dh0, _ = m.state_bwd_torch(q, G, do, dht, c.scale)
    dv, dvs, dsk = m.dv_bwd_torch(k, G, A, do, dhn, x=x, vs=vs, sk=sk)
    dq, dk, dGpos, cy, _ = m.dqk_bwd_torch(q, k, v, G, h, do, dhn, c.scale, carry=carry)
    return dict(dhn=dhn, dh0=dh0, dq=dq, dk=dk, dv=dv, dvs=dvs, dsk=dsk, dGpos=dGpos, carry=cy)


def delta_forward(c: _Call, q, k, v, beta, g, h0) -> dict:
    """Chunked inputs: the stage outputs G, P, Tm, w (W), h, ht, U (the corrected values), A, o."""
    m = c.mod
    G = m.gate_cumsum_torch(g)
    P, Tm, w, u1 = m.ut_fwd_torch(k, v, beta, G)
    h, ht, U = m.state_fwd_torch(k, u1, G, h0, w=w)
    A = m.scores_fwd_torch(q, k, G, c.scale)
    o = m.output_fwd_torch(q, U, G, h, A, c.scale)
    return dict(G=G, P=P, Tm=Tm, w=w, h=h, ht=ht, U=U, A=A, o=o)


def delta_backward(c: _Call, q, k, v, beta, st, do, dht, carry: bool) -> dict:
    """dhn, dh0, du (dU), dq, dk, dv, dbeta, dGpos (the additive stages' and ut_bwd's parts) and the carry."""
    m = c.mod
    G, h, A, U, w = st["G"], st["h"], st["A"], st["U"], st["w"]
    dvl, _, _ = m.dv_bwd_torch(k, G, A, do, None, local=True)
    dhn, dh0, du = m.state_bwd_torch(q, G, do, dht, c.scale, k=k, w=w, dvl=dvl)
    dq, dk, dGpos, cy, dw = m.dqk_bwd_torch(q, k, U, G, h, do, dhn, c.scale, du=du, carry=carry)
    dk_ut, dv, dbeta, gpos = m.ut_bwd_torch(k, v, beta, G, st["P"], st["Tm"], U, du, dw)
    return dict(dhn=dhn, dh0=dh0, du=du, dq=dq, dk=dk + dk_ut, dv=dv, dbeta=dbeta, dGpos=dGpos + gpos, carry=cy)


def general_forward(c: _Call, q, k, v, a, b, g, h0) -> dict:
    """Chunked inputs: the stage outputs G, the pair matrices, Tm, Mak, Wa, the decayed rows, h, R, ht, o."""
    m = c.mod
    G = m.gate_cumsum_torch(g)
    Aqk, Aqb, Lab, Lak, qg, kg, bg = m.general_scores_fwd_torch(q, k, a, b, G, c.scale)
    Tm, Mak, Wa = m.general_solve_fwd_torch(a, G, Lab, Lak)
    h, R, ht = m.general_state_fwd_torch(kg, bg, v, G, Wa, Mak, h0)
    o = m.general_output_fwd_torch(qg, v, h, R, Aqk, Aqb, c.scale)
    return dict(G=G, Aqk=Aqk, Aqb=Aqb, Tm=Tm, Mak=Mak, Wa=Wa, qg=qg, kg=kg, bg=bg, h=h, R=R, ht=ht, o=o)


def general_backward(c: _Call, q, k, v, a, b, st, do, dht, carry: bool) -> dict:
    """dhn, dR, dh0, dq, dk, dv, da, db, dGpos (general_dgate_bwd's) and the carry."""
    m = c.mod
    G, h, R = st["G"], st["h"], st["R"]
    dhn, dR, dh0 = m.general_state_bwd_torch(st["qg"], st["bg"], G, st["Wa"], st["Aqb"], do, dht, c.scale)
    dv = m.general_dv_bwd_torch(st["kg"], st["Aqk"], st["Mak"], do, dhn, dR)
    dY, dAqk, dAqb, dLab, dLak = m.general_dmat_bwd_torch(v, st["Tm"], R, dR, do, c.scale)
    dq, dk, da, db, X, Q, cy = m.general_dqk_bwd_torch(q, k, a, b, v, G, dY, h, dhn, R, do, dAqk, dAqb, dLab,
                                                       dLak, c.scale, carry=carry)
    return dict(dhn=dhn, dR=dR, dh0=dh0, dq=dq, dk=dk, dv=dv, da=da, db=db,
                dGpos=m.general_dgate_bwd_torch(X, Q), carry=cy)


# the per-token inputs of each form after q, k, v (all per value head)
_EXTRAS = {"additive": ("vs", "sk"), "delta": ("beta",), "general": ("a", "b")}


def _forward(c: _Call, form: str, q, k, v, extras, h0, gate_inputs) -> tuple[dict, dict]:
    """Cast, gate, sanitise and chunk one call's inputs ([B, T, ...]) and run the form's forward stages.
    Returns (the chunked inputs, the stage outputs)."""
    cast = [None if t is None else t.to(c.dtype) for t in (q, k, v, *extras)]
    g = c.log_decay(gate_inputs)
    # q enters only its own row's output (never a state or another row's product), so a non-finite q is left to
    # make that row non-finite, as in the step form, instead of poisoning every later row
    q, *cast = cast
    cast = c.sanitise(cast + [g])
    g = cast.pop()
    k, v, *extras = cast
    names = _EXTRAS[form]
    x = dict(q=c.chunk_heads(q), k=c.chunk_heads(k), v=c.L.chunk(v))
    x.update({n: (None if t is None else c.L.chunk(t)) for n, t in zip(names, extras)})
    h0 = h0.to(c.dtype) if h0 is not None else None
    if form == "additive":
        st = additive_forward(c, x["q"], x["k"], x["v"], x["vs"], x["sk"], c.L.chunk(g), h0)
    elif form == "delta":
        st = delta_forward(c, x["q"], x["k"], x["v"], x["beta"], c.L.chunk(g), h0)
    else:
        st = general_forward(c, x["q"], x["k"], x["v"], x["a"], x["b"], c.L.chunk(g), h0)
    return x, st


def _backward(c: _Call, form: str, x: dict, st: dict, do, dht, need_gate: bool) -> dict:
    """The form's backward stages from the output's gradient do [B, T, H, V] and the final state's dht (or None);
    dGpos and each chunk's gate carry only with ``need_gate``."""
    do, dht = c.clear_poisoned(do.to(c.dtype), None if dht is None else dht.to(c.dtype))
    do = c.L.chunk(do)
    carry = need_gate and bool(c.gate.grads)
    if form == "additive":
        gr = additive_backward(c, x["q"], x["k"], x["v"], x["vs"], x["sk"], st, do, dht, carry)
    elif form == "delta":
        gr = delta_backward(c, x["q"], x["k"], x["v"], x["beta"], st, do, dht, carry)
    else:
        gr = general_backward(c, x["q"], x["k"], x["v"], x["a"], x["b"], st, do, dht, carry)
    return gr


class TwinChunk(torch.autograd.Function):
    """(q, k, v, *extras, h0, *gate inputs) -> (o [B, T, H, V] in the compute dtype, final state [N, H, K, V]):
    one chunk form of the twin with its explicit backward. q, k [B, T, HQ, K]; v [B, T, H, V]; extras per form
    (additive: vs, sk [B, T, H] or None; delta: beta [B, T, H]; general: a, b [B, T, H, K])."""

    @staticmethod
    def forward(ctx, c: _Call, form: str, n_extra: int, q, k, v, *rest):
        extras, h0, gate_inputs = rest[:n_extra], rest[n_extra], list(rest[n_extra + 1:])
        # the stages compute in c's dtype: an autocast region around the op must not recast their products
        with torch.autocast(q.device.type, enabled=False):
            x, st = _forward(c, form, q, k, v, extras, h0, gate_inputs)
        o = c.poison_rows(c.L.unchunk(st.pop("o")))
        ht = c.poison_states(st.pop("ht"))
        ctx.c, ctx.form, ctx.n_extra, ctx.x, ctx.st = c, form, n_extra, x, st
        ctx.dtypes = [None if t is None else t.dtype for t in (q, k, v, *extras, h0)]
        ctx.gate_inputs = gate_inputs
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        c, form, x = ctx.c, ctx.form, ctx.x
        need_gate = any(ctx.needs_input_grad[7 + ctx.n_extra:])
        with torch.autocast(do.device.type, enabled=False):
            gr = _backward(c, form, x, ctx.st, do, dht, need_gate)
        L = c.L
        dq = c.poison_rows(c.unchunk_heads(gr["dq"]))
        dk = c.poison_rows(c.unchunk_heads(gr["dk"]))
        dv = c.poison_rows(L.unchunk(gr["dv"]))
        names = _EXTRAS[form]
        dextra = [None if gr.get("d" + n) is None else c.poison_rows(L.unchunk(gr["d" + n])) for n in names]
        dh0 = c.poison_states(gr["dh0"])
        dgate = [None] * len(ctx.gate_inputs)
        if need_gate and c.gate.grads:
            with torch.autocast(do.device.type, enabled=False):
                _, dgate = c.gate_backward(ctx.gate_inputs, gr["dGpos"], gr["carry"])
        grads = [dq, dk, dv, *dextra, dh0]
        grads = [None if t is None or dt is None else t.to(dt) for t, dt in zip(grads, ctx.dtypes)]
        return (None, None, None, *grads, *dgate)


# ---- preparing a bound call ----------------------------------------------------------------------------
class Prepared:
    """An op call's tensors as the twin's stages take them ([B, T, ...]): roles evaluated from the generated
    module's role code (autograd carries them), the additive form's value and skip scales split off as the
    kernels fuse them."""

    def __init__(self, mod, bound: Bound, variant, form: str, dtype: torch.dtype):
        rs = roles_mod.role_set(mod, bound)
        spec = bound.spec
        fuse = form == "additive"
        vs = rs.value_scale if fuse and variant.value_scale else None
        sk = rs.skip_scale if fuse and variant.skip_scale else None
        exclude = (("value",) if vs is not None else ()) + (("skip",) if sk is not None else ())
        # the step form evaluates its roles in the compute dtype (as the oracle does); the chunk stages cast them
        bound = roles_mod.with_l2norm_inputs(bound, rs, l2_normalize)
        roles = roles_mod.evaluate(bound, rs, exclude, dtype if form == "recurrent" else None)
        B, T, H = bound.sizes["B"], bound.sizes["T"], bound.size("H")
        if vs is not None:
            roles["value"] = bound.tensors[spec.value_input]
        q, k = roles["query"], roles["key"]
        if rs.qk_l2norm and not rs.l2norm_inputs:
            q, k = l2_normalize(q), l2_normalize(k)
        self.q, self.k, self.v = q, k, roles["value"]
        if form == "additive":
            self.extras = [None if c is None else roles_mod.evaluate_code(bound, c, roles_mod.SCALE_SHAPE, dtype)
                           for c in (vs, sk)]
        elif form == "delta":
            self.extras = [torch.broadcast_to(roles["beta"], (B, T, H))]
        elif form == "general":
            self.extras = [roles["a"], roles["b"]]
        else:
            self.extras = []
        self.roles = roles
        self.skip = roles.get("skip")
        self.h0 = bound.initial_state
        gate = variant.gate
        self.gate_inputs = []
        for n in gate.inputs:   # absent optional inputs are zeros
            t = bound.tensors[n]
            self.gate_inputs.append(t if t is not None else torch.zeros(
                [bound.sizes[d] for d in spec.dims(n)], device=bound.device, dtype=dtype))


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the head dim (the kernels' fused norm)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def step(S, q, k, v, g, beta, a, b, kind: str):
    """One token of every head: ``S [.., K, V]``, ``q, k, a, b, g [.., K]``, ``v [.., V]``, ``beta [..]``;
    returns the new state and ``o = S^T q``. ``kind``: the transition ('none', 'delta', 'general')."""
    decayed = torch.exp(g)[..., None] * S if g is not None else S
    if kind == "none":
        S = decayed + k[..., :, None] * v[..., None, :]
    elif kind == "delta":   # S = (I - beta k k^T) D S + beta k v^T = D S + beta k (v - k^T D S)^T
        correction = v - torch.einsum("...k,...kv->...v", k, decayed)
        S = decayed + (beta[..., None, None] * k[..., :, None]) * correction[..., None, :]
    else:                   # general: S = D S + b (a^T S) + k v^T, with a acting on the undecayed S
        S = decayed + b[..., :, None] * torch.einsum("...k,...kv->...v", a, S)[..., None, :] \
            + k[..., :, None] * v[..., None, :]
    return S, torch.einsum("...k,...kv->...v", q, S)


TRANSITIONS = {"additive": "none", "delta": "delta", "general": "general"}


def recurrent(mod, variant, bound: Bound, dtype: torch.dtype):
    """``fused_recurrent`` on the CPU: the step form, token by token in ``dtype`` (autograd differentiates it),
    the log-decay from the gate's torch code (floored as every backend floors it)."""
    x = Prepared(mod, bound, variant, "recurrent", dtype)
    c = _Call(mod, variant.gate, bound, dtype)
    H, HQ, K, V = c.H, c.HQ, c.K, c.V
    B, T = c.B, c.T
    q = (x.q.to(dtype) * bound.scale).repeat_interleave(H // HQ, dim=2)   # head h uses group h // (H / HQ)
    k = x.k.to(dtype).repeat_interleave(H // HQ, dim=2)
    v = x.v.to(dtype)
    g = None
    if bound.spec.decay != "none":
        g = c.log_decay([t for t in x.gate_inputs]).to(dtype)
        g = g if c.vector else g.expand(B, T, H, K)
    roles = {r: x.roles[r].to(dtype) for r in ("beta", "a", "b") if r in x.roles}
    spans = [(i, 0, T) for i in range(B)] if bound.cu_seqlens is None else \
        [(0, s, e) for s, e in zip(bound.cu_seqlens.tolist(), bound.cu_seqlens.tolist()[1:])]
    kind = TRANSITIONS[mod.FORM]
    outs, finals = [], []
    for n, (i, start, end) in enumerate(spans):
        S = bound.initial_state[n].to(dtype) if bound.initial_state is not None else \
            torch.zeros(H, K, V, dtype=dtype, device=bound.device)
        for t in range(start, end):
            at = (lambda r: None if r not in roles else roles[r][i, t])  # noqa: E731
            S, o_t = step(S, q[i, t], k[i, t], v[i, t], None if g is None else g[i, t], at("beta"), at("a"),
                          at("b"), kind)
            outs.append(o_t)
        finals.append(S)
    o = torch.stack(outs).reshape(B, T, H, V)
    if x.skip is not None:
        o = o + x.skip.to(dtype)
    return o.to(bound.out_dtype), (torch.stack(finals) if bound.output_final_state else None)


def decay_terms(mod, variant, bound: Bound, dtype: torch.dtype):
    """What a split call of the additive form (runtime.cp) reads beside the op: the query per value head times the
    scale ``[B, T, H, K]`` and the per-step log-decay ``[B, T, H, W]`` (W = K for a vector decay, else 1, floored
    as every backend floors it), in ``dtype``, from the generated role and gate code (autograd differentiates
    both)."""
    rs = roles_mod.role_set(mod, bound)
    q = roles_mod.evaluate_code(roles_mod.with_l2norm_inputs(bound, rs, l2_normalize), rs.roles["query"],
                                roles_mod.ROLE_SHAPES["query"], dtype)
    if rs.qk_l2norm and not rs.l2norm_inputs:
        q = l2_normalize(q)
    gate_inputs = [bound.tensors[n] if bound.tensors[n] is not None else torch.zeros(
        [bound.sizes[d] for d in bound.spec.dims(n)], device=bound.device, dtype=dtype) for n in variant.gate.inputs]
    g = _Call(mod, variant.gate, bound, dtype).log_decay(gate_inputs)
    return q.repeat_interleave(bound.size("H") // bound.size("HQ"), dim=2) * bound.scale, g


def _variant(mod, bound: Bound):
    return mod.VARIANTS[tuple(sorted(bound.switches.items()))]


def run_torch(mod, variant, bound: Bound, mode: str):
    """An op call on the generated PyTorch twin (CPU) of the spec's form: the chunk stages with their explicit
    backward; ``fused_recurrent`` runs the step form in the compute dtype."""
    dtype = compute_dtype(bound)
    with torch.autocast(bound.device.type, enabled=False):
        if mode == "fused_recurrent":
            return recurrent(mod, variant, bound, dtype)
        x = Prepared(mod, bound, variant, mod.FORM, dtype)
        c = _Call(mod, variant.gate, bound, dtype)
        o, ht = TwinChunk.apply(c, mod.FORM, len(x.extras), x.q, x.k, x.v, *x.extras, x.h0, *x.gate_inputs)
    if x.skip is not None:
        o = o + x.skip
    return o.to(bound.out_dtype), (ht if bound.output_final_state else None)


def stages(mod, bound: Bound, do: torch.Tensor, dht: torch.Tensor | None = None) -> dict:
    """Every stage output of one chunk call on the twin, in the Triton host code's layouts (rows [B*T, H, .],
    chunks [chunks, H, .] sequence by sequence), for comparing the two backends stage by stage.

    ``do`` [B, T, H, V], ``dht`` [N, H, K, V] or None: the gradients of the output and the final state.
    Keys (fp32 or fp64): G [rows, H(, K)]; h, dhn [chunks, H, K, V]; ht, dh0 [N, H, K, V]; o [rows, H, V] (the
    core output, before an unfused skip term); dq, dk [rows, HQ, K]; dv [rows, H, V]; dGpos [rows, H(, K)];
    carry [chunks, H(, K)] and dg [rows, H(, K)] (when the gate has inputs); gate_grads (per gate input, its
    shape); per form: additive dvs, dsk [rows, H] (or None); delta U, du [rows, H, V], w [rows, H, K],
    dbeta [rows, H]; general R, dR [rows, H, V], da, db [rows, H, K]."""
    B, T, H, K, V = bound.sizes["B"], bound.sizes["T"], bound.size("H"), bound.size("K"), bound.size("V")
    if not isinstance(do, torch.Tensor) or tuple(do.shape) != (B, T, H, V):
        raise ValueError(f"do: expected the output's gradient of shape [B, T, H, V] = {[B, T, H, V]}, got "
                         f"{list(do.shape) if isinstance(do, torch.Tensor) else type(do).__name__}")
    if dht is not None and (not isinstance(dht, torch.Tensor) or tuple(dht.shape) != (bound.num_seqs, H, K, V)):
        raise ValueError(f"dht: expected the final state's gradient of shape [N, H, K, V] = "
                         f"{[bound.num_seqs, H, K, V]} or None, got "
                         f"{list(dht.shape) if isinstance(dht, torch.Tensor) else type(dht).__name__}")
    variant = _variant(mod, bound)
    form = mod.FORM
    dtype = compute_dtype(bound)
    with torch.no_grad():
        x = Prepared(mod, bound, variant, form, dtype)
        c = _Call(mod, variant.gate, bound, dtype)
        xc, st = _forward(c, form, x.q, x.k, x.v, x.extras, x.h0, x.gate_inputs)
        gr = _backward(c, form, xc, st, do, dht, True)
        L = c.L
        rows = c.B * c.T

        def r(t, heads=None):   # chunked [N, NC, Hx, BT, *D] -> [rows, Hx, *D]
            t = L.unchunk(t) if heads is None else heads(t)
            return t.reshape(rows, *t.shape[2:])

        def w(t):   # the decay width's last dim dropped for scalar decays
            return t if c.vector else t[..., 0]

        out = dict(G=w(r(st["G"])), h=L.chunks(st["h"]), ht=st["ht"], o=r(st["o"]), dhn=L.chunks(gr["dhn"]),
                   dh0=gr["dh0"], dq=r(gr["dq"], c.unchunk_heads), dk=r(gr["dk"], c.unchunk_heads),
                   dv=r(gr["dv"]), dGpos=w(r(gr["dGpos"])))
        if variant.gate.grads:
            dg, dgate = c.gate_backward(x.gate_inputs, gr["dGpos"], gr["carry"])
            out.update(carry=w(L.chunks(gr["carry"])), dg=w(dg.reshape(rows, *dg.shape[2:])), gate_grads=dgate)
        if form == "additive":
            out.update(dvs=None if gr["dvs"] is None else r(gr["dvs"]), dsk=None if gr["dsk"] is None else r(gr["dsk"]))
        elif form == "delta":
            out.update(U=r(st["U"]), w=r(st["w"]), du=r(gr["du"]), dbeta=r(gr["dbeta"]))
        else:
            out.update(R=r(st["R"]), dR=r(gr["dR"]), da=r(gr["da"]), db=r(gr["db"]))
    return out
