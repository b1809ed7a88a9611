"""Continuous batching: requests join and leave the running batch between decode steps.

One thread owns the model. Each turn of its loop it admits waiting requests while KV-cache rows are free, feeds one
chunk of one new prompt (so a long prompt never stalls the others for more than a chunk), then decodes one token for
every running request in a single batched forward. Each request samples with its own parameters and its own seeded
generator, so its text does not depend on what else is in the batch. Results go back through the request's
``emit`` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourwalls.engine.cache import KVPool
from fourwalls.engine.grammar import Constraint
from fourwalls.engine.multilora import Adapter, AdapterSet
from fourwalls.errors import (
    ContextLengthError,
    FourwallsError,
    InternalError,
    NotFoundError,
    OverloadedError,
    RequestTimeoutError,
    UsageError,
)
from fourwalls.generate import Delta, Detokenizer, SamplingParams, pick
from fourwalls.model.fused import decode_step, decoder
from fourwalls.model.transformer import Transformer
from fourwalls.tokenizer import Tokenizer

log = logging.getLogger("fourwalls.engine")

QUEUE_LIMIT = "queue_limit"  # the code of the error for a request larger than the queue
Event = Delta | FourwallsError  # a piece of output (the last has finish_reason), or why the request failed


@dataclass
class EngineConfig:
    max_batch: int = 16  # KV-cache rows: requests decoding at once
    max_len: int = 4096  # tokens per row: prompt + output of one request
    prefill_chunk: int = 256  # prompt tokens fed per engine step
    max_queue: int = 64  # waiting requests beyond which submit() refuses
    request_timeout: float = 600.0  # seconds from submission


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: str | None = None
    constraint: Constraint | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks)
    mix: dict[str, float] | None = None  # adapters and their weights, mixed in this row (instead of ``adapter``)
    # Engine state, set on submission.
    arrival: float = 0.0
    cancelled: bool = False
    error: FourwallsError | None = None  # emitted when the engine drops a cancelled request (see Engine.abort)
    pos: int = 0  # tokens in the KV cache
    generated: int = 0
    next_input: int = 0
    history: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    detok: Detokenizer | None = None
    generator: torch.Generator | None = None

    @property
    def uses(self) -> str | dict[str, float] | None:
        """What the row's adapter mask selects (AdapterSet.select)."""
        return self.mix or self.adapter

    @property
    def adapter_names(self) -> list[str]:
        return list(self.mix) if self.mix else [self.adapter] if self.adapter else []


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, eos_ids: list[int],
                 config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, list(eos_ids)
        self.config = config or EngineConfig()
        self.config.max_len = min(self.config.max_len, model.config.context_length)
        self.pool = KVPool(model.config, self.config.max_batch, self.config.max_len, model.dtype, model.device)
        self.adapter_set = AdapterSet(model)
        self.fused = decoder(model)  # the decode step in one C call, where it applies (model.fused)
        self.adapters: dict[str, Adapter] = {}  # what requests may name; installed at the next step
        self.rows: list[Request] = []  # row i of the pool; decoding requests first, then those prefilling
        self.decoding = 0
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.last_tick = time.monotonic()
        self.steps = 0  # batched forward passes so far (how tests and probes count time)
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="fourwalls-engine", daemon=True)

    # --- called from any thread -----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

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
        has no room for them now (OverloadedError)."""
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
            if len(self.waiting) + len(requests) > limit:
                raise OverloadedError(f"the queue is full ({len(self.waiting)} of {limit} waiting); retry later")
            for req in requests:
                req.arrival = time.monotonic()
                req.history = torch.tensor(req.prompt, dtype=torch.long)
                req.detok = Detokenizer(self.tokenizer, req.params.stop, [] if req.ignore_eos else self.eos_ids)
                req.generator = req.params.generator()
                self.waiting.append(req)
        self.wake.set()

    def cancel(self, req: Request, error: FourwallsError | None = None) -> None:
        """Stop a request (its client went away, or the server is stopping): it leaves the queue now and its row
        at the engine's next step; ``error``, if given, is emitted to it then."""
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
            found = [*self.waiting, *self.rows]
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
        return len(self.rows)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV-cache pool's positions in use."""
        return sum(r.pos for r in list(self.rows)) / (self.pool.rows * self.pool.max_len)

    # --- the engine thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopped:
            self.last_tick = time.monotonic()
            try:
                self._reap()
                self._sync_adapters()
                self._admit()
                if not self.rows:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                with torch.inference_mode():
                    if self.decoding < len(self.rows):
                        self._prefill()
                    if self.decoding:
                        self._decode()
                self.steps += 1
            except Exception as e:  # a bug must cost the requests in flight, not the server
                log.exception("engine step failed")
                for r in self.rows:
                    r.emit(InternalError(f"internal engine error: {type(e).__name__}"))
                self.rows, self.decoding = [], 0

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
            self.waiting = deque(r for r in self.waiting if not gone(r))
        for i in reversed(range(len(self.rows))):
            if gone(self.rows[i]):
                self._remove(i)

    def _sync_adapters(self) -> None:
        with self.lock:
            wanted = dict(self.adapters)
            in_use = {n for r in (*self.rows, *self.waiting) for n in r.adapter_names}
        installed = self.adapter_set.adapters
        target = {**{n: installed[n] for n in in_use if n in installed}, **wanted}
        if target.keys() != installed.keys():
            self.adapter_set.install(list(target.values()))
            self.fused = decoder(self.model)  # the adapters' matrices were restacked

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.rows) < self.pool.rows:
                self.rows.append(self.waiting.popleft())

    def _prefill(self) -> None:
        """Feed the next chunk of the first prompt not yet in the cache; its last chunk samples a token."""
        i = self.decoding
        r = self.rows[i]
        chunk = r.prompt[r.pos: r.pos + self.config.prefill_chunk]
        device = self.model.device
        tokens = torch.tensor([chunk], device=device)
        positions = torch.arange(r.pos, r.pos + len(chunk), device=device)
        with self.adapter_set.select([r.uses]):
            logits = self.model(tokens, positions, self.pool.row(i), last_only=True)[0, -1].float()
        r.pos += len(chunk)
        if r.pos == len(r.prompt):  # row i is the first behind the decoding ones: it joins them in place
            self.decoding += 1
            if self._sample(r, logits):
                self._remove(i)

    def _decode(self) -> None:
        batch = self.rows[: self.decoding]
        device = self.model.device
        tokens = torch.tensor([[r.next_input] for r in batch], device=device)
        positions = torch.tensor([[r.pos] for r in batch], device=device)
        cache = self.pool.decode(len(batch))
        with self.adapter_set.select([r.uses for r in batch]):
            logits = decode_step(self.fused, self.model, tokens, positions, cache)
        done = []
        for i, r in enumerate(batch):
            r.pos += 1
            if self._sample(r, logits[i]):
                done.append(i)
        for i in reversed(done):
            self._remove(i)

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
        r.next_input = info.id
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

    def _remove(self, i: int) -> None:
        """Free row ``i``, keeping the decoding rows contiguous at the front of the pool."""
        last = len(self.rows) - 1
        if i < self.decoding:
            end = self.decoding - 1
            if i != end:
                self._move(end, i)
            if last != end:
                self._move(last, end)
            self.decoding -= 1
        elif i != last:
            self._move(last, i)
        self.rows.pop()

    def _move(self, src: int, dst: int) -> None:
        self.pool.move(src, dst, self.rows[src].pos)
        self.rows[dst] = self.rows[src]


def _merge(first: Delta | None, last: Delta) -> Delta:
    if first is None:
        return last
    return Delta(first.text + last.text, first.tokens + last.tokens, last.finish_reason, last.stop)
