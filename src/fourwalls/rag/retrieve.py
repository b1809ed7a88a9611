"""Hybrid retrieval: BM25 and vector search, each over the chunks the caller may read, fused by reciprocal rank.

Reciprocal rank fusion (Cormack et al., 2009) scores a chunk ``sum(w / (60 + rank))`` over the lists that found it:
it needs no calibration between BM25 scores and cosine similarities, and a chunk that both searches rank well
beats one that only a single search likes. Filters (groups, document metadata) go into each search, so the top k
is cut after them, never before.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fourwalls.errors import UsageError
from fourwalls.rag.embed import Embedder, check_embedder
from fourwalls.rag.stores import DocumentStore, Hit

MODES = ("hybrid", "bm25", "vector")
RRF_K = 60


@dataclass
class Retriever:
    store: DocumentStore
    embedder: Embedder
    bm25_weight: float = 1.0
    vector_weight: float = 1.0
    candidates: int = 50  # how deep each list is read before fusing

    def search(self, collection: str, query: str, k: int = 5, mode: str = "hybrid", groups: set[str] | None = None,
               where: dict[str, str] | None = None) -> list[Hit]:
        """The k best chunks for ``query``, best first, with ``score`` (fused, or the single search's own)."""
        if mode not in MODES:
            raise UsageError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
        if k < 1:
            raise UsageError(f"k must be at least 1 (got {k})")
        if not query.strip():
            raise UsageError("the query is empty")
        check_embedder(self.store.collection(collection), self.embedder)
        depth = max(k, self.candidates) if mode == "hybrid" else k
        lists: list[tuple[float, list[Hit]]] = []
        with ThreadPoolExecutor(1) as pool:  # the query's embedding is computed while BM25 searches
            vector = pool.submit(self.embedder.embed, [query]) if mode != "bm25" else None
            if mode in ("hybrid", "bm25"):
                lists.append((self.bm25_weight, self.store.search_text(collection, query, depth, groups, where)))
            if vector is not None:
                lists.append((self.vector_weight, self.store.search_vector(collection, vector.result()[0], depth,
                                                                           groups, where)))
        if mode != "hybrid":
            return lists[0][1]
        return fuse(lists)[:k]


def fuse(lists: list[tuple[float, list[Hit]]]) -> list[Hit]:
    """Reciprocal rank fusion of ranked lists (weight, hits); a chunk's scores from every list are kept."""
    fused: dict[int, Hit] = {}
    for weight, hits in lists:
        for rank, h in enumerate(hits, 1):
            into = fused.setdefault(h.id, h)
            if into is not h:  # found by an earlier list too: keep both searches' scores
                into.bm25 = into.bm25 if h.bm25 is None else h.bm25
                into.similarity = into.similarity if h.similarity is None else h.similarity
            into.score = (0.0 if into is h else into.score) + weight / (RRF_K + rank)
    return sorted(fused.values(), key=lambda h: -h.score)
