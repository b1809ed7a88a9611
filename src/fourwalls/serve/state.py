"""What the routes share: the loaded model, its engine, the document store and embedder, and the server's
settings; and ``Batch``, the engine requests of one API call."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fourwalls.engine import Engine, Request
from fourwalls.engine.grammar import Grammars
from fourwalls.engine.profiles import BUILTIN, DEFAULT, Profile
from fourwalls.engine.router import Router
from fourwalls.errors import FourwallsError, NotFoundError, UsageError
from fourwalls.generate import Delta
from fourwalls.serve.caller import Caller, KeyRing
from fourwalls.serve.conversation_store import ConversationStore
from fourwalls.serve.metrics import Metrics
from fourwalls.serve.stored import ResponseStore
from fourwalls.store import LoadedModel, Store, home
from fourwalls.templates import TemplateSandbox
from fourwalls.tools import ToolSpec

if TYPE_CHECKING:
    from starlette.requests import Request as StarletteRequest

    from fourwalls.rag.embed import Embedder
    from fourwalls.rag.retrieve import Retriever
    from fourwalls.rag.stores import Collection, DocumentStore


class _LockedStore:
    """A document store whose every call holds the lock: one apsw connection is shared by the request threads."""

    def __init__(self, store: DocumentStore, lock: threading.Lock) -> None:
        self._store, self._lock = store, lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class RagService:
    """The document store and the embedder behind the RAG routes, each opened on first use (blocking calls: run
    them in a worker thread). ``store`` serializes every call on ``lock``; ``writes`` serializes whole writes
    (check, then ingest or delete) so that they cannot interleave, while searches go on between their calls."""

    def __init__(self, store_url: str | None = None, embedder_folder: str | None = None) -> None:
        self.store_url, self.embedder_folder = store_url, embedder_folder
        self.lock = threading.Lock()
        self.writes = threading.Lock()
        self._opening, self._loading = threading.Lock(), threading.Lock()
        self._store: DocumentStore | None = None
        self._embedder: Embedder | None = None

    @property
    def store(self) -> DocumentStore:
        with self._opening:
            if self._store is None:
                from fourwalls.rag.stores import open_store

                self._store = cast("DocumentStore", _LockedStore(open_store(self.store_url), self.lock))
            return self._store

    @property
    def embedder(self) -> Embedder:
        with self._loading:
            if self._embedder is None:
                from fourwalls.rag.embed import embedder

                self._embedder = embedder(self.embedder_folder)
            return self._embedder

    def retriever(self, caller: Caller) -> Retriever:
        """A retriever for ``caller``, who must be allowed to use the embedder: searching runs it, as
        /v1/embeddings does, so one rule covers both (ForbiddenError otherwise)."""
        from fourwalls.rag.retrieve import Retriever

        embedder = self.embedder
        caller.require_model(embedder.name)
        return Retriever(self.store, embedder)

    def collection(self, name: str, groups: set[str] | None = None) -> Collection:
        """The collection, or a 404 that says where the collections are listed. With ``groups`` (a caller's), a
        collection in which they may read no document is a 404 too: its name is not theirs to know."""
        try:
            c = self.store.collection(name)
            if groups is not None and not any(d.readable(groups) for d in self.store.documents(name)):
                raise NotFoundError(name)
            return c
        except NotFoundError:
            raise NotFoundError(f"collection '{name}' does not exist; GET /v1/collections lists them",
                                param="collection", code="collection_not_found") from None

    def close(self) -> None:
        with self._opening:
            if self._store is not None:
                self._store.close()
                self._store = None


@dataclass
class ServerState:
    lm: LoadedModel
    engine: Engine
    grammars: Grammars
    metrics: Metrics
    store: Store
    keys: KeyRing | None = None
    max_body_bytes: int = 1 << 20
    log_requests: bool = False
    stall_timeout: float = 30.0
    draining: bool = False
    in_flight: int = 0  # HTTP requests whose response is not yet sent (a drain waits for them)
    created: int = field(default_factory=lambda: int(time.time()))
    rag_store: str | None = None  # postgresql://... or a SQLite file; None: the home's rag.db
    embedder_folder: str | None = None  # None: the packaged all-MiniLM-L6-v2
    templates: TemplateSandbox = field(default_factory=TemplateSandbox)  # renders the model's chat template
    tools: list[ToolSpec] = field(default_factory=list)  # built-in tools offered on every request
    conversations_path: Path = field(default_factory=lambda: home() / "conversations.db")
    responses_path: Path = field(default_factory=lambda: home() / "responses.db")  # stored responses (SQLite)
    router: Router | None = None  # the expert library behind model "auto" (None: "auto" is the base model)
    # Application profiles by name (None: off, every request served as an equal); the default is that of requests
    # that name none and whose key names none.
    profiles: dict[str, Profile] | None = field(default_factory=lambda: dict(BUILTIN))
    default_profile: str = DEFAULT
    _rag: RagService | None = field(default=None, repr=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _conversations: ConversationStore | None = field(default=None, repr=False)
    _responses: ResponseStore | None = field(default=None, repr=False)

    @property
    def responses(self) -> ResponseStore:
        """Stored responses (the Responses API's ``store: true``), opened on first use."""
        with self._opening:
            if self._responses is None:
                self._responses = ResponseStore(self.responses_path)
            return self._responses

    @property
    def rag(self) -> RagService:
        """The RAG service, created on first use (nothing is opened or loaded until a RAG route needs it)."""
        with self._opening:
            if self._rag is None:
                self._rag = RagService(self.rag_store, self.embedder_folder)
            return self._rag

    @property
    def conversations(self) -> ConversationStore:
        """The saved conversations, opened on first use."""
        with self._opening:
            if self._conversations is None:
                self._conversations = ConversationStore(self.conversations_path)
            return self._conversations

    def close(self) -> None:
        """Close the stores that were opened and the template sandbox's children."""
        self.templates.close()
        with self._opening:
            if self._rag is not None:
                self._rag.close()
            if self._conversations is not None:
                self._conversations.close()
                self._conversations = None

    def profile(self, requested: str | None, caller: Caller) -> Profile | None:
        """The profile a request runs under: the one it names, else its key's, else the server's default (None
        when profiles are off); a 400 for a name the server does not define."""
        if self.profiles is None:
            return None
        name = requested or (caller.key.profile if caller.key is not None else None) or self.default_profile
        if name not in self.profiles:
            raise UsageError(f"profile '{name}' is not defined here; this server's profiles are "
                             f"{', '.join(sorted(self.profiles))}", param="fourwalls.profile",
                             code="profile_not_found")
        return self.profiles[name]

    def is_auto(self, name: str) -> bool:
        """Whether a request's ``model`` asks the router to choose ("auto" or "BASE:auto")."""
        return name in ("auto", f"{self.lm.name}:auto")

    def resolve_model(self, name: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for anything else."""
        base = self.lm.name
        if name == base:
            return None
        adapter = name.removeprefix(base + ":") if name.startswith(base + ":") else name
        if adapter in self.engine.adapters:
            return adapter
        raise NotFoundError(f"model '{name}' does not exist; GET /v1/models lists the base model and its adapters",
                            param="model", code="model_not_found")


class Batch:
    """The engine requests behind one API call (n choices of each prompt), read as one stream of
    (choice index, event); records the latency metrics on the way (``label``: the adapters a routed request mixes,
    "a+b", counted under that name)."""

    def __init__(self, state: ServerState, requests: list[Request], adapter: str | None, label: str | None = None
                 ) -> None:
        self.state, self.requests, self.adapter = state, requests, adapter
        self.queue: asyncio.Queue[tuple[int, Delta | FourwallsError | None]] = asyncio.Queue()
        self.open = len(requests)
        self.start = time.monotonic()
        self.last: list[float | None] = [None] * len(requests)
        self.first: list[float] = [0.0] * len(requests)  # when each request's first token came
        self.counts = [0] * len(requests)  # tokens each request has sent
        self.completion_tokens = 0
        self.disconnected = False
        self.watcher: asyncio.Task | None = None
        loop = asyncio.get_running_loop()
        for i, r in enumerate(requests):
            r.emit = lambda ev, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
        state.engine.submit(*requests)
        m = state.metrics
        m.prompt_tokens.inc(self.prompt_tokens)
        m.adapter_requests.labels(label or adapter or "").inc(len(requests))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache."""
        return sum(r.cached_tokens or 0 for r in self.requests)

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens so far: what the caller is charged."""
        return self.prompt_tokens + self.completion_tokens

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """Yield (index, chunk) until every request has finished or the batch is cancelled; a failed request
        raises its error."""
        m = self.state.metrics
        while self.open:
            i, ev = await self.queue.get()
            if ev is None:  # cancelled
                return
            now = time.monotonic()
            if isinstance(ev, FourwallsError):
                self.open -= 1
                m.finished.labels("timeout" if ev.http_status == 504 else "error").inc()
                raise ev
            n = len(ev.tokens)
            profile = self.requests[i].profile
            if n:
                last = self.last[i]
                if last is None:
                    m.ttft.observe(now - self.start)
                    self.first[i] = now
                    if profile is not None:
                        m.profile_ttft.labels(profile.name).observe(now - self.start)
                else:  # a chunk of several tokens (text held back for a stop string) shares the wait
                    for _ in range(n):
                        m.itl.observe((now - last) / n)
                        if profile is not None:
                            m.profile_itl.labels(profile.name).observe((now - last) / n)
                self.last[i] = now
                self.counts[i] += n
                self.completion_tokens += n
                m.generation_tokens.inc(n)
            if ev.finish_reason:
                self.open -= 1
                m.finished.labels(ev.finish_reason).inc()
                m.cached_tokens.inc(self.requests[i].cached_tokens or 0)
                m.e2e.observe(now - self.start)
                if profile is not None:
                    self._slo(i, profile, now)
            yield i, ev

    def _slo(self, i: int, profile: Profile, now: float) -> None:
        """Count whether request ``i``, finished, met its profile's SLOs (those that apply to it: the ITL SLO to one
        of two tokens or more)."""
        m = self.state.metrics
        if profile.ttft is not None and self.last[i] is not None:
            m.slo.labels(profile.name, "ttft", "yes" if self.first[i] - self.start <= profile.ttft else "no").inc()
        if profile.itl is not None and self.counts[i] > 1:
            tpot = (now - self.first[i]) / (self.counts[i] - 1)
            m.slo.labels(profile.name, "itl", "yes" if tpot <= profile.itl else "no").inc()

    def watch(self, request: StarletteRequest) -> None:
        """Cancel the batch as soon as the client disconnects, whether or not a chunk is being sent to it (a
        response that is not streamed sends nothing until the end)."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True
            self.cancel()

        self.watcher = asyncio.ensure_future(watch())

    def cancel(self) -> None:
        """Stop generating (idempotent): the requests leave the engine's queue now and their rows at its next
        step, and ``events()`` ends."""
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        for r in self.requests:
            self.state.engine.cancel(r)
        self.queue.put_nowait((-1, None))
