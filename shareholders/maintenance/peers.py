"""The node-to-node client: channels pinned to each member's certificate,
which addresses a session may dial, a peer caller's index and key, and how
far the other members got with a session.
"""
from __future__ import annotations

import logging
import threading

import grpc

from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx
from shareholders.config import ConfigError, load_peers
from shareholders.maintenance.sessions import KIND, PEER_STATE_TIMEOUT_S, RESHARE, STATE, load_session
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki
from vault import plan as committee_plan
from vaultrpc import logs, status
from vaultrpc.server import caller
from vaultrpc.tls import secure_channel

# One logger for every maintenance module (operators filter on it).
_log = logging.getLogger("shareholders.epochs")


class Peers:
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


def peer_error(name: str, exc: grpc.RpcError) -> status.RpcError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or "no details"
    cls = status.FailedPrecondition if code == grpc.StatusCode.FAILED_PRECONDITION else status.Unavailable
    return cls(f"Peer {name} did not deal its values ({getattr(code, 'name', 'UNKNOWN')}: {details.rstrip('.')}).")


class Gathered:
    """Calls started on peers (name -> future), taken one by one: a peer's
    gRPC error becomes ``peer_error``; leaving the ``with`` cancels every
    call still running (an early refusal stops the rest)."""

    def __init__(self, calls: dict):
        self.calls = calls

    def result(self, name: str):
        try:
            return self.calls[name].result()
        except grpc.RpcError as exc:
            raise peer_error(name, exc) from None

    def __iter__(self):
        for name in self.calls:
            yield name, self.result(name)

    def __enter__(self) -> "Gathered":
        return self

    def __exit__(self, *exc) -> None:
        for call in self.calls.values():
            call.cancel()


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


class PeerCalls:
    """Who this node talks to for a session, and who may talk to it."""

    def _check_peers(self, s: Session, peers, committee: dict[str, int]) -> dict[str, tuple[int, str]]:
        """name -> (index, address) for the session's members. A member in
        this node's own peer table is dialled at the table's address, and a
        request naming another address for it is refused (and logged): a
        silent fallback would hide a wrong or hostile orchestrator. A member
        the table does not know (a new member of a reshare) is dialled at the
        request's address; either way the channel accepts only that member's
        certificate (``Peers``).

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

        self.node.commit(job)
        raise status.InvalidArgument(message)

    # --- the node's committee: as recorded, else as configured -------------------------

    def _current_committee(self) -> tuple[dict[str, int], int, dict[str, str]]:
        """(members name -> index, threshold, operator keys hex) this node holds
        now: as recorded by its last committed session, else as its config
        founded it; ({}, 0, {}) when neither says."""
        recorded = self.node.reader().node_state().committee
        if recorded.get("members"):
            return (dict(recorded["members"]), int(recorded.get("threshold") or 0),
                    dict(recorded.get("operators") or {}))
        return dict(self.cfg.committee), int(self.cfg.committee_threshold), {}

    def _current_pins(self) -> dict[str, str]:
        return committee_pins(self.node.reader(), self.cfg)

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
        s = load_session(self.node.reader(), request.session_id)
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
            self.node.commit(job)
            raise status.PermissionDenied(
                f"The certificate presented as node {peer} does not carry the key this node pins for it.")
        return admin_pb2.GetSessionResponse(found=True, status=admin_pb2.SessionStatus(
            session_id=s.session_id, kind=KIND[s.kind], state=STATE[s.state]))

    def _known_addresses(self, s: Session) -> dict[str, str]:
        """Where this node reaches the session's members with no request to
        name them: its peer table, else where it dialled them in this session
        (or, in a reshare, the approved plan's address)."""
        try:
            table = load_peers(self.cfg)
        except ConfigError as exc:
            raise status.FailedPrecondition(f"This node cannot read its peer table: {exc}") from None
        with self._seeds_lock:
            dialled = dict(self._dialled.get(s.session_id, {}))
        table = {**dialled, **table}
        if s.kind == RESHARE:
            table = {**s.plan.addresses(), **table}
        return table

    def _member_states(self, s: Session, names) -> tuple[dict[str, int], list[str]]:
        """The session's state (SESSION_STATE_*; 0 where the member has no such
        session) on each named member other than this node, and the members
        it could not ask."""
        table = self._known_addresses(s)
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
        self.node.commit(job)
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
        self.node.commit(job)
        logs.event(_log, "reshare dealing refused", logging.WARNING, peer=peer, session=s.session_id)
        raise status.PermissionDenied(message)
