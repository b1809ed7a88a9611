"""Write GGUF files (llama.cpp's format) through the `gguf` package: the inverse of formats/gguf.py.

What llama.cpp's own converter (convert_hf_to_gguf.py) writes for Llama and Qwen2: Q/K rows permuted to its RoPE
layout (Llama only), Llama-3 RoPE scaling as a `rope_freqs` tensor, norms and biases kept in F32, and a byte-level
BPE tokenizer ("gpt2") with the pre-tokenizer named as llama.cpp knows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from fourwalls.errors import UnsupportedError, UsageError
from fourwalls.formats.gguf import _LAYER_NAMES, _TOP_NAMES
from fourwalls.model.config import ModelConfig
from fourwalls.model.transformer import block_linears
from fourwalls.tokenizer import _GPT2_PRES, _LLAMA3_SPLIT, _QWEN2_SPLIT, _SPLITS, Tokenizer

_Q = gguf.GGMLQuantizationType
QTYPES = {"f32": _Q.F32, "f16": _Q.F16, "q8_0": _Q.Q8_0, "q4_0": _Q.Q4_0, "q4_1": _Q.Q4_1}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
               "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
_GGUF_NAMES = {v: k for k, v in _TOP_NAMES.items()} | {v: k for k, v in _LAYER_NAMES.items()}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = (int(t) for t in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL,
                                                                gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED))


def write_gguf(path: Path, cfg: ModelConfig, state: dict[str, Tensor], tokenizer: Tokenizer,
               qtype: str = "f32", blocks: dict[str, np.ndarray] | None = None) -> None:
    """Write a model as one GGUF file that llama.cpp (and Ollama) loads, atomically (temp file, fsync, rename).

    ``qtype``: f32; f16, q8_0, q4_0 or q4_1 for the 2-D weight matrices (norms, biases and RoPE factors stay
    F32; 4-bit files keep the embedding table in q8_0). fourwalls' int4 (asymmetric, groups of 32) maps onto
    q4_1 almost exactly; q4_0 is symmetric and re-rounds every weight. ``blocks``: weights already in the
    target type's blocks (``block_tensors``), written as they are.
    """
    if qtype not in QTYPES:
        raise UsageError(f"unknown GGUF type '{qtype}'; choose {', '.join(QTYPES)}")
    if cfg.rope_scaling is not None and cfg.arch != "llama":
        raise UnsupportedError(f"llama.cpp applies Llama-3 RoPE scaling to llama models only, not {cfg.arch}")
    vocab = gguf_vocab(cfg, tokenizer)  # checks the tokenizer before a byte is written
    tensors = gguf_tensors(cfg, state, qtype, blocks)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # not mkstemp: keep the umask's permissions
    w = _Writer(tmp, cfg.arch)  # opens the file at write_header_to_file
    try:
        _add_model_metadata(w, cfg, qtype)
        _add_vocab(w, vocab)
        for name, (data, raw_type) in tensors.items():
            if raw_type in (_Q.F32, _Q.F16):
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):  # closing flushes, which fails again on a full disk
            w.close()
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty string array.

    llama.cpp refuses a "gpt2" vocabulary without `tokenizer.ggml.merges`, even one with no merges (a byte-level
    tokenizer), but GGUFWriter skips or refuses empty arrays.
    """

    def add_string_array(self, key: str, values: list[str]) -> None:
        self.add_key_value(key, values, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


# --- model ------------------------------------------------------------------------------------


def _add_model_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, qtype: str) -> None:
    w.add_type("model")
    w.add_name(cfg.name)
    w.add_file_type(_FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)  # float32, as llama.cpp requires
    if cfg.rope_scaling is not None:
        # The rope_freqs tensor carries the scaling; the reader needs the original context to recover the
        # parameters. llama.cpp reads this key for YaRN only, and writing no rope.scaling.factor keeps it so.
        w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position_embeddings)


def gguf_tensors(cfg: ModelConfig, state: dict[str, Tensor], qtype: str,
                 blocks: dict[str, np.ndarray] | None = None) -> dict[str, tuple[np.ndarray, Any]]:
    """GGUF tensor name -> (data, GGML type), in llama.cpp's layout and order (rope_freqs first, as it writes);
    ``blocks``: state dict key -> rows already encoded in the type the tensor gets."""
    out: dict[str, tuple[np.ndarray, Any]] = {}
    if cfg.rope_scaling is not None:
        out["rope_freqs.weight"] = (rope_freqs(cfg), _Q.F32)
    for key in sorted(state, key=_order):
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = _gguf_name(key)
        raw = (blocks or {}).get(key)
        w = torch.from_numpy(raw) if raw is not None else state[key].detach().to(device="cpu", dtype=torch.float32)
        if cfg.arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            w = _permute(w, cfg.n_heads if ".q_proj." in key else cfg.n_kv_heads)
        tensor_qtype = _tensor_qtype(key, qtype)
        out[name] = ((np.ascontiguousarray(w.numpy()), QTYPES[tensor_qtype]) if raw is not None
                     else _encode(np.ascontiguousarray(w.numpy()), tensor_qtype))
    return out


def _tensor_qtype(key: str, qtype: str) -> str:
    # As llama.cpp's Q4_0 files do, the embedding table (and the head, tied to it here) keeps more bits: 8.
    return "q8_0" if qtype.startswith("q4") and key in ("embed_tokens.weight", "lm_head.weight") else qtype


def block_tensors(model: nn.Module, qtype: str) -> dict[str, np.ndarray]:
    """The weights of the block layers (GGUF's own, kept as loaded) that the GGUF type they are written in holds
    exactly, encoded: state dict key -> raw rows. Q4_1 takes 4-bit layers with fp16 scales and offsets, Q4_0
    those whose offsets are -8 scales, Q8_0 8-bit layers without offsets; writing these gives back the file's bytes."""
    from fourwalls.model.quant import BlockLinear

    layers = [(name, layer) for name, _, _, layer in block_linears(model, BlockLinear)]
    layers += [(name, getattr(model, name)) for name in ("embed_tokens", "lm_head")
               if isinstance(getattr(model, name), BlockLinear)]
    out = {}
    for name, layer in layers:
        raw = _exact_blocks(layer, _tensor_qtype(f"{name}.weight", qtype))
        if raw is not None:
            out[f"{name}.weight"] = raw
    return out


def _exact_blocks(layer: Any, qtype: str) -> np.ndarray | None:
    """A block layer's rows in ``qtype``'s blocks when they hold it exactly, else None."""
    if layer.group != 32 or qtype not in ("q4_0", "q4_1", "q8_0"):
        return None
    d = layer.scales.detach().float()
    m = layer.offsets.detach().float() if layer.offsets is not None else None
    if not torch.equal(d.half().float(), d) or (m is not None and not torch.equal(m.half().float(), m)):
        return None
    rows, blocks = d.shape
    d16 = d.half().numpy().view(np.uint8).reshape(rows, blocks, 2)
    if qtype == "q8_0":
        if layer.bits != 8 or m is not None:
            return None
        q = layer.codes().numpy().view(np.uint8).reshape(rows, blocks, 32)
        return np.concatenate((d16, q), axis=-1).reshape(rows, -1)
    if layer.bits != 4 or m is None or (qtype == "q4_0" and not torch.equal(m, d * -8)):
        return None
    q = layer.codes().numpy().reshape(rows, blocks, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)  # element j in the low nibble of byte j, j + 16 in the high
    parts = (d16, qs) if qtype == "q4_0" else (d16, m.half().numpy().view(np.uint8).reshape(rows, blocks, 2), qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _order(key: str) -> tuple[int, int, str]:
    # token_embd, then the blocks in numeric order, then output and output_norm
    if key.startswith("layers."):
        return (1, int(key.split(".")[1]), key)
    return (0 if key.startswith("embed_tokens") else 2, 0, key)


def _gguf_name(key: str) -> str:
    if key in _GGUF_NAMES:
        return _GGUF_NAMES[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _GGUF_NAMES:
        return f"blk.{parts[1]}.{_GGUF_NAMES[parts[2]]}"
    raise UnsupportedError(f"tensor '{key}' has no GGUF name (LoRA or quantized layers must be merged first)")


def _encode(data: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    if data.ndim != 2 or qtype == "f32":  # norms and biases stay F32, as in llama.cpp
        return data, _Q.F32
    if qtype == "f16":
        return data.astype(np.float16), _Q.F16
    try:
        return gguf.quants.quantize(data, QTYPES[qtype]), QTYPES[qtype]
    except gguf.QuantError:  # a row length that is not a multiple of 32: llama.cpp's converter falls back to F16
        return data.astype(np.float16), _Q.F16


def _permute(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's Q/K row order (interleaved RoPE pairs) from HF's half-split order: the inverse of `_unpermute`."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """Llama-3 RoPE scaling as llama.cpp stores it: one divisor per frequency (plain / scaled inverse frequency)."""
    from fourwalls.model.transformer import rope_freq_divisors

    return rope_freq_divisors(cfg).numpy().astype(np.float32)


# --- tokenizer --------------------------------------------------------------------------------


def gguf_vocab(cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer.*` metadata for a byte-level BPE tokenizer, or UnsupportedError for any other kind."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise UnsupportedError(f"GGUF export supports byte-level BPE tokenizers only, not this {model.get('type')} "
                               "tokenizer; export --format hf instead")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedError("GGUF export needs a byte-level tokenizer (its decoder is not ByteLevel); "
                               "export --format hf instead")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":  # NFC (Qwen2): llama.cpp skips it too
        raise UnsupportedError(f"llama.cpp cannot reproduce the tokenizer's {normalizer.get('type')} normalizer; "
                               "export --format hf instead")
    pre = pre_tokenizer_name(tokenizer)

    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= cfg.vocab_size:
        raise UnsupportedError(f"the tokenizer has token id {max(by_id)} but the model's vocabulary has only "
                               f"{cfg.vocab_size} rows")
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(cfg.vocab_size):  # embedding rows without a token get llama.cpp's unused placeholders
        if i in by_id:
            tokens.append(by_id[i])
            types.append((_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
    if len(set(tokens)) != len(tokens):
        raise UnsupportedError("the tokenizer's vocabulary collides with GGUF's [PADn] placeholder tokens")
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or not all(pair):
            raise UnsupportedError(f"the BPE merge {m!r} cannot be written to GGUF (a token holds a space)")
        merges.append(" ".join(pair))

    prefix, suffix = _added_around(tokenizer)
    bos = prefix[0] if prefix else cfg.bos_token_id if cfg.bos_token_id is not None \
        else tokenizer.token_id(tokenizer.bos_token)
    eos = list(cfg.eos_token_ids) or ([tokenizer.token_id(tokenizer.eos_token)] if tokenizer.eos_token else [])
    unk = model.get("unk_token")
    pad = tokenizer.extra_config.get("pad_token")
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos": bos, "eos": eos, "unk": tokenizer.token_id(unk), "pad": tokenizer.token_id(pad),
        "add_bos": bool(prefix), "add_eos": bool(suffix), "chat_template": tokenizer.chat_template,
    }


def _added_around(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (BOS, EOS), found by encoding one."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            if len(prefix) <= 1 and len(suffix) <= 1:
                return prefix, suffix
            break
    raise UnsupportedError(f"the tokenizer wraps text as {full} (plain {plain}), more than the one BOS and one "
                           "EOS token GGUF can express; export --format hf instead")


# llama.cpp's pre-tokenizer names, by what fourwalls' reader rebuilds from each (formats/gguf.py, tokenizer.py).
def _family(pre: str) -> str | None:
    if pre in _SPLITS:
        return "split:" + _SPLITS[pre]
    if pre == "smollm":
        return "digits+bytelevel"
    return "bytelevel" if pre in _GPT2_PRES else None


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """`tokenizer.ggml.pre`: the name recorded when the tokenizer came from a GGUF file if it still fits, else the
    one that matches its pre-tokenizer ("smollm", "llama-bpe", "qwen2" or "gpt-2")."""
    inferred = _infer_pre(json.loads(tokenizer.backend.to_str()).get("pre_tokenizer"))
    if inferred is None:
        raise UnsupportedError("the tokenizer's pre-tokenizer matches none llama.cpp knows (GPT-2, SmolLM, Llama-3 "
                               "or Qwen2 byte-level splitting); export --format hf instead")
    recorded = tokenizer.extra_config.get("gguf_pre")
    return recorded if isinstance(recorded, str) and _family(recorded) == _family(inferred) else inferred


def _byte_level(p: dict[str, Any], use_regex: bool) -> bool:
    return p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False) \
        and bool(p.get("use_regex", True)) == use_regex


def _infer_pre(pre: dict[str, Any] | None) -> str | None:
    if pre is None:
        return None
    if _byte_level(pre, use_regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and _byte_level(second, use_regex=True):
        return "smollm"
    if first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert") \
            and _byte_level(second, use_regex=False):
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get((first.get("pattern") or {}).get("Regex"))
    return None


def _add_vocab(w: _Writer, v: dict[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_string_array(gguf.Keys.Tokenizer.MERGES, v["merges"])
    if v["bos"] is not None:
        w.add_bos_token_id(v["bos"])
    eos = v["eos"]
    if eos:
        w.add_eos_token_id(eos[0])
    if len(eos) > 1:  # fourwalls reads eos + eot back as the model's stop tokens; llama.cpp stops on all three
        w.add_eot_token_id(eos[1])
    if len(eos) > 2:
        w.add_eom_token_id(eos[2])
    if v["unk"] is not None:
        w.add_unk_token_id(v["unk"])
    if v["pad"] is not None:
        w.add_pad_token_id(v["pad"])
    w.add_add_bos_token(v["add_bos"])
    w.add_add_eos_token(v["add_eos"])
    if v["chat_template"]:
        w.add_chat_template(v["chat_template"])
