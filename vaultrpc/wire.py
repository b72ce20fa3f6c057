"""The one boundary between wire messages and the vault's types.

``vault/`` never imports generated protobuf code: a service parses each
message it receives here, once, into a frozen, validated vault type
(``vault.record.Share`` and ``KeyShare``, ``vault.audit.AuditEntry`` and
``AuditCheckpoint``, ``vault.ticket.SignedTicket`` and ``TicketBody``), and
builds the messages it sends from those types here. A ticket's body is
signed as its encoded ``TicketBody`` message, so issuing and verifying
tickets (``issue_ticket``, ``issue_batch``, ``verify_ticket``) live here too. A parse raises the vault's own error
(``InvalidShares``), which ``vaultrpc.status`` maps to INVALID_ARGUMENT; a
caller that holds a vault type never checks its fields again.
"""
from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping

from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError

from splitvault.v1 import common_pb2
from vault import audit, record, ticket
from vault.errors import InvalidShares


def share(msg: common_pb2.ShareRecord) -> record.Share:
    """A ShareRecord message as a validated Share (InvalidShares if it is not one)."""
    if not isinstance(msg, common_pb2.ShareRecord):
        raise InvalidShares("A share record must be a ShareRecord message.")
    return record.Share(
        tenant=msg.tenant, subject=msg.subject, index=msg.index, epoch=msg.epoch, threshold=msg.threshold,
        shareholders=msg.shareholders, dimension=msg.dimension, codec_version=msg.codec_version,
        mac_count=msg.mac_count, values=msg.values, request_id=msg.request_id,
    )


def share_message(s: record.Share) -> common_pb2.ShareRecord:
    """The ShareRecord message of a Share."""
    return common_pb2.ShareRecord(
        tenant=s.tenant, subject=s.subject, index=s.index, epoch=s.epoch, threshold=s.threshold,
        shareholders=s.shareholders, dimension=s.dimension, codec_version=s.codec_version,
        mac_count=s.mac_count, values=s.values, request_id=s.request_id,
    )


def key_share(msg: common_pb2.MacKeyShare) -> record.KeyShare:
    """A MacKeyShare message as a validated KeyShare (InvalidShares if it is not one)."""
    if not isinstance(msg, common_pb2.MacKeyShare):
        raise InvalidShares("A MAC key share must be a MacKeyShare message.")
    return record.KeyShare(index=msg.index, epoch=msg.epoch, dimension=msg.dimension, values=msg.values)


def key_share_message(k: record.KeyShare) -> common_pb2.MacKeyShare:
    """The MacKeyShare message of a KeyShare."""
    return common_pb2.MacKeyShare(index=k.index, epoch=k.epoch, dimension=k.dimension, values=k.values)


def audit_entry(msg: common_pb2.AuditEntry) -> audit.AuditEntry:
    """An AuditEntry message as the vault's entry (field for field: the hash covers the same values)."""
    return audit.AuditEntry(**{name: getattr(msg, name) for name, _ in audit.ENTRY_FIELDS})


def audit_entry_message(e: audit.AuditEntry) -> common_pb2.AuditEntry:
    """The AuditEntry message of an entry."""
    return common_pb2.AuditEntry(**{name: getattr(e, name) for name, _ in audit.ENTRY_FIELDS})


def checkpoint(msg: common_pb2.AuditCheckpoint) -> audit.AuditCheckpoint:
    """An AuditCheckpoint message as the vault's checkpoint."""
    return audit.AuditCheckpoint(seq=msg.seq, entry_hash=msg.entry_hash, time_ms=msg.time_ms, node=msg.node,
                                 signature=msg.signature)


def checkpoint_message(cp: audit.AuditCheckpoint) -> common_pb2.AuditCheckpoint:
    """The AuditCheckpoint message of a checkpoint (a fresh message, whatever holds its fields)."""
    return common_pb2.AuditCheckpoint(seq=cp.seq, entry_hash=cp.entry_hash, time_ms=cp.time_ms, node=cp.node,
                                      signature=cp.signature)


# --- tickets ------------------------------------------------------------------------

_BODY_FIELDS = tuple(f.name for f in common_pb2.TicketBody.DESCRIPTOR.fields)


def signed_ticket(msg: common_pb2.VerificationTicket | ticket.SignedTicket) -> ticket.SignedTicket:
    """A VerificationTicket message as the vault's SignedTicket (a SignedTicket is returned as is)."""
    if isinstance(msg, ticket.SignedTicket):
        return msg
    return ticket.SignedTicket(body=msg.body, signature=msg.signature, key_id=msg.key_id)


def ticket_message(t: ticket.SignedTicket) -> common_pb2.VerificationTicket:
    """The VerificationTicket message of a SignedTicket."""
    return common_pb2.VerificationTicket(body=t.body, signature=t.signature, key_id=t.key_id)


def ticket_body(raw: bytes) -> ticket.TicketBody | None:
    """A ticket's encoded body as the vault's TicketBody, or None when it does not parse."""
    msg = common_pb2.TicketBody()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return None
    return ticket.TicketBody(**{name: getattr(msg, name) for name in _BODY_FIELDS})


def verify_ticket(
    msg: common_pb2.VerificationTicket | ticket.SignedTicket,
    keys: Mapping[str, ed25519.Ed25519PublicKey],
    *,
    tenant: str | None = None,
    audience: str,
    operations: Collection[int] = (ticket.VERIFY,),
    batch: bool = False,
    at_ms: int | None = None,
) -> ticket.TicketBody:
    """Check a ticket as it arrives (signature, then its body: ``vault.ticket.check_body``); its body.

    ``keys`` maps key ids to the public keys registered for ``tenant`` (or,
    if tenant is None, to all tenants' keys: the key id then decides the
    tenant and the body must name it). Raises InvalidTicket with a short reason.
    """
    signed = signed_ticket(msg)
    ticket.check_signature(signed, keys)
    return ticket.check_body(ticket_body(signed.body), tenant=tenant, audience=audience, operations=operations,
                             batch=batch, at_ms=at_ms)


def issue_ticket(
    signing_key: ed25519.Ed25519PrivateKey,
    key_id: str,
    *,
    tenant: str,
    subject: str,
    request_id: str,
    audience: str,
    probe=None,
    template=None,
    operation: int = ticket.VERIFY,
    ttl_ms: int = 60_000,
    issued_at_ms: int | None = None,
    group: str = "",
) -> common_pb2.VerificationTicket:
    """Sign a ticket for one operation (the provider's side).

    VERIFY and IDENTIFY (no subject) bind ``probe``, ENROLL and REPLACE bind
    ``template``, DELETE binds no vector; ``audience`` is the cluster id of the
    committee; ``group`` the gallery group of an enrolment or identification.
    """
    ticket.check_issue(operation, probe, template, subject)
    issued = ticket.now_ms() if issued_at_ms is None else issued_at_ms
    nonce = secrets.token_bytes(ticket.NONCE_BYTES)
    body = common_pb2.TicketBody(
        tenant=tenant,
        subject=subject,
        request_id=request_id,
        nonce=nonce,
        issued_at_ms=issued,
        expires_at_ms=issued + ttl_ms,
        operation=operation,
        audience=audience,
        group=group,
    )
    if probe is not None:
        body.probe_digest = ticket.probe_digest(probe, nonce)
    if template is not None:
        body.template_digest = ticket.template_digest(template, nonce)
    raw = body.SerializeToString(deterministic=True)
    return common_pb2.VerificationTicket(body=raw, signature=ticket.sign(signing_key, raw), key_id=key_id)


def issue_batch(
    signing_key: ed25519.Ed25519PrivateKey,
    key_id: str,
    *,
    tenant: str,
    audience: str,
    batch_id: str,
    operation: int,
    items,
    ttl_ms: int = 60_000,
    issued_at_ms: int | None = None,
) -> common_pb2.WriteBatch:
    """Sign one ticket for a bulk enrolment of ``items`` ((subject, request id,
    template) triples, or with a fourth element, the gallery group; in order):
    ENROLL or REPLACE for all of them."""
    if operation not in ticket.WRITES:
        raise ValueError("A batch ticket authorises ENROLL or REPLACE.")
    issued = ticket.now_ms() if issued_at_ms is None else issued_at_ms
    nonce = secrets.token_bytes(ticket.NONCE_BYTES)
    write_items = [
        common_pb2.WriteItem(subject=item[0], request_id=item[1], group=item[3] if len(item) > 3 else "",
                             template_digest=ticket.item_digest(item[2], nonce, item[1]))
        for item in items
    ]
    if not 1 <= len(write_items) <= ticket.MAX_BATCH_ITEMS:
        raise ValueError(f"A batch ticket covers 1 to {ticket.MAX_BATCH_ITEMS} templates.")
    body = common_pb2.TicketBody(
        tenant=tenant, request_id=batch_id, nonce=nonce, issued_at_ms=issued, expires_at_ms=issued + ttl_ms,
        operation=operation, audience=audience, batch_digest=ticket.batch_digest(write_items),
    )
    raw = body.SerializeToString(deterministic=True)
    signed = common_pb2.VerificationTicket(body=raw, signature=ticket.sign(signing_key, raw), key_id=key_id)
    return common_pb2.WriteBatch(ticket=signed, items=write_items)
