"""Key-encryption-key rotation on one node (``Shareholder.RotateKek``).

A rotation is a maintenance session of kind ``kek_rotate``
(the storage layer's maintenance sessions: one open session per node, so it cannot run
beside a refresh or another rotation). Its steps, each durable before the next:

1. **Begin** (one transaction): open the session, and append a fresh 256-bit
   key from ``secrets`` to the node's 0600 KEK file as the new active version
   (tmp file, fsync, rename, fsync of the folder, before the transaction
   commits). The key is made on the node and never travels. Then the node's
   in-memory ring is swapped: new shares are sealed under the new version,
   and every older version still decrypts. Audit entry ``kek_rotate_start``.
2. **Re-wrap** in batches: rows under an older version are read, their data
   keys unwrapped and wrapped again under the new version
   (``vault.envelope.rewrap``; share ciphertexts are untouched), and written
   back in one transaction per batch, compare-and-set on the old wrapping,
   with one audit entry ``kek_rewrap`` counting the rows.
3. **Retire** (one transaction): when no row uses an older version, the KEK
   file is rewritten with the new version only, the session is closed
   (``finalized``) and ``kek_retire`` names the retired versions.

Crash safety (kill -9 of the node or of the caller at any point): every step
is one SQLite transaction and every KEK file change is an atomic rename made
before the transaction that depends on it commits, so the node restarts with
a KEK file that opens every row. Calling ``RotateKek`` again with the same
session id resumes: no new key is made when the session's version already
sits in the file, rows still under an older version are re-wrapped, the old
versions are retired. A file left with an extra version by a crash before the
session committed is completed the same way (without a new key). The node
carries on when the caller disconnects; a later call with the session id
follows it, or learns that it finished.

Verify keeps working throughout: a release opens each row with the ring as
it is when its transaction runs, and a row's version is always in the ring.
A node whose KEK comes from SPLITVAULT_KEK_JSON cannot rewrite it and refuses
(FAILED_PRECONDITION).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import threading
import time
from collections.abc import Iterator

from shareholders import storage
from shareholders.audit_log import Tx, WriterClosed, now_ms
from shareholders.config import KEK_ENV, ConfigError, parse_kek_json, read_secret_file
from splitvault.v1 import shareholder_pb2
from vault import envelope, names, record
from vault.envelope import KEY_BYTES, KekRing, SealedShare
from vault.errors import EnvelopeError
from vaultrpc import logs, status
from vaultrpc.files import write_atomic

KIND = "kek_rotate"
DEFAULT_BATCH = 1000
MAX_BATCH = 10_000
MAX_PAUSE_MS = 60_000
# Open and closed session states, shared with refresh and reshare sessions.
STATE_OPEN = "begun"
STATE_DONE = "finalized"

Phase = shareholder_pb2.RotateKekResponse.Phase
_log = logging.getLogger("shareholders.rotation")


def crash_point(name: str) -> None:
    """Called at every point where a crash leaves a distinct state on disk
    (``begin:key_written``, ``begin:committed``, ``batch:committed``,
    ``retire:key_written``, ``retire:committed``). A no-op; tests replace it
    with one that raises there, which, like a kill -9, loses the open
    transaction and keeps whatever the KEK file already holds."""


def current_wrap(ring: KekRing, row: storage.ShareRow) -> storage.ShareRow:
    """A share row with its data key wrapped under the ring's active version:
    a store sealed just before a rotation began is committed under the new
    version, never behind the rotation."""
    if row.kek_version == ring.active:
        return row
    aad = record.record_identity(row.tenant, row.subject, row.index, row.epoch)
    try:
        sealed = envelope.rewrap(ring, aad, row.sealed)
    except EnvelopeError:
        raise status.Unavailable("The node's key-encryption key changed while the request was in flight; retry.") from None
    return dataclasses.replace(row, kek_version=sealed.kek_version, wrapped_dk=sealed.wrapped_dk)


# ---------------------------------------------------------------- the KEK file


def read_kek_file(path: str) -> tuple[dict[int, bytes], int]:
    """(version -> key, active version) from the node's KEK file."""
    raw = read_secret_file(path, "KEK")
    ring = parse_kek_json(raw, path)  # validates the shape and every key
    data = json.loads(raw)
    return {int(v): bytes.fromhex(k) for v, k in data["keys"].items()}, ring.active


def write_kek_file(path: str, keys: dict[int, bytes], active: int) -> None:
    """Replace the KEK file atomically and durably: a crash leaves the old
    file or the new one, never a mix, and never a missing file."""
    if active not in keys or any(len(k) != KEY_BYTES for k in keys.values()):
        raise ValueError("A KEK file needs its active version and 32-byte keys.")
    target = pathlib.Path(path)
    text = json.dumps({"active": active, "keys": {str(v): keys[v].hex() for v in sorted(keys)}}) + "\n"
    write_atomic(target, text, mode=0o600)


def _same_keys(ring: KekRing, keys: dict[int, bytes]) -> list[int]:
    """Versions of ``ring`` that ``keys`` lacks or holds with other bytes."""
    aad = b"splitvault/rotation/key-check"
    wrong = []
    for version in ring.versions:
        key = keys.get(version)
        if key is None:
            wrong.append(version)
            continue
        probe = envelope.seal(KekRing({version: key}, version), aad, b"\x00")
        try:
            envelope.open(ring, aad, probe)
        except EnvelopeError:
            wrong.append(version)
    return wrong


# ---------------------------------------------------------------- the job


class Rotation:
    """One run of a session on this node: a thread doing the work, and the
    latest progress for whoever follows it (callers come and go)."""

    def __init__(self, service, session_id: str, actor: str, batch: int, pause_ms: int):
        self.service = service
        self.session_id = session_id
        self.actor = actor
        self.batch = batch
        self.pause_s = pause_ms / 1000
        self.node = service.name
        self._cond = threading.Condition()
        self._latest: shareholder_pb2.RotateKekResponse | None = None
        self._first: shareholder_pb2.RotateKekResponse | None = None  # PHASE_STARTED: every follower gets it first
        self._published = 0
        self.finished = False
        self.error: BaseException | None = None
        self.progress = shareholder_pb2.RotateKekResponse(session_id=session_id, node=self.node)
        self._thread = threading.Thread(target=self._run, name=f"kek-rotate-{self.node}", daemon=True)

    def start(self) -> "Rotation":
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # --- following ----------------------------------------------------------------

    def _publish(self, **fields) -> None:
        with self._cond:
            for name, value in fields.items():
                if isinstance(value, (list, tuple)):
                    getattr(self.progress, name)[:] = value
                else:
                    setattr(self.progress, name, value)
            latest = shareholder_pb2.RotateKekResponse()
            latest.CopyFrom(self.progress)
            self._latest = latest
            if self._first is None:
                self._first = latest
            self._published += 1
            self._cond.notify_all()

    def _finish(self, error: BaseException | None) -> None:
        with self._cond:
            self.error = error
            self.finished = True
            self._cond.notify_all()

    def follow(self, context) -> Iterator[shareholder_pb2.RotateKekResponse]:
        """Progress messages until the job ends: the job's first message (what it
        rotates), then the latest one at each wake-up; raises the job's error.
        Stops quietly when the caller goes away."""
        seen = 0
        first_sent = False
        while True:
            with self._cond:
                while self._published == seen and not self.finished:
                    self._cond.wait(0.5)
                    if context is not None and not context.is_active():
                        return
                latest = self._latest if self._published != seen else None
                first = self._first if not first_sent and self._first is not latest else None
                seen = self._published
                finished, error = self.finished, self.error
            if first is not None:
                yield first
            first_sent = first_sent or self._first is not None
            if latest is not None:
                yield latest
            if finished:
                if error is not None:
                    raise error
                return

    # --- the work -----------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._execute()
        except WriterClosed:
            error = status.Unavailable(
                f"Node {self.node} stopped during the key rotation; start it and rerun with session {self.session_id} to finish."
            )
        except status.RpcError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - reported to the caller as INTERNAL, detail to the log
            _log.error("key rotation failed", exc_info=(type(exc), exc, exc.__traceback__))
            error = status.Internal(
                f"The key rotation on node {self.node} failed unexpectedly (see its log); rerun with session "
                f"{self.session_id} to resume."
            )
        if error is not None:
            logs.event(_log, "key rotation stopped", logging.WARNING, node=self.node, session=self.session_id,
                       error=getattr(error, "message", str(error)))
        self._finish(error)

    def _execute(self) -> None:
        svc = self.service
        writer = svc.writer
        began = writer.run(self._begin_job)
        crash_point("begin:committed")
        if began["done"] is not None:
            self._publish(**began["done"])
            return
        target = began["target"]
        svc.keys.kek = began["ring"]
        self._publish(
            phase=Phase.PHASE_STARTED, to_version=target, from_versions=began["from_versions"],
            total=began["pending"], resumed=began["resumed"], audit_seq=began["seq"],
        )
        logs.event(_log, "key rotation started", node=self.node, session=self.session_id, to_version=target,
                   records=began["pending"], resumed=began["resumed"])
        db = storage.connect(svc.cfg.store)
        rewrapped = batches = 0
        stalled = 0
        try:
            while True:
                rows = db.wrapped_not_under(target, self.batch)
                if not rows:
                    done = writer.run(self._retire_job(target, rewrapped, batches))
                    if done is None:
                        continue  # a row under an old version appeared meanwhile
                    retired, kept, seq = done
                    crash_point("retire:committed")
                    svc.keys.kek = KekRing(kept, target)
                    self._publish(phase=Phase.PHASE_DONE, rewrapped=rewrapped, batches=batches,
                                  retired_versions=retired, audit_seq=seq)
                    logs.event(_log, "key rotation done", node=self.node, session=self.session_id,
                               to_version=target, rewrapped=rewrapped, retired=retired)
                    # The data keys wrapped under the retired KEK linger in the
                    # main file and the WAL until a checkpoint; flush them
                    # (tests/test_at_rest_scan.py).
                    try:
                        db.flush_erased()
                    except db.errors as exc:
                        logs.event(_log, "rotation checkpoint failed", logging.WARNING, error=str(exc))
                    return
                updates = self._rewrap(rows, svc.keys.kek, target)
                changed, seq = writer.run(self._batch_job(updates, target, batches + 1))
                crash_point("batch:committed")
                stalled = stalled + 1 if changed == 0 else 0
                if stalled > 3:
                    raise status.Aborted(
                        f"Node {self.node} could not re-wrap rows that keep changing; rerun with session {self.session_id}."
                    )
                rewrapped += changed
                batches += 1
                self._publish(phase=Phase.PHASE_REWRAPPING, rewrapped=rewrapped, batches=batches, audit_seq=seq)
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            db.close()

    def _rewrap(self, rows, ring: KekRing, target: int) -> list[tuple]:
        updates = []
        for tenant, subject, epoch, idx, version, wrapped in rows:
            try:
                sealed = envelope.rewrap(
                    ring, record.record_identity(tenant, subject, idx, epoch), SealedShare(version, wrapped, b"", b"")
                )
            except EnvelopeError:
                raise status.DataLoss(
                    f"On node {self.node} the data key of subject {subject!r} of tenant {tenant!r} (epoch {epoch}) "
                    f"does not open under KEK version {version}; no key was retired. Delete or re-enrol that subject, "
                    f"then rerun with session {self.session_id}."
                ) from None
            if sealed.kek_version != target:
                raise status.Internal("The node's ring is not on the rotation's version.")
            updates.append((sealed.kek_version, sealed.wrapped_dk, tenant, subject, epoch, version, wrapped))
        return updates

    # --- transactions (run by the audit writer, one at a time) ------------------------

    def _begin_job(self, tx: Tx) -> dict:
        svc = self.service
        db = tx.db
        now = now_ms()
        session = db.get_session(self.session_id)
        if session is not None and session.kind != KIND:
            raise status.FailedPrecondition(
                f"Session {self.session_id!r} on node {self.node} is a {session.kind} session, not a key rotation."
            )
        if session is not None and not session.open:
            plan = session.plan
            return {"done": dict(
                phase=Phase.PHASE_DONE, already_done=True, to_version=plan.get("to_version", 0),
                from_versions=plan.get("from_versions", []), total=plan.get("total", 0),
                rewrapped=plan.get("rewrapped", 0), batches=plan.get("batches", 0),
                retired_versions=plan.get("retired", []), audit_seq=plan.get("audit_seq", 0),
            )}
        if session is None:
            busy = db.open_session()
            if busy is not None:
                raise status.FailedPrecondition(f"Node {self.node}: {storage.SessionBusy(busy)}")
        try:
            keys, file_active = read_kek_file(svc.cfg.kek_file)
        except ConfigError as exc:
            raise status.FailedPrecondition(f"Node {self.node} cannot read its KEK file: {exc}") from None
        wrong = _same_keys(svc.keys.kek, keys)
        if wrong:
            raise status.FailedPrecondition(
                f"Node {self.node}'s KEK file no longer holds the key(s) of version(s) {wrong} that the node runs "
                "with; restore the file (or restart the node on it) before rotating."
            )
        new_key = False
        if session is None:
            leftovers = sorted(set(keys) - {file_active})
            if leftovers:
                target, resumed = file_active, True  # a rotation cut short before its session committed
            else:
                target, resumed = max(keys) + 1, False
                keys[target] = envelope.new_kek()
                new_key = True
        else:
            target, resumed = int(session.plan["to_version"]), True
            if target not in keys:  # crashed after the session was opened, before the file was written
                keys[target] = envelope.new_kek()
                new_key = True
        in_use = db.kek_versions_in_use()
        from_versions = sorted((set(keys) | set(in_use)) - {target})
        pending = db.count_not_under(target)
        plan = {"to_version": target, "from_versions": from_versions, "total": pending, "batch_size": self.batch}
        if session is None:
            epoch = db.node_state().current_epoch
            db.begin_session(self.session_id, KIND, self.actor, plan, STATE_OPEN, now, epoch=epoch)
        else:
            db.update_session(self.session_id, now, plan={**session.plan, "resumed_ms": now})
        entry = tx.append(
            "kek_rotate_start", actor=self.actor, request_id=self.session_id,
            details={"session": self.session_id, "to_version": target, "from_versions": from_versions,
                     "records": pending, "resumed": resumed, "new_key": new_key, "batch_size": self.batch},
        )
        if new_key or file_active != target:
            # Durable before this transaction commits: no row is ever wrapped
            # under a version the file does not hold.
            write_kek_file(svc.cfg.kek_file, keys, target)
            crash_point("begin:key_written")
        return {"done": None, "target": target, "ring": KekRing(keys, target), "from_versions": from_versions,
                "pending": pending, "resumed": resumed, "seq": entry.seq}

    def _batch_job(self, updates: list[tuple], target: int, number: int):
        def job(tx: Tx) -> tuple[int, int]:
            changed = tx.db.rewrap_shares(updates)
            entry = tx.append(
                "kek_rewrap", actor=self.actor, request_id=self.session_id,
                details={"session": self.session_id, "records": changed, "to_version": target, "batch": number},
            )
            return changed, entry.seq

        return job

    def _retire_job(self, target: int, rewrapped: int, batches: int):
        svc = self.service

        def job(tx: Tx):
            db = tx.db
            if db.count_not_under(target):
                return None
            # The node's MAC key shares (a handful of rows): re-wrapped here.
            ring = svc.keys.kek
            for row in db.mac_keys().values():
                if row.kek_version == target:
                    continue
                aad = record.key_identity(svc.cfg.cluster_id, svc.name, svc.index, row.epoch)
                try:
                    sealed = envelope.rewrap(ring, aad, row.sealed)
                except EnvelopeError:
                    continue  # a damaged key share keeps its version (and the key stays in the file)
                db.rewrap_mac_key(row.epoch, sealed.kek_version, sealed.wrapped_dk)
            keys, _active = read_kek_file(svc.cfg.kek_file)
            # Versions that still seal anything else on the node (the session
            # seed of a refresh or reshare) stay in the file. Prepared rows of
            # a new epoch are in ``shares`` and were counted above.
            still = db.kek_versions_of_keys_and_seeds()
            kept = {v: k for v, k in keys.items() if v == target or v in still}
            retired = sorted(set(keys) - set(kept))
            session = db.get_session(self.session_id)
            plan = dict(session.plan) if session else {}
            entry = tx.append(
                "kek_retire", actor=self.actor, request_id=self.session_id,
                details={"session": self.session_id, "active": target, "retired": retired,
                         "kept": sorted(set(kept) - {target}), "rewrapped": rewrapped, "batches": batches},
            )
            plan.update(rewrapped=plan.get("rewrapped", 0) + rewrapped, batches=plan.get("batches", 0) + batches,
                        retired=retired, audit_seq=entry.seq)
            db.update_session(self.session_id, now_ms(), state=STATE_DONE, plan=plan)
            if retired:
                write_kek_file(svc.cfg.kek_file, kept, target)
                crash_point("retire:key_written")
            return retired, kept, entry.seq

        return job


class Rotator:
    """Starts rotations on this node and lets callers follow them."""

    def __init__(self, service):
        self.service = service
        self._lock = threading.Lock()
        self._current: Rotation | None = None

    def stream(self, request, context, actor: str) -> Iterator[shareholder_pb2.RotateKekResponse]:
        svc = self.service
        session_id = status.checked(names.check_token, request.session_id, "session id")
        if svc.keys.kek_from_env or not svc.cfg.kek_file:
            raise status.FailedPrecondition(
                f"Node {svc.name} takes its KEK from the environment variable {KEK_ENV}, which it cannot rewrite; "
                "rotate that key where the variable is managed, or configure keys.kek_file."
            )
        batch = request.batch_size or DEFAULT_BATCH
        if batch > MAX_BATCH:
            raise status.InvalidArgument(f"The batch size must be at most {MAX_BATCH}.")
        if request.pause_ms > MAX_PAUSE_MS:
            raise status.InvalidArgument(f"The pause between batches must be at most {MAX_PAUSE_MS} ms.")
        with self._lock:
            job = self._current
            if job is not None and not job.finished:
                if job.session_id != session_id:
                    raise status.FailedPrecondition(
                        f"Node {svc.name} is running key rotation session {job.session_id!r} (started by "
                        f"{job.actor}); wait for it, or follow it with that session id."
                    )
            else:
                job = self._current = Rotation(svc, session_id, actor, batch, request.pause_ms).start()
        return job.follow(context)
