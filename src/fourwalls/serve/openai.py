"""The OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models, and adapter loading.

Chat completions take one extension, ``rag``: ``{"collection", "top_k", "mode", "where", "min_similarity"}``. The
last user message is the question; ``rag.answer.ground`` retrieves for it, among the documents the caller may read,
and returns the conversation with the relevant chunks as numbered sources in place of its system message (earlier
turns are kept), together with those sources. The response carries a top-level ``citations`` list: ``{"index",
"source", "title", "heading", "page", "span", "score", "similarity", "text", "cited"}``, ``text`` the quoted chunk,
``cited`` when an answer cites ``[index]``. When streaming, the citations come in the first chunk's top-level
``citations`` field, all with ``cited: false`` (the text is not known yet). When no chunk is relevant, no model
runs: the answer is ``answer.NO_ANSWER``, with ``citations: []`` and zero usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fourwalls.engine.grammar import Constraint
from fourwalls.errors import FourwallsError, NotFoundError, UsageError
from fourwalls.generate import Delta, SamplingParams, TokenInfo
from fourwalls.rag.answer import Answer, Grounded, ground
from fourwalls.serve.caller import Caller
from fourwalls.serve.common import DONE, CurrentCaller, State, client_closed, error_from, sse
from fourwalls.serve.schemas import (
    MAX_STOP,
    AdapterLoad,
    BuiltinTool,
    ChatCompletionRequest,
    CompletionRequest,
    FunctionTool,
    NamedToolChoice,
    RagOptions,
    Sampling,
)
from fourwalls.serve.state import Batch, ServerState
from fourwalls.serve.turns import (
    Call,
    Finished,
    Ran,
    Runner,
    Text,
    Turn,
    choice_params,
    choose,
    collect,
    last_user_turn,
    neutral,
    queue,
    with_server_tools,
)
from fourwalls.tools import Round

log = logging.getLogger("fourwalls.requests")
router = APIRouter()


def sampling(body: Sampling, logprobs: int | None = None) -> SamplingParams:
    """The request's sampling controls (max_new_tokens and per-choice seeds are set when queued)."""
    stop = body.stop_list()
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise UsageError(f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    return SamplingParams(temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                          min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          seed=body.seed, stop=stop, logprobs=logprobs)


def _output_schema(body: Sampling) -> dict[str, Any] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise UsageError("response_format json_schema needs json_schema.schema", param="response_format")
    return fmt.json_schema.schema_


async def _collect(batch: Batch) -> list[list[Delta]] | None:
    """Every choice's chunks, or None if the client disconnected first (the batch is cancelled then)."""
    out: list[list[Delta]] = [[] for _ in batch.requests]
    try:
        async for i, chunk in batch.events():
            out[i].append(chunk)
    finally:
        batch.cancel()
    return None if batch.disconnected else out


async def _respond(batch: Batch, body: Sampling, request: Request, caller: Caller, frame: Any,
                   headers: dict[str, str]) -> Response | list[list[Delta]]:
    """A streaming response of ``frame(choice, chunk)`` events, or (not streaming) every choice's chunks."""
    batch.watch(request)
    if body.stream:
        return StreamingResponse(_stream(batch, frame, _wants_usage(body), caller), media_type="text/event-stream",
                                 headers=headers)
    try:
        outs = await _collect(batch)
    finally:
        caller.spend(batch.tokens)
    return client_closed() if outs is None else outs


def _wants_usage(body: Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _log(state: ServerState, kind: str, prompt: Any, outputs: list[str]) -> None:
    if state.log_requests:
        log.info("%s prompt=%r completion=%r", kind, prompt, outputs)


# --- routes ---------------------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(state: State, caller: CurrentCaller) -> Any:
    base = state.lm.name
    data = [{"id": base, "object": "model", "created": state.created, "owned_by": "fourwalls", "root": base,
             "parent": None, "digest": state.lm.digest, "max_model_len": state.engine.config.max_len}]
    for name, a in list(state.engine.adapters.items()):
        data.append({"id": name, "object": "model", "created": state.created, "owned_by": "fourwalls",
                     "root": base, "parent": base, "digest": a.digest})
    if state.router is not None:  # the router: an expert the caller may use, else the base
        data.append({"id": "auto", "object": "model", "created": state.created, "owned_by": "fourwalls",
                     "root": base, "parent": base, "experts": [n for n in state.router.names if caller.may_use(n)]})
    return {"object": "list", "data": [m for m in data if m["id"] == "auto" or caller.may_use(m["id"])]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State, caller: CurrentCaller) -> Response:
    tok = state.lm.tokenizer
    if body.echo and body.stream:
        raise UsageError("echo is not supported with stream", param="echo")

    def encode() -> tuple[list[str], list[list[int]]]:  # a long prompt takes a while: off the event loop
        if isinstance(body.prompt, str):
            return [body.prompt], [tok.encode(body.prompt)]
        if body.prompt and all(isinstance(x, int) for x in body.prompt):
            vocab = state.lm.config.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise UsageError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return [tok.decode(body.prompt)], [list(body.prompt)]
        texts = [str(p) for p in body.prompt]
        return texts, [tok.encode(t) for t in texts]

    texts, prompts = await asyncio.to_thread(encode)
    if not prompts or any(not p for p in prompts):
        raise UsageError("the prompt is empty", param="prompt")
    if state.is_auto(body.model) and len(texts) > 1:
        raise UsageError("model 'auto' routes one prompt: send the prompts in separate requests", param="prompt")
    served = await choose(state, caller, body.model, texts[0])
    base = sampling(body, body.logprobs)
    profile = state.profile(body.fourwalls.profile, caller)
    caller.admit(sum(map(len, prompts)) * body.n)
    batch = await queue(state, prompts, lambda i, budget: choice_params(base, i, budget), body.n,
                        body.max_tokens or 16, served, _completion_constraint(state, body), body.ignore_eos, profile)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = served.headers(state)
    echo = [texts[i // body.n] if body.echo else "" for i in range(len(batch.requests))]

    def choice(i: int, text: str, tokens: list[TokenInfo], finish: str | None) -> dict[str, Any]:
        lp = _completion_logprobs(state, tokens) if body.logprobs is not None else None
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

    def frame(i: int, c: Delta | None) -> dict[str, Any]:
        choices = [] if c is None else [choice(i, c.text, c.tokens, c.finish_reason)]
        return {"id": rid, "object": "text_completion", "created": created, "model": served.model, "choices": choices}

    outs = await _respond(batch, body, request, caller, frame, headers)
    if isinstance(outs, Response):
        return outs
    choices = [choice(i, echo[i] + "".join(c.text for c in cs), [t for c in cs for t in c.tokens],
                      cs[-1].finish_reason) for i, cs in enumerate(outs)]
    _log(state, "completion", texts, [c["text"] for c in choices])
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": served.model,
                         "choices": choices, "usage": _batch_usage(batch)}, headers=headers)


def _completion_constraint(state: ServerState, body: CompletionRequest) -> Callable[[], Constraint | None]:
    schema = _output_schema(body)

    def constraint() -> Constraint | None:
        if schema is None:
            return None
        try:
            return state.grammars.json(schema)
        except UsageError as e:
            raise UsageError(str(e), param="response_format") from None

    return constraint


def _batch_usage(batch: Batch) -> dict[str, Any]:
    return _usage(batch.prompt_tokens, batch.completion_tokens, batch.cached_tokens)


async def _stream(batch: Batch, frame: Any, usage: bool, caller: Caller) -> AsyncIterator[str]:
    """Server-sent events: one frame per chunk, an optional usage frame, then [DONE]."""
    try:
        async for i, chunk in batch.events():
            yield sse(frame(i, chunk))
        if usage:
            yield sse({**frame(0, None), "choices": [], "usage": _batch_usage(batch)})
    except FourwallsError as e:
        yield sse(json.loads(error_from(e).body))
    finally:
        batch.cancel()  # the client went away (or an error): free the engine's rows now
        caller.spend(batch.tokens)
    yield DONE


CHAT_DESCRIPTION = """OpenAI chat completions.

fourwalls extension: with `"rag": {"collection": ..., "top_k": 5, "mode": "hybrid", "where": {...},
"min_similarity": null}` the last user message is answered from the collection's documents that the API key may
read. The retrieved chunks replace the system message as numbered sources; the response has a top-level
`citations` list of `{"index", "source", "title", "heading", "page", "span", "score", "similarity", "text", "cited"}`
(`text`: the quoted chunk).
**Streaming:** the citations come once, in the first chunk's top-level `citations` field, all with `cited: false`
(the answer is not known yet). Only relevant chunks become sources (at least `min_similarity`, default 0.3, cosine
similar to the question, or containing all of its words); when none is, the model does not run: the answer says the
documents do not tell, with `citations: []` and zero usage."""


@router.post("/v1/chat/completions", description=CHAT_DESCRIPTION)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State,
                           caller: CurrentCaller) -> Response:
    messages = [m.internal() for m in body.messages]
    grounded = served = None
    if body.rag is not None:  # the model and the budgets before any retrieval
        served = await choose(state, caller, body.model, last_user_turn(messages))
        caller.admit(0, count=False)
        if not body.raw_control_tokens:  # rag quotes the question in a prompt of its own (the turn does the rest)
            messages = neutral(messages, state.lm.tokenizer.control_tokens)
        grounded = await _ground(state, caller, body.rag, messages)
        if isinstance(grounded, Answer):
            caller.admit(0)
            _log(state, "chat", messages, [grounded.text])
            return _no_answer(body, grounded.text, served.model, served.headers(state))
        messages = grounded.messages
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    functions = [t.function.internal() for t in body.tools or [] if isinstance(t, FunctionTool)]
    builtins = [t.internal() for t in body.tools or [] if isinstance(t, BuiltinTool)]
    choice = body.tool_choice
    turn = Turn(body.model, messages, sampling(body, logprobs), body.max_completion_tokens or body.max_tokens,
                body.n, functions, with_server_tools(state, builtins),
                choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto",
                body.parallel_tool_calls, _output_schema(body), "response_format", body.max_tool_rounds,
                body.ignore_eos, body.raw_control_tokens, served, profile=body.fourwalls.profile)
    runner = Runner(state, caller, turn, request)
    await runner.start()
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    headers = runner.served.headers(state)
    head = {"id": rid, "created": created, "model": runner.served.model}

    def lp(tokens: list[TokenInfo]) -> dict[str, Any] | None:
        return {"content": [_chat_logprob(state, t) for t in tokens]} if logprobs is not None else None

    if body.stream:
        return StreamingResponse(_chat_stream(runner, head, lp, logprobs is not None, grounded,
                                              _wants_usage(body)),
                                 media_type="text/event-stream", headers=headers)
    events = await collect(runner)
    if events is None:
        return client_closed()
    choices = [_ChatChoice() for _ in range(body.n)]
    for i, ev in events:
        choices[i].add(ev)
    texts = [c.content for c in choices]
    _log(state, "chat", messages, texts)
    extra: dict[str, Any] = {}
    if runner.rounds:
        extra["tool_rounds"] = [_round(r) for r in runner.rounds]
    citations = runner.toolbox.citations(texts) if runner.toolbox else None
    if grounded is not None or citations is not None:
        extra["citations"] = (grounded.citations(texts) if grounded is not None else []) + (citations or [])
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [c.json(i, lp) for i, c in enumerate(choices)],
                         "usage": _runner_usage(runner), **extra}, headers=headers)


class _ChatChoice:
    """One choice's message, put together from the turn's events."""

    def __init__(self) -> None:
        self.content, self.tokens, self.calls, self.finish = "", [], [], "stop"
        self.ran = False  # a round of built-in calls since the last text: the next text starts a paragraph
        self.started = False  # streaming: the first chunk (which carries the role) was sent

    def text(self, text: str) -> str:
        if text and self.ran and self.content:
            text = "\n\n" + text
        if text:
            self.ran = False
        self.content += text
        return text

    def add(self, ev: Any) -> None:
        if isinstance(ev, Text):
            self.text(ev.text)
            self.tokens += ev.tokens
        elif isinstance(ev, Call):
            self.calls.append(ev.call.openai())
        elif isinstance(ev, Ran):
            self.ran = True
        elif isinstance(ev, Finished):
            self.finish = ev.reason

    def json(self, i: int, lp: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content or (None if self.calls else "")}
        if self.calls:
            message["tool_calls"] = self.calls
        return {"index": i, "message": message, "logprobs": lp(self.tokens), "finish_reason": self.finish}


def _runner_usage(runner: Runner) -> dict[str, Any]:
    return _usage(runner.prompt_tokens, runner.completion_tokens, runner.cached_tokens)


def _round(r: Round) -> dict[str, Any]:
    """A round of built-in calls as the response shows it (the fourwalls extension ``tool_rounds``)."""
    return {"tool_calls": [c.openai() for c in r.calls],
            "results": [{"tool_call_id": c.id, "name": c.name, "content": out} for c, out in zip(r.calls, r.results)]}


async def _chat_stream(runner: Runner, head: dict[str, Any], lp: Any, logprobs: bool, grounded: Grounded | None,
                       usage: bool) -> AsyncIterator[str]:
    """Chat chunks: content and tool-call deltas per choice, a ``tool_round`` chunk (no choices) after each round
    of built-in calls, a last chunk with the finish reason, then the usage and [DONE]."""
    chunk = {**head, "object": "chat.completion.chunk"}
    choices: dict[int, _ChatChoice] = {}

    def frame(i: int, delta: dict[str, Any], tokens: list[TokenInfo] | None = None,
              finish: str | None = None) -> str:
        if not choices[i].started:
            choices[i].started = True
            delta = {"role": "assistant", **delta}
        return sse({**chunk, "choices": [{"index": i, "delta": delta, "logprobs": lp(tokens) if tokens else None,
                                          "finish_reason": finish}]})

    try:
        if grounded is not None:  # the sources first, with each choice's role (OpenAI's first chunk)
            for i in range(runner.turn.n):
                choices.setdefault(i, _ChatChoice()).started = True
            yield sse({**chunk, "citations": grounded.citations(),
                       "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(runner.turn.n)]})
        async with aclosing(runner.events()) as events:  # closed early: the turn is cancelled at once
            async for i, ev in events:
                c = choices.setdefault(i, _ChatChoice())
                if isinstance(ev, Text):
                    text = c.text(ev.text)
                    if text or (ev.tokens and logprobs):
                        yield frame(i, {"content": text}, ev.tokens)
                elif isinstance(ev, Call):
                    yield frame(i, {"tool_calls": [{"index": len(c.calls), **ev.call.openai()}]})
                    c.calls.append(ev.call.openai())
                elif isinstance(ev, Ran):
                    c.ran = True
                    found = runner.toolbox.citations([]) if runner.toolbox else None
                    yield sse({**chunk, "choices": [], "tool_round": _round(ev.round),
                               **({"citations": found} if found else {})})
                elif isinstance(ev, Finished):
                    yield frame(i, {}, finish=ev.reason)
        if usage:
            yield sse({**chunk, "choices": [], "usage": _runner_usage(runner)})
    except FourwallsError as e:
        yield sse(json.loads(error_from(e).body))
    yield DONE


async def _ground(state: ServerState, caller: Caller, options: RagOptions,
                  messages: list[dict[str, str]]) -> Grounded | Answer:
    """The conversation grounded in what the caller may read of the collection, or the answer without a model."""
    if messages[-1]["role"] != "user":
        raise UsageError("with rag, the last message must be the user's question", param="messages")
    question = messages[-1]["content"]
    if not question.strip():
        raise UsageError("with rag, the last user message (the question) must not be empty", param="messages")
    rag = state.rag

    def work() -> Grounded | Answer:
        rag.collection(options.collection, caller.groups)
        return ground(rag.retriever(caller), options.collection, question, state.lm.tokenizer, history=messages[:-1],
                      k=options.top_k, mode=options.mode, groups=caller.groups, where=options.where,
                      min_similarity=options.min_similarity)

    return await asyncio.to_thread(work)


def _no_answer(body: ChatCompletionRequest, text: str, model: str, headers: dict[str, str]) -> Response:
    """The answer given without running the model (nothing the caller may read is relevant): ``text`` in every
    choice, no citations, zero usage."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": model}
    usage = _usage(0, 0)
    if not body.stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": "stop"} for i in range(body.n)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage,
                             "citations": []}, headers=headers)

    async def events() -> AsyncIterator[str]:
        choices = [{"index": i, "delta": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": "stop"} for i in range(body.n)]
        yield sse({**head, "object": "chat.completion.chunk", "choices": choices, "citations": []})
        if _wants_usage(body):
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _token_text(state: ServerState, token: int) -> str:
    return state.lm.tokenizer.decode([token], skip_special_tokens=False)


def _chat_logprob(state: ServerState, t: TokenInfo) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(state, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(t.id, t.logprob), "top_logprobs": [entry(i, v) for i, v in (t.top or [])]}


def _completion_logprobs(state: ServerState, tokens: list[TokenInfo]) -> dict[str, Any]:
    texts = [_token_text(state, t.id) for t in tokens]
    offsets, pos = [], 0
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(state, i): v for i, v in (t.top or [])} for t in tokens],
            "text_offset": offsets}


@router.post("/v1/adapters")
async def load_adapter(body: AdapterLoad, state: State, caller: CurrentCaller) -> Any:
    caller.require_admin("loading and unloading adapters")
    if body.name == state.lm.name:
        raise UsageError(f"'{body.name}' is the base model's name", param="name")
    try:
        folder = state.store.adapter_folder(body.path)
    except UsageError as e:
        raise UsageError(str(e), param="path") from None
    adapter = await asyncio.to_thread(state.engine.add_adapter, body.name, folder)
    return {"id": adapter.name, "object": "model", "parent": state.lm.name, "digest": adapter.digest}


@router.delete("/v1/adapters/{name}")
async def unload_adapter(name: str, state: State, caller: CurrentCaller) -> Any:
    caller.require_admin("loading and unloading adapters")
    if name not in state.engine.adapters:
        raise NotFoundError(f"adapter '{name}' is not loaded")
    state.engine.remove_adapter(name)
    return {"id": name, "object": "model", "deleted": True}
