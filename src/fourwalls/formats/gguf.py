"""Read GGUF files (llama.cpp's format) through the `gguf` package: config, tokenizer, dequantized weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from fourwalls.errors import FormatError, NotFoundError, UnsupportedError
from fourwalls.model.config import ModelConfig, RopeScaling
from fourwalls.tokenizer import Tokenizer

_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# GGUF tensor name -> fourwalls (HF) parameter name, for the per-layer tensors.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open and parse a GGUF file, turning every parser failure into one clear error."""
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, IndexError ... on bad bytes
        raise FormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                          "the file may be truncated or corrupt") from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except Exception as e:
            raise FormatError(f"GGUF metadata field '{key}' is malformed ({e})") from None
    return meta


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], name: str) -> ModelConfig:
    arch_name = meta.get("general.architecture")
    if arch_name not in _ARCHS:
        raise UnsupportedError(f"GGUF architecture '{arch_name}' is not supported; fourwalls runs "
                               f"{', '.join(sorted(_ARCHS))}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if value is None:
            raise FormatError(f"GGUF file lacks '{arch_name}.{key}'")
        return value

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    cfg = ModelConfig(
        name=name,
        arch=_ARCHS[arch_name],
        vocab_size=int(meta.get(f"{arch_name}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(meta.get(f"{arch_name}.attention.key_length") or dim // n_heads),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        context_length=int(get("context_length")),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )
    if "rope_freqs.weight" in tensors:
        cfg = cfg.replace(rope_scaling=_llama3_scaling(cfg, _dequantize(tensors["rope_freqs.weight"])))
    return cfg


def _llama3_scaling(cfg: ModelConfig, factors: np.ndarray) -> RopeScaling:
    """llama.cpp stores Llama-3 RoPE scaling as per-frequency divisors; recover the parameters that made them."""
    from fourwalls.model.transformer import rope_inv_freq

    scaling = RopeScaling(factor=float(factors.max()))
    base = rope_inv_freq(cfg.replace(rope_scaling=None))
    expected = base / rope_inv_freq(cfg.replace(rope_scaling=scaling))
    if not np.allclose(expected.numpy(), factors, rtol=1e-3):
        raise UnsupportedError("this GGUF's rope_freqs tensor does not match Llama-3 RoPE scaling")
    return scaling


def _dequantize(t: Any) -> np.ndarray:
    try:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
    except ValueError:
        raise UnsupportedError(f"tensor '{t.name}' has unknown GGML type {t.tensor_type}") from None
    data = t.data.view(np.ndarray)  # a plain view: slicing np.memmap is slow in the dequantizers' loops
    if qtype == gguf.GGMLQuantizationType.F32:
        out = data.astype(np.float32)
    elif qtype == gguf.GGMLQuantizationType.F16:
        out = data.astype(np.float32)
    else:
        try:
            out = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise UnsupportedError(f"GGUF quantization type {qtype.name} (tensor '{t.name}') is not supported") \
                from None
    shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists dimensions fastest-first
    if out.size != int(np.prod(shape)):
        raise FormatError(f"tensor '{t.name}' holds {out.size} values, expected {shape}")
    return out.reshape(shape)


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's reordering of Q/K rows (interleaved RoPE pairs back to HF's half-split order)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path, name: str | None = None) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """Load a GGUF model: its config, fp32 weights under fourwalls' parameter names, and its tokenizer."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_metadata(meta, tensors, name or path.stem)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    state: dict[str, Tensor] = {}
    for gname, t in tensors.items():
        if gname == "rope_freqs.weight":
            continue
        if gname in _TOP_NAMES:
            key = _TOP_NAMES[gname]
        else:
            m = _BLOCK.fullmatch(gname)
            if not m or m.group(2) not in _LAYER_NAMES or int(m.group(1)) >= cfg.n_layers:
                raise UnsupportedError(f"GGUF tensor '{gname}' is not part of a {cfg.arch} model")
            key = f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        w = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32, order="C"))
        if cfg.arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            w = _unpermute(w, cfg.n_heads if ".q_proj." in key else cfg.n_kv_heads)
        state[key] = w
    return cfg, state, tokenizer
