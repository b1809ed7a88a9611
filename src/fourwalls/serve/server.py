"""Run the server: load the model, start the engine, serve with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from fourwalls.engine import Engine, EngineConfig
from fourwalls.engine.grammar import Grammars
from fourwalls.engine.phases import ModelSource
from fourwalls.engine.profiles import DEFAULT as DEFAULT_PROFILE
from fourwalls.engine.profiles import load_profiles
from fourwalls.engine.router import Router
from fourwalls.errors import FormatError, FourwallsError, OverloadedError, UsageError
from fourwalls.experts import DEFAULT_THRESHOLD, read_library
from fourwalls.serve.app import UI, UI_LIBRARIES, create_app
from fourwalls.serve.caller import KeyRing
from fourwalls.serve.metrics import Metrics
from fourwalls.serve.state import ServerState
from fourwalls.store import LoadedModel, Store
from fourwalls.templates import BUDGET, TemplateSandbox
from fourwalls.tools import ToolSpec

log = logging.getLogger("fourwalls.serve")


@dataclass
class ServeConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 8000
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder or stored adapter name
    api_keys: Path | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    drain_timeout: float = 30.0
    max_body_bytes: int = 1 << 20
    log_requests: bool = False
    stall_timeout: float = 30.0
    rag_store: str | None = None  # document collections: postgresql://... or a SQLite file (None: the home's rag.db)
    embedder: str | None = None  # a sentence-transformers folder (None: the packaged all-MiniLM-L6-v2)
    tools: list[ToolSpec] = field(default_factory=list)  # built-in tools offered on every request
    conversations: Path | None = None  # the saved conversations' SQLite file (None: $FOURWALLS_HOME/conversations.db)
    responses: Path | None = None  # stored responses' SQLite file (None: $FOURWALLS_HOME/responses.db)
    route_threshold: float = DEFAULT_THRESHOLD  # model "auto": the cosine similarity below which the base answers
    route: str = "top1"  # or "top2": mix the two best experts per row
    profiles: Path | bool | None = True  # True: the built-in profiles; a TOML file: those and the file's; None: off
    default_profile: str = DEFAULT_PROFILE  # of requests that name none and whose key names none


def build_state(cfg: ServeConfig, store: Store | None = None) -> ServerState:
    """Load the model and its adapters and start the engine (the server's state, ready to serve)."""
    store = store or Store()
    keys = KeyRing.load(cfg.api_keys) if cfg.api_keys else None
    profiles = None if cfg.profiles is None else load_profiles(None if cfg.profiles is True else cfg.profiles)
    if profiles is not None:
        for name, what in ((cfg.default_profile, "--default-profile"),
                           *((k.profile, f"key '{k.name}'") for k in (keys.keys if keys else []) if k.profile)):
            if name not in profiles:
                raise UsageError(f"{what} names profile '{name}', which is not defined; the profiles are "
                                 f"{', '.join(sorted(profiles))}")
    lm = store.load(cfg.model)
    engine = Engine(lm.model, lm.tokenizer, lm.config.eos_token_ids, cfg.engine,
                    ModelSource(str(store.root), cfg.model))
    for name, where in cfg.adapters.items():
        try:
            engine.add_adapter(name, store.adapter_folder(where))
        except UsageError as e:
            raise UsageError(f"--adapter {name}={where}: {e}") from None
    grammars = Grammars(lm.tokenizer, lm.config.vocab_size, lm.config.eos_token_ids)
    templates = TemplateSandbox()
    try:
        check_template(lm, templates)
    except FourwallsError:
        templates.close()
        raise
    state = ServerState(lm, engine, grammars, Metrics(engine), store, keys, cfg.max_body_bytes, cfg.log_requests,
                        cfg.stall_timeout, rag_store=cfg.rag_store, embedder_folder=cfg.embedder, templates=templates,
                        tools=cfg.tools, profiles=profiles, default_profile=cfg.default_profile)
    state.router = _router(cfg, store, lm, engine, state)
    if cfg.conversations is not None:
        state.conversations_path = cfg.conversations
    if cfg.responses is not None:
        state.responses_path = cfg.responses
    engine.start()
    return state


def _router(cfg: ServeConfig, store: Store, lm: LoadedModel, engine: Engine, state: ServerState) -> Router | None:
    """The router over the model's expert library (`fourwalls experts add`), its adapters loaded; None without
    experts. An expert already loaded by --adapter (the same digest) is routed to under that name."""
    experts = read_library(store.root, lm.name)["experts"]
    if not experts:
        return None
    loaded = {a.digest: name for name, a in engine.adapters.items()}
    profiles = {}
    for name, entry in experts.items():
        served = loaded.get(entry["digest"])
        if served is None:
            try:
                adapter = engine.add_adapter(name, store.adapter_folder(name))
            except FourwallsError as e:
                raise UsageError(f"expert '{name}' of the library of '{lm.name}': {e}") from None
            if adapter.digest != entry["digest"]:
                raise UsageError(f"expert '{name}' is now another adapter than the library's; `fourwalls experts "
                                 f"add {name}` again")
            served = name
        profiles[served] = entry["profile"]
    log.info("routing model 'auto' over %d experts (%s, threshold %g)", len(profiles), cfg.route, cfg.route_threshold)
    return Router(profiles, state.rag.embedder, cfg.route_threshold, cfg.route)


PROBE = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"},
         {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Name a colour."}]


def check_template(lm: LoadedModel, sandbox: TemplateSandbox) -> None:
    """Refuse a model whose chat template exceeds its budget on a plain conversation: it would fail every chat
    request, each after the whole time budget."""
    if not lm.tokenizer.chat_template:
        return
    try:
        lm.tokenizer.apply_chat_template(PROBE, sandbox=sandbox)
    except UsageError as e:
        if e.code == BUDGET:
            raise FormatError(f"model '{lm.name}' is refused: on a plain four-message conversation {e}; fix its "
                              "chat template (tokenizer_config.json) or import another model") from None
        # A template may refuse system messages or this order of turns: its budget is all that is checked here.


class _Server(uvicorn.Server):
    """uvicorn, except that SIGTERM drains first: /readyz and new requests get 503 while the requests in
    flight finish, up to the drain timeout. Those still unfinished then are cut: each gets a 503 (a stream, an
    error event before [DONE]) and one line in the log, and the server exits with status 1 instead of 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.fw_state, self.drain_timeout = state, drain_timeout
        self.cut = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:  # uvicorn says where it listens only for sockets it bound itself
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                    f"[{host}]" if ":" in host else host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.fw_state.draining:
            super().handle_exit(sig, frame)
            return
        self.fw_state.draining = True
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        engine = self.fw_state.engine
        deadline = time.monotonic() + self.drain_timeout
        log.info("draining: %d running, %d waiting", engine.num_running, engine.num_waiting)
        while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = engine.abort(OverloadedError(f"the server stopped before this request finished (drain timeout "
                                           f"{self.drain_timeout:g} s); retry on another replica"))
        for r in cut:
            log.warning("drain timeout: cut a request after %d of its %d tokens", r.generated,
                        r.params.max_new_tokens)
        self.cut = len(cut)
        # The engine frees the cut rows at its next step; their responses then end with the error. uvicorn's own
        # shutdown would cancel a response still being written, so wait until every one is sent.
        while (engine.num_running or self.fw_state.in_flight) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port in use fails at once, in one line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use (by another server?); choose another with --port") \
                from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(cfg: ServeConfig) -> int:
    """Serve ``cfg.model`` until SIGTERM (drain, then exit) or Ctrl-C; the exit status: 1 if a drain had to cut
    requests, else 0."""
    sock = listen(cfg.host, cfg.port)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines; protect it with --api-keys", cfg.host)
    missing = [name for name in UI_LIBRARIES if not (UI / name).is_file()]
    if missing:
        print(f"fourwalls: the web page's libraries are missing ({', '.join(missing)} under {UI}); "
              "scripts/build-ui fetches them (make run does)", file=sys.stderr)
    try:
        state = build_state(cfg)
    except BaseException:
        sock.close()
        raise
    if cfg.api_keys:
        log.info("requests need one of the %d API keys in %s", len(state.keys.keys), cfg.api_keys)
    config = uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="info",
                            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout)), access_log=False)
    server = _Server(config, state, cfg.drain_timeout)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{cfg.port}"
    print(f"fourwalls: serving {state.lm.name}: web chat at {url}/ and API at {url}/v1 (documented at {url}/docs)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        state.engine.stop()
        state.close()
    if server.cut:
        log.error("drain timeout: %d request(s) cut; exiting with status 1", server.cut)
    return 1 if server.cut else 0
