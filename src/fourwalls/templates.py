"""Chat templates: jinja2 in a sandbox, rendered in this process (``render``) or, for the server, in a child process
with a time and a memory budget (``TemplateSandbox``).

A template comes with a model and is untrusted code. The jinja sandbox keeps it from reaching Python, but not from
looping 10^10 times or building a 3 GB string, and a thread that does so cannot be stopped. So the server renders
in child processes: one that runs past its time budget is killed, one that needs more memory than its budget fails
its allocation (RLIMIT_AS), and the output is capped; each case fails the one request with a message that says so,
and the server goes on. The CLI and training render here, in-process.
"""

from __future__ import annotations

import json
import resource
import select
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fourwalls.errors import UsageError

SECONDS = 1.0  # a real template renders a conversation in about a millisecond
MEMORY = 1 << 30  # address space of a child, bytes: Python and jinja take some 60 MB of it
MAX_CHARS = 16 << 20  # longest output: far more than any model's context holds
BUDGET = "chat_template_budget"  # the error code of a template that ran out of its budget
_IDLE = 4  # children kept for the next render
_SRC = str(Path(__file__).resolve().parents[1])  # the child imports this same fourwalls


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in, with the globals and filters HF transformers gives them."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(template: str, context: dict[str, Any]) -> str:
    """Render in this process, without a budget (for the CLI and training, which run the user's own model)."""
    try:
        return environment().from_string(template).render(**context)
    except jinja2.TemplateError as e:
        raise UsageError(f"the chat template rejected the conversation: {e}") from None


class TemplateSandbox:
    """Renders templates in child processes, each render within ``seconds`` and ``memory`` bytes, its output at
    most ``max_chars``. Thread-safe: concurrent renders get a child each."""

    def __init__(self, seconds: float = SECONDS, memory: int = MEMORY, max_chars: int = MAX_CHARS) -> None:
        self.seconds, self.memory, self.max_chars = seconds, memory, max_chars
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    def render(self, template: str, context: dict[str, Any]) -> str:
        """The rendered text; UsageError if the template rejects the conversation or exceeds a budget (code
        ``chat_template_budget``, the message naming which)."""
        with self._lock:
            child = self._idle.pop() if self._idle else None
        child = child or _Child(self.memory, self.max_chars)
        try:
            reply = child.run({"template": template, "context": context}, self.seconds)
        except BaseException:
            child.kill()
            raise
        if "text" in reply:
            with self._lock:
                if len(self._idle) < _IDLE:
                    self._idle.append(child)
                    child = None
            if child is not None:
                child.kill()
            return reply["text"]
        child.kill()  # after a failure it starts afresh
        if reply["error"] == "template":
            raise UsageError(f"the chat template rejected the conversation: {reply['message']}")
        budget = {"memory": f"more than its memory budget ({self.memory >> 20} MiB)",
                  "output": f"more than {self.max_chars} characters of output"}[reply["error"]]
        raise UsageError(f"the chat template needed {budget} to render this conversation", code=BUDGET)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()


class _Child:
    """One child process: a JSON job per line in, a JSON reply per line out."""

    def __init__(self, memory: int, max_chars: int) -> None:
        code = f"import sys; sys.path.insert(0, {_SRC!r}); from fourwalls.templates import _serve; _serve()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(memory), str(max_chars)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if self._read(60) != {"ready": True}:  # its start-up (a loaded machine takes seconds) is not the budget
            self.kill()
            raise RuntimeError("the chat template renderer did not start")

    def run(self, job: dict[str, Any], seconds: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read(seconds)
        if reply is None:
            raise UsageError(f"the chat template took more than its time budget ({seconds:g} s) to render this "
                             "conversation", code=BUDGET)
        if reply == {}:
            raise UsageError(f"the chat template's renderer died rendering this conversation (exit status "
                             f"{self.proc.wait()})", code=BUDGET)
        return reply

    def _read(self, seconds: float) -> dict[str, Any] | None:
        """The next reply; None if none came within ``seconds``, {} if the child died."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _serve() -> None:
    """The child's loop: render each job, reply with the text or what went wrong."""
    memory, max_chars = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    env, compiled = environment(), {}
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")  # ASCII: one line, whatever the text holds
        out.flush()

    reply({"ready": True})
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            template = compiled.get(job["template"]) or env.from_string(job["template"])
            compiled = {job["template"]: template}
            text = template.render(**job["context"])
            result = {"text": text} if len(text) <= max_chars else {"error": "output"}
        except MemoryError:
            result = {"error": "memory"}
        except Exception as e:  # the template's own failure on this conversation, never the server's
            message = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            result = {"error": "template", "message": message[:1000]}
        try:
            reply(result)
        except MemoryError:
            reply({"error": "memory"})
