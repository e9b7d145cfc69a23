"""Every launch configuration of the generated stages, in one table.

A stage's launch (``num_warps``, ``num_stages``, ``maxnreg``, its key / value blocks ``BK`` / ``BV``, ``RB`` the
sub-blocks per program, ``DOT`` the operand type of whole-chunk products; see :class:`Launch`) is a pure
function of its :class:`Key`: the chunk form launching it, the decay's kind, the products' operand type, the head
dims and how many programs the sequential passes have against the card's SMs. Nothing is timed at run time, so
reruns and every process of a distributed job launch the same kernels and get bit-identical results.

Each entry's docstring says what it was chosen on; the raw sweeps are under ``benchmarks/results/``. For tuning
runs, ``LINATTN_LAUNCH`` overrides entries: ``stage:field=value,...;stage:...``, e.g.
``LINATTN_LAUNCH="dqk_bwd:num_warps=4,num_stages=2;output_fwd:BK=64"`` (:func:`overrides` parses and checks it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import triton

ENV = "LINATTN_LAUNCH"
BT, BC = 64, 16   # the chunk and sub-block sizes every stage is written for


@dataclass(frozen=True)
class Key:
    """What a launch choice may depend on."""

    form: str            # the chunk form launching the stage: additive | delta | general
    vector: bool         # a per-channel decay (else one per head: scalar, constant or none)
    half: int            # the products' operand type: 0 fp32, 1 bf16, 2 fp16
    K: int
    V: int
    programs: int = 0    # sequences x value heads: the sequential state passes' programs per value block
    sms: int = 132       # the card's streaming multiprocessors
    value_scale: bool = False   # the additive form's fused value scale (Mamba2)


@dataclass(frozen=True)
class Launch:
    """The typed fields an entry or an override may set (None: Triton's default / not this stage's)."""

    num_warps: int | None = None
    num_stages: int | None = None
    maxnreg: int | None = None
    BK: int | None = None
    BV: int | None = None
    RB: int | None = None
    DOT: int | None = None
    BKW: int | None = None    # ut_fwd's key block of W
    BW: int | None = None     # the decay width's block of general_dgate_bwd
    FBK: int | None = None    # general_chunk_scores_fwd's key block for the chunks steeper than its span


FIELDS = tuple(f.name for f in fields(Launch))


def pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    """The power of two covering ``n``, within [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def full(K: int) -> int:
    """A block holding the whole head dim."""
    return max(16, triton.next_power_of_2(K))


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """The card's SMs (132, an H100's, when interpreting on the CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def half_kind(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def key(form: str, vector: bool, dtype: torch.dtype, K: int, V: int, programs: int = 0, device=None,
        value_scale: bool = False) -> Key:
    sms = sm_count(torch.device(device)) if device is not None else 132
    return Key(form, vector, half_kind(dtype), K, V, programs, sms, value_scale)


TABLE: dict[str, Callable[[Key], dict]] = {}


def entry(*stages: str):
    def register(fn):
        for s in stages:
            TABLE[s] = fn
        return fn
    return register


def launch(stage: str, k: Key) -> dict:
    """The launch keyword arguments of ``stage`` under ``k``: the table's entry, then any override."""
    out = dict(TABLE[stage](k))
    for name, val in overrides().get(stage, {}).items():
        out[name] = val
    return out


@functools.cache
def _parse(text: str) -> dict:
    out: dict[str, dict] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        stage, sep, body = part.partition(":")
        stage = stage.strip()
        if not sep or stage not in TABLE:
            raise ValueError(f"{ENV}: {part!r}: expected 'stage:field=value,...' with a stage of {sorted(TABLE)}")
        for item in filter(None, (i.strip() for i in body.split(","))):
            name, eq, val = item.partition("=")
            name = name.strip()
            if not eq or name not in FIELDS or not val.strip().lstrip("-").isdigit():
                raise ValueError(f"{ENV}: {stage}: {item!r}: expected field=integer with a field of {FIELDS}")
            out.setdefault(stage, {})[name] = int(val)
    return out


def overrides() -> dict:
    """``LINATTN_LAUNCH`` parsed: {stage: {field: value}}; a ValueError names what it cannot read."""
    return _parse(os.environ.get(ENV, ""))


# ---- the gate stage -------------------------------------------------------------------------------------------
@entry("gate_fwd")
def _gate_fwd(k: Key) -> dict:
    """One program per chunk, head and key block (vector decays: the whole key dim up to 64)."""
    return dict(BK=pow2(k.K) if k.vector else 16)


@entry("gate_bwd")
def _gate_bwd(k: Key) -> dict:
    """One program per chunk, head and key block: the running sum inside the chunk from its carry."""
    return dict(BK=pow2(k.K) if k.vector else 16)


# ---- the additive stages (the delta form reuses them) -----------------------------------------------------------
@entry("add_state_fwd", "add_state_bwd")
def _add_state(k: Key) -> dict:
    """The additive form's state passes: one program per key block, value block, sequence and head."""
    return dict(BK=pow2(k.K), BV=pow2(k.V))


@entry("scores_fwd")
def _scores_fwd(k: Key) -> dict:
    """Vector decays' sub-blocks below the diagonal (H200 GLA T=4096: 0.322 ms at BK 64 / 4 warps, 0.267 at 32 / 1)."""
    return dict(BK=pow2(k.K, hi=32), num_warps=1)


@entry("scores_fwd_pair")
def _scores_fwd_pair(k: Key) -> dict:
    """The delta form's scores_fwd, which also forms P = the keys' own scores: 2 warps."""
    return dict(BK=pow2(k.K, hi=32), num_warps=2)


@entry("scores_diag", "scores_diag_pair")
def _scores_diag(k: Key) -> dict:
    """The diagonal sub-blocks, one program per sub-block and head (H200 T=4096: KDA 0.340 ms at BK 64 / 2 warps,
    0.333 at 32 / 1; GLA 0.198 -> 0.163)."""
    return dict(BK=pow2(k.K, hi=32), num_warps=1)


@entry("output_fwd")
def _output_fwd(k: Key) -> dict:
    """Key block: vector decays reading q and G (GLA) 32 (H200 T=4096: 0.290 -> 0.251 ms from 64), reading the
    delta form's qg = Q * E[G] (KDA) 128 (0.192 -> 0.184), scalar decays 64. Value block: up to 128 for vector
    decays (their A is read, not formed; H100 KDA T=4096 0.402 -> 0.374 ms), 64 otherwise. With a fused value
    scale (Mamba2) 2 warps (H100: 1.027 -> 0.895 ms at T=16384)."""
    bk = pow2(k.K, hi=(128 if k.form == "delta" else 32) if k.vector else 64)
    out = dict(BK=bk, BV=pow2(k.V, hi=128 if k.vector else 64))
    if k.value_scale:
        out["num_warps"] = 2
    return out


@entry("dv_bwd")
def _dv_bwd(k: Key) -> dict:
    """H100 sweep (4 warps, 3 stages before), T=16384 / 4096: scalar decays 2 warps (retention 0.409 -> 0.346 ms,
    Mamba2 1.342 -> 1.208), vector decays 2 stages (GLA 0.475 -> 0.414)."""
    return dict(BK=pow2(k.K), BV=pow2(k.V), **(dict(num_stages=2) if k.vector else dict(num_warps=2)))


@entry("dv_bwd_local")
def _dv_bwd_local(k: Key) -> dict:
    """The delta form's A^T dO: 2 warps (H100 delta rule T=16384: 0.254 -> 0.209 ms from 4)."""
    return dict(BK=pow2(k.K), BV=pow2(k.V), num_warps=2)


@entry("dqk_bwd")
def _dqk_bwd(k: Key) -> dict:
    """H100 sweeps (B*T = 32768, H = 16, D = 128; 4 warps, 3 stages before): the delta form (it also reads dU and
    writes dW) 8 warps and 2 stages (KDA 0.907 -> 0.762 ms; the scalar delta rule, with its value heads per group
    a compile-time constant, fits two programs per SM at 2 stages: H200 T=4096 0.951 -> 0.590); the additive form
    8 warps (retention 1.209 -> 0.931, GLA 0.647 -> 0.620), with a value scale (Mamba2) 2 stages instead
    (2.627 -> 1.729; 8 warps 2.375)."""
    if k.form == "delta":
        opts = dict(num_warps=8, num_stages=2)
    else:
        opts = dict(num_stages=2) if k.value_scale and not k.vector else dict(num_warps=8)
    return dict(BK=pow2(k.K), **opts)


@entry("dqk_chunk_intra_bwd")
def _dqk_chunk_intra_bwd(k: Key) -> dict:
    """Vector decays' intra-chunk pairs of the chunks whose decay across the chunk is <= DIAG_SPAN, as whole-chunk
    products (H200 KDA T=4096: 1.710 ms at BK 32 / 4 warps, 2.729 at 32 / 8, 2.022 at 64 / 8; dqk_intra_bwd alone
    3.864). Operands: exact fp32 for fp32 inputs (tf32 put dq 4e-4 off the oracle), tf32 (DOT 3) for half ones."""
    return dict(BK=pow2(k.K, hi=32), num_warps=4, DOT=3 if k.half else 0)


@entry("dqk_intra_bwd", "dqk_intra_bwd_pair")
def _dqk_intra_bwd(k: Key) -> dict:
    """The steeper chunks' pairs, sub-block by sub-block: RB 4 sub-blocks per program (its programs mostly return
    at once, dqk_chunk_intra_bwd having taken their chunk, and their number is the launch's cost: H200 KDA T=4096
    0.203 ms at 1, 0.055 at 4). The delta form's (PAIR: also P's pairs) 4 warps."""
    return dict(BK=pow2(k.K, hi=32), RB=4, **(dict(num_warps=4) if k.form == "delta" else {}))


@entry("recurrent_fwd", "recurrent_delta_fwd", "general_recurrent_fwd")
def _recurrent_fwd(k: Key) -> dict:
    """The step form: one program per value block (32), sequence and head, the whole key dim."""
    return dict(BK=full(k.K), BV=pow2(k.V, hi=32))


@entry("contain")
def _contain(k: Key) -> dict:
    """The chunk forward's containment pass (host.contain, the step form over flagged chunks): RB chunks of one
    head per program. On finite inputs every program reads its chunks' flags and returns, and the number of
    programs is the launch's cost (as dqk_intra_bwd's): 16 chunks make T=4096, B=8, 16 heads 512 programs per
    value block instead of 8192."""
    return dict(RB=16)


# ---- the delta form ------------------------------------------------------------------------------------------
@entry("ut_fwd")
def _ut_fwd(k: Key) -> dict:
    """2 warps (H100 T=16384: delta rule 0.984 -> 0.730 ms, KDA 0.941 -> 0.722 from 4); vector decays 2 stages
    (KDA 0.709 -> 0.676)."""
    return dict(BK=full(k.K), BKW=pow2(k.K), BV=pow2(k.V), num_warps=2, num_stages=2 if k.vector else 3)


@entry("ut_bwd")
def _ut_bwd(k: Key) -> dict:
    """4 warps (H100 T=16384: delta rule 0.888 -> 0.558 ms, KDA 1.066 -> 0.834 from 8)."""
    return dict(BK=pow2(k.K), BV=pow2(k.V), num_warps=4)


def _state_bv(k: Key) -> int:
    """Value block of the delta form's sequential state passes (they hold the whole key dim): 16 for K > 128; 64
    when the programs it leaves still cover every SM (H100 T=4096, 256 programs: KDA state_fwd 0.471 -> 0.342 ms,
    state_bwd 0.868 -> 0.717), else 32 (T=16384: 64 would idle half the SMs); fp32 inputs 32."""
    if full(k.K) > 128:
        return 16
    return 64 if k.half and k.programs * triton.cdiv(k.V, 64) >= k.sms else 32


def _state_warps(k: Key, BV: int, bwd: bool) -> dict:
    """Software pipelining within sm_90's 227 KiB of shared memory (bf16 K=128 177-185 KiB at depth 3; bf16 K=256
    197-205 KiB at depth 2; fp32 K=128 40 KiB at depth 1; benchmarks/sm90_fit.py). Half inputs with K <= 128 (H100,
    B*T = 32768, H = 16, V = 128): state_bwd 2 stages for vector decays, 3 for scalar ones, 8 warps when the
    programs do not fill two per SM, else 4 (KDA 2.060 -> 1.147 ms at T=16384); state_fwd of vector decays 8 warps
    (KDA 1.008 -> 0.737), of scalar decays 2 stages when the programs fill the SMs (delta rule T=4096: 0.365 ->
    0.337 ms), Triton's 3 below that."""
    programs = k.programs * triton.cdiv(k.V, BV)
    if not k.half:
        return dict(num_stages=1)
    if full(k.K) > 128:
        return dict(num_stages=2)
    if bwd:
        return dict(num_warps=8 if programs < 2 * k.sms else 4, num_stages=2 if k.vector else 3)
    if k.vector:
        return dict(num_warps=8)
    return dict(num_stages=2) if programs >= k.sms else {}


@entry("state_fwd")
def _delta_state_fwd(k: Key) -> dict:
    """The delta form's state pass. Value block: vector decays take 128 when its programs still occupy nearly every
    SM, one wave instead of two (H100 KDA T=4096, 128 programs on 132 SMs: 0.341 -> 0.294 ms), else _state_bv."""
    BV = _state_bv(k)
    if k.half and k.vector and full(k.K) <= 128 and k.V >= 128 and k.programs * triton.cdiv(k.V, 128) >= 0.96 * k.sms:
        BV = 128
    return dict(BK=full(k.K), BV=BV, **_state_warps(k, BV, bwd=False))


@entry("state_bwd")
def _delta_state_bwd(k: Key) -> dict:
    """The delta form's reverse state pass (see _state_bv and _state_warps)."""
    BV = _state_bv(k)
    return dict(BK=full(k.K), BV=BV, **_state_warps(k, BV, bwd=True))


# ---- the general form -----------------------------------------------------------------------------------------
def _general_state(k: Key) -> dict:
    """The sequential state passes of the general form: the whole key dim in one block, 8 warps. Half inputs with
    K <= 128: the value block (32, 64 or 128) whose programs take the fewest waves over the card's SMs, the
    smaller of a tie (each program walks every chunk, so a second wave costs a whole pass: H200 RWKV7 T=4096, 128
    programs: general_state_fwd 0.473 ms at BV 32, 0.287 at 128; general_state_bwd 0.519 -> 0.383); 3 stages up to
    BK * BV = 4096, else 2. Otherwise (fp32, K = 256: sm_90 spills more at wider blocks) 4096 / BK, 3 stages when
    a row of K fits 256 bytes, else 1."""
    BK = full(k.K)
    if k.half and BK <= 128:
        top = max(32, triton.next_power_of_2(k.V))
        BV = min((bv for bv in (32, 64, 128) if bv <= top),
                 key=lambda bv: (-(-k.programs * triton.cdiv(k.V, bv) // k.sms), bv))
        BV = max(16, min(BV, triton.next_power_of_2(k.V)))
        return dict(BK=BK, BV=BV, num_warps=8, num_stages=3 if BK * BV <= 4096 else 2)
    BV = max(16, min(triton.next_power_of_2(k.V), 4096 // BK, 64))
    return dict(BK=BK, BV=BV, num_warps=8, num_stages=3 if BK * (4 if not k.half else 2) <= 256 else 1)


TABLE["general_state_fwd"] = TABLE["general_state_bwd"] = _general_state


@entry("general_chunk_scores_fwd")
def _general_chunk_scores_fwd(k: Key) -> dict:
    """Vector decays: the chunks whose decay across the chunk is within the span, [BT, BK] x [BK, BT] products in
    one go (H200 RWKV7 T=16384: 0.600 ms at BK 32 / 4 warps, 0.836 at 32 / 8, 0.746 at 16 / 4); it also forms the
    steeper chunks' sub-block rows itself (general_scores_fwd's launch for those cost 0.076 ms of programs that
    mostly returned at once). FBK: the key block of that fallback."""
    return dict(BK=pow2(k.K, hi=32), num_warps=4, FBK=pow2(k.K, hi=16))


@entry("general_scores_fwd")
def _general_scores_fwd(k: Key) -> dict:
    """Scalar decays' scores by sub-blocks: BK 32, 2 warps."""
    return dict(BK=pow2(k.K, hi=32), num_warps=2)


@entry("general_solve_fwd")
def _general_solve_fwd(k: Key) -> dict:
    """Half inputs: BK 32, one warp (a chunk's [16, 16] sub-block products fill one warp; H200 RWKV7 T=4096: 0.355 ms,
    0.547 at 64 / 4 warps, 0.373 at 16 / 1); fp32 inputs 64 / 4 warps (sm_90 spills 1892 B at one warp)."""
    return dict(BK=pow2(k.K, hi=32 if k.half else 64), num_warps=1 if k.half else 4)


@entry("general_output_fwd")
def _general_output_fwd(k: Key) -> dict:
    """Half inputs BK 128 / BV 128 (H200 RWKV7 T=4096: 0.237 ms, 0.297 at 64 / 64); fp32 inputs BK 64 (sm_90 spills
    40772 B at 128)."""
    return dict(BK=pow2(k.K, hi=128 if k.half else 64), BV=pow2(k.V, hi=128))


@entry("general_dv_bwd")
def _general_dv_bwd(k: Key) -> dict:
    return dict(BK=pow2(k.K), BV=pow2(k.V))


@entry("general_dmat_bwd")
def _general_dmat_bwd(k: Key) -> dict:
    """H100 RWKV7 T=16384 bf16: 0.564 ms at 4 warps / 2 stages, 0.733 at 8 / 3."""
    return dict(BV=pow2(k.V), num_warps=4 if k.half else 8, num_stages=2)


@entry("general_dqk_bwd")
def _general_dqk_bwd(k: Key) -> dict:
    return dict(BK=pow2(k.K), BV=pow2(k.V), num_warps=8, num_stages=3 if k.half else 2)


@entry("general_chunk_intra_bwd")
def _general_chunk_intra_bwd(k: Key) -> dict:
    """Vector decays: every pair term of the chunks within the span as [BT, BT] x [BT, BK] products (H200 RWKV7
    T=16384: 2.275 ms at BK 32 / 4 warps, 3.935 at 32 / 8, 2.824 at 64 / 8; the two per-sub-block kernels taking
    every chunk 2.387 + 1.521)."""
    return dict(BK=pow2(k.K, hi=32), num_warps=4, DOT=int(k.half == 1))


@entry("general_intra_diag_bwd", "general_intra_bwd")
def _general_intra_bwd(k: Key) -> dict:
    """The steeper chunks: the diagonal sub-blocks (general_intra_diag_bwd, one program per sub-block and head) and
    the rest (general_intra_bwd), 4 sub-blocks per program (programs that return at once still cost: H200 RWKV7
    T=4096, 0.123 + 0.084 ms at one each, 0.034 + 0.024 at 4), BK 64 / 2 warps (H200 RWKV7 T=16384: 1.468 ms,
    1.617 at 32 / 2)."""
    return dict(BK=pow2(k.K, hi=64), num_warps=2, RB=4)


@entry("general_dgate_bwd")
def _general_dgate_bwd(k: Key) -> dict:
    """Scalar decays' dGpos_t = X_t + Q_{t+1}: one block of the width 1."""
    return dict(BW=16)
