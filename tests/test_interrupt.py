"""Ctrl-C ends a command with exit code 130 and no traceback, whether it comes while fourwalls starts or while it
generates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fourwalls.store import bundled_gguf


def start(home, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "FOURWALLS_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "fourwalls.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path):
    proc = start(tmp_path, "models", "list")
    # Wait until torch's library is mapped: Python is past its own start-up (a signal before it has installed its
    # handler kills the process, as for any program) and main() is importing torch. A fixed sleep was too short on a
    # loaded machine.
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "fourwalls never began to import torch"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()


@pytest.mark.slow
@pytest.mark.skipif(bundled_gguf() is None, reason="the bundled model package is not installed")
def test_ctrl_c_while_generating_exits_130(session_store):
    proc = start(session_store.root, "generate", "Once upon a time", "--max-tokens", "4000", "--seed", "1")
    assert proc.stdout.read(1)  # the text has begun to stream
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
