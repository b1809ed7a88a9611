"""A tiny, valid GGUF file (random weights, byte-level BPE vocabulary) for tests, built with the `gguf` package."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# The tiny model's shape: what the tests expect read_checkpoint to report.
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN = 32, 8, 1, 2, 1, 16
HEAD_DIM = DIM // HEADS

# Byte-level BPE tokens (GPT-2's byte-to-unicode map: letters stand for themselves, 'Ġ' is a space) plus merges.
_MERGES = ["a b", "c d", "Ġ a", "ab cd"]
_TOKENS = ["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ"] + [m.replace(" ", "") for m in _MERGES]
assert len(_TOKENS) == VOCAB
_NORMAL, _CONTROL = 1, 3


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The llama.cpp-named tensors of the tiny model, in HF orientation (out_features, in_features)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    kv = KV_HEADS * HEAD_DIM
    return {
        "token_embd.weight": w(VOCAB, DIM),
        "blk.0.attn_norm.weight": np.ones(DIM, dtype=np.float32),
        "blk.0.attn_q.weight": w(DIM, DIM),
        "blk.0.attn_k.weight": w(kv, DIM),
        "blk.0.attn_v.weight": w(kv, DIM),
        "blk.0.attn_output.weight": w(DIM, DIM),
        "blk.0.ffn_norm.weight": np.ones(DIM, dtype=np.float32),
        "blk.0.ffn_gate.weight": w(FFN, DIM),
        "blk.0.ffn_up.weight": w(FFN, DIM),
        "blk.0.ffn_down.weight": w(DIM, FFN),
        "output_norm.weight": np.ones(DIM, dtype=np.float32),
    }


def llama_writer(path: Path, name: str, *, dim: int, layers: int, ffn: int, heads: int, kv_heads: int,
                 arch: str = "llama", context_length: int = 64) -> gguf.GGUFWriter:
    """A GGUFWriter with a llama model's metadata and this module's byte-level tokenizer (token 0 the control token
    that is BOS and EOS); the caller adds the tensors and writes the file."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_vocab_size(len(_TOKENS))
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_TOKENS)
    w.add_token_types([_CONTROL] + [_NORMAL] * (len(_TOKENS) - 1))
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    return w


def write_tiny_gguf(path: Path, *, arch: str = "llama", context_length: int = 64,
                    quantized: gguf.GGMLQuantizationType | None = None) -> Path:
    """Write the tiny model to ``path``.

    ``arch`` sets general.architecture (and the key prefix); ``quantized`` stores blk.0.ffn_down.weight (rows of
    16 values) with that GGML type instead of F32, filled with zero bytes.
    """
    w = llama_writer(path, "fourwalls-tiny-test", arch=arch, context_length=context_length, dim=DIM, layers=LAYERS,
                     ffn=FFN, heads=HEADS, kv_heads=KV_HEADS)
    w.add_add_bos_token(False)
    for name, t in tiny_tensors().items():
        if quantized is not None and name == "blk.0.ffn_down.weight":
            block, size = gguf.GGML_QUANT_SIZES[quantized]
            raw = np.zeros((t.shape[0], t.shape[1] * size // block), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quantized)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
