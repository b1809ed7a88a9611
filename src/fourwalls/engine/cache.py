"""The KV-cache pool: one row of static key/value buffers per running request.

The engine keeps the rows of the requests that are decoding contiguous at the front of the pool, so a decode step
attends over a plain slice ``[:batch, :, :longest]`` (no gather); a row that frees up is refilled by moving the last
one into it, which copies only that request's filled prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourwalls.model.config import ModelConfig
from fourwalls.model.transformer import KVCache


class KVPool:
    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        full = KVCache.allocate(cfg, rows, max_len, dtype, device)
        self.k, self.v = full.k, full.v
        self.rows, self.max_len = rows, max_len

    def row(self, i: int) -> KVCache:
        """Row ``i`` as an ordinary one-sequence cache, for prefilling a prompt chunk."""
        return KVCache([k[i:i + 1] for k in self.k], [v[i:i + 1] for v in self.v])

    def decode(self, batch: int) -> DecodeCache:
        """Rows ``0..batch-1`` as one cache whose rows each decode one token at their own position."""
        return DecodeCache(self, batch)

    def move(self, src: int, dst: int, length: int) -> None:
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]


class DecodeCache:
    """The cache interface of ``Transformer.forward`` for tokens [B, 1] at positions [B, 1]."""

    def __init__(self, pool: KVPool, batch: int) -> None:
        self.pool, self.batch = pool, batch
        self.k, self.v = pool.k, pool.v  # what the fused decode step reads and writes (rows 0..batch-1)
        self.rows = torch.arange(batch)

    def prepare(self, input_pos: Tensor) -> tuple[Tensor, bool]:
        self.pos = input_pos[:, 0].cpu()
        self.end = int(self.pos.max()) + 1
        keys = torch.arange(self.end)
        # [B, 1 (heads), 1 (query), keys]: each row sees its own filled prefix only.
        return (keys[None, :] <= self.pos[:, None])[:, None, None, :].to(input_pos.device), False

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb, vb = self.pool.k[layer], self.pool.v[layer]
        kb[self.rows, :, self.pos] = k[:, :, 0]
        vb[self.rows, :, self.pos] = v[:, :, 0]
        return kb[: self.batch, :, : self.end], vb[: self.batch, :, : self.end]
