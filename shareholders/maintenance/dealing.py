"""What a node deals to its peers: refresh deltas (``Dealings``, one
derivation per chunk for every receiver), reshare values, the reshare
check's masks, and the MAC tag renewal values (one computation per chunk,
cached for this node and its peers).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx
from shareholders.maintenance.peers import Gathered, presented_spki
from shareholders.maintenance.sessions import (
    BEGUN, CHUNK, COMMITTED, MASK_NEW, MASK_OLD, MAX_CHALLENGES, MAX_KEYS, PEER_TIMEOUT_S, PREPARED,
    OPENED_CACHE, PRODUCT_CACHE, REFRESH, RESHARE, RESHARE_CHECK_MASKS, checked_challenges, key_lines, load_session, mask_aad,
    renewal_tag,
)
from splitvault.v1 import admin_pb2
from vault import envelope, epoch_mac, names, proactive, record
from vault.errors import EnvelopeError, InvalidShares
from vault.field import FIELD_DTYPE, P
from vaultrpc import status


class Dealings:
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


class DealingAnswers:
    """GetRefreshDeltas / GetReshareShares answers and the values behind them."""

    def _forget_dealt(self, session_id: str) -> None:
        """Wipe a finished session's cached renewal values, drop the held keys (caller holds ``_seeds_lock``)."""
        self._keys_cache = None
        for cache in (self._products_cache, self._opened_rows):
            for tag in [t for t in cache if t[0] == session_id]:
                record.wipe(cache.pop(tag))

    def GetRefreshDeltas(self, request, context):
        if request.mac_key:
            # Cheap and answered here (not in the worker pool), so that a node
            # dealing its key is never queued behind calls waiting for it.
            return self._key_deal(request, context)
        if request.check_answer:
            return self._refresh_check_answer(request, context)
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
        # One pass over the repeated field (indexing it per key is slow).
        asked = [(key.tenant, key.subject, key.threshold, key.width) for key in request.keys]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, k, width) in enumerate(asked):
            if not 2 <= k <= names.MAX_SHAREHOLDERS or not 1 <= width <= 70_000:
                raise status.InvalidArgument("A record key has an invalid threshold or width.")
            groups.setdefault((k, width), []).append(i)
        values = [None] * len(asked)
        renewal = [b""] * len(asked)
        # One group (every key of one shape, the usual case): each answer is
        # the whole array's bytes, not one bytes object per record.
        whole = len(groups) == 1
        for (k, width), positions in groups.items():
            keys = [asked[i][:2] for i in positions]
            deltas = self._dealings.deltas(seed, s.session_id, keys, k, width, x, frozenset(s.plan.new.values()))
            packed = deltas.astype("<u4")
            if whole:
                values = [packed.tobytes()]
            else:
                for j, i in enumerate(positions):
                    values[i] = packed[j].tobytes()
            record.wipe(deltas, packed)
            if request.renew and self.index in self._renewers(s, k):
                g = self._renewal_values(s, seed, k, width, keys, None, x)
                packed = g.astype("<u4")
                if whole:
                    renewal = [packed.tobytes()]
                else:
                    for j, i in enumerate(positions):
                        renewal[i] = packed[j].tobytes()
                record.wipe(g, packed)
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
                    "records_sha256": key_lines(a[:2] for a in asked),
                })
            self.node.commit(job)
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
            challenges = checked_challenges(request.check_challenges)
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
        self.node.commit(job)
        return reply

    def _held_keys(self, s: Session) -> tuple[list[tuple[str, str]], np.ndarray]:
        """The keys this node holds in the session's old epoch, in key order, and their hashes.

        Cached per session and row count: during a session nothing is
        enrolled, so a deletion is the only change, and it lowers the count.
        Listed by one call at a time: the check's calls (this node's own and
        every peer's) arrive together, and the first one's listing serves all.
        """
        with self._held_lock:
            db = self.node.reader()
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
        db = self.node.reader()
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
                group=row.group,
            ))
        if items:
            def job(tx: Tx):
                tx.append("reshare_deal", actor=f"shareholder/{peer}", request_id=s.session_id, details={
                    "to": peer, "to_index": x, "records": len(items),
                    "records_sha256": key_lines((i.tenant, i.subject) for i in items),
                })
            self.node.commit(job)
        return admin_pb2.GetReshareSharesResponse(items=items, more=more)

    # --- the reshare check's masks, dealt at prepare (vault.proactive) ------------------

    def _load_mask(self, s: Session, which: str) -> np.ndarray | None:
        """This node's sealed check mask of the session (``which`` side), or None."""
        batch = self.node.reader().check_batch(s.session_id, ("", which), RESHARE_CHECK_MASKS)
        if batch is None:
            return None
        try:
            raw = envelope.open(self.node.keys.kek, mask_aad(s.session_id, which), batch.sealed)
            return record.unpack_values(raw, RESHARE_CHECK_MASKS)
        except (EnvelopeError, InvalidShares):
            raise status.DataLoss("This node's sealed reshare check mask does not open; abort the session.") from None

    def _seal_mask(self, s: Session, which: str, values: np.ndarray, actor: str, details: dict) -> np.ndarray:
        """Seal a check mask once: the first one sealed is the one used, even if
        a peer answered differently to a later computation."""
        sealed = envelope.seal(self.node.keys.kek, mask_aad(s.session_id, which), record.pack_values(values))

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
            self.node.commit(job)
        finally:
            record.wipe(values)
        return self._load_mask(s, which)

    def _old_mask(self, s: Session, peers=None, actor: str = "") -> np.ndarray:
        """R_m = sum_i rho_i(m) over every old member i (this one included),
        pulled node to node and sealed at prepare; a sender asked for its mask
        reshare before its own prepare computes it then, from its own peer table."""
        have = self._load_mask(s, MASK_OLD)
        if have is not None:
            return have
        with self._mask_lock:
            have = self._load_mask(s, MASK_OLD)
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
            try:
                with Gathered({n: self.peers.stub(n, peers[n][1]).GetReshareShares.future(req, timeout=PEER_TIMEOUT_S)
                               for n in s.plan.old if n != self.name}) as replies:
                    for name, reply in replies:
                        got = list(reply.check_masks)
                        if len(got) != RESHARE_CHECK_MASKS or any(v >= P for v in got):
                            raise status.Unavailable(f"Peer {name} dealt a reshare check mask of the wrong shape.")
                        parts.append(np.asarray(got, dtype=FIELD_DTYPE))
                mask = proactive.add_rows(*parts)
            finally:
                record.wipe(*parts)
            return self._seal_mask(s, MASK_OLD, mask, actor or f"shareholder/{self.name}",
                                   {"from": sorted(s.plan.old)})

    def _new_mask(self, s: Session, senders, peers, xs, actor: str) -> None:
        """R'_j = sum_{i in S} lambda_i r_i(j): the senders' reshare of their mask
        shares, combined like a record and sealed before any record is prepared."""
        if self._load_mask(s, MASK_NEW) is not None:
            return
        req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, check_mask_reshare=True)
        stacked = np.empty((len(senders), 1, RESHARE_CHECK_MASKS), dtype=FIELD_DTYPE)
        try:
            with Gathered({name: self.peers.stub(name, peers[name][1]).GetReshareShares.future(
                    req, timeout=PEER_TIMEOUT_S) for _, name in senders}) as calls:
                for a, (_, name) in enumerate(senders):
                    got = list(calls.result(name).check_masks)
                    if len(got) != RESHARE_CHECK_MASKS or any(v >= P for v in got):
                        raise status.Unavailable(f"Sender {name} dealt a reshare check mask of the wrong shape.")
                    stacked[a, 0] = got
            mask = proactive.combine(xs, stacked)[0]
        finally:
            record.wipe(stacked)
        self._seal_mask(s, MASK_NEW, mask, actor, {"from": [name for _, name in senders]})

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
        self.node.commit(job)
        return admin_pb2.GetReshareSharesResponse(check_masks=[int(v) for v in values])

    def _mask_reshare(self, s: Session, peer: str, x: int):
        mask = self._old_mask(s)
        values = proactive.reshare_mask_values(self._seed(s), s.session_id, mask, s.plan.new_threshold, x)

        def job(tx: Tx):
            tx.append("reshare_check_deal", actor=f"shareholder/{peer}", request_id=s.session_id,
                      details={"to": peer, "to_index": x, "step": "mask_reshare", "slots": RESHARE_CHECK_MASKS})
        self.node.commit(job)
        try:
            return admin_pb2.GetReshareSharesResponse(check_masks=[int(v) for v in values])
        finally:
            record.wipe(mask, values)

    def _open_rows(self, s: Session, keys: list[tuple[str, str]], width: int) -> np.ndarray:
        """This node's old-epoch shares of ``keys`` (B, width); zeros for a record
        it no longer holds (deleted meanwhile: its renewal is never used)."""
        lo, hi = min(keys), max(keys)
        rows = {r.key: r for r in self.node.reader().rows_between(s.from_epoch, lo, hi)}
        size = 4 * width
        opened = bytearray(size * len(keys))
        raw = np.frombuffer(opened, dtype="<u4").reshape(len(keys), width)
        held = []
        try:
            for j, key in enumerate(keys):
                row = rows.get(key)
                if row is None:
                    continue
                if row.dimension + row.mac_count != width:
                    raise status.InvalidArgument(
                        f"A record key's width ({width}) is not that of the record this node holds for it.")
                opened[j * size : (j + 1) * size] = self._open_bytes(row, size)
                held.append((j, row))
            out = raw.astype(FIELD_DTYPE)
        finally:
            record.wipe(raw)
        bad = np.flatnonzero((out >= P).any(axis=1)) if out.size else ()
        if len(bad):
            record.wipe(out)
            raise self._data_loss(next(row for j, row in held if j == int(bad[0])))
        return out

    def _renewal_values(self, s: Session, seed: bytes, k: int, width: int, keys, old: np.ndarray | None,
                        x: int, opener=None) -> np.ndarray:
        """g_j(x) of this node's product values h_j = [t]_j + <[b']_j - [b]_j, [s]_j>
        for each record (B, L). Computed once per chunk for every member (one
        coefficient derivation), for this node's own prepare and its peers'
        calls alike; ``old`` is this node's opened old shares when it has them,
        else ``opener()`` (default: read and open them here) opens them, and
        they are kept for this node's own prepare of the chunk
        (``_take_opened``): each row is opened once per prepare, whichever
        call comes first."""
        tag = renewal_tag(s.session_id, width, keys)
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
            return self._renewal_values(s, seed, k, width, keys, old, x, opener)
        try:
            return self._compute_renewal(s, seed, k, width, keys, old, x, tag, members, opener)
        finally:
            with self._seeds_lock:
                self._computing.pop(tag).set()

    def _compute_renewal(self, s: Session, seed: bytes, k: int, width: int, keys, old, x: int, tag, members,
                         opener=None):
        d = width - epoch_mac.TAG_COUNT
        if old is not None:
            opened = old
        else:
            opened = opener() if opener is not None else self._open_rows(s, keys, width)
        old_key = self._old_key(s)
        new_key = self._new_key(s)
        cuts = [np.array(old_key[:, :d], order="C", copy=True), np.array(new_key[:, :d], order="C", copy=True)]
        h = None
        try:
            h = epoch_mac.product_share(opened, cuts[0], cuts[1])
            values = epoch_mac.renewal_values_at(seed, keys, s.new_epoch, k, h, members)
        except BaseException:
            if old is None:
                record.wipe(opened)
            raise
        finally:
            record.wipe(old_key, h, *cuts)
        with self._seeds_lock:
            kept = ((self._products_cache, values, PRODUCT_CACHE),
                    (self._opened_rows, opened if old is None else None, OPENED_CACHE))
            for cache, value, limit in kept:
                if value is None:
                    continue
                while len(cache) >= limit:
                    record.wipe(cache.pop(next(iter(cache))))
                cache[tag] = value
            return values[members.index(x)].copy()

    def _take_opened(self, tag) -> np.ndarray | None:
        """The chunk's old shares opened by whichever call computed its renewal
        values first, handed over once (the taker wipes them), or None."""
        with self._seeds_lock:
            return self._opened_rows.pop(tag, None)

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
                reply = Gathered(calls).result(name)  # the caller cancels the calls
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
