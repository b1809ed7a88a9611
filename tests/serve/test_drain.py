"""SIGTERM drains a real `fourwalls serve` process: not ready, new work refused, work in flight finished, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fourwalls.store import DEFAULT_MODEL, bundled_gguf
from tests.serve.conftest import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bundled_gguf() is None, reason="the bundled model package is not installed")]
FOURWALLS = Path(sys.executable).with_name("fourwalls")


def start(port: int, home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "FOURWALLS_HOME": str(home)}
    proc = subprocess.Popen([str(FOURWALLS), "serve", "--port", str(port), "--max-model-len", "512", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def read_stream(url: str, body: dict, lines: list[str]) -> None:
    """POST a streamed completion, appending its ``data:`` lines to ``lines`` as they come."""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        lines.extend(ln for ln in r.iter_lines() if ln.startswith("data:"))


def test_sigterm_drains_then_exits_0(session_store):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port, session_store.root, "--drain-timeout", "60")
    try:
        stream_lines: list[str] = []  # the stream below is still running when the checks after SIGTERM are made
        body = {"model": DEFAULT_MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 300, "temperature": 0,
                "stream": True}
        reader = threading.Thread(target=read_stream, args=(url, body, stream_lines))
        reader.start()
        while not stream_lines:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 503
        refused = httpx.post(f"{url}/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        reader.join(120)
        assert stream_lines[-1] == "data: [DONE]"
        last = json.loads(stream_lines[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] in ("length", "stop"), last  # the request in flight finished
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_drain_that_times_out_cuts_with_an_error_logs_each_and_exits_1(session_store):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port, session_store.root, "--drain-timeout", "1")
    try:
        stream_lines: list[str] = []
        whole: list[httpx.Response] = []
        body = {"model": DEFAULT_MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 480, "ignore_eos": True}
        readers = [threading.Thread(target=read_stream, args=(url, {**body, "stream": True}, stream_lines)),
                   threading.Thread(target=lambda: whole.append(httpx.post(f"{url}/v1/completions", json=body,
                                                                           timeout=120)))]
        for t in readers:
            t.start()
        while not stream_lines:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in readers:
            t.join(120)
        assert stream_lines[-1] == "data: [DONE]"
        error = json.loads(stream_lines[-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "drain timeout" in error["message"]
        assert whole[0].status_code == 503 and "drain timeout" in whole[0].json()["error"]["message"]
        assert proc.wait(60) == 1
        log = proc.stdout.read()
        assert log.count("drain timeout: cut a request") == 2, log
        assert "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
