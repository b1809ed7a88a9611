"""Application profiles: what a request is for, and the service it is owed.

A profile names a time-to-first-token SLO, an inter-token-latency SLO (met by a request whose mean time per output
token after the first is within it, DistServe's TPOT), a priority (0 is served first) and the most tokens a request
may generate. The engine serves the waiting request of the best priority first (a preempted one before others of
its priority), lets it start its prompt while one of a lower priority is still prefilling, preempts a running request
of a lower priority when the batch or the KV cache has no room for it, sizes a lower priority's prompt chunks so
that the better streams decoding meet the tightest ITL SLO among them, and keeps a request out of the batch while
one more row would take a decode step past the ITL SLO of a running request of a better priority. ``batch``, with
no SLO and the lowest priority, fills the capacity the others leave.

Operators define their own, or change these, in a TOML file (``fourwalls serve --profiles FILE``)::

    [profiles.support]
    priority = 0
    ttft_ms = 800
    itl_ms = 100
    max_tokens = 512
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fourwalls.errors import UsageError


@dataclass(frozen=True)
class Profile:
    name: str
    priority: int  # 0 first
    ttft: float | None  # seconds; None: no SLO
    itl: float | None  # seconds per output token after the first; None: no SLO
    max_tokens: int  # a request's default max_tokens, and the most it may ask for


# Reading speed is some 5-10 tokens a second: 150 ms a token streams faster than anyone reads.
BUILTIN: dict[str, Profile] = {p.name: p for p in (
    Profile("chat", 0, ttft=1.0, itl=0.15, max_tokens=2048),
    Profile("rag", 1, ttft=3.0, itl=0.15, max_tokens=1024),
    Profile("summarize", 2, ttft=15.0, itl=0.5, max_tokens=1024),
    Profile("batch", 3, ttft=None, itl=None, max_tokens=4096),
)}
DEFAULT = "chat"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_FIELDS = {"priority", "ttft_ms", "itl_ms", "max_tokens"}


def load_profiles(path: Path | None) -> dict[str, Profile]:
    """The built-in profiles, with those of a TOML file (``[profiles.NAME]`` tables) added or replacing them."""
    profiles = dict(BUILTIN)
    if path is None:
        return profiles
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read the profiles file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    tables = data.get("profiles")
    if not isinstance(tables, dict) or set(data) != {"profiles"}:
        raise UsageError(f"{path}: expected only [profiles.NAME] tables")
    for name, t in tables.items():
        where = f"{path}: profile '{name}'"
        if not _NAME.fullmatch(name):
            raise UsageError(f"{where}: a name is lowercase letters, digits, '-' and '_'")
        if not isinstance(t, dict):
            raise UsageError(f"{where} is not a table")
        if set(t) - _FIELDS:
            raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(set(t) - _FIELDS))}; "
                             f"known: {', '.join(sorted(_FIELDS))}")
        old = profiles.get(name)
        if old is None and not {"priority", "max_tokens"} <= set(t):
            raise UsageError(f"{where} is new: it needs priority and max_tokens")
        for key in t:
            if type(t[key]) is not int or t[key] < (0 if key == "priority" else 1):
                raise UsageError(f"{where}: {key} must be an integer of at least {0 if key == 'priority' else 1}")
        fields = dataclasses.asdict(old) if old else {"name": name, "ttft": None, "itl": None}
        fields |= {k: t[k] for k in ("priority", "max_tokens") if k in t}
        fields |= {k.removesuffix("_ms"): t[k] / 1000 for k in ("ttft_ms", "itl_ms") if k in t}
        profiles[name] = Profile(**fields)
    return profiles
