"""The BEIR readers (corpus, queries, qrels), their errors on bad files, and the labelled set under tests/fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from fourwalls.errors import FormatError, UsageError
from fourwalls.rag.beir import read_corpus, read_qrels, read_queries

RAG = Path(__file__).parent.parent / "fixtures" / "rag"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_beir_files(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.jsonl", '{"_id": "d1", "title": "T", "text": "one"}\n\n'
                                             '{"_id": 2, "text": "two"}\n')
    assert list(read_corpus(corpus)) == [("d1", "T", "one"), ("2", "", "two")]
    queries = write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "what?", "metadata": {}}\n')
    assert read_queries(queries) == {"q1": "what?"}
    with_header = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t2\t0\r\nq2\td1\t1\n")
    without = write(tmp_path / "bare.tsv", "q1\td1\t2\nq1\t2\t0\nq2\td1\t1\n")
    assert read_qrels(with_header) == read_qrels(without) == {"q1": {"d1": 2, "2": 0}, "q2": {"d1": 1}}


@pytest.mark.parametrize("text, message", [
    ('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n', r"corpus\.jsonl:2: not valid JSON"),
    ('["d1", "text"]\n', r"corpus\.jsonl:1: expected a JSON object"),
    ('{"_id": "d1", "text": "ok"}\n\n{"title": "t", "text": "x"}\n', r'corpus\.jsonl:3: missing field "_id"'),
    ('{"_id": "d1", "title": "t"}\n', r'corpus\.jsonl:1: missing field "text"'),
    ('{"_id": "d1", "text": 5}\n', r'corpus\.jsonl:1: field "text" must be a string'),
])
def test_bad_corpus(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        list(read_corpus(write(tmp_path / "corpus.jsonl", text)))


def test_bad_queries(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r'queries\.jsonl:2: missing field "text"'):
        read_queries(write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q2"}\n'))
    with pytest.raises(FormatError, match=r"queries\.jsonl:1: not valid JSON"):
        read_queries(write(tmp_path / "queries.jsonl", "{'_id': 'q1'}\n"))
    with pytest.raises(FormatError, match=r'queries\.jsonl:2: duplicate query id "q1"'):
        read_queries(write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n'))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"_id": "q1", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8"):
        read_queries(latin1)


@pytest.mark.parametrize("text, message", [
    ("query-id\tcorpus-id\tscore\nq1\td1\n", r"qrels\.tsv:2: expected 3 tab-separated columns.*got 2"),
    ("q1\td1\t1\nq1 d2 1\n", r"qrels\.tsv:2: expected 3 tab-separated columns.*got 1"),
    ("q1\td1\t1\tx\n", r"qrels\.tsv:1: expected 3 tab-separated columns.*got 4"),
    ("q1\td1\t1\nq2\td2\thigh\n", r'qrels\.tsv:2: score must be an integer, got "high"'),
    ("q1\td1\t1.5\n", r"qrels\.tsv:1: score must be an integer"),
    ("query-id\tcorpus-id\tscore\nquery-id\tcorpus-id\tscore\n", r"qrels\.tsv:2: score must be an integer"),
    ("q1\t\t1\n", r"qrels\.tsv:1: empty query or document id"),
    ("q1\td1\t1\nq1\td1\t2\n", r'qrels\.tsv:2: duplicate judgement of document "d1" for query "q1"'),
])
def test_bad_qrels(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_qrels(write(tmp_path / "qrels.tsv", text))


def test_missing_files_are_usage_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UsageError, match="no such corpus file: .*nope.jsonl"):
        read_corpus(missing)  # fails at the call, before iteration
    with pytest.raises(UsageError, match="no such queries file"):
        read_queries(missing)
    with pytest.raises(UsageError, match="no such qrels file"):
        read_qrels(tmp_path / "nope.tsv")


def test_fixture_set_is_consistent() -> None:
    """The labelled set under tests/fixtures/rag: every judged query and document exists, grades are 1 or 2."""
    docs = {doc_id: (title, text) for doc_id, title, text in read_corpus(RAG / "corpus.jsonl")}
    queries = read_queries(RAG / "queries.jsonl")
    qrels = read_qrels(RAG / "qrels.tsv")
    assert 40 <= len(docs) <= 60 and 25 <= len(queries) <= 35
    assert set(qrels) == set(queries)
    for judged in qrels.values():
        assert 1 <= len(judged) <= 3
        assert set(judged) <= set(docs)
        assert set(judged.values()) <= {1, 2}
