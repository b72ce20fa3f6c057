"""The payment provider's client for the matcher.

    with MatcherClient.from_cluster_dir("cluster") as client:
        client.enroll("alice", template)
        result = client.verify("alice", probe)      # VerifyResult(decision="MATCH", ...)
        client.delete("alice")

Every call carries a fresh ticket signed with the provider's Ed25519 ticket
key (``vaultrpc.wire.issue_ticket``) for this cluster (its audience, the cluster id):
the matcher and every shareholder check it. A verification's ticket binds
its probe; an enrolment's binds the template and says ENROLL or REPLACE; a
deletion's says DELETE (docs/contracts.md, "Provider-signed writes"). The tenant is the name
in the client certificate; there is no tenant field to get wrong. Failures
surface as ``grpc.RpcError`` (status code and a one-sentence message); a
NO_MATCH is a completed verification, not an error.
"""
from __future__ import annotations

import json
import pathlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from splitvault.v1 import matcher_pb2, matcher_pb2_grpc
from vault import names, pki, ticket
from vaultctl import cluster
from vaultrpc import wire
from vaultrpc.tls import TlsFiles, TlsMaterial, secure_channel

# google.rpc.Code values to their grpc.StatusCode.
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_DECISIONS = {matcher_pb2.DECISION_MATCH: "MATCH", matcher_pb2.DECISION_NO_MATCH: "NO_MATCH",
              matcher_pb2.DECISION_AMBIGUOUS: "AMBIGUOUS"}


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of one verification."""

    decision: str  # "MATCH" or "NO_MATCH"
    decision_id: str
    score: float | None
    epoch: int

    @property
    def matched(self) -> bool:
        return self.decision == "MATCH"


def _floats(vector, what: str) -> np.ndarray:
    # (Callers pass .tolist() to protobuf: filling a repeated float field
    # from a list is ~10x faster than from a numpy array.)
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"The {what} must be a 1-D vector of numbers.")
    return arr


@dataclass(frozen=True)
class IdentifyResult:
    """The outcome of one identification (1:N on shares)."""

    decision: str  # "MATCH", "NO_MATCH" or "AMBIGUOUS"; "ERROR" for a failed query of identify_many
    subject: str | None  # the matched subject (MATCH only)
    decision_id: str
    code: str = "OK"  # identify_many: the failed query's status name (grpc.StatusCode)
    message: str = ""  # identify_many: why it failed, in one sentence


class _Flatten:
    """The per-template results of an EnrollBatches call, one at a time (cancel() ends the call)."""

    def __init__(self, call):
        self._call = call
        self._results = iter(())

    def __iter__(self):
        return self

    def __next__(self) -> matcher_pb2.EnrollStreamResponse:
        while True:
            result = next(self._results, None)
            if result is not None:
                return result
            self._results = iter(next(self._call).results)

    def cancel(self) -> None:
        self._call.cancel()


class MatcherClient:
    """A connection to the matcher as one payment provider (tenant)."""

    def __init__(
        self,
        address: str,
        tls: TlsMaterial,
        *,
        tenant: str,
        ticket_key: ed25519.Ed25519PrivateKey,
        key_id: str,
        matcher: str,
        cluster_id: str,
        timeout_s: float = 10.0,
        ticket_ttl_ms: int = 60_000,
    ):
        self.address = address
        self.tenant = names.check_name(tenant)
        self.key_id = key_id
        self.cluster_id = cluster_id
        self.timeout_s = timeout_s
        self.ticket_ttl_ms = ticket_ttl_ms
        self._ticket_key = ticket_key
        self._channel = secure_channel(address, tls, expect=pki.Identity(pki.ROLE_MATCHER, matcher))
        self._stub = matcher_pb2_grpc.MatcherStub(self._channel)

    @classmethod
    def from_cluster_dir(cls, path: str | pathlib.Path, tenant: str = "demo-psp", **kwargs) -> "MatcherClient":
        """A client for a local cluster made by ``vaultctl cluster up --dir path``."""
        root = pathlib.Path(path)
        ready = root / "matcher" / "ready.json"
        try:
            address = json.loads(ready.read_text())["address"]
        except FileNotFoundError:
            raise ValueError(f"No matcher is running for {root} ({ready} is missing); run `vaultctl cluster up`.") from None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"The matcher's ready file {ready} is not valid.") from None
        # The identity the matcher must prove: the spec's matcher name (a
        # directory without a spec has the dev cluster's default one).
        try:
            matcher = cluster.load_spec(root).matcher if (root / "cluster.json").exists() else cluster.MATCHER_NAME
        except cluster.ClusterError as exc:
            raise ValueError(str(exc)) from None
        tls = TlsFiles(
            str(root / "pki" / "ca.pem"), str(root / "pki" / f"psp-{tenant}.pem"), str(root / "pki" / f"psp-{tenant}.key")
        ).load()
        key_file = root / "psp" / f"{tenant}.ticket.key"
        id_file = root / "psp" / "cluster_id"
        try:
            key = pki.load_signing_key(key_file.read_bytes())
            cluster_id = id_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"Cannot read {exc.filename}: {exc.strerror}.") from None
        return cls(address, tls, tenant=tenant, ticket_key=key, key_id=f"{tenant}-1", cluster_id=cluster_id, matcher=matcher,
                   **kwargs)

    def ticket(self, operation: int, subject: str, request_id: str, *, probe=None, template=None, group: str = ""):
        """A fresh ticket of this provider for this cluster."""
        return wire.issue_ticket(
            self._ticket_key, self.key_id, tenant=self.tenant, subject=subject, request_id=request_id,
            audience=self.cluster_id, operation=operation, probe=probe, template=template, ttl_ms=self.ticket_ttl_ms,
            group=group,
        )

    # --- calls ----------------------------------------------------------------

    def enroll(
        self, subject: str, template, *, request_id: str | None = None, replace: bool = False, group: str = "",
    ) -> matcher_pb2.EnrollResponse:
        """Enrol one template (under a gallery ``group`` Identify can narrow to); idempotent per request id."""
        vector = _floats(template, "template")
        request_id = request_id or str(uuid.uuid4())
        request = matcher_pb2.EnrollRequest(
            subject=subject,
            template=vector.tolist(),
            request_id=request_id,
            replace=replace,
            ticket=self.ticket(ticket.write_operation(replace), subject, request_id, template=vector, group=group),
            group=group,
        )
        return self._stub.Enroll(request, timeout=self.timeout_s)

    def enroll_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        replace: bool = False,
        timeout_s: float | None = None,
        per_message: int = 128,
        group: str = "",
    ) -> Iterator[matcher_pb2.EnrollStreamResponse]:
        """Bulk enrolment: one EnrollStreamResponse per (subject, template), in order, all under ``group``.

        Requests are produced lazily from ``items`` as gRPC flow control
        allows, so a gallery of any size streams in bounded memory. They go
        ``per_message`` templates to a message (the matcher's EnrollBatches;
        gRPC's per-message cost dominated one-template messages). The
        stream's deadline is ``timeout_s`` (default: none, bulk jobs are long).
        """
        operation = ticket.write_operation(replace)

        def message(chunk) -> matcher_pb2.EnrollBatchesRequest:
            # One batch ticket signs the message's templates (one Ed25519
            # signature, and one check per node, instead of one per template).
            signed = wire.issue_batch(
                self._ticket_key, self.key_id, tenant=self.tenant, audience=self.cluster_id,
                batch_id=str(uuid.uuid4()), operation=operation, ttl_ms=self.ticket_ttl_ms,
                items=[(r.subject, r.request_id, vector, r.group) for r, vector in chunk],
            )
            return matcher_pb2.EnrollBatchesRequest(items=[r for r, _ in chunk], batch_ticket=signed.ticket)

        def requests():
            chunk = []
            for subject, template in items:
                vector = _floats(template, "template")
                chunk.append((matcher_pb2.EnrollStreamRequest(
                    subject=subject, template=vector.tolist(), request_id=str(uuid.uuid4()), replace=replace,
                    group=group,
                ), vector))
                if len(chunk) >= per_message:
                    yield message(chunk)
                    chunk = []
            if chunk:
                yield message(chunk)

        call = self._stub.EnrollBatches(requests(), timeout=timeout_s)
        return _Flatten(call)

    def verify(self, subject: str, probe, *, request_id: str | None = None) -> VerifyResult:
        """Verify a probe against the subject's template with a freshly signed ticket."""
        vector = _floats(probe, "probe")
        signed = self.ticket(ticket.VERIFY, subject, request_id or str(uuid.uuid4()), probe=vector)
        reply = self._stub.Verify(
            matcher_pb2.VerifyRequest(subject=subject, probe=vector.tolist(), ticket=signed), timeout=self.timeout_s
        )
        return VerifyResult(
            decision=_DECISIONS.get(reply.decision, "NO_MATCH"),
            decision_id=reply.decision_id,
            score=reply.score if reply.HasField("score") else None,
            epoch=reply.epoch,
        )

    def identify(self, probe, group: str | None = None, *, request_id: str | None = None) -> IdentifyResult:
        """Search the tenant's gallery (or only the subjects enrolled under ``group``) for the
        probe on shares, with a freshly signed IDENTIFY ticket naming the group."""
        vector = _floats(probe, "probe")
        group = group or ""
        signed = self.ticket(ticket.IDENTIFY, "", request_id or str(uuid.uuid4()), probe=vector, group=group)
        reply = self._stub.Identify(matcher_pb2.IdentifyRequest(probe=vector.tolist(), ticket=signed, group=group),
                                    timeout=self.timeout_s)
        decision = _DECISIONS.get(reply.decision, "NO_MATCH")
        return IdentifyResult(decision=decision, subject=reply.subject if decision == "MATCH" else None,
                              decision_id=reply.decision_id)

    def identify_many(self, probes, group: str | None = None) -> list[IdentifyResult]:
        """Identify several probes in one call (Matcher.IdentifyBatch, at most 32), each with its own
        freshly signed IDENTIFY ticket: one result per probe, in order; a query that failed has
        decision "ERROR" and its status in ``code`` and ``message`` (never a MATCH)."""
        group = group or ""
        queries = []
        for probe in probes:
            vector = _floats(probe, "probe")
            signed = self.ticket(ticket.IDENTIFY, "", str(uuid.uuid4()), probe=vector, group=group)
            queries.append(matcher_pb2.IdentifyRequest(probe=vector.tolist(), ticket=signed, group=group))
        reply = self._stub.IdentifyBatch(matcher_pb2.IdentifyBatchRequest(queries=queries),
                                         timeout=self.timeout_s * max(1, len(queries)))
        out = []
        for r in reply.results:
            if r.code != 0:
                out.append(IdentifyResult(decision="ERROR", subject=None, decision_id="",
                                          code=_CODES.get(r.code, grpc.StatusCode.UNKNOWN).name, message=r.message))
                continue
            decision = _DECISIONS.get(r.response.decision, "NO_MATCH")
            out.append(IdentifyResult(decision=decision, subject=r.response.subject if decision == "MATCH" else None,
                                      decision_id=r.response.decision_id))
        return out

    def delete(self, subject: str, *, request_id: str | None = None) -> matcher_pb2.DeleteResponse:
        """Erase the subject on every shareholder; ``complete`` says whether all confirmed."""
        request_id = request_id or str(uuid.uuid4())
        return self._stub.Delete(
            matcher_pb2.DeleteRequest(subject=subject, request_id=request_id,
                                      ticket=self.ticket(ticket.DELETE, subject, request_id)),
            timeout=self.timeout_s,
        )

    # --- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MatcherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
