"""Backend choice and input checks shared by the fused modules.

Dispatch rule: CUDA tensors run the Triton kernels; CPU tensors run the PyTorch path, except when
``TRITON_INTERPRET=1`` is set in the environment, in which case CPU tensors run the same Triton kernels
under Triton's interpreter (how the kernels are tested on machines without a GPU).

Triton is imported lazily, so ``import linattn_dsl.modules`` works where Triton is not installed.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether tensors on ``t``'s device go through the Triton kernels."""
    if t.is_cuda:
        if not triton_available():
            raise RuntimeError("CUDA tensors need triton installed for linattn_dsl.modules")
        return True
    return t.device.type == "cpu" and interpreting() and triton_available()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_programs_hint(t: torch.Tensor) -> int:
    """A grid size for persistent-style loops over rows (a few programs per SM)."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count * 4
    return 4


# ---- input checks: raise ValueError naming the argument, the value seen and what was expected ----


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_integer(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor (int32/int64), got dtype {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndims: int | tuple[int, ...], layout: str) -> None:
    allowed = (ndims,) if isinstance(ndims, int) else ndims
    if t.ndim not in allowed:
        raise ValueError(f"{name}: expected shape {layout}, got {t.ndim}-d tensor of shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    given = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in given.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {seen}")


def check_last_dim(name: str, t: torch.Tensor, size: int, what: str) -> None:
    if t.shape[-1] != size:
        raise ValueError(f"{name}: expected last dim {size} ({what}), got shape {tuple(t.shape)}")
