"""Tool-call dialects: tools rendered by the model's own template (Qwen2.5, Llama 3.1) or the documented fallback
(the bundled SmolLM2's template has no tools), calls read back whole and streamed, and the llguidance grammars
that keep calls well formed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fourwalls.engine.grammar import Grammars
from fourwalls.tools import format as fmt
from fourwalls.tools.format import HERMES, LLAMA3, CallReader, Function, ToolCall, grammar, parse, render

pytestmark = pytest.mark.slow  # the bundled model's tokenizer
TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
WEATHER = Function("get_weather", "The weather in a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                    "additionalProperties": False})
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
CONVERSATION = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]


def with_template(tok, name: str):
    return dataclasses.replace(tok, chat_template=(TEMPLATES / name).read_text())


def test_smollm2_has_no_tool_template_so_the_fallback_renders_them(smol):
    tok = smol.tokenizer
    assert not fmt.renders_tools(tok) and fmt.dialect(tok) == HERMES
    prompt = render(tok, CONVERSATION, [WEATHER])
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt  # the function in the system message
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n21 degrees\n</tool_response>" in prompt
    assert "<tools>" not in render(tok, CONVERSATION, [])  # tool_choice none: no tools on offer


def test_qwen_template_renders_tools_itself(smol):
    tok = with_template(smol.tokenizer, "qwen2.5.jinja")
    assert fmt.renders_tools(tok) and fmt.dialect(tok) == HERMES
    prompt = render(tok, CONVERSATION, [WEATHER])
    assert "You are provided with function signatures" in prompt and '"get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n21 degrees\n</tool_response>" in prompt


def test_llama31_template_renders_tools_and_json_calls(smol):
    tok = with_template(smol.tokenizer, "llama3.1.jinja")
    assert fmt.renders_tools(tok) and fmt.dialect(tok) == LLAMA3
    prompt = render(tok, CONVERSATION, [WEATHER])
    assert '"get_weather"' in prompt and '"parameters": {"city": "Paris"}' in prompt
    assert "<|start_header_id|>ipython<|end_header_id|>" in prompt and "21 degrees" in prompt


@pytest.mark.parametrize(("text", "dialect_", "shown", "calls"), [
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', HERMES,
     "Let me look.", [("get_weather", {"city": "Oslo"})]),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
     '"{\\"x\\": 1}"}\n</tool_call>', HERMES, "", [("a", {}), ("b", {"x": 1})]),
    ('<tool_call>\n{"name": "get_weather", "argu', HERMES, '<tool_call>\n{"name": "get_weather", "argu', []),
    ("Just text, 2 < 3.", HERMES, "Just text, 2 < 3.", []),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', LLAMA3, "", [("get_weather", {"city": "Rome"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": 2}}', LLAMA3, "",
     [("a", {}), ("b", {"y": 2})]),
    ('{"name": "get_weather", "parameters": {"ci', LLAMA3, '{"name": "get_weather", "parameters": {"ci', []),
    ("Sunny today.", LLAMA3, "Sunny today.", []),
])
def test_calls_are_read_back_whole_and_streamed_alike(text, dialect_, shown, calls):
    got_text, got = parse(text, dialect_)
    assert got_text == shown and [(c.name, json.loads(c.arguments)) for c in got] == calls
    reader, pieces, streamed = CallReader(dialect_), [], []
    for ch in text:  # one character at a time: a marker split anywhere
        t, c = reader.feed(ch)
        pieces.append(t)
        streamed += c
        assert "<tool_call>" not in "".join(pieces) or not calls  # a call's markup is never shown
    t, c = reader.close()
    assert ("".join(pieces) + t).strip() == shown and [(x.name, x.args) for x in streamed + c] == calls


def accepts(grammars: Grammars, tok, text: str, output: str) -> bool:
    matcher = grammars.lark(text).matcher
    return matcher.consume_tokens(tok.encode(output, add_special_tokens=False)) and not matcher.is_error()


@pytest.mark.parametrize("dialect_", [HERMES, LLAMA3])
def test_grammars_admit_only_calls_that_fit_the_schema(smol, dialect_):
    tok = smol.tokenizer
    grammars = Grammars(tok, smol.config.vocab_size, smol.config.eos_token_ids)
    key = "arguments" if dialect_ == HERMES else "parameters"
    good = json.dumps({"name": "get_weather", key: {"city": "Oslo"}})
    bad_args = json.dumps({"name": "get_weather", key: {"town": "Oslo"}})
    other = json.dumps({"name": "delete_everything", key: {}})
    wrap = (lambda s: f"<tool_call>\n{s}\n</tool_call>") if dialect_ == HERMES else (lambda s: s)
    required = grammar([WEATHER], dialect_, "required")
    assert accepts(grammars, tok, required, wrap(good))
    assert not accepts(grammars, tok, required, wrap(bad_args)) and not accepts(grammars, tok, required, wrap(other))
    assert not accepts(grammars, tok, required, "Sure, the weather is")
    auto = grammar([WEATHER], dialect_, "auto")
    assert accepts(grammars, tok, auto, "The weather is fine.")
    if dialect_ == HERMES:  # a call started after free text is held to the schema
        assert accepts(grammars, tok, auto, "Let me check. " + wrap(good))
        assert not accepts(grammars, tok, auto, "Let me check. " + wrap(bad_args))
