"""The fused decode step: one call into fourwalls' C kernels (kernels.c) per generated token.

A decode step of the PyTorch model is some 4,000 small operator calls for a 30-layer model, which cost as much as
reading the weights; a ``Decoder`` runs the same computation (embedding, every layer, head) in one C call. It takes
float32 models whose linear layers are plain, int8, int4 (groups of 32 or more), or wrapped in multi-LoRA stacks (the
serving engine's), and up to 32 rows of one token each; for anything else it returns None and the caller runs the
model as usual.
"""

from __future__ import annotations

import ctypes
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from fourwalls.errors import ContextLengthError
from fourwalls.model.native import native
from fourwalls.model.quant import Int4Linear, Int8Embedding, Int8Linear
from fourwalls.model.transformer import KVCache, Linear, Transformer, decode_threads, rope_inv_freq

MAX_ROWS = 32
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_PROJ = ("q", "k", "v", "o", "gate", "up", "down")


class _Lin(ctypes.Structure):
    _fields_ = [("kind", _I64), ("w", _P), ("scale", _P), ("zero", _P), ("in_scale", _P), ("group", _I64),
                ("bias", _P), ("lora_a", _P), ("lora_b", _P), ("n", _I64), ("k", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), *((name, _Lin) for name in _PROJ)]


class _Model(ctypes.Structure):
    _fields_ = [*((name, _I64) for name in ("n_layers", "dim", "hidden", "n_heads", "n_kv_heads", "head_dim",
                                            "vocab", "lora_rank")),
                ("eps", ctypes.c_float), ("inv_freq", _P), ("embed_kind", _I64), ("embed", _P),
                ("embed_scale", _P), ("norm", _P), ("head", _Lin), ("layers", _P)]


class _Scratch(ctypes.Structure):
    _fields_ = [*((name, _P) for name in ("x", "xn", "q", "k", "v", "att", "gate", "up", "xa", "cos", "sin",
                                          "scores", "work")), ("scores_len", _I64), ("work_len", _I64)]


class _Cache(ctypes.Structure):
    _fields_ = [("k", _P), ("v", _P), ("row_stride", _I64), ("head_stride", _I64)]


class Decoder:
    """One model's weights as the C step reads them, and its scratch buffers."""

    def __init__(self, model: Transformer) -> None:
        cfg = model.config
        self.tensors: list[Tensor] = []  # what the structures point into, kept alive with them
        self.lora: list[nn.Module] = []
        self.widest = 0  # the widest layer input: int4 layers rearrange theirs in per-thread work space
        self.layers = (_Layer * cfg.n_layers)()
        for i, block in enumerate(model.layers):
            layer = self.layers[i]
            layer.attn_norm = self._tensor(block.input_layernorm, "weight")
            layer.mlp_norm = self._tensor(block.post_attention_layernorm, "weight")
            for name, (owner, attr) in zip(_PROJ, ((block.self_attn, "q_proj"), (block.self_attn, "k_proj"),
                                                   (block.self_attn, "v_proj"), (block.self_attn, "o_proj"),
                                                   (block.mlp, "gate_proj"), (block.mlp, "up_proj"),
                                                   (block.mlp, "down_proj"))):
                setattr(layer, name, self._lin(owner, attr))
        self.rank = max((m.A.shape[0] for m in self.lora if m.A is not None), default=0)
        if any(m.A is not None and m.A.shape[0] != self.rank for m in self.lora):
            raise _Unsupported
        m = self.model = _Model(cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                cfg.vocab_size, self.rank)
        m.eps = cfg.norm_eps
        self.tensors.append(rope_inv_freq(cfg, model.device))
        m.inv_freq = self.tensors[-1].data_ptr()
        embed = model.embed_tokens
        m.embed_kind = int(isinstance(embed, Int8Embedding))
        m.embed = self._tensor(embed, "weight")
        m.embed_scale = self._tensor(embed, "weight_scale") if m.embed_kind else None
        m.norm = self._tensor(model.norm, "weight")
        m.head = self._lin(model, "lm_head")
        m.layers = ctypes.addressof(self.layers)
        buf = {"x": cfg.dim, "xn": cfg.dim, "q": cfg.n_heads * cfg.head_dim, "k": cfg.n_kv_heads * cfg.head_dim,
               "v": cfg.n_kv_heads * cfg.head_dim, "att": cfg.n_heads * cfg.head_dim, "gate": cfg.hidden_dim,
               "up": cfg.hidden_dim, "xa": 7 * max(self.rank, 1), "cos": cfg.head_dim // 2,
               "sin": cfg.head_dim // 2}
        self.buffers = {name: torch.empty(MAX_ROWS, width) for name, width in buf.items()}
        self.scratch = _Scratch(**{name: t.data_ptr() for name, t in self.buffers.items()})
        self.scores = self.work = torch.empty(0)

    def _tensor(self, owner: object, attr: str) -> int | None:
        t = getattr(owner, attr)
        if t is None:
            return None
        if t.dtype not in (torch.float32, torch.int8, torch.uint8) or not t.is_contiguous():
            raise _Unsupported
        self.tensors.append(t)
        return t.data_ptr()

    def _lin(self, owner: object, attr: str) -> _Lin:
        module = getattr(owner, attr)
        lora_a = lora_b = None
        if hasattr(module, "slots"):  # a multi-LoRA stack (engine.multilora) around its base layer
            self.lora.append(module)
            lora_a = self._tensor(module, "A")
            if module.B is not None:  # the kernel adds B's rows per output: B transposed, contiguous
                self.tensors.append(module.B.t().contiguous())
                lora_b = self.tensors[-1].data_ptr()
            module = module.base
        zero = in_scale = None
        group = 0
        if type(module) is Linear:
            kind, scale, (n, k) = 0, None, module.weight.shape
        elif type(module) is Int8Linear:
            kind, scale, (n, k) = 1, self._tensor(module, "weight_scale"), module.weight.shape
        elif type(module) is Int4Linear and module.group_size % 32 == 0:
            kind, scale, group = 2, self._tensor(module, "scales"), module.group_size
            n, k = module.out_features, module.in_features
            self.tensors.append((module.zeros - 8 * module.scales).float().contiguous())
            zero = self.tensors[-1].data_ptr()
            in_scale = self._tensor(module, "input_scale")
        else:
            raise _Unsupported
        if k % (16 if kind == 0 else 32):  # the kernels' block widths
            raise _Unsupported
        self.widest = max(self.widest, k)
        weight = self._tensor(module, "qweight" if kind == 2 else "weight")
        return _Lin(kind, weight, scale, zero, in_scale, group, self._tensor(module, "bias"), lora_a, lora_b, n, k)

    def __call__(self, tokens: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor | None:
        """Logits [B, vocab] for tokens [B, 1], or None when the fused step does not apply (the caller then runs
        the model). ``input_pos`` is [1] (every row at one position: a KVCache) or [B, 1] (each row at its own: the
        serving engine's cache, which has the same ``k`` and ``v`` buffers)."""
        rows = tokens.shape[0]
        k, v = cache.k, cache.v
        if (tokens.shape[1] != 1 or rows > MAX_ROWS or torch.is_grad_enabled() or k[0].dtype != torch.float32
                or k[0].stride(2) != k[0].shape[3] or k[0].stride(3) != 1):
            return None
        mask = None
        if self.lora:  # the engine's multi-LoRA layers share one row mask; None when no row uses an adapter
            mask = self.lora[0].slots.mask
            if mask is not None:
                if mask.shape != (rows, self.rank):
                    return None
                mask = mask.float().contiguous()
        if input_pos.dim() == 1:
            cache.prepare(input_pos)  # checks the cache has room
            pos = input_pos.expand(rows).contiguous()
        else:
            pos = input_pos[:, 0].contiguous()
            if int(pos.max()) >= k[0].shape[2]:
                raise ContextLengthError(f"position {int(pos.max())} is beyond the KV cache of {k[0].shape[2]}")
        kp = (ctypes.c_void_p * len(k))(*(t.data_ptr() for t in k))
        vp = (ctypes.c_void_p * len(v))(*(t.data_ptr() for t in v))
        c = _Cache(ctypes.addressof(kp), ctypes.addressof(vp), k[0].stride(0), k[0].stride(1))
        threads, length = torch.get_num_threads(), k[0].shape[2]
        if self.scores.numel() < threads * length:
            self.scores = torch.empty(threads * length)
        work = MAX_ROWS * (self.widest + self.widest // 16)
        if self.work.numel() < threads * work:
            self.work = torch.empty(threads * work)
        self.scratch.scores, self.scratch.scores_len = self.scores.data_ptr(), length
        self.scratch.work, self.scratch.work_len = self.work.data_ptr(), work
        tokens = tokens.reshape(-1).contiguous()
        logits = torch.empty(rows, self.model.vocab)
        native().decode_step(ctypes.addressof(self.model), ctypes.addressof(self.scratch), ctypes.addressof(c),
                             tokens.data_ptr(), pos.data_ptr(), rows, None if mask is None else mask.data_ptr(),
                             logits.data_ptr(), threads)
        return logits


class _Unsupported(Exception):
    pass


def decoder(model: Transformer) -> Decoder | None:
    """The fused step for this model as it is now, or None when it cannot run it (build a new one after changing
    the model's layers or weights: it reads them where they were)."""
    cfg = model.config
    if (native() is None or model.dtype != torch.float32 or model.device.type != "cpu" or cfg.head_dim % 16):
        return None
    try:
        return Decoder(model)
    except _Unsupported:
        return None


def decode_step(fused: Decoder | None, model: Transformer, tokens: Tensor, input_pos: Tensor,
                cache: KVCache) -> Tensor:
    """Logits [B, vocab] of one decode step (tokens [B, 1]): the fused step where it applies, else the model, with
    torch's threads as its few-row Linear path wants them."""
    logits = fused(tokens, input_pos, cache) if fused is not None else None
    if logits is None:
        with decode_threads(model) if tokens.shape[0] <= Linear.FAST_ROWS else nullcontext():
            logits = model(tokens, input_pos, cache, last_only=True)[:, -1].float()
    return logits
