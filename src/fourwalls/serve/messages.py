"""Anthropic's Messages API: POST /v1/messages, for clients that speak only it.

``system``, ``messages`` with text, ``tool_use`` and ``tool_result`` blocks, ``max_tokens``, ``stop_sequences``,
``temperature``, ``top_p``, ``top_k``, ``tools`` (``input_schema`` functions, and fourwalls' built-ins as
``{"type": "fourwalls", "name": "calculator"}``), ``tool_choice`` and ``stream`` with Anthropic's events. A built-in
tool the server ran shows as a ``server_tool_use`` block followed by a ``fourwalls_tool_result`` block. The
``x-api-key`` header names the same API keys as ``Authorization: Bearer``; errors come in Anthropic's shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from fourwalls.errors import FourwallsError, UsageError
from fourwalls.generate import SamplingParams
from fourwalls.serve.common import CurrentCaller, State, anthropic_error_body, client_closed
from fourwalls.serve.schemas import BuiltinTool, Extensions, FunctionName, MaxRounds
from fourwalls.serve.turns import Call, Finished, Ran, Runner, Text, Turn, collect, with_server_tools
from fourwalls.tools.format import Function, ToolCall

router = APIRouter()
MAX_STOP_SEQUENCES = 16
STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens", "stop": "end_turn"}


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_use", "server_tool_use"]
    id: str = Field(..., min_length=1, max_length=128)
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_result", "fourwalls_tool_result"]
    tool_use_id: str = Field(..., min_length=1, max_length=128)
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    def text(self) -> str:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(b.text for b in content)
        return f"error: {text}" if self.is_error else text


def _block_type(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    if not isinstance(kind, str):  # fuzzers send any JSON here: no tag is a 400, not a crash
        return None
    return {"server_tool_use": "tool_use", "fourwalls_tool_result": "tool_result"}.get(kind, kind)


Block = Annotated[Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
                  | Annotated[ToolResultBlock, Tag("tool_result")], Discriminator(_block_type)]


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[Block]


class CustomTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["custom"] = "custom"
    name: FunctionName
    description: str = ""
    input_schema: dict[str, Any]

    def internal(self) -> Function:
        return Function(self.name, self.description, self.input_schema)


def _tool_type(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "fourwalls" if kind == "fourwalls" else "custom"


AnthropicTool = Annotated[Annotated[CustomTool, Tag("custom")] | Annotated[BuiltinTool, Tag("fourwalls")],
                          Discriminator(_tool_type)]


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int = Field(..., ge=1)
    messages: list[AnthropicMessage] = Field(..., min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    fourwalls: Extensions = Field(default_factory=Extensions, description="fourwalls extensions")
    max_tool_rounds: int = MaxRounds


def to_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as a Turn's chat messages: tool results become tool messages, server tool blocks a built-in
    call with its result."""
    system = body.system if isinstance(body.system, str) or body.system is None else "".join(
        b.text for b in body.system)
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in body.messages:
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "user":
            out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                    for b in blocks if isinstance(b, ToolResultBlock)]
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append({"role": "user", "content": text})
            continue
        turn: dict[str, Any] | None = None
        for b in blocks:
            if turn is None and not isinstance(b, ToolResultBlock):
                turn = {"role": "assistant", "content": ""}
                out.append(turn)
            if isinstance(b, TextBlock):
                turn["content"] += b.text  # type: ignore[index]
            elif isinstance(b, ToolUseBlock):
                call = ToolCall(b.id, b.name, json.dumps(b.input))
                turn.setdefault("tool_calls", []).append(call)  # type: ignore[union-attr]
            else:  # a built-in's result, inside the assistant's own turn
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()})
                turn = None
    return out


class _Content:
    """The reply's content blocks, built from a turn's events; each change also returns the stream events that
    tell it (content_block_start, content_block_delta, content_block_stop)."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.open = False  # the last block is a text block still growing

    def text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if not self.open:
            self.blocks.append({"type": "text", "text": ""})
            self.open = True
            events.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                           "content_block": {"type": "text", "text": ""}})
        self.blocks[-1]["text"] += text
        return events + [{"type": "content_block_delta", "index": len(self.blocks) - 1,
                          "delta": {"type": "text_delta", "text": text}}]

    def close(self) -> list[dict[str, Any]]:
        if not self.open:
            return []
        self.open = False
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def tool_use(self, c: ToolCall, kind: str = "tool_use") -> list[dict[str, Any]]:
        events = self.close()
        self.blocks.append({"type": kind, "id": c.id, "name": c.name, "input": c.args})
        i = len(self.blocks) - 1
        return events + [{"type": "content_block_start", "index": i,
                          "content_block": {"type": kind, "id": c.id, "name": c.name, "input": {}}},
                         {"type": "content_block_delta", "index": i,
                          "delta": {"type": "input_json_delta", "partial_json": c.arguments}},
                         {"type": "content_block_stop", "index": i}]

    def ran(self, calls: list[ToolCall], results: list[str]) -> list[dict[str, Any]]:
        events = []
        for c, result in zip(calls, results):
            events += self.tool_use(c, "server_tool_use")
            block = {"type": "fourwalls_tool_result", "tool_use_id": c.id, "content": result}
            self.blocks.append(block)
            i = len(self.blocks) - 1
            events += [{"type": "content_block_start", "index": i, "content_block": block},
                       {"type": "content_block_stop", "index": i}]
        return events


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request, state: State, caller: CurrentCaller) -> Response:
    choice = body.tool_choice
    mode = "auto" if choice is None else {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, "")
    if choice is not None and choice.type == "tool":
        if not choice.name:
            raise UsageError("tool_choice of type 'tool' needs the tool's name", param="tool_choice")
        mode = choice.name
    params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            stop=list(body.stop_sequences or []))
    turn = Turn(body.model, to_messages(body), params, body.max_tokens, 1,
                [t.internal() for t in body.tools or [] if isinstance(t, CustomTool)],
                with_server_tools(state, [t.internal() for t in body.tools or [] if isinstance(t, BuiltinTool)]),
                mode, not (choice and choice.disable_parallel_tool_use), None, "tools",
                body.max_tool_rounds, profile=body.fourwalls.profile)
    runner = Runner(state, caller, turn, request)
    await runner.start()
    message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
               "model": runner.served.model, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": runner.prompt_tokens_queued, "output_tokens": 0}}
    content = _Content()

    def step(ev: Any) -> list[dict[str, Any]]:
        if isinstance(ev, Text):
            return content.text(ev.text) if ev.text else []
        if isinstance(ev, Call):
            return content.tool_use(ev.call)
        if isinstance(ev, Ran):
            return content.ran(ev.round.calls, ev.round.results)
        if isinstance(ev, Finished):
            message["stop_reason"] = "stop_sequence" if ev.stop else STOP_REASONS.get(ev.reason, "end_turn")
            message["stop_sequence"] = ev.stop
            return content.close()
        return []

    def done() -> dict[str, Any]:
        prompt, completion = runner.usage()
        message.update(content=content.blocks, usage={"input_tokens": prompt, "output_tokens": completion,
                                                             "cache_read_input_tokens": runner.cached_tokens})
        return message

    if body.stream:
        return StreamingResponse(_stream(runner, message, step, done), media_type="text/event-stream",
                                 headers=runner.served.headers(state))
    events = await collect(runner)
    if events is None:
        return client_closed(request.url.path)
    for _, ev in events:
        step(ev)
    return JSONResponse(done(), headers=runner.served.headers(state))


async def _stream(runner: Runner, message: dict[str, Any], step: Any, done: Any) -> AsyncIterator[str]:
    def event(obj: dict[str, Any]) -> str:
        return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield event({"type": "message_start", "message": dict(message)})
    yield event({"type": "ping"})
    try:
        async with aclosing(runner.events()) as events:  # closed early: the turn is cancelled at once
            async for _, ev in events:
                for obj in step(ev):
                    yield event(obj)
        final = done()
        yield event({"type": "message_delta", "delta": {"stop_reason": final["stop_reason"],
                                                        "stop_sequence": final["stop_sequence"]},
                     "usage": final["usage"]})
        yield event({"type": "message_stop"})
    except FourwallsError as e:
        yield event(anthropic_error_body(e.http_status, str(e)))
