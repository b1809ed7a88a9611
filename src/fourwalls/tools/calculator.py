"""The calculator tool: exact arithmetic over a small expression language, parsed, never ``eval``-ed.

The expression is parsed with Python's ``ast`` and only a whitelist of nodes is walked: numbers (read exactly as
``Fraction``), ``+ - * / // % **`` (``^`` too), parentheses, a few named functions and constants, percentages
(``15%`` is 15/100, ``15% of 80`` is 12, ``80 + 15%`` is 92), and physical units through pint (``3 km in miles``,
``60 mph to m/s``, ``5 kg * 9.81 m/s^2``). Results stay exact fractions as long as the arithmetic allows (roots of
perfect powers included); only irrational results (``sqrt(2)``, ``pi``, ``ln``, ...) are floating point, marked ``≈``.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from fractions import Fraction
from functools import cache
from typing import Any

from fourwalls.errors import UsageError

MAX_CHARS = 1000
MAX_BITS = 100_000  # the largest integer a result may hold (a googol has 333 bits)
NAME = "calculator"
DESCRIPTION = ("Evaluate an arithmetic expression exactly, e.g. '(17 + 5) * 3', '2^10', 'sqrt(144)', '15% of 80', "
               "'7/3 + 1/6', or convert units, e.g. '3 km in miles'. Use it for any arithmetic.")
PARAMETERS = {"type": "object",
              "properties": {"expression": {"type": "string", "description": "the expression",
                                            # what the language can hold, so a model cannot wander off in prose
                                            "pattern": r"^[0-9A-Za-z_(\-][0-9A-Za-z_ .,+\-*/^%()]{0,199}$"}},
              "required": ["expression"], "additionalProperties": False}

Number = Fraction | float


class CalculatorError(UsageError):
    """An expression the calculator cannot evaluate; the message says why."""


def _exact_root(x: Fraction, n: int) -> Fraction | None:
    """The exact n-th root of ``x`` when it is rational, else None."""
    if x < 0:
        if n % 2 == 0:
            raise CalculatorError(f"an even root of a negative number ({x}) is not real")
        r = _exact_root(-x, n)
        return None if r is None else -r
    num, den = _int_root(x.numerator, n), _int_root(x.denominator, n)
    return None if num is None or den is None else Fraction(num, den)


def _int_root(k: int, n: int) -> int | None:
    r = round(k ** (1 / n)) if k.bit_length() < 1000 else math.isqrt(k) if n == 2 else None
    if r is None:
        return None
    for c in (r - 1, r, r + 1):
        if c >= 0 and c**n == k:
            return c
    return None


def _power(base: Any, exp: Any) -> Any:
    if _units(base) or _units(exp):
        if _units(exp):
            raise CalculatorError("an exponent cannot have units")
        return base ** _plain(exp)
    if isinstance(base, Fraction) and isinstance(exp, Fraction):
        if exp.denominator == 1:
            bits = max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(exp.numerator)
            if bits > MAX_BITS:
                raise CalculatorError("the result is too large to compute exactly")
            if base == 0 and exp < 0:
                raise CalculatorError("division by zero")
            return base ** exp.numerator
        root = _exact_root(base, exp.denominator) if exp.denominator <= 1000 else None
        if root is not None:
            return _power(root, Fraction(exp.numerator))
    if float(base) < 0 and float(exp) != int(float(exp)):
        raise CalculatorError("a fractional power of a negative number is not real")
    try:
        return float(base) ** float(exp)
    except OverflowError:
        raise CalculatorError("the result is too large") from None


def sqrt(x: Any) -> Any:
    return _power(x, Fraction(1, 2))


def cbrt(x: Any) -> Any:
    return _power(x, Fraction(1, 3))


def root(x: Any, n: Any) -> Any:
    if not (isinstance(n, Fraction) and n.denominator == 1 and n > 0):
        raise CalculatorError("root(x, n) takes a positive whole n")
    return _power(x, 1 / n)


def _whole(x: Any, what: str) -> int:
    if not (isinstance(x, Fraction) and x.denominator == 1):
        raise CalculatorError(f"{what} takes whole numbers")
    return int(x)


def factorial(x: Any) -> Fraction:
    n = _whole(x, "factorial")
    if not 0 <= n <= 5000:
        raise CalculatorError("factorial takes a whole number from 0 to 5000")
    return Fraction(math.factorial(n))


def _round(x: Any, digits: Any = Fraction(0)) -> Any:
    return Fraction(round(x, _whole(digits, "round's digits"))) if isinstance(x, Fraction) else round(x, int(digits))


def _float_fn(fn: Callable[[float], float]) -> Callable[[Any], float]:
    def wrapped(x: Any) -> float:
        try:
            return fn(float(_plain(x)))
        except (ValueError, OverflowError):
            raise CalculatorError(f"{fn.__name__}({_show(x)}) is not defined") from None

    return wrapped


def percent(x: Any) -> Any:
    return x / 100


def _is_percent(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "percent"


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "percent": percent,
    "sqrt": sqrt, "cbrt": cbrt, "root": root, "abs": abs, "round": _round, "factorial": factorial,
    "floor": lambda x: Fraction(math.floor(x)), "ceil": lambda x: Fraction(math.ceil(x)), "min": min, "max": max,
    "gcd": lambda a, b: Fraction(math.gcd(_whole(a, "gcd"), _whole(b, "gcd"))),
    "lcm": lambda a, b: Fraction(math.lcm(_whole(a, "lcm"), _whole(b, "lcm"))),
    "ln": _float_fn(math.log), "log": _float_fn(math.log10), "log2": _float_fn(math.log2), "exp": _float_fn(math.exp),
    "sin": _float_fn(math.sin), "cos": _float_fn(math.cos), "tan": _float_fn(math.tan),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


@cache
def _registry() -> Any:
    """pint's unit registry with exact (Fraction) conversion factors, built once (it takes a second)."""
    import pint

    return pint.UnitRegistry(non_int_type=Fraction)


def _units(x: Any) -> bool:
    return hasattr(x, "units") or type(x).__name__ == "Unit"


def _plain(x: Any) -> Number:
    """A number without units (a dimensionless quantity counts), or CalculatorError."""
    if hasattr(x, "units"):
        if not x.dimensionless:
            raise CalculatorError(f"{_show(x)} has units where a plain number is needed")
        return x.to("dimensionless").magnitude
    if _units(x):
        raise CalculatorError(f"the unit {x} needs a number")
    return x


# Implicit multiplication ("3 km", "2(4+1)") and the words calculators use: done on the text before parsing. The
# atomic group keeps "1e3" one number instead of "1 * e3".
_IMPLICIT = re.compile(r"((?>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))\s*(?=[A-Za-z_(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%(?!\s*[\d(.A-Za-z_])|(\d+(?:\.\d+)?)\s*%(?=\s*of\b)")


def _prepare(expression: str) -> str:
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000,000
    text = _PERCENT.sub(lambda m: f"percent({m.group(1) or m.group(2)})", text)
    text = re.sub(r"\bof\b", "*", text)
    text = re.sub(r"\b(?:to|as)\b", " in ", text)
    return _IMPLICIT.sub(r"\1*", text)


def evaluate(expression: str) -> Any:
    """The value of ``expression``: a Fraction when exact, a float when not, a pint Quantity with units."""
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(_prepare(expression), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise CalculatorError(f"cannot parse {expression!r}; write e.g. '(2 + 3) * 4' or '3 km in miles'") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    except CalculatorError:
        raise
    except Exception as e:  # pint's dimensionality and offset errors, and the like
        raise CalculatorError(_pint_message(e)) from None


def _pint_message(e: Exception) -> str:
    text = str(e).split("\n")[0]
    return f"cannot compute that: {text}" if text else f"cannot compute that ({type(e).__name__})"


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # ast gives 0.1 as a float; its exact decimal is what the user wrote (repr round-trips it)
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Add, ast.Sub)) and _is_percent(node.right):  # 200 + 10% is 220, as on a till
            right = left * right
        if isinstance(node.op, ast.Mult) and _units(right) and not _units(left) and not hasattr(right, "units"):
            return _registry().Quantity(left, right)  # "100 degC": a quantity, not an offset unit multiplied
        if isinstance(node.op, (ast.Mod, ast.FloorDiv)) and (_units(left) or _units(right)):
            raise CalculatorError("% and // take plain numbers")
        return _check(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name):
        return _name(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        fn = FUNCTIONS.get(node.func.id)
        if fn is None:
            raise CalculatorError(f"unknown function {node.func.id!r}; known: {', '.join(sorted(FUNCTIONS))}")
        args = [_eval(a) for a in node.args]
        try:
            return _check(fn(*args))
        except TypeError:
            raise CalculatorError(f"{node.func.id}() got the wrong number or kind of arguments") from None
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In):
        value, target = _eval(node.left), _eval(node.comparators[0])
        if not hasattr(value, "units"):
            raise CalculatorError("only a quantity with units can be converted ('3 km in miles')")
        return value.to(target.units if hasattr(target, "units") else target)
    raise CalculatorError(f"{ast.unparse(node)!r} is not something the calculator understands")


def _check(x: Any) -> Any:
    if isinstance(x, Fraction) and max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError("the result is too large to compute exactly")
    return x


def _name(name: str) -> Any:
    if name in CONSTANTS:
        return CONSTANTS[name]
    ureg = _registry()
    if name in ureg:
        return ureg.Unit(name)
    raise CalculatorError(f"unknown name {name!r}: use numbers, units (km, kg, h, ...), pi or e")


def _show(x: Any) -> str:
    """A number as a person reads it: 391, 3.5, 1/3 ≈ 0.333333333333, ≈ 1.41421356237."""
    if hasattr(x, "units"):
        return _show(x.magnitude) + ("" if x.dimensionless else " " + _unit_text(x.units))
    if isinstance(x, float):
        return f"≈ {x:.12g}"
    if x.denominator == 1:
        return str(x.numerator)
    scale = 0  # a terminating decimal (the denominator has only the factors 2 and 5) is exact as a decimal
    while (x * 10**scale).denominator != 1 and scale < 40:
        scale += 1
    if (x * 10**scale).denominator == 1:
        digits = str(abs(x.numerator * 10**scale // x.denominator)).rjust(scale + 1, "0")
        return f"{'-' if x < 0 else ''}{digits[:-scale]}.{digits[-scale:]}"
    return f"{x.numerator}/{x.denominator} ≈ {float(x):.12g}"


def _unit_text(unit: Any) -> str:
    """'meter / second^2': pint's own formatting cannot print the Fraction exponents of an exact registry."""
    def part(items: list[tuple[str, Any]]) -> str:
        return " * ".join(name if p == 1 else f"{name}^{_show(Fraction(p))}" for name, p in items)

    items = sorted(unit._units.items())
    up, down = [(n, p) for n, p in items if p > 0], [(n, -p) for n, p in items if p < 0]
    return (part(up) or "1") + (f" / {part(down)}" if down else "")


def calculate(expression: str) -> str:
    """The calculator's answer to ``expression`` as text (what the model reads)."""
    return _show(evaluate(expression))
