"""Retrieval evaluation on BEIR-format data: read corpus, queries and qrels; score rankings by nDCG, recall and MRR.

Metrics follow BEIR and trec_eval: graded gains are the qrels score itself (not 2^rel - 1), discounted by
log2(rank + 1); a document counts as relevant when its score is above 0; a document listed twice in a ranking
gains nothing the second time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
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
