"""Where collections live: one interface, two engines (SQLite by default, PostgreSQL + pgvector to scale out).

A store holds collections; a collection holds documents; a document holds chunks, each with its text (indexed for
full-text search) and its embedding (indexed for nearest-neighbour search). A document and all of its rows are
written and removed in one transaction: a reader or a crash never sees half a document.

Access control: a document carries the groups that may read it; one with no groups is readable by everyone who can
read the collection. Searches take ``groups`` (None: no restriction, for the local CLI and admin keys) and
``where`` (document metadata that must match exactly) and apply both inside the query, before the top k is cut.
"""

from __future__ import annotations

from fourwalls.rag.stores.base import (
    NAME,
    STOPWORDS,
    ChunkRow,
    Collection,
    DocumentInfo,
    DocumentStore,
    Hit,
    check_name,
    headed,
    indexed_text,
    query_terms,
)

__all__ = ["NAME", "STOPWORDS", "ChunkRow", "Collection", "DocumentInfo", "DocumentStore", "Hit", "check_name",
           "headed", "indexed_text", "open_store", "query_terms"]


def open_store(url: str | None = None) -> DocumentStore:
    """``None``: the home's SQLite file; ``postgresql://...``: a PostgreSQL server; else a SQLite file path."""
    if url and url.startswith(("postgresql://", "postgres://")):
        from fourwalls.rag.stores.postgres import PostgresStore

        return PostgresStore(url)
    from fourwalls.rag.stores.sqlite import SqliteStore

    return SqliteStore(url)
