"""Rank process of tests/test_cp.py: one of a pool of gloo processes started once per test module, which takes
jobs from its inbox and answers on the shared outbox until it gets None.

A job names a spec (shipped, or a spec file and its generated module), a mode, a subgroup of the pool and the
``draw_case`` keywords of one case. Every rank of the subgroup draws the same case (seeded), takes its contiguous
slice of the tokens, runs the op with ``cp_context`` and returns its output, final state, the rows it owns and the
gradient of every leaf for the cotangents the test process also gives the oracle (drawn from the same seed).
Tensors travel as numpy arrays. Bad-input jobs run one wrong call with every collective of torch.distributed
replaced by a trap, so an error raised after communication started shows as a RuntimeError, not a ValueError.

Nothing heavy is imported at module level: ``serve`` sets the environment first (TRITON_INTERPRET is read when
Triton and the generated kernels are imported).
"""

import os
import traceback

COTANGENT_SEED = 1234   # do, then d(final_state): the same draws in the test process's oracle
# the collectives the op and cp_context could reach; trapped while a bad-input job runs
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier", "send", "recv",
               "isend", "irecv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather",
               "scatter", "all_gather_object", "broadcast_object_list")


def serve(rank, world, init_file, env, inbox, outbox):
    os.environ.update(env)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a hung collective (a rank failing mid-case) errors out here instead of stalling the test run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    groups = {"world": dist.group.WORLD}
    if world == 4:   # new_group is collective: every rank creates every group, in the same order
        groups.update({"01": dist.new_group([0, 1]), "23": dist.new_group([2, 3]), "0": dist.new_group([0])})
    elif world == 2:
        groups["0"] = dist.new_group([0])
    while (job := inbox.get()) is not None:
        try:
            out = ("ok", JOBS[job["kind"]](job, groups))
        except BaseException as e:  # reported to the test, which fails with it
            out = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        outbox.put((rank, out))
    dist.destroy_process_group()
    outbox.close()
    outbox.join_thread()   # every answer flushed; then skip the interpreter's teardown (a second or more each)
    os._exit(0)


_LOADED = {}


def load(ref, mode):
    """(spec, op) for a shipped spec's name or a (spec file, generated module file) pair."""
    from linattn_dsl.compiler import registry

    if ref not in _LOADED:
        if isinstance(ref, str):
            import linattn_dsl.ops as mod

            spec = registry.load(ref)
        else:
            from pathlib import Path

            from linattn_dsl.cli import _import_file

            spec, mod = registry.load(ref[0]), _import_file(Path(ref[1]))
        _LOADED[ref] = (spec, mod)
    spec, mod = _LOADED[ref]
    return spec, getattr(mod, f"{mode}_{spec.name}")


def draw(spec, kw, dtype_name):
    import torch

    from linattn_dsl.reference import drawing

    dtype = getattr(torch, dtype_name)
    case = drawing.draw_case(spec, **kw)
    case.tensors = {k: (v.to(dtype) if v is not None and v.dim() >= 3 else v) for k, v in case.tensors.items()}
    if dtype == torch.float64:
        case.tensors = {k: (v.to(dtype) if v is not None else None) for k, v in case.tensors.items()}
        if case.initial_state is not None:
            case.initial_state = case.initial_state.to(dtype)
    return case


def call(case, op, tensors, initial_state, **kw):
    """``op`` on ``tensors`` as ``case.call`` would, plus ``kw`` (the packing goes to the context, not the op)."""
    import functools

    saved, case.cu_seqlens = case.cu_seqlens, None
    try:
        return case.call(functools.partial(op, **kw), tensors, initial_state)
    finally:
        case.cu_seqlens = saved


def split(job, groups):
    """This rank's part of a split call and its gradients."""
    import torch
    import torch.distributed as dist

    from linattn_dsl.distributed import cp_context

    group = groups[job["group"]]
    r, W = dist.get_rank(group), dist.get_world_size(group)
    spec, op = load(job["spec"], job["mode"])
    case = draw(spec, job["draw"], job["dtype"])
    T = case.note["T"]
    Tl = T // W
    local = {k: (v.detach().clone().requires_grad_() if v is not None else None)
             for k, v in case.tokens(r * Tl, (r + 1) * Tl).items()}
    h0 = None if case.initial_state is None else case.initial_state.detach().clone().requires_grad_()
    ctx = cp_context(group, cu_seqlens=case.cu_seqlens)
    backends = _count_backends()
    case.output_final_state = job.get("final", True)
    o, s = call(case, op, local, h0, cp_context=ctx)
    gen = torch.Generator().manual_seed(COTANGENT_SEED)
    do = torch.randn((o.shape[0], Tl * W, *o.shape[2:]), generator=gen, dtype=torch.float64)
    loss = (o.double() * do[:, r * Tl:(r + 1) * Tl]).sum()
    if s is not None:
        # d(final_state) on every row, owned or not: a row this rank does not own is a constant zero, no gradient
        loss = loss + (s.double() * torch.randn(s.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    backends = dict(backends)

    def np(x):
        return None if x is None else x.detach().cpu().numpy()

    return dict(o=np(o), final_state=np(s), rows=ctx.final_rows(Tl, o.shape[0]), group_rank=r, backends=backends,
                grads={k: np(v.grad) for k, v in local.items() if v is not None},
                dinitial_state=None if h0 is None else np(h0.grad))


_COUNTS = {}


def _count_backends() -> dict:
    """From now on, counts the local calls that reach the generated PyTorch twin and those that reach the Triton
    host modules (the first split job wraps both entry points)."""
    from linattn_dsl import runtime
    from linattn_dsl.runtime import twin

    counts = _COUNTS
    counts.update(twin=0, triton=0)
    if not getattr(twin, "_cp_counted", False):
        import importlib

        def counted(key, f):
            def g(*a, **kw):
                counts[key] += 1
                return f(*a, **kw)
            return g

        twin.run_torch = counted("twin", twin.run_torch)
        twin._cp_counted = True
        for form in runtime.FORMS.values():
            host = importlib.import_module(f"linattn_dsl.runtime.{form.host}")
            host.run_triton = counted("triton", host.run_triton)
    return counts


# ---- bad input: each builds one wrong call on this rank; the test names the ValueError it expects -------------

def _gla_inputs(B=1, T=16, H=2, K=8, V=8):
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    return q, k, v, -torch.rand(B, T, H, K, generator=gen)


def _bad_op_cu_seqlens(groups, mode):
    from linattn_dsl.distributed import cp_context

    ctx = cp_context(cu_seqlens=[0, 10, 64])
    return _op(mode)(*_gla_inputs(), cp_context=ctx, cu_seqlens=_long([0, 10, 16]))


def _bad_uneven_total(groups, mode):
    from linattn_dsl.distributed import cp_context

    return cp_context(cu_seqlens=[0, 10, 63])


def _bad_local_T(groups, mode):   # 4 ranks x 10 tokens for a packing of 64
    from linattn_dsl.distributed import cp_context

    return _op(mode)(*_gla_inputs(T=10), cp_context=cp_context(cu_seqlens=[0, 10, 64]))


def _bad_local_T_multiple(groups, mode):   # 4 x 32 = 2 x 64: a whole multiple, but gla runs one step a token
    from linattn_dsl.distributed import cp_context

    return _op(mode)(*_gla_inputs(T=32), cp_context=cp_context(cu_seqlens=[0, 10, 64]))


def _bad_local_T_read_before(groups, mode):   # rwkv6 runs 2 steps a token; 4 x 32 tokens is 2 x 64
    import torch

    from linattn_dsl import ops
    from linattn_dsl.distributed import cp_context

    q, k, v, w = _gla_inputs(T=32)
    return getattr(ops, f"{mode}_rwkv6")(q, k, v, w, torch.zeros(2, 8), cp_context=cp_context(cu_seqlens=[0, 10, 64]))


def _bad_local_T_substeps(groups, mode):   # 10 tokens of 2 delta steps each: 20 steps, 4 x 20 = 80 of 64
    import torch

    from linattn_dsl import ops
    from linattn_dsl.distributed import cp_context

    q, k, v, g = _gla_inputs(T=10)
    kk, vv = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8)
    return getattr(ops, f"{mode}_gated_delta_product")(q, kk, vv, g[..., 0], torch.rand(1, 20, 2), num_householder=2,
                                                       cp_context=cp_context(cu_seqlens=[0, 10, 64]))


def _bad_no_tokens(groups, mode):
    from linattn_dsl.distributed import cp_context

    return _op(mode)(*_gla_inputs(T=0), cp_context=cp_context(cu_seqlens=[0, 10, 64]))


def _bad_packed_B2(groups, mode):
    from linattn_dsl.distributed import cp_context

    return _op(mode)(*_gla_inputs(B=2), cp_context=cp_context(cu_seqlens=[0, 10, 64]))


def _bad_local_initial_state(groups, mode):   # rank 0 holds 2 of the 3 sequences; the state needs all 3 rows
    import torch

    from linattn_dsl.distributed import cp_context

    return _op(mode)(*_gla_inputs(), initial_state=torch.zeros(2, 2, 8, 8),
                     cp_context=cp_context(cu_seqlens=[0, 10, 40, 64]))


def _bad_context_type(groups, mode):   # the process group itself instead of a context
    import torch

    return _op(mode)(*_gla_inputs(), initial_state=torch.zeros(3, 2, 8, 8), cp_context=groups["world"])


def _bad_not_member(groups, mode):   # group [0] seen from the other ranks
    from linattn_dsl.distributed import cp_context

    return cp_context(groups["0"])


def _bad_nccl_cpu(groups, mode):   # a context of an nccl group (taken from a gloo one) with CPU tensors
    import dataclasses

    from linattn_dsl.distributed import cp_context

    ctx = dataclasses.replace(cp_context(), backend="nccl")
    return _op(mode)(*_gla_inputs(), cp_context=ctx)


def _bad_cu_float(groups, mode):
    import torch

    from linattn_dsl.distributed import cp_context

    return cp_context(cu_seqlens=torch.tensor([0.0, 10.0, 64.0]))


def _bad_cu_not_increasing(groups, mode):
    from linattn_dsl.distributed import cp_context

    return cp_context(cu_seqlens=[0, 40, 40, 64])


BAD = {n[5:]: f for n, f in dict(globals()).items() if n.startswith("_bad_")}


def _op(mode):
    from linattn_dsl import ops

    return getattr(ops, f"{mode}_gla")


def _long(x):
    import torch

    return torch.tensor(x, dtype=torch.int64)


def bad(job, groups):
    """("returned", None) or (exception type, message) of one bad call, collectives trapped meanwhile."""
    import torch.distributed as dist

    def trap(*a, **kw):
        raise RuntimeError("a collective was called before the error was raised")

    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
    for n in saved:
        setattr(dist, n, trap)
    try:
        BAD[job["name"]](groups, job["mode"])
        return ("returned", None)
    except Exception as e:
        return (type(e).__name__, str(e))
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def ping(job, groups):
    """A sum over the whole pool: the ranks are still in step (no bad job left a collective half-done)."""
    import torch
    import torch.distributed as dist

    x = torch.ones(1)
    dist.all_reduce(x)
    return float(x)


JOBS = {"split": split, "bad": bad, "ping": ping}
