"""Verification tickets: a payment provider's signed authorisation of one
verification of one subject with one probe.

The provider signs; the matcher checks the probe digest against the probe it
was sent; every shareholder checks signature, tenant, expiry and replay
itself before releasing a share, so a compromised matcher cannot fetch shares
without a provider's authorisation.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError

from splitvault.v1 import common_pb2
from vault.errors import InvalidTicket

SIGNATURE_CONTEXT = b"splitvault/ticket/v1\x00"
PROBE_CONTEXT = b"splitvault/probe/v1\x00"
NONCE_BYTES = 16
# Longest validity a node accepts, whatever the ticket says.
MAX_TTL_MS = 5 * 60 * 1000
# Clock skew tolerated between provider and node.
CLOCK_SKEW_MS = 30 * 1000
MAX_ID_BYTES = 128


def now_ms() -> int:
    return int(time.time() * 1000)


def probe_digest(probe, nonce: bytes) -> bytes:
    """SHA-256(context || nonce || probe as float32 little-endian).

    Salted with the ticket's random nonce; shareholders never see the probe,
    so they cannot test guesses against anything they hold but this digest,
    and a guess would have to match a noisy float32 vector bit for bit.
    """
    data = np.ascontiguousarray(np.asarray(probe, dtype="<f4"))
    return hashlib.sha256(PROBE_CONTEXT + nonce + data.tobytes()).digest()


def issue(
    signing_key: ed25519.Ed25519PrivateKey,
    key_id: str,
    *,
    tenant: str,
    subject: str,
    request_id: str,
    probe,
    ttl_ms: int = 60_000,
    issued_at_ms: int | None = None,
) -> common_pb2.VerificationTicket:
    """Sign a ticket for one verification (the provider's side)."""
    issued = now_ms() if issued_at_ms is None else issued_at_ms
    nonce = secrets.token_bytes(NONCE_BYTES)
    body = common_pb2.TicketBody(
        tenant=tenant,
        subject=subject,
        request_id=request_id,
        probe_digest=probe_digest(probe, nonce),
        nonce=nonce,
        issued_at_ms=issued,
        expires_at_ms=issued + ttl_ms,
    )
    raw = body.SerializeToString(deterministic=True)
    return common_pb2.VerificationTicket(
        body=raw, signature=signing_key.sign(SIGNATURE_CONTEXT + raw), key_id=key_id
    )


def verify(
    ticket: common_pb2.VerificationTicket,
    keys: Mapping[str, ed25519.Ed25519PublicKey],
    *,
    tenant: str | None = None,
    at_ms: int | None = None,
) -> common_pb2.TicketBody:
    """Check a ticket's signature, shape and validity window; return its body.

    ``keys`` maps key ids to the public keys registered for ``tenant`` (or, if
    tenant is None, to all tenants' keys: the key id then decides the tenant
    and the body must name it). Raises InvalidTicket with a short reason.
    """
    # Each field read once: a protobuf bytes field is a fresh copy per read.
    raw, signature, key_id = ticket.body, ticket.signature, ticket.key_id
    if not raw or not signature or not key_id:
        raise InvalidTicket("The verification ticket is missing its body, signature or key id.")
    key = keys.get(key_id)
    if key is None:
        raise InvalidTicket("The verification ticket is signed with a key not registered for this tenant.")
    try:
        key.verify(signature, SIGNATURE_CONTEXT + raw)
    except InvalidSignature:
        raise InvalidTicket("The verification ticket's signature does not verify.") from None
    body = common_pb2.TicketBody()
    try:
        body.ParseFromString(raw)
    except DecodeError:
        raise InvalidTicket("The verification ticket's body cannot be parsed.") from None
    body_tenant = body.tenant
    if tenant is not None and body_tenant != tenant:
        raise InvalidTicket("The verification ticket was issued for another tenant.")
    for name, value in (("tenant", body_tenant), ("subject", body.subject), ("request_id", body.request_id)):
        if not value or len(value.encode()) > MAX_ID_BYTES:
            raise InvalidTicket(f"The verification ticket's {name} is empty or longer than {MAX_ID_BYTES} bytes.")
    if len(body.nonce) != NONCE_BYTES or len(body.probe_digest) != 32:
        raise InvalidTicket("The verification ticket's nonce or probe digest has the wrong length.")
    now = now_ms() if at_ms is None else at_ms
    issued, expires = body.issued_at_ms, body.expires_at_ms
    if expires <= issued or expires - issued > MAX_TTL_MS:
        raise InvalidTicket("The verification ticket's validity window is invalid or too long.")
    if issued > now + CLOCK_SKEW_MS:
        raise InvalidTicket("The verification ticket is issued in the future.")
    if now >= expires:
        raise InvalidTicket("The verification ticket has expired.")
    return body


def probe_matches(body: common_pb2.TicketBody, probe) -> bool:
    """Whether the probe is the one the provider authorised (constant-time compare)."""
    return hmac.compare_digest(probe_digest(probe, body.nonce), body.probe_digest)


def ticket_id(body: common_pb2.TicketBody) -> str:
    """Replay key: one ticket is honoured once per shareholder."""
    return f"{body.tenant}\x00{body.request_id}"


# A release's audit entry records the ticket it was made for, so that an
# auditor can re-verify the provider's signature later (``vaultctl audit
# reconcile``). The body holds only ids, the salted probe digest, a nonce and
# times; no biometric data. Base64 strings cut to fit ``vault.audit``'s
# per-value limit.
_AUDIT_CHUNK = 480


def audit_details(ticket: common_pb2.VerificationTicket) -> dict:
    """``{"ticket": [base64 chunks of the body], "ticket_sig": base64}``."""
    body = base64.b64encode(ticket.body).decode("ascii")
    return {
        "ticket": [body[i:i + _AUDIT_CHUNK] for i in range(0, len(body), _AUDIT_CHUNK)],
        "ticket_sig": base64.b64encode(ticket.signature).decode("ascii"),
    }


def from_audit_details(details: Mapping) -> common_pb2.VerificationTicket | None:
    """The ticket a release entry's details record, or None if they hold none."""
    chunks, sig, key_id = details.get("ticket"), details.get("ticket_sig"), details.get("key_id")
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks) or not isinstance(sig, str):
        return None
    try:
        body = base64.b64decode("".join(chunks), validate=True)
        signature = base64.b64decode(sig, validate=True)
    except (ValueError, TypeError):
        return None
    return common_pb2.VerificationTicket(body=body, signature=signature, key_id=key_id if isinstance(key_id, str) else "")
