"""Shared fixtures: every storage-backed test runs on SQLite and PostgreSQL.

``db_config`` gives ``(engine, args)`` for a fresh, empty database on each
engine; ``database`` gives a :class:`~zhome.storage.database.Database` on it
with the schema applied. PostgreSQL is found through ``ZHOME_TEST_PG_HOST``,
``ZHOME_TEST_PG_PORT``, ``ZHOME_TEST_PG_USER`` and ``ZHOME_TEST_PG_PASSWORD``
(default ``127.0.0.1:5432``, user ``postgres``). If it is unreachable the
postgres tests fail, since the suite promises both engines; set
``ZHOME_TEST_NO_POSTGRES=1`` to skip them deliberately.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import psycopg2
import pytest
import pytest_twisted

from zhome.storage.database import Database
from zhome.storage.migrations import prepare_database

DbConfig = tuple[str, dict[str, Any]]


def _pg_server_args() -> dict[str, Any]:
    args: dict[str, Any] = {
        "host": os.environ.get("ZHOME_TEST_PG_HOST", "127.0.0.1"),
        "port": int(os.environ.get("ZHOME_TEST_PG_PORT", "5432")),
        "user": os.environ.get("ZHOME_TEST_PG_USER", "postgres"),
    }
    password = os.environ.get("ZHOME_TEST_PG_PASSWORD")
    if password:
        args["password"] = password
    return args


def _pg_admin_connection() -> Any:
    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **_pg_server_args())
    # CREATE/DROP DATABASE cannot run inside a transaction.
    conn.autocommit = True
    return conn


@pytest.fixture(params=["sqlite3", "postgres"])
def db_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbConfig]:
    """``(engine, args)`` for a fresh database; pass them to ``Database``."""
    if request.param == "sqlite3":
        yield "sqlite3", {"database": str(tmp_path / "zhome.db")}
        return

    with fresh_pg_database() as name:
        yield "psycopg2", {**_pg_server_args(), "database": name}


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Create an empty PostgreSQL database for one test (or one group of
    servers) and drop it afterwards; yields its name."""
    if os.environ.get("ZHOME_TEST_NO_POSTGRES") == "1":
        pytest.skip("ZHOME_TEST_NO_POSTGRES=1")
    try:
        admin = _pg_admin_connection()
    except psycopg2.OperationalError as e:
        pytest.fail(
            f"PostgreSQL unreachable ({e}); start it or set ZHOME_TEST_NO_POSTGRES=1",
            pytrace=False,
        )
    # A database per test: tests stay independent and can run in parallel.
    name = f"zhome_test_{secrets.token_hex(8)}"
    try:
        with admin.cursor() as cur:
            # C collation: byte order, as SQLite compares, so ORDER BY on
            # text gives the same answer on both engines.
            cur.execute(
                f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' "
                "LC_CTYPE 'C' TEMPLATE template0"
            )
    finally:
        admin.close()
    try:
        yield name
    finally:
        admin = _pg_admin_connection()
        try:
            with admin.cursor() as cur:
                # FORCE: a leaked connection must not leave the database behind.
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            admin.close()


@pytest_twisted.async_yield_fixture
async def database(db_config: DbConfig) -> AsyncIterator[Database]:
    """A ``Database`` with the full schema applied, closed after the test."""
    engine, args = db_config
    db = Database(engine, args)
    try:
        await prepare_database(db)
        yield db
    finally:
        await db.close()
