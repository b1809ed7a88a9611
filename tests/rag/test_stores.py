"""One suite for both stores (SQLite; PostgreSQL + pgvector): collections, documents, searches, access control.

Vectors are small (8 dimensions), random but seeded, and normalized; no embedding model is involved.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from fourwalls.errors import NotFoundError, UsageError
from fourwalls.rag.stores import ChunkRow, DocumentInfo
from fourwalls.rag.stores.sqlite import SqliteStore
from tests.rag import conftest

DIM = 8


@pytest.fixture
def pg(request):
    s = conftest.open_postgres(request)
    yield s
    s.close()


def unit(seed: int, n: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(v: np.ndarray, noise: float, seed: int, n: int) -> np.ndarray:
    """n unit vectors within about ``noise`` of v."""
    out = v + noise * unit(seed, n, v.shape[-1])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def info(source: str, groups=(), meta=None, title: str = "") -> DocumentInfo:
    return DocumentInfo(source=source, digest=f"sha256:{source}", title=title or source.removesuffix(".md"),
                        groups=list(groups), meta=dict(meta or {}))


def rows(*texts: str) -> list[ChunkRow]:
    out, pos = [], 0
    for t in texts:
        out.append(ChunkRow(text=t, start=pos, end=pos + len(t)))
        pos += len(t) + 2
    return out


def put(store, collection: str, source: str, texts: list[str], vectors: np.ndarray, **kw) -> None:
    store.put_document(collection, info(source, **kw), rows(*texts), vectors)


def sources(hits) -> list[str]:
    return [h.source for h in hits]


def is_iso_utc(s: str) -> bool:
    t = datetime.fromisoformat(s)
    return t.tzinfo is not None and t.utcoffset().total_seconds() == 0 and t.microsecond == 0 and \
        abs((datetime.now(UTC) - t).total_seconds()) < 600


# collections


def test_create_list_show_drop(store):
    c = store.create_collection("notes", "all-minilm-l6-v2", DIM)
    assert (c.name, c.embedder, c.dim, c.documents, c.chunks) == ("notes", "all-minilm-l6-v2", DIM, 0, 0)
    assert is_iso_utc(c.created)
    store.create_collection("Alpha.v1_x-2", "e", 4)
    assert [x.name for x in store.collections()] == ["Alpha.v1_x-2", "notes"]
    assert store.collection("notes") == c
    put(store, "notes", "a.md", ["one", "two"], unit(1, 2))
    put(store, "notes", "b.md", ["three"], unit(2, 1))
    got = store.collection("notes")
    assert (got.documents, got.chunks) == (2, 3)
    assert [(x.name, x.documents, x.chunks) for x in store.collections()] == [("Alpha.v1_x-2", 0, 0), ("notes", 2, 3)]
    store.drop_collection("notes")
    assert [x.name for x in store.collections()] == ["Alpha.v1_x-2"]
    with pytest.raises(NotFoundError):
        store.collection("notes")
    # The name is free again, and the new collection starts empty.
    store.create_collection("notes", "e", DIM)
    assert store.documents("notes") == [] and store.search_text("notes", "three", 5) == []
    assert store.search_vector("notes", unit(2, 1)[0], 5) == []


def test_duplicate_and_missing_collections(store):
    store.create_collection("docs", "e", DIM)
    with pytest.raises(UsageError, match="already exists"):
        store.create_collection("docs", "other", 4)
    assert store.collection("docs").embedder == "e"
    q = unit(0, 1)[0]
    for call in (lambda: store.collection("nope"), lambda: store.drop_collection("nope"),
                 lambda: store.documents("nope"), lambda: store.document("nope", "a.md"),
                 lambda: put(store, "nope", "a.md", ["x"], unit(0, 1)), lambda: store.delete_document("nope", "a"),
                 lambda: store.chunks("nope", "a.md"), lambda: store.all_chunks("nope"),
                 lambda: store.replace_vectors("nope", "e", DIM, [], np.zeros((0, DIM))),
                 lambda: store.search_text("nope", "word", 3), lambda: store.search_vector("nope", q, 3)):
        with pytest.raises(NotFoundError, match="no collection named 'nope'"):
            call()


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a b", "a/b", "x" * 65, "naïve", "semi;colon", "q'uote"])
def test_bad_names_refused(store, name):
    with pytest.raises(UsageError, match="invalid collection name"):
        store.create_collection(name, "e", DIM)
    assert store.collections() == []


# documents


def test_put_document_round_trip(store):
    store.create_collection("c", "e", DIM)
    doc = DocumentInfo(source="guides/install.md", digest="sha256:abc", title="Install guide",
                       groups=["ops", "dev", "ops"], meta={"lang": "en", "team": "platform"})
    chunks = [ChunkRow("First, download the installer.", 0, 30, heading="Download", page=1),
              ChunkRow("Then run it as root.", 32, 52, heading="Run", page=2),
              ChunkRow("Done.", 54, 59)]
    store.put_document("c", doc, chunks, unit(3, 3))
    [got] = store.documents("c")
    assert got == store.document("c", "guides/install.md")
    assert (got.source, got.digest, got.title, got.groups, got.meta, got.chunks) == \
        ("guides/install.md", "sha256:abc", "Install guide", ["dev", "ops"], {"lang": "en", "team": "platform"}, 3)
    assert is_iso_utc(got.ingested)
    assert store.document("c", "missing.md") is None
    hits = store.chunks("c", "guides/install.md")
    assert [(h.text, h.start, h.end, h.heading, h.page) for h in hits] == \
        [(c.text, c.start, c.end, c.heading, c.page) for c in chunks]
    assert all(h.source == "guides/install.md" and h.title == "Install guide" and h.groups == ["dev", "ops"]
               for h in hits)
    assert all(h.bm25 is None and h.similarity is None for h in hits)
    assert store.chunks("c", "missing.md") == []
    assert store.all_chunks("c") == hits
    # documents() is ordered by source, byte-wise.
    for source in ["b.md", "B.md", "a/z.md"]:
        put(store, "c", source, ["x"], unit(4, 1))
    assert [d.source for d in store.documents("c")] == ["B.md", "a/z.md", "b.md", "guides/install.md"]


def test_put_document_again_replaces_it(store):
    store.create_collection("c", "e", DIM)
    old = unit(5, 3)
    put(store, "c", "a.md", ["alpha apples", "alpha bananas", "alpha cherries"], old, groups=["A"])
    put(store, "c", "other.md", ["unrelated text"], unit(6, 1))
    old_ids = {h.id for h in store.chunks("c", "a.md")}
    new = unit(7, 2)
    store.put_document("c", DocumentInfo("a.md", "sha256:v2", "A v2", [], {"v": "2"}), rows("omega one", "omega two"),
                       new)
    got = store.document("c", "a.md")
    assert (got.digest, got.title, got.groups, got.meta, got.chunks) == ("sha256:v2", "A v2", [], {"v": "2"}, 2)
    hits = store.chunks("c", "a.md")
    assert [h.text for h in hits] == ["omega one", "omega two"] and not old_ids & {h.id for h in hits}
    assert [h.text for h in store.all_chunks("c")] == ["unrelated text", "omega one", "omega two"]
    c = store.collection("c")
    assert (c.documents, c.chunks) == (2, 3)
    # The old chunks are gone from both indexes too.
    assert store.search_text("c", "alpha apples", 10) == []
    assert store.search_text("c", "omega", 10)[0].source == "a.md"
    found = store.search_vector("c", old[0], 10)
    assert len(found) == 3 and not old_ids & {h.id for h in found}
    assert store.search_vector("c", new[1], 1)[0].text == "omega two"


def test_put_document_bad_shape_writes_nothing(store):
    store.create_collection("c", "e", DIM)
    put(store, "c", "a.md", ["kept"], unit(8, 1))
    with pytest.raises(UsageError):
        put(store, "c", "a.md", ["x", "y"], unit(8, 1))  # one vector for two chunks
    with pytest.raises(UsageError):
        put(store, "c", "a.md", ["x"], unit(8, 1, dim=4))  # wrong dimension
    assert [h.text for h in store.chunks("c", "a.md")] == ["kept"]


def test_put_document_is_atomic(store):
    """A failure half way through (a chunk the database refuses) leaves the previous version whole."""
    store.create_collection("c", "e", DIM)
    put(store, "c", "a.md", ["kept one", "kept two"], unit(9, 2))
    with pytest.raises(Exception):  # noqa: B017 - each engine raises its own driver's error
        store.put_document("c", info("a.md"), [ChunkRow("fine", 0, 4), ChunkRow(None, 5, 9)], unit(10, 2))
    assert [h.text for h in store.chunks("c", "a.md")] == ["kept one", "kept two"]
    assert (store.collection("c").documents, store.collection("c").chunks) == (1, 2)
    assert sources(store.search_text("c", "kept", 5)) == ["a.md", "a.md"]
    assert store.search_text("c", "fine", 5) == []
    put(store, "c", "b.md", ["still writable"], unit(11, 1))  # the store is usable after the rollback
    assert store.collection("c").documents == 2


def test_empty_document(store):
    store.create_collection("c", "e", DIM)
    store.put_document("c", info("empty.md"), [], np.zeros((0, DIM), dtype=np.float32))
    assert store.document("c", "empty.md").chunks == 0 and store.chunks("c", "empty.md") == []


def test_delete_document(store):
    store.create_collection("c", "e", DIM)
    va, vb = unit(12, 2), unit(13, 1)
    put(store, "c", "a.md", ["xylophone lessons", "more xylophone"], va)
    put(store, "c", "b.md", ["xylophone repairs"], vb)
    assert store.delete_document("c", "a.md") is True
    assert store.delete_document("c", "a.md") is False
    assert store.delete_document("c", "never.md") is False
    assert store.document("c", "a.md") is None and store.chunks("c", "a.md") == []
    assert [d.source for d in store.documents("c")] == ["b.md"]
    assert (store.collection("c").documents, store.collection("c").chunks) == (1, 1)
    assert sources(store.search_text("c", "xylophone", 10)) == ["b.md"]
    assert sources(store.search_vector("c", va[0], 10)) == ["b.md"]


# searches


def test_search_vector_nearest_first(store):
    store.create_collection("c", "e", DIM)
    vecs = unit(14, 40)
    for d in range(4):
        put(store, "c", f"d{d}.md", [f"chunk {d}-{i}" for i in range(10)], vecs[10 * d:10 * d + 10])
    ids = [h.id for h in store.all_chunks("c")]
    for j in (0, 17, 39):
        hits = store.search_vector("c", vecs[j], 5)
        assert len(hits) == 5
        assert hits[0].id == ids[j] and hits[0].text == f"chunk {j // 10}-{j % 10}"
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        sims = [h.similarity for h in hits]
        assert sims == sorted(sims, reverse=True) and all(h.score == h.similarity for h in hits)
        expected = np.argsort(-(vecs @ vecs[j]), kind="stable")[:5]
        assert [h.id for h in hits] == [ids[i] for i in expected]
        assert sims == pytest.approx((vecs[expected] @ vecs[j]).tolist(), abs=1e-5)
        assert all(h.bm25 is None for h in hits)
    assert len(store.search_vector("c", vecs[0], 100)) == 40
    with pytest.raises(UsageError):
        store.search_vector("c", unit(0, 1, dim=4)[0], 5)


def test_search_text(store):
    store.create_collection("c", "e", DIM)
    put(store, "c", "plants.md", ["Flowers grow in the garden in spring.",
                                  "Some flowers are zygomorphic, with one plane of symmetry.",
                                  "Gardeners water the garden flowers every day."], unit(15, 3))
    put(store, "c", "tools.md", ["Installing the garden hose takes a minute."], unit(16, 1),
        title="Watering handbook")
    hits = store.search_text("c", "Which flowers are zygomorphic?", 10)
    assert hits[0].text.startswith("Some flowers are zygomorphic")
    assert {h.text for h in hits} >= {"Flowers grow in the garden in spring.",
                                      "Gardeners water the garden flowers every day."}
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(h.bm25 == h.score and h.bm25 > 0 for h in hits)
    assert all(h.similarity is None for h in hits)
    assert len(store.search_text("c", "flowers", 2)) == 2
    assert store.search_text("c", "ZYGOMORPHIC", 10)[0].source == "plants.md"  # case-insensitive
    assert sources(store.search_text("c", "install", 10)) == ["tools.md"]  # stemmed: installing ~ install
    assert sources(store.search_text("c", "handbook", 10)) == ["tools.md"]  # the title is indexed too
    assert store.search_text("c", "quasar", 10) == []
    assert isinstance(store.search_text("c", "the", 10), list)  # stopwords only: whatever it finds, no error
    for nothing in ("?!", "", "   ", "--- ..."):
        with pytest.raises(UsageError, match="no terms"):
            store.search_text("c", nothing, 10)


def test_search_text_punctuation_and_quotes(store):
    store.create_collection("c", "e", DIM)
    put(store, "c", "a.md", ["O'Reilly's \"quoted\" C++ & AT&T: a|b (x) !not <tag> 'single' "
                             "mail bob@example.org, see https://docs.example.org/path?q=1"], unit(17, 1))
    for query in ["O'Reilly", '"quoted"', "C++ & AT&T", "a|b", "(x) !not", "<tag>", "'single'", "bob", "example",
                  "bob@example.org", "docs", "path"]:
        assert sources(store.search_text("c", query, 5)) == ["a.md"], query
    # The rule: a query is its words (runs of \w, lower-cased); punctuation, quotes and the stores' own query
    # operators (FTS5's, tsquery's) only separate them. So operators around a word find what the word finds, words
    # the document lacks find nothing, and a query without words is refused.
    for operators in ["& | ! :* ( ) < > - ^", '"', "'", "* + / ~ {}", "<-> !!"]:
        assert sources(store.search_text("c", f"{operators} reilly {operators}", 5)) == ["a.md"], operators
        assert store.search_text("c", f"{operators} zebra {operators}", 5) == [], operators
        with pytest.raises(UsageError, match="the query has no terms to search for"):
            store.search_text("c", operators, 5)
    assert store.search_text("c", "don't & | ! :*", 5) == []  # its words, "don" and "t", are not in the document


# access control and filters


@pytest.fixture
def acl(store):
    """A query, and documents: public, group A, groups A+B, and a group-B one built to match the query best."""
    store.create_collection("c", "e", DIM)
    q = unit(18, 1)[0]
    text = "quarterly revenue report"
    put(store, "c", "public.md", ["The quarterly revenue report, public summary."], near(q, 0.6, 19, 1),
        meta={"lang": "en"})
    put(store, "c", "a.md", ["Revenue by region for team A, quarterly."], near(q, 0.7, 20, 1), groups=["A"],
        meta={"lang": "de"})
    put(store, "c", "ab.md", ["A joint report of revenue."], near(q, 0.8, 21, 1), groups=["B", "A"],
        meta={"lang": "de"})
    put(store, "c", "secret.md", [" ".join([text] * 5)], q[None, :], groups=["B"], meta={"lang": "de"})
    return store, text, q


def test_groups_hide_documents(acl):
    store, text, q = acl
    for hits in (store.search_vector("c", q, 10), store.search_text("c", text, 10)):
        assert hits[0].source == "secret.md" and set(sources(hits)) == {"public.md", "a.md", "ab.md", "secret.md"}
    for k in (1, 3, 10):
        for hits in (store.search_vector("c", q, k, groups={"A"}), store.search_text("c", text, k, groups={"A"})):
            assert "secret.md" not in sources(hits)
            assert len(hits) == min(k, 3)
            assert all(h.groups == [] or "A" in h.groups for h in hits)
    assert set(sources(store.search_vector("c", q, 10, groups={"A"}))) == {"public.md", "a.md", "ab.md"}
    assert set(sources(store.search_text("c", text, 10, groups={"A"}))) == {"public.md", "a.md", "ab.md"}
    assert set(sources(store.search_vector("c", q, 10, groups={"B"}))) == {"public.md", "ab.md", "secret.md"}
    assert set(sources(store.search_vector("c", q, 10, groups={"A", "C"}))) == {"public.md", "a.md", "ab.md"}
    for nobody in (set(), {"C"}):
        assert sources(store.search_vector("c", q, 10, groups=nobody)) == ["public.md"]
        assert sources(store.search_text("c", text, 10, groups=nobody)) == ["public.md"]
    assert store.search_vector("c", q, 1, groups={"A"})[0].similarity < 0.99


def test_where_filters(acl):
    store, text, q = acl
    for search, query in ((store.search_vector, q), (store.search_text, text)):
        assert set(sources(search("c", query, 10, where={"lang": "de"}))) == {"a.md", "ab.md", "secret.md"}
        assert set(sources(search("c", query, 10, where={"lang": "de"}, groups={"A"}))) == {"a.md", "ab.md"}
        assert sources(search("c", query, 10, where={"lang": "en"}, groups=set())) == ["public.md"]
        assert search("c", query, 10, where={"lang": "fr"}) == []
        assert search("c", query, 10, where={"nosuchkey": "en"}) == []
        assert search("c", query, 10, where={"lang": "en"}, groups={"B"}) != []
        assert search("c", query, 10, where={"lang": "de"}, groups=set()) == []
        assert len(search("c", query, 10, where={})) == 4


def test_filters_apply_before_top_k(store):
    """Thirty group-B chunks are nearer and match better; k=3 for group A still gets three group-A chunks."""
    store.create_collection("c", "e", DIM)
    q = unit(22, 1)[0]
    put(store, "c", "b.md", ["budget budget budget forecast"] * 30, near(q, 0.05, 23, 30), groups=["B"],
        meta={"lang": "en"})
    put(store, "c", "a.md", [f"budget note {i}" for i in range(5)], near(q, 0.9, 24, 5), groups=["A"],
        meta={"lang": "de"})
    assert set(sources(store.search_vector("c", q, 3))) == {"b.md"}
    assert set(sources(store.search_text("c", "budget forecast", 3))) == {"b.md"}
    for kw in ({"groups": {"A"}}, {"where": {"lang": "de"}}):
        hits = store.search_vector("c", q, 3, **kw)
        assert sources(hits) == ["a.md"] * 3
        sims = [h.similarity for h in hits]
        assert sims == sorted(sims, reverse=True)
        assert sources(store.search_text("c", "budget forecast", 3, **kw)) == ["a.md"] * 3


# re-embedding


def test_replace_vectors_swaps_dimension_and_embedder(store):
    store.create_collection("c", "old-embedder", DIM)
    put(store, "c", "a.md", ["apple pie", "apple tart"], unit(25, 2), groups=["A"])
    put(store, "c", "b.md", ["banana bread"], unit(26, 1))
    ids = [h.id for h in store.all_chunks("c")]
    new = unit(27, 3, dim=4)
    store.replace_vectors("c", "new-embedder", 4, ids, new)
    c = store.collection("c")
    assert (c.embedder, c.dim, c.documents, c.chunks) == ("new-embedder", 4, 2, 3)
    for j in range(3):
        hit = store.search_vector("c", new[j], 1)[0]
        assert hit.id == ids[j] and hit.similarity == pytest.approx(1.0, abs=1e-5)
    assert sources(store.search_vector("c", new[2], 5, groups=set())) == ["b.md"]  # filters still work
    assert sources(store.search_text("c", "apple", 5)) == ["a.md", "a.md"]  # the text index is untouched
    with pytest.raises(UsageError):
        store.search_vector("c", unit(0, 1)[0], 3)  # the old dimension
    with pytest.raises(UsageError):
        put(store, "c", "d.md", ["x"], unit(28, 1))
    put(store, "c", "d.md", ["date cake"], unit(28, 1, dim=4))
    assert store.search_vector("c", unit(28, 1, dim=4)[0], 1)[0].source == "d.md"


def test_replace_vectors_refuses_mismatches(store, request):
    store.create_collection("c", "old", DIM)
    put(store, "c", "a.md", ["one", "two", "three"], unit(32, 3))
    ids = [h.id for h in store.all_chunks("c")]
    for bad_ids, vectors in [(ids, unit(33, 3, dim=DIM)),  # not the dimension it claims
                             (ids, unit(33, 2, dim=4)),  # fewer vectors than ids
                             (ids[:2], unit(33, 2, dim=4)),  # a chunk left without a vector
                             (ids[:2] + [ids[2] + 1000], unit(33, 3, dim=4))]:  # a chunk that does not exist
        with pytest.raises(UsageError):
            store.replace_vectors("c", "new", 4, bad_ids, vectors)
    c = store.collection("c")
    assert (c.embedder, c.dim) == ("old", DIM)
    assert len(store.search_vector("c", unit(32, 1)[0], 10)) == 3


def test_concurrent_writers(store, second, request):
    """Two connections (two processes, say) writing at once: every write lands, none fails."""
    store.create_collection("c", "e", DIM)
    errors = []

    def work(s, n: int) -> None:
        for i in range(25):
            try:
                put(s, "c", "same.md", [f"v{n}-{i}", "x"], unit(100 * n + i, 2))
                put(s, "c", f"own-{n}.md", [f"v{n}-{i}"], unit(100 * n + i, 1))
            except Exception as e:  # collected, and reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s, n)) for n, s in ((1, store), (2, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    c = store.collection("c")
    assert (c.documents, c.chunks) == (3, 4)
    assert len(store.all_chunks("c")) == 4 and len(store.search_vector("c", unit(0, 1)[0], 10)) == 4


# PostgreSQL only


def test_hnsw_index_answers_filtered_searches(pg):
    """With the planner forced onto the HNSW index, a filter that rules out the ~40 nearest candidates an
    ordinary HNSW scan looks at still yields k hits (pgvector's iterative scan)."""
    pg.create_collection("c", "e", DIM)
    q = unit(29, 1)[0]
    put(pg, "c", "b.md", [f"near {i}" for i in range(200)], near(q, 0.05, 30, 200), groups=["B"])
    put(pg, "c", "a.md", [f"far {i}" for i in range(5)], near(q, 0.9, 31, 5), groups=["A"])
    cid = pg.conn.execute("SELECT id FROM fw_collections WHERE name = 'c'").fetchone()[0]
    pg.conn.execute("SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off")
    try:
        plan = "\n".join(r[0] for r in pg.conn.execute(
            f"EXPLAIN SELECT id, embedding <=> %(v)s::vector AS distance FROM fw_vec_{cid} "
            "WHERE doc = ANY(%(a)s::bigint[]) ORDER BY distance LIMIT 3", {"v": str(q.tolist()), "a": [1]}))
        assert "hnsw" in plan.lower() or "embedding_idx" in plan, plan
        hits = pg.search_vector("c", q, 3, groups={"A"})
        assert sources(hits) == ["a.md"] * 3
        sims = [h.similarity for h in hits]
        assert sims == sorted(sims, reverse=True)
        assert len(pg.search_vector("c", q, 50)) == 50
    finally:
        pg.conn.execute("RESET enable_seqscan; RESET enable_bitmapscan; RESET enable_sort")


def test_unreachable_server_is_one_clear_line(capfd):
    from fourwalls.rag.stores.postgres import PostgresStore

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t = time.monotonic()
        with pytest.raises(UsageError) as e:
            PostgresStore(f"postgresql://fourwalls:s3cret-pw@127.0.0.1:{port}/fourwalls?connect_timeout=3")
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert msg.startswith(f"cannot reach PostgreSQL at 127.0.0.1:{port}: ")
    assert "\n" not in msg and "s3cret" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained driver traceback
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_bad_url_does_not_echo_the_password():
    from fourwalls.rag.stores.postgres import PostgresStore

    with pytest.raises(UsageError, match="invalid PostgreSQL URL") as e:
        PostgresStore("postgresql://me:s3cret-pw@[::1/db")
    assert "s3cret" not in str(e.value)


def test_common_terms_only_add_to_rare_matches(store):
    """In a large collection, a term in over 5% of the chunks no longer chooses matches (ranking them all is
    slow), but still counts in the scores of what the rare terms match."""
    store.create_collection("c", "e", DIM)
    put(store, "c", "filler.md", [f"robot report number {i}" for i in range(1200)], unit(40, 1200))
    put(store, "c", "zebra.md", ["zebra crossing", "robot zebra"], unit(41, 2))
    if isinstance(store, SqliteStore):
        assert store._common(1, ["robot", "zebra"]) == {"robot"}
    else:  # PostgreSQL knows term frequencies from ANALYZE
        store.conn.execute("ANALYZE")
        cid = store._row("c")[0]
        assert store._common(cid, ["robot", "zebra"]) == {"robot"}
    hits = store.search_text("c", "robot zebra", 10)
    assert [h.text for h in hits] == ["robot zebra", "zebra crossing"]  # both terms beat one; fillers not matched
    assert len(store.search_text("c", "robot", 10)) == 10  # a query of common terms alone still matches on them


def test_a_full_disk_on_the_postgresql_server_is_one_error_and_writes_nothing(pg, monkeypatch):
    import psycopg

    from fourwalls.errors import DiskFullError

    pg.create_collection("c", "e", DIM)
    put(pg, "c", "a.md", ["kept"], unit(1, 1))

    def full(*a, **kw):
        raise psycopg.errors.DiskFull('could not extend file "base/16384/16400": No space left on device')

    monkeypatch.setattr(pg, "_insert_vectors", full)
    with pytest.raises(DiskFullError, match="disk is full on the PostgreSQL server"):
        put(pg, "c", "b.md", ["lost"], unit(2, 1))
    assert sources(pg.documents("c")) == ["a.md"] and pg.collection("c").chunks == 1


# what a key cannot read changes nothing it sees (issue 22.6)


def test_documents_a_key_cannot_read_do_not_change_its_text_scores(store):
    store.create_collection("c", "e", DIM)
    put(store, "c", "public.md", ["The vacation policy gives every employee 25 days of vacation."], unit(1, 1))
    put(store, "c", "office.md", ["The office opens at nine, and vacation requests go to HR."], unit(2, 1))
    put(store, "c", "a.md", ["Engineers plan vacation days around releases."], unit(3, 1), groups=["a"])

    def scores(groups):
        return {h.source: h.bm25 for h in store.search_text("c", "vacation days", 10, groups=groups)}

    before = [scores(set()), scores({"a"})]
    assert set(before[0]) == {"public.md", "office.md"} and set(before[1]) == {"public.md", "office.md", "a.md"}
    put(store, "c", "hr.md", ["vacation " * 40 + "days " * 40], unit(4, 1), groups=["hr"])  # term statistics,
    put(store, "c", "hr-long.md", [" ".join(f"word{i}" for i in range(400))] * 3, unit(5, 3), groups=["hr"])  # length
    assert [scores(set()), scores({"a"})] == before
    assert "hr.md" in scores({"hr"}) and "hr.md" not in scores({"a"})
    # A key that reads every document gets the scores of a search with no restriction (the same statistics).
    assert scores({"a", "hr"}) == pytest.approx(scores(None), rel=1e-9)


def test_documents_a_key_cannot_read_do_not_decide_its_common_terms(store):
    """A term becomes common (only adds to the scores of rarer matches) by the chunks the key reads, not by others:
    hidden chunks full of a word must not drop the key's matches on that word."""
    store.create_collection("c", "e", DIM)
    put(store, "c", "filler.md", [f"report number {i}" for i in range(1200)], unit(40, 1200))
    put(store, "c", "pub.md", ["robot arms", "zebra crossing", "robot zebra"], unit(41, 3))

    def seen():
        if not isinstance(store, SqliteStore):
            store.conn.execute("ANALYZE")
        return [h.text for h in store.search_text("c", "robot zebra", 10, groups=set())]

    before = seen()
    assert "robot arms" in before
    put(store, "c", "hr.md", [f"robot log {i}" for i in range(400)], unit(42, 400), groups=["hr"])
    assert seen() == before


def test_a_store_from_before_token_counts_gets_them_when_opened(tmp_path):
    s = SqliteStore(tmp_path / "rag.db")
    s.create_collection("c", "e", DIM)
    put(s, "c", "a.md", ["vacation days off", "more vacation"], unit(1, 2))
    put(s, "c", "b.md", ["office hours"], unit(2, 1), groups=["hr"])
    scores = [(h.source, h.bm25) for h in s.search_text("c", "vacation days", 5, groups=set())]
    s.db.execute("ALTER TABLE documents DROP COLUMN tokens")  # as a store written before issue 22 was
    s.close()
    s = SqliteStore(tmp_path / "rag.db")
    assert [r[0] for r in s.db.execute("SELECT tokens FROM documents ORDER BY source")] == [7, 3]  # title + text
    assert [(h.source, h.bm25) for h in s.search_text("c", "vacation days", 5, groups=set())] == scores
    s.close()
