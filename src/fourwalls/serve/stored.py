"""Stored responses (the Responses API's ``store: true``): one SQLite file under $FOURWALLS_HOME, a row per response
with the conversation it ends, readable and deletable only by the API key that created it (anonymous callers share
the owner "" on a server without keys)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from fourwalls.errors import NotFoundError
from fourwalls.files import writing

_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created INTEGER NOT NULL, response TEXT NOT NULL, items TEXT NOT NULL)"""


class ResponseStore:
    """Responses by id. Every call is a short transaction of its own, so a crash never leaves half a row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path, "the responses' database"), self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def put(self, owner: str, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Keep ``response`` and the conversation ``items`` it ends (input and output, oldest first)."""
        with self.lock, writing(self.path, "the response"), self._connect() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                       (response["id"], owner, int(time.time()), json.dumps(response), json.dumps(items)))

    def get(self, owner: str, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The response and its conversation's items, or a 404 (also when another key stored it)."""
        with self.lock, self._connect() as db:
            row = db.execute("SELECT response, items FROM responses WHERE id = ? AND owner = ?",
                             (rid, owner)).fetchone()
        if row is None:
            raise NotFoundError(f"response '{rid}' not found (it was not stored, was deleted, or belongs to another "
                                "API key)", param="response_id", code="response_not_found")
        return json.loads(row[0]), json.loads(row[1])

    def delete(self, owner: str, rid: str) -> None:
        with self.lock, self._connect() as db:
            gone = db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (rid, owner)).rowcount
        if not gone:
            raise NotFoundError(f"response '{rid}' not found", param="response_id", code="response_not_found")
