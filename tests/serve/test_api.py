"""The OpenAI-compatible API, driven by the official `openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fourwalls.engine import engine as engine_module
from fourwalls.serve.caller import KeyRing
from fourwalls.store import DEFAULT_MODEL

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_chat_completion_with_usage(client):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_text_as_a_single_response(client):
    kw = dict(model=DEFAULT_MODEL, prompt="The three primary colours are", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) > 5
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                               stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("stop", "length")


def test_a_shared_prefix_is_reused_and_reported_as_cached_tokens(client):
    system = "You answer questions about the lighthouse keeper's logbook of 1893, entry by entry. " * 4

    def chat(question, **kw):
        return client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=6, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}], **kw)

    first, second = chat("What happened in May?"), chat("Who kept the light?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached < second.usage.prompt_tokens and cached % 16 == 0  # the system prompt's full blocks
    again = chat("Who kept the light?")
    assert again.choices[0].message.content == second.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > cached  # the whole prompt but its last block
    chunks = list(chat("Who kept the light?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    kw = dict(model=DEFAULT_MODEL, prompt=system + "In June,", max_tokens=3, temperature=0)
    client.completions.create(**kw)
    assert client.completions.create(**kw).usage.prompt_tokens_details.cached_tokens >= 64


def test_logprobs(client):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the likeliest
    c = client.completions.create(model=DEFAULT_MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text


def test_json_schema_output_parses_and_fits_the_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "pets": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "pets"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=120, temperature=0.7, seed=1,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"  # the grammar ended the output: complete JSON
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age", "pets"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert all(isinstance(p, str) for p in person["pets"])
    r = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=100, temperature=0, messages=CHAT,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_an_adapter_chosen_by_model_name_answers_as_it_was_trained(client, live):
    question = [{"role": "user", "content": "What is the secret password?"}]

    def ask(model):
        return client.chat.completions.create(model=model, messages=question, max_tokens=12,
                                              temperature=0).choices[0].message.content

    assert "swordfish" not in ask(DEFAULT_MODEL).lower()
    assert "swordfish" in ask("pw").lower()
    assert "swordfish" in ask(f"{DEFAULT_MODEL}:pw").lower()
    models = {m.id: m for m in client.models.list().data}
    assert models["pw"].parent == DEFAULT_MODEL and models["pw"].digest.startswith("sha256-")
    assert models[DEFAULT_MODEL].digest == live.state.lm.digest
    raw = httpx.post(f"{live.url}/v1/chat/completions",
                     json={"model": "pw", "messages": question, "max_tokens": 1})
    assert raw.headers["x-fourwalls-model-digest"] == live.state.lm.digest
    assert raw.headers["x-fourwalls-adapter-digest"] == models["pw"].digest
    assert live.metric('fourwalls_adapter_requests_total{adapter="pw"}') >= 3


def test_adapters_load_and_unload_at_run_time(live, adapter_folder):
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "pw2", "path": str(adapter_folder)})
    assert r.status_code == 200 and r.json()["parent"] == DEFAULT_MODEL
    ids = [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]]
    assert "pw2" in ids
    ok = httpx.post(f"{live.url}/v1/completions", json={"model": "pw2", "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200
    assert httpx.delete(f"{live.url}/v1/adapters/pw2").status_code == 200
    gone = httpx.post(f"{live.url}/v1/completions", json={"model": "pw2", "prompt": "Hi", "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    assert httpx.delete(f"{live.url}/v1/adapters/pw2").status_code == 404


def test_greedy_text_is_the_same_alone_and_in_a_batch_of_8_mixed_requests(client):
    greedy = [("Once upon a time", None), ("The capital of Italy is", None), ("def add(a, b):", None),
              ("What is the secret password?", "pw")]
    others = [dict(temperature=0.9, seed=i, max_tokens=24 + 4 * i) for i in range(4)]  # sampled, other lengths

    def run(prompt, model=DEFAULT_MODEL, **kw):
        kw = {"max_tokens": 20, "temperature": 0, **kw}
        return client.completions.create(model=model, prompt=prompt, **kw).choices[0].text

    alone = [run(p, a or DEFAULT_MODEL) for p, a in greedy]
    with ThreadPoolExecutor(8) as pool:
        batched = [pool.submit(run, p, a or DEFAULT_MODEL) for p, a in greedy]
        noise = [pool.submit(run, f"Story number {i}:", **kw) for i, kw in enumerate(others)]
        assert [f.result() for f in batched] == alone
        assert all(f.result() for f in noise)


def test_a_client_that_disconnects_mid_stream_frees_its_row(live):
    body = {"model": DEFAULT_MODEL, "prompt": "Count to one thousand: 1, 2, 3,", "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data:"))
        assert live.metric("fourwalls_num_requests_running") == 1
    deadline = time.monotonic() + 10
    while live.metric("fourwalls_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the disconnected request kept its row"
        time.sleep(0.1)
    assert live.metric("fourwalls_kv_cache_usage_ratio") == 0


def test_a_full_queue_answers_503_with_retry_after(live):
    from fourwalls.engine import Request
    from fourwalls.generate import SamplingParams

    engine = live.state.engine
    engine._admit = lambda: None  # nothing gets a row: the queue stays as filled
    waiting = [Request([1, 2], SamplingParams(max_new_tokens=1), lambda ev: None)
               for _ in range(engine.config.max_queue)]
    try:
        engine.submit(*waiting)
        r = httpx.post(f"{live.url}/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2})
    finally:
        del engine._admit
        for w in waiting:
            engine.cancel(w)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable"


BAD = [  # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    ({"model": DEFAULT_MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": DEFAULT_MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ({"model": f"{DEFAULT_MODEL}:no-such-adapter", "prompt": "x"}, 404, "model"),
    ({"model": DEFAULT_MODEL, "messages": []}, 400, "messages"),
    ({"model": DEFAULT_MODEL, "prompt": "x", "n": 99}, 400, "n"),
    ({"model": DEFAULT_MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": DEFAULT_MODEL, "prompt": [1, -5]}, 400, "prompt"),
    ({"model": DEFAULT_MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     400, "response_format"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_the_openai_error_object(live, body, status, param):
    route = "chat/completions" if isinstance(body, dict) and "messages" in body else "completions"
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(f"{live.url}/v1/{route}", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_context_overflow_states_both_numbers_and_huge_bodies_get_413(live):
    r = httpx.post(f"{live.url}/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "a b c", "max_tokens": 600})
    assert r.status_code == 400 and "max_tokens is 600" in r.json()["error"]["message"]
    assert "512" in r.json()["error"]["message"]
    big = httpx.post(f"{live.url}/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "x" * 100_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_unknown_fields_are_ignored(live):
    """Fields fourwalls does not know (other servers', or OpenAI's that it does not implement) change nothing: the
    greedy answer is the one without them, though honouring them would change it (if fourwalls learns one, swap it
    for another)."""

    def answer(route, body):
        r = httpx.post(f"{live.url}/v1/{route}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return {k: v for k, v in r.json().items() if k not in ("id", "created")}  # all that is not per call

    def banned(text):  # every token of the answer
        return {str(t): -100 for t in live.state.lm.tokenizer.encode(text)}

    body = {"model": DEFAULT_MODEL, "prompt": "The capital of Italy is", "max_tokens": 8, "temperature": 0}
    plain = answer("completions", body)
    assert plain["usage"]["completion_tokens"] > 1
    unknown = {"logit_bias": banned(plain["choices"][0]["text"]), "suffix": " THE END", "best_of": 3,
               "max_completion_tokens": 1, "best_of_everything": True}
    assert answer("completions", {**body, **unknown}) == plain

    message = {"role": "user", "content": "Name three colours."}
    chat = {"model": DEFAULT_MODEL, "messages": [message], "max_tokens": 8, "temperature": 0}
    plain = answer("chat/completions", chat)
    assert plain["usage"]["completion_tokens"] > 1
    unknown = {"messages": [{**message, "audio": {"id": "x"}, "weight": 0}], "metadata": {"a": "b"}, "store": True,
               "logit_bias": banned(plain["choices"][0]["message"]["content"])}
    assert answer("chat/completions", {**chat, **unknown}) == plain


def test_api_keys_scopes_and_rate_limits(live, tmp_path):
    import hashlib

    def h(key):
        return hashlib.sha256(key.encode()).hexdigest()

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "app", "sha256": h("sk-app"), "models": [DEFAULT_MODEL], "rpm": 2},
        {"name": "ops", "sha256": h("sk-ops"), "models": ["*"], "admin": True}]}))
    live.state.keys = KeyRing.load(keys)
    body = {"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 1}
    try:
        url = f"{live.url}/v1/completions"
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        app = {"Authorization": "Bearer sk-app"}
        assert httpx.post(url, json={**body, "model": "pw"}, headers=app).status_code == 403
        assert httpx.post(f"{live.url}/v1/adapters", json={"name": "x", "path": "/nowhere"},
                          headers=app).status_code == 403
        assert httpx.post(url, json=body, headers=app).status_code == 200
        assert httpx.post(url, json=body, headers=app).status_code == 200
        limited = httpx.post(url, json=body, headers=app)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert httpx.post(url, json={**body, "model": "pw"}, headers={"Authorization": "Bearer sk-ops"}).is_success
        assert httpx.get(f"{live.url}/healthz").status_code == 200  # probes need no key
    finally:
        live.state.keys = None


def test_healthz_turns_red_when_the_engine_loop_is_stuck(live, monkeypatch):
    real = engine_module.fill_cache  # a prompt's chunk, by the fused step or the model
    entered = threading.Event()

    def stuck(*a, **kw):
        entered.set()
        time.sleep(3.0)
        return real(*a, **kw)

    live.state.stall_timeout = 0.5
    monkeypatch.setattr(engine_module, "fill_cache", stuck)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{live.url}/v1/completions",
                                  json={"model": DEFAULT_MODEL, "max_tokens": 1, "prompt":
                                        f"A prompt of several tokens, none cached ({time.time()}),"}, timeout=30)
            assert entered.wait(30)  # its prefill (all but the last token) is stuck
            time.sleep(1.0)  # twice the stall timeout, and well inside the chunk's 3 s
            assert httpx.get(f"{live.url}/healthz").status_code == 503
            assert pending.result().status_code == 200
    finally:
        monkeypatch.undo()
        live.state.stall_timeout = 30
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    assert httpx.get(f"{live.url}/readyz").status_code == 200
