"""Serving throughput and latency: `fourwalls serve` vs llama.cpp's `llama-server` under concurrent load, one JSON line.

Each server runs alone (one after the other) as a subprocess on a free 127.0.0.1 port and gets the same streamed
/v1/completions load: --requests distinct ~128-token prompts (slices of tinyshakespeare, so no prefix cache helps)
at each concurrency level, 64 greedy output tokens, EOS suppressed (`ignore_eos`, else `logit_bias` on the EOS
tokens), otherwise the tokens actually produced are counted. Measured on the client: aggregate output tok/s (tokens
over the phase's wall time), time to first token (p50, p95) and inter-token latency (p50 over requests of each one's
(last token - first token) / (tokens - 1)).

The reference is llama.cpp's own server built natively (benchmarks/llamacpp.sh builds it once per machine) on the
same GGUF, with continuous batching and one slot per concurrent request (`-np 16 -cb`), each at the machine's cores.
fourwalls also runs the top concurrency again with requests cycling through 4 random LoRA adapters (r=8 and 16, made
here with fourwalls' own LoRA code), against the same server's adapter-free figure.

The prefix phase sends 16 requests at once that share a ~1,000-token system prompt (then a question of their own):
time to first token with fourwalls' prefix cache against a second fourwalls server started with --no-prefix-cache
(`ttft_ratio_cached_vs_uncached`), and on llama-server.

`--big` serves a Llama-3.2-1B-shaped model with random weights (speed only; SmolLM2's tokenizer) that fourwalls
exports as a Q4_0 GGUF (made once, kept in ~/.cache/fourwalls/bench), the same file for both servers.

    python benchmarks/serve.py [--requests 64] [--concurrency 1,4,16] [--big] [--skip-llamacpp]
                               [--fourwalls-args "--max-batch 16"]
    python benchmarks/serve.py --quick   # a smoke run: 4 requests per phase at 1 and 4, 8 tokens out

Run on a quiet machine: the client shares the cores with the server.
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import httpx
import torch
from tqdm import tqdm

from bigmodel import llama_1b_gguf
from fourwalls.model.lora import LoRAConfig, LoRALinear, attach_lora, save_adapter
from fourwalls.store import DEFAULT_MODEL, Store, bundled_gguf

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = (("a1", 8, 1), ("a2", 16, 2), ("a3", 8, 3), ("a4", 16, 4))  # name, rank, seed
EOS_TOKENS = ("<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- prompts and adapters


def corpus_text() -> str:
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if corpus.is_file():
        return corpus.read_text()
    # Fallback: the fixture's words reshuffled, so that no two prompts share a prefix.
    words = (ROOT / "tests/fixtures/english.txt").read_text().split()
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(200_000))


def make_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """n distinct prompts of about ``tokens`` tokens: consecutive, non-overlapping slices of the corpus."""
    text = corpus_text()
    ids = tokenizer.encode(text[: (n * tokens + 64) * 8], add_special_tokens=False)
    if len(ids) < n * tokens:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n * tokens:
        raise SystemExit(f"the corpus holds {len(ids)} tokens, fewer than the {n} x {tokens} this run needs")
    return [tokenizer.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(n)]


def make_prefix_prompts(tokenizer, n: int, system_tokens: int, question_tokens: int = 24) -> list[str]:
    """n prompts that share a ~``system_tokens`` system prompt, each then asking its own question."""
    text = corpus_text()
    ids = tokenizer.encode(text[-(system_tokens + n * question_tokens + 64) * 8:], add_special_tokens=False)
    system = tokenizer.decode(ids[:system_tokens])
    rest = ids[system_tokens:]
    return [f"{system}\n\nQuestion {i + 1}: {tokenizer.decode(rest[i * question_tokens:(i + 1) * question_tokens])}"
            "\nAnswer:" for i in range(n)]


def _detach_lora(model: torch.nn.Module) -> None:
    """Put the plain layers back, so that the next adapter can be attached to the same base."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attr, child.base)


def make_adapters(model: torch.nn.Module, folder: Path, base_name: str) -> dict[str, Path]:
    """Four random (non-zero B) LoRA adapters on all projections, saved as PEFT folders: {name: path}."""
    paths = {}
    for name, rank, seed in ADAPTERS:
        torch.manual_seed(seed)
        cfg = LoRAConfig(r=rank, alpha=2 * rank)
        attach_lora(model, cfg)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.weight.normal_(0.0, 1e-3)  # B = 0 would make the adapter a no-op
        save_adapter(folder / name, model, cfg, base_model=base_name)
        _detach_lora(model)
        paths[name] = folder / name
    return paths


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, ready_path: str, log: Path, timeout: float = 600.0) -> Iterator[str]:
    """Run ``cmd`` until the block ends; yields the base URL once GET ``ready_path`` answers 200."""
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}; its log ends:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f} s; its log ends:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + ready_path, timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def fourwalls_cmd(model: str, port: int, adapters: dict[str, Path], extra: str) -> list[str]:
    script = Path(sys.executable).with_name("fourwalls")
    exe = [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from fourwalls.cli import main; "
                                                                         "sys.exit(main())"]
    cmd = [*exe, "serve", model, "--host", "127.0.0.1", "--port", str(port), *shlex.split(extra)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return cmd


def llama_server_bin() -> Path:
    """llama.cpp's server, built natively once per machine by benchmarks/llamacpp.sh (about 10 minutes on 2 cores)."""
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "llamacpp.sh")], check=True, stdout=subprocess.PIPE,
                         text=True).stdout.strip().splitlines()[-1]
    return Path(out) / "llama-server"


def llama_server_cmd(binary: Path, gguf: Path, port: int, threads: int, slots: int, slot_ctx: int) -> list[str]:
    # -np slots with continuous batching, as Ollama and LM Studio run it; -c is the context of all slots together.
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-cb",
            "-c", str(slots * slot_ctx), "-t", str(threads), "-tb", str(threads), "--no-webui", "-a", "default"]


# ---------------------------------------------------------------- load generation


async def one_request(client: httpx.AsyncClient, body: dict, sem: asyncio.Semaphore, bar: tqdm) -> dict:
    """Stream one completion: its TTFT, inter-token latency, output tokens, or the error."""
    async with sem:
        start = time.perf_counter()
        first = last = None
        chunks, usage, error = 0, None, None
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue  # blank separators, ": ping" comments
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        msg = json.loads(data)
                        if msg.get("error"):
                            error = f"stream error: {json.dumps(msg['error'])[:300]}"
                            break
                        usage = msg.get("usage") or usage
                        choices = msg.get("choices") or []
                        if choices and choices[0].get("text"):
                            last = time.perf_counter()
                            first = first or last
                            chunks += 1
        except (httpx.HTTPError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        bar.update()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else chunks
    if error is None and (first is None or tokens == 0):
        error = "no tokens streamed"
    if error is not None:
        return {"error": error}
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"error": None, "tokens": tokens, "ttft": first - start,
            "itl": (last - first) / (tokens - 1) if tokens > 1 else None,
            "prompt_tokens": usage.get("prompt_tokens") if usage else None, "cached": details.get("cached_tokens")}


async def run_phase(base: str, bodies: list[dict], concurrency: int, label: str, timeout: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        with tqdm(total=len(bodies), desc=label, file=sys.stderr, leave=True) as bar:
            start = time.perf_counter()
            results = await asyncio.gather(*(one_request(client, b, sem, bar) for b in bodies))
            wall = time.perf_counter() - start
    return summarize(results, wall)


def pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated q-quantile (0..1) of xs."""
    if not xs:
        return None
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    itl = [r["itl"] for r in ok if r["itl"] is not None]
    prompt = [r["prompt_tokens"] for r in ok if r["prompt_tokens"]]
    out = {"output_tok_s": round(tokens / wall, 2), "ttft_p50_s": _r(pct(ttft, 0.5)), "ttft_p95_s": _r(pct(ttft, 0.95)),
           "itl_p50_s": _r(pct(itl, 0.5), 5), "failed": len(results) - len(ok),
           "mean_output_tokens": round(tokens / len(ok), 1) if ok else 0, "wall_s": round(wall, 2)}
    if prompt:
        out["mean_prompt_tokens"] = round(sum(prompt) / len(prompt), 1)
    cached = [r["cached"] for r in ok if r.get("cached") is not None]
    if cached:
        out["mean_cached_tokens"] = round(sum(cached) / len(cached), 1)
    errors = sorted({r["error"] for r in results if r["error"]})
    if errors:
        out["errors"] = errors[:3]
    return out


def choose_extras(base: str, body: dict, candidates: list[dict]) -> dict:
    """The first of ``candidates`` (EOS suppression fields) that the server accepts, else {}."""
    for extra in candidates:
        r = httpx.post(base + "/v1/completions", json={**body, **extra, "max_tokens": 2, "stream": False}, timeout=120)
        if r.status_code == 200:
            return extra
        print(f"server refused {json.dumps(extra)} (HTTP {r.status_code}): {r.text[:200]}", file=sys.stderr)
    return {}


def base_model_id(base: str, default: str, adapters: dict[str, Path]) -> str:
    """The id /v1/models gives the base model (adapters are listed there too on some servers)."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
        ids = [m["id"] for m in httpx.get(base + "/v1/models", timeout=10).json()["data"]]
        ids = [i for i in ids if i not in adapters]
        if ids:
            return default if default in ids else ids[0]
    return default


def bench_server(base: str, name: str, model_id: str, prompt_sets: list[list[str]], args: argparse.Namespace,
                 extras: dict, adapter_names: list[str], prefix: list[str]) -> dict:
    """Warm up, then one phase per concurrency level, the adapter mix when adapter_names are given, and the
    prefix phase when prefix prompts are."""
    common = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}, **extras}

    def bodies(prompts: list[str], models: list[str]) -> list[dict]:
        return [{**common, "model": models[i % len(models)], "prompt": p} for i, p in enumerate(prompts)]

    def phase(prompts: list[str], concurrency: int, label: str, models: list[str] | None = None) -> dict:
        return asyncio.run(run_phase(base, bodies(prompts, models or [model_id]), concurrency, f"{name} {label}",
                                     args.timeout))

    top = max(args.concurrency)
    warm = prompt_sets[0]  # then one set per level, the adapter-free reference, the adapter mix
    phase(warm[:1], 1, "warm-up")
    phase(warm[1:1 + top], top, "warm-up")
    out = {}
    for i, c in enumerate(args.concurrency):
        out[f"c{c}"] = phase(prompt_sets[1 + i], c, f"c{c}")
    if adapter_names:
        ca = args.adapter_concurrency
        if f"c{ca}" not in out:  # the adapter-free reference, on the same server
            out[f"c{ca}"] = phase(prompt_sets[-2], ca, f"c{ca}")
        phase(warm[1 + top:1 + top + 2 * len(adapter_names)], ca, "adapters warm-up", adapter_names)
        out[f"c{ca}_adapters{len(adapter_names)}"] = phase(prompt_sets[-1], ca, f"c{ca} adapters", adapter_names)
    if prefix:
        out["prefix"] = phase(prefix, len(prefix), f"prefix c{len(prefix)}")
    return out


def bench_uncached(base: str, model_id: str, warm: list[str], args: argparse.Namespace, extras: dict,
                   prefix: list[str]) -> dict:
    """The prefix phase on a server that computes every prompt in full."""
    body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True, "model": model_id,
            "stream_options": {"include_usage": True}, **extras}
    asyncio.run(run_phase(base, [{**body, "prompt": p} for p in warm[:2]], 2, "fourwalls uncached warm-up",
                          args.timeout))
    return asyncio.run(run_phase(base, [{**body, "prompt": p} for p in prefix], len(prefix),
                                 f"fourwalls uncached prefix c{len(prefix)}", args.timeout))


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="requests per phase")
    ap.add_argument("--concurrency", default="1,4,16", help="concurrency levels (comma-separated)")
    ap.add_argument("--adapter-concurrency", type=int, default=None,
                    help="concurrency of the LoRA-mix phase (default: the highest level)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=1000, help="the prefix phase's shared system prompt "
                    "(0: no prefix phase)")
    ap.add_argument("--prefix-requests", type=int, default=16, help="requests of the prefix phase, sent at once")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model fourwalls serves (a store name or a path)")
    ap.add_argument("--gguf", default=None, help="GGUF llama.cpp serves (default: the bundled SmolLM2 file)")
    ap.add_argument("--big", action="store_true", help="a Llama-3.2-1B-shaped model with random weights, as a "
                    "Q4_0 GGUF fourwalls exports, for both servers (no adapters)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-fourwalls", action="store_true", help="only the llama.cpp reference")
    ap.add_argument("--skip-adapters", action="store_true")
    ap.add_argument("--fourwalls-args", default="", help='extra `fourwalls serve` arguments, e.g. "--max-batch 16"')
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a single request may take")
    ap.add_argument("--quick", action="store_true", help="a smoke run, no figures: 4 requests per phase (4 in the "
                    "prefix phase) at concurrency 1 and 4, 8 output tokens; flags given as well still apply")
    args = ap.parse_args()
    if args.quick:
        ap.set_defaults(requests=4, concurrency="1,4", max_tokens=8, prefix_requests=4)
        args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.adapter_concurrency = args.adapter_concurrency or max(args.concurrency)
    if args.big:
        args.model = args.gguf = str(llama_1b_gguf())
        args.skip_adapters = True

    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * cores():
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {cores()} cores; another busy process skews "
              "these figures (fourwalls' batch-1 decode most)", file=sys.stderr)
    lm = Store().load(DEFAULT_MODEL if args.big else args.model)  # --big: the same tokenizer, no 4 GB to load
    eos_ids = sorted({i for t in (lm.tokenizer.eos_token, *EOS_TOKENS) if (i := lm.tokenizer.token_id(t)) is not None})
    # Distinct prompts for every phase and the same ones for both servers: a warm-up set, one set per level,
    # then the adapter-free reference (used only if the adapter concurrency is not among the levels) and the mix.
    n_warm = 1 + max(args.concurrency) + 2 * len(ADAPTERS)
    n_sets = len(args.concurrency) + 2
    prompts = make_prompts(lm.tokenizer, n_warm + n_sets * args.requests, args.prompt_tokens)
    warm, rest = prompts[:n_warm], prompts[n_warm:]
    prompt_sets = [warm] + [rest[i * args.requests:(i + 1) * args.requests] for i in range(n_sets)]
    prefix = make_prefix_prompts(lm.tokenizer, args.prefix_requests, args.prefix_tokens) if args.prefix_tokens else []
    # Every llama-server slot holds the longest request.
    slot_ctx = 256 * -(-(max(args.prompt_tokens, args.prefix_tokens + 64) + args.max_tokens + 64) // 256)

    result = {"model": args.model, "requests": args.requests, "concurrency": args.concurrency,
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "prefix_tokens": args.prefix_tokens, "cores": cores()}
    fw = lc = uncached = None
    with tempfile.TemporaryDirectory(prefix="fourwalls-bench-serve-") as tmp:
        tmp = Path(tmp)
        adapters = {}
        if not (args.skip_adapters or args.skip_fourwalls):
            adapters = make_adapters(lm.model, tmp / "adapters", args.model)
        del lm
        gc.collect()

        if not args.skip_fourwalls:
            port = free_port()
            cmd = fourwalls_cmd(args.model, port, adapters, args.fourwalls_args)
            with server(cmd, port, "/readyz", tmp / "fourwalls.log") as base:
                model_id = base_model_id(base, args.model, adapters)
                probe = {"model": model_id, "prompt": warm[0], "temperature": 0}
                extras = choose_extras(base, probe, [{"ignore_eos": True}])
                fw = bench_server(base, "fourwalls", model_id, prompt_sets, args, extras, list(adapters), prefix)
            result["fourwalls"] = {"eos_suppression_sent": next(iter(extras), None), **fw}
            if prefix:
                port = free_port()
                cmd = fourwalls_cmd(args.model, port, {}, args.fourwalls_args + " --no-prefix-cache")
                with server(cmd, port, "/readyz", tmp / "fourwalls-uncached.log") as base:
                    uncached = bench_uncached(base, model_id, warm, args, extras, prefix)
                result["fourwalls_no_prefix_cache"] = {"prefix": uncached}

        gguf = Path(args.gguf) if args.gguf else bundled_gguf()
        if args.skip_llamacpp:
            pass
        elif gguf is None:
            print("no GGUF for llama-server; skipping it", file=sys.stderr)
        else:
            port, slots = free_port(), max(args.concurrency + [len(prefix)])
            cmd = llama_server_cmd(llama_server_bin(), gguf, port, cores(), slots, slot_ctx)
            with server(cmd, port, "/health", tmp / "llama-server.log") as base:
                probe = {"model": "default", "prompt": warm[0], "temperature": 0}
                extras = choose_extras(base, probe, [{"ignore_eos": True},
                                                     {"logit_bias": {str(i): -100.0 for i in eos_ids}}])
                lc = bench_server(base, "llama-server", "default", prompt_sets, args, extras, [], prefix)
            result["llama_server"] = {"gguf": gguf.name, "threads": cores(), "slots": slots, "slot_ctx": slot_ctx,
                                      "eos_suppression_sent": next(iter(extras), None), **lc}

    lo, hi, ca = min(args.concurrency), max(args.concurrency), args.adapter_concurrency
    if fw is not None and lc is not None:
        result[f"throughput_ratio_c{hi}_vs_llama_server"] = ratio(fw[f"c{hi}"]["output_tok_s"],
                                                                  lc[f"c{hi}"]["output_tok_s"])
        result[f"itl_ratio_c{lo}_vs_llama_server"] = ratio(fw[f"c{lo}"]["itl_p50_s"], lc[f"c{lo}"]["itl_p50_s"])
        if prefix:
            result["prefix_ttft_ratio_vs_llama_server"] = ratio(fw["prefix"]["ttft_p50_s"],
                                                                lc["prefix"]["ttft_p50_s"])
    if fw is not None and uncached is not None:
        result["ttft_ratio_cached_vs_uncached"] = ratio(fw["prefix"]["ttft_p50_s"], uncached["ttft_p50_s"])
    mix = fw and fw.get(f"c{ca}_adapters{len(ADAPTERS)}")
    if mix:
        result[f"adapters_throughput_ratio_c{ca}"] = ratio(mix["output_tok_s"], fw[f"c{ca}"]["output_tok_s"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
