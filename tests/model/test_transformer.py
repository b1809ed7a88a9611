import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fourwalls.formats.hf import write_hf
from fourwalls.model.config import PRESETS, ModelConfig
from fourwalls.model.ops import IGNORE_INDEX
from fourwalls.model.transformer import KVCache, Transformer
from tests.conftest import tiny_model

TINY = ["tiny-llama", "tiny-llama3", "tiny-qwen2"]

# Parameter counts published for the real models (tied embeddings counted once).
KNOWN_PARAMS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    assert n == cfg.num_parameters
    if name in KNOWN_PARAMS:
        assert n == KNOWN_PARAMS[name]
    out = model(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert out.shape == (1, 3, cfg.vocab_size)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    """In an fp32 cache, to fp32's rounding; in the fp16 cache a model makes (kv_dtype), to fp16's."""
    model = tiny_model(name)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        for cache, tol in ((KVCache.allocate(model.config, 2, 32, torch.float32), 1e-5),
                           (model.new_cache(batch_size=2, max_len=32), 2e-3)):
            parts = [model(tokens[:, :10], torch.arange(10), cache)]  # prefill from 0 (causal)
            parts.append(model(tokens[:, 10:16], torch.arange(10, 16), cache))  # a chunk at an offset (masked)
            for t in range(16, 24):  # one token at a time
                parts.append(model(tokens[:, t : t + 1], torch.tensor([t]), cache))
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=tol, rtol=tol)
    assert model.new_cache().k[0].dtype == torch.float16


def test_last_only_matches_last_position():
    model = tiny_model()
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True)[:, -1], model(tokens)[:, -1])


@pytest.mark.parametrize("name", TINY)
def test_matches_hf_transformers_on_random_weights(name, tmp_path):
    """Our decoder, saved in the native format, is the same function in HF transformers."""
    from tests.test_tokenizer import byte_tokenizer

    model = tiny_model(name)
    write_hf(tmp_path, model.config, model.state_dict(), byte_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_config_round_trips_through_hf_json():
    for name in TINY + ["llama-3.2-1b", "qwen2.5-0.5b"]:
        cfg = PRESETS[name]
        assert ModelConfig.from_hf(cfg.to_hf(), name=cfg.name) == cfg


def test_forward_with_targets_is_the_loss_of_the_logits():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"])
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model(tokens, targets=targets), ref)
