"""Tickets: a payment provider's signed authorisation of one operation on
one subject: a verification with one probe, or a write (enrol, replace,
delete; docs/contracts.md "Provider-signed writes").

The provider signs; the matcher checks the probe (or template) digest against
the vector it was sent; every shareholder checks signature, tenant,
operation, audience (the cluster id), expiry and replay itself before it
releases, stores or erases anything, so neither a compromised matcher nor a
holder of the provider's TLS certificate alone can act without the provider's
ticket key.

This module holds the types (``SignedTicket``, ``TicketBody``, ``WriteItem``)
and the checks; the body's encoding is the wire's (``TicketBody`` message,
deterministic serialization), so ``vaultrpc.wire`` issues tickets, parses
them as they arrive and runs ``check_signature`` then ``check_body``
(``wire.verify_ticket``).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import names
from vault.errors import InvalidName, InvalidTicket

SIGNATURE_CONTEXT = b"splitvault/ticket/v1\x00"
PROBE_CONTEXT = b"splitvault/probe/v1\x00"
TEMPLATE_CONTEXT = b"splitvault/template/v1\x00"
BATCH_CONTEXT = b"splitvault/batch/v1\x00"
# Most templates one batch ticket may cover (bounds a node's work per batch).
MAX_BATCH_ITEMS = 10_000

# The operations, numbered as the wire's TicketOperation enum (tests/test_ticket.py checks they agree).
VERIFY = 1
ENROLL = 2
REPLACE = 3
DELETE = 4
IDENTIFY = 5
WRITES = (ENROLL, REPLACE)
# Operations whose ticket binds a probe (and IDENTIFY names no subject).
PROBES = (VERIFY, IDENTIFY)
OPERATION_NAMES = {VERIFY: "verify", ENROLL: "enroll", REPLACE: "replace", DELETE: "delete", IDENTIFY: "identify"}
NONCE_BYTES = 16
# Longest validity a node accepts, whatever the ticket says.
MAX_TTL_MS = 5 * 60 * 1000
# Clock skew tolerated between provider and node.
CLOCK_SKEW_MS = 30 * 1000


@dataclass(frozen=True)
class SignedTicket:
    """A ticket as it arrives: the encoded body, the provider's signature over it, and the key id."""

    body: bytes
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class TicketBody:
    """What a provider signs (the fields of the wire's TicketBody): trusted only
    once its ticket passed ``check_signature`` and ``check_body``."""

    tenant: str = ""
    subject: str = ""
    request_id: str = ""
    nonce: bytes = b""
    issued_at_ms: int = 0
    expires_at_ms: int = 0
    operation: int = 0
    audience: str = ""
    probe_digest: bytes = b""
    template_digest: bytes = b""
    batch_digest: bytes = b""
    group: str = ""


@dataclass(frozen=True)
class WriteItem:
    """One template of a batch ticket: subject, request id, salted template digest and group."""

    subject: str
    request_id: str
    template_digest: bytes
    group: str = ""


def check_audience(value: str) -> str:
    """A cluster id, the audience of tickets: a token (vault.names)."""
    return names.check_token(value, "cluster id")


def now_ms() -> int:
    return int(time.time() * 1000)


def probe_digest(probe, nonce: bytes) -> bytes:
    """SHA-256(context || nonce || probe as float32 little-endian).

    Salted with the ticket's random nonce; shareholders never see the probe,
    so they cannot test guesses against anything they hold but this digest,
    and a guess would have to match a noisy float32 vector bit for bit.
    """
    return _vector_digest(PROBE_CONTEXT, probe, nonce)


def template_digest(template, nonce: bytes) -> bytes:
    """SHA-256(context || nonce || template as float32 little-endian): as the
    probe digest, under its own context so neither stands for the other."""
    return _vector_digest(TEMPLATE_CONTEXT, template, nonce)


def item_digest(template, nonce: bytes, request_id: str) -> bytes:
    """A batch item's template digest: salted with the batch ticket's nonce and the item's request id."""
    return template_digest(template, nonce + request_id.encode())


def batch_digest(items) -> bytes:
    """SHA-256 over a batch's WriteItems in order (each field length-prefixed; the group too)."""
    h = hashlib.sha256(BATCH_CONTEXT)
    for item in items:
        for part in (item.subject.encode(), item.request_id.encode(), item.template_digest, item.group.encode()):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
    return h.digest()


def _vector_digest(context: bytes, vector, nonce: bytes) -> bytes:
    data = np.ascontiguousarray(np.asarray(vector, dtype="<f4"))
    return hashlib.sha256(context + nonce + data.tobytes()).digest()


def sign(signing_key: ed25519.Ed25519PrivateKey, raw_body: bytes) -> bytes:
    """The provider's Ed25519 signature over a ticket's encoded body (``vaultrpc.wire`` encodes it)."""
    return signing_key.sign(SIGNATURE_CONTEXT + raw_body)


def check_issue(operation: int, probe, template, subject: str = "") -> None:
    """ValueError unless ``operation`` is known and binds exactly the vector it must."""
    if operation not in OPERATION_NAMES:
        raise ValueError("The ticket operation must be VERIFY, ENROLL, REPLACE, DELETE or IDENTIFY.")
    if operation == IDENTIFY and subject:
        raise ValueError("An IDENTIFY ticket names no subject.")
    if (probe is not None) != (operation in PROBES) or (template is not None) != (operation in WRITES):
        raise ValueError("A VERIFY or IDENTIFY ticket binds a probe, an ENROLL or REPLACE ticket a template, "
                         "a DELETE ticket neither.")


def batch_matches(body: TicketBody, items: Sequence[WriteItem]) -> bool:
    """Whether ``items`` are exactly the ones the batch ticket signs (constant-time compare)."""
    return len(items) <= MAX_BATCH_ITEMS and hmac.compare_digest(batch_digest(items), body.batch_digest)


def check_signature(ticket: SignedTicket, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> None:
    """InvalidTicket unless the ticket is complete and its signature verifies
    under the key its key id names in ``keys``."""
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


def check_body(
    body: TicketBody | None,
    *,
    tenant: str | None = None,
    audience: str,
    operations: Collection[int] = (VERIFY,),
    batch: bool = False,
    at_ms: int | None = None,
) -> TicketBody:
    """Check a signed ticket's body: shape, operation, audience and validity window; return it.

    ``body`` is the parsed body of a ticket whose signature verified
    (``check_signature``; None when the signed bytes do not parse). ``tenant``
    the caller's tenant (None: any, the body names it); ``audience`` the
    checker's cluster id (an empty one accepts nothing); ``operations`` the
    operations the call may perform; ``batch`` whether the call takes a
    batch ticket (which names no subject) instead of a single one. Raises
    InvalidTicket with a short reason. ``vaultrpc.wire.verify_ticket`` runs
    both checks on a ticket as it arrives.
    """
    if body is None:
        raise InvalidTicket("The verification ticket's body cannot be parsed.")
    body_tenant = body.tenant
    if tenant is not None and body_tenant != tenant:
        raise InvalidTicket("The verification ticket was issued for another tenant.")
    if bool(body.batch_digest) != batch:
        raise InvalidTicket("A batch ticket stands only for the items of a bulk enrolment."
                            if body.batch_digest else "The call needs a batch ticket.")
    named = (("tenant", body_tenant), ("request_id", body.request_id))
    operation = body.operation
    if operation == IDENTIFY and body.subject:
        raise InvalidTicket("An identify ticket names no subject.")
    if not batch and operation != IDENTIFY:
        named += (("subject", body.subject),)
    elif batch and body.subject:
        raise InvalidTicket("A batch ticket names no subject.")
    for name, value in named:
        try:
            names.check_id(value, f"verification ticket's {name}")
        except InvalidName as exc:
            raise InvalidTicket(str(exc)) from None
    if body.group and (operation not in (*WRITES, IDENTIFY) or batch):
        raise InvalidTicket("Only an enrolment or identify ticket names a group (a batch ticket's items do).")
    try:
        names.check_group(body.group, "verification ticket's group")
    except InvalidName as exc:
        raise InvalidTicket(str(exc)) from None
    if operation not in operations:
        raise InvalidTicket(
            f"The ticket authorises {OPERATION_NAMES.get(operation, 'no known operation')}, not this call."
        )
    if not audience or body.audience != audience:
        raise InvalidTicket("The ticket was issued for another cluster (its audience is not this cluster id).")
    want_probe = 32 if operation in PROBES else 0
    want_template = 32 if operation in WRITES and not batch else 0
    if (len(body.nonce) != NONCE_BYTES or len(body.probe_digest) != want_probe
            or len(body.template_digest) != want_template or len(body.batch_digest) != (32 if batch else 0)):
        raise InvalidTicket("The ticket's nonce, probe digest or template digest has the wrong length.")
    now = now_ms() if at_ms is None else at_ms
    issued, expires = body.issued_at_ms, body.expires_at_ms
    if expires <= issued or expires - issued > MAX_TTL_MS:
        raise InvalidTicket("The verification ticket's validity window is invalid or too long.")
    if issued > now + CLOCK_SKEW_MS:
        raise InvalidTicket("The verification ticket is issued in the future.")
    if now >= expires:
        raise InvalidTicket("The verification ticket has expired.")
    return body


def probe_matches(body: TicketBody, probe) -> bool:
    """Whether the probe is the one the provider authorised (constant-time compare)."""
    return hmac.compare_digest(probe_digest(probe, body.nonce), body.probe_digest)


def template_matches(body: TicketBody, template) -> bool:
    """Whether the template is the one the provider authorised (constant-time compare)."""
    return hmac.compare_digest(template_digest(template, body.nonce), body.template_digest)


def write_operation(replace: bool) -> int:
    """The ticket operation of an enrolment with this replace flag."""
    return REPLACE if replace else ENROLL


def ticket_digest(ticket: SignedTicket) -> str:
    """Hex SHA-256 over the signed body and signature: names one write
    ticket in audit entries and in a node's replay set."""
    return hashlib.sha256(SIGNATURE_CONTEXT + ticket.body + b"\x00" + ticket.signature).hexdigest()


def ticket_id(body: TicketBody) -> str:
    """Replay key: one ticket is honoured once per shareholder."""
    return f"{body.tenant}\x00{body.request_id}"


# A release's audit entry records the ticket it was made for, so that an
# auditor can re-verify the provider's signature later (``vaultctl audit
# reconcile``). The body holds only ids, the salted probe digest, a nonce and
# times; no biometric data. Base64 strings cut to fit ``vault.audit``'s
# per-value limit.
_AUDIT_CHUNK = 480


def audit_details(ticket: SignedTicket) -> dict:
    """``{"ticket": [base64 chunks of the body], "ticket_sig": base64}``."""
    body = base64.b64encode(ticket.body).decode("ascii")
    return {
        "ticket": [body[i:i + _AUDIT_CHUNK] for i in range(0, len(body), _AUDIT_CHUNK)],
        "ticket_sig": base64.b64encode(ticket.signature).decode("ascii"),
    }


def from_audit_details(details: Mapping) -> SignedTicket | None:
    """The ticket a release entry's details record, or None if they hold none."""
    chunks, sig, key_id = details.get("ticket"), details.get("ticket_sig"), details.get("key_id")
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks) or not isinstance(sig, str):
        return None
    try:
        body = base64.b64decode("".join(chunks), validate=True)
        signature = base64.b64decode(sig, validate=True)
    except (ValueError, TypeError):
        return None
    return SignedTicket(body=body, signature=signature, key_id=key_id if isinstance(key_id, str) else "")
