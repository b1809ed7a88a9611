"""Retrieval-augmented generation: ingest documents, embed them, retrieve passages, answer with citations."""
