"""The node's database writer: the audit hash chain and group commit.

Every change to the node (a store, a release, a delete, a denial, a start)
is a *job*: a function run inside a write transaction that changes share
rows and appends audit entries through ``Tx.append``. ``run(job)`` returns
only once the job's transaction is durable, so nothing is released that the
log does not show.

Group commit, leader/follower style: a caller queues its job; if nobody is
committing it becomes the leader, else it sleeps until a leader settles its
job or hands it the lead. The leader takes *everything* queued, runs each job
once, in its own SAVEPOINT (a job that raises rolls back alone and its
caller gets the exception; the others still commit), and COMMITs the lot in
one transaction: one fsync for all of them.
Each caller is woken once. The committing is done by the calling RPC threads
themselves: measured on the release path, handing every job to a dedicated
writer thread cost more CPU (a thread wake-up and a GIL hand-over per call)
than the fsyncs the grouping saves.

The chain head (seq, hash) is touched only under the commit lock, and is
rolled back with a job or a failed commit. Every ``checkpoint_every``
entries, or ``checkpoint_interval_s`` seconds after the first unsigned entry
(a small timer thread), and on close, the head is signed with the node's
Ed25519 audit key (``vault.audit.sign_checkpoint``) and stored beside the
chain in the same transaction; once committed it is handed to
``on_checkpoint`` (shareholders.witness publishes it to the peers).
"""
from __future__ import annotations

import _thread
import logging
import pathlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import audit
from vault.errors import AuditChainError
from shareholders import storage

T = TypeVar("T")
_log = logging.getLogger("shareholders.audit")


def now_ms() -> int:
    return int(time.time() * 1000)


def check_tail(db: storage.Database, public_key, node: str) -> None:
    """Refuse to extend a chain whose end contradicts the node's own last
    checkpoint (entries cut off or rewritten) or whose head does not hash.

    Cheap (a few rows), so it runs at every start; the whole chain is
    checked by ``vault.audit.verify_chain`` (``vaultctl audit verify``).
    Raises AuditChainError naming the first entry found broken.
    """
    seq, head = db.audit_head()
    cps = db.checkpoints(db.last_checkpoint_seq()) if db.last_checkpoint_seq() else []
    tail = audit.load_entries(list(db.iter_entries(max(1, seq - 1))))
    start = tail[0].seq if tail else 1
    prev = audit.GENESIS_HASH
    if start > 1:
        row = db.entry_row(start - 1)
        prev = bytes(row[10]) if row else b""
    report = audit.verify_chain(tail, [], public_key, node=node, start_seq=start, start_prev_hash=prev)
    if not report.ok:
        raise AuditChainError(f"The audit log is damaged: {report.reason} Run vaultctl audit verify.", report.broken_seq)
    for cp in cps:
        at = db.entry_row(cp.seq)
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


_COULD_NOT_COMMIT = "The node could not commit to its database."


class WriterClosed(RuntimeError):
    """The writer has stopped or cannot commit; nothing more is committed."""


class Tx:
    """What a job sees: the store on the write connection and the audit chain."""

    __slots__ = ("db", "_writer")

    def __init__(self, db: storage.Database, writer: "AuditWriter"):
        self.db = db
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
    ) -> audit.AuditEntry:
        return self._writer._append(event, actor, request_id, tenant, subject, details)


class _Pending:
    """A queued job and, once its transaction is settled, its outcome.

    ``wake`` is held from creation; it is released once, either when the job
    is settled or when its caller is made the next leader (``lead``).
    """

    __slots__ = ("job", "done", "lead", "result", "error", "wake")

    def __init__(self, job):
        self.job = job
        self.done = False
        self.lead = False
        self.result = None
        self.error: BaseException | None = None
        self.wake = _thread.allocate_lock()
        self.wake.acquire()


class AuditWriter:
    """Owns the write connection; see the module docstring."""

    def __init__(
        self,
        db_path: "str | pathlib.Path | storage.Location",
        node: str,
        audit_key: ed25519.Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        clock: Callable[[], int] = now_ms,
        on_commit: Callable[[int], None] | None = None,
        on_checkpoint: Callable[[audit.AuditCheckpoint], None] | None = None,
    ):
        self.node = node
        self._key = audit_key
        self._every = checkpoint_every
        self._interval = checkpoint_interval_s
        self._clock = clock
        self._on_commit = on_commit
        self._on_checkpoint = on_checkpoint
        storage.migrate(db_path)
        self._db = storage.connect(db_path)
        try:
            check_tail(self._db, audit_key.public_key(), node)
        except BaseException:
            self._db.close()
            raise
        seq, head = self._db.audit_head()
        self._seq = seq
        self._hash = head or audit.GENESIS_HASH
        self._signed_seq = self._db.last_checkpoint_seq()
        if on_checkpoint is not None and self._signed_seq:
            # The newest signed head so far: its publishing may not have finished before the last stop.
            on_checkpoint(self._db.checkpoints(self._signed_seq)[-1])
        self._unsigned_since: float | None = time.monotonic() if self._seq > self._signed_seq else None
        self._committed_seq = seq
        self._mutex = threading.Lock()  # guards the queue and the closed flag
        self._commit_lock = threading.Lock()  # one committer at a time
        self._queue: list[_Pending] = []
        self._leading = False  # a caller is committing or about to
        self._closed = False
        self._db_closed = False
        self._wake = threading.Event()
        self._timer = threading.Thread(target=self._checkpoint_timer, name=f"audit-timer-{node}", daemon=True)
        self._timer.start()
        # Background commits for callers that overlap work with a commit (streams).
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"audit-bg-{node}")

    @property
    def head_seq(self) -> int:
        """The last committed entry's sequence number."""
        return self._committed_seq

    def run(self, job: Callable[[Tx], T]) -> T:
        """Run ``job`` in the next group commit; its result once durable (or its exception)."""
        pending = _Pending(job)
        with self._mutex:
            if self._closed:
                raise WriterClosed("The node is shutting down.")
            self._queue.append(pending)
            lead = not self._leading
            self._leading = True
        if not lead:
            pending.wake.acquire()  # settled by a leader, or made the leader
        if not pending.done:
            self._lead(pending)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def submit(self, job: Callable[[Tx], T]) -> "Future[T]":
        """``run(job)`` in the background; the caller may do other work meanwhile."""
        try:
            return self._background.submit(self.run, job)
        except RuntimeError:
            fut: Future = Future()
            fut.set_exception(WriterClosed("The node is shutting down."))
            return fut

    def close(self, final: Callable[[Tx], Any] | None = None) -> None:
        """Commit what is queued (and ``final``), sign the head, close the database."""
        if self._closed:
            return
        self._background.shutdown(wait=True)  # let queued background commits land
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if final is not None:
                self._queue.append(_Pending(final))
        with self._commit_lock:
            with self._mutex:
                batch, self._queue = self._queue, []
            self._commit(batch, force_checkpoint=True)
            self._db_closed = True
            self._db.close()
        self._wake.set()
        self._timer.join()

    # --- committing (under the commit lock) -------------------------------------------

    def _lead(self, pending: _Pending) -> None:
        # Commit everything queued (our own job included), then hand the
        # lead to the oldest job queued meanwhile, or give it up.
        with self._commit_lock:
            with self._mutex:
                batch, self._queue = self._queue, []
            self._commit(batch, force_checkpoint=False)
        with self._mutex:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.wake.release()
            else:
                self._leading = False

    def _append(self, event, actor, request_id, tenant, subject, details) -> audit.AuditEntry:
        entry, row = audit.make_entry_row(
            seq=self._seq + 1, prev_hash=self._hash, time_ms=self._clock(), node=self.node, event=event,
            actor=actor, request_id=request_id, tenant=tenant, subject=subject, details=details,
        )
        self._db.insert_entry_row(row)
        self._seq = row[0]
        self._hash = row[10]
        if self._unsigned_since is None:
            self._unsigned_since = time.monotonic()
        return entry

    def _checkpoint_due(self, force: bool) -> bool:
        if self._seq <= self._signed_seq:
            return False
        if force or self._seq - self._signed_seq >= self._every:
            return True
        return self._unsigned_since is not None and time.monotonic() - self._unsigned_since >= self._interval

    def _checkpoint_timer(self) -> None:
        # Signs the head of a quiet log once the interval has passed.
        while True:
            self._wake.wait(timeout=min(self._interval, 5.0))
            if self._closed:
                return
            with self._commit_lock:
                if not self._db_closed and self._checkpoint_due(False):
                    self._commit([], force_checkpoint=False)

    def _commit(self, batch: list[_Pending], force_checkpoint: bool) -> None:
        if self._db_closed:
            for pending in batch:
                self._settle(pending, None, WriterClosed("The node is shutting down."))
            return
        db = self._db
        start = (self._seq, self._hash, self._unsigned_since)
        # Each job runs exactly once. In a group, each job has its own
        # SAVEPOINT, so one that raises rolls back alone; a job alone needs
        # none (two statements fewer on an idle node's path).
        alone = len(batch) == 1
        outcomes: list[tuple[_Pending, Any, BaseException | None]] = []
        tx = Tx(db, self)
        try:
            if db.reopen_if_lost():
                # The last commit's outcome was not seen: the chain head is what the store holds.
                seq, head = db.audit_head()
                self._seq, self._hash, self._committed_seq = seq, head or audit.GENESIS_HASH, seq
                start = (self._seq, self._hash, self._unsigned_since)
            db.begin_write()
            for pending in batch:
                mark = (self._seq, self._hash, self._unsigned_since)
                if not alone:
                    db.savepoint()
                try:
                    result = pending.job(tx)
                except Exception as exc:  # noqa: BLE001 - handed to its caller
                    db.rollback() if alone else db.rollback_to()
                    if isinstance(exc, db.errors):
                        # The store refused a statement (PostgreSQL: a full
                        # data disk fails the INSERT that extends a file, not
                        # the commit): the node could not write, as below.
                        closed = self._store_failed(exc, db.errors)
                        closed.__cause__, exc = exc, closed
                    if alone:
                        self._seq, self._hash, self._unsigned_since = mark
                        self._settle(pending, None, exc)
                        return
                    db.release()
                    self._seq, self._hash, self._unsigned_since = mark
                    outcomes.append((pending, None, exc))
                else:
                    if not alone:
                        db.release()
                    outcomes.append((pending, result, None))
            signed = self._checkpoint_due(force_checkpoint)
            if signed:
                cp = audit.sign_checkpoint(self._key, self.node, self._seq, self._hash, self._clock())
                db.insert_checkpoint(cp)
            db.commit()
        except BaseException as exc:  # noqa: BLE001 - the whole group failed
            self._store_failed(exc, db.errors)
            try:
                db.rollback()
            except db.errors:
                pass
            self._seq, self._hash, self._unsigned_since = start
            for pending in batch:
                if not pending.done:
                    self._settle(pending, None, WriterClosed(_COULD_NOT_COMMIT))
            return
        if signed:
            self._signed_seq = self._seq
            self._unsigned_since = None
            if self._on_checkpoint is not None:
                self._on_checkpoint(cp)
        self._committed_seq = self._seq
        if self._on_commit is not None:
            self._on_commit(self._seq)
        for pending, result, exc in outcomes:
            self._settle(pending, result, exc)

    @staticmethod
    def _store_failed(exc: BaseException, errors: tuple[type[BaseException], ...] = ()) -> WriterClosed:
        """Log why the store refused a write; the caller's error (UNAVAILABLE)."""
        # The engine's reason ("database or disk is full", "attempt to write
        # a readonly database", "disk I/O error", PostgreSQL's "could not
        # extend file ...: No space left on device") carries no data and is
        # what the operator must act on (tests/test_faults_disk*.py).
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, errors) else type(exc).__name__
        _log.error("audit commit failed", exc_info=(type(exc), exc, None), extra={"fields": {"error": reason}})
        return WriterClosed(_COULD_NOT_COMMIT)

    @staticmethod
    def _settle(pending: _Pending, result, error: BaseException | None) -> None:
        pending.result, pending.error = result, error
        pending.done = True
        if not pending.lead and pending.wake.locked():
            pending.wake.release()


def verify_database(db_path, public_key, node: str | None = None) -> audit.VerifyReport:
    """Verify a node's stored audit chain offline (the node may be stopped)."""
    db = storage.connect_readonly(db_path)
    try:
        entries, cps = db.read_chain()
    finally:
        db.close()
    return audit.verify_chain(entries, cps, public_key, node=node)
