"""Model-level benchmarks: ~340M models of every family, ours against FLA 0.6.0's models of the same config.

    python -m benchmarks.models --families gla,retnet,mamba2 --impls ours,fla --out DIR [--budget 420]

Per (implementation, family), each in its own process with a timeout:
  (a) training throughput: forward + backward of the causal-LM loss, batch 8 x 2048 tokens, model in
      bf16 (parameters and activations), no optimizer step by default (``--optimizer adamw`` adds a
      fused AdamW step): ``--warmup`` steps, then ``--steps`` timed steps (synchronised one by one);
      tokens/s from the median step, peak = ``torch.cuda.max_memory_allocated`` over the timed steps;
  (b) greedy decoding at batch 1 after a 512-token prompt, 256 new tokens: ms per token from a plain
      loop of cached forwards (same code for both implementations) and, for ours, from ``generate``
      (FLA's ``generate`` is tried and timed only if its tokens equal the loop's: under transformers
      5.24 it passes the cache as ``cache=``, which FLA 0.6.0's models ignore);
  (c) agreement (ours only): one forward + backward of a small config (hidden 256, 2 layers, 2 x 256
      tokens) on the device with the Triton kernels, in fp32, bf16 autocast and bf16 parameters,
      against the fp32 PyTorch backend on CPU: relative errors of logits, loss and parameter gradients.
FLA compiles and autotunes for minutes on its first step: its models are warmed up first, in parallel
processes (one for training shapes, one for decoding, per family; Triton's disk cache keeps the kernels
and the autotuning results), while ours run; then each is timed alone. Ours measured while warm-ups ran
are measured again alone when the budget allows (``concurrent`` says which numbers were taken with other
processes on the card).

``--loop-config configs/gla_340m.toml`` adds issue 8's one-card comparison: that config trained for
``--loop-steps`` steps through ``linattn train``'s loop (AdamW, bf16 autocast), ours and FLA's model of the
same family (``benchmarks.train_scaling``), FLA warmed up beside the rest. ``--budget`` bounds everything:
FLA items are timed when their warm-ups are done, highest priority first (the first family, the loop, the
other families), and given up when they can no longer fit.
``--families mamba2_fla`` times our Mamba2 in FLA's layout (mixer-only blocks, 48 layers) against FLA's model of
the same parameter count (the default ``mamba2`` keeps our MLP blocks, 24 layers, against FLA's 48).
``--snapshot DIR`` adds one step under the allocator's history after the timed ones and writes where its peak
went, by the code that allocated it (``DIR/memory_<impl>_<family>.txt``, ``benchmarks/memsnap.py``).
``--tiny`` (with ``--device cpu``) runs the same code on tiny configs: a check of the script itself.
Results: a table on stdout (last), ``results.json`` and per-job logs under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("gla", "retnet", "mamba2", "rwkv7", "kda", "delta_net")
# a family in another layout: (our family, config changes, layer factor). mamba2_fla: FLA's Mamba2 blocks (mixer
# only, no MLP) with FLA's doubled layer count, against FLA's model of the same parameter count
VARIANTS = {"mamba2_fla": ("mamba2", dict(use_mlp=False), 2)}
FAMILY_OPS = {"retnet": "retention", "gla": "gla", "mamba2": "mamba2", "mamba2_fla": "mamba2", "rwkv7": "rwkv7",
              "kda": "kda",
              "delta_net": "delta_rule"}

# ~340M: hidden 1024, 24 layers, vocab 32000 (FLA/flame's *_340M shapes); head counts as FLA's configs use
BASE = {"340m": dict(hidden_size=1024, num_hidden_layers=24, vocab_size=32000),
        "small": dict(hidden_size=256, num_hidden_layers=2, vocab_size=1024),
        "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=512)}


def _reduced(head_dim: int, state_size: int, rwkv7_ranks: tuple[int, int, int, int], kda_head_dim: int) -> dict:
    """The small configs of every family: two heads (Mamba2 and RWKV7: heads of ``head_dim``), RWKV7's low-rank
    widths (decay, gate, a, v) given."""
    decay, gate, a, v = rwkv7_ranks
    return {
        "gla": dict(num_heads=2),
        "retnet": dict(num_heads=2, hidden_ratio=2),
        "mamba2": dict(head_dim=head_dim, state_size=state_size),
        "rwkv7": dict(head_dim=head_dim, decay_low_rank_dim=decay, gate_low_rank_dim=gate, a_low_rank_dim=a,
                      v_low_rank_dim=v),
        "kda": dict(num_heads=2, head_dim=kda_head_dim),
        "delta_net": dict(num_heads=2),
    }


FAMILY_KWARGS = {
    "340m": {
        "gla": dict(num_heads=4, expand_k=0.5, expand_v=1.0, hidden_ratio=4),
        "retnet": dict(num_heads=8, expand_k=1.0, expand_v=2.0, hidden_ratio=2),
        "mamba2": dict(head_dim=64, state_size=128, expand=2, n_groups=1),
        "rwkv7": dict(head_dim=64),
        "kda": dict(num_heads=8, head_dim=128),
        "delta_net": dict(num_heads=8),
    },
    "small": _reduced(64, 64, (16, 32, 16, 8), 128),
    "tiny": _reduced(16, 16, (8, 8, 8, 4), 32),
}

# FLA 0.6.0's classes (fla.models); its Mamba2 blocks have no MLP, so it gets twice the layers (as FLA's
# own Mamba2 configs do) to come near the parameter count of ours (mixer + SwiGLU MLP per block)
FLA_CLASSES = {"gla": ("GLAConfig", "GLAForCausalLM"), "retnet": ("RetNetConfig", "RetNetForCausalLM"),
               "mamba2": ("Mamba2Config", "Mamba2ForCausalLM"), "mamba2_fla": ("Mamba2Config", "Mamba2ForCausalLM"),
               "rwkv7": ("RWKV7Config", "RWKV7ForCausalLM"),
               "kda": ("KDAConfig", "KDAForCausalLM"), "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM")}
FLA_LAYER_FACTOR = {"mamba2": 2}
# agreement tolerances (relative Frobenius error against the fp32 PyTorch backend on CPU)
TOLERANCE = {"fp32": (2e-3, 1e-2), "autocast": (3e-2, 1e-1), "bf16": (3e-2, 1e-1)}  # (logits, gradients)


# ----------------------------------------------------------------------------- models


def model_kwargs(family: str, size: str, loss: str = "fused", layers: int | None = None) -> dict:
    """Our config kwargs for ``family`` (or a layout of :data:`VARIANTS`) at ``size`` ("340m", "small", "tiny")."""
    base, extra, factor = VARIANTS.get(family, (family, {}, 1))
    kw = dict(BASE[size], **FAMILY_KWARGS[size][base], **extra)
    kw["fuse_linear_cross_entropy"] = loss == "fused"
    if layers:
        kw["num_hidden_layers"] = layers
    kw["num_hidden_layers"] *= factor
    return kw


def build_ours(family: str, kwargs: dict):
    from linattn_dsl.models import FAMILIES as OURS

    config_class, _, lm_class = OURS[VARIANTS.get(family, (family,))[0]]
    return lm_class(config_class(**kwargs))


def fla_config(family: str, kwargs: dict):
    """FLA's config of the same shape: the keys its ``__init__`` takes (same names as ours), its own
    defaults for the rest. Returns (config, keys of ours it has no field for)."""
    import inspect

    import fla.models as fm

    config_class = getattr(fm, FLA_CLASSES[family][0])
    accepted = set(inspect.signature(config_class.__init__).parameters)
    kw = {k: v for k, v in kwargs.items() if k in accepted}
    dropped = sorted(set(kwargs) - set(kw))
    if family in FLA_LAYER_FACTOR:
        kw["num_hidden_layers"] = kwargs["num_hidden_layers"] * FLA_LAYER_FACTOR[family]
    fused = kwargs.get("fuse_linear_cross_entropy")
    if fused is not None:  # FLA refuses both flags at once; without a linear one, its fused cross-entropy
        kw["fuse_cross_entropy"] = bool(fused) and "fuse_linear_cross_entropy" not in accepted
        if kw["fuse_cross_entropy"]:
            dropped = [d for d in dropped if d != "fuse_linear_cross_entropy"]
            dropped.append("fuse_linear_cross_entropy (FLA's fuse_cross_entropy instead)")
    return config_class(**kw), dropped


def build_fla(family: str, kwargs: dict):
    import fla.models as fm

    config, dropped = fla_config(family, kwargs)
    return getattr(fm, FLA_CLASSES[family][1])(config), dropped


def fla_mamba2_unfused(model) -> str | None:
    """FLA's Mamba2 trains through mamba-ssm's fused conv + scan kernel, which calls the causal-conv1d CUDA
    package; without it (the GPU machine has no such wheel) its first training step fails with
    ``TypeError: 'NoneType' object is not callable``. Its mixers kept in eval mode take FLA's other path
    instead: FLA's own Triton causal conv, then mamba-ssm's chunk scan, both differentiable (eval mode
    changes only that branch: these mixers have no dropout). Returns a note, or None if not needed."""
    import importlib.util

    if importlib.util.find_spec("causal_conv1d") is not None:
        return None
    mixers = [m for m in model.modules() if type(m).__name__ == "Mamba2" and type(m).__module__ == "fla.layers.mamba2"]
    train = model.train

    def train_keeping_mixers_in_eval(mode: bool = True):
        train(mode)
        for m in mixers:
            m.train(False)
        return model

    model.train = train_keeping_mixers_in_eval
    return ("FLA Mamba2 mixers in eval mode: FLA's Triton conv + mamba-ssm chunk scan (its fused training "
            "kernel needs the causal-conv1d package, absent)")


def build(impl: str, family: str, kwargs: dict, device, dtype):
    """The model on ``device`` (initialised there: fast for 340M), in ``dtype``; and notes."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        if impl == "ours":
            model, notes = build_ours(family, kwargs), []
        else:
            model, dropped = build_fla(family, kwargs)
            notes = [f"FLA config lacks {d}" for d in dropped]
            if family.startswith("mamba2"):
                note = fla_mamba2_unfused(model)
                notes += [note] if note else []
    return model.to(dtype), notes


# ----------------------------------------------------------------------------- measurements


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_bench(model, args) -> dict:
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda) if args.optimizer == "adamw" else None

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        return loss.detach()

    start = time.perf_counter()
    loss = float(step())
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, args.warmup - 1)):
        step()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        last = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    snapshot = None
    if cuda and getattr(args, "snapshot", None):
        from benchmarks import memsnap

        breakdown = memsnap.peak_breakdown(memsnap.record(step))
        snapshot = os.path.join(args.snapshot, f"memory_{args.impl}_{args.family}.txt")
        os.makedirs(args.snapshot, exist_ok=True)
        with open(snapshot, "w") as f:
            f.write(memsnap.report(breakdown, f"{args.impl} {args.family}: one training step, batch {args.batch} x "
                                              f"{args.seq}, {args.dtype}, loss {args.loss}"))
    return dict(snapshot=snapshot, train_first_step_s=first, train_step_ms=median * 1e3,
                train_step_ms_min=min(times) * 1e3, train_step_ms_max=max(times) * 1e3,
                train_tokens_per_s=args.batch * args.seq / median, train_peak_gib=peak,
                train_loss_first=loss, train_loss_last=float(last), train_steps=args.steps,
                train_batch=args.batch, train_seq=args.seq, optimizer=args.optimizer)


def _cache_of(out):
    return out["cache"] if "cache" in out else out.past_key_values


def greedy_loop(model, impl: str, prompt, new_tokens: int):
    """Greedy decoding by hand: one prefill forward, then one cached forward per token (the same calls
    ``generate`` makes, without its bookkeeping). FLA's models take the cache as ``past_key_values``."""
    import torch

    key = "cache" if impl == "ours" else "past_key_values"
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{key: _cache_of(out)})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def _generate(model, prompt, new_tokens: int):
    import torch

    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def decode_bench(model, impl: str, args) -> dict:
    import torch

    device = torch.device(args.device)
    model.eval()
    n = args.new_tokens
    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt),
                           generator=torch.Generator().manual_seed(1)).to(device)
    res = dict(decode_prompt=args.prompt, decode_new_tokens=n)
    with torch.no_grad():
        t_warm, check = _timed(lambda: greedy_loop(model, impl, prompt, 8), device)  # compiles prefill + step
        res["decode_first_call_s"] = t_warm
        t_one = min(_timed(lambda: greedy_loop(model, impl, prompt, 1), device)[0] for _ in range(2))
        t_all, _ = _timed(lambda: greedy_loop(model, impl, prompt, n), device)
        res.update(loop_prefill_ms=t_one * 1e3, loop_ms_per_token=(t_all - t_one) / (n - 1) * 1e3)
        try:
            same = torch.equal(_generate(model, prompt, 8), check)
        except Exception as e:  # FLA under transformers 5.24: report, keep the loop's numbers
            res["generate_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return res
        res["generate_matches_loop"] = same
        if not same:
            res["generate_error"] = "generate's tokens differ from the greedy loop's (cache not threaded through)"
            return res
        t_one = min(_timed(lambda: _generate(model, prompt, 1), device)[0] for _ in range(2))
        t_all, _ = _timed(lambda: _generate(model, prompt, n), device)
        res.update(generate_prefill_ms=t_one * 1e3, generate_ms_per_token=(t_all - t_one) / (n - 1) * 1e3)
    return res


def agreement(family: str, device: str, modes: list[str]) -> list[dict]:
    """One forward + backward of a small config: ``device`` in each mode against fp32 on CPU."""
    import torch
    import torch.nn.functional as F

    kwargs = model_kwargs(family, "small", loss="plain")  # logits needed
    torch.manual_seed(0)
    ref_model = build_ours(family, kwargs).train()
    ids = torch.randint(0, kwargs["vocab_size"], (2, 256), generator=torch.Generator().manual_seed(2))

    def run(model, dev, mode):
        model = copy.deepcopy(model).to(dev)
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        ctx = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16) if mode == "autocast" else _null()
        with ctx:
            logits = model(input_ids=ids.to(dev), use_cache=False).logits
        logits = logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(dev))
        loss.backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach().cpu(), loss.item(), grads

    ref_logits, ref_loss, ref_grads = run(ref_model, "cpu", "fp32")
    names = list(ref_grads)
    last = kwargs["num_hidden_layers"] - 1
    picks = [next((n for n in names if "embeddings" in n), None),
             next((n for n in names if n.startswith("model.layers.0.mixer")), None),
             next((n for n in names if n.startswith("model.layers.0.mixer") and
                   any(s in n for s in ("A_log", "dt_bias", "gk_proj", "w_lora", "decay", "b_proj", "f_proj"))), None),
             [n for n in names if n.startswith(f"model.layers.{last}.mixer")][-1:] or [None],
             "lm_head.weight" if "lm_head.weight" in names else None]
    picks = [p[0] if isinstance(p, list) else p for p in picks]
    picks = list(dict.fromkeys(p for p in picks if p))

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    rows = []
    for mode in modes:
        start = time.time()
        try:
            logits, loss, grads = run(ref_model, device, mode)
        except Exception as e:
            rows.append(dict(family=family, mode=mode, device=device, error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        errs = {n: rel(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
        missing = sorted(set(ref_grads) - set(grads))
        tol_logits, tol_grads = TOLERANCE[mode]
        worst = max(errs, key=errs.get)
        picked = {n: errs[n] for n in picks}
        rows.append(dict(
            family=family, mode=mode, device=device, logits_rel=rel(logits, ref_logits),
            logits_max_abs=(logits - ref_logits).abs().max().item(), loss=loss, loss_ref=ref_loss,
            loss_abs=abs(loss - ref_loss), grad_rel=picked, grad_rel_worst=(worst, errs[worst]),
            grads_missing=missing, tolerance=dict(logits=tol_logits, grads=tol_grads),
            ok=rel(logits, ref_logits) <= tol_logits and max(picked.values()) <= tol_grads and not missing,
            seconds=time.time() - start))
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------------------- child processes


def emit(kind: str, row: dict) -> None:
    print(f"RESULT {kind} " + json.dumps(row, default=str), flush=True)


def child(args) -> int:
    import torch

    if args.child == "agree":
        for row in agreement(args.family, args.device, args.modes):
            emit("agree", row)
        return 0
    size = "tiny" if args.tiny else "340m"
    kwargs = model_kwargs(args.family, size, args.loss, args.layers)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = dict(impl=args.impl, family=args.family, device=args.device)
    start = time.time()
    try:
        model, notes = build(args.impl, args.family, kwargs, args.device, dtype)
    except Exception as e:
        emit("error", dict(base, error=f"build: {type(e).__name__}: {str(e)[:300]}"))
        return 0
    if torch.device(args.device).type == "cuda":
        base["card"] = torch.cuda.get_device_name()
    base.update(params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                layers=model.config.num_hidden_layers, notes=notes, build_s=time.time() - start, kwargs=kwargs)
    emit("info", base)
    parts = {"warm-train": ["train"], "warm-decode": ["decode"], "time": ["train", "decode"]}[args.child]
    if args.no_decode and "decode" in parts:
        parts.remove("decode")
    for part in parts:
        if part == "train" and args.child == "warm-train":
            args.steps, args.warmup, args.batch = 1, 1, args.warm_batch
        if part == "decode" and args.child == "warm-decode":
            args.new_tokens = 8
        try:
            res = train_bench(model, args) if part == "train" else decode_bench(model, args.impl, args)
        except Exception as e:
            res = {f"{part}_error": f"{type(e).__name__}: {str(e)[:300]}"}
        emit(part, dict(base, **res))
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    return 0


class Job:
    """A child process (``python -m MODULE ARGS``) writing to its own log; RESULT lines parsed at the end."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, timeout: float, module: str = "benchmarks.models"):
        self.name, self.timeout = name, max(1.0, timeout)
        self.log = log_dir / f"{name}.log"
        self.fh = self.log.open("w")
        self.start = time.time()
        env = dict(os.environ)  # the repository root importable, wherever this was started from
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        self.timed_out = False
        self.end: float | None = None

    def alive(self) -> bool:
        if self.proc.poll() is None:
            if time.time() > self.start + self.timeout:
                self.kill()
                return False
            return True
        self.end = self.end or time.time()
        return False

    def wait(self, until: float | None = None) -> None:
        """Until the process ends or its timeout passes (killed then); or until the absolute time ``until``
        (killed then too)."""
        limit = self.start + self.timeout if until is None else min(until, self.start + self.timeout)
        try:
            self.proc.wait(timeout=max(0.0, limit - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
        self.end = self.end or time.time()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.timed_out = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the child and what it started, nothing else
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.end = self.end or time.time()

    def ok(self) -> bool:
        return not self.alive() and not self.timed_out and self.proc.returncode == 0

    def results(self) -> list[tuple[str, dict]]:
        self.fh.flush()
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("RESULT "):
                kind, _, payload = line[7:].partition(" ")
                if kind.startswith("{"):  # benchmarks.train_scaling prints "RESULT {json}"
                    kind, payload = "loop", line[7:]
                out.append((kind, json.loads(payload)))
        return out

    def last_line(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()
                 and not x.startswith("RESULT ")]
        return lines[-1][:300] if lines else "no output"

    @property
    def seconds(self) -> float:
        return (self.end or time.time()) - self.start


# ----------------------------------------------------------------------------- orchestration


def child_argv(args, mode: str, impl: str, family: str) -> list[str]:
    argv = ["--child", mode, "--impl", impl, "--family", family, "--device", args.device, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--prompt",
            str(args.prompt), "--new-tokens", str(args.new_tokens), "--optimizer", args.optimizer, "--loss",
            args.loss, "--dtype", args.dtype, "--warm-batch", str(args.warm_batch),
            "--modes", ",".join(args.modes)]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.tiny:
        argv.append("--tiny")
    if args.no_decode:
        argv.append("--no-decode")
    if args.snapshot and mode == "time":
        argv += ["--snapshot", args.snapshot]
    return argv


def loop_argv(args, mode: str, impl: str, dump: Path, steps: int | None) -> list[str]:
    """``benchmarks.train_scaling`` (``linattn train``'s function) on ``--loop-config``."""
    argv = [mode, "--impl", impl, "--config", args.loop_config, f"--job.dump_folder={dump}", "--no-progress"]
    if mode == "run":
        argv += ["--no-export", f"--training.steps={steps}"]
    return argv + args.loop_args.split()


def merge(job: Job) -> tuple[dict, list[dict]]:
    """A timing job's row (info + train + decode merged) and agreement rows."""
    row, agree = {}, []
    for kind, r in job.results():
        if kind == "agree":
            agree.append(r)
        else:
            row.update(r)
    if job.timed_out:
        row["timeout"] = f"killed after {job.seconds:.0f} s"
    if not row and not agree:
        row["error"] = job.last_line()
    return row, agree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--families", type=csv, default=["gla", "retnet", "mamba2", "rwkv7", "kda", "delta_net"])
    p.add_argument("--impls", type=csv, default=["ours", "fla"])
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--optimizer", choices=("none", "adamw"), default="none")
    p.add_argument("--loss", choices=("fused", "plain"), default="fused",
                   help="fused: fused linear + cross-entropy in both (FLA's fuse_cross_entropy where it has no "
                        "linear one); plain: logits + cross-entropy")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the config's 24 (both impls)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs (checks the script on CPU)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--no-agreement", action="store_true")
    p.add_argument("--modes", type=csv, default=["fp32", "autocast", "bf16"], help="agreement modes")
    p.add_argument("--loop-config", default=None,
                   help="also train this config through linattn train's loop on this card, ours and FLA's model "
                        "(benchmarks.train_scaling), e.g. configs/gla_340m.toml")
    p.add_argument("--loop-steps", type=int, default=60)
    p.add_argument("--loop-args", default="", help="more --section.key=value overrides for the loop runs")
    p.add_argument("--snapshot", default=None, help="folder: after timing, one more step under the allocator's "
                   "history, and where its peak memory went (benchmarks/memsnap.py)")
    p.add_argument("--budget", type=float, default=0, help="seconds for everything (0: no limit)")
    p.add_argument("--timeout", type=float, default=300, help="per timing job")
    p.add_argument("--warm-timeout", type=float, default=900, help="per FLA warm-up job")
    p.add_argument("--warm-batch", type=int, default=2, help="batch of FLA's training warm-up (memory)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--child", choices=("time", "warm-train", "warm-decode", "agree"))
    p.add_argument("--impl", default="ours")
    p.add_argument("--family", default="gla")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    return orchestrate(args)


def loop_row(job: Job, impl: str, dump: Path) -> dict:
    path = dump / "train_summary.json"
    row = dict(impl=impl, run=dump.name, seconds=job.seconds)
    if path.is_file():
        row.update(json.loads(path.read_text()))
    else:
        row["error"] = f"timeout after {job.seconds:.0f} s" if job.timed_out else job.last_line()
    return row


def orchestrate(args) -> int:
    import torch

    start = time.time()
    deadline = start + args.budget if args.budget else float("inf")
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("benchmarks.models: no CUDA device (use --device cpu --tiny to check the script)", file=sys.stderr)
        return 2
    unknown = [f for f in args.families if f not in FAMILIES and f not in VARIANTS]
    if unknown:
        print(f"--families: unknown {unknown}; expected some of {FAMILIES + tuple(VARIANTS)}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(f"[{time.time() - start:5.0f} s] {text}", flush=True)

    def remaining() -> float:
        return deadline - time.time()

    rows: list[dict] = []
    agree: list[dict] = []
    loops: dict[str, dict] = {}
    ours = [f for f in args.families if "ours" in args.impls]
    fla_ok = importlib.util.find_spec("fla") is not None
    fla = [f for f in (ours if "ours" in args.impls else args.families) if "fla" in args.impls]
    if fla and not fla_ok:
        rows += [dict(impl="fla", family=f, error="fla is not installed (flash-linear-attention 0.6.0 + fla-core)")
                 for f in fla]
        fla = []
    loop_dir = out / "loop"
    loop_fla = bool(args.loop_config) and fla_ok and "fla" in args.impls
    if args.loop_config and not loop_fla and "fla" in args.impls:
        loops["fla_1gpu"] = dict(impl="fla", run="fla_1gpu", error="fla is not installed")

    # 1. FLA warm-ups, all in parallel, in the background: per family one for training shapes, one for decoding;
    #    FLA's model through our loop (bf16 autocast: other kernel specialisations than the bf16 model)
    warm: dict[str, list[Job]] = {}
    for f in fla:
        warm[f] = [Job(f"warm-train-fla-{f}", child_argv(args, "warm-train", "fla", f), logs, args.warm_timeout)]
        if not args.no_decode:
            warm[f].append(Job(f"warm-decode-fla-{f}", child_argv(args, "warm-decode", "fla", f), logs,
                               args.warm_timeout))
    if loop_fla:
        warm["loop"] = [Job("warm-loop-fla", loop_argv(args, "warm", "fla", loop_dir / "fla_warm", None), logs,
                            args.warm_timeout, module="benchmarks.train_scaling")]
    if warm:
        say(f"FLA warm-ups started: {', '.join(warm)}")

    def background() -> bool:
        return any(j.alive() for jobs in warm.values() for j in jobs)

    # 2. ours: agreement (all families in parallel: small, untimed), then timing one process at a time
    #    (beside FLA's warm-ups), then the training loop
    if "ours" in args.impls and not args.no_agreement:
        jobs = [Job(f"agree-{f}", ["--child", "agree", "--family", f, "--device", args.device,
                                   "--modes", ",".join(args.modes)], logs, min(args.timeout, remaining()))
                for f in args.families]
        for f, job in zip(args.families, jobs):
            job.wait()
            got = merge(job)[1]
            agree += got or [dict(family=f, mode="-", error=job.last_line() if not job.timed_out
                                  else f"timeout after {job.seconds:.0f} s")]
            say(f"agreement {f}: " + (", ".join(f"{r['mode']} {'ok' if r.get('ok') else 'CHECK'}" for r in got)
                                      or "ERROR"))
    timed: dict[tuple[str, str], dict] = {}
    durations: dict[str, float] = {}
    for f in ours:
        if remaining() < 30:
            timed["ours", f] = dict(impl="ours", family=f, error="no budget left")
            continue
        concurrent = background()
        job = Job(f"time-ours-{f}", child_argv(args, "time", "ours", f), logs, min(args.timeout, remaining()))
        job.wait()
        row = merge(job)[0]
        row.update(impl="ours", family=f, concurrent=concurrent or background())
        timed["ours", f], durations[f] = row, job.seconds
        say(f"timed ours {f} ({job.seconds:.0f} s)")
    if args.loop_config and "ours" in args.impls and remaining() > 60:
        concurrent = background()
        dump = loop_dir / "ours_1gpu"
        job = Job("loop-ours", loop_argv(args, "run", "ours", dump, args.loop_steps), logs,
                  min(args.timeout, remaining()), module="benchmarks.train_scaling")
        job.wait()
        loops["ours_1gpu"] = dict(loop_row(job, "ours", dump), concurrent=concurrent or background())
        durations["loop"] = job.seconds
        say(f"loop ours ({job.seconds:.0f} s)")

    # 3. FLA: an item (a family's model, or the loop) is timed alone once its warm-ups are done. Ready items go
    #    in priority order (the first family, the loop, the other families), each only if time is left for it
    #    and for the higher-priority items still warming up; an item that can no longer fit is given up (its
    #    warm-ups killed: Triton keeps on disk what they tuned so far).
    estimate = {"loop": 60 + args.loop_steps * 0.5}
    order = (fla[:1] + (["loop"] if loop_fla else []) + fla[1:])
    pending = list(order)

    def est(item: str) -> float:
        return estimate.get(item, 75.0)

    def settle(item: str, run: bool) -> None:
        jobs = warm[item]
        others = any(j.alive() for g, js in warm.items() if g != item for j in js)
        if item == "loop":
            w = jobs[0]
            if not run or not w.ok():
                why = ("no time left to time it" if w.ok() else f"warm-up not finished in {w.seconds:.0f} s"
                       if w.timed_out else f"warm-up failed: {w.last_line()}")
                loops["fla_1gpu"] = dict(impl="fla", run="fla_1gpu", error=why, warm_s=w.seconds)
                say(f"loop FLA: {why}")
                return
            dump = loop_dir / "fla_1gpu"
            job = Job("loop-fla", loop_argv(args, "run", "fla", dump, args.loop_steps), logs,
                      min(args.timeout, remaining()), module="benchmarks.train_scaling")
            job.wait()
            cold = next((r for k, r in w.results() if k == "loop"), {})
            loops["fla_1gpu"] = dict(loop_row(job, "fla", dump), concurrent=others, warm_s=w.seconds,
                                     warm_first_step_s=cold.get("first_step_s"))
            say(f"loop FLA ({job.seconds:.0f} s)")
            return
        f = item
        parts = {j.name.split("-")[1]: (merge(j)[0], j) for j in jobs}
        train_warm, train_job = parts["train"]
        warm_info = dict(warm_train_s=None if train_job.timed_out else train_job.seconds,
                         warm_train_first_step_s=train_warm.get("train_first_step_s"))
        decode_ready = "decode" in parts and not parts["decode"][1].timed_out
        if "decode" in parts:
            warm_info.update(warm_decode_s=parts["decode"][1].seconds if decode_ready else None,
                             warm_decode_first_call_s=parts["decode"][0].get("decode_first_call_s"))
        if train_job.timed_out or "train_error" in train_warm or "error" in train_warm or not run:
            why = (f"warm-up not finished in {train_job.seconds:.0f} s" if train_job.timed_out
                   else train_warm.get("train_error") or train_warm.get("error") or "no time left to time it")
            timed["fla", f] = dict(impl="fla", family=f, error=f"warm-up: {why}" if run else why, **warm_info)
            say(f"FLA {f}: {why}")
            return
        targs = copy.copy(args)
        targs.no_decode = args.no_decode or not decode_ready
        job = Job(f"time-fla-{f}", child_argv(targs, "time", "fla", f), logs, min(args.timeout, remaining()))
        job.wait()
        row = merge(job)[0]
        row.update(impl="fla", family=f, concurrent=others, **warm_info)
        if targs.no_decode and not args.no_decode:
            row["decode_error"] = "decode warm-up not finished: not timed"
        timed["fla", f] = row
        say(f"timed FLA {f} ({job.seconds:.0f} s)")

    while pending:
        now = time.time()
        for item in [i for i in pending if now + est(i) > deadline]:
            for j in warm[item]:
                j.kill()
            pending.remove(item)
            settle(item, run=False)
        ready = [i for i in pending if not any(j.alive() for j in warm[i])]
        runnable = [i for i in ready if now + est(i) + sum(est(j) for j in pending if j not in ready and
                                                           order.index(j) < order.index(i)) <= deadline]
        if runnable:
            item = min(runnable, key=order.index)
            pending.remove(item)
            settle(item, run=True)
        else:
            time.sleep(1.0)
    for jobs in warm.values():
        for j in jobs:
            j.kill()

    # 4. ours again, alone, where the first numbers were taken beside FLA's warm-ups (budget allowing)
    for f in ours + (["loop"] if "ours_1gpu" in loops else []):
        row = loops["ours_1gpu"] if f == "loop" else timed["ours", f]
        if not row.get("concurrent") or "error" in row or "train_error" in row:
            continue
        if remaining() < durations[f] * 1.2 + 5:
            row["note"] = "no time left to measure it again alone"
            continue
        if f == "loop":
            dump = loop_dir / "ours_1gpu_alone"
            job = Job("loop-ours-alone", loop_argv(args, "run", "ours", dump, args.loop_steps), logs,
                      min(args.timeout, remaining()), module="benchmarks.train_scaling")
            job.wait()
            again = loop_row(job, "ours", dump)
            if "error" not in again:
                loops["ours_1gpu"] = dict(again, run="ours_1gpu", concurrent=False,
                                          first_run_concurrent=dict(steady_tokens_per_s=row["steady_tokens_per_s"]))
            else:
                row["note"] = f"measuring again alone failed: {str(again['error'])[:150]}"
        else:
            job = Job(f"time-ours-{f}-alone", child_argv(args, "time", "ours", f), logs,
                      min(args.timeout, remaining()))
            job.wait()
            again = merge(job)[0]
            if "train_tokens_per_s" in again:
                again.update(impl="ours", family=f, concurrent=False,
                             first_run_concurrent=dict(train_tokens_per_s=row.get("train_tokens_per_s")))
                timed["ours", f] = again
            else:
                row["note"] = "measuring again alone failed: " + str(
                    again.get("train_error") or again.get("error") or again.get("timeout"))[:150]
        say(f"timed ours {f} again alone ({job.seconds:.0f} s)")

    rows = sorted(rows + list(timed.values()), key=lambda r: (args.families.index(r["family"]), r["impl"] != "ours"))
    cards = {r["card"] for r in rows if r.get("card")}  # the parent never touches the GPU
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, device=args.device,
                card=", ".join(sorted(cards)) or args.device, wall_s=time.time() - start,
                settings=dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                              optimizer=args.optimizer, loss=args.loss, dtype=args.dtype, prompt=args.prompt,
                              new_tokens=args.new_tokens, size="tiny" if args.tiny else "340m",
                              layers=args.layers, fla_layer_factor=FLA_LAYER_FACTOR,
                              loop_config=args.loop_config, loop_steps=args.loop_steps, loop_args=args.loop_args))
    from importlib.metadata import PackageNotFoundError, version

    for name, dist in (("triton", "triton"), ("transformers", "transformers"), ("fla", "flash-linear-attention")):
        try:
            meta[name] = version(dist)
        except PackageNotFoundError:
            meta[name] = None
    loop_rows = [loops[k] for k in ("ours_1gpu", "fla_1gpu") if k in loops]
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, agreement=agree, loop=loop_rows),
                                                 indent=1, default=str))
    text = table(rows, agree, meta, loop_rows)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    return 0


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def table(rows: list[dict], agree: list[dict], meta: dict, loops: list[dict] = ()) -> str:
    s = meta["settings"]
    lines = [f"{meta['card']}, torch {meta['torch']}, triton {meta.get('triton')}, transformers "
             f"{meta.get('transformers')}, FLA {meta.get('fla')}, {meta['date']}",
             f"{s['size']} configs, {s['dtype']}, train: batch {s['batch']} x {s['seq']}, fwd+bwd"
             f"{' + AdamW' if s['optimizer'] == 'adamw' else ' (no optimizer step)'}, {s['loss']} loss, "
             f"median of {s['steps']} steps after {s['warmup']}; decode: batch 1, {s['prompt']}-token prompt, "
             f"{s['new_tokens']} new tokens, greedy",
             "",
             f"{'family':<10} {'impl':<5} {'params M':>8} {'tok/s':>9} {'step ms':>8} {'peak GiB':>8} "
             f"{'first s':>7} {'loop ms/tok':>11} {'gen ms/tok':>10} {'prefill ms':>10}  note"]
    ours_tps = {r["family"]: r.get("train_tokens_per_s") for r in rows if r.get("impl") == "ours"}
    ours_dec = {r["family"]: r.get("loop_ms_per_token") for r in rows if r.get("impl") == "ours"}
    for r in rows:
        head = f"{r.get('family', '?'):<10} {r.get('impl', '?'):<5} "
        if "skipped" in r:
            lines.append(head + f"skipped: {r['skipped']}")
            continue
        if "train_tokens_per_s" not in r and "loop_ms_per_token" not in r:
            lines.append(head + f"ERROR {str(r.get('error') or r.get('train_error') or r.get('timeout'))[:150]}")
            continue
        notes = []
        if r.get("concurrent"):
            notes.append("measured beside other processes")
        if r.get("impl") == "fla":
            if ours_tps.get(r["family"]) and r.get("train_tokens_per_s"):
                notes.append(f"ours/FLA tok/s {ours_tps[r['family']] / r['train_tokens_per_s']:.2f}")
            if ours_dec.get(r["family"]) and r.get("loop_ms_per_token"):
                notes.append(f"FLA/ours ms/tok {r['loop_ms_per_token'] / ours_dec[r['family']]:.2f}")
            if r.get("warm_train_first_step_s"):
                notes.append(f"cold first step {r['warm_train_first_step_s']:.0f} s")
        for key in ("note", "train_error", "decode_error", "generate_error", "timeout"):
            if r.get(key):
                notes.append(f"{key}: {str(r[key])[:80]}")
        notes += r.get("notes") or []
        lines.append(head + f"{_fmt(r.get('params_m'), '8.1f')} {_fmt(r.get('train_tokens_per_s'), '9,.0f')} "
                     f"{_fmt(r.get('train_step_ms'), '8.1f')} {_fmt(r.get('train_peak_gib'), '8.2f')} "
                     f"{_fmt(r.get('train_first_step_s'), '7.1f')} {_fmt(r.get('loop_ms_per_token'), '11.2f')} "
                     f"{_fmt(r.get('generate_ms_per_token'), '10.2f')} {_fmt(r.get('loop_prefill_ms'), '10.1f')}  "
                     + "; ".join(notes))
    if agree:
        lines += ["", "agreement with the fp32 PyTorch backend on CPU (small config, 2 x 256 tokens): relative errors",
                  f"{'family':<10} {'mode':<9} {'logits':>9} {'loss abs':>9} {'grads (picked, max)':>20} "
                  f"{'worst grad':>10}  ok (tolerance logits/grads)"]
        for r in agree:
            if "error" in r:
                lines.append(f"{r['family']:<10} {r['mode']:<9} ERROR {r['error'][:150]}")
                continue
            worst_name, worst = r["grad_rel_worst"]
            lines.append(f"{r['family']:<10} {r['mode']:<9} {r['logits_rel']:9.2e} {r['loss_abs']:9.2e} "
                         f"{max(r['grad_rel'].values()):20.2e} {worst:10.2e}  "
                         f"{'ok' if r['ok'] else 'CHECK'} ({r['tolerance']['logits']:g}/{r['tolerance']['grads']:g}; "
                         f"worst: {worst_name})")
    if loops:
        st = meta["settings"]
        lines += ["", f"training loop (linattn train's train(): AdamW, bf16 autocast, {st['loop_config']}, "
                  f"{st['loop_steps']} steps, steady tokens/s without the first steps), one card",
                  f"{'run':<10} {'params M':>8} {'tok/s':>9} {'peak GiB':>8} {'first s':>7} {'loss':>6}  note"]
        for r in loops:
            if "error" in r:
                lines.append(f"{r['run']:<10} ERROR {str(r['error'])[:150]}")
                continue
            notes = ["measured beside other processes"] if r.get("concurrent") else []
            notes += [r["note"]] if r.get("note") else []
            if r.get("warm_first_step_s"):
                notes.append(f"cold first step {r['warm_first_step_s']:.0f} s (batch 2)")
            lines.append(f"{r['run']:<10} {r['num_params'] / 1e6:8.1f} {r['steady_tokens_per_s']:9,.0f} "
                         f"{_fmt(r.get('peak_memory_gib'), '8.2f')} {_fmt(r.get('first_step_s'), '7.1f')} "
                         f"{_fmt(r.get('final_loss'), '6.3f')}  " + "; ".join(notes))
        by = {r["run"]: r for r in loops if "error" not in r}
        if "ours_1gpu" in by and "fla_1gpu" in by:
            lines.append(f"ours / FLA tokens/s through the same loop: "
                         f"{by['ours_1gpu']['steady_tokens_per_s'] / by['fla_1gpu']['steady_tokens_per_s']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
