"""Quantized linear layers, swapped in for Linear like LoRA is.

NF4 (QLoRA's 4-bit NormalFloat, Dettmers et al. 2023): blocks of 64 weights share an absmax scale and each weight is
the index of the nearest of 16 levels placed at quantiles of a normal distribution. The frozen base of a QLoRA run
is held this way; the matrix is dequantized one layer at a time, in forward and again in backward, so no fp32 copy
of the base outlives a layer's matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.errors import UsageError
from fourwalls.model.transformer import Linear

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized on the fly; backward re-dequantizes instead of saving the fp32 matrix."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (about 4.5 bits a weight with its scales)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, block_size: int = 64) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        if weight.numel() % (2 * block_size):
            raise UsageError(f"NF4 needs a weight count divisible by {2 * block_size}; {tuple(weight.shape)} is not")
        self.in_features, self.out_features, self.block_size = in_f, out_f, block_size
        blocks = weight.detach().float().reshape(-1, block_size)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        # Nearest level = which gap between neighbouring levels' midpoints the value falls in (no 16x temporary).
        idx = torch.bucketize(blocks / absmax, (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).to(torch.uint8).flatten()
        self.register_buffer("packed", (idx[0::2] << 4) | idx[1::2])
        self.register_buffer("absmax", absmax.squeeze(1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantize(self) -> Tensor:
        idx = torch.stack((self.packed >> 4, self.packed & 0xF), dim=1).flatten().long()
        w = NF4_LEVELS[idx].reshape(-1, self.block_size) * self.absmax[:, None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias


def quantize_nf4(model: nn.Module, block_size: int = 64) -> int:
    """Replace every Linear inside ``model.layers`` by an NF4Linear (embeddings and head stay as they are)."""
    count = 0
    for module in list(model.layers.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, child_name, NF4Linear(child.weight, child.bias, block_size))
                count += 1
    # Weights loaded from safetensors share one memory map of the file, which stays mapped (and resident) while any
    # of them lives: own copies of what stays in full precision let the fp32 matrices really go.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return count
