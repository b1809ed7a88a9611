"""Continuous batching over a paged KV cache with a prefix cache.

One thread owns the model. Each turn of its loop it admits the next waiting request when no other is prefilling
(after the one before has left its prompt's blocks in the prefix cache), feeds one chunk of that prompt (so a long
prompt never stalls the others for more than a chunk), then decodes one token for every running request in a
single batched forward. Requests hold KV-cache blocks (engine/cache.py), not rows of a fixed length: a request is
admitted when the blocks its prompt needs are free, and when a running request needs a block and none is, the
request admitted last is preempted: its blocks are released (those it filled stay in the prefix cache) and it goes
back to the front of the queue, to be computed again from its prompt and the tokens it had generated (vLLM's
preemption by recompute; what it already streamed is not sent again).

With application profiles (engine/profiles.py), the order is the profiles': the best priority is admitted first, may
start its prompt while a worse one is still prefilling, and preempts a worse one when there is no room; a worse
priority's prompt chunks shrink so that the better streams decoding keep their ITL SLO; and a request waits while
one more row would take a decode step past the ITL SLO of a running request of a better priority. Equals (requests
of one priority, or without a profile) are served in arrival order, as they come.

With prefill workers (engine/phases.py), prompts are computed in other processes on cores of their own, into the
same blocks (shared memory), one in each worker, while this thread only decodes on the cores it keeps.

Each request samples with its own parameters and its own seeded generator, so its text does not depend on what
else is in the batch. Results go back through the request's ``emit`` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourwalls.engine.cache import BlockPool, DecodeCache, PrefillCache, block_names, blocks_for
from fourwalls.engine.grammar import Constraint
from fourwalls.engine.multilora import Adapter, AdapterSet
from fourwalls.engine.phases import ModelSource, PrefillWorkers, pin, split_cores
from fourwalls.engine.profiles import Profile
from fourwalls.errors import (
    ContextLengthError,
    FourwallsError,
    InternalError,
    NotFoundError,
    OverloadedError,
    RequestTimeoutError,
    UsageError,
)
from fourwalls.generate import PREFILL_CHUNK, Delta, Detokenizer, SamplingParams, pick
from fourwalls.model.fused import decode_step, decoder, fill_cache
from fourwalls.model.ops import QUERY_GROUP
from fourwalls.model.transformer import Transformer, kv_dtype
from fourwalls.tokenizer import Tokenizer

log = logging.getLogger("fourwalls.engine")

QUEUE_LIMIT = "queue_limit"  # the code of the error for a request larger than the queue
Event = Delta | FourwallsError  # a piece of output (the last has finish_reason), or why the request failed


@dataclass
class EngineConfig:
    max_batch: int = 16  # requests running at once
    max_len: int = 4096  # tokens of one request: prompt + output
    kv_tokens: int | None = None  # the KV cache's size in tokens, shared by all requests (None: max(max_len, 16384))
    # Tokens per KV-cache block: the unit of allocation and of prefix reuse. A multiple of prompt attention's query
    # group keeps a prompt's K/V the same after a prefix-cache hit (a hit ends on a block boundary).
    block_size: int = QUERY_GROUP
    prefix_cache: bool = True  # reuse the blocks of earlier requests' identical prefixes
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens fed per engine step
    max_queue: int = 64  # waiting requests beyond which submit() refuses
    request_timeout: float = 600.0  # seconds from submission
    prefill_workers: int = 0  # processes computing prompts on cores of their own (engine/phases.py); 0: none


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: str | None = None
    constraint: Constraint | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    mix: dict[str, float] | None = None  # adapters and their weights, mixed in this row (instead of ``adapter``)
    profile: Profile | None = None  # its priority and SLOs (None: those of every other request without one)
    # Engine state, set on submission.
    arrival: float = 0.0
    cancelled: bool = False
    error: FourwallsError | None = None  # emitted when the engine drops a cancelled request (see Engine.abort)
    tokens: list[int] = field(default_factory=list)  # the prompt, then each sampled token
    pos: int = 0  # tokens in the KV cache; the request decodes once they are all but the last
    blocks: list[int] = field(default_factory=list)  # its block table
    names: list[bytes] = field(default_factory=list)  # the prefix cache's names of its full blocks
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache when it was first admitted
    generated: int = 0
    history: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    detok: Detokenizer | None = None
    generator: torch.Generator | None = None
    remote: bool = False  # a prefill worker is computing its prompt into its blocks
    resent: bool = False  # its prompt was sent again after a worker died on it

    @property
    def decoding(self) -> bool:
        return self.pos == len(self.tokens) - 1

    @property
    def rank(self) -> int:
        """Its priority: 0 first."""
        return self.profile.priority if self.profile is not None else 0

    @property
    def uses(self) -> str | dict[str, float] | None:
        """What the row's adapter mask selects (AdapterSet.select)."""
        return self.mix or self.adapter

    @property
    def adapter_names(self) -> list[str]:
        return list(self.mix) if self.mix else [self.adapter] if self.adapter else []


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, eos_ids: list[int],
                 config: EngineConfig | None = None, source: ModelSource | None = None) -> None:
        """``source``: where prefill workers load the model from (needed with ``config.prefill_workers``)."""
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, list(eos_ids)
        self.device = model.device
        self.config = config or EngineConfig()
        c = self.config
        c.max_len = min(c.max_len, model.config.context_length)
        # A request of max_len must fit alone, or it could never run.
        c.kv_tokens = max(c.kv_tokens or 16384, c.max_len)
        self.pool = BlockPool(model.config, blocks_for(c.kv_tokens, c.block_size), c.block_size,
                              kv_dtype(model.dtype), model.device, shared=c.prefill_workers > 0)
        self.workers: PrefillWorkers | None = None
        self.orphans: list[Request] = []  # removed while a worker computed their prompt: their blocks wait for it
        self._pinned: tuple[set[int], int] | None = None  # the cores and threads this process had before start()
        if c.prefill_workers:
            if source is None:
                raise UsageError("prefill workers load the model from the store: name it (source)")
            self.cores, worker_cores = split_cores(c.prefill_workers)
            self.workers = PrefillWorkers(c.prefill_workers, source, self.pool.shared_pool(), worker_cores)
        self.adapter_set = AdapterSet(model)
        self.fused = decoder(model)  # the decode step in one C call, where it applies (model.fused)
        self.adapters: dict[str, Adapter] = {}  # what requests may name; installed at the next step
        self.running: list[Request] = []  # holding KV-cache blocks, in the order they were admitted
        self.waiting: deque[Request] = deque()
        self.preemptions = 0
        self.step_seconds: dict[int, float] = {}  # a decode step's time by its rows (moving average)
        self.token_seconds: float | None = None  # a prompt token's time in a chunk (moving average)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.last_tick = time.monotonic()
        self.steps = 0  # batched forward passes so far (how tests and probes count time)
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="fourwalls-engine", daemon=True)

    # --- called from any thread -----------------------------------------------------------------------

    def start(self) -> None:
        if self.workers is not None:  # the workers load the model, then this process decodes on the other cores
            self.workers.wait_ready()
            self._pinned = os.sched_getaffinity(0), torch.get_num_threads()
            pin(self.cores)
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)
        if self.workers is not None:
            self.workers.close()
            if self._pinned is not None:
                pin(self._pinned[0])
                torch.set_num_threads(self._pinned[1])

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise the error a request of this size would get."""
        if prompt_len == 0:
            raise UsageError("the prompt is empty")
        limit = self.config.max_len
        if prompt_len + max_new_tokens > limit:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens and max_tokens is {max_new_tokens}; "
                                     f"together they exceed the context window of {limit} tokens")

    def submit(self, *requests: Request) -> None:
        """Queue requests (the choices of one API call), all or none. Raises if one cannot fit or names an unknown
        adapter, if there are more than the queue ever holds (UsageError: retrying cannot help), or if the queue
        has no room for them now (OverloadedError). A full queue makes room for requests of a better priority: the
        latest of its worst requests leave it with an OverloadedError (load shedding, the cheapest first)."""
        for req in requests:
            req.params.validate()
            self.check(len(req.prompt), req.params.max_new_tokens)
        limit = self.config.max_queue
        if len(requests) > limit:
            raise UsageError(f"this request makes {len(requests)} generations (prompts times n), more than the "
                             f"server queues at once ({limit}, its --max-queue); send them in smaller requests",
                             code=QUEUE_LIMIT)
        with self.lock:
            for req in requests:
                for name in req.adapter_names:
                    if name not in self.adapters:
                        raise NotFoundError(f"adapter '{name}' is not loaded")
            excess = len(self.waiting) + len(requests) - limit
            if excess > 0:
                worst = max(r.rank for r in requests)
                shed = sorted((w for w in self.waiting if w.rank > worst), key=lambda w: (w.rank, w.arrival))[-excess:]
                if len(shed) < excess:
                    raise OverloadedError(f"the queue is full ({len(self.waiting)} of {limit} waiting); retry later")
                for w in shed:
                    self.waiting.remove(w)
                    w.emit(OverloadedError("the queue is full and requests of a better priority came: this one "
                                           "left it; retry later"))
            for req in requests:
                req.arrival = time.monotonic()
                req.tokens = list(req.prompt)
                req.history = torch.tensor(req.prompt, dtype=torch.long)
                req.detok = Detokenizer(self.tokenizer, req.params.stop, [] if req.ignore_eos else self.eos_ids)
                req.generator = req.params.generator()
                self.waiting.append(req)
        self.wake.set()

    def cancel(self, req: Request, error: FourwallsError | None = None) -> None:
        """Stop a request (its client went away, or the server is stopping): it leaves the queue now and its KV-cache
        blocks at the engine's next step; ``error``, if given, is emitted to it then."""
        with self.lock:
            if req.cancelled:
                return
            req.cancelled, req.error = True, error
            if req in self.waiting:
                self.waiting.remove(req)
                if error is not None:
                    req.emit(error)
        self.wake.set()

    def abort(self, error: FourwallsError) -> list[Request]:
        """Cancel every request, waiting or running, with ``error``; returns them."""
        with self.lock:
            found = [*self.waiting, *self.running]
        for req in found:
            self.cancel(req, error)
        return found

    def add_adapter(self, name: str, folder: Path) -> Adapter:
        """Load a PEFT-format adapter; requests may name it at once (it is installed before they run)."""
        adapter = self.adapter_set.read(name, folder)
        with self.lock:
            if name in self.adapters:
                raise UsageError(f"an adapter named '{name}' is already loaded; delete it first")
            self.adapters[name] = adapter
        self.wake.set()
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter: new requests may no longer name it; those running with it finish first."""
        with self.lock:
            if self.adapters.pop(name, None) is None:
                raise NotFoundError(f"adapter '{name}' is not loaded")
        self.wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks held by requests (cached blocks no request holds are free)."""
        return self.pool.num_held / self.pool.num_blocks

    # --- the engine thread ----------------------------------------------------------------------------

    @torch.inference_mode()  # once for the thread, not per step: a decode step's own overhead is what a stream waits
    def _loop(self) -> None:
        while not self.stopped:
            self.last_tick = time.monotonic()
            try:
                self._reap()
                self._sync_adapters()
                self._admit()
                if not self.running and not (self.workers is not None and self.workers.busy):
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                self._prefill()
                self._decode()
                if self.workers is not None and not any(r.decoding for r in self.running):
                    self.workers.wait(0.05)  # only prompts in the workers: sleep until one is done
                self.steps += 1
            except Exception as e:  # a bug must cost the requests in flight, not the server
                log.exception("engine step failed")
                for r in list(self.running):
                    r.emit(InternalError(f"internal engine error: {type(e).__name__}"))
                    self._remove(r)

    def _reap(self) -> None:
        """Drop requests that were cancelled or ran out of time, waiting or running."""
        now = time.monotonic()
        limit = self.config.request_timeout

        def gone(r: Request) -> bool:
            if r.cancelled:
                if r.error is not None:
                    r.emit(r.error)
                return True
            if now - r.arrival > limit:
                r.emit(RequestTimeoutError(f"the request ran longer than {limit:g} s"))
                return True
            return False

        with self.lock:
            dropped = [r for r in self.waiting if gone(r)]
            if dropped:
                self.waiting = deque(r for r in self.waiting if r not in dropped)
        for r in [r for r in self.running if gone(r)]:
            self._remove(r)

    def _sync_adapters(self) -> None:
        if not self.adapters and not self.adapter_set.adapters:
            return
        with self.lock:
            wanted = dict(self.adapters)
            in_use = {n for r in (*self.running, *self.waiting) for n in r.adapter_names}
        installed = self.adapter_set.adapters
        target = {**{n: installed[n] for n in in_use if n in installed}, **wanted}
        if target.keys() != installed.keys():
            self.adapter_set.install(list(target.values()))
            self.fused = decoder(self.model)  # the adapters' matrices were restacked

    def _admit(self) -> None:
        """Admit the waiting request of the best priority (the first of them in the queue) while no request of its
        priority or better is prefilling, there is room in the batch (made by preempting a worse priority if need
        be) and its blocks are free (likewise), and one more row keeps the better priorities' ITL SLOs."""
        with self.lock:
            while self.waiting:
                r = min(self.waiting, key=lambda w: w.rank)
                prefilling = sum(not x.decoding and x.rank <= r.rank for x in self.running)
                if prefilling >= self._prefill_slots or not self._keeps_slos(r):
                    return
                while len(self.running) >= self.config.max_batch or not self._place(r):
                    lower = [x for x in reversed(self.running) if x.rank > r.rank and not x.remote]
                    if not lower:
                        return
                    self._preempt(max(lower, key=lambda x: x.rank), locked=True)  # the worst, admitted last
                self.waiting.remove(r)
                self.running.append(r)

    @property
    def _prefill_slots(self) -> int:
        """Prompts being computed at once: one, a chunk at a time in this process; with prefill workers any number
        (the workers take their chunks in the order _prefill chooses)."""
        return self.config.max_batch if self.workers is not None and self.workers.alive else 1

    def _keeps_slos(self, r: Request) -> bool:
        """Whether a decode step with ``r`` as one more row stays within the ITL SLO of every running request of a
        better priority (estimated from the steps so far; True until there are any)."""
        slos = [x.profile.itl for x in self.running if x.rank < r.rank and x.profile and x.profile.itl]
        return not slos or self._step_estimate(len(self.running) + 1) <= min(slos)

    def _step_estimate(self, rows: int) -> float:
        """A decode step's seconds for ``rows`` rows: as measured, or scaled from the most rows measured below
        (in proportion, which overstates it: a step reads the weights once for all its rows); 0 before any."""
        if rows in self.step_seconds:
            return self.step_seconds[rows]
        known = max((k for k in self.step_seconds if k < rows), default=None)
        return 0.0 if known is None else self.step_seconds[known] * rows / known

    def _chunk(self, r: Request) -> int:
        """Prompt tokens of ``r`` to feed this step: the configured chunk, or fewer (a multiple of the block size, at
        least one block) when a chunk and a decode step together would exceed the ITL SLO of a stream decoding at a
        better priority (equals share the steps as they come: their throughput is theirs)."""
        size, bs = self.config.prefill_chunk, self.config.block_size
        decoding = [x for x in self.running if x.decoding]
        slos = [x.profile.itl for x in decoding if x.rank < r.rank and x.profile and x.profile.itl]
        if not slos or self.token_seconds is None:
            return size
        room = min(slos) - self._step_estimate(len(decoding))
        return max(bs, min(size, int(room / self.token_seconds) // bs * bs))

    def _place(self, r: Request) -> bool:
        """Give ``r`` the blocks of all its tokens but the last (which it decodes): those the prefix cache holds,
        then new ones; False, holding nothing, when too few are free."""
        pool, bs = self.pool, self.config.block_size
        held = len(r.tokens) - 1  # the positions the cache must hold before r decodes its next token
        hits: list[int] = []
        if self.config.prefix_cache:
            block_names(r.tokens[:held], bs, r.names, self._salt(r))
            hits = pool.lookup(r.names[:held // bs])
        new = blocks_for(held + 1, bs) - len(hits)
        if new > pool.num_free:
            pool.release(hits)
            return False
        r.blocks = hits + pool.allocate(new)
        r.pos = len(hits) * bs
        if r.cached_tokens is None:
            r.cached_tokens = r.pos
        return True

    def _prefill(self) -> None:
        """Feed the next chunk of the prompt being prefilled, if any; the request then decodes its last token. With
        prefill workers: collect the chunks they finished and send idle ones the next, of the best priority and
        then the fewest tokens left (a request with adapters is computed here, as are all when no worker could
        start). While no request decodes, this process takes a small chunk itself rather than idle."""
        local = self.workers is None or not self.workers.alive
        order = (lambda r: r.rank) if local else (lambda r: (r.rank, len(r.tokens) - r.pos))
        if not local:
            self._collect()
            for r in sorted((r for r in self.running if not r.decoding and not r.remote and not r.adapter_names),
                            key=order):
                end = self._worker_end(r)
                if not self.workers.send(r, r.tokens[r.pos:end], r.pos, r.blocks):
                    break
                r.remote = True
        idle = not any(r.decoding for r in self.running)
        r = min((r for r in self.running if not r.decoding and not r.remote and (local or r.adapter_names or idle)),
                key=order, default=None)
        if r is None:
            return
        # A chunk taken from the workers' share is small: a stream whose prompt a worker finishes meanwhile waits
        # for it (some 150 ms on one core for the default model).
        size = self._chunk(r) if local or r.adapter_names else min(self.config.prefill_chunk,
                                                                     4 * self.config.block_size)
        end = min(r.pos + size, len(r.tokens) - 1)
        start = time.perf_counter()
        with self._adapters([r]):
            fill_cache(self.fused, self.model, r.tokens[r.pos:end], r.pos, PrefillCache(self.pool, r.blocks))
        self.token_seconds = _average(self.token_seconds, (time.perf_counter() - start) / (end - r.pos))
        self._filled(r, r.pos, end)
        r.pos = end

    def _worker_end(self, r: Request) -> int:
        """Where the chunk of ``r``'s prompt a prefill worker is sent (from ``r.pos``) ends."""
        return min(r.pos + self.config.prefill_chunk, len(r.tokens) - 1)

    def _collect(self) -> None:
        """Take the chunks the workers finished (a request whose prompt is done decodes next); a chunk whose worker
        died is sent again once, then its request fails."""
        for r, error in self.workers.poll():
            r.remote = False
            if r in self.orphans:
                self.orphans.remove(r)
                self.pool.release(r.blocks)
                r.blocks = []
            elif error is None:
                end = self._worker_end(r)
                self._filled(r, r.pos, end)
                r.pos = end
            elif error == "died" and not r.resent:
                r.resent = True
                log.warning("a prefill worker died computing a prompt of %d tokens: sending it again", len(r.prompt))
            else:
                why = "its worker died twice" if error == "died" else error
                r.emit(InternalError(f"the prompt could not be computed: {why}"))
                self._remove(r)

    def _filled(self, r: Request, start: int, end: int) -> None:
        """Name the blocks that positions [start, end) of ``r`` completed, for later requests to find."""
        if not self.config.prefix_cache:
            return
        bs = self.config.block_size
        block_names(r.tokens[:end], bs, r.names, self._salt(r))
        for j in range(start // bs, end // bs):
            self.pool.name(r.blocks[j], r.names[j])

    def _decode(self) -> None:
        bs = self.config.block_size
        for r in [r for r in self.running if r.decoding]:  # first admitted, first served
            while r.pos // bs == len(r.blocks) and r in self.running:
                if self.pool.num_free:
                    r.blocks += self.pool.allocate(1)
                else:
                    candidates = [x for x in reversed(self.running) if not x.remote]
                    self._preempt(max(candidates, key=lambda x: x.rank))  # the worst, admitted last
        batch = [r for r in self.running if r.decoding]
        if not batch:
            return
        tokens = torch.tensor([[r.tokens[-1]] for r in batch], device=self.device)
        positions = torch.tensor([[r.pos] for r in batch], device=self.device)
        width = max(len(r.blocks) for r in batch)
        table = torch.tensor([r.blocks + r.blocks[:1] * (width - len(r.blocks)) for r in batch], dtype=torch.int32)
        start = time.perf_counter()
        with self._adapters(batch):
            logits = decode_step(self.fused, self.model, tokens, positions, DecodeCache(self.pool, table))
        n = len(batch)
        self.step_seconds[n] = _average(self.step_seconds.get(n), time.perf_counter() - start)
        for i, r in enumerate(batch):
            r.pos += 1
            if self._sample(r, logits[i]):
                self._remove(r)
            elif r.pos % bs == 0:  # its last block is full
                self._filled(r, r.pos - 1, r.pos)

    def _adapters(self, rows: list[Request]) -> AbstractContextManager[None]:
        """Each row's adapter for a forward over ``rows``."""
        if not self.adapter_set.adapters:
            return nullcontext()
        return self.adapter_set.select([r.uses for r in rows])

    def _salt(self, r: Request) -> bytes:
        """The root of ``r``'s block names: blocks computed with different adapters are never shared."""
        installed = self.adapter_set.adapters
        if r.mix:  # a weighted mix computes other K/V than either adapter alone
            return repr(sorted((installed[n].digest, w) for n, w in r.mix.items())).encode()
        return installed[r.adapter].digest.encode() if r.adapter else b""

    def _sample(self, r: Request, logits: torch.Tensor) -> bool:
        """Pick ``r``'s next token and emit what it adds; True when ``r`` is finished (or failed: one request's
        bad luck must not cost the rest of the batch)."""
        try:
            return self._sample_one(r, logits)
        except Exception as e:
            log.exception("sampling failed")
            r.emit(InternalError(f"sampling failed: {type(e).__name__}"))
            return True

    def _sample_one(self, r: Request, logits: torch.Tensor) -> bool:
        p = r.params
        if r.constraint is not None:
            logits = r.constraint.mask(logits)
        info = pick(logits, r.history, p, r.generator)
        r.generated += 1
        r.tokens.append(info.id)
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            r.history = torch.cat([r.history, torch.tensor([info.id])])
        chunk = r.detok.push(info)
        if chunk is None or not chunk.finish_reason:
            if r.constraint is not None and r.constraint.advance(info.id):
                chunk = _merge(chunk, r.detok.finish("stop"))
            elif r.generated >= p.max_new_tokens:
                chunk = _merge(chunk, r.detok.finish("length"))
        if chunk is not None:
            r.emit(chunk)
        return chunk is not None and chunk.finish_reason is not None

    def _remove(self, r: Request) -> None:
        """Release a finished (or cancelled) request's blocks; those it filled stay in the prefix cache. A worker
        computing its prompt keeps them until it is done."""
        self.running.remove(r)
        if r.remote:
            self.orphans.append(r)
            return
        self.pool.release(r.blocks)
        r.blocks = []

    def _preempt(self, r: Request, locked: bool = False) -> None:
        """Take ``r``'s blocks for others; it waits at the front of the queue to be computed again (``locked``: the
        caller holds the lock)."""
        self._remove(r)
        r.pos = 0
        self.preemptions += 1
        with nullcontext() if locked else self.lock:
            self.waiting.appendleft(r)


def _average(old: float | None, new: float) -> float:
    """A moving average that follows a change within some ten samples."""
    return new if old is None else 0.8 * old + 0.2 * new


def _merge(first: Delta | None, last: Delta) -> Delta:
    if first is None:
        return last
    return Delta(first.text + last.text, first.tokens + last.tokens, last.finish_reason, last.stop)
