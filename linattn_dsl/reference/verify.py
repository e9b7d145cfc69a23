"""Property-based equivalence of a spec's ops against the oracle (`linattn verify`).

Hypothesis draws shapes (T from 1 up, not multiples of the chunk size, varlen packings, grouped heads),
switch values, optional inputs present or absent, gate ranges and initial states; every backend that
exists for the spec is compared with the float64 oracle on outputs, final states and all gradients.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import drawing as testing
from ..compiler.spec import Recurrence

# Relative-error bounds against the float64 oracle, per dtype of the op's inputs: fp32 kernels sum
# O(T) terms of O(1) values in fp32 (eps 1.2e-7), bf16 inputs are rounded at 2^-8 before any math.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Result:
    backend: str
    examples: int = 0
    worst: dict = field(default_factory=dict)
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.examples > 0


def backends(spec: Recurrence, module, device: str = "cpu") -> dict:
    """The callables to check: each op of the spec's generated module, named with the device it runs on."""
    where = device + (", triton-interpret" if os.environ.get("TRITON_INTERPRET") == "1" else "")
    return {f"{mode}_{spec.name} ({where})": getattr(module, f"{mode}_{spec.name}")
            for mode in ("chunk", "fused_recurrent")}


def cases(spec: Recurrence, max_T: int = 80, dims=(4, 8, 16), device: str = "cpu"):
    sw_names = sorted(spec.switches)

    @st.composite
    def draw(d):
        heads = d(st.sampled_from([1, 2, 4]))
        groups = d(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0])) \
            if spec.head_dims["HQ"] != spec.head_dims["H"] else heads
        varlen = d(st.booleans())
        seqlens = d(st.lists(st.integers(1, max_T // 2), min_size=1, max_size=3)) if varlen else None
        return testing.draw_case(
            spec, B=d(st.integers(1, 2)), T=d(st.integers(1, max_T)), heads=heads, groups=groups,
            K=d(st.sampled_from(list(dims))), V=d(st.sampled_from(list(dims))), seqlens=seqlens,
            with_initial_state=d(st.booleans()), optional_present=d(st.booleans()),
            switches={n: d(st.booleans()) for n in sw_names},
            log_decay_min=d(st.sampled_from([-0.1, -1.0, -5.0, -20.0])), seed=d(st.integers(0, 2**16)),
            device=device)
    return draw()


def check_args(examples: int, max_T: int, device: str, names: tuple[str, str, str] = ("examples", "max_T", "device")
               ) -> None:
    """What :func:`verify` needs before any work (``names``: how the caller spells the three arguments)."""
    for name, value in zip(names[:2], (examples, max_T)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(f"{names[2]}: got {device!r}; expected 'cpu', or 'cuda' on a machine with a CUDA GPU")


def verify(spec: Recurrence, module=None, examples: int = 20, dtype=torch.float32, max_T: int = 80,
           seed: int = 0, device: str = "cpu", dims=(4, 8, 16)) -> list[Result]:
    """Check every backend of ``spec`` on ``examples`` drawn cases (head dims drawn from ``dims``, inputs and
    the float64 oracle on ``device``: "cpu", or "cuda" for the compiled kernels); never raises for a
    mismatch."""
    check_args(examples, max_T, device)
    if module is None:
        module = importlib.import_module(f"linattn_dsl.generated.{spec.name}")
    tol = TOLERANCE[dtype]
    results = []
    for name, op in backends(spec, module, device).items():
        res = Result(name)

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(cases(spec, max_T, dims, device))
        def check(case):
            case.tensors = {n: (x.to(dtype) if x is not None else None) for n, x in case.tensors.items()}
            if dtype == torch.float64 and case.initial_state is not None:   # (fp32 otherwise: states are fp32)
                case.initial_state = case.initial_state.to(dtype)
            errs = testing.compare(case, op)
            for k, e in errs.items():
                res.worst[k] = max(res.worst.get(k, 0.0), e)
            bad = {k: e for k, e in errs.items() if not e <= tol}
            res.examples += 1
            assert not bad, f"{case.note}, switches {case.switches}: rel. errors {bad} > {tol:g}"

        try:
            check()
        except AssertionError as e:
            res.failure = str(e).splitlines()[0]
        except Exception as e:  # a crash in a backend is a failure of that backend, reported as such
            res.failure = f"{type(e).__name__}: {e}"
        results.append(res)
    return results


def table(results: list[Result], tol: float) -> str:
    lines = [f"{'backend':<48} {'examples':>8} {'max rel err (o, state, grads)':>30}  status"]
    for r in results:
        o = r.worst.get("o", float("nan"))
        s = r.worst.get("final_state", float("nan"))
        g = max([v for k, v in r.worst.items() if k.startswith("d")], default=float("nan"))
        lines.append(f"{r.backend:<48} {r.examples:>8} {o:>9.1e} {s:>9.1e} {g:>9.1e}  "
                     + ("ok" if r.ok else f"FAIL (tol {tol:g}): {r.failure}"))
    return "\n".join(lines)
