"""Identify on shares at the nodes (real in-process servers over mTLS):
attempt limits, replay, committee checks, who may send a round."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from matcher_kit import unit
from shareholders import identify as node_identify
from splitvault.v1 import identify_pb2, identify_pb2_grpc, matcher_pb2
from vault import pki, ticket
from vaultrpc.tls import secure_channel


def test_per_tenant_attempt_limit_and_replay(committee, monkeypatch):
    monkeypatch.setattr(node_identify, "IDENTIFY_ATTEMPTS", 2)
    c = committee()
    c.start_matcher()
    rng = np.random.default_rng(5)
    client = c.client()
    client.enroll("alice", unit(rng))
    probe = unit(rng)
    signed = client.ticket(ticket.IDENTIFY, "", "query-1", probe=probe)
    request = matcher_pb2.IdentifyRequest(probe=probe.tolist(), ticket=signed)
    assert client._stub.Identify(request, timeout=10).decision == matcher_pb2.DECISION_NO_MATCH
    with pytest.raises(grpc.RpcError) as err:  # the same ticket again
        client._stub.Identify(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # the replay counted as an attempt: the tenant's limit of 2 is reached
    with pytest.raises(grpc.RpcError) as err:
        client.identify(probe)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_threshold_other_than_two_is_refused(committee):
    c = committee(n=5, k=3)
    c.start_matcher()
    client = c.client()
    with pytest.raises(grpc.RpcError) as err:
        client.identify(unit(np.random.default_rng(1)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "threshold 2 only" in err.value.details()


def _round(c, as_role: str, as_name: str, node: str):
    channel = secure_channel(c.addresses[node], c.pki.tls(as_role, as_name),
                             expect=pki.Identity(pki.ROLE_SHAREHOLDER, node))
    try:
        return identify_pb2_grpc.ShareholderIdentifyStub(channel).IdentifyRound(
            identify_pb2.IdentifyRoundRequest(query_id="query-12345678", round=1, payload=b"x"), timeout=10)
    finally:
        channel.close()


def test_only_shareholders_send_rounds_and_only_the_matcher_starts_queries(committee):
    c = committee()
    with pytest.raises(grpc.RpcError) as err:
        _round(c, "matcher", "matcher", "bank-a")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        _round(c, "psp", "acme", "bank-a")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _round(c, "shareholder", "bank-b", "bank-a") is not None
    channel = secure_channel(c.addresses["bank-a"], c.pki.tls("shareholder", "bank-b"),
                             expect=pki.Identity(pki.ROLE_SHAREHOLDER, "bank-a"))
    try:
        stub = identify_pb2_grpc.ShareholderIdentifyStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.IdentifyQuery(iter([identify_pb2.IdentifyQueryRequest()]), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()


def test_a_round_from_a_node_that_is_not_the_successor_is_refused():
    mail = node_identify.Mailboxes()
    import threading

    mail.put("query-12345678", 3, "bank-c", b"payload")
    with pytest.raises(Exception, match="not this node's successor"):
        mail.take("query-12345678", 3, "bank-b", threading.Event())


def test_the_gallery_follows_a_replace(committee):
    c = committee()
    c.start_matcher()
    rng = np.random.default_rng(8)
    client = c.client()
    old, new = unit(rng), unit(rng)
    client.enroll("alice", old)
    client.enroll("bob", unit(rng))
    assert client.identify(old).subject == "alice"
    client.enroll("alice", new, replace=True)
    assert client.identify(old).decision == "NO_MATCH"
    assert client.identify(new).subject == "alice"
