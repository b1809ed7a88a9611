"""Application profiles under overload: the share of chat requests that meet their SLOs with profiles on and off.

`fourwalls serve` on the default model gets, for --seconds, an open-loop load (Poisson arrivals, the same in both
runs) of two kinds of streamed /v1/completions requests:

- chat: short prompts (~40 tokens), 48 tokens out, --chat-rate a second, ``"fourwalls": {"profile": "chat"}``;
- batch: ~1,000-token prompts (slices of tinyshakespeare, no shared prefix), 64 tokens out, --batch-rate a second,
  profile ``batch``; alone, more prompt tokens than the server computes in the time.

The server runs twice: with its built-in profiles, then with ``--no-profiles`` (every request an equal, in arrival
order, as before profiles). A chat request meets its SLO when its time to first token is at most chat's 1 s and its
mean time per output token after the first at most chat's 150 ms (DistServe's TPOT); one refused, failed, or not
finished --grace seconds after the last arrival does not. One JSON line: ``chat_slo_attainment`` with and without
profiles, chat's TTFT and TPOT percentiles, batch and total output tokens a second, and the requests refused.

    python benchmarks/profiles.py [--seconds 60] [--chat-rate 1] [--batch-rate 1.5] [--grace 20]

Run on a quiet machine: the client shares the cores with the server.
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import httpx
from tqdm import tqdm

from serve import fourwalls_cmd, free_port, make_prompts, one_request, pct, server
from fourwalls.engine.profiles import BUILTIN
from fourwalls.store import DEFAULT_MODEL, Store

CHAT = BUILTIN["chat"]


def arrivals(rate: float, seconds: float, rng: random.Random) -> list[float]:
    """Poisson arrival times in [0, seconds)."""
    out, t = [], rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run(base: str, load: list[tuple[float, str, dict]], seconds: float, grace: float) -> tuple[list, float]:
    """Send each (time, kind, body) at its time; results as (kind, result), and the time the run took."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    sem = asyncio.Semaphore(1000)
    async with httpx.AsyncClient(base_url=base, timeout=seconds + grace + 60, limits=limits) as client:
        with tqdm(total=len(load), desc=base, file=sys.stderr) as bar:
            start = time.perf_counter()

            async def send(at: float, body: dict) -> dict:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
                return await one_request(client, body, sem, bar)

            tasks = [asyncio.ensure_future(send(at, body)) for at, _, body in load]
            done, pending = await asyncio.wait(tasks, timeout=seconds + grace)
            for t in pending:
                t.cancel()
            wall = time.perf_counter() - start
    results = [t.result() if t in done else {"error": "unfinished"} for t in tasks]
    return [(kind, r) for (_, kind, _), r in zip(load, results)], wall


def report(results: list[tuple[str, dict]], wall: float) -> dict:
    chat = [r for kind, r in results if kind == "chat"]
    ok = [r for r in chat if r["error"] is None]
    met = [r for r in ok if r["ttft"] <= CHAT.ttft and (r["itl"] is None or r["itl"] <= CHAT.itl)]
    batch_tokens = sum(r["tokens"] for kind, r in results if kind == "batch" and r["error"] is None)
    chat_tokens = sum(r["tokens"] for r in ok)

    def q(xs: list[float], p: float) -> float | None:
        v = pct(xs, p)
        return None if v is None else round(v, 4)

    ttft, itl = [r["ttft"] for r in ok], [r["itl"] for r in ok if r["itl"] is not None]
    return {"chat_slo_attainment": round(len(met) / max(1, len(chat)), 3), "chat_requests": len(chat),
            "chat_failed": len(chat) - len(ok), "chat_ttft_p50_s": q(ttft, 0.5), "chat_ttft_p99_s": q(ttft, 0.99),
            "chat_tpot_p50_s": q(itl, 0.5), "chat_tpot_p99_s": q(itl, 0.99),
            "batch_done": sum(1 for kind, r in results if kind == "batch" and r["error"] is None),
            "batch_failed": sum(1 for kind, r in results if kind == "batch" and r["error"] is not None),
            "batch_tokens_per_s": round(batch_tokens / wall, 1),
            "total_tokens_per_s": round((batch_tokens + chat_tokens) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--chat-rate", type=float, default=1.0, help="chat requests a second")
    ap.add_argument("--batch-rate", type=float, default=1.5, help="batch requests a second")
    ap.add_argument("--grace", type=float, default=20.0, help="seconds after the last arrival before a request "
                    "still running counts as failed")
    args = ap.parse_args()

    tok = Store().load(DEFAULT_MODEL).tokenizer
    rng = random.Random(0)
    chat_times, batch_times = arrivals(args.chat_rate, args.seconds, rng), arrivals(args.batch_rate, args.seconds, rng)
    questions = make_prompts(tok, len(chat_times), 40)
    documents = make_prompts(tok, len(batch_times) + len(chat_times), 1000)[len(chat_times):]

    def body(prompt: str, tokens: int, profile: str) -> dict:
        return {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True, "fourwalls": {"profile": profile}}

    load = sorted([(t, "chat", body(q, 48, "chat")) for t, q in zip(chat_times, questions)]
                  + [(t, "batch", body(d, 64, "batch")) for t, d in zip(batch_times, documents)], key=lambda x: x[0])
    out: dict = {"benchmark": "profiles", "model": DEFAULT_MODEL, "seconds": args.seconds,
                 "chat_rate": args.chat_rate, "batch_rate": args.batch_rate,
                 "chat_slo": {"ttft_s": CHAT.ttft, "tpot_s": CHAT.itl}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("profiles", ""), ("no_profiles", "--no-profiles")):
            port = free_port()
            with server(fourwalls_cmd(DEFAULT_MODEL, port, {}, extra), port, "/readyz",
                        Path(tmp) / f"{label}.log") as base:
                results, wall = asyncio.run(run(base, load, args.seconds, args.grace))
            out[label] = report(results, wall)
    out["chat_slo_attainment_profiles"] = out["profiles"]["chat_slo_attainment"]
    out["chat_slo_attainment_no_profiles"] = out["no_profiles"]["chat_slo_attainment"]
    out["total_throughput_ratio_profiles_vs_not"] = round(
        out["profiles"]["total_tokens_per_s"] / max(1e-9, out["no_profiles"]["total_tokens_per_s"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
