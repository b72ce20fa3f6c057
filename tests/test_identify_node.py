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
from vaultrpc import status
from vaultrpc.server import caller
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


def _round(c, as_role: str, as_name: str, node: str, query_ids=("query-12345678",), rounds=None):
    channel = secure_channel(c.addresses[node], c.pki.tls(as_role, as_name),
                             expect=pki.Identity(pki.ROLE_SHAREHOLDER, node))
    rounds = rounds or [1 + i for i in range(len(query_ids))]
    try:
        return identify_pb2_grpc.ShareholderIdentifyStub(channel).IdentifyRound(iter([
            identify_pb2.IdentifyRoundRequest(query_id=q, round=r, payload=b"x")
            for q, r in zip(query_ids, rounds, strict=True)]), timeout=10)
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
    # One stream carries the rounds of many queries (a node's link to its
    # predecessor; the pins are checked at each new query) ...
    assert _round(c, "shareholder", "bank-b", "bank-a", ("query-23456789", "query-34567890")) is not None
    # ... and a message naming no valid query ends it.
    with pytest.raises(grpc.RpcError) as err:
        _round(c, "shareholder", "bank-b", "bank-a", ("query-45678901", "not a query id"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel = secure_channel(c.addresses["bank-a"], c.pki.tls("shareholder", "bank-b"),
                             expect=pki.Identity(pki.ROLE_SHAREHOLDER, "bank-a"))
    try:
        stub = identify_pb2_grpc.ShareholderIdentifyStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.IdentifyQuery(iter([identify_pb2.IdentifyQueryRequest()]), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()


def _with_alice(committee, seed: int, **kw):
    """An in-process committee and matcher with alice enrolled: (committee, client, her template, rng)."""
    c = committee(**kw)
    c.start_matcher()
    rng = np.random.default_rng(seed)
    client = c.client()
    alice = unit(rng)
    client.enroll("alice", alice)
    return c, client, alice, rng


def test_one_round_stream_per_node_pair_carries_many_queries_and_an_idle_one_is_replaced(committee, monkeypatch):
    # Each node sends its rounds to its predecessor over one IdentifyRound
    # stream (shareholders.identify._Link), not one per query; a stream idle
    # for _LINK_IDLE_S half-closes and the next query opens another.
    monkeypatch.setattr(node_identify, "_LINK_IDLE_S", 2.0)
    opened = []
    real_init = node_identify._RoundStream.__init__

    def counting(self, stub, name):
        opened.append(name)
        real_init(self, stub, name)

    monkeypatch.setattr(node_identify._RoundStream, "__init__", counting)
    _c, client, alice, rng = _with_alice(committee, 12)
    for _ in range(4):
        assert client.identify(alice).subject == "alice"
    assert sorted(opened) == ["bank-a", "bank-b", "bank-c"]  # each node's predecessor, once
    import time

    time.sleep(2.6)  # every stream idles out
    assert client.identify(unit(rng)).decision == "NO_MATCH"
    assert client.identify(alice).subject == "alice"
    assert sorted(opened) == ["bank-a", "bank-a", "bank-b", "bank-b", "bank-c", "bank-c"]


def test_a_round_stream_that_fails_ends_its_queries_at_once_and_the_next_query_opens_another(committee, monkeypatch,
                                                                                              caplog):
    # bank-a refuses bank-b's stream of rounds once, at its second query. The
    # query that sent on it ends UNAVAILABLE naming the refusal (not the 20 s
    # round timeout), and the next query's rounds go on a new stream.
    import logging

    monkeypatch.setattr(node_identify, "ROUND_TIMEOUT_S", 60.0)
    real = node_identify.IdentifyService.IdentifyRound
    first, refused = [], []

    def handler(self, request_iterator, context):
        if self.sh.name != "bank-a" or refused:
            return real(self, request_iterator, context)
        for request in request_iterator:
            first[:] = first or [request.query_id]
            if request.query_id != first[0]:
                refused.append(request.query_id)
                raise status.PermissionDenied("Refused for the test.")
            self.mail.put(request.query_id, int(request.round), caller(context).name, request.payload)
        return identify_pb2.IdentifyRoundResponse()

    monkeypatch.setattr(node_identify.IdentifyService, "IdentifyRound", handler)
    _c, client, alice, _rng = _with_alice(committee, 14)
    assert client.identify(alice).subject == "alice"
    with caplog.at_level(logging.WARNING, logger="matcher"):
        with pytest.raises(grpc.RpcError) as err:
            client.identify(alice)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and refused
    details = [r.fields.get("detail", "") for r in caplog.records if r.getMessage() == "shareholder call failed"]
    assert any("did not take a round" in d and "PERMISSION_DENIED" in d for d in details), details
    assert client.identify(alice).subject == "alice"


def test_a_refused_round_fails_its_query_alone_and_the_stream_goes_on(committee, monkeypatch):
    # One stream carries many queries' rounds: a round delivered twice, or one
    # that finds the mailbox full, fails that query at its next take; the
    # stream (and the other queries on it) go on.
    import threading

    mail = node_identify.Mailboxes()
    never = threading.Event()
    mail.put("query-aaaaaaaa", 1, "bank-b", b"first")
    mail.put("query-aaaaaaaa", 1, "bank-b", b"again")
    mail.put("query-bbbbbbbb", 1, "bank-b", b"other")
    monkeypatch.setattr(node_identify, "ROUND_TIMEOUT_S", 2.0)
    with pytest.raises(status.RpcError, match="delivered twice"):
        mail.take("query-aaaaaaaa", 1, "bank-b", never)
    mail.drop("query-aaaaaaaa")  # as the node does when the query ends
    assert mail.take("query-bbbbbbbb", 1, "bank-b", never) == b"other"
    monkeypatch.setattr(node_identify, "_MAILBOX_LIMIT", 2)
    mail.put("query-cccccccc", 1, "bank-b", b"1")
    mail.put("query-cccccccc", 2, "bank-b", b"2")
    mail.put("query-dddddddd", 1, "bank-b", b"3")  # full: this query fails, the waiting ones stay
    with pytest.raises(status.RpcError, match="Too many"):
        mail.take("query-dddddddd", 1, "bank-b", never)
    assert mail.take("query-cccccccc", 2, "bank-b", never) == b"2"
    mail.drop("query-dddddddd")
    # Over mTLS: the node's handler takes the duplicate without ending the stream.
    c = committee()
    assert _round(c, "shareholder", "bank-b", "bank-a",
                  ("query-eeeeeeee", "query-eeeeeeee", "query-ffffffff"), rounds=(1, 1, 1)) is not None


def test_round_zero_names_the_protocol_version():
    key, digest = bytes(range(32)), bytes(32)
    assert node_identify._unhello(node_identify._hello(key, digest, 7)) == (key, digest, 7)
    with pytest.raises(status.RpcError, match="version 1, this node 2") as err:
        node_identify._unhello(key + digest + (7).to_bytes(8, "big"))  # an earlier node's 72 bytes
    assert err.value.code.name == "FAILED_PRECONDITION"
    with pytest.raises(status.RpcError, match="version 3"):
        node_identify._unhello((3).to_bytes(4, "big") + key + digest + (7).to_bytes(8, "big"))
    with pytest.raises(status.RpcError, match="malformed"):
        node_identify._unhello(b"short")


def test_a_verification_whose_round_zero_cannot_be_sent_is_still_audited(committee, monkeypatch):
    # Round 0 goes out before the node commits its verify_on_shares entry; a
    # link that fails there fails the verification after the entry is durable.
    from matcher_kit import Tenant

    real = node_identify._Link.send

    def failing(self, request, watcher):
        if self._name == "bank-c":  # bank-a's predecessor
            raise status.Unavailable("Committee member bank-c did not take a round of the identification.")
        return real(self, request, watcher)

    c, client, alice, _rng = _with_alice(committee, 15, tenants=[Tenant("acme", verify_on_shares=True)])
    monkeypatch.setattr(node_identify._Link, "send", failing)
    with pytest.raises(grpc.RpcError) as err:
        client.verify("alice", alice, request_id="audited-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    entries = c.nodes["bank-a"].service.reader().entries_since(0, ("verify_on_shares",))
    assert [e[2] for e in entries] == ["audited-1"]


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



def test_an_unchanged_gallery_is_not_listed_again_and_a_change_is_seen(committee, monkeypatch):
    # Each node reads the tenant's change counter before a query and lists its
    # rows' versions only when the counter (or the serving epoch) moved.
    from shareholders import storage

    listed = []
    real = storage.Database.tenant_row_versions

    def counted(self, *args, **kwargs):
        listed.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(storage.Database, "tenant_row_versions", counted)
    c = committee()
    c.start_matcher()
    rng = np.random.default_rng(12)
    client = c.client()
    alice, bob, carol = unit(rng), unit(rng), unit(rng)
    client.enroll("alice", alice)
    client.enroll("bob", bob)
    assert client.identify(alice).subject == "alice"
    first = len(listed)
    assert first >= 3  # the three nodes' first loads
    for probe, subject in ((bob, "bob"), (alice, "alice")):
        assert client.identify(probe).subject == subject
    assert len(listed) == first  # unchanged: one counter read per node, no listing
    client.enroll("carol", carol)  # an enrolment between two queries is seen at the next
    assert client.identify(carol).subject == "carol"
    assert len(listed) > first
    client.delete("bob")  # and so is a delete
    assert client.identify(bob).decision == "NO_MATCH"
    again = len(listed)
    assert client.identify(alice).subject == "alice" and len(listed) == again


def _release(c, node: str, signed, query_id: str, subject: str):
    from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc

    channel = secure_channel(c.addresses[node], c.pki.tls("matcher", "matcher"),
                             expect=pki.Identity(pki.ROLE_SHAREHOLDER, node))
    try:
        return shareholder_pb2_grpc.ShareholderStub(channel).ReleaseShare(
            shareholder_pb2.ReleaseShareRequest(ticket=signed, identify_query_id=query_id, subject=subject),
            timeout=10)
    finally:
        channel.close()


def test_an_identify_ticket_releases_only_the_confirmed_candidates_once(committee):
    # A matcher's certificate holder cannot turn an IDENTIFY ticket into releases
    # of subjects the query did not name, nor release a named one twice.
    c = committee()
    c.start_matcher()
    rng = np.random.default_rng(8)
    client = c.client()
    alice, bob = unit(rng), unit(rng)
    client.enroll("alice", alice)
    client.enroll("bob", bob)
    probe = alice
    signed = client.ticket(ticket.IDENTIFY, "", "query-confirm-1", probe=probe)
    res = client._stub.Identify(matcher_pb2.IdentifyRequest(probe=probe.tolist(), ticket=signed), timeout=10)
    assert res.decision == matcher_pb2.DECISION_MATCH and res.subject == "alice"
    released = 0
    for node in c.addresses:
        # The matcher asked k = 2 nodes (hedged): a node it did not ask still releases alice once.
        try:
            _release(c, node, signed, res.decision_id, "alice")
            released += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
        for subject, query in (("alice", res.decision_id), ("bob", res.decision_id), ("bob", "query-other-123")):
            with pytest.raises(grpc.RpcError) as err:
                _release(c, node, signed, query, subject)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (node, subject)
            assert "does not authorise a release of this subject" in err.value.details()
    assert released == 1
    # A VERIFY ticket's release does not accept a query id in place of the IDENTIFY ticket's.
    verify_ticket = client.ticket(ticket.VERIFY, "bob", "verify-1", probe=probe)
    with pytest.raises(grpc.RpcError) as err:
        _release(c, next(iter(c.addresses)), verify_ticket, res.decision_id, "bob")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_confirmation_asks_only_the_querys_three_nodes(committee):
    # With n = 4 the fourth node holds no confirmation for the query: the release must not depend on it.
    c = committee(n=4, k=2)
    c.start_matcher()
    rng = np.random.default_rng(12)
    client = c.client()
    people = {f"p{i}": unit(rng) for i in range(6)}
    for name, template in people.items():
        client.enroll(name, template)
    for name, template in people.items():
        res = client.identify(template)
        assert (res.decision, res.subject) == ("MATCH", name)


def test_a_gallery_of_several_pages_loads_exactly_and_a_damaged_share_fails_closed(committee):
    # The load opens shares into pages of node_identify._PAGE_ROWS rows: a
    # gallery over two pages gives the same decisions, and one share that
    # does not open at one node ends the query, never in a MATCH.
    import sqlite3

    rows = 2 * node_identify._PAGE_ROWS + 37
    c = committee()
    c.start_matcher()
    rng = np.random.default_rng(31)
    gallery = {f"s{i:05d}": unit(rng) for i in range(rows)}
    client = c.client()
    assert [r.code for r in client.enroll_many(gallery.items())] == [0] * rows
    db = sqlite3.connect(c.root / "bank-a" / "shares.db")
    try:
        [(original,)] = db.execute("SELECT ciphertext FROM shares WHERE subject = 's00700'").fetchall()
        with db:
            db.execute("UPDATE shares SET ciphertext = ? WHERE subject = 's00700'",
                       (bytes([original[0] ^ 1]) + original[1:],))
        for probe in (gallery["s00700"], gallery[f"s{rows - 1:05d}"], unit(rng)):
            with pytest.raises(grpc.RpcError) as err:
                client.identify(probe)
            assert err.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE)
        with db:
            db.execute("UPDATE shares SET ciphertext = ? WHERE subject = 's00700'", (original,))
    finally:
        db.close()
    for subject in ("s00003", "s00700", f"s{rows - 1:05d}"):
        assert client.identify(gallery[subject]).subject == subject
    assert client.identify(unit(rng)).decision == "NO_MATCH"
