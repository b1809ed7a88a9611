"""fourwalls' own C kernels (kernels.c): compiled once per machine with the system's C compiler, loaded by ctypes.

Built into ~/.cache/fourwalls on first use (a second or two). Without AVX2, a compiler, or with FOURWALLS_NATIVE=0,
everything runs on torch's kernels instead: slower, the same model.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
_C_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def native() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run."""
    if os.environ.get("FOURWALLS_NATIVE") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if " avx2" not in flags or " fma" not in flags:
        return None
    src = Path(__file__).with_name("kernels.c")
    tag = hashlib.sha256(src.read_bytes() + " ".join(_C_FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fourwalls"
    lib = cache / f"kernels-{tag}.so"
    try:
        if not lib.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
            os.close(fd)
            try:
                subprocess.run([os.environ.get("CC", "cc"), *_C_FLAGS, str(src), "-o", tmp, "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
            finally:
                Path(tmp).unlink(missing_ok=True)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fourwalls' C kernels could not be built (%s); using torch's, which are slower", e)
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    dll.int8_linear.argtypes = [p, p, p, p, i64, i64, i64]
    dll.int8_linear.restype = None
    dll.decode_step.argtypes = [p, p, p, p, p, i64, p, p, ctypes.c_int]
    dll.decode_step.restype = None
    dll.stream_sum.argtypes = [p, i64, ctypes.c_int]
    dll.stream_sum.restype = ctypes.c_float
    dll.rows_unit.argtypes = [p, i64, i64, p, p, p]
    dll.rows_unit.restype = None
    dll.rows_affine.argtypes = [p, i64, i64, p, p, p, p, ctypes.c_int]
    dll.rows_affine.restype = None
    return dll


@functools.cache
def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    A training step allocates and frees the same large tensors (activations, logits) again and again; by default
    glibc returns them (``munmap``, heap trimming) and the next step pays a page fault for every 4 KB touched again,
    which cost a LoRA step at seq 512 some 5-10% here, and attention's T x T scores far more. The process's
    resident memory then stays at its peak, which is what a training process holds anyway. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass
