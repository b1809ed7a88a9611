"""Who is calling: an API key with scopes and per-minute budgets, or anyone when the server has no key file.

Every route gets a ``Caller`` and asks it (admin? may use this model? which document groups?) instead of
checking keys itself. Keys are read from a JSON file that holds only their sha256 hashes.

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

from fourwalls.errors import AuthError, ForbiddenError, FormatError, RateLimitError

WINDOW = 60.0


@dataclass
class Key:
    """One entry of the key file, with the requests and tokens of its last minute."""

    name: str
    sha256: str
    models: list[str] = field(default_factory=lambda: ["*"])
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    groups: list[str] | None = None
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class Caller:
    """The caller of one request: ``key`` None when the server has no key file (anyone may do anything)."""

    key: Key | None = None

    @property
    def name(self) -> str | None:
        return None if self.key is None else self.key.name

    @property
    def groups(self) -> set[str] | None:
        """The document groups the caller may read (None: all of them; an empty set: only ungrouped documents)."""
        k = self.key
        if k is None:
            return None
        if k.groups is None:
            return None if k.admin else set()
        return None if "*" in k.groups else set(k.groups)

    @property
    def admin(self) -> bool:
        """May load adapters and write document collections (anyone may, without keys)."""
        return self.key is None or self.key.admin

    def may_use(self, model: str) -> bool:
        return self.key is None or "*" in self.key.models or model in self.key.models

    def require_model(self, model: str, adapter: str | None = None) -> None:
        """ForbiddenError unless the caller may use ``model``, by that name or by the adapter it resolves to."""
        if not (self.may_use(model) or (adapter is not None and self.may_use(adapter))):
            raise ForbiddenError(f"this API key may not use model '{model}'")

    def require_admin(self, what: str) -> None:
        """ForbiddenError unless the caller is an admin; ``what`` names the action in the message."""
        if not self.admin:
            raise ForbiddenError(f"{what} needs an admin API key")

    def admit(self, prompt_tokens: int) -> None:
        """Count a request against the key's budgets, or raise RateLimitError saying when to retry."""
        k = self.key
        if k is None:
            return
        now = time.monotonic()
        with k.lock:
            while k.requests and now - k.requests[0] > WINDOW:
                k.requests.popleft()
            while k.tokens and now - k.tokens[0][0] > WINDOW:
                k.tokens.popleft()
            if k.rpm is not None and len(k.requests) >= k.rpm:
                raise RateLimitError(f"rate limit of {k.rpm} requests per minute reached", _retry(now, k.requests[0]))
            used = sum(n for _, n in k.tokens)
            if k.tpm is not None and used + prompt_tokens > k.tpm:
                oldest = k.tokens[0][0] if k.tokens else now
                raise RateLimitError(f"token limit of {k.tpm} per minute reached ({used} used, this prompt has "
                                     f"{prompt_tokens})", _retry(now, oldest))
            k.requests.append(now)

    def spend(self, tokens: int) -> None:
        """Charge the tokens a request used (prompt and completion) to the key's per-minute budget."""
        if self.key is not None:
            with self.key.lock:
                self.key.tokens.append((time.monotonic(), tokens))


class KeyRing:
    """The keys of the key file."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

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

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Caller:
        """The caller behind an ``Authorization: Bearer ...`` header (or an ``x-api-key`` one), or AuthError."""
        if authorization and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        elif api_key:
            key = api_key.strip()
        else:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')")
        digest = hashlib.sha256(key.encode()).hexdigest()
        for k in self.keys:
            if hmac.compare_digest(k.sha256, digest):
                return Caller(k)
        raise AuthError("invalid API key")


def _groups(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        raise TypeError(f'"groups" must be a list of non-empty strings, not {value!r}')
    return list(value)


def _retry(now: float, oldest: float) -> int:
    return max(1, math.ceil(WINDOW - (now - oldest)))
