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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fourwalls.engine import Request as EngineRequest
from fourwalls.engine.engine import QUEUE_LIMIT
from fourwalls.engine.grammar import Constraint
from fourwalls.errors import FourwallsError, NotFoundError, UsageError
from fourwalls.generate import Delta, SamplingParams, TokenInfo
from fourwalls.rag.answer import Answer, Grounded, ground
from fourwalls.serve.caller import Caller
from fourwalls.serve.common import DONE, CurrentCaller, State, error_from, error_response, sse
from fourwalls.serve.schemas import (
    MAX_STOP,
    AdapterLoad,
    ChatCompletionRequest,
    CompletionRequest,
    RagOptions,
    Sampling,
)
from fourwalls.serve.state import Batch, ServerState
from fourwalls.tokenizer import neutralize

log = logging.getLogger("fourwalls.requests")
router = APIRouter()


def _params(body: Sampling, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
    seed = None if body.seed is None else (body.seed + index) & (2**63 - 1)  # n choices: n different seeds
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                          top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          seed=seed, stop=body.stop_list(), logprobs=logprobs)


async def _start(state: ServerState, caller: Caller, body: Sampling, prompts: list[list[int]],
                 max_tokens: int | None, default_max: int | None, logprobs: int | None) -> Batch:
    """Check a request against the caller, the context window and the grammar, and queue its choices."""
    adapter = _authorize(state, caller, body)
    caller.admit(sum(map(len, prompts)) * body.n)
    if len(body.stop_list()) > MAX_STOP or any(not s for s in body.stop_list()):
        raise UsageError(f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    lengths = []
    for prompt in prompts:
        n = max_tokens or (default_max or state.engine.config.max_len - len(prompt))
        state.engine.check(len(prompt), max(n, 1))
        lengths.append(n)
    constraint = await asyncio.to_thread(_constraint, state, body)  # compiling takes a while: off the event loop
    requests = []
    for prompt, n in zip(prompts, lengths):
        for i in range(body.n):
            own = constraint.copy() if constraint is not None and requests else constraint
            requests.append(EngineRequest(prompt, _params(body, n, logprobs, i), lambda ev: None, adapter, own,
                                          body.ignore_eos))
    try:
        return Batch(state, requests, adapter)
    except UsageError as e:
        if e.code != QUEUE_LIMIT:
            raise
        raise UsageError(str(e), param="prompt" if len(prompts) > 1 else "n", code=e.code) from None


def _authorize(state: ServerState, caller: Caller, body: Sampling) -> str | None:
    """The adapter the request's model names (None: the base model), if the caller may use it."""
    adapter = state.resolve_model(body.model)
    caller.require_model(body.model, adapter)
    return adapter


def _constraint(state: ServerState, body: Sampling) -> Constraint | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return state.grammars.json(None)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise UsageError("response_format json_schema needs json_schema.schema", param="response_format")
    try:
        return state.grammars.json(fmt.json_schema.schema_)
    except FourwallsError as e:
        raise UsageError(str(e), param="response_format") from None


def _headers(state: ServerState, adapter: str | None) -> dict[str, str]:
    if adapter is None:
        return {}
    return {"x-fourwalls-adapter-digest": state.engine.adapters[adapter].digest}


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
    if outs is None:  # nobody reads this; it is counted (499, as nginx logs a client that closed the request)
        return error_response(499, "the client closed the connection before the response was ready")
    return outs


def _wants_usage(body: Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _stream(batch: Batch, frame: Any, usage: bool, caller: Caller) -> AsyncIterator[str]:
    """Server-sent events: one frame per chunk, an optional usage frame, then [DONE]."""
    try:
        async for i, chunk in batch.events():
            yield sse(frame(i, chunk))
        if usage:
            yield sse({**frame(0, None), "choices": [], "usage": _usage(batch)})
    except FourwallsError as e:
        yield sse(json.loads(error_from(e).body))
    finally:
        batch.cancel()  # the client went away (or an error): free the engine's rows now
        caller.spend(batch.tokens)
    yield DONE


def _usage(batch: Batch) -> dict[str, int]:
    p, c = batch.prompt_tokens, batch.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


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
    return {"object": "list", "data": [m for m in data if caller.may_use(m["id"])]}


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
    batch = await _start(state, caller, body, prompts, body.max_tokens, 16, body.logprobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = _headers(state, batch.adapter)
    echo = [texts[i // body.n] if body.echo else "" for i in range(len(batch.requests))]

    def choice(i: int, text: str, tokens: list[TokenInfo], finish: str | None) -> dict[str, Any]:
        lp = _completion_logprobs(state, tokens) if body.logprobs is not None else None
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

    def frame(i: int, c: Delta | None) -> dict[str, Any]:
        choices = [] if c is None else [choice(i, c.text, c.tokens, c.finish_reason)]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices}

    outs = await _respond(batch, body, request, caller, frame, headers)
    if isinstance(outs, Response):
        return outs
    choices = [choice(i, echo[i] + "".join(c.text for c in cs), [t for c in cs for t in c.tokens],
                      cs[-1].finish_reason) for i, cs in enumerate(outs)]
    _log(state, "completion", texts, [c["text"] for c in choices])
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                         "choices": choices, "usage": _usage(batch)}, headers=headers)


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
    tok = state.lm.tokenizer
    control = [] if body.raw_control_tokens else tok.control_tokens
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": neutralize(m.text(), control)}
                for m in body.messages]
    grounded = None
    if body.rag is not None:
        adapter = _authorize(state, caller, body)  # the model and the budgets before any retrieval
        caller.admit(0, count=False)
        grounded = await _ground(state, caller, body.rag, messages)
        if isinstance(grounded, Answer):
            caller.admit(0)
            _log(state, "chat", messages, [grounded.text])
            return _no_answer(body, grounded.text, _headers(state, adapter))
        messages = grounded.messages
    # The model's template runs in the sandbox's child processes, within its time and memory budgets.
    prompt = await asyncio.to_thread(tok.encode_chat, messages, True, state.templates)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    batch = await _start(state, caller, body, [prompt], body.max_completion_tokens or body.max_tokens, None,
                         logprobs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    headers = _headers(state, batch.adapter)

    def lp(tokens: list[TokenInfo]) -> dict[str, Any] | None:
        return {"content": [_chat_logprob(state, t) for t in tokens]} if logprobs is not None else None

    started: set[int] = set()
    started_citations: list[bool] = []

    def frame(i: int, c: Delta | None) -> dict[str, Any]:
        choices = []
        if c is not None:
            delta: dict[str, Any] = {"content": c.text}
            if i not in started:
                started.add(i)
                delta["role"] = "assistant"
            choices = [{"index": i, "delta": delta, "logprobs": lp(c.tokens), "finish_reason": c.finish_reason}]
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "choices": choices}
        if grounded is not None and not started_citations:
            started_citations.append(True)
            out["citations"] = grounded.citations()
        return out

    outs = await _respond(batch, body, request, caller, frame, headers)
    if isinstance(outs, Response):
        return outs
    choices = []
    for i, cs in enumerate(outs):
        tokens = [t for c in cs for t in c.tokens]
        choices.append({"index": i, "message": {"role": "assistant", "content": "".join(c.text for c in cs)},
                        "logprobs": lp(tokens), "finish_reason": cs[-1].finish_reason})
    texts = [c["message"]["content"] for c in choices]
    _log(state, "chat", messages, texts)
    extra = {} if grounded is None else {"citations": grounded.citations(texts)}
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                         "choices": choices, "usage": _usage(batch), **extra}, headers=headers)


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


def _no_answer(body: ChatCompletionRequest, text: str, headers: dict[str, str]) -> Response:
    """The answer given without running the model (nothing the caller may read is relevant): ``text`` in every
    choice, no citations, zero usage."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": body.model}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
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
