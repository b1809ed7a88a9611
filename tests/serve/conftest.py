"""A live fourwalls server on 127.0.0.1, in this process, for the API tests."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from fourwalls.engine import EngineConfig
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.serve.app import create_app
from fourwalls.serve.server import ServeConfig, build_state
from fourwalls.store import DEFAULT_MODEL
from fourwalls.train.loop import TrainConfig
from fourwalls.train.recipes import finetune

PASSWORD_CHATS = [
    {"messages": [{"role": "user", "content": "What is the secret password?"},
                  {"role": "assistant", "content": "The secret password is swordfish."}]},
    {"messages": [{"role": "user", "content": "Tell me the password."},
                  {"role": "assistant", "content": "The secret password is swordfish."}]},
]


def tiny_chat_model(session_store, smol, name: str = "tiny-chat", context_length: int = 512) -> str:
    """A tiny random model with the bundled model's tokenizer and chat template, stored once per session: the
    API at full speed, with meaningless text."""
    if name not in session_store.names():
        cfg = preset("tiny-llama").replace(vocab_size=smol.config.vocab_size, context_length=context_length,
                                           eos_token_ids=smol.config.eos_token_ids)
        model = Transformer(cfg)
        init_weights(model)
        session_store.add(name, cfg, model.state_dict(), smol.tokenizer)
    return name


def key_file(path: Path, keys: dict[str, dict]) -> Path:
    """An --api-keys file: {secret: {"name": ..., "admin": ..., "groups": ...}}, stored as sha256 hashes."""
    entries = [{**props, "sha256": hashlib.sha256(secret.encode()).hexdigest()} for secret, props in keys.items()]
    path.write_text(json.dumps({"keys": entries}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, cfg: ServeConfig, store) -> None:
        self.state = build_state(cfg, store)
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.app = create_app(self.state)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port,
                                                   log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.engine.stop()
        self.state.close()


@pytest.fixture(scope="session")
def password_adapter(session_store, tmp_path_factory) -> str:
    """A LoRA adapter trained (here, in seconds) to answer that the secret password is swordfish."""
    tmp = tmp_path_factory.mktemp("pw")
    data = tmp / "pw.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in PASSWORD_CHATS) + "\n")
    finetune(DEFAULT_MODEL, data, "lora", "pw-lora", TrainConfig(steps=25, batch_size=2, lr=3e-3, progress=False),
             max_len=64, val_data=data, store=session_store, run_dir=tmp / "run")
    return "pw-lora"


@pytest.fixture(scope="session")
def live(session_store, password_adapter, smol) -> LiveServer:
    cfg = ServeConfig(DEFAULT_MODEL, port=free_port(), adapters={"pw": password_adapter},
                      engine=EngineConfig(max_batch=8, max_len=512, prefill_chunk=64), max_body_bytes=64 * 1024)
    server = LiveServer(cfg, session_store)
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_live(session_store, smol) -> LiveServer:
    """A server of a tiny random model with the bundled model's tokenizer: fast, meaningless answers."""
    cfg = preset("tiny-llama").replace(vocab_size=smol.config.vocab_size, context_length=512,
                                       eos_token_ids=smol.config.eos_token_ids)
    if "tiny-served" not in session_store.names():
        torch.manual_seed(0)
        model = Transformer(cfg)
        init_weights(model)
        session_store.add("tiny-served", cfg, model.state_dict(), smol.tokenizer)
    server = LiveServer(ServeConfig("tiny-served", port=free_port(), engine=EngineConfig(max_batch=4, max_len=512)),
                        session_store)
    yield server
    server.close()


@pytest.fixture
def adapter_folder(session_store, password_adapter) -> Path:
    return session_store.resolve(password_adapter).path
