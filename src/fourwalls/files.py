"""The user's files: UTF-8 text read with one clear error, files replaced atomically, content digests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fourwalls.errors import FormatError, UsageError


def home() -> Path:
    """``$FOURWALLS_HOME`` (default ``~/.fourwalls``): the model store, caches, runs, documents and API keys."""
    return Path(os.environ.get("FOURWALLS_HOME") or "~/.fourwalls").expanduser()


def read_text(path: Path | str, what: str = "file") -> str:
    """A UTF-8 text file; a missing, unreadable or non-UTF-8 file is an error naming it (``what``: "data file")."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such {what}: {path}") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a file beside ``path``, fsync it, rename it over ``path``: readers see the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def megabytes(size: int) -> str:
    """A size as every command prints it: megabytes of 10^6 bytes, labelled."""
    return f"{size / 1e6:.1f} MB"


def sha256_file(path: Path) -> str:
    """``sha256-<hex>`` of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256-" + h.hexdigest()
