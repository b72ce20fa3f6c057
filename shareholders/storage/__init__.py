"""The node's storage layer: every SQL statement of a shareholder node.

Why a package with one ``Database`` class rather than functions over a raw
connection: the node holds connections of two kinds (the audit writer's one
write connection, and readers), and it must be able to hold them on another
engine. A ``Database`` is a connection plus its ``Dialect``; every query is a
method, written once in the SQL both engines share, and what differs
(placeholders, upsert, BLOB/BYTEA, write locking, WAL checkpoint vs nothing,
physical row ids) is a small method of the dialect, not an ``if backend``
in the queries. The rest of the node calls methods and sees typed rows
(``ShareRow``, ``MaintenanceSession``, ``MacKeyRow``, ``CheckBatch``); no
module outside this package holds SQL.

- ``dialect``: SQLite (default; one file in WAL mode, ``synchronous=FULL``,
  ``secure_delete``) and PostgreSQL (psycopg 3).
- ``schema``: the migrations, with column-type tokens.
- ``rows``: the row types.
- ``database``: the queries.

Share rows hold only the sealed form of a share (``vault.envelope``): the
KEK never enters the store. Each row keeps its KEK version and epoch so that
a key rotation and a proactive refresh proceed row by row and resume after
a crash. ``node_state`` names the node the store belongs to, its current
epoch and committee.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from shareholders.storage.database import AUDIT_COLUMNS, Database
from shareholders.storage.dialect import POSTGRES, SQLITE, Dialect
from shareholders.storage.rows import (
    CLOSED_STATES, FIRST_EPOCH, SHARE_COLUMNS, CheckBatch, MacKeyRow, MaintenanceSession, NodeState, RecordKey,
    SessionBusy, ShareRow,
)
from shareholders.storage.schema import RECORD_FORMAT_VERSION, SCHEMA_VERSION, SchemaError

BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Location:
    """Where a node's store is: a SQLite file, or a PostgreSQL database (``dsn``)."""

    backend: str = "sqlite"
    path: pathlib.Path | None = None
    dsn: str = field(default="", repr=False)
    # PostgreSQL: the tables' owner, used only to migrate and grant; the node
    # itself runs as the role of ``dsn`` (row-level security binds it).
    owner_dsn: str = field(default="", repr=False)

    @property
    def dialect(self) -> Dialect:
        return POSTGRES if self.backend == "postgres" else SQLITE

    @property
    def target(self):
        return self.dsn if self.backend == "postgres" else self.path

    def __str__(self) -> str:
        # Names the store in messages without its credentials.
        return "a PostgreSQL database" if self.backend == "postgres" else str(self.path)


def _location(where) -> Location:
    return where if isinstance(where, Location) else Location("sqlite", pathlib.Path(where))


def connect(where) -> Database:
    """A read-write connection to the store at ``where`` (a Location or a SQLite path)."""
    loc = _location(where)
    return Database(loc.dialect.connect(loc.target), loc.dialect, loc.target)


def migrate(where) -> int:
    """Bring the store's schema up to date; returns the version found before.

    With an owner DSN (PostgreSQL) the owner migrates and grants the node's
    role what it needs; the node's own connections never own the tables."""
    loc = _location(where)
    if not loc.owner_dsn:
        db = connect(loc)
        try:
            return db.migrate()
        finally:
            db.close()
    app = connect(loc)
    try:
        role = app.current_role()
    finally:
        app.close()
    owner = Database(loc.dialect.connect(loc.owner_dsn), loc.dialect)
    try:
        found = owner.migrate()
        owner.grant(role)
    finally:
        owner.close()
    return found


def connect_readonly(where) -> Database:
    """A connection that cannot write (``vaultctl audit`` on a stopped node's store)."""
    loc = _location(where)
    return Database(loc.dialect.connect_readonly(loc.target), loc.dialect)


def errors(where=None) -> tuple[type[BaseException], ...]:
    """The exception types a store at ``where`` raises (every engine's if None)."""
    if where is None:
        try:
            return POSTGRES.errors
        except ImportError:
            return SQLITE.errors
    return _location(where).dialect.errors


def unavailable_errors(where) -> tuple[type[BaseException], ...]:
    """The errors of a store at ``where`` that mean "not now" rather than a
    bug: a caller's UNAVAILABLE (retry), never INTERNAL (vaultrpc.server)."""
    return _location(where).dialect.unavailable


__all__ = [
    "AUDIT_COLUMNS", "BACKENDS", "CLOSED_STATES", "FIRST_EPOCH", "RECORD_FORMAT_VERSION", "SCHEMA_VERSION",
    "SHARE_COLUMNS", "CheckBatch", "Database", "Location", "MacKeyRow", "MaintenanceSession", "NodeState",
    "RecordKey", "SchemaError", "SessionBusy", "ShareRow", "connect", "connect_readonly", "errors", "migrate",
]
