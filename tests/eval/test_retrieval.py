"""Retrieval metrics against values worked out by hand, the BEIR readers, and their errors on bad files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fourwalls.errors import FormatError, UsageError
from fourwalls.eval.retrieval import (
    dedupe_documents,
    evaluate,
    mrr,
    ndcg,
    read_corpus,
    read_qrels,
    read_queries,
    recall,
)

RAG = Path(__file__).parent.parent / "fixtures" / "rag"

RANKED = ["d1", "d2", "d3", "d4"]
RELEVANT = {"d1": 2, "d3": 1, "d5": 2, "d9": 0}  # d5 is never retrieved; d9 is judged not relevant


def test_ndcg_by_hand() -> None:
    # DCG  = 2/log2(2) + 0/log2(3) + 1/log2(4) + 0     = 2 + 0 + 0.5         = 2.5
    # IDCG = 2/log2(2) + 2/log2(3) + 1/log2(4)         = 2 + 1.2618595 + 0.5 = 3.7618595
    assert ndcg(RANKED, RELEVANT) == pytest.approx(2.5 / (2 + 2 / math.log2(3) + 0.5))
    assert ndcg(RANKED, RELEVANT) == pytest.approx(0.664565, abs=1e-6)
    # At k=2 only d1 gains: 2 / (2 + 2/log2(3)) = 2 / 3.2618595
    assert ndcg(RANKED, RELEVANT, k=2) == pytest.approx(0.613147, abs=1e-6)
    # The ideal order scores 1.
    assert ndcg(["d1", "d5", "d3"], RELEVANT) == pytest.approx(1.0)
    # Linear gains, not 2^rel - 1: [d3, d1] = (1 + 2/log2(3)) / (2 + 1/log2(3)) = 2.2618595 / 2.6309298
    # (with 2^rel - 1 gains it would be (1 + 3/log2(3)) / (3 + 1/log2(3)) = 0.7967)
    assert ndcg(["d3", "d1"], {"d1": 2, "d3": 1}) == pytest.approx(0.859719, abs=1e-6)


def test_ndcg_edge_cases() -> None:
    assert ndcg([], RELEVANT) == 0.0
    assert ndcg(RANKED, {}) == 0.0
    assert ndcg(RANKED, {"d2": 0}) == 0.0
    # A document listed twice gains once, so nDCG cannot pass 1.
    assert ndcg(["d1", "d1"], {"d1": 1, "d2": 1}) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_recall_by_hand() -> None:
    # Relevant (score > 0): d1, d3, d5.
    assert recall(RANKED, RELEVANT, 1) == pytest.approx(1 / 3)
    assert recall(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)
    assert recall(RANKED, RELEVANT, 3) == pytest.approx(2 / 3)
    assert recall(RANKED, RELEVANT, 100) == pytest.approx(2 / 3)
    assert recall(RANKED + ["d5"], RELEVANT, 5) == 1.0
    assert recall(RANKED, {"d2": 0}, 10) == 0.0


def test_mrr_by_hand() -> None:
    assert mrr(RANKED, RELEVANT) == 1.0
    assert mrr(["d2", "d9", "d3"], RELEVANT) == pytest.approx(1 / 3)  # d9 is judged 0, so not the first hit
    assert mrr(["d2", "d9", "d3"], RELEVANT, k=2) == 0.0
    assert mrr(["d2"], RELEVANT) == 0.0


def test_evaluate_averages_over_judged_queries() -> None:
    qrels = {
        "q1": {"a": 1},  # found at rank 2
        "q2": {"b": 2, "c": 1},  # b at rank 1, c never
        "q3": {"x": 1},  # absent from the run: counts as 0
        "q4": {"y": 0},  # nothing relevant: not averaged
    }
    run = {"q1": ["z", "a"], "q2": ["b", "z"], "q4": ["y"], "q5": ["a"]}
    r = evaluate(run, qrels, ks=(1, 5))
    assert set(r) == {"ndcg@10", "recall@1", "recall@5", "mrr", "queries"}
    assert r["queries"] == 3
    # q1: 1/log2(3) = 0.6309298; q2: 2 / (2 + 1/log2(3)) = 2/2.6309298 = 0.7601875; q3: 0
    assert r["ndcg@10"] == pytest.approx((1 / math.log2(3) + 2 / (2 + 1 / math.log2(3))) / 3)
    assert r["recall@1"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert r["recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["mrr"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_evaluate_default_keys_and_errors() -> None:
    r = evaluate({"q": ["a"]}, {"q": {"a": 1}})
    assert r == {"ndcg@10": 1.0, "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "recall@100": 1.0,
                 "mrr": 1.0, "queries": 1}
    with pytest.raises(UsageError, match="score > 0"):
        evaluate({"q": ["a"]}, {"q": {"a": 0}})
    with pytest.raises(UsageError, match="at least 1"):
        evaluate({"q": ["a"]}, {"q": {"a": 1}}, ks=(0, 10))


def test_dedupe_documents_keeps_first_rank() -> None:
    assert dedupe_documents(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert dedupe_documents([]) == []


def test_ndcg_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    ranked = [f"d{i}" for i in range(12)]
    relevant = {"d0": 1, "d2": 2, "d5": 1, "d11": 2, "d99": 2}  # d11 beyond k, d99 never retrieved
    docs = ranked + ["d99"]
    y_true = [[relevant.get(d, 0) for d in docs]]
    y_score = [[len(docs) - i for i in range(len(docs))]]  # distinct scores in ranked order
    for k in (1, 3, 5, 10):
        assert ndcg(ranked, relevant, k) == pytest.approx(metrics.ndcg_score(y_true, y_score, k=k))


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
