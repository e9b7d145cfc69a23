"""Benchmark linattn_dsl.modules against eager PyTorch and torch.compile on one CUDA GPU.

    python -m benchmarks.modules [--out DIR] [--only lce norm conv swiglu] [--quick]

* FusedLinearCrossEntropyLoss at 32768 tokens, hidden 2048, vocab 128256 (bf16) vs
  ``F.cross_entropy(F.linear(h, w), y)`` eager and compiled.
* RMSNorm, FusedRMSNormGated, L2Norm (over heads of 128) and ShortConvolution at [8, 4096, 2048] bf16
  vs eager and compiled twins (the conv also timed forward alone, and its backward with a random ``dy``).
* swiglu_linear (a 340M model's MLP: 16384 tokens, intermediate 2816, out 1024, bf16) vs eager
  ``F.linear(F.silu(g) * u, w)``, compiled, and swiglu_linear with its elementwise parts in eager PyTorch
  (the form before its Triton kernels: the A/B of that change).

Each case is timed forward + backward (``triton.testing.do_bench``, median ms) and its peak memory above
the inputs is measured (``torch.cuda.max_memory_allocated``). Prints a table and writes
``modules.json`` into ``--out`` (default ``$OUT``, else ``./out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.modules", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "./out", help="directory for modules.json")
    parser.add_argument("--only", nargs="+", choices=["lce", "norm", "conv", "swiglu"],
                        default=["lce", "norm", "conv", "swiglu"])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens for the linear cross-entropy")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--shape", type=int, nargs=3, default=[8, 4096, 2048], metavar=("B", "T", "D"),
                        help="input shape for the norms and the conv")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    return parser.parse_args(argv)


def measure(fn: Callable[[], None], quick: bool) -> dict:
    """Median fwd+bwd time (ms) and peak memory above what was allocated before (GiB); OOM is recorded."""
    import triton.testing

    try:
        fn()  # warm-up (and compilation)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                     return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_gib": None, "error": "OOM"}
    return {"ms": round(ms, 4), "peak_gib": round(peak, 4)}


def fwd_bwd(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        out = forward()
        if isinstance(out, tuple):
            out = out[0]
        (out if out.ndim == 0 else out.float().sum()).backward()

    return step


def variants(eager: Callable, no_compile: bool) -> dict[str, Callable]:
    out = {"eager": eager}
    if not no_compile:
        out["torch.compile"] = torch.compile(eager)
    return out


def bench_linear_cross_entropy(args: argparse.Namespace) -> list[dict]:
    from linattn_dsl.modules import FusedLinearCrossEntropyLoss

    torch.manual_seed(0)
    n, dim, vocab = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    fused = FusedLinearCrossEntropyLoss()

    def eager(h, y, w):
        return F.cross_entropy(F.linear(h, w), y)

    impls = {"linattn_dsl": lambda h, y, w: fused(h, y, w), **variants(eager, args.no_compile)}
    rows = []
    for name, impl in impls.items():
        result = measure(fwd_bwd(lambda impl=impl: impl(hidden, labels, weight), [hidden, weight]), args.quick)
        rows.append({"case": f"linear_cross_entropy N={n} D={dim} V={vocab}", "impl": name, **result})
        print_row(rows[-1])
    return rows


def rms_norm_eager(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def gated_norm_eager(x, g, weight, eps=1e-6):
    gf = g.float()
    return (rms_norm_eager(x, weight, eps).float() * gf * torch.sigmoid(gf)).to(x.dtype)


def l2_norm_eager(x, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def short_conv_eager(x, weight, activation=True):
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight, groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y) if activation else y


def bench_norms(args: argparse.Namespace) -> list[dict]:
    from linattn_dsl.modules import FusedRMSNormGated, L2Norm, RMSNorm

    torch.manual_seed(0)
    b, t, d = args.shape
    x = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x, requires_grad=True)
    norm = RMSNorm(d).cuda()
    gated = FusedRMSNormGated(d).cuda()
    l2 = L2Norm()
    heads = x.detach().view(b, t, -1, 128).clone().requires_grad_()   # q/k heads of 128, as the layers use it
    rows = []
    cases = [
        ("rms_norm", lambda: norm(x), rms_norm_eager, lambda f: f(x, norm.weight), [x, norm.weight]),
        ("rms_norm_gated", lambda: gated(x, g), gated_norm_eager, lambda f: f(x, g, gated.weight),
         [x, g, gated.weight]),
        ("l2_norm (heads of 128)", lambda: l2(heads), l2_norm_eager, lambda f: f(heads), [heads]),
    ]
    for case, ours, eager, call, params in cases:
        impls = {"linattn_dsl": ours, **{k: (lambda f=f, call=call: call(f))
                                         for k, f in variants(eager, args.no_compile).items()}}
        for name, impl in impls.items():
            rows.append({"case": f"{case} [{b}, {t}, {d}]", "impl": name,
                         **measure(fwd_bwd(impl, params), args.quick)})
            print_row(rows[-1])
    return rows


def bench_conv(args: argparse.Namespace) -> list[dict]:
    """ShortConvolution (W=4, SiLU, no bias): forward alone and forward + backward with a random ``dy``.

    Unlike the other cases the backward gets a fixed random ``dy`` through ``torch.autograd.grad`` (not
    ``out.float().sum()``), so the rows time the conv alone, without a cast and a reduction around it.
    """
    from linattn_dsl.modules import ShortConvolution

    torch.manual_seed(0)
    b, t, d = args.shape
    x = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)
    conv = ShortConvolution(d, 4).cuda().bfloat16()
    impls = {"linattn_dsl": lambda: conv(x)[0],
             **{k: (lambda f=f: f(x, conv.weight)) for k, f in variants(short_conv_eager, args.no_compile).items()}}
    rows = []
    for name, impl in impls.items():
        case = f"short_conv W=4 silu [{b}, {t}, {d}]"
        rows.append({"case": f"{case} fwd", "impl": name, **measure(impl, args.quick)})
        print_row(rows[-1])
        step = lambda impl=impl: torch.autograd.grad(impl(), [x, conv.weight], dy)  # noqa: E731
        rows.append({"case": f"{case} fwd+bwd", "impl": name, **measure(step, args.quick)})
        print_row(rows[-1])
    return rows


def bench_swiglu(args: argparse.Namespace) -> list[dict]:
    from linattn_dsl.modules import activations, swiglu_linear

    torch.manual_seed(0)
    n, inner, out = 16384, 2816, 1024
    g = torch.randn(n, inner, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    w = (torch.randn(out, inner, device="cuda") / inner**0.5).bfloat16().requires_grad_()

    def eager(g, u, w):
        return F.linear(F.silu(g) * u, w)

    fused_check = activations._fused

    def elementwise_eager(g, u, w):
        activations._fused = lambda t: False
        try:
            return swiglu_linear(g, u, w)
        finally:
            activations._fused = fused_check

    impls = {"linattn_dsl": swiglu_linear, "linattn_dsl (eager elementwise)": elementwise_eager,
             **variants(eager, args.no_compile)}
    rows = []
    for name, impl in impls.items():
        result = measure(fwd_bwd(lambda impl=impl: impl(g, u, w), [g, u, w]), args.quick)
        rows.append({"case": f"swiglu_linear N={n} I={inner} O={out}", "impl": name, **result})
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    ms = "OOM" if row.get("error") else f"{row['ms']:.3f}"
    peak = "-" if row.get("error") else f"{row['peak_gib']:.2f}"
    print(f"{row['case']:<52} {row['impl']:<32} {ms:>10} {peak:>10}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.modules needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'case':<52} {'impl':<14} {'fwd+bwd ms':>10} {'peak GiB':>10}")
    rows: list[dict] = []
    if "lce" in args.only:
        rows += bench_linear_cross_entropy(args)
    if "norm" in args.only:
        rows += bench_norms(args)
    if "conv" in args.only:
        rows += bench_conv(args)
    if "swiglu" in args.only:
        rows += bench_swiglu(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (out / "modules.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out / 'modules.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
