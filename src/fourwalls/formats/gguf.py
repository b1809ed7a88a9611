"""Read GGUF files (llama.cpp's format) through the `gguf` package: config, tokenizer, and the weights as the file
holds them: Q4_0, Q4_1, Q8_0 and the K-quants Q4_K, Q5_K and Q6_K repacked, exactly, into the C kernels' layouts
(model/quant.py's BlockLinear), other quantized types requantized to int8 blocks with the loss logged, float tensors
in fp32."""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
from collections import Counter
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
_Q = gguf.GGMLQuantizationType
_FLOAT = (_Q.F32, _Q.F16, _Q.BF16)
log = logging.getLogger(__name__)


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


def _dequantize(t: Any, data: np.ndarray | None = None) -> np.ndarray:
    """A tensor in fp32, in its shape; ``data``: its bytes already read (default: through the reader's map)."""
    qtype = _qtype(t)
    if data is None:
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


def read_gguf(path: Path, name: str | None = None, quantized: bool = True,
              ) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """Load a GGUF model: its config, its weights under fourwalls' parameter names, and its tokenizer.

    ``quantized``: quantized matrices stay in blocks (``BlockLinear``'s tensors; the config's quantization names each
    layer's layout); False: every weight dequantized to fp32, as training wants them.
    """
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
    layers: dict[str, str] = {}  # module -> BlockLinear layout
    types: Counter[str] = Counter()
    requantized: dict[str, list[float]] = {}  # GGUF type -> each tensor's relative error in int8
    with path.open("rb") as f:  # read, not the reader's memory map: its pages would stay resident with the copies
        for gname, t in tensors.items():
            if gname == "rope_freqs.weight":
                continue
            key = _parameter_name(gname, cfg)
            qtype = _qtype(t)
            raw = _read(f, path, t)
            if not quantized or qtype in _FLOAT or len(t.shape) != 2 or not key.endswith(".weight"):
                state[key] = torch.from_numpy(_dequantize(t, raw))
                continue
            module = key.removesuffix(".weight")
            rows, cols = (int(d) for d in reversed(t.shape))
            blocks = _blocks(qtype, raw, rows, cols)
            if blocks is None:  # no exact layout in the kernels: int8 in blocks of 32, the loss recorded
                w = _dequantize(t, raw)
                blocks, error = _requantize(w)
                requantized.setdefault(qtype.name, []).append(error)
            spec, arrays = blocks
            arrays |= _fp16_if_exact({k: v for k, v in arrays.items() if k in ("scales", "offsets")})
            for suffix, a in arrays.items():
                state[f"{module}.{suffix}"] = torch.from_numpy(np.ascontiguousarray(a))
            layers[module] = spec
            types[qtype.name] += 1
    if layers:
        quant: dict[str, Any] = {"scheme": "gguf", "layers": layers, "gguf_types": dict(types)}
        if requantized:
            quant["requantized"] = {k: f"int8 in blocks of 32, up to {max(v):.2%} relative RMS error a tensor"
                                    for k, v in requantized.items()}
            log.warning("%s: %s have no exact layout in fourwalls' kernels: %s", path.name,
                        ", ".join(f"{len(v)} {k} tensors" for k, v in requantized.items()),
                        "; ".join(f"{k} requantized to {v}" for k, v in quant["requantized"].items()))
        cfg = cfg.replace(quantization=quant)
    _check_shapes(path, cfg, state, tensors)
    if cfg.arch == "llama":  # rows of every tensor of the layer, codes and scales alike
        for key, w in state.items():
            if ".q_proj." in key or ".k_proj." in key:
                state[key] = _unpermute(w, cfg.n_heads if ".q_proj." in key else cfg.n_kv_heads)
    return cfg, state, tokenizer


def _parameter_name(gname: str, cfg: ModelConfig) -> str:
    if gname in _TOP_NAMES:
        return _TOP_NAMES[gname]
    m = _BLOCK.fullmatch(gname)
    if not m or m.group(2) not in _LAYER_NAMES or int(m.group(1)) >= cfg.n_layers:
        raise UnsupportedError(f"GGUF tensor '{gname}' is not part of a {cfg.arch} model")
    return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def _qtype(t: Any) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType(t.tensor_type)
    except ValueError:
        raise UnsupportedError(f"tensor '{t.name}' has unknown GGML type {t.tensor_type}") from None


def _read(f: Any, path: Path, t: Any) -> np.ndarray:
    """A tensor's data, in the reader's dtype and shape, read from the file into memory of its own."""
    f.seek(int(t.data_offset))
    data = np.fromfile(f, dtype=t.data.dtype, count=t.data.size)
    if data.size != t.data.size:
        raise FormatError(f"{path} is truncated: tensor '{t.name}' ends past the end of the file")
    return data.reshape(t.data.shape)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _pack4(q: np.ndarray) -> np.ndarray:
    """4-bit codes [rows, cols] two a byte, element 2i in the high nibble of byte i (the kernels' int4 order)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def _blocks(qtype: gguf.GGMLQuantizationType, raw: np.ndarray, rows: int, cols: int,
            ) -> tuple[str, dict[str, np.ndarray]] | None:
    """A quantized matrix as BlockLinear's layout and tensors (weight, scales, offsets), every weight exactly what
    the gguf package dequantizes it to; None for the types without an exact layout."""
    shift4 = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    if qtype in (_Q.Q4_0, _Q.Q4_1):  # d (f16)[, m (f16)], 16 bytes: element j low nibble, j + 16 high
        b = raw.reshape(-1, 18 if qtype == _Q.Q4_0 else 20)
        d = _f16(b[:, 0:2])
        offset = d * np.float32(-8) if qtype == _Q.Q4_0 else _f16(b[:, 2:4])
        qs = b[:, -16:]
        q = np.concatenate((qs & 0x0F, qs >> 4), axis=1)
        return "int4:32:offset", {"weight": _pack4(q.reshape(rows, cols)), "scales": d.reshape(rows, -1),
                                  "offsets": offset.reshape(rows, -1)}
    if qtype == _Q.Q8_0:  # d (f16), 32 int8
        b = raw.reshape(-1, 34)
        return "int8:32", {"weight": b[:, 2:].view(np.int8).reshape(rows, cols),
                           "scales": _f16(b[:, 0:2]).reshape(rows, -1)}
    if qtype in (_Q.Q4_K, _Q.Q5_K):  # d, dmin (f16), 8 six-bit scales and mins, [32 bytes of fifth bits], 128 bytes
        b = raw.reshape(-1, 144 if qtype == _Q.Q4_K else 176)
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
        scale = _f16(b[:, 0:2]) * sc.astype(np.float32)
        offset = -(_f16(b[:, 2:4]) * mn.astype(np.float32))
        q = (b[:, -128:].reshape(-1, 4, 1, 32) >> shift4) & 0x0F  # 64 elements a 32 bytes: low nibbles, then high
        if qtype == _Q.Q4_K:
            return "int4:32:offset", {"weight": _pack4(q.reshape(rows, cols)), "scales": scale.reshape(rows, -1),
                                      "offsets": offset.reshape(rows, -1)}
        high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = (q.reshape(-1, 8, 32) | (high << 4)).astype(np.int8)
        return "int8:32:offset", {"weight": q.reshape(rows, cols), "scales": scale.reshape(rows, -1),
                                  "offsets": offset.reshape(rows, -1)}
    if qtype == _Q.Q6_K:  # 128 bytes of low 4 bits, 64 of high 2, 16 int8 scales (groups of 16), d (f16)
        b = raw.reshape(-1, 210)
        scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
        low = ((b[:, :128].reshape(-1, 2, 1, 64) >> shift4) & 0x0F).reshape(-1, 8, 32)
        high = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1))
                & 3).reshape(-1, 8, 32)
        q = (low | (high << 4)).astype(np.int8) - np.int8(32)
        return "int8:16", {"weight": q.reshape(rows, cols), "scales": scale.reshape(rows, -1)}
    return None


def _fp16_if_exact(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scales and offsets in fp16 when every one is an fp16 value (Q4_0, Q4_1 and Q8_0's are): a quarter less to
    read for each weight, the same numbers. The K-quants' products of two scales stay in fp32."""
    halves = {k: v.astype(np.float16) for k, v in arrays.items()}
    exact = all(np.array_equal(h.astype(np.float32), v) for h, v in zip(halves.values(), arrays.values()))
    return halves if exact else arrays


def _requantize(w: np.ndarray) -> tuple[tuple[str, dict[str, np.ndarray]], float]:
    """fp32 weights [rows, cols] to int8 with a scale per block of 32 (absmax / 127), as Q8_0; and the relative RMS
    error this makes."""
    rows, cols = w.shape
    g = w.reshape(rows, -1, 32)
    d = np.abs(g).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.round(np.divide(g, d, out=np.zeros_like(g), where=d > 0)).astype(np.int8)
    error = float(np.linalg.norm(q * d - g) / max(float(np.linalg.norm(g)), 1e-30))
    return ("int8:32", {"weight": q.reshape(rows, cols), "scales": d.reshape(rows, -1)}), error


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
