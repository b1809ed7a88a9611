"""Read GGUF files (llama.cpp's format) through the `gguf` package: config, tokenizer, dequantized weights."""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from fourwalls.errors import FormatError, FourwallsError, NotFoundError, UnsupportedError
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
    check_layout(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, IndexError ... on bad bytes
        raise FormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                          "the file may be truncated or corrupt") from None


# GGUF metadata value types (GGUFValueType): the byte size of each scalar type, and the two compound ones.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_layout(path: Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], int]]]:
    """Walk the GGUF header, metadata and tensor infos, checking every count and length against the file size.

    The `gguf` parser trusts them: a corrupt array length makes it loop, allocating, without end. Returns what the
    walk read: the metadata, with each array as a list of as many Nones as it has items (a vocabulary's words are
    skipped, not decoded), and each tensor's dimensions and GGML type.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise FormatError(f"{path} is truncated: {size} bytes is too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk_layout(path, buf, size)
    except OSError as e:
        raise FormatError(f"cannot read {path} ({e.strerror})") from None


def describe_gguf(path: Path, name: str) -> tuple[ModelConfig, list[str]]:
    """A GGUF file's config and the names of its tensor types, from its header alone (`models list` reads every
    file it lists: parsing whole vocabularies took seconds). Llama-3 RoPE scaling is left out: it needs a tensor."""
    meta, tensors = check_layout(path)
    cfg = config_from_metadata(meta, {k: v for k, v in tensors.items() if k != "rope_freqs.weight"}, name)
    types = sorted({_type_name(t) for _, t in tensors.values()})
    return cfg, types


def _type_name(t: int) -> str:
    try:
        return gguf.GGMLQuantizationType(t).name
    except ValueError:
        return f"type{t}"


def _walk_layout(path: Path, buf: mmap.mmap, size: int) -> tuple[dict[str, Any], dict[str, tuple[list[int], int]]]:
    pos = 0
    order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # the gguf reader's byte-order test

    def take(n: int, what: str) -> int:
        nonlocal pos
        if n > size - pos:
            raise FormatError(f"{path} is truncated or corrupt: {what} at byte {pos} needs {n} bytes, "
                              f"but the file ends at byte {size}")
        pos += n
        return pos - n

    def u32(what: str) -> int:
        return struct.unpack_from(order + "I", buf, take(4, what))[0]

    def u64(what: str) -> int:
        return struct.unpack_from(order + "Q", buf, take(8, what))[0]

    def value(vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_SIZES:
            return struct.unpack_from(order + _SCALAR_FORMATS[vtype], buf, take(_SCALAR_SIZES[vtype], what))[0]
        if vtype == _STRING:
            start = take(u64(f"the length of {what}"), what)
            return bytes(buf[start:pos]).decode("utf-8", "replace") if depth == 0 else None  # words: skipped
        if vtype == _ARRAY:
            if depth >= 4:
                raise FormatError(f"{path} is corrupt: {what} nests arrays more than 4 deep")
            itype, n = u32(f"the item type of {what}"), u64(f"the length of {what}")
            if itype in _SCALAR_SIZES:
                take(n * _SCALAR_SIZES[itype], f"{what} ({n} items)")
                return [None] * n
            if n * 8 > size - pos:  # every string or array item takes at least 8 bytes
                raise FormatError(f"{path} is truncated or corrupt: {what} claims {n} items, more than the "
                                  "rest of the file holds")
            for _ in range(n):
                value(itype, what, depth + 1)
            return [None] * n
        raise FormatError(f"{path} is corrupt: {what} has unknown value type {vtype}")

    take(8, "the magic and version")
    n_tensors, n_kv = u64("the tensor count"), u64("the metadata count")
    if n_kv * 12 + n_tensors * 24 > size - pos:  # the smallest possible key/value and tensor info
        raise FormatError(f"{path} is truncated or corrupt: it claims {n_kv} metadata entries and {n_tensors} "
                          f"tensors, more than its {size} bytes can hold")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        start = pos
        take(u64(f"the length of metadata key #{i}"), f"metadata key #{i}")
        key = bytes(buf[start + 8:pos]).decode("utf-8", "replace")
        meta[key] = value(u32(f"the type of metadata '{key}'"), f"metadata '{key}'")
    tensors: dict[str, tuple[list[int], int]] = {}
    for i in range(n_tensors):
        n = u64(f"the length of tensor name #{i}")
        name = bytes(buf[take(n, f"tensor name #{i}"):pos]).decode("utf-8", "replace")
        n_dims = u32(f"the dimension count of tensor #{i}")
        at = take(n_dims * 8, f"the dimensions of tensor #{i}")  # checked before a format of n_dims items is built
        dims = list(struct.unpack_from(f"{order}{n_dims}Q", buf, at))
        ttype = struct.unpack_from(order + "I", buf, take(12, f"the type and offset of tensor #{i}"))[0]
        tensors[name] = (dims, ttype)
    return meta, tensors


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

    def positive(key: str, value: Any) -> int:
        if value is None:
            raise FormatError(f"GGUF file lacks '{arch_name}.{key}'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FormatError(f"GGUF metadata '{arch_name}.{key}' must be a positive integer, not {value!r}")
        return value

    def count(key: str, default: Any = None) -> int:
        return positive(key, get(key, default))

    n_heads = count("attention.head_count")
    dim = count("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eom = meta.get("tokenizer.ggml.eom_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot, eom) if i is not None))
    cfg = ModelConfig(
        name=name,
        arch=_ARCHS[arch_name],
        vocab_size=positive("vocab_size", meta.get(f"{arch_name}.vocab_size")
                            or (len(tokens) if isinstance(tokens, list) else None)),
        dim=dim,
        n_layers=count("block_count"),
        n_heads=n_heads,
        n_kv_heads=count("attention.head_count_kv", n_heads),
        head_dim=positive("attention.key_length", meta.get(f"{arch_name}.attention.key_length") or dim // n_heads),
        hidden_dim=count("feed_forward_length"),
        norm_eps=float(f'{get("attention.layer_norm_rms_epsilon", 1e-5):.7g}'),  # stored as f32: 1e-5 not 9.99e-6
        rope_theta=float(get("rope.freq_base", 10000.0)),
        context_length=count("context_length"),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )
    if "rope_freqs.weight" in tensors:
        orig = meta.get(f"{arch_name}.rope.scaling.original_context_length", 8192)
        cfg = cfg.replace(rope_scaling=_llama3_scaling(cfg, _dequantize(tensors["rope_freqs.weight"]), int(orig)))
    return cfg


def _llama3_scaling(cfg: ModelConfig, factors: np.ndarray, original_context: int = 8192) -> RopeScaling:
    """llama.cpp stores Llama-3 RoPE scaling as per-frequency divisors; recover the parameters that made them."""
    from fourwalls.model.transformer import rope_freq_divisors

    scaling = RopeScaling(factor=float(f"{factors.max():.7g}"), original_max_position_embeddings=original_context)
    expected = rope_freq_divisors(cfg.replace(rope_scaling=scaling))
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
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except FourwallsError:
        raise
    except KeyError as e:
        raise FormatError(f"{path} lacks the tokenizer metadata {e}") from None
    except Exception as e:  # values of the wrong type, merges of tokens not in the vocabulary ...
        raise FormatError(f"{path} has malformed tokenizer metadata ({type(e).__name__}: {e})") from None
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
        state[key] = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32, order="C"))
    _check_shapes(path, cfg, state, tensors)
    if cfg.arch == "llama":
        for key, w in state.items():
            if ".q_proj." in key or ".k_proj." in key:
                state[key] = _unpermute(w, cfg.n_heads if ".q_proj." in key else cfg.n_kv_heads)
    return cfg, state, tokenizer


def _check_shapes(path: Path, cfg: ModelConfig, state: dict[str, Tensor], tensors: dict[str, Any]) -> None:
    """Refuse tensors that do not fit the metadata (a corrupt size would otherwise fail later, inside torch)."""
    from fourwalls.formats.hf import check_state_dict

    layers = {int(m.group(1)) for m in map(_BLOCK.fullmatch, tensors) if m}  # all < n_layers, checked above
    if len(layers) != cfg.n_layers:
        raise FormatError(f"{path} says the model has {cfg.n_layers} layers but holds tensors for {len(layers)}")
    try:
        check_state_dict(cfg, state)
    except RuntimeError as e:  # torch refuses even a meta tensor of an absurd size
        raise FormatError(f"{path} has impossible model sizes in its metadata ({e})") from None
