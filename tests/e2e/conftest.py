"""Fixtures that start zhome processes on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.harness import ZhomeProcess


def _database_url(db_config: tuple[str, dict[str, Any]]) -> str | None:
    engine, args = db_config
    if engine == "sqlite3":
        return None
    host = args.get("host", "127.0.0.1")
    port = args.get("port", 5432)
    user = args.get("user", "postgres")
    return f"postgresql://{user}@{host}:{port}/{args['database']}"


@pytest.fixture
def zhome(db_config: tuple[str, dict[str, Any]], tmp_path: Path) -> Iterator[ZhomeProcess]:
    """A running zhome on a fresh database of each engine."""
    proc = ZhomeProcess(tmp_path, database_url=_database_url(db_config))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def zhome_factory(db_config: tuple[str, dict[str, Any]], tmp_path: Path) -> Iterator[Any]:
    """Make a zhome with config overrides (not started)."""
    made: list[ZhomeProcess] = []

    def make(**kw: Any) -> ZhomeProcess:
        p = ZhomeProcess(tmp_path / f"hs{len(made)}", database_url=_database_url(db_config), **kw)
        made.append(p)
        return p

    (tmp_path).mkdir(exist_ok=True)
    try:
        yield make
    finally:
        for p in made:
            p.stop()
