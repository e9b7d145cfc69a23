"""A/B timing of two checkouts of the package, interleaved on one card: whole trees (host code, templates and
generated modules), not only generated files (that is ``benchmarks/ab.py``).

    git worktree add /tmp/base HEAD~1          # or: mkdir base && git archive HEAD~1 | tar -x -C base
    python -m benchmarks.ab_trees --old /tmp/base --new . --ops gla kda --T 4096 16384 --rounds 5

Each round runs one process per side (old, new, then new, old in the next round), each timing every op at
every T (``do_bench`` medians, inputs of ``benchmarks/ops.py`` from this tree for both sides, bf16, B*T =
32768). Printed: per op and T, the median over rounds of each side's fwd and fwd+bwd times, their ratio, and
the first call (compile) time of the first round. ``--mid`` adds a third tree to the same rounds (each side leads a
round in turn). A tree from before ``specs``, ``generated`` and the
templates moved into the package gets links to them from its ``linattn_dsl`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(ops: list[str], Ts: list[int]) -> None:
    """Inside one side's process: time every op, print one JSON line per (op, T)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_ops_inputs", HERE / "ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for op in ops:
        fn = bench.get_fn("ours", op)
        for T in Ts:
            t = bench.make_inputs(op, T)
            times = bench.time_fwd_bwd(fn, t)
            print(json.dumps(dict(op=op, T=T, **times)), flush=True)
            t = None   # free this shape's tensors before the next one's
            torch.cuda.empty_cache()


def _side_cmd(tree: Path, ops: list[str], Ts: list[int]) -> tuple[list[str], dict]:
    for d in ("specs", "generated", "codegen_templates"):   # trees from before these moved into the package
        link = tree / "linattn_dsl" / d
        if (tree / d).is_dir() and not link.exists():
            link.symlink_to(Path("..") / d)
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--ops", *ops, "--T", *map(str, Ts)], env


def _parse(tree: Path, rc: int, out: str, err: str) -> list[dict]:
    if rc:
        raise RuntimeError(f"{tree}: exit {rc}\n{err[-3000:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _run_side(tree: Path, ops: list[str], Ts: list[int]) -> list[dict]:
    cmd, env = _side_cmd(tree, ops, Ts)
    res = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True)
    return _parse(tree, res.returncode, res.stdout, res.stderr)


def _warm(trees: dict, ops: list[str], T: int) -> dict:
    """Every (side, op) compiled at once, one process each (Triton's disk cache keeps the binaries for the rounds):
    {(side, op): seconds of the first call, compile included, under the same contention on both sides}."""
    procs = {}
    for side, tree in trees.items():
        for op in ops:
            cmd, env = _side_cmd(tree, [op], [T])
            procs[(side, op)] = (tree, subprocess.Popen(cmd, env=env, cwd=str(tree), stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True))
    out = {}
    for key, (tree, proc) in procs.items():
        o, e = proc.communicate()
        out[key] = _parse(tree, proc.returncode, o, e)[0]["first"]
    return out


def _cold(trees: dict, ops: list[str], T: int, env_of: dict | None = None) -> dict:
    """{(side, op): seconds of the first call with an empty Triton cache}, one process at a time (no contention),
    sides alternating per op. ``env_of``: extra environment per side (a side is then a tree under a setting)."""
    import tempfile

    out = {}
    for i, op in enumerate(ops):
        for side in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            cmd, env = _side_cmd(trees[side], [op], [T])
            with tempfile.TemporaryDirectory() as cache:
                env = dict(env, TRITON_CACHE_DIR=cache, **(env_of or {}).get(side, {}))
                res = subprocess.run(cmd, env=env, cwd=str(trees[side]), capture_output=True, text=True)
            out[(side, op)] = _parse(trees[side], res.returncode, res.stdout, res.stderr)[0]["first"]
            print(f"cold {side} {op}: {out[(side, op)]:.1f} s", file=sys.stderr, flush=True)
    return out


def _table(a, rows: dict, warm: dict | None, file=sys.stdout) -> None:
    """Per op and T: each side's median fwd and fwd+bwd over the rounds so far, new / each other side, and the first
    call."""
    sides = list(rows)
    others = [s for s in sides if s != "new"]
    lines = [f"{'op':>18} {'T':>6} | " + " | ".join(f"{s} fwd / fwd+bwd ms" for s in sides) + " | "
             + " | ".join(f"new/{s} fwd, fwd+bwd" for s in others) + " | first s " + "/".join(sides)]
    for op in a.ops:
        for T in a.T:
            med = {s: {m: statistics.median(rd[(op, T)][m] for rd in rows[s]) for m in ("fwd", "fwd_bwd")}
                   for s in sides}
            first = {s: (warm[(s, op)] if warm and T == a.T[0] else rows[s][0][(op, T)]["first"]) for s in sides}
            new = med["new"]
            lines.append(f"{op:>18} {T:>6} | " + " | ".join(f"{med[s]['fwd']:8.3f} / {med[s]['fwd_bwd']:8.3f}"
                                                           for s in sides) + " | "
                         + " | ".join(f"{new['fwd'] / med[s]['fwd']:.3f}, {new['fwd_bwd'] / med[s]['fwd_bwd']:.3f}"
                                      for s in others)
                         + " | " + " / ".join(f"{first[s]:.1f}" for s in sides))
    print("\n".join(lines), file=file, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path)
    p.add_argument("--new", type=Path)
    p.add_argument("--mid", type=Path, help="a third tree, timed in the same rounds (ratios new/old and new/mid)")
    p.add_argument("--ops", nargs="+", default=["retention", "gla", "mamba2", "delta_rule", "gated_delta_rule",
                                                 "kda", "rwkv7"])
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, help="write every round's raw timings here (JSON)")
    p.add_argument("--warm", action="store_true", help="compile every (side, op) first, all at once (the first-call "
                   "column is then of these parallel compiles)")
    p.add_argument("--cold", action="store_true", help="only the first call of every (side, op) with an empty Triton "
                   "cache, one process at a time, then exit")
    p.add_argument("--new-env", nargs="*", default=[], metavar="NAME=VALUE",
                   help="with --cold: also time the new tree under each of these environment settings")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.ops, a.T)
        return 0
    trees = {"old": a.old, **({"mid": a.mid} if a.mid else {}), "new": a.new}
    if a.cold:
        env_of = {}
        for setting in a.new_env:   # the new tree once more per setting, as its own side
            name, _, value = setting.partition("=")
            trees[f"new {setting}"] = a.new
            env_of[f"new {setting}"] = {name: value}
        cold = _cold(trees, a.ops, a.T[0], env_of)
        print(f"{'op':>18} | first call s, empty cache: " + " / ".join(trees))
        for op in a.ops:
            print(f"{op:>18} | " + " / ".join(f"{cold[(s, op)]:6.1f}" for s in trees))
        return 0
    warm = _warm(trees, a.ops, a.T[0]) if a.warm else None
    if warm:
        print("warmed:", {f"{s}/{op}": round(t, 1) for (s, op), t in warm.items()}, file=sys.stderr, flush=True)
    rows: dict[str, list[dict]] = {s: [] for s in trees}
    order = list(trees)
    for r in range(a.rounds):
        for side in order[r % len(order):] + order[:r % len(order)]:   # each side leads a round in turn
            rows[side].append({(x["op"], x["T"]): x for x in _run_side(trees[side], a.ops, a.T)})
            print(f"round {r + 1} {side} done", file=sys.stderr, flush=True)
        if a.out:   # every round as it ends: a run cut short keeps its rounds
            a.out.write_text(json.dumps({s: [{f"{k[0]}@{k[1]}": v for k, v in rd.items()} for rd in rs]
                                         for s, rs in rows.items()}, indent=1))
        if r + 1 < a.rounds:   # the standing so far (a run cut short still leaves its medians)
            _table(a, rows, warm, file=sys.stderr)
    _table(a, rows, warm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
