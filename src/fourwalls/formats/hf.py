"""Hugging Face checkpoint folders: config.json + (sharded) safetensors + tokenizer files.

This is also fourwalls' native format, so whatever fourwalls writes opens in HF transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from fourwalls.errors import FormatError, NotFoundError, UnsupportedError
from fourwalls.model.config import ModelConfig
from fourwalls.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    index = folder / f"{WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FormatError(f"{folder} has no *.safetensors weights (fourwalls loads no pickled .bin files)")
    return found


def read_state_dict(files: list[Path]) -> dict[str, Tensor]:
    """Tensors from safetensors files, with HF's ``model.`` prefix removed."""
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    state[key.removeprefix("model.")] = sf.get_tensor(key)
        except FileNotFoundError:
            raise NotFoundError(f"weights file {f} is missing") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{f} is not a valid safetensors file ({e}); it may be truncated") from None
    return state


def read_hf(folder: Path, name: str | None = None) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """Load a Hugging Face Llama/Mistral/Qwen2 folder."""
    if not folder.is_dir():
        raise NotFoundError(f"no such folder: {folder}")
    cfg = ModelConfig.from_hf(_read_json(folder / "config.json"), name=name or folder.name)
    _check_token_ids(cfg.eos_token_ids, cfg.vocab_size, folder / "config.json")
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = _read_json(gen).get("eos_token_id")
        if eos is not None:
            cfg = cfg.replace(eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
            _check_token_ids(cfg.eos_token_ids, cfg.vocab_size, gen, eos)
    state = read_state_dict(weight_files(folder))
    check_state_dict(cfg, state)
    return cfg, state, Tokenizer.from_dir(folder)


def _check_token_ids(ids: tuple, vocab_size: int, path: Path, value: Any = None) -> None:
    """Refuse an eos_token_id that is no token: generation would never stop."""
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        shown = value if value is not None else (list(ids) if len(ids) != 1 else ids[0])
        raise FormatError(f"{path}: eos_token_id must be a token id below {vocab_size}, or a list of them, not "
                          f"{shown!r}")


def check_state_dict(cfg: ModelConfig, state: dict[str, Tensor]) -> None:
    """Refuse weights whose names or shapes do not fit the config, naming the first mismatch."""
    from fourwalls.model.quant import skeleton

    expected = {k: v.shape for k, v in skeleton(cfg).state_dict().items()}
    if cfg.tie_embeddings:  # the head is the embedding table
        for table in (expected, state):
            for key in [k for k in table if k.startswith("lm_head.")]:
                del table[key]
    for key, shape in expected.items():
        if key not in state:
            raise FormatError(f"checkpoint lacks tensor '{key}'")
        if tuple(state[key].shape) != tuple(shape):
            raise FormatError(f"tensor '{key}' has shape {tuple(state[key].shape)}, config implies {tuple(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UnsupportedError(f"checkpoint has tensors this architecture lacks, e.g. '{extra[0]}'")


def write_hf(folder: Path, cfg: ModelConfig, state: dict[str, Tensor], tokenizer: Tokenizer,
             metadata: dict[str, str] | None = None) -> None:
    """Write an HF-compatible folder (the caller picks the folder; the store makes it atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {(k if k.startswith("lm_head.") else f"model.{k}"): v.contiguous()
               for k, v in state.items() if not (cfg.tie_embeddings and k.startswith("lm_head."))}
    dtype = next(v.dtype for v in tensors.values() if v.is_floating_point())  # quantized weights are int8/uint8
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save(folder)
