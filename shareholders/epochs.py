"""The node's side of proactive refresh and resharing: ``splitvault.v1.ShareholderAdmin``.

A maintenance job is a *session* (``maintenance_sessions``): its row in an
open state (begun, prepared, committed) is the node's maintenance lock, so
one session runs per node at a time; a request naming another session gets
FAILED_PRECONDITION naming the open one, and the same id resumes. Every step
is an audit entry, committed with the change it describes.

Phases (docs/operations.md):

1. **Begin**: lock, and draw this node's dealing seed (``vault.proactive``),
   sealed under the node's KEK like a share.
2. **Prepare**: the new epoch's shares are computed and written, sealed,
   beside the old ones in ``shares`` under the new epoch. They are not
   served: a node releases rows up to its current epoch only
   (``ShareholderService.serving_epoch``).
   - Refresh: for each record it holds, node j asks every peer i for
     delta_i(j) (``GetRefreshDeltas``, node to node, over mTLS with the
     nodes' own certificates) and writes y_j + sum_i delta_i(j).
   - Reshare: each new member j' pages through the records of the lead
     sender and asks every sender i in S for g_i(j') (``GetReshareShares``),
     then writes sum_i lambda_i^S g_i(j') with its new index.
   Peers deal deterministically from their seed, so asking again after a
   crash returns the same values: prepare just continues where the
   prepared rows stop, with no staging of dealt values. A peer only ever
   answers for the caller's own index (from its certificate name), so no
   party sees what another node was dealt.
   With each batch of prepared rows (one transaction) a refresh also
   writes, sealed like a share, the batch's new-minus-old values and the
   fingerprints of its new rows (``refresh_check_diffs``): the input of the
   check, taken from the very arrays sealed into the rows.
   **The check** (``CheckRefresh``, between prepare and commit; the math
   and why the answers reveal nothing: ``vault.proactive``):
   - *Records covered*: decided by the nodes, never the caller. The node
     asked fetches every peer's 64-bit record hashes (node to node) and
     covers exactly the records that every member holds in the old epoch;
     ``exclude`` is refused. So two calls can differ in their records only
     if the nodes' holdings changed (a deletion), and that changes the
     context that the masks are bound to.
   - *Challenges*: the auditor's, each hashed with every node's
     contribution (a PRF of its seed and the auditor's challenges, revealed
     to a peer only once this node is prepared, i.e. once every delta it is
     owed is in hand). The mixed challenges need every node's
     contribution, so nobody knows them before every node holds every
     delta (and has sealed its new-minus-old values): no dealer knows them
     while it can still deal. The auditor alone does not choose them. (A
     dishonest node revealing its contribution last could try
     contributions until its faulty dealing passes; with 3 challenges each
     try passes with probability about (w/P)^3, ~1e-20.)
   - *Masks*: a joint zero sharing derived from every node's seed for the
     check context (session, k, the covered records' digest, every mixed
     challenge): any two answers of a node carry independent masks.
   - *Once*: before computing anything the node records the challenges as
     claimed in its audit log (``refresh_check_begin``, in the same writer
     transaction that looks for earlier claims in this session); a
     challenge seen before is refused and the refusal logged
     (``refresh_check_refused``). The log survives restarts. Calls are
     counted (the ``call`` number, ``splitvault_node_refresh_checks_total``).
   - *Soundness and speed*: the values combined are the sealed
     new-minus-old batches, one open per batch (128 records) instead of two
     per record; every covered record must have its values (no sampling),
     and each covered record's new row must still match the fingerprint
     taken when it was sealed, so a share damaged or replaced after prepare
     fails the check (DATA_LOSS; the CLI rolls the session back). What this
     no longer re-derives is new = old + diff from the stored rows: that
     holds by construction (both come from one array, in one step), and an
     old row damaged after prepare is destroyed at finalize anyway.
   - *The renewed tags* (the tag part; math in ``vault.epoch_mac``, "the
     renewal check"): masks rho and their renewed tags are dealt and sealed
     at prepare, before any record (``renewal_mask`` /
     ``renewal_mask_renew``); in the check each node reports u(i) over the
     covered records' new rows, takes every member's u node to node
     (``renewal_check_context``), opens it and answers w(i). One context
     per mask set (``renewal_check_begin``).
   **The reshare check** (``CheckReshare``; math in ``vault.proactive``):
   at prepare every old member pulls rho_i(m) from every old member and
   seals R_m, and every new member seals the senders' reshare of it
   (``check_mask_deal`` / ``check_mask_reshare``, before any record); once
   prepared, a node gives its contribution, then its L(y) + R for the
   old share and/or L(y') + R' for the new one, over every record of that
   epoch. It answers ONE check context per session (claimed in its audit
   log, ``reshare_check_begin``; another refused, the same one repeated).
   Before it commits a reshare, a node asks every member for its answer
   (``check_answer``) and evaluates the check itself.
3. **Commit**: one transaction moves the node's current epoch on: it serves
   both epochs (``ReleaseShare`` returns one share per epoch; the matcher
   rejoins the newest epoch with k shares).
4. **Finalize** (once every node committed): the check's sealed batches,
   the old epoch's rows (on a node leaving the committee: every row) and
   the seed are deleted with
   SQLite's secure_delete, then the WAL is truncated.
   **Abort** (only before any node committed): the unserved rows and the
   seed go.

While a session is open the node refuses new enrolments
(FAILED_PRECONDITION, "retry"): a record stored after the dealing started
would miss its refresh. Deletions stay allowed during a refresh (every
epoch of the subject goes, prepared or not) and are refused during a
reshare (new members outside the old committee would keep the subject).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent import futures
import dataclasses
from dataclasses import dataclass, field as dc_field

import grpc
import numpy as np
from prometheus_client import Counter

from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx, WriterClosed, now_ms
from shareholders.config import ConfigError, load_peers
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import envelope, epoch_mac, field, names, pki, proactive, record
from vault import plan as committee_plan
from vault.errors import EnvelopeError, InvalidShares
from vault.field import FIELD_DTYPE, P
from vaultrpc import logs, status
from vaultrpc.server import caller
from vaultrpc.tls import secure_channel

SERVICE = "splitvault.v1.ShareholderAdmin"
_M = f"/{SERVICE}/"
_AUDITOR = frozenset({pki.ROLE_AUDITOR})
_PEER = frozenset({pki.ROLE_SHAREHOLDER})
ROLES = {
    _M + "BeginSession": _AUDITOR,
    _M + "PrepareSession": _AUDITOR,
    _M + "CheckRefresh": _AUDITOR,
    _M + "CheckReshare": _AUDITOR,
    _M + "CommitSession": _AUDITOR,
    _M + "FinalizeSession": _AUDITOR,
    _M + "AbortSession": _AUDITOR,
    # Peers too: a node asks the others how far a session got before it
    # destroys its old epoch or rolls one back ("No node finalizes alone").
    _M + "GetSession": _AUDITOR | _PEER,
    _M + "ListSessionKeys": _AUDITOR,
    _M + "GetRefreshDeltas": _PEER,
    _M + "GetReshareShares": _PEER,
    _M + "DealFirstMacKey": _AUDITOR,
    _M + "GetMacKeyContribution": _PEER,
}

REFRESH, RESHARE = "refresh", "reshare"
# The first MAC key's joint dealing (its seed's session; epoch unchanged).
KEYGEN = "keygen"
BEGUN, PREPARED, COMMITTED, FINALIZED, ABORTED = "begun", "prepared", "committed", "finalized", "aborted"
OPEN_STATES = (BEGUN, PREPARED, COMMITTED)
_KIND = {REFRESH: admin_pb2.SESSION_KIND_REFRESH, RESHARE: admin_pb2.SESSION_KIND_RESHARE}
_KIND_NAME = {v: k for k, v in _KIND.items()}
_STATE = {
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
_MASK_OLD, _MASK_NEW = "reshare-check-mask-old", "reshare-check-mask-new"
_RENEWAL_MASK, _RENEWAL_MASK_TAGS = "renewal-check-mask", "renewal-check-mask-tags"
CHECKS = Counter("splitvault_node_refresh_checks_total", "Refresh check calls, by outcome.", ["node", "outcome"])
# Width of a first MAC key when the auditor names none: the largest template
# dimension it serves (tags of dimension d use its first d columns).
DEFAULT_MAC_WIDTH = 512
# How long a peer's call waits for this node's new MAC key share (dealt at
# the start of its own prepare) before it asks the caller to retry.
KEY_WAIT_S = 30.0
# Renewal values kept for the peers' calls and this node's own prepare (each
# one chunk's g_j(x) for every member x: n x REFRESH_CHUNK x L values).
PRODUCT_CACHE = 32
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
_KEYGEN_SESSION = Session("", KEYGEN, BEGUN, 0, 0, Plan({}, {}, 2, 2, ()), None, 0, "", 0, 0)


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


def _describe(s) -> str:
    return f"{s.kind} session {s.session_id} (state {s.state}, begun by {s.actor or 'unknown'})"


# --- hooks for the Shareholder service (called inside its writer jobs) ------------------


def guard_store(db: storage.Database) -> None:
    """Refuse an enrolment while a session is open (inside the store job)."""
    s = open_session(db)
    if s is not None and s.kind in (REFRESH, RESHARE):
        raise status.FailedPrecondition(
            f"Maintenance in progress on this node ({_describe(s)}); enrolment is paused until it ends. Retry later."
        )


def guard_delete(db: storage.Database, tenant: str, subject: str) -> None:
    """Inside the delete job: refused during a reshare (a new member could keep
    the subject); during a refresh the delete takes every epoch, prepared too."""
    s = open_session(db)
    if s is not None and s.kind == RESHARE:
        raise status.FailedPrecondition(
            f"Maintenance in progress on this node ({_describe(s)}); deletion is paused until the committee "
            "change ends. Retry later."
        )


# --- helpers ---------------------------------------------------------------------------


def _seed_aad(node: str, session_id: str) -> bytes:
    n, s = node.encode(), session_id.encode()
    return _SEED_DOMAIN + len(n).to_bytes(4, "big") + n + len(s).to_bytes(4, "big") + s


def _diff_aad(session_id: str, first: tuple[str, str], width: int, keys_json: str, fingerprints: bytes) -> bytes:
    # Binds a sealed batch of check values to its session, place, exact keys
    # and the fingerprints of the new rows they belong to.
    return _DIFF_DOMAIN + b"".join(
        len(v).to_bytes(4, "big") + v
        for v in (session_id.encode(), first[0].encode(), first[1].encode(), str(width).encode(),
                  hashlib.sha256(keys_json.encode()).digest(), hashlib.sha256(fingerprints).digest())
    )


def _mask_aad(session_id: str, which: str) -> bytes:
    # A sealed reshare check mask: bound to its session and side.
    return _diff_aad(session_id, ("", which), RESHARE_CHECK_MASKS, "[]", b"")


def _row_fingerprint(wrapped_dk: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    # 16 bytes naming one sealed row exactly: any later change of it (bit rot,
    # a reseal) changes them.
    return hashlib.sha256(
        len(wrapped_dk).to_bytes(4, "big") + wrapped_dk + len(nonce).to_bytes(4, "big") + nonce + ciphertext
    ).digest()[:16]


def _store_diff(db: storage.Database, ring, session_id: str, items: list[storage.ShareRow], diff: np.ndarray) -> None:
    """Seal one prepared batch's new-minus-old values (for the check) beside
    its rows, with the new rows' fingerprints."""
    width = int(diff.shape[1])
    keys_json = json.dumps([[i.tenant, i.subject] for i in items], separators=(",", ":"))
    prints = b"".join(_row_fingerprint(i.wrapped_dk, i.nonce, i.ciphertext) for i in items)
    first = items[0].key
    sealed = envelope.seal(ring, _diff_aad(session_id, first, width, keys_json, prints), diff.astype("<u4").tobytes())
    db.put_check_batch(storage.CheckBatch(session_id, *first, width, keys_json, prints, sealed))


def _challenges(items) -> list[bytes]:
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


def _keys_digest(keys: list[tuple[str, str]]) -> hashlib._Hash:
    h = hashlib.sha256()
    for t, s in keys:
        h.update(proactive.record_label(b"", t, s))
    return h


def _key_lines(keys) -> str:
    return hashlib.sha256("\n".join(f"{t}\x00{s}" for t, s in keys).encode()).hexdigest()


class _Peers:
    """Channels to other nodes, with this node's own certificate; each one
    accepts only the certificate of the member it is for (shareholder/<name>)."""

    def __init__(self, tls):
        self._tls = tls
        self._lock = threading.Lock()
        self._stubs: dict[tuple[str, str], tuple[grpc.Channel, admin_pb2_grpc.ShareholderAdminStub]] = {}

    def stub(self, name: str, address: str) -> admin_pb2_grpc.ShareholderAdminStub:
        with self._lock:
            entry = self._stubs.get((name, address))
            if entry is None:
                channel = secure_channel(address, self._tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, name))
                entry = (channel, admin_pb2_grpc.ShareholderAdminStub(channel))
                self._stubs[(name, address)] = entry
            return entry[1]

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()


def _peer_error(name: str, exc: grpc.RpcError) -> status.RpcError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or "no details"
    cls = status.FailedPrecondition if code == grpc.StatusCode.FAILED_PRECONDITION else status.Unavailable
    return cls(f"Peer {name} did not deal its values ({getattr(code, 'name', 'UNKNOWN')}: {details.rstrip('.')}).")


# --- the servicer -----------------------------------------------------------------------


class _Dealings:
    """This node's zero-sharing coefficients for the chunks being prepared,
    derived once and evaluated at every receiver's x.

    Every node walks the same records in the same order and chunks, so its
    own prepare and each peer's GetRefreshDeltas ask for the same chunk at
    about the same time: one derivation of the dealer's stream serves all n
    receivers instead of one derivation each. The dealing is deterministic in
    (seed, record), so a miss (another chunk boundary, an evicted entry, a
    retry) only costs the derivation again and gives the same values. An
    entry is wiped once every receiver had its values and nobody is
    evaluating it; entries beyond ``size`` are dropped, oldest first (and
    wiped by their last reader).
    """

    def __init__(self, size: int):
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()
        self._size = size

    def deltas(self, seed: bytes, session_id: str, keys: list[tuple[str, str]], k: int, width: int, x: int,
               receivers: frozenset[int]) -> np.ndarray:
        key = (session_id, k, width, tuple(keys))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry["active"] += 1
        if entry is None:
            fresh = {"coeffs": proactive.refresh_coefficients(seed, keys, k, width), "served": set(), "active": 1}
            with self._lock:
                entry = self._entries.setdefault(key, fresh)
                if entry is not fresh:  # another thread derived it first
                    entry["active"] += 1
                while len(self._entries) > self._size:
                    _, old = self._entries.popitem(last=False)
                    if old["active"] == 0:
                        old["coeffs"].fill(0)
            if entry is not fresh:
                fresh["coeffs"].fill(0)
        try:
            return proactive.evaluate_at(entry["coeffs"], None, x)
        finally:
            with self._lock:
                entry["active"] -= 1
                entry["served"].add(x)
                listed = self._entries.get(key) is entry
                done = entry["active"] == 0 and (not listed or receivers <= entry["served"])
                if done and listed:
                    del self._entries[key]
            if done:
                entry["coeffs"].fill(0)


class MaintenanceService(admin_pb2_grpc.ShareholderAdminServicer):
    """Refresh and reshare sessions on one node; shares the node's writer,
    keys and reader connections with its ``ShareholderService``."""

    def __init__(self, shareholder):
        self.sh = shareholder
        self.cfg = shareholder.cfg
        self.name = shareholder.name
        self.index = shareholder.index
        self.writer = shareholder.writer
        self.peers = _Peers(self.cfg.tls.load())
        self._dealings = _Dealings(size=4 * PIPELINE)
        # The cluster a committee-change plan must name as its audience.
        with open(self.cfg.tls.ca, "rb") as fh:
            self.audience = committee_plan.audience_for(fh.read(), self.cfg.cluster_id)
        self._seeds: dict[str, bytes] = {}
        self._seeds_lock = threading.Lock()
        self._keys_cache: tuple | None = None  # (session id, count), keys, hashes: see _held_keys
        # session id -> {member: address} this node dialled for it (its table's, or the
        # request's for a member the table lacks): where it asks how far they got.
        self._dialled: dict[str, dict[str, str]] = {}
        # MAC key renewal: each session's new key share once dealt (waited
        # for by peers' calls), and recent chunks' product values h_j.
        self._new_keys: dict[str, np.ndarray] = {}
        self._key_cond = threading.Condition()
        self._deal_lock = threading.Lock()
        # One computation of a session's old-side check mask at a time.
        self._mask_lock = threading.Lock()
        self._products_cache: dict[tuple, np.ndarray] = {}
        # Round-A reports of the renewal check, (session, context) -> (u, sums), for the peers.
        self._renewal_reports: dict[tuple, tuple] = {}
        self._computing: dict[tuple, threading.Event] = {}
        # One long phase (prepare, commit, finalize) at a time: a rerun whose
        # predecessor's stream was cut waits for it to notice and stop.
        self._phase_lock = threading.Lock()
        # The heavy work (dealing, preparing, checking) runs in these threads,
        # at a lower CPU priority than the node's RPC threads, so that
        # verifications keep their latency while a refresh runs beside them.
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="epochs",
                                                initializer=_lower_priority)
        members = self._current_committee()[0]
        if members and not self._current_pins():
            logs.event(_log, "committee without key pins: peer calls are checked by certificate name only; "
                       "add [committee] pins to the config", logging.WARNING, node=self.name)

    def close(self) -> None:
        self.peers.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._seeds_lock:
            self._seeds.clear()

    # --- plumbing ----------------------------------------------------------------

    def _background(self, fn, *args):
        """Run fn(*args) in a low-priority worker and return its result here."""
        return self._pool.submit(fn, *args).result()

    def _stream_background(self, gen_fn, *args):
        """Run a generator in a low-priority worker; yield its items here."""
        items: queue.Queue = queue.Queue(maxsize=16)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            gen = gen_fn(*args)
            try:
                for value in gen:
                    if not put(("item", value)):
                        return
                put(("end", None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the RPC thread
                put(("error", exc))
            finally:
                gen.close()  # runs the generator's finally (locks, readers) now

        self._pool.submit(run)
        try:
            while True:
                kind, value = items.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            stop.set()

    def _conn(self) -> storage.Database:
        return self.sh._reader()

    def _commit(self, job):
        return self.sh._commit(job)

    def _session(self, session_id: str, *, states: tuple[str, ...] | None = None) -> Session:
        if not session_id:
            raise status.InvalidArgument("The request names no session id.")
        s = load_session(self._conn(), session_id)
        if s is None:
            current = open_session(self._conn())
            extra = f"; the open one is {_describe(current)}" if current else ""
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
            seed = envelope.open(self.sh.keys.kek, _seed_aad(self.name, s.session_id), s.sealed_seed)
        except EnvelopeError:
            raise status.DataLoss("This node's sealed session seed does not open.") from None
        with self._seeds_lock:
            self._seeds[s.session_id] = seed
        return seed

    def _forget_seed(self, session_id: str) -> None:
        with self._seeds_lock:
            self._seeds.pop(session_id, None)
            self._dialled.pop(session_id, None)
            self._keys_cache = None
            for tag in [t for t in self._products_cache if t[0] == session_id]:
                record.wipe(self._products_cache.pop(tag))
        with self._key_cond:
            record.wipe(self._new_keys.pop(session_id, None))

    def _status(self, s: Session) -> admin_pb2.SessionStatus:
        db = self._conn()
        old, new = db.count_epoch(s.from_epoch), db.count_epoch(s.new_epoch)
        prepared = 0
        if s.state in (BEGUN, PREPARED, ABORTED):
            prepared, new = new, 0
        new_index = s.plan.new.get(self.name, 0)
        return admin_pb2.SessionStatus(
            session_id=s.session_id, kind=_KIND[s.kind], state=_STATE[s.state], from_epoch=s.from_epoch,
            new_epoch=s.new_epoch, actor=s.actor, started_ms=s.started_ms, updated_ms=s.updated_ms,
            records_old=old, records_prepared=prepared, records_new=new, records_skipped=s.skipped,
            in_new_committee=new_index > 0, new_index=new_index,
        )

    def _check_peers(self, s: Session, peers, committee: dict[str, int]) -> dict[str, tuple[int, str]]:
        """name -> (index, address) for the session's members. A member in
        this node's own peer table is dialled at the table's address, and a
        request naming another address for it is refused (and logged): a
        silent fallback would hide a wrong or hostile orchestrator. A member
        the table does not know (a new member of a reshare) is dialled at the
        request's address; either way the channel accepts only that member's
        certificate (``_Peers``).

        A reshare dials only addresses this node knows: its table's, else the
        approved plan's (each new member's); a member neither names is
        refused, whatever the request says."""
        try:
            table = load_peers(self.cfg)
        except ConfigError as exc:
            raise status.FailedPrecondition(f"This node cannot read its peer table: {exc}") from None
        if s.kind == RESHARE:
            table = {**s.plan.addresses(), **table}
        given = {}
        for m in peers:
            if m.name in committee:
                if m.index != committee[m.name]:
                    raise status.InvalidArgument(
                        f"The request gives node {m.name} index {m.index}; the session has it at {committee[m.name]}."
                    )
                if not m.address and m.name != self.name:
                    raise status.InvalidArgument(f"The request gives no address for node {m.name}.")
                known = table.get(m.name)
                if known is not None and m.name != self.name and m.address != known:
                    self._refuse_peer_address(s, m.name, m.address, known)
                given[m.name] = (int(m.index), known or m.address)
        for name, index in committee.items():  # known members the request left out
            if name not in given and name in table and name != self.name:
                given[name] = (index, table[name])
        if s.kind == RESHARE:
            unknown = sorted(n for n in given if n != self.name and n not in table)
            if unknown:
                raise status.FailedPrecondition(
                    f"This node knows no address for node(s) {', '.join(unknown)}: neither its [peers] table nor "
                    "the approved plan names one, and it does not dial an address the request alone gives.")
        return given

    def _remember_dialled(self, s: Session, peers: dict[str, tuple[int, str]]) -> None:
        """Where this node dialled the session's members: where it asks them how far
        they got before it finalizes or rolls back (_member_states)."""
        with self._seeds_lock:
            self._dialled.setdefault(s.session_id, {}).update({n: a for n, (_, a) in peers.items() if n != self.name})

    def _refuse_peer_address(self, s: Session, name: str, address: str, known: str):
        message = f"The request gives node {name} an address that is not the one in this node's peer table."

        def job(tx: Tx):
            tx.append("deny", actor=s.actor, request_id=s.session_id, details={
                "reason": "peer_address", "peer": name, "given": address, "configured": known})

        self._commit(job)
        raise status.InvalidArgument(message)
    # --- committee changes need the operators ---------------------------------------

    def _current_committee(self) -> tuple[dict[str, int], int, dict[str, str]]:
        """(members name -> index, threshold, operator keys hex) this node holds
        now: as recorded by its last committed session, else as its config
        founded it; ({}, 0, {}) when neither says."""
        recorded = self._conn().node_state().committee
        if recorded.get("members"):
            return (dict(recorded["members"]), int(recorded.get("threshold") or 0),
                    dict(recorded.get("operators") or {}))
        return dict(self.cfg.committee), int(self.cfg.committee_threshold), {}

    def _current_pins(self) -> dict[str, str]:
        return committee_pins(self._conn(), self.cfg)

    def _refuse(self, exc: status.RpcError, actor: str, sid: str, kind: str, reason: str) -> status.RpcError:
        """Record a refused session request in the audit log; return exc to raise."""
        message = str(exc)

        def job(tx: Tx):
            tx.append("maintenance_refused", actor=actor, request_id=sid if names.is_session_id(sid) else "",
                      details={"kind": kind, "reason": reason, "message": message[:400]})
        self._commit(job)
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
        existing = load_session(self._conn(), sid)
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
        ring = self.sh.keys.kek

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
                    f"Another maintenance session is open on this node: {_describe(current)}. Finish it "
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
            sealed = envelope.seal(ring, _seed_aad(self.name, sid), seed)
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

        s = self._commit(job)
        return admin_pb2.BeginSessionResponse(status=self._status(s))

    def GetSession(self, request, context):
        who = caller(context)
        if who is not None and who.role == pki.ROLE_SHAREHOLDER:
            return self._peer_session(request, context, who.name)
        db = self._conn()
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
        rows = self._conn().record_keys(s.from_epoch, (request.after_tenant, request.after_subject), limit + 1)
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

            done = self._commit(job)
        self._forget_seed(s.session_id)
        _checkpoint_wal(self.cfg.store)
        return admin_pb2.AbortSessionResponse(status=self._status(done))

    # --- no node finalizes alone ------------------------------------------------
    # A node's own state is not enough to destroy its old epoch or to roll a
    # session back: an auditor who finalizes some nodes and aborts the others
    # leaves fewer than k nodes on any one epoch. So a node finalizes only once
    # k' members of the new committee say they committed, and rolls back only
    # while none says so (asked node to node, at addresses this node knows).

    def _peer_session(self, request, context, peer: str) -> admin_pb2.GetSessionResponse:
        """A member asking how far this node got with one session they share
        (its kind and state only), at the certificate key pinned for it."""
        if not request.session_id:
            raise status.PermissionDenied("A peer may ask only about a named session it shares with this node.")
        s = load_session(self._conn(), request.session_id)
        if s is None:
            return admin_pb2.GetSessionResponse(found=False)
        if peer not in s.plan.old and peer not in s.plan.new:
            raise status.PermissionDenied(f"Node {peer} is not a member of session {s.session_id}.")
        pinned = s.plan.pins.get(peer) or self._current_pins().get(peer, "")
        presented = presented_spki(context)
        if pinned and presented != pinned:
            def job(tx: Tx):
                tx.append("deny", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                    "reason": "pin_mismatch", "peer": peer, "rpc": "GetSession", "presented_spki_sha256": presented})
            self._commit(job)
            raise status.PermissionDenied(
                f"The certificate presented as node {peer} does not carry the key this node pins for it.")
        return admin_pb2.GetSessionResponse(found=True, status=admin_pb2.SessionStatus(
            session_id=s.session_id, kind=_KIND[s.kind], state=_STATE[s.state]))

    def _member_states(self, s: Session, names) -> tuple[dict[str, int], list[str]]:
        """The session's state (SESSION_STATE_*; 0 where the member has no such
        session) on each named member other than this node, and the members
        it could not ask."""
        try:
            table = load_peers(self.cfg)
        except ConfigError as exc:
            raise status.FailedPrecondition(f"This node cannot read its peer table: {exc}") from None
        with self._seeds_lock:
            dialled = dict(self._dialled.get(s.session_id, {}))
        table = {**dialled, **table}
        if s.kind == RESHARE:
            table = {**s.plan.addresses(), **table}
        calls, unasked = {}, []
        for name in sorted(set(names) - {self.name}):
            if name not in table:
                unasked.append(name)
                continue
            calls[name] = self.peers.stub(name, table[name]).GetSession.future(
                admin_pb2.GetSessionRequest(session_id=s.session_id), timeout=PEER_STATE_TIMEOUT_S)
        states = {}
        for name, call in calls.items():
            try:
                reply = call.result()
                states[name] = reply.status.state if reply.found else 0
            except grpc.RpcError:
                unasked.append(name)
        return states, sorted(unasked)

    def _refuse_early_finalize(self, s: Session, actor: str) -> None:
        """Raise unless at least k' members of the new committee (this node
        included) have committed the session, so that its new epoch survives
        whatever happens to the others. Not all of them: a member lost after
        the commit must not keep the others from finalizing (and from a
        reshare that replaces it)."""
        states, unasked = self._member_states(s, s.plan.new)
        done = (_STATE[COMMITTED], _STATE[FINALIZED])
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
        ahead = sorted(n for n, state in states.items() if state in (_STATE[COMMITTED], _STATE[FINALIZED]))
        if ahead:
            raise self._refuse(status.FailedPrecondition(
                f"Session {s.session_id} is committed on node(s) {', '.join(ahead)}; it can only be completed, not "
                "rolled back."), actor, s.session_id, s.kind, "abort_after_commit")
        return unasked

    # --- prepare -----------------------------------------------------------------

    def PrepareSession(self, request, context) -> Iterator[admin_pb2.PrepareSessionResponse]:
        actor = str(caller(context))
        s = self._session(request.session_id, states=(BEGUN, PREPARED, COMMITTED, FINALIZED))
        if s.state != BEGUN:
            yield admin_pb2.PrepareSessionResponse(status=self._status(s))
            return
        work = self._prepare_refresh if s.kind == REFRESH else self._prepare_reshare
        yield from self._stream_background(self._locked, work, s, request, context, actor)

    def _locked(self, work, s: Session, request, context, actor: str):
        # The worker holds the phase lock until it really stops (a cut
        # stream's worker finishes its chunk first), so two prepares of one
        # node never overlap.
        if not self._phase_lock.acquire(timeout=PEER_TIMEOUT_S):
            raise status.Aborted("Another step of this session is still running on this node; retry.")
        try:
            current = self._session(s.session_id)
            if current.state != BEGUN:  # a predecessor finished meanwhile
                yield admin_pb2.PrepareSessionResponse(status=self._status(current))
                return
            yield from work(current, request, context, actor)
        finally:
            self._phase_lock.release()

    def _prepare_refresh(self, s: Session, request, context, actor: str):
        peers = self._check_peers(s, request.peers, s.plan.new)
        self._remember_dialled(s, peers)
        missing = sorted(set(s.plan.new) - set(peers) - {self.name})
        if missing:
            raise status.InvalidArgument(f"The request gives no address for {', '.join(missing)}.")
        reader = storage.connect(self.cfg.store)
        launched: deque = deque()
        try:
            total = reader.count_epoch(s.from_epoch)
            done = reader.count_epoch(s.new_epoch)
            yield admin_pb2.PrepareSessionResponse(done=done, total=total)
            seed = self._seed(s)
            with self._deal_lock:
                self._deal_new_key(s, seed, peers, actor)
            self._prepare_renewal_check(s, peers, actor)
            cursor = [("", "")]

            def launch() -> bool:
                # Read the next chunk not yet prepared and ask every peer for
                # its deltas at once; the answers arrive while earlier chunks
                # are being sealed and written.
                share_rows = reader.unprepared_rows(s.from_epoch, s.new_epoch, cursor[0], REFRESH_CHUNK)
                if not share_rows:
                    return False
                cursor[0] = (share_rows[-1].tenant, share_rows[-1].subject)
                launched.append(self._launch_refresh_chunk(s, seed, share_rows, peers))
                return True

            more = True
            while more and len(launched) < PIPELINE:
                more = launch()
            inflight: deque = deque()
            pace = _Pace(request.max_records_per_s)
            while launched:
                if not context.is_active():
                    return
                chunk = launched.popleft()
                if more:
                    more = launch()
                groups = self._finish_refresh_chunk(s, seed, chunk)
                pace.step(sum(len(items) for items, _ in groups))
                for items, diff in groups:
                    for lo in range(0, len(items), WRITE_CHUNK):
                        inflight.append(self.writer.submit(self._prepared_job(
                            s, items[lo : lo + WRITE_CHUNK], actor, check_old=True, diff=diff[lo : lo + WRITE_CHUNK])))
                while len(inflight) > 4:
                    done += self._settle(inflight.popleft())
                    yield admin_pb2.PrepareSessionResponse(done=done, total=total)
            while inflight:
                done += self._settle(inflight.popleft())
            final = self._commit(self._prepared_state_job(s, actor))
            yield admin_pb2.PrepareSessionResponse(done=done, total=total, status=self._status(final))
        finally:
            for chunk in launched:
                for group in chunk:
                    for call in group[3].values():
                        call.cancel()
                    record.wipe(group[4])
            reader.close()

    def _settle(self, pending) -> int:
        try:
            return pending.result()
        except WriterClosed as exc:
            raise status.Unavailable(str(exc)) from None

    def _launch_refresh_chunk(self, s: Session, seed: bytes, rows: list[storage.ShareRow], peers) -> list[tuple]:
        """Group a chunk by (k, width), start the peers' delta calls, then open
        this node's old shares and compute its renewal values for every member
        (so the peers' calls for this chunk, arriving now, find them ready
        instead of opening the rows again): [(k, width, rows, calls, old)]."""
        groups: dict[tuple[int, int], list[storage.ShareRow]] = {}
        for row in rows:
            groups.setdefault((row.threshold, row.dimension + row.mac_count), []).append(row)
        out = []
        for (k, width), members in groups.items():
            req = admin_pb2.GetRefreshDeltasRequest(
                session_id=s.session_id,
                keys=[admin_pb2.RecordKey(tenant=r.tenant, subject=r.subject, threshold=k, width=width) for r in members],
                renew=True,
            )
            calls = {
                name: self.peers.stub(name, addr).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                for name, (_, addr) in peers.items() if name != self.name
            }
            old = None
            try:
                old = self._open_chunk(members, width)
                keys = [(r.tenant, r.subject) for r in members]
                record.wipe(self._renewal_values(s, seed, k, width, keys, old, self.index))
            except BaseException:
                for call in calls.values():
                    call.cancel()
                record.wipe(old)
                for group in out:
                    record.wipe(group[4])
                raise
            out.append((k, width, members, calls, old))
        return out

    def _open_chunk(self, rows: list[storage.ShareRow], width: int) -> np.ndarray:
        """This node's old shares of a chunk (B, width), read and range-checked
        as one array (not one array per row); the caller wipes it."""
        size = 4 * width
        opened = bytearray(size * len(rows))
        raw = np.frombuffer(opened, dtype="<u4").reshape(len(rows), width)
        try:
            for j, row in enumerate(rows):
                opened[j * size : (j + 1) * size] = self._open_bytes(row, size)
            old = raw.astype(FIELD_DTYPE)
        finally:
            record.wipe(raw)
        bad = np.flatnonzero((old >= P).any(axis=1)) if old.size else ()
        if len(bad):
            record.wipe(old)
            raise self._data_loss(rows[int(bad[0])])
        return old

    def _finish_refresh_chunk(self, s: Session, seed: bytes, chunk: list[tuple]) -> list[tuple]:
        """New sealed rows for one chunk: y + sum of every node's delta for this
        index; per group of one width, (rows, new - old) -- the check's input,
        taken from the very values sealed (the caller's job wipes it)."""
        groups: list[tuple] = []
        ring = self.sh.keys.kek
        try:
            for k, width, rows, calls, old in chunk:
                out: list[tuple] = []
                keys = [(r.tenant, r.subject) for r in rows]
                scratch = [old]  # opened at launch (_open_chunk)
                try:
                    deltas = [self._dealings.deltas(seed, s.session_id, keys, k, width, self.index,
                                                    frozenset(s.plan.new.values()))]
                    scratch.extend(deltas)
                    for name, call in calls.items():
                        try:
                            reply = call.result()
                        except grpc.RpcError as exc:
                            raise _peer_error(name, exc) from None
                        if len(reply.values) != 4 * width * len(keys):
                            raise status.Unavailable(f"Peer {name} dealt values of the wrong length.")
                        d = np.frombuffer(reply.values, dtype="<u4").astype(FIELD_DTYPE).reshape(len(keys), width)
                        if d.size and int(d.max()) >= P:
                            raise status.Unavailable(f"Peer {name} dealt values outside the field.")
                        deltas.append(d)
                        scratch.append(d)
                    new = proactive.add_rows(old, *deltas)
                    scratch.append(new)
                    # The tags are not refreshed but renewed under the new
                    # epoch's key (BGW degree reduction, vault.epoch_mac).
                    tags = self._renewed_tags(s, seed, k, width, keys, old, calls)
                    scratch.append(tags)
                    d = width - epoch_mac.TAG_COUNT
                    new[:, d:] = tags
                    diff = field.sub(new, old)
                    # The zero-sharing test covers the template part: the
                    # renewed tags are no zero-sharing's sum (the check's tag
                    # part covers them: _renewal_check).
                    diff[:, d:] = 0
                    groups.append((out, diff))
                    # add_rows reduces mod P; packed once for the whole group.
                    packed = new.astype("<u4")
                    scratch.append(packed)
                    stored_ms = now_ms()
                    for j, row in enumerate(rows):
                        sealed = envelope.seal(
                            ring, record.record_identity(row.tenant, row.subject, row.index, s.new_epoch),
                            packed[j].tobytes(),
                        )
                        out.append(storage.ShareRow(
                            row.tenant, row.subject, s.new_epoch, row.index, row.threshold, row.shareholders,
                            row.dimension, row.codec_version, row.mac_count, row.request_id, sealed.kek_version,
                            sealed.wrapped_dk, sealed.nonce, sealed.ciphertext, stored_ms))
                finally:
                    for call in calls.values():
                        call.cancel()
                    record.wipe(*scratch)
        except BaseException:
            record.wipe(*(diff for _, diff in groups), *(group[4] for group in chunk))
            raise
        return groups

    def _open(self, row: storage.ShareRow, width: int) -> np.ndarray:
        try:
            return record.unpack_values(self._open_bytes(row, 4 * width), width)
        except InvalidShares:
            raise self._data_loss(row) from None

    def _open_bytes(self, row: storage.ShareRow, size: int) -> bytes:
        """The row's opened share (``size`` bytes; the caller range-checks the values)."""
        try:
            if row.index != self.index:
                raise EnvelopeError("index")
            values = envelope.open(
                self.sh.keys.kek, record.record_identity(row.tenant, row.subject, row.index, row.epoch), row.sealed
            )
        except EnvelopeError:
            raise self._data_loss(row) from None
        if len(values) != size:
            raise self._data_loss(row)
        return values

    @staticmethod
    def _data_loss(row: storage.ShareRow) -> status.RpcError:
        return status.DataLoss(
            f"This node's stored share of subject {row.subject!r} (tenant {row.tenant!r}) does not open; "
            "repair the node before renewing its shares."
        )

    def _prepared_job(self, s: Session, items: list[storage.ShareRow], actor: str, check_old: bool, diff=None):
        def job(tx: Tx) -> int:
            try:
                return run(tx)
            finally:
                record.wipe(diff)

        def run(tx: Tx) -> int:
            db = tx.db
            cur = load_session(db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            kept = items
            if check_old and items:
                # A subject deleted meanwhile stays deleted (items are in key order).
                alive = db.live_ids_between(s.from_epoch, items[0].key, items[-1].key)
                kept = [item for item in items if (item.tenant, item.subject, item.request_id) in alive]
            db.insert_shares(kept)
            if diff is not None and kept:
                values = diff
                if len(kept) != len(items):
                    keep = {id(item) for item in kept}
                    values = diff[[i for i, item in enumerate(items) if id(item) in keep]]
                try:
                    _store_diff(db, self.sh.keys.kek, s.session_id, kept, values)
                finally:
                    record.wipe(values)
            if kept:
                tx.append("epoch_prepare_batch", actor=actor, request_id=s.session_id, details={
                    "kind": s.kind, "new_epoch": s.new_epoch, "records": len(kept),
                    "records_sha256": _key_lines(i.key for i in kept),
                })
            return len(kept)

        return job

    def _prepared_state_job(self, s: Session, actor: str, skipped: int = 0, check_complete: bool = True):
        def job(tx: Tx) -> Session:
            db = tx.db
            cur = load_session(db, s.session_id)
            if cur.state != BEGUN:
                return cur
            if check_complete:
                left = db.count_unprepared(s.from_epoch, s.new_epoch)
                if left:
                    raise status.Aborted(f"{left} record(s) are not prepared yet; run the step again.")
            prepared = db.count_epoch(s.new_epoch)
            if self.name in s.plan.new and s.new_epoch not in db.mac_keys():
                raise status.Aborted("This node's MAC key share of the new epoch is not dealt yet; run the step again.")
            db.update_session(s.session_id, now_ms(), state=PREPARED, skipped=skipped)
            tx.append("epoch_prepare", actor=actor, request_id=s.session_id, details={
                "kind": s.kind, "new_epoch": s.new_epoch, "prepared": prepared, "skipped": skipped,
            })
            return load_session(db, s.session_id)

        return job

    def _prepare_reshare(self, s: Session, request, context, actor: str):
        if self.name in s.plan.old:
            # The check's mask shares R_m, pulled from every old member and
            # sealed before this node deals or reports anything.
            self._old_mask(s, self._check_peers(s, request.peers, s.plan.old), actor)
        if self.name not in s.plan.new:
            # Leaving the committee: nothing else to prepare.
            final = self._commit(self._prepared_state_job(s, actor, check_complete=False))
            yield admin_pb2.PrepareSessionResponse(status=self._status(final))
            return
        peers = self._check_peers(s, request.peers, s.plan.old)
        self._remember_dialled(s, peers)
        by_index = {idx: name for name, idx in s.plan.old.items()}
        senders = [(x, by_index[x]) for x in s.plan.senders]
        missing = [name for _, name in senders if name not in peers]
        if missing:
            raise status.InvalidArgument(f"The request gives no address for sender(s) {', '.join(missing)}.")
        xs = [x for x, _ in senders]
        lead_name = senders[0][1]
        k_new, n_new = s.plan.new_threshold, len(s.plan.new)
        reader = storage.connect(self.cfg.store)
        try:
            done = reader.count_epoch(s.new_epoch)
            last = reader.last_key(s.new_epoch)
            skipped = s.skipped
            cursor = last or ("", "")
            yield admin_pb2.PrepareSessionResponse(done=done)
            self._reshare_key(s, senders, peers, actor)
            self._new_mask(s, senders, peers, xs, actor)
            ring = self.sh.keys.kek
            inflight: list = []
            more = True
            pace = _Pace(request.max_records_per_s)
            while more:
                if not context.is_active():
                    return
                pace.step(0)
                try:
                    page = self.peers.stub(lead_name, peers[lead_name][1]).GetReshareShares(
                        admin_pb2.GetReshareSharesRequest(
                            session_id=s.session_id, after_tenant=cursor[0], after_subject=cursor[1], limit=CHUNK,
                        ),
                        timeout=PEER_TIMEOUT_S,
                    )
                except grpc.RpcError as exc:
                    raise _peer_error(lead_name, exc) from None
                more = page.more
                if not page.items:
                    break
                keys = [admin_pb2.RecordKey(tenant=i.tenant, subject=i.subject) for i in page.items]
                calls = {
                    name: self.peers.stub(name, peers[name][1]).GetReshareShares.future(
                        admin_pb2.GetReshareSharesRequest(session_id=s.session_id, keys=keys), timeout=PEER_TIMEOUT_S)
                    for _, name in senders[1:]
                }
                answers = {lead_name: {(i.tenant, i.subject): i for i in page.items}}
                try:
                    for name, call in calls.items():
                        try:
                            answers[name] = {(i.tenant, i.subject): i for i in call.result().items}
                        except grpc.RpcError as exc:
                            raise _peer_error(name, exc) from None
                finally:
                    for call in calls.values():
                        call.cancel()
                cursor = (page.items[-1].tenant, page.items[-1].subject)
                pace.count += len(page.items)
                rows, chunk_skipped = self._reshare_rows(s, page.items, answers, senders, xs, k_new, n_new, ring)
                skipped += chunk_skipped
                for lo in range(0, len(rows), WRITE_CHUNK):
                    inflight.append(self.writer.submit(
                        self._prepared_job(s, rows[lo : lo + WRITE_CHUNK], actor, check_old=False)))
                while len(inflight) > 4:
                    done += self._settle(inflight.pop(0))
                    yield admin_pb2.PrepareSessionResponse(done=done)
            while inflight:
                done += self._settle(inflight.pop(0))
            final = self._commit(self._prepared_state_job(s, actor, skipped=skipped, check_complete=False))
            yield admin_pb2.PrepareSessionResponse(done=done, status=self._status(final))
        finally:
            reader.close()

    def _reshare_rows(self, s, lead_items, answers, senders, xs, k_new, n_new, ring) -> tuple[list[storage.ShareRow], int]:
        rows: list[storage.ShareRow] = []
        skipped = 0
        groups: dict[int, list] = {}
        for item in lead_items:
            key = (item.tenant, item.subject)
            parts = [answers[name].get(key) for _, name in senders]
            width = item.dimension + item.mac_count
            if any(
                p is None or p.dimension != item.dimension or p.mac_count != item.mac_count
                or p.codec_version != item.codec_version or p.request_id != item.request_id
                or p.threshold > len(senders) or len(p.values) != 4 * width
                for p in parts
            ):
                skipped += 1
                continue
            groups.setdefault(width, []).append((item, parts))
        stored_ms = now_ms()
        for width, entries in groups.items():
            stacked = np.empty((len(senders), len(entries), width), dtype=FIELD_DTYPE)
            try:
                for b, (_, parts) in enumerate(entries):
                    for a, p in enumerate(parts):
                        stacked[a, b] = record.unpack_values(p.values, width)
                new = proactive.combine(xs, stacked)
            except InvalidShares:
                raise status.Unavailable("A sender dealt values outside the field.") from None
            try:
                for b, (item, _) in enumerate(entries):
                    sealed = envelope.seal(
                        ring, record.record_identity(item.tenant, item.subject, self.index, s.new_epoch),
                        record.pack_values(new[b]),
                    )
                    rows.append(storage.ShareRow(
                        item.tenant, item.subject, s.new_epoch, self.index, k_new, n_new, item.dimension,
                        item.codec_version, item.mac_count, item.request_id, sealed.kek_version,
                        sealed.wrapped_dk, sealed.nonce, sealed.ciphertext, stored_ms))
            finally:
                record.wipe(stacked, new)
        return rows, skipped

    # --- peer RPCs -----------------------------------------------------------------

    def _peer_index(self, s: Session, context, committee: dict[str, int]) -> tuple[str, int]:
        who = caller(context)
        if who is None or who.name not in committee:
            raise status.PermissionDenied(
                f"Node {getattr(who, 'name', '?')} is not a member of session {s.session_id}'s committee."
            )
        return who.name, committee[who.name]

    def _check_peer_key(self, s: Session, peer: str, context) -> None:
        """A refresh answers a member only at the certificate key its committee
        pins for it (none pinned: by name, as before): a CA holder can mint a
        member's name, not its key."""
        if not s.plan.pins:
            return
        presented = presented_spki(context)
        pinned = s.plan.pins.get(peer, "")
        if pinned and presented == pinned:
            return

        def job(tx: Tx):
            tx.append("deny", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                "reason": "pin_mismatch" if pinned else "no_pin", "peer": peer, "rpc": "GetRefreshDeltas",
                "presented_spki_sha256": presented,
            })
        self._commit(job)
        logs.event(_log, "peer call refused: certificate key not pinned", logging.WARNING, peer=peer,
                   session=s.session_id)
        raise status.PermissionDenied(
            f"The certificate presented as node {peer} does not carry the key this node's committee pins for it.")

    def _check_pin(self, s: Session, peer: str, context) -> None:
        """A reshare deals only to the certificate key the approved plan pins
        for that member: a CA holder can mint the name, not the key."""
        presented = presented_spki(context)
        pinned = s.plan.pins.get(peer, "")
        if pinned and presented == pinned:
            return
        message = (f"The certificate presented as node {peer} is not the one session {s.session_id}'s approved "
                   "plan pins for it.")

        def job(tx: Tx):
            tx.append("reshare_refused", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                "to": peer, "reason": "pin_mismatch" if pinned else "no_pin", "presented_spki_sha256": presented,
            })
        self._commit(job)
        logs.event(_log, "reshare dealing refused", logging.WARNING, peer=peer, session=s.session_id)
        raise status.PermissionDenied(message)

    def GetRefreshDeltas(self, request, context):
        if request.mac_key:
            # Cheap and answered here (not in the worker pool), so that a node
            # dealing its key is never queued behind calls waiting for it.
            return self._key_deal(request, context)
        if request.renewal_mask or request.renewal_mask_renew or request.renewal_check_context:
            return self._background(self._renewal_peer_call, request, context)
        return self._background(self._get_refresh_deltas, request, context)

    def _get_refresh_deltas(self, request, context):
        s = self._session(request.session_id, states=(BEGUN, PREPARED, COMMITTED))
        if s.kind != REFRESH:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a refresh.")
        peer, x = self._peer_index(s, context, s.plan.new)
        self._check_peer_key(s, peer, context)
        if len(request.keys) > MAX_KEYS:
            raise status.InvalidArgument(f"At most {MAX_KEYS} records per call.")
        seed = self._seed(s)
        parts = []
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(request.keys):
            if not 2 <= key.threshold <= names.MAX_SHAREHOLDERS or not 1 <= key.width <= 70_000:
                raise status.InvalidArgument("A record key has an invalid threshold or width.")
            groups.setdefault((key.threshold, key.width), []).append(i)
        values = [None] * len(request.keys)
        renewal = [b""] * len(request.keys)
        for (k, width), positions in groups.items():
            keys = [(request.keys[i].tenant, request.keys[i].subject) for i in positions]
            deltas = self._dealings.deltas(seed, s.session_id, keys, k, width, x, frozenset(s.plan.new.values()))
            packed = deltas.astype("<u4")
            for j, i in enumerate(positions):
                values[i] = packed[j].tobytes()
            record.wipe(deltas, packed)
            if request.renew and self.index in self._renewers(s, k):
                g = self._renewal_values(s, seed, k, width, keys, None, x)
                for j, i in enumerate(positions):
                    renewal[i] = g[j].astype("<u4").tobytes()
                record.wipe(g)
        parts = b"".join(values)
        if request.mask_challenges:
            raise status.FailedPrecondition(
                "Check masks are bound to a check context; the calling node runs an older protocol. Upgrade it.")
        if request.check_challenges or request.check_context:
            if request.keys:
                raise status.InvalidArgument("A check request carries no record keys.")
            return self._check_deal(s, request, peer, x, seed)
        if request.keys:
            def job(tx: Tx):
                tx.append("refresh_deal", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                    "to": peer, "to_index": x, "records": len(request.keys), "masks": 0,
                    "records_sha256": _key_lines((k.tenant, k.subject) for k in request.keys),
                })
            self._commit(job)
        return admin_pb2.GetRefreshDeltasResponse(values=parts, renewal=b"".join(renewal))

    def _check_deal(self, s: Session, request, peer: str, x: int, seed: bytes):
        """A peer's part of the check: its contribution and record hashes (step 1),
        or its masks for one check context (step 2); only once prepared, when
        every delta this node dealt is already in its receivers' hands."""
        if s.state not in (PREPARED, COMMITTED):
            raise status.FailedPrecondition(
                f"Session {s.session_id} is {s.state} on node {self.name}; it takes part in the check once prepared.")
        reply = admin_pb2.GetRefreshDeltasResponse()
        if request.check_challenges:
            challenges = _challenges(request.check_challenges)
            reply.contribution = proactive.check_contribution(seed, s.session_id, challenges)
            reply.key_hashes = np.sort(self._held_keys(s)[1]).astype("<u8").tobytes()
            reply.renewal_contribution = epoch_mac.renewal_contribution(seed, s.session_id)
            details = {"to": peer, "to_index": x, "step": "contribution", "challenges": len(challenges)}
        else:
            count = int(request.check_count)
            if len(request.check_context) != 32 or not 1 <= count <= MAX_CHALLENGES:
                raise status.InvalidArgument("A check context is 32 bytes and covers 1 to 16 challenges.")
            if request.mask_threshold != s.plan.new_threshold:
                raise status.InvalidArgument(f"The session's threshold is {s.plan.new_threshold}.")
            masks = proactive.check_masks(seed, bytes(request.check_context), count, s.plan.new_threshold, x)
            reply.masks.extend(int(v) for v in masks)
            details = {"to": peer, "to_index": x, "step": "masks", "masks": count,
                       "context_sha256": hashlib.sha256(bytes(request.check_context)).hexdigest()}

        def job(tx: Tx):
            tx.append("refresh_check_deal", actor=f"shareholder/{peer}", request_id=s.session_id, details=details)
        self._commit(job)
        return reply

    def _held_keys(self, s: Session) -> tuple[list[tuple[str, str]], np.ndarray]:
        """The keys this node holds in the session's old epoch, in key order, and their hashes.

        Cached per session and row count: during a session nothing is
        enrolled, so a deletion is the only change, and it lowers the count.
        """
        db = self._conn()
        total = db.count_epoch(s.from_epoch)
        tag = (s.session_id, total)
        with self._seeds_lock:
            cached = self._keys_cache
        if cached is not None and cached[0] == tag:
            return cached[1], cached[2]
        keys = db.epoch_keys(s.from_epoch)
        hashes = proactive.key_hashes(keys)
        if len(keys) == total:
            with self._seeds_lock:
                self._keys_cache = (tag, keys, hashes)
        return keys, hashes

    def GetReshareShares(self, request, context):
        if request.check_mask_deal:
            # Cheap and answered here, so that a sender computing its mask
            # inside a peer's call is never queued behind that call.
            return self._mask_deal(request, context)
        if request.check_answer:
            return self._check_answer(request, context)
        return self._background(self._get_reshare_shares, request, context)

    def _get_reshare_shares(self, request, context):
        s = self._session(request.session_id, states=(BEGUN, PREPARED))
        if s.kind != RESHARE:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a reshare.")
        if self.index not in s.plan.senders or s.plan.old.get(self.name) != self.index:
            raise status.FailedPrecondition(f"Node {self.name} is not a sender of session {s.session_id}.")
        peer, x = self._peer_index(s, context, s.plan.new)
        self._check_pin(s, peer, context)
        db = self._conn()
        if request.mac_key:
            return self._reshare_key_deal(s, peer, x)
        if request.check_mask_reshare:
            return self._mask_reshare(s, peer, x)
        if request.keys:
            if len(request.keys) > MAX_KEYS:
                raise status.InvalidArgument(f"At most {MAX_KEYS} records per call.")
            rows = []
            for key in request.keys:
                r = db.share_row(key.tenant, key.subject, s.from_epoch)
                if r is not None:
                    rows.append(r)
            more = False
        else:
            limit = max(1, min(int(request.limit or CHUNK), MAX_KEYS))
            raw = db.rows_after(s.from_epoch, (request.after_tenant, request.after_subject), limit + 1)
            more = len(raw) > limit
            rows = raw[:limit]
        seed = self._seed(s)
        items = []
        by_width: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_width.setdefault(row.dimension + row.mac_count, []).append(i)
        values: list[bytes | None] = [None] * len(rows)
        for width, positions in by_width.items():
            shares = np.empty((len(positions), width), dtype=FIELD_DTYPE)
            dealt = None
            try:
                for j, i in enumerate(positions):
                    shares[j] = self._open(rows[i], width)
                keys = [(rows[i].tenant, rows[i].subject) for i in positions]
                dealt = proactive.reshare_values(seed, keys, shares, s.plan.new_threshold, x)
                for j, i in enumerate(positions):
                    values[i] = dealt[j].astype("<u4").tobytes()
            finally:
                record.wipe(shares, dealt)
        for row, v in zip(rows, values):
            items.append(admin_pb2.ReshareItem(
                tenant=row.tenant, subject=row.subject, dimension=row.dimension, codec_version=row.codec_version,
                mac_count=row.mac_count, request_id=row.request_id, threshold=row.threshold, values=v,
            ))
        if items:
            def job(tx: Tx):
                tx.append("reshare_deal", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                    "to": peer, "to_index": x, "records": len(items),
                    "records_sha256": _key_lines((i.tenant, i.subject) for i in items),
                })
            self._commit(job)
        return admin_pb2.GetReshareSharesResponse(items=items, more=more)

    # --- the reshare check (vault.proactive) -------------------------------------------

    def _load_mask(self, s: Session, which: str) -> np.ndarray | None:
        """This node's sealed check mask of the session (``which`` side), or None."""
        batch = self._conn().check_batch(s.session_id, ("", which), RESHARE_CHECK_MASKS)
        if batch is None:
            return None
        try:
            raw = envelope.open(self.sh.keys.kek, _mask_aad(s.session_id, which), batch.sealed)
            return record.unpack_values(raw, RESHARE_CHECK_MASKS)
        except (EnvelopeError, InvalidShares):
            raise status.DataLoss("This node's sealed reshare check mask does not open; abort the session.") from None

    def _seal_mask(self, s: Session, which: str, values: np.ndarray, actor: str, details: dict) -> np.ndarray:
        """Seal a check mask once: the first one sealed is the one used, even if
        a peer answered differently to a later computation."""
        sealed = envelope.seal(self.sh.keys.kek, _mask_aad(s.session_id, which), record.pack_values(values))

        def job(tx: Tx):
            cur = load_session(tx.db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            done = tx.db.put_check_batch_once(
                storage.CheckBatch(s.session_id, "", which, RESHARE_CHECK_MASKS, "[]", b"", sealed))
            if done:
                tx.append("reshare_check_mask", actor=actor, request_id=s.session_id,
                          details={"side": which.rsplit("-", 1)[-1], "slots": RESHARE_CHECK_MASKS, **details})

        try:
            self._commit(job)
        finally:
            record.wipe(values)
        return self._load_mask(s, which)

    def _old_mask(self, s: Session, peers=None, actor: str = "") -> np.ndarray:
        """R_m = sum_i rho_i(m) over every old member i (this one included),
        pulled node to node and sealed at prepare; a sender asked for its mask
        reshare before its own prepare computes it then, from its own peer table."""
        have = self._load_mask(s, _MASK_OLD)
        if have is not None:
            return have
        with self._mask_lock:
            have = self._load_mask(s, _MASK_OLD)
            if have is not None:
                return have
            if peers is None:
                peers = self._check_peers(s, [], s.plan.old)
            x = s.plan.old[self.name]
            missing = sorted(n for n in s.plan.old if n != self.name and n not in peers)
            if missing:
                raise status.FailedPrecondition(f"This node knows no address for old member(s) {', '.join(missing)}.")
            parts = [proactive.reshare_mask_deal(self._seed(s), s.session_id, RESHARE_CHECK_MASKS,
                                                 s.plan.old_threshold, x)]
            req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, check_mask_deal=True)
            calls = {n: self.peers.stub(n, peers[n][1]).GetReshareShares.future(req, timeout=PEER_TIMEOUT_S)
                     for n in s.plan.old if n != self.name}
            try:
                for name, call in calls.items():
                    try:
                        got = list(call.result().check_masks)
                    except grpc.RpcError as exc:
                        raise _peer_error(name, exc) from None
                    if len(got) != RESHARE_CHECK_MASKS or any(v >= P for v in got):
                        raise status.Unavailable(f"Peer {name} dealt a reshare check mask of the wrong shape.")
                    parts.append(np.asarray(got, dtype=FIELD_DTYPE))
                mask = proactive.add_rows(*parts)
            finally:
                for call in calls.values():
                    call.cancel()
                record.wipe(*parts)
            return self._seal_mask(s, _MASK_OLD, mask, actor or f"shareholder/{self.name}",
                                   {"from": sorted(s.plan.old)})

    def _new_mask(self, s: Session, senders, peers, xs, actor: str) -> None:
        """R'_j = sum_{i in S} lambda_i r_i(j): the senders' reshare of their mask
        shares, combined like a record and sealed before any record is prepared."""
        if self._load_mask(s, _MASK_NEW) is not None:
            return
        req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, check_mask_reshare=True)
        calls = {name: self.peers.stub(name, peers[name][1]).GetReshareShares.future(req, timeout=PEER_TIMEOUT_S)
                 for _, name in senders}
        stacked = np.empty((len(senders), 1, RESHARE_CHECK_MASKS), dtype=FIELD_DTYPE)
        try:
            for a, (_, name) in enumerate(senders):
                try:
                    got = list(calls[name].result().check_masks)
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                if len(got) != RESHARE_CHECK_MASKS or any(v >= P for v in got):
                    raise status.Unavailable(f"Sender {name} dealt a reshare check mask of the wrong shape.")
                stacked[a, 0] = got
            mask = proactive.combine(xs, stacked)[0]
        finally:
            for call in calls.values():
                call.cancel()
            record.wipe(stacked)
        self._seal_mask(s, _MASK_NEW, mask, actor, {"from": [name for _, name in senders]})

    def _mask_deal(self, request, context):
        s = self._session(request.session_id, states=(BEGUN, PREPARED))
        if s.kind != RESHARE or self.name not in s.plan.old:
            raise status.FailedPrecondition(f"Node {self.name} is not an old member of reshare {s.session_id}.")
        peer, x = self._peer_index(s, context, s.plan.old)
        pinned = s.plan.pins.get(peer) or self._current_pins().get(peer, "")
        if pinned and presented_spki(context) != pinned:
            self._check_pin(s, peer, context)  # refuses, with its audit entry
        values = proactive.reshare_mask_deal(self._seed(s), s.session_id, RESHARE_CHECK_MASKS,
                                             s.plan.old_threshold, x)

        def job(tx: Tx):
            tx.append("reshare_check_deal", actor=f"shareholder/{peer}", request_id=s.session_id,
                      details={"to": peer, "to_index": x, "step": "mask", "slots": RESHARE_CHECK_MASKS})
        self._commit(job)
        return admin_pb2.GetReshareSharesResponse(check_masks=[int(v) for v in values])

    def _mask_reshare(self, s: Session, peer: str, x: int):
        mask = self._old_mask(s)
        values = proactive.reshare_mask_values(self._seed(s), s.session_id, mask, s.plan.new_threshold, x)

        def job(tx: Tx):
            tx.append("reshare_check_deal", actor=f"shareholder/{peer}", request_id=s.session_id,
                      details={"to": peer, "to_index": x, "step": "mask_reshare", "slots": RESHARE_CHECK_MASKS})
        self._commit(job)
        try:
            return admin_pb2.GetReshareSharesResponse(check_masks=[int(v) for v in values])
        finally:
            record.wipe(mask, values)

    def CheckReshare(self, request, context):
        return self._background(self._check_reshare, request, context)

    def _check_reshare(self, request, context):
        actor = str(caller(context))
        s = self._session(request.session_id, states=(PREPARED,))
        if s.kind != RESHARE:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a reshare.")
        challenges = _challenges(request.challenges)
        if len(challenges) > RESHARE_CHECK_MASKS:
            raise status.InvalidArgument(f"The reshare check takes at most {RESHARE_CHECK_MASKS} challenges.")
        mine = proactive.check_contribution(self._seed(s), s.session_id, challenges)
        if not request.contributions:
            def deal(tx: Tx):
                tx.append("reshare_check_deal", actor=actor, request_id=s.session_id,
                          details={"step": "contribution", "challenges": len(challenges)})
            self._commit(deal)
            reply = admin_pb2.CheckReshareResponse(contribution=mine)
            for epoch, committee, field_name in ((s.from_epoch, s.plan.old, "old_key_hashes"),
                                                 (s.new_epoch, s.plan.new, "new_key_hashes")):
                if self.name in committee:
                    keys = self._conn().epoch_keys(epoch)
                    setattr(reply, field_name, np.sort(proactive.key_hashes(keys)).astype("<u8").tobytes())
            return reply
        members = sorted(set(s.plan.old) | set(s.plan.new))
        given = [(c.name, bytes(c.contribution)) for c in request.contributions]
        if [n for n, _ in given] != members or any(len(c) != proactive.CHALLENGE_BYTES for _, c in given):
            raise status.InvalidArgument(
                "The check needs one 16-byte contribution from every member of both committees, in name order.")
        if dict(given)[self.name] != mine:
            raise status.InvalidArgument("The contribution given for this node is not the one it made.")
        raw = bytes(request.exclude_key_hashes)
        if len(raw) % 8:
            raise status.InvalidArgument("The excluded key hashes are 8 bytes each.")
        exclude = set(np.frombuffer(raw, dtype="<u8").tolist())
        mixed = proactive.mixed_challenges(s.session_id, challenges, [c for _, c in given])
        covered = "reshare/" + hashlib.sha256(np.sort(np.frombuffer(raw, dtype="<u8")).tobytes()).hexdigest()
        ctx = proactive.check_context(s.session_id, s.plan.new_threshold, covered, mixed).hex()
        self._claim_reshare_context(s, actor, ctx)
        reply = admin_pb2.CheckReshareResponse(context_sha256=hashlib.sha256(bytes.fromhex(ctx)).hexdigest())
        for which, epoch, committee in ((_MASK_OLD, s.from_epoch, s.plan.old), (_MASK_NEW, s.new_epoch, s.plan.new)):
            if self.name not in committee:
                continue
            mask = self._load_mask(s, which)
            if mask is None:
                raise status.FailedPrecondition(f"This node holds no reshare check mask of session {s.session_id}.")
            totals, records, digest = self._reshare_totals(epoch, mixed, exclude)
            totals = [(a + b) % P for a, b in zip(totals, self._key_totals(epoch, mixed))]
            values = [(t + int(m)) % P for t, m in zip(totals, mask)]
            record.wipe(mask)
            if which == _MASK_OLD:
                reply.old_values.extend(values)
                reply.old_index, reply.old_records, reply.old_keys_sha256 = committee[self.name], records, digest
            else:
                reply.new_values.extend(values)
                reply.new_index, reply.new_records, reply.new_keys_sha256 = committee[self.name], records, digest

        def job(tx: Tx):
            # The answer itself is kept (masked values: what the auditor sees),
            # for the members that hold it against theirs before they commit.
            tx.append("reshare_check", actor=actor, request_id=s.session_id, details={
                "context_sha256": reply.context_sha256, "old_records": reply.old_records,
                "new_records": reply.new_records, "challenges": len(challenges),
                "old_index": reply.old_index, "new_index": reply.new_index,
                "old_values": list(reply.old_values), "new_values": list(reply.new_values),
                "old_keys_sha256": reply.old_keys_sha256, "new_keys_sha256": reply.new_keys_sha256})
        self._commit(job)
        return reply

    def _my_check_answer(self, s: Session) -> admin_pb2.CheckReshareResponse | None:
        found = self._conn().event_details(s.started_ms - CLAIM_CLOCK_SLACK_MS, "reshare_check", s.session_id)
        if not found:
            return None
        d = found[-1]
        return admin_pb2.CheckReshareResponse(
            context_sha256=d["context_sha256"], old_index=d["old_index"], new_index=d["new_index"],
            old_values=d["old_values"], new_values=d["new_values"], old_records=d["old_records"],
            new_records=d["new_records"], old_keys_sha256=d["old_keys_sha256"], new_keys_sha256=d["new_keys_sha256"])

    def _check_answer(self, request, context):
        s = self._session(request.session_id, states=(PREPARED, COMMITTED, FINALIZED))
        if s.kind != RESHARE:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a reshare.")
        self._peer_index(s, context, {**s.plan.old, **s.plan.new})
        mine = self._my_check_answer(s)
        return admin_pb2.GetReshareSharesResponse(check_answer=mine) if mine is not None \
            else admin_pb2.GetReshareSharesResponse()

    def _require_check(self, s: Session, actor: str) -> None:
        """A reshare commits on a node only once the node itself has seen the
        check pass: its own answer and every other member's (asked node to
        node) for one context, the sides consistent and equal at 0."""
        def refuse(reason: str):
            def job(tx: Tx):
                tx.append("reshare_commit_refused", actor=actor, request_id=s.session_id, details={"reason": reason})
            self._commit(job)
            logs.event(_log, "reshare commit refused", logging.WARNING, session=s.session_id, reason=reason)
            return status.FailedPrecondition(
                f"Session {s.session_id} has not passed the reshare check on node {self.name} ({reason}); "
                "run the check (vaultctl reshare) or roll it back.")

        mine = self._my_check_answer(s)
        if mine is None:
            raise refuse("this node answered no check")
        members = {**s.plan.old, **s.plan.new}
        peers = self._check_peers(s, [], members)
        answers = {self.name: mine}
        req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, check_answer=True)
        calls = {n: self.peers.stub(n, peers[n][1]).GetReshareShares.future(req, timeout=PEER_STATE_TIMEOUT_S)
                 for n in members if n != self.name and n in peers}
        missing = sorted(n for n in members if n != self.name and n not in peers)
        if missing:
            raise refuse(f"no address for {', '.join(missing)}")
        try:
            for name, call in calls.items():
                try:
                    reply = call.result()
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                if not reply.HasField("check_answer"):
                    raise refuse(f"{name} answered no check")
                answers[name] = reply.check_answer
        finally:
            for call in calls.values():
                call.cancel()
        if len({a.context_sha256 for a in answers.values()}) != 1:
            raise refuse("the members answered different checks")
        digests = {a.old_keys_sha256 for n, a in answers.items() if n in s.plan.old} | \
                  {a.new_keys_sha256 for n, a in answers.items() if n in s.plan.new}
        if len(digests) != 1:
            raise refuse("the members covered different records")
        old = {s.plan.old[n]: list(answers[n].old_values) for n in s.plan.old}
        new = {s.plan.new[n]: list(answers[n].new_values) for n in s.plan.new}
        counts = {len(v) for v in (*old.values(), *new.values())}
        if len(counts) != 1 or counts == {0}:
            raise refuse("the answers have different numbers of values")
        for c in range(counts.pop()):
            verdict = proactive.reshare_check(sorted(old), [old[x][c] for x in sorted(old)], s.plan.old_threshold,
                                              sorted(new), [new[x][c] for x in sorted(new)], s.plan.new_threshold)
            if verdict != "ok":
                raise refuse(verdict)

    def _claim_reshare_context(self, s: Session, actor: str, ctx: str) -> None:
        """The masks serve ONE check context: the first claimed is recorded in
        the audit log; the same again is answered (the same values), another is
        refused and the refusal logged. One writer transaction."""
        digest = hashlib.sha256(bytes.fromhex(ctx)).hexdigest()

        def job(tx: Tx):
            seen = {d.get("context_sha256") for d in tx.db.event_details(
                s.started_ms - CLAIM_CLOCK_SLACK_MS, "reshare_check_begin", s.session_id)}
            if seen and digest not in seen:
                tx.append("reshare_check_refused", actor=actor, request_id=s.session_id,
                          details={"reason": "second_context", "context_sha256": digest})
                return False
            tx.append("reshare_check_begin", actor=actor, request_id=s.session_id,
                      details={"context_sha256": digest, "repeat": bool(seen)})
            return True

        if not self._commit(job):
            logs.event(_log, "reshare check refused", session=s.session_id, reason="second_context", actor=actor)
            raise status.FailedPrecondition(
                f"This node has answered another reshare check in session {s.session_id}; its masks serve one check "
                "context. Roll the session back and run the reshare again.")

    def _reshare_totals(self, epoch: int, challenges: list[bytes], exclude: set[int]) -> tuple[list[int], int, str]:
        """sum over every record this node holds at ``epoch`` (but those whose key
        hash is in ``exclude``) of the challenges' combinations of its share (key
        order), the record count and the keys' digest."""
        totals = [0] * len(challenges)
        digest = _keys_digest([])
        records = 0
        after = ("", "")
        db = self._conn()
        while True:
            rows = db.rows_after(epoch, after, RESHARE_CHECK_PAGE)
            if not rows:
                break
            after = (rows[-1].tenant, rows[-1].subject)
            if exclude:
                hashes = proactive.key_hashes([(r.tenant, r.subject) for r in rows]).tolist()
                rows = [r for r, h in zip(rows, hashes) if h not in exclude]
            records += len(rows)
            for row in rows:
                digest.update(proactive.record_label(b"", row.tenant, row.subject))
            by_width: dict[int, list] = {}
            for row in rows:
                by_width.setdefault(row.dimension + row.mac_count, []).append(row)
            for width, group in by_width.items():
                shares = np.stack([self._open(row, width) for row in group])
                try:
                    part = proactive.check_combinations(challenges, [(r.tenant, r.subject) for r in group], shares)
                finally:
                    record.wipe(shares)
                totals = [(a + b) % P for a, b in zip(totals, part)]
        return totals, records, digest.hexdigest()

    def _key_totals(self, epoch: int, challenges: list[bytes]) -> list[int]:
        """The challenges' combinations of this node's share of ``epoch``'s MAC
        key, as L more records (keys ``("", "mac-key/l")``: no record's tenant
        is empty): a sender dealing wrong key values changes the new side's
        value at 0 as a wrong record does. Zero when the node holds no key of
        ``epoch`` (then the other side must hold none either, or the check fails)."""
        row = self._conn().mac_keys().get(epoch)
        if row is None:
            return [0] * len(challenges)
        try:
            key = self.sh.open_mac_key(row)
        except EnvelopeError:
            raise status.DataLoss("This node's sealed MAC key share does not open; abort the session.") from None
        try:
            return proactive.check_combinations(challenges, epoch_mac.key_check_keys(), key)
        finally:
            record.wipe(key)

    # --- MAC keys: dealt, renewed, reshared (vault.epoch_mac) --------------------------

    def _mac_width(self, sid: str, request) -> int:
        """The width of a refresh's new MAC key: the current key's (the
        auditor may name it, not change it), else the one asked for."""
        db = self._conn()
        existing = load_session(db, sid)
        if existing is not None:
            return existing.plan.mac_width
        current = db.mac_keys().get(int(request.from_epoch))
        asked = int(request.mac_key_width)
        if current is not None:
            if asked and asked != current.width:
                raise status.InvalidArgument(
                    f"The current MAC key has width {current.width}; a refresh renews it at that width.")
            return current.width
        if asked and not 1 <= asked <= 70_000:
            raise status.InvalidArgument("The MAC key width must be from 1 to 70000.")
        return asked or DEFAULT_MAC_WIDTH

    def _renewers(self, s: Session, k: int) -> tuple[int, ...]:
        # T: the 2k - 1 smallest indices of the committee.
        try:
            return epoch_mac.renewal_nodes(sorted(s.plan.new.values()), k)
        except InvalidShares as exc:
            raise status.FailedPrecondition(str(exc)) from None

    def _deal_new_key(self, s: Session, seed: bytes, peers, actor: str) -> None:
        """This node's share of the new epoch's key: the sum of every member's
        contribution beta_j(i), pulled node to node (pinned like deltas), sealed
        and stored before any record is prepared. Deterministic in the seeds,
        so a rerun after a crash deals the same share."""
        if self._conn().mac_keys().get(s.new_epoch) is not None:
            self._new_key(s)
            return
        k, width = s.plan.new_threshold, s.plan.mac_width
        if width < 1:
            raise status.FailedPrecondition(f"Session {s.session_id} names no MAC key width; start a new session.")
        parts = [epoch_mac.key_contribution(seed, s.new_epoch, k, width, self.index)]
        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, mac_key=True)
        calls = {name: self.peers.stub(name, addr).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                 for name, (_, addr) in peers.items() if name != self.name}
        key = None
        try:
            for name, call in calls.items():
                try:
                    reply = call.result()
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                if len(reply.renewal) != 4 * epoch_mac.TAG_COUNT * width:
                    raise status.Unavailable(f"Peer {name} dealt a MAC key contribution of the wrong length.")
                try:
                    part = record.unpack_values(reply.renewal, epoch_mac.TAG_COUNT * width)
                except InvalidShares:
                    raise status.Unavailable(f"Peer {name} dealt values outside the field.") from None
                parts.append(part.reshape(epoch_mac.TAG_COUNT, width))
            key = epoch_mac.key_share(parts)
            row = self.sh.seal_mac_key(s.new_epoch, k, key, s.session_id)
        finally:
            for call in calls.values():
                call.cancel()
            record.wipe(*parts)

        def job(tx: Tx):
            cur = load_session(tx.db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            tx.db.insert_mac_key(row, now_ms())
            tx.append("mac_key_dealt", actor=actor, request_id=s.session_id, details={
                "kind": s.kind, "epoch": s.new_epoch, "width": width, "threshold": k,
                "from": sorted(set(peers) | {self.name}),
            })

        try:
            self._commit(job)
        finally:
            record.wipe(key)
        self._new_key(s)

    def _new_key(self, s: Session) -> np.ndarray:
        """This node's share of the session's new key, (L, width). When a peer
        needs it before this node's own prepare dealt it, the node deals it now
        if its peer table names every member (it never dials an address a
        caller gives); otherwise it waits (up to KEY_WAIT_S) for its prepare."""
        if (s.session_id not in self._new_keys and self._conn().mac_keys().get(s.new_epoch) is None
                and self.name in s.plan.new):
            peers = self._check_peers(s, [], s.plan.new)
            if set(s.plan.new) <= set(peers) | {self.name}:
                with self._deal_lock:
                    if self._conn().mac_keys().get(s.new_epoch) is None:
                        self._deal_new_key(s, self._seed(s), peers, s.actor)
        deadline = time.monotonic() + KEY_WAIT_S
        with self._key_cond:
            while True:
                key = self._new_keys.get(s.session_id)
                if key is not None:
                    return key
                row = self._conn().mac_keys().get(s.new_epoch)
                if row is not None:
                    try:
                        key = self.sh.open_mac_key(row)
                    except EnvelopeError:
                        raise status.DataLoss("This node's sealed MAC key share does not open.") from None
                    self._new_keys[s.session_id] = key
                    self._key_cond.notify_all()
                    return key
                left = deadline - time.monotonic()
                if left <= 0:
                    raise status.Unavailable(
                        f"Node {self.name} has not dealt its MAC key share of epoch {s.new_epoch} yet; "
                        "run the prepare step on every node.")
                self._key_cond.wait(min(left, 0.5))

    def _old_key(self, s: Session) -> np.ndarray:
        row = self._conn().mac_keys().get(s.from_epoch)
        if row is None:
            raise status.FailedPrecondition(
                f"Node {self.name} holds no MAC key share of epoch {s.from_epoch}; it cannot renew tags.")
        try:
            return self.sh.open_mac_key(row)
        except EnvelopeError:
            raise status.DataLoss("This node's sealed MAC key share does not open.") from None

    def _key_deal(self, request, context):
        """A peer's pull of this node's key contribution beta(x) for the new epoch."""
        s = self._session(request.session_id, states=(BEGUN, PREPARED, COMMITTED))
        if s.kind != REFRESH:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a refresh.")
        peer, x = self._peer_index(s, context, s.plan.new)
        self._check_peer_key(s, peer, context)
        if request.keys or request.check_challenges or request.check_context:
            raise status.InvalidArgument("A MAC key request carries no record keys and no check.")
        if s.plan.mac_width < 1:
            raise status.FailedPrecondition(f"Session {s.session_id} names no MAC key width.")
        beta = epoch_mac.key_contribution(self._seed(s), s.new_epoch, s.plan.new_threshold, s.plan.mac_width, x)
        try:
            values = beta.astype("<u4").tobytes()
        finally:
            record.wipe(beta)

        def job(tx: Tx):
            tx.append("mac_key_deal", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                "to": peer, "to_index": x, "epoch": s.new_epoch, "width": s.plan.mac_width})
        self._commit(job)
        return admin_pb2.GetRefreshDeltasResponse(renewal=values)

    def _open_rows(self, s: Session, keys: list[tuple[str, str]], width: int) -> np.ndarray:
        """This node's old-epoch shares of ``keys`` (B, width); zeros for a record
        it no longer holds (deleted meanwhile: its renewal is never used)."""
        lo, hi = min(keys), max(keys)
        rows = {r.key: r for r in self._conn().rows_between(s.from_epoch, lo, hi)}
        out = np.zeros((len(keys), width), dtype=FIELD_DTYPE)
        for j, key in enumerate(keys):
            row = rows.get(key)
            if row is None:
                continue
            if row.dimension + row.mac_count != width:
                raise status.InvalidArgument(
                    f"A record key's width ({width}) is not that of the record this node holds for it.")
            values = np.frombuffer(self._open_bytes(row, 4 * width), dtype="<u4")
            if values.size and int(values.max()) >= P:
                raise self._data_loss(row)
            out[j] = values
        return out

    def _renewal_values(self, s: Session, seed: bytes, k: int, width: int, keys, old: np.ndarray | None,
                        x: int) -> np.ndarray:
        """g_j(x) of this node's product values h_j = [t]_j + <[b']_j - [b]_j, [s]_j>
        for each record (B, L). Computed once per chunk for every member (one
        coefficient derivation), for this node's own prepare and its peers'
        calls alike; ``old`` is this node's opened old shares when it has them."""
        tag = (s.session_id, width, _key_lines(keys))
        members = tuple(sorted(s.plan.new.values()))
        with self._seeds_lock:
            cached = self._products_cache.get(tag)
            if cached is not None:
                return cached[members.index(x)].copy()
            busy = self._computing.get(tag)
            if busy is None:
                self._computing[tag] = threading.Event()
        if busy is not None:
            # Another call computes this chunk's values: wait for it rather than open the rows again.
            busy.wait(PEER_TIMEOUT_S)
            with self._seeds_lock:
                cached = self._products_cache.get(tag)
                if cached is not None:
                    return cached[members.index(x)].copy()
            return self._renewal_values(s, seed, k, width, keys, old, x)
        try:
            return self._compute_renewal(s, seed, k, width, keys, old, x, tag, members)
        finally:
            with self._seeds_lock:
                self._computing.pop(tag).set()

    def _compute_renewal(self, s: Session, seed: bytes, k: int, width: int, keys, old, x: int, tag, members):
        d = width - epoch_mac.TAG_COUNT
        opened = old if old is not None else self._open_rows(s, keys, width)
        old_key = self._old_key(s)
        new_key = self._new_key(s)
        cuts = [np.array(old_key[:, :d], order="C", copy=True), np.array(new_key[:, :d], order="C", copy=True)]
        h = None
        try:
            h = epoch_mac.product_share(opened, cuts[0], cuts[1])
            values = epoch_mac.renewal_values_at(seed, keys, s.new_epoch, k, h, members)
        finally:
            record.wipe(old_key, h, *cuts)
            if old is None:
                record.wipe(opened)
        with self._seeds_lock:
            while len(self._products_cache) >= PRODUCT_CACHE:
                record.wipe(self._products_cache.pop(next(iter(self._products_cache))))
            self._products_cache[tag] = values
            return values[members.index(x)].copy()

    def _renewed_tags(self, s: Session, seed: bytes, k: int, width: int, keys, old: np.ndarray, calls) -> np.ndarray:
        """This node's new tag shares (B, L): sum over T of lambda_j g_j(i)."""
        renewers = self._renewers(s, k)
        by_index = {idx: name for name, idx in s.plan.new.items()}
        count = len(keys) * epoch_mac.TAG_COUNT
        values = np.empty((len(renewers), len(keys), epoch_mac.TAG_COUNT), dtype=FIELD_DTYPE)
        try:
            for a, x in enumerate(renewers):
                if x == self.index:
                    g = self._renewal_values(s, seed, k, width, keys, old, self.index)
                    values[a] = g
                    record.wipe(g)
                    continue
                name = by_index[x]
                try:
                    reply = calls[name].result()
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                if len(reply.renewal) != 4 * count:
                    raise status.Unavailable(f"Peer {name} dealt renewal values of the wrong length.")
                try:
                    g = record.unpack_values(reply.renewal, count)
                except InvalidShares:
                    raise status.Unavailable(f"Peer {name} dealt values outside the field.") from None
                values[a] = g.reshape(len(keys), epoch_mac.TAG_COUNT)
                record.wipe(g)
            return epoch_mac.renewed_tags(renewers, values, k)
        finally:
            record.wipe(values)

    def _reshare_key(self, s: Session, senders, peers, actor: str) -> None:
        """A new member's share of the key, reshared by the senders (the key
        itself is unchanged; the next refresh renews it)."""
        if self._conn().mac_keys().get(s.new_epoch) is not None:
            return
        req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, mac_key=True)
        calls = {name: self.peers.stub(name, peers[name][1]).GetReshareShares.future(req, timeout=PEER_TIMEOUT_S)
                 for _, name in senders}
        parts, width = [], None
        key = None
        try:
            for _, name in senders:
                try:
                    reply = calls[name].result()
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                w = int(reply.mac_key_width)
                if width is None:
                    width = w
                if w != width or w < 1 or len(reply.mac_key_values) != 4 * epoch_mac.TAG_COUNT * w:
                    raise status.Unavailable(f"Sender {name} dealt a MAC key share of the wrong width.")
                try:
                    part = record.unpack_values(reply.mac_key_values, epoch_mac.TAG_COUNT * w)
                except InvalidShares:
                    raise status.Unavailable(f"Sender {name} dealt values outside the field.") from None
                parts.append(part.reshape(epoch_mac.TAG_COUNT, w))
            key = proactive.combine([x for x, _ in senders], np.stack(parts))
            row = self.sh.seal_mac_key(s.new_epoch, s.plan.new_threshold, key, s.session_id)
        finally:
            for call in calls.values():
                call.cancel()
            record.wipe(key, *parts)

        def job(tx: Tx):
            cur = load_session(tx.db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            tx.db.insert_mac_key(row, now_ms())
            tx.append("mac_key_dealt", actor=actor, request_id=s.session_id, details={
                "kind": s.kind, "epoch": s.new_epoch, "width": width, "threshold": s.plan.new_threshold,
                "from": [name for _, name in senders]})
        self._commit(job)

    def _reshare_key_deal(self, s: Session, peer: str, x: int):
        """A sender's re-sharing of its key share for new member x."""
        row = self._conn().mac_keys().get(s.from_epoch)
        if row is None:
            raise status.FailedPrecondition(f"Node {self.name} holds no MAC key share of epoch {s.from_epoch}.")
        try:
            key = self.sh.open_mac_key(row)
        except EnvelopeError:
            raise status.DataLoss("This node's sealed MAC key share does not open.") from None
        dealt = None
        try:
            dealt = epoch_mac.reshare_key_values(self._seed(s), s.from_epoch, key, s.plan.new_threshold, x)
            values = dealt.astype("<u4").tobytes()
        finally:
            record.wipe(key, dealt)

        def job(tx: Tx):
            tx.append("reshare_key_deal", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                "to": peer, "to_index": x, "epoch": s.from_epoch, "width": row.width})
        self._commit(job)
        return admin_pb2.GetReshareSharesResponse(mac_key_values=values, mac_key_width=row.width)

    # --- the first MAC key: a joint dealing at the current epoch ---------------------

    def _keygen(self, actor: str, width: int) -> tuple[str, int, int, int, bytes]:
        """(session id, epoch, width, threshold, seed) of this node's first-key
        dealing, begun now if needed: a ``keygen`` session holding the sealed
        seed (so a rerun, or a peer asking again, gets the same contribution)."""
        members, k, _ = self._current_committee()
        if not members or k < 2:
            raise status.FailedPrecondition(
                f"Node {self.name} has no committee recorded or configured ([committee]); it cannot deal a MAC key.")
        if len(members) < 2 * k - 1:
            raise status.FailedPrecondition(
                f"A committee of {len(members)} nodes with threshold {k} cannot renew the MAC keys at a refresh "
                f"(that needs at least 2k - 1 = {2 * k - 1} nodes).")
        ring = self.sh.keys.kek

        def job(tx: Tx):
            db = tx.db
            epoch = db.node_state().current_epoch
            current = db.open_session()
            if current is not None and current.kind == KEYGEN:
                plan = current.plan
                if width and plan["width"] != width:
                    raise status.InvalidArgument(f"The first MAC key is being dealt at width {plan['width']}.")
                return current.session_id, plan
            if epoch in db.mac_keys():
                return None, None
            if current is not None:
                raise status.FailedPrecondition(
                    f"Another maintenance session is open on this node: {_describe(current)}; finish it first.")
            if not width:
                raise status.FailedPrecondition(f"Node {self.name} has not begun dealing its first MAC key.")
            sid = f"keygen-{epoch}-{os.urandom(6).hex()}"
            plan = {"epoch": epoch, "width": width, "threshold": k, "committee": members}
            seed = proactive.new_seed()
            sealed = envelope.seal(ring, _seed_aad(self.name, sid), seed)
            now = now_ms()
            db.begin_session(sid, KEYGEN, actor, plan, BEGUN, now, epoch=epoch, seed=sealed)
            tx.append("maintenance_begin", actor=actor, request_id=sid, details={
                "kind": KEYGEN, "epoch": epoch, "width": width, "threshold": k,
                "committee": [f"{n}={i}" for n, i in sorted(members.items(), key=lambda x: x[1])]})
            return sid, plan

        sid, plan = self._commit(job)
        if sid is None:
            return "", self._conn().node_state().current_epoch, 0, k, b""
        keygen = self._conn().get_session(sid)
        try:
            seed = envelope.open(ring, _seed_aad(self.name, sid), keygen.sealed_seed)
        except (EnvelopeError, TypeError):
            raise status.DataLoss("This node's sealed key-dealing seed does not open.") from None
        return sid, int(plan["epoch"]), int(plan["width"]), int(plan["threshold"]), seed

    def DealFirstMacKey(self, request, context):
        actor = str(caller(context))
        width = int(request.width)
        if width and not 1 <= width <= 70_000:
            raise status.InvalidArgument("The MAC key width must be from 1 to 70000.")
        if request.finish:
            return self._finish_keygen(actor)
        sid, epoch, width, k, seed = self._keygen(actor, width or DEFAULT_MAC_WIDTH)
        if not sid:
            row = self._conn().mac_keys().get(epoch)
            return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=row.width if row else 0, already=True)
        if self._conn().mac_keys().get(epoch) is not None:
            return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=width, already=True)
        members = self._current_committee()[0]
        probe = dataclasses.replace(_KEYGEN_SESSION, session_id=sid, actor=actor)
        peers = self._check_peers(probe, request.peers, members)
        missing = sorted(set(members) - set(peers) - {self.name})
        if missing:
            raise status.InvalidArgument(f"The request gives no address for {', '.join(missing)}.")
        parts = [epoch_mac.key_contribution(seed, epoch, k, width, self.index)]
        req = admin_pb2.GetMacKeyContributionRequest(epoch=epoch, width=width)
        calls = {name: self.peers.stub(name, addr).GetMacKeyContribution.future(req, timeout=PEER_TIMEOUT_S)
                 for name, (_, addr) in peers.items() if name != self.name}
        key = None
        try:
            for name, call in calls.items():
                try:
                    reply = call.result()
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                try:
                    part = record.unpack_values(reply.values, epoch_mac.TAG_COUNT * width)
                except InvalidShares:
                    raise status.Unavailable(f"Peer {name} dealt a MAC key contribution that is not L x width field "
                                             "elements.") from None
                parts.append(part.reshape(epoch_mac.TAG_COUNT, width))
            key = epoch_mac.key_share(parts)
            row = self.sh.seal_mac_key(epoch, k, key, sid)
        finally:
            for call in calls.values():
                call.cancel()
            record.wipe(key, *parts)

        def job(tx: Tx):
            if tx.db.node_state().current_epoch != epoch:
                raise status.FailedPrecondition("The node's epoch moved on while its first MAC key was dealt.")
            tx.db.insert_mac_key(row, now_ms())
            tx.append("mac_key_dealt", actor=actor, request_id=sid, details={
                "kind": KEYGEN, "epoch": epoch, "width": width, "threshold": k, "from": sorted(members)})
        self._commit(job)
        return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=width)

    def _finish_keygen(self, actor: str):
        def job(tx: Tx):
            db = tx.db
            current = db.open_session()
            epoch = db.node_state().current_epoch
            key = db.mac_keys().get(epoch)
            if current is None or current.kind != KEYGEN:
                return epoch, getattr(key, "width", 0), False
            if key is None:
                raise status.FailedPrecondition(
                    f"Node {self.name} holds no MAC key share yet; deal it on every node before finishing.")
            db.drop_seed(current.session_id)
            db.update_session(current.session_id, now_ms(), state=FINALIZED)
            tx.append("maintenance_finalize", actor=actor, request_id=current.session_id, details={
                "kind": KEYGEN, "epoch": epoch, "width": key.width})
            return epoch, key.width, True

        epoch, width, finished = self._commit(job)
        return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=width, already=not finished, finished=finished)

    def GetMacKeyContribution(self, request, context):
        who = caller(context)
        members = self._current_committee()[0]
        if who is None or who.name not in members or who.name == self.name:
            raise status.PermissionDenied(f"Node {getattr(who, 'name', '?')} is not a member of this node's committee.")
        peer, x = who.name, members[who.name]
        pins = self._current_pins()
        if pins:
            self._check_peer_key(dataclasses.replace(_KEYGEN_SESSION, plan=Plan({}, {}, 2, 2, (), pins=pins)),
                                 peer, context)
        if not 1 <= request.width <= 70_000:
            raise status.InvalidArgument("The MAC key width must be from 1 to 70000.")
        sid, epoch, width, k, seed = self._keygen(f"shareholder/{peer}", int(request.width))
        if not sid:
            raise status.FailedPrecondition(
                f"Node {self.name} has finished dealing its first MAC key (or holds one already); nothing to give.")
        if request.epoch != epoch or request.width != width:
            raise status.FailedPrecondition(
                f"Node {self.name} deals its first MAC key at epoch {epoch}, width {width}.")
        beta = epoch_mac.key_contribution(seed, epoch, k, width, x)
        try:
            values = beta.astype("<u4").tobytes()
        finally:
            record.wipe(beta)

        def job(tx: Tx):
            tx.append("mac_key_deal", actor=f"shareholder/{peer}", request_id=sid, details={
                "to": peer, "to_index": x, "epoch": epoch, "width": width})
        self._commit(job)
        return admin_pb2.GetMacKeyContributionResponse(values=values)

    # --- check ---------------------------------------------------------------------

    def CheckRefresh(self, request, context):
        return self._background(self._check_refresh, request, context)

    def _check_refresh(self, request, context):
        # Why this reveals nothing however it is called: vault.proactive (the
        # check). In short: the node decides the records covered (those every
        # member holds), mixes the auditor's challenges with every node's
        # contribution, binds the masks to the whole check context and never
        # answers a challenge twice in a session (claims kept in the audit log).
        actor = str(caller(context))
        s = self._session(request.session_id, states=(PREPARED, COMMITTED))
        if s.kind != REFRESH:
            raise status.FailedPrecondition("The check applies to a refresh session.")
        challenges = _challenges(request.challenges)
        if request.exclude:
            self._refuse_check(s, actor, "exclude", len(challenges))
            raise status.InvalidArgument(
                "The nodes decide which records the check covers (those every member holds); a request may not "
                "exclude records.")
        peers = self._check_peers(s, request.peers, s.plan.new)
        self._remember_dialled(s, peers)
        missing = sorted(set(s.plan.new) - set(peers) - {self.name})
        if missing:
            raise status.InvalidArgument(f"The request gives no address for {', '.join(missing)}.")
        call_no = self._claim_challenges(s, actor, challenges)
        k = s.plan.new_threshold
        seed = self._seed(s)
        others = {name: idx_addr for name, idx_addr in peers.items() if name != self.name}

        def ask(req) -> dict[str, admin_pb2.GetRefreshDeltasResponse]:
            calls = {name: self.peers.stub(name, addr).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                     for name, (_, addr) in others.items()}
            try:
                out = {}
                for name, call in calls.items():
                    try:
                        out[name] = call.result()
                    except grpc.RpcError as exc:
                        raise _peer_error(name, exc) from None
                return out
            finally:
                for call in calls.values():
                    call.cancel()

        # Step 1: every node's contribution and the records every member holds.
        replies = ask(admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, check_challenges=challenges))
        keys, hashes = self._held_keys(s)
        held_by_all = np.ones(len(keys), dtype=bool)
        contributions = {self.index: proactive.check_contribution(seed, s.session_id, challenges)}
        renewal_contributions = {self.index: epoch_mac.renewal_contribution(seed, s.session_id)}
        for name, reply in replies.items():
            if len(reply.contribution) != proactive.CHALLENGE_BYTES or len(reply.key_hashes) % 8:
                raise status.Unavailable(f"Peer {name} answered the check with malformed values.")
            if len(reply.renewal_contribution) != epoch_mac.CONTRIBUTION_BYTES:
                raise status.Unavailable(f"Peer {name} gave no renewal check contribution; it runs an older protocol.")
            held_by_all &= np.isin(hashes, np.frombuffer(reply.key_hashes, dtype="<u8"), assume_unique=False)
            contributions[others[name][0]] = bytes(reply.contribution)
            renewal_contributions[others[name][0]] = bytes(reply.renewal_contribution)
        covered = [keys[i] for i in np.flatnonzero(held_by_all)]
        left_out = len(keys) - len(covered)
        mixed = proactive.mixed_challenges(s.session_id, challenges, [contributions[i] for i in sorted(contributions)])
        totals, count, digest = self._check_totals(s, mixed, covered)
        # Step 2: the masks, bound to this check's context.
        check_ctx = proactive.check_context(s.session_id, k, digest, mixed)
        masks = [int(v) for v in proactive.check_masks(seed, check_ctx, len(mixed), k, self.index)]
        replies = ask(admin_pb2.GetRefreshDeltasRequest(
            session_id=s.session_id, check_context=check_ctx, check_count=len(mixed), mask_threshold=k))
        for name, reply in replies.items():
            if len(reply.masks) != len(mixed) or any(v >= P for v in reply.masks):
                raise status.Unavailable(f"Peer {name} dealt malformed check masks.")
            masks = [(m + int(v)) % P for m, v in zip(masks, reply.masks)]
        values = [(t + m) % P for t, m in zip(totals, masks)]
        context_hex = hashlib.sha256(check_ctx).hexdigest()
        # The tag part: the renewed tags against the new key (vault.epoch_mac).
        renewal_values, renewal_hex = self._renewal_check(s, actor, covered, digest, renewal_contributions, others)

        def job(tx: Tx):
            tx.append("refresh_check", actor=actor, request_id=s.session_id, details={
                "records": count, "challenges": len(challenges), "excluded": left_out, "call": call_no,
                "context_sha256": context_hex, "renewal_context_sha256": renewal_hex,
                "renewal_answered": bool(renewal_values),
            })
        self._commit(job)
        CHECKS.labels(self.name, "answered").inc()
        logs.event(_log, "refresh check answered", session=s.session_id, call=call_no, records=count,
                   excluded=left_out)
        return admin_pb2.CheckRefreshResponse(values=values, records=count, keys_sha256=digest,
                                              context_sha256=context_hex, excluded=left_out, call=call_no,
                                              renewal_values=renewal_values, renewal_context_sha256=renewal_hex)

    def _refuse_check(self, s: Session, actor: str, reason: str, challenges: int) -> None:
        def job(tx: Tx):
            tx.append("refresh_check_refused", actor=actor, request_id=s.session_id,
                      details={"reason": reason, "challenges": challenges})
        self._commit(job)
        CHECKS.labels(self.name, "refused").inc()
        logs.event(_log, "refresh check refused", session=s.session_id, reason=reason, actor=actor)

    def _claim_challenges(self, s: Session, actor: str, challenges: list[bytes]) -> int:
        """Record the challenges as answered (before anything is computed) and
        return the call's number; a challenge claimed before is refused, and
        the refusal is an audit entry too. One writer transaction: two calls
        racing with the same challenge cannot both pass."""
        wanted = [c.hex() for c in challenges]

        def job(tx: Tx):
            claimed: set[str] = set()
            calls = 0
            for details in tx.db.event_details(s.started_ms - CLAIM_CLOCK_SLACK_MS, "refresh_check_begin",
                                               s.session_id):
                claimed.update(details.get("challenges", []))
                calls += 1
            repeated = sorted(set(wanted) & claimed)
            if repeated:
                tx.append("refresh_check_refused", actor=actor, request_id=s.session_id, details={
                    "reason": "repeated_challenge", "challenges": len(wanted), "repeated": len(repeated),
                })
                return None
            tx.append("refresh_check_begin", actor=actor, request_id=s.session_id, details={
                "call": calls + 1, "challenges": wanted,
            })
            return calls + 1

        call_no = self._commit(job)
        if call_no is None:
            CHECKS.labels(self.name, "refused").inc()
            logs.event(_log, "refresh check refused", session=s.session_id, reason="repeated_challenge", actor=actor)
            raise status.FailedPrecondition(
                f"This node has already answered one of these challenges in session {s.session_id}; a challenge is "
                "answered once. Draw fresh ones.")
        return call_no

    def _check_totals(self, s: Session, challenges: list[bytes], covered: list[tuple[str, str]]) -> tuple[list[int], int, str]:
        """The challenge combinations of (new - old) over exactly the covered
        records, the count and the digest of the covered keys.

        The values come from the batches of new-minus-old sealed when the
        records were prepared, computed from the very arrays sealed into the
        new rows (one open per batch instead of two per record); each new row
        must still be exactly the one prepared (its fingerprint), so a share
        damaged or replaced since fails the check (DATA_LOSS)."""
        totals = [0] * len(challenges)
        wanted = set(covered)
        found = 0
        ring = self.sh.keys.kek
        reader = storage.connect(self.cfg.store)
        try:
            reader.tune_for_scan(CHECK_MMAP_BYTES)
            for batch in reader.check_batches(s.session_id, records_only=True):
                width, keys_json, prints = batch.width, batch.keys_json, batch.fingerprints
                keys = [tuple(k) for k in json.loads(keys_json)]
                try:
                    data = envelope.open(ring, _diff_aad(s.session_id, (batch.first_tenant, batch.first_subject),
                                                         width, keys_json, prints), batch.sealed)
                except EnvelopeError:
                    raise status.DataLoss(
                        "This node's sealed check values do not open; abort the session and refresh again.") from None
                if len(data) != 4 * width * len(keys) or len(prints) != 16 * len(keys):
                    raise status.DataLoss("This node's sealed check values have the wrong length.")
                diff = np.frombuffer(bytearray(data), dtype="<u4").reshape(len(keys), width)
                try:
                    if diff.size and int(diff.max()) >= P:
                        raise status.DataLoss("This node's sealed check values hold values outside the field.")
                    rows = [i for i, k in enumerate(keys) if k in wanted]
                    if not rows:
                        continue
                    self._check_fingerprints(reader, s, keys, rows, prints)
                    if len(rows) != len(keys):  # deleted since, or held by some members only
                        diff = diff[rows]
                    for c, v in enumerate(proactive.check_combinations(challenges, [keys[i] for i in rows], diff)):
                        totals[c] = (totals[c] + v) % P
                    found += len(rows)
                finally:
                    record.wipe(diff)
        finally:
            reader.close()
        if found != len(covered):
            raise status.FailedPrecondition(
                f"{len(covered) - found} record(s) of this node have no prepared check values in session "
                f"{s.session_id}; abort the session and refresh again.")
        digest = hashlib.sha256()
        for tenant, subject in covered:
            digest.update(proactive.record_label(b"", tenant, subject))
        return totals, found, digest.hexdigest()

    def _check_fingerprints(self, reader, s: Session, keys: list, rows: list[int], prints: bytes) -> None:
        """DATA_LOSS unless each of these records' new rows is the one prepared."""
        lo, hi = keys[rows[0]], keys[rows[-1]]
        stored = {key: _row_fingerprint(sealed.wrapped_dk, sealed.nonce, sealed.ciphertext)
                  for key, sealed in reader.sealed_between(s.new_epoch, lo, hi).items()}
        for i in rows:
            if stored.get(keys[i]) != prints[16 * i : 16 * i + 16]:
                raise status.DataLoss(
                    f"The prepared share of subject {keys[i][1]!r} (tenant {keys[i][0]!r}) on this node changed "
                    "after it was prepared; the refresh cannot be trusted. Abort it and repair the node.")

    # --- the renewal check (the refresh check's tag part) ----------------------------
    # Math and why it reveals nothing: vault.epoch_mac, "the renewal check". At
    # prepare (after the new key share, before any record) every node seals its
    # mask shares rho(i) (C x W, pulled from every member) and their renewed tags
    # t'_rho(i) (C x L, from the 2k - 1 renewers). In CheckRefresh it reports
    # u(i) over the covered records' new rows (round A, kept for the peers), takes
    # every member's u node to node, opens u and answers w(i) (round B). The
    # masks serve one context per session (claimed in the audit log).

    def _load_check_values(self, s: Session, which: str, size: int) -> np.ndarray | None:
        """This node's sealed renewal check values ``which`` (``size`` elements), or None."""
        batch = self._conn().check_batch(s.session_id, ("", which), size)
        if batch is None:
            return None
        try:
            raw = envelope.open(self.sh.keys.kek, _diff_aad(s.session_id, ("", which), size, "[]", b""),
                                batch.sealed)
            return record.unpack_values(raw, size)
        except (EnvelopeError, InvalidShares):
            raise status.DataLoss("This node's sealed renewal check values do not open; abort the session.") from None

    def _seal_check_values(self, s: Session, which: str, values: np.ndarray, actor: str, details: dict) -> np.ndarray:
        """Seal renewal check values once (the first sealed is the one used) and load them back."""
        flat = np.ascontiguousarray(values).reshape(-1)
        size = int(flat.size)
        sealed = envelope.seal(self.sh.keys.kek, _diff_aad(s.session_id, ("", which), size, "[]", b""),
                               record.pack_values(flat))

        def job(tx: Tx):
            cur = load_session(tx.db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            done = tx.db.put_check_batch_once(storage.CheckBatch(s.session_id, "", which, size, "[]", b"", sealed))
            if done:
                tx.append("renewal_check_mask", actor=actor, request_id=s.session_id,
                          details={"values": which, "sets": epoch_mac.RENEWAL_CHECK_SETS, **details})

        try:
            self._commit(job)
        finally:
            record.wipe(values, flat)
        return self._load_check_values(s, which, size)

    def _wait_check_values(self, s: Session, which: str, size: int) -> np.ndarray:
        # A peer asked before this node's own prepare sealed them, and this node
        # knows no address for some member: wait (KEY_WAIT_S) for its prepare.
        deadline = time.monotonic() + KEY_WAIT_S
        while True:
            have = self._load_check_values(s, which, size)
            if have is not None:
                return have
            if time.monotonic() >= deadline:
                raise status.Unavailable(
                    f"Node {self.name} has not prepared its renewal check values yet; run the prepare step on "
                    "every node.")
            time.sleep(0.2)

    def _renewal_mask(self, s: Session, peers=None, actor: str = "") -> np.ndarray:
        """rho(i) = sum_j rho_j(i) over every member j (this one included),
        (sets x C, W): pulled node to node and sealed at prepare (or when a
        renewer's peer needs it first, from this node's own peer table)."""
        slots, width = epoch_mac.RENEWAL_MASK_ROWS, s.plan.mac_width
        size = slots * width
        have = self._load_check_values(s, _RENEWAL_MASK, size)
        if have is not None:
            return have.reshape(slots, width)
        with self._mask_lock:
            have = self._load_check_values(s, _RENEWAL_MASK, size)
            if have is not None:
                return have.reshape(slots, width)
            if peers is None:
                peers = self._check_peers(s, [], s.plan.new)
                if not set(s.plan.new) <= set(peers) | {self.name}:
                    peers = None
        if peers is None:
            return self._wait_check_values(s, _RENEWAL_MASK, size).reshape(slots, width)
        with self._mask_lock:
            have = self._load_check_values(s, _RENEWAL_MASK, size)
            if have is not None:
                return have.reshape(slots, width)
            k = s.plan.new_threshold
            parts = [epoch_mac.renewal_mask_deal(self._seed(s), s.session_id, k, width, self.index)]
            req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, renewal_mask=True)
            calls = {n: self.peers.stub(n, peers[n][1]).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                     for n in s.plan.new if n != self.name}
            try:
                for name, call in calls.items():
                    try:
                        got = call.result().renewal
                    except grpc.RpcError as exc:
                        raise _peer_error(name, exc) from None
                    try:
                        parts.append(record.unpack_values(got, size).reshape(slots, width))
                    except InvalidShares:
                        raise status.Unavailable(f"Peer {name} dealt a renewal check mask of the wrong shape.") from None
                mask = proactive.add_rows(*parts)
            finally:
                for call in calls.values():
                    call.cancel()
                record.wipe(*parts)
            self._seal_check_values(s, _RENEWAL_MASK, mask, actor or f"shareholder/{self.name}",
                                    {"from": sorted(s.plan.new)})
        return self._load_check_values(s, _RENEWAL_MASK, size).reshape(slots, width)

    def _renewal_mask_values(self, s: Session, x: int) -> np.ndarray:
        """This renewer's g_j(x) of its mask tags h_j = <b'(j), rho(j)>: (sets x C, L)."""
        mask = self._renewal_mask(s)
        key = self._new_key(s)
        h = None
        try:
            h = epoch_mac.renewal_mask_products(mask, key)
            return epoch_mac.renewal_values_at(self._seed(s), epoch_mac.renewal_mask_keys(), s.new_epoch,
                                               s.plan.new_threshold, h, (x,))[0]
        finally:
            record.wipe(mask, h)

    def _renewal_mask_tags(self, s: Session, peers, actor: str) -> np.ndarray:
        """t'_rho(i) = sum over T of lambda_j g_j(i) for the mask rows, (sets x C, L),
        pulled from every renewer and sealed at prepare."""
        slots, tags = epoch_mac.RENEWAL_MASK_ROWS, epoch_mac.TAG_COUNT
        have = self._load_check_values(s, _RENEWAL_MASK_TAGS, slots * tags)
        if have is not None:
            return have.reshape(slots, tags)
        k = s.plan.new_threshold
        renewers = self._renewers(s, k)
        by_index = {idx: name for name, idx in s.plan.new.items()}
        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, renewal_mask_renew=True)
        calls = {by_index[x]: self.peers.stub(by_index[x], peers[by_index[x]][1]).GetRefreshDeltas.future(
            req, timeout=PEER_TIMEOUT_S) for x in renewers if x != self.index}
        values = np.empty((len(renewers), slots, tags), dtype=FIELD_DTYPE)
        try:
            for a, x in enumerate(renewers):
                if x == self.index:
                    g = self._renewal_mask_values(s, self.index)
                else:
                    name = by_index[x]
                    try:
                        got = calls[name].result().renewal
                    except grpc.RpcError as exc:
                        raise _peer_error(name, exc) from None
                    try:
                        g = record.unpack_values(got, slots * tags).reshape(slots, tags)
                    except InvalidShares:
                        raise status.Unavailable(f"Peer {name} dealt mask renewal values of the wrong shape.") from None
                values[a] = g
                record.wipe(g)
            mask_tags = epoch_mac.renewed_tags(renewers, values, k)
        finally:
            for call in calls.values():
                call.cancel()
            record.wipe(values)
        return self._seal_check_values(s, _RENEWAL_MASK_TAGS, mask_tags, actor,
                                       {"from": sorted(by_index[x] for x in renewers)}).reshape(slots, tags)

    def _prepare_renewal_check(self, s: Session, peers, actor: str) -> None:
        """At prepare, after the new key share and before any record: the mask
        shares and their renewed tags, sealed (a rerun loads them)."""
        record.wipe(self._renewal_mask(s, peers, actor))
        record.wipe(self._renewal_mask_tags(s, peers, actor))

    def _renewal_peer_call(self, request, context):
        """A peer's part of the renewal check: this node's mask dealing, its
        renewal of its mask tags (a renewer), or its round-A report."""
        s = self._session(request.session_id, states=(BEGUN, PREPARED, COMMITTED))
        if s.kind != REFRESH:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a refresh.")
        peer, x = self._peer_index(s, context, s.plan.new)
        self._check_peer_key(s, peer, context)
        if request.keys or request.check_challenges or request.check_context or request.mac_key:
            raise status.InvalidArgument("A renewal check request carries nothing else.")
        if s.plan.mac_width < 1:
            raise status.FailedPrecondition(f"Session {s.session_id} names no MAC key width.")
        if request.renewal_mask:
            values = epoch_mac.renewal_mask_deal(self._seed(s), s.session_id, s.plan.new_threshold,
                                                 s.plan.mac_width, x)
            step = "mask"
        elif request.renewal_mask_renew:
            if self.index not in self._renewers(s, s.plan.new_threshold):
                raise status.FailedPrecondition(f"Node {self.name} is not among the renewing nodes.")
            values = self._renewal_mask_values(s, x)
            step = "mask_renewal"
        else:
            ctx = bytes(request.renewal_check_context)
            if len(ctx) != 32:
                raise status.InvalidArgument("A renewal check context is 32 bytes.")
            report = self._wait_renewal_report(s, ctx)
            return admin_pb2.GetRefreshDeltasResponse(renewal_report=report.astype("<u4").tobytes())
        try:
            packed = values.astype("<u4").tobytes()
        finally:
            record.wipe(values)

        def job(tx: Tx):
            tx.append("renewal_check_deal", actor=f"shareholder/{peer}", request_id=s.session_id,
                      details={"to": peer, "to_index": x, "step": step})
        self._commit(job)
        return admin_pb2.GetRefreshDeltasResponse(renewal=packed)

    def _claim_renewal_context(self, s: Session, actor: str, ctx: bytes) -> int:
        """The mask set this context uses. Each set serves ONE renewal check
        context: the first claim of a context takes the next unused set
        (recorded in the audit log), the same context again gets its set (the
        same values), a context beyond the last set is refused and the refusal
        logged. One writer transaction."""
        digest = hashlib.sha256(ctx).hexdigest()

        def job(tx: Tx):
            sets: dict[str, int] = {}
            for entry in tx.db.event_details(s.started_ms - CLAIM_CLOCK_SLACK_MS, "renewal_check_begin",
                                             s.session_id):
                sets.setdefault(entry.get("context_sha256"), int(entry.get("set", 0)))
            chosen = sets.get(digest, len(set(sets.values())))
            if chosen >= epoch_mac.RENEWAL_CHECK_SETS:
                tx.append("renewal_check_refused", actor=actor, request_id=s.session_id,
                          details={"reason": "masks_used", "context_sha256": digest})
                return None
            tx.append("renewal_check_begin", actor=actor, request_id=s.session_id,
                      details={"context_sha256": digest, "set": chosen, "repeat": digest in sets})
            return chosen

        chosen = self._commit(job)
        if chosen is None:
            CHECKS.labels(self.name, "refused").inc()
            logs.event(_log, "renewal check refused", session=s.session_id, reason="masks_used", actor=actor)
            raise status.FailedPrecondition(
                f"This node has answered the renewal check of session {s.session_id} over "
                f"{epoch_mac.RENEWAL_CHECK_SETS} other record sets; each mask serves one. Roll the session back and "
                "refresh again.")
        return chosen

    def _renewal_sums(self, s: Session, ctx: bytes, covered: list[tuple[str, str]]) -> np.ndarray:
        """[sum_r alpha_r pad(s'_r) | sum_r alpha_r t'_r] over the covered
        records' new rows, (C, W + L): one pass, one open per row."""
        width = s.plan.mac_width
        wanted = set(covered)
        total = np.zeros((epoch_mac.RENEWAL_CHECK_SLOTS, width + epoch_mac.TAG_COUNT), dtype=FIELD_DTYPE)
        found = 0
        reader = storage.connect(self.cfg.store)
        try:
            reader.tune_for_scan(CHECK_MMAP_BYTES)
            after = ("", "")
            while True:
                page = reader.rows_after(s.new_epoch, after, RESHARE_CHECK_PAGE)
                if not page:
                    break
                after = (page[-1].tenant, page[-1].subject)
                groups: dict[int, list[storage.ShareRow]] = {}
                for row in page:
                    if (row.tenant, row.subject) in wanted:
                        groups.setdefault(row.dimension + row.mac_count, []).append(row)
                for w, rows in groups.items():
                    if w - epoch_mac.TAG_COUNT > width:
                        raise status.FailedPrecondition("A record is wider than the session's MAC key.")
                    shares = self._open_chunk(rows, w)
                    alphas = epoch_mac.renewal_coefficients(ctx, [(r.tenant, r.subject) for r in rows])
                    part = None
                    try:
                        part = epoch_mac.renewal_sums(alphas, shares, width)
                        total = proactive.add_rows(total, part)
                    finally:
                        record.wipe(shares, part)
                    found += len(rows)
        finally:
            reader.close()
        if found != len(covered):
            record.wipe(total)
            raise status.FailedPrecondition(
                f"{len(covered) - found} covered record(s) have no prepared share on this node in session "
                f"{s.session_id}; abort the session and refresh again.")
        return total

    def _renewal_check(self, s: Session, actor: str, covered, digest: str, contributions: dict[int, bytes],
                       others: dict) -> tuple[list[int], str]:
        """Round A (this node's u, kept for its peers) and round B (every
        member's u node to node, opened; w answered): (w values, context hex).
        An empty w when the members' reports do not lie on one polynomial."""
        k = s.plan.new_threshold
        ctx = epoch_mac.renewal_check_context(s.session_id, k, digest, [contributions[i] for i in sorted(contributions)])
        chosen = self._claim_renewal_context(s, actor, ctx)
        rows = slice(chosen * epoch_mac.RENEWAL_CHECK_SLOTS, (chosen + 1) * epoch_mac.RENEWAL_CHECK_SLOTS)
        key = (s.session_id, ctx)
        with self._key_cond:
            cached = self._renewal_reports.get(key)
        if cached is None:
            sums = self._renewal_sums(s, ctx, covered)
            mask = self._renewal_mask(s)
            try:
                cached = (epoch_mac.renewal_report(sums, np.ascontiguousarray(mask[rows])), sums)
            finally:
                record.wipe(mask)
            with self._key_cond:
                self._renewal_reports = {k2: v for k2, v in self._renewal_reports.items() if k2[0] == s.session_id}
                self._renewal_reports[key] = cached
                self._key_cond.notify_all()
        report, sums = cached
        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, renewal_check_context=ctx)
        calls = {name: self.peers.stub(name, addr).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                 for name, (_, addr) in others.items()}
        slots, width = epoch_mac.RENEWAL_CHECK_SLOTS, s.plan.mac_width
        xs, stacked = [self.index], [report]
        try:
            for name, call in calls.items():
                try:
                    got = call.result().renewal_report
                except grpc.RpcError as exc:
                    raise _peer_error(name, exc) from None
                try:
                    stacked.append(record.unpack_values(got, slots * width).reshape(slots, width))
                except InvalidShares:
                    raise status.Unavailable(f"Peer {name} gave a renewal check report of the wrong shape.") from None
                xs.append(others[name][0])
        finally:
            for call in calls.values():
                call.cancel()
        opened = epoch_mac.open_reports(xs, np.stack(stacked), k)
        context_hex = hashlib.sha256(ctx).hexdigest()
        if opened is None:
            logs.event(_log, "renewal check reports inconsistent", logging.WARNING, session=s.session_id)
            return [], context_hex
        mask_tags = self._load_check_values(s, _RENEWAL_MASK_TAGS, epoch_mac.RENEWAL_MASK_ROWS * epoch_mac.TAG_COUNT)
        if mask_tags is None:
            raise status.FailedPrecondition("This node holds no renewed mask tags; abort the session and refresh again.")
        new_key = self._new_key(s)
        mine = np.ascontiguousarray(mask_tags.reshape(epoch_mac.RENEWAL_MASK_ROWS, epoch_mac.TAG_COUNT)[rows])
        w = epoch_mac.renewal_answer(sums, mine, new_key, opened)
        record.wipe(mask_tags, mine)
        return [int(v) for v in w.reshape(-1)], context_hex

    def _wait_renewal_report(self, s: Session, ctx: bytes) -> np.ndarray:
        """This node's round-A report for ``ctx``, once its own check computed
        it (up to PEER_TIMEOUT_S); never for a context it did not claim."""
        deadline = time.monotonic() + PEER_TIMEOUT_S
        with self._key_cond:
            while True:
                got = self._renewal_reports.get((s.session_id, ctx))
                if got is not None:
                    return got[0].copy()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise status.Unavailable(
                        f"Node {self.name} has no renewal check report for this context; run the check on every node.")
                self._key_cond.wait(min(left, 0.5))

    # --- commit and finalize ---------------------------------------------------------------

    def CommitSession(self, request, context):
        actor = str(caller(context))
        s = self._session(request.session_id, states=(PREPARED, COMMITTED, FINALIZED))
        serves_new = self.name in s.plan.new
        if s.state != PREPARED:
            if serves_new and s.state == COMMITTED:
                self.sh.serving_epoch = max(self.sh.serving_epoch, s.new_epoch)
            yield admin_pb2.CommitSessionResponse(status=self._status(s))
            return
        if s.kind == RESHARE:
            self._require_check(s, actor)
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

        final = self._commit(job)
        if serves_new:
            self.sh.serving_epoch = max(self.sh.serving_epoch, s.new_epoch)
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
            total = self._conn().count_before(s.new_epoch)
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

            final = self._commit(finish)
            self._forget_seed(s.session_id)
            _checkpoint_wal(self.cfg.store)
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
                n = self._commit(job)
                if not n:
                    return
                yield n

        if context is None:
            for _ in run():
                pass
            return None
        return run()


def committee_pins(db: storage.Database, cfg) -> dict[str, str]:
    """Member name -> the SHA-256 of its certificate's public key (hex), for
    the node's current committee: as its last committed session recorded it,
    else as its config founded it ([committee] pins); {} when unpinned."""
    recorded = db.node_state().committee
    if recorded.get("members"):
        return dict(recorded.get("pins") or {})
    return dict(cfg.committee_pins)


def presented_spki(context) -> str:
    """The SHA-256 (hex) of the caller's certificate public key; "" if none."""
    pems = context.auth_context().get("x509_pem_cert")
    try:
        return committee_plan.spki_sha256(pems[0]) if pems else ""
    except committee_plan.InvalidPlan:
        return ""


class _Pace:
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


def _lower_priority() -> None:
    # Linux schedules threads as tasks: nice this worker thread only.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (OSError, AttributeError):
        pass


def _checkpoint_wal(where) -> None:
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
