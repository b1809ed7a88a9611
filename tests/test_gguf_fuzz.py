"""Fuzz the GGUF reader: truncated, bit-flipped and count-corrupted files load or fail with a FourwallsError.

Never any other exception, and never a hang: every case runs under a per-case alarm.
"""

from __future__ import annotations

import random
import signal
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import pytest

from fourwalls.errors import FourwallsError
from fourwalls.formats import read_checkpoint
from tests.gguf_fixture import DIM, FFN, HEADS, KV_HEADS, LAYERS, VOCAB, write_tiny_gguf

CASE_LIMIT_S = 10  # generous: a case takes milliseconds; only a runaway loop gets near this


class CaseHung(BaseException):  # not an Exception, so no `except Exception` in the reader can swallow it
    pass


@contextmanager
def alarm(label: str) -> Iterator[None]:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: object) -> None:
        raise CaseHung(f"{label}: still running after {CASE_LIMIT_S}s (a loop driven by a corrupt count?)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


class Runner:
    """Writes each variant to one path and records how reading it ended."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "variant.gguf"
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []

    def __call__(self, label: str, data: bytes) -> None:
        self.path.unlink(missing_ok=True)  # a new inode: no earlier memory map ever sees the file change
        self.path.write_bytes(data)
        with alarm(label):
            try:
                read_checkpoint(self.path)
            except FourwallsError as e:
                self.outcomes[type(e).__name__] += 1
                assert str(e), f"{label}: {type(e).__name__} without a message"
            except Exception as e:  # noqa: BLE001 - the point: anything else is a bug to report
                self.failures.append(f"{label}: {type(e).__name__}: {e}")
            else:
                self.outcomes["loaded"] += 1

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} cases escaped as non-FourwallsError:\n" + "\n".join(
            self.failures[:20])


def test_valid_tiny_gguf_loads(tiny: Path) -> None:
    cfg, state, tok = read_checkpoint(tiny)
    assert (cfg.arch, cfg.vocab_size, cfg.dim, cfg.n_layers) == ("llama", VOCAB, DIM, LAYERS)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim) == (HEADS, KV_HEADS, DIM // HEADS, FFN)
    assert cfg.tie_embeddings and cfg.context_length == 64
    assert state["embed_tokens.weight"].shape == (VOCAB, DIM)
    assert state["layers.0.self_attn.k_proj.weight"].shape == (KV_HEADS * DIM // HEADS, DIM)
    assert state["layers.0.mlp.down_proj.weight"].shape == (DIM, FFN)
    assert len(state) == 11
    assert tok.vocab_size == VOCAB
    assert tok.decode(tok.encode("abcd xyz")) == "abcd xyz"


def test_truncations(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    header_end = gguf.GGUFReader(tiny).data_offset  # header, metadata and tensor infos: every offset
    run = Runner(tmp_path)
    for n in [*range(header_end + 1), *range(header_end + 1, len(data), 97)]:
        run(f"truncated to {n} bytes", data[:n])
    run.check()
    assert run.outcomes["loaded"] == 0  # a truncated file never passes for a whole one
    assert run.outcomes["FormatError"] > header_end


def test_random_byte_flips(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    rng = random.Random(0)
    run = Runner(tmp_path)
    for i in range(300):
        b = bytearray(data)
        flips = []
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(b))
            if rng.random() < 0.5:
                b[pos] ^= 1 << rng.randrange(8)
            else:
                b[pos] = rng.randrange(256)
            flips.append(pos)
        run(f"variant {i} (bytes changed at {flips})", bytes(b))
    run.check()
    assert run.outcomes["loaded"] > 0 and sum(run.outcomes.values()) > run.outcomes["loaded"]


def _count_fields(path: Path) -> list[tuple[str, int, str]]:
    """(what, byte offset, struct format) of every length, count and type field of the file."""
    r = gguf.GGUFReader(path)
    fields = [("tensor count", 8, "<Q"), ("metadata count", 16, "<Q")]
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        klen = int(f.parts[0][0])
        vpos = f.offset + 8 + klen + 4
        fields += [(f"key length of {key}", f.offset, "<Q"), (f"type of {key}", vpos - 4, "<I")]
        if f.types[0] == gguf.GGUFValueType.STRING:
            fields.append((f"string length of {key}", vpos, "<Q"))
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            fields += [(f"item type of {key}", vpos, "<I"), (f"array length of {key}", vpos + 4, "<Q")]
            if f.types[1] == gguf.GGUFValueType.STRING:
                fields.append((f"first item length of {key}", vpos + 12, "<Q"))
    for t in r.tensors:
        nlen = len(t.name.encode())
        n_dims = len(t.shape)
        pos = t.field.offset + 8 + nlen
        fields += [(f"name length of {t.name}", t.field.offset, "<Q"), (f"dim count of {t.name}", pos, "<I"),
                   (f"first dim of {t.name}", pos + 4, "<Q"), (f"type of {t.name}", pos + 4 + 8 * n_dims, "<I"),
                   (f"data offset of {t.name}", pos + 8 + 8 * n_dims, "<Q")]
    return fields


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf's offset arithmetic, harmless
def test_corrupt_counts_and_types(tiny: Path, tmp_path: Path) -> None:
    """Every length, count and type field set to values a bit flip or a hostile file can produce."""
    data = tiny.read_bytes()
    run = Runner(tmp_path)
    fields = _count_fields(tiny)
    assert len(fields) > 60
    for what, pos, fmt in fields:
        (orig,) = struct.unpack_from(fmt, data, pos)
        top = (1 << (8 * struct.calcsize(fmt))) - 1
        for value in {0, 1, orig + 1, orig - 1 if orig else 2, 13, 1 << 31, top >> 1, top}:
            b = bytearray(data)
            struct.pack_into(fmt, b, pos, value & top)
            run(f"{what} = {value & top}", bytes(b))
    run.check()


def test_corrupt_metadata_values_and_keys(tiny: Path, tmp_path: Path) -> None:
    """Every metadata key renamed (so it is missing), every integer value set to 0, 1 and its type's maximum."""
    data = tiny.read_bytes()
    r = gguf.GGUFReader(tiny)
    run = Runner(tmp_path)
    ints = {gguf.GGUFValueType.UINT8: ("<B", 0xFF), gguf.GGUFValueType.UINT16: ("<H", 0xFFFF),
            gguf.GGUFValueType.UINT32: ("<I", 0xFFFFFFFF), gguf.GGUFValueType.INT32: ("<i", 0x7FFFFFFF),
            gguf.GGUFValueType.UINT64: ("<Q", 0xFFFFFFFFFFFFFFFF)}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        b = bytearray(data)
        b[f.offset + 8] ^= 0x20  # the key's first letter changes case: 'llama.x' becomes 'Llama.x'
        run(f"{key} renamed", bytes(b))
        if len(f.types) == 1 and f.types[0] in ints:
            fmt, top = ints[f.types[0]]
            vpos = f.offset + 8 + int(f.parts[0][0]) + 4
            for value in (0, 1, top):
                b = bytearray(data)
                struct.pack_into(fmt, b, vpos, value)
                run(f"{key} = {value}", bytes(b))
    run.check()
    assert run.outcomes["loaded"] > 0 and run.outcomes["FormatError"] > 0
