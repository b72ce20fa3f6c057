"""The seam between the node's SQL and one database engine.

Every statement in ``shareholders.storage`` is written once, in the SQL that
SQLite and PostgreSQL share, with ``?`` placeholders. What differs between
the engines is said here and nowhere else: how to connect, the placeholder,
the column types of schema tokens (``{int}``, ``{blob}``, ``{key}``), upsert
and insert-if-absent, how a writer takes the node's write lock, the physical
row id used to delete in chunks, and what "flush erased pages" means (a WAL
checkpoint on SQLite; nothing on PostgreSQL, see docs/operations.md).
"""
from __future__ import annotations

import pathlib
import re
import sqlite3
from functools import lru_cache

# A new SQLite database gets 8 KiB pages (no effect on an existing one): a
# sealed 512-d share row is ~2.2 KB, so a 4 KiB page holds one and wastes
# almost half, an 8 KiB page holds three. Fewer pages written, checkpointed
# and zeroed per record when a refresh writes and later destroys an epoch.
PAGE_SIZE = 8192


class Dialect:
    """SQLite: one file in WAL mode with ``synchronous=FULL``."""

    name = "sqlite"
    types = {"int": "INTEGER", "blob": "BLOB", "key": "TEXT"}
    row_id = "rowid"
    # An inner join whose left side stays the outer loop (SQLite's planner
    # obeys CROSS JOIN; PostgreSQL's chooses well on its own).
    ordered_join = "CROSS JOIN"

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    @property
    def unavailable(self) -> tuple[type[BaseException], ...]:
        """Errors of the store being out of reach for now: none for a file in
        the process (its OperationalError also means a schema bug: INTERNAL)."""
        return ()

    def connect(self, target):
        conn = sqlite3.connect(str(target), isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        # Deleted and overwritten content is zeroed, not left in free pages
        # and freeblocks: an erased share, a replaced epoch or a re-wrapped
        # data key must not stay readable in the file.
        conn.execute("PRAGMA secure_delete=ON")
        return conn

    def connect_readonly(self, target):
        return sqlite3.connect(f"file:{pathlib.Path(target)}?mode=ro", uri=True)

    def sql(self, statement: str) -> str:
        return statement

    def ddl(self, statement: str) -> str:
        return statement.format(**self.types)

    def upsert(self, table: str, columns: str, key: str) -> str:
        # ``key`` unused: SQLite replaces on any unique conflict.
        marks = ",".join("?" * len(columns.split(",")))
        return f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})"

    def insert_new(self, table: str, columns: str) -> str:
        marks = ",".join("?" * len(columns.split(",")))
        return f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})"

    def begin_write(self, conn) -> None:
        conn.execute("BEGIN IMMEDIATE")  # the file's one writer from here on

    def begin_snapshot(self, conn) -> None:
        conn.execute("BEGIN")

    def flush_erased(self, conn) -> bool:
        """Checkpoint the WAL into the database and truncate it to zero bytes.

        In WAL mode the main file keeps the old page images until a
        checkpoint, and the WAL keeps old frames until it is overwritten: a
        share deleted a moment ago is still readable in both
        (tests/test_at_rest_scan.py). False if readers kept it from finishing
        within the busy timeout (the next checkpoint completes it)."""
        busy, _log_frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0

    def tune_for_scan(self, conn, nbytes: int) -> None:
        conn.execute(f"PRAGMA mmap_size = {int(nbytes)}")

    def broken(self, conn) -> bool:
        """The connection is lost (its server went away); a file's never is."""
        return False

    def has_table(self, conn, name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def secure(self, conn) -> None:
        """After a migration, in its transaction: engine-side protections."""

    def share_version_triggers(self) -> tuple[str, ...]:
        """Triggers moving ``share_versions`` with every write to ``shares``,
        in the writer's own statement and transaction (schema migration 8)."""
        bump = ("INSERT INTO share_versions (tenant, version) VALUES ({row}.tenant, 1) "
                "ON CONFLICT (tenant) DO UPDATE SET version = version + 1")
        return tuple(
            f"CREATE TRIGGER shares_version_{event.lower()} AFTER {event} ON shares "
            f"BEGIN {bump.format(row=row)}; END"
            for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
        )

    def grant(self, conn, role: str) -> None:
        """Let ``role`` (the node's, not the owner) use the tables."""

    def scope(self, conn, tenant: str) -> None:
        """Limit the share rows the connection sees to ``tenant`` ("*": all)."""


_MARK = re.compile(r"\?")


@lru_cache(maxsize=512)
def _pg_sql(statement: str) -> str:
    # No statement of the node holds a literal '?' or '%': the swap is exact.
    return _MARK.sub("%s", statement)


class PostgresDialect(Dialect):
    """PostgreSQL through psycopg 3, autocommit with explicit transactions
    (as on SQLite). Tenant and subject compare bytewise (``COLLATE "C"``), as
    SQLite's do, so key order (cursors, key hashes) is the same on both."""

    name = "postgres"
    types = {"int": "BIGINT", "blob": "BYTEA", "key": 'TEXT COLLATE "C"'}
    row_id = "ctid"
    ordered_join = "JOIN"
    # pg_advisory_xact_lock key: one writer per database, as BEGIN IMMEDIATE gives on SQLite.
    WRITE_LOCK = 0x5356_0001

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (sqlite3.Error, psycopg.Error)

    @property
    def unavailable(self) -> tuple[type[BaseException], ...]:
        """The server away, a connection cut by its restart, a full disk (psycopg's OperationalError)."""
        import psycopg

        return (psycopg.OperationalError,)

    def connect(self, target):
        import psycopg

        conn = psycopg.connect(str(target), autocommit=True)
        # A statement blocked for 30 s by another writer fails, as SQLite's busy timeout.
        conn.execute("SET lock_timeout = '30s'")
        return conn

    def connect_readonly(self, target):
        conn = self.connect(target)
        conn.execute("SET default_transaction_read_only = on")
        return conn

    def sql(self, statement: str) -> str:
        return _pg_sql(statement)

    def upsert(self, table: str, columns: str, key: str) -> str:
        cols = [c.strip() for c in columns.split(",")]
        keys = {k.strip() for k in key.split(",")}
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in keys)
        marks = ",".join("%s" for _ in cols)
        return f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {sets}"

    def insert_new(self, table: str, columns: str) -> str:
        marks = ",".join("%s" for _ in columns.split(","))
        return f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def begin_write(self, conn) -> None:
        # One round trip (no parameters: psycopg sends both statements at once).
        conn.execute(f"BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock({self.WRITE_LOCK:d})")

    def begin_snapshot(self, conn) -> None:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def flush_erased(self, conn) -> bool:
        # Dead tuples are PostgreSQL's to reclaim (autovacuum); what VACUUM
        # and the WAL keep is stated in docs/operations.md.
        return True

    def tune_for_scan(self, conn, nbytes: int) -> None:
        pass

    # Row-level security on ``shares``, FORCEd so that the table's owner is
    # bound too: a connection sees and writes only the rows of the tenant it
    # is scoped to (``scope``; "*" for the node's tenant-blind maintenance).
    # Unscoped, it sees none. Superusers and BYPASSRLS roles are not bound:
    # the node must not run as one (docs/operations.md).
    def broken(self, conn) -> bool:
        return conn.broken or conn.closed

    def has_table(self, conn, name: str) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

    def secure(self, conn) -> None:
        # share_versions (schema 8) under the same policy: a tenant's counter
        # is read and moved only by a connection scoped to it (or "*").
        for table in ("shares", "share_versions"):
            if not self.has_table(conn, table):  # before schema 8
                continue
            conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            conn.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
            conn.execute(f"DROP POLICY IF EXISTS tenant_scope ON {table}")
            conn.execute(
                f"CREATE POLICY tenant_scope ON {table} "
                "USING (current_setting('splitvault.tenant', true) IN ('*', tenant)) "
                "WITH CHECK (current_setting('splitvault.tenant', true) IN ('*', tenant))"
            )

    def share_version_triggers(self) -> tuple[str, ...]:
        # Statement triggers over the transition table, and one bump per
        # tenant per transaction: the tenants already moved are kept in a
        # transaction-local setting (undone with an aborted savepoint, as the
        # bump is). Updating the one counter row per row (a row trigger) made
        # a 20,000-row delete 40x slower and an insert's cost grow with its
        # transaction. The function runs as the writer (not SECURITY
        # DEFINER): the node's role may write share_versions, under the same
        # tenant policy as shares (``secure``). Doubled braces: ``ddl`` formats.
        return (
            """CREATE OR REPLACE FUNCTION shares_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                done text[] := coalesce(nullif(current_setting('splitvault.bumped', true), ''), '{{}}')::text[];
                fresh text[];
            BEGIN
                SELECT array_agg(DISTINCT tenant) INTO fresh FROM changed WHERE NOT (tenant = ANY (done));
                IF fresh IS NULL THEN
                    RETURN NULL;
                END IF;
                INSERT INTO share_versions AS v (tenant, version) SELECT t, 1 FROM unnest(fresh) AS t
                ON CONFLICT (tenant) DO UPDATE SET version = v.version + 1;
                PERFORM set_config('splitvault.bumped', (done || fresh)::text, true);
                RETURN NULL;
            END $$""",
            *(f"CREATE TRIGGER shares_version_{event.lower()} AFTER {event} ON shares "
              f"REFERENCING {table} TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION shares_version_bump()"
              for event, table in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))),
        )

    def grant(self, conn, role: str) -> None:
        from psycopg import sql

        r = sql.Identifier(role)
        # The audit chain is append-only for the node's role: rows cannot be
        # rewritten or cut with its credentials (checkpoints: insert or replace).
        conn.execute(sql.SQL("GRANT SELECT, INSERT ON audit_log TO {}").format(r))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON audit_checkpoints TO {}").format(r))
        conn.execute(sql.SQL("GRANT SELECT ON schema_version TO {}").format(r))
        for table in ("node_state", "shares", "maintenance_sessions", "refresh_check_diffs", "mac_keys",
                      "used_batch_items"):
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(sql.Identifier(table), r))
        # Moved by the trigger on shares, which runs as the writer (never deleted).
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON share_versions TO {}").format(r))

    def scope(self, conn, tenant: str) -> None:
        conn.execute("SELECT set_config('splitvault.tenant', %s, false)", (tenant,))


SQLITE = Dialect()
POSTGRES = PostgresDialect()
