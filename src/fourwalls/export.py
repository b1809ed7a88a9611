"""Export a stored model (or an adapter, merged into its base) to GGUF or to an HF folder: run it anywhere."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from fourwalls.errors import UsageError
from fourwalls.files import writing
from fourwalls.formats.gguf_write import QTYPES, block_tensors, write_gguf
from fourwalls.formats.hf import write_hf
from fourwalls.store import Store


def export_model(name_or_path: str, fmt: str, out: Path, dtype: str = "f32", force: bool = False,
                 store: Store | None = None) -> Path:
    """Write ``name_or_path`` as ``fmt`` ("gguf" or "hf") at ``out``; nothing is left half-written."""
    if fmt not in ("gguf", "hf"):
        raise UsageError(f"unknown export format '{fmt}'; choose gguf or hf")
    if fmt == "gguf" and dtype not in QTYPES:
        raise UsageError(f"unknown GGUF type '{dtype}'; choose {', '.join(QTYPES)}")
    if fmt == "hf" and dtype != "f32":
        raise UsageError("--dtype applies to GGUF exports; HF folders keep the stored dtype")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    if fmt == "gguf" and out.is_dir():
        raise UsageError(f"{out} is a folder; a GGUF export is one file, so give a file name such as {out}/model.gguf")
    lm = (store or Store()).load(name_or_path, dtype=None)  # as stored; GGUF export converts each tensor as it goes
    from fourwalls.model.lora import LoRALinear, merge_lora

    if any(isinstance(m, LoRALinear) for m in lm.model.modules()):
        merge_lora(lm.model)  # llama.cpp and plain transformers load full weights
    blocks = None
    if lm.config.quantization:  # llama.cpp and transformers know their own block formats, not ours: re-encode
        from fourwalls.model.quant import dequantize_model

        if fmt == "gguf":  # but a GGUF file's own blocks, kept as loaded, go back as they came
            blocks = block_tensors(lm.model, dtype)
        dequantize_model(lm.model)
    state = lm.model.state_dict()
    size = sum(v.numel() * v.element_size() for v in state.values())  # GGUF types other than f32 need less
    with writing(out.parent, f"the export {out.name}", size):
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "gguf":
            write_gguf(out, lm.model.config, state, lm.tokenizer, dtype, blocks)
            return out
        tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")  # not mkdtemp: keep the umask's permissions
        tmp.mkdir()
        try:
            write_hf(tmp, lm.model.config, state, lm.tokenizer)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
