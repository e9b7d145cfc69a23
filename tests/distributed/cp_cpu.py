"""Worker of tests/test_cp_models.py::test_training_step_split_equals_unsplit, run by torch.distributed.run on CPU
processes (gloo): context parallelism through the models.

For tiny models (2 layers, hidden 32) of a spec family with short convs (GLA), the families with token shifts (RWKV7,
RWKV6), two hybrids with an attention layer (RetNet, whose own layers use RoPE too; Mamba2, with short convs and
sliding-window attention) and Mamba, and for four layouts (packed documents, one crossing the rank boundary with
fewer tokens before it than the conv's halo; packed documents, one starting at a rank's first token; two rows without
packing; two rows of fewer tokens a rank than the conv's halo):
one training step with the sequence split over the processes (``cp_context``; each process its slice of the tokens
and labels, the gradients summed over the processes) against the unsplit step on the whole batch: the loss (the sum
of the processes' shares), every parameter's gradient, and every parameter after an AdamW step. Rank 0 prints one
JSON line: per case, the largest difference relative to the reference's largest entry.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/cp_cpu.py
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from linattn_dsl.distributed import cp_context  # noqa: E402
from linattn_dsl.models import FAMILIES  # noqa: E402

VOCAB = 64
# AdamW's first step moves an element by about lr * g / (|g| + eps): with the default eps (1e-8) an element whose
# gradient is near zero moves by up to lr on the gradient's rounding (the split sums it in another order); this eps
# keeps such an element's step proportional to its gradient, so the parameters after the step agree as closely
EPS = 1e-3
MODELS = {
    "gla_short_conv": ("gla", {"use_short_conv": True}),
    "rwkv7": ("rwkv7", {"head_dim": 16, "decay_low_rank_dim": 8, "gate_low_rank_dim": 8, "a_low_rank_dim": 8,
                        "v_low_rank_dim": 8}),
    "retnet_attention": ("retnet", {"attn": {"layers": [1], "num_heads": 2}}),
    "mamba2_window_attention": ("mamba2", {"num_heads": None, "head_dim": 16, "state_size": 16,
                                           "attn": {"layers": [0], "num_heads": 2, "window_size": 8}}),
    "rwkv6": ("rwkv6", {"proj_low_rank_dim": 8, "gate_low_rank_dim": 8}),
    "mamba": ("mamba", {"state_size": 8}),
}
LAYOUTS = {   # (tokens per row of the whole batch, global packing of one row or None: 2 rows), over 2 ranks
    "crossing": (48, [0, 7, 22, 26, 48]),      # 22..26 crosses with 2 tokens before, fewer than the conv's halo
    "at_boundary": (48, [0, 10, 24, 33, 48]),  # 24..33 starts at rank 1's first token
    "rows": (48, None),
    "short_rows": (4, None),                   # 2 tokens a rank: the conv's halo (3) reaches back 2 ranks' worth
}


def make(family: str, extra: dict):
    torch.manual_seed(0)
    config_class, _, lm_class = FAMILIES[family]
    config = config_class(**{"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": VOCAB, **extra})
    model = lm_class(config)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=EPS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def case(family: str, extra: dict, tokens: int, cu: list | None, rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    rows = 1 if cu is not None else 2
    ids = torch.randint(0, VOCAB, (rows, tokens), generator=gen)
    n = tokens // world

    ref, ref_opt = make(family, extra)
    packed = {} if cu is None else {"cu_seqlens": torch.tensor(cu)}
    ref_loss = ref(input_ids=ids, labels=ids, use_cache=False, **packed).loss
    ref_loss.backward()
    ref_loss = ref_loss.detach()

    model, opt = make(family, extra)
    ctx = cp_context(None, cu)
    mine = ids[:, rank * n:(rank + 1) * n]
    loss = model(input_ids=mine, labels=mine, use_cache=False, cp_context=ctx).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    for p in model.parameters():   # what DDP over the group does, as a sum
        dist.all_reduce(p.grad)
    named = dict(ref.named_parameters())
    grads = {name: rel(p.grad, named[name].grad) for name, p in model.named_parameters()}
    ref_opt.step()
    opt.step()
    params = max(rel(p.detach(), named[name].detach()) for name, p in model.named_parameters())
    worst = max(grads, key=grads.get)
    return {"loss": float(total), "ref_loss": float(ref_loss), "grads_rel": grads[worst], "worst_grad": worst,
            "params_rel": params, "no_grad": [k for k, p in model.named_parameters() if p.grad is None]}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sys.argv[1:] or list(MODELS)
    out = {}
    for name in names:
        family, extra = MODELS[name]
        for layout, (tokens, cu) in LAYOUTS.items():
            out[f"{name}/{layout}"] = case(family, extra, tokens, cu, rank, world)
    dist.barrier()
    if rank == 0:
        print(json.dumps({"world": world, "cases": out}))
    # as linattn_dsl.train.trainer._let_collectives_finish: Gloo's workers drop the last collective's work
    # (which needs the GIL) before the group's destructor joins them with the GIL held
    dist.barrier()
    time.sleep(0.5)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
