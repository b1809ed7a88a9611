"""`serve --prefill-workers`: the server answers as it does without them, and gives its cores back on close."""

from __future__ import annotations

import os

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.serve.server import ServeConfig
from tests.serve.conftest import LiveServer, free_port, tiny_chat_model

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a worker and the engine need 2 cores")


def answers(server: LiveServer) -> list[dict]:
    out = []
    for body in ({"temperature": 0}, {"temperature": 0.9, "seed": 7}):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": server.state.lm.name, "max_tokens": 12, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Say something about the sea, please. " * 20}], **body})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


def test_a_server_with_a_prefill_worker_answers_as_one_without(session_store, smol):
    model = tiny_chat_model(session_store, smol)
    cores = os.sched_getaffinity(0)
    results = []
    for workers in (0, 1):
        server = LiveServer(ServeConfig(model, port=free_port(), engine=EngineConfig(
            max_batch=4, max_len=512, prefill_chunk=64, prefill_workers=workers)), session_store)
        try:
            assert (server.state.engine.workers is not None) == bool(workers)
            results.append(answers(server))
        finally:
            server.close()
    assert results[0] == results[1]
    assert os.sched_getaffinity(0) == cores
