"""Fixtures that start zhome processes on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.harness import ZhomeProcess
from tests.e2e.openapi import Spec, spec_data_dir


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


# -- federating servers --------------------------------------------------------------


@contextlib.contextmanager
def _engine_database(engine: str) -> Iterator[str | None]:
    """A fresh, empty database on ``engine`` (None: the server's own SQLite file)."""
    if engine == "sqlite3":
        yield None
        return
    from tests.conftest import _pg_server_args, fresh_pg_database

    with fresh_pg_database() as name:
        yield _database_url(("psycopg2", {**_pg_server_args(), "database": name}))


class ZhomeServers:
    """Federating zhome processes on one engine, each on its own database."""

    def __init__(self, engine: str, root: Path, stack: contextlib.ExitStack) -> None:
        self.engine = engine
        self.root = root
        self._stack = stack
        self.a: ZhomeProcess
        self.b: ZhomeProcess

    def spawn(self, federation_ip: str, name: str, overrides: dict[str, Any] | None = None,
              start: bool = True) -> ZhomeProcess:
        url = self._stack.enter_context(_engine_database(self.engine))
        proc = ZhomeProcess(self.root / name, database_url=url, federation_ip=federation_ip, overrides=overrides)
        # Stopped before its database is dropped (ExitStack unwinds in reverse).
        self._stack.callback(proc.stop)
        if start:
            proc.start()
        return proc


@pytest.fixture(scope="module", params=["sqlite3", "postgres"])
def zhome_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZhomeServers]:
    """Servers A (127.0.0.2) and B (127.0.0.3), federating, each on its own
    fresh database of the same engine; ``spawn`` makes more (e.g. C)."""
    root = tmp_path_factory.mktemp(f"fed_{request.param}")
    with contextlib.ExitStack() as stack:
        servers = ZhomeServers(request.param, root, stack)
        servers.a = servers.spawn("127.0.0.2", "a")
        servers.b = servers.spawn("127.0.0.3", "b")
        yield servers


@pytest.fixture(scope="module")
def spec() -> Spec:
    """The spec's OpenAPI definitions, to validate answers against. They are
    part of what the suite checks: missing, the test fails (never skips)."""
    try:
        return Spec()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (expected <repo>/../shared/matrix-spec/data, got {spec_data_dir()})", pytrace=False)
