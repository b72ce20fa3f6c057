"""Verification tickets: signed by the provider, checked by every node."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import ticket
from vault.errors import InvalidTicket
from vaultrpc import wire

PROBE = np.linspace(-1, 1, 16, dtype=np.float32)
AUD = "cluster-1"


@pytest.fixture(scope="module")
def key():
    return ed25519.Ed25519PrivateKey.generate()


def make(key, **kw):
    args = dict(tenant="acme", subject="alice", request_id="r1", probe=PROBE, issued_at_ms=1_000_000, audience=AUD)
    args.update(kw)
    return wire.issue_ticket(key, "k1", **args)


def test_round_trip(key):
    t = make(key)
    body = wire.verify_ticket(t, {"k1": key.public_key()}, tenant="acme", audience=AUD, at_ms=1_000_500)
    assert (body.subject, body.request_id) == ("alice", "r1")
    assert ticket.probe_matches(body, PROBE)
    assert not ticket.probe_matches(body, PROBE + np.float32(1e-6))


@pytest.mark.parametrize(
    "mutate, at_ms",
    [
        (lambda t, k: None, 1_000_000 + 60_000),  # expired exactly at expiry
        (lambda t, k: setattr(t, "signature", bytes(64)), 1_000_500),  # forged
        (lambda t, k: setattr(t, "key_id", "other"), 1_000_500),  # unknown key
        (lambda t, k: setattr(t, "body", t.body[:-1] + bytes([t.body[-1] ^ 1])), 1_000_500),  # edited
        (lambda t, k: None, 1_000_000 - 31_000 - 60_000),  # issued in the future
    ],
)
def test_refusals(key, mutate, at_ms):
    t = make(key)
    mutate(t, key)
    with pytest.raises(InvalidTicket):
        wire.verify_ticket(t, {"k1": key.public_key()}, tenant="acme", audience=AUD, at_ms=at_ms)


def test_wrong_tenant_and_signer(key):
    t = make(key)
    with pytest.raises(InvalidTicket, match="another tenant"):
        wire.verify_ticket(t, {"k1": key.public_key()}, tenant="globex", audience=AUD, at_ms=1_000_500)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(InvalidTicket, match="signature"):
        wire.verify_ticket(t, {"k1": other.public_key()}, tenant="acme", audience=AUD, at_ms=1_000_500)


def test_overlong_validity_refused(key):
    t = make(key, ttl_ms=ticket.MAX_TTL_MS + 1)
    with pytest.raises(InvalidTicket, match="too long"):
        wire.verify_ticket(t, {"k1": key.public_key()}, tenant="acme", audience=AUD, at_ms=1_000_500)


# --- provider-signed writes: operation, audience, template digest -------------

def check(t, key, **kw):
    args = dict(tenant="acme", audience=AUD, at_ms=1_000_500)
    args.update(kw)
    return wire.verify_ticket(t, {"k1": key.public_key()}, **args)


def test_write_tickets_round_trip(key):
    for op in (ticket.ENROLL, ticket.REPLACE):
        t = make(key, probe=None, template=PROBE, operation=op)
        body = check(t, key, operations=(op,))
        assert body.operation == op and body.audience == AUD and not body.probe_digest
        assert ticket.template_matches(body, PROBE)
        assert not ticket.template_matches(body, PROBE + np.float32(1e-6))
    body = check(make(key, probe=None, operation=ticket.DELETE), key, operations=(ticket.DELETE,))
    assert not body.template_digest and not body.probe_digest


@pytest.mark.parametrize("op, call", [
    (ticket.VERIFY, (ticket.DELETE,)),        # a verification cannot delete
    (ticket.VERIFY, (ticket.REPLACE,)),       # ... or replace
    (ticket.ENROLL, (ticket.REPLACE,)),       # an enrolment cannot replace
    (ticket.DELETE, (ticket.VERIFY,)),        # a delete cannot release a share
    (ticket.REPLACE, (ticket.ENROLL,)),
])
def test_operation_must_match_the_call(key, op, call):
    vectors = {"probe": PROBE} if op == ticket.VERIFY else {"probe": None, "template": PROBE} if op in ticket.WRITES \
        else {"probe": None}
    t = make(key, operation=op, **vectors)
    with pytest.raises(InvalidTicket, match="not this call"):
        check(t, key, operations=call)


def test_other_audience_refused(key):
    t = make(key)
    with pytest.raises(InvalidTicket, match="another cluster"):
        check(t, key, audience="cluster-2")
    with pytest.raises(InvalidTicket, match="another cluster"):
        check(t, key, audience="")  # a checker without a cluster id accepts nothing


def test_probe_digest_does_not_stand_for_a_template(key):
    # The two digests use different contexts: a VERIFY ticket's probe digest
    # moved into the template slot would not match the same vector.
    t = make(key)
    body = check(t, key)
    body = dataclasses.replace(body, template_digest=body.probe_digest)
    assert not ticket.template_matches(body, PROBE)


def test_issue_refuses_a_vector_in_the_wrong_slot(key):
    with pytest.raises(ValueError):
        make(key, operation=ticket.ENROLL)  # a probe, no template
    with pytest.raises(ValueError):
        make(key, probe=None, template=PROBE, operation=ticket.DELETE)


# --- batch tickets (bulk enrolment) ---------------------------------------------

def make_batch(key, items=None, op=ticket.ENROLL, **kw):
    items = items or [("alice", "r1", PROBE), ("bob", "r2", PROBE * 2)]
    return wire.issue_batch(key, "k1", tenant="acme", audience=AUD, batch_id="b1", operation=op, items=items,
                            issued_at_ms=1_000_000, **kw)


def test_batch_ticket_round_trip(key):
    batch = make_batch(key)
    body = check(batch.ticket, key, operations=ticket.WRITES, batch=True)
    assert body.operation == ticket.ENROLL and not body.subject and len(body.batch_digest) == 32
    assert ticket.batch_matches(body, batch.items)
    assert [(i.subject, i.request_id) for i in batch.items] == [("alice", "r1"), ("bob", "r2")]
    # Item digests are salted per item: equal templates do not give equal digests.
    same = make_batch(key, items=[("a", "r1", PROBE), ("b", "r2", PROBE)])
    assert same.items[0].template_digest != same.items[1].template_digest


@pytest.mark.parametrize("edit", [
    lambda items: items.pop(),                                        # an item left out
    lambda items: setattr(items[0], "subject", "mallory"),            # another subject
    lambda items: setattr(items[1], "request_id", "r9"),              # another request
    lambda items: setattr(items[0], "template_digest", bytes(32)),    # another template
    lambda items: items.reverse(),                                    # reordered
])
def test_batch_items_must_be_the_signed_ones(key, edit):
    batch = make_batch(key)
    body = check(batch.ticket, key, operations=ticket.WRITES, batch=True)
    items = list(batch.items)
    edit(items)
    assert not ticket.batch_matches(body, items)


def test_batch_and_single_tickets_do_not_stand_for_each_other(key):
    batch = make_batch(key)
    with pytest.raises(InvalidTicket, match="batch"):
        check(batch.ticket, key, operations=ticket.WRITES)  # a batch ticket where one write is expected
    single = make(key, probe=None, template=PROBE, operation=ticket.ENROLL)
    with pytest.raises(InvalidTicket, match="batch"):
        check(single, key, operations=ticket.WRITES, batch=True)
    with pytest.raises(InvalidTicket, match="not this call"):
        check(make_batch(key, op=ticket.ENROLL).ticket, key, operations=(ticket.REPLACE,), batch=True)
    with pytest.raises(ValueError):
        make_batch(key, op=ticket.DELETE)


def test_operations_are_numbered_as_the_wire_enum():
    # vault.ticket owns the numbers; the wire's TicketOperation enum must carry the same ones.
    from splitvault.v1 import common_pb2

    assert (ticket.VERIFY, ticket.ENROLL, ticket.REPLACE, ticket.DELETE, ticket.IDENTIFY) == (
        common_pb2.TICKET_OPERATION_VERIFY, common_pb2.TICKET_OPERATION_ENROLL,
        common_pb2.TICKET_OPERATION_REPLACE, common_pb2.TICKET_OPERATION_DELETE, common_pb2.TICKET_OPERATION_IDENTIFY)


def test_a_body_that_does_not_parse_is_refused_after_its_signature():
    key = ed25519.Ed25519PrivateKey.generate()
    raw = b"\xff\xff\xff"
    signed = ticket.SignedTicket(body=raw, signature=ticket.sign(key, raw), key_id="k1")
    assert wire.ticket_body(raw) is None
    with pytest.raises(InvalidTicket, match="cannot be parsed"):
        wire.verify_ticket(signed, {"k1": key.public_key()}, tenant="acme", audience=AUD)


def test_identify_ticket_binds_a_probe_and_names_no_subject(key):
    keys = {"k1": key.public_key()}
    t = make(key, subject="", operation=ticket.IDENTIFY)
    body = wire.verify_ticket(t, keys, tenant="acme", audience=AUD, operations=(ticket.IDENTIFY,), at_ms=1_000_500)
    assert body.subject == "" and ticket.probe_matches(body, PROBE)
    # an identify ticket is not a verification, nor the other way round
    with pytest.raises(InvalidTicket, match="identify, not this call"):
        wire.verify_ticket(t, keys, tenant="acme", audience=AUD, at_ms=1_000_500)
    with pytest.raises(InvalidTicket, match="verify, not this call"):
        wire.verify_ticket(make(key), keys, tenant="acme", audience=AUD, operations=(ticket.IDENTIFY,), at_ms=1_000_500)
    with pytest.raises(ValueError, match="names no subject"):
        make(key, operation=ticket.IDENTIFY)
    with pytest.raises(ValueError, match="binds a probe"):
        make(key, subject="", operation=ticket.IDENTIFY, probe=None)
