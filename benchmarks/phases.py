"""Prompts and decoding on separate workers (`serve --prefill-workers`) against unified chunked prefill, one JSON
line.

`fourwalls serve` on the default model gets, for --seconds, a mixed load: --streams chat streams decoding all the
time (each a ~64-token prompt and 64 tokens out, then the next request), and a steady arrival of --long-tokens
prompts (RAG-style, 8 tokens out) every --long-every seconds. Twice on the same cores: unified (prompts fed in
256-token chunks between decode steps, both on every core), then split (one prefill worker on one core, decoding
on the other). Measured on the client: the chat streams' inter-token latency (every gap between streamed tokens,
p50 and p99), the long prompts' time to first token, and the output and prompt tokens a second;
``itl_p99_ratio_split_vs_unified`` (target <= 0.5), ``throughput_ratio_split_vs_unified`` (output tokens a
second) and ``total_throughput_ratio_split_vs_unified`` (prompt and output tokens; target >= 0.9).

Then a simulation from phase costs measured here in-process (a prompt token's time and a decode step's for the
chat streams' rows, on 1 and on 2 threads): for a machine of C cores, prompts scale with cores as measured from 1
to 2 (compute-bound: here only 1.4x, two SMT threads of one core, it seems), decode steps likewise (memory-bound),
the long prompts take half of a unified machine's time, and a split machine gives prompts the fewest cores that
keep up with them at 90% use. It reports, for 2, 8 and 32 cores, the p99 inter-token latency (unified: a decode
step plus a 256-token chunk; split: a decode step on the decoding cores), the ratio of decode throughputs, and the
prompt cores' use.

    python benchmarks/phases.py [--seconds 60] [--streams 4] [--long-every 4] [--long-tokens 2000]

Run on a quiet machine: the client shares the cores with the server.
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import httpx
import torch

from serve import fourwalls_cmd, free_port, make_prompts, pct, server
from fourwalls.store import DEFAULT_MODEL, Store

CHUNK = 256


async def stream(client: httpx.AsyncClient, prompt: str, tokens: int) -> dict:
    """One streamed completion: the time of each chunk of text after the request was sent, and the usage."""
    start, times, usage = time.perf_counter(), [], None
    body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            msg = json.loads(line[5:])
            usage = msg.get("usage") or usage
            if (msg.get("choices") or [{}])[0].get("text"):
                times.append(time.perf_counter() - start)
    return {"error": None, "times": times, "usage": usage or {}}


async def load(base: str, chats: list[str], longs: list[str], args: argparse.Namespace) -> dict:
    results: dict[str, list] = {"chat": [], "long": []}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def chat_stream(i: int) -> None:
            k = i
            while time.perf_counter() - start < args.seconds:
                results["chat"].append(await stream(client, chats[k % len(chats)], 64))
                k += args.streams

        async def long_prompts() -> None:
            tasks, k = [], 0
            while time.perf_counter() - start < args.seconds:
                tasks.append(asyncio.ensure_future(stream(client, longs[k % len(longs)], 8)))
                k += 1
                await asyncio.sleep(args.long_every)
            results["long"] = list(await asyncio.gather(*tasks))

        await asyncio.gather(long_prompts(), *(chat_stream(i) for i in range(args.streams)))
        wall = time.perf_counter() - start
    ok = [r for rs in results.values() for r in rs if r["error"] is None]
    gaps = [b - a for r in results["chat"] if r["error"] is None for a, b in zip(r["times"], r["times"][1:])]
    ttft = [r["times"][0] for r in results["long"] if r["error"] is None and r["times"]]
    out_tokens = sum(r["usage"].get("completion_tokens", 0) for r in ok)
    prompt_tokens = sum(r["usage"].get("prompt_tokens", 0) for r in ok)
    return {"chat_itl_p50_ms": round(1000 * pct(gaps, 0.5), 2), "chat_itl_p99_ms": round(1000 * pct(gaps, 0.99), 2),
            "long_ttft_p50_s": round(pct(ttft, 0.5), 3), "long_ttft_max_s": round(max(ttft), 3),
            "long_prompts": len(results["long"]), "chat_requests": len(results["chat"]),
            "failed": sum(r["error"] is not None for rs in results.values() for r in rs),
            "output_tok_s": round(out_tokens / wall, 1), "prompt_tok_s": round(prompt_tokens / wall, 1)}


def phase_costs(lm, streams: int, long_tokens: int) -> dict:
    """Seconds per prompt token (a long prompt, in chunks) and per decode step of ``streams`` rows, on 1 and 2
    threads, in this process."""
    from fourwalls.engine import Engine, EngineConfig, Request
    from fourwalls.generate import SamplingParams

    ids = (lm.tokenizer.encode(Path(__file__).read_text()) * 64)[:long_tokens]
    costs, before, finished = {}, torch.get_num_threads(), []

    def on_event(ev) -> None:
        if ev.finish_reason:
            finished.append(ev)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        engine = Engine(lm.model, lm.tokenizer, [], EngineConfig(max_batch=streams, max_len=4096, prefix_cache=False))
        engine.start()
        for label, prompts, tokens in (("prompt", [ids], 1), ("decode", [ids[:2]] * streams, 129)):
            best = math.inf
            for _ in range(2):
                steps, t, n = engine.steps, time.perf_counter(), len(finished)
                engine.submit(*(Request(p, SamplingParams(max_new_tokens=tokens, temperature=0), on_event,
                                        ignore_eos=True) for p in prompts))
                while len(finished) < n + len(prompts):
                    time.sleep(0.001)
                took = time.perf_counter() - t
                best = min(best, took / (long_tokens if label == "prompt" else engine.steps - steps))
            costs[f"{label}_{threads}"] = best
        engine.stop()
    torch.set_num_threads(before)
    return costs


def simulate(costs: dict) -> list[dict]:
    """Unified against split on machines of 2, 8 and 32 cores (see the module's docstring)."""
    gamma = math.log2(costs["prompt_1"] / costs["prompt_2"])  # how prompts scale with cores
    beta = math.log2(costs["decode_1"] / costs["decode_2"])  # how decode steps scale
    out = []
    for cores in (2, 8, 32):
        prompt = costs["prompt_1"] / cores ** gamma  # a prompt token's seconds on the whole machine
        step = costs["decode_1"] / cores ** beta
        # Unified: half of the time goes to prompts, in chunks between decode steps (a chunk's step is the p99
        # gap), and half to decode steps. Split: the fewest prompt cores that keep up with the same prompt tokens
        # a second at 90% use (or all but one); the others only decode.
        chunk = CHUNK * prompt
        prompt_load = 0.5 / prompt
        use = {w: prompt_load * costs["prompt_1"] / w ** gamma for w in range(1, cores)}  # of w prompt cores
        workers = next((w for w, u in use.items() if u <= 0.9), cores - 1)
        split_step = costs["decode_1"] / (cores - workers) ** beta
        out.append({"cores": cores, "prefill_workers": workers,
                    "itl_p99_ms_unified": round(1000 * (step + chunk), 1),
                    "itl_p99_ms_split": round(1000 * split_step, 1),
                    "itl_p99_ratio_split_vs_unified": round(split_step / (step + chunk), 3),
                    "decode_throughput_ratio_split_vs_unified": round((1 / split_step) / (0.5 / step), 3),
                    "prompt_cores_utilization": round(use[workers], 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long-every", type=float, default=4.0, help="seconds between long prompts")
    ap.add_argument("--long-tokens", type=int, default=2000)
    args = ap.parse_args()

    lm = Store().load(DEFAULT_MODEL)
    tok = lm.tokenizer
    chats = make_prompts(tok, 64, 64)
    longs = make_prompts(tok, 27, args.long_tokens)[3:]  # past the chat prompts' part of the corpus
    out: dict = {"benchmark": "phases", "model": DEFAULT_MODEL, "seconds": args.seconds, "streams": args.streams,
                 "long_every_s": args.long_every, "long_tokens": args.long_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("unified", ""), ("split", "--prefill-workers 1")):
            port = free_port()
            with server(fourwalls_cmd(DEFAULT_MODEL, port, {}, f"--max-batch 16 {extra}"), port, "/readyz",
                        Path(tmp) / f"{label}.log") as base:
                out[label] = asyncio.run(load(base, chats, longs, args))
            print(f"{label}: {out[label]}", file=sys.stderr)
    split, unified = out["split"], out["unified"]
    out["itl_p99_ratio_split_vs_unified"] = round(split["chat_itl_p99_ms"] / unified["chat_itl_p99_ms"], 3)
    out["throughput_ratio_split_vs_unified"] = round(split["output_tok_s"] / unified["output_tok_s"], 3)
    out["total_throughput_ratio_split_vs_unified"] = round(
        (split["output_tok_s"] + split["prompt_tok_s"]) / (unified["output_tok_s"] + unified["prompt_tok_s"]), 3)
    costs = phase_costs(lm, args.streams, args.long_tokens)
    out["phase_costs_ms"] = {k: round(1000 * v, 3) for k, v in costs.items()}
    out["simulation"] = simulate(costs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
