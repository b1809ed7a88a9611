"""Prefill and decode speed of fourwalls vs HF transformers (and llama.cpp when installed), one JSON line.

Same model (the bundled SmolLM2-135M-Instruct, fp32), same 512-token prompt, 128 greedy decode steps at batch 1;
each contender gets its best thread count (1 or 2). Also prints the physical limit of batch-1 decoding: every
weight is read once per token, so tok/s <= memory bandwidth / weight bytes, with the bandwidth measured here.

    python benchmarks/decode.py [--threads 1,2] [--repeats 3]

Run it on a quiet machine: a second busy process on 2 cores cuts these figures by up to 3x.
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch

from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.model.native import native
from fourwalls.store import DEFAULT_MODEL, Store, bundled_gguf

PROMPT_TOKENS, DECODE_TOKENS = 512, 128
ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(tokenizer) -> list[int]:
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:20000] if corpus.is_file() else (ROOT / "tests/fixtures/english.txt").read_text() * 8
    ids = tokenizer.encode(text)
    assert len(ids) >= PROMPT_TOKENS
    return ids[:PROMPT_TOKENS]


def best_of(fn, threads: list[int], repeats: int) -> tuple[float, float, int]:
    """Run fn() -> (prefill_s, decode_s) under each thread count: (best prefill, best decode, its threads)."""
    runs = []
    for t in threads:
        torch.set_num_threads(t)
        runs += [(*fn(), t) for _ in range(repeats)]
    decode = min(runs, key=lambda r: r[1])
    return min(r[0] for r in runs), decode[1], decode[2]


def bench_fourwalls(lm, ids: list[int]) -> tuple[float, float]:
    gen = generate_tokens(lm.model, ids, SamplingParams(max_new_tokens=DECODE_TOKENS + 1, temperature=0), eos_ids=())
    t = time.perf_counter()
    next(gen)  # prefill + first token
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(1 for _ in gen)
    assert n == DECODE_TOKENS
    return prefill, time.perf_counter() - t


def bench_hf(hf, ids: list[int]) -> tuple[float, float]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf(x, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t


def bench_llamacpp(gguf: Path, ids: list[int], threads: list[int], repeats: int) -> tuple[float, float, int] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    runs = []
    for t in threads:
        llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=t, n_threads_batch=t, n_batch=512, verbose=False)
        for _ in range(repeats):
            llm.reset()  # or llama-cpp-python reuses the cached prompt prefix and skips the prefill
            gen = llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0)
            start = time.perf_counter()
            next(gen)  # prefill + first token
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                next(gen)
            runs.append((prefill, time.perf_counter() - start, t))
            gen.close()
        del llm
    decode = min(runs, key=lambda r: r[1])
    return min(r[0] for r in runs), decode[1], decode[2]


def read_bandwidth(threads: list[int]) -> float:
    """Bytes/s of streaming reads over a buffer far larger than the caches: the best of torch's sum and fourwalls'
    own streaming read (faster than torch's here), over the thread counts, best of 5."""
    buf = torch.ones(256 * 2**20)  # 1 GiB of fp32
    lib = native()
    best = 0.0
    for t in threads:
        torch.set_num_threads(t)
        for read in (buf.sum, lambda t=t: lib.stream_sum(buf.data_ptr(), buf.numel(), t)) if lib else (buf.sum,):
            for _ in range(5):
                start = time.perf_counter()
                read()
                best = max(best, buf.numel() * 4 / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="thread counts to try (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    bandwidth = read_bandwidth(threads)  # measured again at the end; the machine's best counts

    lm = Store().load(DEFAULT_MODEL)
    ids = prompt_ids(lm.tokenizer)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())  # tied weights once
    fw = best_of(lambda: bench_fourwalls(lm, ids), threads, args.repeats)
    result = {"model": DEFAULT_MODEL, "dtype": "float32", "prompt_tokens": PROMPT_TOKENS,
              "decode_tokens": DECODE_TOKENS, "fourwalls_prefill_tok_s": round(PROMPT_TOKENS / fw[0], 1),
              "fourwalls_decode_tok_s": round(DECODE_TOKENS / fw[1], 2), "fourwalls_threads": fw[2]}

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        AutoModelForCausalLM = None
    if AutoModelForCausalLM is not None:
        # The same fp32 weights, from the native folder fourwalls converted the GGUF into.
        folder = Store().root / "cache" / lm.digest
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        h = best_of(lambda: bench_hf(hf, ids), threads, args.repeats)
        del hf
        result.update({"hf_prefill_tok_s": round(PROMPT_TOKENS / h[0], 1),
                       "hf_decode_tok_s": round(DECODE_TOKENS / h[1], 2), "hf_threads": h[2],
                       "prefill_ratio_vs_hf": round(h[0] / fw[0], 2), "decode_ratio_vs_hf": round(h[1] / fw[1], 2)})

    gguf = bundled_gguf()
    lc = bench_llamacpp(gguf, ids, threads, args.repeats) if gguf else None
    if lc is not None:
        result.update({"llamacpp_quant": "Q4_1", "llamacpp_prefill_tok_s": round(PROMPT_TOKENS / lc[0], 1),
                       "llamacpp_decode_tok_s": round(DECODE_TOKENS / lc[1], 2), "llamacpp_threads": lc[2],
                       "decode_ratio_vs_llamacpp": round(lc[1] / fw[1], 2)})

    bw = max(bandwidth, read_bandwidth(threads))
    bound = bw / weight_bytes
    result.update({"read_bandwidth_gb_s": round(bw / 1e9, 2), "weight_bytes": weight_bytes,
                   "decode_bound_tok_s": round(bound, 2),
                   "decode_fraction_of_bound": round(DECODE_TOKENS / fw[1] / bound, 3)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
