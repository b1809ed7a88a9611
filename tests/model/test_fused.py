"""The fused decode step (one C call per token) computes what the PyTorch model computes."""

from __future__ import annotations

import pytest
import torch

from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.model.fused import decoder
from fourwalls.model.native import native
from fourwalls.model.quant import QuantConfig, quantize_model
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(native() is None, reason="no AVX2 or no C compiler here: decoding runs in torch")


def prefilled(model, rows: int, length: int):
    """A cache of ``rows`` sequences of ``length`` random tokens, filled by the model itself."""
    cache = model.new_cache(rows, 64)
    with torch.inference_mode():
        model(torch.randint(3, 512, (rows, length)), torch.arange(length), cache)
    return cache


def copy_cache(model, cache):
    new = model.new_cache(cache.k[0].shape[0], cache.max_len)
    for a, b in zip((*new.k, *new.v), (*cache.k, *cache.v)):
        a.copy_(b)
    return new


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-qwen2"])
@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_the_fused_step_computes_the_models_logits_and_cache(name, scheme, rows):
    model = tiny_model(name)
    if scheme:
        quantize_model(model, QuantConfig(scheme))
    torch.manual_seed(rows)
    ours = prefilled(model, rows, 11)
    theirs = copy_cache(model, ours)
    tokens, pos = torch.randint(3, 512, (rows, 1)), torch.tensor([11])
    with torch.inference_mode():
        expected = model(tokens, pos, theirs)[:, -1]
        got = decoder(model)(tokens, pos, ours)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    for a, b in zip((*ours.k, *ours.v), (*theirs.k, *theirs.v)):
        assert torch.allclose(a[:, :, :12], b[:, :, :12], atol=1e-5)  # the new keys and values went in
        assert not a[:, :, 12:].any()  # and nothing past them


def test_greedy_generation_is_the_same_with_or_without_the_fused_step(monkeypatch):
    model = tiny_model("tiny-llama3")
    p = SamplingParams(max_new_tokens=40, temperature=0)
    fused = [t.id for t in generate_tokens(model, [5, 17, 300, 42], p)]
    monkeypatch.setattr("fourwalls.generate.decoder", lambda model: None)
    assert [t.id for t in generate_tokens(model, [5, 17, 300, 42], p)] == fused


def test_what_the_fused_step_does_not_take_runs_in_torch():
    model = tiny_model()
    fused = decoder(model)
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        assert fused(torch.tensor([[4, 5]]), torch.tensor([0, 1]), cache) is None  # a prompt, not a step
        assert fused(torch.tensor([[4]] * 33), torch.tensor([0]), model.new_cache(33, 16)) is None
    assert fused(torch.tensor([[4]]), torch.tensor([0]), cache) is None  # gradients wanted: training
    int4 = tiny_model()
    quantize_model(int4, QuantConfig("int4", group_size=32))
    assert decoder(int4) is None  # its layers are torch's int4 kernels
    assert decoder(tiny_model().to(torch.bfloat16)) is None
