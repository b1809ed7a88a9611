"""`fourwalls chat --tools`: the bundled model calls the calculator, fourwalls runs it and shows each round, and
the model answers; bad tool flags are one line and exit 2."""

from __future__ import annotations

import io
import json
import re

import pytest

from fourwalls.cli import main


def chat(monkeypatch, capsys, lines: str, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = main(["chat", *flags])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_calculator_round_is_shown_and_answered(monkeypatch, capsys):
    code, out, _ = chat(monkeypatch, capsys, "What is 1234 * 5678?\nAnd plus one?\n", "--tools", "calculator",
                        "--tool-choice", "required", "--max-tool-rounds", "1", "--temperature", "0",
                        "--max-tokens", "48")
    assert code == 0
    shown = re.findall(r"^\[calculator\] (\{.*\}) -> (.*)$", out, flags=re.M)
    assert len(shown) == 2  # one round per question (required forces the first round of each)
    assert all(json.loads(args)["expression"] and result for args, result in shown)
    assert re.findall(r"^> (.*)$", out, flags=re.M) == ["What is 1234 * 5678?", "And plus one?"]


@pytest.mark.parametrize(("flags", "says"), [
    (["--tools", "shell"], "unknown tool 'shell'"),
    (["--tools", "calculator:x"], "only the documents tool takes a collection"),
    (["--tools", "calculator", "--max-tool-rounds", "0"], "--max-tool-rounds must be between 1 and 8"),
    (["--tool-choice", "required"], "--tool-choice needs --tools"),
])
def test_bad_tool_flags_are_one_line_and_exit_2(monkeypatch, capsys, flags, says):
    code, out, err = chat(monkeypatch, capsys, "hi\n", *flags)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
