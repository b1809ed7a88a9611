"""Crash-proof checkpoints: written to a temporary folder, fsynced, renamed; a half-written one is never read.

A checkpoint holds the trainable weights (safetensors), the optimizer state (tensors and numbers only, loaded with
``weights_only=True``), the step and data position, and the RNG states of Python, NumPy and torch, so a resumed run
continues bit for bit as if it had never stopped.

Weights and optimizer state are whole tensors under their parameter names (torch.distributed.checkpoint's
full state dicts), so a model sharded by FSDP2 saves and resumes through the same files as an unsharded one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fourwalls.errors import DiskFullError, FormatError, FourwallsError, UsageError
from fourwalls.files import disk_full, full_message

_STEP = re.compile(r"step-(\d{8})")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _trainable(model: nn.Module) -> set[str]:
    # named_parameters() lists a tied weight once, which safetensors needs.
    return {n for n, p in model.named_parameters() if p.requires_grad}


_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with whole tensors: under FSDP every rank must call it, and rank 0 receives them."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model.state_dict()
    return get_model_state_dict(model, options=_WHOLE)


def gather(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimizer state as whole tensors by parameter name.

    Under FSDP every rank must call it (the shards are gathered) and rank 0 receives them; the others get empty
    dicts."""
    names = _trainable(model)
    weights = {n: t.contiguous() for n, t in full_state_dict(model).items() if n in names}
    return weights, get_optimizer_state_dict(model, optimizer, options=_WHOLE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
         state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint ``step`` (what ``gather`` returned, and ``state``) under ``folder`` atomically and keep the
    newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    target = folder / f"step-{step:08d}"
    try:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state, "rng": rng_state()}))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        _fsync_dir(folder)
    except Exception as e:
        if not (isinstance(e, OSError) or disk_full(e)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(folder)
        kept = f"the checkpoint at step {prev[1]} is intact" if prev else "no earlier checkpoint"
        if disk_full(e):  # safetensors wraps the OSError in its own error
            size = sum(t.numel() * t.element_size() for t in weights.values())
            raise DiskFullError(f"{full_message(folder, f'the checkpoint at step {step}', size)}; {kept}: resume "
                                "with --resume") from None
        raise FourwallsError(f"could not write the checkpoint at step {step} ({e.strerror or e}); {kept}: free "
                             "space, then resume with --resume") from None
    for old in sorted(_steps(folder))[:-keep]:
        shutil.rmtree(folder / f"step-{old:08d}", ignore_errors=True)
    return target


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for p in folder.iterdir()
            if (m := _STEP.fullmatch(p.name)) and (p / "state.json").is_file()]


def latest(folder: Path) -> tuple[Path, int] | None:
    steps = _steps(folder)
    return (folder / f"step-{max(steps):08d}", max(steps)) if steps else None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, identity: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from a checkpoint; refuse one made for another model or data."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"checkpoint {path} is unreadable ({e})") from None
    for key, value in identity.items():
        if state.get("identity", {}).get(key) != value:
            raise UsageError(f"cannot resume from {path}: its {key} is {state.get('identity', {}).get(key)!r}, "
                             f"this run's is {value!r}; start a new run folder or use the same {key}")
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != _trainable(model):
        raise UsageError(f"checkpoint {path} holds other trainable weights than this run (a different method?)")
    options = StateDictOptions(full_state_dict=True, strict=False)  # every rank reads the files, keeps its shard
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, torch.load(path / "optimizer.pt", weights_only=True), options=options)
    set_rng_state(state["rng"])
    return state
