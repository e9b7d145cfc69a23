"""What a training forward keeps for the backward, per token and layer, by origin (CPU, exact).

Builds a small model of each family at the ~340M shapes (hidden 1024, the head layout of
``benchmarks/models.py``'s 340m configs, vocab 32000, ``num_hidden_layers`` 2 by default), runs one
training forward with labels (the fused linear cross-entropy) under
``torch.autograd.graph.saved_tensors_hooks`` and records every tensor saved for the backward: dtype, shape,
the bytes of its storage, the module that saved it and the function that called ``save_for_backward`` (or
the autograd op). Tensors sharing a storage count once (the first saver gets the bytes). Parameters are left
out (they are held anyway); casts of parameters are counted. Tensors a custom autograd Function keeps as
``ctx`` attributes (the fused loss keeps its gradients so) are found by walking the graph from the loss.

Run the ops as they run on the GPU: ``TRITON_INTERPRET=1`` makes the Triton kernels and their hosts run on
the CPU (without it the PyTorch twins run, which keep different things)::

    TRITON_INTERPRET=1 PYTHONPATH=. python -m benchmarks.memory                     # every family, T=128
    TRITON_INTERPRET=1 PYTHONPATH=. python -m benchmarks.memory --families gla --seq 128 256 --json out.json

With two ``--seq`` lengths the bytes of each origin are split into a per-token slope and a constant part
(casts of weights, per-sequence states); with one, everything is divided by the tokens. A layer's bytes are
the last layer's (layer 0 of RWKV7 makes ``v_first``, which later layers read). GPU peak estimate for the
~340M step: per-token-per-layer bytes x 8 x 2048 tokens x 24 layers (the loss row once, not per layer).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks import models as bm

FAMILIES = ("gla", "retnet", "delta_net", "kda", "rwkv7", "gated_deltanet", "mamba2")

# the 340m family layouts of benchmarks/models.py, plus gated_deltanet (FLA's 340M config, heads of 256)
FAMILY_KWARGS = {**bm.FAMILY_KWARGS["340m"], "gated_deltanet": dict(num_heads=4)}

ORIGINS = ("block norms", "projection inputs", "conv", "gates/derived", "op inputs", "op internals", "output norm/gate",
           "mlp", "residual", "embedding", "loss", "other")


@dataclass
class Saved:
    key: int                      # storage pointer
    nbytes: int                   # storage bytes
    dtype: str
    shape: tuple
    module: str                   # innermost module path that was running
    where: str                    # the saving function (file:function), or the autograd node
    layer: int | None             # index of model.layers.<i>, None outside the blocks
    savers: list = field(default_factory=list)   # later savers of the same storage


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _caller() -> str:
    """The innermost frame outside torch and this file: who saved."""
    frame = sys._getframe(2)
    this = os.path.abspath(__file__)
    while frame is not None:
        path = frame.f_code.co_filename
        if os.path.abspath(path) != this and f"{os.sep}torch{os.sep}" not in path:
            parts = path.split(os.sep)
            short = os.sep.join(parts[parts.index("linattn_dsl") + 1:]) if "linattn_dsl" in parts else parts[-1]
            return f"{short}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class Recorder:
    """Records saved tensors (``saved_tensors_hooks``) and the running module path (forward hooks)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {_storage(p)[0] for p in model.parameters()}
        self.stack: list[str] = []
        self.saved: dict[int, Saved] = {}
        self.handles = []
        self.logsigmoid_input = None
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: self.stack.append(n)))
            self.handles.append(m.register_forward_hook(self._leave))

    def _leave(self, module, args, out) -> None:
        self.stack.pop()

    def close(self):
        for h in self.handles:
            h.remove()

    def _layer(self, module: str) -> int | None:
        parts = module.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            return int(parts[parts.index("layers") + 1])
        return None

    def record(self, t: torch.Tensor, where: str | None = None) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key, nbytes = _storage(t)
        if key in self.params or nbytes == 0:
            return
        module = self.stack[-1] if self.stack else ""
        where = where or _caller()
        if key in self.saved:
            self.saved[key].savers.append(f"{module} {where}")
            return
        self.saved[key] = Saved(key, nbytes, str(t.dtype).replace("torch.", ""), tuple(t.shape), module, where,
                                self._layer(module))

    def pack(self, t):
        if self.logsigmoid_input is not None and _storage(t)[0] != self.logsigmoid_input:
            return t   # log_sigmoid's buffer: CPU-only (empty on CUDA), left out
        self.record(t)
        return t

    def logsigmoid(self, original):
        """``F.logsigmoid`` that marks its call: its CPU backward keeps a buffer of the input's size, which on
        CUDA is empty."""
        def wrapped(x):
            self.logsigmoid_input = _storage(x)[0]
            try:
                return original(x)
            finally:
                self.logsigmoid_input = None
        return wrapped

    def ctx_attributes(self, root: torch.Tensor) -> None:
        """Tensors custom Functions keep as ctx attributes (outside save_for_backward), walking the graph."""
        seen, todo = set(), [root.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
            if not hasattr(node, "__dict__"):
                continue
            for name, value in vars(node).items():
                values = value if isinstance(value, (tuple, list)) else (value,)
                for v in values:
                    if isinstance(v, torch.Tensor):
                        self.record(v, f"ctx.{name} of {type(node).__name__}")


def origin(s: Saved) -> str:
    """The account's group of a saved tensor, from its module path and saver."""
    m, w = s.module, s.where
    leaf = m.split(".")[-1]
    if "linear_cross_entropy" in w or "LinearCrossEntropy" in w or leaf == "lm_head":
        return "loss"
    if m.endswith("embeddings"):
        return "embedding"
    if leaf in ("attn_norm", "mlp_norm", "pre_norm") or m == "model.norm":
        return "residual" if "residual" in w else "block norms"
    if ".mlp" in m or m.endswith("mlp"):
        return "mlp"
    if "conv1d" in leaf or "conv" in w:
        return "conv"
    if "runtime" in w or "generated" in w or "ChunkFunction" in w:
        return "op internals" if s.layer is not None and "ctx." not in w and _is_internal(s) else "op inputs"
    if leaf in ("g_norm", "norm", "o_norm") or "FusedRMSNormGated" in w:
        return "output norm/gate"
    if leaf.endswith("_proj") or leaf in ("up", "down") or leaf.endswith("lora"):
        return "projection inputs"
    if ".mixer" in m:
        return "gates/derived"
    return "other"


_INTERNAL: set[int] = set()   # storages the op made (not its inputs): filled by run()


def _is_internal(s: Saved) -> bool:
    return s.key in _INTERNAL


def build(family: str, layers: int, vocab: int, dtype: torch.dtype, config: dict | None = None):
    """``family``'s causal LM: the 340m layout at hidden 1024, or ``config`` (its config's keyword arguments)."""
    from linattn_dsl.models import FAMILIES as OURS

    config_class, _, lm_class = OURS[family]
    kwargs = dict(hidden_size=1024, **FAMILY_KWARGS[family]) if config is None else config
    config = config_class(num_hidden_layers=layers, vocab_size=vocab, **kwargs)
    torch.manual_seed(0)
    return lm_class(config).to(dtype).train()


def run(family: str, seq: int, batch: int = 1, layers: int = 2, vocab: int = 32000,
        dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> list[Saved]:
    """The saved tensors of one training forward (with the loss) of ``family``'s model (``config``: see
    :func:`build`)."""
    from linattn_dsl.runtime import host

    model = build(family, layers, vocab, dtype, config)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    rec = Recorder(model)
    # the op's own saved tensors (what ChunkFunction's forward made) vs its inputs
    original = host.ChunkFunction.forward

    def forward(ctx, form, mod, gate, L, scale, store_final, recurrent, for_bwd, n, *args):
        inputs = {_storage(a)[0] for a in args if isinstance(a, torch.Tensor)}
        real_save = ctx.save_for_backward

        def save(*tensors):
            for t in tensors:
                if isinstance(t, torch.Tensor) and _storage(t)[0] not in inputs:
                    _INTERNAL.add(_storage(t)[0])
            return real_save(*tensors)

        ctx.save_for_backward = save
        return original(ctx, form, mod, gate, L, scale, store_final, recurrent, for_bwd, n, *args)

    host.ChunkFunction.forward = staticmethod(forward)
    import torch.nn.functional as F

    from linattn_dsl.layers import spec_layer

    logsigmoid = F.logsigmoid
    F.logsigmoid = spec_layer._TRANSFORMS["logsigmoid"] = rec.logsigmoid(logsigmoid)
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        rec.ctx_attributes(loss)
    finally:
        F.logsigmoid = spec_layer._TRANSFORMS["logsigmoid"] = logsigmoid
        host.ChunkFunction.forward = staticmethod(original)
        rec.close()
    return list(rec.saved.values())


def summarize(records: dict[int, list[Saved]], layers: int) -> dict:
    """Per origin: bytes per token per layer (the last layer's), and the loss/embedding/other bytes per token;
    with two lengths a slope and a constant."""
    seqs = sorted(records)
    table = {}
    for T in seqs:
        per = collections.defaultdict(int)
        for s in records[T]:
            o = origin(s)
            if s.layer is None or o in ("loss", "embedding"):
                per[("model", o)] += s.nbytes
            elif s.layer == layers - 1:
                per[("layer", o)] += s.nbytes
        table[T] = per
    keys = sorted(set().union(*[set(t) for t in table.values()]))
    out = {}
    for k in keys:
        if len(seqs) == 1:
            T = seqs[0]
            out["/".join(k)] = dict(per_token=table[T][k] / T, constant=0.0)
        else:
            a, b = seqs[0], seqs[-1]
            slope = (table[b][k] - table[a][k]) / (b - a)
            out["/".join(k)] = dict(per_token=slope, constant=table[a][k] - slope * a)
    return out


def detail(saved: list[Saved], layer: int) -> list[str]:
    rows = []
    for s in sorted(saved, key=lambda s: (s.layer is None, s.layer != layer, origin(s), -s.nbytes)):
        if s.layer not in (None, layer):
            continue
        extra = f" (+{len(s.savers)} more: {s.savers[0]})" if s.savers else ""
        rows.append(f"  {origin(s):<18} {s.nbytes:>10} {s.dtype:<9} {str(list(s.shape)):<22} {s.module} | "
                    f"{s.where}{extra}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seq", type=int, nargs="+", default=[128])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--vocab", type=int, default=32000, help="a small vocab runs faster; the loss row then scales")
    p.add_argument("--detail", action="store_true", help="list every saved tensor of the last layer")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("note: TRITON_INTERPRET is not 1: the ops run their PyTorch twins, which keep other things")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {}
    tokens_step, n_layers = 8 * 2048, 24
    for family in args.families.split(","):
        records = {T: run(family, T, layers=args.layers, vocab=args.vocab, dtype=getattr(torch, args.dtype))
                   for T in args.seq}
        summary = summarize(records, args.layers)
        results[family] = summary
        layer_total = sum(v["per_token"] for k, v in summary.items() if k.startswith("layer/"))
        model_total = sum(v["per_token"] for k, v in summary.items() if k.startswith("model/"))
        print(f"\n== {family}: {layer_total:,.0f} B/token/layer, + {model_total:,.0f} B/token outside the layers; "
              f"~340M step estimate {(layer_total * n_layers + model_total) * tokens_step / 2**30:.2f} GiB")
        for k, v in sorted(summary.items(), key=lambda kv: -kv[1]["per_token"]):
            const = f"  + {v['constant']:,.0f} B constant" if abs(v["constant"]) > 0.5 else ""
            print(f"  {k:<28} {v['per_token']:>10,.1f} B/token{const}")
        if args.detail:
            print("\n".join(detail(records[args.seq[-1]], args.layers - 1)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
