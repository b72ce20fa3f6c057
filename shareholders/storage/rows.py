"""The typed rows the storage layer reads and writes (no positional tuples)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from splitvault.v1 import common_pb2
from vault.envelope import SealedShare

# A new node starts in epoch 1; a proactive refresh moves it on.
FIRST_EPOCH = 1
# A maintenance session in one of these states no longer holds the node's lock.
CLOSED_STATES = ("finalized", "aborted")

SHARE_COLUMNS = (
    "tenant, subject, epoch, idx, threshold, n, dimension, codec_version, mac_count, "
    "request_id, kek_version, wrapped_dk, nonce, ciphertext, stored_ms, grp"
)


@dataclass(frozen=True)
class ShareRow:
    """One stored record: its metadata and the sealed share."""

    tenant: str
    subject: str
    epoch: int
    index: int
    threshold: int
    shareholders: int
    dimension: int
    codec_version: int
    mac_count: int
    request_id: str
    kek_version: int
    wrapped_dk: bytes
    nonce: bytes
    ciphertext: bytes
    stored_ms: int
    group: str = ""  # the gallery group the provider signed at enrolment ('' = none)

    @classmethod
    def from_db(cls, r) -> "ShareRow":
        # Built without the frozen dataclass's __init__ (one object.__setattr__
        # per field, a third of a row's read cost in a refresh's scans): the
        # values are the store's own, in SHARE_COLUMNS order.
        row = object.__new__(cls)
        row = object.__new__(cls)
        d = row.__dict__
        (d["tenant"], d["subject"], d["epoch"], d["index"], d["threshold"], d["shareholders"], d["dimension"],
         d["codec_version"], d["mac_count"], d["request_id"], d["kek_version"]) = r[:11]
        d["wrapped_dk"], d["nonce"], d["ciphertext"] = bytes(r[11]), bytes(r[12]), bytes(r[13])
        d["stored_ms"], d["group"] = r[14], r[15]
        return row

    @classmethod
    def of(cls, values: tuple) -> "ShareRow":
        """``ShareRow(*values)`` for all 16 values already of the right types,
        in SHARE_COLUMNS order (a bulk path's new rows): the same fast build
        as ``from_db``, at half the frozen ``__init__``'s cost."""
        row = object.__new__(cls)
        d = row.__dict__
        (d["tenant"], d["subject"], d["epoch"], d["index"], d["threshold"], d["shareholders"], d["dimension"],
         d["codec_version"], d["mac_count"], d["request_id"], d["kek_version"], d["wrapped_dk"], d["nonce"],
         d["ciphertext"], d["stored_ms"], d["group"]) = values
        return row
        return row

    def as_params(self) -> tuple:
        """The values in SHARE_COLUMNS order."""
        return (self.tenant, self.subject, self.epoch, self.index, self.threshold, self.shareholders,
                self.dimension, self.codec_version, self.mac_count, self.request_id, self.kek_version,
                self.wrapped_dk, self.nonce, self.ciphertext, self.stored_ms, self.group)

    @property
    def key(self) -> tuple[str, str]:
        return self.tenant, self.subject

    @property
    def sealed(self) -> SealedShare:
        return SealedShare(self.kek_version, self.wrapped_dk, self.nonce, self.ciphertext)

    def info(self) -> common_pb2.RecordInfo:
        return common_pb2.RecordInfo(
            tenant=self.tenant, subject=self.subject, index=self.index, epoch=self.epoch,
            threshold=self.threshold, shareholders=self.shareholders, dimension=self.dimension,
            codec_version=self.codec_version, request_id=self.request_id, kek_version=self.kek_version,
        )

    def record(self, values: bytes) -> common_pb2.ShareRecord:
        return common_pb2.ShareRecord(
            tenant=self.tenant, subject=self.subject, index=self.index, epoch=self.epoch,
            threshold=self.threshold, shareholders=self.shareholders, dimension=self.dimension,
            codec_version=self.codec_version, mac_count=self.mac_count, values=values,
            request_id=self.request_id,
        )


_SHARE_FIELDS = tuple(f.name for f in fields(ShareRow))


@dataclass(frozen=True)
class RecordKey:
    """A record's key and shape, without its share (a session's key listing)."""

    tenant: str
    subject: str
    threshold: int
    dimension: int
    mac_count: int


@dataclass(frozen=True)
class NodeState:
    name: str
    index: int
    current_epoch: int
    committee: dict


@dataclass(frozen=True)
class MaintenanceSession:
    """One maintenance session of any kind (kek_rotate, refresh, reshare,
    keygen); while its state is not closed it holds the node's lock.

    ``plan`` is the stored JSON object as a dict; ``shareholders.epochs``
    gives refresh and reshare sessions its typed ``Plan`` in its place
    (``dataclasses.replace``). ``sealed_seed`` is the session's dealing seed
    under the node's KEK, None once the session closed."""

    session_id: str
    kind: str
    state: str
    from_epoch: int
    new_epoch: int
    plan: Any
    sealed_seed: SealedShare | None
    skipped: int
    actor: str
    started_ms: int
    updated_ms: int

    @property
    def open(self) -> bool:
        return self.state not in CLOSED_STATES


class SessionBusy(RuntimeError):
    """Another maintenance session holds the node's lock."""

    def __init__(self, session: MaintenanceSession):
        super().__init__(
            f"The node has an open {session.kind} session {session.session_id!r} (started by {session.actor}, "
            f"state {session.state}); finish it by rerunning with that session id, or abort it, first."
        )
        self.session = session


@dataclass(frozen=True)
class MacKeyRow:
    """This node's sealed share of one epoch's MAC key."""

    epoch: int
    threshold: int
    width: int
    session_id: str
    kek_version: int
    wrapped_dk: bytes
    nonce: bytes
    ciphertext: bytes

    @property
    def sealed(self) -> SealedShare:
        return SealedShare(self.kek_version, self.wrapped_dk, self.nonce, self.ciphertext)


@dataclass(frozen=True)
class CheckBatch:
    """A sealed batch of a refresh's check values (or a reshare check mask):
    its place (first key, width), its exact keys and the new rows' fingerprints."""

    session_id: str
    first_tenant: str
    first_subject: str
    width: int
    keys_json: str
    fingerprints: bytes
    sealed: SealedShare
