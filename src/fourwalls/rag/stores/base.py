"""The types every document store shares: collections, documents, chunks, hits, the store protocol, and the
query-text rules both engines apply."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fourwalls.errors import UsageError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(f"invalid collection name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


@dataclass
class Collection:
    name: str
    embedder: str
    dim: int
    documents: int = 0
    chunks: int = 0
    created: str = ""


@dataclass
class DocumentInfo:
    source: str
    digest: str
    title: str
    groups: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    ingested: str = ""

    def readable(self, groups: set[str] | None) -> bool:
        """Whether a caller of ``groups`` may read it (None: no restriction; no groups: readable by everyone)."""
        return groups is None or not self.groups or bool(groups.intersection(self.groups))


@dataclass
class ChunkRow:
    text: str
    start: int
    end: int
    heading: str | None = None
    page: int | None = None


@dataclass
class Hit:
    """One retrieved chunk with where it came from; scores are filled by whichever searches found it."""

    id: int
    text: str
    source: str
    title: str
    heading: str | None
    page: int | None
    start: int
    end: int
    groups: list[str]
    score: float = 0.0
    bm25: float | None = None
    similarity: float | None = None

    def location(self) -> str:
        """"Title > heading path" (a Markdown H1 that is the title is not repeated)."""
        return headed(self.title, self.heading)

    def citation(self) -> dict:
        return {"source": self.source, "title": self.title, "heading": self.heading, "page": self.page,
                "span": [self.start, self.end], "score": round(self.score, 6),
                "similarity": None if self.similarity is None else round(self.similarity, 4)}


class DocumentStore(Protocol):
    """A document store (SQLite or PostgreSQL): collections of documents, their chunks and vectors."""

    def create_collection(self, name: str, embedder: str, dim: int) -> Collection: ...
    def collection(self, name: str) -> Collection: ...  # NotFoundError when absent
    def collections(self) -> list[Collection]: ...
    def drop_collection(self, name: str) -> None: ...
    def documents(self, collection: str) -> list[DocumentInfo]: ...
    def document(self, collection: str, source: str) -> DocumentInfo | None: ...
    def put_document(self, collection: str, doc: DocumentInfo, chunks: list[ChunkRow], vectors: np.ndarray) -> None:
        """Insert or replace a document with its chunks and vectors, atomically."""
    def delete_document(self, collection: str, source: str) -> bool: ...
    def chunks(self, collection: str, source: str) -> list[Hit]: ...
    def all_chunks(self, collection: str) -> list[Hit]: ...  # every chunk, in id order, for re-embedding
    def replace_vectors(self, collection: str, embedder: str, dim: int, ids: list[int], vectors: np.ndarray) -> None:
        """Swap every vector of a collection (a new embedder), atomically."""
    def search_text(self, collection: str, query: str, k: int, groups: set[str] | None = None,
                    where: dict[str, str] | None = None) -> list[Hit]: ...
    def search_vector(self, collection: str, vector: np.ndarray, k: int, groups: set[str] | None = None,
                      where: dict[str, str] | None = None) -> list[Hit]: ...
    def close(self) -> None: ...


STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its me my no not of on or "
    "our so than that the their them then there these they this to was we were what when where which who why will "
    "with you your s t".split())


def query_terms(query: str) -> list[str]:
    """The words a full-text search looks for: lower-cased, stopwords dropped unless nothing else is left."""
    words = re.findall(r"\w+", query.lower())
    if not words:
        raise UsageError("the query has no terms to search for")
    kept = [w for w in words if w not in STOPWORDS]
    return list(dict.fromkeys(kept or words))


def headed(title: str, heading: str | None) -> str:
    """A chunk's place: its document's title and heading path, the title once."""
    if not heading:
        return title
    return heading if heading == title or heading.startswith(title + " > ") else f"{title} > {heading}"


def indexed_text(title: str, heading: str | None, text: str) -> str:
    """What is indexed and embedded for a chunk: its text under its document's title and heading, for context."""
    return "\n".join(filter(None, (headed(title, heading), text)))
