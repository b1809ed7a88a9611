"""How tool calls look to a model: offered in its prompt, written in its output, read back, and constrained.

Two dialects cover the families fourwalls loads:

- **hermes** (Qwen2.5, Hermes, and every template without tool support): a call is
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, several in a row for parallel calls.
- **llama3** (Llama 3.1/3.2 templates with tools): the whole reply is ``{"name": ..., "parameters": {...}}``.

A template that renders ``tools`` itself (as Hugging Face passes them) gets them; for one that does not (the bundled
SmolLM2's), :data:`TOOLS_PROMPT` goes into the system message, assistant calls are written in the Hermes way and
tool results come back as a user turn of ``<tool_response>`` blocks, as Qwen2.5's template does it.

Constraints are Lark grammars for llguidance: with ``required`` (or a named function) the output is one or more
calls from the first token; with ``auto`` the text is free until the model writes ``<tool_call>`` (a lazy lexeme:
the grammar switches on at the trigger), and the call it started is completed under the grammar, so every call
parses and its arguments fit the function's schema.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.nodes

from fourwalls.templates import TemplateSandbox, environment
from fourwalls.tokenizer import Tokenizer

HERMES, LLAMA3 = "hermes", "llama3"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it
# Separators as json.dumps writes them, which is how the templates render calls the model has seen.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class Function:
    """A function the model may call: its name, what it does, and its parameters' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None

    @property
    def schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}

    def spec(self) -> dict[str, Any]:
        """The function as templates and the OpenAI API spell it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.schema}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @property
    def args(self) -> dict[str, Any]:
        """The arguments as a dict ({} when they are not a JSON object)."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


def renders_tools(tokenizer: Tokenizer) -> bool:
    """Whether the model's chat template reads ``tools`` (else fourwalls writes them into the system message)."""
    return bool(tokenizer.chat_template) and _reads_tools(tokenizer.chat_template)


@functools.lru_cache(maxsize=64)
def _reads_tools(template: str) -> bool:
    # The names the template loads, from its parse tree alone: compiling it (jinja2.meta) would fold constants,
    # and a hostile template's `'x' * 3000000000` would be built right here, on the server's event loop.
    try:
        tree = environment().parse(template)
    except jinja2.TemplateError:
        return False
    return any(n.name in ("tools", "custom_tools") for n in tree.find_all(jinja2.nodes.Name) if n.ctx == "load")


def dialect(tokenizer: Tokenizer) -> str:
    """How this model writes calls: llama3 for Llama 3.x templates that render tools, else hermes."""
    template = tokenizer.chat_template or ""
    return LLAMA3 if renders_tools(tokenizer) and "<|start_header_id|>" in template else HERMES


# --- prompts ----------------------------------------------------------------------------------------------------


def render(tokenizer: Tokenizer, messages: list[dict[str, Any]], functions: list[Function],
           sandbox: TemplateSandbox | None = None) -> str:
    """The prompt for ``messages`` (OpenAI chat shape: assistant ``tool_calls`` as ToolCall, ``role: tool`` with
    ``tool_call_id``) offering ``functions``, ready for the assistant's turn; the template runs in ``sandbox``'s
    child processes within its budgets if given (the server), else in this process."""
    if renders_tools(tokenizer):
        turns = [_template_message(m) for m in messages]
        return tokenizer.apply_chat_template(turns, sandbox=sandbox, tools=[f.spec() for f in functions] or None)
    return tokenizer.apply_chat_template(fallback_messages(messages, functions), sandbox=sandbox)


def _template_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as Hugging Face templates read it: call arguments as dicts, never a None content."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.args}}
                             for c in m["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def fallback_messages(messages: list[dict[str, Any]], functions: list[Function]) -> list[dict[str, str]]:
    """The conversation in plain system/user/assistant turns, tools and calls written the Hermes way."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{OPEN}\n{_call_json(c.name, c.args, 'arguments')}\n{CLOSE}" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}".strip()})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results share one turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": "1"})
        else:
            out.append({"role": m["role"], "content": content})
    for m in out:
        m.pop("tool_results", None)
    if functions:
        prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(f.spec(), ensure_ascii=False) for f in functions))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call_json(name: str, arguments: dict[str, Any], key: str) -> str:
    return json.dumps({"name": name, key: arguments}, ensure_ascii=False)


# --- reading calls back -----------------------------------------------------------------------------------------


class CallReader:
    """Splits a model's streamed output into the text to show and the calls it makes.

    ``feed(text)`` and ``close()`` return (text to show now, calls completed now). Text that could still turn into
    a call (a partial ``<tool_call>``) is held back, and so is whitespace until text follows it.
    """

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.buf = ""
        self.in_call = False
        self.mode: str | None = None if dialect == LLAMA3 else "text"  # llama3: decided by the first character
        self.calls: list[ToolCall] = []
        self.held = ""  # whitespace not shown yet
        self.gap = ""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        if self.dialect == LLAMA3:
            return self._llama3(final=False)
        return self._hermes(final=False)

    def close(self) -> tuple[str, list[ToolCall]]:
        if self.dialect == LLAMA3:
            return self._llama3(final=True)
        return self._hermes(final=True)

    def _show(self, text: str, final: bool) -> str:
        text = self.held + text
        body = text.rstrip()
        self.held = "" if final else text[len(body):]
        return "" if self.calls and not body.strip() else body  # whitespace after a call is no text

    def _hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        shown, calls = [], []
        while True:
            if not self.in_call:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = 0 if final else _partial(self.buf, OPEN)
                    text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    shown.append(self._show(text, final))
                    break
                shown.append(self._show(self.buf[:at], False))
                self.gap, self.held = self.held, ""  # the gap before a call is shown only if the call is not one
                self.buf, self.in_call = self.buf[at + len(OPEN):], True
            end = self.buf.find(CLOSE)
            if end < 0 and not final:
                break
            body = self.buf if end < 0 else self.buf[:end]
            call = _parse_call(body)
            if call is None:  # not a call after all (a truncated one): show it as it was
                shown.append(self._show(self.gap + OPEN + (body if end < 0 else body + CLOSE), final))
            else:
                calls.append(call)
                self.calls.append(call)
            self.buf = "" if end < 0 else self.buf[end + len(CLOSE):]
            self.in_call = False
            if end < 0:
                break
        return "".join(shown), calls

    def _llama3(self, final: bool) -> tuple[str, list[ToolCall]]:
        if self.mode is None:
            stripped = self.buf.lstrip()
            if not final and (not stripped or PYTHON_TAG.startswith(stripped)):  # undecided until more comes
                return "", []
            stripped = stripped.removeprefix(PYTHON_TAG).lstrip()
            if not stripped and not final:
                return "", []
            self.mode = "call" if stripped.startswith("{") else "text"
        if self.mode == "text":
            text, self.buf = self.buf, ""
            return self._show(text, final), []
        if not final:
            return "", []
        calls = _json_calls(self.buf.strip().removeprefix(PYTHON_TAG))
        if calls is None:  # not a call after all (a truncated one): show it as it was
            text, self.buf = self.buf, ""
            return self._show(text, final), []
        self.calls.extend(calls)
        self.buf = ""
        return "", calls


def _json_calls(body: str) -> list[ToolCall] | None:
    """The calls of ``{...}`` or ``{...}; {...}``, or None if that is not what ``body`` is."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except ValueError:
            return None
        call = _parse_call(body[i:end])
        if call is None:
            return None
        calls.append(call)
        i = end
        while i < len(body) and body[i] in " \t\n;":
            i += 1
    return calls or None


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def parse(text: str, dialect: str) -> tuple[str, list[ToolCall]]:
    """The text and the calls of a whole output."""
    reader = CallReader(dialect)
    a, calls = reader.feed(text)
    b, more = reader.close()
    return (a + b).strip(), calls + more


# --- constraints ------------------------------------------------------------------------------------------------


def call_schema(functions: list[Function], dialect: str) -> dict[str, Any]:
    """The JSON schema of one call to any of ``functions``."""
    key = "parameters" if dialect == LLAMA3 else "arguments"
    options = [{"type": "object", "properties": {"name": {"const": f.name}, key: f.schema},
                "required": ["name", key], "additionalProperties": False} for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": _JSON_STYLE}


def grammar(functions: list[Function], dialect: str, choice: str, parallel: bool = True,
            answer: dict[str, Any] | None = None) -> str:
    """A Lark grammar (llguidance) for the output: calls only (``required``, or the function named ``choice``),
    or text (or JSON fitting ``answer``, a response format's schema) that may turn into calls (``auto``)."""
    if choice not in ("auto", "required"):
        functions = [f for f in functions if f.name == choice]
    call = json.dumps(call_schema(functions, dialect), ensure_ascii=False)
    answer_rule = f"%json {json.dumps({**answer, 'x-guidance': _JSON_STYLE})}" if answer is not None else "TEXT"
    if dialect == LLAMA3:
        text = "NOT_A_CALL" if answer is None else answer_rule
        start = "call" if choice != "auto" else f"{text} | call"
        return (f"%llguidance {{}}\nstart: {start}\ncall: %json {call}\n"
                r"NOT_A_CALL: /\s*([^{\s](.|\n)*)?/" "\n")
    more = f' ("\\n" "{OPEN}" body)*' if parallel else ""
    if choice != "auto":
        start, first = "calls", f'"{OPEN}" body'
    elif answer is None:
        start, first = "TEXT | calls", "trigger body"  # text, until the model opens a call
    else:
        start, first = f"{answer_rule} | calls", f'"{OPEN}" body'
    return (f"%llguidance {{}}\nstart: {start}\ncalls: {first}{more}\n"
            f'trigger[lazy]: TEXT "{OPEN}"\n'
            f'body: "\\n" %json {call} "\\n{CLOSE}"\n'
            r"TEXT: /(.|\n)*/" "\n")
