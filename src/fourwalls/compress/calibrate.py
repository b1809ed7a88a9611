"""Calibration text for the methods that look at activations (AWQ-style int4 scaling, Wanda pruning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fourwalls.errors import UsageError
from fourwalls.files import read_text, sha256_file
from fourwalls.tokenizer import Tokenizer


def calibration_ids(path: Path, tokenizer: Tokenizer, samples: int = 16, seq_len: int = 256,
                    min_tokens: int = 256) -> Tensor:
    """Up to ``samples`` consecutive blocks of ``seq_len`` tokens from a text file, as a [n, seq_len] tensor.

    A text shorter than one block is cut into shorter blocks; one shorter than ``min_tokens`` is refused, since a
    few sentences say little about a layer's activations.
    """
    ids = tokenizer.encode(read_text(path, "calibration file"), add_special_tokens=False)
    if len(ids) < min_tokens:
        raise UsageError(f"calibration file {path} has {len(ids)} tokens; give at least {min_tokens}")
    seq_len = min(seq_len, len(ids))
    n = min(samples, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def calibration_lineage(path: Path | None) -> dict[str, Any]:
    """What a product's lineage records about its calibration data."""
    if path is None:
        return {"calibration": None}
    return {"calibration": str(path), "calibration_digest": sha256_file(path)}
