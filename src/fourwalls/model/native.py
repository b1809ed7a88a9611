"""fourwalls' own C kernels (kernels.c): compiled once per machine with the system's C compiler, loaded by ctypes.

Built into ~/.cache/fourwalls on first use (a second or two), once per instruction set: AVX-512 (VNNI and BF16)
where the CPU has it, AVX2 + FMA + F16C otherwise; ``FOURWALLS_ISA=avx512|avx2|none`` forces one (none: no C
kernels). Without AVX2, a compiler, or with FOURWALLS_ISA=none (or FOURWALLS_NATIVE=0), everything runs on torch's
kernels instead: slower, the same model.

A layer the kernels can read says how, with ``as_native()`` returning a ``NativeLinear``; the kernels' own limits,
kinds and structure layout come from the library (``abi()``), never from numbers copied here.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

log = logging.getLogger(__name__)
# Each instruction set: the compiler's flags, and the CPU flags (/proc/cpuinfo) it needs. Best first.
ISAS = {
    "avx512": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
                "-mavx512bf16"],
               {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
}
_C_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def cpu_isas() -> tuple[str, ...]:
    """The instruction sets of ``ISAS`` this CPU runs, best first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return tuple(name for name, (_, needs) in ISAS.items() if needs <= flags)


def selected_isa() -> str | None:
    """The instruction set the kernels run with: FOURWALLS_ISA where set (and the CPU has it), else the best."""
    if os.environ.get("FOURWALLS_NATIVE") == "0":
        return None
    forced, have = os.environ.get("FOURWALLS_ISA", "").lower(), cpu_isas()
    if forced == "none":
        return None
    if forced and forced not in have:
        _warn_once(f"FOURWALLS_ISA={forced} is not an instruction set this CPU runs ({', '.join(have) or 'none'}; "
                   "or none); using the best it has")
    return forced if forced in have else (have[0] if have else None)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def native(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels for ``isa`` (default: ``selected_isa()``), or None where they cannot run."""
    isa = isa or selected_isa()
    return _library(isa) if isa in cpu_isas() else None


@functools.cache
def _library(isa: str) -> ctypes.CDLL | None:
    src = Path(__file__).with_name("kernels.c")
    flags = [*_C_FLAGS, *ISAS[isa][0]]
    tag = hashlib.sha256(src.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fourwalls"
    lib = cache / f"kernels-{isa}-{tag}.so"
    try:
        if not lib.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
            os.close(fd)
            try:
                subprocess.run([os.environ.get("CC", "cc"), *flags, str(src), "-o", tmp, "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
            finally:
                Path(tmp).unlink(missing_ok=True)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fourwalls' C kernels (%s) could not be built (%s); using torch's, which are slower", isa, e)
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    dll.linear_forward.argtypes = [p, p, i64, p, p, ctypes.c_int]
    dll.linear_forward.restype = None
    dll.decode_step.argtypes = [p, p, p, p, p, i64, p, p, i64, ctypes.c_int]
    dll.decode_step.restype = None
    dll.stream_sum.argtypes = [p, i64, ctypes.c_int]
    dll.stream_sum.restype = ctypes.c_float
    dll.rows_unit.argtypes = [p, i64, i64, p, p, p]
    dll.rows_unit.restype = None
    dll.rows_affine.argtypes = [p, i64, i64, p, p, p, p, ctypes.c_int]
    dll.rows_affine.restype = None
    dll.fw_abi.argtypes = []
    dll.fw_abi.restype = ctypes.POINTER(_AbiEntry)
    return dll


class _AbiEntry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_int64)]


def abi(isa: str | None = None) -> dict[str, int]:
    """kernels.c's limits, kernel kinds and structure layout by name (``MAX_ROWS``, ``LIN_INT8``, ``Lin`` for
    sizeof(Lin), ``Lin.scale`` for offsetof(Lin, scale)); empty where the kernels cannot run."""
    lib = native(isa)
    return {} if lib is None else _abi(lib)


@functools.cache
def _abi(lib: ctypes.CDLL) -> dict[str, int]:
    table, out, i = lib.fw_abi(), {}, 0
    while table[i].name is not None:  # the table ends with a NULL name
        out[table[i].name.decode()] = table[i].value
        i += 1
    return out


@dataclass
class NativeLinear:
    """A linear layer as the C kernels read it (kernels.c's ``Lin``): which kernel, and the tensors it reads.

    ``kind`` is the kernel's name in kernels.c (``LIN_F32``, ``LIN_INT8``, ``LIN_INT4``, ``LIN_Q8``). A layer kind
    the kernels read has an ``as_native()`` method returning one of these; the fused step (fused.py) knows no layer
    classes.
    """

    kind: str
    weight: Tensor  # LIN_INT4: two codes a byte, [out, in / 2]
    out_features: int
    in_features: int
    bias: Tensor | None = None
    scale: Tensor | None = None  # LIN_INT8: [out]; LIN_INT4, LIN_Q8: [out, groups]
    zero: Tensor | None = None  # LIN_INT4, LIN_Q8 (or None): [out, groups], the offset: w = q * scale + offset
    zero_m8: bool = False  # LIN_INT4: every offset is -8 times its scale (GGUF's Q4_0), which the kernels then make
    in_scale: Tensor | None = None  # LIN_INT4: [in] or None, what the input is divided by (AWQ)
    group: int = 0  # LIN_INT4, LIN_Q8: weights sharing one scale and offset
    lora_a: Tensor | None = None  # [rank, in]: stacked adapters' A
    lora_b: Tensor | None = None  # [rank, out]: their B transposed, scaling folded in
    rows_mask: Callable[[], Tensor | None] | None = None  # each step's [rows, rank] adapter columns (None: no row's)


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


def release_freed_memory() -> None:
    """Hand the memory malloc keeps after freeing back to the kernel (glibc's ``malloc_trim``): loading a model frees
    more than it keeps (the tokenizer's JSON parse, some 30 MB here), and a server that only ever serves would hold
    it for life. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def as_native(layer: object) -> NativeLinear | None:
    """How the C kernels read ``layer``, or None when they cannot (its kind has no ``as_native()``, or says no)."""
    method = getattr(layer, "as_native", None)
    return method() if method is not None else None
