"""``Database``: one connection to the node's store, and every query the node runs.

Over 400 lines on purpose: it is the node's whole SQL surface (shares, node
state, maintenance sessions, check batches, MAC key shares, the audit chain),
one method per statement, so that a second engine is checked against one
file. The engine's differences are in ``dialect``; nothing here branches on
the backend.

Transactions are explicit (``transaction()``, ``snapshot()`` and the audit
writer's ``begin_write``/``savepoint`` steps); a method called outside one
runs in autocommit, as a reader's single statement.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from vault import audit
from vault.envelope import SealedShare
from shareholders.storage import schema
from shareholders.storage.dialect import Dialect
from shareholders.storage.rows import (
    CLOSED_STATES, FIRST_EPOCH, SHARE_COLUMNS, CheckBatch, MacKeyRow, MaintenanceSession, NodeState, RecordKey,
    SessionBusy, ShareRow,
)

AUDIT_COLUMNS = "seq, time_ms, node, event, actor, request_id, tenant, subject, details_json, prev_hash, entry_hash"
_SESSION_COLUMNS = (
    "session_id, kind, state, from_epoch, new_epoch, plan_json, seed_kek_version, seed_wrapped_dk, seed_nonce, "
    "seed_ciphertext, skipped, actor, started_ms, updated_ms"
)
_OPEN = f"state NOT IN ({','.join(repr(s) for s in CLOSED_STATES)})"
_KEY_COLUMNS = "epoch, threshold, width, session_id, kek_version, wrapped_dk, nonce, ciphertext"
_CHECK_COLUMNS = (
    "session_id, first_tenant, first_subject, width, keys_json, fingerprints, kek_version, wrapped_dk, nonce, ciphertext"
)
# The (tenant, subject) range of one epoch, bounds included.
_RANGE = "epoch = ? AND (tenant, subject) >= (?, ?) AND (tenant, subject) <= (?, ?)"
# The same range within one tenant (the usual chunk): PostgreSQL serves the
# row-value form above with a scan of the whole table (its estimate of the
# range is far too wide), and this one with the primary key's index.
_TENANT_RANGE = "epoch = ? AND tenant = ? AND subject >= ? AND subject <= ?"
_NOT_PREPARED = ("NOT EXISTS (SELECT 1 FROM shares p WHERE p.tenant = s.tenant AND p.subject = s.subject "
                 "AND p.epoch = ?)")


def _range(epoch: int, lo: tuple[str, str], hi: tuple[str, str]) -> tuple[str, tuple]:
    """The WHERE clause and parameters of one epoch's rows from key ``lo`` to ``hi``."""
    if lo[0] == hi[0]:
        return _TENANT_RANGE, (epoch, lo[0], lo[1], hi[1])
    return _RANGE, (epoch, *lo, *hi)


def _session(r) -> MaintenanceSession:
    sealed = None
    if r[6] is not None:
        sealed = SealedShare(r[6], bytes(r[7]), bytes(r[8]), bytes(r[9]))
    return MaintenanceSession(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), sealed, r[10], r[11], r[12], r[13])


class Database:
    """One connection (a writer's or a reader's) and the node's queries on it."""

    def __init__(self, conn, dialect: Dialect, target=None):
        self.conn = conn
        self.dialect = dialect
        self._target = target  # to connect again after the server restarted (None: never)
        self.errors = dialect.errors
        self._scoped: str | None = None  # the tenant scope last set (None: unknown)

    def _scope(self, tenant: str = "*") -> None:
        # The tenant whose share rows the next statements may touch ("*": the
        # node's tenant-blind maintenance). Enforced by the engine where it
        # can (PostgreSQL row-level security); a no-op on SQLite.
        if self._scoped != tenant:
            self.dialect.scope(self.conn, tenant)
            self._scoped = tenant

    @staticmethod
    def _tenant_of(keys) -> str:
        tenants = {k[0] for k in keys}
        return tenants.pop() if len(tenants) == 1 else "*"

    # --- plumbing ---------------------------------------------------------------------

    def execute(self, statement: str, params: tuple | list = (), *, ddl: bool = False):
        d = self.dialect
        return self.conn.execute(d.ddl(statement) if ddl else d.sql(statement), params)

    def _many(self, statement: str, rows: Iterable) -> int:
        cur = self.conn.cursor()
        cur.executemany(statement, rows)
        return max(cur.rowcount, 0)

    def close(self) -> None:
        self.conn.close()

    def reopen_if_lost(self) -> bool:
        """Connect again if the connection was lost (a database server that
        restarted or failed over); True if it did. Raises the engine's error
        while the server is still away. A transaction in flight on the lost
        connection either committed or was rolled back whole: callers that
        keep state beside the store read it again (``AuditWriter``)."""
        if self._target is None or not self.dialect.broken(self.conn):
            return False
        try:
            self.conn.close()
        except self.errors:
            pass
        self.conn = self.dialect.connect(self._target)
        self._scoped = None
        return True

    def begin_write(self) -> None:
        self.dialect.begin_write(self.conn)

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self._scoped = None  # a scope set inside the transaction is undone with it
        self.conn.execute("ROLLBACK")

    def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT job")

    def release(self) -> None:
        self.conn.execute("RELEASE SAVEPOINT job")

    def rollback_to(self) -> None:
        self._scoped = None
        self.conn.execute("ROLLBACK TO SAVEPOINT job")

    @contextmanager
    def transaction(self):
        """A write transaction: committed on leaving, rolled back on an exception."""
        self.begin_write()
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    @contextmanager
    def snapshot(self):
        """A read-only transaction: one consistent view however long it is read."""
        self.dialect.begin_snapshot(self.conn)
        try:
            yield self
        finally:
            self.commit()

    def flush_erased(self) -> bool:
        """Make erased rows unreadable on disk now (WAL checkpoint; see the dialect)."""
        return self.dialect.flush_erased(self.conn)

    def tune_for_scan(self, nbytes: int) -> None:
        self.dialect.tune_for_scan(self.conn, nbytes)

    def migrate(self) -> int:
        self._scope()
        return schema.migrate(self)

    def has_table(self, name: str) -> bool:
        return self.dialect.has_table(self.conn, name)

    def grant(self, role: str) -> None:
        """Let the node's role (not the tables' owner) use the tables (PostgreSQL)."""
        with self.transaction():
            self.dialect.grant(self.conn, role)

    def current_role(self) -> str:
        return self.conn.execute("SELECT current_user").fetchone()[0]

    # --- node state ---------------------------------------------------------------------

    def init_node_state(self, name: str, index: int, now_ms: int) -> NodeState:
        """This database's node identity; written on first start, checked after."""
        row = self.execute("SELECT name, idx, current_epoch, committee_json FROM node_state WHERE id = 1").fetchone()
        if row is None:
            with self.transaction():
                self.execute(
                    "INSERT INTO node_state (id, name, idx, current_epoch, committee_json, updated_ms) "
                    "VALUES (1, ?, ?, ?, ?, ?)", (name, index, FIRST_EPOCH, "{}", now_ms),
                )
            return NodeState(name, index, FIRST_EPOCH, {})
        state = NodeState(row[0], row[1], row[2], json.loads(row[3]))
        if state.name != name or state.index != index:
            raise schema.SchemaError(
                f"The database belongs to node {state.name!r} with index {state.index}, "
                f"but the config names node {name!r} with index {index}."
            )
        return state

    def node_state(self) -> NodeState:
        row = self.execute("SELECT name, idx, current_epoch, committee_json FROM node_state WHERE id = 1").fetchone()
        return NodeState(row[0], row[1], row[2], json.loads(row[3]))

    def set_epoch(self, epoch: int, committee: dict, now_ms: int) -> None:
        self.execute("UPDATE node_state SET current_epoch = ?, committee_json = ?, updated_ms = ? WHERE id = 1",
                     (epoch, json.dumps(committee, sort_keys=True), now_ms))

    # --- shares -------------------------------------------------------------------------

    def subject_rows(self, tenant: str, subject: str) -> list[ShareRow]:
        """Every epoch's row of one subject of one tenant, oldest epoch first."""
        self._scope(tenant)
        return [ShareRow.from_db(r) for r in self.execute(
            f"SELECT {SHARE_COLUMNS} FROM shares WHERE tenant = ? AND subject = ? ORDER BY epoch", (tenant, subject))]

    def share_row(self, tenant: str, subject: str, epoch: int) -> ShareRow | None:
        self._scope(tenant)
        r = self.execute(f"SELECT {SHARE_COLUMNS} FROM shares WHERE tenant = ? AND subject = ? AND epoch = ?",
                         (tenant, subject, epoch)).fetchone()
        return ShareRow.from_db(r) if r is not None else None

    def share_version(self, tenant: str) -> int:
        """The tenant's change counter (``share_versions``, schema 8): moved by
        every write to its share rows, in the write's transaction; 0 before the first."""
        self._scope(tenant)
        row = self.execute("SELECT version FROM share_versions WHERE tenant = ?", (tenant,)).fetchone()
        return 0 if row is None else row[0]

    def tenant_dimensions(self, tenant: str, max_epoch: int) -> list[int]:
        """The template dimensions one tenant has rows of, up to an epoch (a gallery preload's list)."""
        self._scope(tenant)
        return [r[0] for r in self.execute(
            "SELECT DISTINCT dimension FROM shares WHERE tenant = ? AND epoch <= ? ORDER BY dimension",
            (tenant, int(max_epoch)))]

    def tenant_row_versions(self, tenant: str, dimension: int, max_epoch: int, group: str = "") -> list[tuple]:
        """(subject, epoch, request id, nonce) of one tenant's rows of one
        dimension up to ``max_epoch`` (of one gallery group when ``group``;
        '' = all), by subject (no share values): what Identify's gallery cache
        compares to see what changed. Every seal draws a fresh nonce, so it
        names the sealed values (a KEK rotation re-wraps the data key and
        keeps it); the ``shares_identify`` index covers it (with a group,
        ``shares_by_group``, which seeks on (tenant, group))."""
        self._scope(tenant)
        where, args = _group_filter(tenant, dimension, max_epoch, group)
        return [(r[0], r[1], r[2], bytes(r[3])) for r in self.execute(
            f"SELECT subject, epoch, request_id, nonce FROM shares WHERE {where} ORDER BY subject, epoch", args)]

    def tenant_rows(self, tenant: str, dimension: int, max_epoch: int, page: int = 1000,
                    group: str = "") -> Iterator[ShareRow]:
        """Every row of one tenant of one dimension up to ``max_epoch`` (of one
        group when ``group``), in pages (Identify's gallery load)."""
        self._scope(tenant)
        where, args = _group_filter(tenant, dimension, max_epoch, group)
        cur = self.execute(f"SELECT {SHARE_COLUMNS} FROM shares WHERE {where}", args)
        while rows := cur.fetchmany(page):
            for r in rows:
                yield ShareRow.from_db(r)

    def request_ids_of(self, keys: list[tuple[str, str]], chunk: int = 400) -> dict[tuple[str, str], set[str]]:
        """The stored request ids of many (tenant, subject) pairs at once (only
        pairs that have rows appear): one query per ``chunk`` pairs, not one each."""
        self._scope(self._tenant_of(keys))
        found: dict[tuple[str, str], set[str]] = {}
        for i in range(0, len(keys), chunk):
            part = keys[i:i + chunk]
            marks = ",".join("(?,?)" for _ in part)
            args = [v for pair in part for v in pair]
            # The pairs stay the outer loop, so each is one primary-key lookup
            # (a row-value IN over VALUES would scan the whole table on SQLite).
            for tenant, subject, request_id in self.execute(
                f"WITH k(t, s) AS (VALUES {marks}) SELECT shares.tenant, shares.subject, shares.request_id "
                f"FROM k {self.dialect.ordered_join} shares ON shares.tenant = k.t AND shares.subject = k.s",
                args,
            ):
                found.setdefault((tenant, subject), set()).add(request_id)
        return found

    def insert_shares(self, rows: Iterable[ShareRow]) -> None:
        """Insert or overwrite rows (one per tenant, subject and epoch)."""
        rows = list(rows)
        self._scope(self._tenant_of(r.key for r in rows))
        self._many(self.dialect.upsert("shares", SHARE_COLUMNS, "tenant, subject, epoch"),
                   (r.as_params() for r in rows))

    def delete_subject(self, tenant: str, subject: str) -> int:
        self._scope(tenant)
        return self.execute("DELETE FROM shares WHERE tenant = ? AND subject = ?", (tenant, subject)).rowcount

    def count_records(self) -> int:
        self._scope()
        return self.execute("SELECT COUNT(*) FROM shares").fetchone()[0]

    def count_epoch(self, epoch: int) -> int:
        self._scope()
        return self.execute("SELECT COUNT(*) FROM shares WHERE epoch = ?", (epoch,)).fetchone()[0]

    def count_other_epochs(self, epoch: int) -> int:
        self._scope()
        return self.execute("SELECT COUNT(*) FROM shares WHERE epoch != ?", (epoch,)).fetchone()[0]

    def count_before(self, epoch: int) -> int:
        self._scope()
        return self.execute("SELECT COUNT(*) FROM shares WHERE epoch < ?", (epoch,)).fetchone()[0]

    def newest_epoch(self) -> int:
        self._scope()
        return self.execute("SELECT MAX(epoch) FROM shares").fetchone()[0] or 0

    def epoch_keys(self, epoch: int) -> list[tuple[str, str]]:
        """Every (tenant, subject) of one epoch, in key order."""
        self._scope()
        return [(r[0], r[1]) for r in self.execute(
            "SELECT tenant, subject FROM shares WHERE epoch = ? ORDER BY tenant, subject", (epoch,))]

    def last_key(self, epoch: int) -> tuple[str, str] | None:
        self._scope()
        r = self.execute("SELECT tenant, subject FROM shares WHERE epoch = ? ORDER BY tenant DESC, subject DESC "
                         "LIMIT 1", (epoch,)).fetchone()
        return (r[0], r[1]) if r else None

    def record_keys(self, epoch: int, after: tuple[str, str], limit: int) -> list[RecordKey]:
        """Up to ``limit`` keys of one epoch after ``after``, in key order."""
        self._scope()
        return [RecordKey(*r) for r in self.execute(
            "SELECT tenant, subject, threshold, dimension, mac_count FROM shares WHERE epoch = ? "
            "AND (tenant, subject) > (?, ?) ORDER BY tenant, subject LIMIT ?", (epoch, *after, limit))]

    def rows_after(self, epoch: int, after: tuple[str, str], limit: int) -> list[ShareRow]:
        """Up to ``limit`` rows of one epoch after ``after``, in key order."""
        self._scope()
        return [ShareRow.from_db(r) for r in self.execute(
            f"SELECT {SHARE_COLUMNS} FROM shares WHERE epoch = ? AND (tenant, subject) > (?, ?) "
            "ORDER BY tenant, subject LIMIT ?", (epoch, *after, limit))]

    def rows_between(self, epoch: int, lo: tuple[str, str], hi: tuple[str, str]) -> list[ShareRow]:
        """The rows of one epoch from key ``lo`` to ``hi`` (both included)."""
        self._scope()
        where, args = _range(epoch, lo, hi)
        return [ShareRow.from_db(r) for r in self.execute(
            f"SELECT {SHARE_COLUMNS} FROM shares WHERE {where}", args)]

    def live_ids_between(self, epoch: int, lo: tuple[str, str], hi: tuple[str, str]) -> set[tuple[str, str, str]]:
        """(tenant, subject, request_id) of the rows of one epoch from ``lo`` to ``hi``."""
        self._scope()
        where, args = _range(epoch, lo, hi)
        # idx is in no secondary index: with only the three key columns,
        # SQLite takes the covering shares_by_group index, which serves the
        # row-value range by tenant alone and scans the whole tenant per call
        # (a refresh's prepare grew quadratic in the gallery). With idx the
        # primary key's range is the plan (test_storage_backends checks it).
        return {(r[0], r[1], r[2]) for r in self.execute(
            f"SELECT tenant, subject, request_id, idx FROM shares WHERE {where}", args)}

    def sealed_between(self, epoch: int, lo: tuple[str, str], hi: tuple[str, str]) -> dict[tuple[str, str], SealedShare]:
        """The sealed shares of one epoch from ``lo`` to ``hi``, by key (for fingerprints)."""
        self._scope()
        where, args = _range(epoch, lo, hi)
        return {(r[0], r[1]): SealedShare(0, bytes(r[2]), bytes(r[3]), bytes(r[4])) for r in self.execute(
            f"SELECT tenant, subject, wrapped_dk, nonce, ciphertext FROM shares WHERE {where}", args)}

    def unprepared_rows(self, from_epoch: int, new_epoch: int, after: tuple[str, str], limit: int) -> list[ShareRow]:
        """Rows of ``from_epoch`` after ``after`` with no row in ``new_epoch`` yet, in key order."""
        self._scope()
        return [ShareRow.from_db(r) for r in self.execute(
            f"SELECT {SHARE_COLUMNS} FROM shares s WHERE s.epoch = ? AND (s.tenant, s.subject) > (?, ?) "
            f"AND {_NOT_PREPARED} ORDER BY s.tenant, s.subject LIMIT ?", (from_epoch, *after, new_epoch, limit))]

    def count_unprepared(self, from_epoch: int, new_epoch: int) -> int:
        self._scope()
        return self.execute(f"SELECT COUNT(*) FROM shares s WHERE s.epoch = ? AND {_NOT_PREPARED}",
                            (from_epoch, new_epoch)).fetchone()[0]

    def delete_epoch(self, epoch: int) -> int:
        self._scope()
        return self.execute("DELETE FROM shares WHERE epoch = ?", (epoch,)).rowcount

    def delete_epoch_rows(self, epoch: int, limit: int, *, older: bool = False) -> int:
        """Delete up to ``limit`` rows of ``epoch`` (of every epoch before it with
        ``older``), by physical row id; how many went."""
        self._scope()
        op = "<" if older else "="
        rid = self.dialect.row_id
        return self.execute(f"DELETE FROM shares WHERE {rid} IN (SELECT {rid} FROM shares WHERE epoch {op} ? LIMIT ?)",
                            (epoch, limit)).rowcount

    def sample_rows_by_kek(self, per_version: int = 8) -> dict[int, list[ShareRow]]:
        """Up to ``per_version`` rows under each KEK version in use (spread over
        the table on SQLite, by rowid lookups on the kek_version index)."""
        self._scope()
        out: dict[int, list[ShareRow]] = {}
        if self.dialect.row_id != "rowid":
            for (version,) in self.execute("SELECT DISTINCT kek_version FROM shares").fetchall():
                out[version] = [ShareRow.from_db(r) for r in self.execute(
                    f"SELECT {SHARE_COLUMNS} FROM shares WHERE kek_version = ? LIMIT ?", (version, per_version))]
            return out
        spans = self.execute("SELECT kek_version, MIN(rowid), MAX(rowid) FROM shares GROUP BY kek_version").fetchall()
        for version, lo, hi in spans:
            rows: dict[int, ShareRow] = {}
            for i in range(per_version):
                at = lo + (hi - lo) * i // max(1, per_version - 1)
                r = self.execute(
                    f"SELECT rowid, {SHARE_COLUMNS} FROM shares WHERE kek_version = ? AND rowid >= ? "
                    "ORDER BY rowid LIMIT 1", (version, at),
                ).fetchone()
                if r is not None:
                    rows[r[0]] = ShareRow.from_db(r[1:])
            out[version] = list(rows.values())
        return out

    # --- KEK rotation -------------------------------------------------------------------

    def kek_versions_in_use(self) -> list[int]:
        """KEK versions that wrap a share."""
        self._scope()
        return [r[0] for r in self.execute("SELECT DISTINCT kek_version FROM shares")]

    def count_not_under(self, version: int) -> int:
        self._scope()
        return self.execute("SELECT COUNT(*) FROM shares WHERE kek_version < ? OR kek_version > ?",
                            (version, version)).fetchone()[0]

    def wrapped_not_under(self, version: int, limit: int) -> list[tuple[str, str, int, int, int, bytes]]:
        """(tenant, subject, epoch, index, kek_version, wrapped_dk) of rows under another version."""
        self._scope()
        return [(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in self.execute(
            "SELECT tenant, subject, epoch, idx, kek_version, wrapped_dk FROM shares "
            "WHERE kek_version < ? OR kek_version > ? LIMIT ?", (version, version, limit))]

    def rewrap_shares(self, updates: list[tuple]) -> int:
        """Apply (new_version, new_wrapped, tenant, subject, epoch, old_version, old_wrapped)
        to rows still as read; how many changed."""
        self._scope()
        return self._many(self.dialect.sql(
            "UPDATE shares SET kek_version = ?, wrapped_dk = ? "
            "WHERE tenant = ? AND subject = ? AND epoch = ? AND kek_version = ? AND wrapped_dk = ?"), updates)

    def rewrap_mac_key(self, epoch: int, version: int, wrapped_dk: bytes) -> None:
        self.execute("UPDATE mac_keys SET kek_version = ?, wrapped_dk = ? WHERE epoch = ?", (version, wrapped_dk, epoch))

    def kek_versions_of_keys_and_seeds(self) -> set[int]:
        """Versions sealing a session seed or a MAC key share (kept at a retirement)."""
        still = {r[0] for r in self.execute(
            "SELECT DISTINCT seed_kek_version FROM maintenance_sessions WHERE seed_wrapped_dk IS NOT NULL")}
        return still | {r[0] for r in self.execute("SELECT DISTINCT kek_version FROM mac_keys")}

    # --- maintenance sessions (the node's lock for long auditor jobs) -----------------------
    #
    # One row per session of any kind. A session whose state is not closed
    # holds the node's maintenance lock: at most one at a time. Rows stay
    # after a session closes, so a rerun with the same id learns it is done.

    def open_session(self) -> MaintenanceSession | None:
        """The session holding the node's maintenance lock, if any."""
        r = self.execute(
            f"SELECT {_SESSION_COLUMNS} FROM maintenance_sessions WHERE {_OPEN} ORDER BY started_ms LIMIT 1"
        ).fetchone()
        return _session(r) if r else None

    def get_session(self, session_id: str) -> MaintenanceSession | None:
        r = self.execute(f"SELECT {_SESSION_COLUMNS} FROM maintenance_sessions WHERE session_id = ?",
                         (session_id,)).fetchone()
        return _session(r) if r else None

    def begin_session(
        self, session_id: str, kind: str, actor: str, plan: dict | str, state: str, now_ms: int, *,
        epoch: int = 0, new_epoch: int | None = None, seed: SealedShare | None = None,
    ) -> MaintenanceSession:
        """Open a session inside the caller's write transaction (``plan`` a dict,
        or its JSON as the caller encodes it). Raises SessionBusy when another
        session is open, ValueError when the id was used before."""
        busy = self.open_session()
        if busy is not None:
            raise SessionBusy(busy)
        if self.get_session(session_id) is not None:
            raise ValueError(f"Session id {session_id!r} was already used on this node.")
        plan_json = plan if isinstance(plan, str) else json.dumps(plan, sort_keys=True)
        new_epoch = epoch if new_epoch is None else new_epoch
        sealed = tuple(seed) if seed is not None else (None, None, None, None)
        self.execute(
            f"INSERT INTO maintenance_sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (session_id, kind, state, epoch, new_epoch, plan_json, *sealed, 0, actor, now_ms, now_ms),
        )
        return self.get_session(session_id)

    def update_session(
        self, session_id: str, now_ms: int, *, state: str | None = None, plan: dict | None = None,
        skipped: int | None = None,
    ) -> None:
        """Change a session's state, plan or skipped count (a state in CLOSED_STATES releases the lock)."""
        sets, values = ["updated_ms = ?"], [now_ms]
        if state is not None:
            sets.append("state = ?")
            values.append(state)
        if plan is not None:
            sets.append("plan_json = ?")
            values.append(json.dumps(plan, sort_keys=True))
        if skipped is not None:
            sets.append("skipped = ?")
            values.append(skipped)
        self.execute(f"UPDATE maintenance_sessions SET {', '.join(sets)} WHERE session_id = ?", (*values, session_id))

    def drop_seed(self, session_id: str) -> None:
        """Clear a session's sealed seed (erased rows are zeroed, see the dialect)."""
        self.execute("UPDATE maintenance_sessions SET seed_kek_version = NULL, seed_wrapped_dk = NULL, "
                     "seed_nonce = NULL, seed_ciphertext = NULL WHERE session_id = ?", (session_id,))

    def close_session(self, session_id: str, state: str, now_ms: int) -> None:
        """Close a session: its check batches and its seed go, its row stays."""
        self.execute("DELETE FROM refresh_check_diffs WHERE session_id = ?", (session_id,))
        self.drop_seed(session_id)
        self.update_session(session_id, now_ms, state=state)

    # --- a refresh's sealed check batches (and a reshare's check masks) ----------------------

    def put_check_batch(self, b: CheckBatch) -> None:
        self.execute(self.dialect.upsert("refresh_check_diffs", _CHECK_COLUMNS,
                                         "session_id, first_tenant, first_subject, width"), self._check_params(b))

    def put_check_batch_once(self, b: CheckBatch) -> bool:
        """Store the batch unless one is at its place; True if stored."""
        return self.execute(self.dialect.insert_new("refresh_check_diffs", _CHECK_COLUMNS),
                            self._check_params(b)).rowcount > 0

    @staticmethod
    def _check_params(b: CheckBatch) -> tuple:
        return (b.session_id, b.first_tenant, b.first_subject, b.width, b.keys_json, b.fingerprints, *b.sealed)

    @staticmethod
    def _check_batch(r) -> CheckBatch:
        return CheckBatch(r[0], r[1], r[2], r[3], r[4], bytes(r[5]),
                          SealedShare(r[6], bytes(r[7]), bytes(r[8]), bytes(r[9])))

    def check_batch(self, session_id: str, first: tuple[str, str], width: int) -> CheckBatch | None:
        r = self.execute(f"SELECT {_CHECK_COLUMNS} FROM refresh_check_diffs WHERE session_id = ? "
                         "AND first_tenant = ? AND first_subject = ? AND width = ?",
                         (session_id, *first, width)).fetchone()
        return self._check_batch(r) if r else None

    def check_batches(self, session_id: str, *, records_only: bool = False) -> Iterator[CheckBatch]:
        """A session's batches in key order (streamed); ``records_only``
        leaves out the sealed check masks (tenant "", no record's)."""
        only = " AND first_tenant <> ''" if records_only else ""
        for r in self.execute(f"SELECT {_CHECK_COLUMNS} FROM refresh_check_diffs WHERE session_id = ?{only} "
                              "ORDER BY first_tenant, first_subject", (session_id,)):
            yield self._check_batch(r)

    def delete_check_batches(self, session_id: str, limit: int) -> int:
        """Delete up to ``limit`` of a session's check batches; how many went."""
        rid = self.dialect.row_id
        return self.execute(f"DELETE FROM refresh_check_diffs WHERE {rid} IN (SELECT {rid} FROM refresh_check_diffs "
                            "WHERE session_id = ? LIMIT ?)", (session_id, limit)).rowcount

    # --- batch items honoured (the write guard's part the audit log cannot rebuild) -----------

    def add_used_batch_items(self, digest: str, expires_ms: int, items: bytes, now_ms: int) -> None:
        """Record the items (packed 8-byte hashes) one bulk store honoured under
        one batch ticket; rows of expired tickets go at the same time."""
        self.execute("DELETE FROM used_batch_items WHERE expires_ms < ?", (now_ms,))
        self.execute("INSERT INTO used_batch_items (digest, stored_ms, expires_ms, items) VALUES (?,?,?,?)",
                     (digest, now_ms, expires_ms, items))

    def used_batch_items(self, now_ms: int) -> list[tuple[str, int, bytes]]:
        """(ticket digest, expiry, packed item hashes) of every batch ticket not yet expired."""
        return [(r[0], r[1], bytes(r[2])) for r in self.execute(
            "SELECT digest, expires_ms, items FROM used_batch_items WHERE expires_ms >= ?", (now_ms,))]

    # --- MAC key shares (one per epoch) ---------------------------------------------------

    def mac_keys(self) -> dict[int, MacKeyRow]:
        """Every epoch's key share row, by epoch."""
        return {r[0]: MacKeyRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bytes(r[6]), bytes(r[7]))
                for r in self.execute(f"SELECT {_KEY_COLUMNS} FROM mac_keys ORDER BY epoch")}

    def insert_mac_key(self, row: MacKeyRow, now_ms: int) -> None:
        self.execute(
            self.dialect.upsert("mac_keys", f"{_KEY_COLUMNS}, stored_ms", "epoch"),
            (row.epoch, row.threshold, row.width, row.session_id, row.kek_version, row.wrapped_dk, row.nonce,
             row.ciphertext, now_ms),
        )

    def delete_mac_keys(self, epoch: int, *, older: bool = False) -> None:
        """Delete the key share of ``epoch`` (of every epoch before it with ``older``)."""
        self.execute(f"DELETE FROM mac_keys WHERE epoch {'<' if older else '='} ?", (epoch,))

    # --- the audit chain ---------------------------------------------------------------------

    def insert_entry(self, e: audit.AuditEntry) -> None:
        self.insert_entry_row((e.seq, e.time_ms, e.node, e.event, e.actor, e.request_id, e.tenant, e.subject,
                               e.details_json, e.prev_hash, e.entry_hash))

    def insert_entry_row(self, row: tuple) -> None:
        """Insert an entry given as a row in AUDIT_COLUMNS order (``vault.audit.make_entry_row``)."""
        self.execute(f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)

    def insert_checkpoint(self, cp: audit.AuditCheckpoint) -> None:
        self.execute(self.dialect.upsert("audit_checkpoints", "seq, entry_hash, time_ms, node, signature", "seq"),
                     (cp.seq, cp.entry_hash, cp.time_ms, cp.node, cp.signature))

    def audit_head(self) -> tuple[int, bytes | None]:
        """(seq, entry_hash) of the last entry; (0, None) for an empty log."""
        row = self.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], bytes(row[1])) if row else (0, None)

    def entry_row(self, seq: int) -> tuple | None:
        """One stored entry row (AUDIT_COLUMNS order), as stored."""
        return self.execute(f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq = ?", (seq,)).fetchone()

    def last_checkpoint_seq(self) -> int:
        row = self.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()
        return row[0] or 0

    def iter_entries(self, from_seq: int = 1, page: int = 1000) -> Iterator[tuple]:
        """Stored entry rows in seq order (as written, whatever they now hold)."""
        seq = from_seq - 1
        while True:
            rows = self.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (seq, page)
            ).fetchall()
            if not rows:
                return
            yield from rows
            seq = rows[-1][0]

    def checkpoints(self, from_seq: int = 1) -> list[audit.AuditCheckpoint]:
        return [
            audit.AuditCheckpoint(seq=r[0], entry_hash=bytes(r[1]), time_ms=r[2], node=r[3], signature=bytes(r[4]))
            for r in self.execute(
                "SELECT seq, entry_hash, time_ms, node, signature FROM audit_checkpoints WHERE seq >= ? ORDER BY seq",
                (from_seq,),
            )
        ]

    def entries_since(self, time_ms: int, events: tuple[str, ...]) -> list[tuple]:
        """(time_ms, event, request_id, tenant, subject, details_json) of recent entries."""
        marks = ",".join("?" * len(events))
        return self.execute(
            f"SELECT time_ms, event, request_id, tenant, subject, details_json FROM audit_log "
            f"WHERE time_ms >= ? AND event IN ({marks}) ORDER BY seq",
            (time_ms, *events),
        ).fetchall()

    def event_details(self, since_ms: int, event: str, request_id: str) -> list[dict]:
        """The details of one request's entries of one event since ``since_ms``, oldest first."""
        return [json.loads(r[0]) for r in self.execute(
            "SELECT details_json FROM audit_log WHERE time_ms >= ? AND event = ? AND request_id = ? ORDER BY seq",
            (since_ms, event, request_id))]

    def read_chain(self) -> tuple[list[audit.AuditEntry], list[audit.AuditCheckpoint]]:
        """The whole stored audit log and its checkpoints, as stored."""
        return audit.load_entries(list(self.iter_entries())), self.checkpoints()


def _group_filter(tenant: str, dimension: int, max_epoch: int, group: str) -> tuple[str, tuple]:
    """Identify's row filter: one tenant's rows of one dimension up to an epoch, of one group if named."""
    where = "tenant = ? AND dimension = ? AND epoch <= ?"
    args: tuple = (tenant, int(dimension), int(max_epoch))
    return (where + " AND grp = ?", (*args, group)) if group else (where, args)
