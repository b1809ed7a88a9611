"""The test server has a working pgvector: vector column, HNSW cosine index, ordering by <=>."""

from __future__ import annotations

import psycopg


def test_pgvector_hnsw_cosine(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))")
        conn.execute("CREATE INDEX ON items USING hnsw (embedding vector_cosine_ops)")
        rows = [(1, "[1,0,0]"), (2, "[0,1,0]"), (3, "[0.9,0.1,0]"), (4, "[0,0,1]")]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s)", rows)
        # Force the index so the HNSW path, not a sequential scan, answers.
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute("EXPLAIN SELECT id FROM items ORDER BY embedding <=> '[1,0.05,0]' LIMIT 2").fetchall()
        assert any("items_embedding_idx" in line for (line,) in plan), plan
        got = conn.execute(
            "SELECT id, embedding <=> '[1,0.05,0]' FROM items ORDER BY embedding <=> '[1,0.05,0]' LIMIT 2"
        ).fetchall()
        assert [i for i, _ in got] == [1, 3]
        assert 0 <= got[0][1] < got[1][1] < 0.01
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        assert version.startswith("0.8.")
