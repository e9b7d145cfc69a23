"""Per-kernel CUDA times of one op's forward+backward (torch.profiler), for finding the slow stage.

    python -m benchmarks.profile_op delta_rule --T 4096
    LINATTN_LAUNCH="general_intra_bwd:num_warps=4,BK=64" python -m benchmarks.profile_op rwkv7 --T 16384 --brief

--brief prints one line: the launch override, each of our stage kernels (ms) and the total.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.ops import TOKENS, get_fn, make_inputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("op")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--impl", default="ours")
    p.add_argument("--brief", action="store_true")
    args = p.parse_args(argv)
    t = make_inputs(args.op, args.T)
    leaves = [x.requires_grad_() for x in t.values() if x.is_floating_point()]
    fn = get_fn(args.impl, args.op)
    out = fn(t)
    do = torch.randn_like(out)
    for _ in range(3):
        for x in leaves:
            x.grad = None
        fn(t).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for x in leaves:
            x.grad = None
        fn(t).backward(do)
        torch.cuda.synchronize()
    if args.brief:
        import os

        ev = prof.key_averages()
        total = sum(e.self_device_time_total for e in ev) / 1e3
        parts = sorted(((e.self_device_time_total / 1e3, e.key) for e in ev if not e.key.startswith("void")),
                       reverse=True)
        print(f"{args.op} T={args.T} [{os.environ.get('LINATTN_LAUNCH', '')}] total {total:.3f} ms: "
              + ", ".join(f"{k} {t:.3f}" for t, k in parts), flush=True)
        return 0
    print(f"{args.impl} {args.op} T={args.T} B={TOKENS // args.T}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
