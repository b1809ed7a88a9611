"""One assistant turn, whichever API asks for it (chat completions, responses, Anthropic messages): the caller
checked, the prompt rendered with the tools on offer (in the template sandbox, within its budgets), decoding
constrained where tools or a response format demand it, the built-in tools run by the server (model -> tool ->
model, a bounded number of rounds), usage counted over every round, and the generation cancelled as soon as the
client disconnects. Route modules translate their wire format into a :class:`Turn` and :class:`Runner`'s events
back; :func:`queue` is also how /v1/completions queues its choices.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from fourwalls.engine import Request as EngineRequest
from fourwalls.engine.engine import QUEUE_LIMIT
from fourwalls.engine.grammar import Constraint
from fourwalls.engine.profiles import Profile
from fourwalls.errors import UsageError
from fourwalls.generate import SamplingParams, TokenInfo
from fourwalls.serve.caller import Caller
from fourwalls.serve.state import Batch, ServerState
from fourwalls.tokenizer import neutralize
from fourwalls.tools import DEFAULT_ROUNDS, Round, Toolbox, ToolSpec
from fourwalls.tools.format import CallReader, Function, ToolCall, dialect, grammar, render

CHOICES = ("none", "auto", "required")


@dataclass
class Turn:
    """What an API asks of the model, in one shape. ``messages`` are OpenAI chat messages (assistant
    ``tool_calls`` as ToolCall); ``choice`` is none, auto, required or a function's name; ``output_schema`` a JSON
    schema the answer must fit ({"type": "object"} for any JSON object); ``raw_control_tokens`` lets control-token
    strings typed in the messages through as control tokens (by default they are read as plain text)."""

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
    raw_control_tokens: bool = False
    served: Served | None = None  # chosen already (a RAG chat routes its question before retrieving)
    profile: str | None = None  # the application profile the request names (fourwalls.profile)


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


@dataclass(frozen=True)
class Served:
    """What runs a request: one adapter (or None: the base model), or a mix of adapters; ``model`` is what the
    response names, ``routed`` whether the router chose (model "auto")."""

    model: str
    adapter: str | None = None
    mix: dict[str, float] | None = None
    routed: bool = False

    def headers(self, state: ServerState) -> dict[str, str]:
        """Which expert answered (a routed request, or one that names an adapter), and the adapter's digest."""
        out = {"x-fourwalls-adapter": self.model} if self.routed or self.adapter else {}
        if self.adapter is not None:
            out["x-fourwalls-adapter-digest"] = state.engine.adapters[self.adapter].digest
        return out


async def choose(state: ServerState, caller: Caller, model: str, text: str) -> Served:
    """What serves a request for ``model`` whose last user turn is ``text``, if the caller may use it. For
    "auto" the router ranks the experts the caller may use (never another) and the base answers when none fits."""
    if not state.is_auto(model):
        adapter = authorize(state, caller, model)
        return Served(model, adapter)
    base = state.lm.name
    if state.router is None:
        route = None
    else:  # the embedding takes milliseconds of CPU: off the event loop
        route = await asyncio.to_thread(state.router.route, text, caller.may_use)
        state.metrics.route_latency.observe(route.seconds)
    if route is None or not route.mix:
        caller.require_model(base)
    label = base if route is None else route.label(base)
    state.metrics.routes.labels("" if route is None or not route.mix else label).inc()
    if route is None or len(route.mix) < 2:
        return Served(label, route.adapter if route else None, routed=True)
    return Served(label, mix=route.mix, routed=True)


def last_user_turn(messages: list[dict[str, Any]]) -> str:
    """The text the router reads: the conversation's last user turn (else its last message)."""
    users = [m for m in messages if m.get("role") == "user"] or messages[-1:]
    return (users[-1].get("content") or "") if users else ""


def with_server_tools(state: ServerState, builtins: list[ToolSpec]) -> list[ToolSpec]:
    """The request's built-in tools plus those the server offers on every request (``serve --tools``)."""
    named = {b.name for b in builtins}
    return builtins + [t for t in state.tools if t.name not in named]


def neutral(messages: list[dict[str, Any]], control: list[str]) -> list[dict[str, Any]]:
    """``messages`` with the ``control`` strings typed in their content and in their calls' arguments broken apart
    (tokenizer.neutralize), so that no message can open a turn of its own."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = neutralize(m["content"], control)
        if m.get("tool_calls"):
            m["tool_calls"] = [dataclasses.replace(c, arguments=neutralize(c.arguments, control))
                               for c in m["tool_calls"]]
        out.append(m)
    return out


async def queue(state: ServerState, prompts: list[list[int]], params: Callable[[int, int], SamplingParams], n: int,
                max_tokens: int | None, served: Served,
                constraint: Callable[[], Constraint | None] = lambda: None, ignore_eos: bool = False,
                profile: Profile | None = None) -> Batch:
    """Queue ``n`` choices of each prompt: ``params(choice, max_new_tokens)`` for each; ``constraint()`` compiles
    the grammar (None: free text), off the event loop since compiling takes a while, once for all the choices.
    Without ``max_tokens`` a choice may generate up to the ``profile``'s max tokens, and with it no more."""
    if profile is not None and max_tokens is not None and max_tokens > profile.max_tokens:
        raise UsageError(f"max_tokens is {max_tokens}, more than the '{profile.name}' profile allows "
                         f"({profile.max_tokens})", param="max_tokens")
    budgets = []
    for prompt in prompts:
        budget = max_tokens or state.engine.config.max_len - len(prompt)
        if profile is not None and max_tokens is None:
            budget = min(budget, profile.max_tokens)
        state.engine.check(len(prompt), max(budget, 1))
        budgets.append(budget)
    compiled = await asyncio.to_thread(constraint)
    requests = []
    for prompt, budget in zip(prompts, budgets):
        for i in range(n):
            own = compiled.copy() if compiled is not None and requests else compiled
            requests.append(EngineRequest(prompt, params(i, budget), lambda ev: None, served.adapter, own, ignore_eos,
                                          served.mix, profile))
    try:
        return Batch(state, requests, served.adapter, served.model if served.mix else None)
    except UsageError as e:
        if e.code != QUEUE_LIMIT:
            raise
        raise UsageError(str(e), param="prompt" if len(prompts) > 1 else "n", code=e.code) from None


def choice_params(base: SamplingParams, index: int, max_new_tokens: int) -> SamplingParams:
    """``base`` for choice ``index``: n choices get n different seeds."""
    seed = None if base.seed is None else (base.seed + index) & (2**63 - 1)
    return dataclasses.replace(base, max_new_tokens=max_new_tokens, seed=seed, stop=list(base.stop))


async def collect(runner: Runner) -> list[tuple[int, Event]] | None:
    """Every event of the turn, or None if the client disconnected first (the turn is cancelled then)."""
    async with aclosing(runner.events()) as events:
        out = [ev async for ev in events]
    return None if runner.disconnected else out


class Runner:
    """Runs a Turn: ``await start()`` checks everything a client can get wrong (a 4xx before any output), then
    ``events()`` yields (choice, event) for every round; ``prompt_tokens``, ``completion_tokens`` and
    ``cached_tokens`` add up every round, and the caller is charged for each as it ends. With ``request``, each
    round's batch is cancelled as soon as its client disconnects (``disconnected`` says so afterwards)."""

    def __init__(self, state: ServerState, caller: Caller, turn: Turn, request: Request | None = None) -> None:
        self.state, self.caller, self.turn, self.request = state, caller, turn, request
        self.served = Served(turn.model)
        self.profile: Profile | None = None
        self.toolbox: Toolbox | None = None
        self.dialect = dialect(state.lm.tokenizer)
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.rounds: list[Round] = []
        self.disconnected = False
        self._prompt: list[int] = []
        self._batch: Batch | None = None
        self._compiled: dict[str, Constraint | None] = {}  # by tool choice

    @property
    def adapter(self) -> str | None:
        return self.served.adapter

    @property
    def prompt_tokens_queued(self) -> int:
        """The first round's prompt tokens (known before any output)."""
        return len(self._prompt)

    @property
    def offered(self) -> list[Function]:
        return self.turn.functions + (self.toolbox.functions if self.toolbox else [])

    async def start(self) -> None:
        t, state = self.turn, self.state
        self.profile = state.profile(t.profile, self.caller)
        self.served = t.served or await choose(state, self.caller, t.model, last_user_turn(t.messages))
        if not t.raw_control_tokens:
            t = self.turn = dataclasses.replace(t, messages=neutral(t.messages, state.lm.tokenizer.control_tokens))
        _check_messages(t.messages)
        self._check_tools()
        if t.builtins:
            self.toolbox = await asyncio.to_thread(self._toolbox)
        await asyncio.to_thread(self._check_grammars)  # compiling takes a while: off the event loop
        self._prompt = await self._render(t.messages, t.choice)
        self.caller.admit(len(self._prompt) * t.n)
        self._batch = await self._queue(self._prompt, t.choice)  # errors (context length, queue full) before output

    def _toolbox(self) -> Toolbox:
        rag, caller = self.state.rag, self.caller
        for spec in self.turn.builtins:
            if spec.collection:
                rag.collection(spec.collection, caller.groups)
        return Toolbox(self.turn.builtins, lambda: rag.retriever(caller), self.state.lm.tokenizer.control_tokens,
                       caller.groups)

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

    def _check_grammars(self) -> None:
        """Compile the functions' schemas, the output's and the first round's grammar: a bad one is a 400 before
        any output (blocking)."""
        t, grammars = self.turn, self.state.grammars
        for i, f in enumerate(t.functions):
            error = grammars.check_schema(f.schema)
            if error:
                raise UsageError(f"tools[{i}] ({f.name}): invalid parameters schema: {error}", param="tools")
        schema_only = t.choice == "none" or not self.offered  # the grammar is the output schema's alone
        if t.output_schema is not None and not schema_only:
            error = grammars.check_schema(t.output_schema)
            if error:
                raise UsageError(f"invalid JSON schema: {error}", param=t.output_param)
        try:
            self._grammar(t.choice)
        except UsageError as e:
            raise UsageError(str(e), param=t.output_param if schema_only else "tools", code=e.code) from None

    def _grammar(self, choice: str) -> Constraint | None:
        """A fresh constraint for a round under ``choice`` (None: free text), compiled once per choice."""
        if choice not in self._compiled:
            grammars, schema = self.state.grammars, self.turn.output_schema
            if choice == "none" or not self.offered:
                self._compiled[choice] = grammars.json(schema) if schema is not None else None
            else:
                self._compiled[choice] = grammars.lark(grammar(self.offered, self.dialect, choice, self.turn.parallel,
                                                               schema))
        compiled = self._compiled[choice]
        return None if compiled is None else compiled.copy()

    async def _render(self, messages: list[dict[str, Any]], choice: str) -> list[int]:
        tokenizer, sandbox = self.state.lm.tokenizer, self.state.templates
        functions = self.offered if choice != "none" else []

        def work() -> list[int]:  # the model's template runs in the sandbox's children, within its budgets
            return tokenizer.encode(render(tokenizer, messages, functions, sandbox), add_special_tokens=False)

        return await asyncio.to_thread(work)

    async def _queue(self, prompt: list[int], choice: str) -> Batch:
        t = self.turn
        batch = await queue(self.state, [prompt], lambda i, budget: choice_params(t.sampling, i, budget), t.n,
                            t.max_tokens, self.served, lambda: self._grammar(choice), t.ignore_eos, self.profile)
        if self.request is not None:
            batch.watch(self.request)
        return batch

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        t = self.turn
        choice, messages = t.choice, list(t.messages)
        batch = self._batch
        try:
            for round_no in range(t.max_rounds + 1):
                if batch is None:
                    # the last round answers: no more tools, so the loop ends whatever the model wants
                    choice = "none" if round_no == t.max_rounds else t.choice
                    batch = await self._queue(await self._render(messages, choice), choice)
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
                    self.cached_tokens += batch.cached_tokens
                    self.completion_tokens += batch.completion_tokens
                    self.caller.spend(batch.tokens)
                    batch.cancel()
                if batch.disconnected:
                    self.disconnected = True
                    return
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
