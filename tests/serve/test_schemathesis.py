"""Schemathesis against /openapi.json: generated requests, valid and not, must never get a 5xx."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.serve.app import ROUTES
from fourwalls.serve.server import ServeConfig
from tests.serve.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny_live(session_store, smol):
    """A tiny random model with the real tokenizer: the API layer at full speed, short generations."""
    cfg = preset("tiny-llama").replace(vocab_size=smol.config.vocab_size, context_length=128,
                                       eos_token_ids=smol.config.eos_token_ids)
    model = Transformer(cfg)
    init_weights(model)
    if "tiny-api" not in session_store.names():
        session_store.add("tiny-api", cfg, model.state_dict(), smol.tokenizer)
    server = LiveServer(ServeConfig("tiny-api", port=free_port(), engine=EngineConfig(max_batch=4, max_len=128)),
                        session_store)
    yield server
    server.close()


def test_no_generated_request_gets_a_server_error(tiny_live, tmp_path):
    """Every operation, with the strings of fuzz_hooks (lone surrogates, control and format characters, control
    tokens) among the generated ones; the server's own count of responses by route and status must show no 5xx."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.serve.fuzz_hooks", "FUZZ_MODEL": "tiny-api",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{tiny_live.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--generation-deterministic", "--generation-allow-x00", "true",
         "--request-timeout", "60"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    counted = {}
    for line in httpx.get(f"{tiny_live.url}/metrics").text.splitlines():
        if line.startswith("fourwalls_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            route, status = re.findall(r'"([^"]*)"', labels)
            counted[route, status] = float(value)
    assert not {k: v for k, v in counted.items() if k[1].startswith("5")}, counted
    reached = {route for route, _ in counted}
    assert {r for r in ROUTES if r.startswith("/v1/")} <= reached, sorted(reached)
    # Valid requests were among them, and they reached the engine.
    assert counted.get(("/v1/chat/completions", "200"), 0) >= 10
    assert counted.get(("/v1/chat/completions", "400"), 0) >= 1  # and the strings that are not text were refused
    # The Responses and Anthropic Messages routes were fuzzed as much as the others.
    for route in ("/v1/responses", "/v1/responses/{response_id}", "/v1/messages"):
        assert sum(n for (r, _), n in counted.items() if r == route) >= 5, (route, counted)
