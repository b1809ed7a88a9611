"""The built-in tool loop in this process, without a server (``fourwalls chat --tools``, benchmarks/tools.py):
model -> tools -> model, at most ``max_rounds`` rounds of calls, the last round answering in text. The server's
loop (serve/turns.py) is the same, on the batching engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fourwalls.engine.grammar import Grammars
from fourwalls.generate import SamplingParams, Session, stream
from fourwalls.store import LoadedModel
from fourwalls.tools import Round, Toolbox
from fourwalls.tools.format import CallReader, dialect, grammar, render


@dataclass
class TurnResult:
    """What one answer added to the conversation, its rounds of tool calls, and the tokens over every round."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        """The final answer's text."""
        return self.messages[-1]["content"] if self.messages else ""


def answer(lm: LoadedModel, messages: list[dict[str, Any]], params: SamplingParams, toolbox: Toolbox | None,
           max_rounds: int, choice: str = "auto", session: Session | None = None, parallel: bool = True,
           show: Callable[[str], None] = lambda _: None,
           ran: Callable[[Round], None] = lambda _: None) -> TurnResult:
    """Answer ``messages``; with tools, run the model's calls and let it go on, at most ``max_rounds`` times
    (``choice`` required: the first round must call a tool, constrained by the calls' grammar; ``parallel``: more
    than one call per round). ``show`` gets the text as it streams, ``ran`` each round once its tools have
    answered. Calls completed before the token budget ran out are run; a call cut short is text."""
    tok, out = lm.tokenizer, TurnResult()
    grammars = Grammars(tok, lm.config.vocab_size, lm.config.eos_token_ids) if toolbox else None
    for round_no in range(max_rounds + 1):
        functions = toolbox.functions if toolbox and round_no < max_rounds else []
        ids = tok.encode(render(tok, messages + out.messages, functions), add_special_tokens=False)
        out.prompt_tokens += len(ids)
        reader = CallReader(dialect(tok)) if functions else None
        forced = choice if round_no == 0 else "auto"
        constraint = None
        if grammars and functions:
            constraint = grammars.lark(grammar(functions, dialect(tok), forced, parallel))
        text, calls, finish = "", [], "stop"
        for chunk in stream(lm.model, tok, ids, params, lm.config.eos_token_ids, session, constraint):
            out.completion_tokens += len(chunk.tokens)
            shown, done = reader.feed(chunk.text) if reader else (chunk.text, [])
            if chunk.finish_reason and reader:
                more, late = reader.close()
                shown, done = shown + more, done + late
            show(shown)
            text, calls, finish = text + shown, calls + done, chunk.finish_reason or finish
        if not calls or toolbox is None:
            out.messages.append({"role": "assistant", "content": text})
            return out
        done_round = Round(calls, [toolbox.run(c) for c in calls])
        out.rounds.append(done_round)
        ran(done_round)
        out.messages += done_round.messages(text)
    return out
