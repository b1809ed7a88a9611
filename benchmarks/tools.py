"""Arithmetic word problems with exact answers: the bundled model scored without tools and with the calculator
(run by fourwalls' tool loop), one JSON line.

    python benchmarks/tools.py [--model smollm2-135m-instruct] [--limit N] [--quick]

The set is 13 problem templates x 4 seeded instances (52 problems); each answer is computed with Python's exact
fractions and checked, before any model runs, against the calculator evaluating the problem's own expression (two
independent computations that must agree). A reply is correct when the last number it writes equals the answer
exactly (``1,234``, ``3.5`` and ``7/2`` are read as numbers). With the calculator, the first round must call it
(tool_choice required: a 135M model seldom calls a tool unasked), later rounds may, and the last answers in text;
``calculator_right`` is how often a calculator result already equalled the answer (the model set the sum up right).
``--quick`` runs 2 problems with short answers: a smoke run, not figures.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fourwalls.generate import SamplingParams  # noqa: E402
from fourwalls.store import DEFAULT_MODEL, Store  # noqa: E402
from fourwalls.tools import Toolbox, ToolSpec  # noqa: E402
from fourwalls.tools.calculator import evaluate  # noqa: E402
from fourwalls.tools.loop import answer  # noqa: E402

F = Fraction
# (question, calculator expression, exact answer), the numbers drawn per instance
TEMPLATES = [
    ("A shop sells {a} boxes of pencils with {b} pencils in each box. How many pencils does it sell?",
     "{a} * {b}", lambda a, b: F(a * b)),
    ("A train travels {a} km in {b} hours at a constant speed. What is its speed in km per hour?",
     "{a} / {b}", lambda a, b: F(a, b)),
    ("Maria had {a} dollars and spent {b} dollars on books. How many dollars does she have left?",
     "{a} - {b}", lambda a, b: F(a - b)),
    ("A school has {a} classes of {b} pupils and {c} teachers. How many people are in the school?",
     "{a} * {b} + {c}", lambda a, b, c: F(a * b + c)),
    ("A jacket costs {a} dollars. It is on sale at {b}% off. What is the sale price in dollars?",
     "{a} - {b}% of {a}", lambda a, b: F(a) - F(a * b, 100)),
    ("A farmer has {a} eggs and packs them in cartons of {b}. How many full cartons does he fill?",
     "floor({a} / {b})", lambda a, b: F(a // b)),
    ("A square garden has an area of {sq} square metres. How long is one side in metres?",
     "sqrt({sq})", lambda sq: F(round(sq ** 0.5))),
    ("Tom reads {a} pages a day for {b} days, then {c} more pages. How many pages does he read?",
     "{a} * {b} + {c}", lambda a, b, c: F(a * b + c)),
    ("A bank account of {a} dollars earns {b}% interest once. How many dollars are in it afterwards?",
     "{a} + {b}% of {a}", lambda a, b: F(a) + F(a * b, 100)),
    ("{a} friends share a bill of {c} dollars equally. How many dollars does each one pay?",
     "{c} / {a}", lambda a, c: F(c, a)),
    ("A rectangle is {a} cm long and {b} cm wide. What is its perimeter in cm?",
     "2 * ({a} + {b})", lambda a, b: F(2 * (a + b))),
    ("A factory makes {a} cars a day. How many cars does it make in {b} weeks of 7 days?",
     "{a} * {b} * 7", lambda a, b: F(a * b * 7)),
    ("A cube has edges of {a} cm. What is its volume in cubic cm?", "{a}^3", lambda a: F(a ** 3)),
]


def problems(instances: int = 4, seed: int = 0) -> list[dict]:
    """The problem set, each answer checked against the calculator."""
    rng, out = random.Random(seed), []
    for question, expression, solve in TEMPLATES:
        names = solve.__code__.co_varnames[: solve.__code__.co_argcount]
        for _ in range(instances):
            values = {"a": rng.randint(12, 480), "b": rng.randint(3, 60), "c": rng.randint(100, 5000),
                      "sq": rng.randint(4, 99) ** 2}
            if "c" in names and "{c} / {a}" in expression:
                values["c"] = values["a"] * rng.randint(3, 90)  # a whole share
            if "{a} - {b}" in expression and "%" not in expression:
                values["b"] = rng.randint(1, values["a"] - 1)
            if "%" in expression:
                values["b"] = rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
            exact = solve(**{k: values[k] for k in names})
            expr = expression.format(**values)
            assert evaluate(expr) == exact, (expr, evaluate(expr), exact)  # two computations agree
            out.append({"question": question.format(**values), "expression": expr, "answer": exact})
    return out


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def last_number(text: str) -> Fraction | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def score(lm, items: list[dict], tools: bool, max_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    toolbox = Toolbox([ToolSpec("calculator")]) if tools else None
    right = calculator_right = prompt = completion = calls = 0
    start = time.perf_counter()
    for item in items:
        messages = [{"role": "user", "content": item["question"] + " Answer with the number."}]
        r = answer(lm, messages, params, toolbox, 2 if tools else 0, "required" if tools else "auto",
                   parallel=False)
        right += last_number(r.text) == item["answer"]
        results = [x for rnd in r.rounds for x in rnd.results]
        calculator_right += any(last_number(x.replace("≈", "")) == item["answer"] for x in results)
        calls += sum(len(rnd.calls) for rnd in r.rounds)
        prompt, completion = prompt + r.prompt_tokens, completion + r.completion_tokens
    out = {"accuracy": round(right / len(items), 4), "prompt_tokens": prompt, "completion_tokens": completion,
           "seconds": round(time.perf_counter() - start, 1)}
    if tools:
        out |= {"calls": calls, "calculator_right": round(calculator_right / len(items), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, help="the first N problems only")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="2 problems, short answers: a smoke run")
    args = ap.parse_args()
    items = problems()
    limit, max_tokens = (2, 40) if args.quick else (args.limit, args.max_tokens)
    items = items[::len(items) // limit][:limit] if limit else items
    lm = Store().load(args.model)
    print(json.dumps({"model": args.model, "problems": len(items), "without_tools": score(lm, items, False, max_tokens),
                      "with_calculator": score(lm, items, True, max_tokens)}))


if __name__ == "__main__":
    main()
