"""Committee-change plans: what a reshare will do, approved by the node
operators before any node begins it.

A plan is one canonical JSON document (sorted keys, no spaces, ASCII) naming
the cluster it is for (``audience``: a SHA-256 over the cluster CA's public
key and the cluster id, ``audience_for``), a random nonce, the session id it authorises, the epochs, the old
committee (name -> index) and threshold, and for EVERY new member its name,
index, address, the SHA-256 of its certificate's public key (SPKI) and its
operator's Ed25519 key; then the new threshold, the senders and a validity
window. Each approving operator signs ``SIGNATURE_CONTEXT || body`` with its
own Ed25519 key; a node begins a reshare only on k_old valid signatures of
distinct current members' operators (shareholders.epochs).

Pinning the member's key fingerprint, not only its name, is what keeps a
holder of the cluster CA from minting a member: a certificate it issues
carries another key. The model is HashiCorp Vault's rekey: a quorum of the
current key holders, one nonce binding every step.

Pure: no network, no disk. The CLI writes the plan file (``document``).
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import names, pki
from vault.errors import VaultError

FORMAT = "splitvault/committee-plan/v1"
SIGNATURE_CONTEXT = b"splitvault/committee-plan/v1\x00"
NONCE_BYTES = 16
KINDS = ("reshare",)
# Longest validity a node accepts, whatever the plan says.
MAX_TTL_MS = 7 * 24 * 3600 * 1000
DEFAULT_TTL_MS = 24 * 3600 * 1000
# Clock skew tolerated between the proposer and a node.
CLOCK_SKEW_MS = 5 * 60 * 1000
MAX_BODY_BYTES = 64 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class InvalidPlan(VaultError, ValueError):
    """A committee-change plan is malformed, expired or for another cluster."""


@dataclass(frozen=True)
class NewMember:
    """A member of the new committee, pinned by its certificate key and operator key."""

    name: str
    index: int
    address: str
    spki_sha256: str
    operator_key: str

    def to_json(self) -> dict:
        return {"name": self.name, "index": self.index, "address": self.address, "spki_sha256": self.spki_sha256,
                "operator_key": self.operator_key}


@dataclass(frozen=True)
class CommitteePlan:
    audience: str
    nonce: str
    session_id: str
    kind: str
    from_epoch: int
    new_epoch: int
    old_committee: dict[str, int]
    old_threshold: int
    new_committee: tuple[NewMember, ...]
    new_threshold: int
    senders: tuple[int, ...]
    issued_at_ms: int
    expires_at_ms: int

    @property
    def new_indices(self) -> dict[str, int]:
        return {m.name: m.index for m in self.new_committee}

    @property
    def pins(self) -> dict[str, str]:
        """new member name -> the SHA-256 of its certificate's public key (hex)."""
        return {m.name: m.spki_sha256 for m in self.new_committee}

    def member(self, name: str) -> NewMember | None:
        return next((m for m in self.new_committee if m.name == name), None)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "audience": self.audience, "nonce": self.nonce, "session_id": self.session_id,
            "kind": self.kind, "from_epoch": self.from_epoch, "new_epoch": self.new_epoch,
            "old_committee": dict(self.old_committee), "old_threshold": self.old_threshold,
            "new_committee": [m.to_json() for m in sorted(self.new_committee, key=lambda m: m.index)],
            "new_threshold": self.new_threshold, "senders": list(self.senders),
            "issued_at_ms": self.issued_at_ms, "expires_at_ms": self.expires_at_ms,
        }

    def body(self) -> bytes:
        """The canonical bytes the operators sign."""
        return canonical(self.to_json())

    def digest(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()


def canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def now_ms() -> int:
    return int(time.time() * 1000)


def spki_sha256(cert_pem: bytes) -> str:
    """SHA-256 (hex) of a certificate's DER SubjectPublicKeyInfo: what a plan pins."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidPlan("The certificate is not a PEM X.509 certificate.") from None
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


AUDIENCE_CONTEXT = b"splitvault/plan-audience/v1\x00"


def audience_for(ca_pem: bytes, cluster_id: str) -> str:
    """The audience a plan for this cluster names: SHA-256 over the CA's
    public key (``spki_sha256``) and the cluster id, so that a plan approved
    for one cluster is refused by another that shares its CA (and perhaps
    its operators' keys)."""
    h = hashlib.sha256(AUDIENCE_CONTEXT + bytes.fromhex(spki_sha256(ca_pem)) + cluster_id.encode())
    return h.hexdigest()


def make(*, audience: str, session_id: str, from_epoch: int, new_epoch: int, old_committee: Mapping[str, int],
         old_threshold: int, new_committee, new_threshold: int, senders, kind: str = "reshare",
         ttl_ms: int = DEFAULT_TTL_MS, issued_at_ms: int | None = None) -> CommitteePlan:
    """A new plan with a fresh random nonce (checked as ``parse`` would)."""
    issued = now_ms() if issued_at_ms is None else issued_at_ms
    plan = CommitteePlan(
        audience=audience, nonce=secrets.token_bytes(NONCE_BYTES).hex(), session_id=session_id, kind=kind,
        from_epoch=int(from_epoch), new_epoch=int(new_epoch), old_committee=dict(old_committee),
        old_threshold=int(old_threshold), new_committee=tuple(sorted(new_committee, key=lambda m: m.index)),
        new_threshold=int(new_threshold), senders=tuple(int(x) for x in senders), issued_at_ms=issued,
        expires_at_ms=issued + int(ttl_ms),
    )
    return parse(plan.body())


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidPlan(f"The plan's {key} must be an integer from {lo} to {hi}.")
    return v


def _str(d: dict, key: str, pattern: re.Pattern | None = None, max_len: int = 256) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v or len(v) > max_len or (pattern is not None and not pattern.match(v)):
        raise InvalidPlan(f"The plan's {key} is missing or malformed.")
    return v


def _name(v) -> str:
    try:
        return names.check_name(v)
    except ValueError:
        raise InvalidPlan("The plan names an invalid node.") from None


def parse(body: bytes) -> CommitteePlan:
    """A checked plan from its canonical bytes (InvalidPlan on anything off,
    including bytes that are not exactly the canonical form)."""
    if not isinstance(body, (bytes, bytearray)) or not body or len(body) > MAX_BODY_BYTES:
        raise InvalidPlan("The plan is empty or too large.")
    try:
        d = json.loads(bytes(body).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidPlan("The plan is not canonical JSON.") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InvalidPlan(f"The plan is not a {FORMAT} document.")
    kind = _str(d, "kind")
    if kind not in KINDS:
        raise InvalidPlan(f"The plan's kind must be one of {', '.join(KINDS)}.")
    old_raw = d.get("old_committee")
    if not isinstance(old_raw, dict) or not old_raw:
        raise InvalidPlan("The plan's old committee must map node names to indices.")
    old = {}
    for name, index in old_raw.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= names.MAX_SHAREHOLDERS:
            raise InvalidPlan("The plan's old committee gives an index outside 1 to 255.")
        old[_name(name)] = index
    new_raw = d.get("new_committee")
    if not isinstance(new_raw, list) or not new_raw:
        raise InvalidPlan("The plan's new committee must list its members.")
    new = []
    for m in new_raw:
        if not isinstance(m, dict) or set(m) != {"name", "index", "address", "spki_sha256", "operator_key"}:
            raise InvalidPlan("Each new member names exactly its name, index, address, spki_sha256 and operator_key.")
        try:
            pki.load_public_key(_str(m, "operator_key", _HEX64))
        except ValueError:
            raise InvalidPlan("A new member's operator key is not an Ed25519 public key.") from None
        new.append(NewMember(_name(m.get("name")), _int(m, "index", 1, names.MAX_SHAREHOLDERS), _str(m, "address"),
                             _str(m, "spki_sha256", _HEX64), m["operator_key"]))
    for committee in (list(old.items()), [(m.name, m.index) for m in new]):
        if len({n for n, _ in committee}) != len(committee) or len({i for _, i in committee}) != len(committee):
            raise InvalidPlan("A committee of the plan names a node or an index twice.")
    k_old = _int(d, "old_threshold", 2, len(old))
    k_new = _int(d, "new_threshold", 2, len(new))
    if len(new) < 2 * k_new - 1:
        raise InvalidPlan("The new committee cannot renew the MAC keys at a refresh: it needs at least 2k - 1 nodes.")
    senders = d.get("senders")
    if not isinstance(senders, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in senders) \
            or len(senders) != k_old or len(set(senders)) != k_old or not set(senders) <= set(old.values()):
        raise InvalidPlan("The plan names exactly k_old distinct old indices as senders.")
    issued = _int(d, "issued_at_ms", 0, 2**62)
    expires = _int(d, "expires_at_ms", 0, 2**62)
    if not issued < expires <= issued + MAX_TTL_MS:
        raise InvalidPlan("The plan's validity window is invalid or longer than 7 days.")
    from_epoch = _int(d, "from_epoch", 1, 2**62)
    new_epoch = _int(d, "new_epoch", from_epoch + 1, 2**62)
    plan = CommitteePlan(
        audience=_str(d, "audience", _HEX64), nonce=_str(d, "nonce", re.compile(r"^[0-9a-f]{32}$")),
        session_id=_str(d, "session_id", names.SESSION_ID), kind=kind, from_epoch=from_epoch, new_epoch=new_epoch,
        old_committee=old, old_threshold=k_old, new_committee=tuple(sorted(new, key=lambda m: m.index)),
        new_threshold=k_new, senders=tuple(senders), issued_at_ms=issued, expires_at_ms=expires,
    )
    if plan.body() != bytes(body):
        raise InvalidPlan("The plan is not in canonical form (sorted keys, no spaces, members by index).")
    return plan


def check_window(plan: CommitteePlan, at_ms: int | None = None) -> None:
    now = now_ms() if at_ms is None else at_ms
    if plan.issued_at_ms > now + CLOCK_SKEW_MS:
        raise InvalidPlan("The plan is issued in the future.")
    if now >= plan.expires_at_ms:
        raise InvalidPlan("The plan has expired; propose and approve a new one.")


def sign(body: bytes, key: ed25519.Ed25519PrivateKey) -> bytes:
    """One operator's approval of the plan bytes."""
    return key.sign(SIGNATURE_CONTEXT + bytes(body))


def approved_by(body: bytes, approvals: Mapping[str, bytes], keys: Mapping[str, ed25519.Ed25519PublicKey]) -> set[str]:
    """The operators (by member name) whose signature over ``body`` verifies
    under the key ``keys`` holds for them; others are ignored."""
    good = set()
    for name, signature in approvals.items():
        key = keys.get(name)
        if key is None or not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
            continue
        try:
            key.verify(bytes(signature), SIGNATURE_CONTEXT + bytes(body))
        except InvalidSignature:
            continue
        good.add(name)
    return good


# --- the plan file (``vaultctl reshare propose / approve``) -------------------------------


def document(body: bytes, approvals: Mapping[str, bytes]) -> dict:
    """The plan file: the signed bytes verbatim, the plan decoded for reading, the approvals."""
    return {
        "format": FORMAT, "body": bytes(body).decode("ascii"), "plan": json.loads(body),
        "approvals": {name: bytes(sig).hex() for name, sig in sorted(approvals.items())},
    }


def from_document(data) -> tuple[bytes, dict[str, bytes]]:
    """(body, approvals) from a plan file's JSON; the body is re-checked."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("body"), str):
        raise InvalidPlan(f"The file is not a {FORMAT} plan.")
    body = data["body"].encode("ascii", "replace")
    parse(body)
    raw = data.get("approvals") or {}
    if not isinstance(raw, dict):
        raise InvalidPlan("The plan file's approvals must map operator names to signatures.")
    approvals = {}
    for name, sig in raw.items():
        try:
            approvals[_name(name)] = bytes.fromhex(sig)
        except (TypeError, ValueError):
            raise InvalidPlan(f"The approval of {name} is not a hex signature.") from None
    return body, approvals
