"""The KV cache as fixed-size blocks shared by all requests (PagedAttention), with a prefix cache over them.

Every layer's keys and values live in one pool of blocks of ``block_size`` positions each. A request holds a list
of blocks, its block table, and takes one more each time its sequence crosses a block boundary: memory goes to the
tokens requests actually hold, not to ``max_len`` per request.

A full block is named by a chain hash of everything up to its end (the adapter's digest, then the tokens of every
block so far, as vLLM names its blocks). A request whose sequence starts as an earlier one's did finds the same
names and takes those blocks instead of computing them again. Blocks are reference-counted; a named block no
request holds stays cached until its space is needed, the least recently released first.
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fourwalls.model.config import ModelConfig


@dataclass(frozen=True)
class SharedPool:
    """What a prefill worker needs to map the engine's KV pool: the file, the buffers' shape and dtype, the block
    size."""

    path: str  # /proc/<engine pid>/fd/<memfd>: an anonymous shared memory file, freed with its last process
    shape: tuple[int, ...]  # of one of the two buffers (keys, then values)
    dtype: str
    block_size: int


def _map(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The keys' and values' buffers in a shared memory file, one after the other."""
    count = math.prod(shape)
    flat = torch.from_file(path, shared=True, size=2 * count, dtype=dtype)
    return flat[:count].view(shape), flat[count:].view(shape)


def block_names(tokens: Sequence[int], block_size: int, names: list[bytes], salt: bytes) -> None:
    """Extend ``names`` (those of the first blocks of ``tokens``) with the names of its remaining full blocks."""
    for j in range(len(names), len(tokens) // block_size):
        h = hashlib.sha256(names[-1] if names else salt)
        h.update(array("q", tokens[j * block_size:(j + 1) * block_size]).tobytes())
        names.append(h.digest())


class BlockPool:
    """The blocks, who holds them, and the named ones' index.

    ``k[layer]`` and ``v[layer]`` are [blocks, kv_heads, block_size, head_dim]. The buffers are allocated empty (the
    operating system maps their pages when first written, so memory grows with use) and each block is zeroed when
    first handed out: what a batched step reads past a row's end must be finite, as masked positions are.
    ``shared``: the buffers live in a shared memory file that prefill workers map (``shared_pool()``)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, shared: bool = False) -> None:
        shape = (cfg.n_layers, num_blocks, cfg.n_kv_heads, block_size, cfg.head_dim)
        self.fd: int | None = None
        if shared:
            self.fd = os.memfd_create("fourwalls-kv", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, 2 * math.prod(shape) * dtype.itemsize)  # pages are taken as first written
            self.k_all, self.v_all = _map(f"/proc/{os.getpid()}/fd/{self.fd}", shape, dtype)
        else:
            self.k_all = torch.empty(shape, dtype=dtype, device=device)
            self.v_all = torch.empty(shape, dtype=dtype, device=device)
        self._buffers(num_blocks, block_size)
        self.refs = [0] * num_blocks
        self.name_of: list[bytes | None] = [None] * num_blocks
        self.named: dict[bytes, int] = {}
        # Blocks no request holds, the next to hand out first: unnamed ones in front, named ones behind them from
        # least to most recently released (the LRU order of eviction).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.zeroed = [False] * num_blocks

    def _buffers(self, num_blocks: int, block_size: int) -> None:
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))
        self.num_blocks, self.block_size = num_blocks, block_size

    @classmethod
    def mapped(cls, shared: SharedPool) -> BlockPool:
        """A prefill worker's view of the engine's shared buffers: where it writes, not which blocks are whose."""
        pool = cls.__new__(cls)
        pool.k_all, pool.v_all = _map(shared.path, shared.shape, getattr(torch, shared.dtype))
        pool._buffers(shared.shape[1], shared.block_size)
        return pool

    def shared_pool(self) -> SharedPool:
        """What a prefill worker maps (a pool made with ``shared=True``)."""
        return SharedPool(f"/proc/{os.getpid()}/fd/{self.fd}", tuple(self.k_all.shape),
                          str(self.k_all.dtype).removeprefix("torch."), self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: unheld, named or not."""
        return len(self.free)

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for a request to write, evicting the least recently released named ones if need be."""
        if n > len(self.free):
            raise RuntimeError(f"{n} KV-cache blocks wanted, {len(self.free)} free")  # the engine checks first
        blocks = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if self.name_of[b] is not None:
                del self.named[self.name_of[b]]
                self.name_of[b] = None
            self.refs[b] = 1
            blocks.append(b)
        new = [b for b in blocks if not self.zeroed[b]]
        if new:
            for b in new:
                self.zeroed[b] = True
            self.k_all[:, new] = 0
            self.v_all[:, new] = 0
        return blocks

    def lookup(self, names: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``names``, now held by the caller too."""
        blocks = []
        for name in names:
            b = self.named.get(name)
            if b is None:
                break
            if self.refs[b] == 0:
                del self.free[b]
            self.refs[b] += 1
            blocks.append(b)
        return blocks

    def name(self, block: int, name: bytes) -> None:
        """Record that a full ``block`` holds the sequence ``name`` names, so later requests may reuse it."""
        if name not in self.named and self.name_of[block] is None:  # a twin computed meanwhile stays unnamed
            self.named[name] = block
            self.name_of[block] = name

    def release(self, blocks: Sequence[int]) -> None:
        """Let go of a request's blocks; the last blocks of a sequence are the first evicted, as in vLLM."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None
                if self.name_of[b] is None:
                    self.free.move_to_end(b, last=False)


def blocks_for(positions: int, block_size: int) -> int:
    return math.ceil(positions / block_size)


def _gather(buf: Tensor, index: Tensor, end: int) -> Tensor:
    """Blocks ``index`` [rows, n] of ``buf`` [blocks, heads, block_size, dim], as [rows, heads, end, dim]."""
    rows, n = index.shape
    _, heads, size, dim = buf.shape
    return buf[index].transpose(1, 2).reshape(rows, heads, n * size, dim)[:, :, :end]


class PrefillCache:
    """One request's blocks as ``Transformer.forward``'s cache for a chunk of its prompt at positions [T], and as
    what the fused step reads (``k``, ``v``, ``block_table``)."""

    def __init__(self, pool: BlockPool, blocks: Sequence[int]) -> None:
        self.pool, self.blocks = pool, torch.tensor(blocks, dtype=torch.long)
        self.k, self.v, self.block_table = pool.k, pool.v, self.blocks.to(torch.int32)[None]

    def prepare(self, input_pos: Tensor) -> tuple[Tensor | None, bool]:
        pos = input_pos.cpu()
        start, t, bs = int(pos[0]), pos.numel(), self.pool.block_size
        self.end = start + t
        self.where = self.blocks[pos // bs], pos % bs
        self.index = self.blocks[None, :blocks_for(self.end, bs)]
        if start == 0:
            return None, t > 1
        keys = torch.arange(self.end, device=input_pos.device)
        return keys[None, :] <= input_pos[:, None], False

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb, vb = self.pool.k[layer], self.pool.v[layer]
        block, offset = self.where
        kb[block, :, offset] = k[0].transpose(0, 1).to(kb.dtype)
        vb[block, :, offset] = v[0].transpose(0, 1).to(vb.dtype)
        return _gather(kb, self.index, self.end), _gather(vb, self.index, self.end)


class DecodeCache:
    """The rows of a decode step, each at its own position with its own blocks: the cache of ``Transformer.forward``
    for tokens [B, 1] at positions [B, 1], and what the fused step reads (``k``, ``v``, ``block_table``)."""

    def __init__(self, pool: BlockPool, block_table: Tensor) -> None:
        self.pool, self.k, self.v = pool, pool.k, pool.v
        self.block_table = block_table  # int32 [B, blocks]; a row's entries past its own blocks are any block

    def prepare(self, input_pos: Tensor) -> tuple[Tensor, bool]:
        pos, bs = input_pos[:, 0].cpu(), self.pool.block_size
        self.end = int(pos.max()) + 1
        table = self.block_table.long()
        self.where = table[torch.arange(len(pos)), pos // bs], pos % bs
        self.index = table[:, :blocks_for(self.end, bs)]
        keys = torch.arange(self.end)
        # [B, 1 (heads), 1 (query), keys]: each row sees its own positions only.
        return (keys[None, :] <= pos[:, None])[:, None, None, :].to(input_pos.device), False

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kb, vb = self.pool.k[layer], self.pool.v[layer]
        block, offset = self.where
        kb[block, :, offset] = k[:, :, 0].to(kb.dtype)
        vb[block, :, offset] = v[:, :, 0].to(vb.dtype)
        return _gather(kb, self.index, self.end), _gather(vb, self.index, self.end)
