"""RAG figures, one JSON line: ingestion speed against plain sentence-transformers, query latency at 10k and 100k
chunks on both stores, and retrieval quality on the labelled test set.

    python benchmarks/rag.py [--passages 256] [--sizes 10000,100000] [--pg]

- Ingestion: passages of about 125 tokens cut from tinyshakespeare go through `ingest()` into a fresh SQLite store
  (chunking, embedding, writing), float32 and int8 embedders; the reference is sentence-transformers encoding the
  same chunk texts with the same packaged model, timed in the same run.
- Latency: collections of N chunks whose texts are real passages and whose vectors are real embeddings of 2,000 of
  them repeated with a little noise (exact kNN cost depends on the count, not the content), every other document
  in a group; then hybrid searches (query embedding + BM25 + kNN + fusion) for the labelled set's queries, p50/p95
  over them, unrestricted and as a key of no group (which reads half of the chunks).
- Quality: nDCG@10 of hybrid, BM25 and vector retrieval on tests/fixtures/rag, float32 and int8 embedders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "tests" / "fixtures" / "rag"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def passages(n: int, seed: int = 0) -> list[str]:
    words = SHAKESPEARE.read_text().split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(70, 95))  # about 125 WordPiece tokens
        s = int(rng.integers(0, len(words) - k))
        out.append(" ".join(words[s:s + k]))
    return out


def ingestion(n: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from fourwalls.rag.embed import Embedder, default_folder
    from fourwalls.rag.ingest import Item, ingest
    from fourwalls.rag.loaders import load_text
    from fourwalls.rag.stores import indexed_text
    from fourwalls.rag.stores.sqlite import SqliteStore

    texts = passages(n)
    items = [Item(f"p{i}", f"d{i}", lambda i=i, t=t: load_text(f"p{i}", t, title="Shakespeare")) for i, t in
             enumerate(texts)]
    out = {"passages": n}
    st = SentenceTransformer(str(default_folder()), device="cpu")
    chunk_texts = [indexed_text("Shakespeare", None, t) for t in texts]
    st.encode(chunk_texts[:32])
    t = time.perf_counter()
    st.encode(chunk_texts, batch_size=32)
    out["sentence_transformers_per_s"] = round(n / (time.perf_counter() - t), 1)
    for name, quantize in (("float32", False), ("int8", True)):
        emb = Embedder(quantize=quantize)
        emb.embed(chunk_texts[:32])
        with tempfile.TemporaryDirectory() as d:
            store = SqliteStore(Path(d) / "rag.db")
            r = ingest(store, emb, items, "bench", progress=False)
            store.close()
        out[f"ingest_{name}_chunks_per_s"] = round(r.chunks / r.seconds, 1)
        out[f"ingest_{name}_embed_share"] = round(r.embed_seconds / r.seconds, 3)
        out[f"ingest_{name}_vs_sentence_transformers"] = round(r.chunks / r.seconds / out[
            "sentence_transformers_per_s"], 2)
    return out


def fill(store, emb, size: int, base_texts: list[str], base_vectors: np.ndarray, per_doc: int = 100) -> float:
    from fourwalls.rag.stores import ChunkRow, DocumentInfo

    store.create_collection("lat", emb.name, emb.dim)
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    for d in range(0, size, per_doc):
        idx = [(d + j) % len(base_texts) for j in range(per_doc)]
        vectors = base_vectors[idx] + rng.normal(0, 0.02, (per_doc, emb.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = [ChunkRow(base_texts[i], 0, len(base_texts[i])) for i in idx]
        store.put_document("lat", DocumentInfo(f"doc{d}", f"x{d}", f"Document {d}", groups=["g"] if d % 2 else []),
                           rows, vectors)
    return time.perf_counter() - t


def latency(sizes: list[int], pg: str | None) -> dict:
    from fourwalls.rag.beir import read_queries
    from fourwalls.rag.embed import Embedder
    from fourwalls.rag.retrieve import Retriever
    from fourwalls.rag.stores.sqlite import SqliteStore

    emb = Embedder()
    base = passages(2000, seed=2)
    vectors = emb.embed(base)
    queries = list(read_queries(LABELLED / "queries.jsonl").values())
    out = {}
    engines = [("sqlite", None)] + ([("postgresql", pg)] if pg else [])
    for size in sizes:
        for engine, url in engines:
            with tempfile.TemporaryDirectory() as d:
                if url:
                    from fourwalls.rag.stores.postgres import PostgresStore

                    store = PostgresStore(url)
                    for c in store.collections():
                        store.drop_collection(c.name)
                else:
                    store = SqliteStore(Path(d) / "rag.db")
                load_s = fill(store, emb, size, base, vectors)
                r = Retriever(store, emb)
                for q in queries[:3]:
                    r.search("lat", q, 10)
                for label, groups in (("", None), ("_filtered", set())):  # filtered: a key of no group reads half
                    times = []
                    for q in queries:
                        t = time.perf_counter()
                        r.search("lat", q, 10, groups=groups)
                        times.append((time.perf_counter() - t) * 1000)
                    q = statistics.quantiles(times, n=20)
                    out[f"{engine}_{size}{label}_p50_ms"] = round(statistics.median(times), 1)
                    out[f"{engine}_{size}{label}_p95_ms"] = round(q[18], 1)
                out[f"{engine}_{size}_load_s"] = round(load_s, 1)
                store.close()
    return out


def quality() -> dict:
    from fourwalls.eval.retrieval import evaluate_retriever
    from fourwalls.rag.beir import read_qrels, read_queries
    from fourwalls.rag.embed import Embedder
    from fourwalls.rag.ingest import beir_items, ingest
    from fourwalls.rag.retrieve import Retriever
    from fourwalls.rag.stores.sqlite import SqliteStore

    queries, qrels = read_queries(LABELLED / "queries.jsonl"), read_qrels(LABELLED / "qrels.tsv")
    out = {}
    for name, quantize in (("float32", False), ("int8", True)):
        emb = Embedder(quantize=quantize)
        with tempfile.TemporaryDirectory() as d:
            store = SqliteStore(Path(d) / "rag.db")
            ingest(store, emb, beir_items(LABELLED / "corpus.jsonl"), "nw", progress=False)
            r = Retriever(store, emb)
            for mode in ("hybrid", "bm25", "vector"):
                out[f"ndcg10_{mode}_{name}"] = round(evaluate_retriever(r, "nw", queries, qrels, mode)["ndcg@10"], 4)
            store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=256)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--pg", action="store_true", help="also PostgreSQL: starts a private server (tests/rag/pg.py)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    figures = {"threads": torch.get_num_threads()}
    stop = None
    pg = None
    if args.pg:
        sys.path.insert(0, str(ROOT))
        from tests.rag.pg import start_postgres

        pg, stop = start_postgres(tempfile.mkdtemp())
    try:
        figures |= ingestion(args.passages)
        figures |= quality()
        figures |= latency([int(s) for s in args.sizes.split(",")], pg)
    finally:
        if stop:
            stop()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
