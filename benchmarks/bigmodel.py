"""The benchmarks' bigger model: Llama-3.2-1B-shaped, random weights, written by fourwalls as a Q4_0 GGUF.

Speed only (its text is noise): Llama 3.2 1B's blocks (16 layers of width 2048, 32 query and 8 KV heads, MLP 8192,
Llama-3 RoPE scaling, tied embeddings) with the bundled SmolLM2's tokenizer, so 49,152 vocabulary rows instead of
128,256. Made once (about 3 GB of memory for a minute or two) and kept in ~/.cache/fourwalls/bench; both fourwalls
and llama.cpp load the same file.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch

from fourwalls.formats.gguf_write import write_gguf
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer
from fourwalls.store import DEFAULT_MODEL, Store


def llama_1b_gguf() -> Path:
    """The file, made on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fourwalls" / "bench"
    path = cache / "llama-3.2-1b-shaped-random-q4_0.gguf"
    if path.is_file():
        return path
    print(f"writing {path} (once)", file=sys.stderr)
    smol = Store().load(DEFAULT_MODEL)
    tokenizer, sc = smol.tokenizer, smol.config
    del smol
    gc.collect()
    cfg = preset("llama-3.2-1b").replace(name="llama-3.2-1b-shaped-random", vocab_size=sc.vocab_size,
                                         bos_token_id=sc.bos_token_id, eos_token_ids=sc.eos_token_ids,
                                         context_length=8192)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items() if k != "lm_head.weight"}  # tied
    gen = torch.Generator().manual_seed(0)
    # bf16 halves what is held while writing; the writer takes one tensor at a time to fp32 and quantizes it.
    state = {k: torch.ones(s, dtype=torch.bfloat16) if "norm" in k else
             (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    cache.mkdir(parents=True, exist_ok=True)
    write_gguf(path, cfg, state, tokenizer, "q4_0")
    return path


if __name__ == "__main__":
    print(llama_1b_gguf())
