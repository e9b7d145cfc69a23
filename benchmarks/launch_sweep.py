"""Per-kernel launch sweep of one or more ops: each stage kernel's CUDA time under each launch override.

    python -m benchmarks.launch_sweep --ops delta_rule,kda --T 16384

Every override (``w2``, ``s3``, ``w8s1``, ...: w warps, s stages, k / v the key / value block, r RB, m maxnreg,
d DOT) is applied to all of an op's stage launches at once (translated into ``LINATTN_LAUNCH``'s
``stage:field=value`` entries of ``linattn_dsl.runtime.tuning``; k, v, r, d only for stages that have those
fields); the kernels run one after the other, so each kernel's time depends
only on its own override, and one profiled pass per override gives every kernel's number. Phase 1 compiles
every (op, override) in parallel processes on a small input (Triton's disk cache keeps the binaries);
phase 2 times them one process per op, alone on the card, the best of --reps profiled passes per kernel.
Prints, per op and kernel, the time under the defaults ("-") and the best override with its gain; then
times the whole fwd+bwd under the defaults and with every kernel at its best override (interleaved, one
process), the A/B of adopting the sweep's choices.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from linattn_dsl.runtime import tuning

# every name a stage launch reads its override under: the tuning table's stages
LAUNCH_NAMES = tuple(tuning.TABLE)
LETTERS = {"w": "num_warps", "s": "num_stages", "m": "maxnreg", "k": "BK", "v": "BV", "r": "RB", "d": "DOT"}
_PROBES = [tuning.Key(form, vector, 1, 128, 128, 128) for form in ("additive", "delta", "general")
           for vector in (False, True)] + [tuning.Key("additive", False, 1, 128, 128, 128, value_scale=True)]
# v16: the value block of the state kernels (the delta form's and the general form's): twice
# the programs when few sequences x heads leave SMs idle
OVERRIDES = ("-", "w1", "w2", "w4", "w8", "s1", "s2", "s3", "s4", "w2s1", "w8s1", "w8s2", "v16", "v16w4", "v16w8")


def typed(name: str, short: str) -> str:
    """One stage's shorthand override as a LINATTN_LAUNCH entry ("dqk_bwd", "w8s2" -> "dqk_bwd:num_warps=8,
    num_stages=2"); block and switch letters (k, v, r, d) only where the stage's table entry has that field. ""
    when nothing applies."""
    own = set().union(*(tuning.TABLE[name](k) for k in _PROBES))
    items = [f"{LETTERS[c]}={v}" for c, v in re.findall(r"([wsmkvrd])(\d+)", short) if c in "wsm" or LETTERS[c] in own]
    return f"{name}:{','.join(items)}" if items else ""


def to_env(short_env: str) -> str:
    """``name:short,name:short`` (the sweep's notation, _best_env's result) as LINATTN_LAUNCH."""
    entries = [typed(*item.split(":", 1)) for item in short_env.split(",") if item]
    return ";".join(e for e in entries if e)


def _env(override: str) -> str:
    """LINATTN_LAUNCH of an override: "-" none, "w8" every launch, "output_fwd:v128w8" (or several such, joined
    by "+") only the launches named."""
    if override == "-":
        return ""
    if ":" in override:
        return to_env(override.replace("+", ","))
    return to_env(",".join(f"{n}:{override}" for n in LAUNCH_NAMES))


def _fwd_bwd(op: str, T: int, tokens: int):
    import torch

    import benchmarks.ops as bops

    bops.TOKENS = tokens
    t = bops.make_inputs(op, T)
    leaves = [x.requires_grad_() for x in t.values() if x.is_floating_point()]
    fn = bops.get_fn("ours", op)
    do = None

    def step():
        nonlocal do
        for x in leaves:
            x.grad = None
        out = fn(t)
        do = torch.randn_like(out) if do is None else do
        out.backward(do)
    return step


def _time(op: str, T: int, overrides, reps: int) -> dict:
    """Each override's per-kernel times, in this process. An override that faults on the device (an illegal
    address leaves the CUDA context unusable) is recorded as an error and the rest of the list goes on in a
    fresh process."""
    import torch

    res = {}
    for i, ov in enumerate(overrides):
        os.environ["LINATTN_LAUNCH"] = _env(ov)
        try:
            step = _fwd_bwd(op, T, 32768)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            best: dict[str, float] = {}
            for _ in range(reps):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                for e in prof.key_averages():
                    if not e.key.startswith(("void", "Memcpy", "Memset")):
                        ms = e.self_device_time_total / 1e3
                        best[e.key] = min(best.get(e.key, ms), ms)
            res[ov] = best
        except Exception as exc:   # an override that does not compile, fit or run: recorded, the sweep goes on
            res[ov] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"[{op}] {ov}: {res[ov]}", flush=True)
            if "CUDA" in str(exc) and overrides[i + 1:]:
                res.update(_time_elsewhere(op, T, overrides[i + 1:], reps))
                break
            continue
        print(f"[{op}] {ov}: {res[ov]}", flush=True)
    os.environ["LINATTN_LAUNCH"] = ""
    return res


def _time_elsewhere(op: str, T: int, overrides, reps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.launch_sweep", "--time-child", op, "--T", str(T), "--reps", str(reps),
           "--overrides=" + ",".join(overrides)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write("".join(line + "\n" for line in r.stdout.splitlines() if line.startswith("[")))
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {ov: {"error": f"child rc {r.returncode}: {r.stderr[-200:]}"} for ov in overrides}


def _best_env(res: dict) -> str:
    """LINATTN_LAUNCH with each kernel at its best override: a profiled kernel name maps to every launch
    name it runs under (``state_fwd`` -> ``add_state_fwd`` in the additive form, ``scores_fwd`` ->
    ``scores_fwd_pair`` in the delta form, ``gate_fwd_v0`` -> ``gate_fwd``); names an op never launches
    are ignored by it."""
    base = res.get("-", {})
    items = []
    for k in base:
        stem = re.sub(r"_v\d+$", "", k)
        names = [n for n in (stem, stem + "_pair", stem + "_local", "add_" + stem) if n in LAUNCH_NAMES]

        def spec(ov, name):   # the override name runs under with ov, or None (a targeted ov leaving it alone)
            if ":" not in ov:
                return ov
            return dict(item.split(":", 1) for item in ov.split("+")).get(name)

        cands = [(r[k], ov) for ov, r in res.items() if k in r and "error" not in r
                 and (ov == "-" or any(spec(ov, n) for n in names))]
        if not cands:
            continue
        ms, ov = min(cands)
        if ov == "-" or ms >= base[k]:
            continue
        items += [f"{n}:{spec(ov, n)}" for n in names if spec(ov, n)]
    return ",".join(items)


def _ab(op: str, T: int, env: str) -> dict:
    import torch
    from triton.testing import do_bench

    out = {}
    for side, e in (("default", ""), ("best", to_env(env)), ("default", ""), ("best", to_env(env))):
        os.environ["LINATTN_LAUNCH"] = e
        step = _fwd_bwd(op, T, 32768)
        step()
        torch.cuda.synchronize()
        out.setdefault(side, []).append(do_bench(step, warmup=25, rep=200))
    os.environ["LINATTN_LAUNCH"] = ""
    return {side: min(v) for side, v in out.items()} | {"env": env}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ops", default="delta_rule,kda", type=lambda s: s.split(","))
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--overrides", default=",".join(OVERRIDES), type=lambda s: s.split(","))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--warm", nargs=2, metavar=("OP", "OVERRIDE"), help=argparse.SUPPRESS)
    p.add_argument("--time-child", metavar="OP", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time_child:   # the rest of a sweep after a device fault: results as JSON on the last line
        print(json.dumps(_time(args.time_child, args.T, args.overrides, args.reps)), flush=True)
        return 0
    if args.warm:   # phase-1 child: compile one (op, override) on a small input
        os.environ["LINATTN_LAUNCH"] = _env(args.warm[1])
        _fwd_bwd(args.warm[0], 1024, 2048)()
        return 0
    start = time.time()
    jobs = [(op, ov) for op in args.ops for ov in args.overrides]

    def warm(job):
        r = subprocess.run([sys.executable, "-m", "benchmarks.launch_sweep", "--warm", *job], capture_output=True,
                           text=True)
        return job, r.returncode, r.stderr[-300:]
    with ThreadPoolExecutor(args.jobs) as ex:
        for (op, ov), rc, err in ex.map(warm, jobs):
            if rc:
                print(f"compile {op} {ov}: rc {rc}: {err}", flush=True)
    print(f"compiled {len(jobs)} variants in {time.time() - start:.0f} s", flush=True)
    results = {op: _time(op, args.T, args.overrides, args.reps) for op in args.ops}
    ab = {op: _ab(op, args.T, _best_env(res)) for op, res in results.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "launch_sweep.json"), "w") as f:
        json.dump(dict(T=args.T, results=results, ab=ab), f, indent=1)
    for op, res in results.items():
        base = res.get("-", {})
        print(f"\n{op} T={args.T}: kernel, default ms, best override and ms (gain)")
        kernels = sorted({k for r in res.values() for k in r if k != "error"}, key=lambda k: -base.get(k, 0))
        saved = 0.0
        for k in kernels:
            cands = [(r[k], ov) for ov, r in res.items() if k in r]
            ms, ov = min(cands)
            d = base.get(k, float("nan"))
            saved += max(0.0, d - ms) if k in base else 0.0
            print(f"  {k:24s} {d:8.3f}  {ov:6s} {ms:8.3f}  ({d - ms:+.3f})")
        total = sum(v for k, v in base.items() if k != "error")
        print(f"  total default {total:.3f} ms, all kernels at their best {total - saved:.3f}")
        print(f"  A/B fwd+bwd (do_bench, min of 2): defaults {ab[op]['default']:.3f} ms, best overrides "
              f"{ab[op]['best']:.3f} ms with LINATTN_LAUNCH={ab[op]['env']}")
    print(f"wall {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
