"""The user's files: UTF-8 text read with one clear error, files replaced atomically, a full disk said in one line,
content digests."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fourwalls.errors import DiskFullError, FormatError, UsageError


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
    with writing(path.parent, str(path.name)):
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


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says that a disk or a quota is full: an OSError, or a library's error that wraps one
    (safetensors' SafetensorError, apsw's FullError, sqlite3's SQLITE_FULL, psycopg's DiskFull)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if type(e).__name__ in ("FullError", "DiskFull") or getattr(e, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return True
    return any(s in str(e) for s in ("No space left on device", "Disk quota exceeded", "os error 28"))


def full_message(where: Path, what: str, needed: int | None = None) -> str:
    """The line that says the disk holding ``where`` is full: what could not be written, how much it needs (when
    known) and how much is free."""
    at = Path(where)
    while not at.exists() and at != at.parent:
        at = at.parent
    free = shutil.disk_usage(at).free
    need = f", which needs about {_size(needed)}," if needed else ""
    return f"the disk is full: {what} in {where}{need} could not be written ({_size(free)} free there); free some " \
           "space and try again"


@contextmanager
def writing(where: Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``what`` under ``where`` into a DiskFullError that says so in one line (the
    writer itself cleans up what it left half-written)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        raise DiskFullError(full_message(where, what, needed)) from None


def _size(n: float) -> str:
    units = ["bytes", "KB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


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


def folder_digest(folder: Path, names: list[str] | None = None) -> str:
    """``sha256-<hex>`` over the names and contents of a folder's files (``names``, or all but manifest.json): two
    folders that differ in any of them differ in digest."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and
                   (f.name in names if names is not None else f.name != "manifest.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return "sha256-" + h.hexdigest()
