"""The training loop. One process or many: run it under ``torchrun`` / ``accelerate launch`` and
:class:`accelerate.Accelerator` gives DDP (or FSDP, from an accelerate config file); every process reads
its own slice of each global batch (:class:`~linattn_dsl.train.data.BlockSampler`).

Per optimiser step: ``gradient_accumulation_steps`` micro-batches (gradients synchronised on the last
only), bf16 autocast on CUDA, gradient clipping to ``training.max_norm``, a step skipped when the loss or
gradient norm is not finite, AdamW, warmup + cosine schedule. With ``data.packed_documents`` each micro-batch
(and each held-out batch) is one packed row with ``cu_seqlens`` (:func:`~linattn_dsl.train.data.model_inputs`).

Context parallelism (``parallelism.context_parallel_degree`` = ``cp``, torchtitan's option): the world's processes
form groups of ``cp`` consecutive ranks (:func:`context_parallel_group`); the groups are the data-parallel dimension
(each reads its own batches), the processes of a group share the group's batch and each keeps its slice of every
sequence (with the ``cp_context`` the model passes to its layers). The model replica stays whole and identical on
every process: DDP (or FSDP) averages the gradients over all ``dp * cp`` processes, and each process's loss is its
share of its group's loss (the sum of its tokens' losses over the group's count of targets), so its backward is
scaled by ``cp``: the average is then the data-parallel mean of the groups' losses' gradients, what the unsplit
step gives.

Checkpoints (atomic, :mod:`.checkpoint`) hold everything a resumed run needs to reproduce the losses of an
uninterrupted one, and the model's settings: ``--resume`` with other settings stops before any work, naming the
fields that differ.

Throughput and memory: every step's wall time is kept (the loss's ``.item()`` synchronises each step);
``train_summary.json`` in the dump folder (and :class:`TrainResult`) gives the steady tokens/s (all
processes together, the first steps of the run left out: compilation and autotuning) and the peak
CUDA memory of the main process.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm.auto import tqdm

from . import checkpoint, data, report
from .config import MODEL_KEYS, ConfigError, model_classes, model_fields, model_name
from .tokenizer import byte_tokenizer, load_pretrained, train_bpe


@dataclass
class TrainResult:
    dump_folder: Path
    final_dir: Path
    log_path: Path
    plot_path: Path | None
    checkpoint_dir: Path
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    val_loss: float | None = None
    tokens_per_s: float = 0.0
    num_params: int = 0
    is_main: bool = True  # the process that writes logs and exports (rank 0)
    world_size: int = 1
    tokens_per_step: int = 0  # all processes, all micro-batches
    step_seconds: dict[int, float] = field(default_factory=dict)  # step -> wall time of that step
    steady_tokens_per_s: float = 0.0  # over the steps after the first timing_skip(...) of this run
    peak_memory_gib: float | None = None  # torch.cuda.max_memory_allocated of this process (None on CPU)
    summary_path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """What ``train_summary.json`` holds."""
        last = max(self.losses) if self.losses else 0
        return {"steps": last, "world_size": self.world_size, "tokens_per_step": self.tokens_per_step,
                "num_params": self.num_params, "steady_tokens_per_s": self.steady_tokens_per_s,
                "timed_steps": len(self.step_seconds) - timing_skip(len(self.step_seconds)),
                "tokens_per_s_overall": self.tokens_per_s, "peak_memory_gib": self.peak_memory_gib,
                "first_step_s": self.step_seconds[min(self.step_seconds)] if self.step_seconds else None,
                "final_loss": self.losses.get(last), "val_loss": self.val_loss}


def timing_skip(n_steps: int) -> int:
    """Steps left out at the start of a run of ``n_steps`` when measuring throughput: 10%, 1 to 10."""
    return min(10, max(1, n_steps // 10)) if n_steps > 1 else 0


def steady_tokens_per_s(step_seconds: dict[int, float], tokens_per_step: int) -> float:
    """Tokens per second over the steps of a run after its first :func:`timing_skip` steps."""
    times = [step_seconds[s] for s in sorted(step_seconds)]
    times = times[timing_skip(len(times)):]
    return tokens_per_step * len(times) / sum(times) if times and sum(times) > 0 else 0.0


def lr_lambda(cfg: dict[str, Any]) -> Callable[[int], float]:
    """Multiplier of ``optimizer.lr`` after ``step`` scheduler steps: linear warmup to 1, then cosine (or
    linear) decay to ``lr_scheduler.lr_min`` at ``training.steps``."""
    warmup, total = cfg["lr_scheduler"]["warmup_steps"], cfg["training"]["steps"]
    kind, floor = cfg["lr_scheduler"]["decay_type"], cfg["lr_scheduler"]["lr_min"]

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return f


def build_tokenizer(cfg: dict[str, Any], saved: Path, reuse: bool):
    tok = cfg["tokenizer"]
    if tok["kind"] == "pretrained":
        return load_pretrained(tok["path"])
    if reuse and saved.is_dir():  # a resumed run keeps the tokenizer it started with
        return load_pretrained(str(saved))
    if tok["kind"] == "byte":
        tokenizer = byte_tokenizer()
    else:
        tokenizer = train_bpe(data.read_documents(cfg["data"]["files"], cfg["data"]["text_field"]), tok["vocab_size"])
    tokenizer.save_pretrained(saved)
    return tokenizer


def build_model_config(cfg: dict[str, Any], tokenizer):
    """The family's config from ``cfg["model"]``, with the vocabulary and special tokens of ``tokenizer``."""
    kwargs = {k: v for k, v in cfg["model"].items() if k not in MODEL_KEYS}
    config_class = model_classes(cfg["model"])[0]
    vocab = kwargs.setdefault("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                      else tokenizer.eos_token_id)
    return config_class(**kwargs)


def build_model(cfg: dict[str, Any], tokenizer) -> torch.nn.Module:
    return model_classes(cfg["model"])[2](build_model_config(cfg, tokenizer))


def model_settings(model: dict[str, Any], config) -> dict[str, Any]:
    """What a checkpoint records of its model: the family (or the spec's model type; the spec's source is one of
    its fields) and every config field a user may set (as JSON)."""
    settings = {"family": model_name(model), **{k: getattr(config, k) for k in model_fields(model)}}
    return json.loads(json.dumps(settings, default=str))


def check_same_model(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    """Raise :class:`ConfigError` naming each model field that differs from checkpoint ``path``'s."""
    if saved is None:  # a checkpoint from before model settings were recorded: loading it will tell
        return
    keys = ["family"] if saved.get("family") != now["family"] else sorted(set(saved) | set(now))
    diffs = [f"model.{k} = {saved.get(k)!r} there, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"--resume: the model differs from the one checkpoint {path} holds: {'; '.join(diffs)}. "
                          "Resume with the run's model settings, or start a new run in another job.dump_folder")


def build_optimizer(cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["optimizer"]
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # norms, biases, decays
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step for all parameters (torchtitan's default); foreach: PyTorch's multi-tensor ops
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    return torch.optim.AdamW(groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                             **impl[o["implementation"]])


def packing_eos(cfg: dict[str, Any], tokenizer, model: torch.nn.Module, custom_model: bool) -> int | None:
    """The EOS id that ends documents when ``data.packed_documents`` is on (None when off): the model must take
    ``cu_seqlens`` by name (a ``model_factory`` model that swallowed it in ``**kwargs`` would train across
    documents unnoticed)."""
    if not cfg["data"]["packed_documents"]:
        return None
    if tokenizer.eos_token_id is None:
        raise ConfigError("data.packed_documents: the tokenizer has no EOS token to end documents with")
    if custom_model and "cu_seqlens" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"data.packed_documents: the model from model_factory ({type(model).__name__}) takes no "
                          "cu_seqlens keyword; expected a model that runs packed documents")
    return tokenizer.eos_token_id


def context_parallel_group(degree: int, rank: int, world: int):
    """This process's context-parallel group: the processes ``r`` with the same ``r // degree`` split each sequence
    of their shared batch (the groups are the data-parallel dimension); None when ``degree`` is 1. Every process
    creates every group (``new_group`` is collective), a group of its own even when it is the whole world: DDP's
    gradient all-reduce runs on the default group, and the model's collectives must not interleave with it."""
    if degree == 1:
        return None
    groups = [dist.new_group(list(range(first, first + degree))) for first in range(0, world, degree)]
    return groups[rank // degree]


def context_parallel_degree(cfg: dict[str, Any]) -> int:
    """``parallelism.context_parallel_degree``, checked against the world size (``WORLD_SIZE``, set by torchrun /
    accelerate launch; 1 without) before any process group exists."""
    degree = cfg["parallelism"]["context_parallel_degree"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % degree:
        raise ConfigError(f"parallelism.context_parallel_degree: {degree} does not divide the world size {world} "
                          "(the processes torchrun starts); world size = data parallel degree x context parallel "
                          "degree")
    return degree


def check_split_model(degree: int, model: torch.nn.Module, custom_model: bool) -> None:
    """A ``model_factory`` model must take ``cp_context`` by name when sequences are split (one that swallowed it in
    ``**kwargs`` would train each slice as a sequence of its own, unnoticed)."""
    if degree > 1 and custom_model and "cp_context" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"parallelism.context_parallel_degree: the model from model_factory "
                          f"({type(model).__name__}) takes no cp_context keyword; expected a model that runs a "
                          "sequence split across processes")


@torch.no_grad()
def evaluate_loss(model, val: torch.Tensor, batch_size: int, max_batches: int, accelerator: Accelerator,
                  eos_token_id: int | None = None, cp_group=None) -> float:
    """Mean held-out cross-entropy over up to ``max_batches`` batches (split across processes); with
    ``eos_token_id`` each batch is packed (:func:`~linattn_dsl.train.data.model_inputs`); with ``cp_group`` the
    processes of each context-parallel group share a batch, each its slice of the sequences and its share of the loss.

    Every process runs the same number of forwards (one with no batch of its own repeats the first,
    weighted 0): a wrapped model's forward may be collective (DDP's buffer broadcast, FSDP's all-gather),
    and processes that disagree on how many they run hang or mix up their collectives.
    """
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # sum of losses * blocks, blocks
    batches = [val[i:i + batch_size] for i in range(0, len(val), batch_size)][:max_batches]
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    world, rank = accelerator.num_processes // cp, accelerator.process_index // cp   # the data-parallel dimension
    per_process = -(-len(batches) // world)  # ceil
    for i in range(per_process):
        index = i * world + rank
        weight = 1.0 if index < len(batches) else 0.0
        batch = batches[index if index < len(batches) else 0].to(accelerator.device)
        inputs = data.model_inputs(batch, eos_token_id, cp_group)
        with accelerator.autocast():
            loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
        blocks = weight * len(batch)   # a group's shares of the loss add up to its batch's; its blocks count once
        total += torch.stack([loss.float() * blocks, torch.tensor(blocks / cp, device=total.device)])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def train(cfg: dict[str, Any], resume: bool = False, on_step: Callable[[int, dict], None] | None = None,
          progress: bool = True, model_factory: Callable[[dict, Any], torch.nn.Module] | None = None,
          export_final: bool = True) -> TrainResult:
    """Run the training that the validated ``cfg`` (:func:`~linattn_dsl.train.config.load_config`) describes.

    ``resume``: continue from the latest checkpoint in ``job.dump_folder/checkpoint`` (from scratch if there
    is none). ``on_step(step, record)`` is called after every optimiser step (tests use it to interrupt a run).
    ``model_factory(cfg, tokenizer)``: build another causal LM than ``cfg["model"]`` describes (any module whose
    ``forward(input_ids=, labels=, use_cache=)`` returns an object with ``.loss``, e.g. an external Hugging Face
    model) and train it through the same loop. ``export_final=False``: no ``save_pretrained`` at the end.
    """
    t_cfg, dump = cfg["training"], Path(cfg["job"]["dump_folder"])
    ckpt_dir = dump / "checkpoint"
    if not resume and checkpoint.latest(ckpt_dir) is not None:
        raise ConfigError(f"job.dump_folder: {dump} already holds checkpoints; pass --resume to continue that run "
                          "or choose another job.dump_folder")
    cuda_bf16 = t_cfg["mixed_precision"] == "bf16" and torch.cuda.is_available()
    if t_cfg["mixed_precision_reduce"] == "bfloat16" and not torch.cuda.is_available():
        raise ConfigError("training.mixed_precision_reduce: 'bfloat16' needs CUDA GPUs (DDP's bf16 all-reduce "
                          "runs on NCCL); this run has none: use 'float32'")
    # cpu=True without CUDA: under torchrun, CPU processes then form a gloo group (accelerate's MULTI_CPU)
    # DDP (several processes): gradients all-reduced straight from their buckets (no copy), in bf16 if asked
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True,
        comm_hook=DDPCommunicationHookType.BF16 if t_cfg["mixed_precision_reduce"] == "bfloat16"
        else DDPCommunicationHookType.NO)
    cp = context_parallel_degree(cfg)
    accelerator = Accelerator(mixed_precision="bf16" if cuda_bf16 else "no", cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp])
    cp_group = context_parallel_group(cp, accelerator.process_index, accelerator.num_processes)
    dp, dp_rank = accelerator.num_processes // cp, accelerator.process_index // cp
    set_seed(cfg["job"]["seed"])
    main = accelerator.is_main_process
    if main and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and \
            accelerator.distributed_type != DistributedType.FSDP:
        # accelerate applies its FSDP plugin to GPU process groups only; CPU processes (MULTI_CPU) get DDP
        warnings.warn(f"an FSDP launch config was given, but accelerate runs these processes as "
                      f"{accelerator.distributed_type.value} (FSDP needs GPUs): every process holds the whole "
                      f"model and checkpoints are not sharded", stacklevel=2)
    last = checkpoint.latest(ckpt_dir) if resume else None
    saved = checkpoint.read_state(last) if last is not None else {}  # before any work: a bad one fails here
    if main:
        dump.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(ckpt_dir)
    with accelerator.main_process_first():
        tokenizer = build_tokenizer(cfg, dump / "tokenizer", reuse=resume)
    if model_factory is None:  # a changed model fails here, before the data is read
        settings = model_settings(cfg["model"], build_model_config(cfg, tokenizer))
        if last is not None:
            check_same_model(saved.get("model"), settings, last)
    if main:
        (dump / "run_config.json").write_text(json.dumps(cfg, indent=1))
    blocks = data.pack(cfg["data"]["files"], tokenizer, t_cfg["seq_len"], cfg["data"]["text_field"])
    train_blocks, val_blocks = data.split(blocks, cfg["data"]["val_fraction"], cfg["job"]["seed"])
    sampler = data.BlockSampler(train_blocks, t_cfg["batch_size"], cfg["job"]["seed"], dp_rank, dp)

    model = build_model(cfg, tokenizer) if model_factory is None else model_factory(cfg, tokenizer)
    eos = packing_eos(cfg, tokenizer, model, model_factory is not None)
    check_split_model(cp, model, model_factory is not None)
    num_params = sum(p.numel() for p in model.parameters())
    if t_cfg["activation_checkpointing"]:
        model.activation_checkpointing_enable()
    if t_cfg["compile"]:
        for block in model.model.layers:
            block.compile()  # in place: state-dict keys stay the same
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    # not prepared: accelerate would step a prepared scheduler once per process
    accelerator.register_for_checkpointing(scheduler)

    start = 0
    if last is not None:
        state = checkpoint.load(accelerator, last)
        start = state["step"]
        sampler.load_state_dict(state["data"])
        if main:
            print(f"resumed from {last} at step {start}")
    log = report.JsonlLog(dump / "train_log.jsonl", resume_step=start if last is not None else None) if main else None

    accum = t_cfg["gradient_accumulation_steps"]
    tokens_per_step = t_cfg["batch_size"] * accum * t_cfg["seq_len"] * dp
    result = TrainResult(dump, dump / "final", dump / "train_log.jsonl", None, ckpt_dir, num_params=num_params,
                         is_main=main, world_size=accelerator.num_processes, tokens_per_step=tokens_per_step)
    on_cuda = accelerator.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    bar = tqdm(total=t_cfg["steps"], initial=start, disable=not (main and progress), dynamic_ncols=True)
    t_run, tokens_run = time.perf_counter(), 0
    for step in range(start + 1, t_cfg["steps"] + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            inputs = data.model_inputs(sampler.next_batch().to(accelerator.device), eos, cp_group)
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
            # a process's loss is its share of its group's: x cp, the average over all processes is the dp mean
            accelerator.backward(loss * cp / accum)
            loss_sum += loss.detach().float()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t_cfg["max_norm"] or float("inf"))
        loss_val = accelerator.reduce(loss_sum * cp / accum, "mean").item()
        grad_norm = float(grad_norm)
        skipped = t_cfg["skip_nonfinite"] and not (math.isfinite(loss_val) and math.isfinite(grad_norm))
        lr = scheduler.get_last_lr()[0]
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dt = time.perf_counter() - t0
        tokens_run += tokens_per_step
        result.step_seconds[step] = dt
        record = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                  "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / dt}
        if on_cuda:
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        if skipped:
            record["skipped"] = True
        result.losses[step] = loss_val
        interval = t_cfg["eval_interval"]
        if len(val_blocks) and (step == t_cfg["steps"] or (interval and step % interval == 0)):
            record["val_loss"] = evaluate_loss(model, val_blocks, t_cfg["batch_size"], t_cfg["eval_batches"],
                                               accelerator, eos, cp_group)
            result.val_loss = record["val_loss"]
        if main and (step % cfg["metrics"]["log_freq"] == 0 or "val_loss" in record or step == t_cfg["steps"]):
            log.write(record)
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update(1)
        every = cfg["checkpoint"]["interval"]
        if every and step % every == 0 and step < t_cfg["steps"]:
            recorded = {"data": sampler.state_dict()} | ({"model": settings} if model_factory is None else {})
            checkpoint.save(accelerator, ckpt_dir, step, recorded, cfg["checkpoint"]["keep_latest_k"])
        if on_step is not None:
            on_step(step, record)
    bar.close()
    result.tokens_per_s = tokens_run / max(time.perf_counter() - t_run, 1e-9)
    result.steady_tokens_per_s = steady_tokens_per_s(result.step_seconds, tokens_per_step)
    if on_cuda:
        result.peak_memory_gib = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    if main:  # before the export: a model that cannot be exported still leaves its numbers
        result.summary_path = dump / "train_summary.json"
        result.summary_path.write_text(json.dumps(result.summary(), indent=1))
    if export_final:
        export(accelerator, model, tokenizer, result.final_dir)
    if main and cfg["metrics"]["plot"]:
        result.plot_path = report.plot_loss(result.log_path, dump / "loss_curve.png")
    _let_collectives_finish(accelerator)
    accelerator.end_training()
    return result


def _let_collectives_finish(accelerator: Accelerator) -> None:
    """A last barrier, then half a second without the GIL, before the process group goes.

    Gloo's worker threads drop a finished barrier's earlier work (tensors Python owns, so the GIL is needed) only
    after ``wait()`` has returned. If the group is destroyed before they do (when DDP's reducer is freed, the
    group's destructor joins those threads while holding the GIL), the process never exits: seen on 2 CPU
    processes, 1 launch in 11, ``~ProcessGroupGloo`` -> ``thread::join`` against ``~AsyncBarrierWork`` ->
    ``decref_pyobject`` waiting for the GIL. Sleeping releases the GIL so the workers finish first."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.5)


def export(accelerator: Accelerator, model, tokenizer, final_dir: Path) -> None:
    """``save_pretrained`` of the unwrapped model (full state dict, gathered under FSDP) and the tokenizer."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(final_dir, state_dict=state_dict)
        tokenizer.save_pretrained(final_dir)
    accelerator.wait_for_everyone()
