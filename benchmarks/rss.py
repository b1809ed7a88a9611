"""Peak resident memory of this process, as the benchmarks report it (Linux)."""

from pathlib import Path


def peak_rss_mb() -> float:
    """The kernel's high-water mark of this process's resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset the high-water mark to the current resident memory, to measure a phase (training) on its own."""
    Path("/proc/self/clear_refs").write_text("5")
