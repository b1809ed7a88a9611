"""Sampling and the single-sequence generation loop, streamed as text."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fourwalls.errors import ContextLengthError, UsageError
from fourwalls.model.fused import decode_step, decoder, fill_cache
from fourwalls.model.transformer import KVCache, Transformer
from fourwalls.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fourwalls.engine.grammar import Constraint


@dataclass
class SamplingParams:
    """Decoding controls. ``temperature=0`` is greedy; 0 / 1.0 disable top_k / top_p."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; N: the chosen token's logprob plus the N most likely

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (0.01 <= self.repetition_penalty <= 10, "repetition_penalty must be in [0.01, 10]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def apply_penalties(logits: Tensor, history: Tensor, p: SamplingParams) -> Tensor:
    """Repetition (multiplicative, as in CTRL/HF), presence and frequency (additive, as in OpenAI) penalties."""
    if history.numel() == 0:
        return logits
    if p.repetition_penalty != 1.0:
        prev = logits[history]
        logits = logits.clone()
        logits[history] = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        counts = torch.bincount(history, minlength=logits.numel()).to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits [V] (fp32)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / max(p.temperature, 1e-4)  # a vanishing temperature must not overflow to inf - inf = nan
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop a token when the tokens more likely than it already cover top_p (the first always stays).
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) > p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TokenInfo:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def pick(logits: Tensor, history: Tensor, p: SamplingParams, generator: torch.Generator) -> TokenInfo:
    """Sample the next token from one row of fp32 logits, with its logprobs when asked for."""
    info = TokenInfo(sample(apply_penalties(logits, history, p), p, generator))
    if p.logprobs is not None:
        logprobs = torch.log_softmax(logits, dim=-1)
        info.logprob = float(logprobs[info.id])
        if p.logprobs:
            top = torch.topk(logprobs, p.logprobs)
            info.top = list(zip(top.indices.tolist(), top.values.tolist()))
    return info


@dataclass
class Delta:
    """A piece of streamed output: new text, the tokens behind it, and why generation ended (on the last)."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    stop: str | None = None  # the stop string that ended the output


class Session:
    """A KV cache kept between calls, so a chat only prefills the turns that are new."""

    def __init__(self, model: Transformer, max_len: int | None = None) -> None:
        self.cache: KVCache = model.new_cache(1, max_len)
        self.tokens: list[int] = []  # the tokens whose keys/values the cache holds


PREFILL_CHUNK = 256  # prompt tokens per forward, here and in the engine (EngineConfig.prefill_chunk)


def generate_tokens(model: Transformer, prompt: Sequence[int], p: SamplingParams, eos_ids: Sequence[int] = (),
                    session: Session | None = None, constraint: Constraint | None = None) -> Iterator[TokenInfo]:
    """Yield sampled tokens one at a time (EOS included, then stop); the caller stops early by closing.
    ``constraint`` (a grammar) limits what may be sampled; the output ends when it is complete."""
    p.validate()
    ctx = model.config.context_length
    if not prompt:
        raise UsageError("the prompt is empty")
    if len(prompt) >= ctx:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context window is {ctx}; "
                                 "shorten it")
    budget = min(p.max_new_tokens, ctx - len(prompt))
    if session is None:
        cache, reuse = model.new_cache(1, len(prompt) + budget), 0
    else:
        cache = session.cache
        if len(prompt) + budget > cache.max_len:
            raise ContextLengthError(f"the conversation has {len(prompt)} tokens; with {budget} more it no "
                                     f"longer fits the context window of {cache.max_len}: start a new one")
        reuse = _common_prefix(session.tokens, prompt)
        reuse = min(reuse, len(prompt) - 1)  # at least one token must be fed to get logits
        session.tokens = list(prompt[:reuse])
    gen = p.generator()
    eos = set(eos_ids)
    history = torch.tensor(prompt, dtype=torch.long)
    device = model.device
    fed = list(prompt[reuse:])
    pos = reuse
    with torch.inference_mode():
        fused = decoder(model)
        # The prompt but its last token fills the cache in chunks, and the last is decoded, as the engine does: every
        # sampled token then comes from the same computation here and in the server (the fused step's, row by row,
        # where it applies), and a long prompt's activations in the model's forward never exceed a chunk's.
        for start in range(0, len(fed) - 1, PREFILL_CHUNK):
            chunk = fed[start: min(start + PREFILL_CHUNK, len(fed) - 1)]
            fill_cache(fused, model, chunk, pos, cache)
            pos += len(chunk)
            if session is not None:
                session.tokens.extend(chunk)
        fed = fed[-1:]
        for _ in range(budget):
            tokens = torch.tensor([fed], dtype=torch.long, device=device)
            logits = decode_step(fused, model, tokens, torch.tensor([pos], device=device), cache)[0]
            if session is not None:
                session.tokens.extend(fed)
            pos += 1
            if constraint is not None:
                logits = constraint.mask(logits)
            info = pick(logits, history, p, gen)
            next_id = info.id
            yield info
            if next_id in eos or (constraint is not None and constraint.advance(next_id)):
                return
            history = torch.cat([history, torch.tensor([next_id])])
            fed = [next_id]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Detokenizer:
    """Turns sampled tokens into streamed text; stop strings are cut and never streamed, nor is what could still
    grow into one."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), eos_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, list(stop), set(eos_ids)
        self.decoder = tokenizer.stream_decoder()
        self.text, self.sent = "", 0  # all text so far, and how much of it has been streamed
        self.pending: list[TokenInfo] = []
        self.hold = max((len(s) for s in self.stop), default=0)

    def push(self, info: TokenInfo) -> Delta | None:
        """Take one token; return a chunk when there is text to send or the output ended (EOS or stop string)."""
        self.pending.append(info)
        if info.id in self.eos:
            return self.finish("stop")
        self.text += self.decoder.step(self.tokenizer.backend, info.id) or ""
        text, safe = self.text, len(self.text)
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := text.find(s, max(0, self.sent - self.hold))) >= 0]
            if hits:
                at, stop = min(hits)
                self.text = text[:at]
                return self.finish("stop", stop)
            safe -= max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if safe > self.sent:
            chunk = Delta(text[self.sent:safe], self.pending)
            self.sent, self.pending = safe, []
            return chunk
        return None

    def finish(self, reason: str, stop: str | None = None) -> Delta:
        """The last chunk: whatever was held back, and why the output ended (``stop``: the stop string)."""
        chunk = Delta(self.text[self.sent:], self.pending, reason, stop)
        self.sent, self.pending = len(self.text), []
        return chunk


def stream(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int], p: SamplingParams,
           eos_ids: Sequence[int] = (), session: Session | None = None,
           constraint: Constraint | None = None) -> Iterator[Delta]:
    """Generate and detokenize incrementally; stop strings are cut from the output and never streamed."""
    detok = Detokenizer(tokenizer, p.stop, eos_ids)
    for info in generate_tokens(model, prompt, p, eos_ids, session, constraint):
        chunk = detok.push(info)
        if chunk is not None:
            yield chunk
            if chunk.finish_reason:
                return
    yield detok.finish("stop" if constraint is not None and constraint.finished else "length")


def complete(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int], p: SamplingParams,
             eos_ids: Sequence[int] = ()) -> tuple[str, list[TokenInfo], str]:
    """Generate to the end: (text, tokens, finish_reason)."""
    chunks = list(stream(model, tokenizer, prompt, p, eos_ids))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.tokens], chunks[-1].finish_reason or ""
