"""The ``splitvault.v1.Shareholder`` servicer: one institution's share store.

Who may call what is decided before any handler runs (``ROLES``, enforced by
``vaultrpc.server``); the handlers check everything else themselves:

- StoreShares / StoreShareStream: each record is validated
  (``vaultrpc.wire.share``), must carry this node's index, and is
  sealed (``vault.envelope``) before it reaches the writer thread.
  StoreShares is one transaction with one audit entry per record.
  StoreShareStream commits every ``stream_batch`` records as one transaction
  with ONE audit entry for the batch (counts, tenants and a SHA-256 over the
  batch's sorted (tenant, subject, epoch, request id) lines) so that bulk
  migrations keep their rate; a failing batch is rolled back whole and ends
  the stream, batches committed before it stay (retrying is safe: stores are
  idempotent per request id).
- ReleaseShare: the node verifies the provider's ticket itself (tenant from
  the ticket body, which must be registered here; Ed25519 signature with
  that tenant's keys; expiry), refuses a ticket it has seen before (replay
  set), and counts every attempt with a valid signature against the
  subject's limit (``attempts_per_subject`` per ``attempt_window_s``). The
  replay set and the attempt counters live in memory and are rebuilt from
  the audit log at start-up, so a restart reopens neither. Every release
  and every refusal is an audit entry, committed before the caller hears
  back. A sealed share that does not open is DATA_LOSS, never a wrong share.
- Writes (StoreShares, StoreShareStream, DeleteShares) need the provider's
  signed ticket too (docs/contracts.md "Provider-signed writes"): one per
  record for a store (operation ENROLL, or REPLACE when the call replaces),
  or a batch ticket whose signed items include the record (bulk), one for a
  delete (DELETE; or the ENROLL / REPLACE ticket of a failed
  enrolment, undoing only that enrolment). The node checks signature under
  the tenant's registered key, tenant, subject, request id, operation,
  audience (its cluster id), expiry and replay (a write ticket is honoured
  once per node and purpose) BEFORE it stores or erases anything; a refusal
  is PERMISSION_DENIED with a committed ``deny`` entry. Store and delete
  entries record the ticket that authorised them.
- Tenants are kept apart by scoping every query by tenant.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace as replace_row
from typing import NamedTuple

from prometheus_client import Counter, Gauge

from shareholders import rotation, storage, witness
from shareholders.identify import Confirmations
from shareholders.maintenance.peers import committee_pins, presented_spki
from shareholders.maintenance.sessions import guard_delete, guard_store
from shareholders.audit_log import AuditWriter, Tx, WriterClosed, now_ms
from shareholders.config import NodeConfig, NodeKeys
from splitvault.v1 import common_pb2, shareholder_pb2, shareholder_pb2_grpc
import numpy as np

from vault import envelope, epoch_mac, names, pki, record
from vault import ticket as tickets
from vault.errors import EnvelopeError, InvalidShares, InvalidTicket
from vaultrpc import logs, status, wire
from vaultrpc.server import caller

SERVICE = "splitvault.v1.Shareholder"
_M = f"/{SERVICE}/"
ROLES = {
    _M + "StoreShares": frozenset({pki.ROLE_MATCHER}),
    _M + "StoreShareStream": frozenset({pki.ROLE_MATCHER}),
    _M + "ReleaseShare": frozenset({pki.ROLE_MATCHER}),
    _M + "DeleteShares": frozenset({pki.ROLE_MATCHER}),
    _M + "GetMacKeyShare": frozenset({pki.ROLE_MATCHER}),
    _M + "DescribeRecords": frozenset({pki.ROLE_MATCHER, pki.ROLE_AUDITOR}),
    # Not the PSP: a provider has no business with node internals.
    _M + "GetNodeInfo": frozenset({pki.ROLE_MATCHER, pki.ROLE_AUDITOR, pki.ROLE_SHAREHOLDER}),
    _M + "ReadAuditLog": frozenset({pki.ROLE_AUDITOR}),
    _M + "RotateKek": frozenset({pki.ROLE_AUDITOR}),
    _M + "WitnessCheckpoint": frozenset({pki.ROLE_SHAREHOLDER}),
}

RELEASES = Counter("splitvault_node_releases_total", "Shares released for a verification.", ["node"])
DENIALS = Counter("splitvault_node_denials_total", "Requests refused with a deny entry in the audit log, by reason.",
                  ["node", "reason"])
STORED = Counter("splitvault_node_stored_records_total", "Share records written.", ["node"])
DELETED = Counter("splitvault_node_deleted_records_total", "Share records erased.", ["node"])
AUDIT_HEAD = Gauge("splitvault_node_audit_head_seq", "Sequence number of the last committed audit entry.", ["node"])

# Most stream batches sealed and queued ahead of the writer (bounds memory).
_STREAM_INFLIGHT = 2
# Batch tickets one StoreShareStream may carry (each checked once per flush).
_MAX_STREAM_BATCHES = 4096
# Claimed (unverified) names are logged, cut to this length.
_CLAIM_CHARS = 128


class WriteAuth(NamedTuple):
    """The checked provider ticket behind one write: a ticket of its own, or
    a batch ticket and the item (request id) of it that the write is."""

    ticket: common_pb2.VerificationTicket
    body: tickets.TicketBody
    item: str = ""
    group: str = ""  # the gallery group the provider signed for the record (ticket body or batch item)

    @property
    def key(self) -> str:
        """Names the authority in the replay set and in audit entries (a batch
        item by the hash of its request id that ``used_batch_items`` keeps)."""
        digest = tickets.ticket_digest(self.ticket)
        return f"{digest}/{item_hash(self.item).hex()}" if self.item else digest


def item_hash(item: str) -> bytes:
    """8 bytes naming one batch item (its request id) of a batch ticket."""
    return hashlib.sha256(b"splitvault/batch-item/v1\x00" + item.encode()).digest()[:8]


def _used_items(checked: list["WriteAuth"]) -> dict[str, tuple[int, bytes]]:
    """Per batch ticket of a store: (expiry, the packed hashes of the items it authorised)."""
    out: dict[str, tuple[int, list[bytes]]] = {}
    for a in checked:
        if a.item:
            digest = tickets.ticket_digest(a.ticket)
            out.setdefault(digest, (a.body.expires_at_ms, []))[1].append(item_hash(a.item))
    return {d: (e, b"".join(sorted(h))) for d, (e, h) in out.items()}


def _write_ticket_details(auth: WriteAuth) -> dict:
    """What a store or delete entry records of the ticket that authorised it
    (``vaultctl audit reconcile`` re-verifies the provider's signature)."""
    more = {"batch_item": auth.item} if auth.item else {}
    return {"operation": tickets.OPERATION_NAMES[auth.body.operation], "key_id": auth.ticket.key_id,
            "ticket_expires_ms": auth.body.expires_at_ms, "ticket_sha256": auth.key, **more,
            **tickets.audit_details(auth.ticket)}


def _tickets_sha256(checked: list[WriteAuth]) -> str:
    """SHA-256 over a batch's sorted write authorities."""
    return hashlib.sha256("\n".join(sorted(a.key for a in checked)).encode()).hexdigest()


# Batch tickets a bulk store's audit entry records in full (a matcher sends a
# handful per node batch; more are counted, not recorded).
_RECORDED_BATCH_TICKETS = 32


def _batch_tickets(checked: list[WriteAuth]) -> dict:
    """The distinct batch tickets of a bulk store: ``batch_tickets`` (how
    many) and ``batch_ticket_<i>`` = [key id, signature b64, body b64
    chunks...] for the first _RECORDED_BATCH_TICKETS."""
    seen: dict[bytes, common_pb2.VerificationTicket] = {}
    for a in checked:
        if a.item:
            seen.setdefault(a.ticket.signature, a.ticket)
    out: dict = {"batch_tickets": len(seen)}
    for i, t in enumerate(list(seen.values())[:_RECORDED_BATCH_TICKETS]):
        d = tickets.audit_details(t)
        out[f"batch_ticket_{i}"] = [t.key_id, d["ticket_sig"], *d["ticket"]]
    return out


@dataclass
class _Covered:
    """Batch tickets checked so far in one call, and the items they cover."""

    items: dict = field(default_factory=dict)  # (tenant, subject, request id) -> WriteAuth
    checked: set = field(default_factory=set)  # signatures of the batch tickets checked



@dataclass(frozen=True)
class Refused:
    """A job's outcome that is an error for the caller yet committed: the
    refusal's audit entry stays in the log (a raised exception would roll
    the job back, entry and all)."""

    error: status.RpcError
    reason: str
    seq: int


class ReleaseGuard:
    """Replay set and per-subject attempt counters (in memory, rebuilt from the log)."""

    def __init__(self, limit: int, window_ms: int):
        self.limit = limit
        self.window_ms = window_ms
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}  # ticket id -> expiry (ms)
        self._attempts: dict[tuple[str, str], deque] = {}
        self._next_prune = 0

    def record(self, tenant: str, subject: str, ticket_id: str | None, expires_ms: int, at_ms: int) -> None:
        """Replay a past attempt from the audit log (start-up); expired
        tickets and attempts outside the window are pruned on first use."""
        if ticket_id is not None:
            self._used[ticket_id] = max(expires_ms, self._used.get(ticket_id, 0))
        self._attempts.setdefault((tenant, subject), deque()).append(at_ms)

    def admit(self, tenant: str, subject: str, ticket_id: str, expires_ms: int, now: int) -> str | None:
        """Count one attempt; the reason to refuse it, or None to go ahead."""
        with self._lock:
            if now >= self._next_prune:
                self._prune(now)
            verdict = None
            if ticket_id in self._used:
                verdict = "replayed"
            else:
                self._used[ticket_id] = expires_ms
            times = self._attempts.get((tenant, subject))
            if times is None:
                times = self._attempts[(tenant, subject)] = deque()
            cutoff = now - self.window_ms
            while times and times[0] <= cutoff:
                times.popleft()
            if verdict is None and len(times) >= self.limit:
                verdict = "rate_limited"
            times.append(now)
            return verdict

    def _prune(self, now: int) -> None:
        # Expired tickets can no longer verify, so forgetting them reopens nothing.
        self._used = {t: e for t, e in self._used.items() if e > now}
        cutoff = now - self.window_ms
        self._attempts = {k: v for k, v in self._attempts.items() if v and v[-1] > cutoff}
        self._next_prune = now + 10_000


class WriteGuard:
    """Write tickets honoured at this node (in memory, rebuilt from the log):
    each is good once per purpose ("store", "erase") until it expires, so a
    captured DELETE cannot erase a re-enrolment and a used ENROLL cannot
    plant again; and an enrolment's ticket that undid it ("erase") can no
    longer store, so a write that arrives after the matcher gave up on it
    (and told the provider nothing was kept) is refused, not left behind."""

    def __init__(self):
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}  # "<ticket sha256>:<purpose>" -> expiry (ms)
        self._next_prune = 0

    def reserve(self, keys: dict[str, int], now: int, blocked_by: dict[str, str] | None = None) -> str | None:
        """Take every key or none; the first key refused (taken, or its
        ``blocked_by`` key taken), else None."""
        with self._lock:
            if now >= self._next_prune:
                self._used = {k: e for k, e in self._used.items() if e > now}
                self._next_prune = now + 10_000
            for key in keys:
                if key in self._used or (blocked_by and blocked_by.get(key) in self._used):
                    return key
            self._used.update(keys)
            return None

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._used

    def release(self, keys) -> None:
        """Give back keys whose write did not commit."""
        with self._lock:
            for key in keys:
                self._used.pop(key, None)

    def record(self, key: str, expires_ms: int) -> None:
        self._used[key] = max(expires_ms, self._used.get(key, 0))


class ShareholderService(shareholder_pb2_grpc.ShareholderServicer):
    def __init__(self, cfg: NodeConfig, keys: NodeKeys, writer: AuditWriter, state: storage.NodeState):
        self.cfg = cfg
        self.keys = keys
        self.writer = writer
        self.state = state
        # The newest epoch this node serves. Rows of a later epoch are being
        # prepared by a refresh or reshare (shareholders.maintenance) and are not
        # released until that session commits, which moves this on.
        self.serving_epoch = state.current_epoch
        self.name = cfg.name
        self.index = cfg.index
        self._log = logging.getLogger("shareholders")
        self._audit_public = pki.public_key_raw(keys.audit_key)
        self._local = threading.local()
        self._readers: list = []
        self._readers_lock = threading.Lock()
        self.guard = ReleaseGuard(cfg.attempts_per_subject, int(cfg.attempt_window_s * 1000))
        # Candidates of identify queries the matcher confirms (shareholders.identify).
        self.confirmations = Confirmations()
        self.write_guard = WriteGuard()
        self._releases = RELEASES.labels(cfg.name)
        self._stored = STORED.labels(cfg.name)
        self._deleted = DELETED.labels(cfg.name)
        self.witness = witness.CheckpointWitness(cfg.name, cfg.witness_peers, self.commit, self._deny_now,
                                                 pins=lambda: committee_pins(self.reader(), cfg))
        # The node's one KEK rotation job at a time (shareholders.rotation).
        self.rotator = rotation.Rotator(self)

    # --- plumbing ---------------------------------------------------------------

    def admit_verification(self, actor: str, tenant: str, subject: str, request_id: str, replay_key: str,
                           expires_at_ms: int, now: int, details: dict) -> None:
        """A verification's ticket against the replay set and the subject's
        attempt limit (a release, a verification on shares): a deny entry and
        PERMISSION_DENIED / RESOURCE_EXHAUSTED when refused."""
        verdict = self.guard.admit(tenant, subject, replay_key, expires_at_ms, now)
        if verdict == "replayed":
            self._deny_now(actor, verdict, status.PermissionDenied("The verification ticket was already used at this node."),
                           tenant=tenant, subject=subject, request_id=request_id, details=details)
        if verdict == "rate_limited":
            self._deny_now(actor, verdict, status.ResourceExhausted(
                "Too many verification attempts for this subject; try again later."),
                tenant=tenant, subject=subject, request_id=request_id, details=details)

    def rebuild_guard(self, now: int | None = None) -> int:
        """Reload replay and attempt state from recent audit entries; returns how many."""
        now = now_ms() if now is None else now
        horizon = max(self.guard.window_ms, tickets.MAX_TTL_MS + tickets.CLOCK_SKEW_MS)
        rows = self.reader().entries_since(now - horizon, ("release", "deny", "verify_on_shares"))
        n = 0
        for time_ms, _event, request_id, tenant, subject, details_json in rows:
            details = json.loads(details_json)
            if not details.get("counted"):
                continue
            n += 1
            tid = tickets.ticket_id(tickets.TicketBody(tenant=tenant, request_id=request_id))
            self.guard.record(tenant, subject, tid, int(details.get("ticket_expires_ms") or 0), time_ms)
        # Batch items honoured by bulk stores (their entry names the tickets,
        # not each item): kept in the store until their tickets expire.
        for digest, expires, hashes in self.reader().used_batch_items(now):
            for j in range(0, len(hashes), 8):
                self.write_guard.record(f"{digest}/{hashes[j:j + 8].hex()}:store", expires)
                n += 1
        # Write tickets used recently by single writes and deletes.
        for _time_ms, event, _rid, _tenant, _subject, details_json in self.reader().entries_since(
            now - horizon, ("store", "delete")
        ):
            details = json.loads(details_json)
            digest = details.get("ticket_sha256")
            if isinstance(digest, str):
                purpose = "store" if event == "store" else "erase"
                self.write_guard.record(f"{digest}:{purpose}", int(details.get("ticket_expires_ms") or 0))
                n += 1
        return n

    def reader(self) -> storage.Database:
        """This thread's reading connection to the store (made on first use)."""
        db = getattr(self._local, "db", None)
        try:
            if db is not None:
                db.reopen_if_lost()
            else:
                db = storage.connect(self.cfg.store)
        except storage.errors(self.cfg.store):
            raise status.Unavailable("The node cannot reach its database; retry later.") from None
        if getattr(self._local, "db", None) is None:
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    def serve_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` too, once a session committed it here (never moves back)."""
        self.serving_epoch = max(self.serving_epoch, epoch)

    def close_readers(self) -> None:
        with self._readers_lock:
            for db in self._readers:
                try:
                    db.close()
                except Exception:  # noqa: BLE001 - closing at shutdown
                    pass
            self._readers.clear()

    def commit(self, job, **who) -> object:
        """Run a job in the next group commit; its result once durable. A
        committed refusal is counted by reason and raised; a share that did
        not open is also logged, with ``who`` (tenant, subject, request id)."""
        try:
            result = self.writer.run(job)
        except WriterClosed as exc:
            raise status.Unavailable(str(exc)) from None
        if isinstance(result, Refused):
            DENIALS.labels(self.name, result.reason).inc()
            if result.reason == "data_loss":
                logs.event(self._log, "stored share failed to open", logging.ERROR, **who, audit_seq=result.seq)
            raise result.error
        return result

    # --- store ------------------------------------------------------------------

    # --- write tickets --------------------------------------------------------------

    def _check_write(self, actor: str, ticket, *, tenant: str, subject: str, request_id: str,
                     operations: tuple[int, ...], call: str) -> tickets.TicketBody:
        """The provider's write ticket, checked (PERMISSION_DENIED with a committed deny entry otherwise)."""
        keys = self.cfg.tenants.get(tenant)
        why = None
        if keys is None:
            why = ("unknown_tenant", "The ticket names a tenant not registered at this node.")
        else:
            try:
                body = wire.verify_ticket(ticket, keys, tenant=tenant, audience=self.cfg.cluster_id, operations=operations)
            except InvalidTicket as exc:
                why = ("invalid_ticket", str(exc))
            else:
                if body.subject != subject or body.request_id != request_id:
                    why = ("ticket_mismatch", "The ticket was issued for another subject or request id.")
        if why is not None:
            self._deny_now(actor, why[0], status.PermissionDenied(why[1]), details={
                "call": call, "why": why[1], "counted": False, "claimed_tenant": tenant[:_CLAIM_CHARS],
                "claimed_subject": subject[:_CLAIM_CHARS], "claimed_request_id": request_id[:_CLAIM_CHARS],
                "key_id": ticket.key_id[:_CLAIM_CHARS],
            })
        return body

    def _check_batch(self, actor: str, batch: common_pb2.WriteBatch, operations: tuple[int, ...],
                     call: str) -> tuple[tickets.TicketBody, dict[tuple[str, str], str]]:
        """A batch ticket and its items, checked once: (body, {(subject, request id): request id})."""
        ticket = batch.ticket
        claimed = wire.ticket_body(ticket.body) or tickets.TicketBody()
        keys = self.cfg.tenants.get(claimed.tenant)
        why = None
        if keys is None:
            why = ("unknown_tenant", "The batch ticket names a tenant not registered at this node.")
        else:
            try:
                body = wire.verify_ticket(ticket, keys, tenant=claimed.tenant, audience=self.cfg.cluster_id,
                                          operations=operations, batch=True)
            except InvalidTicket as exc:
                why = ("invalid_ticket", str(exc))
            else:
                if not tickets.batch_matches(body, batch.items):
                    why = ("ticket_mismatch", "The batch's items are not the ones its ticket signs.")
        if why is not None:
            self._deny_now(actor, why[0], status.PermissionDenied(why[1]), details={
                "call": call, "why": why[1], "counted": False, "claimed_tenant": claimed.tenant[:_CLAIM_CHARS],
                "claimed_request_id": claimed.request_id[:_CLAIM_CHARS], "key_id": ticket.key_id[:_CLAIM_CHARS],
                "batch_items": len(batch.items),
            })
        return body, {(i.subject, i.request_id): i.group for i in batch.items}

    def _store_tickets(self, actor: str, records, ticket_list, batches, replace: bool,
                       covered: "_Covered | None" = None) -> list[WriteAuth]:
        """Check the write ticket of every record before anything is stored: its own ticket, or
        (empty ticket) an item of one of ``batches``, each batch ticket checked once (``covered``
        keeps the items of batches already checked, across a stream's flushes)."""
        operation = tickets.write_operation(replace)
        if ticket_list and len(ticket_list) != len(records):
            self._deny_now(actor, "missing_ticket", status.PermissionDenied(
                "Every share record needs the provider's write ticket."), details={"call": "store", "counted": False})
        covered = _Covered() if covered is None else covered
        for batch in batches:
            if batch.ticket.signature in covered.checked:
                continue
            body, items = self._check_batch(actor, batch, (operation,), "store")
            covered.checked.add(batch.ticket.signature)
            for (subject, request_id), group in items.items():
                covered.items.setdefault((body.tenant, subject, request_id),
                                         WriteAuth(batch.ticket, body, request_id, group))
        out = []
        for i, rec in enumerate(records):
            ticket = ticket_list[i] if ticket_list else None
            if ticket is not None and ticket.body:
                body = self._check_write(actor, ticket, tenant=rec.tenant, subject=rec.subject,
                                         request_id=rec.request_id, operations=(operation,), call="store")
                out.append(WriteAuth(ticket, body, group=body.group))
                continue
            auth = covered.items.get((rec.tenant, rec.subject, rec.request_id))
            if auth is None:
                self._deny_now(actor, "missing_ticket", status.PermissionDenied(
                    "A share record has no provider ticket of its own or in the batch."), details={
                    "call": "store", "counted": False, "claimed_tenant": rec.tenant[:_CLAIM_CHARS],
                    "claimed_subject": rec.subject[:_CLAIM_CHARS], "claimed_request_id": rec.request_id[:_CLAIM_CHARS],
                })
            out.append(auth)
        return out

    def _reserve(self, actor: str, checked: list[WriteAuth], purpose: str) -> dict[str, int]:
        """Mark write tickets used (refusing a replay) before the write; give them back if it fails."""
        by_key = {f"{a.key}:{purpose}": a for a in checked}
        keys = {key: a.body.expires_at_ms for key, a in by_key.items()}
        # A store is also refused once its ticket has undone the enrolment.
        blocked_by = {key: f"{a.key}:erase" for key, a in by_key.items()} if purpose == "store" else None
        refused = self.write_guard.reserve(keys, now_ms(), blocked_by)
        if refused is not None:
            a = by_key[refused]
            undone = blocked_by is not None and not self.write_guard.holds(refused)
            message = ("The enrolment this ticket authorised was already undone at this node." if undone
                       else "The write ticket was already used at this node.")
            self._deny_now(actor, "undone" if undone else "replayed", status.PermissionDenied(message),
                           tenant=a.body.tenant, subject=a.body.subject, request_id=a.item or a.body.request_id,
                           details={"call": purpose, "counted": False, "ticket_sha256": a.key})
        return keys

    def _seal(self, records, seen: set) -> list[storage.ShareRow]:
        ring = self.keys.kek
        out = []
        stored_ms = now_ms()
        for rec in records:
            rec = wire.share(rec)  # InvalidShares -> INVALID_ARGUMENT
            if rec.index != self.index:
                raise status.InvalidArgument(
                    f"A record for shareholder index {rec.index} was sent to node {self.name!r}, which holds index {self.index}."
                )
            status.checked(names.check_token, rec.request_id, "request id")
            if rec.epoch >= 2**63:
                raise status.InvalidArgument("The record's epoch is out of range.")
            key = (rec.tenant, rec.subject)
            if key in seen:
                raise status.InvalidArgument("The batch holds two records for the same subject.")
            seen.add(key)
            aad = record.record_identity(rec.tenant, rec.subject, rec.index, rec.epoch)
            sealed = envelope.seal(ring, aad, rec.values)
            out.append(
                storage.ShareRow(
                    rec.tenant, rec.subject, rec.epoch, rec.index, rec.threshold, rec.shareholders, rec.dimension,
                    rec.codec_version, rec.mac_count, rec.request_id, sealed.kek_version, sealed.wrapped_dk,
                    sealed.nonce, sealed.ciphertext, stored_ms,
                )
            )
        return out

    def _store_job(self, items: list[storage.ShareRow], replace: bool, actor: str, per_record: bool, checked):
        kek_version = self.keys.kek.active

        # Each record under the group its provider-signed authority names.
        items = [replace_row(i, group=a.group) if a.group else i for i, a in zip(items, checked, strict=True)]

        def job(tx: Tx) -> tuple[int, int]:
            db = tx.db
            guard_store(db)  # no enrolment while a refresh or reshare is open
            retries = replaced = 0
            flags = []
            stored = db.request_ids_of([(i.tenant, i.subject) for i in items])
            for item in items:
                existing = stored.get((item.tenant, item.subject))
                retry = bool(existing) and existing == {item.request_id}
                if existing and not retry and not replace:
                    # Raised: the whole job (every record of the request) rolls back.
                    raise status.AlreadyExists(
                        f"Subject {item.subject!r} of tenant {item.tenant!r} is already enrolled under another "
                        "request id; store with replace to overwrite it."
                    )
                if existing:
                    db.delete_subject(item.tenant, item.subject)
                retries += retry
                replaced += bool(existing) and not retry
                flags.append((retry, bool(existing) and not retry))
            # Under the KEK as it is now: a rotation may have begun since sealing.
            ring = self.keys.kek
            db.insert_shares(rotation.current_wrap(ring, i) for i in items)
            # The batch items honoured, kept until their tickets expire (rebuild_guard).
            stored_at = now_ms()
            for digest, (expires, hashes) in _used_items(checked).items():
                db.add_used_batch_items(digest, expires, hashes, stored_at)
            if per_record:
                for item, (retry, repl), auth in zip(items, flags, checked):
                    tx.append(
                        "store", actor=actor, request_id=item.request_id, tenant=item.tenant, subject=item.subject,
                        details={"epoch": item.epoch, "kek_version": kek_version, "retry": retry, "replaced": repl,
                                 **_write_ticket_details(auth)},
                    )
            else:
                lines = sorted(f"{i.tenant}\x00{i.subject}\x00{i.epoch}\x00{i.request_id}" for i in items)
                digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
                tenants = sorted({i.tenant for i in items})
                tx.append(
                    "store_batch", actor=actor, tenant=tenants[0] if len(tenants) == 1 else "",
                    details={
                        "records": len(items), "request_ids": len({i.request_id for i in items}),
                        "tenants": tenants[:64], "records_sha256": digest, "kek_version": kek_version,
                        "retries": retries, "replaced": replaced,
                        # Every record's authority by digest, and the batch tickets themselves (audit reconcile).
                        "tickets": len(checked), "tickets_sha256": _tickets_sha256(checked),
                        **_batch_tickets(checked),
                    },
                )
            return len(items), retries

        return job

    def _check_epochs(self, actor: str, records) -> None:
        """New records go to this node's current epoch only. The matcher takes
        the epoch from the nodes (the newest any reports), so one node
        reporting a later epoch would otherwise have every honest node store
        rows it never serves: a silent loss of every new enrolment, and of
        every replaced template. Refused (FAILED_PRECONDITION) with a deny entry."""
        current = self.serving_epoch
        wrong = [rec for rec in records if rec.epoch != current]
        if wrong:
            self._deny_now(actor, "wrong_epoch", status.FailedPrecondition(
                f"The records are for epoch {wrong[0].epoch}; this node stores new records at its current epoch "
                f"{current} only."), details={"call": "store", "counted": False, "epoch": int(wrong[0].epoch),
                                              "current_epoch": current, "records": len(wrong)})

    def StoreShares(self, request, context):
        actor = str(caller(context))
        if not request.records:
            raise status.InvalidArgument("The request holds no share records.")
        items = self._seal(request.records, set())  # well-formed records first (INVALID_ARGUMENT)
        self._check_epochs(actor, request.records)
        checked = self._store_tickets(actor, request.records, request.tickets, request.batches, request.replace)
        reserved = self._reserve(actor, checked, "store")
        try:
            stored, retries = self.commit(self._store_job(items, request.replace, actor, per_record=True,
                                                           checked=checked))
        except BaseException:
            self.write_guard.release(reserved)
            raise
        self._stored.inc(stored)
        if request.replace or retries:
            # Rows may have been overwritten: their old sealed bytes must leave the files too.
            self._flush_erased("replacement")
        return shareholder_pb2.StoreSharesResponse(stored=stored, already_stored=retries)

    def StoreShareStream(self, request_iterator, context):
        actor = str(caller(context))
        batch_size = self.cfg.stream_batch
        pending: list = []
        inflight: deque[Future] = deque()
        totals = [0, 0]
        replace = None
        seen: set = set()
        batches: list = []  # the stream's batch tickets: a record may be an item of any of them
        covered = _Covered()  # items of the batch tickets checked so far

        def settle(fut: Future) -> None:
            try:
                stored, retries = fut.result()
            except WriterClosed as exc:
                raise status.Unavailable(str(exc)) from None
            except status.RpcError as exc:
                raise type(exc)(f"{exc.message} ({totals[0]} records were stored before this batch.)") from None
            totals[0] += stored
            totals[1] += retries
            self._stored.inc(stored)

        def flush() -> None:
            nonlocal pending
            if not pending:
                return
            try:
                items = self._seal([rec for rec, _ in pending], seen)
            except (status.RpcError, InvalidShares) as exc:
                error = status.of(exc)
                # Let the batches already queued land first, then report.
                while inflight:
                    settle(inflight.popleft())
                raise type(error)(f"{error.message} ({totals[0]} records were stored before this batch.)") from None
            try:
                self._check_epochs(actor, [rec for rec, _ in pending])
                checked = self._store_tickets(actor, [rec for rec, _ in pending], [t for _, t in pending],
                                              batches, bool(replace), covered)
            except status.RpcError:
                while inflight:
                    settle(inflight.popleft())
                raise
            pending = []
            reserved = self._reserve(actor, checked, "store")
            future = self.writer.submit(self._store_job(items, bool(replace), actor, per_record=False, checked=checked))
            future.add_done_callback(lambda f: self.write_guard.release(reserved) if f.exception() else None)
            inflight.append(future)
            while len(inflight) > _STREAM_INFLIGHT:
                settle(inflight.popleft())

        try:
            for message in request_iterator:
                if replace is None:
                    replace = message.replace
                elif message.replace != replace:
                    raise status.InvalidArgument("Every message of one stream must use the same replace flag.")
                if message.tickets and len(message.tickets) != len(message.records):
                    self._deny_now(actor, "missing_ticket", status.PermissionDenied(
                        "Every share record needs the provider's write ticket."),
                        details={"call": "store", "counted": False})
                if len(batches) + len(message.batches) > _MAX_STREAM_BATCHES:
                    raise status.InvalidArgument(f"A stream may carry at most {_MAX_STREAM_BATCHES} batch tickets.")
                batches.extend(message.batches)
                blank = common_pb2.VerificationTicket()
                pending.extend(zip(message.records, message.tickets or [blank] * len(message.records)))
                if len(pending) >= batch_size:
                    flush()
            flush()
        finally:
            # Never leave a queued batch unsettled, even when the stream failed.
            errors = []
            while inflight:
                try:
                    settle(inflight.popleft())
                except status.RpcError as exc:
                    errors.append(exc)
            if replace or totals[1]:
                # As StoreShares: overwritten rows' old sealed bytes leave the
                # files too, also when a later batch failed.
                self._flush_erased("replacement")
            if errors:
                raise errors[0]
        return shareholder_pb2.StoreShareStreamResponse(stored=totals[0], already_stored=totals[1])

    # --- release ----------------------------------------------------------------

    def _deny_now(self, actor: str, reason: str, error: status.RpcError, *, tenant="", subject="", request_id="",
                  details: dict | None = None):
        DENIALS.labels(self.name, reason).inc()

        def job(tx: Tx):
            tx.append("deny", actor=actor, request_id=request_id, tenant=tenant, subject=subject,
                      details={"reason": reason, **(details or {})})

        self.commit(job)
        raise error

    def ReleaseShare(self, request, context):
        actor = str(caller(context))
        ticket = request.ticket
        body = wire.ticket_body(ticket.body)
        if body is None or not body.tenant:
            self._deny_now(actor, "malformed_ticket",
                           status.PermissionDenied("The verification ticket is missing or cannot be parsed."),
                           details={"counted": False})
        keys = self.cfg.tenants.get(body.tenant)

        def claimed(**more) -> dict:
            # What an unverified ticket claims: in the details, never in the entry's own fields.
            return {
                "claimed_tenant": body.tenant[:_CLAIM_CHARS],
                "claimed_subject": body.subject[:_CLAIM_CHARS],
                "claimed_request_id": body.request_id[:_CLAIM_CHARS],
                "key_id": ticket.key_id[:_CLAIM_CHARS],
                "counted": False,
                **more,
            }

        if keys is None:
            self._deny_now(actor, "unknown_tenant",
                           status.PermissionDenied("The verification ticket names a tenant not registered at this node."),
                           details=claimed())
        query_id = request.identify_query_id
        try:
            body = wire.verify_ticket(ticket, keys, tenant=body.tenant, audience=self.cfg.cluster_id,
                                      operations=(tickets.IDENTIFY,) if query_id else (tickets.VERIFY,))
        except InvalidTicket as exc:
            self._deny_now(actor, "invalid_ticket", status.PermissionDenied(str(exc)), details=claimed(why=str(exc)))
        tenant, subject, request_id = body.tenant, body.subject, body.request_id
        now = now_ms()
        replay_key = tickets.ticket_id(body)
        base = {"counted": True, "ticket_expires_ms": body.expires_at_ms, "key_id": ticket.key_id}
        if query_id:
            # Confirmation of an identify query: only a subject that query named, once.
            subject = request.subject
            if not self.confirmations.take(query_id, tenant, replay_key, subject, now):
                self._deny_now(actor, "not_a_candidate", status.PermissionDenied(
                    "The identify ticket does not authorise a release of this subject."),
                    tenant=tenant, request_id=request_id, details=claimed(identify_query=query_id[:_CLAIM_CHARS]))
            replay_key = f"{replay_key}\x00confirm\x00{subject}"
            base["identify_query"] = query_id
        self.admit_verification(actor, tenant, subject, request_id, replay_key, body.expires_at_ms, now, base)
        who = dict(actor=actor, tenant=tenant, subject=subject, request_id=request_id)

        index = self.index

        def job(tx: Tx):
            ring = self.keys.kek  # as it is now: a KEK rotation re-wraps rows as it goes
            rows = [r for r in tx.db.subject_rows(tenant, subject) if r.epoch <= self.serving_epoch]
            if not rows:
                entry = tx.append("deny", **who, details={**base, "reason": "not_found"})
                return Refused(status.NotFound("No share is stored for this subject."), "not_found", entry.seq)
            shares, keys = [], []
            mac_keys = tx.db.mac_keys()
            for row in rows:
                try:
                    if row.index != index:
                        raise EnvelopeError("index")
                    values = envelope.open(ring, record.record_identity(tenant, subject, row.index, row.epoch), row.sealed)
                    if len(values) != 4 * (row.dimension + row.mac_count):
                        raise EnvelopeError("length")
                    # Without a key share for the epoch (none dealt, or narrower than the
                    # record) the share goes alone and the matcher cannot use it (fail closed).
                    key_row = mac_keys.get(row.epoch)
                    if key_row is not None and row.dimension <= key_row.width:
                        keys.append(self.key_share(key_row, row.dimension, ring))
                except EnvelopeError:
                    entry = tx.append("deny", **who, details={**base, "reason": "data_loss", "epoch": row.epoch})
                    return Refused(status.DataLoss("This node's stored share for the subject is damaged."),
                                   "data_loss", entry.seq)
                shares.append(row.record(values))
            # The ticket itself, so that `vaultctl audit reconcile` can re-verify the provider's signature.
            entry = tx.append("release", **who, details={**base, "epochs": [r.epoch for r in rows],
                                                         **tickets.audit_details(ticket)})
            return entry.seq, shares, keys

        seq, shares, keys = self.commit(job, tenant=tenant, subject=subject, request_id=request_id)
        self._releases.inc()
        return shareholder_pb2.ReleaseShareResponse(shares=shares, audit_seq=seq, mac_keys=keys)

    # --- MAC key shares -----------------------------------------------------------

    def open_mac_key(self, row: storage.MacKeyRow, ring=None) -> np.ndarray:
        """This node's share of an epoch's MAC key, opened: (L, width) field elements (EnvelopeError if damaged)."""
        aad = record.key_identity(self.cfg.cluster_id, self.name, self.index, row.epoch)
        raw = envelope.open(ring or self.keys.kek, aad, row.sealed)
        if len(raw) != 4 * epoch_mac.TAG_COUNT * row.width:
            raise EnvelopeError("length")
        try:
            return record.unpack_values(raw, epoch_mac.TAG_COUNT * row.width).reshape(epoch_mac.TAG_COUNT, row.width)
        except InvalidShares:
            raise EnvelopeError("range") from None

    def seal_mac_key(self, epoch: int, threshold: int, key: np.ndarray, session_id: str) -> storage.MacKeyRow:
        """A key share (L, width) sealed under the active KEK, bound to cluster, node and epoch."""
        aad = record.key_identity(self.cfg.cluster_id, self.name, self.index, epoch)
        sealed = envelope.seal(self.keys.kek, aad, np.ascontiguousarray(key, dtype="<u4").tobytes())
        return storage.MacKeyRow(epoch, threshold, int(key.shape[1]), session_id, sealed.kek_version,
                               sealed.wrapped_dk, sealed.nonce, sealed.ciphertext)

    def key_share(self, row: storage.MacKeyRow | None, dimension: int, ring=None) -> common_pb2.MacKeyShare:
        """The key share message of one epoch cut to ``dimension`` (its first d columns: a prefix of
        a uniform key is uniform); EnvelopeError when the node holds no usable key for it."""
        if row is None or dimension > row.width:
            raise EnvelopeError("no key")
        key = self.open_mac_key(row, ring)
        try:
            cut = np.ascontiguousarray(key[:, :dimension], dtype="<u4")
            return common_pb2.MacKeyShare(epoch=row.epoch, index=self.index, dimension=dimension,
                                          values=cut.tobytes())
        finally:
            record.wipe(key)

    def GetMacKeyShare(self, request, context):
        actor = str(caller(context))
        dimension = int(request.dimension)
        if not 1 <= dimension <= 70_000:
            raise status.InvalidArgument("The dimension must be from 1 to 70000.")
        if request.HasField("batch") and request.batch.ticket.body:
            body, _items = self._check_batch(actor, request.batch, tickets.WRITES, "mac_key")
            auth = WriteAuth(request.batch.ticket, body, body.request_id)
        else:
            claimed = wire.ticket_body(request.ticket.body) or tickets.TicketBody()
            if not claimed.tenant:
                self._deny_now(actor, "malformed_ticket", status.PermissionDenied(
                    "A MAC key share needs the enrolment's write ticket."), details={"call": "mac_key", "counted": False})
            body = self._check_write(actor, request.ticket, tenant=claimed.tenant, subject=claimed.subject,
                                     request_id=claimed.request_id, operations=tickets.WRITES, call="mac_key")
            auth = WriteAuth(request.ticket, body)

        def job(tx: Tx):
            guard_store(tx.db)  # no enrolment while a refresh or reshare is open
            epoch = tx.db.node_state().current_epoch
            row = tx.db.mac_keys().get(epoch)
            try:
                key = self.key_share(row, dimension)
            except EnvelopeError:
                entry = tx.append("deny", actor=actor, tenant=body.tenant, subject=body.subject,
                                  request_id=auth.item or body.request_id,
                                  details={"reason": "no_mac_key", "epoch": epoch, "dimension": dimension,
                                           "counted": False})
                why = ("This node holds no MAC key share for its current epoch and this dimension; "
                       "run `vaultctl refresh` to deal one." if row is None or dimension > row.width
                       else "This node's stored MAC key share is damaged.")
                return Refused((status.FailedPrecondition if row is None or dimension > row.width
                                else status.DataLoss)(why), "no_mac_key", entry.seq)
            entry = tx.append("mac_key_release", actor=actor, tenant=body.tenant, subject=body.subject,
                              request_id=auth.item or body.request_id,
                              details={"epoch": epoch, "dimension": dimension, **_write_ticket_details(auth)})
            return shareholder_pb2.GetMacKeyShareResponse(key=key, audit_seq=entry.seq)

        return self.commit(job)

    # --- delete and describe ----------------------------------------------------

    def DeleteShares(self, request, context):
        actor = str(caller(context))
        tenant = status.checked(names.check_id, request.tenant, "tenant")
        subject = status.checked(names.check_id, request.subject, "subject")
        request_id = status.checked(names.check_token, request.request_id, "request id")
        if request.HasField("batch") and request.batch.ticket.body:
            # The batch ticket of a failed bulk enrolment: undoes that one item.
            body, items = self._check_batch(actor, request.batch, tickets.WRITES, "delete")
            if body.tenant != tenant or (subject, request_id) not in items:
                self._deny_now(actor, "ticket_mismatch", status.PermissionDenied(
                    "The batch ticket does not cover this subject and request id."), details={
                    "call": "delete", "counted": False, "claimed_subject": subject[:_CLAIM_CHARS],
                    "claimed_request_id": request_id[:_CLAIM_CHARS]})
            auth = WriteAuth(request.batch.ticket, body, request_id)
        else:
            body = self._check_write(actor, request.ticket, tenant=tenant, subject=subject, request_id=request_id,
                                     operations=(tickets.DELETE, *tickets.WRITES), call="delete")
            auth = WriteAuth(request.ticket, body)
        # An ENROLL ticket undoes only its own enrolment (records of its request id).
        own_only = body.operation == tickets.ENROLL
        reserved = self._reserve(actor, [auth], "erase")

        def job(tx: Tx) -> int:
            guard_delete(tx.db, tenant, subject)  # prepared rows go too; refused during a reshare
            rows = tx.db.subject_rows(tenant, subject)
            kept = own_only and any(r.request_id != request_id for r in rows)
            deleted = 0 if kept else tx.db.delete_subject(tenant, subject)
            tx.append("delete", actor=actor, request_id=request_id, tenant=tenant, subject=subject,
                      details={"deleted": deleted, "epochs": [r.epoch for r in rows][:64],
                               "kept_other_request": kept, **_write_ticket_details(auth)})
            return deleted

        try:
            deleted = self.commit(job)
        except BaseException:
            self.write_guard.release(reserved)
            raise
        self._deleted.inc(deleted)
        if deleted:
            self._flush_erased("erasure", tenant=tenant, subject=subject)
        return shareholder_pb2.DeleteSharesResponse(deleted=deleted)

    def _flush_erased(self, what: str, **fields) -> None:
        # On SQLite erased or overwritten rows' bytes are zeroed
        # (secure_delete) in the pages the write touched, but the main file
        # and the WAL still hold the older images until a checkpoint: flush
        # them now, so that "erased" holds for the files on disk when the
        # caller hears it (PostgreSQL: see docs/operations.md).
        reader = self.reader()
        try:
            if not reader.flush_erased():
                logs.event(self._log, f"{what} checkpoint busy; completed by the next checkpoint",
                           logging.WARNING, **fields)
        except reader.errors as exc:
            logs.event(self._log, f"{what} checkpoint failed", logging.WARNING, error=str(exc))

    def DescribeRecords(self, request, context):
        tenant = status.checked(names.check_id, request.tenant, "tenant")
        subject = status.checked(names.check_id, request.subject, "subject")
        rows = self.reader().subject_rows(tenant, subject)
        return shareholder_pb2.DescribeRecordsResponse(records=[r.info() for r in rows])

    def GetNodeInfo(self, request, context):
        db = self.reader()
        state = db.node_state()
        return shareholder_pb2.GetNodeInfoResponse(
            name=self.name, index=state.index, epoch=state.current_epoch, kek_version=self.keys.kek.active,
            audit_public_key=self._audit_public, records=db.count_records(),
            audit_head_seq=self.writer.head_seq,
            mac_key_width=getattr(db.mac_keys().get(state.current_epoch), "width", 0),
        )

    def ReadAuditLog(self, request, context) -> Iterator[shareholder_pb2.ReadAuditLogResponse]:
        # uint64 on the wire, int64 in SQLite: a from_seq past 2^63 - 1 used to
        # be INTERNAL (OverflowError); nothing lies beyond it anyway.
        from_seq = min(max(1, request.from_seq), 2**63 - 1)
        db = storage.connect(self.cfg.store)  # its own snapshot, however long the stream takes
        try:
            with db.snapshot():
                yield from self._audit_stream(db, from_seq)
        finally:
            db.close()

    @staticmethod
    def _audit_stream(db: storage.Database, from_seq: int) -> Iterator[shareholder_pb2.ReadAuditLogResponse]:
        cps = deque(db.checkpoints(from_seq))
        for row in db.iter_entries(from_seq):
            entry = common_pb2.AuditEntry(
                seq=row[0], time_ms=row[1], node=row[2], event=row[3], actor=row[4], request_id=row[5],
                tenant=row[6], subject=row[7], details_json=row[8], prev_hash=bytes(row[9]),
                entry_hash=bytes(row[10]),
            )
            while cps and cps[0].seq < entry.seq:
                yield shareholder_pb2.ReadAuditLogResponse(checkpoint=wire.checkpoint_message(cps.popleft()))
            yield shareholder_pb2.ReadAuditLogResponse(entry=entry)
        while cps:
            yield shareholder_pb2.ReadAuditLogResponse(checkpoint=wire.checkpoint_message(cps.popleft()))

    def WitnessCheckpoint(self, request, context):
        return self.witness.receive(request, caller(context), presented_spki(context))

    # --- key rotation -------------------------------------------------------------

    def RotateKek(self, request, context) -> Iterator[shareholder_pb2.RotateKekResponse]:
        return self.rotator.stream(request, context, str(caller(context)))
