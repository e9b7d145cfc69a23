"""Host side of the delta chunk form (being written): until its Triton stages land, CUDA and the
interpreter run the step-by-step oracle."""

from __future__ import annotations

from .args import Bound
from .reference import run_bound


def run_triton(mod, variant, bound: Bound, mode: str):
    return run_bound(bound)
