"""Perplexity one token at a time (as generation computes it) against perplexity over a whole window."""

from __future__ import annotations

import pytest

from fourwalls.errors import UsageError
from fourwalls.eval.perplexity import decode_perplexity, perplexity
from fourwalls.model.quant import QuantConfig, quantize_model
from tests.conftest import tiny_model

IDS = [(i * 37 + 11) % 500 + 3 for i in range(120)]


def test_decoding_a_text_token_by_token_scores_it_as_one_window_does(monkeypatch):
    model = tiny_model("tiny-llama3")
    window = perplexity(model, IDS, context=len(IDS), stride=len(IDS))
    fused = decode_perplexity(model, IDS)  # fourwalls' fused step, where this machine runs it
    assert fused.tokens == window.tokens == len(IDS) - 1
    assert fused.perplexity == pytest.approx(window.perplexity, rel=1e-4)
    monkeypatch.setattr("fourwalls.model.fused.decoder", lambda model: None)
    assert decode_perplexity(model, IDS).perplexity == pytest.approx(window.perplexity, rel=1e-4)  # torch


def test_int4_decoding_stays_close_to_the_int4_forward():
    model = tiny_model()
    quantize_model(model, QuantConfig("int4", group_size=32))
    window = perplexity(model, IDS, context=len(IDS), stride=len(IDS)).perplexity
    assert decode_perplexity(model, IDS).perplexity == pytest.approx(window, rel=0.01)


def test_decode_perplexity_refuses_what_it_cannot_score():
    model = tiny_model()
    with pytest.raises(UsageError, match="at least 2 tokens"):
        decode_perplexity(model, [5])
    with pytest.raises(UsageError, match="context window"):
        decode_perplexity(model, list(range(3, 300)))
