"""Retrieval metrics against values worked out by hand (the BEIR readers: tests/rag/test_beir.py)."""

from __future__ import annotations

import math

import pytest

from fourwalls.errors import UsageError
from fourwalls.eval.retrieval import dedupe_documents, evaluate, mrr, ndcg, recall

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
