"""The documents tool: hybrid search over the document collections the caller may read, returning numbered
chunks the answer cites as RAG chat does (``[1]``, ``[2]``; numbers go on across searches in one conversation)."""

from __future__ import annotations

from typing import Any

from fourwalls.errors import UsageError
from fourwalls.rag.answer import MIN_SIMILARITY, Answer, cited, relevant, sources_block
from fourwalls.rag.retrieve import Retriever
from fourwalls.rag.stores import Hit

NAME = "documents"
DESCRIPTION = ("Search the private document collections for facts. Returns numbered sources; cite the ones you use "
               "by their numbers in square brackets, like [1].")
PARAMETERS = {"type": "object",
              "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 300,
                                       "description": "what to look for"}},
              "required": ["query"], "additionalProperties": False}
NOTHING = "No document I may search is relevant to this query."


class Documents:
    """One conversation's document search: its collections (None: all of them), the caller's groups, and the
    sources found so far, numbered in the order the model saw them."""

    def __init__(self, retriever: Retriever, control: list[str], collection: str | None = None,
                 groups: set[str] | None = None, k: int = 5, min_similarity: float = MIN_SIMILARITY) -> None:
        self.retriever, self.control, self.collection, self.groups = retriever, control, collection, groups
        self.k, self.min_similarity = k, min_similarity
        self.sources: list[Hit] = []

    def __call__(self, query: str) -> str:
        if not query.strip():
            raise UsageError("the query is empty")
        names = [self.collection] if self.collection else [c.name for c in self.retriever.store.collections()]
        hits = [h for name in names for h in self.retriever.search(name, query, self.k, groups=self.groups)]
        hits = relevant(sorted(hits, key=lambda h: -h.score), query, self.min_similarity)[: self.k]
        if not hits:
            return NOTHING
        start = len(self.sources) + 1
        self.sources.extend(hits)
        return sources_block(hits, self.control, start)

    def citations(self, texts: list[str]) -> list[dict[str, Any]]:
        """Every source found, ``cited`` when one of ``texts`` cites its number."""
        numbers = sorted({i for t in texts for i in cited(t, len(self.sources))})
        return Answer("", self.sources, numbers).citations()
