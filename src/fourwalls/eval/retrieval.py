"""Retrieval evaluation: score rankings by nDCG, recall and MRR against relevance judgements (read BEIR files with
``fourwalls.rag.beir``).

Metrics follow BEIR and trec_eval: graded gains are the qrels score itself (not 2^rel - 1), discounted by
log2(rank + 1); a document counts as relevant when its score is above 0; a document listed twice in a ranking
gains nothing the second time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from fourwalls.errors import UsageError


def _gains(ranked: Iterable[str], relevant: dict[str, int]) -> Iterator[int]:
    """The graded gain at each rank; a repeated document gains 0."""
    seen: set[str] = set()
    for doc in ranked:
        yield max(relevant.get(doc, 0), 0) if doc not in seen else 0
        seen.add(doc)


def ndcg(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """nDCG@k with linear gains (gain = qrels score) and a log2 discount; 0.0 when nothing is relevant."""
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(_gains(ranked[:k], relevant)))
    ideal = sorted((s for s in relevant.values() if s > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """Fraction of the relevant documents (score > 0) found in the top ``k``; 0.0 when nothing is relevant."""
    wanted = {d for d, s in relevant.items() if s > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr(ranked: list[str], relevant: dict[str, int], k: int | None = None) -> float:
    """Reciprocal rank of the first relevant document (in the top ``k``, or anywhere when None); 0.0 if none."""
    for i, doc in enumerate(ranked if k is None else ranked[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate(run: dict[str, list[str]], qrels: dict[str, dict[str, int]],
             ks: Iterable[int] = (1, 5, 10, 100)) -> dict[str, float]:
    """Mean nDCG@10, recall@k for each k, and MRR over the queries with a relevant document in ``qrels``.

    ``run`` maps query id to ranked document ids; a judged query missing from it scores 0, and queries that are
    not judged are ignored. ``queries`` in the result is how many queries were averaged.
    """
    judged = [q for q, docs in qrels.items() if any(s > 0 for s in docs.values())]
    if not judged:
        raise UsageError("the qrels judge no document relevant (score > 0) to any query; nothing to evaluate")
    cutoffs = sorted(set(ks))
    if any(k < 1 for k in cutoffs):
        raise UsageError(f"cut-offs must be at least 1, got {cutoffs}")
    totals = dict.fromkeys(["ndcg@10", *(f"recall@{k}" for k in cutoffs), "mrr"], 0.0)
    for q in judged:
        ranked, rel = run.get(q, []), qrels[q]
        totals["ndcg@10"] += ndcg(ranked, rel, 10)
        for k in cutoffs:
            totals[f"recall@{k}"] += recall(ranked, rel, k)
        totals["mrr"] += mrr(ranked, rel)
    result = {name: total / len(judged) for name, total in totals.items()}
    result["queries"] = float(len(judged))
    return result


def dedupe_documents(ranked_chunks: list[str]) -> list[str]:
    """Ranked document ids from the document ids of ranked chunks: each document at its best chunk's rank."""
    return list(dict.fromkeys(ranked_chunks))


DOCUMENT_ID = ("a document's source as stored (a BEIR corpus' _id, or a file's absolute path), its path relative to "
               "the ingested folder, or its file name, each with or without the file's suffix")


def source_keys(source: str) -> set[str]:
    """Every id that names a stored source: the source, each tail of its path, each without the file's suffix."""
    parts = PurePosixPath(source).parts
    tails = {"/".join(parts[i:]) for i in range(len(parts))} - {"/"}
    return {source} | tails | {str(PurePosixPath(t).with_suffix("")) for t in tails if PurePosixPath(t).suffix}


def match_qrels(qrels: dict[str, dict[str, int]], sources: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """``qrels`` with each document id replaced by the stored source it names (see DOCUMENT_ID), and the ids that
    name no source, or more than one."""
    named: dict[str, set[str]] = {}
    for source in sources:
        for key in source_keys(source):
            named.setdefault(key, set()).add(source)
    exact = set(sources)
    out: dict[str, dict[str, int]] = {}
    unknown: set[str] = set()
    for query, docs in qrels.items():
        for doc, score in docs.items():
            found = {doc} if doc in exact else named.get(doc, set())
            if len(found) == 1:
                out.setdefault(query, {})[next(iter(found))] = score
            else:
                unknown.add(doc)
    return out, sorted(unknown)


def evaluate_retriever(retriever, collection: str, queries: dict[str, str], qrels: dict[str, dict[str, int]],
                       mode: str = "hybrid", depth: int = 100) -> dict[str, float]:
    """Search ``collection`` for every judged query and score the documents found (a document ranks where its
    best chunk does; documents are identified by their source, the corpus ``_id`` of a BEIR ingest)."""
    judged = [q for q in queries if any(s > 0 for s in qrels.get(q, {}).values())]
    run = {q: dedupe_documents([h.source for h in retriever.search(collection, queries[q], depth, mode)])
           for q in judged}
    return evaluate(run, qrels)


def plot_modes(results: dict[str, dict[str, float]], path: Path) -> None:
    """Bars of nDCG@10, recall@10 and MRR per retrieval mode, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fourwalls.files import atomic_write

    metrics = [m for m in ("ndcg@10", "recall@10", "mrr") if all(m in r for r in results.values())]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(results)
    for i, (mode, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, [r[m] for m in metrics], width, label=mode)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title("retrieval quality by mode")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
