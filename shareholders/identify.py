"""Identify on shares at one node: the ``splitvault.v1.ShareholderIdentify`` servicer.

A query (``IdentifyQuery``, from the matcher) names three nodes S in
position order. This node, at position j:

1. checks the provider's IDENTIFY ticket itself (tenant registered here,
   signature, audience, expiry, replay, the per-tenant attempt limit
   ``IDENTIFY_ATTEMPTS`` per ``attempt_window_s``) and commits ONE audit
   entry for the query (event ``identify``; never one per row);
2. round 0: sends its predecessor the protocol version, a fresh pairwise
   key (from the OS CSPRNG) and the digest of its gallery, and takes its
   successor's (another version: FAILED_PRECONDITION): the three
   galleries must be the same rows at the same epochs, else ABORTED (an
   enrolment, delete or refresh is in flight; the matcher answers
   UNAVAILABLE: try again);
3. computes its score shares and runs ``vault.mpc.Party`` with its
   neighbours: every round is one message on this node's ``IdentifyRound``
   stream to the predecessor (``_Link``: one stream carries the rounds of
   many queries, each message naming its query; at the address of this
   node's own [peers] table, certificate pinned to ``shareholder/<name>``;
   sent without waiting for an answer) and one message taken from the
   mailbox its successor's stream fills;
4. answers its XOR component of the match bits; then, if asked, of the
   candidates' pair comparisons, and the subject of one row;
5. confirmation (``confirm``, once per query, at most
   ``mpc.CONFIRM_CANDIDATES`` rows): answers the rows' subjects and records
   them in ``Confirmations``, so that ``ReleaseShare`` releases each one's
   share once under this query's IDENTIFY ticket (audited as ``release``
   entries naming the query). The node cannot check that the rows are the
   ones the opened bits named (its component is masked to it): the bound is
   the count, once per ticket, and the subjects' own attempt limits.

Verify on shares (``start.verify_subject`` set): the VERIFY ticket is checked
as ``ReleaseShare`` checks it (the same replay set and per-subject attempt
counters), only the subject's newest row is read (no gallery), and one
``verify_on_shares`` entry is committed (round 0 goes out before that
commit and is taken after it); the node answers its re-randomised
share of |t|^2; while the matcher finds T it runs the input round (its score
share to its predecessor); then, given its and its successor's additive
shares of -T (``verify_threshold``), runs the circuit on that one row and
answers its share of [s >= T], which ends the call.

The gallery is kept in memory in compute form per (tenant, dimension,
group): the group is the IDENTIFY ticket's (signed by the provider; ''
searches the whole tenant, a start naming another group is refused), rows
are those enrolled under it (``shares.grp``), and the gallery digest the
nodes compare covers it. Each gallery holds
the template part of each record share as float64 (``mpc.compute_form``:
8 d bytes per template, 4 KiB at d = 512), rows sorted by subject, the newest epoch up
to the serving epoch per subject. Before every query the tenant's change
counter is read (``share_versions``, one row, moved by triggers on every
write to its share rows, schema 8); while it and the serving epoch are those
the gallery was built at, the gallery is used as it is. Otherwise the rows'
versions (subject, epoch, envelope nonce; no share values) are listed and
compared with the cache, and only rows that changed are opened again: so
enrolments, deletes, replaces, refreshes and reshares are seen at the next
query without hooks in their write paths (every seal draws a fresh nonce,
so (epoch, nonce) names a row's values). A KEK rotation re-wraps data keys
(moving the counter) and leaves share values unchanged: nothing to reload.

Fail closed: any error, a peer that does not answer within
``ROUND_TIMEOUT_S``, or a cancelled stream ends the query with an error
status; nothing is ever answered but the bits of a completed circuit.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import struct
import threading
import time
import dataclasses
from dataclasses import dataclass

import grpc
import numpy as np

from shareholders.audit_log import Tx, now_ms
from shareholders.config import load_peers
from shareholders.maintenance.peers import committee_pins, presented_spki
from splitvault.v1 import identify_pb2, identify_pb2_grpc
from vault import envelope, mpc, pki, record
from vault import ticket as tickets
from vault.errors import EnvelopeError, InvalidShares, InvalidTicket
from vault.field import P
from vaultrpc import logs, status, wire
from vaultrpc.server import caller
from vaultrpc.tls import secure_channel

SERVICE = "splitvault.v1.ShareholderIdentify"
_M = f"/{SERVICE}/"
ROLES = {
    _M + "IdentifyQuery": frozenset({pki.ROLE_MATCHER}),
    _M + "IdentifyRound": frozenset({pki.ROLE_SHAREHOLDER}),
}

# Identify queries per tenant per attempt window (a gallery search is a
# stronger oracle than one verification). A module attribute: tests set it.
IDENTIFY_ATTEMPTS = 600
# How long a node waits for its successor's message of one round.
ROUND_TIMEOUT_S = 20.0
# The deadline of one stream of rounds to a predecessor (each round still
# waits at most ROUND_TIMEOUT_S for its message); a stream older than
# _LINK_RENEW_S takes no new message, and one idle for _LINK_IDLE_S half-closes.
_STREAM_TIMEOUT_S = 600.0
_LINK_RENEW_S = 300.0
_LINK_IDLE_S = 1.0
# Messages held for queries this node has not reached yet (or never will).
_MAILBOX_LIMIT = 4096
_MAILBOX_TTL_S = 60.0
# Rounds of one query: round 0 (keys), 1 input, 7 per circuit, 2 openings.
_MAX_ROUND = 64
# Rows re-read one by one before a whole reload is cheaper.
_INCREMENTAL_LIMIT = 2048
# Gallery rows opened into one buffer before they go into the compute form.
_PAGE_ROWS = 512
# Group galleries kept (each a copy of its rows in compute form); the least
# recently loaded goes first. Whole-tenant galleries are always kept.
_GROUP_GALLERIES = 64
# The round-0 message: protocol version, pairwise key, gallery digest, row
# count. Version 2: the 7-round circuit (mpc, one prefix tree) and many
# queries per IdentifyRound stream; version 1 (72 bytes, no version field)
# ran 8 rounds and one query per stream.
_PROTOCOL = 2
_HELLO = struct.Struct(">I32s32sQ")
_HELLO_V1_SIZE = 72


def _hello(key: bytes, digest: bytes, rows: int) -> bytes:
    return _HELLO.pack(_PROTOCOL, key, digest, rows)


def _unhello(got: bytes) -> tuple[bytes, bytes, int]:
    """The successor's round 0: (pair key, gallery digest, rows); a peer of
    another protocol version is FAILED_PRECONDITION, never a computation."""
    if len(got) == _HELLO_V1_SIZE:
        version = 1
    elif len(got) == _HELLO.size:
        version, key, digest, rows = _HELLO.unpack(got)
        if version == _PROTOCOL:
            return key, digest, rows
    else:
        raise status.InvalidArgument("A peer sent a malformed first round.")
    raise status.FailedPrecondition(
        f"A committee member runs identify protocol version {version}, this node {_PROTOCOL}: "
        "upgrade the committee's nodes together.")


class Mailboxes:
    """Messages from successors, by (query id, round): they may arrive before the query starts here.

    A message refused for its query (a round delivered twice, or too many
    waiting) fails that query alone at its next take: one stream carries the
    rounds of many queries (``_Link``), and the others go on.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._items: dict[tuple[str, int], tuple[str, bytes, float]] = {}
        self._failed: dict[str, tuple[status.RpcError, float]] = {}

    def put(self, query_id: str, rnd: int, sender: str, payload: bytes) -> None:
        now = time.monotonic()
        with self._cond:
            if len(self._items) >= _MAILBOX_LIMIT:
                for key in [k for k, v in self._items.items() if now - v[2] > _MAILBOX_TTL_S]:
                    del self._items[key]
            if len(self._items) >= _MAILBOX_LIMIT:
                self._fail(query_id, status.ResourceExhausted("Too many identify messages are waiting at this node."),
                           now)
            elif (query_id, rnd) in self._items:
                self._fail(query_id, status.Unavailable("A round of the identification was delivered twice."), now)
            else:
                self._items[(query_id, rnd)] = (sender, payload, now)
            self._cond.notify_all()

    def _fail(self, query_id: str, error: status.RpcError, now: float) -> None:
        # Bounded as the messages are; a failure dropped here only makes the
        # query wait for its round timeout instead (it still fails).
        if len(self._failed) >= _MAILBOX_LIMIT:
            self._failed = {q: v for q, v in self._failed.items() if now - v[1] <= _MAILBOX_TTL_S}
        if len(self._failed) < _MAILBOX_LIMIT:
            self._failed.setdefault(query_id, (error, now))

    def take(self, query_id: str, rnd: int, sender: str, cancelled: threading.Event) -> bytes:
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        with self._cond:
            while True:
                failed = self._failed.get(query_id)
                if failed is not None:
                    raise failed[0]
                item = self._items.pop((query_id, rnd), None)
                if item is not None:
                    if item[0] != sender:
                        raise status.PermissionDenied("A round came from a node that is not this node's successor.")
                    return item[1]
                left = deadline - time.monotonic()
                if cancelled.is_set():
                    raise status.Unavailable("The identification was cancelled.")
                if left <= 0:
                    raise status.Unavailable("A node of the identify committee did not answer in time.")
                self._cond.wait(min(left, 0.25))

    def drop(self, query_id: str) -> None:
        with self._cond:
            for key in [k for k in self._items if k[0] == query_id]:
                del self._items[key]
            self._failed.pop(query_id, None)


class Confirmations:
    """Subjects a query named for confirmation, releasable once each under its IDENTIFY ticket."""

    def __init__(self):
        self._lock = threading.Lock()
        # query id -> (tenant, ticket id, expiry ms, subjects not released yet)
        self._open: dict[str, tuple[str, str, int, set[str]]] = {}

    def offer(self, query_id: str, tenant: str, ticket_id: str, expires_ms: int, subjects: list[str],
              now: int) -> None:
        with self._lock:
            self._open = {q: v for q, v in self._open.items() if v[2] > now}
            if query_id in self._open:
                raise status.FailedPrecondition("This query's candidates were already named for confirmation.")
            if len(self._open) >= _MAILBOX_LIMIT:
                raise status.ResourceExhausted("Too many identifications await confirmation at this node.")
            self._open[query_id] = (tenant, ticket_id, expires_ms, set(subjects))

    def take(self, query_id: str, tenant: str, ticket_id: str, subject: str, now: int) -> bool:
        """Whether the query named this subject and it was not released for it yet (then it is used up)."""
        with self._lock:
            entry = self._open.get(query_id)
            if entry is None or entry[:2] != (tenant, ticket_id) or entry[2] <= now or subject not in entry[3]:
                return False
            entry[3].discard(subject)
            return True


@dataclass(frozen=True)
class Gallery:
    """One tenant's templates of one dimension in compute form (a snapshot: never changed in place)."""

    subjects: tuple[str, ...]
    versions: tuple[tuple, ...]  # (epoch, request id, envelope nonce) per row: the nonce names the sealed values
    values: np.ndarray  # (G, d) this node's shares of the templates, in mpc.compute_form (float64)
    threshold: int  # the records' k (0 when empty)
    digest: bytes
    listed: list  # the store's version listing (tenant_row_versions) this snapshot was built from
    version: int = -1  # the tenant's change counter (share_version) read before that listing
    epoch: int = -1  # the serving epoch it was listed up to


def _digest(group: str, subjects, versions) -> bytes:
    h = hashlib.sha256(b"splitvault/identify-gallery/v1\x00")
    h.update(f"{group}\x00".encode())
    for subject, version in zip(subjects, versions, strict=True):
        h.update(f"{subject}\x00{version[0]}\x00{version[1]}\n".encode())
    return h.digest()


class Galleries:
    """The compute-form galleries of this node, checked against the store's change counter before every query."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, str], Gallery] = {}

    def get(self, sh, conn, tenant: str, dimension: int, group: str = "") -> Gallery:
        """The gallery of (tenant, dimension), narrowed to ``group`` when one is named ('' = the whole tenant)."""
        with self._lock:  # one loader at a time; readers of old snapshots go on
            key = (tenant, dimension, group)
            old = self._cache.get(key)
            epoch = sh.serving_epoch
            # Read before the listing: a write between the two moves the
            # counter past the one kept, so the next query lists again.
            version = conn.share_version(tenant)
            if old is not None and old.version == version and old.epoch == epoch:
                return old  # one small read: no write to the tenant's rows since
            listed = conn.tenant_row_versions(tenant, dimension, epoch, group)
            if old is not None and old.listed == listed:  # one compare in C: nothing changed
                old = dataclasses.replace(old, version=version, epoch=epoch)
                self._cache[key] = old
                return old
            newest: dict[str, tuple] = {}
            for subject, epoch, request_id, nonce in listed:  # by subject, then epoch: the newest wins
                newest[subject] = (epoch, request_id, bytes(nonce))
            subjects = tuple(newest)
            versions = tuple(newest[s] for s in subjects)
            have = {} if old is None else {s: (i, v) for i, (s, v) in enumerate(zip(old.subjects, old.versions))}
            changed = [s for s in subjects if have.get(s, (None, None))[1] != newest[s]]
            values = np.empty((len(subjects), dimension), dtype=np.float64)  # mpc.compute_form
            thresholds: set[int] = set() if old is None or not old.subjects else {old.threshold}
            # Each opened row goes straight to its slot: a first load of
            # 1,000,000 holds one copy of the gallery, not two (4 KiB a row).
            slot = {s: i for i, s in enumerate(subjects)}
            opened = np.zeros(len(subjects), dtype=bool)
            ring = sh.keys.kek
            if len(changed) > _INCREMENTAL_LIMIT:
                wanted = set(changed)
                rows = (r for r in conn.tenant_rows(tenant, dimension, epoch, group=group)
                        if r.subject in wanted and r.epoch == newest[r.subject][0])
            else:
                rows = (r for s in changed for r in conn.subject_rows(tenant, s)
                        if r.epoch == newest[s][0] and r.dimension == dimension)
            page = _Page(dimension)
            try:
                for row in rows:
                    if _row_version(row) != newest[row.subject]:
                        raise status.Unavailable("The gallery changed while it was loaded; try again.")
                    page.add(sh, ring, row, slot[row.subject])
                    thresholds.add(row.threshold)
                    if page.full():
                        page.flush(values, opened)
                page.flush(values, opened)
            finally:
                page.wipe()
            for i, s in enumerate(subjects):
                if opened[i]:
                    continue
                if s in have and have[s][1] == newest[s]:
                    values[i] = old.values[have[s][0]]
                else:  # deleted between the two reads: the next query sees it
                    raise status.Unavailable("The gallery changed while it was loaded; try again.")
            if len(thresholds) > 1:
                raise status.FailedPrecondition("The tenant's records have different thresholds.")
            gallery = Gallery(subjects, versions, values, thresholds.pop() if thresholds else 0,
                              _digest(group, subjects, versions), listed, version, epoch)
            self._cache.pop(key, None)
            self._cache[key] = gallery  # last in the dict's order: the most recently loaded
            grouped = [k for k in self._cache if k[2]]
            for k in grouped[: max(0, len(grouped) - _GROUP_GALLERIES)]:
                del self._cache[k]
            return gallery

    @staticmethod
    def _open(sh, ring, row) -> np.ndarray:
        """One stored row's template share (d,) field elements (DATA_LOSS if it does not open)."""
        try:
            return record.unpack_values(_opened(sh, ring, row), row.dimension + row.mac_count)[: row.dimension]
        except InvalidShares:
            raise _damaged() from None


def _row_version(row) -> tuple:
    """(epoch, request id, envelope nonce): names a stored row's values (every seal draws a fresh nonce)."""
    return row.epoch, row.request_id, bytes(row.nonce)


def _one_row(row, dimension: int) -> Gallery:
    """A verification's gallery: the claimed subject's one row (its values are not kept here)."""
    versions = (_row_version(row),)
    return Gallery((row.subject,), versions, np.empty((0, dimension)), row.threshold,
                   _digest("", (row.subject,), versions), [])


def _damaged() -> status.RpcError:
    return status.DataLoss("A stored share of the tenant's gallery is damaged at this node.")


def _opened(sh, ring, row) -> bytes:
    """A stored row's opened share (template part and tags), checked to be this
    node's and of the row's width; DATA_LOSS if it does not open."""
    try:
        if row.index != sh.index:
            raise EnvelopeError("index")
        raw = envelope.open_parts(ring, record.record_identity(row.tenant, row.subject, row.index, row.epoch),
                                  row.kek_version, row.wrapped_dk, row.nonce, row.ciphertext)
    except EnvelopeError:
        raise _damaged() from None
    if len(raw) != 4 * (row.dimension + row.mac_count):
        raise _damaged()
    return raw


class _Page:
    """Opened shares of up to ``_PAGE_ROWS`` gallery rows in one buffer, moved
    into the compute form a page at a time (one range check and one
    conversion per page, not per row); the buffer is wiped after each page."""

    def __init__(self, dimension: int):
        self.size = 4 * dimension
        self.buf = bytearray(self.size * _PAGE_ROWS)
        self.slots: list[int] = []

    def add(self, sh, ring, row, slot: int) -> None:
        raw = _opened(sh, ring, row)
        if 4 * row.dimension != self.size:
            raise _damaged()
        j = len(self.slots)
        self.buf[j * self.size : (j + 1) * self.size] = memoryview(raw)[: self.size]
        self.slots.append(slot)

    def full(self) -> bool:
        return len(self.slots) == _PAGE_ROWS

    def flush(self, values: np.ndarray, opened: np.ndarray) -> None:
        if not self.slots:
            return
        n = len(self.slots)
        shares = np.frombuffer(self.buf, dtype="<u4", count=n * self.size // 4).reshape(n, self.size // 4)
        if int(shares.max()) >= P:
            raise _damaged()
        at = np.asarray(self.slots)
        values[at] = shares  # float64: every share < 2^31 is exact (mpc.compute_form)
        opened[at] = True
        self.wipe()
        self.slots.clear()

    def wipe(self) -> None:
        self.buf[:] = bytes(len(self.buf))


class _Query:
    """One query's state at this node: its party, gallery snapshot and neighbours."""

    def __init__(self, service: IdentifyService, start: identify_pb2.IdentifyStart, context):
        self.svc = service
        self.start = start
        self.query_id = start.query_id
        self.cancelled = threading.Event()
        context.add_callback(self.cancelled.set)
        self.party: mpc.Party | None = None
        self.gallery: Gallery | None = None
        self.pred = self.succ = self.pred_address = ""
        self.link: _Link | None = None  # to the predecessor
        self.streams: set[_RoundStream] = set()  # the streams its rounds went on (failures end it)
        self.margin = 0
        self.body: tickets.TicketBody | None = None
        self.confirmed = False
        # Verify on shares: this node's score share until the matcher's share of -T comes.
        self.verify_z: np.ndarray | None = None
        self.verify_pending = False  # the input round is done; the shares of -T are awaited

    def exchange(self, rnd: int, payload: bytes) -> bytes:
        """Send this party's message of a round to the predecessor; the successor's of the same round."""
        self.send(rnd, payload)
        return self.take(rnd)

    def send(self, rnd: int, payload: bytes) -> None:
        if self.link is None:  # [peers] is read once per query
            self.link = self.svc._link(self.pred, self.pred_address)
        request = identify_pb2.IdentifyRoundRequest(query_id=self.query_id, round=rnd, payload=payload)
        self.streams.add(self.link.send(request, self.cancelled))

    def take(self, rnd: int) -> bytes:
        try:
            return self.svc.mail.take(self.query_id, rnd, self.succ, self.cancelled)
        except status.Unavailable:
            for stream in self.streams:
                stream.check()  # a stream that failed says so rather than "cancelled"
            raise

    def close(self) -> None:
        """Stop watching the streams (they stay open for other queries; the
        matcher's cancellation ends the peers' side of a failed query)."""
        for stream in self.streams:
            stream.forget(self.cancelled)


class _RoundStream:
    """One client stream of round messages to a predecessor, shared by the queries that send on it.

    Messages of several queries interleave on it (each names its query; the
    predecessor's mailbox sorts them). A stream that fails (the peer down,
    its identity check refused, a malformed round) ends every query that
    sent on it at its next round (UNAVAILABLE: the queries watch it), and
    the predecessor's own round timeout ends its side. A stream that carried
    nothing for ``_LINK_IDLE_S`` half-closes itself (its handler at the
    predecessor then ends: a stopping node waits for it at most that long
    after its last message, within the stop's grace); a later message goes
    on a new one (``_Link``).
    """

    _END = object()

    def __init__(self, stub: identify_pb2_grpc.ShareholderIdentifyStub, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False  # no message may be added (idle, closed or failed)
        self._watchers: set[threading.Event] = set()
        self.opened = time.monotonic()
        self._call = stub.IdentifyRound.future(self._messages(), timeout=_STREAM_TIMEOUT_S)
        self._call.add_done_callback(self._done)

    def _messages(self):
        while True:
            try:
                item = self._out.get(timeout=_LINK_IDLE_S)
            except queue.Empty:
                with self._lock:  # a message queued meanwhile goes first
                    if self._out.empty():
                        self._ended = True  # idle: half-close
                        return
                continue
            if item is self._END:
                return
            yield item

    def _done(self, call) -> None:
        with self._lock:
            self._ended = True
            watchers = list(self._watchers) if self.failed() else []
        for event in watchers:
            event.set()  # the take waiting on the successor stops at once

    def failed(self) -> bool:
        return self._call.done() and not self._call.cancelled() and self._call.exception() is not None

    def try_send(self, request: identify_pb2.IdentifyRoundRequest, watcher: threading.Event) -> bool:
        """Queue a message (False if this stream takes no more: send it on a new one).
        UNAVAILABLE if it failed after this query sent on it."""
        with self._lock:
            if self.failed() and watcher in self._watchers:
                self.check()
            if self._ended or self._call.done():
                return False
            self._watchers.add(watcher)
            self._out.put(request)
            return True

    def forget(self, watcher: threading.Event) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def check(self) -> None:
        if self.failed():
            exc = self._call.exception()
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            raise status.Unavailable(
                f"Committee member {self._name} did not take a round of the identification "
                f"({getattr(code, 'name', 'UNKNOWN')}).")

    def close(self) -> None:
        """Half-close: what is queued still goes; nothing more is taken."""
        with self._lock:
            if not self._ended:
                self._ended = True
                self._out.put(self._END)

    def usable(self) -> bool:
        with self._lock:
            return not self._ended and not self._call.done() and time.monotonic() - self.opened < _LINK_RENEW_S


class _Link:
    """This node's round messages to one predecessor (name, address): the
    current ``_RoundStream``, opened when the last one idled, failed or grew
    old (``_LINK_RENEW_S``; its deadline is ``_STREAM_TIMEOUT_S``). One
    stream for many queries saves opening one per query (about 1.4 ms of a
    verification's critical path on the reference VM)."""

    def __init__(self, stub: identify_pb2_grpc.ShareholderIdentifyStub, name: str):
        self._stub = stub
        self._name = name
        self._lock = threading.Lock()
        self._stream: _RoundStream | None = None

    def send(self, request: identify_pb2.IdentifyRoundRequest, watcher: threading.Event) -> _RoundStream:
        while True:
            with self._lock:
                stream = self._stream
                if stream is None or not stream.usable():
                    if stream is not None:
                        stream.close()
                    stream = self._stream = _RoundStream(self._stub, self._name)
            if stream.try_send(request, watcher):
                return stream

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None


class IdentifyService(identify_pb2_grpc.ShareholderIdentifyServicer):
    def __init__(self, sh):
        self.sh = sh
        self.cfg = sh.cfg
        self.mail = Mailboxes()
        self.galleries = Galleries()
        from shareholders.service import ReleaseGuard  # the same replay set and counters as releases

        self.guard = ReleaseGuard(IDENTIFY_ATTEMPTS, int(self.cfg.attempt_window_s * 1000))
        self._tls = self.cfg.tls.load()
        self._lock = threading.Lock()
        self._links: dict[tuple[str, str], tuple[grpc.Channel, _Link]] = {}
        self._log = logging.getLogger("shareholders")

    # --- plumbing -------------------------------------------------------------------

    def preload(self) -> threading.Thread | None:
        """Load the galleries of ``[identify] preload``'s tenants (every
        dimension they hold), in the background: the node serves meanwhile,
        and a query of a tenant still loading waits for it (its peers' round
        timeout may end it first, UNAVAILABLE). One log line per gallery."""
        if not self.cfg.identify_preload:
            return None
        thread = threading.Thread(target=self._preload, name="identify-preload", daemon=True)
        thread.start()
        return thread

    def _preload(self) -> None:
        for tenant in self.cfg.identify_preload:
            try:
                for dimension in self.sh.reader().tenant_dimensions(tenant, self.sh.serving_epoch):
                    t0 = time.monotonic()
                    gallery = self.galleries.get(self.sh, self.sh.reader(), tenant, dimension)
                    logs.event(self._log, "identify gallery loaded", tenant=tenant, dimension=dimension,
                               rows=len(gallery.subjects), seconds=round(time.monotonic() - t0, 3))
            except Exception as exc:  # noqa: BLE001 - the first query loads it instead
                message = exc.message if isinstance(exc, status.RpcError) else type(exc).__name__
                logs.event(self._log, "identify gallery preload failed", logging.WARNING, tenant=tenant,
                           error=message)

    def rebuild_guard(self, now: int | None = None) -> int:
        """Replay recent identify entries (ticket ids and attempts) after a restart."""
        now = now_ms() if now is None else now
        horizon = max(self.guard.window_ms, tickets.MAX_TTL_MS + tickets.CLOCK_SKEW_MS)
        n = 0
        for time_ms, _event, request_id, tenant, _subject, _details in self.sh.reader().entries_since(now - horizon, ("identify",)):
            tid = tickets.ticket_id(tickets.TicketBody(tenant=tenant, request_id=request_id))
            self.guard.record(tenant, "", tid, now + tickets.MAX_TTL_MS, time_ms)
            n += 1
        return n

    def _link(self, name: str, offered: str = "") -> _Link:
        # [peers] first; else the matcher's address (the certificate identity is checked either way).
        address = load_peers(self.cfg).get(name) or offered
        if not address:
            raise status.FailedPrecondition(f"This node has no address for committee member {name} in [peers].")
        with self._lock:
            entry = self._links.get((name, address))
            if entry is None:
                channel = secure_channel(address, self._tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, name))
                entry = (channel, _Link(identify_pb2_grpc.ShareholderIdentifyStub(channel), name))
                self._links[(name, address)] = entry
            return entry[1]

    def close(self) -> None:
        with self._lock:
            for channel, link in self._links.values():
                link.close()
                channel.close()
            self._links.clear()

    def _committee(self) -> tuple[dict[str, int], int]:
        recorded = self.sh.reader().node_state().committee
        if recorded.get("members"):
            return dict(recorded["members"]), int(recorded.get("threshold") or 0)
        return dict(self.cfg.committee), int(self.cfg.committee_threshold)

    # --- peer rounds ----------------------------------------------------------------

    def IdentifyRound(self, request_iterator, context):
        """Round messages from a successor, of one or many queries (``_Link``): the caller's
        certificate is checked against the committee pins at each new query the stream carries."""
        who = caller(context)
        spki = presented_spki(context)
        if who is None:
            raise status.PermissionDenied("The caller is not a pinned member of this node's committee.")
        query_id = None
        for request in request_iterator:
            if request.query_id != query_id:
                if not _is_query_id(request.query_id):
                    raise status.InvalidArgument("The query id is not a valid identifier.")
                pins = committee_pins(self.sh.reader(), self.cfg)
                if pins and pins.get(who.name) != spki:
                    raise status.PermissionDenied("The caller is not a pinned member of this node's committee.")
                query_id = request.query_id
            if request.round > _MAX_ROUND:
                raise status.InvalidArgument("The round number is out of range.")
            self.mail.put(query_id, int(request.round), who.name, request.payload)
        return identify_pb2.IdentifyRoundResponse()

    # --- queries ----------------------------------------------------------------------

    def IdentifyQuery(self, request_iterator, context):
        actor = str(caller(context))
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("step") != "start":
            raise status.InvalidArgument("An identification starts with its start step.")
        query = _Query(self, first.start, context)
        try:
            yield self._run(query, actor)
            if query.verify_z is not None:  # Verify on shares: the input round overlaps the matcher's T
                query.party.share_input(query.verify_z)
                record.wipe(query.verify_z)
                query.verify_z = None
                query.verify_pending = True
            for step in request_iterator:
                kind = step.WhichOneof("step")
                if query.start.verify_subject and kind != "verify_threshold":
                    raise status.InvalidArgument("A verification on shares takes only its verify_threshold step.")
                if kind == "pairs":
                    yield self._pairs(query, step.pairs)
                elif kind == "confirm":
                    yield self._confirm(query, list(step.confirm.rows))
                elif kind == "verify_threshold":
                    yield self._verify_bits(query, step.verify_threshold)
                    break  # a verification's last answer: the call ends here, not at the matcher's half-close
                elif kind == "resolve":
                    row = int(step.resolve.row)
                    if not 0 <= row < len(query.gallery.subjects):
                        raise status.InvalidArgument("The row is outside the gallery.")
                    yield identify_pb2.IdentifyQueryResponse(subject=query.gallery.subjects[row])
                else:
                    raise status.InvalidArgument(
                        "An identification step must be pairs, resolve, confirm or verify_threshold.")
        finally:
            query.close()
            if query.party is not None:
                query.party.wipe()
            if query.verify_z is not None:
                record.wipe(query.verify_z)
            self.mail.drop(query.query_id)

    def _run(self, query: _Query, actor: str) -> identify_pb2.IdentifyQueryResponse:
        start = query.start
        if not _is_query_id(start.query_id):
            raise status.InvalidArgument("The query id must be 8 to 64 letters, digits or '-'.")
        committee = list(start.committee)
        members, k = self._committee()
        if k != mpc.THRESHOLD:
            raise status.FailedPrecondition(
                f"Identify on shares runs with threshold 2 only; this committee's threshold is {k}.")
        if len(committee) != mpc.PARTIES or len(set(committee)) != mpc.PARTIES:
            raise status.InvalidArgument("An identification names three distinct nodes.")
        if any(name not in members for name in committee):
            raise status.FailedPrecondition("The identification names a node outside this node's committee.")
        if committee.count(self.sh.name) != 1:
            raise status.InvalidArgument("The identification does not name this node.")
        position = committee.index(self.sh.name)
        xs = tuple(int(members[name]) for name in committee)
        query.pred = committee[(position - 1) % mpc.PARTIES]
        query.succ = committee[(position + 1) % mpc.PARTIES]
        if len(start.addresses) == mpc.PARTIES:
            query.pred_address = start.addresses[(position - 1) % mpc.PARTIES]
        dimension = int(start.dimension)
        if len(start.probe_share) != 4 * dimension or dimension <= 0:
            raise status.InvalidArgument("The probe share does not have the named dimension.")
        try:
            mpc.offset_bit(dimension)
            query.margin = mpc.check_margin(start.margin, dimension)
        except ValueError as exc:
            raise status.InvalidArgument(str(exc)) from None
        if start.verify_subject:
            return self._start_verify(query, actor, committee, xs, position, dimension)
        body, seq = self._authorise(actor, start, committee)
        query.body = body
        gallery = self.galleries.get(self.sh, self.sh.reader(), body.tenant, dimension, body.group)
        if gallery.subjects and gallery.threshold != mpc.THRESHOLD:
            raise status.FailedPrecondition("The tenant's records are not shared with threshold 2.")
        query.gallery = gallery
        try:
            probe = record.unpack_values(start.probe_share, dimension)
        except InvalidShares:
            raise status.InvalidArgument("The probe share holds a value outside the field.") from None
        # Round 0: a fresh key for the pair (predecessor, this node), and the gallery digest.
        key_prev = mpc.new_pair_key()
        key_next, digest_next, rows_next = _unhello(
            query.exchange(0, _hello(key_prev, gallery.digest, len(gallery.subjects))))
        if digest_next != gallery.digest or rows_next != len(gallery.subjects):
            raise status.Aborted(
                "The identify committee's galleries differ (an enrolment, delete or refresh is in flight).")
        query.party = party = mpc.Party(position, key_next, key_prev, query.query_id.encode(), query.exchange)
        rows = len(gallery.subjects)
        if rows == 0:
            return identify_pb2.IdentifyQueryResponse(bits=b"", rows=0, gallery_digest=gallery.digest, audit_seq=seq)
        y = mpc.score_shares(gallery.values, probe, mpc.lagrange(xs, position))
        z = mpc.rerandomise(y, key_next, key_prev, query.query_id.encode())
        record.wipe(y, probe)
        party.share_input(z)
        record.wipe(z)
        bits = party.threshold_bits(int(start.threshold), dimension)
        return identify_pb2.IdentifyQueryResponse(bits=bits, rows=rows, gallery_digest=gallery.digest, audit_seq=seq)

    # --- Verify on shares ---------------------------------------------------------------

    def _start_verify(self, query: _Query, actor: str, committee: list[str], xs: tuple, position: int,
                      dimension: int) -> identify_pb2.IdentifyQueryResponse:
        """Verify on shares, first half: the claimed subject's row as a one-row gallery.

        Answers this node's re-randomised additive share of |t|^2; the score
        share waits (``query.verify_z``) for the matcher's share of -T.
        """
        start = query.start
        body, ahead, commit = self._authorise_verify(actor, start, committee, dimension)
        query.body = body
        gallery = key_prev = unsent = None
        if ahead is not None and ahead.threshold == mpc.THRESHOLD:
            # Round 0 goes out before the audit entry commits (a fresh key and
            # the row's digest: nothing of the template), so the hop to the
            # peer overlaps the commit; the peer's is taken after it. A link
            # that fails here fails the query after the entry is committed.
            gallery, key_prev = _one_row(ahead, dimension), mpc.new_pair_key()
            try:
                query.send(0, _hello(key_prev, gallery.digest, 1))
            except status.RpcError as exc:
                unsent = exc
        seq, row = commit()
        if unsent is not None:
            raise unsent
        if row.threshold != mpc.THRESHOLD:
            raise status.FailedPrecondition("The subject's record is not shared with threshold 2.")
        if gallery is None or gallery.versions != (_row_version(row),):
            raise status.Aborted("The subject's record changed during the verification; try again.")
        query.gallery = gallery
        try:
            probe = record.unpack_values(start.probe_share, dimension)
        except InvalidShares:
            raise status.InvalidArgument("The probe share holds a value outside the field.") from None
        label = query.query_id.encode()
        template = Galleries._open(self.sh, self.sh.keys.kek, row)
        values = mpc.compute_form(template[np.newaxis, :])
        lam = mpc.lagrange(xs, position)
        y = n = norm = None
        try:
            # <t_j, q_j> and <t_j, t_j>, times lambda_j: additive shares of s and |t|^2 (degree 2),
            # computed while the successor's round 0 is on its way.
            y = mpc.score_shares(values, probe, lam)
            n = mpc.score_shares(values, template, lam)
            key_next, digest_next, rows_next = _unhello(query.take(0))
            if digest_next != gallery.digest or rows_next != 1:
                raise status.Aborted("The committee holds different records of the subject (a refresh is in flight).")
            query.party = mpc.Party(position, key_next, key_prev, label, query.exchange)
            query.verify_z = mpc.rerandomise(y, key_next, key_prev, label)
            norm = mpc.rerandomise(n, key_next, key_prev, label + b"/norm")
            share = norm.astype("<u4").tobytes()
        finally:
            record.wipe(values, template, probe, y, n, norm)
        return identify_pb2.IdentifyQueryResponse(rows=1, gallery_digest=gallery.digest, audit_seq=seq,
                                                  epoch=row.epoch, norm_share=share)

    def _verify_bits(self, query: _Query, step: identify_pb2.IdentifyVerifyThreshold) -> identify_pb2.IdentifyQueryResponse:
        """Verify on shares, second half: [s - T >= 0], this node's and its successor's shares of -T added to
        its score share and its copy of the successor's (exchanged in the input round)."""
        if not query.verify_pending or query.party is None:
            raise status.FailedPrecondition("The verify threshold comes once, after the start of a verification.")
        query.verify_pending = False
        try:
            share = record.unpack_values(step.share, 1)
            succ = record.unpack_values(step.next_share, 1)
        except InvalidShares:
            raise status.InvalidArgument("The threshold shares are not one field element each.") from None
        query.party.add_inputs(share, succ)
        record.wipe(share, succ)
        return identify_pb2.IdentifyQueryResponse(bits=query.party.sign_bits(int(query.start.dimension)))

    def _authorise_verify(self, actor: str, start, committee: list[str], dimension: int):
        """The provider's VERIFY ticket checked here as ReleaseShare checks it (same replay set and
        per-subject attempt counters): (ticket body, the subject's newest row as read now or None,
        ``commit``). ``commit()`` commits one ``verify_on_shares`` entry with the newest row it reads
        then and gives (its seq, that row), or raises the refusal it committed."""
        from shareholders.service import _CLAIM_CHARS, Refused  # service imports this module

        sh = self.sh
        ticket = start.ticket
        claimed = wire.ticket_body(ticket.body) or tickets.TicketBody()
        keys = self.cfg.tenants.get(claimed.tenant)
        details = {"query_id": start.query_id, "committee": committee, "dimension": dimension}
        unverified = {"call": "verify_on_shares", "counted": False, "claimed_tenant": claimed.tenant[:_CLAIM_CHARS],
                      "claimed_subject": claimed.subject[:_CLAIM_CHARS], **details}
        if keys is None:
            sh._deny_now(actor, "unknown_tenant", status.PermissionDenied(
                "The verification ticket names a tenant not registered at this node."), details=unverified)
        try:
            body = wire.verify_ticket(ticket, keys, tenant=claimed.tenant, audience=self.cfg.cluster_id,
                                      operations=(tickets.VERIFY,))
        except InvalidTicket as exc:
            sh._deny_now(actor, "invalid_ticket", status.PermissionDenied(str(exc)), details=unverified)
        if body.subject != start.verify_subject:
            sh._deny_now(actor, "invalid_ticket", status.PermissionDenied(
                "The verification ticket was issued for another subject."), details=unverified)
        tenant, subject, request_id = body.tenant, body.subject, body.request_id
        base = {"counted": True, "ticket_expires_ms": body.expires_at_ms, "key_id": ticket.key_id, **details}
        who = dict(actor=actor, tenant=tenant, subject=subject, request_id=request_id)
        sh.admit_verification(actor, tenant, subject, request_id, tickets.ticket_id(body), body.expires_at_ms, now_ms(),
                              base)

        def newest(db):
            rows = [r for r in db.subject_rows(tenant, subject) if r.epoch <= sh.serving_epoch and r.dimension == dimension]
            return rows[-1] if rows else None  # the newest epoch this node serves


        def job(tx: Tx):
            row = newest(tx.db)
            if row is None:
                entry = tx.append("deny", **who, details={**base, "reason": "not_found"})
                return Refused(status.NotFound("No share of this dimension is stored for this subject."),
                               "not_found", entry.seq)
            entry = tx.append("verify_on_shares", **who, details={**base, "epoch": row.epoch,
                                                                   **tickets.audit_details(ticket)})
            return entry.seq, row

        def commit() -> tuple[int, object]:
            seq, row = sh.commit(job)
            logs.event(self._log, "verify_on_shares", tenant=tenant, request_id=request_id,
                       query_id=start.query_id, audit_seq=seq)
            return seq, row

        return body, newest(sh.reader()), commit

    def _pairs(self, query: _Query, pairs: identify_pb2.IdentifyPairs) -> identify_pb2.IdentifyQueryResponse:
        if query.party is None or query.gallery is None or not query.gallery.subjects:
            raise status.FailedPrecondition("Pairs come after the match bits of a non-empty gallery.")
        first, second = list(pairs.first), list(pairs.second)
        most = mpc.MAX_CANDIDATES * (mpc.MAX_CANDIDATES - 1)
        if not first or len(first) != len(second) or len(first) > most:
            raise status.InvalidArgument(f"Pairs come as 1 to {most} (first, second) rows.")
        try:
            bits = query.party.pair_bits(list(zip(first, second, strict=True)), query.margin, int(query.start.dimension))
        except ValueError as exc:
            raise status.InvalidArgument(str(exc)) from None
        return identify_pb2.IdentifyQueryResponse(bits=bits)

    def _confirm(self, query: _Query, rows: list[int]) -> identify_pb2.IdentifyQueryResponse:
        """The subjects of the named candidate rows, made releasable once each under this query's ticket."""
        if query.party is None or query.gallery is None or not query.gallery.subjects or query.body is None:
            raise status.FailedPrecondition("Confirmation comes after the match bits of a non-empty gallery.")
        if query.confirmed:
            raise status.FailedPrecondition("This query's candidates were already named for confirmation.")
        if not 1 <= len(rows) <= mpc.CONFIRM_CANDIDATES or len(set(rows)) != len(rows):
            raise status.InvalidArgument(
                f"Confirmation names 1 to {mpc.CONFIRM_CANDIDATES} distinct rows.")
        if any(not 0 <= r < len(query.gallery.subjects) for r in rows):
            raise status.InvalidArgument("The row is outside the gallery.")
        subjects = [query.gallery.subjects[r] for r in rows]
        body = query.body
        self.sh.confirmations.offer(query.query_id, body.tenant, tickets.ticket_id(body), body.expires_at_ms,
                                    subjects, now_ms())
        query.confirmed = True
        return identify_pb2.IdentifyQueryResponse(subjects=subjects)

    def _authorise(self, actor: str, start, committee: list[str]) -> tuple[tickets.TicketBody, int]:
        """The IDENTIFY ticket checked here and the query's one audit entry committed."""
        ticket = start.ticket
        claimed = wire.ticket_body(ticket.body) or tickets.TicketBody()
        keys = self.cfg.tenants.get(claimed.tenant)
        why = None
        if keys is None:
            why = ("unknown_tenant", status.PermissionDenied("The identify ticket names a tenant not registered here."))
        else:
            try:
                body = wire.verify_ticket(ticket, keys, tenant=claimed.tenant, audience=self.cfg.cluster_id,
                                      operations=(tickets.IDENTIFY,))
            except InvalidTicket as exc:
                why = ("invalid_ticket", status.PermissionDenied(str(exc)))
            else:
                # The group searched is the signed one; a start naming another is refused, not widened.
                if start.group != body.group:
                    why = ("wrong_group", status.PermissionDenied(
                        "The identify ticket was issued for another group."))
        if why is None:
            verdict = self.guard.admit(body.tenant, "", tickets.ticket_id(body), body.expires_at_ms, now_ms())
            if verdict == "replayed":
                why = (verdict, status.PermissionDenied("The identify ticket was already used at this node."))
            elif verdict == "rate_limited":
                why = (verdict, status.ResourceExhausted("Too many identifications for this tenant; try again later."))
        details = {"query_id": start.query_id, "committee": committee, "dimension": int(start.dimension),
                   **({"group": start.group[:128]} if start.group else {})}
        if why is not None:
            self.sh._deny_now(actor, why[0], why[1], details={
                "call": "identify", "counted": False, "claimed_tenant": claimed.tenant[:128], **details})

        def job(tx: Tx):
            return tx.append("identify", actor=actor, request_id=body.request_id, tenant=body.tenant,
                             details={**details, "ticket_expires_ms": body.expires_at_ms, "key_id": ticket.key_id,
                                      **tickets.audit_details(ticket)}).seq

        seq = self.sh.commit(job)
        logs.event(self._log, "identify", tenant=body.tenant, request_id=body.request_id, query_id=start.query_id,
                   audit_seq=seq)
        return body, seq


def _is_query_id(value: str) -> bool:
    return isinstance(value, str) and 8 <= len(value) <= 64 and all(c.isalnum() or c == "-" for c in value)

