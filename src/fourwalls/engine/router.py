"""The router behind ``"model": "auto"``: a request runs on the LoRA expert whose training prompts its last user
turn resembles most, or on the base model when none is close enough.

Routing a prompt costs one embedding and one product with the library's centroid matrix (stacked once, when the
server starts): an expert's score is the cosine similarity of the prompt to its nearest centroid (experts.py
makes the profiles). The best expert the caller may use answers when it scores at least the threshold; ``top2``
mixes the two best (both at or above the threshold), weighted by the softmax of their scores, in one batch row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fourwalls.errors import UsageError
from fourwalls.experts import DEFAULT_THRESHOLD, Embeds

MIX_TEMPERATURE = 0.05  # top2: softmax(score / T); cosine scores differ by tenths, so T=1 would mix ~50/50
MODES = ("top1", "top2")


# --- routing ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    name: str
    score: float  # cosine similarity to the adapter's nearest centroid
    centroid: int  # which centroid


@dataclass(frozen=True)
class Route:
    """Where a prompt goes: ``mix`` {adapter: weight} (empty: the base model), with the ranking it came from."""

    mix: dict[str, float]
    ranking: list[Score]
    threshold: float
    seconds: float = 0.0  # embedding and ranking

    @property
    def adapter(self) -> str | None:
        """The adapter that answers alone (None: the base, or a mix)."""
        return next(iter(self.mix)) if len(self.mix) == 1 else None

    def label(self, base: str) -> str:
        """What the response names as its model: the adapter, the adapters mixed (a+b), or the base."""
        return "+".join(self.mix) if self.mix else base

    def why(self) -> str:
        if not self.mix:
            best = f"the best, '{self.ranking[0].name}', scores {self.ranking[0].score:.3f}" if self.ranking else \
                "no expert may be used"
            return f"base model: {best}, below the threshold {self.threshold:g}"
        parts = [f"'{n}' ({w:.0%})" for n, w in self.mix.items()]
        return f"{' + '.join(parts)}: nearest centroid at or above the threshold {self.threshold:g}"


class Router:
    """The experts of one library, their centroids stacked in one matrix (built once)."""

    def __init__(self, profiles: dict[str, dict[str, Any]], embedder: Embeds,
                 threshold: float = DEFAULT_THRESHOLD, mode: str = "top1") -> None:
        if mode not in MODES:
            raise UsageError(f"--route must be one of {', '.join(MODES)}, not {mode!r}")
        for name, p in profiles.items():
            if (p.get("embedder"), p.get("dim")) != (embedder.name, embedder.dim):
                raise UsageError(f"expert '{name}' was profiled with {p.get('embedder')} ({p.get('dim')}-d), not "
                                 f"{embedder.name}: `fourwalls experts add {name} --data FILE` profiles it again")
        self.embedder, self.threshold, self.mode = embedder, threshold, mode
        self.names = list(profiles)
        rows = [np.asarray(profiles[n]["centroids"], dtype=np.float32) for n in self.names]
        self.owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)]) if rows else np.zeros(0, int)
        self.first = np.searchsorted(self.owner, np.arange(len(rows)))  # each expert's first row
        self.centroids = np.concatenate(rows) if rows else np.zeros((0, embedder.dim), np.float32)

    def rank(self, text: str, may_use: Callable[[str], bool] = lambda _: True) -> list[Score]:
        """The experts ``may_use`` allows, best first."""
        if not self.names:
            return []
        sims = self.centroids @ self.embedder.embed([text])[0]
        best = np.maximum.reduceat(sims, self.first)
        out = []
        for i in np.argsort(-best):
            name = self.names[i]
            if may_use(name):
                rows = np.flatnonzero(self.owner == i)
                out.append(Score(name, float(best[i]), int(np.argmax(sims[rows]))))
        return out

    def route(self, text: str, may_use: Callable[[str], bool] = lambda _: True) -> Route:
        start = time.perf_counter()
        ranking = self.rank(text, may_use)
        fit = [s for s in ranking[: 2 if self.mode == "top2" else 1] if s.score >= self.threshold]
        if len(fit) == 2:
            w = np.exp(np.array([s.score for s in fit]) / MIX_TEMPERATURE)
            w /= w.sum()
            mix = {s.name: float(x) for s, x in zip(fit, w)}
        else:
            mix = {s.name: 1.0 for s in fit}
        return Route(mix, ranking, self.threshold, time.perf_counter() - start)
