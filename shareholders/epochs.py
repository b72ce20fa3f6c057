"""The node's side of proactive refresh and resharing: ``splitvault.v1.ShareholderAdmin``.

This module is the servicer: its roles, its worker threads, and the caches
its steps share. The steps live in ``shareholders.maintenance`` (one module
per concern: sessions, peers, prepare, dealing, checks, mac_keys).

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

import logging
import os
import queue
import threading
from concurrent import futures

import numpy as np

from shareholders.maintenance.checks import CheckSteps
from shareholders.maintenance.dealing import Dealings, DealingAnswers
from shareholders.maintenance.mac_keys import MacKeySteps
from shareholders.maintenance.peers import PeerCalls, Peers
from shareholders.maintenance.prepare import PrepareSteps
from shareholders.maintenance.sessions import PIPELINE, WORKER_NICE, SessionSteps
from splitvault.v1 import admin_pb2_grpc
from vault import pki
from vault import plan as committee_plan
from vaultrpc import logs

# One logger for every maintenance module (operators filter on it).
_log = logging.getLogger("shareholders.epochs")

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


class MaintenanceService(SessionSteps, PeerCalls, PrepareSteps, DealingAnswers, CheckSteps, MacKeySteps,
                         admin_pb2_grpc.ShareholderAdminServicer):
    """Refresh and reshare sessions on one node. Its node context is ``self.node``,
    the node's ``ShareholderService`` (writer, keys, reader connections), used
    only through its public methods; the steps come from the classes it
    inherits, one per module of ``shareholders.maintenance``."""

    def __init__(self, shareholder):
        self.node = shareholder
        self.cfg = shareholder.cfg
        self.name = shareholder.name
        self.index = shareholder.index
        self.peers = Peers(self.cfg.tls.load())
        self._dealings = Dealings(size=4 * PIPELINE)
        # The cluster a committee-change plan must name as its audience.
        with open(self.cfg.tls.ca, "rb") as fh:
            self.audience = committee_plan.audience_for(fh.read(), self.cfg.cluster_id)
        self._seeds: dict[str, bytes] = {}
        self._seeds_lock = threading.Lock()
        self._keys_cache: tuple | None = None  # (session id, count), keys, hashes: see _held_keys
        self._held_lock = threading.Lock()  # one listing of the held keys at a time (the others wait for it)
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
        # The old shares a renewal computation opened, kept (PRODUCT_CACHE at
        # most, wiped when evicted) until this node's own prepare takes them.
        self._opened_rows: dict[tuple, np.ndarray] = {}
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


def _lower_priority() -> None:
    # Linux schedules threads as tasks: nice this worker thread only.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (OSError, AttributeError):
        pass
