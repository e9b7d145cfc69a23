"""Every generated op as a ``torch.library`` custom op, so that ``torch.compile`` traces a call as one graph node.

A generated module's op (``chunk_gla``) runs eagerly through ``runtime.run``; only while torch.compile traces it
(``torch.compiler.is_compiling()``, checked by ``runtime.call``) does the call go through :func:`traced` to the
module's custom op ``linattn::<spec>_<mode>``, made on the first such call. Its schema is the op's signature
without ``cp_context``: the spec's tensor inputs in ``Signature.args`` order (each ``Tensor?``, so that a missing
required input gets the binder's error), its switches as ``bool``, ``float? scale``, ``Tensor? initial_state``,
``bool output_final_state``, ``Tensor? cu_seqlens`` and, for a sub-step spec, the int sub-step count. It returns
``(o, final_state)``, the final state an empty tensor when not asked for (the op then returns None, as eagerly).

* the real implementation is the eager call (``runtime.run``): every check, backend and rewrite as eagerly;
* the fake one runs the same rewrites and binding on the tensors without data (``values=False``: the checks that
  read values, cu_seqlens' offsets and the sign contracts, wait for the real call) and makes the outputs of the
  bound call's shapes in place of the backend, so shapes follow from the same code as eagerly (grouped heads,
  the normalised call's widened value, sub-steps, read steps);
* the backward (``register_autograd``) is a second custom op, ``linattn::<spec>_<mode>_bwd``, that recomputes
  the forward eagerly with autograd on and takes ``torch.autograd.grad`` of it: the gradient of every input
  that needs one (each spec input and ``initial_state``). The forward saves only its inputs; the cost is one
  more forward pass per backward (the chunk forward, about a third of forward plus backward), as activation
  checkpointing of the op would. The backward op has no backward of its own (no double backward).

A split call (``cp_context``: an object argument, collectives inside) is not a custom op: under torch.compile it
runs eagerly outside the graph, through ``torch.compiler.disable`` (a graph break; with ``fullgraph=True``
torch.compile raises there).
"""

from __future__ import annotations

import torch

_OPS: dict = {}           # (module key, mode) -> (forward OpOverload, the module's Signature)
_OUTSIDE: list = []       # runtime.run wrapped by torch.compiler.disable, once made

NAMESPACE = "linattn"


def traced(mod, mode: str, tensors: dict, switches: dict, scale, initial_state, output_final_state, cu_seqlens,
           cp_context, steps):
    """The op call while torch.compile traces it: the module's custom op, or (a split call) the eager call
    outside the graph."""
    if cp_context is not None:
        _prepare_outside()
        return _OUTSIDE[0](mod, mode, tensors, switches, scale, initial_state, output_final_state, cu_seqlens,
                           cp_context, steps)
    _prepare(mod.key, mode)
    op, sig = _OPS[(mod.key, mode)]
    o, final_state = op(*_arguments(sig, tensors, switches, scale, initial_state, output_final_state, cu_seqlens,
                                    steps))
    return o, (final_state if output_final_state else None)


def custom_op(module, mode: str):
    """The custom op of a generated module (the module, or its ``_THIS``) for ``mode`` (``chunk`` or
    ``fused_recurrent``), made if not yet: for ``torch.library.opcheck`` and for calling it directly, with
    :func:`arguments`."""
    mod = getattr(module, "_THIS", module)
    _prepare(mod.key, mode)
    return _OPS[(mod.key, mode)][0]


def arguments(module, tensors: dict, switches: dict | None = None, scale=None, initial_state=None,
              output_final_state=False, cu_seqlens=None, steps=None) -> list:
    """An op call's positional arguments of its custom op (:func:`custom_op`); switches not given take their
    default."""
    sig = getattr(module, "_THIS", module).SIGNATURE
    switches = {**sig.switches, **(switches or {})}
    return _arguments(sig, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, steps)


def _arguments(sig, tensors, switches, scale, initial_state, output_final_state, cu_seqlens, steps) -> list:
    args = [tensors.get(n) for n in sig.args] + [switches[n] for n in sig.switches]
    args += [scale, initial_state, output_final_state, cu_seqlens]
    if sig.substeps:
        args.append(steps)
    return args


@torch.compiler.assume_constant_result
def _prepare_outside() -> bool:
    # run at trace time, not traced: the disabled wrapper is made outside the graph, once
    if not _OUTSIDE:
        from . import run

        _OUTSIDE.append(torch.compiler.disable(run))
    return True


@torch.compiler.assume_constant_result
def _prepare(key: str, mode: str) -> bool:
    """Make the module's custom ops for ``mode`` on first use. Run at trace time, not traced (torch.compile
    calls it and keeps its constant result); ``traced`` then reads the op from ``_OPS``."""
    if (key, mode) not in _OPS:
        from . import MODULES

        _OPS[(key, mode)] = (_define(MODULES[key], key, mode), MODULES[key].SIGNATURE)
    return True


def _schema(sig) -> str:
    args = [f"Tensor? {n}" for n in sig.args] + [f"bool {n}" for n in sig.switches]
    args += ["float? scale", "Tensor? initial_state", "bool output_final_state", "Tensor? cu_seqlens"]
    if sig.substeps:
        args.append(f"int {sig.substep_count}")
    return ", ".join(args)


class _Call:
    """The positional arguments of a custom op call, by their meaning."""

    def __init__(self, sig, args):
        n, m = len(sig.args), len(sig.switches)
        self.tensors = dict(zip(sig.args, args[:n]))
        self.switches = dict(zip(sig.switches, args[n:n + m]))
        self.scale, self.initial_state, self.output_final_state, self.cu_seqlens = args[n + m:n + m + 4]
        self.steps = args[n + m + 4] if sig.substeps else None

    def run(self, mod, mode, tensors=None, initial_state=None, **kw):
        from . import run

        return run(mod, mode, self.tensors if tensors is None else tensors, self.switches, self.scale,
                   self.initial_state if initial_state is None else initial_state, self.output_final_state,
                   self.cu_seqlens, None, self.steps, **kw)


def _shapes(mode: str, bound, mod):
    """The outputs of a bound call without computing them: ``o`` [B, T, H, V] in the value's dtype and the
    final state [N, H, K, V] (fp64 for fp64 inputs, else fp32), as the backends return them; the normalised call
    through the same rewrite as ``runtime.dispatch``."""
    from .rewrites import normalized

    def empty(b):
        H, K, V = b.size("H"), b.size("K"), b.size("V")
        t = next(x for x in b.tensors.values() if x is not None)
        o = t.new_empty((b.sizes["B"], b.sizes["T"], H, V), dtype=b.out_dtype)
        if not b.output_final_state:
            return o, None
        state = torch.float64 if b.out_dtype == torch.float64 else torch.float32
        return o, t.new_empty((b.num_seqs, H, K, V), dtype=state)

    return normalized(bound, empty) if bound.spec.normalizes(bound.switches) else empty(bound)


def _outputs(o, final_state):
    # contiguous (the fake and the real outputs' strides agree) and never None (the schema's second Tensor)
    return o.contiguous(), (o.new_empty(0) if final_state is None else final_state.contiguous())


# Autograd recorded inside the backward op: a custom op's implementation runs with the autograd dispatch keys
# excluded, and the recomputed forward must record its graph.
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


def _autograd_on():
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in _AUTOGRAD_KEYS:
        exclude = exclude.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _define(mod, key: str, mode: str):
    sig = mod.SIGNATURE
    name = f"{NAMESPACE}::{key}_{mode}"
    schema = _schema(sig)

    def forward(*args):
        return _outputs(*_Call(sig, args).run(mod, mode))

    def forward_fake(*args):
        return _outputs(*_Call(sig, args).run(mod, mode, backend=_shapes, values=False))

    def backward_impl(*args):
        # the gradients of the spec's inputs, then of initial_state; empty where not needed or not passed
        *fwd, do, dfinal, needs = args
        c = _Call(sig, fwd)
        inputs = [c.tensors[n] for n in sig.args] + [c.initial_state]
        with _autograd_on(), torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
            o, final_state = c.run(mod, mode, dict(zip(sig.args, leaves)), leaves[-1])
            outs, grads = [o], [do]
            if final_state is not None and dfinal is not None and dfinal.numel():
                outs.append(final_state)
                grads.append(dfinal)
            wrt = [x for x, need in zip(leaves, needs) if need and x is not None]
            keep = [i for i, y in enumerate(outs) if y.requires_grad]
            got = torch.autograd.grad([outs[i] for i in keep], wrt, [grads[i] for i in keep], allow_unused=True) \
                if wrt and keep else [None] * len(wrt)
        got = iter(got)
        result = []
        for x, need in zip(inputs, needs):
            g = next(got) if need and x is not None else None
            if g is None:
                g = do.new_empty(0) if x is None or not need else torch.zeros_like(x)
            result.append(g.contiguous())
        return result

    def backward_fake(*args):
        *fwd, do, dfinal, needs = args
        c = _Call(sig, fwd)
        inputs = [c.tensors[n] for n in sig.args] + [c.initial_state]
        return [x.new_empty(x.shape) if need and x is not None else do.new_empty(0) for x, need in zip(inputs, needs)]

    fwd_op = torch.library.custom_op(name, forward, mutates_args=(), schema=f"({schema}) -> (Tensor, Tensor)")
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(f"{name}_bwd", backward_impl, mutates_args=(),
                                     schema=f"({schema}, Tensor do, Tensor? dfinal, bool[] needs) -> Tensor[]")
    bwd_op.register_fake(backward_fake)
    n, m = len(sig.args), len(sig.switches)
    h0_at = n + m + 1   # initial_state's position among the forward op's arguments

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(x if isinstance(x, torch.Tensor) else None for x in inputs))
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]

    def backward(ctx, do, dfinal):
        fwd = [x if x is not None else o for x, o in zip(ctx.saved_tensors, ctx.others)]
        needs = list(ctx.needs_input_grad[:n]) + [ctx.needs_input_grad[h0_at]]
        grads = bwd_op(*fwd, do, dfinal, needs)
        out = [None] * len(fwd)
        for i, (g, need) in enumerate(zip(grads, needs)):
            if need:
                out[i if i < n else h0_at] = g
        return tuple(out)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op._opoverload
