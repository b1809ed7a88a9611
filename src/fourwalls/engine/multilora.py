"""Many LoRA adapters over one base model, mixed in one batch.

Every targetable Linear is wrapped once in a MultiLoRALinear that holds the A and B matrices of all loaded adapters
stacked (slot 0 is "no adapter": zeros; ranks are zero-padded to the largest; B carries the adapter's alpha / r).
Before each forward the engine sets the slot of every batch row; each row then gathers its own A and B (as in
Punica/S-LoRA), so requests for different adapters share one batched pass over the base weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fourwalls.errors import UsageError
from fourwalls.model.lora import TARGETS, read_adapter
from fourwalls.store import sha256_file


@dataclass
class Adapter:
    name: str
    path: Path
    digest: str
    rank: int
    layers: dict[str, tuple[Tensor, Tensor]]  # layer name -> (A [r, in], B * scaling [out, r])


class RowSlots:
    """Shared by all wrapped layers: each batch row's adapter slot, or None when no row uses an adapter."""

    idx: Tensor | None = None


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, slots: RowSlots) -> None:
        super().__init__()
        self.base, self.slots = base, slots
        self.in_features, self.out_features = base.in_features, base.out_features
        self.A: Tensor | None = None  # [slots, r, in]
        self.B: Tensor | None = None  # [slots, out, r]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        idx = self.slots.idx
        if idx is None or self.A is None:
            return y
        a, b = self.A[idx], self.B[idx]  # per row
        return y + torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)).to(y.dtype)


class AdapterSet:
    """The adapters loaded over one model, by name; their layers wrapped in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots = RowSlots()
        self.layers: dict[str, MultiLoRALinear] = {}
        for qual, module in model.layers.named_modules():
            for attr, child in list(module.named_children()):
                if attr in TARGETS:
                    wrapped = MultiLoRALinear(child, self.slots)
                    setattr(module, attr, wrapped)
                    self.layers[f"layers.{qual}.{attr}"] = wrapped
        self.adapters: dict[str, Adapter] = {}
        self.slot_of: dict[str, int] = {}

    def read(self, name: str, folder: Path) -> Adapter:
        """Read and check a PEFT-format folder against the model (no change to what is served yet)."""
        if not name or ":" in name:
            raise UsageError(f"adapter name {name!r} must be non-empty and contain no ':'")
        cfg, layers = read_adapter(folder, self.model)
        digest = sha256_file(folder / "adapter_model.safetensors")
        scaled = {q: (a.float(), (b.float() * cfg.scaling)) for q, (a, b) in layers.items()}
        return Adapter(name, folder, digest, cfg.r, scaled)

    def install(self, adapters: list[Adapter]) -> None:
        """Serve exactly these adapters: restack every wrapped layer (called between engine steps)."""
        self.adapters = {a.name: a for a in adapters}
        self.slot_of = {a.name: i + 1 for i, a in enumerate(adapters)}
        rank = max((a.rank for a in adapters), default=0)
        for qual, layer in self.layers.items():
            if not any(qual in a.layers for a in adapters):  # no adapter touches it: no extra work
                layer.A = layer.B = None
                continue
            A = torch.zeros(len(adapters) + 1, rank, layer.in_features)
            B = torch.zeros(len(adapters) + 1, layer.out_features, rank)
            for i, adapter in enumerate(adapters, 1):
                if qual in adapter.layers:
                    a, b = adapter.layers[qual]
                    A[i, : a.shape[0]] = a
                    B[i, :, : b.shape[1]] = b
            layer.A, layer.B = A, B

    @contextmanager
    def select(self, names: list[str | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter ``names[i]`` (None: the base model)."""
        slots = [self.slot_of[n] if n else 0 for n in names]
        self.slots.idx = torch.tensor(slots) if any(slots) else None
        try:
            yield
        finally:
            self.slots.idx = None
