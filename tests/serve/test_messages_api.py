"""POST /v1/messages with the official `anthropic` client on the bundled model: text, streaming events, tool_use
and tool_result blocks, x-api-key mapped to the server's keys, and Anthropic's error shape."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from fourwalls.engine import EngineConfig
from fourwalls.serve.server import ServeConfig
from fourwalls.store import DEFAULT_MODEL
from tests.serve.conftest import LiveServer, free_port, key_file

pytestmark = pytest.mark.slow
WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                            "required": ["city"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Lima?"}]
GREEDY = {"temperature": 0}  # the anthropic client takes sampling settings only in the body


@pytest.fixture
def client(live):
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)


def test_text_with_system_and_usage(client):
    m = client.messages.create(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=12, system="Be brief.",
                               messages=[{"role": "user", "content": "Name three colours."}])
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
    assert m.content[0].text.strip() and m.stop_reason in ("end_turn", "max_tokens")
    assert 0 < m.usage.output_tokens <= 12 and m.usage.input_tokens > 5


def test_stop_sequences(client):
    m = client.messages.create(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=40, stop_sequences=["3"],
                               messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    if m.stop_reason == "stop_sequence":
        assert m.stop_sequence == "3" and "3" not in m.content[0].text
    else:  # the model did not write a 3 at all
        assert "3" not in m.content[0].text


def test_streaming_events_give_the_same_text(client):
    kw = dict(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi!"}])
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason


def test_tool_use_then_tool_result_round_trip(client):
    m = client.messages.create(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=60, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather",
                                                                      "disable_parallel_tool_use": True})
    assert m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city"} and isinstance(use.input["city"], str)
    with client.messages.stream(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=60, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "any"}) as stream:
        streamed = [b for b in stream.get_final_message().content if b.type == "tool_use"]
    assert streamed and streamed[0].name == "get_weather" and "city" in streamed[0].input
    final = client.messages.create(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=20, tools=[WEATHER],
                                   tool_choice={"type": "none"}, messages=[
                                       *ASK, {"role": "assistant", "content": m.content},
                                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                                     "content": "18 degrees, cloudy"}]}])
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].text.strip()
    asked = client.messages.create(extra_body=GREEDY, model=DEFAULT_MODEL, max_tokens=1, tools=[WEATHER],
                                   tool_choice={"type": "none"}, messages=ASK)
    assert final.usage.input_tokens > asked.usage.input_tokens + 10  # the call and its result are in the prompt


def test_builtin_calculator_is_a_server_tool_use_block(client):
    raw = client.messages.with_raw_response.create(
        model=DEFAULT_MODEL, max_tokens=40, messages=[{"role": "user", "content": "What is 12 * 12?"}],
        tools=[{"type": "fourwalls", "name": "calculator"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={**GREEDY, "max_tool_rounds": 1})
    blocks = raw.http_response.json()["content"]  # fourwalls_tool_result is not a block type the client knows
    assert [b["type"] for b in blocks] == ["server_tool_use", "fourwalls_tool_result", "text"]
    assert blocks[0]["name"] == "calculator" and blocks[0]["input"]["expression"]
    assert blocks[1]["tool_use_id"] == blocks[0]["id"] and blocks[1]["content"]


@pytest.mark.parametrize(("kw", "status"), [
    ({"tools": [{**WEATHER, "input_schema": {"type": "object", "properties": {"city": {"type": 3}}}}]}, 400),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}]},
     400),
    ({"max_tokens": 0}, 400),
    ({"model": "no-such-model"}, 404),
])
def test_bad_requests_get_anthropic_errors(client, kw, status):
    with pytest.raises(anthropic.APIStatusError) as e:
        client.messages.create(**{"model": DEFAULT_MODEL, "max_tokens": 4, "messages": ASK, **kw})
    assert e.value.status_code == status
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert body["error"]["message"]


def test_x_api_key_maps_to_the_same_keys_and_scopes(session_store, tmp_path):
    keys = key_file(tmp_path / "keys.json", {"sk-ok": {"name": "ok"},
                                             "sk-other": {"name": "other", "models": ["some-other-model"]}})
    server = LiveServer(ServeConfig(DEFAULT_MODEL, port=free_port(), api_keys=keys,
                                    engine=EngineConfig(max_batch=2, max_len=256)), session_store)
    try:
        kw = dict(model=DEFAULT_MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        ok = anthropic.Anthropic(base_url=server.url, api_key="sk-ok", max_retries=0)
        assert ok.messages.create(**kw).usage.output_tokens >= 1
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0).messages.create(**kw)
        assert e.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.PermissionDeniedError):
            anthropic.Anthropic(base_url=server.url, api_key="sk-other", max_retries=0).messages.create(**kw)
        r = httpx.post(f"{server.url}/v1/messages", json=kw)  # no key at all
        assert r.status_code == 401 and r.json()["type"] == "error"
    finally:
        server.close()
