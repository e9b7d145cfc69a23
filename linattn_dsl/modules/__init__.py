"""Fused building blocks around linear attention: losses, norms, the short convolution, SwiGLU and RoPE.

Each runs Triton kernels on CUDA tensors and plain PyTorch on CPU tensors (the Triton kernels under
Triton's interpreter when ``TRITON_INTERPRET=1``); see :mod:`linattn_dsl.modules._triton_utils`.
"""

from .activations import sqrelu_linear, swiglu_linear
from .conv import ShortConvolution
from .cross_entropy import FusedCrossEntropyLoss
from .linear_cross_entropy import FusedLinearCrossEntropyLoss
from .norm import FusedRMSNormGated, L2Norm, RMSNorm, l2_norm
from .rotary import rotary_embedding

__all__ = [
    "FusedCrossEntropyLoss",
    "FusedLinearCrossEntropyLoss",
    "FusedRMSNormGated",
    "L2Norm",
    "RMSNorm",
    "ShortConvolution",
    "l2_norm",
    "rotary_embedding",
    "sqrelu_linear",
    "swiglu_linear",
]
