"""The Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, and a static KV cache.

Parameter names follow Hugging Face's Llama modules (``layers.N.self_attn.q_proj`` ...), so a state dict maps to
an HF checkpoint by adding the ``model.`` prefix, and LoRA target names mean the same thing as in PEFT.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.errors import ContextLengthError
from fourwalls.model.config import ModelConfig


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


class Linear(nn.Linear):
    """nn.Linear with a fast path for the few rows of inference decoding (one token for each of up to 32 rows), for
    where fourwalls' fused decode step (model/fused.py) does not run: no C compiler, or layers it does not take.

    Decoding reads every weight once per step, so its speed is the matrix product's memory bandwidth. Torch's CPU
    wheels multiply through MKL, whose sgemv reached about half of OpenBLAS's bandwidth on the AMD CPUs measured
    here (and its small-M sgemm was slower too: 16 rows took 156 ms per step against OpenBLAS's 126); NumPy ships
    OpenBLAS and a NumPy view of the weight costs nothing. Training, prompts and other dtypes take the ordinary
    path. Run torch single-threaded meanwhile (see ``decode_threads``): torch's idle OpenMP workers spin and
    starve OpenBLAS's threads.
    """

    FAST_ROWS = 32

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() == 3 and x.shape[0] * x.shape[1] <= self.FAST_ROWS and x.dtype == torch.float32
                and x.device.type == "cpu" and self.weight.dtype == torch.float32 and not torch.is_grad_enabled()):
            rows = x.reshape(-1, x.shape[-1]).numpy()
            y = torch.from_numpy(rows @ self.weight.detach().numpy().T).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


# oneDNN's fp32 matrix product (it ships inside torch's CPU wheels): torch sends fp32 products to MKL, which on
# the AMD CPUs measured here ran at 130-200 GFLOP/s on 2 cores against oneDNN's 420-480 (AVX-512), in the
# forward and both backward products alike. The op is inductor's, so it is looked up, not assumed.
_ONEDNN = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()  # a weight with gaps between its rows took oneDNN's reference path: 500x slower
    return _ONEDNN(x, weight, bias, "none", [], "")


def _on_onednn(*tensors: Tensor) -> bool:
    return (_ONEDNN is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and os.environ.get("FOURWALLS_ONEDNN") != "0")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with fp32 CPU products, forward and backward, on oneDNN's kernels where torch has them."""
    if not _on_onednn(x, weight):
        return F.linear(x, weight, bias)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return _onednn(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(grad, weight.t())
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = _onednn(g.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of ``q`` [B, H, T, D] over ``k``, ``v`` [B, KV, T, D] (KV divides H), as in training."""
    if (_on_onednn(q, k, v) and q.shape[2] <= 2048 and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _future_mask(t: int) -> Tensor:
    """[T, T]: 0 where a query may attend, -inf on the keys after it."""
    return torch.full((t, t), float("-inf")).triu_(1)


def _attention_probs(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T + mask) for the query rows of one KV head's group [G * T, D] (already scaled)."""
    s = _onednn(q, k)
    s.view(-1, *mask.shape).add_(mask)
    return torch.softmax(s, -1)


class _CausalAttention(torch.autograd.Function):
    """Training's attention as plain matrix products on oneDNN: torch's fp32 flash attention multiplies through MKL,
    and forward and backward took 15 ms a layer at T = 512 against 11 ms here (SmolLM2's 9 query heads on 3 KV heads).

    The query heads sharing a KV head are one matrix, so each (row, KV head) is two products forward and four
    backward. The probabilities are computed again in backward rather than kept (T x T a head), so memory stays
    what it is without them; all positions are scored and the future masked, up to T = 2048 (SDPA beyond).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        b, h, t, d = q.shape
        kv = k.shape[1]
        k, v = k.contiguous(), v.contiguous()
        qs = (q * d**-0.5).reshape(b, kv, h // kv * t, d)
        mask = _future_mask(t)
        out = torch.empty_like(qs)
        for i in range(b):
            for j in range(kv):
                out[i, j] = _onednn(_attention_probs(qs[i, j], k[i, j], mask), v[i, j].t())
        ctx.save_for_backward(qs, k, v, out)
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        qs, k, v, out = ctx.saved_tensors
        b, kv, gt, d = qs.shape
        t = k.shape[2]
        mask = _future_mask(t)
        g = grad.contiguous().reshape(qs.shape)
        rows = (g * out).sum(-1, keepdim=True)  # sum_j P_ij dP_ij, softmax's backward term
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        for i in range(b):
            for j in range(kv):
                p = _attention_probs(qs[i, j], k[i, j], mask)
                # dV = P^T dO and dK = dS^T Q as the transposes of dO^T P and Q^T dS: oneDNN copies a transposed
                # input, and these inputs are the small [D, G * T] ones rather than the [G * T, T] ones
                dv[i, j] = _onednn(g[i, j].t(), p.t()).t()
                ds = _onednn(g[i, j], v[i, j]).sub_(rows[i, j]).mul_(p)
                dk[i, j] = _onednn(qs[i, j].t(), ds.t()).t()
                dq[i, j] = _onednn(ds, k[i, j].t())
        return (dq * d**-0.5).view(b, gt // t * kv, t, d), dk, dv


@contextmanager
def decode_threads(model: nn.Module) -> Iterator[None]:
    """Torch single-threaded while decoding when the matrix products run on OpenBLAS's own threads (``Linear``).

    A quantized model's layers run torch's own kernels, which want torch's threads: it keeps them.
    """
    if not any(type(m) is Linear for m in model.modules()):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
        if cache is None and is_causal:
            y = causal_attention(q, k, v)
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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
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
        return KVCache.allocate(self.config, batch_size, max_len or self.config.context_length, self.dtype,
                                self.device)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, targets: Tensor | None = None) -> Tensor:
        """Logits for ``tokens`` [B, T] at ``input_pos`` [T] (default 0..T-1), or [B, T] when each row has its own
        positions (a cache that supports it: the serving engine's); ``last_only`` keeps the last position.

        With ``targets`` [B, T] (the token each position should predict, ``IGNORE_INDEX`` where none), the mean
        cross-entropy over the targeted positions instead, computed with the head by ``linear_cross_entropy``."""
        t = tokens.shape[1]
        if input_pos is None:
            if t > self.config.context_length:
                raise ContextLengthError(f"{t} tokens exceed the context window of {self.config.context_length}")
            input_pos = torch.arange(t, device=tokens.device)
        if cache is not None:
            mask, is_causal = cache.prepare(input_pos)
        else:  # no cache: positions are 0..t-1, as in training
            mask, is_causal = None, t > 1
        x = self.embed_tokens(tokens)
        if self._inv_freq is None or self._inv_freq.device != x.device:
            self._inv_freq = rope_inv_freq(self.config, x.device)
        cos, sin = rope_cos_sin(self._inv_freq, input_pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask, is_causal)
        if last_only:
            x = x[:, -1:]
        if targets is None:
            return self.lm_head(self.norm(x))
        h, targets = self.norm(x).flatten(0, 1), targets.flatten()
        if type(self.lm_head) is Linear and not torch.is_autocast_enabled(h.device.type):
            return linear_cross_entropy(h, self.lm_head.weight, targets)
        return F.cross_entropy(self.lm_head(h).float(), targets, ignore_index=IGNORE_INDEX)


IGNORE_INDEX = -100  # a target that is not scored (prompt tokens, padding), as in PyTorch and HF


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` [N, V] against ``targets`` [N], without keeping the logits.

    The logits of a training batch are its largest tensor (512 tokens x 49,152 words is 100 MB in fp32, and
    log-softmax and its gradient make three); here they exist one chunk of rows at a time, and the gradients
    for ``h`` and ``weight`` are made in the same pass (the loss is a scalar: backward only scales them).
    ``rows`` per chunk defaults to 128 MB of fp32 logits.
    """
    rows = rows or max(16, 2**25 // weight.shape[0])
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _LinearCrossEntropy.forward(None, h, weight, targets, rows)
    return _LinearCrossEntropy.apply(h, weight, targets, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        keep = targets != IGNORE_INDEX
        count = keep.sum().clamp(min=1)
        safe = targets.clamp(min=0)[:, None]
        want_h = ctx is not None and h.requires_grad
        want_w = ctx is not None and weight.requires_grad
        dh = torch.empty_like(h) if want_h else None
        dw = torch.zeros_like(weight) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], rows):
            hc, kc = h[i:i + rows], keep[i:i + rows]
            logits = linear(hc, weight).float()
            lse = torch.logsumexp(logits, -1)
            loss += ((lse - logits.gather(1, safe[i:i + rows]).squeeze(1)) * kc).sum()
            if want_h or want_w:  # d loss / d logits = (softmax - one_hot) / count on kept rows
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, safe[i:i + rows], -kc[:, None].float())
                g = g.mul_((kc / count)[:, None]).to(h.dtype)
                if want_h:
                    dh[i:i + rows] = linear(g, weight.t())
                if want_w:
                    dw += linear(g.t(), hc.t())
        if ctx is not None:
            ctx.save_for_backward(dh, dw)
        return loss / count

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dh, dw = ctx.saved_tensors
        return dh * grad if dh is not None else None, dw * grad if dw is not None else None, None, None


def block_linears(model: Transformer) -> list[tuple[str, nn.Module, str, Linear]]:
    """(name, parent, attribute, layer) of each Linear inside the decoder blocks, in order; the name is the state
    dict's (``layers.0.mlp.up_proj``). What quantization and pruning replace or rewrite; embeddings and head are not
    among them."""
    return [(f"layers.{qual}.{attr}", parent, attr, child) for qual, parent in model.layers.named_modules()
            for attr, child in parent.named_children() if isinstance(child, Linear)]


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
