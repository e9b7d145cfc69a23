"""Benchmark the generated ops against FLA 0.6.0, mamba-ssm's Triton SSD and SDPA flash attention.

    python -m benchmarks.ops --ops retention,gla,mamba2 --T 4096,16384 --out DIR

Settings of shared/GPU.md: bf16, B*T = 32768 tokens, H=16 heads of D=128 (Mamba2: 64 heads of P=64,
d_state 128, one group, D and dt_bias on, softplus in the kernel); log-decays from logsigmoid of a
standard normal (GLA / 16). The shelf: comba, rwkv6 and linear_attn (elu + 1 features, normalised) against FLA's ops,
hgrn2 against FLA's chunk_gla with k = 1 - exp(g) (its HGRN2 layer's call), mamba (2048 channels of d_state 16)
against mamba-ssm's selective scan (where its CUDA extension is installed), our step form (impl ``step``) and our
Mamba2 at the same hidden size (op ``mamba2_h1024``: 32 heads of P=64). Each (implementation, op) runs in its own
process with a timeout; FLA and mamba are compiled and autotuned first, in parallel processes, so that their timing
runs hit Triton's disk cache. Times are triton.testing.do_bench medians in ms; memory is the peak of fwd+bwd above the
inputs, in MiB; under ``torch.no_grad`` (prefill) the forward's peak above the inputs, beside the output's size
(nothing may be kept for a backward). ``--D 64`` / ``--D 256``: other head widths (16 heads). Results: a table on
stdout, results.json and ops.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOKENS = 32768


def make_inputs(op: str, T: int, device="cuda", D: int = 128):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    B = TOKENS // T
    bf = dict(device=device, dtype=torch.bfloat16)
    if op in ("mamba2", "mamba2_h1024"):   # mamba2_h1024: Mamba2 at Mamba's hidden 1024 (2048 channels)
        H, P, N = (64 if op == "mamba2" else 32), 64, 128
        x = torch.randn(B, T, H, P, **bf)
        dt = torch.randn(B, T, H, **bf) - 2.0   # per-token inputs share one dtype (per-head A, D, dt_bias fp32)
        A = -torch.exp(torch.rand(H, device=device) * 2.0)
        Bm, C = torch.randn(B, T, 1, N, **bf), torch.randn(B, T, 1, N, **bf)
        D = torch.randn(H, device=device)
        dt_bias = torch.randn(H, device=device) * 0.5
        return dict(x=x, dt=dt, A=A, B=Bm, C=C, D=D, dt_bias=dt_bias)
    if op == "mamba":   # Mamba-1 at hidden 1024: 2048 channels of d_state 16, one value channel each
        Dn, N = 2048, 16
        x = torch.randn(B, T, Dn, 1, **bf)
        dt = torch.randn(B, T, Dn, **bf) - 2.0
        A = -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(Dn, 1)
        Bm, C = torch.randn(B, T, 1, N, **bf), torch.randn(B, T, 1, N, **bf)
        return dict(x=x, dt=dt, A=A, B=Bm, C=C, D=torch.ones(Dn, device=device),
                    dt_bias=torch.randn(Dn, device=device) * 0.5)
    H = 16
    q, k, v = (torch.randn(B, T, H, D, **bf) for _ in range(3))
    if op == "retention":
        return dict(q=q, k=k, v=v)
    if op == "gla":
        g = (F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16).to(torch.bfloat16)
        return dict(q=q, k=k, v=v, g=g)
    if op == "simple_gla":
        g = F.logsigmoid(torch.randn(B, T, H, device=device)) / 16
        return dict(q=q, k=k, v=v, g=g)
    if op == "hgrn2":   # the key 1 - exp(g) is part of the op
        g = F.logsigmoid(torch.randn(B, T, H, D, device=device) + 2.0).to(torch.bfloat16)
        return dict(q=q, g=g, v=v)
    if op == "rwkv6":   # FLA's argument order (r, k, v, w, u); w a per-channel log-decay, u the bonus [H, K]
        w = -torch.exp(0.5 * torch.randn(B, T, H, D, device=device) - 2.5).to(torch.bfloat16)
        return dict(r=q, k=k, v=v, w=w, u=torch.randn(H, D, **bf) * 0.1)
    if op == "linear_attn":   # positive features (elu + 1), the normalised output
        return dict(q=(F.elu(q.float()) + 1).to(q.dtype), k=(F.elu(k.float()) + 1).to(k.dtype), v=v)
    q, k = F.normalize(q.float(), dim=-1).to(q.dtype), F.normalize(k.float(), dim=-1).to(k.dtype)
    beta = torch.sigmoid(torch.randn(B, T, H, device=device)).to(torch.bfloat16)
    if op == "delta_rule":
        return dict(q=q, k=k, v=v, beta=beta)
    if op == "gated_delta_rule":
        g = F.logsigmoid(torch.randn(B, T, H, device=device)).to(torch.bfloat16)
        return dict(q=q, k=k, v=v, g=g, beta=beta)
    if op == "kda":
        g = (F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 4).to(torch.bfloat16)
        return dict(q=q, k=k, v=v, g=g, beta=beta)
    if op == "gated_delta_product":   # two delta steps per token: k, v, beta carry T * 2 rows (FLA's layout)
        n = 2
        k2 = F.normalize(torch.randn(B, T * n, H, D, device=device), dim=-1).to(torch.bfloat16)
        g = F.logsigmoid(torch.randn(B, T, H, device=device)).to(torch.bfloat16)
        beta2 = torch.sigmoid(torch.randn(B, T * n, H, device=device)).to(torch.bfloat16)
        return dict(q=q, k=k2, v=torch.randn(B, T * n, H, D, **bf), g=g, beta=beta2)
    if op == "comba":   # FLA's argument order (q, k, v, p, g, beta); p a second unit key
        p = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(torch.bfloat16)
        g = F.logsigmoid(torch.randn(B, T, H, device=device)).to(torch.bfloat16)
        return dict(q=q, k=k, v=v, p=p, g=g, beta=beta)
    if op == "rwkv7":
        w = -torch.exp(0.5 * torch.randn(B, T, H, D, device=device) - 2.5)
        kk = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
        a, b = -kk, kk * torch.rand(B, T, H, 1, device=device)
        return dict(r=q, w=w.to(torch.bfloat16), k=k, v=v, a=a.to(torch.bfloat16), b=b.to(torch.bfloat16))
    raise ValueError(op)


def _householder(op: str, t: dict) -> dict:
    """gated_delta_product's steps per token: the rows of k per row of q."""
    return dict(num_householder=t["k"].shape[1] // t["q"].shape[1]) if op == "gated_delta_product" else {}


def get_fn(impl: str, op: str):
    """A callable taking the input dict and returning the output tensor."""
    if impl == "ours":
        from linattn_dsl import ops

        if op in ("mamba2", "mamba", "mamba2_h1024"):
            f = getattr(ops, f"chunk_{op.removesuffix('_h1024')}")
            return lambda t: f(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], dt_bias=t["dt_bias"])[0]
        if op == "simple_gla":   # scalar-decay additive: mamba2's plan with unit value scaling is not the same op
            raise ValueError("no shipped spec is FLA's simple_gla")
        f = getattr(ops, f"chunk_{op}")
        return lambda t: f(*t.values(), **_householder(op, t))[0]
    if impl == "step":   # our step form of the op (fused_recurrent_<op>)
        from linattn_dsl import ops

        f = getattr(ops, f"fused_recurrent_{op}")
        if op == "mamba":
            return lambda t: f(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], dt_bias=t["dt_bias"])[0]
        return lambda t: f(*t.values(), **_householder(op, t))[0]
    if impl == "fla":
        if op == "retention":
            from fla.ops.retention import chunk_retention as f
        elif op == "gla":
            from fla.ops.gla import chunk_gla as f
        elif op == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla as f
        elif op == "delta_rule":
            from fla.ops.delta_rule import chunk_delta_rule as f
        elif op == "gated_delta_rule":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
        elif op == "kda":
            from fla.ops.kda import chunk_kda as f
        elif op == "rwkv7":
            from fla.ops.rwkv7 import chunk_rwkv7 as f

            return lambda t: f(*t.values(), scale=1.0)[0]
        elif op == "comba":
            from fla.ops.comba import chunk_comba as f
        elif op == "gated_delta_product":
            from fla.ops.gated_delta_product import chunk_gated_delta_product as f

            return lambda t: f(*t.values(), **_householder(op, t))[0]
        elif op == "rwkv6":
            from fla.ops.rwkv6 import chunk_rwkv6 as f
        elif op == "hgrn2":   # FLA's HGRN2 layer: chunk_gla with k = 1 - exp(g)
            from fla.ops.gla import chunk_gla

            return lambda t: chunk_gla(t["q"], 1 - t["g"].float().exp().to(t["g"].dtype), t["v"], t["g"])[0]
        elif op == "linear_attn":
            from fla.ops.linear_attn import chunk_linear_attn as f

            return lambda t: f(*t.values(), normalize=True)[0]
        else:
            raise ValueError(f"FLA has no {op} op in this benchmark")
        return lambda t: f(*t.values())[0]
    if impl == "mamba" and op == "mamba":   # mamba-ssm's selective scan (CUDA), channels-first layout
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        def scan(t):
            u, dt = t["x"][..., 0].transpose(1, 2), t["dt"].transpose(1, 2)
            Bm, C = t["B"][:, :, 0].transpose(1, 2), t["C"][:, :, 0].transpose(1, 2)
            return selective_scan_fn(u, dt, t["A"], Bm, C, D=t["D"], delta_bias=t["dt_bias"], delta_softplus=True)
        return scan
    if impl == "mamba":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f

        return lambda t: f(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=256, D=t["D"], dt_bias=t["dt_bias"],
                           dt_softplus=True)
    if impl == "sdpa":
        import torch.nn.functional as F

        def sdpa(t):
            q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v")) if "q" in t else \
                (t["C"].expand(-1, -1, 64, -1).transpose(1, 2),) * 3
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sdpa
    raise ValueError(impl)


def time_fwd_bwd(fn, t: dict) -> dict:
    """``fn(t)``'s first call (fwd+bwd, compile included: seconds), then its fwd (under no_grad) and fwd+bwd
    ``do_bench`` medians (ms), with the floating inputs of ``t`` as leaves."""
    import time

    import torch
    from triton.testing import do_bench

    leaves = [x.requires_grad_() for x in t.values() if x.is_floating_point()]
    start = time.time()
    out = fn(t)
    do = torch.randn_like(out)
    out.backward(do)
    torch.cuda.synchronize()
    first = time.time() - start

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        fn(t).backward(do)

    with torch.no_grad():
        ms_f = do_bench(lambda: fn(t), warmup=10, rep=80, return_mode="median")
    return dict(fwd=ms_f, fwd_bwd=do_bench(fwd_bwd, warmup=10, rep=80, return_mode="median"), first=first)


def measure(impl: str, op: str, T: int, D: int = 128) -> dict:
    import torch
    from triton.testing import do_bench

    t = make_inputs(op, T, D=D)
    if impl == "sdpa" and op != "mamba2":
        t = {n: t[n] for n in ("q", "k", "v")}
    leaves = {n: x.requires_grad_() for n, x in t.items() if x.is_floating_point()}
    fn = get_fn(impl, op)
    start = time.time()
    out = fn(t)
    torch.cuda.synchronize()
    first = time.time() - start
    do = torch.randn_like(out)

    def fwd_bwd():
        for x in leaves.values():
            x.grad = None
        fn(t).backward(do)

    start = time.time()
    fwd_bwd()
    torch.cuda.synchronize()
    first_bwd = time.time() - start
    with torch.no_grad():
        fwd = do_bench(lambda: fn(t), warmup=25, rep=100)
    both = do_bench(fwd_bwd, warmup=25, rep=100)
    for x in leaves.values():
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():   # prefill: the output, and nothing kept for a backward
        out = fn(t)
    torch.cuda.synchronize()
    fwd_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    out_mib = out.numel() * out.element_size() / 2**20
    return dict(impl=impl, op=op, T=T, B=TOKENS // T, D=D, fwd_ms=fwd, fwdbwd_ms=both, peak_mib=peak,
                fwd_nograd_peak_mib=fwd_peak, out_mib=out_mib, first_call_s=first + first_bwd)


def child(args) -> int:
    for T in args.T:
        try:
            r = measure(args.impl, args.ops[0], T, args.D)
        except Exception as e:   # report and go on: one failing implementation must not hide the others
            r = dict(impl=args.impl, op=args.ops[0], T=T, error=f"{type(e).__name__}: {str(e)[:300]}")
        print("RESULT " + json.dumps(r), flush=True)
    return 0


def spawn(impl, op, Ts, timeout, D=128):
    cmd = [sys.executable, "-m", "benchmarks.ops", "--child", "--impl", impl, "--ops", op,
           "--T", ",".join(map(str, Ts)), "--D", str(D)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), timeout


def collect(proc, timeout, impl, op, Ts):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0] or ""
        return [dict(impl=impl, op=op, T=T, error=f"timeout after {timeout} s") for T in Ts], out
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if not rows:
        rows = [dict(impl=impl, op=op, T=T, error=out.strip().splitlines()[-1][:300] if out.strip() else "no output")
                for T in Ts]
    return rows, out


PLAN = {"retention": ["ours", "fla"], "gla": ["ours", "fla"], "simple_gla": ["fla"], "mamba2": ["ours", "mamba"],
        "delta_rule": ["ours", "fla"], "gated_delta_rule": ["ours", "fla"], "kda": ["ours", "fla"],
        "rwkv7": ["ours", "fla"], "comba": ["ours", "fla"], "hgrn2": ["ours", "fla"],
        "linear_attn": ["ours", "fla"], "mamba": ["ours", "step", "mamba"], "mamba2_h1024": ["ours"],
        "rwkv6": ["ours", "fla"], "gated_delta_product": ["ours", "fla"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="retention,gla,mamba2", type=lambda s: s.split(","))
    p.add_argument("--T", default="4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--impls", default=None, type=lambda s: s.split(","), help="restrict to these implementations")
    p.add_argument("--D", type=int, default=128, help="head width of the q/k/v ops (16 heads; not Mamba/Mamba2)")
    p.add_argument("--timeout", type=int, default=420)
    p.add_argument("--child", action="store_true")
    p.add_argument("--impl", default="ours")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.ops needs a CUDA GPU", file=sys.stderr)
        return 2
    jobs = [(impl, op) for op in args.ops for impl in PLAN.get(op, ["ours"]) if not args.impls or impl in args.impls]
    jobs.append(("sdpa", "retention"))
    start = time.time()
    # compile/autotune everything in parallel (each process also measures; Triton caches kernels on disk)
    procs = [(impl, op, *spawn(impl, op, args.T, args.timeout, args.D)) for impl, op in jobs
             if impl not in ("ours", "step", "sdpa")]
    rows = []
    for impl, op in jobs:   # ours and SDPA: timed one at a time while the references tune
        if impl in ("ours", "step", "sdpa"):
            pr, to = spawn(impl, op, args.T, args.timeout, args.D)
            rows += collect(pr, to, impl, op, args.T)[0]
    for impl, op, pr, to in procs:
        r, _ = collect(pr, to, impl, op, args.T)
        rows += r
    # everything was timed while other processes were busy: time it again, one at a time, from the cache
    for impl, op in jobs:
        if all("error" not in r for r in rows if r["impl"] == impl and r["op"] == op):
            pr, to = spawn(impl, op, args.T, 300, args.D)
            again, _ = collect(pr, to, impl, op, args.T)
            cold = {r["T"]: r.get("first_call_s") for r in rows if r["impl"] == impl and r["op"] == op}
            for r in again:
                r["first_call_cold_s"] = cold.get(r["T"])   # compile (+ autotune) time of the first phase
            rows = [r for r in rows if not (r["impl"] == impl and r["op"] == op)] + again
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                date=time.strftime("%Y-%m-%d"), tokens=TOKENS, head_dim=args.D, wall_s=time.time() - start)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(table(rows, meta))
    try:
        plot(rows, out / "ops.png")
    except ImportError:
        print("(matplotlib missing: no plot)")
    return 0


def table(rows, meta) -> str:
    lines = [f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, bf16, B*T={TOKENS}",
             f"{'op':<20} {'impl':<6} {'T':>6} {'fwd ms':>8} {'fwd+bwd':>8} {'peak MiB':>9} {'no_grad':>8} "
             f"{'first s':>8}"]
    for r in sorted(rows, key=lambda r: (r["op"], r["T"], r["impl"])):
        if "error" in r:
            lines.append(f"{r['op']:<20} {r['impl']:<6} {r['T']:>6}  ERROR {r['error'][:90]}")
        else:
            lines.append(f"{r['op']:<20} {r['impl']:<6} {r['T']:>6} {r['fwd_ms']:>8.3f} {r['fwdbwd_ms']:>8.3f} "
                         f"{r['peak_mib']:>9.0f} {r.get('fwd_nograd_peak_mib', float('nan')):>8.0f} "
                         f"{r.get('first_call_cold_s') or r['first_call_s']:>8.1f}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows if "error" not in r})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for impl in sorted({r["impl"] for r in rows if r["op"] == op and "error" not in r}):
            rs = sorted([r for r in rows if r["op"] == op and r["impl"] == impl and "error" not in r],
                        key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r["fwdbwd_ms"] for r in rs], marker="o", label=f"{impl} fwd+bwd")
            ax.plot([r["T"] for r in rs], [r["fwd_ms"] for r in rs], marker="x", ls="--", label=f"{impl} fwd")
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel("T (B*T = 32768)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
