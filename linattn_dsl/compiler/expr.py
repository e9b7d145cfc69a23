"""The gate-expression language: sympy plus the activation functions recurrences use.

Expressions in a spec (`"A * softplus(dt + dt_bias)"`) are parsed with :func:`parse` into sympy
expressions over the spec's input symbols. The functions below know their derivatives (so the
lowering differentiates gates symbolically) and their signs (so a spec can prove a log-decay is
``<= 0``). :func:`to_code` prints an expression as Python source for a given backend (torch or
Triton), which is how gate code is fused into generated kernels.
"""

from __future__ import annotations

import re

import sympy as sp


class softplus(sp.Function):  # noqa: N801 - named as users write it
    """log(1 + exp(x)); > 0 for real x; d/dx = sigmoid(x)."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])

    def _eval_is_extended_real(self):
        return self.args[0].is_extended_real

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None


class sigmoid(sp.Function):  # noqa: N801
    """1 / (1 + exp(-x)); in (0, 1) for real x."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))

    def _eval_is_extended_real(self):
        return self.args[0].is_extended_real

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None


class logsigmoid(sp.Function):  # noqa: N801
    """log(sigmoid(x)); < 0 for real x; d/dx = 1 - sigmoid(x)."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return 1 - sigmoid(self.args[0])

    def _eval_is_extended_real(self):
        return self.args[0].is_extended_real

    def _eval_is_negative(self):
        return True if self.args[0].is_extended_real else None


def relu(x: sp.Expr) -> sp.Expr:
    return sp.Max(x, 0)


FUNCTIONS = {
    "softplus": softplus,
    "sigmoid": sigmoid,
    "logsigmoid": logsigmoid,
    "relu": relu,
    "exp": sp.exp,
    "log": sp.log,
    "sqrt": sp.sqrt,
    "tanh": sp.tanh,
}



class log1p(sp.Function):  # noqa: N801
    """log(1 + x), exact near 0; d/dx = 1 / (1 + x). A layer's function (:data:`LAYER_FUNCTIONS`)."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return 1 / (1 + self.args[0])


class logaddexp(sp.Function):  # noqa: N801
    """log(exp(a) + exp(b)) without overflow; d/da = sigmoid(a - b). A layer's function (:data:`LAYER_FUNCTIONS`)."""

    nargs = 2

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args if argindex == 1 else self.args[::-1]
        return sigmoid(a - b)


# the functions of a layer declaration's derived inputs (linattn_dsl.compiler.layer.Derive): a spec's and these,
# which run in PyTorch only (no Triton printing)
LAYER_FUNCTIONS = {**FUNCTIONS, "log1p": log1p, "logaddexp": logaddexp}

# Names an expression may not use for inputs: the head index and the function names.
HEAD_INDEX = "h"
RESERVED = set(FUNCTIONS) | {HEAD_INDEX}


class ExprSyntaxError(ValueError):
    pass


def parse(text: str | int | float, symbols: dict[str, sp.Symbol], functions: dict | None = None) -> sp.Expr:
    """Parse ``text`` with only ``symbols`` and the known functions (``functions``: :data:`FUNCTIONS` by default)
    in scope.

    Raises ExprSyntaxError for syntax errors, for names that are neither and for calls of any other
    function (naming it and listing the allowed ones).
    """
    functions = FUNCTIONS if functions is None else functions
    if isinstance(text, (int, float)):
        return sp.sympify(text)
    if not isinstance(text, str):
        raise ExprSyntaxError(f"expected a string expression, got {type(text).__name__}")
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    local = dict(functions)
    local.update(symbols)
    try:
        # global_dict without sympy's names: an unknown name must not silently become a new Symbol
        # or a sympy built-in (`S`, `E`, `N`, `beta`, `gamma` are sympy objects).
        expr = parse_expr(text, local_dict=local, global_dict={"Integer": sp.Integer,
                          "Float": sp.Float, "Rational": sp.Rational, "Symbol": _unknown,
                          "Function": _unknown_function},
                          transformations=standard_transformations, evaluate=True)
    except _UnknownName as e:
        raise ExprSyntaxError(f"unknown symbol {e.args[0]!r} in {text!r}") from None
    except _UnknownFunction as e:
        raise ExprSyntaxError(f"unknown function {e.args[0]!r} in {text!r}; the functions allowed are "
                              f"{', '.join(sorted(functions))}") from None
    except (SyntaxError, TypeError, AttributeError, NameError, sp.SympifyError) as e:
        raise ExprSyntaxError(f"cannot parse {text!r}: {e}") from None
    if not isinstance(expr, sp.Expr):
        raise ExprSyntaxError(f"{text!r} is not an arithmetic expression")
    return expr


class _UnknownName(Exception):
    pass


class _UnknownFunction(Exception):
    pass


def _unknown(name: str, *args, **kwargs):
    raise _UnknownName(name)


def _unknown_function(name: str, *args, **kwargs):
    # sympy's parser turns a call of a name it does not know (`erf(g)`, `abs(g)`) into Function(name)(...)
    raise _UnknownFunction(name)


# ---------------------------------------------------------------------------------------------
# Printing expressions as source code for a backend.

TORCH_FUNCS = {
    "softplus": "torch.nn.functional.softplus({0})",
    "sigmoid": "torch.sigmoid({0})",
    "logsigmoid": "torch.nn.functional.logsigmoid({0})",
    "exp": "torch.exp({0})",
    "log": "torch.log({0})",
    "sqrt": "torch.sqrt({0})",
    "tanh": "torch.tanh({0})",
    "relu": "torch.relu({0})",
    "step": "({0} > 0).to({0}.dtype)",
    "log1p": "torch.log1p({0})",
    "logaddexp": "torch.logaddexp({0}, {1})",
}

TRITON_FUNCS = {
    "softplus": "_softplus({0})",
    "sigmoid": "tl.sigmoid({0})",
    "logsigmoid": "_logsigmoid({0})",
    "exp": "tl.exp({0})",
    "log": "tl.log({0})",
    "sqrt": "tl.sqrt({0})",
    "tanh": "_tanh({0})",
    "relu": "tl.maximum({0}, 0.0)",
    "step": "tl.where({0} > 0, 1.0, 0.0)",
}


def to_code(expr: sp.Expr, names: dict[str, str], funcs: dict[str, str]) -> str:
    """Print ``expr`` as Python source; ``names`` maps symbol names to variable names."""

    def p(e: sp.Expr) -> str:
        if isinstance(e, sp.Symbol):
            return names[e.name]
        if e.is_Integer or e.is_Rational:
            return repr(float(e))
        if e.is_Number:
            return repr(float(e))
        if isinstance(e, sp.Add):
            return "(" + " + ".join(p(a) for a in e.args) + ")"
        if isinstance(e, sp.Mul):
            num, den = [], []
            for a in e.args:
                if isinstance(a, sp.Pow) and a.exp.is_Number and a.exp < 0:
                    den.append(p(a.base) if a.exp == -1 else p(sp.Pow(a.base, -a.exp)))
                else:
                    num.append(p(a))
            s = " * ".join(num) if num else "1.0"
            return "(" + s + "".join(f" / {d}" for d in den) + ")"
        if isinstance(e, sp.Pow):
            if e.exp == sp.Rational(1, 2):
                return funcs["sqrt"].format(p(e.base))
            if e.exp.is_Integer and 0 < int(e.exp) <= 4:
                b = p(e.base)
                return "(" + " * ".join([b] * int(e.exp)) + ")"
            if e.exp.is_Integer and -4 <= int(e.exp) < 0:
                b = p(e.base)
                return "(1.0 / (" + " * ".join([b] * -int(e.exp)) + "))"
            if e.base == sp.E:
                return funcs["exp"].format(p(e.exp))
            if e.base.is_Number and e.base > 0:
                return funcs["exp"].format(f"{p(e.exp)} * {float(sp.log(e.base))!r}")
            return funcs["exp"].format(f"{p(e.exp)} * " + funcs["log"].format(p(e.base)))
        if isinstance(e, sp.exp):
            return funcs["exp"].format(p(e.args[0]))
        if isinstance(e, sp.Max) and len(e.args) == 2 and sp.S.Zero in e.args:
            other = e.args[0] if e.args[1] == 0 else e.args[1]
            return funcs["relu"].format(p(other))
        if isinstance(e, sp.Heaviside):
            return funcs["step"].format(p(e.args[0]))
        name = type(e).__name__
        if name in funcs and len(e.args) == len(set(re.findall(r"\{(\d)\}", funcs[name]))):
            return funcs[name].format(*(p(a) for a in e.args))
        raise ExprSyntaxError(f"cannot print {e} ({name}) for this backend")

    return p(sp.sympify(expr))
