"""The audit-chain format (pure: no I/O).

Each node keeps its own append-only log of ``AuditEntry`` values (frozen,
checked when built; ``vaultrpc.wire`` converts them to and from the
``splitvault.v1.AuditEntry`` message, field for field). Entry
``seq`` (1, 2, ...) carries the hash of entry ``seq - 1`` (32 zero bytes for
the first), and its own hash over every other field:

    entry_hash = SHA-256( "splitvault/audit/entry/v1" 0x00
                          || u64 seq || i64 time_ms
                          || lp(node) || lp(event) || lp(actor) || lp(request_id)
                          || lp(tenant) || lp(subject) || lp(details_json)
                          || lp(prev_hash) )

where ``lp(x)`` is the 4-byte big-endian length of x's UTF-8 bytes followed
by them, so no two different entries encode alike. Every so often the node
signs the chain head with its own Ed25519 audit key:

    checkpoint_message = "splitvault/audit/checkpoint/v1" 0x00
                         || u64 seq || lp(entry_hash) || i64 time_ms || lp(node)

Editing an entry breaks its hash; removing or reordering entries breaks the
sequence numbers and the links; rewriting the whole tail (re-hashing
everything after an edit) contradicts the signed checkpoints, and cutting the
tail off leaves a checkpoint pointing past the end. ``verify_chain`` names
the first entry where any of these shows.

``details_json`` is canonical JSON (sorted keys, no spaces) of ids, counts,
names and reasons only. Values are limited to str, int, bool, None and lists
of them, so share, template or key bytes cannot slip in by accident.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault.errors import AuditChainError

GENESIS_HASH = bytes(32)
HASH_BYTES = 32
_ENTRY_DOMAIN = b"splitvault/audit/entry/v1\x00"
_CHECKPOINT_DOMAIN = b"splitvault/audit/checkpoint/v1\x00"
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_SEQ_TIME = struct.Struct(">Qq")  # u64 seq || i64 time_ms, as _U64 then _I64
# Longest string a details value may be: ids and reasons, never payloads.
MAX_DETAIL_CHARS = 512
MAX_DETAIL_ITEMS = 64

Details = Mapping[str, "str | int | bool | None | list"]


def _plain(cls, value, what: str):
    # value as a plain int, str or bytes (a subclass is converted, as a
    # protobuf field would hold it); ValueError for anything else.
    if cls is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"An audit entry's {what} must be an integer.")
    if cls is not int and not isinstance(value, cls):
        raise ValueError(f"An audit entry's {what} must be {cls.__name__}.")
    return cls(value)


# AuditEntry's fields and their types, in the order of the wire message.
ENTRY_FIELDS = (
    ("seq", int), ("time_ms", int), ("node", str), ("event", str), ("actor", str), ("request_id", str),
    ("tenant", str), ("subject", str), ("details_json", str), ("prev_hash", bytes), ("entry_hash", bytes),
)


@dataclass(frozen=True)
class AuditEntry:
    """One entry of a node's chain, as stored and as hashed (fields of the wire message).

    Built only with seq a u64, time_ms an i64, the names and details text,
    and the hashes bytes (ValueError otherwise); subclasses are stored as
    their plain type, which is what the hash covers.
    """

    seq: int
    time_ms: int
    node: str
    event: str
    actor: str = ""
    request_id: str = ""
    tenant: str = ""
    subject: str = ""
    details_json: str = ""
    prev_hash: bytes = b""
    entry_hash: bytes = b""

    def __post_init__(self) -> None:
        for name, cls in ENTRY_FIELDS:
            object.__setattr__(self, name, _plain(cls, getattr(self, name), name.replace("_", " ")))
        if not 0 <= self.seq < 2**64 or not -(2**63) <= self.time_ms < 2**63:
            raise ValueError("An audit entry's sequence number or time is out of range.")


@dataclass(frozen=True)
class AuditCheckpoint:
    """A node's signature over its chain head at ``seq`` (fields of the wire message)."""

    seq: int
    entry_hash: bytes
    time_ms: int
    node: str
    signature: bytes = b""

    def __post_init__(self) -> None:
        for name, cls in (("seq", int), ("entry_hash", bytes), ("time_ms", int), ("node", str), ("signature", bytes)):
            object.__setattr__(self, name, _plain(cls, getattr(self, name), name.replace("_", " ")))
        if not 0 <= self.seq < 2**64 or not -(2**63) <= self.time_ms < 2**63:
            raise ValueError("A checkpoint's sequence number or time is out of range.")



def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _lps(text: str) -> bytes:
    data = text.encode("utf-8")
    return _U32.pack(len(data)) + data


def _check_scalar(key: str, value) -> None:
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        if len(value) > MAX_DETAIL_CHARS:
            raise ValueError(f"Audit detail {key!r} is longer than {MAX_DETAIL_CHARS} characters.")
        return
    raise ValueError(
        f"Audit detail {key!r} has type {type(value).__name__}; only str, int, bool, None and lists of them are allowed."
    )


# What json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
# allow_nan=False) builds on every call; it keeps no state between calls.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_details(details: Details | None) -> str:
    """Canonical JSON of an entry's details: sorted keys, no spaces, checked types."""
    if not details:
        return "{}"
    if not isinstance(details, Mapping):
        raise ValueError("Audit details must be a mapping of names to values.")
    for key, value in details.items():
        if not isinstance(key, str):
            raise ValueError("Audit detail names must be strings.")
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_DETAIL_ITEMS:
                raise ValueError(f"Audit detail {key!r} lists more than {MAX_DETAIL_ITEMS} items.")
            for item in value:
                _check_scalar(key, item)
        else:
            _check_scalar(key, value)
    return _CANONICAL_JSON.encode(details)


def _encode_entry(seq, time_ms, node, event, actor, request_id, tenant, subject, details_json, prev_hash) -> bytes:
    parts = [_ENTRY_DOMAIN, _SEQ_TIME.pack(seq, time_ms)]
    append = parts.append
    for text in (node, event, actor, request_id, tenant, subject, details_json):
        data = text.encode("utf-8")
        append(_U32.pack(len(data)))
        append(data)
    append(_U32.pack(len(prev_hash)))
    append(prev_hash)
    return b"".join(parts)


def entry_bytes(entry: AuditEntry) -> bytes:
    """The canonical encoding hashed into ``entry_hash`` (every field but it)."""
    return _encode_entry(
        entry.seq, entry.time_ms, entry.node, entry.event, entry.actor, entry.request_id, entry.tenant,
        entry.subject, entry.details_json, entry.prev_hash,
    )


def entry_hash(entry: AuditEntry) -> bytes:
    return hashlib.sha256(entry_bytes(entry)).digest()


def make_entry(
    *,
    seq: int,
    prev_hash: bytes,
    time_ms: int,
    node: str,
    event: str,
    actor: str = "",
    request_id: str = "",
    tenant: str = "",
    subject: str = "",
    details: Details | None = None,
) -> AuditEntry:
    """A new entry, hashed and linked to ``prev_hash``."""
    return make_entry_row(
        seq=seq, prev_hash=prev_hash, time_ms=time_ms, node=node, event=event, actor=actor, request_id=request_id,
        tenant=tenant, subject=subject, details=details,
    )[0]


def make_entry_row(
    *,
    seq: int,
    prev_hash: bytes,
    time_ms: int,
    node: str,
    event: str,
    actor: str = "",
    request_id: str = "",
    tenant: str = "",
    subject: str = "",
    details: Details | None = None,
) -> tuple[AuditEntry, tuple]:
    """``make_entry``, and the entry as a stored row: (seq, time_ms, node,
    event, actor, request_id, tenant, subject, details_json, prev_hash,
    entry_hash), the values the message holds (``load_entries`` order)."""
    if seq < 1:
        raise ValueError("Audit sequence numbers start at 1.")
    if len(prev_hash) != HASH_BYTES:
        raise ValueError("An audit entry's previous hash is 32 bytes.")
    if not event:
        raise ValueError("An audit entry needs an event name.")
    details_json = canonical_details(details)
    # The entry first: it refuses what the chain cannot hold.
    entry = AuditEntry(
        seq=seq,
        time_ms=time_ms,
        node=node,
        event=event,
        actor=actor,
        request_id=request_id,
        tenant=tenant,
        subject=subject,
        details_json=details_json,
        prev_hash=prev_hash,
    )
    # Hashed and stored as the entry holds them (what a reader loads back).
    row = (entry.seq, entry.time_ms, entry.node, entry.event, entry.actor, entry.request_id, entry.tenant,
           entry.subject, entry.details_json, entry.prev_hash)
    digest = hashlib.sha256(_encode_entry(*row)).digest()
    return dataclasses.replace(entry, entry_hash=digest), row + (digest,)


def checkpoint_message(node: str, seq: int, entry_hash: bytes, time_ms: int) -> bytes:
    """The bytes a node's audit key signs for a checkpoint of its chain head."""
    return b"".join((_CHECKPOINT_DOMAIN, _U64.pack(seq), _lp(entry_hash), _I64.pack(time_ms), _lps(node)))


def sign_checkpoint(
    key: ed25519.Ed25519PrivateKey, node: str, seq: int, entry_hash: bytes, time_ms: int
) -> AuditCheckpoint:
    return AuditCheckpoint(
        seq=seq,
        entry_hash=entry_hash,
        time_ms=time_ms,
        node=node,
        signature=key.sign(checkpoint_message(node, seq, entry_hash, time_ms)),
    )


# The event a node records when it witnesses a peer's signed checkpoint
# (shareholders.witness); its details hold the whole checkpoint.
WITNESS_EVENT = "witness"


def witness_details(cp: AuditCheckpoint) -> dict:
    """A witness entry's details: the peer's checkpoint, enough to verify it again."""
    return {"node": cp.node, "seq": cp.seq, "entry_hash": cp.entry_hash.hex(), "time_ms": cp.time_ms,
            "signature": cp.signature.hex()}


def witnessed_checkpoint(details_json: str) -> AuditCheckpoint | None:
    """The checkpoint a witness entry records, or None when it is malformed."""
    try:
        d = json.loads(details_json or "{}")
        return AuditCheckpoint(node=d["node"], seq=int(d["seq"]), entry_hash=bytes.fromhex(d["entry_hash"]),
                               time_ms=int(d["time_ms"]), signature=bytes.fromhex(d["signature"]))
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        return None


def checkpoint_valid(cp: AuditCheckpoint, public_key: ed25519.Ed25519PublicKey | bytes) -> bool:
    """Whether ``cp`` carries a valid signature under ``public_key``."""
    if isinstance(public_key, (bytes, bytearray)):
        public_key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(public_key))
    try:
        public_key.verify(cp.signature, checkpoint_message(cp.node, cp.seq, cp.entry_hash, cp.time_ms))
    except InvalidSignature:
        return False
    return True


@dataclass
class VerifyReport:
    """The outcome of ``verify_chain``.

    ``ok`` is False when any break was found; ``broken_seq`` is then the first
    broken entry and ``reason`` says why in one sentence. ``signed_seq`` is the
    highest entry covered by a valid checkpoint: entries after it verify as a
    chain but no signature vouches for them yet.
    """

    ok: bool
    entries: int
    head_seq: int
    head_hash: bytes
    checkpoints: int
    signed_seq: int
    broken_seq: int | None = None
    reason: str | None = None
    problems: list[tuple[int, str]] = field(default_factory=list)

    def raise_for_break(self) -> "VerifyReport":
        if not self.ok:
            raise AuditChainError(self.reason or "The audit chain does not verify.", self.broken_seq or 0)
        return self

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash.hex(),
            "checkpoints": self.checkpoints,
            "signed_seq": self.signed_seq,
            "broken_seq": self.broken_seq,
            "reason": self.reason,
        }


def verify_chain(
    entries: Iterable[AuditEntry],
    checkpoints: Iterable[AuditCheckpoint],
    public_key: ed25519.Ed25519PublicKey | bytes,
    *,
    node: str | None = None,
    start_seq: int = 1,
    start_prev_hash: bytes = GENESIS_HASH,
) -> VerifyReport:
    """Check a node's chain, in the order given, against its signed checkpoints.

    ``entries`` must start at ``start_seq`` (1 for a whole log; a later
    sequence number with the hash of the entry before it for a suffix). When
    ``node`` is given every entry and checkpoint must name it. Returns a
    report naming the first broken sequence number; never raises for a broken
    chain (call ``report.raise_for_break()`` for AuditChainError).
    """
    if isinstance(public_key, (bytes, bytearray)):
        public_key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(public_key))
    problems: list[tuple[int, str]] = []
    hashes: dict[int, bytes] = {}
    expected_seq = start_seq
    prev = start_prev_hash
    chain_broken = False
    count = 0
    for entry in entries:
        count += 1
        if chain_broken:
            continue
        seq = expected_seq
        if entry.seq != seq:
            if entry.seq > seq:
                why = f"Audit entry {seq} is missing: entry {entry.seq} follows entry {seq - 1}."
            else:
                why = f"Audit entry {seq} is out of order: entry {entry.seq} appears after entry {seq - 1}."
            problems.append((seq, why))
            chain_broken = True
            continue
        if entry_hash(entry) != entry.entry_hash:
            problems.append((seq, f"Audit entry {seq} was altered: its hash does not match its contents."))
            chain_broken = True
            continue
        if entry.prev_hash != prev:
            problems.append(
                (seq, f"Audit entry {seq} does not link to entry {seq - 1}: an entry before it was altered or removed.")
            )
            chain_broken = True
            continue
        if node is not None and entry.node != node:
            problems.append((seq, f"Audit entry {seq} names node {entry.node!r}, not {node!r}."))
            chain_broken = True
            continue
        hashes[seq] = entry.entry_hash
        prev = entry.entry_hash
        expected_seq += 1
    head_seq = expected_seq - 1
    intact_to = problems[0][0] - 1 if problems else head_seq

    signed_seq = 0
    n_checkpoints = 0
    for cp in sorted(checkpoints, key=lambda c: c.seq):
        n_checkpoints += 1
        message = checkpoint_message(cp.node, cp.seq, cp.entry_hash, cp.time_ms)
        try:
            public_key.verify(cp.signature, message)
        except InvalidSignature:
            problems.append((cp.seq, f"The checkpoint at entry {cp.seq} has an invalid signature."))
            continue
        if node is not None and cp.node != node:
            problems.append((cp.seq, f"The checkpoint at entry {cp.seq} names node {cp.node!r}, not {node!r}."))
            continue
        if cp.seq < start_seq:
            continue  # before the verified range: nothing to compare against
        if cp.seq > head_seq and not problems:
            # A signed head beyond the end: entries were cut off the tail.
            problems.append(
                (head_seq + 1, f"The log ends at entry {head_seq} but a signed checkpoint covers entry {cp.seq}: entries were removed.")
            )
            continue
        known = hashes.get(cp.seq)
        if known is None:
            continue  # beyond an earlier break, already reported
        if known != cp.entry_hash:
            # The chain was rewritten consistently after an edit; the signed
            # hash disagrees. The first rewritten entry is at or before cp.seq.
            problems.append(
                (
                    cp.seq,
                    f"Audit entry {cp.seq} differs from its signed checkpoint: the chain after entry {signed_seq} "
                    "was rewritten.",
                )
            )
            continue
        signed_seq = max(signed_seq, cp.seq)

    problems.sort(key=lambda p: p[0])
    ok = not problems
    return VerifyReport(
        ok=ok,
        entries=count,
        head_seq=head_seq if ok else intact_to,
        head_hash=prev if ok else hashes.get(intact_to, start_prev_hash),
        checkpoints=n_checkpoints,
        signed_seq=signed_seq,
        broken_seq=problems[0][0] if problems else None,
        reason=problems[0][1] if problems else None,
        problems=problems,
    )


def load_entries(rows: Sequence[tuple]) -> list[AuditEntry]:
    """Entries from (seq, time_ms, node, event, actor, request_id, tenant,
    subject, details_json, prev_hash, entry_hash) rows, as a node stores them."""
    return [
        AuditEntry(
            seq=r[0], time_ms=r[1], node=r[2], event=r[3], actor=r[4], request_id=r[5],
            tenant=r[6], subject=r[7], details_json=r[8], prev_hash=bytes(r[9]), entry_hash=bytes(r[10]),
        )
        for r in rows
    ]
