"""Binding and validating an op's arguments against its spec, before anything is launched.

Every check raises ``ValueError`` naming the argument, what it got and what it expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import Recurrence

# Head dims the generated kernels tile (one block of the key / value dim per program).
MAX_HEAD_DIM = 256


@dataclass
class Bound:
    """An op call with its arguments checked: tensors by input name (absent optionals are None),
    switch values, sizes of every shape symbol, the resolved scale and the state arguments."""

    spec: Recurrence
    tensors: dict
    switches: dict
    sizes: dict
    scale: float
    initial_state: torch.Tensor | None
    output_final_state: bool
    cu_seqlens: torch.Tensor | None

    @property
    def num_seqs(self) -> int:
        return self.sizes["B"] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    @property
    def present(self) -> frozenset:
        return frozenset(n for n in self.spec.optional if self.tensors[n] is not None)

    def size(self, role: str) -> int:
        return self.sizes[self.spec.head_dims[role]]

    @property
    def out_dtype(self) -> torch.dtype:
        """``o`` has the dtype of the value input (the first [B, T, H, V] input of the value role)."""
        return self.tensors[self.spec.value_input].dtype

    @property
    def device(self) -> torch.device:
        return next(t for t in self.tensors.values() if t is not None).device


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def bind(spec: Recurrence, tensors: dict, switches: dict | None = None, scale: float | None = None,
         initial_state: torch.Tensor | None = None, output_final_state: bool = False,
         cu_seqlens: torch.Tensor | None = None, max_head_dim: int | None = None) -> Bound:
    """Check every argument of an op on ``spec``; return the :class:`Bound` call."""
    sizes: dict[str, int] = {}
    first_dev = None
    for name in spec.args:
        t = tensors.get(name)
        if t is None:
            if name in spec.inputs:
                raise ValueError(f"{name}: required input of {spec.name} is missing (None); expected a tensor "
                                 f"of shape [{', '.join(spec.dims(name))}]")
            continue
        dims = spec.dims(name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor of shape [{', '.join(dims)}], got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != len(dims):
            raise ValueError(f"{name}: expected {len(dims)} dims [{', '.join(dims)}], got shape {_fmt(t.shape)}")
        if first_dev is None:
            first_dev = (name, t.device)
        elif t.device != first_dev[1]:
            raise ValueError(f"{name}: is on {t.device} but {first_dev[0]} is on {first_dev[1]}; all tensors "
                             "must be on one device")
        for d, n in zip(dims, t.shape):
            if d in sizes and sizes[d] != n:
                expect = [sizes.get(x, x) for x in dims]
                raise ValueError(f"{name}: expected shape [{', '.join(dims)}] = {_fmt(expect)}, got "
                                 f"{_fmt(t.shape)} ({d} is {sizes[d]} from the earlier inputs)")
            sizes[d] = n
    hd = spec.head_dims
    H, HQ = sizes[hd["H"]], sizes[hd["HQ"]]
    if HQ == 0 or H % HQ != 0:
        raise ValueError(f"{spec.query}: its {HQ} heads must divide the {H} value heads (grouped heads)")
    if sizes["B"] == 0 or sizes[hd["K"]] == 0 or sizes[hd["V"]] == 0 or H == 0:
        raise ValueError(f"{spec.query}: empty batch, heads or head dim: sizes {sizes}")
    if max_head_dim is not None:
        for role in ("K", "V"):
            if sizes[hd[role]] > max_head_dim:
                raise ValueError(f"{spec.value_input if role == 'V' else spec.query}: head dim {hd[role]} = "
                                 f"{sizes[hd[role]]} exceeds {max_head_dim}, the largest the kernels tile")
    sw = dict(spec.switches)
    for k, v in (switches or {}).items():
        if k not in sw:
            raise ValueError(f"{k}: not a switch of {spec.name} (switches: {sorted(sw)})")
        if not isinstance(v, bool):
            raise ValueError(f"{k}: expected True or False, got {v!r}")
        sw[k] = v
    if scale is None:
        scale = spec.scale if spec.scale is not None else sizes[hd["K"]] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive number or None, got {scale!r}")
    dev = first_dev[1]
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens: expected an integer (Long) tensor [N+1], got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {_fmt(cu_seqlens.shape)}")
        if sizes["B"] != 1:
            raise ValueError(f"cu_seqlens: packed sequences need batch size B == 1, got B = {sizes['B']}")
        if cu_seqlens.device != dev:
            raise ValueError(f"cu_seqlens: is on {cu_seqlens.device} but the inputs are on {dev}")
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != sizes["T"] or any(b <= a for a, b in zip(c, c[1:])):
            raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to T = {sizes['T']}, "
                             f"got {c if len(c) <= 12 else c[:6] + ['...'] + c[-6:]}")
    n = sizes["B"] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        want = (n, H, sizes[hd["K"]], sizes[hd["V"]])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = _fmt(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state: expected shape [N, H, K, V] = {_fmt(want)}, got {got}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state: expected a floating-point tensor, got {initial_state.dtype}")
        if initial_state.device != dev:
            raise ValueError(f"initial_state: is on {initial_state.device} but the inputs are on {dev}")
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state: expected True or False, got {output_final_state!r}")
    return Bound(spec, {n_: tensors.get(n_) for n_ in spec.args}, sw, sizes, float(scale), initial_state,
                 output_final_state, cu_seqlens)
