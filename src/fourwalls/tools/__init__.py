"""Built-in tools that fourwalls runs itself: ``calculator`` (exact arithmetic, units) and ``documents`` (search
over the caller's document collections). A :class:`Toolbox` holds one conversation's tools; the loop that runs them
(model -> tool -> model, a bounded number of rounds) is the caller's: the server's routes and ``fourwalls chat``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fourwalls.errors import FourwallsError, UsageError
from fourwalls.tools import calculator, documents
from fourwalls.tools.format import Function, ToolCall

if TYPE_CHECKING:
    from fourwalls.rag.retrieve import Retriever

BUILTINS = (calculator.NAME, documents.NAME)
MAX_ROUNDS = 8  # model -> tools -> model rounds one request may ask for
DEFAULT_ROUNDS = 4
MAX_RESULT_CHARS = 8000  # what one tool result may put into the prompt


@dataclass(frozen=True)
class ToolSpec:
    """A built-in tool asked for by name, with the documents tool's collection (None: every collection)."""

    name: str
    collection: str | None = None

    @classmethod
    def parse(cls, text: str) -> ToolSpec:
        """``calculator``, ``documents`` or ``documents:COLLECTION``."""
        name, _, collection = text.strip().partition(":")
        if name not in BUILTINS:
            raise UsageError(f"unknown tool {name!r}; the built-in tools are {', '.join(BUILTINS)}", param="tools")
        if collection and name != documents.NAME:
            raise UsageError(f"only the documents tool takes a collection ({text!r})", param="tools")
        return cls(name, collection or None)


def parse_specs(text: str) -> list[ToolSpec]:
    """``calculator,documents:handbook`` as tool specs."""
    specs = [ToolSpec.parse(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise UsageError("no tools named; the built-in tools are " + ", ".join(BUILTINS), param="tools")
    return specs


@dataclass
class Round:
    """One round of built-in calls: what the model asked, and what each tool answered (in order)."""

    calls: list[ToolCall]
    results: list[str]

    def messages(self, text: str = "") -> list[dict[str, Any]]:
        """The round as chat messages: the assistant's turn (``text`` and the calls), then each tool's result."""
        return [{"role": "assistant", "content": text, "tool_calls": self.calls},
                *({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": r}
                  for c, r in zip(self.calls, self.results))]


class Toolbox:
    """The built-in tools of one conversation, by name."""

    def __init__(self, specs: list[ToolSpec], retriever: Callable[[], Retriever] | None = None,
                 control: list[str] | None = None, groups: set[str] | None = None) -> None:
        self.functions: list[Function] = []
        self.run_fns: dict[str, Callable[[dict[str, Any]], str]] = {}
        self.documents: documents.Documents | None = None
        for spec in specs:
            if spec.name in self.run_fns:
                raise UsageError(f"the tool {spec.name!r} is named twice", param="tools")
            if spec.name == calculator.NAME:
                self.functions.append(Function(calculator.NAME, calculator.DESCRIPTION, calculator.PARAMETERS))
                self.run_fns[spec.name] = lambda a: calculator.calculate(str(a.get("expression", "")))
            else:
                if retriever is None:
                    raise UsageError("the documents tool needs a document store", param="tools")
                self.documents = documents.Documents(retriever(), control or [], spec.collection, groups)
                self.functions.append(Function(documents.NAME, documents.DESCRIPTION, documents.PARAMETERS))
                self.run_fns[spec.name] = lambda a: self.documents(str(a.get("query", "")))  # type: ignore[misc]

    def __contains__(self, name: str) -> bool:
        return name in self.run_fns

    def run(self, call: ToolCall) -> str:
        """The tool's answer to ``call``; a failure is an answer too (the model reads it and may try again)."""
        try:
            arguments = json.loads(call.arguments)
            result = self.run_fns[call.name](arguments if isinstance(arguments, dict) else {})
        except ValueError:
            result = "error: the arguments are not valid JSON"
        except FourwallsError as e:
            result = f"error: {e}"
        return result[:MAX_RESULT_CHARS]

    def citations(self, texts: list[str]) -> list[dict[str, Any]] | None:
        """The documents the conversation's searches returned, as citations (None: no documents tool)."""
        return None if self.documents is None else self.documents.citations(texts)
