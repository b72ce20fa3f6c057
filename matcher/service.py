"""The ``Matcher`` gRPC servicer: enrol, verify, delete, bulk enrol.

The matcher is stateless. It holds a template only inside one Verify (rejoin,
compare, wipe) or one Enroll (encode, split, send, wipe); everything durable
lives, split, at the shareholders. The tenant is always the caller's
certificate name (``vaultrpc.server.caller``), never a request field.

Integrity: records are [s | t] with tags t_l = <b_l, s> under the epoch's
MAC key b, which exists only as shares at the nodes. Enrolment gets the key
shares of every node (``GetMacKeyShare``, under the provider's write ticket),
rejoins b, checks that all n shares agree, computes the tags and wipes b;
Verify gets each node's key share beside its record share and rejoins both
from the same nodes (``record.join``).

Fail closed: every path that does not end in a successful MAC check and a
score at or above the tenant's threshold ends in NO_MATCH or an error status.
A shareholder whose share is inconsistent is named in this process's JSON log
and in a metric, never to the caller.

Wiping: every numpy buffer that held the template, the probe encoding or a
share is overwritten (``record.wipe``) before the answer leaves. Protobuf's
byte strings (the request's floats, the shares' ``values``) are immutable and
cannot be overwritten from Python; they are dropped as soon as possible, and
core dumps are disabled for the process (``matcher.server.harden_process``).
"""
from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from matcher import identify, metrics
from matcher.committee import TRANSPORT_CODES, Committee, Outcome
from matcher.config import MatcherConfig, ShareholderEndpoint, TenantPolicy
from splitvault.v1 import common_pb2, matcher_pb2, matcher_pb2_grpc, shareholder_pb2
from vault import codec, epoch_mac, names, record, sharing, ticket
from vault.errors import IntegrityError, InvalidShares, InvalidTemplate, InvalidTicket
from vaultrpc import logs, status
from vaultrpc.server import caller

# Node answers that settle a verification without k shares, in the order
# they are considered when several apply.
_DEFINITIVE = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
)
_DEFINITIVE_MESSAGE = {
    grpc.StatusCode.PERMISSION_DENIED: "The shareholders refused the verification ticket.",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "Too many verification attempts for this subject; try again later.",
    grpc.StatusCode.NOT_FOUND: "The subject is not enrolled.",
}
_OK = grpc.StatusCode.OK
# Bulk enrolment: batches being stored while the next one is prepared.
_PIPELINE_DEPTH = 2
# A node's considered refusal of this verification (attempt limit reached,
# ticket refused) is not worked around by asking the other nodes.
_NO_HEDGE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED})
# How long a node that failed at transport level is asked last.
_DOWN_MEMORY_S = 5.0


def _vector(values, dimensions: tuple[int, ...], what: str) -> np.ndarray:
    # The float32 vector of a request, checked (dimension, finite, non-zero).
    # The length is checked before any conversion: a 60 MB message of
    # floats (under the 64 MiB limit) used to cost ~300 MB and 0.7 s of
    # conversion just to be refused (tests/test_hostile_matcher.py).
    # The length is one of the tenant's modalities' dimensions.
    if len(values) not in dimensions:
        if len(dimensions) == 1:
            raise status.InvalidArgument(f"The {what} must have exactly {dimensions[0]} values.")
        sizes = ", ".join(map(str, dimensions[:-1])) + f" or {dimensions[-1]}"
        raise status.InvalidArgument(f"The {what} must have {sizes} values (one per modality of the tenant).")
    arr = np.array(values, dtype=np.float32)
    if not np.isfinite(arr).all():
        arr.fill(0)
        raise status.InvalidArgument(f"The {what} contains a non-finite value (NaN or infinity).")
    if not arr.any():
        raise status.InvalidArgument(f"The {what} is the zero vector.")
    return arr


@dataclass
class _Item:
    """One EnrollStream request on its way through a batch."""

    position: int
    subject: str
    request_id: str
    replace: bool
    # The provider's authority for this write: its own ticket, or the batch
    # ticket (with every item) of the EnrollBatches message it came in.
    auth: common_pb2.VerificationTicket | common_pb2.WriteBatch
    vector: np.ndarray | None = None
    code: grpc.StatusCode | None = None
    message: str = ""


class MatcherService(matcher_pb2_grpc.MatcherServicer):
    def __init__(self, config: MatcherConfig, committee: Committee, logger: logging.Logger):
        self.cfg = config
        self.committee = committee
        self.log = logger
        self.k = config.threshold
        self.n = config.n
        self._by_index = {e.index: e for e in config.shareholders}
        # Hedged release: nodes recently unreachable are asked last.
        self._down_since: dict[str, float] = {}

    # --- helpers ------------------------------------------------------------

    def _tenant(self, context) -> TenantPolicy:
        who = caller(context)
        policy = self.cfg.tenants.get(who.name) if who is not None else None
        if policy is None:
            raise status.PermissionDenied("The caller's tenant is not registered with this matcher.")
        return policy

    def _node_failed(self, outcome: Outcome, method: str) -> None:
        metrics.NODE_ERRORS.labels(outcome.node.name, method, outcome.code.name).inc()
        # A node's considered refusal (not enrolled, ticket refused, limit
        # reached) is an answer, not a fault.
        logs.event(
            self.log,
            "shareholder call failed",
            logging.INFO if outcome.code in _DEFINITIVE else logging.WARNING,
            node=outcome.node.name,
            method=method,
            code=outcome.code.name,
            detail=outcome.message[:200],
        )

    def _suspect(self, node: ShareholderEndpoint, reason: str, **fields) -> None:
        metrics.SUSPECTS.labels(node.name).inc()
        logs.event(self.log, "inconsistent share", logging.WARNING, node=node.name, reason=reason, **fields)

    # --- Enroll -------------------------------------------------------------

    def Enroll(self, request, context):
        tenant = self._tenant(context)
        subject = status.checked(names.check_id, request.subject, "subject")
        request_id = status.checked(names.check_token, request.request_id, "request id")
        vector = _vector(request.template, tenant.dimensions, "template")
        try:
            self._check_write_ticket(request, tenant, subject, request_id, _write_ops(request.replace), vector)
            epoch, already = self._enrol_one(tenant.name, subject, request_id, vector, request.replace,
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

    def _enrol_one(
        self, tenant: str, subject: str, request_id: str, vector: np.ndarray, replace: bool,
        auth: common_pb2.VerificationTicket | common_pb2.WriteBatch,
    ) -> tuple[int, bool]:
        """Enrol one checked template under its checked write ticket; (epoch, already_enrolled). Raises status errors."""
        describe = shareholder_pb2.DescribeRecordsRequest(tenant=tenant, subject=subject)
        gather_describe = self.committee.fan_out("DescribeRecords", describe)
        gather_info = self.committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
        gather_key = self._gather_key(auth, vector.size)
        described, infos, key_shares = gather_describe.all(), gather_info.all(), gather_key.all()
        failed = [o for o in described + infos if not o.ok]
        for o in failed:
            self._node_failed(o, "DescribeRecords" if o in described else "GetNodeInfo")
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
        epoch = self._cluster_epoch([o.response.epoch for o in infos])
        encoded = field_values = extended = shares = key = None
        try:
            key = self._mac_key(key_shares, epoch, vector.size)
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
        by_index = {r.index: r for r in records}
        # Our own leftovers from an earlier attempt of this request are
        # overwritten by the nodes (same request id), so that all n shares
        # come from this one split; another request's leftovers only with
        # replace (an ENROLL ticket cannot replace, and the nodes check it).
        outcomes = self.committee.call_all(
            "StoreShares",
            lambda node: shareholder_pb2.StoreSharesRequest(
                records=[by_index[node.index]], replace=replace, **_store_auth([auth])),
        )
        del records, by_index
        failed = [o for o in outcomes if not o.ok]
        if not failed:
            return epoch, False
        for o in failed:
            self._node_failed(o, "StoreShares")
        # Undo on every node that stored or may have stored (a timed-out call
        # may still have committed). Nodes that refused did not store.
        undo = tuple(o.node for o in outcomes if o.ok or o.code in TRANSPORT_CODES)
        if replace or existing:
            undo = self.cfg.shareholders  # a half-replaced subject must not stay half old, half new
        not_undone = self._compensate(tenant, subject, request_id, undo, auth)
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

    def _gather_key(self, auth: common_pb2.VerificationTicket | common_pb2.WriteBatch, dimension: int):
        """Ask every node for its share of the current epoch's MAC key (its first
        ``dimension`` columns), under the write's ticket."""
        which = {"batch": auth} if isinstance(auth, common_pb2.WriteBatch) else {"ticket": auth}
        return self.committee.fan_out(
            "GetMacKeyShare", shareholder_pb2.GetMacKeyShareRequest(dimension=dimension, **which))

    def _mac_key(self, outcomes: list[Outcome], epoch: int, dimension: int) -> np.ndarray:
        """The epoch's MAC key b (L, d) from every node's share, which must all
        lie on one polynomial of degree k - 1 (fail closed otherwise: a wrong
        key would make the template unverifiable). The caller wipes it."""
        failed = [o for o in outcomes if not o.ok]
        for o in failed:
            self._node_failed(o, "GetMacKeyShare")
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
                    self._suspect(o.node, "MAC key share does not fit the epoch, index or dimension", epoch=epoch)
                    raise status.Unavailable("The shareholders' MAC key shares do not agree; nothing was stored.")
                try:
                    values = record.unpack_values(share.values, size)
                except InvalidShares:
                    self._suspect(o.node, "MAC key share is malformed", epoch=epoch)
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
                               nodes=[self._by_index[x].name for x in xs])
                    raise status.Unavailable("The shareholders' MAC key shares do not agree; nothing was stored.")
            return sharing.reconstruct(xs[:k], ys[:k])[0].reshape(epoch_mac.TAG_COUNT, dimension)
        finally:
            record.wipe(ys)

    def _cluster_epoch(self, epochs: list[int]) -> int:
        # New shares go to the committee's current epoch; while a refresh is
        # switching over the nodes may briefly differ, and the newest wins.
        return max(epochs) if epochs else 0

    def _compensate(
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
            self._node_failed(o, "DeleteShares")
        if failed:
            logs.event(
                self.log, "enrolment clean-up incomplete", logging.ERROR, tenant=tenant, subject=subject,
                request_id=request_id, nodes=[o.node.name for o in failed],
            )
        return [o.node.name for o in failed]

    # --- EnrollStream and EnrollBatches -------------------------------------

    def EnrollStream(self, request_iterator, context):
        tenant = self._tenant(context)
        for results in self._bulk(tenant.name, ((req, None) for req in request_iterator), context):
            yield from results

    def EnrollBatches(self, request_iterator, context):
        tenant = self._tenant(context)

        def items():
            for message in request_iterator:
                # A batch ticket is checked once for the message: then every item is one the provider signed.
                authority = self._check_batch_ticket(message, tenant) if message.HasField("batch_ticket") else None
                for item in message.items:
                    yield item, authority

        for results in self._bulk(tenant.name, items(), context):
            yield matcher_pb2.EnrollBatchesResponse(results=results)

    def _check_batch_ticket(self, message, tenant: TenantPolicy) -> "_BatchAuth | status.RpcError":
        """The message's batch ticket, checked against its templates: its authority, or the refusal for every item."""
        try:
            body = ticket.verify(message.batch_ticket, tenant.ticket_keys, tenant=tenant.name,
                                 audience=self.cfg.cluster_id, operations=ticket.WRITES, batch=True)
        except InvalidTicket as exc:
            return status.PermissionDenied(str(exc))
        nonce = body.nonce
        with np.errstate(over="ignore", invalid="ignore"):
            items = [
                common_pb2.WriteItem(subject=i.subject, request_id=i.request_id,
                                     template_digest=ticket.item_digest(np.array(i.template, dtype=np.float32),
                                                                        nonce, i.request_id))
                for i in message.items
            ]
        if not ticket.batch_matches(body, items):
            return status.PermissionDenied("The templates are not the ones the batch ticket authorises.")
        return _BatchAuth(common_pb2.WriteBatch(ticket=message.batch_ticket, items=items), body.operation)

    def _bulk(self, tenant: str, requests, context) -> Iterator[list[matcher_pb2.EnrollStreamResponse]]:
        """Enrol a stream of EnrollStreamRequests batch by batch; the results of each batch, in order.

        The stream is read one batch at a time; up to _PIPELINE_DEPTH
        batches are being stored while the next is prepared, so at most
        _PIPELINE_DEPTH + 1 batches are in memory whatever the stream's
        length, and gRPC flow control holds the sender back while the nodes
        write (back-pressure). A subject that is in a batch still in flight
        is enrolled one by one once that batch is settled, so two writes of
        one subject never race.
        """
        in_flight: deque = deque()
        policy = self.cfg.tenants[tenant]

        def check(req, vector: np.ndarray, authority) -> None:
            if authority is None:
                self._check_write_ticket(req, policy, req.subject, req.request_id, _write_ops(req.replace), vector)
            elif isinstance(authority, status.RpcError):
                raise authority
            elif authority.operation != ticket.write_operation(req.replace):
                raise status.PermissionDenied(
                    f"The batch ticket authorises {ticket.OPERATION_NAMES[authority.operation]}, not this item.")

        for batch in _batches(requests, self.cfg.enroll_batch, policy.dimensions, check):
            busy = {item.subject for sent_batch, _ in in_flight for item in sent_batch}
            prepared = self._prepare_batch(tenant, batch, busy)
            in_flight.append((batch, self._send_batch(prepared)))
            while len(in_flight) > _PIPELINE_DEPTH:
                yield self._finish_batch(tenant, *in_flight.popleft())
            if not context.is_active():
                return
        while in_flight:
            yield self._finish_batch(tenant, *in_flight.popleft())

    def _prepare_batch(self, tenant: str, batch: list[_Item], busy: set[str] = frozenset()):
        """Check, encode, MAC and split the valid, first-in-batch items: (items, records per node)."""
        # The batch goes to the nodes as one all-or-nothing write per node,
        # with one replace flag: items with the other flag, and repeats of a
        # subject within the batch, are enrolled one by one afterwards; so
        # are items of another modality (dimension) than the first.
        seen: set[str] = set()
        fast: list[_Item] = []
        replace = dimension = None
        for item in batch:
            if item.code is not None or item.subject in seen or item.subject in busy:
                continue
            if replace is None:
                replace, dimension = item.replace, item.vector.size
            if item.replace != replace or item.vector.size != dimension:
                continue
            seen.add(item.subject)
            fast.append(item)
        if not fast:
            return [], {}, False
        # The nodes' epoch and key shares are asked for while the batch is encoded.
        epoch_gather = self.committee.fan_out("GetNodeInfo", shareholder_pb2.GetNodeInfoRequest())
        key_gather = self._gather_key(fast[0].auth, dimension)
        vectors = np.stack([item.vector for item in fast])
        encoded = field_values = extended = shares = key = None
        try:
            encoded = codec.encode(vectors, dimension)
            field_values = codec.to_field(encoded)
            epoch_infos = epoch_gather.all()
            if not all(o.ok for o in epoch_infos):
                for o in epoch_infos:
                    if not o.ok:
                        self._node_failed(o, "GetNodeInfo")
                for item in fast:
                    item.code, item.message = grpc.StatusCode.UNAVAILABLE, (
                        "Not every shareholder answered; the template was not stored."
                    )
                return [], {}, False
            epoch = self._cluster_epoch([o.response.epoch for o in epoch_infos])
            try:
                key = self._mac_key(key_gather.all(), epoch, dimension)
            except status.RpcError as exc:
                for item in fast:
                    item.code, item.message = exc.code, exc.message
                return [], {}, False
            extended = epoch_mac.extend(field_values, key)
            shares = sharing.split(extended, self.k, self.n)
            per_node = self._batch_records(tenant, fast, epoch, shares)
        finally:
            record.wipe(key, vectors, encoded, field_values, extended, shares)
        return fast, per_node, bool(replace)

    def _batch_records(self, tenant: str, fast: list[_Item], epoch: int, shares: np.ndarray):
        """ShareRecords of a batch, per node index: record.make_records' format, built directly.

        make_records re-validates tenant and subject for each of the n records
        of each template, which cost ~80% of building them here; the ids are
        checked on the way in (check_id), every record is validated again by
        the node, and the first of each batch is checked against
        record.validate_record so a format drift cannot pass silently.
        """
        common = dict(
            tenant=tenant, epoch=int(epoch), threshold=self.k, shareholders=self.n, dimension=fast[0].vector.size,
            codec_version=codec.CODEC_VERSION, mac_count=record.MAC_COUNT,
        )
        per_node: dict[int, list[common_pb2.ShareRecord]] = {}
        for i, node in enumerate(self.cfg.shareholders):
            node_shares = shares[i]
            per_node[node.index] = [
                common_pb2.ShareRecord(
                    subject=item.subject, request_id=item.request_id, index=node.index,
                    values=np.ascontiguousarray(node_shares[b], dtype="<u4").tobytes(), **common,
                )
                for b, item in enumerate(fast)
            ]
        record.validate_record(per_node[self.cfg.shareholders[0].index][0])
        return per_node

    def _store_batch(self, fast: list[_Item], per_node, lo: int, hi: int, replace: bool, nodes=None):
        # One StoreShareStream call per node carrying the whole batch in one
        # message: the node commits it as one transaction with one audit
        # entry (all or nothing while enroll_batch <= the nodes' stream_batch).
        authority = _store_auth([item.auth for item in fast[lo:hi]])
        return self.committee.fan_out(
            "StoreShareStream",
            lambda node: iter([shareholder_pb2.StoreShareStreamRequest(
                records=per_node[node.index][lo:hi], replace=replace, **authority)]),
            nodes=nodes,
            timeout_s=self._batch_timeout(hi - lo),
        )

    def _send_batch(self, prepared):
        fast, per_node, replace = prepared
        if not fast:
            return prepared, None
        return prepared, self._store_batch(fast, per_node, 0, len(fast), replace)

    def _batch_timeout(self, count: int) -> float:
        # A batch write may take longer than one call; allow 2 ms per record on top.
        return self.cfg.call_timeout_s + 0.002 * count

    def _finish_batch(self, tenant: str, batch: list[_Item], sent) -> list[matcher_pb2.EnrollStreamResponse]:
        (fast, per_node, replace), gather = sent
        if gather is not None:
            self._settle_batch(tenant, fast, per_node, replace, gather.all())
        # Repeated subjects of the batch, and items the batch could not settle,
        # go through the one-by-one path, in order.
        results = []
        outcomes: Tally = Tally()
        for item in batch:
            if item.code is None:
                self._enrol_item(tenant, item)
            outcomes["enrolled" if item.code == _OK else item.code.name] += 1
            record.wipe(item.vector)
            item.vector = None
            results.append(matcher_pb2.EnrollStreamResponse(
                subject=item.subject, request_id=item.request_id,
                code=status.code_value(item.code), message=item.message,
            ))
        for label, count in outcomes.items():
            metrics.ENROLMENTS.labels(label).inc(count)
        for records in per_node.values():
            records.clear()
        return results

    def _settle_batch(self, tenant, fast, per_node, replace, outcomes: list[Outcome], lo: int = 0,
                      hi: int | None = None) -> None:
        """Set the outcome of items fast[lo:hi] from the nodes' answers to their write."""
        # A node stores a batch all or nothing, and a record whose request id
        # it already holds is overwritten, so when every node confirmed, all
        # n shares of every item come from this one split.
        hi = len(fast) if hi is None else hi
        failed = [o for o in outcomes if not o.ok]
        if not failed:
            for item in fast[lo:hi]:
                item.code, item.message = _OK, ""
            return
        if all(o.code == grpc.StatusCode.ALREADY_EXISTS for o in failed) and not any(o.ok for o in outcomes):
            # Nothing was stored anywhere, because some subject is already
            # enrolled: halve the batch until the duplicates stand alone
            # (about 2 log2(batch) writes per duplicate); a lone duplicate is
            # left to the one-by-one path, which names it.
            if hi - lo > 1:
                mid = (lo + hi) // 2
                for a, b in ((lo, mid), (mid, hi)):
                    retry = self._store_batch(fast, per_node, a, b, replace).all()
                    self._settle_batch(tenant, fast, per_node, replace, retry, a, b)
            return
        for o in failed:
            self._node_failed(o, "StoreShareStream")
        # Undo on every node that stored the batch or may have (a timed-out
        # call may still commit); nodes that refused stored nothing.
        undo = tuple(o.node for o in outcomes if o.ok or o.code in TRANSPORT_CODES)
        not_undone: set[str] = set()
        for item in fast[lo:hi]:
            not_undone.update(self._compensate(tenant, item.subject, item.request_id, undo, item.auth))
        paused = all(o.code == grpc.StatusCode.FAILED_PRECONDITION for o in failed)
        message = (
            "Enrolment is paused: a shareholder is in maintenance (share refresh or reshare); retry later"
            if paused else f"{len(failed)} of {self.n} shareholders did not store the batch"
        )
        if not_undone:
            message += (
                f", and {len(not_undone)} did not confirm the clean-up; "
                "retry with the same request id to overwrite every share."
            )
        else:
            message += "; nothing was kept, so the subject is not enrolled."
        code = grpc.StatusCode.FAILED_PRECONDITION if paused else grpc.StatusCode.UNAVAILABLE
        for item in fast[lo:hi]:
            item.code, item.message = code, message

    def _enrol_item(self, tenant: str, item: _Item) -> None:
        # The one-by-one path for stream items the batch did not settle.
        try:
            if item.vector is None:
                raise status.Unavailable("The template was not kept for a retry; send it again.")
            _, already = self._enrol_one(tenant, item.subject, item.request_id, item.vector, item.replace,
                                         item.auth)
            item.code, item.message = _OK, ("Already enrolled by this request id." if already else "")
        except status.RpcError as exc:
            item.code, item.message = exc.code, exc.message
        except (InvalidTemplate, InvalidShares) as exc:
            item.code, item.message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        finally:
            record.wipe(item.vector)
            item.vector = None

    # --- Verify -------------------------------------------------------------

    def Verify(self, request, context):
        tenant = self._tenant(context)
        subject = status.checked(names.check_id, request.subject, "subject")
        probe = _vector(request.probe, tenant.dimensions, "probe")
        modality = tenant.modality(probe.size)
        codes: list[np.ndarray] = []
        decision_id = str(uuid.uuid4())
        outcome_label = "INTERNAL"
        try:
            body = self._check_ticket(request, tenant, subject, probe)
            # The probe is encoded while the nodes work on their releases.
            joined = self._rejoin(tenant.name, subject, request.ticket, decision_id, body.request_id,
                                  meanwhile=lambda: codes.append(codec.encode(probe, probe.size)),
                                  dimension=probe.size)
            probe_code = codes[0]
            try:
                score = codec.cosine(probe_code, joined.template)
            finally:
                record.wipe(joined.template)
            match = score >= modality.match_threshold
            decision = matcher_pb2.DECISION_MATCH if match else matcher_pb2.DECISION_NO_MATCH
            outcome_label = "MATCH" if match else "NO_MATCH"
            used = [self._by_index[i].name for i in joined.used]
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

    def _check_write_ticket(self, request, tenant: TenantPolicy, subject: str, request_id: str,
                            operations: tuple[int, ...], template: np.ndarray | None):
        """The provider's write ticket of an enrolment or delete, checked here
        (the nodes check it again, all but the template digest)."""
        if not request.HasField("ticket"):
            raise status.PermissionDenied("A write needs the provider's signed ticket.")
        try:
            body = ticket.verify(request.ticket, tenant.ticket_keys, tenant=tenant.name, audience=self.cfg.cluster_id,
                                 operations=operations)
        except InvalidTicket as exc:
            raise status.of(exc) from None
        if body.subject != subject or body.request_id != request_id:
            raise status.PermissionDenied("The ticket was issued for another subject or request id.")
        if template is not None and not ticket.template_matches(body, template):
            raise status.PermissionDenied("The template is not the one the ticket authorises.")
        return body

    def _check_ticket(self, request, tenant: TenantPolicy, subject: str, probe: np.ndarray):
        if not request.HasField("ticket"):
            raise status.PermissionDenied("A verification needs the provider's signed ticket.")
        try:
            body = ticket.verify(request.ticket, tenant.ticket_keys, tenant=tenant.name, audience=self.cfg.cluster_id,
                                 operations=(ticket.VERIFY,))
        except InvalidTicket as exc:
            raise status.of(exc) from None
        if body.subject != subject:
            raise status.PermissionDenied("The verification ticket was issued for another subject.")
        if not ticket.probe_matches(body, probe):
            raise status.PermissionDenied("The probe is not the one the verification ticket authorises.")
        return body

    def _share_problem(self, share: common_pb2.ShareRecord, node: ShareholderEndpoint, tenant: str, subject: str,
                       dimension: int):
        # Why a released share cannot be used as node's share of this subject, or None.
        if share.tenant != tenant or share.subject != subject:
            return "share labelled for another subject"
        if share.index != node.index:
            return "share carries another shareholder's index"
        if share.threshold != self.k or share.shareholders != self.n or share.dimension != dimension:
            return "share does not fit the configured committee or dimension"
        if share.mac_count != record.MAC_COUNT or len(share.values) != 4 * (dimension + record.MAC_COUNT):
            return "share has the wrong length"
        # The values' range is checked by record.join, and by
        # validate_record only when join refuses (to name the culprit).
        return None

    def _off_polynomial(self, used: list[tuple], late: list[tuple], dimension: int) -> list[int]:
        """Indices of late (share, key share) pairs not on the polynomial of the pairs that passed."""
        size = epoch_mac.TAG_COUNT * dimension
        width = dimension + record.MAC_COUNT
        xs = [int(r.index) for r, _ in used]
        ys = np.empty((len(used), 1, width + size), dtype=np.uint32)
        scratch = [ys]

        def unpack(r, key) -> np.ndarray:
            values = np.empty(width + size, dtype=np.uint32)
            scratch.append(values)
            a = record.unpack_values(r.values, width)
            b = record.unpack_values(key.values, size)
            values[:width], values[width:] = a, b
            record.wipe(a, b)
            return values

        try:
            for j, (r, key) in enumerate(used):
                ys[j, 0] = unpack(r, key)
            off = []
            for r, key in late:
                expected = sharing.interpolate_at(xs, ys, int(r.index))
                scratch.append(expected)
                try:
                    got = unpack(r, key)
                except InvalidShares:
                    off.append(int(r.index))
                    continue
                if not np.array_equal(expected[0], got):
                    off.append(int(r.index))
            return off
        finally:
            record.wipe(*scratch)

    def _release_order(self, tenant: str, subject: str) -> tuple[tuple[ShareholderEndpoint, ...], tuple[ShareholderEndpoint, ...]]:
        """(the k nodes to ask first, the others): nodes seen up first.

        The start in the committee is a hash of the subject, so load spreads
        over the nodes while one subject's attempts go to the same k nodes
        and meet their attempt limits as if every node were asked (rotating
        per call would let n/k times more attempts through).
        """
        nodes = self.cfg.shareholders
        if self.cfg.hedge_ms == 0 or len(nodes) <= self.k:
            return tuple(nodes), ()
        start = zlib.crc32(f"{tenant}\x00{subject}".encode()) % len(nodes)
        rotated = nodes[start:] + nodes[:start]
        now = time.monotonic()
        # A node that failed at transport level in the last few seconds is asked last.
        ordered = sorted(rotated, key=lambda e: now - self._down_since.get(e.name, -1e9) < _DOWN_MEMORY_S)
        return tuple(ordered[: self.k]), tuple(ordered[self.k:])

    def _rejoin(self, tenant: str, subject: str, ticket_msg, decision_id: str, request_id: str,
                meanwhile: Callable[[], object] | None = None, *, dimension: int) -> record.JoinResult:
        """Release shares from k nodes (more only if needed), rejoin from k consistent ones (fail closed).

        Hedged fan-out: k nodes are asked first, so a verification releases
        only the shares it needs; the other nodes are asked as soon as one
        of the first fails or sends an unusable share, the shares do not
        rejoin, or ``hedge_ms`` passes without k shares in hand.
        ``meanwhile`` runs once the first calls are on their way.
        """
        request = shareholder_pb2.ReleaseShareRequest(ticket=ticket_msg)
        first, rest = self._release_order(tenant, subject)
        gather = self.committee.fan_out("ReleaseShare", request, nodes=first)
        if meanwhile is not None:
            meanwhile()
        started = time.monotonic()
        hedge_s = self.cfg.hedge_ms / 1000.0
        suspected = [0]

        def ask_rest() -> None:
            nonlocal rest
            if rest:
                self.committee.fan_out("ReleaseShare", request, nodes=rest, into=gather)
                rest = ()

        by_epoch: dict[int, dict[int, common_pb2.ShareRecord]] = {}
        failures: list[Outcome] = []
        tried: set[frozenset] = set()
        integrity_failed = False
        # Nodes whose share has another dimension than the probe: the
        # subject's modality is another one if no node has a share of this
        # one (the caller's mistake), else those nodes are suspects.
        off_dimension: list[ShareholderEndpoint] = []

        def take(outcome: Outcome) -> None:
            node = outcome.node
            if not outcome.ok:
                self._node_failed(outcome, "ReleaseShare")
                if outcome.code in TRANSPORT_CODES:
                    self._down_since[node.name] = time.monotonic()
                failures.append(outcome)
                return
            self._down_since.pop(node.name, None)
            shares = list(outcome.response.shares)
            if not shares:
                failures.append(Outcome(node, None, grpc.StatusCode.NOT_FOUND, "no share"))
                return
            keys = {k.epoch: k for k in outcome.response.mac_keys}
            for share in shares:
                if share.threshold != self.k or share.shareholders != self.n:
                    # Another committee's epoch, served while a reshare switches over: not ours, not a fault.
                    continue
                if share.dimension != dimension and share.tenant == tenant and share.subject == subject:
                    off_dimension.append(node)
                    suspected[0] += 1  # ask the other nodes, as for an unusable share
                    continue
                problem = self._share_problem(share, node, tenant, subject, dimension)
                key = keys.get(share.epoch)
                if not problem and (key is None or key.index != node.index or key.dimension != dimension
                                    or len(key.values) != 4 * epoch_mac.TAG_COUNT * dimension):
                    problem = "share without a fitting MAC key share"
                if problem:
                    self._suspect(node, problem, decision_id=decision_id, tenant=tenant, subject=subject)
                    suspected[0] += 1
                    continue
                by_epoch.setdefault(share.epoch, {})[node.index] = (share, key)

        def attempt() -> record.JoinResult | None:
            # Rejoin the newest epoch with k shares in hand, if not tried yet.
            nonlocal integrity_failed
            while True:
                ready = [e for e, group in by_epoch.items() if len(group) >= self.k]
                if not ready:
                    return None
                epoch = max(ready)
                group = dict(by_epoch[epoch])
                if frozenset(group) in tried:
                    return None
                tried.add(frozenset(group))
                try:
                    return record.join([s for s, _ in group.values()], [k for _, k in group.values()])
                except InvalidShares:
                    # Out-of-range values: find the share, name its node, drop it, go on.
                    integrity_failed = True
                    for index, (share, key) in group.items():
                        try:
                            record.validate_record(share)
                            record.unpack_values(key.values, epoch_mac.TAG_COUNT * dimension)
                        except InvalidShares:
                            self._suspect(self._by_index[index], "share is malformed", decision_id=decision_id,
                                          tenant=tenant, subject=subject)
                            del by_epoch[epoch][index]
                except IntegrityError:
                    integrity_failed = True
                    logs.event(
                        self.log, "shares do not rejoin consistently; waiting for more", logging.WARNING,
                        decision_id=decision_id, tenant=tenant, subject=subject, epoch=epoch,
                        nodes=[self._by_index[i].name for i in sorted(group)],
                    )
                    return None

        while True:
            if rest:
                outcome = gather.poll(max(0.0, started + hedge_s - time.monotonic()))
                if outcome is None:
                    if gather.pending == 0 and any(f.code in _NO_HEDGE for f in failures):
                        break  # the first k answered and one refused this verification
                    ask_rest()  # hedge time passed, or no epoch has k shares yet
                    continue
            else:
                outcome = gather.next()
                if outcome is None:
                    break
            failed_before, suspected_before = len(failures), suspected[0]
            take(outcome)
            refused = len(failures) > failed_before and failures[-1].code in _NO_HEDGE
            if (len(failures) > failed_before and not refused) or suspected[0] > suspected_before:
                ask_rest()
            result = attempt()
            if result is None:
                if integrity_failed:
                    ask_rest()
                continue
            # Shares that arrived meanwhile are checked against the polynomial
            # of the ones that passed (no waiting, no second MAC check): a
            # lying node is named even when it was not needed for this decision.
            for late in gather.arrived():
                take(late)
            used = by_epoch[result.epoch]
            late = [share for index, share in used.items() if index not in result.used]
            suspects = list(result.suspects)
            if late:
                suspects += [i for i in self._off_polynomial([used[i] for i in result.used], late, dimension)
                             if i not in suspects]
            for index in suspects:
                self._suspect(
                    self._by_index[index], "share outvoted by the others",
                    decision_id=decision_id, tenant=tenant, subject=subject, epoch=result.epoch,
                )
            for node in off_dimension:
                self._suspect(node, "share of another dimension than the enrolled one's",
                              decision_id=decision_id, tenant=tenant, subject=subject)
            return result
        if off_dimension and not by_epoch:
            raise status.InvalidArgument(
                f"The subject is enrolled under another modality than this {dimension}-value probe's.")
        if integrity_failed:
            logs.event(
                self.log, "inconsistent shares could not be outvoted", logging.ERROR,
                decision_id=decision_id, tenant=tenant, subject=subject,
                nodes=sorted({self._by_index[i].name for g in by_epoch.values() for i in g}),
            )
            raise status.DataLoss(
                "The subject's shares are inconsistent; no decision was made and the operators are alerted."
            )
        raise self._no_quorum(failures, max((len(g) for g in by_epoch.values()), default=0))

    def _no_quorum(self, failures: list[Outcome], best: int) -> status.RpcError:
        # Fewer than k usable shares: say why, as definitely as the answers allow.
        codes = Tally(o.code for o in failures)
        enough_to_rule_out = self.n - self.k + 1  # this many refusals leave fewer than k possible shares
        for code in _DEFINITIVE:
            if codes[code] >= enough_to_rule_out:
                return status.error(code, _DEFINITIVE_MESSAGE[code])
        answered = {o.code for o in failures if o.code not in TRANSPORT_CODES}
        if best == 0 and len(answered) == 1:
            (code,) = answered
            if code in _DEFINITIVE_MESSAGE:
                return status.error(code, _DEFINITIVE_MESSAGE[code])
        return status.Unavailable(
            f"Fewer than k = {self.k} shareholders answered with a share; no decision was made."
        )

    # --- Delete -------------------------------------------------------------

    def Delete(self, request, context):
        tenant = self._tenant(context)
        subject = status.checked(names.check_id, request.subject, "subject")
        if not request.HasField("ticket"):
            raise status.PermissionDenied("A delete needs the provider's signed ticket.")
        request_id = request.request_id or _claimed_request_id(request.ticket)
        request_id = status.checked(names.check_token, request_id, "request id")
        self._check_write_ticket(request, tenant, subject, request_id, (ticket.DELETE,), None)
        req = shareholder_pb2.DeleteSharesRequest(tenant=tenant.name, subject=subject, request_id=request_id,
                                                  ticket=request.ticket)
        outcomes = self.committee.call_all("DeleteShares", req)
        response = matcher_pb2.DeleteResponse(subject=subject, complete=all(o.ok for o in outcomes))
        for o in outcomes:
            if o.ok:
                message = f"Erased {o.response.deleted} record(s)."
            else:
                self._node_failed(o, "DeleteShares")
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


@dataclass(frozen=True)
class _BatchAuth:
    """A checked batch ticket of one EnrollBatches message."""

    batch: common_pb2.WriteBatch
    operation: int


def _store_auth(auths) -> dict:
    """StoreShares / StoreShareStream fields for these items' authorities, in
    record order: each ticket, or a blank one for an item of a batch ticket
    (each batch sent once)."""
    blank = common_pb2.VerificationTicket()
    batches: dict[int, common_pb2.WriteBatch] = {}
    write_tickets = []
    for auth in auths:
        if isinstance(auth, common_pb2.WriteBatch):
            batches.setdefault(id(auth), auth)
            write_tickets.append(blank)
        else:
            write_tickets.append(auth)
    return {"tickets": write_tickets, "batches": list(batches.values())}


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
    body = common_pb2.TicketBody()
    try:
        body.ParseFromString(signed.body)
    except DecodeError:
        return ""
    return body.request_id



def _batches(requests: Iterable, size: int, dimension: int, check_ticket) -> Iterator[list[_Item]]:
    """Read the stream of (request, batch authority) ``size`` requests at a time, checking each one."""
    batch: list[_Item] = []
    for position, (req, authority) in enumerate(requests):
        batch.append(_check_stream_item(position, req, dimension, check_ticket, authority))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_stream_item(position: int, req, dimension: int, check_ticket, authority) -> _Item:
    auth = authority.batch if isinstance(authority, _BatchAuth) else req.ticket
    item = _Item(position, req.subject, req.request_id, req.replace, auth)
    try:
        status.checked(names.check_id, req.subject, "subject")
        status.checked(names.check_token, req.request_id, "request id")
        item.vector = _vector(req.template, dimension, "template")
        check_ticket(req, item.vector, authority)
    except status.RpcError as exc:
        item.code, item.message = exc.code, exc.message
        if item.vector is not None:
            record.wipe(item.vector)
            item.vector = None
    return item
