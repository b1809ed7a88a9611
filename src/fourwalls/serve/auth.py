"""API keys with scopes and per-minute budgets, read from a JSON file that holds only their sha256 hashes.

The file::

    {"keys": [{"name": "support-bot", "sha256": "<hex of sha256(key)>", "models": ["smollm2-135m-instruct"],
               "admin": false, "rpm": 60, "tpm": 20000, "groups": ["hr", "eng"]}]}

``models`` lists the models and adapters the key may use ("*": all), the embedder's name included for
/v1/embeddings; ``rpm``/``tpm`` are requests and tokens (prompt + completion) per minute, absent or null for no
limit; ``admin`` allows loading and unloading adapters and writing document collections (creating and deleting
collections, uploading and deleting documents).

``groups`` scopes what the key may read from document collections (search, RAG chat, document lists): documents
of those groups, plus the documents that have no groups (readable by every key). ``["*"]`` reads every group.
Absent or null: an admin key reads every group, any other key only the documents with no groups. The scope is
applied inside each search, before the top k is cut. Without an API key file (no auth) reading is unrestricted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fourwalls.errors import AuthError, FormatError, RateLimitError

WINDOW = 60.0


@dataclass
class Key:
    name: str
    sha256: str
    models: list[str] = field(default_factory=lambda: ["*"])
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    groups: list[str] | None = None

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def readable(self) -> set[str] | None:
        """The document groups this key may read (None: all of them; an empty set: only ungrouped documents)."""
        if self.groups is None:
            return None if self.admin else set()
        return None if "*" in self.groups else set(self.groups)


class KeyRing:
    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            data = json.loads(path.read_text())
            keys = [Key(name=str(k["name"]), sha256=str(k["sha256"]).lower(), models=list(k.get("models", ["*"])),
                        admin=bool(k.get("admin", False)), rpm=k.get("rpm"), tpm=k.get("tpm"),
                        groups=_groups(k.get("groups")))
                    for k in data["keys"]]
        except OSError as e:
            raise FormatError(f"cannot read the API key file {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path} is not a valid API key file ({type(e).__name__}: {e}); "
                              'expected {"keys": [{"name", "sha256", ...}]}') from None
        for k in keys:
            if len(k.sha256) != 64 or any(c not in "0123456789abcdef" for c in k.sha256):
                raise FormatError(f"{path}: key '{k.name}' has no valid sha256 hex digest")
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Key:
        """The key behind an ``Authorization: Bearer ...`` header, or AuthError."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        for k in self.keys:
            if hmac.compare_digest(k.sha256, digest):
                return k
        raise AuthError("invalid API key")

    def admit(self, key: Key, prompt_tokens: int) -> None:
        """Count a request against the key's budgets, or raise RateLimitError saying when to retry."""
        now = time.monotonic()
        with self.lock:
            while key.requests and now - key.requests[0] > WINDOW:
                key.requests.popleft()
            while key.tokens and now - key.tokens[0][0] > WINDOW:
                key.tokens.popleft()
            if key.rpm is not None and len(key.requests) >= key.rpm:
                raise RateLimitError(f"rate limit of {key.rpm} requests per minute reached",
                                     _retry(now, key.requests[0]))
            used = sum(n for _, n in key.tokens)
            if key.tpm is not None and used + prompt_tokens > key.tpm:
                oldest = key.tokens[0][0] if key.tokens else now
                raise RateLimitError(f"token limit of {key.tpm} per minute reached ({used} used, this prompt has "
                                     f"{prompt_tokens})", _retry(now, oldest))
            key.requests.append(now)

    def spend(self, key: Key, tokens: int) -> None:
        with self.lock:
            key.tokens.append((time.monotonic(), tokens))


def _groups(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        raise TypeError(f'"groups" must be a list of non-empty strings, not {value!r}')
    return list(value)


def _retry(now: float, oldest: float) -> int:
    return max(1, math.ceil(WINDOW - (now - oldest)))
