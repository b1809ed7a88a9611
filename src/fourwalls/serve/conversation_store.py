"""Saved conversations: SQLite under ``$FOURWALLS_HOME``, each kept for one owner.

The owner is the API key's name, or "" for the local user of a server without keys. Every call names its owner and
every query filters on it, so another owner's conversation is simply not found: the routes answer 404, never 403,
and a key cannot even learn that an id exists.

A conversation holds its title, its settings (model, system prompt, sampling, collection: what the web page asks
with) and its messages, each an OpenAI chat message plus whatever the page keeps beside it (citations, usage,
timings, tool calls). Messages are replaced whole, in one transaction: a reader sees the old list or the new one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourwalls.errors import NotFoundError, UsageError
from fourwalls.files import writing

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    settings TEXT NOT NULL,  -- JSON object
    messages TEXT NOT NULL,  -- JSON list
    search TEXT NOT NULL,    -- the title and every message's text, case-folded: what search looks in
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated);
"""


@dataclass
class Conversation:
    id: str
    title: str
    created: float
    updated: float
    settings: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    message_count: int = 0

    def summary(self) -> dict[str, Any]:
        """The conversation without its messages, as listed."""
        return {"id": self.id, "object": "conversation", "title": self.title, "created": int(self.created),
                "updated": int(self.updated), "model": self.settings.get("model"),
                "message_count": self.message_count}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "settings": self.settings, "messages": self.messages}


class ConversationStore:
    """The conversations of every owner, in one SQLite file (one connection, shared by threads under a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def create(self, owner: str, title: str = "", settings: dict[str, Any] | None = None,
               messages: list[dict[str, Any]] | None = None) -> Conversation:
        now = time.time()
        c = Conversation(f"conv_{uuid.uuid4().hex}", title, now, now, settings or {}, messages or [])
        row = _row(c)
        with self._lock, writing(self.path, "the conversation"):
            self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (c.id, owner, *row, now, now))
        c.message_count = len(c.messages)
        return c

    def get(self, owner: str, conversation_id: str) -> Conversation:
        """The conversation, or NotFoundError (also when it is another owner's)."""
        with self._lock:
            r = self._db.execute("SELECT id, title, created, updated, settings, messages FROM conversations "
                                 "WHERE id = ? AND owner = ?", (conversation_id, owner)).fetchone()
        if r is None:
            raise _not_found(conversation_id)
        messages = json.loads(r[5])
        return Conversation(r[0], r[1], r[2], r[3], json.loads(r[4]), messages, len(messages))

    def list(self, owner: str, query: str | None = None, limit: int = 100) -> list[Conversation]:
        """The owner's conversations, last updated first, without their messages; ``query``: only those whose
        title or messages contain it (case-insensitive)."""
        sql = ("SELECT id, title, created, updated, settings, json_array_length(messages) FROM conversations "
               "WHERE owner = ?")
        args: list[Any] = [owner]
        if query and query.strip():
            sql += " AND instr(search, ?) > 0"
            args.append(_fold(query.strip()))
        sql += " ORDER BY updated DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [Conversation(r[0], r[1], r[2], r[3], json.loads(r[4]), [], r[5]) for r in rows]

    def update(self, owner: str, conversation_id: str, *, title: str | None = None,
               settings: dict[str, Any] | None = None, messages: list[dict[str, Any]] | None = None) -> Conversation:
        """Replace what is given (title, settings, the whole message list); NotFoundError as ``get``."""
        with self._lock, writing(self.path, "the conversation"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                r = self._db.execute("SELECT title, settings, messages, created FROM conversations "
                                     "WHERE id = ? AND owner = ?", (conversation_id, owner)).fetchone()
                if r is None:
                    raise _not_found(conversation_id)
                c = Conversation(conversation_id, r[0] if title is None else title, r[3], time.time(),
                                 json.loads(r[1]) if settings is None else settings,
                                 json.loads(r[2]) if messages is None else messages)
                c.message_count = len(c.messages)
                self._db.execute("UPDATE conversations SET title = ?, settings = ?, messages = ?, search = ?, "
                                 "updated = ? WHERE id = ?", (*_row(c), c.updated, conversation_id))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite undoes it itself when the disk is full
                    self._db.execute("ROLLBACK")
                raise
        return c

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._lock:
            gone = self._db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                                    (conversation_id, owner)).rowcount
        if not gone:
            raise _not_found(conversation_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _not_found(conversation_id: str) -> NotFoundError:
    return NotFoundError(f"conversation '{conversation_id}' does not exist; GET /v1/conversations lists yours",
                         param="id", code="conversation_not_found")


def _fold(text: str) -> str:
    return text.casefold()


def _row(c: Conversation) -> tuple[str, str, str, str]:
    """title, settings, messages and search text as stored; UsageError for text SQLite cannot hold."""
    texts = [c.title, *(_text(m.get("content")) for m in c.messages)]
    try:
        row = (c.title, json.dumps(c.settings, ensure_ascii=False, allow_nan=False),
               json.dumps(c.messages, ensure_ascii=False, allow_nan=False), _fold("\n".join(texts)))
        for value in row:
            value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the conversation holds text that is not valid Unicode (a lone surrogate)") from None
    except ValueError:  # JSON has no NaN or infinity, and the conversation must read back as JSON
        raise UsageError("the conversation holds a number that is not finite (NaN or infinity)") from None
    return row


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def to_markdown(c: Conversation) -> str:
    """The conversation as a Markdown document: its settings, then each message under its role, with the sources
    an answer cited."""
    s = c.settings
    lines = [f"# {c.title or 'Untitled conversation'}", ""]
    for label, key in (("Model", "model"), ("Documents", "collection"), ("Temperature", "temperature"),
                       ("Max tokens", "max_tokens")):
        if s.get(key) not in (None, ""):
            lines.append(f"- {label}: {s[key]}")
    lines.append(f"- Updated: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(c.updated))}")
    if s.get("system"):
        lines += ["", "## System", "", str(s["system"])]
    for m in c.messages:
        lines += ["", f"## {str(m.get('role', '?')).capitalize()}", "", _text(m.get("content"))]
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            lines += ["", f"Tool call `{fn.get('name', '?')}`: `{fn.get('arguments', '')}`"]
        citations = [x for x in m.get("citations") or [] if isinstance(x, dict)]
        if citations:
            lines += ["", "Sources:"]
            for x in citations:
                where = [str(x["heading"])] if x.get("heading") else []
                if x.get("page"):
                    where.append(f"page {x['page']}")
                place = f" ({', '.join(where)})" if where else ""
                lines.append(f"- [{x.get('index', '?')}] {x.get('source', '?')}{place}")
    return "\n".join(lines).rstrip() + "\n"
