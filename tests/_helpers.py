"""Helpers shared by several test modules and by the scripts in tests/interpreted/ (which put tests/ on
``sys.path`` to import this module): regenerating a spec file, running code under the Triton interpreter in
a fresh process (so TRITON_INTERPRET=1 does not leak into the test process), and the GPU checks that every
form runs at real shapes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from linattn_dsl.reference import drawing as testing

HERE = Path(__file__).resolve().parent

# general-transition specs shared by the interpreted and GPU checks of the general form
G_NONE = ('from linattn_dsl import Recurrence, Transition\n'
          'spec = Recurrence(name="g_none", inputs=dict(q="B T H K", k="B T H K", v="B T H V", aa="B T H K", '
          'bq="B T H K"), query="q", key="k", value="v", transition=Transition.general(a="aa", b="bq"))\n')
G_CONST = ('from linattn_dsl import Decay, Recurrence, Transition\n'
           'spec = Recurrence(name="g_const", inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", aa="B T H K", '
           'bq="B T H K", c="H"), optional=dict(D="H"), skip="D * v", query="q", key="k", value="v", '
           'decay=Decay.constant(log="-softplus(c) - 0.01"), scale=0.3, '
           'transition=Transition.general(a="aa", b="bq"))\n')


def regen(folder, name: str, source: str):
    """Writes ``source`` as the spec file ``folder/name.py``, regenerates it into ``folder/gen`` and imports
    the generated module: ``(spec, module)``."""
    from linattn_dsl.cli import _import_file
    from linattn_dsl.compiler import codegen, registry

    folder = Path(folder)
    (folder / f"{name}.py").write_text(source)
    spec = registry.load(str(folder / f"{name}.py"))
    codegen.regen([spec], folder / "gen", builtin=False, index=False)
    return spec, _import_file(folder / "gen" / f"{name}.py")


def assert_matches_oracle(spec, op, **kw) -> None:
    """``op`` on a case drawn with ``kw`` (``testing.draw_case``) against the float64 oracle: every output, final
    state and gradient within 1e-4 relative."""
    errs = testing.compare(testing.draw_case(spec, **kw), op)
    assert all(e < 1e-4 for e in errs.values()), errs


def run_interpreted_check(form: str, timeout: int) -> None:
    """Runs tests/interpreted/check_{form}.py with TRITON_INTERPRET=1 in a fresh interpreter; every case passes."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(HERE / "interpreted" / f"check_{form}.py")], capture_output=True,
                       text=True, env=env, timeout=timeout)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "cases passed" in r.stdout


def verify_interpreted(sources: list, folder, timeout: int, form=None, examples: int = 2, max_T: int = 70):
    """Regenerates each spec source into ``folder/s{i}`` and verifies its generated Triton kernels against the
    oracle under TRITON_INTERPRET=1 in a fresh process (the generated module's FORM must be ``form`` where
    given). Returns the finished process: exit status 0 when every spec verified; its stdout holds each source
    and its verify table."""
    args = json.dumps([sources, str(folder), form, examples, max_T])
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import _helpers; sys.exit(_helpers._verify_main())"
    return subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TRITON_INTERPRET="1"))


def _verify_main() -> int:
    """The subprocess side of verify_interpreted."""
    from linattn_dsl.reference import verify

    sources, folder, form, examples, max_T = json.loads(sys.argv[1])
    ok = True
    for i, src in enumerate(sources):
        d = Path(folder) / f"s{i}"
        d.mkdir()
        spec, mod = regen(d, "drawn", src)
        assert form is None or mod.FORM == form, mod.FORM
        res = verify.verify(spec, mod, examples=examples, max_T=max_T)
        print(src, verify.table(res, 1e-4))
        ok &= all(r.ok for r in res)
    return 0 if ok else 1


# ---- GPU checks at real shapes ----------------------------------------------------------------------------

def to_cuda(case, dtype):
    """A drawn case on the GPU: per-token tensors (3 dims or more) in ``dtype``, the rest in fp32."""
    case.tensors = {k: (v.to("cuda", dtype if v.dim() >= 3 else torch.float32) if v is not None else None)
                    for k, v in case.tensors.items()}
    if case.initial_state is not None:
        case.initial_state = case.initial_state.cuda()
    if case.cu_seqlens is not None:
        case.cu_seqlens = case.cu_seqlens.cuda()
    return case


def bf16_vs_fp32_errors(case, op, label, missing_grads_ok: bool = False) -> dict:
    """``op``'s output, final state and every gradient from bf16 inputs vs from the same bf16-rounded values in
    fp32, so the comparison measures the kernels alone: relative errors (max abs error over max abs value).
    The bf16 run must reproduce its bits on a second run and be finite. An input without a gradient fails
    unless ``missing_grads_ok``."""
    rounded = {k: (v.to(torch.bfloat16) if v is not None and v.dim() >= 3 else v) for k, v in case.tensors.items()}

    def run(dtype):
        t = {k: (v.to(dtype if v.dim() >= 3 else torch.float32).detach().requires_grad_() if v is not None else None)
             for k, v in rounded.items()}
        h0 = case.initial_state.detach().clone().requires_grad_()
        o, s = case.call(op, t, h0)
        gen = torch.Generator(device="cuda").manual_seed(0)
        do = torch.randn(o.shape, device="cuda", generator=gen)
        ((o.float() * do).sum() + s.sum()).backward()
        return dict(o=o.float(), final_state=s, dinitial_state=h0.grad,
                    **{f"d{k}": t[k].grad.float() for k in t
                       if t[k] is not None and (t[k].grad is not None or not missing_grads_ok)})

    ref, got = run(torch.float32), run(torch.bfloat16)
    assert not testing.not_reproduced(got, run(torch.bfloat16))   # the same bits again
    errs = {k: float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-2)) for k in ref}
    print(*label, {k: f"{e:.1e}" for k, e in errs.items()})
    assert all(torch.isfinite(x).all() for x in got.values())
    return errs


def check_recurrent_equals_chunk(spec, chunk, recurrent) -> None:
    """fused_recurrent vs chunk in bf16 at 16k tokens with log-decays down to -20: finite, within 3e-2."""
    case = to_cuda(testing.draw_case(spec, B=1, T=16384, heads=2, K=128, V=128, log_decay_min=-20.0, seed=1),
                   torch.bfloat16)
    o1, s1 = case.call(chunk)
    o2, s2 = case.call(recurrent)
    assert torch.isfinite(o1).all() and torch.isfinite(s1).all()
    assert float((o1.float() - o2.float()).abs().max() / o2.float().abs().max()) < 3e-2
    assert float((s1 - s2).abs().max() / s2.abs().max()) < 3e-2


# ---- the scripts in tests/interpreted/ ------------------------------------------------------------------------

def draw_case_as(spec, dtype, seed: int, **kw):
    """``testing.draw_case`` with its per-token tensors (3 dims or more) cast to ``dtype``."""
    case = testing.draw_case(spec, seed=seed, **kw)
    case.tensors = {k: (v.to(dtype) if v is not None and v.dim() >= 3 else v) for k, v in case.tensors.items()}
    return case


def record(failures: list, label: str, errs: dict, tol: float, key: tuple) -> None:
    """Prints ``label`` with the worst of ``errs`` (relative errors by output or gradient name) and those above
    ``tol``; where there are any, appends ``key`` and them to ``failures``."""
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= tol}
    worst = max(errs, key=errs.get)
    print(f"{label}  worst {worst} {errs[worst]:.2e}" + (f"  FAIL {bad}" if bad else ""), flush=True)
    if bad:
        failures.append((*key, bad))


def check_expanded_dht(failures: list, name: str, op, **kw) -> None:
    """``op``'s input gradients for ``o.sum() + s.sum()`` (autograd hands the kernels an expanded, stride-0,
    gradient of the final state) against the oracle's on a case of spec ``name`` drawn with ``kw`` (seed 7):
    prints the worst relative error and records a failure above 1e-4. Inputs the case leaves out, and inputs
    the oracle gives no gradient, are passed over."""
    from linattn_dsl import reference
    from linattn_dsl.compiler import registry

    spec = registry.load(name)
    case = testing.draw_case(spec, seed=7, **kw)
    grads = []
    for f in (lambda *a, **kw: reference.run(spec, *a, **kw), op):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in case.tensors.items() if v is not None}
        o, s = case.call(f, leaves)
        (o.sum() + s.sum()).backward()
        grads.append([leaves[k].grad for k in sorted(leaves)])
    err = max(testing.rel_err(a, b) for a, b in zip(grads[1], grads[0]) if b is not None)
    record(failures, f"chunk_{name} with expanded d(final_state):", {"grads": err}, 1e-4,
           (name, "chunk", "expanded dht"))
