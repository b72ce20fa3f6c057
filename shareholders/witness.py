"""Signed audit checkpoints leave the node: publishing and witnessing.

A node's signed checkpoints live in its own SQLite file beside the entries
they cover, so whoever holds that file (and the node's audit key: its
operator) can cut signed entries together with their checkpoints, or
rewrite the chain and sign it again, and the file alone shows nothing.

So each checkpoint is also sent, as it is made, to every peer listed in the
node's config (``[[witness.peers]]``), and each peer records it in ITS OWN
audit chain as a ``witness`` entry (node, seq, head hash, time, signature),
after checking the signature under the key it pins for that node. The
auditor (``vaultctl audit verify``) then holds every node's chain to what its
peers witnessed: a witnessed head the chain no longer contains (shorter
chain, different hash) is a finding naming the node. Cutting signed entries
unseen now needs the databases AND audit keys of the node and of every peer
that witnessed them.

Publishing is asynchronous and best effort: ``Publisher.offer`` only notes
the newest checkpoint (called under the writer's commit lock, it never
blocks), and one thread per peer sends it, retrying with backoff while the
peer is down. Only the newest checkpoint needs to reach a peer: entry
``seq``'s hash covers every entry before it through the chain links.
Checkpoints a peer has not witnessed yet are a gauge
(``splitvault_node_witness_unpublished_checkpoints``); failed attempts a
counter. Nothing here can block or fail a store, a release or a delete.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Gauge

from shareholders.audit_log import Tx
from shareholders.config import WitnessPeer
from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from vault import audit, pki
from vaultrpc import logs, status, wire
from vaultrpc.tls import TlsMaterial, secure_channel

UNPUBLISHED = Gauge("splitvault_node_witness_unpublished_checkpoints",
                    "Signed audit checkpoints of this node a peer has not witnessed yet (retried).", ["node", "peer"])
PUBLISH_FAILURES = Counter("splitvault_node_witness_publish_failures_total",
                           "Failed attempts to publish a checkpoint to a peer.", ["node", "peer"])
THROTTLED = Counter("splitvault_node_witness_throttled_total",
                    "Peers' checkpoints refused for coming too fast (not recorded).", ["node", "peer"])
WITNESSED = Counter("splitvault_node_witnessed_checkpoints_total",
                    "Peers' signed checkpoints recorded in this node's audit log.", ["node", "peer"])

_log = logging.getLogger("shareholders.witness")
# Checkpoints recorded per peer: a burst, then a steady rate. Each recorded
# one is an audit entry (an fsync) at this node, and a peer holds its own
# audit key, so without a bound one node operator could sign checkpoints
# without end and fill its peers' disks and writers. An honest node signs
# one per 1000 entries or per interval and sends only the newest; refused
# ones (RESOURCE_EXHAUSTED) are retried with a newer checkpoint.
RECORD_BURST = 20
RECORD_PER_S = 2.0
# Retry after a failure: from the first delay, doubling up to the last.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
CALL_TIMEOUT_S = 5.0
# Answers that a retry of the same checkpoint cannot change.
_REFUSALS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                       grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})


# ---------------------------------------------------------------- receiving


class CheckpointWitness:
    """The ``WitnessCheckpoint`` handler's logic: check, then record."""

    def __init__(self, node: str, peers: dict[str, WitnessPeer], commit: Callable, deny: Callable,
                 pins: Callable[[], dict[str, str]] = dict):
        self.node = node
        # The committee's certificate-key pins (name -> SPKI SHA-256), read per call.
        self._pins = pins
        self._peers = peers
        self._commit = commit  # ShareholderService.commit
        self._deny = deny  # ShareholderService._deny_now: commits a deny entry, raises
        self._lock = threading.Lock()
        # peer -> (seq, entry_hash, audit seq) of the last checkpoint recorded: a retry is answered, not re-recorded.
        self._last: dict[str, tuple[int, bytes, int]] = {}
        # peer -> (tokens, monotonic time of the last refill): RECORD_BURST / RECORD_PER_S.
        self._bucket: dict[str, tuple[float, float]] = {}

    def _take(self, peer: str) -> bool:
        """One recording for ``peer`` if its bucket allows (call under the lock)."""
        now = time.monotonic()
        tokens, then = self._bucket.get(peer, (float(RECORD_BURST), now))
        tokens = min(float(RECORD_BURST), tokens + (now - then) * RECORD_PER_S)
        if tokens < 1.0:
            self._bucket[peer] = (tokens, now)
            return False
        self._bucket[peer] = (tokens - 1.0, now)
        return True

    def receive(self, request: shareholder_pb2.WitnessCheckpointRequest, who: pki.Identity | None,
                presented_spki: str = ""):
        actor = str(who)
        cp = request.checkpoint
        peer = self._peers.get(who.name) if who is not None and who.role == pki.ROLE_SHAREHOLDER else None
        claimed = {"claimed_node": cp.node[:128], "claimed_seq": min(cp.seq, 2**63 - 1), "counted": False}
        if peer is None:
            self._deny(actor, "witness_unknown_peer", status.PermissionDenied(
                "Only a peer named in this node's config may publish audit checkpoints here."), details=claimed)
        pinned = self._pins().get(peer.name)
        if pinned and presented_spki != pinned:
            self._deny(actor, "witness_pin_mismatch", status.PermissionDenied(
                f"The certificate presented as node {peer.name} does not carry the key this node's committee pins "
                "for it."), details={**claimed, "presented_spki_sha256": presented_spki})
        if cp.node != peer.name:
            self._deny(actor, "witness_other_node", status.PermissionDenied(
                "A node may publish only its own audit checkpoints."), details=claimed)
        if not 1 <= cp.seq < 2**63 or len(cp.entry_hash) != audit.HASH_BYTES or len(cp.signature) != 64:
            raise status.InvalidArgument(
                "The checkpoint needs a sequence number, a 32-byte hash and a 64-byte signature.")
        if not audit.checkpoint_valid(cp, peer.audit_key):
            self._deny(actor, "witness_bad_signature", status.PermissionDenied(
                "The checkpoint's signature does not verify under the audit key this node pins for its sender."),
                details=claimed)
        with self._lock:  # one at a time per node: a retry racing its original is recorded once
            last = self._last.get(peer.name)
            if last is not None and last[:2] == (cp.seq, cp.entry_hash):
                return shareholder_pb2.WitnessCheckpointResponse(audit_seq=last[2], already_witnessed=True)
            if not self._take(peer.name):
                THROTTLED.labels(self.node, peer.name).inc()
                raise status.ResourceExhausted(
                    f"Node {peer.name} publishes checkpoints faster than this node records them; send the newest later.")

            def job(tx: Tx) -> int:
                return tx.append(audit.WITNESS_EVENT, actor=actor, details=audit.witness_details(cp)).seq

            seq = self._commit(job)
            self._last[peer.name] = (cp.seq, bytes(cp.entry_hash), seq)
        WITNESSED.labels(self.node, peer.name).inc()
        return shareholder_pb2.WitnessCheckpointResponse(audit_seq=seq)


# ---------------------------------------------------------------- publishing


class Publisher:
    """Sends this node's newest signed checkpoint to every peer, with retry."""

    def __init__(self, node: str, peers: dict[str, WitnessPeer], tls: TlsMaterial):
        self.node = node
        self._peers = peers
        self._tls = tls
        self._cond = threading.Condition()
        self._latest: audit.AuditCheckpoint | None = None
        self._made = 0  # checkpoints offered so far
        self._acked: dict[str, int] = {name: 0 for name in peers}  # peer -> _made when it witnessed the newest
        self._closing = False
        self._threads: list[threading.Thread] = []
        for name in peers:
            UNPUBLISHED.labels(node, name).set(0)

    def offer(self, cp: audit.AuditCheckpoint) -> None:
        """Note a new signed checkpoint (never blocks: called under the commit lock)."""
        with self._cond:
            self._latest = cp
            self._made += 1
            for name in self._peers:
                UNPUBLISHED.labels(self.node, name).set(self._made - self._acked[name])
            self._cond.notify_all()

    def start(self) -> None:
        for name, peer in self._peers.items():
            thread = threading.Thread(target=self._run, args=(peer,), name=f"witness-{self.node}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def unpublished(self) -> dict[str, int]:
        """Peer -> checkpoints it has not witnessed yet."""
        with self._cond:
            return {name: self._made - acked for name, acked in self._acked.items()}

    def close(self, flush_s: float = 2.0) -> None:
        """Give the peers up to ``flush_s`` to witness the newest checkpoint (the
        one signed at shutdown), then stop; what is left is sent at next start."""
        deadline = time.monotonic() + flush_s
        with self._cond:
            while any(acked < self._made for acked in self._acked.values()) and self._threads:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=0.2)

    def _run(self, peer: WitnessPeer) -> None:
        channel: grpc.Channel | None = None
        address = None
        delay = RETRY_FIRST_S
        failing = False
        try:
            while True:
                with self._cond:
                    while not self._closing and self._acked[peer.name] >= self._made:
                        self._cond.wait()
                    if self._closing:
                        return
                    cp, made = self._latest, self._made
                error, refused = None, False
                try:
                    now = self._address(peer)
                    if now != address or channel is None:
                        if channel is not None:
                            channel.close()
                        channel = secure_channel(now, self._tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, peer.name))
                        address = now
                    stub = shareholder_pb2_grpc.ShareholderStub(channel)
                    stub.WitnessCheckpoint(shareholder_pb2.WitnessCheckpointRequest(checkpoint=wire.checkpoint_message(cp)),
                                           timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as exc:
                    error = exc.code().name
                    refused = exc.code() in _REFUSALS
                except (OSError, ValueError) as exc:
                    error = f"no address: {type(exc).__name__}"
                if error is None:
                    with self._cond:
                        self._acked[peer.name] = max(self._acked[peer.name], made)
                        UNPUBLISHED.labels(self.node, peer.name).set(self._made - self._acked[peer.name])
                        self._cond.notify_all()
                    if failing:
                        logs.event(_log, "checkpoint witnessed after retries", node=self.node, peer=peer.name,
                                   seq=cp.seq)
                    failing, delay = False, RETRY_FIRST_S
                    continue
                PUBLISH_FAILURES.labels(self.node, peer.name).inc()
                if not failing:
                    logs.event(_log, "checkpoint not witnessed yet; retrying", logging.WARNING, node=self.node,
                               peer=peer.name, seq=cp.seq, error=error)
                failing = True
                # A refusal (the peer does not list this node, or runs without the
                # RPC) is not retried, each try being a deny entry there: the next
                # checkpoint tries again.
                until = time.monotonic() + delay
                with self._cond:  # until the delay is up (never after a refusal), a newer checkpoint comes, or closing
                    while not self._closing and self._made == made:
                        left = until - time.monotonic()
                        if not refused and left <= 0:
                            break
                        self._cond.wait(None if refused else left)
                    if self._closing:
                        return
                delay = min(delay * 2, RETRY_MAX_S)
        finally:
            if channel is not None:
                channel.close()

    @staticmethod
    def _address(peer: WitnessPeer) -> str:
        if peer.address is not None:
            return peer.address
        assert peer.ready_file is not None
        address = json.loads(peer.ready_file.read_text()).get("address")
        if not isinstance(address, str) or not address:
            raise ValueError("no address in the ready file")
        return address
