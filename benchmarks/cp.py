"""Context parallelism on several GPUs (NCCL): one long sequence split over the ranks, against one card holding it
all and against FLA 0.6.0's own CP where FLA splits the op (KDA, RWKV7), in the same run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m benchmarks.cp \
        --ops gla,kda,gated_delta_rule,rwkv7 --T 131072 --out DIR

Inputs of ``benchmarks/ops.py`` (bf16, 16 heads of D=128) for one sequence of T tokens (B=1); each rank takes its
contiguous T / world slice. Per op: fwd+bwd time (``do_bench``-style median of CUDA-event timings between
barriers, the slowest rank's) and each rank's peak memory above its inputs; then rank 0 alone runs the unsplit
op at the same T while the others wait (where it fits). Rank 0 prints a table and writes cp.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

FLA_CP = {"kda": ("fla.ops.kda", "chunk_kda"), "rwkv7": ("fla.ops.rwkv7", "chunk_rwkv7")}


def _inputs(op: str, T: int):
    from benchmarks import ops as bench

    bench.TOKENS = T   # one sequence of T tokens
    return bench.make_inputs(op, T)


def _time(step, reps: int, group=None) -> float:
    """Median ms of ``step`` (fwd+bwd) over ``reps``, each rep bracketed by barriers; the slowest rank's."""
    times = []
    for i in range(reps + 3):
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    ms = torch.tensor(statistics.median(times), device="cuda")
    if group is not None:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
    return float(ms)


def _step_fn(fn, t: dict):
    leaves = [x.requires_grad_() for x in t.values() if x.is_floating_point() and x.dim() >= 3]
    do = torch.randn_like(fn(t))

    def step():
        for x in leaves:
            x.grad = None
        fn(t).backward(do)
    return step


def _measure(fn, t: dict, reps: int, group=None) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    step = _step_fn(fn, t)
    step()
    torch.cuda.synchronize()
    first = time.time() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = _time(step, reps, group)
    return dict(fwdbwd_ms=ms, peak_mib=peak, first_s=first)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="gla,kda,gated_delta_rule,rwkv7", type=lambda s: s.split(","))
    p.add_argument("--T", type=int, default=131072)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--no-single", action="store_true", help="skip the unsplit one-card run")
    p.add_argument("--no-fla", action="store_true", help="skip FLA's CP (its first call autotunes for minutes)")
    a = p.parse_args(argv)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    from benchmarks.ops import get_fn
    from linattn_dsl.distributed import cp_context

    ctx = cp_context()
    Tl = a.T // world
    rows = []
    for op in a.ops:
        full = _inputs(op, a.T)
        local = {n: (x[:, rank * Tl:(rank + 1) * Tl].contiguous() if x.dim() >= 3 else x) for n, x in full.items()}
        ours = get_fn("ours", op)
        f = getattr(__import__("linattn_dsl.ops", fromlist=["x"]), f"chunk_{op}")
        row = dict(op=op, T=a.T, world=world)
        try:
            row["ours_cp"] = _measure(lambda t: f(*t.values(), cp_context=ctx)[0], dict(local), a.reps,
                                      dist.group.WORLD)
        except Exception as e:   # noqa: BLE001 -- a failed op is a row, not a crash of the whole run
            row["ours_cp"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        if op in FLA_CP and not a.no_fla:
            try:
                import importlib

                from fla.ops.cp import build_cp_context

                ff = getattr(importlib.import_module(FLA_CP[op][0]), FLA_CP[op][1])
                fctx = build_cp_context(torch.tensor([0, a.T], device="cuda"), group=dist.group.WORLD)
                kw = dict(scale=1.0) if op == "rwkv7" else {}
                row["fla_cp"] = _measure(lambda t: ff(*t.values(), cu_seqlens=fctx.cu_seqlens, cp_context=fctx,
                                                      **kw)[0], dict(local), a.reps, dist.group.WORLD)
            except Exception as e:   # noqa: BLE001
                row["fla_cp"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        with torch.no_grad():   # the split output, gathered on every rank, against the unsplit one below
            o_loc = f(*[x.detach() for x in local.values()], cp_context=ctx)[0].contiguous()
            parts = [torch.empty_like(o_loc) for _ in range(world)]
            dist.all_gather(parts, o_loc)
            o_cp = torch.cat(parts, 1) if rank == 0 else None
            del o_loc, parts
        del local
        torch.cuda.empty_cache()
        dist.barrier()
        if rank == 0 and not a.no_single:
            try:
                with torch.no_grad():
                    o_ref = ours({n: x.detach() for n, x in full.items()}).float()
                    row["max_rel_err"] = float((o_cp.float() - o_ref).abs().max() / o_ref.abs().max())
                    del o_ref, o_cp
                row["ours_single"] = _measure(ours, full, a.reps)
            except Exception as e:   # noqa: BLE001 (out of memory, most likely)
                row["ours_single"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        del full
        torch.cuda.empty_cache()
        dist.barrier()
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    peaks = [torch.tensor([r["ours_cp"].get("peak_mib", -1.0) for r in rows], device="cuda") for _ in range(world)]
    dist.all_gather(peaks, peaks[rank].clone())
    if rank == 0:
        for i, r in enumerate(rows):
            r["ours_cp"]["peak_mib_per_rank"] = [float(p[i]) for p in peaks]
        meta = dict(card=torch.cuda.get_device_name(), world=world, torch=torch.__version__,
                    triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"), T=a.T)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cp.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"{meta['card']} x{world}, T={a.T}, bf16, H=16, D=128")
        print(f"{'op':<18} {'ours cp ms':>10} {'peak MiB':>9} {'1 card ms':>10} {'peak MiB':>9} {'cp/1':>6} "
              f"{'FLA cp ms':>10} {'ours/FLA':>8}")
        for r in rows:
            c, s, f_ = r["ours_cp"], r.get("ours_single", {}), r.get("fla_cp", {})
            g = lambda d, k: d.get(k, float("nan"))   # noqa: E731
            print(f"{r['op']:<18} {g(c, 'fwdbwd_ms'):>10.3f} {g(c, 'peak_mib'):>9.0f} {g(s, 'fwdbwd_ms'):>10.3f} "
                  f"{g(s, 'peak_mib'):>9.0f} {g(c, 'fwdbwd_ms') / g(s, 'fwdbwd_ms'):>6.2f} "
                  f"{g(f_, 'fwdbwd_ms'):>10.3f} {g(c, 'fwdbwd_ms') / g(f_, 'fwdbwd_ms'):>8.2f}")
            print(f"  split vs unsplit output, max relative error (bf16): {r.get('max_rel_err', float('nan')):.2e}")
            for k in ("ours_cp", "ours_single", "fla_cp"):
                if "error" in r.get(k, {}):
                    print(f"  {k}: {r[k]['error']}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
