"""The ``Matcher`` gRPC servicer: enrol, verify, delete (bulk enrolment:
``matcher.bulk``; Verify's release and rejoin: ``matcher.release``; for a
tenant with ``verify_on_shares``, Verify without a rejoin:
``matcher.identify.verify_on_shares``).

The matcher is stateless. It holds a template only inside one Verify (rejoin,
compare, wipe) or one Enroll (encode, split, send, wipe); everything durable
lives, split, at the shareholders. The tenant is always the caller's
certificate name (``vaultrpc.server.caller``), never a request field.

Integrity: records are [s | t] with tags t_l = <b_l, s> under the epoch's
MAC key b, which exists only as shares at the nodes. Enrolment gets the key
shares of every node (``GetMacKeyShare``, under the provider's write ticket),
rejoins b, checks that all n shares agree, computes the tags and wipes b;
Verify gets each node's key share beside its record share and rejoins both
from the same nodes (``matcher.release``, ``record.join``).

Fail closed: every path that does not end in a successful MAC check and a
score at or above the tenant's threshold ends in NO_MATCH or an error status.
A shareholder whose share is inconsistent is named in this process's JSON log
and in a metric, never to the caller.

Wiping: every numpy buffer that held the template, the probe encoding or a
share is overwritten (``record.wipe``) before the answer leaves. Protobuf's
byte strings (the request's floats, the shares' ``values``) are immutable and
cannot be overwritten from Python; they are dropped as soon as possible, and
core dumps are disabled for the process (``matcher.server.harden_process``).

Size: most of this file is one enrolment (its clean-up after a partial
write, the epoch MAC key rejoined from every node's share), which bulk
enrolment reuses; it stays one unit with the servicer it belongs to.
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter as Tally

import grpc
import numpy as np

from matcher import identify, metrics, vectors
from matcher.bulk import BulkEnrolment, store_auth
from matcher.committee import TRANSPORT_CODES, Committee, Outcome
from matcher.config import MatcherConfig, ShareholderEndpoint, TenantPolicy
from matcher.release import DEFINITIVE, Release
from splitvault.v1 import common_pb2, matcher_pb2, matcher_pb2_grpc, shareholder_pb2
from vault import codec, epoch_mac, names, record, sharing, ticket
from vault.errors import InvalidShares, InvalidTicket
from vaultrpc import logs, status, wire
from vaultrpc.server import caller


class MatcherService(matcher_pb2_grpc.MatcherServicer):
    def __init__(self, config: MatcherConfig, committee: Committee, logger: logging.Logger):
        self.cfg = config
        self.committee = committee
        self.log = logger
        self.k = config.threshold
        self.n = config.n
        self.by_index = {e.index: e for e in config.shareholders}
        # Hedged release: nodes recently unreachable are asked last.
        self.down_since: dict[str, float] = {}

    # --- helpers ------------------------------------------------------------

    def _tenant(self, context) -> TenantPolicy:
        who = caller(context)
        policy = self.cfg.tenants.get(who.name) if who is not None else None
        if policy is None:
            raise status.PermissionDenied("The caller's tenant is not registered with this matcher.")
        return policy

    def node_failed(self, outcome: Outcome, method: str) -> None:
        metrics.NODE_ERRORS.labels(outcome.node.name, method, outcome.code.name).inc()
        # A node's considered refusal (not enrolled, ticket refused, limit
        # reached) is an answer, not a fault.
        logs.event(
            self.log,
            "shareholder call failed",
            logging.INFO if outcome.code in DEFINITIVE else logging.WARNING,
            node=outcome.node.name,
            method=method,
            code=outcome.code.name,
            detail=outcome.message[:200],
        )

    def suspect(self, node: ShareholderEndpoint, reason: str, **fields) -> None:
        metrics.SUSPECTS.labels(node.name).inc()
        logs.event(self.log, "inconsistent share", logging.WARNING, node=node.name, reason=reason, **fields)

    # --- Enroll -------------------------------------------------------------

    def Enroll(self, request, context):
        tenant = self._tenant(context)
        subject = status.checked(names.check_id, request.subject, "subject")
        request_id = status.checked(names.check_token, request.request_id, "request id")
        status.checked(names.check_group, request.group, "group")
        vector = vectors.checked(request.template, tenant.dimensions, "template")
        try:
            self.check_write_ticket(request, tenant, subject, request_id, _write_ops(request.replace), vector)
            epoch, already = self.enrol_one(tenant.name, subject, request_id, vector, request.replace,
                                             request.ticket)
        except status.RpcError as exc:
            metrics.ENROLMENTS.labels(exc.code.name).inc()
            raise
        finally:
            record.wipe(vector)
        metrics.ENROLMENTS.labels("already_enrolled" if already else "enrolled").inc()
        logs.event(
            self.log, "enrolled", tenant=tenant.name, subject=subject, request_id=request_id,
            epoch=epoch, already_enrolled=already, replace=request.replace,
        )
        return matcher_pb2.EnrollResponse(
            subject=subject, request_id=request_id, epoch=epoch, already_enrolled=already
        )

    def enrol_one(
        self, tenant: str, subject: str, request_id: str, vector: np.ndarray, replace: bool,
        auth: common_pb2.VerificationTicket | common_pb2.WriteBatch,
    ) -> tuple[int, bool]:
        """Enrol one checked template under its checked write ticket; (epoch, already_enrolled). Raises status errors."""
        describe = shareholder_pb2.DescribeRecordsRequest(tenant=tenant, subject=subject)
        gather_describe = self.committee.fan_out("DescribeRecords", describe)
        gather_info = self.committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
        gather_key = self.gather_key(auth, vector.size)
        described, infos, key_shares = gather_describe.all(), gather_info.all(), gather_key.all()
        failed = [o for o in described + infos if not o.ok]
        for o in failed:
            self.node_failed(o, "DescribeRecords" if o in described else "GetNodeInfo")
        if failed:
            names = sorted({o.node.name for o in failed})
            raise status.Unavailable(
                f"Cannot enrol: {len(names)} of {self.n} shareholders did not answer; nothing was stored."
            )
        held = {o.node.name: list(o.response.records) for o in described}
        # Already enrolled by this very request: every node holds it at one epoch.
        common = None
        for records in held.values():
            epochs = {r.epoch for r in records if r.request_id == request_id}
            common = epochs if common is None else common & epochs
        if common:
            return max(common), True
        # Another request's records make the subject "already enrolled" only
        # when at least k nodes hold them, i.e. it can be verified. Fewer are
        # the residue of a failed attempt (a write that landed after this
        # matcher gave up on it, or a matcher killed mid-way): the caller was
        # told nothing was kept, so they are overwritten like our own
        # leftovers (tests/test_faults_enrolment.py).
        holders = Tally(rid for records in held.values() for rid in {r.request_id for r in records} if rid != request_id)
        if not replace and any(count >= self.k for count in holders.values()):
            raise status.AlreadyExists(
                "The subject is already enrolled; set replace to overwrite it."
            )
        if not replace and holders:
            # Fewer than k nodes hold another request's records (an earlier
            # enrolment that did not finish): an ENROLL ticket cannot
            # overwrite them (the nodes refuse it), so say so before writing.
            raise status.AlreadyExists(
                "An unfinished earlier enrolment of this subject is held by some shareholders; "
                "retry it with its request id, or set replace to overwrite it."
            )
        existing = any(held.values())
        epoch = self.cluster_epoch([o.response.epoch for o in infos])
        encoded = field_values = extended = shares = key = None
        try:
            key = self.mac_key(key_shares, epoch, vector.size)
            encoded = codec.encode(vector, vector.size)
            field_values = codec.to_field(encoded)
            extended = epoch_mac.extend(field_values, key)
            shares = sharing.split(extended, self.k, self.n)
            records = record.make_records(
                tenant=tenant, subject=subject, epoch=epoch, threshold=self.k, shareholders=self.n,
                dimension=vector.size, request_id=request_id, shares=shares[:, 0, :],
            )
        finally:
            record.wipe(key, encoded, field_values, extended, shares)
        by_index = {r.index: wire.share_message(r) for r in records}
        # Our own leftovers from an earlier attempt of this request are
        # overwritten by the nodes (same request id), so that all n shares
        # come from this one split; another request's leftovers only with
        # replace (an ENROLL ticket cannot replace, and the nodes check it).
        outcomes = self.committee.call_all(
            "StoreShares",
            lambda node: shareholder_pb2.StoreSharesRequest(
                records=[by_index[node.index]], replace=replace, **store_auth([auth])),
        )
        del records, by_index
        failed = [o for o in outcomes if not o.ok]
        if not failed:
            return epoch, False
        for o in failed:
            self.node_failed(o, "StoreShares")
        # Undo on every node that stored or may have stored (a timed-out call
        # may still have committed). Nodes that refused did not store.
        undo = tuple(o.node for o in outcomes if o.ok or o.code in TRANSPORT_CODES)
        if replace or existing:
            undo = self.cfg.shareholders  # a half-replaced subject must not stay half old, half new
        not_undone = self.compensate(tenant, subject, request_id, undo, auth)
        if all(o.code == grpc.StatusCode.ALREADY_EXISTS for o in failed) and not not_undone:
            raise status.AlreadyExists(
                "The subject was enrolled concurrently by another request; set replace to overwrite it."
            )
        paused = all(o.code == grpc.StatusCode.FAILED_PRECONDITION for o in failed)
        msg = (
            "Enrolment is paused: a shareholder is in maintenance (share refresh or reshare); retry later"
            if paused else f"Enrolment failed: {len(failed)} of {self.n} shareholders did not store the share"
        )
        if not_undone:
            msg += (
                f", and {len(not_undone)} shareholder(s) did not confirm the clean-up; "
                "retry with the same request id to overwrite every share."
            )
        else:
            msg += "; nothing was kept, so the subject is not enrolled."
        raise (status.FailedPrecondition if paused else status.Unavailable)(msg)

    def gather_key(self, auth: common_pb2.VerificationTicket | common_pb2.WriteBatch, dimension: int):
        """Ask every node for its share of the current epoch's MAC key (its first
        ``dimension`` columns), under the write's ticket."""
        which = {"batch": auth} if isinstance(auth, common_pb2.WriteBatch) else {"ticket": auth}
        return self.committee.fan_out(
            "GetMacKeyShare", shareholder_pb2.GetMacKeyShareRequest(dimension=dimension, **which))

    def mac_key(self, outcomes: list[Outcome], epoch: int, dimension: int) -> np.ndarray:
        """The epoch's MAC key b (L, d) from every node's share, which must all
        lie on one polynomial of degree k - 1 (fail closed otherwise: a wrong
        key would make the template unverifiable). The caller wipes it."""
        failed = [o for o in outcomes if not o.ok]
        for o in failed:
            self.node_failed(o, "GetMacKeyShare")
        if failed:
            if all(o.code == grpc.StatusCode.FAILED_PRECONDITION for o in failed):
                raise status.FailedPrecondition(
                    "Enrolment is paused: a shareholder has no MAC key for its epoch or is in maintenance; retry "
                    "later. Nothing was stored.")
            if all(o.code == grpc.StatusCode.PERMISSION_DENIED for o in failed):
                raise status.PermissionDenied("The shareholders refused the write ticket.")
            raise status.Unavailable(
                f"Cannot enrol: {len(failed)} of {self.n} shareholders did not give their MAC key share; "
                "nothing was stored.")
        size = epoch_mac.TAG_COUNT * dimension
        xs, ys = [], np.empty((len(outcomes), 1, size), dtype=np.uint32)
        try:
            for o in outcomes:
                share = o.response.key
                if share.epoch != epoch or share.index != o.node.index or share.dimension != dimension \
                        or len(share.values) != 4 * size:
                    self.suspect(o.node, "MAC key share does not fit the epoch, index or dimension", epoch=epoch)
                    raise status.Unavailable("The shareholders' MAC key shares do not agree; nothing was stored.")
                try:
                    values = record.unpack_values(share.values, size)
                except InvalidShares:
                    self.suspect(o.node, "MAC key share is malformed", epoch=epoch)
                    raise status.Unavailable("The shareholders' MAC key shares do not agree; nothing was stored.") from None
                ys[len(xs), 0] = values
                record.wipe(values)
                xs.append(o.node.index)
            k = self.k
            for j in range(k, len(xs)):
                expected = sharing.interpolate_at(xs[:k], ys[:k], xs[j])
                same = np.array_equal(expected[0], ys[j, 0])
                record.wipe(expected)
                if not same:
                    logs.event(self.log, "MAC key shares inconsistent", logging.ERROR, epoch=epoch,
                               nodes=[self.by_index[x].name for x in xs])
                    raise status.Unavailable("The shareholders' MAC key shares do not agree; nothing was stored.")
            return sharing.reconstruct(xs[:k], ys[:k])[0].reshape(epoch_mac.TAG_COUNT, dimension)
        finally:
            record.wipe(ys)

    def cluster_epoch(self, epochs: list[int]) -> int:
        # New shares go to the committee's current epoch; while a refresh is
        # switching over the nodes may briefly differ, and the newest wins.
        return max(epochs) if epochs else 0

    def compensate(
        self, tenant: str, subject: str, request_id: str, nodes: tuple[ShareholderEndpoint, ...],
        auth: common_pb2.VerificationTicket | common_pb2.WriteBatch,
    ) -> list[str]:
        """Undo a failed enrolment on ``nodes`` under its own write ticket (the
        nodes erase only what that ticket may have written); the names of those
        that did not confirm."""
        if not nodes:
            return []
        undo_auth = {"batch": auth} if isinstance(auth, common_pb2.WriteBatch) else {"ticket": auth}
        req = shareholder_pb2.DeleteSharesRequest(tenant=tenant, subject=subject, request_id=request_id, **undo_auth)
        outcomes = self.committee.call_all("DeleteShares", req, nodes=nodes)
        failed = [o for o in outcomes if not o.ok]
        for o in failed:
            self.node_failed(o, "DeleteShares")
        if failed:
            logs.event(
                self.log, "enrolment clean-up incomplete", logging.ERROR, tenant=tenant, subject=subject,
                request_id=request_id, nodes=[o.node.name for o in failed],
            )
        return [o.node.name for o in failed]

    # --- EnrollStream and EnrollBatches -------------------------------------

    def EnrollStream(self, request_iterator, context):
        tenant = self._tenant(context)
        for results in BulkEnrolment(self).run(tenant.name, ((req, None) for req in request_iterator), context):
            yield from results

    def EnrollBatches(self, request_iterator, context):
        tenant = self._tenant(context)
        bulk = BulkEnrolment(self)

        def items():
            for message in request_iterator:
                # A batch ticket is checked once for the message: then every item is one the provider signed.
                authority = bulk.check_batch_ticket(message, tenant) if message.HasField("batch_ticket") else None
                for item in message.items:
                    yield item, authority

        for results in bulk.run(tenant.name, items(), context):
            yield matcher_pb2.EnrollBatchesResponse(results=results)

    # --- Verify -------------------------------------------------------------

    def Verify(self, request, context):
        tenant = self._tenant(context)
        subject = status.checked(names.check_id, request.subject, "subject")
        probe = vectors.checked(request.probe, tenant.dimensions, "probe")
        modality = tenant.modality(probe.size)
        codes: list[np.ndarray] = []
        decision_id = str(uuid.uuid4())
        outcome_label = "INTERNAL"
        try:
            body = self._check_ticket(request, tenant, subject, probe)
            if tenant.verify_on_shares:  # nothing is rejoined (matcher.identify.verify_on_shares)
                match, epoch, used = identify.verify_on_shares(self, tenant, subject, probe, request.ticket,
                                                               decision_id)
                outcome_label = "MATCH" if match else "NO_MATCH"
                logs.event(self.log, "verified", decision=outcome_label, decision_id=decision_id, tenant=tenant.name,
                           subject=subject, request_id=body.request_id, epoch=epoch, nodes_used=used, on_shares=True)
                return matcher_pb2.VerifyResponse(
                    decision=matcher_pb2.DECISION_MATCH if match else matcher_pb2.DECISION_NO_MATCH,
                    decision_id=decision_id, epoch=epoch)
            # The probe is encoded while the nodes work on their releases.
            release = Release(self, tenant=tenant.name, subject=subject, dimension=probe.size,
                              decision_id=decision_id, ticket=request.ticket)
            joined = release.run(meanwhile=lambda: codes.append(codec.encode(probe, probe.size)))
            probe_code = codes[0]
            try:
                score = codec.cosine(probe_code, joined.template)
            finally:
                record.wipe(joined.template)
            match = score >= modality.match_threshold
            decision = matcher_pb2.DECISION_MATCH if match else matcher_pb2.DECISION_NO_MATCH
            outcome_label = "MATCH" if match else "NO_MATCH"
            used = [self.by_index[i].name for i in joined.used]
            logs.event(
                self.log, "verified", decision=outcome_label, decision_id=decision_id, tenant=tenant.name,
                subject=subject, request_id=body.request_id, epoch=joined.epoch, nodes_used=used,
            )
            response = matcher_pb2.VerifyResponse(decision=decision, decision_id=decision_id, epoch=joined.epoch)
            if tenant.score_allowed:
                response.score = float(score)
            del score
            return response
        except status.RpcError as exc:
            outcome_label = exc.code.name
            logs.event(
                self.log, "verification without decision", logging.WARNING, code=exc.code.name,
                decision_id=decision_id, tenant=tenant.name, subject=subject,
            )
            raise
        finally:
            record.wipe(probe, *codes)
            metrics.VERIFICATIONS.labels(outcome_label).inc()

    def Identify(self, request, context):
        # 1:N on shares: matcher.identify (no template is rejoined).
        return identify.identify(self, request, context)

    def IdentifyBatch(self, request, context):
        # Several Identify queries, each on its own ticket: matcher.identify.identify_batch.
        return identify.identify_batch(self, request, context)

    def check_write_ticket(self, request, tenant: TenantPolicy, subject: str, request_id: str,
                            operations: tuple[int, ...], template: np.ndarray | None):
        """The provider's write ticket of an enrolment or delete, checked here
        (the nodes check it again, all but the template digest)."""
        if not request.HasField("ticket"):
            raise status.PermissionDenied("A write needs the provider's signed ticket.")
        try:
            body = wire.verify_ticket(request.ticket, tenant.ticket_keys, tenant=tenant.name, audience=self.cfg.cluster_id,
                                      operations=operations)
        except InvalidTicket as exc:
            raise status.of(exc) from None
        if body.subject != subject or body.request_id != request_id:
            raise status.PermissionDenied("The ticket was issued for another subject or request id.")
        # An enrolment's group is the ticket's (the nodes store the signed one); a delete names none.
        if body.group != (request.group if template is not None else ""):
            raise status.PermissionDenied("The ticket was issued for another group.")
        if template is not None and not ticket.template_matches(body, template):
            raise status.PermissionDenied("The template is not the one the ticket authorises.")
        return body

    def _check_ticket(self, request, tenant: TenantPolicy, subject: str, probe: np.ndarray):
        if not request.HasField("ticket"):
            raise status.PermissionDenied("A verification needs the provider's signed ticket.")
        try:
            body = wire.verify_ticket(request.ticket, tenant.ticket_keys, tenant=tenant.name, audience=self.cfg.cluster_id,
                                      operations=(ticket.VERIFY,))
        except InvalidTicket as exc:
            raise status.of(exc) from None
        if body.subject != subject:
            raise status.PermissionDenied("The verification ticket was issued for another subject.")
        if not ticket.probe_matches(body, probe):
            raise status.PermissionDenied("The probe is not the one the verification ticket authorises.")
        return body

    def Delete(self, request, context):
        tenant = self._tenant(context)
        subject = status.checked(names.check_id, request.subject, "subject")
        if not request.HasField("ticket"):
            raise status.PermissionDenied("A delete needs the provider's signed ticket.")
        request_id = request.request_id or _claimed_request_id(request.ticket)
        request_id = status.checked(names.check_token, request_id, "request id")
        self.check_write_ticket(request, tenant, subject, request_id, (ticket.DELETE,), None)
        req = shareholder_pb2.DeleteSharesRequest(tenant=tenant.name, subject=subject, request_id=request_id,
                                                  ticket=request.ticket)
        outcomes = self.committee.call_all("DeleteShares", req)
        response = matcher_pb2.DeleteResponse(subject=subject, complete=all(o.ok for o in outcomes))
        for o in outcomes:
            if o.ok:
                message = f"Erased {o.response.deleted} record(s)."
            else:
                self.node_failed(o, "DeleteShares")
                # The node's own words stay in this log: they may name node
                # internals (a maintenance session) that are no PSP's business.
                message = _DELETE_MESSAGE.get(o.code, "The shareholder did not confirm.")
            response.outcomes.add(shareholder=o.node.name, code=status.code_value(o.code), message=message)
        logs.event(
            self.log, "deleted", logging.INFO if response.complete else logging.WARNING, tenant=tenant.name,
            subject=subject, request_id=request_id, complete=response.complete,
            not_confirmed=[o.node.name for o in outcomes if not o.ok],
        )
        return response


_DELETE_MESSAGE = {
    grpc.StatusCode.FAILED_PRECONDITION: "The shareholder is in maintenance; retry the deletion later.",
    grpc.StatusCode.PERMISSION_DENIED: "The shareholder refused the ticket.",
}


def _write_ops(replace: bool) -> tuple[int, ...]:
    """The ticket operation an enrolment with this replace flag needs."""
    return (ticket.write_operation(replace),)


def _claimed_request_id(signed: common_pb2.VerificationTicket) -> str:
    # The request id a delete ticket names, read before it is checked (the
    # check then compares it with the signed body).
    body = wire.ticket_body(signed.body)
    return body.request_id if body is not None else ""


