"""Structured output enforced token by token with llguidance: JSON (any object, or one that fits a JSON schema), or
any Lark grammar (tool calls: see tools/format.py)."""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np
import torch
from torch import Tensor

from fourwalls.errors import UsageError
from fourwalls.tokenizer import Tokenizer


class Grammars:
    """Compiles JSON schemas against one model's tokenizer (built once: it takes a fraction of a second)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos_ids)
        self.vocab_size = vocab_size

    def json(self, schema: dict[str, Any] | None = None) -> Constraint:
        """A constraint for JSON that fits ``schema`` (None: any JSON object). Raises UsageError if it is invalid."""
        try:
            # Compact JSON: a model left to choose its whitespace can spend its whole budget on newlines.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"},
                                                                     defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid JSON schema: {e}") from None
        return self._constraint(grammar, "invalid JSON schema")

    def check_schema(self, schema: dict[str, Any]) -> str | None:
        """Why ``schema`` cannot constrain output (None: it can)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as e:
            return str(e)
        return llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer) or None

    def lark(self, text: str) -> Constraint:
        """A constraint for output that fits a Lark grammar; UsageError if it does not compile."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid grammar: {e}") from None
        return self._constraint(grammar, "invalid grammar")

    def _constraint(self, grammar: str, what: str) -> Constraint:
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise UsageError(f"{what}: {error}")
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar), self.vocab_size)


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

    def advance(self, token: int) -> bool:
        """Consume the sampled token; True once the grammar is complete (the output must end)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()
