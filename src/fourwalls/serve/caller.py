"""Who is calling: an API key with scopes and per-minute budgets, or anyone when the server has no key file.

Every route gets a ``Caller`` and asks it (admin? may use this model? which document groups?) instead of
checking keys itself. Keys are read from a JSON file that holds only their sha256 hashes.

The file::

    {"keys": [{"name": "support-bot", "sha256": "<hex of sha256(key)>", "models": ["smollm2-135m-instruct"],
               "admin": false, "rpm": 60, "tpm": 20000, "groups": ["hr", "eng"], "profile": "rag"}]}

``models`` lists the models and adapters the key may use ("*": all), the embedder's name included for
/v1/embeddings, search and RAG chat, which all run it; ``rpm``/``tpm`` are requests and tokens (prompt +
completion) per minute, absent or null for no limit; ``admin`` allows loading and unloading adapters and writing
document collections (creating and deleting collections, uploading and deleting documents).

``groups`` scopes what the key may read from document collections (search, RAG chat, document lists): documents
of those groups, plus the documents that have no groups (readable by every key). ``["*"]`` reads every group.
Absent or null: an admin key reads every group, any other key only the documents with no groups. The scope is
applied inside each search, before the top k is cut. Without an API key file (no auth) reading is unrestricted.

``profile`` is the application profile (engine/profiles.py) of the key's requests that name none.

`fourwalls keys add/list/rm` writes the file (``add_key``, ``remove_key``): atomically, readable by its owner only,
and with the new key's secret printed once, never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fourwalls.errors import AuthError, ForbiddenError, FormatError, NotFoundError, RateLimitError, UsageError
from fourwalls.files import atomic_write

WINDOW = 60.0
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    profile: str | None = None  # the application profile of its requests that name none
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

    def admit(self, prompt_tokens: int, *, count: bool = True) -> None:
        """Count a request against the key's budgets, or raise RateLimitError saying when to retry; ``count=False``
        only checks (before work whose size is not known yet, such as the retrieval of a RAG chat)."""
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
            if count:
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
        return cls(read_keys(path))

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


def read_keys(path: Path) -> list[Key]:
    """The keys of a key file, checked; FormatError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text())
        keys = [Key(name=str(k["name"]), sha256=str(k["sha256"]).lower(), models=list(k.get("models", ["*"])),
                    admin=bool(k.get("admin", False)), rpm=k.get("rpm"), tpm=k.get("tpm"),
                    groups=_groups(k.get("groups")), profile=_profile(k.get("profile")))
                for k in data["keys"]]
    except OSError as e:
        raise FormatError(f"cannot read the API key file {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path} is not a valid API key file ({type(e).__name__}: {e}); "
                          'expected {"keys": [{"name", "sha256", ...}]}') from None
    for k in keys:
        if len(k.sha256) != 64 or any(c not in "0123456789abcdef" for c in k.sha256):
            raise FormatError(f"{path}: key '{k.name}' has no valid sha256 hex digest")
    return keys


def _write_keys(path: Path, keys: list[Key]) -> None:
    """Replace the key file in one rename, readable and writable by its owner only."""
    entries = [{"name": k.name, "sha256": k.sha256, "models": k.models, "admin": k.admin, "rpm": k.rpm, "tpm": k.tpm,
                **({} if k.groups is None else {"groups": k.groups}),
                **({} if k.profile is None else {"profile": k.profile})} for k in keys]
    text = json.dumps({"keys": entries}, indent=2) + "\n"

    def write(tmp: Path) -> None:
        tmp.chmod(0o600)  # before the secret's hash goes in
        tmp.write_text(text)

    atomic_write(path, write)


def add_key(path: Path, name: str, *, admin: bool = False, models: list[str] | None = None,
            groups: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
            profile: str | None = None) -> str:
    """Add a key named ``name`` to the key file (created if absent) and return its secret, which is not stored."""
    if not KEY_NAME.fullmatch(name):
        raise UsageError(f"invalid key name {name!r}: use letters, digits, '.', '_' and '-' (max 64)")
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1 (leave it out for no limit)")
    if groups is not None and (not groups or not all(groups)):
        raise UsageError("--group takes a non-empty group name")
    keys = read_keys(path) if path.exists() else []
    if any(k.name == name for k in keys):
        raise UsageError(f"{path} already has a key named '{name}'; `fourwalls keys rm {name}` first")
    secret = "fw-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    keys.append(Key(name, digest, list(models or ["*"]), admin, rpm, tpm, list(groups) if groups else None, profile))
    _write_keys(path, keys)
    return secret


def remove_key(path: Path, name: str) -> None:
    """Remove the key named ``name`` from the key file."""
    keys = read_keys(path) if path.exists() else []
    kept = [k for k in keys if k.name != name]
    if len(kept) == len(keys):
        raise NotFoundError(f"no key named '{name}' in {path}; `fourwalls keys list` shows them")
    _write_keys(path, kept)


def _groups(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        raise TypeError(f'"groups" must be a list of non-empty strings, not {value!r}')
    return list(value)


def _profile(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f'"profile" must be a profile\'s name, not {value!r}')
    return value


def _retry(now: float, oldest: float) -> int:
    return max(1, math.ceil(WINDOW - (now - oldest)))
