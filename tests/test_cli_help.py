"""Help texts tell the truth: every "(default X)" a flag's help states is the default the flag really has."""

from __future__ import annotations

import argparse
import re

from fourwalls.cli import CLI_SAMPLING, build_parser
from fourwalls.rag.cli import ASK_SAMPLING

STATED = re.compile(r"\(default (-?[0-9.]+)\)")


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every command and subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))


def test_every_stated_numeric_default_is_the_flags_default():
    checked = 0
    for words, parser in commands(build_parser()):
        for action in parser._actions:
            m = STATED.search(action.help or "")
            if m and action.default is not None and not isinstance(action.default, bool):
                assert float(m.group(1)) == float(action.default), (words, action.option_strings, action.help)
                checked += 1
    assert checked > 30


def test_rag_ask_answers_greedily_unless_told_and_says_so():
    parser = build_parser()
    ask = parser.parse_args(["rag", "ask", "question?", "-c", "handbook"])
    generate = parser.parse_args(["generate", "hi"])
    assert (ask.temperature, ask.repeat_penalty) == (ASK_SAMPLING["temperature"], ASK_SAMPLING["repeat_penalty"])
    assert (generate.temperature, generate.repeat_penalty) == (CLI_SAMPLING["temperature"],
                                                               CLI_SAMPLING["repeat_penalty"])
    assert (ask.top_k, ask.max_tokens) == (generate.top_k, generate.max_tokens)
    helps = {a.dest: a.help for words, p in commands(parser) if words == ("rag", "ask") for a in p._actions}
    assert helps["temperature"] == "0 is greedy (default 0.0)" and helps["repeat_penalty"] == "1 disables (default 1.1)"
