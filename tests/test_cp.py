"""Context parallelism (``cp_context``, runtime/cp.py) on CPU processes: gloo, 2 and 4 ranks.

One pool of 4 rank processes serves the whole module (tests/distributed/cp_worker.py; spawning costs seconds on
the 2-core CI machine, so it happens once): 4-rank cases run on the whole pool, 2-rank ones on the subgroups
{0, 1} or {2, 3} (the latter: group ranks that are not the global ones). Each case is drawn the same way on
every rank and in this process; the ranks run their contiguous slices through the op (the generated PyTorch
twin) with a context, this process runs the unsplit call through the float64 oracle and compares: outputs
concatenated over ranks, final states from the rank that owns each sequence (zeros elsewhere), gradients of
per-token inputs concatenated, of per-head parameters and of the initial state summed over ranks. Each rank also
reports which backend its local calls reached (the twin here, the Triton kernels under the interpreter). Log-decays
are drawn mild (MILD) so that the state crossing a boundary weighs in every output: a wrong carry, transition
or correction in runtime/cp.py fails dozens of these cases.

Tolerance: the op tests' own bound against the float64 oracle (reference.verify.TOLERANCE: 1e-4 relative in
fp32, max |err| over max |ref| as reference.drawing.rel_err takes it; fp32 sums of O(T) O(1) terms, eps 1.2e-7).
A split call adds one fp32 matrix product per rank boundary (the incoming state through the segment's transition)
to what the single-process op does, so it is held to the same bound; float64 cases are held to 1e-9, which only
the exact algebra of the split meets.

A few cases run the generated Triton kernels under TRITON_INTERPRET=1, in a second pool of 2 processes started
with the flag set (it is read when Triton is imported).
"""

import queue
import re
import time
import uuid

import pytest
import torch
import torch.multiprocessing as mp
from distributed import cp_worker

from linattn_dsl import reference
from linattn_dsl.compiler import registry
from linattn_dsl.reference import drawing
from linattn_dsl.reference.verify import TOLERANCE

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = registry.builtin_names()
WORST = {}   # spec -> worst relative error seen over its cases (printed with -s)


class Pool:
    """``world`` rank processes (cp_worker.serve) with an inbox each and one shared outbox."""

    def __init__(self, world: int, folder, env: dict):
        ctx = mp.get_context("spawn")
        self.world = world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        init = folder / f"init_{uuid.uuid4().hex}"
        self.procs = [ctx.Process(target=cp_worker.serve, args=(r, world, str(init), env, self.inboxes[r],
                                                                self.outbox), daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self.broken = False

    def submit(self, job: dict, ranks) -> None:
        for r in ranks:
            self.inboxes[r].put(job)

    def run(self, job: dict, ranks, timeout: float = 120.0) -> dict:
        self.submit(job, ranks)
        return self.collect(job, ranks, timeout)

    def collect(self, job: dict, ranks, timeout: float = 120.0) -> dict:
        """Each rank's answer to ``job``; a worker's exception, a dead worker or a timeout fails the test and
        retires the pool (its ranks may be out of step)."""
        out, deadline = {}, time.monotonic() + timeout
        while len(out) < len(ranks):
            try:
                rank, res = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close(kill=True)
                    raise AssertionError(f"job {job}: no answer from ranks {sorted(set(ranks) - set(out))} "
                                         f"({'dead: ' + str(dead) if dead else f'{timeout:g} s'})") from None
                continue
            if res[0] == "error":   # the other ranks may wait in a collective for it: no use waiting for them
                self.close(kill=True)
                raise AssertionError(f"job {job} failed on rank {rank}:\n{res[2]}")
            out[rank] = res[1]
        return out

    def close(self, kill: bool = False):
        self.broken = True
        if not kill:
            for box in self.inboxes:
                box.put(None)
        for p in self.procs:
            if kill:
                p.kill()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """pools(interpret=False): the module's pool (4 ranks; 2 under the Triton interpreter), started on first use
    and again after a failure retired it."""
    folder = tmp_path_factory.mktemp("cp")
    live = {}

    def get(interpret: bool = False) -> Pool:
        if interpret not in live or live[interpret].broken:
            env = {"TRITON_INTERPRET": "1" if interpret else "0", "OMP_NUM_THREADS": "1"}
            live[interpret] = Pool(2 if interpret else 4, folder, env)
        return live[interpret]

    yield get
    for p in live.values():
        if not p.broken:
            p.close()
    print("\nworst relative error per spec:", {k: f"{e:.1e}" for k, e in sorted(WORST.items())})


# log-decays drawn in [MILD, 0] per step: a rank's segment of 16-70 steps keeps a good part of the state it
# receives (exp(-0.1 T) per channel), so an error in what crosses a boundary shows in every output and gradient
# (draw_case's default of -5 would leave ~exp(-40) of it); strong decays have a test of their own
MILD = -0.2
GROUP_RANKS = {"world": [0, 1, 2, 3], "01": [0, 1], "23": [2, 3]}


def oracle(spec, case, final: bool = True):
    """The unsplit call through the float64 oracle: output, final state and the gradients (inputs by name, then
    the initial state) for the cotangents the ranks use (cp_worker.COTANGENT_SEED); without ``final``, a loss
    of the output alone."""
    t = {n: (x.detach().double().requires_grad_() if x is not None else None) for n, x in case.tensors.items()}
    h0 = None if case.initial_state is None else case.initial_state.detach().double().requires_grad_()
    o, s = case.call(lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw), t, h0)
    gen = torch.Generator().manual_seed(cp_worker.COTANGENT_SEED)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    ((o * do).sum() + (s * ds).sum() * final).backward()
    grads = {n: x.grad for n, x in t.items() if x is not None}   # None: an input the call does not read
    return o.detach(), s.detach(), grads, None if h0 is None else h0.grad


def owners(case, W: int, Tl: int) -> list[int]:
    """The group rank that holds each global sequence's last token (per-row layout: the last rank)."""
    if case.cu_seqlens is None:
        return [W - 1] * case.note["B"]
    return [(int(end) - 1) // Tl for end in case.cu_seqlens[1:]]


def split_errors(pools, spec_ref, mode: str, group: str, dtype=torch.float32, interpret=False, final=True,
                 **draw) -> dict:
    """Relative errors of a split call of ``spec_ref`` (a shipped spec's name or (spec file, generated file)) on
    the case ``draw`` against the oracle; asserts the layout of the final states on the way (``final``:
    output_final_state)."""
    spec = registry.load(spec_ref if isinstance(spec_ref, str) else spec_ref[0])
    draw.setdefault("log_decay_min", MILD)
    dtype_name = str(dtype).split(".")[-1]
    case = cp_worker.draw(spec, draw, dtype_name)
    ranks = GROUP_RANKS[group] if not interpret else [0, 1]
    W, T = len(ranks), case.note["T"]
    assert T % W == 0, "a case's tokens split evenly"
    job = dict(kind="split", spec=spec_ref, mode=mode, group=group, draw=draw, dtype=dtype_name, final=final)
    pool = pools(interpret)
    pool.submit(job, ranks)
    ref_o, ref_s, ref_grads, ref_dh0 = oracle(spec, case, final)   # while the ranks work
    res = pool.collect(job, ranks, timeout=300 if interpret else 120)
    parts = sorted(res.values(), key=lambda x: x["group_rank"])
    assert [p["group_rank"] for p in parts] == list(range(W))
    ran, idle = ("triton", "twin") if interpret else ("twin", "triton")   # the backend the case is meant for
    assert all(p["backends"][ran] > 0 and p["backends"][idle] == 0 for p in parts), [p["backends"] for p in parts]
    t = torch.from_numpy
    errs = {"o": drawing.rel_err(torch.cat([t(p["o"]) for p in parts], 1), ref_o)}
    # final states: each sequence's row from the rank holding its end; exactly zero on every other rank
    own = owners(case, W, T // W)
    for r, p in enumerate(parts):
        assert p["rows"] == [i for i, o in enumerate(own) if o == r], (r, p["rows"], own)
        if not final:
            assert p["final_state"] is None
            continue
        others = [i for i in range(len(own)) if own[i] != r]
        assert not t(p["final_state"])[others].any(), f"rank {r}: nonzero final state on rows it does not own"
    if final:
        states = torch.stack([t(parts[own[i]]["final_state"][i]) for i in range(len(own))])
        errs["final_state"] = drawing.rel_err(states, ref_s)
    for n, g_ref in ref_grads.items():
        got = [p["grads"].get(n) for p in parts]
        if g_ref is None and all(g is None for g in got):
            continue
        if any(g is None for g in got):
            errs[f"d{n}"] = float("inf")
            continue
        per_token = tuple(spec.dims(n)[:2]) == ("B", "T")
        g_ref = torch.zeros(case.tensors[n].shape, dtype=torch.float64) if g_ref is None else g_ref
        g = torch.cat([t(x) for x in got], 1) if per_token else sum(t(x) for x in got)
        errs[f"d{n}"] = drawing.rel_err(g, g_ref)
    if ref_dh0 is not None:
        got = [t(p["dinitial_state"]) for p in parts if p["dinitial_state"] is not None]
        errs["dinitial_state"] = drawing.rel_err(sum(got), ref_dh0) if got else float("inf")
    key = spec.name if isinstance(spec_ref, str) else f"drawn ({spec.transition.kind} transition)"
    WORST[key] = max(WORST.get(key, 0.0), max(errs.values()))
    print(f"{mode}_{spec.name} {group} {dtype_name} {draw}: worst {max(errs, key=errs.get)} {max(errs.values()):.1e}")
    return errs


def assert_within(errs: dict, dtype=torch.float32, note: str = ""):
    tol = TOLERANCE[dtype]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{note}relative errors above {tol:g}: {bad} (all: {errs})"


# ---- every shipped spec ------------------------------------------------------------------------------------------

def flipped(name: str) -> dict:
    """Every switch of the spec away from its default (KDA's and Gated DeltaNet's gate in the kernel, linear
    attention without its normaliser, Mamba's dt without softplus, q/k L2 norm in the op)."""
    return {k: not v for k, v in registry.load(name).switches.items()}


@pytest.mark.parametrize("name", SPECS)
def test_chunk_rows_two_ranks(pools, name):
    """Per-row layout (B = 2, each row one sequence of 2 x 24 tokens) on ranks {0, 1}, default switches, optional
    inputs present (Mamba2's D and dt_bias...), an initial state; Gated DeltaProduct with 2 delta steps a token."""
    assert_within(split_errors(pools, name, "chunk", "01", B=2, T=48, heads=2, K=8, V=16, seed=1))


@pytest.mark.parametrize("name", SPECS)
def test_chunk_packed_four_ranks(pools, name):
    """Packed sequences of 7, 50, 3 and 20 tokens on 4 ranks of 20 (the second spans ranks 0-2, the last starts at a
    rank boundary), every switch flipped, grouped q/k heads where the spec has them, 3 delta steps a token for
    Gated DeltaProduct, an initial state."""
    errs = split_errors(pools, name, "chunk", "world", seqlens=[7, 50, 3, 20], heads=2, groups=1, K=16, V=8,
                        switches=flipped(name), substeps=3, seed=2)
    assert_within(errs)


@pytest.mark.parametrize("name", SPECS)
def test_fused_recurrent_packed(pools, name):
    """fused_recurrent on ranks {2, 3} (group ranks 0, 1): packed 10, 20 and 2 tokens, the second across the
    boundary, default switches, an initial state."""
    errs = split_errors(pools, name, "fused_recurrent", "23", seqlens=[10, 20, 2], heads=2, K=8, V=8, seed=3)
    assert_within(errs)


# ---- varlen: sequences across any number of rank boundaries ---------------------------------------------------

PACKINGS = {   # 4 ranks of 16 tokens: offsets 16, 32, 48 are the rank boundaries
    # one sequence over ranks 0-2; rank 2 ends with a whole sequence, rank 3 starts a new one and holds three
    "span3_boundary_start": [5, 40, 3, 2, 7, 7],
    # one sequence over all four ranks (ranks 1 and 2 hold only its middle)
    "span4": [3, 58, 3],
    # sequences of one token on each side of a boundary, ends at boundaries, several sequences on rank 2
    "ones_at_boundaries": [16, 1, 15, 1, 1, 30],
    # one token either side of boundary 16; the rest from rank 1 to the end
    "two_across": [15, 2, 47],
    # the whole packing one sequence
    "one_sequence": [64],
}


@pytest.mark.parametrize("with_initial_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("packing", sorted(PACKINGS))
@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7"])
def test_varlen_chunk_forms(pools, name, packing, with_initial_state):
    """The three chunk forms (additive, delta rule, general) on every packing, with and without an initial
    state; the final state of each sequence on the rank that holds its end (split_errors checks the rows)."""
    errs = split_errors(pools, name, "chunk", "world", seqlens=PACKINGS[packing], heads=2, K=8, V=8,
                        with_initial_state=with_initial_state, seed=4)
    assert_within(errs)


@pytest.mark.parametrize("packing", ["span3_boundary_start", "ones_at_boundaries"])
@pytest.mark.parametrize("name, extra", [
    ("retention", {}), ("mamba2", dict(groups=1)), ("kda", dict(switches=dict(use_gate_in_kernel=True))),
    ("gated_delta_product", dict(substeps=2)),   # 2 steps a token: the packing doubled inside the op
    ("rwkv6", {}),                               # read before write: 2 steps a token, the bonus u
    ("linear_attn", {}),                         # the normaliser rides in the state as a value column
    ("hgrn2", {}), ("comba", {}),
], ids=lambda x: x if isinstance(x, str) else "")
def test_varlen_rewritten_calls(pools, name, extra, packing):
    """Specs whose call the op rewrites (several steps a token, a wider value) and other decay kinds, packed."""
    errs = split_errors(pools, name, "chunk", "world", seqlens=PACKINGS[packing], heads=2, K=8, V=8, seed=5,
                        **extra)
    assert_within(errs)


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "rwkv7", "mamba2"])
def test_strong_decays(pools, name):
    """Log-decays down to -20 a step: the segments' transitions underflow towards zero; still finite, still
    within the bound."""
    errs = split_errors(pools, name, "chunk", "world", seqlens=PACKINGS["span4"], heads=2, K=8, V=8,
                        log_decay_min=-20.0, seed=13)
    assert_within(errs)


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7"])
def test_without_final_state(pools, name, mode):
    """output_final_state=False: no final state; outputs and every gradient as before."""
    errs = split_errors(pools, name, mode, "world", final=False, seqlens=PACKINGS["span4"], heads=2, K=8, V=8,
                        seed=12)
    assert_within(errs)


@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7", "mamba2"])
def test_several_chunks_per_rank(pools, name):
    """2 ranks of 70 tokens (two chunks of the default 64 each), a sequence ending mid-chunk on rank 1."""
    errs = split_errors(pools, name, "chunk", "01", seqlens=[100, 40], heads=2, K=8, V=8, seed=6)
    assert_within(errs)


@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7", "linear_attn"])
def test_wide_value_in_parts(pools, name):
    """V + K = 264 value columns (the delta and general forms' split widens the value by K) exceed the kernels'
    256: two local calls; the additive specs (no widening) at the same width."""
    errs = split_errors(pools, name, "chunk", "01", seqlens=[10, 22], heads=1, K=16, V=248, seed=7)
    assert_within(errs)


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7", "gated_delta_product"])
def test_float64_is_exact(pools, name, mode):
    """float64 inputs on the twin: the split itself adds nothing above float64 rounding."""
    errs = split_errors(pools, name, mode, "world", dtype=torch.float64, seqlens=PACKINGS["span3_boundary_start"],
                        heads=2, K=8, V=8, seed=8)
    assert_within(errs, torch.float64)


# ---- drawn specs: regenerated through the public API ------------------------------------------------------------

DRAWN = {   # transition, decay kind of the drawn spec
    "additive": ("none", "vector"), "delta": ("delta", "scalar"), "general": ("general", "constant")}


@pytest.fixture(scope="module")
def drawn_specs(tmp_path_factory):
    """One spec per chunk form drawn by test_random_specs' strategy (derandomized), regenerated into a temporary
    folder (spec file, generated module file)."""
    from _helpers import regen
    from hypothesis import HealthCheck, Phase, given, settings
    from test_random_specs import spec_sources

    out = {}
    for form, (transition, decay) in DRAWN.items():
        sources = []

        @settings(max_examples=1, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(spec_sources().filter(lambda s: f"Transition.{transition}(" in s and f"Decay.{decay}(" in s))
        def draw(source):
            sources.append(source)

        draw()
        folder = tmp_path_factory.mktemp(f"drawn_{form}")
        spec, mod = regen(folder, "drawn", sources[-1])
        assert mod.FORM == form
        out[form] = (sources[-1], (str(folder / "drawn.py"), str(folder / "gen" / "drawn.py")))
    return out


@pytest.mark.parametrize("form", sorted(DRAWN))
def test_drawn_specs(pools, drawn_specs, form):
    """A drawn spec of each form: chunk packed on 4 ranks, fused_recurrent per row on 2."""
    source, ref = drawn_specs[form]
    errs = split_errors(pools, ref, "chunk", "world", seqlens=[9, 40, 15], heads=2, groups=1, K=8, V=8, seed=9)
    assert_within(errs, note=source)
    errs = split_errors(pools, ref, "fused_recurrent", "01", B=2, T=32, heads=2, groups=1, K=8, V=8, seed=10)
    assert_within(errs, note=source)


# ---- the Triton kernels under the interpreter --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7"])
def test_chunk_forms_under_the_interpreter(pools, name):
    """The generated Triton kernels of each chunk form (TRITON_INTERPRET=1), 2 ranks, a sequence across the
    boundary."""
    errs = split_errors(pools, name, "chunk", "world", interpret=True, seqlens=[5, 20, 7], heads=1, K=8, V=8,
                        seed=11)
    assert_within(errs)


# ---- bad input: ValueError naming the argument, before any communication ------------------------------------

EXPECT_T = (r"^cp_context: its cu_seqlens pack 64 tokens over its 4 ranks, so the inputs on each rank expect "
            r"T = total / world = 16 tokens; got T = ")
BAD = {   # cp_worker's bad call -> (ranks that must raise, the message); the other ranks' calls return
    "op_cu_seqlens": (None, r"^cu_seqlens: with cp_context, pass the global packing to cp_context"),
    "uneven_total": (None, r"^cu_seqlens: its 63 tokens do not split evenly over the group's 4 ranks"),
    "local_T": (None, EXPECT_T + "10$"),
    "local_T_multiple": (None, EXPECT_T + "32$"),      # a whole multiple of the packing: was taken as 2 steps a token
    "local_T_read_before": (None, EXPECT_T + r"32 \(64 steps of 2 per token\)$"),   # RWKV6: 2 steps a token
    "local_T_substeps": (None, EXPECT_T + r"10 \(20 steps of 2 per token\)$"),
    "no_tokens": (None, EXPECT_T + "0$"),
    "packed_B2": (None, r"^cp_context: packed sequences \(its cu_seqlens\) need batch size B == 1, got B = 2"),
    "local_initial_state": (None, r"^initial_state: expected shape \[N, H, K, V\] = \[3, 2, 8, 8\], "
                                  r"got \[2, 2, 8, 8\]"),
    "context_type": (None, r"^cp_context: expected a context from linattn_dsl.distributed.cp_context\(group, "
                           r"cu_seqlens\), got ProcessGroup"),
    "not_member": ([1, 2, 3], r"^group: this process \(global rank \d\) is not a member of the group"),
    "nccl_cpu": (None, r"^cp_context: its group's backend is nccl, which needs CUDA tensors; the inputs are on cpu"),
    "cu_float": (None, r"^cu_seqlens: expected a 1-d integer tensor \[N \+ 1\], got torch.float32"),
    "cu_not_increasing": (None, r"^cu_seqlens: expected strictly increasing offsets from 0.*\[0, 40, 40, 64\]"),
}
CONTEXT_ONLY = ("uneven_total", "not_member", "cu_float", "cu_not_increasing")   # raised by cp_context: no op call


@pytest.mark.parametrize("name, mode", [(n, m) for n in sorted(BAD) for m in ("chunk", "fused_recurrent")
                                        if m == "chunk" or n not in CONTEXT_ONLY])
def test_bad_input(pools, name, mode):
    """Every rank of 4 runs the wrong call with the collectives trapped (cp_worker.bad): the ValueError comes
    first. The nccl case takes a gloo context with its backend replaced: the check needs no GPU."""
    must, pattern = BAD[name]
    pool = pools()
    res = pool.run(dict(kind="bad", name=name, mode=mode), range(4))
    for r, (kind, msg) in sorted(res.items()):
        if must is None or r in must:
            assert kind == "ValueError" and re.search(pattern, msg), (r, kind, msg)
        else:
            assert kind == "returned", (r, kind, msg)
    assert pool.run(dict(kind="ping"), range(4)) == {r: 4.0 for r in range(4)}   # the ranks still in step


def test_context_needs_an_initialised_group():
    """This process never joined a group."""
    from linattn_dsl.distributed import cp_context

    with pytest.raises(ValueError, match=r"^group: torch.distributed is not initialised"):
        cp_context()
