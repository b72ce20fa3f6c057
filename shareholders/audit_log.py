"""The node's single database writer: the audit hash chain and group commit.

Every change to the node (a store, a release, a delete, a denial, a start)
is a *job*: a function run inside a write transaction that changes share
rows and appends audit entries through ``Tx.append``. RPC threads submit
jobs and wait on a future; one writer thread takes everything queued,
runs each job in its own SAVEPOINT (a failing job rolls back alone, the
others still commit), and COMMITs the lot in one transaction: one fsync
for many concurrent releases. A caller is answered only after its audit
entry is durable, so nothing is released that the log does not show.

The chain head (seq, hash) lives in this thread only, and is rolled back
with a job or a failed commit. Every ``checkpoint_every`` entries, or
``checkpoint_interval_s`` seconds after the first unsigned entry, and on
close, the head is signed with the node's Ed25519 audit key
(``vault.audit.sign_checkpoint``) and stored beside the chain.
"""
from __future__ import annotations

import _thread
import logging
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from splitvault.v1 import common_pb2
from vault import audit
from vault.errors import AuditChainError
from shareholders import store

T = TypeVar("T")
_log = logging.getLogger("shareholders.audit")
# Most jobs in one transaction: bounds the latency one commit adds.
MAX_GROUP = 2048
_STOP = object()


def now_ms() -> int:
    return int(time.time() * 1000)


def check_tail(conn: sqlite3.Connection, public_key, node: str) -> None:
    """Refuse to extend a chain whose end contradicts the node's own last
    checkpoint (entries cut off or rewritten) or whose head does not hash.

    Cheap (a few rows), so it runs at every start; the whole chain is
    checked by ``vault.audit.verify_chain`` (``vaultctl audit verify``).
    Raises AuditChainError naming the first entry found broken.
    """
    seq, head = store.audit_head(conn)
    cps = store.checkpoints(conn, store.last_checkpoint_seq(conn)) if store.last_checkpoint_seq(conn) else []
    tail = audit.load_entries(list(store.iter_entries(conn, max(1, seq - 1))))
    start = tail[0].seq if tail else 1
    prev = audit.GENESIS_HASH
    if start > 1:
        row = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = ?", (start - 1,)).fetchone()
        prev = bytes(row[0]) if row else b""
    report = audit.verify_chain(tail, [], public_key, node=node, start_seq=start, start_prev_hash=prev)
    if not report.ok:
        raise AuditChainError(f"The audit log is damaged: {report.reason} Run vaultctl audit verify.", report.broken_seq)
    for cp in cps:
        at = conn.execute("SELECT seq, time_ms, node, event, actor, request_id, tenant, subject, details_json, "
                          "prev_hash, entry_hash FROM audit_log WHERE seq = ?", (cp.seq,)).fetchone()
        entries = audit.load_entries([at]) if at else []
        check = audit.verify_chain(
            entries, [cp], public_key, node=node, start_seq=cp.seq,
            start_prev_hash=entries[0].prev_hash if entries else audit.GENESIS_HASH,
        )
        if not check.ok:
            raise AuditChainError(
                f"The audit log is damaged: it does not match the node's last signed checkpoint (entry {cp.seq}). "
                "Run vaultctl audit verify.",
                min(cp.seq, seq + 1),
            )


class WriterClosed(RuntimeError):
    """The writer has stopped; nothing more can be committed."""


class Tx:
    """What a job sees: the write connection and the audit chain."""

    __slots__ = ("conn", "_writer")

    def __init__(self, conn: sqlite3.Connection, writer: "AuditWriter"):
        self.conn = conn
        self._writer = writer

    def append(
        self,
        event: str,
        *,
        actor: str = "",
        request_id: str = "",
        tenant: str = "",
        subject: str = "",
        details: dict | None = None,
    ) -> common_pb2.AuditEntry:
        return self._writer._append(event, actor, request_id, tenant, subject, details)


class Pending:
    """A submitted job's outcome, once committed.

    A bare lock held until the writer settles the job: lighter than a
    concurrent.futures.Future (no Condition, no callbacks), which matters
    when thousands of releases a second each wait for their commit.
    """

    __slots__ = ("job", "_lock", "_result", "_error")

    def __init__(self, job):
        self.job = job
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._result = None
        self._error: BaseException | None = None

    def _settle(self, result, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._lock.release()

    def done(self) -> bool:
        return not self._lock.locked()

    def result(self):
        """Block until committed; the job's result, or raise its exception."""
        self._lock.acquire()
        self._lock.release()
        if self._error is not None:
            raise self._error
        return self._result


class AuditWriter:
    """Owns the write connection; see the module docstring."""

    def __init__(
        self,
        db_path: str | pathlib.Path,
        node: str,
        audit_key: ed25519.Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        clock: Callable[[], int] = now_ms,
        on_commit: Callable[[int], None] | None = None,
    ):
        self.node = node
        self._key = audit_key
        self._every = checkpoint_every
        self._interval = checkpoint_interval_s
        self._clock = clock
        self._on_commit = on_commit
        self._conn = store.connect(db_path)
        store.migrate(self._conn)
        try:
            check_tail(self._conn, audit_key.public_key(), node)
        except BaseException:
            self._conn.close()
            raise
        seq, head = store.audit_head(self._conn)
        self._seq = seq
        self._hash = head or audit.GENESIS_HASH
        self._signed_seq = store.last_checkpoint_seq(self._conn)
        self._unsigned_since: float | None = time.monotonic() if self._seq > self._signed_seq else None
        self._committed_seq = seq
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"audit-writer-{node}", daemon=True)
        self._thread.start()

    @property
    def head_seq(self) -> int:
        """The last committed entry's sequence number."""
        return self._committed_seq

    def submit(self, job: Callable[[Tx], T]) -> Pending:
        pending = Pending(job)
        if self._closed.is_set():
            pending._settle(None, WriterClosed("The node is shutting down."))
            return pending
        self._queue.put(pending)
        return pending

    def run(self, job: Callable[[Tx], T]) -> T:  # noqa: D401
        """Run ``job`` in the next group commit and return its result once durable."""
        return self.submit(job).result()

    def close(self, final: Callable[[Tx], Any] | None = None) -> None:
        """Commit what is queued (and ``final``), sign the head, stop the thread."""
        if self._closed.is_set():
            return
        if final is not None:
            self.submit(final)
        self._closed.set()
        self._queue.put(_STOP)
        self._thread.join()
        self._conn.close()

    # --- the writer thread --------------------------------------------------------

    def _append(self, event, actor, request_id, tenant, subject, details) -> common_pb2.AuditEntry:
        entry = audit.make_entry(
            seq=self._seq + 1, prev_hash=self._hash, time_ms=self._clock(), node=self.node, event=event,
            actor=actor, request_id=request_id, tenant=tenant, subject=subject, details=details,
        )
        store.insert_entry(self._conn, entry)
        self._seq = entry.seq
        self._hash = entry.entry_hash
        if self._unsigned_since is None:
            self._unsigned_since = time.monotonic()
        return entry

    def _checkpoint_due(self, force: bool) -> bool:
        if self._seq <= self._signed_seq:
            return False
        if force or self._seq - self._signed_seq >= self._every:
            return True
        return self._unsigned_since is not None and time.monotonic() - self._unsigned_since >= self._interval

    def _sign_head(self) -> None:
        cp = audit.sign_checkpoint(self._key, self.node, self._seq, self._hash, self._clock())
        store.insert_checkpoint(self._conn, cp)

    def _run(self) -> None:
        conn = self._conn
        stopping = False
        while not stopping:
            timeout = None
            if self._unsigned_since is not None:
                timeout = max(0.0, self._interval - (time.monotonic() - self._unsigned_since))
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = None
            batch = []
            if first is _STOP:
                stopping = True
            elif first is not None:
                batch.append(first)
            while len(batch) < MAX_GROUP and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            if not batch and not self._checkpoint_due(stopping):
                continue
            self._commit(conn, batch, force_checkpoint=stopping)
        # Anything that raced in after the stop marker is refused.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item._settle(None, WriterClosed("The node is shutting down."))

    def _commit(self, conn: sqlite3.Connection, batch: list, force_checkpoint: bool) -> None:
        start_seq, start_hash, start_unsigned = self._seq, self._hash, self._unsigned_since
        outcomes: list[tuple[Pending, Any, BaseException | None]] = []
        tx = Tx(conn, self)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for pending in batch:
                mark = (self._seq, self._hash, self._unsigned_since)
                conn.execute("SAVEPOINT job")
                try:
                    result = pending.job(tx)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    self._seq, self._hash, self._unsigned_since = mark
                    outcomes.append((pending, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((pending, result, None))
            signed = self._checkpoint_due(force_checkpoint)
            if signed:
                self._sign_head()
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - the whole group failed
            _log.error("audit commit failed", exc_info=(type(exc), exc, None))
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._seq, self._hash, self._unsigned_since = start_seq, start_hash, start_unsigned
            failure = WriterClosed("The node could not commit to its database.")
            for pending in batch:
                pending._settle(None, failure)
            return
        if signed:
            self._signed_seq = self._seq
            self._unsigned_since = None
        self._committed_seq = self._seq
        if self._on_commit is not None:
            self._on_commit(self._seq)
        for pending, result, exc in outcomes:
            pending._settle(result, exc)


def verify_database(db_path: str | pathlib.Path, public_key, node: str | None = None) -> audit.VerifyReport:
    """Verify a node's stored audit chain offline (the node may be stopped)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        entries, cps = store.read_chain(conn)
    finally:
        conn.close()
    return audit.verify_chain(entries, cps, public_key, node=node)
