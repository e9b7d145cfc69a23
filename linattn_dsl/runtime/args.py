"""Binding and validating an op's arguments against its spec, before anything is launched.

Every check raises ``ValueError`` naming the argument, what it got and what it expects. The policy, the
same on every backend:

* shapes: every input has its declared rank, shape symbols agree, heads group evenly, head dims tile;
* dtypes: the per-token inputs (those with the B and T dims) share one floating dtype; per-head
  parameters (no B, T dims: Mamba2's ``A``, ``D``, ``dt_bias``, KDA's ``A_log``) may be float32 beside
  them, as mixed-precision training passes them, or have their dtype; the initial state likewise
  (float32, the kernels' state type, or the per-token dtype);
* an optional input that the resolved roles do not read under the given switches is an error, not
  silently ignored (KDA's ``A_log`` without ``use_gate_in_kernel``);
* ``scale`` is a finite number > 0; ``cu_seqlens`` packs non-empty sequences into B == 1;
* with ``LINATTN_CHECK_INPUTS=1`` in the environment, inputs whose declared sign the spec relies on
  (GLA's log-decay ``g <= 0``, Mamba2's ``A <= 0``) are checked too (one device sync per call).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

BATCH, TIME = "B", "T"   # the batch and time dims every spec names so

# Head dims the generated kernels tile (one block of the key / value dim per program).
MAX_HEAD_DIM = 256

# The debug switch of the sign contracts: off by default, because checking costs a device sync.
CHECK_ENV = "LINATTN_CHECK_INPUTS"

# A sign's violation, on the finite values only: -inf is a legal log-decay (a reset) and a NaN is the
# caller's to see, not a sign to enforce.
_VIOLATES = {
    "nonpositive": ("<= 0", lambda t: t > 0),
    "negative": ("< 0", lambda t: t >= 0),
    "nonnegative": (">= 0", lambda t: t < 0),
    "positive": ("> 0", lambda t: t <= 0),
}


@dataclass(frozen=True)
class Signature:
    """What the binder knows of a spec: plain data, decided at ``linattn regen`` and emitted into the generated
    module (``SIGNATURE``); the oracle builds one from a spec the same way (``compiler.lowering.signature_fields``).

    ``args``: every tensor input's dims, in the op's argument order (required first); ``uses``: per switch
    setting (sorted items), the inputs the roles read; ``signs``: per switch setting and tuple of present optional
    inputs, the inputs whose declared sign the roles rely on."""

    name: str
    args: dict
    required: tuple
    switches: dict
    head_dims: dict
    query: str
    value_input: str
    scale: float | None
    decay: str
    form: str
    uses: dict
    signs: dict
    normalize: bool | str = False   # True or a switch: the normalised output (state [K, V + 1])
    substeps: tuple = ()             # inputs with several rows per token (runtime.substeps)
    substep_count: str | None = None
    decay_input: str | None = None   # the per-token log-decay input of a sub-step or read-before spec
    read: str = "after"               # "before": the output reads the state before the token's update
    bonus: str | None = None          # with read "before": the current token's per-channel bonus input
    key_input: str | None = None      # with read "before": the key input

    @property
    def inputs(self) -> tuple:
        return self.required

    @property
    def optional(self) -> tuple:
        return tuple(n for n in self.args if n not in self.required)

    def dims(self, name: str) -> tuple:
        return tuple(self.args[name])

    def variants(self):
        """Every combination of switch values, as dicts."""
        return [dict(k) for k in self.uses]

    def key(self, switches: dict) -> tuple:
        return tuple(sorted(switches.items()))

    def reads(self, switches: dict) -> tuple:
        return self.uses[self.key(switches)]

    def normalizes(self, switches: dict) -> bool:
        """Whether a call with these switch values has the normalised output (its state one column wider)."""
        return self.normalize if isinstance(self.normalize, bool) else bool(switches[self.normalize])

    def sign_contracts(self, switches: dict, present: frozenset) -> dict:
        return self.signs[(self.key(switches), tuple(n for n in self.optional if n in present))]


@dataclass
class Bound:
    """An op call with its arguments checked: tensors by input name (absent optionals are None),
    switch values, sizes of every shape symbol, the resolved scale and the state arguments."""

    spec: Signature
    tensors: dict
    switches: dict
    sizes: dict
    scale: float
    initial_state: torch.Tensor | None
    output_final_state: bool
    cu_seqlens: torch.Tensor | None
    cp: object = None   # a split call (runtime.cp): (CPContext, steps per token); None for a local call

    @property
    def num_seqs(self) -> int:
        if self.cp is not None:
            return self.cp[0].num_seqs(self.sizes["B"])
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


def bind(spec: Signature, tensors: dict, switches: dict | None = None, scale: float | None = None,
         initial_state: torch.Tensor | None = None, output_final_state: bool = False,
         cu_seqlens: torch.Tensor | None = None, max_head_dim: int | None = None, cp_context=None,
         steps_per_token: int = 1, values: bool = True) -> Bound:
    """Check every argument of an op on ``spec``; return the :class:`Bound` call. With ``cp_context`` (a split
    call, runtime.cp) the initial state has a row per sequence of the context's global packing. ``values=False``
    skips the checks that read tensor values (the ``cu_seqlens`` offsets, the sign contracts): the binding of
    tensors without data (the fake implementation of runtime.library's custom ops), whose real call checks them."""
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
    _check_dtypes(spec, tensors)
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
    _check_used(spec, tensors, sw)
    if scale is None:
        scale = spec.scale if spec.scale is not None else sizes[hd["K"]] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) \
            or not scale > 0:
        raise ValueError(f"scale: expected a positive number (finite) or None (meaning K ** -0.5), got {scale!r}")
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
        if values:
            _check_offsets(cu_seqlens.tolist(), sizes["T"])
    n = sizes["B"] if cu_seqlens is None else cu_seqlens.numel() - 1
    if cp_context is not None:
        from .cp import check_type

        check_type(cp_context)   # before the state's rows, which it counts
        n = cp_context.num_seqs(sizes["B"])
    if initial_state is not None:
        wide = spec.normalizes(sw)   # the normaliser z as one more value column
        want = (n, H, sizes[hd["K"]], sizes[hd["V"]] + int(wide))
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = _fmt(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state: expected shape [N, H, K, V{' + 1' if wide else ''}] = {_fmt(want)}, "
                             f"got {got}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state: expected a floating-point tensor, got {initial_state.dtype}")
        act = _token_dtype(spec, tensors)
        if initial_state.dtype not in (torch.float32, act):
            also = "" if act == torch.float32 else f" or the per-token inputs' {act}"
            raise ValueError(f"initial_state: expected dtype torch.float32 (the kernels' state type){also}, got "
                             f"{initial_state.dtype}")
        if initial_state.device != dev:
            raise ValueError(f"initial_state: is on {initial_state.device} but the inputs are on {dev}")
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state: expected True or False, got {output_final_state!r}")
    bound = Bound(spec, {n_: tensors.get(n_) for n_ in spec.args}, sw, sizes, float(scale), initial_state,
                  output_final_state, cu_seqlens)
    if cp_context is not None:
        from . import cp

        bound.cp = (cp_context, cp.check(bound, cp_context, cu_seqlens, steps_per_token))
    if values and os.environ.get(CHECK_ENV) == "1":
        check_signs(bound)
    return bound


def _check_offsets(c: list, T: int) -> None:
    """``cu_seqlens``' values: strictly increasing offsets from 0 to T."""
    if T == 0:
        raise ValueError(f"cu_seqlens: T = 0 leaves nothing to pack (every packed sequence needs at least one "
                         f"token), got {c if len(c) <= 12 else c[:6] + ['...'] + c[-6:]}; pass cu_seqlens=None")
    if c[0] != 0 or c[-1] != T or any(b <= a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0 to T = {T}, "
                         f"got {c if len(c) <= 12 else c[:6] + ['...'] + c[-6:]}")


def _token_dtype(spec: Signature, tensors: dict) -> torch.dtype:
    """The dtype of the per-token inputs (checked to be one by :func:`_check_dtypes`)."""
    return next(tensors[n].dtype for n in spec.args if spec.dims(n)[:2] == (BATCH, TIME) and tensors.get(n) is not None)


def _check_dtypes(spec: Signature, tensors: dict) -> None:
    """One dtype for the per-token inputs; per-head parameters in float32 or that dtype."""
    given = [n for n in spec.args if tensors.get(n) is not None]
    token = [n for n in given if spec.dims(n)[:2] == (BATCH, TIME)]
    act = tensors[token[0]].dtype
    for n in token[1:]:
        if tensors[n].dtype != act:
            listed = ", ".join(f"{m} {tensors[m].dtype}" for m in token)
            raise ValueError(f"{n}: has dtype {tensors[n].dtype} but {token[0]} has {act}; the per-token inputs "
                             f"of {spec.name} must share one dtype, got {listed}")
    for n in given:
        if n not in token and tensors[n].dtype not in (torch.float32, act):
            want = "torch.float32" + ("" if act == torch.float32 else f" or the per-token inputs' {act}")
            raise ValueError(f"{n}: a per-head parameter of {spec.name} must be {want} (the dtype of "
                             f"{token[0]}), got {tensors[n].dtype}")


def _check_used(spec: Signature, tensors: dict, sw: dict) -> None:
    """An optional input passed while the roles under the given switches do not read it is an error
    (it would be silently ignored)."""
    used = spec.reads(sw)
    for n in spec.optional:
        if tensors.get(n) is None or n in used:
            continue
        # the nearest switch settings under which the input is read, to say what the caller may have meant
        alts = [v for v in spec.variants() if n in spec.reads(v)]
        if not alts:
            raise ValueError(f"{n}: passed, but {spec.name} reads it under no setting of its switches; pass {n}=None")
        best = min(alts, key=lambda v: sum(v[k] != sw[k] for k in v))
        diff = sorted(k for k in best if best[k] != sw[k])
        now = ", ".join(f"{k}={sw[k]}" for k in diff)
        fix = ", ".join(f"{k}={best[k]}" for k in diff)
        raise ValueError(f"{n}: passed, but {spec.name} does not use it with {now}; pass {n}=None, or {fix} "
                         "to use it")


def check_signs(bound: Bound) -> None:
    """The sign contracts of a call (``LINATTN_CHECK_INPUTS=1``): every input whose declared sign the
    spec's roles rely on under the call's switches (GLA's ``g <= 0``), checked on its finite values, with
    one device sync for all of them. Roles whose sign the spec proves (``-softplus(x)``, KDA's in-kernel
    gate) read inputs of any sign and are never checked."""
    contracts = bound.spec.sign_contracts(bound.switches, bound.present)
    names = [n for n in contracts if bound.tensors[n] is not None]
    if not names:
        return
    bad = []
    for n in names:
        t = bound.tensors[n].detach()
        bad.append((_VIOLATES[contracts[n]][1](t) & torch.isfinite(t)).any())
    flags = torch.stack(bad).tolist()   # the one sync
    for n, flag in zip(names, flags):
        if flag:
            t = bound.tensors[n].detach()
            want, violates = _VIOLATES[contracts[n]]
            mask = violates(t) & torch.isfinite(t)
            idx = tuple(int(i) for i in mask.nonzero()[0])
            raise ValueError(f"{n}: must be {want} ({bound.spec.name} declares it {contracts[n]} and relies on "
                             f"it), got {float(t[idx])!r} at index {idx}, {int(mask.sum())} such value(s) in all "
                             f"(checked because {CHECK_ENV}=1)")
