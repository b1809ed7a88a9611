"""Training objectives: ``objective(model, batch) -> (loss, metrics)``; the one training loop calls any of them."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.train.data import IGNORE


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy over the positions whose label is not masked."""
    logits = model(batch["input_ids"])
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return loss, {"tokens": float((targets != IGNORE).sum())}
