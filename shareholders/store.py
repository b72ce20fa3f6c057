"""The node's SQLite database: schema, migrations and queries.

One file, ``<data_dir>/shares.db``, in WAL mode with ``synchronous=FULL``: a
transaction that returned COMMIT is on disk and survives a kill -9 or a
power cut. Only the audit writer thread (``shareholders.audit_log``) writes;
readers use their own connections and see committed snapshots.

Share rows hold only the sealed form of a share (``vault.envelope``): the
KEK that wraps the data keys never enters this file. Each row keeps its KEK
version and epoch so that a key rotation (re-wrap every data key) and a
proactive refresh (a prepared epoch beside the current one, then a switch)
can proceed row by row and resume after a crash. ``node_state`` records
which node this database belongs to and its current epoch and committee.
"""
from __future__ import annotations

import json
import pathlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from splitvault.v1 import common_pb2
from vault.envelope import SealedShare

# Each migration takes the schema from version i-1 to i, in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE node_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT NOT NULL,
            idx INTEGER NOT NULL,
            current_epoch INTEGER NOT NULL,
            committee_json TEXT NOT NULL,
            updated_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE shares (
            tenant TEXT NOT NULL,
            subject TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            threshold INTEGER NOT NULL,
            n INTEGER NOT NULL,
            dimension INTEGER NOT NULL,
            codec_version INTEGER NOT NULL,
            mac_count INTEGER NOT NULL,
            request_id TEXT NOT NULL,
            kek_version INTEGER NOT NULL,
            wrapped_dk BLOB NOT NULL,
            nonce BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            stored_ms INTEGER NOT NULL,
            PRIMARY KEY (tenant, subject, epoch)
        )""",
        # Rotation walks the rows still under an old KEK version.
        "CREATE INDEX shares_by_kek ON shares (kek_version)",
        """CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            time_ms INTEGER NOT NULL,
            node TEXT NOT NULL,
            event TEXT NOT NULL,
            actor TEXT NOT NULL,
            request_id TEXT NOT NULL,
            tenant TEXT NOT NULL,
            subject TEXT NOT NULL,
            details_json TEXT NOT NULL,
            prev_hash BLOB NOT NULL,
            entry_hash BLOB NOT NULL
        )""",
        # Start-up rebuilds replay and attempt state from recent entries.
        "CREATE INDEX audit_by_time ON audit_log (time_ms)",
        """CREATE TABLE audit_checkpoints (
            seq INTEGER PRIMARY KEY,
            entry_hash BLOB NOT NULL,
            time_ms INTEGER NOT NULL,
            node TEXT NOT NULL,
            signature BLOB NOT NULL
        )""",
    ),
    # 2: maintenance sessions (shareholders.epochs, shareholders.rotation):
    # one row per session; the row in an open state is the node's lock.
    # Prepared rows of a new epoch live in ``shares``, unserved until the
    # session commits.
    (
        """CREATE TABLE maintenance_sessions (
            session_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            from_epoch INTEGER NOT NULL,
            new_epoch INTEGER NOT NULL,
            plan_json TEXT NOT NULL,
            seed_kek_version INTEGER,
            seed_wrapped_dk BLOB,
            seed_nonce BLOB,
            seed_ciphertext BLOB,
            skipped INTEGER NOT NULL DEFAULT 0,
            actor TEXT NOT NULL,
            started_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL
        )""",
        "CREATE INDEX maintenance_by_state ON maintenance_sessions (state)",
    ),
    (
        # A refresh's new-minus-old values, sealed per prepared batch, for the
        # check (shareholders.epochs); deleted with the session's old epoch.
        """CREATE TABLE refresh_check_diffs (
            session_id TEXT NOT NULL,
            first_tenant TEXT NOT NULL,
            first_subject TEXT NOT NULL,
            width INTEGER NOT NULL,
            keys_json TEXT NOT NULL,
            fingerprints BLOB NOT NULL,
            kek_version INTEGER NOT NULL,
            wrapped_dk BLOB NOT NULL,
            nonce BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            PRIMARY KEY (session_id, first_tenant, first_subject, width)
        )""",
    ),
    (
        # 4: records [s | t] under the epoch's MAC key (vault.epoch_mac): this
        # node's share of each epoch's key, sealed like a share. A database
        # of version 1-3 holding shares is in the old record format (AMD
        # MAC) and is refused (``migrate``), not converted.
        """CREATE TABLE mac_keys (
            epoch INTEGER PRIMARY KEY,
            threshold INTEGER NOT NULL,
            width INTEGER NOT NULL,
            session_id TEXT NOT NULL,
            kek_version INTEGER NOT NULL,
            wrapped_dk BLOB NOT NULL,
            nonce BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            stored_ms INTEGER NOT NULL
        )""",
    ),
    (
        # 5: Identify's gallery cache reads every row's version before each
        # query (tenant_row_versions): a covering index, so that read never
        # touches the ~2 KB rows themselves.
        "CREATE INDEX shares_identify ON shares (tenant, dimension, subject, epoch, request_id, nonce)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# The first schema version whose records are [s | t] under an epoch MAC key.
RECORD_FORMAT_VERSION = 4
# A new node starts in epoch 1; a proactive refresh moves it on.
FIRST_EPOCH = 1

SHARE_COLUMNS = (
    "tenant, subject, epoch, idx, threshold, n, dimension, codec_version, mac_count, "
    "request_id, kek_version, wrapped_dk, nonce, ciphertext, stored_ms"
)
AUDIT_COLUMNS = "seq, time_ms, node, event, actor, request_id, tenant, subject, details_json, prev_hash, entry_hash"


class SchemaError(RuntimeError):
    """The database is from a newer version of the node, or belongs to another node."""


@dataclass(frozen=True)
class ShareRow:
    """One stored record: its metadata and the sealed share."""

    tenant: str
    subject: str
    epoch: int
    index: int
    threshold: int
    shareholders: int
    dimension: int
    codec_version: int
    mac_count: int
    request_id: str
    kek_version: int
    wrapped_dk: bytes
    nonce: bytes
    ciphertext: bytes
    stored_ms: int

    @property
    def sealed(self) -> SealedShare:
        return SealedShare(self.kek_version, self.wrapped_dk, self.nonce, self.ciphertext)

    def info(self) -> common_pb2.RecordInfo:
        return common_pb2.RecordInfo(
            tenant=self.tenant, subject=self.subject, index=self.index, epoch=self.epoch,
            threshold=self.threshold, shareholders=self.shareholders, dimension=self.dimension,
            codec_version=self.codec_version, request_id=self.request_id, kek_version=self.kek_version,
        )

    def record(self, values: bytes) -> common_pb2.ShareRecord:
        return common_pb2.ShareRecord(
            tenant=self.tenant, subject=self.subject, index=self.index, epoch=self.epoch,
            threshold=self.threshold, shareholders=self.shareholders, dimension=self.dimension,
            codec_version=self.codec_version, mac_count=self.mac_count, values=values,
            request_id=self.request_id,
        )


@dataclass(frozen=True)
class NodeState:
    name: str
    index: int
    current_epoch: int
    committee: dict


PAGE_SIZE = 8192


def connect(path: str | pathlib.Path) -> sqlite3.Connection:
    """A connection in autocommit mode: callers issue BEGIN/COMMIT themselves."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    # A new database gets 8 KiB pages (no effect on an existing one): a sealed
    # 512-d share row is ~2.2 KB, so a 4 KiB page holds one and wastes almost
    # half, an 8 KiB page holds three. Fewer pages written, checkpointed and
    # zeroed per record when a refresh writes and later destroys an epoch.
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # Deleted and overwritten content is zeroed, not left in free pages
    # and freeblocks: an erased share, a replaced epoch or a re-wrapped data
    # key must not stay readable in the file. (This build of SQLite defaults
    # to it; others do not.)
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the WAL into the database and truncate it to zero bytes.

    In WAL mode the main file keeps the old page images until a checkpoint,
    and the WAL keeps old frames until it is overwritten: a share deleted a
    moment ago is still readable in both (tests/test_at_rest_scan.py). Run
    after an erasure or a key rotation. True when done; False if readers
    kept it from finishing within the busy timeout (the next checkpoint
    completes it).
    """
    busy, _log_frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return busy == 0


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        found = row[0] if row else 0
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"The database has schema version {found}, newer than this node's {SCHEMA_VERSION}; upgrade the node."
            )
        if 0 < found < RECORD_FORMAT_VERSION and conn.execute("SELECT COUNT(*) FROM shares").fetchone()[0]:
            raise SchemaError(
                f"The database holds shares in the old record format (schema version {found}, AMD MAC); this "
                "node reads only records under an epoch MAC key: re-enrol into a new node database."
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def init_node_state(conn: sqlite3.Connection, name: str, index: int, now_ms: int) -> NodeState:
    """This database's node identity; written on first start, checked after."""
    row = conn.execute("SELECT name, idx, current_epoch, committee_json FROM node_state WHERE id = 1").fetchone()
    if row is None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO node_state (id, name, idx, current_epoch, committee_json, updated_ms) VALUES (1, ?, ?, ?, ?, ?)",
            (name, index, FIRST_EPOCH, "{}", now_ms),
        )
        conn.execute("COMMIT")
        return NodeState(name, index, FIRST_EPOCH, {})
    state = NodeState(row[0], row[1], row[2], json.loads(row[3]))
    if state.name != name or state.index != index:
        raise SchemaError(
            f"The database belongs to node {state.name!r} with index {state.index}, "
            f"but the config names node {name!r} with index {index}."
        )
    return state


def _share_row(r) -> ShareRow:
    return ShareRow(*r[:11], bytes(r[11]), bytes(r[12]), bytes(r[13]), r[14])


def subject_rows(conn: sqlite3.Connection, tenant: str, subject: str) -> list[ShareRow]:
    """Every epoch's row of one subject of one tenant, oldest epoch first."""
    rows = conn.execute(
        f"SELECT {SHARE_COLUMNS} FROM shares WHERE tenant = ? AND subject = ? ORDER BY epoch", (tenant, subject)
    ).fetchall()
    return [_share_row(r) for r in rows]


def tenant_row_versions(conn: sqlite3.Connection, tenant: str, dimension: int, max_epoch: int) -> list[tuple]:
    """(subject, epoch, request id, nonce) of one tenant's rows of one dimension up to ``max_epoch``, by subject (no share
    values): what Identify's gallery cache compares to see what changed. Every seal draws a fresh
    nonce, so it names the sealed values (a KEK rotation re-wraps the data key and keeps it); it is
    read from the row's head, not past the ciphertext."""
    return conn.execute(
        "SELECT subject, epoch, request_id, nonce FROM shares INDEXED BY shares_identify "
        "WHERE tenant = ? AND dimension = ? AND epoch <= ? ORDER BY subject, epoch",
        (tenant, int(dimension), int(max_epoch)),
    ).fetchall()


def tenant_rows(conn: sqlite3.Connection, tenant: str, dimension: int, max_epoch: int) -> Iterator[ShareRow]:
    """Every row of one tenant of one dimension up to ``max_epoch``, in pages (Identify's gallery load)."""
    cur = conn.execute(
        f"SELECT {SHARE_COLUMNS} FROM shares WHERE tenant = ? AND dimension = ? AND epoch <= ?",
        (tenant, int(dimension), int(max_epoch)),
    )
    while page := cur.fetchmany(PAGE_SIZE):
        for r in page:
            yield _share_row(r)


def subject_request_ids(conn: sqlite3.Connection, tenant: str, subject: str) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT request_id FROM shares WHERE tenant = ? AND subject = ?", (tenant, subject))}


def request_ids_of(conn: sqlite3.Connection, keys: list[tuple[str, str]], chunk: int = 400) -> dict[tuple[str, str], set[str]]:
    """The stored request ids of many (tenant, subject) pairs at once (only
    pairs that have rows appear): one query per ``chunk`` pairs, not one each."""
    found: dict[tuple[str, str], set[str]] = {}
    for i in range(0, len(keys), chunk):
        part = keys[i:i + chunk]
        marks = ",".join("(?,?)" for _ in part)
        args = [v for pair in part for v in pair]
        # CROSS JOIN keeps the pairs as the outer loop, so each is one primary-key
        # lookup (a row-value IN over VALUES would scan the whole table).
        for tenant, subject, request_id in conn.execute(
            f"WITH k(t, s) AS (VALUES {marks}) SELECT shares.tenant, shares.subject, shares.request_id "
            "FROM k CROSS JOIN shares ON shares.tenant = k.t AND shares.subject = k.s",
            args,
        ):
            found.setdefault((tenant, subject), set()).add(request_id)
    return found


def insert_shares(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Insert or overwrite rows given as tuples in SHARE_COLUMNS order."""
    conn.executemany(f"INSERT OR REPLACE INTO shares ({SHARE_COLUMNS}) VALUES ({','.join('?' * 15)})", rows)


def delete_subject(conn: sqlite3.Connection, tenant: str, subject: str) -> int:
    return conn.execute("DELETE FROM shares WHERE tenant = ? AND subject = ?", (tenant, subject)).rowcount


def count_records(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM shares").fetchone()[0]


def sample_rows_by_kek(conn: sqlite3.Connection, per_version: int = 8) -> dict[int, list[ShareRow]]:
    """Up to ``per_version`` rows under each KEK version in use, spread evenly
    over the table (rowid lookups on the kek_version index: cheap at any size)."""
    out: dict[int, list[ShareRow]] = {}
    spans = conn.execute("SELECT kek_version, MIN(rowid), MAX(rowid) FROM shares GROUP BY kek_version").fetchall()
    for version, lo, hi in spans:
        rows: dict[int, ShareRow] = {}
        for i in range(per_version):
            at = lo + (hi - lo) * i // max(1, per_version - 1)
            r = conn.execute(
                f"SELECT rowid, {SHARE_COLUMNS} FROM shares WHERE kek_version = ? AND rowid >= ? ORDER BY rowid LIMIT 1",
                (version, at),
            ).fetchone()
            if r is not None:
                rows[r[0]] = _share_row(r[1:])
        out[version] = list(rows.values())
    return out


def node_state(conn: sqlite3.Connection) -> NodeState:
    row = conn.execute("SELECT name, idx, current_epoch, committee_json FROM node_state WHERE id = 1").fetchone()
    return NodeState(row[0], row[1], row[2], json.loads(row[3]))


# --- audit tables ---------------------------------------------------------------


_INSERT_ENTRY = f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"


def insert_entry(conn: sqlite3.Connection, e: common_pb2.AuditEntry) -> None:
    insert_entry_row(conn, (e.seq, e.time_ms, e.node, e.event, e.actor, e.request_id, e.tenant, e.subject,
                            e.details_json, e.prev_hash, e.entry_hash))


def insert_entry_row(conn: sqlite3.Connection, row: tuple) -> None:
    """Insert an entry given as a row in AUDIT_COLUMNS order (``vault.audit.make_entry_row``)."""
    conn.execute(_INSERT_ENTRY, row)


def insert_checkpoint(conn: sqlite3.Connection, cp: common_pb2.AuditCheckpoint) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO audit_checkpoints (seq, entry_hash, time_ms, node, signature) VALUES (?,?,?,?,?)",
        (cp.seq, cp.entry_hash, cp.time_ms, cp.node, cp.signature),
    )


def audit_head(conn: sqlite3.Connection) -> tuple[int, bytes | None]:
    """(seq, entry_hash) of the last entry; (0, None) for an empty log."""
    row = conn.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], bytes(row[1])) if row else (0, None)


def last_checkpoint_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()
    return row[0] or 0


def iter_entries(conn: sqlite3.Connection, from_seq: int = 1, page: int = 1000) -> Iterator[tuple]:
    """Stored entry rows in seq order (as written, whatever they now hold)."""
    seq = from_seq - 1
    while True:
        rows = conn.execute(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (seq, page)
        ).fetchall()
        if not rows:
            return
        yield from rows
        seq = rows[-1][0]


def checkpoints(conn: sqlite3.Connection, from_seq: int = 1) -> list[common_pb2.AuditCheckpoint]:
    return [
        common_pb2.AuditCheckpoint(seq=r[0], entry_hash=bytes(r[1]), time_ms=r[2], node=r[3], signature=bytes(r[4]))
        for r in conn.execute(
            "SELECT seq, entry_hash, time_ms, node, signature FROM audit_checkpoints WHERE seq >= ? ORDER BY seq",
            (from_seq,),
        )
    ]


def entries_since(conn: sqlite3.Connection, time_ms: int, events: tuple[str, ...]) -> list[tuple]:
    """(time_ms, event, request_id, tenant, subject, details_json) of recent entries."""
    marks = ",".join("?" * len(events))
    return conn.execute(
        f"SELECT time_ms, event, request_id, tenant, subject, details_json FROM audit_log "
        f"WHERE time_ms >= ? AND event IN ({marks}) ORDER BY seq",
        (time_ms, *events),
    ).fetchall()


def read_chain(conn: sqlite3.Connection) -> tuple[list[common_pb2.AuditEntry], list[common_pb2.AuditCheckpoint]]:
    """The whole stored audit log and its checkpoints, as stored."""
    from vault.audit import load_entries

    return load_entries(list(iter_entries(conn))), checkpoints(conn)


# --- maintenance sessions (the node's lock for long auditor jobs) ---------------------
#
# One row per session of any kind (kek_rotate, refresh, reshare). A session
# whose state is not closed holds the node's maintenance lock: at most one
# at a time. Rows stay after a session closes, so a rerun with the same id
# learns that it is done.

CLOSED_STATES = ("finalized", "aborted")


class SessionBusy(RuntimeError):
    """Another maintenance session holds the node's lock."""

    def __init__(self, session: "MaintenanceSession"):
        super().__init__(
            f"The node has an open {session.kind} session {session.session_id!r} (started by {session.actor}, "
            f"state {session.state}); finish it by rerunning with that session id, or abort it, first."
        )
        self.session = session


@dataclass(frozen=True)
class MaintenanceSession:
    session_id: str
    kind: str
    state: str
    actor: str
    plan: dict
    started_ms: int
    updated_ms: int

    @property
    def open(self) -> bool:
        return self.state not in CLOSED_STATES


_SESSION_COLUMNS = "session_id, kind, state, actor, plan_json, started_ms, updated_ms"
_OPEN = f"state NOT IN ({','.join(repr(s) for s in CLOSED_STATES)})"


def _session(r) -> MaintenanceSession:
    return MaintenanceSession(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6])


def open_session(conn: sqlite3.Connection) -> MaintenanceSession | None:
    """The session holding the node's maintenance lock, if any."""
    r = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM maintenance_sessions WHERE {_OPEN} ORDER BY started_ms LIMIT 1"
    ).fetchone()
    return _session(r) if r else None


def get_session(conn: sqlite3.Connection, session_id: str) -> MaintenanceSession | None:
    r = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM maintenance_sessions WHERE session_id = ?", (session_id,)).fetchone()
    return _session(r) if r else None


def begin_session(
    conn: sqlite3.Connection, session_id: str, kind: str, actor: str, plan: dict, state: str, now_ms: int,
    *, epoch: int = 0,
) -> MaintenanceSession:
    """Open a session for a job that keeps its epoch (kek_rotate), inside
    the caller's write transaction. Raises SessionBusy when another session
    is open, ValueError when the id was used before."""
    busy = open_session(conn)
    if busy is not None:
        raise SessionBusy(busy)
    if get_session(conn, session_id) is not None:
        raise ValueError(f"Session id {session_id!r} was already used on this node.")
    conn.execute(
        "INSERT INTO maintenance_sessions (session_id, kind, state, from_epoch, new_epoch, plan_json, actor, "
        "started_ms, updated_ms) VALUES (?,?,?,?,?,?,?,?,?)",
        (session_id, kind, state, epoch, epoch, json.dumps(plan, sort_keys=True), actor, now_ms, now_ms),
    )
    return MaintenanceSession(session_id, kind, state, actor, dict(plan), now_ms, now_ms)


def update_session(
    conn: sqlite3.Connection, session_id: str, now_ms: int, *, state: str | None = None, plan: dict | None = None,
) -> None:
    """Change a session's state or plan (a state in CLOSED_STATES releases the lock)."""
    sets, values = ["updated_ms = ?"], [now_ms]
    if state is not None:
        sets.append("state = ?")
        values.append(state)
    if plan is not None:
        sets.append("plan_json = ?")
        values.append(json.dumps(plan, sort_keys=True))
    conn.execute(f"UPDATE maintenance_sessions SET {', '.join(sets)} WHERE session_id = ?", (*values, session_id))


# --- MAC key shares (one per epoch) --------------------------------------------------


@dataclass(frozen=True)
class MacKeyRow:
    """This node's sealed share of one epoch's MAC key."""

    epoch: int
    threshold: int
    width: int
    session_id: str
    kek_version: int
    wrapped_dk: bytes
    nonce: bytes
    ciphertext: bytes

    @property
    def sealed(self) -> SealedShare:
        return SealedShare(self.kek_version, self.wrapped_dk, self.nonce, self.ciphertext)


_KEY_COLUMNS = "epoch, threshold, width, session_id, kek_version, wrapped_dk, nonce, ciphertext"


def mac_keys(conn: sqlite3.Connection) -> dict[int, MacKeyRow]:
    """Every epoch's key share row, by epoch."""
    return {r[0]: MacKeyRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bytes(r[6]), bytes(r[7]))
            for r in conn.execute(f"SELECT {_KEY_COLUMNS} FROM mac_keys ORDER BY epoch")}


def insert_mac_key(conn: sqlite3.Connection, row: MacKeyRow, now_ms: int) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO mac_keys ({_KEY_COLUMNS}, stored_ms) VALUES (?,?,?,?,?,?,?,?,?)",
        (row.epoch, row.threshold, row.width, row.session_id, row.kek_version, row.wrapped_dk, row.nonce,
         row.ciphertext, now_ms),
    )
