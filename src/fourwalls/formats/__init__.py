"""How a model is stored on disk: GGUF files and Hugging Face (fourwalls-native) folders."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from fourwalls.errors import FormatError, NotFoundError
from fourwalls.model.config import ModelConfig
from fourwalls.tokenizer import Tokenizer


def read_checkpoint(path: Path, name: str | None = None, quantized: bool = True,
                    ) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """Read a GGUF file or an HF folder into (config, state dict, tokenizer); ``quantized=False`` dequantizes the
    matrices a GGUF file holds quantized to fp32 (an HF folder is read as stored)."""
    from fourwalls.formats.gguf import read_gguf
    from fourwalls.formats.hf import read_hf

    if path.is_dir():
        return read_hf(path, name)
    if not path.exists():
        raise NotFoundError(f"no such file or folder: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FormatError(f"cannot read {path} ({e.strerror})") from None
    if magic == b"GGUF":
        return read_gguf(path, name, quantized)
    raise FormatError(f"{path} is neither a GGUF file nor a Hugging Face folder (config.json + *.safetensors)")
