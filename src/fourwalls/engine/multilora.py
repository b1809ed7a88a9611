"""Many LoRA adapters over one base model, mixed in one batch.

Every targetable Linear is wrapped once in a MultiLoRALinear holding the A and B matrices of all loaded adapters
side by side: A_cat [sum of ranks, in] and B_cat [out, sum of ranks] (B carries each adapter's alpha / r; an adapter
that does not target a layer has zeros there). A step computes ``x @ A_cat^T``, zeroes in each row the columns of
the adapters that row did not ask for, and multiplies by ``B_cat^T``: one pass over the base weights for the whole
batch, and each adapter's weights read once per step rather than gathered once per row (as in S-LoRA/Punica, with
dense products instead of their custom kernels).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fourwalls.errors import UsageError
from fourwalls.files import folder_digest
from fourwalls.model.lora import read_adapter
from fourwalls.model.native import NativeLinear, as_native
from fourwalls.model.transformer import block_linears


@dataclass
class Adapter:
    name: str
    path: Path
    digest: str
    rank: int
    layers: dict[str, tuple[Tensor, Tensor]]  # layer name -> (A [r, in], B * scaling [out, r])


class RowSlots:
    """Shared by all wrapped layers: which adapter columns each batch row keeps ([rows, sum of ranks]), or None
    when no row of the batch uses an adapter."""

    mask: Tensor | None = None


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, slots: RowSlots) -> None:
        super().__init__()
        self.base, self.slots = base, slots
        self.in_features, self.out_features = base.in_features, base.out_features
        self.A: Tensor | None = None  # [sum of ranks, in]
        self.B: Tensor | None = None  # [out, sum of ranks]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        mask = self.slots.mask
        if mask is None or self.A is None:
            return y
        xa = (x.to(self.A.dtype) @ self.A.T) * mask[:, None, :]  # [B, T, ranks]: each row keeps its adapter's
        return y + (xa @ self.B.T).to(y.dtype)

    def as_native(self) -> NativeLinear | None:
        """The base layer as the C kernels read it, with the stacked adapters and the batch's row mask."""
        base = as_native(self.base)
        if base is None:
            return None
        lora_b = None if self.B is None else self.B.t().contiguous()  # the kernel adds B's rows per output
        return replace(base, lora_a=self.A, lora_b=lora_b, rows_mask=lambda: self.slots.mask)


class AdapterSet:
    """The adapters loaded over one model, by name; their layers wrapped in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots = RowSlots()
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, parent, attr, layer in block_linears(model, nn.Module):
            self.layers[name] = MultiLoRALinear(layer, self.slots)
            setattr(parent, attr, self.layers[name])
        self.adapters: dict[str, Adapter] = {}
        self.columns: dict[str, slice] = {}  # each adapter's columns in the stacked matrices
        self.total_rank = 0

    def read(self, name: str, folder: Path) -> Adapter:
        """Read and check a PEFT-format folder against the model (no change to what is served yet)."""
        if not name or ":" in name:
            raise UsageError(f"adapter name {name!r} must be non-empty and contain no ':'")
        cfg, layers = read_adapter(folder, self.model)
        digest = folder_digest(folder, ["adapter_config.json", "adapter_model.safetensors"])  # as the store names it
        scaled = {q: (a.float(), (b.float() * cfg.scaling)) for q, (a, b) in layers.items()}
        return Adapter(name, folder, digest, cfg.r, scaled)

    def install(self, adapters: list[Adapter]) -> None:
        """Serve exactly these adapters: restack every wrapped layer (called between engine steps)."""
        self.adapters = {a.name: a for a in adapters}
        self.columns: dict[str, slice] = {}
        start = 0
        for a in adapters:
            self.columns[a.name] = slice(start, start + a.rank)
            start += a.rank
        self.total_rank = start
        for qual, layer in self.layers.items():
            if not any(qual in a.layers for a in adapters):  # no adapter touches it: no extra work
                layer.A = layer.B = None
                continue
            A = torch.zeros(start, layer.in_features)
            B = torch.zeros(layer.out_features, start)
            for a in adapters:
                if qual in a.layers:
                    A[self.columns[a.name]], B[:, self.columns[a.name]] = a.layers[qual]
            layer.A, layer.B = A, B

    @contextmanager
    def select(self, rows: list[str | dict[str, float] | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter ``rows[i]`` (None: the base model), or a mix of adapters
        {name: weight}: the row adds weight times each one's update, as one adapter merged from them would."""
        if any(rows):
            mask = torch.zeros(len(rows), self.total_rank)
            for i, row in enumerate(rows):
                for name, weight in ({row: 1.0} if isinstance(row, str) else row or {}).items():
                    mask[i, self.columns[name]] = weight
            self.slots.mask = mask
        try:
            yield
        finally:
            self.slots.mask = None
