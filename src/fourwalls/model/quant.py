"""Quantized linear layers, swapped in for Linear like LoRA is.

Weight-only int8 and int4 (for deployment): the weights are held in 8 or 4 bits. Decoding runs them in fourwalls'
fused step (model/fused.py, model/kernels.c); prompts, and machines without the C kernels, multiply by torch's CPU
kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) with bf16 activations, the only dtype those kernels
are fast with. Everything between the matrix products (norms, RoPE, attention, the KV cache) stays in the model's
dtype.
The embedding table and the output head are held in int8 in both schemes, as one table when they are tied; llama.cpp
likewise keeps the output head above 4 bits, where quantization error costs the most.

GGUF's own blocks (BlockLinear, BlockEmbedding): a GGUF file's Q4_0/Q4_1/Q4_K and Q8_0/Q5_K/Q6_K matrices as the file
holds them, 4- or 8-bit codes with a scale (and an offset, where the type has one) per group of 32 (Q6_K: 16), every
weight exactly the file's; prompts and decoding both multiply them in the C kernels with the input rounded to int8 in
blocks of 32, as llama.cpp does (and torch the same way where the kernels cannot run).

NF4 (QLoRA's 4-bit NormalFloat, Dettmers et al. 2023): blocks of 64 weights share an absmax scale and each weight is
the index of the nearest of 16 levels placed at quantiles of a normal distribution. The frozen base of a QLoRA run
is held this way; the matrix is dequantized one layer at a time, in forward and again in backward, so no fp32 copy
of the base outlives a layer's matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.errors import UsageError
from fourwalls.model.config import ModelConfig
from fourwalls.model.fused import linear_product
from fourwalls.model.native import NativeLinear
from fourwalls.model.ops import Linear, linear
from fourwalls.model.transformer import Transformer, block_linears

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
        return linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return linear(grad, ctx.layer.dequantize().to(grad.dtype).t()), None


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
    layers = block_linears(model)
    for _, parent, attr, child in layers:
        setattr(parent, attr, NF4Linear(child.weight, child.bias, block_size))
    # Weights loaded from safetensors share one memory map of the file, which stays mapped (and resident) while any
    # of them lives: own copies of what stays in full precision let the fp32 matrices really go.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return len(layers)


SCHEMES = ("int8", "int4")


@dataclass(frozen=True)
class QuantConfig:
    """How a model's weights are quantized; stored in config.json as ``quantization_config``."""

    scheme: str  # "int8": symmetric, one scale per output channel; "int4": asymmetric, per group of input weights
    group_size: int = 64  # int4: input weights sharing one scale and zero
    input_scales: bool = False  # int4: each layer divides its input by per-channel scales (AWQ-style calibration)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UsageError(f"unknown quantization scheme '{self.scheme}'; choose {', '.join(SCHEMES)}")
        if self.scheme == "int4" and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise UsageError(f"group size {self.group_size} must be a power of two, at least 16 (32, 64, 128)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) if self.scheme == "int4" else {"scheme": "int8"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        return cls(**{k: d[k] for k in ("scheme", "group_size", "input_scales") if k in d})


def _bf16_rows(x: Tensor, width: int) -> Tensor:
    return x.reshape(-1, width).to(torch.bfloat16)


class Int8Linear(nn.Module):
    """Weight-only int8: ``w = q * scale`` with q in [-127, 127] and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._kernel_scale: tuple[Tensor, Tensor] | None = None  # (weight_scale it was made from, its bf16 copy)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        m = cls(weight.shape[1], weight.shape[0], bias is not None)
        m.weight, m.weight_scale = quantize_int8(weight)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.weight_scale.float()[:, None]

    def as_native(self) -> NativeLinear:
        return NativeLinear("LIN_INT8", self.weight, self.out_features, self.in_features, bias=self.bias,
                            scale=self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        # Every row by torch's int8 kernel, bf16 activations, whatever the number of rows: a prompt token's K and V
        # are then the same whether it is fed in a long chunk or a short one (after a prefix-cache hit), so the
        # server's tokens do not depend on its cache. Decoding runs the fused C step (fp32 activations) instead.
        if self._kernel_scale is None or self._kernel_scale[0] is not self.weight_scale:
            self._kernel_scale = (self.weight_scale, self.weight_scale.to(torch.bfloat16))
        y = torch.ops.aten._weight_int8pack_mm(_bf16_rows(x, self.in_features), self.weight, self._kernel_scale[1])
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (q, scale) with ``weight ≈ q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """An embedding table in int8 with one scale per token; the tied output head reads the same two tensors."""

    def __init__(self, num_embeddings: int, dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight).to(self.weight_scale.dtype) * self.weight_scale[tokens][..., None]

    def as_native(self) -> NativeLinear:
        """The table as the kernels read it: the same int8 matrix a tied head multiplies by."""
        return NativeLinear("LIN_INT8", self.weight, *self.weight.shape, scale=self.weight_scale)


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric per group of ``group_size`` input weights: ``w = (q - 8) * scale + zero``.

    q in [0, 15]; this is the convention of torch's int4 CPU kernel, whose own packing is made on first use from
    the plain one stored here (two weights a byte, high nibble first). With ``input_scale`` the layer computes
    ``(x / s) @ (W * s)^T``: channels with large activations get finer steps (AWQ, Lin et al. 2023).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 input_scale: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % group_size:
            raise UsageError(f"group size {group_size} does not divide the layer width {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        self.register_buffer("input_scale", torch.ones(in_features, device=device) if input_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._kernel: tuple[Tensor, Tensor, Tensor] | None = None  # (qweight it came from, packed, scales+zeros)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, group_size: int = 64,
                   input_scale: Tensor | None = None) -> Int4Linear:
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, group_size, bias is not None, input_scale is not None)
        w = weight.detach().float()
        if input_scale is not None:
            m.input_scale = input_scale.detach().float().clone()
            w = w * m.input_scale
        q, m.scales, m.zeros = quantize_int4(w, group_size)
        m.qweight = (q[:, 0::2] << 4) | q[:, 1::2]
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def codes(self) -> Tensor:
        """The 4-bit codes as an [out, in] uint8 tensor."""
        return torch.stack((self.qweight >> 4, self.qweight & 0xF), dim=-1).reshape(self.out_features, -1)

    def dequantize(self) -> Tensor:
        q = self.codes().float().view(self.out_features, -1, self.group_size)
        w = ((q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]).flatten(1)
        return w if self.input_scale is None else w / self.input_scale.float()

    def as_native(self) -> NativeLinear:
        return NativeLinear("LIN_INT4", self.qweight, self.out_features, self.in_features, bias=self.bias,
                            scale=self.scales, zero=(self.zeros - 8 * self.scales).float().contiguous(),
                            in_scale=self.input_scale, group=self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is None or self._kernel[0] is not self.qweight:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().int(), 2)
            sz = torch.stack((self.scales.t(), self.zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
            self._kernel = (self.qweight, packed, sz)
        rows = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            rows = rows / self.input_scale
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self._kernel[1], self.group_size,
                                                       self._kernel[2])
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max int4 per group: (codes uint8 [out, in], scales, zeros) in the kernel's convention.

    Scales and zeros are rounded to bf16 first, as the kernel holds them, and the codes chosen against the rounded
    values: a zero off by bf16's rounding would shift every weight of its group alike, an error that grows with
    the activations' size rather than the weights' (and LLMs have a few huge activation channels).
    """
    out_f, in_f = weight.shape
    g = weight.detach().float().view(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-10).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    return q.view(out_f, in_f), scale, zero


class BlockLinear(nn.Module):
    """Weights as a GGUF file holds them, in the C kernels' layout: codes in groups of 32 (or 16) inputs, each group
    with a scale and an offset or none, ``w = q * scale + offset``; no weight passes through another value on the way.

    4 bits: two codes a byte (element 2i in the high nibble of byte i), groups of 32, offsets: GGUF's Q4_0 (offset
    -8 d), Q4_1 (d and m) and Q4_K (each sub-block's d * sc and -dmin * m). 8 bits: int8 codes, groups of 32 or 16,
    offsets or none: Q8_0, Q5_K (codes 0..31 with offsets) and Q6_K (codes -32..31 in groups of 16). Prompts and
    decoding multiply in the C kernels (kernels.c's LIN_INT4 and LIN_Q8), the input rounded to int8 in blocks of
    32 as llama.cpp does; without them the same input, rounded in torch, meets the layer dequantized for the product;
    for gradients the layer is dequantized and the input kept as it is.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group: int = 32, offsets: bool = True,
                 bias: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (4, 8) or group not in ((32,) if bits == 4 else (16, 32)) or in_features % 32:
            raise UsageError(f"no {bits}-bit layout with groups of {group} for a layer {in_features} wide")
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        codes = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        self.register_buffer("weight", torch.zeros(codes, dtype=torch.uint8 if bits == 4 else torch.int8,
                                                   device=device))
        self.register_buffer("scales", torch.ones(out_features, in_features // group, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, in_features // group, device=device)
                             if offsets else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @property
    def spec(self) -> str:
        """How the layer is laid out, as the quantization config records it: ``int4:32:offset``, ``int8:16``."""
        return f"int{self.bits}:{self.group}" + (":offset" if self.offsets is not None else "")

    @classmethod
    def from_spec(cls, spec: str, in_features: int, out_features: int, bias: bool = False,
                  device: torch.device | str | None = None) -> BlockLinear:
        kind, group, *rest = spec.split(":")
        if kind not in ("int4", "int8") or not group.isdigit() or rest not in ([], ["offset"]):
            raise UsageError(f"unknown block layout '{spec}'")
        return cls(in_features, out_features, int(kind[3:]), int(group), bool(rest), bias, device)

    def codes(self, rows: Tensor | None = None) -> Tensor:
        """The codes [out, in] (of ``rows`` only, where given): uint8 0..15 for 4 bits, int8 for 8."""
        w = self.weight if rows is None else self.weight[rows]
        return w if self.bits == 8 else torch.stack((w >> 4, w & 0xF), dim=-1).flatten(-2)

    def dequantize(self, rows: Tensor | None = None) -> Tensor:
        """The weights in fp32: q * scale (+ offset), as GGUF's reference dequantizes them."""
        scales = self.scales if rows is None else self.scales[rows]
        w = self.codes(rows).float().unflatten(-1, (-1, self.group)) * scales.float()[..., None]
        if self.offsets is not None:
            w = w + (self.offsets if rows is None else self.offsets[rows]).float()[..., None]
        return w.flatten(-2)

    def _offsets_are_minus_8_scales(self) -> bool:
        """Whether every offset is -8 times its scale (Q4_0's, exactly: a power of two), which the kernels then make
        instead of reading. Checked once per pair of tensors and their contents (``_version`` counts in-place
        changes): a fused step is built for every generation, and the check reads all the scales."""
        if self.bits != 4 or self.offsets is None:
            return False
        o, s = self.offsets, self.scales
        cached = getattr(self, "_minus_8", None)
        if cached is None or cached[0] is not o or cached[1] is not s or cached[2] != (o._version, s._version):
            cached = self._minus_8 = (o, s, (o._version, s._version), torch.equal(o, s * -8))
        return cached[3]

    def as_native(self) -> NativeLinear:
        return NativeLinear("LIN_INT4" if self.bits == 4 else "LIN_Q8", self.weight, self.out_features,
                            self.in_features, bias=self.bias, scale=self.scales, zero=self.offsets, group=self.group,
                            zero_m8=self._offsets_are_minus_8_scales())

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled():  # gradients wanted (a frozen base under LoRA): the input as it is
            return linear(x, self.dequantize().to(x.dtype), bias)
        y = linear_product(self, x) if x.device.type == "cpu" else None
        if y is None:  # no C kernels here: the same product in torch
            y = linear(round_to_int8_blocks(x.float()), self.dequantize(), self.bias)
        return y.to(x.dtype)


def round_to_int8_blocks(x: Tensor) -> Tensor:
    """x as the integer kernels take it, back in fp32: each block of 32 values rounded to int8 steps of its absmax /
    127 (llama.cpp's Q8_0 and Q8_1 inputs; kernels.c's q_input_rows)."""
    blocks = x.unflatten(-1, (-1, 32))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks * torch.where(d > 0, 1 / d, 0)) * d).flatten(-2)


class BlockEmbedding(BlockLinear):
    """An embedding table in GGUF's blocks (BlockLinear's layout): a token's row is dequantized (to fp32) when looked
    up; a tied output head is a BlockLinear over the same tensors."""

    def forward(self, tokens: Tensor) -> Tensor:
        return self.dequantize(tokens)


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's width, naming the sizes that would."""
    widths = sorted({child.in_features for *_, child in block_linears(model)})
    bad = [w for w in widths if w % group_size]
    if bad:
        fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        raise UsageError(f"group size {group_size} does not divide the layer width {bad[0]} of this model; "
                         f"choose {' or '.join(map(str, fits)) or 'int8'}")


def quantize_model(model: nn.Module, qcfg: QuantConfig, input_scales: dict[str, Tensor] | None = None,
                   empty: bool = False) -> int:
    """Swap every Linear in the decoder blocks for its int8/int4 form, and embeddings and head for int8, in place.

    ``input_scales`` maps a layer's name (``layers.0.mlp.up_proj``) to AWQ scales. ``empty`` builds the quantized
    layers with zero weights on the model's device (a meta model about to receive a stored state dict).
    Returns the number of layers quantized.
    """
    if getattr(model.config, "quantization", None):
        raise UsageError("this model is already quantized; quantize its float parent instead")
    if qcfg.scheme == "int4":
        check_group_size(model, qcfg.group_size)
    device = model.norm.weight.device
    layers = block_linears(model)
    for name, parent, attr, child in layers:
        has_bias = child.bias is not None
        if qcfg.scheme == "int8":
            new = (Int8Linear(child.in_features, child.out_features, has_bias, device) if empty
                   else Int8Linear.from_float(child.weight, child.bias))
        else:
            scale = (input_scales or {}).get(name)
            if empty:
                new = Int4Linear(child.in_features, child.out_features, qcfg.group_size, has_bias,
                                 qcfg.input_scales, device)
            else:
                if qcfg.input_scales and scale is None:
                    scale = torch.ones(child.in_features)
                new = Int4Linear.from_float(child.weight, child.bias, qcfg.group_size, scale)
        setattr(parent, attr, new)
    vocab, dim = model.embed_tokens.weight.shape
    tied = model.config.tie_embeddings
    embed = Int8Embedding(vocab, dim, device)
    if not empty:
        embed.weight, embed.weight_scale = quantize_int8(model.embed_tokens.weight)
    head = Int8Linear(dim, vocab, device=device) if empty or tied else Int8Linear.from_float(model.lm_head.weight)
    if tied:  # one table serves both ends, as the float model's one matrix did
        head.weight, head.weight_scale = embed.weight, embed.weight_scale
    model.embed_tokens, model.lm_head = embed, head
    model.config = model.config.replace(quantization=qcfg.as_dict())
    return len(layers) + 1


def skeleton(cfg: ModelConfig) -> Transformer:
    """A model without storage (meta device) in the layout its stored state dict has: float or quantized."""
    with torch.device("meta"):
        model = Transformer(cfg.replace(quantization=None))
        if cfg.quantization and cfg.quantization.get("scheme") == GGUF_SCHEME:
            model.config = cfg
            block_layers(model, cfg.quantization["layers"])
        elif cfg.quantization:
            quantize_model(model, QuantConfig.from_dict(cfg.quantization), empty=True)
    return model


GGUF_SCHEME = "gguf"  # quantization config of weights kept as a GGUF file held them: {"scheme", "layers", ...}


def block_layers(model: Transformer, layers: dict[str, str]) -> None:
    """Swap the named layers (``layers.0.mlp.up_proj``, ``embed_tokens``, ``lm_head``) for empty BlockLinear (and
    BlockEmbedding) layers of the given layouts (``BlockLinear.spec``), on the model's device."""
    device = model.norm.weight.device
    for name, spec in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent, old = model.get_submodule(parent_name), model.get_submodule(name)
        if name == "embed_tokens":
            vocab, dim = old.weight.shape
            new = BlockEmbedding.from_spec(spec, dim, vocab, device=device)
        else:
            new = BlockLinear.from_spec(spec, old.in_features, old.out_features, old.bias is not None, device)
        setattr(parent, attr, new)
    if model.config.tie_embeddings and "embed_tokens" in layers:
        tie(model)


def tie(model: Transformer) -> None:
    """Point a tied head back at the embedding table (after loading a state dict with ``assign``)."""
    embed = model.embed_tokens
    if model.config.tie_embeddings and isinstance(embed, BlockEmbedding):  # one table serves both ends
        head = BlockLinear(embed.in_features, embed.out_features, embed.bits, embed.group, embed.offsets is not None,
                           device="meta")
        head.weight, head.scales, head.offsets = embed.weight, embed.scales, embed.offsets
        model.lm_head = head
        return
    model.tie_weights()
    if model.config.tie_embeddings and isinstance(model.lm_head, Int8Linear):
        model.lm_head.weight_scale = model.embed_tokens.weight_scale


def dequantize_model(model: nn.Module) -> None:
    """Replace quantized layers by float ones holding the dequantized weights (for export and for training)."""
    kinds = (Int8Linear, Int4Linear, BlockLinear)
    tied = model.config.tie_embeddings
    quantized = block_linears(model, kinds)
    if isinstance(model.lm_head, kinds) and not tied:
        quantized.append(("lm_head", model, "lm_head", model.lm_head))
    for _, parent, attr, child in quantized:
        bias = None if child.bias is None else child.bias.float().clone()
        setattr(parent, attr, Linear.holding(child.dequantize(), bias, requires_grad=False))
    if isinstance(model.embed_tokens, Int8Embedding | BlockEmbedding):
        e = model.embed_tokens
        table = e.dequantize() if isinstance(e, BlockEmbedding) else e.weight.float() * e.weight_scale.float()[:, None]
        model.embed_tokens = nn.Embedding(*table.shape, device="meta")
        model.embed_tokens.weight = nn.Parameter(table, requires_grad=False)
        if tied:  # the head is the table again, one parameter
            model.lm_head = Linear.holding(table, requires_grad=False)
            model.tie_weights()
    model.config = model.config.replace(quantization=None)
