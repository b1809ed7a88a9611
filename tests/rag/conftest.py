"""A PostgreSQL + pgvector server for the whole session (see tests/rag/pg.py)."""

from __future__ import annotations

import os

import pytest

from fourwalls.rag.stores.sqlite import SqliteStore
from tests.rag.pg import BINDIR, start_postgres


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory):
    """DSN of database `fourwalls` (vector extension created) on a private server on 127.0.0.1."""
    dsn, stop = start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield dsn
    finally:
        stop()


def open_postgres(request):
    if not (BINDIR / "initdb").exists():
        message = f"PostgreSQL 15 not found in {BINDIR}: run scripts/install-postgres"
        if os.environ.get("FOURWALLS_REQUIRE_POSTGRES"):  # make test sets it: CI must not skip these
            pytest.fail(message)
        pytest.skip(message)
    from fourwalls.rag.stores.postgres import PostgresStore

    s = PostgresStore(request.getfixturevalue("pg_dsn"))
    for c in s.collections():  # the server lives for the session: every test starts from an empty store
        s.drop_collection(c.name)
    return s


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = SqliteStore(tmp_path / "rag.db") if request.param == "sqlite" else open_postgres(request)
    yield s
    s.close()


@pytest.fixture
def second(store, request):
    """Another connection to the same store, as a second process would have."""
    if isinstance(store, SqliteStore):
        s = SqliteStore(store.path)
    else:
        from fourwalls.rag.stores.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("pg_dsn"))
    yield s
    s.close()
