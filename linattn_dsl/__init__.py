"""linattn-dsl: a compiler for linear attention.

A recurrence spec (the spec language: :class:`Recurrence`, :class:`Arg`, :class:`Decay`, :class:`Transition`,
:class:`If`) is lowered to chunked forward/backward math, rendered through Jinja stage templates into Triton
kernels and a PyTorch twin (``linattn regen``), and exposed as ops (:mod:`linattn_dsl.ops`), layers and Hugging
Face models. The spec language is loaded on first use, so that running the generated ops never imports the
compiler (or sympy).
"""

__version__ = "0.1.0"
__all__ = ["Arg", "Const", "Decay", "Derive", "Gate", "If", "Layer", "ModelParam", "NormKey", "Option", "Param", "Proj",
           "Recurrence", "Size", "SpecError", "Substeps", "Transition", "__version__"]
_LAYER = ("Const", "Derive", "Gate", "Layer", "ModelParam", "NormKey", "Option", "Param", "Proj", "Size")


def __getattr__(name: str):
    if name in _LAYER:
        from .compiler import layer

        return getattr(layer, name)
    if name in __all__:
        from .compiler import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'linattn_dsl' has no attribute {name!r}")
