"""Model "auto" on every generating route: the router picks the expert (or the base), and the response says
which in its model field, the x-fourwalls-adapter header and the route metric."""

from __future__ import annotations

import json

import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.experts import add_expert
from fourwalls.serve.server import ServeConfig
from fourwalls.train.loop import TrainConfig
from fourwalls.train.recipes import finetune
from tests.serve.conftest import LiveServer, free_port, key_file, tiny_chat_model

BASE = "tiny-experts"
MATH = ["What is 17 plus 26?", "Subtract 9 from 40.", "How much is 6 times 7?", "Add 120 and 45.",
        "Ann has 3 apples and buys 4 more. How many apples does she have?", "What is 250 minus 75?"]
PIG = ["Translate into pig latin: the quick brown fox", "Pig latin for: hello world",
       "Say in pig latin: good morning friend", "Translate into pig latin: green birds sing"]
ADMIN, LIMITED = "admin-secret", "pig-only-secret"


@pytest.fixture(scope="module")
def experts_live(session_store, smol, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experts-api")
    tiny_chat_model(session_store, smol, BASE)
    for name, prompts in (("math", MATH), ("pig", PIG)):
        if name not in session_store.names():
            data = tmp / f"{name}.jsonl"
            data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                             {"role": "assistant", "content": "ok"}]}) + "\n"
                                    for p in prompts))
            finetune(BASE, data, "lora", name, TrainConfig(steps=1, batch_size=2, progress=False), max_len=64,
                     store=session_store, run_dir=tmp / name)
        add_expert(session_store, name)
    keys = key_file(tmp / "keys.json", {ADMIN: {"name": "admin", "admin": True},
                                        LIMITED: {"name": "limited", "models": [BASE, "pig"]}})
    server = LiveServer(ServeConfig(BASE, port=free_port(), api_keys=keys,
                                    engine=EngineConfig(max_batch=4, max_len=256)), session_store)
    yield server
    server.close()


def routes(server: LiveServer, adapter: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f'fourwalls_route_total{{adapter="{adapter}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def ask(server: LiveServer, path: str, model: str, prompt: str, key: str = ADMIN) -> httpx.Response:
    body = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello."},
                                                  {"role": "user", "content": prompt}], "max_tokens": 2},
            "/v1/completions": {"prompt": prompt, "max_tokens": 2},
            "/v1/responses": {"input": prompt, "max_output_tokens": 2},
            "/v1/messages": {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}}[path]
    r = httpx.post(f"{server.url}{path}", json={"model": model, **body}, timeout=60,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"])
def test_auto_runs_the_expert_whose_profile_fits_and_says_so(experts_live, path):
    before = {a: routes(experts_live, a) for a in ("math", "pig", "")}
    for prompt, expert in (("What is 31 plus 12?", "math"), ("Translate into pig latin: a lazy dog", "pig"),
                           ("Write a haiku about autumn leaves.", BASE)):
        r = ask(experts_live, path, "auto" if expert != "pig" else f"{BASE}:auto", prompt)
        assert r.headers["x-fourwalls-adapter"] == expert
        assert r.json()["model"] == expert
        if expert != BASE:
            digest = experts_live.state.engine.adapters[expert].digest
            assert r.headers["x-fourwalls-adapter-digest"] == digest
    assert [routes(experts_live, a) - before[a] for a in ("math", "pig", "")] == [1, 1, 1]


def test_a_streamed_auto_answer_names_the_expert_too(experts_live):
    with httpx.stream("POST", f"{experts_live.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": "auto", "stream": True, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "How much is 9 times 8?"}]}) as r:
        assert r.headers["x-fourwalls-adapter"] == "math"
        first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: {"))[6:])
    assert first["model"] == "math"


def test_a_key_is_never_routed_to_an_adapter_it_may_not_use(experts_live):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = ask(experts_live, path, "auto", "What is 31 plus 12?", key=LIMITED)
        assert r.headers["x-fourwalls-adapter"] == BASE and r.json()["model"] == BASE
        r = ask(experts_live, path, "auto", "Translate into pig latin: a lazy dog", key=LIMITED)
        assert r.json()["model"] == "pig"
    models = httpx.get(f"{experts_live.url}/v1/models", headers={"Authorization": f"Bearer {LIMITED}"}).json()
    auto = next(m for m in models["data"] if m["id"] == "auto")
    assert auto["experts"] == ["pig"] and "math" not in [m["id"] for m in models["data"]]


def test_auto_routes_one_completion_prompt_at_a_time(experts_live):
    r = httpx.post(f"{experts_live.url}/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"model": "auto", "prompt": ["What is 1 plus 2?", "Pig latin for: cat"], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_routing_is_timed(experts_live):
    ask(experts_live, "/v1/completions", "auto", "What is 2 plus 2?")
    text = httpx.get(f"{experts_live.url}/metrics").text
    count = next(line for line in text.splitlines() if line.startswith("fourwalls_route_latency_seconds_count"))
    assert float(count.rsplit(" ", 1)[1]) > 0
