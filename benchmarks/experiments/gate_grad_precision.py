"""How precise are the gradients of a decay's inputs? Ours against the float64 oracle, next to the fp32
step-by-step oracle (autograd through the recurrence in fp32) on the same case: if the fp32 oracle is close
and ours is not, the precision is lost in our backward, not in the case's conditioning.

    TRITON_INTERPRET=1 python -m benchmarks.experiments.gate_grad_precision      # CPU, the Triton interpreter
    python -m benchmarks.experiments.gate_grad_precision --device cuda             # the compiled kernels
    ... --check 1e-4                                                               # exit 1 if ours is worse

Cases: a constant decay through the general transition (``g_const``: log-decays down to -0.5 at T=260, where
a decay gradient summed over the whole sequence loses precision), and a constant decay -exp(c) at T=1 without
an initial state, whose true dc is exactly 0. ``tests/test_compiler_general.py`` runs it with ``--check 1e-4``
under the interpreter.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from linattn_dsl import reference
from linattn_dsl.cli import _import_file
from linattn_dsl.compiler import codegen, registry
from linattn_dsl.reference import drawing as testing

G_CONST = ('from linattn_dsl import Decay, Recurrence, Transition\n'
           'spec = Recurrence(name="g_const", inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", aa="B T H K", '
           'bq="B T H K", c="H"), optional=dict(D="H"), skip="D * v", query="q", key="k", value="v", '
           'decay=Decay.constant(log="-softplus(c) - 0.01"), scale=0.3, '
           'transition=Transition.general(a="aa", b="bq"))\n')
N_CONST = ('from linattn_dsl import Decay, Recurrence, Transition\n'
           'spec = Recurrence(name="n_const", inputs=dict(q="B T H K", k="B T H K", v="B T H V", c="H"), '
           'query="q", key="k", value="v", decay=Decay.constant(log="-exp(c)"), transition=Transition.none())\n')
CASES = [("g_const", G_CONST, dict(B=1, T=260, heads=2, K=64, V=64, log_decay_min=-0.5)),
         ("n_const", N_CONST, dict(B=1, T=1, heads=1, K=16, V=16, with_initial_state=False))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--check", type=float, default=None, help="exit 1 if any of ours is above this relative error")
    args = p.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        for name, src, kw in CASES:
            (Path(d) / f"{name}.py").write_text(src)
            spec = registry.load(str(Path(d) / f"{name}.py"))
            codegen.regen([spec], Path(d) / "gen", builtin=False, index=False)
            chunk = getattr(_import_file(Path(d) / "gen" / f"{name}.py"), f"chunk_{name}")
            case = testing.draw_case(spec, device=args.device, **kw)
            case.tensors = {k: (v.float() if v is not None else None) for k, v in case.tensors.items()}
            fp32 = testing.compare(case, lambda *a, **k: reference.run(spec, *a, dtype=torch.float32, **k))
            ours = testing.compare(case, chunk)
            print(f"{name} {kw}")
            for k in ours:
                print(f"  {k:<16} ours {ours[k]:.1e}   fp32 oracle {fp32[k]:.1e}")
            worst = max(worst, *ours.values())
    if args.check is not None and not worst <= args.check:
        raise SystemExit(f"worst {worst:.1e} > {args.check:.0e}")


if __name__ == "__main__":
    main()
