"""The database layer: engines, transactions and the thread pool that keeps SQL
off the reactor thread.

zhome runs on SQLite (the embedded default) and PostgreSQL and must behave the
same on both (see DESIGN.md, "Invariants"). Everything that touches the
database goes through :meth:`Database.run_interaction`, which runs a function
in exactly one transaction on a worker thread: it commits when the function
returns and rolls back when it raises, so nothing half-written ever stays in
the database.

SQL is written once, with ``?`` placeholders, and works on both engines:

* never put a literal ``?`` in SQL text (pass it as a parameter instead);
  a literal ``%`` is fine.
* after an error inside a PostgreSQL transaction every further statement
  fails, so catch :data:`IntegrityError` *around* ``run_interaction`` (or use
  ``INSERT ... ON CONFLICT DO NOTHING``, which both engines support), not in
  the middle of a transaction.
* ``BYTEA`` comes back as ``bytes`` on PostgreSQL, like ``BLOB`` on SQLite.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

logger = logging.getLogger(__name__)

T = TypeVar("T")


class IntegrityError(Exception):
    """A unique or foreign key violation, on either engine; raised by
    ``run_interaction`` (after the rollback) with the driver's error as its
    ``__cause__``. Catch this, never a driver's own class."""


def _pg() -> Any:
    """psycopg2, imported on first use: a server on SQLite never loads it
    (nor the libpq and OpenSSL copies it brings, several MB resident)."""
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions

    return psycopg2


def _pg_retryable() -> tuple[type[Exception], ...]:
    # Errors after which PostgreSQL guarantees the transaction had no effect
    # and asks the client to simply try again.
    errors = _pg().errors
    return (errors.SerializationFailure, errors.DeadlockDetected)

#: How many times one interaction is attempted before a retryable error is
#: given to the caller. Serialization failures under load usually clear on the
#: second try; five bounds the worst case.
MAX_ATTEMPTS = 5

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")

ENGINE_SQLITE = "sqlite3"
ENGINE_POSTGRES = "postgres"

# The configuration names the driver ("psycopg2"), code compares against the
# database ("postgres"); accept either spelling so neither side has to care.
_ENGINE_ALIASES = {
    "sqlite3": ENGINE_SQLITE,
    "sqlite": ENGINE_SQLITE,
    "psycopg2": ENGINE_POSTGRES,
    "postgres": ENGINE_POSTGRES,
    "postgresql": ENGINE_POSTGRES,
}


class DatabaseClosedError(RuntimeError):
    """An interaction was requested after :meth:`Database.close`."""


def _bytea_as_bytes(value: str | None, cursor: Any) -> bytes | None:
    # psycopg2 returns BYTEA as memoryview; SQLite returns BLOB as bytes.
    # Returning bytes on both keeps callers engine-agnostic.
    if value is None:
        return None
    return bytes(_pg().BINARY(value, cursor))


_bytea_type: list[Any] = []


def _bytea() -> Any:
    if not _bytea_type:
        pg = _pg()
        _bytea_type.append(pg.extensions.new_type(pg.BINARY.values, "ZHOME_BYTEA", _bytea_as_bytes))
    return _bytea_type[0]


IN_CHUNK = 200


def escape_like(text: str) -> str:
    """``text`` matched literally by ``LIKE ... ESCAPE '\\'``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def in_chunks(values: Iterable[Any]) -> Iterator[tuple[list[Any], str]]:
    """``values`` in chunks small enough for one ``IN (...)``, each with its
    placeholder list."""
    vals = list(values)
    for i in range(0, len(vals), IN_CHUNK):
        chunk = vals[i: i + IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _reads_only(sql: str) -> bool:
    """Whether ``sql`` is a plain query (a WITH may hold a write)."""
    return sql.lstrip()[:6].upper() == "SELECT"


#: What opens a transaction on PostgreSQL (its connections run in
#: autocommit: see Database._attempt_pg).
_BEGIN = b"BEGIN ISOLATION LEVEL READ COMMITTED"
#: Statements per round trip of Txn.executemany on PostgreSQL.
_PAGE = 200


class Txn:
    """One transaction: a thin wrapper over a DB-API cursor.

    Only ever used on the worker thread that runs the interaction; never keep
    a reference after the interaction function returns.
    """

    def __init__(self, cursor: Any, engine: str, explicit: bool = False) -> None:
        self._cursor = cursor
        self.engine: str = engine
        self._after_commit: list[Callable[[], None]] = []
        # PostgreSQL: writes given to execute_later, as the statements
        # psycopg2 would send, waiting to go with the next statement.
        self._later: list[bytes] = []
        # PostgreSQL, connections in autocommit: ``explicit`` makes this one
        # transaction, its BEGIN sent with its first statement and its
        # COMMIT with its last writes (``open``: BEGIN was sent).
        self._explicit = explicit
        self.open = False

    def _convert(self, sql: str) -> str:
        if self.engine == ENGINE_POSTGRES:
            # psycopg2 uses %-formatting, so a literal % must be doubled
            # before the ? placeholders become %s.
            return sql.replace("%", "%%").replace("?", "%s")
        return sql

    def _send(self, parts: list[bytes]) -> None:
        """PostgreSQL: ``parts`` (whole statements) in one round trip, after
        the BEGIN when this is the transaction's first. The cursor then holds
        the result and rowcount of the last one."""
        if self._explicit and not self.open:
            parts = [_BEGIN, *parts]
            self.open = True
        self._cursor.execute(b";".join(parts))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement; ``?`` marks each parameter on both engines."""
        if self.engine == ENGINE_POSTGRES:
            # Always a sequence (even empty), so the %% escaping above is
            # undone consistently. The writes waiting go first, in the same
            # round trip.
            stmt = self._cursor.mogrify(self._convert(sql), tuple(params))
            parts, self._later = [*self._later, stmt], []
            self._send(parts)
            return
        self._cursor.execute(sql, tuple(params))

    def execute_later(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose rowcount nobody reads: on PostgreSQL it is sent
        with the next statement of the transaction (or with its commit),
        so that a run of writes costs one round trip, not one each; its
        errors then surface there, failing the transaction all the same.
        On SQLite (no round trips) it runs at once."""
        if self.engine == ENGINE_POSTGRES:
            self._later.append(self._cursor.mogrify(self._convert(sql), tuple(params)))
        else:
            self._cursor.execute(sql, tuple(params))

    def executemany_later(self, sql: str, seq: Iterable[Sequence[Any]]) -> None:
        """executemany as :meth:`execute_later` does execute."""
        if self.engine == ENGINE_POSTGRES:
            converted = self._convert(sql)
            self._later.extend(self._cursor.mogrify(converted, tuple(p)) for p in seq)
        else:
            self._cursor.executemany(sql, [tuple(p) for p in seq])

    def flush(self) -> None:
        """Send the writes of execute_later now."""
        if self._later:
            parts, self._later = self._later, []
            self._send(parts)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter sequence (``rowcount`` is
        then undefined)."""
        if self.engine == ENGINE_POSTGRES:
            # Pages of statements, one round trip each (psycopg2's own
            # executemany makes one per row).
            converted = self._convert(sql)
            stmts = [self._cursor.mogrify(converted, tuple(p)) for p in seq]
            parts, self._later = [*self._later, *stmts], []
            for i in range(0, len(parts), _PAGE):
                self._send(parts[i:i + _PAGE])
            return
        self._cursor.executemany(sql, [tuple(p) for p in seq])

    def _execute_raw(self, sql: str) -> None:
        # For schema files: no parameters, so no placeholder conversion and
        # no %-formatting on psycopg2 (it only formats when given params).
        if self.engine == ENGINE_POSTGRES:
            parts, self._later = [*self._later, sql.encode("utf-8")], []
            self._send(parts)
            return
        self._cursor.execute(sql)

    def _pg_commit(self) -> None:
        """The waiting writes and the COMMIT, in one round trip. Called with
        the transaction open (Database._attempt_pg flushes the writes of
        one that sent nothing yet first, so that a connection found dead
        then fails before anything could have been committed)."""
        if not self.open:
            return  # nothing was sent, nothing to commit
        parts, self._later = [*self._later, b"COMMIT"], []
        self._cursor.execute(b";".join(parts))
        self.open = False

    def _pg_rollback(self) -> None:
        if self.open:
            self._later = []
            self.open = False
            self._cursor.connection.cursor().execute("ROLLBACK")

    # After a statement without a result set (INSERT, UPDATE, ...) SQLite
    # fetches nothing while psycopg2 raises; fetch nothing on both.

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._cursor.description is None:
            return None
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._cursor.description is None:
            return []
        return [tuple(row) for row in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        """Rows changed by the last INSERT/UPDATE/DELETE."""
        return int(self._cursor.rowcount)

    def insert_returning_id(
        self, sql: str, params: Sequence[Any] = (), column: str = "id"
    ) -> int:
        """Run an INSERT (written without RETURNING) and return ``column`` of
        the inserted row, typically its generated integer primary key."""
        if not _IDENTIFIER.match(column):
            # The column name is pasted into SQL, so refuse anything that is
            # not a plain identifier.
            raise ValueError(f"not a column name: {column!r}")
        self.execute(f"{sql.rstrip().rstrip(';')} RETURNING {column}", params)
        row = self.fetchone()
        if row is None:
            raise RuntimeError("INSERT ... RETURNING produced no row")
        return int(row[0])

    def call_after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the reactor thread once this transaction has
        committed; it is dropped if the transaction rolls back (e.g. to wake
        /sync waiters only for data that really exists)."""
        self._after_commit.append(fn)


class _Attempt:
    """What one attempt reports back from the worker thread."""

    __slots__ = ("result", "after_commit")

    def __init__(self, result: Any, after_commit: list[Callable[[], None]]) -> None:
        self.result = result
        self.after_commit = after_commit


class _RetryableError(Exception):
    """The attempt failed in a way that guarantees no effect; try again."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Database:
    """A database on one of the two engines, with its worker threads.

    ``engine`` is ``"sqlite3"`` or ``"psycopg2"`` (``"postgres"`` is accepted
    too); :attr:`engine` is then ``"sqlite3"`` or ``"postgres"``, the same
    strings as :attr:`Txn.engine`.
    """

    def __init__(
        self,
        engine: str,
        args: dict[str, Any],
        *,
        reactor: Any = None,
    ) -> None:
        if engine not in _ENGINE_ALIASES:
            raise ValueError(f"unknown database engine {engine!r}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        # Needs IReactorThreads, IReactorTime and IReactorCore.
        self._reactor: Any = reactor
        self.engine: str = _ENGINE_ALIASES[engine]
        self._args = dict(args)
        #: Metrics hook: called on the reactor thread with (desc, seconds)
        #: after every interaction, successful or not. Seconds run from the
        #: call to the result, so they include waiting for a free connection.
        self.on_interaction: Callable[[str, float], None] | None = None

        self._closed = False
        self._in_flight: set[defer.Deferred[Any]] = set()

        if self.engine == ENGINE_SQLITE:
            if "database" not in self._args:
                raise ValueError("sqlite3 needs args['database'] (path or ':memory:')")
            # One thread and one connection: SQLite allows one writer at a
            # time, so serialising here means writes never wait on a lock.
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="zhome-db-sqlite")
            self._sqlite_conn: sqlite3.Connection | None = None
        else:
            cp_min = int(self._args.pop("cp_min", 5))
            cp_max = int(self._args.pop("cp_max", 10))
            if cp_max < 1 or cp_min < 0 or cp_min > cp_max:
                raise ValueError(f"bad pool size cp_min={cp_min} cp_max={cp_max}")
            self._pool = ThreadPool(minthreads=cp_min, maxthreads=cp_max, name="zhome-db-pg")
            # Idle connections; a thread takes one for each attempt and puts
            # it back unless it broke. At most cp_max exist, one per thread.
            self._pg_idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._pg_all: set[Any] = set()
            self._pg_lock = threading.Lock()

        self._pool.start()
        # ThreadPool threads are not daemons: if the reactor stops without
        # close() having been called the process would hang on exit.
        self._shutdown_trigger = reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_pool
        )

    # -- public API -------------------------------------------------------

    async def run_interaction(
        self, desc: str, func: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Run ``func(txn, *args, **kwargs)`` in one transaction on a worker
        thread: commit when it returns, roll back (and re-raise) when it
        raises. On PostgreSQL a serialization failure or deadlock, or a
        connection that turns out dead before commit, restarts ``func`` in a
        fresh transaction, so ``func`` must only touch the database."""
        return await self._run(desc, func, args, kwargs, False)

    async def run_reads(
        self, desc: str, func: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Run ``func(txn, *args, **kwargs)`` on a worker thread, for a
        ``func`` whose queries only read and each stand alone (no answer
        depends on another being of the same moment): on PostgreSQL each is
        its own transaction, with no BEGIN and COMMIT round trips."""
        return await self._run(desc, func, args, kwargs, True)

    async def _run(self, desc: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   single: bool) -> Any:
        """run_interaction; ``single``: ``func`` runs queries that only
        read, each of which stands alone (on PostgreSQL each is then its own
        transaction: one round trip instead of three with BEGIN and COMMIT;
        and one that fails on a dead connection is safe to run again)."""
        if self._closed:
            raise DatabaseClosedError(f"database closed; cannot run {desc}")
        started = time.monotonic()
        d = defer.ensureDeferred(self._run_with_retries(desc, func, args, kwargs, single))
        self._in_flight.add(d)
        try:
            attempt: _Attempt = await d
        finally:
            self._in_flight.discard(d)
            self._report(desc, time.monotonic() - started)
        # Back on the reactor thread here, and the commit has succeeded.
        for fn in attempt.after_commit:
            try:
                fn()
            except Exception:
                # The data is committed; a failing notifier must not turn
                # a durable write into an error for the caller.
                logger.exception("after-commit callback of %s failed", desc)
        return attempt.result

    async def execute(self, desc: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one query in its own transaction and return all its rows."""

        def query(txn: Txn) -> list[tuple[Any, ...]]:
            txn.execute(sql, params)
            return txn.fetchall()

        return await self._run(desc, query, (), {}, _reads_only(sql))

    async def select_in(self, desc: str, sql: str, values: Iterable[Any], before: Sequence[Any] = (),
                        after: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` once per chunk of ``values`` and return all the rows.

        ``sql`` holds ``{in}`` where the ``?,?,...`` list of a chunk goes;
        ``before`` and ``after`` are the parameters around it. Chunks keep
        each statement within the engines' parameter limits.
        """

        def query(txn: Txn) -> list[tuple[Any, ...]]:
            rows: list[tuple[Any, ...]] = []
            for chunk, qs in in_chunks(values):
                txn.execute(sql.format(**{"in": qs}), (*before, *chunk, *after))
                rows.extend(txn.fetchall())
            return rows

        # Under READ COMMITTED each statement reads its own snapshot in a
        # transaction too: the chunks lose nothing by standing alone.
        return await self._run(desc, query, (), {}, _reads_only(sql))

    async def scrub(self, tables: Sequence[str]) -> None:
        """Make sure rows just deleted or overwritten in ``tables`` are gone
        from the database files, not only from its answers: on SQLite
        (which overwrites freed space, see ``secure_delete``) the WAL is
        checkpointed into the database file and truncated; on PostgreSQL
        the tables are vacuumed, which removes their dead row versions."""
        if self._closed:
            raise DatabaseClosedError("database closed; cannot scrub")
        for t in tables:
            if not t.replace("_", "").isalnum():
                raise ValueError(f"not a table name: {t!r}")

        def work() -> None:
            if self.engine == ENGINE_SQLITE:
                self._sqlite_connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                return
            conn = self._pg_take()
            try:
                # Pooled connections run in autocommit, as VACUUM needs.
                with conn.cursor() as cur:
                    for t in tables:
                        cur.execute(f"VACUUM {t}")
            except BaseException:
                self._pg_discard(conn)
                raise
            self._pg_idle.put(conn)

        await deferToThreadPool(self._reactor, self._pool, work)

    async def close(self) -> None:
        """Let running interactions finish, close every connection and stop
        the worker threads. Further interactions raise."""
        if self._closed:
            return
        self._closed = True
        if self._in_flight:
            await defer.DeferredList(list(self._in_flight), consumeErrors=True)
        # Closing happens on a worker thread: the SQLite connection belongs to
        # it, and closing a PostgreSQL connection is network I/O.
        await deferToThreadPool(self._reactor, self._pool, self._close_connections)
        self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
        # Workers are idle now, so joining them is immediate.
        self._stop_pool()

    # -- internals ----------------------------------------------------------

    def _report(self, desc: str, seconds: float) -> None:
        hook = self.on_interaction
        if hook is None:
            return
        try:
            hook(desc, seconds)
        except Exception:
            logger.exception("on_interaction hook failed for %s", desc)

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()

    async def _run_with_retries(
        self,
        desc: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        single: bool = False,
    ) -> _Attempt:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                if self.engine == ENGINE_SQLITE:
                    result: _Attempt = await deferToThreadPool(
                        self._reactor, self._pool, self._attempt_sqlite, func, args, kwargs)
                else:
                    result = await deferToThreadPool(
                        self._reactor, self._pool, self._attempt_pg, func, args, kwargs, single)
                return result
            except sqlite3.IntegrityError as e:
                raise IntegrityError(str(e)) from e
            except _RetryableError as e:
                if attempt == MAX_ATTEMPTS:
                    raise e.cause
                logger.info("%s: retrying after %r (attempt %d)", desc, e.cause, attempt)
                # Wait on the reactor rather than sleeping in the worker so
                # the thread (and its connection) can serve others meanwhile.
                # Jitter keeps two deadlocked transactions from colliding again.
                delay = random.uniform(0.0, 0.05 * 2**attempt)
                await task.deferLater(self._reactor, delay, lambda: None)
        raise AssertionError("unreachable")

    # SQLite ---------------------------------------------------------------

    def _sqlite_connection(self) -> sqlite3.Connection:
        # Opened lazily on the worker thread so the reactor thread never
        # waits on the file system.
        if self._sqlite_conn is None:
            conn = sqlite3.connect(
                self._args["database"],
                # The pool runs one job at a time, but Twisted does not
                # promise it is always the same thread object; the
                # serialisation is ours, so sqlite3's own check is redundant.
                check_same_thread=False,
                # We issue BEGIN/COMMIT ourselves: one interaction is exactly
                # one transaction, not whatever the sqlite3 module infers.
                isolation_level=None,
                # Other processes (admin tools) may briefly hold the lock.
                timeout=30.0,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL is still crash-safe for the database file;
            # only the last transactions may roll back on power loss.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            # Deleted and overwritten rows are zeroed on their pages, so
            # erased data does not linger in the file's free space.
            conn.execute("PRAGMA secure_delete=ON")
            self._sqlite_conn = conn
        return self._sqlite_conn

    def _attempt_sqlite(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Attempt:
        conn = self._sqlite_connection()
        cursor = conn.cursor()
        txn = Txn(cursor, ENGINE_SQLITE)
        # IMMEDIATE takes the write lock up front, so a transaction that reads
        # then writes can never fail halfway with SQLITE_BUSY.
        cursor.execute("BEGIN IMMEDIATE")
        try:
            result = func(txn, *args, **kwargs)
            txn.flush()
            cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
        return _Attempt(result, txn._after_commit)

    # PostgreSQL -------------------------------------------------------------

    def _pg_connect(self) -> Any:
        psycopg2 = _pg()
        conn = psycopg2.connect(**self._args)
        # Autocommit: a plain query is its own transaction, and Txn opens
        # the others itself, its BEGIN (READ COMMITTED) going with the first
        # statement and its COMMIT with the last writes (psycopg2 would send
        # each in a round trip of its own).
        conn.set_session(autocommit=True)
        conn.set_client_encoding("UTF8")
        psycopg2.extensions.register_type(_bytea(), conn)
        with self._pg_lock:
            self._pg_all.add(conn)
        return conn

    def _pg_discard(self, conn: Any) -> None:
        with self._pg_lock:
            self._pg_all.discard(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _pg_take(self) -> Any:
        try:
            return self._pg_idle.get_nowait()
        except queue.Empty:
            # Never more connections than threads, since each thread holds at
            # most one at a time.
            return self._pg_connect()

    def _attempt_pg(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], single: bool = False
    ) -> _Attempt:
        conn = self._pg_take()
        if conn.closed:
            self._pg_discard(conn)
            conn = self._pg_connect()
        committing = False
        # single: each statement commits by itself, no BEGIN, no COMMIT.
        txn = Txn(conn.cursor(), ENGINE_POSTGRES, explicit=not single)
        try:
            try:
                result = func(txn, *args, **kwargs)
                if not txn.open:
                    # Writes only (or nothing): sent before the COMMIT, so a
                    # dead connection shows before anything can commit.
                    txn.flush()
                committing = True
                txn._pg_commit()
            finally:
                if not conn.closed:
                    txn._cursor.close()
        except BaseException as e:
            healthy = self._pg_rollback(conn, txn)
            if healthy:
                self._pg_idle.put(conn)
            else:
                self._pg_discard(conn)
            psycopg2 = _pg()
            if isinstance(e, _pg_retryable()):
                raise _RetryableError(e) from e
            if isinstance(e, psycopg2.IntegrityError):
                raise IntegrityError(str(e)) from e
            if (
                not healthy
                and not committing
                and isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError))
            ):
                # The connection died before COMMIT was sent, so the server
                # has discarded the transaction: safe to run it again on a new
                # connection (this is what a PostgreSQL restart looks like to
                # pooled connections). A failure *during* commit has an
                # unknown outcome and goes to the caller.
                raise _RetryableError(e) from e
            raise
        self._pg_idle.put(conn)
        return _Attempt(result, txn._after_commit)

    @staticmethod
    def _pg_rollback(conn: Any, txn: Txn) -> bool:
        """Roll back; False if the connection is unusable and must go."""
        if conn.closed:
            return False
        try:
            txn._pg_rollback()
        except (_pg().OperationalError, _pg().InterfaceError):
            return False
        return not conn.closed

    def _close_connections(self) -> None:
        if self.engine == ENGINE_SQLITE:
            if self._sqlite_conn is not None:
                self._sqlite_conn.close()
                self._sqlite_conn = None
            return
        with self._pg_lock:
            conns = list(self._pg_all)
            self._pg_all.clear()
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
