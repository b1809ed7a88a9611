"""POST/GET/DELETE /v1/responses with the official `openai` client (responses.create, its streaming helper) on the
bundled model: text and items in, function calls out, stored conversations per key, JSON output."""

from __future__ import annotations

import json

import openai
import pytest

from fourwalls.store import DEFAULT_MODEL
from tests.serve.conftest import LiveServer, free_port, key_file

pytestmark = pytest.mark.slow
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_text_in_text_out_with_instructions_and_usage(client):
    r = client.responses.create(model=DEFAULT_MODEL, input="Name three colours.", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete") and r.output_text.strip()
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.output_tokens <= 12 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # GET gives back the stored response; DELETE forgets it
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=DEFAULT_MODEL, input="My name is Ada.", max_output_tokens=8,
                                    temperature=0)
    second = client.responses.create(model=DEFAULT_MODEL, input="What is my name?", max_output_tokens=8,
                                     temperature=0, previous_response_id=first.id)
    alone = client.responses.create(model=DEFAULT_MODEL, input="What is my name?", max_output_tokens=8,
                                    temperature=0, store=False)
    # the earlier turn is in the prompt without being resent
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store=False keeps nothing
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=DEFAULT_MODEL, input="Hi", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"


def test_forced_function_call_then_its_output_as_input(client):
    r = client.responses.create(model=DEFAULT_MODEL, input="What is the weather in Oslo?", tools=[WEATHER],
                                tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                temperature=0)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    assert set(json.loads(call.arguments)) == {"city"}
    final = client.responses.create(model=DEFAULT_MODEL, previous_response_id=r.id, tools=[WEATHER],
                                    tool_choice="none", max_output_tokens=20, temperature=0,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": "4 degrees and snowing"}])
    assert final.output_text.strip() and not [o for o in final.output if o.type == "function_call"]


def test_streaming_helper_gets_the_event_sequence_and_the_same_text(client):
    kw = dict(model=DEFAULT_MODEL, input="Count to five.", max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    kinds = [ev.type for ev in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete") and "response.output_text.delta" in kinds
    # (the helper's get_final_response() wants response.completed; a length cut ends with response.incomplete)
    assert events[-1].response.output_text == whole.output_text
    assert "".join(ev.delta for ev in events if ev.type == "response.output_text.delta") == whole.output_text
    with client.responses.stream(model=DEFAULT_MODEL, input="Weather in Rome?", tools=[WEATHER],
                                 tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                 temperature=0) as stream:
        events = list(stream)
    fc = [ev.delta for ev in events if ev.type == "response.function_call_arguments.delta"]
    calls = [o for o in events[-1].response.output if o.type == "function_call"]
    assert json.loads("".join(fc)) == json.loads(calls[0].arguments)


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    r = client.responses.create(model=DEFAULT_MODEL, input="Pick a colour.", max_output_tokens=30, temperature=0,
                                text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
    assert json.loads(r.output_text)["colour"] in ("red", "green", "blue")


def test_builtin_calculator_shows_each_round(client):
    r = client.responses.create(model=DEFAULT_MODEL, input="What is 37 * 91?", max_output_tokens=40, temperature=0,
                                tools=[{"type": "fourwalls", "name": "calculator"}], tool_choice="required",
                                extra_body={"max_tool_rounds": 1})
    ran = [o for o in r.output if o.type == "mcp_call"]
    assert len(ran) == 1 and ran[0].name == "calculator" and ran[0].output
    assert r.output[-1].type == "message"  # the last round answered in text


@pytest.mark.parametrize(("kw", "param"), [
    ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": {"city": {"type": 3}}}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]}, "messages"),
    ({"input": []}, "input"),
])
def test_bad_requests_are_400s_in_openai_shape(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**{"model": DEFAULT_MODEL, "input": "Hi", "max_output_tokens": 4, **kw})
    assert e.value.body["param"] == param and e.value.body["message"]


def test_stored_responses_belong_to_their_key(session_store, tmp_path):
    keys = key_file(tmp_path / "keys.json", {"sk-a": {"name": "a"}, "sk-b": {"name": "b"}})
    from fourwalls.engine import EngineConfig
    from fourwalls.serve.server import ServeConfig

    server = LiveServer(ServeConfig(DEFAULT_MODEL, port=free_port(), api_keys=keys, responses=tmp_path / "r.db",
                                    engine=EngineConfig(max_batch=2, max_len=256)), session_store)
    try:
        a, b = (openai.OpenAI(base_url=f"{server.url}/v1", api_key=k, max_retries=0) for k in ("sk-a", "sk-b"))
        r = a.responses.create(model=DEFAULT_MODEL, input="Hello", max_output_tokens=2)
        assert a.responses.retrieve(r.id).id == r.id
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.create(model=DEFAULT_MODEL, input="Hi", previous_response_id=r.id, max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            b.responses.delete(r.id)
        a.responses.delete(r.id)
    finally:
        server.close()
