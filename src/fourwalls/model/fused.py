"""The fused decode step: one call into fourwalls' C kernels (kernels.c) per generated token.

A decode step of the PyTorch model is some 4,000 small operator calls for a 30-layer model, which cost as much as
reading the weights; a ``Decoder`` runs the same computation (embedding, every layer, head) in one C call. It takes
float32 models whose layers all say how the kernels read them (``as_native()``: plain, int8, int4 and q8 linear
layers, multi-LoRA stacks over them, quantized embedding tables), within the kernels' limits (``native.abi()``: up
to ``MAX_ROWS`` rows of one token each, block widths); for anything else it returns None and the caller runs the
model as usual. A prompt goes through the same step (``fill_cache``: up to ``MAX_ROWS`` consecutive positions of
one sequence a call, no head), so each of its tokens is computed exactly as decoding it would be. ``linear_product``
is one such layer's product on its own, for any number of rows.
"""

from __future__ import annotations

import copy
import ctypes
import functools
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from fourwalls.errors import ContextLengthError
from fourwalls.model.native import NativeLinear, abi, as_native, native, selected_isa
from fourwalls.model.ops import Linear, decode_threads
from fourwalls.model.transformer import KVCache, Transformer, rope_inv_freq

# kernels.c's structures, field for field; tests/model/test_fused.py checks every size and offset against the
# library's own (native.abi()).
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # Layer's fields: a block's layers


class _Lin(ctypes.Structure):
    _fields_ = [("kind", _I64), ("w", _P), ("scale", _P), ("zero", _P), ("in_scale", _P), ("group", _I64),
                ("half", _I64), ("bias", _P), ("lora_a", _P), ("lora_b", _P), ("n", _I64), ("k", _I64),
                ("zero_m8", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), *((name, _Lin) for name in _PROJ)]


class _Model(ctypes.Structure):
    _fields_ = [*((name, _I64) for name in ("n_layers", "dim", "hidden", "n_heads", "n_kv_heads", "head_dim",
                                            "vocab", "lora_rank")),
                ("eps", ctypes.c_float), ("inv_freq", _P), ("embed", _Lin), ("norm", _P), ("head", _Lin),
                ("layers", _P)]


class _Scratch(ctypes.Structure):
    _fields_ = [*((name, _P) for name in ("x", "xn", "q", "k", "v", "att", "gate", "up", "xa", "cos", "sin",
                                          "scores", "work")), ("scores_len", _I64), ("work_len", _I64)]


class _Cache(ctypes.Structure):
    _fields_ = [("k", _P), ("v", _P), ("table", _P), *((name, _I64) for name in ("table_stride", "block_size",
                                                                                 "block_stride", "head_stride"))]


class Decoder:
    """One model's weights as the C step reads them, and its scratch buffers."""

    def __init__(self, model: Transformer, isa: str | None = None) -> None:
        cfg, self.abi, self.lib = model.config, abi(isa), native(isa)
        self.max_rows = self.abi["MAX_ROWS"]
        self.tensors: list[Tensor] = []  # what the structures point into, kept alive with them
        self.rows_mask: Callable[[], Tensor | None] | None = None  # the multi-LoRA layers' shared row mask
        self.ranks: set[int] = set()
        self.widest = 0  # the widest layer input: int4 layers rearrange theirs in per-thread work space
        self.layers = (_Layer * cfg.n_layers)()
        for layer, block in zip(self.layers, model.layers):
            layer.attn_norm = self._tensor(block.input_layernorm.weight)
            layer.mlp_norm = self._tensor(block.post_attention_layernorm.weight)
            for field, path in _PROJ.items():
                setattr(layer, field, self._lin(block.get_submodule(path)))
        if len(self.ranks) > 1:
            raise _Unsupported
        self.rank = max(self.ranks, default=0)
        m = self.model = _Model(cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                cfg.vocab_size, self.rank)
        m.eps = cfg.norm_eps
        m.inv_freq = self._tensor(rope_inv_freq(cfg, model.device))
        embed = model.embed_tokens
        if type(embed) is nn.Embedding:  # torch's own class cannot say how: an fp32 table
            m.embed = self._lin(NativeLinear("LIN_F32", embed.weight, *embed.weight.shape))
        else:
            m.embed = self._lin(embed)
        m.norm = self._tensor(model.norm.weight)
        m.head = self._lin(model.lm_head)
        m.layers = ctypes.addressof(self.layers)
        buf = {"x": cfg.dim, "xn": cfg.dim, "q": cfg.n_heads * cfg.head_dim, "k": cfg.n_kv_heads * cfg.head_dim,
               "v": cfg.n_kv_heads * cfg.head_dim, "att": cfg.n_heads * cfg.head_dim, "gate": cfg.hidden_dim,
               "up": cfg.hidden_dim, "xa": 7 * max(self.rank, 1), "cos": cfg.head_dim // 2,
               "sin": cfg.head_dim // 2}
        self.buffers = {name: torch.empty(self.max_rows, width) for name, width in buf.items()}
        self.scratch = _Scratch(**{name: t.data_ptr() for name, t in self.buffers.items()})
        self.scores = self.work = torch.empty(0)
        self.kv: tuple | None = None  # the cache's per-layer lists and their pointer arrays, for the next step

    def _tensor(self, t: Tensor | None) -> int | None:
        return _pointer(t, self.tensors)

    def _lin(self, layer: nn.Module | NativeLinear) -> _Lin:
        lin = layer if isinstance(layer, NativeLinear) else as_native(layer)
        if lin is None:
            raise _Unsupported
        if lin.rows_mask is not None:
            self.rows_mask = lin.rows_mask
        if lin.lora_a is not None:
            self.ranks.add(lin.lora_a.shape[0])
        self.widest = max(self.widest, lin.in_features)
        return _struct(lin, self.abi, self.tensors)

    def __call__(self, tokens: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor | None:
        """Logits [B, vocab] for tokens [B, 1], or None when the fused step does not apply (the caller then runs
        the model). ``input_pos`` is [1] (every row at one position: a KVCache) or [B, 1] (each row at its own: the
        serving engine's paged cache, whose ``k`` and ``v`` are per layer [blocks, kv_heads, block_size, head_dim]
        and ``block_table`` [B, blocks] int32 each row's blocks in order)."""
        rows = tokens.shape[0]
        if tokens.shape[1] != 1 or not self._applies(rows, cache.k):
            return None
        mask = self._mask(rows)
        if mask is False:
            return None
        table = getattr(cache, "block_table", None)
        if table is None:  # a KVCache: row r is one block of max_len positions
            table = torch.arange(rows, dtype=torch.int32)[:, None]
        if input_pos.dim() == 1:
            cache.prepare(input_pos)  # checks the cache has room
            pos = input_pos.expand(rows)
        else:
            pos = input_pos[:, 0]
        return self._step(tokens.reshape(-1), pos, cache, table, 0, mask)

    def fill(self, tokens: Sequence[int], start: int, cache: KVCache) -> bool:
        """Keys and values of one sequence's ``tokens`` at positions ``start``.. into ``cache`` (a KVCache of one
        row, or one request's blocks: ``block_table`` [1, blocks]), ``MAX_ROWS`` rows a step and no logits; False
        when the fused step does not apply. Each row is computed as decoding its token would: a prompt's keys and
        values are then the same whatever its chunks, and a prompt chunk allocates nothing."""
        if not tokens or not self._applies(min(len(tokens), self.max_rows), cache.k):
            return False
        mask = self._mask(1)  # the sequence's adapters: every row's
        if mask is False:
            return False
        table = getattr(cache, "block_table", None)
        table = torch.zeros(1, 1, dtype=torch.int32) if table is None else table
        for a in range(0, len(tokens), self.max_rows):
            chunk = tokens[a: a + self.max_rows]
            rows = len(chunk)
            self._step(torch.tensor(chunk), torch.arange(start + a, start + a + rows), cache,
                       table.expand(rows, -1), rows, None if mask is None else mask.expand(rows, -1).contiguous())
        return True

    def _applies(self, rows: int, k: list[Tensor]) -> bool:
        return (rows <= self.max_rows and not torch.is_grad_enabled() and k[0].dtype == torch.float16
                and k[0].stride(2) == k[0].shape[3] and k[0].stride(3) == 1)

    def _mask(self, rows: int) -> Tensor | None | bool:
        """The multi-LoRA rows' adapter columns [rows, rank] (None: no row uses an adapter; False: not for
        ``rows`` rows)."""
        mask = self.rows_mask() if self.rows_mask is not None else None
        if mask is None:
            return None
        return mask.float().contiguous() if mask.shape == (rows, self.rank) else False

    def _step(self, tokens: Tensor, pos: Tensor, cache: KVCache, table: Tensor, logits_from: int,
              mask: Tensor | None) -> Tensor:
        """One call of kernels.c's decode_step: tokens [B] at positions [B]; the logits of rows logits_from.."""
        rows, k, v = tokens.shape[0], cache.k, cache.v
        table = table.to(torch.int32).contiguous()
        length = table.shape[1] * k[0].shape[2]  # the positions a row's blocks hold
        pos = pos.contiguous()
        if int(pos.max()) >= length:
            raise ContextLengthError(f"position {int(pos.max())} is beyond the KV cache of {length}")
        if self.kv is None or self.kv[0] is not k or self.kv[1] is not v:  # the same lists step after step
            self.kv = k, v, *((ctypes.c_void_p * len(t))(*(x.data_ptr() for x in t)) for t in (k, v))
        c = _Cache(ctypes.addressof(self.kv[2]), ctypes.addressof(self.kv[3]), table.data_ptr(), table.shape[1],
                   k[0].shape[2], k[0].stride(0), k[0].stride(1))
        threads = torch.get_num_threads()
        if self.scores.numel() < threads * length:
            self.scores = torch.empty(threads * length)
        work = self.max_rows * (self.widest + self.widest // 16)
        if self.work.numel() < threads * work:
            self.work = torch.empty(threads * work)
        self.scratch.scores, self.scratch.scores_len = self.scores.data_ptr(), length
        self.scratch.work, self.scratch.work_len = self.work.data_ptr(), work
        tokens = tokens.contiguous()
        logits = torch.empty(rows - logits_from, self.model.vocab)
        self.lib.decode_step(ctypes.addressof(self.model), ctypes.addressof(self.scratch), ctypes.addressof(c),
                             tokens.data_ptr(), pos.data_ptr(), rows, None if mask is None else mask.data_ptr(),
                             logits.data_ptr(), logits_from, threads)
        return logits


class _Unsupported(Exception):
    pass


def _pointer(t: Tensor | None, keep: list[Tensor], half: bool = False) -> int | None:
    """t's address for a C structure, t kept alive in ``keep``; _Unsupported for what the kernels cannot read
    (``half``: fp16 where fp32 would be)."""
    if t is None:
        return None
    if (t.dtype not in (torch.float16 if half else torch.float32, torch.int8, torch.uint8) or not t.is_contiguous()
            or t.device.type != "cpu"):
        raise _Unsupported
    keep.append(t)
    return t.data_ptr()


def _struct(lin: NativeLinear, limits: dict[str, int], keep: list[Tensor]) -> _Lin:
    """kernels.c's Lin for a layer, or _Unsupported where its kind or widths are outside the kernels' limits."""
    block = limits.get(f"{lin.kind}_BLOCK")  # None: a kind the kernels lack
    if (block is None or lin.in_features % block or (lin.kind == "LIN_INT4" and lin.group % block)
            or (lin.kind == "LIN_Q8" and lin.group not in (16, 32))):
        raise _Unsupported
    # the integer kinds' scales and offsets may be in fp16 (GGUF's own), both alike
    half = lin.kind in ("LIN_INT4", "LIN_Q8") and lin.scale.dtype == torch.float16
    t = functools.partial(_pointer, keep=keep)
    return _Lin(limits[lin.kind], t(lin.weight), t(lin.scale, half=half), t(lin.zero, half=half), t(lin.in_scale),
                lin.group, half, t(lin.bias), t(lin.lora_a), t(lin.lora_b), lin.out_features, lin.in_features,
                lin.zero_m8)


def decoder(model: Transformer, isa: str | None = None) -> Decoder | None:
    """The fused step for this model as it is now, or None when it cannot run it (build a new one after changing
    the model's layers or weights: it reads them where they were). ``isa``: the kernels' instruction set
    (default: ``native.selected_isa()``)."""
    cfg, limits = model.config, abi(isa)
    if (not limits or model.dtype != torch.float32 or model.device.type != "cpu"
            or cfg.head_dim % limits["HEAD_DIM_BLOCK"]):
        return None
    try:
        return Decoder(model, isa)
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


def fill_cache(fused: Decoder | None, model: Transformer, tokens: Sequence[int], start: int, cache: KVCache) -> None:
    """Keys and values of one sequence's ``tokens`` at positions ``start``.. into ``cache`` (a prompt's): the fused
    step where it applies (``Decoder.fill``), else the model's forward."""
    if fused is None or not fused.fill(tokens, start, cache):
        device = model.device
        model(torch.tensor([list(tokens)], device=device), torch.arange(start, start + len(tokens), device=device),
              cache, last_only=True)


class LinearProduct:
    """One layer's product in the C kernels (kernels.c's linear_forward), for any number of rows."""

    def __init__(self, lin: NativeLinear, isa: str) -> None:
        self.native, self.isa, self.lib, self.keep = lin, isa, native(isa), []
        self.lin = _struct(lin, abi(isa), self.keep)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def __deepcopy__(self, memo: dict) -> LinearProduct:
        # ctypes structures holding pointers cannot be copied: one over the copied layer's own tensors instead
        return LinearProduct(copy.deepcopy(self.native, memo), self.isa)

    def __call__(self, x: Tensor) -> Tensor:
        """y = x W^T (+ bias) for x [..., in], in fp32."""
        rows = x.reshape(-1, self.in_features).float().contiguous()
        m, k = rows.shape[0], self.in_features
        work = torch.empty(m * (k // 16 + k // 32 + k // 2))  # an integer layer's input in int8, made once
        y = torch.empty(m, self.out_features)
        self.lib.linear_forward(ctypes.addressof(self.lin), rows.data_ptr(), m, y.data_ptr(), work.data_ptr(),
                                torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)


def linear_product(layer: nn.Module, x: Tensor) -> Tensor | None:
    """``layer(x)`` in fp32 by the C kernels, or None where they cannot read the layer. The kernels' structure is
    kept on the layer, made again when its weight tensor (a state dict loaded by assignment) or the instruction set
    (FOURWALLS_ISA) changes."""
    isa = selected_isa()
    cached = getattr(layer, "_native_product", None)
    if cached is None or cached[0] is not layer.weight or cached[1] != isa:
        product, lin = None, as_native(layer)
        if isa is not None and native(isa) is not None and lin is not None:
            try:
                product = LinearProduct(lin, isa)
            except _Unsupported:
                pass
        cached = layer._native_product = (layer.weight, isa, product)
    return None if cached[2] is None else cached[2](x)
