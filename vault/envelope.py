"""Envelope encryption of share records at rest (pure: no I/O).

Every record gets its own fresh 256-bit data key (DK). The share is sealed
with AES-256-GCM under the DK, with the record's identity
(``vault.record.record_identity(tenant, subject, index, epoch)``) as
associated data; the DK is itself sealed ("wrapped") with AES-256-GCM under
the node's key-encryption key (KEK), with the same identity and the KEK
version as associated data. So:

- a ciphertext moved to another row (other tenant, subject, index or epoch)
  fails to open, as does any flipped byte in any field;
- the KEK never touches the database, and rotating it re-wraps 60-byte data
  keys only (``rewrap``), never the shares themselves;
- KEKs are versioned like ``cryptography``'s MultiFernet: the active version
  encrypts, the older ones only decrypt, until they are retired.

Every failure to open raises the one opaque ``EnvelopeError``: the caller
learns nothing about which check failed.

AES-GCM nonces are 96 random bits. A data key seals exactly one share, and a
KEK wraps one data key per record: at 2**32 wraps per KEK the birthday bound
on nonce collisions is still below 2**-32, far beyond any node's record count
between rotations.

A data key per record is kept in bulk paths too (refresh, reshare, bulk
enrolment): sealing a 512-d share costs ~6 us and opening one ~4 us on the
development machine, of which a data key shared by a batch would save ~2 us
(one wrap and one AESGCM key schedule), against ~130 us of node CPU per record
in a refresh. Not worth a second envelope format. ``seal_many`` batches only
what is not per record (the CSPRNG read, the KEK lookup); ``open_parts``
opens a stored row's columns without building a ``SealedShare``.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.errors import EnvelopeError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# A wrapped data key: nonce || AES-GCM(KEK, DK) || tag.
WRAPPED_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES

# Domain prefixes keep the two AES-GCM uses apart from each other and from
# anything else that might ever be keyed with the same material.
_SHARE_DOMAIN = b"splitvault/envelope/share/v1\x00"
_WRAP_DOMAIN = b"splitvault/envelope/wrap/v1\x00"
_MAX_VERSION = 2**32 - 1
_U32 = struct.Struct(">I")
# A seal's fresh randomness: data key, share nonce, wrap nonce.
_FRESH_BYTES = KEY_BYTES + 2 * NONCE_BYTES


class SealedShare(NamedTuple):
    """What a node stores for one record: all of it may sit on disk.

    A NamedTuple rather than a frozen dataclass: a bulk store builds one per
    record, and a tuple is four times cheaper to make.
    """

    kek_version: int
    wrapped_dk: bytes
    nonce: bytes
    ciphertext: bytes


class KekRing:
    """Versioned key-encryption keys; ``active`` encrypts, the rest only decrypt.

    The node loads the keys (from its 0600 KEK file or the environment) and
    builds the ring; this module never reads files.
    """

    __slots__ = ("_aeads", "_active")

    def __init__(self, keys: Mapping[int, bytes], active: int):
        if not keys:
            raise ValueError("A KEK ring needs at least one key.")
        aeads: dict[int, AESGCM] = {}
        for version, key in keys.items():
            if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= _MAX_VERSION:
                raise ValueError("A KEK version is an integer from 1 to 2**32-1.")
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
                raise ValueError(f"KEK version {version} is not {KEY_BYTES} bytes.")
            aeads[version] = AESGCM(bytes(key))
        if active not in aeads:
            raise ValueError(f"The active KEK version {active} is not among the ring's keys.")
        self._aeads = aeads
        self._active = active

    @property
    def active(self) -> int:
        return self._active

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._aeads))

    def __repr__(self) -> str:  # never the key bytes
        return f"KekRing(active={self._active}, versions={self.versions})"

    def _aead(self, version: int) -> AESGCM:
        aead = self._aeads.get(version)
        if aead is None:
            raise EnvelopeError("The sealed share cannot be opened.")
        return aead


def _wrap_aad(aad: bytes, version: int) -> bytes:
    # domain || len(aad) || aad || version: unambiguous whatever aad holds.
    return b"".join((_WRAP_DOMAIN, _U32.pack(len(aad)), aad, _U32.pack(version)))


def _wrap(ring: KekRing, aad: bytes, dk: bytes, nonce: bytes | None = None) -> bytes:
    version = ring.active
    nonce = nonce or os.urandom(NONCE_BYTES)
    return nonce + ring._aead(version).encrypt(nonce, dk, _wrap_aad(aad, version))


def _unwrap(ring: KekRing, aad: bytes, kek_version: int, wrapped_dk: bytes) -> bytes:
    if len(wrapped_dk) != WRAPPED_BYTES:
        raise EnvelopeError("The sealed share cannot be opened.")
    aead = ring._aead(kek_version)
    try:
        return aead.decrypt(wrapped_dk[:NONCE_BYTES], wrapped_dk[NONCE_BYTES:], _wrap_aad(aad, kek_version))
    except InvalidTag:
        raise EnvelopeError("The sealed share cannot be opened.") from None


def seal(ring: KekRing, aad: bytes, plaintext: bytes) -> SealedShare:
    """Seal one record's share under a fresh data key wrapped by the active KEK."""
    # One read of the OS CSPRNG for the data key and both nonces.
    return _seal(ring._aeads[ring._active], ring._active, aad, plaintext, os.urandom(_FRESH_BYTES))


def seal_many(ring: KekRing, aads: Sequence[bytes], plaintexts: Sequence[bytes]) -> list[SealedShare]:
    """``seal`` of each (aad, plaintext) pair, in order: one fresh data key and
    two fresh nonces per record as ever, read from the OS CSPRNG in one call
    for the whole batch (a bulk path's per-record overhead, not its crypto)."""
    if len(aads) != len(plaintexts):
        raise ValueError("One associated data per plaintext.")
    version = ring._active
    aead = ring._aeads[version]
    fresh = os.urandom(_FRESH_BYTES * len(aads))
    return [_seal(aead, version, aad, plaintext, fresh[j * _FRESH_BYTES : (j + 1) * _FRESH_BYTES])
            for j, (aad, plaintext) in enumerate(zip(aads, plaintexts))]


def _seal(kek: AESGCM, version: int, aad: bytes, plaintext: bytes, fresh: bytes) -> SealedShare:
    # fresh: data key || share nonce || wrap nonce, never used for anything else.
    dk, nonce, wrap_nonce = fresh[:KEY_BYTES], fresh[KEY_BYTES:-NONCE_BYTES], fresh[-NONCE_BYTES:]
    ciphertext = AESGCM(dk).encrypt(nonce, bytes(plaintext), _SHARE_DOMAIN + aad)
    wrapped = wrap_nonce + kek.encrypt(wrap_nonce, dk, _wrap_aad(aad, version))
    return SealedShare(version, wrapped, nonce, ciphertext)


def open(ring: KekRing, aad: bytes, sealed: SealedShare) -> bytes:  # noqa: A001 - the envelope verb
    """The share in ``sealed``, or EnvelopeError (wrong key, tampered or moved)."""
    return open_parts(ring, aad, *sealed)


def open_parts(ring: KekRing, aad: bytes, kek_version: int, wrapped_dk: bytes, nonce: bytes,
               ciphertext: bytes) -> bytes:
    """``open`` of a sealed share given as its four fields (a stored row's
    columns, without building a SealedShare per row)."""
    aead = ring._aeads.get(kek_version)
    if aead is None or len(wrapped_dk) != WRAPPED_BYTES or len(nonce) != NONCE_BYTES:
        raise EnvelopeError("The sealed share cannot be opened.")
    try:
        dk = aead.decrypt(wrapped_dk[:NONCE_BYTES], wrapped_dk[NONCE_BYTES:], _wrap_aad(aad, kek_version))
        return AESGCM(dk).decrypt(nonce, ciphertext, _SHARE_DOMAIN + aad)
    except InvalidTag:
        raise EnvelopeError("The sealed share cannot be opened.") from None


def rewrap(ring: KekRing, aad: bytes, sealed: SealedShare) -> SealedShare:
    """The same share under the active KEK: only the data key is re-wrapped.

    The share ciphertext is not touched (and not checked: a corrupt one still
    fails at ``open``); the old wrapping must verify, so a tampered record is
    never laundered into a freshly wrapped one.
    """
    dk = _unwrap(ring, aad, sealed.kek_version, sealed.wrapped_dk)
    if sealed.kek_version == ring.active:
        return sealed
    return SealedShare(ring.active, _wrap(ring, aad, dk), sealed.nonce, sealed.ciphertext)


def new_kek() -> bytes:
    """A fresh random 256-bit KEK (the CLI writes it to the node's key file)."""
    return os.urandom(KEY_BYTES)
