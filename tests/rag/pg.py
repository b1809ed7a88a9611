"""A throwaway PostgreSQL 15 + pgvector server on 127.0.0.1 for tests (installed by scripts/install-postgres)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import psycopg

BINDIR = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres(tmpdir: str | os.PathLike) -> tuple[str, Callable[[], None]]:
    """Start a server with a database `fourwalls` that has the vector extension; return (dsn, stop)."""
    initdb, pg_ctl = BINDIR / "initdb", BINDIR / "pg_ctl"
    if not (initdb.exists() and pg_ctl.exists()):
        raise RuntimeError(f"PostgreSQL 15 not found in {BINDIR}: run scripts/install-postgres (as root)")
    as_root = os.geteuid() == 0
    if as_root:
        # Postgres refuses to run as root. pytest's tmp dirs are root-only (0700), so use a fresh dir
        # under the system temp dir that the postgres user owns.
        root = Path(tempfile.mkdtemp(prefix="fourwalls-pg-"))
        shutil.chown(root, "postgres", "postgres")
    else:
        root = Path(tmpdir)
    data, log = root / "data", root / "server.log"

    def run(*cmd: str | os.PathLike) -> None:
        argv = (["runuser", "-u", "postgres", "--"] if as_root else []) + [str(c) for c in cmd]
        res = subprocess.run(argv, cwd=root, capture_output=True, text=True)
        if res.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{res.stdout}{res.stderr}{tail}")

    run(initdb, "-D", data, "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-locale", "--no-sync")
    port = _free_port()
    with open(data / "postgresql.conf", "a") as conf:
        # Only 127.0.0.1 and a socket in our own dir; durability off, for speed.
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )
    run(pg_ctl, "-D", data, "-l", log, "-w", "start")

    def stop() -> None:
        if data.exists():
            run(pg_ctl, "-D", data, "-m", "fast", "-w", "stop")
        if as_root:
            shutil.rmtree(root, ignore_errors=True)

    try:
        base = f"postgresql://postgres@127.0.0.1:{port}"
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE fourwalls")
        with psycopg.connect(f"{base}/fourwalls", autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
    except BaseException:
        stop()
        raise
    return f"{base}/fourwalls", stop
