"""One assistant turn, whichever API asks for it (chat completions, responses, Anthropic messages): the caller
checked, the prompt rendered with the tools on offer, decoding constrained where tools or a response format demand
it, the built-in tools run by the server (model -> tool -> model, a bounded number of rounds), and usage counted
over every round. Route modules translate their wire format into a :class:`Turn` and :class:`Runner`'s events back.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from fourwalls.engine import Request as EngineRequest
from fourwalls.engine.grammar import Constraint
from fourwalls.errors import UsageError
from fourwalls.generate import SamplingParams, TokenInfo
from fourwalls.rag.answer import control_tokens
from fourwalls.serve.caller import Caller
from fourwalls.serve.state import Batch, ServerState
from fourwalls.tools import DEFAULT_ROUNDS, Round, Toolbox, ToolSpec
from fourwalls.tools.format import CallReader, Function, ToolCall, dialect, grammar, render

CHOICES = ("none", "auto", "required")


@dataclass
class Turn:
    """What an API asks of the model, in one shape. ``messages`` are OpenAI chat messages (assistant
    ``tool_calls`` as ToolCall); ``choice`` is none, auto, required or a function's name; ``output_schema`` a JSON
    schema the answer must fit ({"type": "object"} for any JSON object)."""

    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    max_tokens: int | None = None
    n: int = 1
    functions: list[Function] = field(default_factory=list)
    builtins: list[ToolSpec] = field(default_factory=list)
    choice: str = "auto"
    parallel: bool = True
    output_schema: dict[str, Any] | None = None
    output_param: str = "response_format"
    max_rounds: int = DEFAULT_ROUNDS
    ignore_eos: bool = False


@dataclass
class Text:
    """Text to show (may be empty when only ``tokens`` are new: text held back while a call may be starting)."""

    text: str
    tokens: list[TokenInfo]


@dataclass
class Call:
    """A call for the client to run."""

    call: ToolCall


@dataclass
class Ran:
    """A round of built-in calls the server ran, with their results."""

    round: Round


@dataclass
class Finished:
    reason: str  # stop, length, tool_calls
    stop: str | None = None  # the stop sequence that ended the output


Event = Text | Call | Ran | Finished


def authorize(state: ServerState, caller: Caller, model: str) -> str | None:
    """The adapter the request's model names (None: the base model), if the caller may use it."""
    adapter = state.resolve_model(model)
    caller.require_model(model, adapter)
    return adapter


def with_server_tools(state: ServerState, builtins: list[ToolSpec]) -> list[ToolSpec]:
    """The request's built-in tools plus those the server offers on every request (``serve --tools``)."""
    named = {b.name for b in builtins}
    return builtins + [t for t in state.tools if t.name not in named]


def queue(state: ServerState, prompts: list[list[int]], params: Callable[[int, int], SamplingParams], n: int,
          max_tokens: int | None, adapter: str | None, constraint: Callable[[], Constraint | None],
          ignore_eos: bool = False) -> Batch:
    """Queue ``n`` choices of each prompt: ``params(choice, max_new_tokens)`` for each, ``constraint()`` a fresh
    grammar state for each (None: free text)."""
    requests = []
    for prompt in prompts:
        budget = max_tokens or state.engine.config.max_len - len(prompt)
        state.engine.check(len(prompt), max(budget, 1))
        for i in range(n):
            requests.append(EngineRequest(prompt, params(i, budget), lambda ev: None, adapter, constraint(),
                                          ignore_eos))
    return Batch(state, requests, adapter)


def choice_params(base: SamplingParams, index: int, max_new_tokens: int) -> SamplingParams:
    """``base`` for choice ``index``: n choices get n different seeds."""
    seed = None if base.seed is None else (base.seed + index) & (2**63 - 1)
    return dataclasses.replace(base, max_new_tokens=max_new_tokens, seed=seed, stop=list(base.stop))


async def collect(events: AsyncIterator[Any], request: Request) -> list[Any]:
    """Every event; gives up (cancelling the generation) if the client disconnects meanwhile."""
    out: list[Any] = []
    it = events.__aiter__()
    try:
        while True:
            task = asyncio.ensure_future(it.__anext__())
            while not task.done():
                await asyncio.wait([task], timeout=1.0)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    raise asyncio.CancelledError
            try:
                out.append(task.result())
            except StopAsyncIteration:
                return out
    finally:
        if hasattr(it, "aclose"):
            await it.aclose()


class Runner:
    """Runs a Turn: ``await start()`` checks everything a client can get wrong (a 4xx before any output), then
    ``events()`` yields (choice, event) for every round; ``prompt_tokens``/``completion_tokens`` add up every
    round, and the caller is charged for each as it ends."""

    def __init__(self, state: ServerState, caller: Caller, turn: Turn) -> None:
        self.state, self.caller, self.turn = state, caller, turn
        self.adapter: str | None = None
        self.toolbox: Toolbox | None = None
        self.dialect = dialect(state.lm.tokenizer)
        self.prompt_tokens = self.completion_tokens = 0
        self.rounds: list[Round] = []
        self._prompt: list[int] = []
        self._batch: Batch | None = None

    @property
    def prompt_tokens_queued(self) -> int:
        """The first round's prompt tokens (known before any output)."""
        return len(self._prompt)

    @property
    def offered(self) -> list[Function]:
        return self.turn.functions + (self.toolbox.functions if self.toolbox else [])

    async def start(self) -> None:
        t, state = self.turn, self.state
        self.adapter = authorize(state, self.caller, t.model)
        _check_messages(t.messages)
        self._check_tools()
        if t.builtins:
            self.toolbox = await asyncio.to_thread(self._toolbox)
        self._prompt = await self._render(t.messages, t.choice)
        self.caller.admit(len(self._prompt) * t.n)
        self._batch = self._queue(self._prompt, t.choice)  # errors (context length, queue full) before output

    def _toolbox(self) -> Toolbox:
        rag = self.state.rag
        for spec in self.turn.builtins:
            if spec.collection:
                rag.collection(spec.collection)
        return Toolbox(self.turn.builtins, rag.retriever, control_tokens(self.state.lm.tokenizer), self.caller.groups)

    def _check_tools(self) -> None:
        t = self.turn
        names = [f.name for f in t.functions] + [b.name for b in t.builtins]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise UsageError(f"the tool {duplicate!r} is offered twice", param="tools")
        if t.choice not in CHOICES and t.choice not in names:
            raise UsageError(f"tool_choice names {t.choice!r}, which is not among the tools offered",
                             param="tool_choice")
        if t.choice == "required" and not names:
            raise UsageError("tool_choice 'required' needs tools", param="tool_choice")
        if t.builtins and t.n > 1:
            raise UsageError("built-in tools run for one choice: n must be 1", param="n")
        for i, f in enumerate(t.functions):
            error = self.state.grammars.check_schema(f.schema)
            if error:
                raise UsageError(f"tools[{i}] ({f.name}): invalid parameters schema: {error}", param="tools")
        if t.output_schema is not None:
            error = self.state.grammars.check_schema(t.output_schema)
            if error:
                raise UsageError(f"invalid JSON schema: {error}", param=t.output_param)

    async def _render(self, messages: list[dict[str, Any]], choice: str) -> list[int]:
        tokenizer = self.state.lm.tokenizer
        functions = self.offered if choice != "none" else []
        text = await asyncio.to_thread(render, tokenizer, messages, functions)
        return tokenizer.encode(text, add_special_tokens=False)

    def _constraint(self, choice: str) -> Callable[[], Constraint | None]:
        grammars, schema = self.state.grammars, self.turn.output_schema
        if choice == "none" or not self.offered:
            return (lambda: grammars.json(schema)) if schema is not None else (lambda: None)
        text = grammar(self.offered, self.dialect, choice, self.turn.parallel, schema)
        grammars.lark(text)  # compiled once here, so that a bad grammar is a 400 before any output
        return lambda: grammars.lark(text)

    def _queue(self, prompt: list[int], choice: str) -> Batch:
        t = self.turn
        return queue(self.state, [prompt], lambda i, budget: choice_params(t.sampling, i, budget), t.n,
                     t.max_tokens, self.adapter, self._constraint(choice), t.ignore_eos)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        t = self.turn
        choice, messages = t.choice, list(t.messages)
        batch = self._batch
        try:
            for round_no in range(t.max_rounds + 1):
                if batch is None:
                    # the last round answers: no more tools, so the loop ends whatever the model wants
                    choice = "none" if round_no == t.max_rounds else t.choice
                    batch = self._queue(await self._render(messages, choice), choice)
                self._batch = batch
                tools_on = choice != "none" and bool(self.offered)
                readers = [CallReader(self.dialect) for _ in batch.requests] if tools_on else None
                texts = ["" for _ in batch.requests]
                calls: list[list[ToolCall]] = [[] for _ in batch.requests]
                finish: list[tuple[str, str | None]] = [("stop", None)] * len(batch.requests)
                try:
                    async for i, delta in batch.events():
                        text, done = delta.text, []
                        if readers is not None:
                            text, done = readers[i].feed(delta.text)
                            if delta.finish_reason:
                                more, late = readers[i].close()
                                text, done = text + more, done + late
                        texts[i] += text
                        calls[i] += done
                        if text or delta.tokens:
                            yield i, Text(text, delta.tokens)
                        if delta.finish_reason:
                            finish[i] = (delta.finish_reason, delta.stop)
                finally:
                    self.prompt_tokens += batch.prompt_tokens
                    self.completion_tokens += batch.completion_tokens
                    self.caller.spend(batch.tokens)
                    batch.cancel()
                batch = None
                builtin = [c for c in calls[0] if self.toolbox and c.name in self.toolbox]
                if builtin:  # calls completed before a length cut run too; a call cut short was text
                    results = [await asyncio.to_thread(self.toolbox.run, c) for c in builtin]  # type: ignore[union-attr]
                    done_round = Round(builtin, results)
                    self.rounds.append(done_round)
                    yield 0, Ran(done_round)
                    if len(builtin) == len(calls[0]):
                        messages += done_round.messages(texts[0])
                        t = dataclasses.replace(t, choice="auto" if t.choice != "none" else "none")  # forced once
                        continue
                for i in range(len(calls)):
                    client = [c for c in calls[i] if not (self.toolbox and c.name in self.toolbox)]
                    for c in client:
                        yield i, Call(c)
                    reason, stop = finish[i]
                    yield i, Finished("tool_calls" if client else reason, stop if not client else None)
                return
        finally:
            if self._batch is not None:
                self._batch.cancel()

    def usage(self) -> tuple[int, int]:
        return self.prompt_tokens, self.completion_tokens


def _check_messages(messages: list[dict[str, Any]]) -> None:
    """Every tool result answers a call made earlier in the conversation."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            called.add(c.id)
        if m["role"] == "tool":
            if not m.get("tool_call_id"):
                raise UsageError(f"messages[{i}]: a tool message needs tool_call_id", param="messages")
            if m["tool_call_id"] not in called:
                raise UsageError(f"messages[{i}]: tool_call_id {m['tool_call_id']!r} answers no earlier tool call",
                                 param="messages")

