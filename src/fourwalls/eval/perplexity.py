"""Perplexity with a sliding window: each token is scored once, with up to ``context`` tokens before it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fourwalls.errors import UsageError
from fourwalls.model.transformer import Transformer


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window, as in HF's perplexity guide."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(model: Transformer, ids: Sequence[int], context: int = 512, stride: int = 256,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on token ids; windows of ``context`` tokens advance by ``stride``."""
    if context < 2 or context > model.config.context_length:
        raise UsageError(f"context must be between 2 and the model's window ({model.config.context_length})")
    if not 0 < stride <= context:
        raise UsageError(f"stride must be between 1 and the context ({context})")
    if len(ids) < 2:
        raise UsageError("perplexity needs a text of at least 2 tokens")
    data = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    spans = windows(len(ids), context, stride)
    with torch.inference_mode():
        for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
            logits = model(data[begin:end][None])[0].float()
            # logits[i] predicts token begin+i+1; score targets first..end-1.
            pred = logits[first - begin - 1 : end - begin - 1]
            total += F.cross_entropy(pred, data[first:end], reduction="sum").item()
            count += end - first
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(spans))


def decode_perplexity(model: Transformer, ids: Sequence[int], progress: bool = False) -> PerplexityResult:
    """Perplexity as generation computes it: one token at a time through the decode step (fourwalls' fused step
    where it applies, which may compute differently from a prompt's forward: int4 layers take int8 inputs there)."""
    from fourwalls.model.fused import decode_step, decoder

    if len(ids) < 2:
        raise UsageError("perplexity needs a text of at least 2 tokens")
    if len(ids) > model.config.context_length:
        raise UsageError(f"{len(ids)} tokens exceed the context window of {model.config.context_length}")
    total = 0.0
    with torch.inference_mode():
        cache, fused = model.new_cache(1, len(ids)), decoder(model)
        for i in tqdm(range(len(ids) - 1), desc="decode perplexity", unit="tok", disable=not progress):
            logits = decode_step(fused, model, torch.tensor([[ids[i]]]), torch.tensor([i]), cache)
            total += F.cross_entropy(logits, torch.tensor([ids[i + 1]]), reduction="sum").item()
    nll = total / (len(ids) - 1)
    return PerplexityResult(math.exp(nll), nll, len(ids) - 1, 1)
