"""Schemathesis against /openapi.json: generated requests, valid and not, must never get a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.serve.server import ServeConfig
from tests.serve.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


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
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{tiny_live.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--generation-deterministic",
         "--request-timeout", "60"], cwd=tmp_path,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Valid requests were among them, and they reached the engine.
    assert tiny_live.metric('fourwalls_http_requests_total{route="/v1/chat/completions",status="200"}') >= 10
    # Every route was fuzzed, the Responses and Anthropic Messages ones too, and none answered with a 5xx.
    counts = [line for line in httpx.get(f"{tiny_live.url}/metrics").text.splitlines()
              if line.startswith("fourwalls_http_requests_total{")]
    for route in ("/v1/responses", "/v1/responses/{response_id}", "/v1/messages"):
        hits = [line for line in counts if f'route="{route}"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in hits) >= 5, route
        assert not [line for line in hits if 'status="5' in line], hits
