"""Worker of tests/test_train_measure.py::test_fsdp2_sharding_on_cpu, run by torch.distributed.run on CPU
processes (gloo): what configs/accelerate_fsdp.yaml asks accelerate for on GPUs, done with PyTorch's own API
(accelerate runs CPU processes as DDP, so a CPU launch of that config never shards).

One ``fully_shard`` unit per decoder block plus the root (FSDP2, parameters resharded after the forward).
Against one unsharded copy fed the whole batch: step 1's loss (mean over the processes' halves) and every
gathered gradient; then a sharded checkpoint of model and optimizer (torch.distributed.checkpoint, one file
per process), step 2, a fresh sharded model and optimizer loaded from the checkpoint repeating step 2, and the
full state dict gathered from the shards against the unsharded copy's. Rank 0 prints one JSON line.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/fsdp2_cpu.py DIR
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from linattn_dsl.models import FAMILIES  # noqa: E402

VOCAB, SEQ, PER_PROCESS = 64, 16, 2


def make(family: str, shard: bool):
    torch.manual_seed(0)
    config_class, _, lm_class = FAMILIES[family]
    model = lm_class(config_class(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=VOCAB))
    if shard:
        for block in model.model.layers:
            fully_shard(block, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    return loss.detach()


def mean_over_processes(x: torch.Tensor) -> float:
    x = x.clone()
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    folder = Path(sys.argv[1])
    family = sys.argv[2] if len(sys.argv) > 2 else "gla"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (world * PER_PROCESS, SEQ), generator=gen) for _ in range(2)]
    mine = [b[rank * PER_PROCESS:(rank + 1) * PER_PROCESS] for b in batches]

    ref, ref_opt = make(family, shard=False)
    model, opt = make(family, shard=True)
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    ref_loss1 = step(ref, ref_opt, batches[0])
    loss1 = mean_over_processes(step(model, opt, mine[0]))
    grads = max(rel(p.grad.full_tensor(), q.grad) for p, q in zip(model.parameters(), ref.parameters()))
    for o in (opt, ref_opt):
        o.zero_grad(set_to_none=True)

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    ref_loss2 = step(ref, ref_opt, batches[1])
    loss2 = mean_over_processes(step(model, opt, mine[1]))

    fresh, fresh_opt = make(family, shard=True)
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed2 = mean_over_processes(step(fresh, fresh_opt, mine[1]))

    full = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dist.barrier()
    if rank == 0:
        ref_sd = ref.state_dict()
        print(json.dumps({
            "sharded": sharded, "world": world,
            "loss1": loss1, "ref_loss1": float(ref_loss1), "grads_rel": grads,
            "loss2": loss2, "ref_loss2": float(ref_loss2), "resumed_loss2": resumed2,
            "state_rel": max(rel(full[k], ref_sd[k]) for k in ref_sd),
            "same_keys": sorted(full) == sorted(ref_sd),
            "files": sorted(p.name for p in folder.iterdir()),
        }))
    # as linattn_dsl.train.trainer._let_collectives_finish: Gloo's workers drop the last collective's work
    # (which needs the GIL) before the group's destructor joins them with the GIL held
    dist.barrier()
    time.sleep(0.5)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
