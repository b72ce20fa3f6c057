"""Envelope encryption: round trip, tamper and move detection, KEK rotation."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault import envelope
from vault.envelope import KekRing, SealedShare
from vault.errors import EnvelopeError

AAD = b"acme\x00alice\x00\x01\x00"
OTHER_AAD = b"acme\x00bob\x00\x01\x00"
SHARE = os.urandom(4 * 520)


@pytest.fixture()
def ring() -> KekRing:
    return KekRing({1: os.urandom(32)}, active=1)


def test_round_trip(ring):
    sealed = envelope.seal(ring, AAD, SHARE)
    assert sealed.kek_version == 1
    assert len(sealed.wrapped_dk) == envelope.WRAPPED_BYTES
    assert SHARE not in sealed.ciphertext
    assert envelope.open(ring, AAD, sealed) == SHARE


def test_fresh_data_key_and_nonces_per_record(ring):
    a, b = envelope.seal(ring, AAD, SHARE), envelope.seal(ring, AAD, SHARE)
    assert a.wrapped_dk != b.wrapped_dk and a.ciphertext != b.ciphertext and a.nonce != b.nonce
    # The share nonce and the wrapping nonce are different draws.
    assert a.nonce != a.wrapped_dk[:envelope.NONCE_BYTES]


@given(st.binary(max_size=256), st.binary(max_size=64))
@settings(max_examples=50, deadline=None)
def test_round_trip_any_bytes(plaintext, aad):
    ring = KekRing({7: bytes(32)}, active=7)
    assert envelope.open(ring, aad, envelope.seal(ring, aad, plaintext)) == plaintext


@pytest.mark.parametrize("field", ["wrapped_dk", "nonce", "ciphertext"])
@pytest.mark.parametrize("position", [0, -1, "middle"])
def test_flipped_byte_in_any_field_fails(ring, field, position):
    sealed = envelope.seal(ring, AAD, SHARE)
    data = bytearray(getattr(sealed, field))
    i = len(data) // 2 if position == "middle" else position
    data[i] ^= 0x01
    with pytest.raises(EnvelopeError):
        envelope.open(ring, AAD, sealed._replace(**{field: bytes(data)}))


def test_truncated_fields_fail(ring):
    sealed = envelope.seal(ring, AAD, SHARE)
    for field in ("wrapped_dk", "nonce", "ciphertext"):
        with pytest.raises(EnvelopeError):
            envelope.open(ring, AAD, sealed._replace(**{field: getattr(sealed, field)[:-1]}))


def test_wrong_kek_version_label_fails():
    ring = KekRing({1: os.urandom(32), 2: os.urandom(32)}, active=2)
    sealed = envelope.seal(ring, AAD, SHARE)
    with pytest.raises(EnvelopeError):
        envelope.open(ring, AAD, sealed._replace(kek_version=1))
    with pytest.raises(EnvelopeError):
        envelope.open(ring, AAD, sealed._replace(kek_version=3))


def test_moved_to_another_record_fails(ring):
    sealed = envelope.seal(ring, AAD, SHARE)
    with pytest.raises(EnvelopeError):
        envelope.open(ring, OTHER_AAD, sealed)


def test_swapped_ciphertexts_between_records_fail(ring):
    a = envelope.seal(ring, AAD, SHARE)
    b = envelope.seal(ring, OTHER_AAD, SHARE)
    # The ciphertext of b with a's wrapped key, and the whole of b under a's identity.
    with pytest.raises(EnvelopeError):
        envelope.open(ring, AAD, a._replace(ciphertext=b.ciphertext, nonce=b.nonce))
    with pytest.raises(EnvelopeError):
        envelope.open(ring, AAD, b)


def test_wrong_kek_fails(ring):
    sealed = envelope.seal(ring, AAD, SHARE)
    with pytest.raises(EnvelopeError):
        envelope.open(KekRing({1: os.urandom(32)}, active=1), AAD, sealed)


def test_old_version_still_opens_and_new_one_encrypts():
    k1, k2 = os.urandom(32), os.urandom(32)
    old = envelope.seal(KekRing({1: k1}, active=1), AAD, SHARE)
    ring = KekRing({1: k1, 2: k2}, active=2)
    assert envelope.open(ring, AAD, old) == SHARE
    assert envelope.seal(ring, AAD, SHARE).kek_version == 2


def test_rewrap_then_retire_old_kek():
    k1, k2 = os.urandom(32), os.urandom(32)
    old = envelope.seal(KekRing({1: k1}, active=1), AAD, SHARE)
    rotated = envelope.rewrap(KekRing({1: k1, 2: k2}, active=2), AAD, old)
    assert rotated.kek_version == 2 and rotated.ciphertext == old.ciphertext
    retired = KekRing({2: k2}, active=2)
    assert envelope.open(retired, AAD, rotated) == SHARE
    with pytest.raises(EnvelopeError):
        envelope.open(retired, AAD, old)


def test_rewrap_refuses_a_tampered_or_moved_record():
    k1, k2 = os.urandom(32), os.urandom(32)
    old = envelope.seal(KekRing({1: k1}, active=1), AAD, SHARE)
    ring = KekRing({1: k1, 2: k2}, active=2)
    with pytest.raises(EnvelopeError):
        envelope.rewrap(ring, OTHER_AAD, old)
    bad = bytearray(old.wrapped_dk)
    bad[20] ^= 1
    with pytest.raises(EnvelopeError):
        envelope.rewrap(ring, AAD, old._replace(wrapped_dk=bytes(bad)))


def test_rewrap_under_active_is_a_no_op(ring):
    sealed = envelope.seal(ring, AAD, SHARE)
    assert envelope.rewrap(ring, AAD, sealed) is sealed


@pytest.mark.parametrize(
    "keys, active",
    [({}, 1), ({1: b"short"}, 1), ({1: bytes(32)}, 2), ({0: bytes(32)}, 0), ({True: bytes(32)}, True)],
)
def test_ring_validation(keys, active):
    with pytest.raises(ValueError):
        KekRing(keys, active)


def test_ring_repr_has_no_key_bytes():
    key = bytes(range(32))
    text = repr(KekRing({3: key}, active=3))
    assert key.hex() not in text and "3" in text


def test_sealed_share_is_plain_data(ring):
    sealed = envelope.seal(ring, AAD, SHARE)
    assert isinstance(sealed, SealedShare)
    assert envelope.open(ring, AAD, SealedShare(*tuple(sealed))) == SHARE
