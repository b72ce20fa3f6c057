"""The session model and its state machine: constants, ``Plan``, load/open,
the enrolment guards, the seals' bindings, and begin / get / abort / commit /
finalize (a node finalizes or rolls back only as far as its members agree).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import dataclasses
from dataclasses import dataclass, field as dc_field


from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx, now_ms
from splitvault.v1 import admin_pb2
from vault import envelope, names, pki, proactive
from vault import plan as committee_plan
from vault.errors import EnvelopeError
from vaultrpc import logs, status
from vaultrpc.server import caller


REFRESH, RESHARE = "refresh", "reshare"
# The first MAC key's joint dealing (its seed's session; epoch unchanged).
KEYGEN = "keygen"
BEGUN, PREPARED, COMMITTED, FINALIZED, ABORTED = "begun", "prepared", "committed", "finalized", "aborted"
OPEN_STATES = (BEGUN, PREPARED, COMMITTED)
KIND = {REFRESH: admin_pb2.SESSION_KIND_REFRESH, RESHARE: admin_pb2.SESSION_KIND_RESHARE}
_KIND_NAME = {v: k for k, v in KIND.items()}
STATE = {
    BEGUN: admin_pb2.SESSION_STATE_BEGUN,
    PREPARED: admin_pb2.SESSION_STATE_PREPARED,
    COMMITTED: admin_pb2.SESSION_STATE_COMMITTED,
    FINALIZED: admin_pb2.SESSION_STATE_FINALIZED,
    ABORTED: admin_pb2.SESSION_STATE_ABORTED,
}

# Records per prepare step (one peer call, one transaction, one audit entry).
CHUNK = 512
# Records per refresh prepare step (one delta call per peer): larger, since
# a refresh's per-call costs (query, protos, the dealer's audit commit) are
# the same for 512 records as for 2048 (~9% less CPU per record measured).
REFRESH_CHUNK = 2048
# Chunks whose peer calls are under way while the current one is sealed.
PIPELINE = 3
# Prepared rows per transaction (and records per sealed check batch): short
# enough that a verification's audit entry, committed in the same group, is
# not held up for long. (512 was tried: no faster refresh on this machine,
# and Verify's p99 during a refresh of 20,000 rose from ~150 to ~210 ms.)
WRITE_CHUNK = 128
# Rows deleted per transaction in finalize (secure_delete zeroes their
# pages): 1024 rows, 4x fewer commits and audit entries than 256, with
# Verify's p99 during a refresh unchanged (measured at 20,000 templates).
MOVE_CHUNK = 1024
# Most records one peer call may ask for.
MAX_KEYS = 4096
# Deadline of a node-to-node call.
PEER_TIMEOUT_S = 60.0
# Niceness of the maintenance worker threads (RPC threads stay at 0).
WORKER_NICE = 10
# The reader's memory map for the check's pass over the sealed batches.
CHECK_MMAP_BYTES = 1 << 30
# Sealed check batches deleted per transaction (each holds up to
# WRITE_CHUNK records' values: 8 x 128 records, like MOVE_CHUNK rows).
DIFF_DELETE_CHUNK = 8
# Deadline of the question "how far did this session get?" to a peer.
PEER_STATE_TIMEOUT_S = 10.0
# Challenges per check call.
MAX_CHALLENGES = 16
# How far back (ms) before a session's start its check claims are looked up
# in the audit log (the clock may have been stepped back a little since).
CLAIM_CLOCK_SLACK_MS = 86_400_000
# Mask slots of the reshare check (at most this many challenges per check),
# dealt and sealed at prepare; one check context uses them all.
RESHARE_CHECK_MASKS = 3
# Rows opened per step of the reshare check's pass over one side's epoch.
RESHARE_CHECK_PAGE = 1024
# The sealed masks' places in refresh_check_diffs (tenant "" is never a record's).
MASK_OLD, MASK_NEW = "reshare-check-mask-old", "reshare-check-mask-new"
RENEWAL_MASK, RENEWAL_MASK_TAGS = "renewal-check-mask", "renewal-check-mask-tags"
# Width of a first MAC key when the auditor names none: the largest template
# dimension it serves (tags of dimension d use its first d columns).
DEFAULT_MAC_WIDTH = 512
# How long a peer's call waits for this node's new MAC key share (dealt at
# the start of its own prepare) before it asks the caller to retry.
KEY_WAIT_S = 30.0
# Renewal values kept for the peers' calls and this node's own prepare (each
# one chunk's g_j(x) for every member x: n x REFRESH_CHUNK x L values).
PRODUCT_CACHE = 32
# Chunks of opened old shares kept for this node's own prepare (8 MiB each at
# 2,048 x 515): a peer running far ahead makes them be opened again, no more.
OPENED_CACHE = 8
_SEED_DOMAIN = b"splitvault/session-seed/v1\x00"
_DIFF_DOMAIN = b"splitvault/refresh-check-diff/v1\x00"
_log = logging.getLogger("shareholders.epochs")


# --- the session row ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Who holds what before and after: name -> index, thresholds, senders.

    A reshare also keeps the operator-approved plan it was begun on
    (vault/plan.py): its digest, each new member's pinned certificate-key
    fingerprint and operator key, and the signed document itself
    (``approved``: the body and the approvals, kept for the record).
    A refresh keeps in ``pins`` the current members' fingerprints (from the
    recorded committee or the config's [committee] pins), if the node has
    them: peer calls of the session are answered only to those keys.
    """

    old: dict[str, int]
    new: dict[str, int]
    old_threshold: int
    new_threshold: int
    senders: tuple[int, ...]
    plan_sha256: str = ""
    pins: dict[str, str] = dc_field(default_factory=dict)
    operators: dict[str, str] = dc_field(default_factory=dict)
    approved: dict = dc_field(default_factory=dict, compare=False)
    # A refresh: the width of the new epoch's MAC key (vault.epoch_mac).
    mac_width: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {"old": self.old, "new": self.new, "old_threshold": self.old_threshold,
             "new_threshold": self.new_threshold, "senders": list(self.senders), "plan_sha256": self.plan_sha256,
             "pins": self.pins, "operators": self.operators, "approved": self.approved, "mac_width": self.mac_width},
            sort_keys=True,
        )

    def addresses(self) -> dict[str, str]:
        """The new members' addresses in the approved plan (a reshare's), by name."""
        body = (self.approved or {}).get("body")
        if not body:
            return {}
        return {m["name"]: m["address"] for m in json.loads(body).get("new_committee", [])}

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(dict(d["old"]), dict(d["new"]), int(d["old_threshold"]), int(d["new_threshold"]),
                   tuple(int(x) for x in d["senders"]), str(d.get("plan_sha256", "")), dict(d.get("pins") or {}),
                   dict(d.get("operators") or {}), dict(d.get("approved") or {}), int(d.get("mac_width") or 0))


# What the peer helpers (_check_peers, _check_peer_key) need of a session, for the first key's dealing.
KEYGEN_SESSION = Session("", KEYGEN, BEGUN, 0, 0, Plan({}, {}, 2, 2, ()), None, 0, "", 0, 0)


def load_session(db: storage.Database, session_id: str) -> Session | None:
    """A refresh or reshare session by id, with its typed Plan (None if
    absent; other kinds raise)."""
    s = db.get_session(session_id)
    if s is None:
        return None
    if s.kind not in (REFRESH, RESHARE):
        raise status.FailedPrecondition(f"Session {session_id} is a {s.kind} session, not a refresh or reshare.")
    return dataclasses.replace(s, plan=Plan.from_dict(s.plan))


def open_session(db: storage.Database) -> Session | None:
    """The session holding the node's maintenance lock (of any kind: refresh,
    reshare, kek_rotate, keygen; its plan as stored), if any."""
    return db.open_session()


def describe(s) -> str:
    return f"{s.kind} session {s.session_id} (state {s.state}, begun by {s.actor or 'unknown'})"


def guard_store(db: storage.Database) -> None:
    """Refuse an enrolment while a session is open (inside the store job)."""
    s = open_session(db)
    if s is not None and s.kind in (REFRESH, RESHARE):
        raise status.FailedPrecondition(
            f"Maintenance in progress on this node ({describe(s)}); enrolment is paused until it ends. Retry later."
        )


def guard_delete(db: storage.Database, tenant: str, subject: str) -> None:
    """Inside the delete job: refused during a reshare (a new member could keep
    the subject); during a refresh the delete takes every epoch, prepared too."""
    s = open_session(db)
    if s is not None and s.kind == RESHARE:
        raise status.FailedPrecondition(
            f"Maintenance in progress on this node ({describe(s)}); deletion is paused until the committee "
            "change ends. Retry later."
        )


def seed_aad(node: str, session_id: str) -> bytes:
    n, s = node.encode(), session_id.encode()
    return _SEED_DOMAIN + len(n).to_bytes(4, "big") + n + len(s).to_bytes(4, "big") + s


def diff_aad(session_id: str, first: tuple[str, str], width: int, keys_json: str, fingerprints: bytes) -> bytes:
    # Binds a sealed batch of check values to its session, place, exact keys
    # and the fingerprints of the new rows they belong to.
    return _DIFF_DOMAIN + b"".join(
        len(v).to_bytes(4, "big") + v
        for v in (session_id.encode(), first[0].encode(), first[1].encode(), str(width).encode(),
                  hashlib.sha256(keys_json.encode()).digest(), hashlib.sha256(fingerprints).digest())
    )


def mask_aad(session_id: str, which: str) -> bytes:
    # A sealed reshare check mask: bound to its session and side.
    return diff_aad(session_id, ("", which), RESHARE_CHECK_MASKS, "[]", b"")


def row_fingerprint(wrapped_dk: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    # 16 bytes naming one sealed row exactly: any later change of it (bit rot,
    # a reseal) changes them.
    return hashlib.sha256(b"".join(
        (len(wrapped_dk).to_bytes(4, "big"), wrapped_dk, len(nonce).to_bytes(4, "big"), nonce, ciphertext)
    )).digest()[:16]


def checked_challenges(items) -> list[bytes]:
    """The auditor's check challenges: 1 to 16 distinct 16-byte values."""
    out = [bytes(c) for c in items]
    if not 1 <= len(out) <= MAX_CHALLENGES or any(len(c) != proactive.CHALLENGE_BYTES for c in out):
        raise status.InvalidArgument("The check takes 1 to 16 challenges of 16 bytes.")
    if len(set(out)) != len(out):
        raise status.InvalidArgument("The check's challenges must be distinct.")
    return out


def _members(items, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in items:
        try:
            names.check_name(m.name)
        except ValueError:
            raise status.InvalidArgument(f"The {what} names an invalid node {m.name[:64]!r}.") from None
        if not 1 <= m.index <= names.MAX_SHAREHOLDERS:
            raise status.InvalidArgument(f"The {what} gives node {m.name} index {m.index}; indices are 1 to 255.")
        if m.name in out:
            raise status.InvalidArgument(f"The {what} names node {m.name} twice.")
        out[m.name] = int(m.index)
    if len(set(out.values())) != len(out):
        raise status.InvalidArgument(f"The {what} gives two nodes the same index.")
    return out


def keys_digest(keys: list[tuple[str, str]]) -> hashlib._Hash:
    h = hashlib.sha256()
    for t, s in keys:
        h.update(proactive.record_label(b"", t, s))
    return h


def key_lines(keys) -> str:
    return hashlib.sha256("\n".join(f"{t}\x00{s}" for t, s in keys).encode()).hexdigest()


def renewal_tag(session_id: str, width: int, keys) -> tuple:
    """Names one chunk's renewal values (and its opened rows) in a node's caches."""
    return session_id, width, key_lines(keys)


class Pace:
    """Sleep as needed to stay under ``rate`` records per second (0: no limit)."""

    def __init__(self, rate: int):
        self.rate = int(rate)
        self.count = 0
        self.start = time.monotonic()

    def step(self, records: int) -> None:
        self.count += records
        if self.rate > 0:
            ahead = self.count / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def checkpoint_wal(where) -> None:
    """Make deleted rows' old pages unreadable on disk now (on SQLite: copy
    the WAL into the database and truncate it; best effort: readers may hold it)."""
    errors = storage.errors(where)
    try:
        db = storage.connect(where)
        try:
            db.flush_erased()
        finally:
            db.close()
    except errors as exc:
        logs.event(_log, "wal checkpoint skipped", logging.WARNING, error=str(exc))


class SessionSteps:
    """Begin, abort, commit and finalize of a session on this node (the state machine)."""

    def _session(self, session_id: str, *, states: tuple[str, ...] | None = None) -> Session:
        if not session_id:
            raise status.InvalidArgument("The request names no session id.")
        s = load_session(self.node.reader(), session_id)
        if s is None:
            current = open_session(self.node.reader())
            extra = f"; the open one is {describe(current)}" if current else ""
            raise status.NotFound(f"This node has no session {session_id[:64]}{extra}.")
        if states is not None and s.state not in states:
            raise status.FailedPrecondition(
                f"Session {s.session_id} is {s.state} on this node; this step needs it {' or '.join(states)}."
            )
        return s

    def _seed(self, s: Session) -> bytes:
        with self._seeds_lock:
            seed = self._seeds.get(s.session_id)
            if seed is not None:
                return seed
        if s.sealed_seed is None:
            raise status.FailedPrecondition(f"Session {s.session_id} has no dealing seed left on this node.")
        try:
            seed = envelope.open(self.node.keys.kek, seed_aad(self.name, s.session_id), s.sealed_seed)
        except EnvelopeError:
            raise status.DataLoss("This node's sealed session seed does not open.") from None
        with self._seeds_lock:
            self._seeds[s.session_id] = seed
        return seed

    def _forget_seed(self, session_id: str) -> None:
        """Drop what this node keeps in memory for a session that ended: its
        seed, where it dialled, and what dealing and the MAC key kept."""
        with self._seeds_lock:
            self._seeds.pop(session_id, None)
            self._dialled.pop(session_id, None)
            self._forget_dealt(session_id)
        self._forget_new_key(session_id)

    def _status(self, s: Session) -> admin_pb2.SessionStatus:
        db = self.node.reader()
        old, new = db.count_epoch(s.from_epoch), db.count_epoch(s.new_epoch)
        prepared = 0
        if s.state in (BEGUN, PREPARED, ABORTED):
            prepared, new = new, 0
        new_index = s.plan.new.get(self.name, 0)
        return admin_pb2.SessionStatus(
            session_id=s.session_id, kind=KIND[s.kind], state=STATE[s.state], from_epoch=s.from_epoch,
            new_epoch=s.new_epoch, actor=s.actor, started_ms=s.started_ms, updated_ms=s.updated_ms,
            records_old=old, records_prepared=prepared, records_new=new, records_skipped=s.skipped,
            in_new_committee=new_index > 0, new_index=new_index,
        )

    def _refuse(self, exc: status.RpcError, actor: str, sid: str, kind: str, reason: str) -> status.RpcError:
        """Record a refused session request in the audit log; return exc to raise."""
        message = str(exc)

        def job(tx: Tx):
            tx.append("maintenance_refused", actor=actor, request_id=sid if names.is_session_id(sid) else "",
                      details={"kind": kind, "reason": reason, "message": message[:400]})
        self.node.commit(job)
        logs.event(_log, "maintenance refused", logging.WARNING, actor=actor, kind=kind, reason=reason)
        return exc

    def _authorise(self, request, kind: str, plan: Plan, actor: str, sid: str) -> Plan:
        """The session's plan, once this node accepts who asked for it.

        A refresh must keep the node's current committee and threshold
        exactly. A reshare needs an operator-approved plan (vault/plan.py) for
        this cluster, equal to the request, over this node's current committee,
        with valid signatures of at least k_old (the current threshold)
        distinct current members' operators, whose keys this node pins."""
        members, k, recorded_ops = self._current_committee()

        def refuse(cls, reason: str, message: str):
            return self._refuse(cls(message), actor, sid, kind, reason)

        if kind == REFRESH:
            if not members:
                raise refuse(status.FailedPrecondition, "no_committee",
                             f"Node {self.name} has no committee recorded or configured ([committee]), so it cannot "
                             "check that a refresh keeps it.")
            if plan.old != members or plan.old_threshold != k:
                raise refuse(status.PermissionDenied, "refresh_committee",
                             f"A refresh keeps this node's committee ({', '.join(sorted(members))}) and threshold "
                             f"{k} exactly; the request names another, which needs an operator-approved reshare.")
            pins = self._current_pins()
            return dataclasses.replace(plan, pins={n: pins[n] for n in members if n in pins})
        signed = request.plan
        if not signed.body:
            raise refuse(status.PermissionDenied, "no_plan",
                         "A reshare needs a committee-change plan approved by k current node operators; the "
                         "request carries none.")
        try:
            approved = committee_plan.parse(bytes(signed.body))
        except committee_plan.InvalidPlan as exc:
            raise refuse(status.PermissionDenied, "bad_plan", f"The committee-change plan is refused: {exc}")
        if approved.audience != self.audience:
            raise refuse(status.PermissionDenied, "audience",
                         "The committee-change plan is for another cluster (its audience is not this node's CA and "
                         "cluster id).")
        differs = [name for name, same in (
            ("session id", approved.session_id == sid), ("kind", approved.kind == kind),
            ("epochs", (approved.from_epoch, approved.new_epoch) == (request.from_epoch, request.new_epoch)),
            ("old committee", approved.old_committee == plan.old),
            ("new committee", approved.new_indices == plan.new),
            ("thresholds", (approved.old_threshold, approved.new_threshold) == (plan.old_threshold, plan.new_threshold)),
            ("senders", approved.senders == plan.senders),
        ) if not same]
        if differs:
            raise refuse(status.PermissionDenied, "plan_mismatch",
                         f"The request differs from the approved plan in its {', '.join(differs)}.")
        existing = load_session(self.node.reader(), sid)
        if existing is not None and existing.kind == RESHARE and existing.plan.plan_sha256 == approved.digest():
            # Resuming the session this plan began (it may have committed here
            # since, so the node's committee already is the new one).
            return existing.plan
        if members:
            if approved.old_committee != members or approved.old_threshold != k:
                raise refuse(status.PermissionDenied, "old_committee",
                             f"The plan's old committee is not this node's current committee "
                             f"({', '.join(sorted(members))}, threshold {k}).")
        elif self.name in approved.old_committee:
            raise refuse(status.FailedPrecondition, "no_committee",
                         f"Node {self.name} has no committee recorded or configured ([committee]), so it cannot "
                         "check a plan that changes it.")
        else:
            # A joining node with no committee of its own yet: it holds no
            # shares; the senders check the plan against theirs.
            members, k = approved.old_committee, approved.old_threshold
        keys = {}
        for name in members:
            key = self.cfg.operators.get(name)
            if key is None and name in recorded_ops:
                key = pki.load_public_key(recorded_ops[name])
            if key is not None:
                keys[name] = key
        approvals: dict[str, bytes] = {}
        for a in signed.approvals:
            approvals.setdefault(a.operator, bytes(a.signature))
        good = committee_plan.approved_by(bytes(signed.body), approvals, keys)
        if len(good) < k:
            raise refuse(status.PermissionDenied, "quorum",
                         f"The plan carries {len(good)} valid approval(s) of current node operators; this node's "
                         f"committee needs {k}.")
        if existing is None:
            try:
                committee_plan.check_window(approved)
            except committee_plan.InvalidPlan as exc:
                raise refuse(status.FailedPrecondition, "expired", f"The committee-change plan is refused: {exc}")
        return Plan(plan.old, plan.new, plan.old_threshold, plan.new_threshold, plan.senders,
                    plan_sha256=approved.digest(), pins=approved.pins,
                    operators={m.name: m.operator_key for m in approved.new_committee},
                    approved={"body": bytes(signed.body).decode("ascii"),
                              "approvals": {n: approvals[n].hex() for n in sorted(good)}})

    # --- orchestration -----------------------------------------------------------

    def BeginSession(self, request, context):
        actor = str(caller(context))
        sid = request.session_id
        if not names.is_session_id(sid):
            raise status.InvalidArgument("A session id is 8 to 64 characters: letters, digits, '-' and '_'.")
        kind = _KIND_NAME.get(request.kind)
        if kind is None:
            raise status.InvalidArgument("The session kind must be REFRESH or RESHARE.")
        old = _members(request.old_committee, "old committee")
        new = _members(request.new_committee, "new committee")
        k_old, k_new = int(request.old_threshold), int(request.new_threshold)
        if not 2 <= k_old <= len(old) or not 2 <= k_new <= len(new):
            raise status.InvalidArgument("Each threshold must be from 2 to the size of its committee.")
        if not 1 <= request.from_epoch < request.new_epoch < 2**62:
            raise status.InvalidArgument("The new epoch must come after the epoch being renewed.")
        senders = tuple(int(x) for x in request.senders)
        if kind == REFRESH:
            if old != new or k_old != k_new:
                raise status.InvalidArgument("A refresh keeps the committee and the threshold; use a reshare to change them.")
            senders = ()
        else:
            if len(senders) != k_old or len(set(senders)) != k_old or not set(senders) <= set(old.values()):
                raise status.InvalidArgument("A reshare names exactly k distinct old indices as senders.")
        if self.name not in old and self.name not in new:
            raise status.InvalidArgument(f"Node {self.name} is in neither committee of this session.")
        for committee in (old, new):
            if self.name in committee and committee[self.name] != self.index:
                raise status.InvalidArgument(
                    f"The session gives node {self.name} index {committee[self.name]}, but it holds index "
                    f"{self.index}; a node keeps its index across sessions."
                )
        plan = Plan(old, new, k_old, k_new, senders)
        plan = self._authorise(request, kind, plan, actor, sid)
        if len(new) < 2 * k_new - 1:
            raise status.InvalidArgument(
                f"A committee of {len(new)} nodes with threshold {k_new} cannot renew the MAC keys at a refresh "
                f"(that needs at least 2k - 1 = {2 * k_new - 1} nodes); choose a larger committee or a lower "
                "threshold.")
        if kind == REFRESH:
            plan = dataclasses.replace(plan, mac_width=self._mac_width(sid, request))
        ring = self.node.keys.kek

        def job(tx: Tx):
            db = tx.db
            existing = load_session(db, sid)
            if existing is not None:
                if existing.kind != kind or existing.plan != plan or existing.new_epoch != request.new_epoch \
                        or existing.from_epoch != request.from_epoch:
                    raise status.FailedPrecondition(
                        f"Session {sid} exists on this node with another plan; start a new session."
                    )
                if existing.open:
                    tx.append("maintenance_resume", actor=actor, request_id=sid, details={"kind": kind, "state": existing.state})
                return existing
            current = open_session(db)
            if current is not None:
                raise status.FailedPrecondition(
                    f"Another maintenance session is open on this node: {describe(current)}. Finish it "
                    f"(rerun the command that started it) or abort it first."
                )
            state = db.node_state()
            newest = db.newest_epoch()
            if request.new_epoch <= max(state.current_epoch, newest):
                raise status.FailedPrecondition(
                    f"This node already holds epoch {max(state.current_epoch, newest)}; the new epoch must be later."
                )
            other = db.count_other_epochs(request.from_epoch)
            if other:
                raise status.FailedPrecondition(
                    f"This node holds {other} share(s) outside epoch {request.from_epoch}; finish the previous session first."
                )
            held = db.count_epoch(request.from_epoch)
            if held and request.from_epoch not in db.mac_keys():
                raise status.FailedPrecondition(
                    f"This node holds {held} share(s) of epoch {request.from_epoch} but no MAC key share for it; "
                    "it cannot renew their tags.")
            seed = proactive.new_seed()
            sealed = envelope.seal(ring, seed_aad(self.name, sid), seed)
            now = now_ms()
            db.begin_session(sid, kind, actor, plan.to_json(), BEGUN, now, epoch=request.from_epoch,
                             new_epoch=request.new_epoch, seed=sealed)
            tx.append("maintenance_begin", actor=actor, request_id=sid, details={
                "kind": kind, "from_epoch": request.from_epoch, "new_epoch": request.new_epoch,
                "old_committee": [f"{n}={i}" for n, i in sorted(old.items(), key=lambda x: x[1])],
                "new_committee": [f"{n}={i}" for n, i in sorted(new.items(), key=lambda x: x[1])],
                "old_threshold": k_old, "new_threshold": k_new, "senders": list(senders),
                "plan_sha256": plan.plan_sha256 or None,
                "approved_by": sorted((plan.approved or {}).get("approvals") or {}),
            })
            return load_session(db, sid)

        s = self.node.commit(job)
        return admin_pb2.BeginSessionResponse(status=self._status(s))

    def GetSession(self, request, context):
        who = caller(context)
        if who is not None and who.role == pki.ROLE_SHAREHOLDER:
            return self._peer_session(request, context, who.name)
        db = self.node.reader()
        if request.session_id:
            s = load_session(db, request.session_id)
        else:
            current = open_session(db)
            s = load_session(db, current.session_id) if current is not None else None
        if s is None:
            return admin_pb2.GetSessionResponse(found=False)
        return admin_pb2.GetSessionResponse(found=True, status=self._status(s))

    def ListSessionKeys(self, request, context):
        s = self._session(request.session_id)
        limit = max(1, min(int(request.limit or 1000), 10_000))
        rows = self.node.reader().record_keys(s.from_epoch, (request.after_tenant, request.after_subject), limit + 1)
        keys = [admin_pb2.RecordKey(tenant=r.tenant, subject=r.subject, threshold=r.threshold,
                                    width=r.dimension + r.mac_count) for r in rows[:limit]]
        return admin_pb2.ListSessionKeysResponse(keys=keys, more=len(rows) > limit)

    def AbortSession(self, request, context):
        actor = str(caller(context))
        s = self._session(request.session_id)
        if s.state in (ABORTED,):
            return admin_pb2.AbortSessionResponse(status=self._status(s))
        if s.state in (COMMITTED, FINALIZED):
            raise status.FailedPrecondition(
                f"Session {s.session_id} is already {s.state} on this node; it can only be completed, not rolled back."
            )
        unasked = self._refuse_late_abort(s, actor)
        with self._phase_lock:
            self._delete_chunks(
                lambda db, limit: db.delete_check_batches(s.session_id, limit), "maintenance_abort_batch", s, actor,
                limit=DIFF_DELETE_CHUNK,
            )
            self._delete_chunks(
                lambda db, limit: db.delete_epoch_rows(s.new_epoch, limit), "maintenance_abort_batch", s, actor,
            )

            def job(tx: Tx):
                db = tx.db
                cur = load_session(db, s.session_id)
                if cur.state in (COMMITTED, FINALIZED):
                    raise status.FailedPrecondition(f"Session {s.session_id} was committed meanwhile.")
                db.delete_epoch(s.new_epoch)
                db.delete_mac_keys(s.new_epoch)
                db.close_session(s.session_id, ABORTED, now_ms())
                tx.append("maintenance_abort", actor=actor, request_id=s.session_id, details={
                    "kind": s.kind, "was": cur.state, "members_unconfirmed": unasked,
                    **({"reason": request.reason[:200]} if request.reason else {})})
                return load_session(db, s.session_id)

            done = self.node.commit(job)
        self._forget_seed(s.session_id)
        checkpoint_wal(self.cfg.store)
        return admin_pb2.AbortSessionResponse(status=self._status(done))

    def _refuse_early_finalize(self, s: Session, actor: str) -> None:
        """Raise unless at least k' members of the new committee (this node
        included) have committed the session, so that its new epoch survives
        whatever happens to the others. Not all of them: a member lost after
        the commit must not keep the others from finalizing (and from a
        reshare that replaces it)."""
        states, unasked = self._member_states(s, s.plan.new)
        done = (STATE[COMMITTED], STATE[FINALIZED])
        committed = {n for n, state in states.items() if state in done}
        if self.name in s.plan.new:
            committed.add(self.name)
        need = s.plan.new_threshold
        if len(committed) >= need:
            return
        behind = sorted(set(s.plan.new) - committed - set(unasked))
        if len(committed) + len(unasked) >= need:
            exc = status.Unavailable(
                f"This node cannot confirm that node(s) {', '.join(unasked)} committed session {s.session_id}, and "
                f"it keeps its old epoch until {need} members of the new committee have. Retry when they are up.")
        else:
            exc = status.FailedPrecondition(
                f"Session {s.session_id} is not committed on node(s) {', '.join(behind)}; this node keeps its old "
                f"epoch until {need} members of the new committee serve the new one.")
        raise self._refuse(exc, actor, s.session_id, s.kind, "finalize_early")

    def _refuse_late_abort(self, s: Session, actor: str) -> list[str]:
        """Raise if any member says it committed the session; return the members not asked.

        A member that cannot be asked does not block the rollback: a member
        that committed meanwhile can finalize only with k' committed members
        of the new committee, whose new epoch then survives."""
        states, unasked = self._member_states(s, {*s.plan.old, *s.plan.new})
        ahead = sorted(n for n, state in states.items() if state in (STATE[COMMITTED], STATE[FINALIZED]))
        if ahead:
            raise self._refuse(status.FailedPrecondition(
                f"Session {s.session_id} is committed on node(s) {', '.join(ahead)}; it can only be completed, not "
                "rolled back."), actor, s.session_id, s.kind, "abort_after_commit")
        return unasked

    # --- commit and finalize ---------------------------------------------------------------

    def CommitSession(self, request, context):
        actor = str(caller(context))
        s = self._session(request.session_id, states=(PREPARED, COMMITTED, FINALIZED))
        serves_new = self.name in s.plan.new
        if s.state != PREPARED:
            if serves_new and s.state == COMMITTED:
                self.node.serve_epoch(s.new_epoch)
            yield admin_pb2.CommitSessionResponse(status=self._status(s))
            return
        if s.kind == RESHARE:
            self._require_check(s, actor)
        else:
            self._require_refresh_check(s, actor)
        plan = s.plan

        def job(tx: Tx) -> Session:
            # One transaction: the prepared rows are already in place, the
            # node's current epoch moves on and it serves both epochs.
            db = tx.db
            cur = load_session(db, s.session_id)
            if cur.state != PREPARED:
                return cur
            db.update_session(s.session_id, now_ms(), state=COMMITTED)
            if serves_new:
                committee = {"members": plan.new, "threshold": plan.new_threshold}
                # Operator keys a committed plan introduced stay known to the
                # members they belong to (a refresh introduces none).
                known = dict(db.node_state().committee.get("operators") or {})
                known.update(plan.operators)
                known = {n: key for n, key in known.items() if n in plan.new}
                if known:
                    committee["operators"] = known
                # The members' certificate-key pins (a reshare's from its
                # approved plan, a refresh's those it began with).
                pins = {n: plan.pins[n] for n in plan.new if n in plan.pins}
                if pins:
                    committee["pins"] = pins
                db.set_epoch(s.new_epoch, committee, now_ms())
            served = db.count_epoch(s.new_epoch)
            tx.append("epoch_commit", actor=actor, request_id=s.session_id, details={
                "kind": s.kind, "from_epoch": s.from_epoch, "new_epoch": s.new_epoch, "records_new": served,
                "serving": [s.from_epoch, s.new_epoch] if serves_new else [s.from_epoch],
            })
            return load_session(db, s.session_id)

        final = self.node.commit(job)
        if serves_new:
            self.node.serve_epoch(s.new_epoch)
        st = self._status(final)
        yield admin_pb2.CommitSessionResponse(done=st.records_new, total=st.records_new, status=st)

    def FinalizeSession(self, request, context):
        actor = str(caller(context))
        s = self._session(request.session_id, states=(COMMITTED, FINALIZED))
        if s.state == FINALIZED:
            yield admin_pb2.FinalizeSessionResponse(status=self._status(s))
            return
        self._refuse_early_finalize(s, actor)
        if not self._phase_lock.acquire(timeout=PEER_TIMEOUT_S):
            raise status.Aborted("Another step of this session is still running on this node; retry.")
        try:
            total = self.node.reader().count_before(s.new_epoch)
            yield admin_pb2.FinalizeSessionResponse(done=0, total=total)
            done = 0
            # The check's sealed values first (they go with the old epoch).
            for _ in self._delete_chunks(
                lambda db, limit: db.delete_check_batches(s.session_id, limit), "epoch_destroy_batch", s, actor,
                context=context, limit=DIFF_DELETE_CHUNK,
            ):
                pass
            for removed in self._delete_chunks(
                lambda db, limit: db.delete_epoch_rows(s.new_epoch, limit, older=True), "epoch_destroy_batch", s,
                actor, context=context,
            ):
                done += removed
                yield admin_pb2.FinalizeSessionResponse(done=done, total=total)
            if not context.is_active():
                return

            def finish(tx: Tx) -> Session:
                db = tx.db
                cur = load_session(db, s.session_id)
                if cur.state != COMMITTED:
                    return cur
                if db.count_before(s.new_epoch):
                    raise status.Aborted("Old-epoch rows remain; run the step again.")
                db.delete_mac_keys(s.new_epoch, older=True)
                db.close_session(s.session_id, FINALIZED, now_ms())
                served = db.count_records()
                tx.append("epoch_finalize", actor=actor, request_id=s.session_id, details={
                    "kind": s.kind, "destroyed_epoch": s.from_epoch, "epoch": s.new_epoch, "records": served,
                    "left_committee": self.name not in s.plan.new,
                })
                return load_session(db, s.session_id)

            final = self.node.commit(finish)
            self._forget_seed(s.session_id)
            checkpoint_wal(self.cfg.store)
            yield admin_pb2.FinalizeSessionResponse(done=done, total=total, status=self._status(final))
        finally:
            self._phase_lock.release()

    def _delete_chunks(self, delete, event, s: Session, actor: str, context=None, limit: int = MOVE_CHUNK):
        """Delete rows chunk by chunk (``delete(db, limit)`` -> how many went;
        erased rows are zeroed): yields how many each time."""
        def job(tx: Tx) -> int:
            n = delete(tx.db, limit)
            if not n:
                return 0
            tx.append(event, actor=actor, request_id=s.session_id, details={"kind": s.kind, "records": n})
            return n

        def run():
            while True:
                if context is not None and not context.is_active():
                    return
                n = self.node.commit(job)
                if not n:
                    return
                yield n

        if context is None:
            for _ in run():
                pass
            return None
        return run()
