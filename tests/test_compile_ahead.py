"""The compile-ahead walk (runtime.host.compile_ahead): a chunk op's first call of a kind walks its forward and
backward hosts without launching, handing each launch's kernel to Triton's parallel compile, so that every kernel
the call then launches is compiled already. On the CPU nothing compiles; the Triton interpreter runs the hosts
instead, in a fresh process (TRITON_INTERPRET=1 must be set before Triton is imported), with the walk forced on and
both kinds of launch recorded: every real launch (forward and backward) must match a walked one in kernel and
every non-tensor argument and tensor dtype (what Triton specialises a compile on), outputs and gradients must be
bit-identical with the walk and without, and a second call of the same kind must not walk again."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import contextlib, json, sys
import torch
from linattn_dsl import ops
from linattn_dsl.compiler import registry
from linattn_dsl.reference import drawing
from linattn_dsl.runtime import host

CASES = json.loads(sys.argv[1])
walked, launched = [], []


def signature(kernel, args):
    fixed = tuple(sorted((n, repr(a)) for n, a in args.items() if not isinstance(a, torch.Tensor)))
    dtypes = tuple(sorted((n, str(a.dtype)) for n, a in args.items() if isinstance(a, torch.Tensor)))
    return (getattr(kernel, "__name__", None) or repr(kernel), fixed, dtypes)


real_launch = host._launch_now
host._compile_ahead_applies = lambda device: True
host._compile_pool = contextlib.nullcontext
host._warm_launch = lambda kernel, grid, args: walked.append(signature(kernel, args))


def recording(kernel, grid, args):
    launched.append(signature(kernel, args))
    real_launch(kernel, grid, args)


host._launch_now = recording


def run(name, mode, kw, keep, grad, ahead):
    host.PARALLEL_COMPILE = ahead
    case = drawing.draw_case(registry.load(name), seed=1, **kw)
    leaves = {k: (t.clone().requires_grad_(grad) if t is not None and t.is_floating_point() else t)
              for k, t in case.tensors.items()}
    h0 = case.initial_state.clone().requires_grad_(grad) if case.initial_state is not None else None
    with host.keep_states(keep), torch.set_grad_enabled(grad):
        o, ht = case.call(getattr(ops, f"{mode}_{name}"), tensors=leaves, initial_state=h0)
        outs = [o, ht]
        if grad:
            ((o.float() ** 2).sum() + (ht.float() ** 2).sum()).backward()
            outs += [t.grad for t in leaves.values() if t is not None and t.grad is not None]
            outs += [h0.grad] if h0 is not None else []
    return outs


orig = host._compile_ahead_applies
for name, mode, kw, keep, grad in CASES:
    host._WARMED.clear()
    walked.clear(); launched.clear()
    host._compile_ahead_applies = lambda device: host.PARALLEL_COMPILE
    with_walk = run(name, mode, kw, keep, grad, True)
    missing = set(launched) - set(walked)
    assert walked and not missing, (name, mode, keep, grad, sorted(m[0] for m in missing))
    n_walked = len(walked)
    run(name, mode, kw, keep, grad, True)
    assert len(walked) == n_walked, (name, mode, "walked again for a call of the same kind")
    without = run(name, mode, kw, keep, grad, False)
    for a, b in zip(with_walk, without):
        assert (a is None and b is None) or torch.equal(a, b), (name, mode)
    print(name, mode, keep, grad, len(set(walked)), "kernels walked", flush=True)
print("compile-ahead ok")
'''

CASES = [  # (spec, mode, draw_case keywords, keep states, gradient)
    ("gla", "chunk", dict(B=2, T=70, heads=2, K=16, V=8), False, True),
    ("gla", "chunk", dict(seqlens=[5, 64, 11], heads=1, K=8, V=8), True, True),
    ("mamba2", "chunk", dict(B=1, T=65, heads=2, groups=1, K=8, V=8), False, True),
    ("delta_rule", "chunk", dict(B=1, T=70, heads=2, K=16, V=8), False, True),
    ("rwkv7", "chunk", dict(B=1, T=70, heads=1, K=16, V=8), False, True),
    ("gla", "chunk", dict(B=1, T=40, heads=1, K=8, V=8), False, False),
    ("delta_rule", "fused_recurrent", dict(B=1, T=20, heads=1, K=8, V=8), False, True),
]


def test_compile_ahead_walk_covers_every_launch():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert "compile-ahead ok" in r.stdout


def test_launcher_build_failure_keeps_the_compiled_kernel():
    """A compile job builds its kernel's launcher too; where that cannot happen (here: no GPU driver, a result that
    is no kernel) the job still returns the compile's result, and the first launch builds the launcher itself."""
    from linattn_dsl.runtime import host

    result = object()
    assert host._with_launcher(lambda: result)() is result
