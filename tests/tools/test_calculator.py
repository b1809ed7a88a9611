"""The calculator: exact answers, a language that is parsed (never evaluated by Python), and errors that say why."""

from __future__ import annotations

from fractions import Fraction

import pytest

from fourwalls.tools.calculator import CalculatorError, calculate, evaluate


@pytest.mark.parametrize("expression, answer", [
    ("17*23", "391"), ("(17 + 5) * 3", "66"), ("7/2", "3.5"), ("1/3", "1/3 ≈ 0.333333333333"),
    ("7/3 + 1/6", "2.5"), ("0.1 + 0.2", "0.3"), ("2^10", "1024"), ("2**-2", "0.25"), ("sqrt(144)", "12"),
    ("(1/8)^(1/3)", "0.5"), ("cbrt(-27)", "-3"), ("root(81, 4)", "3"), ("15% of 80", "12"),
    ("12.5% of 240", "30"), ("200 + 10%", "220"), ("80 - 25%", "60"), ("10 % 3", "1"), ("1,000,000 / 8", "125000"),
    ("2(3 + 4)", "14"), ("1e3 + 1", "1001"), ("factorial(20)", "2432902008176640000"), ("-3.25 * 4", "-13"),
    ("3 km in m", "3000 meter"), ("90 km/h to m/s", "25 meter / second"), ("100 degC to degF", "212 degree_Fahrenheit"),
    ("2 kg * 3 m / s^2", "6 kilogram * meter / second^2"), ("sqrt(2)", "≈ 1.41421356237"),
])
def test_answers(expression, answer):
    assert calculate(expression) == answer


def test_results_are_exact_fractions_until_an_irrational_step():
    assert evaluate("1/3 + 1/3 + 1/3") == 1 and isinstance(evaluate("1/3"), Fraction)
    assert evaluate("(2/3)^20") == Fraction(2**20, 3**20)  # no float rounding on the way
    assert isinstance(evaluate("sqrt(3)"), float)


@pytest.mark.parametrize("expression, says", [
    ("__import__('os')", "unknown function '__import__'"),
    ("__import__('os').system('true')", "not something the calculator understands"), ("x + 1", "unknown name 'x'"),
    ("(2).real", "not something the calculator understands"), ("[1, 2]", "not something"),
    ("lambda: 1", "not something"), ("1/0", "division by zero"), ("2**10**10", "too large"),
    ("3 km + 2 kg", "cannot compute that"), ("sqrt(-4)", "not real"), ("", "empty"), ("1 +", "cannot parse"),
    ("factorial(100000)", "factorial takes"), ("5 in km", "cannot parse"), ("x" * 2000, "longer than"),
])
def test_refusals_name_the_problem(expression, says):
    with pytest.raises(CalculatorError, match=says):
        calculate(expression)
