"""The OpenAI Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

Input is a string or a list of items (messages, ``function_call``, ``function_call_output``); output is a list of
items: ``message`` (with ``output_text``), ``function_call`` for the client to run, and ``mcp_call`` (server label
``fourwalls``) for each built-in tool the server ran, with its output. With ``store`` (the default) the response and
its conversation are kept per API key, so ``previous_response_id`` continues it without resending it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fourwalls.errors import FourwallsError, UsageError
from fourwalls.generate import SamplingParams
from fourwalls.serve.common import CurrentCaller, State, client_closed, error_body
from fourwalls.serve.schemas import BuiltinTool, FlatFunctionTool, NamedFunctionChoice, ResponsesRequest
from fourwalls.serve.turns import Call, Finished, Ran, Runner, Text, Turn, collect, with_server_tools
from fourwalls.tools.format import ToolCall

router = APIRouter()


def _owner(caller: Any) -> str:
    return caller.name or ""


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversation items (input or output, as the API spells them) as the chat messages of a Turn."""
    out: list[dict[str, Any]] = []

    def call(c: ToolCall) -> None:
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant":  # text then calls: one assistant turn
            last.setdefault("tool_calls", []).append(c)
        else:
            out.append({"role": "assistant", "content": "", "tool_calls": [c]})

    for it in items:
        kind = it.get("type", "message")
        if kind == "message":
            content = it["content"]
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            out.append({"role": "system" if it["role"] == "developer" else it["role"], "content": text})
        elif kind == "function_call":
            call(ToolCall(it["call_id"], it["name"], it["arguments"]))
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
        elif kind == "mcp_call":
            call(ToolCall(it["id"], it["name"], it["arguments"]))
            out.append({"role": "tool", "tool_call_id": it["id"], "content": it.get("output") or ""})
    return out


class _Output:
    """The response's output items, built from a turn's events; each change also returns the stream events that
    tell it (``response.output_item.added``, ``response.output_text.delta``, ...)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None  # the message item text goes into, while it is open
        self.status, self.incomplete = "completed", None

    def text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.message is None:
            self.message = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                            "role": "assistant", "content": []}
            self.items.append(self.message)
            events.append(self._item("response.output_item.added", self.message))
            part = {"type": "output_text", "text": "", "annotations": []}
            self.message["content"].append(part)
            events.append({"type": "response.content_part.added", **self._where(), "part": dict(part)})
        self.message["content"][0]["text"] += text
        events.append({"type": "response.output_text.delta", **self._where(), "delta": text, "logprobs": []})
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.message["id"], "output_index": len(self.items) - 1, "content_index": 0}

    def _item(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        return {"type": kind, "output_index": self.items.index(item), "item": json.loads(json.dumps(item))}

    def close_message(self) -> list[dict[str, Any]]:
        if self.message is None:
            return []
        m, where = self.message, self._where()
        part = m["content"][0]
        m["status"] = "completed"
        self.message = None
        return [{"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", **where, "part": part},
                self._item("response.output_item.done", m)]

    def call(self, c: ToolCall) -> list[dict[str, Any]]:
        events = self.close_message()
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": c.id, "name": c.name,
                "arguments": "", "status": "in_progress"}
        self.items.append(item)
        events.append(self._item("response.output_item.added", item))
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        item.update(arguments=c.arguments, status="completed")
        return events + [{"type": "response.function_call_arguments.delta", **where, "delta": c.arguments},
                         {"type": "response.function_call_arguments.done", **where, "arguments": c.arguments},
                         self._item("response.output_item.done", item)]

    def ran(self, calls: list[ToolCall], results: list[str]) -> list[dict[str, Any]]:
        events = self.close_message()
        for c, result in zip(calls, results):
            item = {"type": "mcp_call", "id": c.id, "server_label": "fourwalls", "name": c.name,
                    "arguments": c.arguments, "output": None, "error": None, "status": "in_progress"}
            self.items.append(item)
            events.append(self._item("response.output_item.added", item))
            item.update(output=result, status="completed")
            events.append(self._item("response.output_item.done", item))
        return events

    def finish(self, reason: str) -> list[dict[str, Any]]:
        if reason == "length":
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
        return self.close_message()


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, state: State, caller: CurrentCaller) -> Response:
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id:
        try:
            _, earlier = await asyncio.to_thread(state.responses.get, _owner(caller), body.previous_response_id)
        except FourwallsError as e:
            e.param = "previous_response_id"
            raise
    items = ([{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str)
             else [i.model_dump(exclude_none=True, by_alias=True) for i in body.input])
    if not items:
        raise UsageError("input is empty", param="input")
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + to_messages(
        earlier + items)
    fmt = body.text.format if body.text else None
    schema = None
    if fmt is not None and fmt.type == "json_object":
        schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise UsageError("text.format json_schema needs a schema", param="text.format")
        schema = fmt.schema_
    choice = body.tool_choice
    turn = Turn(body.model, messages, SamplingParams(temperature=body.temperature, top_p=body.top_p),
                body.max_output_tokens, 1,
                [t.internal() for t in body.tools or [] if isinstance(t, FlatFunctionTool)],
                with_server_tools(state, [t.internal() for t in body.tools or [] if isinstance(t, BuiltinTool)]),
                choice.name if isinstance(choice, NamedFunctionChoice) else choice or "auto",
                body.parallel_tool_calls, schema, "text.format", body.max_tool_rounds, profile=body.fourwalls.profile)
    runner = Runner(state, caller, turn, request)
    await runner.start()
    response = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
                "status": "in_progress", "model": runner.served.model, "output": [],
                "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
                "tool_choice": choice.model_dump() if isinstance(choice, NamedFunctionChoice) else choice or "auto",
                "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
                "text": {"format": fmt.model_dump(exclude_none=True, by_alias=True) if fmt else {"type": "text"}},
                "store": body.store, "metadata": body.metadata or {}, "error": None, "incomplete_details": None,
                "usage": None, "user": body.user}
    out = _Output()

    def step(ev: Any) -> list[dict[str, Any]]:
        if isinstance(ev, Text):
            return out.text(ev.text) if ev.text else []
        if isinstance(ev, Call):
            return out.call(ev.call)
        if isinstance(ev, Ran):
            return out.ran(ev.round.calls, ev.round.results)
        if isinstance(ev, Finished):
            return out.finish(ev.reason)
        return []

    async def done() -> dict[str, Any]:
        prompt, completion = runner.usage()
        response.update(status=out.status, incomplete_details=out.incomplete, output=out.items,
                        usage={"input_tokens": prompt, "output_tokens": completion,
                               "total_tokens": prompt + completion,
                               "input_tokens_details": {"cached_tokens": runner.cached_tokens},
                               "output_tokens_details": {"reasoning_tokens": 0}})
        if body.store:
            await asyncio.to_thread(state.responses.put, _owner(caller), response, earlier + items + out.items)
        return response

    if body.stream:
        return StreamingResponse(_stream(runner, response, step, done), media_type="text/event-stream",
                                 headers=runner.served.headers(state))
    events = await collect(runner)
    if events is None:
        return client_closed()
    for _, ev in events:
        step(ev)
    return JSONResponse(await done(), headers=runner.served.headers(state))


async def _stream(runner: Runner, response: dict[str, Any], step: Any, done: Any) -> AsyncIterator[str]:
    """The Responses event sequence: created, in_progress, the output's events, then completed (or incomplete)."""
    seq = 0

    def event(obj: dict[str, Any]) -> str:
        nonlocal seq
        seq += 1
        return f"event: {obj['type']}\ndata: {json.dumps({**obj, 'sequence_number': seq - 1}, ensure_ascii=False)}\n\n"

    yield event({"type": "response.created", "response": dict(response)})
    yield event({"type": "response.in_progress", "response": dict(response)})
    try:
        async with aclosing(runner.events()) as events:  # closed early: the turn is cancelled at once
            async for _, ev in events:
                for obj in step(ev):
                    yield event(obj)
        final = await done()
        yield event({"type": "response.completed" if final["status"] == "completed" else "response.incomplete",
                     "response": final})
    except FourwallsError as e:
        body = error_body(e.http_status, str(e), e.param, e.code)["error"]
        yield event({"type": "error", "code": body["code"], "message": body["message"], "param": body["param"]})


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, state: State, caller: CurrentCaller) -> Any:
    response, _ = await asyncio.to_thread(state.responses.get, _owner(caller), response_id)
    return response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: State, caller: CurrentCaller) -> Any:
    await asyncio.to_thread(state.responses.delete, _owner(caller), response_id)
    return {"id": response_id, "object": "response", "deleted": True}
