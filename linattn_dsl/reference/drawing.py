"""Drawing inputs for a spec and comparing a backend against the oracle (tests and `linattn verify`).

Inputs are drawn by the role they play, so that every spec's recurrence stays well conditioned:
log-decays in ``[log_decay_min, 0]`` per step, delta-rule keys of unit norm and beta in (0, 1),
general-transition ``a = -kk``, ``b = kk * U(0, 1)`` (RWKV7's parametrisation, ``|I + b a^T| <= 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import reference
from ..compiler.spec import Recurrence


@dataclass
class Case:
    """One drawn op call: tensors by input name, switches and the op's keyword arguments."""

    spec: Recurrence
    tensors: dict
    switches: dict
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    output_final_state: bool = True
    scale: float | None = None
    note: dict = field(default_factory=dict)
    substeps: int = 1   # rows per token of a sub-step spec's sub-step inputs

    def call(self, op, tensors=None, initial_state=None):
        t = self.tensors if tensors is None else tensors
        pos = [t[n] for n in self.spec.inputs]
        kw = {n: t[n] for n in self.spec.optional if t.get(n) is not None}
        kw.update(self.switches)
        if self.spec.substeps is not None:
            kw[self.spec.substeps.count] = self.substeps
        return op(*pos, scale=self.scale, initial_state=self.initial_state if initial_state is None else initial_state,
                  output_final_state=self.output_final_state, cu_seqlens=self.cu_seqlens, **kw)


    def tokens(self, a: int, b: int) -> dict:
        """The tensors of tokens a..b (a sub-step input's rows a * n .. b * n)."""
        sub = self.spec.substeps.inputs if self.spec.substeps else ()
        n = self.substeps
        return {k: (x if x is None or self.spec.dims(k)[:2] != ("B", "T") else
                    x[:, a * n:b * n] if k in sub else x[:, a:b]) for k, x in self.tensors.items()}


def _plain_symbol(e):
    return e.name if e is not None and e.is_Symbol else None


def draw_case(spec: Recurrence, *, B: int = 2, T: int = 33, heads: int = 2, groups: int | None = None,
              K: int = 8, V: int = 8, seqlens: list[int] | None = None, with_initial_state: bool = True,
              optional_present: bool = True, switches: dict | None = None, log_decay_min: float = -5.0,
              dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, substeps: int = 2) -> Case:
    """Draw one well-conditioned call of ``spec``. ``seqlens`` packs sequences (B becomes 1). A sub-step spec's
    sub-step inputs get ``substeps`` rows per token."""
    gen = torch.Generator().manual_seed(seed)
    sw = spec.switch_values(**(switches or {}))
    roles = spec.resolve(sw)
    hd = spec.head_dims
    groups = groups or heads
    if heads % groups:
        raise ValueError(f"groups={groups} must divide heads={heads}")
    if seqlens is not None:
        B, T = 1, sum(seqlens)
    sizes = {"B": B, "T": T, hd["H"]: heads, hd["HQ"]: groups if hd["HQ"] != hd["H"] else heads,
             hd["K"]: K, hd["V"]: V}
    for d, r in spec.dim_roles.items():   # other symbols (e.g. a parameter's own feature dim)
        sizes.setdefault(d, heads if r == "head" else K)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    plain = {role: _plain_symbol(e) for role, e in roles.items()}
    delta = spec.transition.kind == "delta"
    tensors = {}
    kk = None
    for n, arg in spec.args.items():
        if n in spec.optional and (not optional_present or n not in spec.uses(sw)):
            tensors[n] = None   # absent, or meaningless under these switches (the ops refuse it)
            continue
        shape = [sizes[d] for d in spec.dims(n)]
        if spec.substeps is not None and n in spec.substeps.inputs:
            shape[1] *= substeps
        if n == plain.get("log_decay") or arg.sign in ("nonpositive", "negative"):
            x = torch.rand(shape, generator=gen, dtype=torch.float64) * log_decay_min
            if n != plain.get("log_decay"):
                x = x / 5.0   # a factor of a gate expression, e.g. Mamba2's A
        elif arg.sign in ("nonnegative", "positive"):
            x = torch.rand(shape, generator=gen, dtype=torch.float64)
        elif n == plain.get("beta"):
            x = torch.rand(shape, generator=gen, dtype=torch.float64)
        elif roles.normalize and n in (plain.get("key"), plain.get("query")):
            x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1   # positive features: q^T z > 0
        elif n in (plain.get("key"),) and delta and not roles.qk_l2norm:
            x = unit(randn(shape))
        elif n == plain.get("a"):
            kk = unit(randn(shape))
            x = -kk
        elif n == plain.get("b"):
            x = None    # filled below from kk
        elif n in (plain.get("key"), plain.get("query")) and spec.transition.kind == "general":
            x = randn(shape) / (shape[-1] ** 0.5)
        else:
            x = randn(shape) * (0.5 if len(shape) < 3 else 1.0)
        tensors[n] = x
    if "b" in plain and plain["b"] is not None and tensors.get(plain["b"], 0) is None:
        shape = [sizes[d] for d in spec.dims(plain["b"])]
        base = kk if kk is not None and list(kk.shape) == shape else unit(randn(shape))
        tensors[plain["b"]] = base * torch.rand(shape, generator=gen, dtype=torch.float64)
    for n, x in tensors.items():
        if x is None and n in spec.inputs:
            tensors[n] = randn([sizes[d] for d in spec.dims(n)]) * 0.1
    tensors = {n: (x.to(dtype=dtype, device=device) if x is not None else None) for n, x in tensors.items()}
    num_seqs = B if seqlens is None else len(seqlens)
    h0 = None
    if with_initial_state:   # with the normalised output, the last column is z (a sum of positive keys)
        h0 = randn([num_seqs, heads, K, V + int(roles.normalize)]) * 0.5
        if roles.normalize:
            h0[..., -1] = h0[..., -1].abs() * 4
        h0 = h0.to(device=device, dtype=torch.float32)
    cu = None if seqlens is None else torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()),
                                                   dtype=torch.long, device=device)
    return Case(spec, tensors, sw, h0, cu, note=dict(B=B, T=T, H=heads, HQ=sizes[hd["HQ"]], K=K, V=V,
                                                     seqlens=seqlens),
                substeps=substeps if spec.substeps is not None else 1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(max |ref|, 1e-2): relative, but absolute for gradients that are (nearly) zero."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-2)) if ref.numel() else 0.0


def not_reproduced(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors differ in any bit between two runs of the same computation. The kernels use no
    atomics, so a run is a pure function of its inputs: a difference is a race (on an H200, a sum formed inside
    a pipelined loop from the tiles its products read once gave RWKV7's da 2e-1 apart between two bf16 runs)."""
    return [k for k in first if not torch.equal(first[k], second[k])]


def compare(case: Case, op, *, grads: bool = True, op_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Relative errors of ``op`` against the float64 oracle: output, final state and, with ``grads``,
    the gradient of every floating input and of the initial state."""
    spec = case.spec

    def leafs(dtype):
        t = {n: (x.detach().to(dtype).requires_grad_(grads) if x is not None else None)
             for n, x in case.tensors.items()}
        h0 = None if case.initial_state is None else case.initial_state.detach().clone().requires_grad_(grads)
        return t, h0

    ref_t, ref_h0 = leafs(torch.float64)
    ref_h0 = None if ref_h0 is None else ref_h0.detach().double().requires_grad_(grads)
    o_ref, s_ref = case.call(lambda *a, **kw: reference.run(spec, *a, dtype=torch.float64, **kw), ref_t, ref_h0)

    op_t, op_h0 = leafs(op_dtype or next(x.dtype for x in case.tensors.values() if x is not None))
    o, s = case.call(op, op_t, op_h0)
    errs = {"o": rel_err(o, o_ref), "final_state": rel_err(s, s_ref)}
    if grads:
        gen = torch.Generator().manual_seed(1234)
        do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).to(o_ref.device)
        ds = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64).to(s_ref.device)
        ((o_ref.double() * do).sum() + (s_ref * ds).sum()).backward()
        ((o.double() * do.to(o.device)).sum() + (s.double() * ds.to(s.device)).sum()).backward()
        for n in ref_t:
            if ref_t[n] is None:
                continue
            g_ref, g = ref_t[n].grad, op_t[n].grad
            if g_ref is None and g is None:   # an input the call does not use
                continue
            if g_ref is None:
                g_ref = torch.zeros_like(ref_t[n])
            errs[f"d{n}"] = float("inf") if g is None else rel_err(g, g_ref)
        if ref_h0 is not None:
            errs["dinitial_state"] = float("inf") if op_h0.grad is None else rel_err(op_h0.grad, ref_h0.grad)
    return errs
