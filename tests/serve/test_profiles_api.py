"""Application profiles over the API: named by a request or its key, limits, errors, and per-profile metrics."""

from __future__ import annotations

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.errors import UsageError
from fourwalls.serve.server import ServeConfig, build_state
from tests.serve.conftest import LiveServer, free_port, key_file, tiny_chat_model

PROFILES = "[profiles.support]\npriority = 0\nttft_ms = 60000\nitl_ms = 60000\nmax_tokens = 5\n"
KEYS = {"sk-support": {"name": "support", "profile": "support"}, "sk-plain": {"name": "plain"}}


@pytest.fixture(scope="module")
def served(session_store, smol, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profiles")
    (tmp / "profiles.toml").write_text(PROFILES)
    cfg = ServeConfig(tiny_chat_model(session_store, smol), port=free_port(),
                      api_keys=key_file(tmp / "keys.json", KEYS), engine=EngineConfig(max_batch=4, max_len=512),
                      profiles=tmp / "profiles.toml")
    server = LiveServer(cfg, session_store)
    yield server
    server.close()


def series(server: LiveServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when there are none)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def chat(server: LiveServer, key: str, **body) -> httpx.Response:
    body = {"model": server.state.lm.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "ignore_eos": True} | body
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def test_a_request_runs_under_the_profile_it_names_else_its_keys_else_the_default(served):
    ttft = "fourwalls_profile_time_to_first_token_seconds_count"
    before = {p: series(served, ttft, profile=p) for p in ("batch", "support", "chat")}
    assert chat(served, "sk-plain", fourwalls={"profile": "batch"}).status_code == 200
    assert chat(served, "sk-support").status_code == 200
    assert chat(served, "sk-plain").status_code == 200
    assert chat(served, "sk-support", fourwalls={"profile": "chat"}).status_code == 200  # the request's wins
    after = {p: series(served, ttft, profile=p) for p in ("batch", "support", "chat")}
    assert {p: after[p] - before[p] for p in after} == {"batch": 1, "support": 1, "chat": 2}


def test_slo_attainment_is_counted_per_profile_and_slo(served):
    before = {s: series(served, "fourwalls_slo_requests_total", profile="support", slo=s) for s in ("ttft", "itl")}
    met = series(served, "fourwalls_slo_requests_total", profile="support", met="yes")
    assert chat(served, "sk-support").status_code == 200
    after = {s: series(served, "fourwalls_slo_requests_total", profile="support", slo=s) for s in ("ttft", "itl")}
    assert after["ttft"] - before["ttft"] == 1 and after["itl"] - before["itl"] == 1
    # a minute's SLOs: a tiny model's four tokens meet both
    assert series(served, "fourwalls_slo_requests_total", profile="support", met="yes") - met == 2
    b = series(served, "fourwalls_slo_requests_total", profile="batch")
    assert chat(served, "sk-plain", fourwalls={"profile": "batch"}).status_code == 200
    assert series(served, "fourwalls_slo_requests_total", profile="batch") == b  # batch has no SLO to count


def test_a_profiles_max_tokens_is_the_default_and_the_limit(served):
    r = chat(served, "sk-support", max_tokens=None)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"
    r = chat(served, "sk-support", max_tokens=6)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and "'support' profile allows (5)" in err["message"]
    r = httpx.post(f"{served.url}/v1/completions", json={"model": served.state.lm.name, "prompt": "Hi",
                   "max_tokens": 6, "fourwalls": {"profile": "support"}},
                   headers={"Authorization": "Bearer sk-plain"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_an_unknown_profile_is_a_400_that_lists_the_defined_ones(served):
    r = chat(served, "sk-plain", fourwalls={"profile": "urgent"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "fourwalls.profile" and err["code"] == "profile_not_found"
    assert "batch, chat, rag, summarize, support" in err["message"]


def test_a_server_refuses_to_start_with_a_key_or_default_naming_no_profile(session_store, smol, tmp_path):
    keys = key_file(tmp_path / "keys.json", {"sk-x": {"name": "x", "profile": "nightly"}})
    model = tiny_chat_model(session_store, smol)
    with pytest.raises(UsageError, match="key 'x' names profile 'nightly', which is not defined"):
        build_state(ServeConfig(model, api_keys=keys), session_store)
    with pytest.raises(UsageError, match="--default-profile names profile 'nightly'"):
        build_state(ServeConfig(model, default_profile="nightly"), session_store)


def test_with_profiles_off_every_request_is_an_equal(session_store, smol):
    server = LiveServer(ServeConfig(tiny_chat_model(session_store, smol), port=free_port(), profiles=None,
                                    engine=EngineConfig(max_batch=2, max_len=512)), session_store)
    try:
        r = chat(server, "none", fourwalls={"profile": "anything"}, max_tokens=300)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
        assert series(server, "fourwalls_profile_time_to_first_token_seconds_count") == 0
    finally:
        server.close()
