"""The Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, and a static KV cache.

Parameter names follow Hugging Face's Llama modules (``layers.N.self_attn.q_proj`` ...), so a state dict maps to
an HF checkpoint by adding the ``model.`` prefix, and LoRA target names mean the same thing as in PEFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.errors import ContextLengthError
from fourwalls.model.config import ModelConfig
from fourwalls.model.ops import (
    IGNORE_INDEX,
    Linear,
    causal_attention,
    linear_cross_entropy,
    linear_log_probs,
    prompt_attention,
)

# The linear layers of a decoder block, by attribute name (as in HF's Llama modules and in PEFT's target_modules).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> Tensor:
    """RoPE inverse frequencies, with Llama-3 scaling of the low frequencies when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_freq_divisors(cfg: ModelConfig) -> Tensor:
    """Llama-3 scaling as llama.cpp stores it: each frequency's divisor (plain over scaled inverse frequency)."""
    return rope_inv_freq(cfg.replace(rope_scaling=None)) / rope_inv_freq(cfg)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for positions of shape [T] (shared) or [B, T] (per row)."""
    angles = positions.to(inv_freq.device).float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if positions.dim() == 2:  # [B, T, D] -> [B, 1, T, D] to broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 as the reference implementations do, then scale in the input dtype.
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def kv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The KV cache's type for a model computing in ``dtype``: fp16 for an fp32 model (llama.cpp's default: half the
    memory, and half the bytes attention reads per token, for a rounding well below the int8 inputs' own), else the
    model's."""
    return torch.float16 if dtype == torch.float32 else dtype


class KVCache:
    """Static key/value buffers for a batch of sequences that share positions (gpt-fast style).

    ``prepare(input_pos)`` is called once per forward; each layer then writes its new keys and values with
    ``update`` and attends over the filled prefix only, so a decode step costs what the context costs.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor]) -> None:
        self.k, self.v = k, v  # per layer [batch, kv_heads, max_len, head_dim]; views of a larger pool work too
        self.max_len = k[0].shape[2]
        self.start = self.end = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> KVCache:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)])

    def prepare(self, input_pos: Tensor) -> tuple[Tensor | None, bool]:
        """Set the write window for these positions; return (attention mask, is_causal)."""
        start, t = int(input_pos[0]), input_pos.numel()
        if start + t > self.max_len:
            raise ContextLengthError(
                f"{start + t} positions do not fit the KV cache of {self.max_len}; shorten the prompt or "
                "lower max_new_tokens"
            )
        self.start, self.end = start, start + t
        if t == 1:
            return None, False
        if start == 0:
            return None, True
        keys = torch.arange(self.end, device=input_pos.device)
        return keys[None, :] <= input_pos[:, None], False

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer][:, :, self.start:self.end] = k
        self.v[layer][:, :, self.start:self.end] = v
        return self.k[layer][:, :, : self.end], self.v[layer][:, :, : self.end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.dim, q, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.o_proj = Linear(q, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None,
                is_causal: bool) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache may keep them in less precision (kv_dtype)
        if cache is None and is_causal:
            y = causal_attention(q, k, v)
        elif cache is not None and t > 1:  # a prompt chunk into the cache
            y = prompt_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None,
                is_causal: bool) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # nn.Embedding's own N(0, 1) start, but none on the meta device (a skeleton about to receive stored weights):
        # there torch's normal_ imports its Python reference kernels, sympy and all, 70 MB and seconds for nothing
        table = torch.empty(cfg.vocab_size, cfg.dim)
        if table.device.type != "meta":
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=table)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq: Tensor | None = None

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype; quantized layers hold their weights in their own."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache.allocate(self.config, batch_size, max_len or self.config.context_length, kv_dtype(self.dtype),
                                self.device)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, targets: Tensor | None = None, log_probs: bool = False) -> Tensor:
        """Logits for ``tokens`` [B, T] at ``input_pos`` [T] (default 0..T-1), or [B, T] when each row has its own
        positions (a cache that supports it: the serving engine's); ``last_only`` keeps the last position.

        With ``targets`` [B, T] (the token each position should predict, ``IGNORE_INDEX`` where none), the mean
        cross-entropy over the targeted positions instead, computed with the head by ``linear_cross_entropy``; with
        ``log_probs`` too, each position's log-probability of its target [B, T] (0 where none), likewise without
        the logits (``linear_log_probs``)."""
        t = tokens.shape[1]
        if input_pos is None:
            if t > self.config.context_length:
                raise ContextLengthError(f"{t} tokens exceed the context window of {self.config.context_length}")
            input_pos = torch.arange(t, device=tokens.device)
        if cache is not None:
            mask, is_causal = cache.prepare(input_pos)
        else:  # no cache: positions are 0..t-1, as in training
            mask, is_causal = None, t > 1
        x = self.embed_tokens(tokens).to(self.dtype)  # a quantized table gives fp32 rows
        if self._inv_freq is None or self._inv_freq.device != x.device:
            self._inv_freq = rope_inv_freq(self.config, x.device)
        cos, sin = rope_cos_sin(self._inv_freq, input_pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask, is_causal)
        if last_only:
            x = x[:, -1:]
        if targets is None:
            return self.lm_head(self.norm(x))
        h, flat = self.norm(x).flatten(0, 1), targets.flatten()
        fused = type(self.lm_head) is Linear and not torch.is_autocast_enabled(h.device.type)
        if log_probs:  # the head runs on the targeted positions only (a preference pair's answers, not its prompt)
            keep = flat != IGNORE_INDEX
            h, kept = h[keep], flat[keep]
            if fused:
                logp = linear_log_probs(h, self.lm_head.weight, kept)
            else:
                logp = F.log_softmax(self.lm_head(h).float(), -1).gather(1, kept[:, None]).squeeze(1)
            return torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device).masked_scatter(keep.view(
                targets.shape), logp)
        if fused:
            return linear_cross_entropy(h, self.lm_head.weight, flat)
        return F.cross_entropy(self.lm_head(h).float(), flat, ignore_index=IGNORE_INDEX)


def block_linears(model: nn.Module, types: type | tuple[type, ...] = Linear,
                  names: tuple[str, ...] = PROJECTIONS) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(name, parent, attribute, layer) of each layer of the decoder blocks called one of ``names`` and of one of
    ``types``, in order; the name is the state dict's (``layers.0.mlp.up_proj``). What LoRA, quantization and
    pruning wrap, replace or rewrite; embeddings and head are not among them."""
    return [(f"layers.{qual}.{attr}", parent, attr, child) for qual, parent in model.layers.named_modules()
            for attr, child in parent.named_children() if attr in names and isinstance(child, types)]


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style initialisation for training from scratch; output projections scaled by depth."""
    out_std = std / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, 0.0, out_std)
        else:
            nn.init.normal_(p, 0.0, std)
