"""Issue 22's probes, run again: a server held under fault, one JSON line of figures.

    python benchmarks/faults.py [--quick]

--quick (a smoke run) asks one leak question per mode instead of six and shrinks the queue to 8 prompts (so 9, then
8 prompts at once); the other probes are the same.
Two servers start in this process on free 127.0.0.1 ports, in a temporary $FOURWALLS_HOME: the bundled SmolLM2
(4 rows, 512 tokens, API keys of groups a and hr and a public key, a SQLite document store), and a tiny random model
with SmolLM2's tokenizer whose chat template blows up on request. The probes:

- disconnect: 4 clients send non-streamed 480-token `ignore_eos` completions and close their connections once all
  4 are generating; how many of the 4 rows are freed, after how many engine steps, and the tokens generated;
- templates: a model whose template nests two 100,000-step loops (refused at load?); requests that make the evil
  template loop 10^10 times or build a 3 GB string; a 289 KB `anyOf` JSON schema with n=8. /healthz is polled every
  50 ms meanwhile: the longest it went unanswered;
- not text: a lone surrogate and control characters in every text field of every route;
- queue: `prompt: ["hi"] * 65`, then 64 prompts at once (the default queue of 64);
- leaks: searches and RAG chats (three modes) by keys that may not read the hr documents, for the hr documents' words;
  a public document's BM25 score for them before and after hr-only documents with the query's words are added; the
  collection list of each key; documents counted as leaked when an unreadable one (or its influence) shows;
- drain and disk are covered by tests (a real `fourwalls serve` process; a small tmpfs) and not repeated here.

Every request is counted; `5xx` counts the server errors among them (a 503 of a full queue would count too).
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import httpx
import uvicorn

from fourwalls.engine import EngineConfig
from fourwalls.errors import FourwallsError
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.serve.app import create_app
from fourwalls.serve.server import ServeConfig, build_state
from fourwalls.store import DEFAULT_MODEL, Store

EVIL = ("{% for m in messages %}{% if m.content == 'grow' %}{{ 'x' * 3000000000 }}{% endif %}"
        "{% if m.content == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FROZEN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
KEYS = {"admin": ("sk-admin", {"admin": True}), "a": ("sk-a", {"groups": ["a"]}), "hr": ("sk-hr", {"groups": ["hr"]}),
        "public": ("sk-public", {})}
NASTY = ["\ud800", "x\udfffy", "\x00", "\x1b[2J", "\u202e", "<|im_start|>system\n"]


class Server:
    def __init__(self, cfg: ServeConfig, store: Store) -> None:
        self.state = build_state(cfg, store)
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=cfg.port,
                                                   log_level="critical"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        time.sleep(0.5)
        self.state.engine.stop()
        self.state.close()


class Client:
    """Counts every request and the 5xx among them."""

    def __init__(self) -> None:
        self.requests, self.server_errors, self.lock = 0, 0, threading.Lock()

    def send(self, method: str, url: str, key: str | None = None, **kw) -> httpx.Response | None:
        headers = {"Authorization": f"Bearer {KEYS[key][0]}"} if key else {}
        if "raw" in kw:
            kw["content"], headers["content-type"] = json.dumps(kw.pop("raw")), "application/json"
        try:
            r = httpx.request(method, url, headers=headers, timeout=kw.pop("timeout", 120), **kw)
        except httpx.TimeoutException:
            r = None
        with self.lock:
            self.requests += 1
            self.server_errors += r is not None and r.status_code >= 500
        return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz_while(url: str, work) -> float:
    """Run ``work`` in a thread, polling /healthz every 50 ms: the longest a probe waited, in seconds."""
    longest = 0.0
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        while not future.done():
            t = time.monotonic()
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{url}/healthz", timeout=60)
            longest = max(longest, time.monotonic() - t)
            time.sleep(0.05)
        future.result()
    return longest


def disconnect_probe(srv: Server, client: Client) -> dict:
    """4 clients send 480-token completions and go away once all 4 are generating (the issue's clients timed out
    after 2 s; on a loaded machine 2 s may not reach the first token): the engine steps until each row is free."""
    engine = srv.state.engine
    data = json.dumps({"model": DEFAULT_MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 480, "ignore_eos": True})
    socks = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['admin'][0]}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}".encode())
        socks.append(sock)
    deadline = time.monotonic() + 300
    def generating() -> bool:
        return len(engine.running) == 4 and all(r.generated >= 2 for r in engine.running)

    while not generating() and time.monotonic() < deadline:
        time.sleep(0.01)
    rows = list(engine.running)
    for sock in socks:
        sock.close()
    left, freed = engine.steps, {}
    gone = time.monotonic()
    while len(freed) < len(rows) and time.monotonic() - gone < 5:
        for i, r in enumerate(rows):
            if i not in freed and r not in engine.running:
                freed[i] = engine.steps - left
        time.sleep(0.005)
    with client.lock:
        client.requests += 4
    return {"rows_generating_when_clients_left": len(rows), "rows_freed_within_5s": len(freed),
            "steps_until_freed": sorted(freed.values()),
            "tokens_generated_of_480": sorted(r.generated for r in rows)}


def template_probe(store: Store, smol, client: Client) -> dict:
    cfg = preset("tiny-llama").replace(vocab_size=smol.config.vocab_size, context_length=512,
                                       eos_token_ids=smol.config.eos_token_ids)
    for name, template in (("evil", EVIL), ("frozen", FROZEN)):
        model = Transformer(cfg)
        init_weights(model)
        store.add(name, cfg, model.state_dict(), dataclasses.replace(smol.tokenizer, chat_template=template))
    t = time.monotonic()
    try:
        build_state(ServeConfig("frozen", port=free_port(), engine=EngineConfig(max_batch=1, max_len=64)), store)
        refused = None
    except FourwallsError as e:
        refused = str(e)
    refuse_s = time.monotonic() - t
    srv = Server(ServeConfig("evil", port=free_port(), engine=EngineConfig(max_batch=4, max_len=512)), store)
    out: dict = {"frozen_template_refused_at_load": refused is not None, "refusal_s": round(refuse_s, 2),
                 "refusal": refused}
    try:
        for content in ("spin", "grow"):
            got: list = []
            body = {"model": "evil", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
            out[f"healthz_max_s_during_{content}"] = round(healthz_while(srv.url, lambda b=body, g=got: g.append(
                client.send("POST", f"{srv.url}/v1/chat/completions", json=b))), 3)
            out[f"{content}_status"] = got[0].status_code if got[0] is not None else "timeout"
        schema = {"anyOf": [{"type": "object", "properties": {f"f{i}_{j}": {"type": "string", "pattern": f"^{i}[a-z]+$"}
                                                              for j in range(4)}, "required": [f"f{i}_0"]}
                            for i in range(1000)]}
        body = {"model": "evil", "n": 8, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
        got = []
        out["schema_kb"] = round(len(json.dumps(schema)) / 1000)
        out["healthz_max_s_during_schema"] = round(healthz_while(srv.url, lambda: got.append(
            client.send("POST", f"{srv.url}/v1/chat/completions", json=body))), 3)
        out["schema_status"] = got[0].status_code if got[0] is not None else "timeout"
    finally:
        srv.close()
    return out


def text_probe(srv: Server, client: Client) -> dict:
    """Every text field of every route, with each string that is not plain text: the statuses seen."""
    u = srv.url
    bodies = {  # route -> a body builder for one nasty string
        "/v1/completions": [lambda x: {"model": DEFAULT_MODEL, "prompt": "hi" + x, "max_tokens": 1},
                            lambda x: {"model": x, "prompt": "hi", "max_tokens": 1}],
        "/v1/chat/completions": [lambda x: {"model": DEFAULT_MODEL, "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "hi" + x}]},
                                 lambda x: {"model": DEFAULT_MODEL, "max_tokens": 1, "messages": [
                                     {"role": "user", "content": "days?" + x}], "rag": {"collection": "handbook"}}],
        "/v1/embeddings": [lambda x: {"model": "all-MiniLM-L6-v2", "input": ["ok", "a" + x]}],
        "/v1/collections/handbook/search": [lambda x: {"query": "vacation" + x}],
        "/v1/collections/handbook/documents": [lambda x: {"source": "n.md", "text": "t" + x},
                                               lambda x: {"source": "n" + x + ".md", "text": "t"}],
        "/v1/collections": [lambda x: {"name": "c" + x}],
    }
    statuses: dict[str, int] = {}
    for route, builders in bodies.items():
        for build in builders:
            for x in NASTY:
                r = client.send("POST", f"{u}{route}", "admin", raw=build(x))
                code = "timeout" if r is None else str(r.status_code)
                statuses[code] = statuses.get(code, 0) + 1
    client.send("DELETE", f"{u}/v1/collections/handbook/documents/n.md", "admin")
    return statuses


def queue_probe(srv: Server, client: Client) -> dict:
    u, n = f"{srv.url}/v1/completions", srv.state.engine.config.max_queue
    big = client.send("POST", u, "admin", json={"model": DEFAULT_MODEL, "prompt": ["hi"] * (n + 1), "max_tokens": 1})
    fits = client.send("POST", u, "admin", json={"model": DEFAULT_MODEL, "prompt": ["hi"] * n, "max_tokens": 1},
                       timeout=600)
    return {"max_queue": n, "one_more_prompts": big.status_code, "retry_after": big.headers.get("retry-after"),
            "then_max_queue_prompts": fits.status_code if fits is not None else "timeout"}


def leak_probe(srv: Server, client: Client, quick: bool) -> dict:
    u = srv.url
    docs = {"holidays.md": ([], "# Holidays\n\nEvery employee gets 25 vacation days per year."),
            "eng/deploy.md": (["a"], "# Deploying\n\nProduction deploys happen on Tuesdays."),
            "hr/salaries.md": (["hr"], "# Salary bands\n\nThe salary band for engineers is secret; salary reviews "
                                       "happen in April, salary bands are set by the board.")}
    docs |= {f"misc/{i}.md": ([], f"# Note {i}\n\nThe {w} committee meets on the {i}th floor.")
             for i, w in enumerate(["budget", "safety", "canteen", "parking", "library", "garden", "travel", "it"])}
    client.send("POST", f"{u}/v1/collections", "admin", json={"name": "handbook"})
    for source, (groups, text) in docs.items():
        client.send("POST", f"{u}/v1/collections/handbook/documents", "admin",
                    json={"source": source, "text": text, "groups": groups})
    client.send("POST", f"{u}/v1/collections", "admin", json={"name": "hr-only"})
    client.send("POST", f"{u}/v1/collections/hr-only/documents", "admin",
                json={"source": "pay.md", "text": "Payroll runs monthly.", "groups": ["hr"]})
    tried = leaks = 0
    questions = ["What are the salary bands?", "salary review April board", "When are salary reviews?",
                 "Who sets the salary bands?", "engineers salary band secret", "salary"][:1 if quick else None]
    for key in ("a", "public"):
        for q in questions:
            for mode in ("hybrid", "bm25", "vector"):
                r = client.send("POST", f"{u}/v1/collections/handbook/search", key,
                                json={"query": q, "mode": mode, "top_k": 10})
                c = client.send("POST", f"{u}/v1/chat/completions", key, json={
                    "model": DEFAULT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": q}],
                    "rag": {"collection": "handbook", "mode": mode, "top_k": 10, "min_similarity": -1}})
                tried += 2
                leaks += any(h["source"].startswith("hr/") for h in r.json()["data"])
                leaks += any(h["source"].startswith("hr/") for h in (c.json().get("citations") or []))
        tried += 2
        leaks += "hr-only" in {x["id"] for x in client.send("GET", f"{u}/v1/collections", key).json()["data"]}
        leaks += client.send("GET", f"{u}/v1/collections/hr-only", key).status_code != 404

    def score(key: str) -> float | None:
        hits = client.send("POST", f"{u}/v1/collections/handbook/search", key,
                           json={"query": "vacation days", "mode": "bm25"}).json()["data"]
        return next((h["score"] for h in hits if h["source"] == "holidays.md"), None)

    before = {k: score(k) for k in ("a", "public")}
    client.send("POST", f"{u}/v1/collections/handbook/documents", "admin", json={
        "source": "hr/leave.md", "groups": ["hr"], "text": "vacation days " * 50 + " ".join(["filler"] * 400)})
    after = {k: score(k) for k in ("a", "public")}
    tried += 2
    leaks += sum(before[k] != after[k] for k in before)
    return {"tried": tried, "leaks": leaks, "bm25_public_score_before_after": [before, after]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer leak questions, a queue of 8")
    quick = ap.parse_args().quick
    with tempfile.TemporaryDirectory(prefix="fourwalls-faults-") as home:
        os.environ["FOURWALLS_HOME"] = home
        keys = Path(home) / "keys.json"
        keys.write_text(json.dumps({"keys": [{"name": n, "sha256": hashlib.sha256(k.encode()).hexdigest(), **extra}
                                             for n, (k, extra) in KEYS.items()]}))
        store = Store(Path(home))
        client = Client()
        srv = Server(ServeConfig(DEFAULT_MODEL, port=free_port(), api_keys=keys,
                                 engine=EngineConfig(max_batch=4, max_len=512, max_queue=8 if quick else 64)), store)
        started = time.monotonic()
        try:
            figures = {"disconnect": disconnect_probe(srv, client), "leak_probe": leak_probe(srv, client, quick),
                       "not_text_statuses": text_probe(srv, client), "queue": queue_probe(srv, client)}
        finally:
            srv.close()
        figures["templates"] = template_probe(store, store.load(DEFAULT_MODEL), client)
        t = figures["templates"]
        summary = {"requests": client.requests, "5xx": client.server_errors, "leaks": figures["leak_probe"]["leaks"],
                   "rows_freed_after_disconnect": f"{figures['disconnect']['rows_freed_within_5s']}/"
                                                  f"{figures['disconnect']['rows_generating_when_clients_left']}",
                   "healthz_max_unresponsive_s": max(v for k, v in t.items() if k.startswith("healthz_max_s")),
                   "seconds": round(time.monotonic() - started, 1)}
        print(json.dumps({**summary, **figures}))


if __name__ == "__main__":
    main()
