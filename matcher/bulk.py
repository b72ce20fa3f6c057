"""Bulk enrolment (``EnrollStream``, ``EnrollBatches``): a stream of
templates enrolled batch by batch.

Each batch is encoded, MAC'd under the epoch's key and split once, and sent
to every node as one all-or-nothing write; up to ``_PIPELINE_DEPTH`` batches
are being stored while the next is prepared. Items a batch cannot settle
(repeats of a subject, another replace flag or modality, a batch the nodes
refused) go through the matcher's one-by-one enrolment
(``MatcherService.enrol_one``), in order. The shares are built as for one
enrolment (``vault.record.make_records``, then ``vaultrpc.wire``).
"""
from __future__ import annotations

from collections import Counter as Tally
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from matcher import metrics, vectors
from matcher.committee import TRANSPORT_CODES, Outcome
from matcher.config import TenantPolicy
from splitvault.v1 import common_pb2, matcher_pb2, shareholder_pb2
from vault import codec, epoch_mac, names, record, sharing, ticket
from vault.errors import InvalidShares, InvalidTemplate, InvalidTicket
from vaultrpc import status, wire

_OK = grpc.StatusCode.OK
# Batches being stored while the next one is prepared.
_PIPELINE_DEPTH = 2


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



@dataclass(frozen=True)
class _BatchAuth:
    """A checked batch ticket of one EnrollBatches message."""

    batch: common_pb2.WriteBatch
    operation: int


def store_auth(auths) -> dict:
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


class BulkEnrolment:
    """One bulk enrolment call of ``matcher`` (a ``MatcherService``)."""

    def __init__(self, matcher) -> None:
        self.m = matcher
        self.cfg, self.committee, self.k, self.n = matcher.cfg, matcher.committee, matcher.k, matcher.n

    def check_batch_ticket(self, message, tenant: TenantPolicy) -> "_BatchAuth | status.RpcError":
        """The message's batch ticket, checked against its templates: its authority, or the refusal for every item."""
        try:
            body = wire.verify_ticket(message.batch_ticket, tenant.ticket_keys, tenant=tenant.name,
                                      audience=self.cfg.cluster_id, operations=ticket.WRITES, batch=True)
        except InvalidTicket as exc:
            return status.PermissionDenied(str(exc))
        nonce = body.nonce
        with np.errstate(over="ignore", invalid="ignore"):
            items = [
                common_pb2.WriteItem(subject=i.subject, request_id=i.request_id, group=i.group,
                                     template_digest=ticket.item_digest(np.array(i.template, dtype=np.float32),
                                                                        nonce, i.request_id))
                for i in message.items
            ]
        if not ticket.batch_matches(body, items):
            return status.PermissionDenied("The templates are not the ones the batch ticket authorises.")
        return _BatchAuth(common_pb2.WriteBatch(ticket=message.batch_ticket, items=items), body.operation)

    def run(self, tenant: str, requests, context) -> Iterator[list[matcher_pb2.EnrollStreamResponse]]:
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
                self.m.check_write_ticket(req, policy, req.subject, req.request_id, (ticket.write_operation(req.replace),), vector)
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
        key_gather = self.m.gather_key(fast[0].auth, dimension)
        templates = np.stack([item.vector for item in fast])
        encoded = field_values = extended = shares = key = None
        try:
            encoded = codec.encode(templates, dimension)
            field_values = codec.to_field(encoded)
            epoch_infos = epoch_gather.all()
            if not all(o.ok for o in epoch_infos):
                for o in epoch_infos:
                    if not o.ok:
                        self.m.node_failed(o, "GetNodeInfo")
                for item in fast:
                    item.code, item.message = grpc.StatusCode.UNAVAILABLE, (
                        "Not every shareholder answered; the template was not stored."
                    )
                return [], {}, False
            epoch = self.m.cluster_epoch([o.response.epoch for o in epoch_infos])
            try:
                key = self.m.mac_key(key_gather.all(), epoch, dimension)
            except status.RpcError as exc:
                for item in fast:
                    item.code, item.message = exc.code, exc.message
                return [], {}, False
            extended = epoch_mac.extend(field_values, key)
            shares = sharing.split(extended, self.k, self.n)
            per_node = self._batch_records(tenant, fast, epoch, shares)
        finally:
            record.wipe(key, templates, encoded, field_values, extended, shares)
        return fast, per_node, bool(replace)

    def _batch_records(self, tenant: str, fast: list[_Item], epoch: int, shares: np.ndarray):
        """ShareRecord messages of a batch, per node index: record.make_records' Shares, built as messages.

        A Share per record would check tenant and subject again for each of
        the n records of each template (most of the cost of building them);
        the ids are checked on the way in (check_id), every record is parsed
        again by the node (``vaultrpc.wire.share``), and the first of each
        batch is parsed here so a format drift cannot pass silently.
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
        wire.share(per_node[self.cfg.shareholders[0].index][0])
        return per_node

    def _store_batch(self, fast: list[_Item], per_node, lo: int, hi: int, replace: bool, nodes=None):
        # One StoreShareStream call per node carrying the whole batch in one
        # message: the node commits it as one transaction with one audit
        # entry (all or nothing while enroll_batch <= the nodes' stream_batch).
        authority = store_auth([item.auth for item in fast[lo:hi]])
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
            self.m.node_failed(o, "StoreShareStream")
        # Undo on every node that stored the batch or may have (a timed-out
        # call may still commit); nodes that refused stored nothing.
        undo = tuple(o.node for o in outcomes if o.ok or o.code in TRANSPORT_CODES)
        not_undone: set[str] = set()
        for item in fast[lo:hi]:
            not_undone.update(self.m.compensate(tenant, item.subject, item.request_id, undo, item.auth))
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
            _, already = self.m.enrol_one(tenant, item.subject, item.request_id, item.vector, item.replace,
                                         item.auth)
            item.code, item.message = _OK, ("Already enrolled by this request id." if already else "")
        except status.RpcError as exc:
            item.code, item.message = exc.code, exc.message
        except (InvalidTemplate, InvalidShares) as exc:
            item.code, item.message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        finally:
            record.wipe(item.vector)
            item.vector = None


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
        status.checked(names.check_group, req.group, "group")
        item.vector = vectors.checked(req.template, dimension, "template")
        check_ticket(req, item.vector, authority)
    except status.RpcError as exc:
        item.code, item.message = exc.code, exc.message
        if item.vector is not None:
            record.wipe(item.vector)
            item.vector = None
    return item
