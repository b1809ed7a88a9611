"""Prompt processing in worker processes (the prefill/decode split of Splitwise and DistServe).

A prompt's pass is compute-bound, a decode step memory-bound: run together, each chunk of a long prompt is time
every stream waits for its next token. With ``--prefill-workers N`` the engine's process keeps generating on its
own cores while N worker processes, each pinned to a core of its own, compute prompts a chunk at a time, as the
engine sends them (its scheduler chooses: the best priority, then the prompt with the fewest tokens left, so a short
prompt never waits for a long one). The KV cache's pool lives in one shared memory file (memfd: freed when the last
process closes it, never left behind): a worker writes a chunk's keys and values straight into the request's
blocks, and only an id, the chunk's tokens and the block table travel through the pipe, never a tensor. A worker
loads the model itself from the store (the weights' pages are the page cache's, shared) and computes exactly as
the engine would, so a request's tokens are the same with or without the split.

A worker that dies is started again; the chunk it was computing is sent once more, and its request fails with a
clear error if that one dies too. A worker that cannot start (twice) is left out, and prompts run in the engine's
process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from fourwalls.engine.cache import BlockPool, PrefillCache, SharedPool
from fourwalls.errors import UsageError
from fourwalls.model.fused import decoder, fill_cache

log = logging.getLogger("fourwalls.engine")


@dataclass(frozen=True)
class ModelSource:
    """Where a worker loads the engine's model from: the store's root and the model's name."""

    root: str
    name: str


def pin(cores: set[int]) -> None:
    """Run every thread of this process (and those it starts) on ``cores``, torch's work on as many threads."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that just ended
            pass
    torch.set_num_threads(len(cores))


def _work(conn: Connection, source: ModelSource, pool: SharedPool, cores: set[int]) -> None:
    """A worker's life: load the model, map the pool, then compute the chunks of prompts it is sent."""
    from fourwalls.store import Store

    pin(cores)
    model = Store(Path(source.root)).load(source.name).model
    blocks = BlockPool.mapped(pool)
    fused = decoder(model)
    conn.send(("ready",))
    with torch.inference_mode():
        while True:
            try:
                rid, tokens, start, table = conn.recv()
            except EOFError:  # the engine is gone
                return
            try:
                fill_cache(fused, model, tokens, start, PrefillCache(blocks, table))
                conn.send(("done", rid, None))
            except Exception as e:  # one prompt's failure is its own
                conn.send(("done", rid, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any, index: int, args: tuple) -> None:
        self.index, self.ctx, self.args = index, ctx, args
        self.failed_starts = 0
        self.start()

    def start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_work, args=(child, *self.args), name=f"fourwalls-prefill-{self.index}",
                                     daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.job: Any = None  # (id, request) of the chunk it computes


class PrefillWorkers:
    """N worker processes computing prompts into a shared KV pool. ``send`` gives one a request; ``poll`` returns
    (request, error or None) for those finished, and for those whose worker died (error "died")."""

    def __init__(self, n: int, source: ModelSource, pool: SharedPool, cores: list[set[int]]) -> None:
        ctx = mp.get_context("spawn")  # never fork a process whose threads hold locks
        self.workers = [_Worker(ctx, i, (source, pool, cores[i])) for i in range(n)]
        self._next_id = 0

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every worker has loaded the model (a failure at start is the operator's to see)."""
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if not w.conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"prefill worker {w.index} did not start within {timeout:g} s")
            try:
                msg = w.conn.recv()
            except EOFError:
                raise RuntimeError(f"prefill worker {w.index} exited while loading the model "
                                   f"(exit code {w.proc.exitcode})") from None
            w.ready = msg == ("ready",)

    @property
    def alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.failed_starts < 2]

    @property
    def idle(self) -> _Worker | None:
        return next((w for w in self.alive if w.ready and w.job is None), None)

    @property
    def busy(self) -> bool:
        return any(w.job is not None for w in self.alive)

    def send(self, request: Any, tokens: list[int], start: int, blocks: list[int]) -> bool:
        """Give an idle worker ``tokens``, at positions from ``start``, to compute into ``blocks``; False if none
        is idle."""
        w = self.idle
        if w is None:
            return False
        self._next_id += 1
        w.job = (self._next_id, request)
        w.conn.send((self._next_id, tokens, start, blocks))
        return True

    def wait(self, timeout: float) -> None:
        """Sleep until a busy worker has something to say (or dies), at most ``timeout`` seconds."""
        busy = [w.conn for w in self.alive if w.job is not None or not w.ready]
        if busy:
            wait(busy, timeout)

    def poll(self) -> list[tuple[Any, str | None]]:
        out = []
        for w in self.alive:
            try:
                while w.conn.poll():
                    msg = w.conn.recv()
                    if msg == ("ready",):
                        w.ready, w.failed_starts = True, 0
                    elif w.job is not None and msg[1] == w.job[0]:
                        out.append((w.job[1], msg[2]))
                        w.job = None
            except (EOFError, OSError):
                pass
            if not w.proc.is_alive():
                if w.job is not None:
                    out.append((w.job[1], "died"))
                    w.job = None
                if not w.ready:
                    w.failed_starts += 1
                log.error("prefill worker %d exited (code %s); starting it again", w.index, w.proc.exitcode)
                w.conn.close()
                if w.failed_starts < 2:
                    w.start()
                else:
                    log.error("prefill worker %d failed to start twice: its prompts run in the engine", w.index)
        return out

    def close(self) -> None:
        for w in self.workers:
            w.conn.close()
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()


def split_cores(workers: int) -> tuple[set[int], list[set[int]]]:
    """The engine's cores and each worker's one: the last ``workers`` cores of this process's, one each."""
    cores = sorted(os.sched_getaffinity(0))
    if workers >= len(cores):
        raise UsageError(f"--prefill-workers {workers} needs at least {workers + 1} cores (one for each worker and "
                         f"one for decoding); this process may use {len(cores)}")
    return set(cores[:len(cores) - workers]), [{c} for c in cores[len(cores) - workers:]]
