"""Prepare, the receiving side: a refresh's y + sum of deltas and a reshare's
recombined values, written sealed beside the old epoch (with the refresh
check's sealed new-minus-old batches), in pipelined chunks.
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator

import grpc
import numpy as np

from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx, WriterClosed, now_ms
from shareholders.maintenance.peers import Gathered, peer_error
from shareholders.maintenance.sessions import (
    BEGUN, CHUNK, COMMITTED, FINALIZED, Pace, PEER_TIMEOUT_S, PIPELINE, PREPARED, REFRESH, REFRESH_CHUNK,
    WRITE_CHUNK, diff_aad, key_lines, load_session, renewal_tag, row_fingerprint,
)
from splitvault.v1 import admin_pb2
from vault import envelope, epoch_mac, field, proactive, record
from vault.errors import EnvelopeError, InvalidShares
from vault.field import FIELD_DTYPE, P
from vaultrpc import status
from vaultrpc.server import caller


def _store_diff(db: storage.Database, ring, session_id: str, items: list[storage.ShareRow], diff: np.ndarray) -> None:
    """Seal one prepared batch's new-minus-old values (for the check) beside
    its rows, with the new rows' fingerprints."""
    width = int(diff.shape[1])
    keys_json = json.dumps([[i.tenant, i.subject] for i in items], separators=(",", ":"))
    prints = b"".join(row_fingerprint(i.wrapped_dk, i.nonce, i.ciphertext) for i in items)
    first = items[0].key
    sealed = envelope.seal(ring, diff_aad(session_id, first, width, keys_json, prints), diff.astype("<u4").tobytes())
    db.put_check_batch(storage.CheckBatch(session_id, *first, width, keys_json, prints, sealed))


class PrepareSteps:
    """PrepareSession: the new epoch's rows on this node."""

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
            pace = Pace(request.max_records_per_s)
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
                        inflight.append(self.node.writer.submit(self._prepared_job(
                            s, items[lo : lo + WRITE_CHUNK], actor, check_old=True, diff=diff[lo : lo + WRITE_CHUNK])))
                while len(inflight) > 4:
                    done += self._settle(inflight.popleft())
                    yield admin_pb2.PrepareSessionResponse(done=done, total=total)
            while inflight:
                done += self._settle(inflight.popleft())
            final = self.node.commit(self._prepared_state_job(s, actor))
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
                keys = [(r.tenant, r.subject) for r in members]
                # The renewal values first: computed here from rows opened
                # once, or already computed by a peer's call, which opened
                # the same rows and left them for this prepare.
                record.wipe(self._renewal_values(s, seed, k, width, keys, None, self.index,
                                                 opener=lambda m=members, w=width: self._open_chunk(m, w)))
                old = self._take_opened(renewal_tag(s.session_id, width, keys))
                if old is None:  # evicted meanwhile: open them again
                    old = self._open_chunk(members, width)
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
        ring = self.node.keys.kek
        try:
            for k, width, rows, calls, old in chunk:
                out: list[tuple] = []
                keys = [(r.tenant, r.subject) for r in rows]
                scratch = [old]  # opened at launch (_open_chunk)
                try:
                    deltas = [self._dealings.deltas(seed, s.session_id, keys, k, width, self.index,
                                                    frozenset(s.plan.new.values()))]
                    scratch.extend(deltas)
                    for name, reply in Gathered(calls):  # cancelled with the chunk, below
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
                    identity = record.record_identity
                    sealed_rows = envelope.seal_many(
                        ring, [identity(row.tenant, row.subject, row.index, s.new_epoch) for row in rows],
                        list(packed))  # row views: each copied to bytes only as it is sealed
                    make = storage.ShareRow.of
                    out.extend(make((row.tenant, row.subject, s.new_epoch, row.index, row.threshold, row.shareholders,
                                     row.dimension, row.codec_version, row.mac_count, row.request_id, *sealed,
                                     stored_ms, row.group))
                               for row, sealed in zip(rows, sealed_rows))
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
            values = envelope.open_parts(
                self.node.keys.kek, record.record_identity(row.tenant, row.subject, row.index, row.epoch),
                row.kek_version, row.wrapped_dk, row.nonce, row.ciphertext,
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
                    _store_diff(db, self.node.keys.kek, s.session_id, kept, values)
                finally:
                    record.wipe(values)
            if kept:
                tx.append("epoch_prepare_batch", actor=actor, request_id=s.session_id, details={
                    "kind": s.kind, "new_epoch": s.new_epoch, "records": len(kept),
                    "records_sha256": key_lines(i.key for i in kept),
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
            final = self.node.commit(self._prepared_state_job(s, actor, check_complete=False))
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
            ring = self.node.keys.kek
            inflight: list = []
            more = True
            pace = Pace(request.max_records_per_s)
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
                    raise peer_error(lead_name, exc) from None
                more = page.more
                if not page.items:
                    break
                keys = [admin_pb2.RecordKey(tenant=i.tenant, subject=i.subject) for i in page.items]
                answers = {lead_name: {(i.tenant, i.subject): i for i in page.items}}
                with Gathered({
                    name: self.peers.stub(name, peers[name][1]).GetReshareShares.future(
                        admin_pb2.GetReshareSharesRequest(session_id=s.session_id, keys=keys), timeout=PEER_TIMEOUT_S)
                    for _, name in senders[1:]
                }) as replies:
                    for name, reply in replies:
                        answers[name] = {(i.tenant, i.subject): i for i in reply.items}
                cursor = (page.items[-1].tenant, page.items[-1].subject)
                pace.count += len(page.items)
                rows, chunk_skipped = self._reshare_rows(s, page.items, answers, senders, xs, k_new, n_new, ring)
                skipped += chunk_skipped
                for lo in range(0, len(rows), WRITE_CHUNK):
                    inflight.append(self.node.writer.submit(
                        self._prepared_job(s, rows[lo : lo + WRITE_CHUNK], actor, check_old=False)))
                while len(inflight) > 4:
                    done += self._settle(inflight.pop(0))
                    yield admin_pb2.PrepareSessionResponse(done=done)
            while inflight:
                done += self._settle(inflight.pop(0))
            final = self.node.commit(self._prepared_state_job(s, actor, skipped=skipped, check_complete=False))
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
                or p.group != item.group or p.threshold > len(senders) or len(p.values) != 4 * width
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
                        sealed.wrapped_dk, sealed.nonce, sealed.ciphertext, stored_ms, item.group))
            finally:
                record.wipe(stacked, new)
        return rows, skipped
