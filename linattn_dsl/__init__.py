"""linattn-dsl: a compiler for linear attention.

A recurrence spec (:mod:`linattn_dsl.compiler.spec`) is lowered to chunked forward/backward math, rendered
through Jinja stage templates into Triton kernels and a PyTorch twin, and exposed as ops
(:mod:`linattn_dsl.ops`), layers and Hugging Face models.
"""

from .compiler.spec import Arg, Decay, If, Recurrence, SpecError, Transition

__version__ = "0.1.0"
__all__ = ["Arg", "Decay", "If", "Recurrence", "SpecError", "Transition", "__version__"]
