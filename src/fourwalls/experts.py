"""The expert library: which stored LoRA adapters a server routes ``"model": "auto"`` over, each with its routing
profile (engine/router.py routes with them).

An adapter's routing profile is what its training prompts look like to the embedder (rag/embed.py): up to
PROFILE_SAMPLE of them (each record's last user turn), embedded and summarized as at most PROFILE_CENTROIDS
spherical k-means centroids (unit vectors), so that an adapter trained on several kinds of prompt keeps one
direction per kind instead of their blurred mean. ``fourwalls finetune`` and ``align`` store it in the adapter's
manifest (``routing``); ``fourwalls experts add`` copies it into the library of the adapter's base model, or
computes one from a ``--data`` file for an adapter stored before profiles existed.

The library of a base model is ``$FOURWALLS_HOME/experts/<base>.json``, written atomically:
``{"base", "base_digest", "experts": {name: {"digest", "description", "profile"}}}``. A server reads it at start.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fourwalls.errors import FormatError, NotFoundError, UsageError
from fourwalls.files import atomic_write

PROFILE_SAMPLE = 256  # training prompts embedded per profile
PROFILE_CENTROIDS = 4
# Cosine similarity below which the base model answers a request for model "auto". all-MiniLM-L6-v2 puts prompts
# of an adapter's own task family at 0.45-0.9 of its nearest centroid and prompts of other families at 0.0-0.3
# (benchmarks/experts.py).
DEFAULT_THRESHOLD = 0.4


class Embeds(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


# --- profiles ---------------------------------------------------------------------------------------------------


def training_prompts(path: Path, limit: int = PROFILE_SAMPLE, seed: int = 0) -> list[str]:
    """The user turns of a training JSONL file (chat, instruct, preference or plain text records), a seeded
    sample of at most ``limit``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read the data file {path}: {e.strerror}") from None
    prompts = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # the trainer reports bad lines; a profile does with the good ones
        text = _user_turn(obj) if isinstance(obj, dict) else None
        if text:
            prompts.append(text)
    if not prompts:
        raise UsageError(f"{path} has no prompts to profile: expected JSONL records with 'messages', "
                         "'instruction', 'prompt' or 'text'")
    return random.Random(seed).sample(prompts, limit) if len(prompts) > limit else prompts


def _user_turn(obj: dict[str, Any]) -> str | None:
    messages = obj.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    if isinstance(obj.get("instruction"), str):
        return obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    for key in ("prompt", "text"):
        if isinstance(obj.get(key), str):
            return obj[key][:2000]  # a text record's start says what it is about; the embedder truncates anyway
    return None


def make_profile(prompts: list[str], embedder: Embeds, description: str | None = None,
                 centroids: int = PROFILE_CENTROIDS) -> dict[str, Any]:
    """The routing profile of an adapter trained on ``prompts``."""
    vectors = embedder.embed(prompts)
    c = _kmeans(vectors, min(centroids, len(prompts)))
    return {"embedder": embedder.name, "dim": int(embedder.dim), "prompts": len(prompts),
            "centroids": [[round(float(v), 5) for v in row] for row in c],
            **({"description": description} if description else {})}


def _kmeans(x: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Spherical k-means of unit rows (k-means++ seeding, seeded): k unit centroids, empty clusters dropped."""
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.clip(1.0 - np.max(x @ np.stack(centers).T, axis=1), 0.0, None)
        if d.sum() <= 1e-9:  # every point sits on a center already
            break
        centers.append(x[rng.choice(len(x), p=d / d.sum())])
    c = np.stack(centers)
    for _ in range(iters):
        label = np.argmax(x @ c.T, axis=1)
        new = np.stack([x[label == j].sum(0) for j in range(len(c)) if (label == j).any()])
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        if new.shape == c.shape and np.allclose(new, c):
            break
        c = new
    return c.astype(np.float32)


# --- the library --------------------------------------------------------------------------------------------------


def library_path(root: Path, base: str) -> Path:
    return root / "experts" / f"{base}.json"


def read_library(root: Path, base: str) -> dict[str, Any]:
    """The library of ``base`` (an empty one if there is none yet)."""
    path = library_path(root, base)
    if not path.exists():
        return {"base": base, "experts": {}}
    try:
        lib = json.loads(path.read_text())
        if not isinstance(lib.get("experts"), dict):
            raise ValueError("no 'experts' object")
        return lib
    except (OSError, ValueError, AttributeError) as e:
        raise FormatError(f"{path} is not an expert library ({type(e).__name__}: {e})") from None


def _write_library(root: Path, lib: dict[str, Any]) -> None:
    text = json.dumps(lib, indent=1) + "\n"
    atomic_write(library_path(root, lib["base"]), lambda tmp: tmp.write_text(text))


def add_expert(store: Any, adapter: str, base: str | None = None, data: Path | None = None,
               description: str | None = None, embedder: Embeds | None = None) -> dict[str, Any]:
    """Put the stored ``adapter`` in its base model's library with its profile (the manifest's, or one computed
    from ``data``, which wins); returns the library entry."""
    ref = store.resolve(adapter)
    if ref.kind != "adapter":
        raise UsageError(f"'{adapter}' is a model, not an adapter; `fourwalls models list` shows which are")
    own_base = ref.manifest["base"]
    if base is not None and base != own_base:
        raise UsageError(f"adapter '{adapter}' was trained on '{own_base}', not '{base}'; it can only join "
                         f"the library of '{own_base}'")
    profile = ref.manifest.get("routing")
    if data is not None:
        if embedder is None:
            from fourwalls.rag.embed import embedder as default_embedder

            embedder = default_embedder()
        profile = make_profile(training_prompts(data), embedder)
    if profile is None:
        raise UsageError(f"adapter '{adapter}' has no routing profile (it was stored before profiles existed); "
                         "give its training data with --data FILE")
    description = description or profile.get("description") or ref.manifest.get("description")
    entry = {"digest": ref.digest, "description": description, "profile": profile}
    lib = read_library(store.root, own_base)
    lib["base_digest"] = ref.manifest["base_digest"]
    lib["experts"][adapter] = entry
    _write_library(store.root, lib)
    return entry


def remove_expert(store: Any, adapter: str, base: str) -> None:
    lib = read_library(store.root, base)
    if lib["experts"].pop(adapter, None) is None:
        raise NotFoundError(f"'{adapter}' is not in the expert library of '{base}'; `fourwalls experts list "
                            f"--base {base}` shows it")
    _write_library(store.root, lib)


def expert(store: Any, adapter: str, base: str) -> dict[str, Any]:
    entry = read_library(store.root, base)["experts"].get(adapter)
    if entry is None:
        raise NotFoundError(f"'{adapter}' is not in the expert library of '{base}'; `fourwalls experts list "
                            f"--base {base}` shows it")
    return entry
