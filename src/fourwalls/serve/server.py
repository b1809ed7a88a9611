"""Run the server: load the model, start the engine, serve with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from fourwalls.engine import Engine, EngineConfig
from fourwalls.engine.grammar import Grammars
from fourwalls.errors import UsageError
from fourwalls.serve.app import UI, UI_LIBRARIES, create_app
from fourwalls.serve.caller import KeyRing
from fourwalls.serve.metrics import Metrics
from fourwalls.serve.state import ServerState
from fourwalls.store import Store
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


def build_state(cfg: ServeConfig, store: Store | None = None) -> ServerState:
    """Load the model and its adapters and start the engine (the server's state, ready to serve)."""
    store = store or Store()
    keys = KeyRing.load(cfg.api_keys) if cfg.api_keys else None
    lm = store.load(cfg.model)
    engine = Engine(lm.model, lm.tokenizer, lm.config.eos_token_ids, cfg.engine)
    for name, where in cfg.adapters.items():
        try:
            engine.add_adapter(name, store.adapter_folder(where))
        except UsageError as e:
            raise UsageError(f"--adapter {name}={where}: {e}") from None
    grammars = Grammars(lm.tokenizer, lm.config.vocab_size, lm.config.eos_token_ids)
    state = ServerState(lm, engine, grammars, Metrics(engine), store, keys, cfg.max_body_bytes, cfg.log_requests,
                        cfg.stall_timeout, rag_store=cfg.rag_store, embedder_folder=cfg.embedder, tools=cfg.tools)
    if cfg.conversations is not None:
        state.conversations_path = cfg.conversations
    if cfg.responses is not None:
        state.responses_path = cfg.responses
    engine.start()
    return state


class _Server(uvicorn.Server):
    """uvicorn, except that SIGTERM drains first: /readyz and new requests get 503 while the requests in
    flight finish (up to the drain timeout), then the server exits with status 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.fw_state, self.drain_timeout = state, drain_timeout

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
        time.sleep(0.2)  # let the last responses flush
        self.should_exit = True


def serve(cfg: ServeConfig) -> None:
    """Serve ``cfg.model`` until SIGTERM (drain, then exit) or Ctrl-C."""
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines; protect it with --api-keys", cfg.host)
    missing = [name for name in UI_LIBRARIES if not (UI / name).is_file()]
    if missing:
        print(f"fourwalls: the web page's libraries are missing ({', '.join(missing)} under {UI}); "
              "scripts/build-ui fetches them (make run does)", file=sys.stderr)
    state = build_state(cfg)
    config = uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="info",
                            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout)), access_log=False)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{cfg.port}"
    print(f"fourwalls: serving {state.lm.name}: web chat at {url}/ and API at {url}/v1 (documented at {url}/docs)",
          file=sys.stderr, flush=True)
    try:
        _Server(config, state, cfg.drain_timeout).run()
    finally:
        state.engine.stop()
        state.close()
