"""Verification tickets: signed by the provider, checked by every node."""
from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import ticket
from vault.errors import InvalidTicket

PROBE = np.linspace(-1, 1, 16, dtype=np.float32)


@pytest.fixture(scope="module")
def key():
    return ed25519.Ed25519PrivateKey.generate()


def make(key, **kw):
    args = dict(tenant="acme", subject="alice", request_id="r1", probe=PROBE, issued_at_ms=1_000_000)
    args.update(kw)
    return ticket.issue(key, "k1", **args)


def test_round_trip(key):
    t = make(key)
    body = ticket.verify(t, {"k1": key.public_key()}, tenant="acme", at_ms=1_000_500)
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
        ticket.verify(t, {"k1": key.public_key()}, tenant="acme", at_ms=at_ms)


def test_wrong_tenant_and_signer(key):
    t = make(key)
    with pytest.raises(InvalidTicket, match="another tenant"):
        ticket.verify(t, {"k1": key.public_key()}, tenant="globex", at_ms=1_000_500)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(InvalidTicket, match="signature"):
        ticket.verify(t, {"k1": other.public_key()}, tenant="acme", at_ms=1_000_500)


def test_overlong_validity_refused(key):
    t = make(key, ttl_ms=ticket.MAX_TTL_MS + 1)
    with pytest.raises(InvalidTicket, match="too long"):
        ticket.verify(t, {"k1": key.public_key()}, tenant="acme", at_ms=1_000_500)
