"""Schema migrations: bring a database up to the schema this code expects.

The schema lives in numbered files ``NNNN_<name>.sql`` (``zhome/storage/schema``
by default). The database records the last file applied in
``schema_version(version INTEGER NOT NULL)``; :func:`prepare_database` applies
every newer file in order, each in one transaction together with the version
update, so a crash mid-upgrade leaves the database at a well-defined version.

File format:

* portable SQL by default; where the engines differ a line
  ``-- engine: sqlite3``, ``-- engine: postgres`` or ``-- engine: all`` starts
  a section that only that engine (or both) runs;
* statements end with ``;`` at the end of a line, so a ``;`` inside a line
  (say in a string) does not split; other lines starting with ``--`` are
  comments;
* no parameters: ``?`` and ``%`` are passed to the engine unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zhome.storage.database import ENGINE_POSTGRES, ENGINE_SQLITE, Database, Txn

#: The schema files shipped with zhome.
SCHEMA_DIR = Path(__file__).parent / "schema"

_FILE_NAME = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")
_ENGINE_LINE = re.compile(r"^\s*--\s*engine:\s*(\S+)\s*$")
_SECTION_ENGINES = {"sqlite3": ENGINE_SQLITE, "postgres": ENGINE_POSTGRES, "all": None}


class SchemaError(Exception):
    """The schema files or the recorded version make an upgrade impossible."""


class SchemaTooNewError(SchemaError):
    """The database was upgraded by newer code than this."""


@dataclass(frozen=True)
class SchemaFile:
    version: int
    name: str
    path: Path


def find_schema_files(schema_dir: Path) -> list[SchemaFile]:
    """The schema files in ``schema_dir``, ordered by number."""
    files: dict[int, SchemaFile] = {}
    for path in sorted(schema_dir.glob("*.sql")):
        m = _FILE_NAME.match(path.name)
        if m is None:
            # Silently skipping a misnamed file would ship a database
            # without part of its schema.
            raise SchemaError(f"schema file {path} is not named NNNN_<name>.sql")
        version = int(m.group(1))
        if version < 1:
            raise SchemaError(f"schema file {path}: numbers start at 1")
        if version in files:
            raise SchemaError(
                f"schema files {files[version].path.name} and {path.name} share number {version}"
            )
        files[version] = SchemaFile(version, m.group(2), path)
    return [files[v] for v in sorted(files)]


def split_statements(text: str, engine: str, source: str = "<schema>") -> list[str]:
    """The statements of a schema file that ``engine`` runs, in order."""
    statements: list[str] = []
    pending: list[str] = []
    section: str | None = None  # None: all engines
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _ENGINE_LINE.match(line)
        if m is not None:
            if m.group(1) not in _SECTION_ENGINES:
                raise SchemaError(f"{source}:{lineno}: unknown engine {m.group(1)!r}")
            if pending:
                # A statement straddling sections would run half on one
                # engine; that is always a mistake in the file.
                raise SchemaError(f"{source}:{lineno}: engine section starts inside a statement")
            section = _SECTION_ENGINES[m.group(1)]
            continue
        if section is not None and section != engine:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        pending.append(line)
        if stripped.endswith(";"):
            statements.append("\n".join(pending).strip().rstrip(";").strip())
            pending = []
    if pending:
        # A final statement without ";" is still meant to run.
        statements.append("\n".join(pending).strip())
    return [s for s in statements if s]


def _current_version(txn: Txn) -> int:
    txn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    txn.execute("SELECT version FROM schema_version")
    rows = txn.fetchall()
    if not rows:
        txn.execute("INSERT INTO schema_version (version) VALUES (0)")
        return 0
    if len(rows) > 1:
        raise SchemaError(f"schema_version holds {len(rows)} rows; expected one")
    return int(rows[0][0])


def _apply(txn: Txn, schema: SchemaFile, statements: list[str]) -> bool:
    # Re-read the version under a lock: another process (a worker sharing
    # the PostgreSQL database) may have applied this file meanwhile. SQLite's
    # BEGIN IMMEDIATE already holds the write lock.
    lock = " FOR UPDATE" if txn.engine == ENGINE_POSTGRES else ""
    txn.execute("SELECT version FROM schema_version" + lock)
    row = txn.fetchone()
    if row is not None and int(row[0]) >= schema.version:
        return False
    for statement in statements:
        txn._execute_raw(statement)
    txn.execute("UPDATE schema_version SET version = ?", (schema.version,))
    return True


async def prepare_database(db: Database, schema_dir: Path | str | None = None) -> int:
    """Apply every schema file newer than the database's version and return
    the version the database is at afterwards.

    Raises :class:`SchemaTooNewError` if the database is newer than the
    newest file, since this code would misread it.
    """
    directory = SCHEMA_DIR if schema_dir is None else Path(schema_dir)
    files = find_schema_files(directory)
    # Parse everything before touching the database so a broken file fails
    # the start-up without applying the files before it.
    parsed = [
        (f, split_statements(f.path.read_text(encoding="utf-8"), db.engine, str(f.path)))
        for f in files
    ]
    newest = files[-1].version if files else 0

    version = await db.run_interaction("prepare_database", _current_version)
    if version > newest:
        raise SchemaTooNewError(
            f"the database schema is at version {version} but this code only knows "
            f"versions up to {newest}: the database was upgraded by a newer zhome; "
            "run that version (or newer) instead"
        )
    for schema, statements in parsed:
        if schema.version <= version:
            continue
        await db.run_interaction(
            f"apply_schema_{schema.version:04d}", _apply, schema, statements
        )
        version = schema.version
    return version
