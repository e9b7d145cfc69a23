"""What generated op modules call: spec loading, argument binding, backend dispatch."""

from __future__ import annotations

from . import reference
from .args import Bound, bind
from .registry import load as load_spec

__all__ = ["bind", "dispatch", "load_spec"]


def dispatch(mode: str, bound: Bound):
    """Run a bound op call on the best backend for its device and mode.

    Backends are registered per spec by the generated kernels. Until a spec's lowering exists, the
    step-by-step recurrence (the oracle, in fp32) computes the op, with autograd through it.
    """
    backend = _BACKENDS.get((bound.spec.name, mode))
    if backend is not None:
        return backend(bound)
    return reference.run_bound(bound)


_BACKENDS: dict = {}
