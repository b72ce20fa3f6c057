"""``Matcher.Identify``: 1:N search of the tenant's gallery on shares.

The matcher checks the provider's IDENTIFY ticket and that it binds this
probe, quantises the probe (``vault.codec``), Shamir-splits it with degree 1
at the x-coordinates of three nodes S and streams each node its share
(``ShareholderIdentify.IdentifyQuery``). The nodes score their shares of the
gallery, compare in a 3-party computation (``vault.mpc``) and send back their
XOR components of the match bits; the matcher opens them and, with two or
more candidates, asks for the candidates' pairwise comparisons, then for
the winner's subject. No score reaches the matcher, and no template
unless confirmation (below) rejoins the candidates'.

Scores are integer inner products of int8 codes, s = <t, q>. The threshold
in score units is T = ceil(tau * |q|^2) for the modality's cosine threshold
tau: for a genuine probe |t| ~ |q|, so s >= T approximates cos >= tau; it is
exact for the integer rule, which the plaintext reference applies too
(docs/architecture.md states the difference to Verify's cosine). The
margin is M = ceil(MARGIN * |q|^2).

Confirmation (the tenant's ``identify_confirm``, default on): the protocol
is semi-honest, so one lying node can flip opened bits. When the bits name
1 to ``mpc.CONFIRM_CANDIDATES`` candidates, the matcher asks the nodes for
their subjects (``confirm``) and decides with Verify's own path on each:
``matcher.release.Release`` (hedged, MAC-checked rejoin) under the query's
IDENTIFY ticket, then Verify's cosine rule (``_confirmed``). A lying node
can then hide a match (NO_MATCH) or stop the query (UNAVAILABLE,
DATA_LOSS), never make a MATCH the cosine rule does not give.

Verify on shares (``verify_on_shares``, a tenant's option for
``Matcher.Verify``): the same stream on the claimed subject's one row;
the matcher opens only |t|^2 and the decision bit, never a template.

Fail closed: any node error, timeout, or disagreement between the nodes'
galleries or answers ends in an error status, never a MATCH.

``IdentifyBatch`` runs up to ``MAX_BATCH`` queries of one call as single
queries, ``BATCH_WORKERS`` at a time: each is exactly an ``Identify`` (its
own ticket, attempt count and audit entry at every node) and its result,
or its status, lands in its slot. The nodes score and compare each query
on its own; sharing one matrix product and the circuit's rounds over the
batch (``mpc.score_shares`` already takes a batch) is not built.
"""
from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from concurrent.futures import CancelledError, ThreadPoolExecutor

import grpc
import numpy as np

from matcher import metrics, vectors
from matcher.committee import TRANSPORT_CODES
from matcher.release import Release
from splitvault.v1 import identify_pb2, identify_pb2_grpc, matcher_pb2
from vault import codec, mpc, record, sharing, ticket
from vault.names import check_group
from vault.errors import InvalidShares, InvalidTicket
from vaultrpc import logs, status, wire

# The winner must beat every other candidate by this much (cosine units, times |q|^2).
MARGIN = 0.02
# Most queries one IdentifyBatch call may carry, and how many run at once.
MAX_BATCH = 32
BATCH_WORKERS = 4
# Answers a node's refusal stands for (not worked around with other nodes).
_PASS_ON = {
    grpc.StatusCode.PERMISSION_DENIED: status.PermissionDenied("The shareholders refused the identify ticket."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: status.ResourceExhausted(
        "Too many identifications for this tenant; try again later."),
    grpc.StatusCode.FAILED_PRECONDITION: None,  # the node's own sentence
    grpc.StatusCode.INVALID_ARGUMENT: None,
}
_DECISIONS = {mpc.MATCH: matcher_pb2.DECISION_MATCH, mpc.NO_MATCH: matcher_pb2.DECISION_NO_MATCH,
              mpc.AMBIGUOUS: matcher_pb2.DECISION_AMBIGUOUS}


class _Stream:
    """One node's IdentifyQuery stream: steps go in through a queue, openings come back in order."""

    def __init__(self, node, stub: identify_pb2_grpc.ShareholderIdentifyStub, timeout_s: float):
        self.node = node
        self._steps: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.IdentifyQuery(iter(self._steps.get, None), timeout=timeout_s)

    def send(self, step: identify_pb2.IdentifyQueryRequest) -> None:
        self._steps.put(step)

    def receive(self) -> identify_pb2.IdentifyQueryResponse:
        return next(self._call)

    def close(self) -> None:
        """End the request stream and read the node's end of the call (no cancellation logged)."""
        self._steps.put(None)
        try:
            for _ in self._call:
                raise status.Internal("A shareholder sent more than the identification asked for.")
        except grpc.RpcError:
            pass

    def cancel(self) -> None:
        self._steps.put(None)
        self._call.cancel()


def committee_for_identify(service) -> tuple:
    """Three nodes S, lowest index first among those not recently down; UNAVAILABLE if fewer."""
    if service.k != mpc.THRESHOLD:
        raise status.FailedPrecondition(
            f"Identify on shares runs with threshold 2 only; this committee's threshold is {service.k}.")
    now = time.monotonic()
    ordered = sorted(service.cfg.shareholders,
                     key=lambda e: (now - service.down_since.get(e.name, -1e9) < 5.0, e.index))
    if len(ordered) < mpc.PARTIES:
        raise status.FailedPrecondition("Identify on shares needs a committee of at least three nodes.")
    return tuple(ordered[: mpc.PARTIES])


def identify(service, request, context) -> matcher_pb2.IdentifyResponse:
    tenant = service._tenant(context)

    status.checked(check_group, request.group, "group")
    probe = vectors.checked(request.probe, tenant.dimensions, "probe")
    dimension = probe.size
    modality = tenant.modality(dimension)
    decision_id = str(uuid.uuid4())
    label = "INTERNAL"
    code = shares = qf = None
    streams: list[_Stream] = []
    try:
        body = _check_ticket(request, tenant, service.cfg.cluster_id, probe)
        nodes = committee_for_identify(service)
        code = codec.encode(probe, dimension)
        norm_sq = int(np.dot(code[0].astype(np.int64), code[0].astype(np.int64)))
        threshold = math.ceil(modality.match_threshold * norm_sq)
        margin = math.ceil(MARGIN * norm_sq)
        qf = codec.to_field(code)
        shares = sharing.split(qf, mpc.THRESHOLD, max(e.index for e in nodes))
        names = [e.name for e in nodes]
        timeout = service.cfg.call_timeout_s * 4
        for e in nodes:
            stub = identify_pb2_grpc.ShareholderIdentifyStub(service.committee.channel(e.name))
            streams.append(_Stream(e, stub, timeout))
        for e, s in zip(nodes, streams, strict=True):
            s.send(identify_pb2.IdentifyQueryRequest(start=identify_pb2.IdentifyStart(
                ticket=request.ticket, query_id=decision_id, committee=names, addresses=[n.address for n in nodes],
                probe_share=np.ascontiguousarray(shares[e.index - 1, 0], dtype="<u4").tobytes(),
                dimension=dimension, threshold=threshold, margin=margin, group=request.group)))
        record.wipe(shares, qf, code)
        first = _all(service, streams)
        rows = first[0].rows
        if any(o.rows != rows or o.gallery_digest != first[0].gallery_digest for o in first):
            raise status.Unavailable("The shareholders' galleries differ; try again.")
        confirmed = None
        if rows == 0:
            decision, row = mpc.NO_MATCH, None
        elif tenant.identify_confirm:
            cands = [int(g) for g in np.flatnonzero(_open([o.bits for o in first], rows))]
            decision, row = (mpc.decide(cands) if not cands or len(cands) > mpc.CONFIRM_CANDIDATES
                             else (None, None))
            if decision is None:  # 1 to CONFIRM_CANDIDATES candidates: Verify's path decides
                step = identify_pb2.IdentifyQueryRequest(confirm=identify_pb2.IdentifyConfirm(rows=cands))
                for s in streams:
                    s.send(step)
                named = {tuple(o.subjects) for o in _all(service, streams)}
                if len(named) != 1 or len(next(iter(named))) != len(cands):
                    raise status.DataLoss("The shareholders disagree on the candidates' subjects.")
                for s in streams:
                    s.close()
                decision, confirmed = _confirmed(service, tenant, request.ticket, probe, decision_id,
                                                 list(next(iter(named))), nodes)
        else:
            cands = [int(g) for g in np.flatnonzero(_open([o.bits for o in first], rows))]
            if 2 <= len(cands) <= mpc.MAX_CANDIDATES:
                pairs = mpc.candidate_pairs(cands)
                step = identify_pb2.IdentifyQueryRequest(pairs=identify_pb2.IdentifyPairs(
                    first=[a for a, _ in pairs], second=[b for _, b in pairs]))
                for s in streams:
                    s.send(step)
                decision, row = mpc.decide(cands, _open([o.bits for o in _all(service, streams)], len(pairs)))
            else:
                decision, row = mpc.decide(cands)
        subject = confirmed or ""
        if decision == mpc.MATCH and confirmed is None:
            step = identify_pb2.IdentifyQueryRequest(resolve=identify_pb2.IdentifyResolve(row=row))
            for s in streams:
                s.send(step)
            named = {o.subject for o in _all(service, streams)}
            if len(named) != 1:
                raise status.DataLoss("The shareholders disagree on the matched row.")
            subject = named.pop()
        for s in streams:
            s.close()
        label = decision
        logs.event(service.log, "identified", decision=decision, decision_id=decision_id, tenant=tenant.name,
                   request_id=body.request_id, nodes_used=names, rows=rows)
        return matcher_pb2.IdentifyResponse(decision=_DECISIONS[decision], subject=subject, decision_id=decision_id)
    except status.RpcError as exc:
        label = exc.code.name
        logs.event(service.log, "identification without decision", logging.WARNING, code=exc.code.name,
                   decision_id=decision_id, tenant=tenant.name)
        raise
    finally:
        for s in streams:
            s.cancel()
        record.wipe(probe, *(a for a in (code, qf, shares) if a is not None))
        metrics.IDENTIFICATIONS.labels(label).inc()


def identify_batch(service, request, context) -> matcher_pb2.IdentifyBatchResponse:
    """Each query of the batch as ``identify`` answers it, in order; a failed query's status in its slot."""
    service._tenant(context)  # an unknown caller is refused for the whole call
    queries = list(request.queries)
    if not 1 <= len(queries) <= MAX_BATCH:
        raise status.InvalidArgument(f"An identify batch holds 1 to {MAX_BATCH} queries.")

    def one(query) -> matcher_pb2.IdentifyBatchResult:
        try:
            return matcher_pb2.IdentifyBatchResult(code=0, response=identify(service, query, context))
        except status.RpcError as exc:
            return matcher_pb2.IdentifyBatchResult(code=exc.code.value[0], message=exc.message)

    with ThreadPoolExecutor(max_workers=min(BATCH_WORKERS, len(queries)), thread_name_prefix="identify-batch") as pool:
        results = list(pool.map(one, queries))
    return matcher_pb2.IdentifyBatchResponse(results=results)


# A node's considered refusal of a verification on shares, in Verify's own words.
_VERIFY_PASS_ON = {
    grpc.StatusCode.PERMISSION_DENIED: status.PermissionDenied("The shareholders refused the verification ticket."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: status.ResourceExhausted(
        "Too many verification attempts for this subject; try again later."),
    grpc.StatusCode.NOT_FOUND: status.NotFound("The subject is not enrolled."),
    grpc.StatusCode.FAILED_PRECONDITION: None,
    grpc.StatusCode.INVALID_ARGUMENT: None,
}


def verify_on_shares(service, tenant, subject: str, probe: np.ndarray, ticket_msg,
                     decision_id: str) -> tuple[bool, int, list[str]]:
    """Verify (1:1) on shares: (match, epoch, nodes used); the claimed template is never rejoined.

    The Identify protocol on a one-row gallery (docs/architecture.md, "Verify
    on shares"): every node of S checks the VERIFY ticket as for a release
    and writes one ``verify_on_shares`` entry; their re-randomised shares of
    |t|^2 are opened here; T = mpc.verify_threshold(tau, |q|^2, |t|^2) makes
    [s >= T] exactly Verify's ``codec.cosine(probe, template) >= tau``; each
    node gets an additive share of -T and the circuit opens [s - T >= 0].
    """
    dimension = probe.size
    tau = tenant.modality(dimension).match_threshold
    code = qf = shares = None
    streams: list[_Stream] = []
    try:
        nodes = committee_for_identify(service)
        code = codec.encode(probe, dimension)
        norm_sq = int(np.dot(code[0].astype(np.int64), code[0].astype(np.int64)))
        qf = codec.to_field(code)
        shares = sharing.split(qf, mpc.THRESHOLD, max(e.index for e in nodes))
        names = [e.name for e in nodes]
        for e in nodes:
            stub = identify_pb2_grpc.ShareholderIdentifyStub(service.committee.channel(e.name))
            streams.append(_Stream(e, stub, service.cfg.call_timeout_s * 4))
        for e, s in zip(nodes, streams, strict=True):
            s.send(identify_pb2.IdentifyQueryRequest(start=identify_pb2.IdentifyStart(
                ticket=ticket_msg, query_id=decision_id, committee=names, addresses=[n.address for n in nodes],
                probe_share=np.ascontiguousarray(shares[e.index - 1, 0], dtype="<u4").tobytes(),
                dimension=dimension, verify_subject=subject)))
        record.wipe(shares, qf, code)
        first = _all(service, streams, _VERIFY_PASS_ON)
        if any(o.rows != 1 or o.gallery_digest != first[0].gallery_digest or o.epoch != first[0].epoch
               for o in first):
            raise status.Unavailable("The shareholders hold different records of the subject; try again.")
        if any(len(o.norm_share) != 4 for o in first):
            raise status.DataLoss("A shareholder sent a malformed verification share.")
        norm = mpc.open_sum([int.from_bytes(o.norm_share, "little") for o in first])
        try:
            threshold = mpc.verify_threshold(tau, norm_sq, norm, dimension)
        except InvalidShares:  # not the squared norm of any int8 code: a node lied or a share is damaged
            raise status.DataLoss("The shareholders' verification shares are inconsistent.") from None
        dealt = mpc.threshold_shares(threshold)
        for j, s in enumerate(streams):
            s.send(identify_pb2.IdentifyQueryRequest(verify_threshold=identify_pb2.IdentifyVerifyThreshold(
                share=int(dealt[j]).to_bytes(4, "little"),
                next_share=int(dealt[(j + 1) % mpc.PARTIES]).to_bytes(4, "little"))))
        dealt = threshold = None
        match = bool(_open([o.bits for o in _all(service, streams, _VERIFY_PASS_ON)], 1)[0])
        for s in streams:
            s.close()
        return match, int(first[0].epoch), names
    finally:
        for s in streams:
            s.cancel()
        record.wipe(*(a for a in (code, qf, shares) if a is not None))


def _confirmed(service, tenant, ticket, probe: np.ndarray, decision_id: str,
               subjects: list[str], nodes: tuple) -> tuple[str, str | None]:
    """The decision by Verify's path on each candidate: MAC-checked rejoin, then the cosine rule.

    MATCH when exactly one candidate reaches the threshold, or the best beats
    the second by MARGIN (cosine units); AMBIGUOUS when two or more reach it
    within MARGIN; NO_MATCH when none does. Any release failure is the
    query's error (fail closed).
    """
    threshold = tenant.modality(probe.size).match_threshold
    code = codec.encode(probe, probe.size)
    passing: list[tuple[float, str]] = []
    try:
        for subject in subjects:
            release = Release(service, tenant=tenant.name, subject=subject, dimension=probe.size,
                              decision_id=decision_id, ticket=ticket, identify_query_id=decision_id, nodes=nodes)
            try:
                joined = release.run()
            except status.RpcError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:  # deleted since the gallery was read
                    raise status.Unavailable("The gallery changed during the identification; try again.") from None
                raise
            try:
                score = codec.cosine(code, joined.template)
            finally:
                record.wipe(joined.template)
            if score >= threshold:
                passing.append((score, subject))
            del score
    finally:
        record.wipe(code)
    passing.sort(reverse=True)
    try:
        if not passing:
            return mpc.NO_MATCH, None
        if len(passing) == 1 or passing[0][0] - passing[1][0] >= MARGIN:
            return mpc.MATCH, passing[0][1]
        return mpc.AMBIGUOUS, None
    finally:
        passing.clear()


def _check_ticket(request, tenant, cluster_id: str, probe: np.ndarray):
    if not request.HasField("ticket"):
        raise status.PermissionDenied("An identification needs the provider's signed ticket.")
    try:
        body = wire.verify_ticket(request.ticket, tenant.ticket_keys, tenant=tenant.name, audience=cluster_id,
                             operations=(ticket.IDENTIFY,))
    except InvalidTicket as exc:
        raise status.of(exc) from None
    if not ticket.probe_matches(body, probe):
        raise status.PermissionDenied("The probe is not the one the identify ticket authorises.")
    return body


def _open(components: list[bytes], rows: int) -> np.ndarray:
    try:
        return mpc.open_bits(components, rows)
    except InvalidShares:
        raise status.DataLoss("A shareholder sent an opening of the wrong size.") from None


def _all(service, streams: list[_Stream], pass_on: dict | None = None) -> list[identify_pb2.IdentifyQueryResponse]:
    """The next opening of every stream, read in parallel; the first failure ends the query."""
    out: list = [None] * len(streams)
    errors: list = []

    def read(i: int, s: _Stream) -> None:
        try:
            out[i] = s.receive()
        except grpc.RpcError as exc:
            errors.append((s, exc))
            for other in streams:  # fail fast: the others would wait for this one's rounds
                other.cancel()
        except StopIteration:
            errors.append((s, None))

    later = [(s, service.committee.read_later(read, i, s)) for i, s in enumerate(streams) if i]
    read(0, streams[0])  # on this thread: a failure of any stream cancels them all, this one too
    for s, future in later:
        try:
            future.result()
        except CancelledError:  # the committee closed (a reload's old one, or the matcher stopping)
            errors.append((s, None))
    if errors:
        raise _failure(service, errors, _PASS_ON if pass_on is None else pass_on)
    return out


def _failure(service, errors, pass_on: dict) -> status.RpcError:
    # The first real answer among the failures decides (a cancellation we caused is not one).
    real = [(s, e) for s, e in errors if e is not None and e.code() != grpc.StatusCode.CANCELLED] or errors
    for s, exc in real:
        code = exc.code() if exc is not None else grpc.StatusCode.UNAVAILABLE
        metrics.NODE_ERRORS.labels(s.node.name, "IdentifyQuery", code.name).inc()
        if code in TRANSPORT_CODES:
            service.down_since[s.node.name] = time.monotonic()
    s, exc = real[0]
    code = exc.code() if exc is not None else grpc.StatusCode.UNAVAILABLE
    logs.event(service.log, "shareholder call failed", logging.WARNING, node=s.node.name, method="IdentifyQuery",
               code=code.name, detail=(exc.details() if exc is not None else "stream ended")[:200])
    if code in pass_on:
        return pass_on[code] or status.error(code, exc.details() or "The shareholders refused the request.")
    if code == grpc.StatusCode.ABORTED:
        return status.Unavailable("The shareholders' galleries differ (an enrolment, delete or refresh is in flight); "
                                  "try again.")
    if code == grpc.StatusCode.DATA_LOSS:
        return status.DataLoss("A shareholder's stored share is damaged; the identification cannot complete.")
    return status.Unavailable("Fewer than three shareholders completed the identification; try again.")
