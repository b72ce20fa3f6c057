"""Provider-signed writes, attacked over real processes (issue 10, attack 4).

The attacker of the review held the payment provider's TLS certificate and
nothing else: with it and a ticket key of their own they replaced alice's
template with their face, and the next genuine verification said MATCH.
Here the same attacker, and stronger ones, try again against three real
``python -m shareholders`` nodes and ``python -m matcher``:

(a) a random ticket key: Enroll with replace and Delete are refused through
    the matcher; the same forged tickets delivered to every node directly,
    over the matcher's own channel (an attacker standing where the matcher
    stands), are refused by every node, each logging the refusal before it
    answers; alice's template is untouched (her genuine probe MATCHes, the
    attacker's face does not);
(b) a genuine VERIFY ticket (the provider's own signature) replayed as a
    DELETE or a REPLACE, and a genuine ENROLL ticket used to replace: refused;
(c) a genuine ticket made for another cluster (audience): refused.
"""
from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest

from fault_kit import DIM, NAMES, FaultProcesses, Tenant, clean_details, noisy, unit
from node_kit import CLUSTER_ID, audit_entries, sample_records
from splitvault.v1 import matcher_pb2, matcher_pb2_grpc, shareholder_pb2, shareholder_pb2_grpc
from vault import pki, ticket
from vaultctl.client import MatcherClient
from vaultrpc import wire
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e
TENANT = Tenant("acme")
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def world(dev_pki, tmp_path_factory):
    rng = np.random.default_rng(104)
    p = FaultProcesses(dev_pki, tmp_path_factory.mktemp("attack-writes"), TENANT)
    try:
        p.start_nodes()
        address = p.start_matcher()
        alice, attacker_face = unit(rng), unit(rng)
        with p.client(address) as provider:
            provider.enroll("alice", alice, request_id="enrol-alice")
            assert provider.verify("alice", noisy(alice, rng)).decision == "MATCH"
        yield p, address, alice, attacker_face, rng
    finally:
        p.close()


def denied(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == DENIED, (err.value.code(), err.value.details())
    assert clean_details(err.value.details())
    return err.value.details()


def alice_unchanged(p, address, alice, attacker_face, rng) -> None:
    """Only the genuine provider's verifications; alice is still alice, at every node under her own request."""
    with p.client(address) as provider:
        assert provider.verify("alice", noisy(alice, rng)).decision == "MATCH"
        assert provider.verify("alice", attacker_face).decision == "NO_MATCH"
        assert provider.verify("alice", noisy(attacker_face, rng)).decision == "NO_MATCH"
    for name in NAMES:
        stores = [e for e in audit_entries(p.db(name)) if e["subject"] == "alice" and e["event"] == "store"]
        assert [e["request_id"] for e in stores] == ["enrol-alice"], (name, stores)
        assert not [e for e in audit_entries(p.db(name)) if e["subject"] == "alice" and e["event"] == "delete"]


def node_stubs(p, dev_pki):
    """Each node's Shareholder stub over the MATCHER's certificate: more than this attacker holds."""
    out = {}
    for name in NAMES:
        channel = secure_channel(p.real(name), dev_pki.tls("matcher", "matcher"), expect=pki.Identity("shareholder", name))
        out[name] = (channel, shareholder_pb2_grpc.ShareholderStub(channel))
    return out


def forged_records(index: int, request_id: str):
    # Well-formed shares of "alice" for node ``index`` (random field elements: the node cannot tell).
    return sample_records("acme", ["alice"], index=index, shareholders=3, threshold=2, dimension=DIM,
                          request_id=request_id)


def deliver_to_every_node(p, dev_pki, *, store_ticket, delete_ticket, request_id: str, replace: bool = True,
                          batch=None) -> None:
    """Hand the tickets to every node as the matcher would; each must refuse with PERMISSION_DENIED."""
    stubs = node_stubs(p, dev_pki)
    try:
        for i, name in enumerate(NAMES, start=1):
            _, stub = stubs[name]
            if store_ticket is not None:
                request = shareholder_pb2.StoreSharesRequest(
                    records=forged_records(i, request_id), replace=replace, tickets=[store_ticket])
                denied(lambda: stub.StoreShares(request, timeout=10))
            if batch is not None:  # the bulk form: records under a batch ticket
                request = shareholder_pb2.StoreShareStreamRequest(
                    records=forged_records(i, request_id), replace=replace, batches=[batch])
                denied(lambda: stub.StoreShareStream(iter([request]), timeout=10))
            if delete_ticket is not None:
                request = shareholder_pb2.DeleteSharesRequest(tenant="acme", subject="alice", request_id=request_id,
                                                              ticket=delete_ticket)
                denied(lambda: stub.DeleteShares(request, timeout=10))
    finally:
        for channel, _ in stubs.values():
            channel.close()


def refusals(p, name: str, request_id: str) -> list[dict]:
    """The node's committed deny entries for writes naming this request id (claimed or verified)."""
    return [e for e in audit_entries(p.db(name)) if e["event"] == "deny" and e.get("d_call") in ("store", "delete", "erase")
            and request_id in (e["request_id"], e.get("d_claimed_request_id"))]


def test_a_psp_certificate_and_a_random_ticket_key_cannot_replace_or_delete(world, dev_pki):
    p, address, alice, attacker_face, rng = world
    rogue_key = pki.load_signing_key(pki.new_signing_key()[0])
    # Everything public about the provider: its tenant, key id and the cluster id; only the key is the attacker's.
    with MatcherClient(address, dev_pki.tls("psp", "acme"), tenant="acme", ticket_key=rogue_key,
                       key_id=TENANT.key_id, cluster_id=CLUSTER_ID, matcher="matcher") as attacker:
        why = denied(lambda: attacker.enroll("alice", attacker_face, request_id="swap-1", replace=True))
        assert "signature" in why
        denied(lambda: attacker.enroll("alice", attacker_face, request_id="swap-2"))
        denied(lambda: attacker.delete("alice", request_id="erase-1"))
        stream = list(attacker.enroll_many([("alice", attacker_face)], replace=True))
        assert [r.code for r in stream] == [DENIED.value[0]] and "signature" in stream[0].message

    # The same forged tickets, put straight in front of every node (skipping the matcher's check).
    forged = dict(tenant="acme", subject="alice", audience=CLUSTER_ID)
    deliver_to_every_node(
        p, dev_pki, request_id="swap-3",
        store_ticket=wire.issue_ticket(rogue_key, TENANT.key_id, **forged, request_id="swap-3",
                                       operation=ticket.REPLACE, template=attacker_face),
        delete_ticket=wire.issue_ticket(rogue_key, TENANT.key_id, **forged, request_id="swap-3", operation=ticket.DELETE),
        batch=wire.issue_batch(rogue_key, TENANT.key_id, tenant="acme", audience=CLUSTER_ID, batch_id="swap-3",
                               operation=ticket.REPLACE, items=[("alice", "swap-3", attacker_face)]),
    )
    for name in NAMES:
        entries = refusals(p, name, "swap-3")
        assert sorted(e["d_call"] for e in entries) == ["delete", "store", "store"], (name, entries)
        for e in entries:
            assert e["d_reason"] == "invalid_ticket" and "signature" in e["d_why"]
            assert e["actor"] == "matcher/matcher"
            assert e.get("d_claimed_subject") == "alice" or e.get("d_batch_items") == 1  # a batch names no subject
    alice_unchanged(p, address, alice, attacker_face, rng)


def test_a_genuine_verify_ticket_cannot_delete_or_replace(world, dev_pki):
    p, address, alice, attacker_face, rng = world
    probe = noisy(alice, rng)
    # A ticket the provider really signed, for a verification of alice (captured, say, from a checkout).
    verify_ticket = wire.issue_ticket(TENANT.key, TENANT.key_id, tenant="acme", subject="alice", request_id="pay-77",
                                      probe=probe, audience=CLUSTER_ID)
    with secure_channel(address, dev_pki.tls("psp", "acme"), expect=pki.Identity("matcher", "matcher")) as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        why = denied(lambda: stub.Delete(matcher_pb2.DeleteRequest(subject="alice", ticket=verify_ticket), timeout=10))
        assert "authorises verify" in why
        denied(lambda: stub.Enroll(matcher_pb2.EnrollRequest(
            subject="alice", template=probe.tolist(), request_id="pay-77", replace=True, ticket=verify_ticket),
            timeout=10))
        # A genuine ENROLL ticket (for a new request id) cannot replace either.
        enrol_ticket = TENANT.enroll_ticket("alice", "enrol-again", attacker_face, replace=False)
        why = denied(lambda: stub.Enroll(matcher_pb2.EnrollRequest(
            subject="alice", template=attacker_face.tolist(), request_id="enrol-again", replace=True,
            ticket=enrol_ticket), timeout=10))
        assert "authorises enroll" in why
    deliver_to_every_node(p, dev_pki, request_id="pay-77", store_ticket=verify_ticket, delete_ticket=verify_ticket)
    deliver_to_every_node(p, dev_pki, request_id="enrol-again", store_ticket=enrol_ticket, delete_ticket=None)
    for name in NAMES:
        for request_id, calls in (("pay-77", ["delete", "store"]), ("enrol-again", ["store"])):
            entries = refusals(p, name, request_id)
            assert sorted(e["d_call"] for e in entries) == calls, (name, request_id, entries)
            assert all("not this call" in e["d_why"] for e in entries)
    # The ENROLL ticket, used without replace, meets an enrolled subject: nothing is overwritten.
    with secure_channel(p.real("bank-a"), dev_pki.tls("matcher", "matcher"),
                        expect=pki.Identity("shareholder", "bank-a")) as channel:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        request = shareholder_pb2.StoreSharesRequest(records=forged_records(1, "enrol-again"), tickets=[enrol_ticket])
        with pytest.raises(grpc.RpcError) as err:
            stub.StoreShares(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    alice_unchanged(p, address, alice, attacker_face, rng)


def test_a_ticket_for_another_cluster_is_refused(world, dev_pki):
    p, address, alice, attacker_face, rng = world
    other = "another-cluster"
    # The genuine provider's key and certificate, but tickets made for another cluster.
    with MatcherClient(address, dev_pki.tls("psp", "acme"), tenant="acme", ticket_key=TENANT.key,
                       key_id=TENANT.key_id, cluster_id=other, matcher="matcher") as elsewhere:
        for call in (lambda: elsewhere.enroll("alice", attacker_face, request_id="aud-1", replace=True),
                     lambda: elsewhere.delete("alice", request_id="aud-2"),
                     lambda: elsewhere.verify("alice", noisy(alice, rng))):
            assert "another cluster" in denied(call)
    genuine = dict(tenant="acme", subject="alice", audience=other)
    deliver_to_every_node(
        p, dev_pki, request_id="aud-3",
        store_ticket=wire.issue_ticket(TENANT.key, TENANT.key_id, **genuine, request_id="aud-3",
                                       operation=ticket.REPLACE, template=attacker_face),
        delete_ticket=wire.issue_ticket(TENANT.key, TENANT.key_id, **genuine, request_id="aud-3",
                                        operation=ticket.DELETE),
    )
    # A verification ticket for the other cluster does not release a share either.
    with secure_channel(p.real("bank-b"), dev_pki.tls("matcher", "matcher"),
                        expect=pki.Identity("shareholder", "bank-b")) as channel:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        release = shareholder_pb2.ReleaseShareRequest(ticket=wire.issue_ticket(
            TENANT.key, TENANT.key_id, **genuine, request_id=f"aud-{uuid.uuid4().hex}", probe=alice))
        assert "another cluster" in denied(lambda: stub.ReleaseShare(release, timeout=10))
    for name in NAMES:
        entries = refusals(p, name, "aud-3")
        assert sorted(e["d_call"] for e in entries) == ["delete", "store"], (name, entries)
        assert all("another cluster" in e["d_why"] for e in entries)
    alice_unchanged(p, address, alice, attacker_face, rng)


def test_the_provider_itself_still_replaces_and_deletes(world, dev_pki):
    # The genuine path after the attacks: the provider's own REPLACE and DELETE go through, and
    # each node's store and delete entries record the ticket that authorised them.
    p, address, alice, attacker_face, rng = world
    new_alice = unit(rng)
    with p.client(address) as provider:
        provider.enroll("bob", unit(rng), request_id="enrol-bob")
        provider.enroll("bob", new_alice, request_id="enrol-bob-2", replace=True)
        assert provider.verify("bob", noisy(new_alice, rng)).decision == "MATCH"
        assert provider.delete("bob", request_id="erase-bob").complete
    for name in NAMES:
        writes = [e for e in audit_entries(p.db(name)) if e["subject"] == "bob" and e["event"] in ("store", "delete")]
        assert [(e["event"], e["d_operation"]) for e in writes] == [
            ("store", "enroll"), ("store", "replace"), ("delete", "delete")], (name, writes)
        for e in writes:
            t = ticket.from_audit_details({k[2:]: v for k, v in e.items() if k.startswith("d_")})
            body = wire.verify_ticket(t, {TENANT.key_id: TENANT.key.public_key()}, tenant="acme", audience=CLUSTER_ID,
                                      operations=(ticket.ENROLL, ticket.REPLACE, ticket.DELETE),
                                      at_ms=e["d_ticket_expires_ms"] - 1)
            assert (body.subject, body.request_id) == ("bob", e["request_id"])
