"""The default store: one SQLite file per home, in WAL mode, with FTS5 (BM25) for text and sqlite-vec for vectors.

apsw, not the stdlib ``sqlite3``: it bundles a current SQLite with FTS5 and extension loading, which some Python
builds lack. Per collection there is one FTS5 table (``fts_<id>``, contentless: the text lives in ``chunks``) and
one sqlite-vec table (``vec_<id>``, exact cosine kNN, with the chunk's document id as a metadata column so filters
run inside the kNN scan). The vectors are split into PARTS partitions that are scanned in parallel, each by a
thread with its own connection: an exact scan of 100k vectors takes about 70 ms on one core here.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import apsw
import numpy as np
import sqlite_vec

from fourwalls.errors import DiskFullError, FormatError, NotFoundError, OverloadedError, UsageError
from fourwalls.files import full_message
from fourwalls.rag.stores.base import Collection, DocumentInfo, Hit, check_name, indexed_text, query_terms

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections(
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, embedder TEXT NOT NULL, dim INTEGER NOT NULL,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    id INTEGER PRIMARY KEY, collection INTEGER NOT NULL REFERENCES collections(id), source TEXT NOT NULL,
    digest TEXT NOT NULL, title TEXT NOT NULL, groups TEXT NOT NULL, meta TEXT NOT NULL, chunks INTEGER NOT NULL,
    ingested TEXT NOT NULL, tokens INTEGER, UNIQUE(collection, source));
CREATE TABLE IF NOT EXISTS doc_groups(
    grp TEXT NOT NULL, doc INTEGER NOT NULL REFERENCES documents(id), PRIMARY KEY(grp, doc)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, doc INTEGER NOT NULL REFERENCES documents(id), ord INTEGER NOT NULL, text TEXT NOT NULL,
    heading TEXT, page INTEGER, start INTEGER NOT NULL, "end" INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS acls(id INTEGER PRIMARY KEY, groups TEXT NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc);
CREATE INDEX IF NOT EXISTS doc_groups_doc ON doc_groups(doc);
"""

HIT = """SELECT c.id, c.text, d.source, d.title, c.heading, c.page, c.start, c."end", d.groups
         FROM chunks c JOIN documents d ON d.id = c.doc"""


TOKENIZER = "porter unicode61 remove_diacritics 2"  # FTS5's: Porter stemming over unicode61 words
COMMON = 0.05  # a term in more than this share of a collection's chunks is common (see SqliteStore._common)
K1, B = 1.2, 0.75  # FTS5's bm25() parameters, which SqliteStore._scoped_bm25 computes again
PARTS = 4  # vectors are scanned in this many partitions at once, each by its own connection and thread


def _vec0(dim: int) -> str:
    return (f"vec0(embedding float[{int(dim)}] distance_metric=cosine, part integer partition key, acl integer, "
            "doc integer)")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class SqliteStore:
    def __init__(self, path: Path | str | None = None) -> None:
        if path is None:
            from fourwalls.files import home

            path = home() / "rag.db"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.readers = threading.local()
        self.pool: ThreadPoolExecutor | None = None
        try:
            self.db = self._connect()
            self.db.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON")
            with self._write():
                self.db.execute(SCHEMA)
                if "tokens" not in {r[1] for r in self.db.execute("PRAGMA table_info(documents)")}:
                    self.db.execute("ALTER TABLE documents ADD COLUMN tokens INTEGER")  # a store from before it
                for cid, did in self.db.execute("SELECT collection, id FROM documents WHERE tokens IS NULL").fetchall():
                    self._count_tokens(cid, did)
        except apsw.FullError:
            raise DiskFullError(full_message(self.path.parent, f"the document store {self.path.name}")) from None
        except apsw.Error as e:
            raise FormatError(f"cannot open the document store {self.path}: {e}") from None

    def _connect(self) -> apsw.Connection:
        db = apsw.Connection(str(self.path))
        db.set_busy_timeout(10_000)
        db.enable_load_extension(True)
        db.load_extension(sqlite_vec.loadable_path())
        db.enable_load_extension(False)
        # mmap: a kNN scan reads every vector; through the page cache it costs a third more (100k chunks).
        db.execute("PRAGMA mmap_size=4294967296")
        db.create_scalar_function("fw_varint", _varint, 1, deterministic=True)
        db.register_fts5_function("fw_bm25_terms", _bm25_terms)
        return db

    def _reader(self) -> apsw.Connection:
        """This thread's own connection, for scanning one partition of the vectors beside the others."""
        if not hasattr(self.readers, "db"):
            self.readers.db = self._connect()
        return self.readers.db

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taking the write lock up front (a deferred one could not upgrade under WAL). A
        full disk is a DiskFullError, and the transaction is undone."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            raise OverloadedError(f"the document store {self.path} is locked by another writer; retry") from None
        except apsw.FullError:
            raise DiskFullError(full_message(self.path.parent, f"the document store {self.path.name}")) from None
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as e:
            if self.db.in_transaction:  # SQLite has already rolled back after some errors, a full disk among them
                self.db.execute("ROLLBACK")
            if isinstance(e, apsw.FullError):
                raise DiskFullError(full_message(self.path.parent, f"the document store {self.path.name}")) \
                    from None
            raise

    # collections

    def _row(self, name: str) -> tuple[int, str, int]:
        row = self.db.execute("SELECT id, embedder, dim FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection named {name!r} (see: fourwalls rag list)")
        return row

    def create_collection(self, name: str, embedder: str, dim: int) -> Collection:
        check_name(name)
        with self._write():
            if self.db.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
                raise UsageError(f"collection {name!r} already exists")
            self.db.execute("INSERT INTO collections(name, embedder, dim, created) VALUES (?, ?, ?, ?)",
                            (name, embedder, dim, now()))
            cid = self.db.last_insert_rowid()
            self._create_indexes(cid, dim)
        return self.collection(name)

    def _create_indexes(self, cid: int, dim: int) -> None:
        self.db.execute(f"""
            CREATE VIRTUAL TABLE fts_{cid} USING fts5(text, content='', contentless_delete=1,
                                                       tokenize='{TOKENIZER}');
            CREATE VIRTUAL TABLE vec_{cid} USING {_vec0(dim)}""")

    def collection(self, name: str) -> Collection:
        row = self.db.execute(
            """SELECT c.name, c.embedder, c.dim, count(d.id), coalesce(sum(d.chunks), 0), c.created
               FROM collections c LEFT JOIN documents d ON d.collection = c.id WHERE c.name = ? GROUP BY c.id""",
            (name,)).fetchone()
        if row is None:
            self._row(name)
        return Collection(*row)

    def collections(self) -> list[Collection]:
        rows = self.db.execute(
            """SELECT c.name, c.embedder, c.dim, count(d.id), coalesce(sum(d.chunks), 0), c.created
               FROM collections c LEFT JOIN documents d ON d.collection = c.id GROUP BY c.id ORDER BY c.name""")
        return [Collection(*r) for r in rows]

    def drop_collection(self, name: str) -> None:
        cid = self._row(name)[0]
        with self._write():
            self.db.execute(f"""
                DELETE FROM doc_groups WHERE doc IN (SELECT id FROM documents WHERE collection = {cid});
                DELETE FROM chunks WHERE doc IN (SELECT id FROM documents WHERE collection = {cid});
                DELETE FROM documents WHERE collection = {cid};
                DELETE FROM collections WHERE id = {cid};
                DROP TABLE fts_{cid}; DROP TABLE vec_{cid}""")

    # documents

    def documents(self, collection: str) -> list[DocumentInfo]:
        cid = self._row(collection)[0]
        rows = self.db.execute("SELECT source, digest, title, groups, meta, chunks, ingested FROM documents "
                               "WHERE collection = ? ORDER BY source", (cid,))
        return [_info(r) for r in rows]

    def document(self, collection: str, source: str) -> DocumentInfo | None:
        cid = self._row(collection)[0]
        row = self.db.execute("SELECT source, digest, title, groups, meta, chunks, ingested FROM documents "
                              "WHERE collection = ? AND source = ?", (cid, source)).fetchone()
        return _info(row) if row else None

    def put_document(self, collection: str, doc: DocumentInfo, chunks: list, vectors: np.ndarray) -> None:
        cid, _, dim = self._row(collection)
        if vectors.shape != (len(chunks), dim):
            raise UsageError(f"{doc.source}: {vectors.shape} vectors for {len(chunks)} chunks of dimension {dim}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._write():
            self._delete(cid, doc.source)
            self.db.execute(
                "INSERT INTO documents(collection, source, digest, title, groups, meta, chunks, ingested) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, doc.source, doc.digest, doc.title, json.dumps(sorted(set(doc.groups))),
                 json.dumps(doc.meta, sort_keys=True), len(chunks), now()))
            did = self.db.last_insert_rowid()
            acl = self._acl(doc.groups)
            self.db.executemany("INSERT INTO doc_groups(grp, doc) VALUES (?, ?)", [(g, did) for g in set(doc.groups)])
            for i, (c, v) in enumerate(zip(chunks, vectors)):
                self.db.execute('INSERT INTO chunks(doc, ord, text, heading, page, start, "end") '
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", (did, i, c.text, c.heading, c.page, c.start, c.end))
                rowid = self.db.last_insert_rowid()
                self.db.execute(f"INSERT INTO fts_{cid}(rowid, text) VALUES (?, ?)",
                                (rowid, indexed_text(doc.title, c.heading, c.text)))
                self.db.execute(f"INSERT INTO vec_{cid}(rowid, embedding, part, acl, doc) VALUES (?, ?, ?, ?, ?)",
                                (rowid, v.tobytes(), rowid % PARTS, acl, did))
            self._count_tokens(cid, did)

    def _count_tokens(self, cid: int, did: int) -> None:
        """Store how many tokens the text index holds for a document (its chunks' sizes, as FTS5 counted them):
        BM25 over the documents a key may read needs their total (see _scoped_bm25)."""
        self.db.execute(f"UPDATE documents SET tokens = (SELECT coalesce(sum(fw_varint(s.sz)), 0) FROM "
                        f"fts_{cid}_docsize s JOIN chunks c ON c.id = s.id WHERE c.doc = ?1) WHERE id = ?1", (did,))

    def _delete(self, cid: int, source: str) -> bool:
        row = self.db.execute("SELECT id FROM documents WHERE collection = ? AND source = ?", (cid, source)).fetchone()
        if row is None:
            return False
        did = row[0]
        self.db.execute(f"""
            DELETE FROM fts_{cid} WHERE rowid IN (SELECT id FROM chunks WHERE doc = {did});
            DELETE FROM vec_{cid} WHERE rowid IN (SELECT id FROM chunks WHERE doc = {did});
            DELETE FROM chunks WHERE doc = {did};
            DELETE FROM doc_groups WHERE doc = {did};
            DELETE FROM documents WHERE id = {did}""")
        return True

    def delete_document(self, collection: str, source: str) -> bool:
        cid = self._row(collection)[0]
        with self._write():
            return self._delete(cid, source)

    def chunks(self, collection: str, source: str) -> list[Hit]:
        cid = self._row(collection)[0]
        rows = self.db.execute(f"{HIT} WHERE d.collection = ? AND d.source = ? ORDER BY c.ord", (cid, source))
        return [_hit(r) for r in rows]

    def all_chunks(self, collection: str) -> list[Hit]:
        cid = self._row(collection)[0]
        return [_hit(r) for r in self.db.execute(f"{HIT} WHERE d.collection = ? ORDER BY c.id", (cid,))]

    def replace_vectors(self, collection: str, embedder: str, dim: int, ids: list[int], vectors: np.ndarray) -> None:
        cid = self._row(collection)[0]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), dim):
            raise UsageError(f"{vectors.shape} vectors for {len(ids)} chunks of dimension {dim}")
        with self._write():
            docs = {i: (doc, self._acl(json.loads(groups))) for i, doc, groups in self.db.execute(
                "SELECT c.id, c.doc, d.groups FROM chunks c JOIN documents d ON d.id = c.doc WHERE d.collection = ?",
                (cid,))}
            if sorted(ids) != sorted(docs):
                raise UsageError(f"replace_vectors needs one vector for each of the {len(docs)} chunks of "
                                 f"{collection!r} (got {len(ids)})")
            self.db.execute(f"DROP TABLE vec_{cid}")
            self.db.execute(f"CREATE VIRTUAL TABLE vec_{cid} USING {_vec0(dim)}")
            self.db.executemany(f"INSERT INTO vec_{cid}(rowid, embedding, part, acl, doc) VALUES (?, ?, ?, ?, ?)",
                                [(i, v.tobytes(), i % PARTS, docs[i][1], docs[i][0]) for i, v in zip(ids, vectors)])
            self.db.execute("UPDATE collections SET embedder = ?, dim = ? WHERE id = ?", (embedder, dim, cid))

    # search

    def _acl(self, groups: list[str]) -> int:
        """The id of a set of groups (the vector index filters on it: a few ids instead of every document's)."""
        key = json.dumps(sorted(set(groups)))
        self.db.execute("INSERT OR IGNORE INTO acls(groups) VALUES (?)", (key,))
        return self.db.execute("SELECT id FROM acls WHERE groups = ?", (key,)).fetchone()[0]

    def _readable_acls(self, groups: set[str]) -> list[int]:
        return [i for i, g in self.db.execute("SELECT id, groups FROM acls")
                if not json.loads(g) or groups.intersection(json.loads(g))]

    def _allowed(self, cid: int, groups: set[str] | None, where: dict[str, str] | None) -> list[int] | None:
        """Ids of the documents a search may return, or None when nothing restricts it."""
        if groups is None and not where:
            return None
        sql, args = "SELECT id FROM documents d WHERE collection = ?", [cid]
        if groups is not None:
            marks = ",".join("?" * len(groups))
            sql += (" AND (groups = '[]' OR EXISTS (SELECT 1 FROM doc_groups g WHERE g.doc = d.id AND g.grp IN "
                    f"({marks})))" if groups else " AND groups = '[]'")
            args += sorted(groups)
        for key, value in (where or {}).items():
            sql += " AND json_extract(meta, ?) = ?"
            args += [f'$."{key}"', str(value)]
        return [r[0] for r in self.db.execute(sql, args)]

    def search_text(self, collection: str, query: str, k: int, groups: set[str] | None = None,
                    where: dict[str, str] | None = None) -> list[Hit]:
        cid = self._row(collection)[0]
        terms = query_terms(query)
        # A caller with groups gets term statistics over what it may read, always (even when that is everything,
        # which would otherwise show as a change): documents it cannot read must not change its scores, nor which
        # of its terms are common, and so show what they contain.
        stats = None if groups is None else self._stats(cid, self._allowed(cid, groups, None), terms)
        common = set() if len(terms) < 2 else self._common(cid, terms) if stats is None else \
            {t for t in terms if stats[0] >= 1000 and stats[2][t] > stats[0] * COMMON}
        rare = [t for t in terms if t not in common]
        match, phrases = " OR ".join(f'"{t}"' for t in terms), terms
        if rare and common:  # match on the rare terms only; the common ones still count in those matches' scores
            either = " OR ".join(f'"{t}"' for t in rare)
            match, phrases = f"{either} OR (({match}) AND ({either}))", [*rare, *terms, *rare]
        allowed = self._allowed(cid, groups, where)
        if allowed == []:
            return []
        # The text index is searched first and its matches filtered by a join: "rowid IN (subquery)" would make
        # FTS5 look every allowed chunk up on its own (seconds at 10k chunks).
        only = "" if allowed is None else f"AND +c.doc IN ({','.join(map(str, allowed))})"
        if stats is None:
            rows = self.db.execute(f"SELECT f.rowid, -bm25(fts_{cid}) FROM fts_{cid} f CROSS JOIN chunks c ON c.id = "
                                   f"f.rowid WHERE fts_{cid} MATCH ? {only} ORDER BY bm25(fts_{cid}) LIMIT ?",
                                   (match, k)).fetchall()
        else:
            found = self.db.execute(f"SELECT f.rowid, fw_bm25_terms(fts_{cid}) FROM fts_{cid} f CROSS JOIN chunks c "
                                    f"ON c.id = f.rowid WHERE fts_{cid} MATCH ? {only}", (match,))
            rows = sorted(((i, _bm25(json.loads(row), phrases, stats)) for i, row in found),
                          key=lambda r: (-r[1], r[0]))[:k]
        hits, score = self._hits([r[0] for r in rows]), dict(rows)
        for h in hits:
            h.bm25 = h.score = score[h.id]
        return hits

    def _stats(self, cid: int, readable: list[int], terms: list[str]) -> tuple[int, float, dict[str, int]]:
        """BM25's statistics over the ``readable`` documents: their chunks, the chunks' mean length in tokens, and
        for each term the chunks that hold it."""
        only = ",".join(map(str, readable)) or "NULL"
        chunks, tokens = self.db.execute(f"SELECT coalesce(sum(chunks), 0), coalesce(sum(tokens), 0) FROM documents "
                                         f"WHERE id IN ({only})").fetchone()
        df = {t: self.db.execute(f"SELECT count(*) FROM fts_{cid} f CROSS JOIN chunks c ON c.id = f.rowid "
                                 f"WHERE fts_{cid} MATCH ? AND +c.doc IN ({only})", (f'"{t}"',)).fetchone()[0]
              for t in terms}
        return chunks, tokens / chunks if chunks else 0.0, df

    def _common(self, cid: int, terms: list[str]) -> set[str]:
        """The terms found in more than 5% of the collection's chunks. Every chunk that a query matches is scored,
        so a query matching on such a term scores a large share of the collection (100 ms at 100k chunks); as in
        Lucene's common-terms query, the rare terms choose the matches and the common ones only add to their
        scores."""
        chunks = self.db.execute("SELECT coalesce(sum(chunks), 0) FROM documents WHERE collection = ?",
                                 (cid,)).fetchone()[0]
        if chunks < 1000:
            return set()
        self.db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab_{cid} USING fts5vocab(main, fts_{cid}, row)")
        name, *args = TOKENIZER.split()
        stem = self.db.fts5_tokenizer(name, args)  # the index's own stemming
        common = set()
        for t in terms:
            for _, _, x in stem(t.encode(), apsw.FTS5_TOKENIZE_QUERY, None):
                row = self.db.execute(f"SELECT doc FROM temp.vocab_{cid} WHERE term = ?", (x,)).fetchone()
                if row and row[0] > chunks * COMMON:
                    common.add(t)
        return common

    def search_vector(self, collection: str, vector: np.ndarray, k: int, groups: set[str] | None = None,
                      where: dict[str, str] | None = None) -> list[Hit]:
        cid, _, dim = self._row(collection)
        if vector.shape != (dim,):
            raise UsageError(f"a query vector of shape {vector.shape} for a collection of dimension {dim}")
        if where:  # metadata: the documents that match it (and the groups)
            allowed = self._allowed(cid, groups, where)
            only = f"AND doc IN ({','.join(map(str, allowed))})"
        elif groups is not None:  # groups alone: the few sets of groups that include one of them
            allowed = self._readable_acls(groups)
            only = f"AND acl IN ({','.join(map(str, allowed))})"
        else:
            allowed, only = None, ""
        if allowed == []:
            return []
        sql = f"SELECT rowid, distance FROM vec_{cid} WHERE embedding MATCH ? AND k = ? AND part = ? {only}"
        query = np.asarray(vector, dtype=np.float32).tobytes()
        if self.pool is None:
            self.pool = ThreadPoolExecutor(min(PARTS, os.cpu_count() or 1), thread_name_prefix="fourwalls-knn")
        parts = self.pool.map(lambda part: self._reader().execute(sql, (query, k, part)).fetchall(), range(PARTS))
        rows = sorted((r for part in parts for r in part), key=lambda r: r[1])[:k]
        hits = self._hits([r[0] for r in rows])
        distance = dict(rows)
        for h in hits:
            h.similarity = h.score = 1.0 - distance[h.id]
        return hits

    def _hits(self, ids: list[int]) -> list[Hit]:
        if not ids:
            return []
        rows = {r[0]: r for r in self.db.execute(f"{HIT} WHERE c.id IN ({','.join(map(str, ids))})")}
        return [_hit(rows[i]) for i in ids if i in rows]  # a chunk replaced meanwhile is left out


def _info(r: tuple) -> DocumentInfo:
    return DocumentInfo(source=r[0], digest=r[1], title=r[2], groups=json.loads(r[3]), meta=json.loads(r[4]),
                        chunks=r[5], ingested=r[6])


def _hit(r: tuple) -> Hit:
    return Hit(id=r[0], text=r[1], source=r[2], title=r[3], heading=r[4], page=r[5], start=r[6], end=r[7],
               groups=json.loads(r[8]))


def _varint(blob: bytes | None) -> int:
    """The first number of a blob of SQLite varints (FTS5 stores a chunk's length in tokens as one)."""
    value = 0
    for i, byte in enumerate(blob or b""):
        if i == 8:
            return (value << 8) | byte
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            break
    return value


def _bm25_terms(api: apsw.FTS5ExtensionApi) -> str:
    """An FTS5 function: the matched chunk's length in tokens and how often each phrase of the query occurs in it,
    which with the caller's own statistics give its BM25 score (``_bm25``)."""
    return json.dumps([api.column_size(0), *(len(api.phrase_locations(i)[0]) for i in range(api.phrase_count))])


def _bm25(row: list[int], phrases: list[str], stats: tuple[int, float, dict[str, int]]) -> float:
    """FTS5's bm25() of one chunk (``row``: its length, then each phrase's count) over the given statistics."""
    chunks, mean, df = stats
    length, *counts = row
    score = 0.0
    for term, f in zip(phrases, counts, strict=True):
        idf = max(math.log((chunks - df[term] + 0.5) / (df[term] + 0.5)), 1e-6)
        score += idf * f * (K1 + 1) / (f + K1 * (1 - B + B * length / mean))
    return score
