"""Saved conversations over HTTP, each visible only to the API key that made it (the local user without keys).

Routes (JSON; errors are OpenAI error objects):

- ``GET /v1/conversations?q=&limit=``: the caller's conversations, last updated first, without their messages;
- ``POST /v1/conversations`` ``{"title", "settings", "messages"}``, ``GET|PATCH|DELETE /v1/conversations/{id}``;
- ``GET /v1/conversations/{id}/export?format=json|markdown``: the conversation as a file to download.

Another key's conversation is a 404, as if it did not exist (a 403 would tell that it does). The web page saves
each turn here; the model never reads this store: a chat completion gets the messages from the client, as always.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from fourwalls.serve.caller import Caller
from fourwalls.serve.common import CurrentCaller, State
from fourwalls.serve.conversation_store import to_markdown
from fourwalls.serve.schemas import ConversationCreate, ConversationMessage, ConversationUpdate

router = APIRouter()


def _owner(caller: Caller) -> str:
    return caller.name or ""


def _messages(messages: list[ConversationMessage]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]


@router.get("/v1/conversations")
async def list_conversations(state: State, caller: CurrentCaller,
                             q: Annotated[str | None, Query(max_length=200, description="only conversations whose "
                                                            "title or messages contain this text")] = None,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
    """The caller's conversations, last updated first: id, title, created, updated, model, message_count."""
    found = await asyncio.to_thread(state.conversations.list, _owner(caller), q, limit)
    return {"object": "list", "data": [c.summary() for c in found]}


@router.post("/v1/conversations", status_code=201)
async def create_conversation(body: ConversationCreate, state: State, caller: CurrentCaller) -> Any:
    """Save a new conversation for the caller; the answer has its id."""
    c = await asyncio.to_thread(state.conversations.create, _owner(caller), body.title,
                                body.settings.model_dump(), _messages(body.messages))
    return c.to_dict()


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, state: State, caller: CurrentCaller) -> Any:
    """One of the caller's conversations with its settings and messages (404 if it is not the caller's)."""
    return (await asyncio.to_thread(state.conversations.get, _owner(caller), conversation_id)).to_dict()


@router.patch("/v1/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdate, state: State,
                              caller: CurrentCaller) -> Any:
    """Rename, change the settings, or replace the messages (the whole list, in one step)."""
    c = await asyncio.to_thread(
        lambda: state.conversations.update(
            _owner(caller), conversation_id, title=body.title,
            settings=None if body.settings is None else body.settings.model_dump(),
            messages=None if body.messages is None else _messages(body.messages)))
    return c.to_dict()


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, state: State, caller: CurrentCaller) -> Any:
    await asyncio.to_thread(state.conversations.delete, _owner(caller), conversation_id)
    return {"id": conversation_id, "object": "conversation", "deleted": True}


@router.get("/v1/conversations/{conversation_id}/export", response_class=Response,
            responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
async def export_conversation(conversation_id: str, state: State, caller: CurrentCaller,
                              format: Literal["json", "markdown"] = "json") -> Response:
    """The conversation as a file to download: JSON (as GET returns it) or Markdown."""
    c = await asyncio.to_thread(state.conversations.get, _owner(caller), conversation_id)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", c.title).strip("-.")[:60] or "conversation"
    if format == "markdown":
        body, media, suffix = to_markdown(c), "text/markdown; charset=utf-8", "md"
    else:
        body, media, suffix = json.dumps(c.to_dict(), ensure_ascii=False, indent=2), "application/json", "json"
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}.{suffix}"'})
