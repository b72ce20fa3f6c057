"""The checks a node answers between prepare and commit: the refresh check
(sealed new-minus-old batches, mixed challenges, joint masks), the reshare
check, and the renewal check of the new tags (math: ``vault.proactive``,
``vault.epoch_mac``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
from prometheus_client import Counter

from shareholders import storage
from shareholders.storage import MaintenanceSession as Session
from shareholders.audit_log import Tx
from shareholders.maintenance.peers import Gathered
from shareholders.maintenance.sessions import (
    BEGUN, CHECK_MMAP_BYTES, CLAIM_CLOCK_SLACK_MS, COMMITTED, FINALIZED, KEY_WAIT_S, MASK_NEW, MASK_OLD,
    PEER_STATE_TIMEOUT_S, PEER_TIMEOUT_S, PREPARED, REFRESH, RENEWAL_MASK, RENEWAL_MASK_TAGS, RESHARE,
    RESHARE_CHECK_MASKS, RESHARE_CHECK_PAGE, checked_challenges, diff_aad, keys_digest, load_session,
    row_fingerprint,
)
from splitvault.v1 import admin_pb2
from vault import envelope, epoch_mac, proactive, record
from vault.errors import EnvelopeError, InvalidShares
from vault.field import FIELD_DTYPE, P
from vaultrpc import logs, status
from vaultrpc.server import caller

# One logger for every maintenance module (operators filter on it).
_log = logging.getLogger("shareholders.epochs")

CHECKS = Counter("splitvault_node_refresh_checks_total", "Refresh check calls, by outcome.", ["node", "outcome"])


class CheckSteps:
    """CheckRefresh / CheckReshare and the renewal check, node side."""

    # --- the reshare check -------------------------------------------------------------

    def CheckReshare(self, request, context):
        return self._background(self._check_reshare, request, context)

    def _check_reshare(self, request, context):
        actor = str(caller(context))
        s = self._session(request.session_id, states=(PREPARED,))
        if s.kind != RESHARE:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a reshare.")
        challenges = checked_challenges(request.challenges)
        if len(challenges) > RESHARE_CHECK_MASKS:
            raise status.InvalidArgument(f"The reshare check takes at most {RESHARE_CHECK_MASKS} challenges.")
        mine = proactive.check_contribution(self._seed(s), s.session_id, challenges)
        if not request.contributions:
            def deal(tx: Tx):
                tx.append("reshare_check_deal", actor=actor, request_id=s.session_id,
                          details={"step": "contribution", "challenges": len(challenges)})
            self.node.commit(deal)
            reply = admin_pb2.CheckReshareResponse(contribution=mine)
            for epoch, committee, field_name in ((s.from_epoch, s.plan.old, "old_key_hashes"),
                                                 (s.new_epoch, s.plan.new, "new_key_hashes")):
                if self.name in committee:
                    keys = self.node.reader().epoch_keys(epoch)
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
        for which, epoch, committee in ((MASK_OLD, s.from_epoch, s.plan.old), (MASK_NEW, s.new_epoch, s.plan.new)):
            if self.name not in committee:
                continue
            mask = self._load_mask(s, which)
            if mask is None:
                raise status.FailedPrecondition(f"This node holds no reshare check mask of session {s.session_id}.")
            totals, records, digest = self._reshare_totals(epoch, mixed, exclude)
            totals = [(a + b) % P for a, b in zip(totals, self._key_totals(epoch, mixed))]
            values = [(t + int(m)) % P for t, m in zip(totals, mask)]
            record.wipe(mask)
            if which == MASK_OLD:
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
        self.node.commit(job)
        return reply

    def _my_check_answer(self, s: Session) -> admin_pb2.CheckReshareResponse | None:
        found = self.node.reader().event_details(s.started_ms - CLAIM_CLOCK_SLACK_MS, "reshare_check", s.session_id)
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

    def _commit_refusal(self, s: Session, actor: str, reason: str) -> status.RpcError:
        """Log and audit why this node will not commit the session unchecked."""
        kind = "reshare" if s.kind == RESHARE else "refresh"

        def job(tx: Tx):
            tx.append(f"{kind}_commit_refused", actor=actor, request_id=s.session_id, details={"reason": reason})
        self.node.commit(job)
        logs.event(_log, f"{kind} commit refused", logging.WARNING, session=s.session_id, reason=reason)
        return status.FailedPrecondition(
            f"Session {s.session_id} has not passed the {kind} check on node {self.name} ({reason}); "
            f"run the check (vaultctl {kind}) or roll it back.")

    def _members_answers(self, s: Session, actor: str, members: dict[str, int], mine, ask) -> dict:
        """This node's check answer and every other member's, asked node to node
        (``ask(stub)`` starts the call; the reply's ``check_answer``)."""
        if mine is None:
            raise self._commit_refusal(s, actor, "this node answered no check")
        known = self._known_addresses(s)
        missing = sorted(n for n in members if n != self.name and n not in known)
        if missing:
            raise self._commit_refusal(s, actor, f"no address for {', '.join(missing)}")
        answers = {self.name: mine}
        with Gathered({n: ask(self.peers.stub(n, known[n])) for n in members if n != self.name}) as replies:
            for name, reply in replies:
                if not reply.HasField("check_answer"):
                    raise self._commit_refusal(s, actor, f"{name} answered no check")
                answers[name] = reply.check_answer
        return answers

    def _require_check(self, s: Session, actor: str) -> None:
        """A reshare commits on a node only once the node itself has seen the
        check pass: its own answer and every other member's (asked node to
        node) for one context, the sides consistent and equal at 0."""
        def refuse(reason: str):
            return self._commit_refusal(s, actor, reason)

        req = admin_pb2.GetReshareSharesRequest(session_id=s.session_id, check_answer=True)
        answers = self._members_answers(
            s, actor, {**s.plan.old, **s.plan.new}, self._my_check_answer(s),
            lambda stub: stub.GetReshareShares.future(req, timeout=PEER_STATE_TIMEOUT_S))
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

    def _my_refresh_answer(self, s: Session) -> admin_pb2.CheckRefreshResponse | None:
        """This node's last answer to the session's refresh check (from its audit log), or None."""
        found = self.node.reader().event_details(s.started_ms - CLAIM_CLOCK_SLACK_MS, "refresh_check", s.session_id)
        if not found or "values" not in found[-1]:
            return None
        d = found[-1]
        return admin_pb2.CheckRefreshResponse(
            values=d["values"], records=d["records"], keys_sha256=d["keys_sha256"], context_sha256=d["context_sha256"],
            excluded=d["excluded"], call=d["call"], renewal_values=d["renewal_values"],
            renewal_context_sha256=d["renewal_context_sha256"])

    def _refresh_check_answer(self, request, context):
        s = self._session(request.session_id, states=(PREPARED, COMMITTED, FINALIZED))
        if s.kind != REFRESH:
            raise status.FailedPrecondition(f"Session {s.session_id} is not a refresh.")
        self._peer_index(s, context, s.plan.new)
        mine = self._my_refresh_answer(s)
        return admin_pb2.GetRefreshDeltasResponse(check_answer=mine) if mine is not None \
            else admin_pb2.GetRefreshDeltasResponse()

    def _require_refresh_check(self, s: Session, actor: str) -> None:
        """A refresh commits on a node only once the node itself has seen the
        check pass, whoever runs it: every member's last answer (node to
        node) over one context and the same records, each challenge's values
        and each renewal slot's and tag's on a polynomial of degree k - 1
        through 0 (what ``vaultctl refresh`` verifies, here on every node)."""
        def refuse(reason: str):
            return self._commit_refusal(s, actor, reason)

        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, check_answer=True)
        answers = self._members_answers(
            s, actor, s.plan.new, self._my_refresh_answer(s),
            lambda stub: stub.GetRefreshDeltas.future(req, timeout=PEER_STATE_TIMEOUT_S))
        if len({(a.context_sha256, a.keys_sha256, a.renewal_context_sha256) for a in answers.values()}) != 1:
            raise refuse("the members answered different checks")
        order = sorted(answers, key=lambda n: s.plan.new[n])
        xs = [s.plan.new[n] for n in order]
        k = s.plan.new_threshold
        counts = {len(answers[n].values) for n in order}
        if len(counts) != 1 or counts == {0}:
            raise refuse("the answers have different numbers of values")
        for c in range(counts.pop()):
            if not proactive.on_zero_polynomial(xs, [answers[n].values[c] for n in order], k):
                raise refuse("the new shares do not differ from the old by a sharing of zero")
        size = epoch_mac.RENEWAL_CHECK_SLOTS * epoch_mac.TAG_COUNT
        if any(len(answers[n].renewal_values) != size for n in order):
            raise refuse("the members' renewal check reports were inconsistent")
        if not epoch_mac.renewal_check(xs, [np.asarray(answers[n].renewal_values, dtype=np.int64) for n in order], k):
            raise refuse("the renewed MAC tags do not match the new key")

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

        if not self.node.commit(job):
            logs.event(_log, "reshare check refused", session=s.session_id, reason="second_context", actor=actor)
            raise status.FailedPrecondition(
                f"This node has answered another reshare check in session {s.session_id}; its masks serve one check "
                "context. Roll the session back and run the reshare again.")

    def _reshare_totals(self, epoch: int, challenges: list[bytes], exclude: set[int]) -> tuple[list[int], int, str]:
        """sum over every record this node holds at ``epoch`` (but those whose key
        hash is in ``exclude``) of the challenges' combinations of its share (key
        order), the record count and the keys' digest."""
        totals = [0] * len(challenges)
        digest = keys_digest([])
        records = 0
        after = ("", "")
        db = self.node.reader()
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
        row = self.node.reader().mac_keys().get(epoch)
        if row is None:
            return [0] * len(challenges)
        try:
            key = self.node.open_mac_key(row)
        except EnvelopeError:
            raise status.DataLoss("This node's sealed MAC key share does not open; abort the session.") from None
        try:
            return proactive.check_combinations(challenges, epoch_mac.key_check_keys(), key)
        finally:
            record.wipe(key)

    # --- the refresh check -------------------------------------------------------------

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
        challenges = checked_challenges(request.challenges)
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
            with Gathered({name: self.peers.stub(name, addr).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                           for name, (_, addr) in others.items()}) as replies:
                return dict(replies)

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
        digest = keys_digest(covered).hexdigest()
        # The tag part's context is known now: its sums come from the same
        # read of the new rows as the template part's fingerprints.
        renewal_ctx, chosen = self._renewal_context(s, actor, digest, renewal_contributions)
        with self._key_cond:
            reported = self._renewal_reports.get((s.session_id, renewal_ctx))
        totals, count, sums = self._check_totals(s, mixed, covered, None if reported else renewal_ctx)
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
        renewal_values, renewal_hex = self._renewal_check(s, renewal_ctx, chosen, sums, others)

        def job(tx: Tx):
            # The answer itself is kept (masked values: what the auditor sees),
            # for the members that hold it against theirs before they commit.
            tx.append("refresh_check", actor=actor, request_id=s.session_id, details={
                "records": count, "challenges": len(challenges), "excluded": left_out, "call": call_no,
                "context_sha256": context_hex, "renewal_context_sha256": renewal_hex,
                "renewal_answered": bool(renewal_values), "keys_sha256": digest, "values": values,
                "renewal_values": renewal_values,
            })
        self.node.commit(job)
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
        self.node.commit(job)
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

        call_no = self.node.commit(job)
        if call_no is None:
            CHECKS.labels(self.name, "refused").inc()
            logs.event(_log, "refresh check refused", session=s.session_id, reason="repeated_challenge", actor=actor)
            raise status.FailedPrecondition(
                f"This node has already answered one of these challenges in session {s.session_id}; a challenge is "
                "answered once. Draw fresh ones.")
        return call_no

    def _check_totals(self, s: Session, challenges: list[bytes], covered: list[tuple[str, str]],
                      renewal_ctx: bytes | None = None) -> tuple[list[int], int, np.ndarray | None]:
        """The challenge combinations of (new - old) over exactly the covered
        records and their count; with ``renewal_ctx``, also the renewal
        check's sums over the same records' new rows (``renewal_sums``).

        The values come from the batches of new-minus-old sealed when the
        records were prepared, computed from the very arrays sealed into the
        new rows (one open per batch instead of two per record); each new row
        must still be exactly the one prepared (its fingerprint), so a share
        damaged or replaced since fails the check (DATA_LOSS). The renewal
        sums open those same new rows, read once for both."""
        totals = [0] * len(challenges)
        wanted = set(covered)
        found = 0
        ring = self.node.keys.kek
        width = s.plan.mac_width
        sums = None
        if renewal_ctx is not None:
            sums = np.zeros((epoch_mac.RENEWAL_CHECK_SLOTS, width + epoch_mac.TAG_COUNT), dtype=FIELD_DTYPE)
        pending: list[storage.ShareRow] = []  # new rows of one width, not yet summed
        reader = storage.connect(self.cfg.store)
        try:
            reader.tune_for_scan(CHECK_MMAP_BYTES)
            for batch in reader.check_batches(s.session_id, records_only=True):
                keys_json, prints = batch.keys_json, batch.fingerprints
                keys = [tuple(k) for k in json.loads(keys_json)]
                try:
                    data = envelope.open(ring, diff_aad(s.session_id, (batch.first_tenant, batch.first_subject),
                                                         batch.width, keys_json, prints), batch.sealed)
                except EnvelopeError:
                    raise status.DataLoss(
                        "This node's sealed check values do not open; abort the session and refresh again.") from None
                if len(data) != 4 * batch.width * len(keys) or len(prints) != 16 * len(keys):
                    raise status.DataLoss("This node's sealed check values have the wrong length.")
                diff = np.frombuffer(bytearray(data), dtype="<u4").reshape(len(keys), batch.width)
                try:
                    if diff.size and int(diff.max()) >= P:
                        raise status.DataLoss("This node's sealed check values hold values outside the field.")
                    rows = [i for i, k in enumerate(keys) if k in wanted]
                    if not rows:
                        continue
                    new_rows = self._check_fingerprints(reader, s, keys, rows, prints, full=sums is not None)
                    if len(rows) != len(keys):  # deleted since, or held by some members only
                        diff = diff[rows]
                    for c, v in enumerate(proactive.check_combinations(challenges, [keys[i] for i in rows], diff)):
                        totals[c] = (totals[c] + v) % P
                    if sums is not None:
                        if pending and pending[0].dimension + pending[0].mac_count != batch.width:
                            sums = self._add_renewal_sums(sums, renewal_ctx, pending, width)
                            pending = []
                        pending.extend(new_rows)
                        if len(pending) >= RESHARE_CHECK_PAGE:  # a few large products, not one per batch
                            sums = self._add_renewal_sums(sums, renewal_ctx, pending, width)
                            pending = []
                    found += len(rows)
                finally:
                    record.wipe(diff)
            if sums is not None and pending:
                sums = self._add_renewal_sums(sums, renewal_ctx, pending, width)
        except BaseException:
            record.wipe(sums)
            raise
        finally:
            reader.close()
        if found != len(covered):
            record.wipe(sums)
            raise status.FailedPrecondition(
                f"{len(covered) - found} record(s) of this node have no prepared check values in session "
                f"{s.session_id}; abort the session and refresh again.")
        return totals, found, sums

    def _check_fingerprints(self, reader, s: Session, keys: list, rows: list[int], prints: bytes,
                            full: bool = False) -> list[storage.ShareRow]:
        """DATA_LOSS unless each of these records' new rows is the one prepared;
        with ``full``, those rows (in ``rows`` order) for the caller to open."""
        lo, hi = keys[rows[0]], keys[rows[-1]]
        if full:
            by_key = {row.key: row for row in reader.rows_between(s.new_epoch, lo, hi)}
            stored = {key: row_fingerprint(row.wrapped_dk, row.nonce, row.ciphertext) for key, row in by_key.items()}
        else:
            by_key = {}
            stored = {key: row_fingerprint(sealed.wrapped_dk, sealed.nonce, sealed.ciphertext)
                      for key, sealed in reader.sealed_between(s.new_epoch, lo, hi).items()}
        for i in rows:
            if stored.get(keys[i]) != prints[16 * i : 16 * i + 16]:
                raise status.DataLoss(
                    f"The prepared share of subject {keys[i][1]!r} (tenant {keys[i][0]!r}) on this node changed "
                    "after it was prepared; the refresh cannot be trusted. Abort it and repair the node.")
        return [by_key[keys[i]] for i in rows] if full else []

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
        batch = self.node.reader().check_batch(s.session_id, ("", which), size)
        if batch is None:
            return None
        try:
            raw = envelope.open(self.node.keys.kek, diff_aad(s.session_id, ("", which), size, "[]", b""),
                                batch.sealed)
            return record.unpack_values(raw, size)
        except (EnvelopeError, InvalidShares):
            raise status.DataLoss("This node's sealed renewal check values do not open; abort the session.") from None

    def _seal_check_values(self, s: Session, which: str, values: np.ndarray, actor: str, details: dict) -> np.ndarray:
        """Seal renewal check values once (the first sealed is the one used) and load them back."""
        flat = np.ascontiguousarray(values).reshape(-1)
        size = int(flat.size)
        sealed = envelope.seal(self.node.keys.kek, diff_aad(s.session_id, ("", which), size, "[]", b""),
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
            self.node.commit(job)
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
        have = self._load_check_values(s, RENEWAL_MASK, size)
        if have is not None:
            return have.reshape(slots, width)
        with self._mask_lock:
            have = self._load_check_values(s, RENEWAL_MASK, size)
            if have is not None:
                return have.reshape(slots, width)
            if peers is None:
                peers = self._check_peers(s, [], s.plan.new)
                if not set(s.plan.new) <= set(peers) | {self.name}:
                    peers = None
        if peers is None:
            return self._wait_check_values(s, RENEWAL_MASK, size).reshape(slots, width)
        with self._mask_lock:
            have = self._load_check_values(s, RENEWAL_MASK, size)
            if have is not None:
                return have.reshape(slots, width)
            k = s.plan.new_threshold
            parts = [epoch_mac.renewal_mask_deal(self._seed(s), s.session_id, k, width, self.index)]
            req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, renewal_mask=True)
            try:
                with Gathered({n: self.peers.stub(n, peers[n][1]).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                               for n in s.plan.new if n != self.name}) as replies:
                    for name, reply in replies:
                        try:
                            parts.append(record.unpack_values(reply.renewal, size).reshape(slots, width))
                        except InvalidShares:
                            raise status.Unavailable(
                                f"Peer {name} dealt a renewal check mask of the wrong shape.") from None
                mask = proactive.add_rows(*parts)
            finally:
                record.wipe(*parts)
            self._seal_check_values(s, RENEWAL_MASK, mask, actor or f"shareholder/{self.name}",
                                    {"from": sorted(s.plan.new)})
        return self._load_check_values(s, RENEWAL_MASK, size).reshape(slots, width)

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
        have = self._load_check_values(s, RENEWAL_MASK_TAGS, slots * tags)
        if have is not None:
            return have.reshape(slots, tags)
        k = s.plan.new_threshold
        renewers = self._renewers(s, k)
        by_index = {idx: name for name, idx in s.plan.new.items()}
        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, renewal_mask_renew=True)
        values = np.empty((len(renewers), slots, tags), dtype=FIELD_DTYPE)
        try:
            with Gathered({by_index[x]: self.peers.stub(by_index[x], peers[by_index[x]][1]).GetRefreshDeltas.future(
                    req, timeout=PEER_TIMEOUT_S) for x in renewers if x != self.index}) as calls:
                for a, x in enumerate(renewers):
                    if x == self.index:
                        g = self._renewal_mask_values(s, self.index)
                    else:
                        name = by_index[x]
                        try:
                            g = record.unpack_values(calls.result(name).renewal, slots * tags).reshape(slots, tags)
                        except InvalidShares:
                            raise status.Unavailable(
                                f"Peer {name} dealt mask renewal values of the wrong shape.") from None
                    values[a] = g
                    record.wipe(g)
            mask_tags = epoch_mac.renewed_tags(renewers, values, k)
        finally:
            record.wipe(values)
        return self._seal_check_values(s, RENEWAL_MASK_TAGS, mask_tags, actor,
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
        self.node.commit(job)
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

        chosen = self.node.commit(job)
        if chosen is None:
            CHECKS.labels(self.name, "refused").inc()
            logs.event(_log, "renewal check refused", session=s.session_id, reason="masks_used", actor=actor)
            raise status.FailedPrecondition(
                f"This node has answered the renewal check of session {s.session_id} over "
                f"{epoch_mac.RENEWAL_CHECK_SETS} other record sets; each mask serves one. Roll the session back and "
                "refresh again.")
        return chosen

    def _add_renewal_sums(self, total: np.ndarray, ctx: bytes, rows: list[storage.ShareRow], width: int) -> np.ndarray:
        """``total`` plus [sum_r alpha_r pad(s'_r) | sum_r alpha_r t'_r] over
        ``rows`` (new rows of one width, opened here and wiped)."""
        row_width = rows[0].dimension + rows[0].mac_count
        if row_width - epoch_mac.TAG_COUNT > width:
            raise status.FailedPrecondition("A record is wider than the session's MAC key.")
        shares = self._open_chunk(rows, row_width)
        alphas = epoch_mac.renewal_coefficients(ctx, [(r.tenant, r.subject) for r in rows])
        part = None
        try:
            part = epoch_mac.renewal_sums(alphas, shares, width)
            return proactive.add_rows(total, part)
        finally:
            record.wipe(shares, part, total)

    def _renewal_context(self, s: Session, actor: str, digest: str,
                         contributions: dict[int, bytes]) -> tuple[bytes, int]:
        """The renewal check's context over the covered records and the mask set it claims."""
        k = s.plan.new_threshold
        ctx = epoch_mac.renewal_check_context(s.session_id, k, digest, [contributions[i] for i in sorted(contributions)])
        return ctx, self._claim_renewal_context(s, actor, ctx)

    def _renewal_check(self, s: Session, ctx: bytes, chosen: int, sums: np.ndarray | None,
                       others: dict) -> tuple[list[int], str]:
        """Round A (this node's u from ``sums``, kept for its peers) and round B
        (every member's u node to node, opened; w answered): (w values,
        context hex). An empty w when the members' reports do not lie on one
        polynomial. ``sums`` is None when this context's report is kept already."""
        k = s.plan.new_threshold
        rows = slice(chosen * epoch_mac.RENEWAL_CHECK_SLOTS, (chosen + 1) * epoch_mac.RENEWAL_CHECK_SLOTS)
        key = (s.session_id, ctx)
        with self._key_cond:
            cached = self._renewal_reports.get(key)
        if cached is None:
            if sums is None:
                raise status.Aborted("This node's renewal check report was dropped meanwhile; ask again.")
            mask = self._renewal_mask(s)
            try:
                cached = (epoch_mac.renewal_report(sums, np.ascontiguousarray(mask[rows])), sums)
            finally:
                record.wipe(mask)
            with self._key_cond:
                self._renewal_reports = {k2: v for k2, v in self._renewal_reports.items() if k2[0] == s.session_id}
                self._renewal_reports[key] = cached
                self._key_cond.notify_all()
        elif sums is not None:
            record.wipe(sums)
        report, sums = cached
        req = admin_pb2.GetRefreshDeltasRequest(session_id=s.session_id, renewal_check_context=ctx)
        slots, width = epoch_mac.RENEWAL_CHECK_SLOTS, s.plan.mac_width
        xs, stacked = [self.index], [report]
        with Gathered({name: self.peers.stub(name, addr).GetRefreshDeltas.future(req, timeout=PEER_TIMEOUT_S)
                       for name, (_, addr) in others.items()}) as replies:
            for name, reply in replies:
                try:
                    stacked.append(record.unpack_values(reply.renewal_report, slots * width).reshape(slots, width))
                except InvalidShares:
                    raise status.Unavailable(f"Peer {name} gave a renewal check report of the wrong shape.") from None
                xs.append(others[name][0])
        opened = epoch_mac.open_reports(xs, np.stack(stacked), k)
        context_hex = hashlib.sha256(ctx).hexdigest()
        if opened is None:
            logs.event(_log, "renewal check reports inconsistent", logging.WARNING, session=s.session_id)
            return [], context_hex
        mask_tags = self._load_check_values(s, RENEWAL_MASK_TAGS, epoch_mac.RENEWAL_MASK_ROWS * epoch_mac.TAG_COUNT)
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
