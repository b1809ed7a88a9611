"""Structured output enforced token by token with llguidance: JSON (any object, or one that fits a JSON schema), or
any Lark grammar (tool calls: see tools/format.py)."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np
import torch
from torch import Tensor

from fourwalls.errors import UsageError
from fourwalls.tokenizer import Tokenizer

MAX_SCHEMA_BYTES = 64 * 1024  # compiling takes about 3 ms per KB here; llguidance's own limits bound the rest


class Grammars:
    """Compiles JSON schemas against one model's tokenizer (built once: it takes a fraction of a second)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos_ids)
        self.vocab_size = vocab_size

    def json(self, schema: dict[str, Any] | None = None) -> Constraint:
        """A constraint for JSON that fits ``schema`` (None: any JSON object). Raises UsageError if it is invalid
        or larger than MAX_SCHEMA_BYTES. Blocking (llguidance releases the GIL while it compiles)."""
        text = json.dumps(schema or {"type": "object"}, ensure_ascii=False)
        size = len(text.encode())
        if size > MAX_SCHEMA_BYTES:
            raise UsageError(f"the JSON schema has {size} bytes; this server compiles schemas of at most "
                             f"{MAX_SCHEMA_BYTES} bytes")
        try:
            # Compact JSON: a model left to choose its whitespace can spend its whole budget on newlines.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid JSON schema: {e}") from None
        return self._constraint(grammar, "invalid JSON schema")

    def check_schema(self, schema: dict[str, Any]) -> str | None:
        """Why ``schema`` cannot constrain output (None: it can). Blocking, as json() is."""
        try:
            self.json(schema)
        except UsageError as e:
            return str(e).removeprefix("invalid JSON schema: ")
        return None

    def lark(self, text: str) -> Constraint:
        """A constraint for output that fits a Lark grammar; UsageError if it does not compile or is larger than
        MAX_SCHEMA_BYTES (a tool call's grammar holds the schemas of every function offered). Blocking."""
        size = len(text.encode())
        if size > MAX_SCHEMA_BYTES:
            raise UsageError(f"the tools' grammar has {size} bytes; this server compiles grammars of at most "
                             f"{MAX_SCHEMA_BYTES} bytes: offer fewer or smaller tools")
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid grammar: {e}") from None
        return self._constraint(grammar, "invalid grammar")

    def _constraint(self, grammar: str, what: str) -> Constraint:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():  # an invalid grammar, or one past llguidance's limits on grammar and lexer size
            raise UsageError(f"{what}: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each token sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.bitmask = llnp.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: Tensor) -> Tensor:
        """``logits`` [V] with every token the grammar forbids set to -inf."""
        llnp.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: self.vocab_size]
        return logits.masked_fill(torch.from_numpy(bits == 0), float("-inf"))

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def copy(self) -> Constraint:
        """The same grammar at the same point, for another choice of the request (compiled once for all)."""
        return Constraint(self.matcher.deep_copy(), self.vocab_size)

    def advance(self, token: int) -> bool:
        """Consume the sampled token; True once the grammar is complete (the output must end)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()
