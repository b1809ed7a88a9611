"""The engine tests' fixtures: engines on a word-level tokenizer, stopped at the end of the test."""

from __future__ import annotations

import pytest
import tokenizers

from fourwalls.engine import Engine, EngineConfig
from fourwalls.tokenizer import Tokenizer


def word_tokenizer(n: int = 512) -> Tokenizer:
    vocab = {f"w{i}": i for i in range(n)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(backend)


@pytest.fixture
def make_engine():
    """Engines, started."""
    engines = []

    def make(model, **cfg) -> Engine:
        engine = Engine(model, word_tokenizer(), [], EngineConfig(**cfg))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop()


@pytest.fixture
def make_engine_stopped():
    """Engines whose loop starts only when a test calls start() (or never: the test steps them itself)."""
    engines = []

    def make(model, **cfg) -> Engine:
        engine = Engine(model, word_tokenizer(), [], EngineConfig(**cfg))
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        if e.thread.is_alive():
            e.stop()
