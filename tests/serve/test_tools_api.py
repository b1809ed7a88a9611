"""Tool calling on /v1/chat/completions with the official `openai` client and the bundled model: forced calls,
round trips, streamed call deltas, the built-in tools the server runs, and the 4xx for every bad tool request."""

from __future__ import annotations

import json

import openai
import pytest

from fourwalls.store import DEFAULT_MODEL

pytestmark = pytest.mark.slow
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def valid_weather_args(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["city"], str) and 1 <= len(args["city"]) <= 40
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_parses_and_fits_the_schema(client, choice):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                       parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls"
    [call] = choice0.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    valid_weather_args(call.function.arguments)


def test_round_trip_call_then_result_then_answer(client):
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    final = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", max_tokens=30, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content.strip() and not final.choices[0].message.tool_calls
    # the call and its result reached the prompt
    asked = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_tokens=1)
    assert final.usage.prompt_tokens > asked.usage.prompt_tokens + first.usage.completion_tokens + 10


def test_streamed_call_deltas_reassemble_to_the_same_call(client):
    kw = dict(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              max_tokens=80, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert list(calls) == [0] and calls[0]["id"]
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)
    assert reasons[-1] == "tool_calls"


def test_builtin_calculator_runs_on_the_server_and_every_round_shows(live, client):
    r = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is 1234 * 5678?"}],
        tools=[{"type": "fourwalls", "name": "calculator"}], tool_choice="required", max_tokens=60, temperature=0,
        extra_body={"max_tool_rounds": 1})
    body = r.model_dump()
    rounds = body["tool_rounds"]
    assert len(rounds) == 1
    call = rounds[0]["tool_calls"][0]
    assert call["function"]["name"] == "calculator"
    expression = json.loads(call["function"]["arguments"])["expression"]
    result = rounds[0]["results"][0]
    assert expression.strip() and result["tool_call_id"] == call["id"] and result["content"]
    assert r.choices[0].finish_reason in ("stop", "length")  # the last round answers in text
    assert not r.choices[0].message.tool_calls  # the client has nothing to run
    # usage counts both rounds: the second prompt holds the first, so prompt tokens more than double
    single = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=1)
    assert r.usage.prompt_tokens > 2 * single.usage.prompt_tokens


@pytest.mark.parametrize(("kw", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                               "properties": {"x": {"type": 7}}}}}]},
     "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "fourwalls", "name": "shell"}]}, "tools"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "21C"}]}, "messages"),
    ({"tools": [{"type": "fourwalls", "name": "calculator"}], "extra_body": {"max_tool_rounds": 99}},
     "max_tool_rounds"),
])
def test_bad_tool_requests_are_400s(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 4, **kw})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["message"]
