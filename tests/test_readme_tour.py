"""The README's tour, run as written: every command of its console blocks, in order, on a fresh copy of the
repository (the files git tracks) with a private $FOURWALLS_HOME, its output checked where the README shows it.

How the README's console blocks are read:
- ``$ COMMAND`` is run by bash in the copy (``fourwalls`` and ``python`` are this test's interpreter); a line ending
  in a backslash goes on on the next line. A command ending in ``&`` (a server) runs in the background until the end
  of its block, and the next command waits until the server is ready; the server listens on a free port instead of
  8000, and the block's URLs are rewritten to it.
- The lines after a command are its output as a terminal shows it (stdout and stderr together, a progress bar's
  last state). They must match the command's output line by line: ``...`` in a line stands for any text, a line
  of ``...`` alone for any number of lines, and every number for any number (timings and the last digits of
  floating-point figures vary by machine). Blank lines are ignored, and so are the differences in spacing.
  A command the README shows no output for is only required to succeed.
- A command must exit 0 unless the README shows it failing (a ``fourwalls: error:`` line).
- The home and the copy appear in the output as ``~/.fourwalls`` and ``~/fourwalls``.
- A command whose comment starts ``# slow:`` is not run (none of the later commands may need what it makes).

Run ``python tests/test_readme_tour.py`` to print what each command prints now, to update the README from;
``python tests/test_readme_tour.py WORK_DIR LINE`` keeps the tour's files in WORK_DIR and, on a second run, goes on
from README line LINE (so a long tour can be recorded in parts).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = "# slow:"
GAP = object()  # a `...` line: any number of lines


@dataclass
class Step:
    command: str
    line: int  # in README.md, for messages
    expected: list[str] = field(default_factory=list)


def blocks(readme: str) -> list[list[Step]]:
    """The console blocks of the README, each as its commands with the output lines shown after them."""
    out = []
    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        steps: list[Step] = []
        i += 1
        while lines[i].strip() != "```":
            text = lines[i]
            if text.startswith("$ "):
                command, start = text[2:], i + 1
                while command.endswith("\\"):
                    i += 1
                    command = command[:-1].rstrip() + " " + lines[i].strip()
                steps.append(Step(command, start))
            elif steps:
                steps[-1].expected.append(text)
            i += 1
        out.append(steps)
        i += 1
    return out


def _norm(line: str) -> str:
    return " ".join(line.split())


def _pattern(line: str) -> re.Pattern[str]:
    pieces = [re.sub(r"\d+", r"\\d+", re.escape(p)) for p in _norm(line).split("...")]
    return re.compile(".*".join(pieces))


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` lines match the README's ``expected`` lines (see the module's docstring)."""
    want = [GAP if _norm(e) == "..." else _pattern(e) for e in expected if e.strip()]
    got = [_norm(a) for a in actual if a.strip()]
    # reach[j]: the first i expected lines can match the first j actual lines
    reach = [True] + [False] * len(got)
    for w in want:
        nxt = [False] * (len(got) + 1)
        for j in range(len(got) + 1):
            if w is GAP:
                nxt[j] = reach[j] or (j > 0 and nxt[j - 1])
            else:
                nxt[j] = j > 0 and reach[j - 1] and bool(w.fullmatch(got[j - 1]))
        reach = nxt
    return reach[-1]


def screen(raw: bytes, home: Path, clone: Path) -> list[str]:
    """What a terminal shows of a command's output: each line's last carriage-return segment, paths shortened."""
    text = raw.decode("utf-8", "replace").replace(str(home), "~/.fourwalls").replace(str(clone), "~/fourwalls")
    return [line.split("\r")[-1] for line in text.split("\n")]


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them: tracked, and new ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tour:
    """Runs the steps in a copy of the repository, as a user's shell would."""

    def __init__(self, work: Path) -> None:
        self.clone = fresh_copy(work / "fourwalls")
        self.home = work / "home"
        bin_dir = work / "bin"
        bin_dir.mkdir(exist_ok=True)
        console_script = (f"#!{sys.executable}\nimport sys\nfrom fourwalls.cli import main\n"
                          "if __name__ == '__main__':\n    sys.exit(main())\n")  # as pip writes it
        scripts = {"fourwalls": console_script, "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'}
        for name, text in scripts.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FOURWALLS_")}
        self.env = {**env, "FOURWALLS_HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                    "PYTHONPATH": str(self.clone / "src"), "PYTHONUNBUFFERED": "1"}
        self.port = _free_port()
        self.background: list[subprocess.Popen] = []

    def command(self, step: Step) -> str:
        command = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{self.port}", step.command)
        if re.match(r"fourwalls serve\b", command):
            command = re.sub(r"\s*&\s*$", f" --port {self.port} &", command)
        return command

    def run(self, step: Step) -> tuple[int, list[str]]:
        command = self.command(step)
        if command.rstrip().endswith("&"):
            log = (self.home.parent / f"background-{len(self.background)}.log").open("wb")
            proc = subprocess.Popen(["bash", "-c", "exec " + command.rstrip().rstrip("&")], cwd=self.clone,
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.background.append(proc)
            self._wait_ready(proc)
            return 0, []
        done = subprocess.run(["bash", "-c", command], cwd=self.clone, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=1800)
        return done.returncode, screen(done.stdout, self.home, self.clone)

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the background server did not become ready (exit code {proc.poll()})")

    def end_block(self) -> None:
        for proc in self.background:
            os.killpg(proc.pid, signal.SIGTERM)  # drains, then exits
            proc.wait(120)
        self.background.clear()


def check(step: Step, code: int, actual: list[str]) -> str | None:
    """What is wrong with a step's result, or None."""
    shows_failure = any(e.startswith("fourwalls: error:") for e in step.expected)
    if code != 0 and not shows_failure:
        return f"exit code {code}"
    if step.expected and not matches(step.expected, actual):
        return "output differs"
    return None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_the_readme_tour_runs_as_written(tmp_path):
    tour = Tour(tmp_path)
    ran = 0
    try:
        for block in blocks((ROOT / "README.md").read_text()):
            for step in block:
                if SKIP in step.command:
                    continue
                code, actual = tour.run(step)
                problem = check(step, code, actual)
                assert problem is None, (f"README.md line {step.line}: $ {step.command}\n{problem}\n--- README:\n"
                                         + "\n".join(step.expected) + "\n--- printed:\n" + "\n".join(actual))
                ran += 1
            tour.end_block()
    finally:
        tour.end_block()
    assert ran >= 30


def test_output_matching_rules():
    assert matches(["fourwalls 2.5 tok/s ...", "...", "done"], ["fourwalls 13.25 tok/s (x)", "a", "b", "done"])
    assert matches([" Paris."], [" Paris.", ""]) and not matches([" Paris."], [" Paris.", "", "The answer"])
    assert not matches(["removed smol"], ["removed other"]) and matches(["a   b"], ["a b"])
    assert matches(["...", "x"], ["x"]) and not matches(["x", "..."], [])
    assert blocks("```console\n$ a \\\n    b\nout\n$ c\n```\n") == [[Step("a b", 2, ["out"]), Step("c", 5)]]


def record(work: Path, start: int = 0) -> None:
    """Print what each command prints and whether it matches the README, from README line ``start`` on (the
    commands before it must have run in ``work`` already)."""
    tour = Tour(work)
    try:
        for block in blocks((ROOT / "README.md").read_text()):
            for step in block:
                if SKIP in step.command or step.line < start:
                    continue
                started = time.monotonic()
                code, actual = tour.run(step)
                print(f"$ {step.command}   [line {step.line}, exit {code}, {time.monotonic() - started:.0f} s, "
                      f"{check(step, code, actual) or 'ok'}]")
                print("\n".join(line for line in actual if line.strip()), flush=True)
            tour.end_block()
    finally:
        tour.end_block()


if __name__ == "__main__":  # python tests/test_readme_tour.py [WORK_DIR [README_LINE]]: print what the tour prints
    if len(sys.argv) > 1:
        record(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            record(Path(tmp))
