"""Which stage launch faults under a launch override: each launch name alone with the override, in a fresh
process (a device fault leaves the CUDA context unusable), one small fwd+bwd, synchronised per launch.

    python -m benchmarks.experiments.fault_scan rwkv7 s1

Prints one line per launch name the op runs: ``ok``, or the child's return code and the last line of its
error. A sweep's ``error`` entry (benchmarks/launch_sweep.py) names only the override; this names the launch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from benchmarks.launch_sweep import LAUNCH_NAMES, typed


def _child(op: str, T: int) -> int:
    import torch

    from benchmarks.launch_sweep import _fwd_bwd

    _fwd_bwd(op, T, 2 * T)()
    torch.cuda.synchronize()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("op")
    p.add_argument("override")
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--names", default=",".join(LAUNCH_NAMES), type=lambda s: s.split(","))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.op, args.T)

    def run(name):
        env = dict(os.environ, LINATTN_LAUNCH=typed(name, args.override), CUDA_LAUNCH_BLOCKING="1")
        r = subprocess.run([sys.executable, "-m", "benchmarks.experiments.fault_scan", args.op, args.override, "--T",
                            str(args.T), "--child"], capture_output=True, text=True, env=env)
        tail = [line for line in r.stderr.strip().splitlines() if line.strip()][-1:] if r.returncode else []
        return name, r.returncode, tail[0][:200] if tail else ""

    failed = 0
    with ThreadPoolExecutor(8) as ex:
        for name, rc, tail in ex.map(run, args.names):
            failed += rc != 0
            print(f"{args.op} {name}:{args.override}: " + ("ok" if rc == 0 else f"rc {rc}: {tail}"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
