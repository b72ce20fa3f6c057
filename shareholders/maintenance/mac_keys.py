"""The epoch MAC key on a node: the first key's joint dealing
(``DealFirstMacKey`` / ``GetMacKeyContribution``), a refresh's new key (every
member's contribution summed), a reshare's copy of the key for new members.
"""
from __future__ import annotations

import os
import time
import dataclasses

import numpy as np

from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx, now_ms
from shareholders.maintenance.peers import Gathered
from shareholders.maintenance.sessions import (
    BEGUN, COMMITTED, DEFAULT_MAC_WIDTH, FINALIZED, KEY_WAIT_S, KEYGEN, KEYGEN_SESSION, PEER_TIMEOUT_S, Plan,
    PREPARED, REFRESH, describe, load_session, seed_aad,
)
from splitvault.v1 import admin_pb2
from vault import envelope, epoch_mac, proactive, record
from vault.errors import EnvelopeError, InvalidShares
from vaultrpc import status
from vaultrpc.server import caller


class MacKeySteps:
    """This node's MAC key shares: dealt, renewed, reshared."""

    # --- MAC keys: dealt, renewed, reshared (vault.epoch_mac) --------------------------

    def _mac_width(self, sid: str, request) -> int:
        """The width of a refresh's new MAC key: the current key's (the
        auditor may name it, not change it), else the one asked for."""
        db = self.node.reader()
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
        if self.node.reader().mac_keys().get(s.new_epoch) is not None:
            self._new_key(s)
            return
        k, width = s.plan.new_threshold, s.plan.mac_width
        if width < 1:
            raise status.FailedPrecondition(f"Session {s.session_id} names no MAC key width; start a new session.")
        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, mac_key=True)
        row = self._summed_key_share(seed, s.new_epoch, k, width, s.session_id, peers,
                                     lambda stub: stub.GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S),
                                     lambda reply: reply.renewal)

        def job(tx: Tx):
            cur = load_session(tx.db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            tx.db.insert_mac_key(row, now_ms())
            tx.append("mac_key_dealt", actor=actor, request_id=s.session_id, details={
                "kind": s.kind, "epoch": s.new_epoch, "width": width, "threshold": k,
                "from": sorted(set(peers) | {self.name}),
            })

        self.node.commit(job)
        self._new_key(s)

    def _summed_key_share(self, seed: bytes, epoch: int, k: int, width: int, session_id: str, peers, pull,
                          read) -> storage.MacKeyRow:
        """This node's key share, sealed: the sum of its own contribution beta_i(i) and every
        peer's beta_j(i) (``pull`` makes a peer's call from its stub, ``read`` takes the values
        from its reply). The calls are cancelled and every part wiped, whatever happens."""
        parts = [epoch_mac.key_contribution(seed, epoch, k, width, self.index)]
        key = None
        try:
            with Gathered({name: pull(self.peers.stub(name, addr))
                           for name, (_, addr) in peers.items() if name != self.name}) as replies:
                for name, reply in replies:
                    values = read(reply)
                    if len(values) != 4 * epoch_mac.TAG_COUNT * width:
                        raise status.Unavailable(f"Peer {name} dealt a MAC key contribution of the wrong length.")
                    try:
                        part = record.unpack_values(values, epoch_mac.TAG_COUNT * width)
                    except InvalidShares:
                        raise status.Unavailable(f"Peer {name} dealt values outside the field.") from None
                    parts.append(part.reshape(epoch_mac.TAG_COUNT, width))
            key = epoch_mac.key_share(parts)
            return self.node.seal_mac_key(epoch, k, key, session_id)
        finally:
            record.wipe(key, *parts)

    def _new_key(self, s: Session) -> np.ndarray:
        """This node's share of the session's new key, (L, width). When a peer
        needs it before this node's own prepare dealt it, the node deals it now
        if its peer table names every member (it never dials an address a
        caller gives); otherwise it waits (up to KEY_WAIT_S) for its prepare."""
        if (s.session_id not in self._new_keys and self.node.reader().mac_keys().get(s.new_epoch) is None
                and self.name in s.plan.new):
            peers = self._check_peers(s, [], s.plan.new)
            if set(s.plan.new) <= set(peers) | {self.name}:
                with self._deal_lock:
                    if self.node.reader().mac_keys().get(s.new_epoch) is None:
                        self._deal_new_key(s, self._seed(s), peers, s.actor)
        deadline = time.monotonic() + KEY_WAIT_S
        with self._key_cond:
            while True:
                key = self._new_keys.get(s.session_id)
                if key is not None:
                    return key
                row = self.node.reader().mac_keys().get(s.new_epoch)
                if row is not None:
                    try:
                        key = self.node.open_mac_key(row)
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

    def _forget_new_key(self, session_id: str) -> None:
        """Wipe a finished session's new key share kept for its peers' calls."""
        with self._key_cond:
            record.wipe(self._new_keys.pop(session_id, None))

    def _old_key(self, s: Session) -> np.ndarray:
        row = self.node.reader().mac_keys().get(s.from_epoch)
        if row is None:
            raise status.FailedPrecondition(
                f"Node {self.name} holds no MAC key share of epoch {s.from_epoch}; it cannot renew tags.")
        try:
            return self.node.open_mac_key(row)
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
        self.node.commit(job)
        return admin_pb2.GetRefreshDeltasResponse(renewal=values)

    def _reshare_key(self, s: Session, senders, peers, actor: str) -> None:
        """A new member's share of the key, reshared by the senders (the key
        itself is unchanged; the next refresh renews it)."""
        if self.node.reader().mac_keys().get(s.new_epoch) is not None:
            return
        req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, mac_key=True)
        parts, width = [], None
        key = None
        try:
            with Gathered({name: self.peers.stub(name, peers[name][1]).GetReshareShares.future(
                    req, timeout=PEER_TIMEOUT_S) for _, name in senders}) as calls:
                for _, name in senders:
                    reply = calls.result(name)
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
            row = self.node.seal_mac_key(s.new_epoch, s.plan.new_threshold, key, s.session_id)
        finally:
            record.wipe(key, *parts)

        def job(tx: Tx):
            cur = load_session(tx.db, s.session_id)
            if cur is None or cur.state != BEGUN:
                raise status.FailedPrecondition(f"Session {s.session_id} is no longer being prepared on this node.")
            tx.db.insert_mac_key(row, now_ms())
            tx.append("mac_key_dealt", actor=actor, request_id=s.session_id, details={
                "kind": s.kind, "epoch": s.new_epoch, "width": width, "threshold": s.plan.new_threshold,
                "from": [name for _, name in senders]})
        self.node.commit(job)

    def _reshare_key_deal(self, s: Session, peer: str, x: int):
        """A sender's re-sharing of its key share for new member x."""
        row = self.node.reader().mac_keys().get(s.from_epoch)
        if row is None:
            raise status.FailedPrecondition(f"Node {self.name} holds no MAC key share of epoch {s.from_epoch}.")
        try:
            key = self.node.open_mac_key(row)
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
        self.node.commit(job)
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
        ring = self.node.keys.kek

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
                    f"Another maintenance session is open on this node: {describe(current)}; finish it first.")
            if not width:
                raise status.FailedPrecondition(f"Node {self.name} has not begun dealing its first MAC key.")
            sid = f"keygen-{epoch}-{os.urandom(6).hex()}"
            plan = {"epoch": epoch, "width": width, "threshold": k, "committee": members}
            seed = proactive.new_seed()
            sealed = envelope.seal(ring, seed_aad(self.name, sid), seed)
            now = now_ms()
            db.begin_session(sid, KEYGEN, actor, plan, BEGUN, now, epoch=epoch, seed=sealed)
            tx.append("maintenance_begin", actor=actor, request_id=sid, details={
                "kind": KEYGEN, "epoch": epoch, "width": width, "threshold": k,
                "committee": [f"{n}={i}" for n, i in sorted(members.items(), key=lambda x: x[1])]})
            return sid, plan

        sid, plan = self.node.commit(job)
        if sid is None:
            return "", self.node.reader().node_state().current_epoch, 0, k, b""
        keygen = self.node.reader().get_session(sid)
        try:
            seed = envelope.open(ring, seed_aad(self.name, sid), keygen.sealed_seed)
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
            row = self.node.reader().mac_keys().get(epoch)
            return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=row.width if row else 0, already=True)
        if self.node.reader().mac_keys().get(epoch) is not None:
            return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=width, already=True)
        members = self._current_committee()[0]
        probe = dataclasses.replace(KEYGEN_SESSION, session_id=sid, actor=actor)
        peers = self._check_peers(probe, request.peers, members)
        missing = sorted(set(members) - set(peers) - {self.name})
        if missing:
            raise status.InvalidArgument(f"The request gives no address for {', '.join(missing)}.")
        req = admin_pb2.GetMacKeyContributionRequest(epoch=epoch, width=width)
        row = self._summed_key_share(seed, epoch, k, width, sid, peers,
                                     lambda stub: stub.GetMacKeyContribution.future(req, timeout=PEER_TIMEOUT_S),
                                     lambda reply: reply.values)

        def job(tx: Tx):
            if tx.db.node_state().current_epoch != epoch:
                raise status.FailedPrecondition("The node's epoch moved on while its first MAC key was dealt.")
            tx.db.insert_mac_key(row, now_ms())
            tx.append("mac_key_dealt", actor=actor, request_id=sid, details={
                "kind": KEYGEN, "epoch": epoch, "width": width, "threshold": k, "from": sorted(members)})
        self.node.commit(job)
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

        epoch, width, finished = self.node.commit(job)
        return admin_pb2.DealFirstMacKeyResponse(epoch=epoch, width=width, already=not finished, finished=finished)

    def GetMacKeyContribution(self, request, context):
        who = caller(context)
        members = self._current_committee()[0]
        if who is None or who.name not in members or who.name == self.name:
            raise status.PermissionDenied(f"Node {getattr(who, 'name', '?')} is not a member of this node's committee.")
        peer, x = who.name, members[who.name]
        pins = self._current_pins()
        if pins:
            self._check_peer_key(dataclasses.replace(KEYGEN_SESSION, plan=Plan({}, {}, 2, 2, (), pins=pins)),
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
        self.node.commit(job)
        return admin_pb2.GetMacKeyContributionResponse(values=values)
