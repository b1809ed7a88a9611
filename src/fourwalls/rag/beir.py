"""BEIR-format data: a corpus (``corpus.jsonl``) to ingest, and queries (``queries.jsonl``) with relevance
judgements (a qrels TSV) to evaluate retrieval on; every reading error names the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fourwalls.errors import FormatError, UsageError

QRELS_HEADER = ["query-id", "corpus-id", "score"]


def _open(path: Path, what: str) -> IO[str]:
    """Open a UTF-8 text file for reading; a missing or unreadable one is a UsageError naming it."""
    try:
        return Path(path).open(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such {what}: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def _lines(f: IO[str], path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) for each non-blank line, closing ``f`` at the end."""
    with f:
        try:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield n, line
        except UnicodeDecodeError:
            raise FormatError(f"{path} is not UTF-8 text") from None


def _records(f: IO[str], path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for each JSON line."""
    for n, line in _lines(f, path):
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _field(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise FormatError(f'{where}: missing field "{key}"')
    if isinstance(value, int) and not isinstance(value, bool) and key == "_id":
        return str(value)
    if not isinstance(value, str):
        raise FormatError(f'{where}: field "{key}" must be a string, got {type(value).__name__}')
    return value


def read_corpus(path: Path) -> Iterator[tuple[str, str, str]]:
    """(id, title, text) for each line of a BEIR ``corpus.jsonl`` ({"_id", "title", "text"}; title may be absent)."""
    f = _open(path, "corpus file")  # opened now, so a missing file fails at the call, not at the first next()

    def documents() -> Iterator[tuple[str, str, str]]:
        for where, obj in _records(f, path):
            yield _field(obj, "_id", where), _field(obj, "title", where, ""), _field(obj, "text", where)

    return documents()


def read_queries(path: Path) -> dict[str, str]:
    """{query id: text} from a BEIR ``queries.jsonl`` ({"_id", "text"})."""
    queries: dict[str, str] = {}
    for where, obj in _records(_open(path, "queries file"), path):
        qid = _field(obj, "_id", where)
        if qid in queries:
            raise FormatError(f'{where}: duplicate query id "{qid}"')
        queries[qid] = _field(obj, "text", where)
    return queries


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """{query id: {document id: score}} from a BEIR qrels TSV (query-id, corpus-id, score; the header is optional)."""
    qrels: dict[str, dict[str, int]] = {}
    first = True
    for n, line in _lines(_open(path, "qrels file"), path):
        cols = line.split("\t")
        if first and [c.strip().lower() for c in cols] == QRELS_HEADER:
            first = False
            continue
        first = False
        where = f"{path}:{n}"
        if len(cols) != 3:
            raise FormatError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                              f"got {len(cols)}")
        qid, did, score = (c.strip() for c in cols)
        if not qid or not did:
            raise FormatError(f"{where}: empty query or document id")
        try:
            value = int(score)
        except ValueError:
            raise FormatError(f'{where}: score must be an integer, got "{score}"') from None
        docs = qrels.setdefault(qid, {})
        if did in docs:
            raise FormatError(f'{where}: duplicate judgement of document "{did}" for query "{qid}"')
        docs[did] = value
    return qrels
