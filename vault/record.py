"""Share records: the bridge between the sharing math and ``ShareRecord``.

``make_records`` turns the n shares of one extended template into n
``splitvault.v1.ShareRecord`` messages; ``join`` is the matcher's rejoin entry
point: it checks that the records belong together, reconstructs the record
[s | t] and the epoch's MAC key b from the same nodes' shares, checks every
tag t_l = <b_l, s> (``vault.epoch_mac``), falls back to other k-subsets when
a share is bad, and names the shareholders whose shares are inconsistent.

``record_identity`` is the canonical byte string that binds a sealed record to
its place (AES-GCM associated data in ``vault.envelope``).

About wiping: ``wipe`` overwrites numpy buffers in place, and ``join`` wipes
every intermediate it creates. Python cannot promise that no other copy of a
secret remains: the protobuf ``values`` bytes are immutable, numpy and the
allocator may leave copies in freed memory, and the interpreter may copy
buffers behind our back. Wiping narrows the window; it is not a guarantee.
"""

from __future__ import annotations

import itertools
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitvault.v1 import common_pb2
from vault import codec, epoch_mac, names, sharing
from vault.errors import IntegrityError, InvalidName, InvalidShares
from vault.field import FIELD_DTYPE, P

# Codec versions this code can rejoin.
SUPPORTED_CODEC_VERSIONS = frozenset({codec.CODEC_VERSION})
# Tags per record: t_l = <b_l, s> for the epoch's key b (vault.epoch_mac).
MAC_COUNT = epoch_mac.TAG_COUNT
# Most k-subsets join() tries when shares are inconsistent; each try costs a
# reconstruction and a MAC check and multiplies the forgery bound by one.
MAX_SUBSET_TRIALS = 1024
# Domain separation for record_identity.
_IDENTITY_DOMAIN = b"splitvault/record/v1\x00"
_KEY_DOMAIN = b"splitvault/mac-key/v1\x00"
# The fields every record given to join must agree on, in the order join names them.
_AGREEING_FIELDS = (
    "tenant",
    "subject",
    "epoch",
    "threshold",
    "shareholders",
    "dimension",
    "codec_version",
    "mac_count",
)
_agreeing_fields = operator.attrgetter(*_AGREEING_FIELDS)


@dataclass(frozen=True, eq=False)
class JoinResult:
    """A rejoined template and how it was obtained.

    ``template`` is the int8 code (d,) — the caller must ``wipe`` it when done.
    ``used`` are the shareholder indices whose shares rebuilt it; ``suspects``
    the indices whose shares are not on the same polynomial (for the audit log,
    never for the PSP).
    """

    template: np.ndarray
    used: tuple[int, ...]
    suspects: tuple[int, ...]
    epoch: int


def pack_values(values: np.ndarray) -> bytes:
    """Field elements (1-D) as little-endian uint32 bytes."""
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidShares("Share values must be a 1-D integer array.")
    if arr.size and ((arr.dtype.kind == "i" and arr.min() < 0) or arr.max() >= P):
        raise InvalidShares("Share values contain values outside the field.")
    return arr.astype("<u4").tobytes()


def unpack_values(data: bytes, count: int) -> np.ndarray:
    """Little-endian uint32 bytes as a writable 1-D array of ``count`` field elements."""
    if len(data) != 4 * count:
        raise InvalidShares("Share values have the wrong length for the record's dimension.")
    # frombuffer views the immutable bytes; astype makes a writable (wipeable) copy.
    arr = np.frombuffer(data, dtype="<u4").astype(FIELD_DTYPE)
    if arr.size and arr.max() >= P:
        arr.fill(0)
        raise InvalidShares("Share values contain values outside the field.")
    return arr


def record_identity(tenant: str, subject: str, index: int, epoch: int) -> bytes:
    """Canonical bytes naming a record's place: domain || len|tenant || len|subject || index || epoch.

    Strings are UTF-8 with a 4-byte big-endian length prefix; index is a
    4-byte and epoch an 8-byte big-endian unsigned integer. Unambiguous: no
    two different tuples give the same bytes.
    """
    t = _name_bytes(tenant, "tenant")
    s = _name_bytes(subject, "subject")
    if not 0 <= int(index) < 2**32 or not 0 <= int(epoch) < 2**64:
        raise InvalidShares("The record index or epoch is out of range.")
    return b"".join(
        [
            _IDENTITY_DOMAIN,
            struct.pack(">I", len(t)),
            t,
            struct.pack(">I", len(s)),
            s,
            struct.pack(">IQ", int(index), int(epoch)),
        ]
    )


def key_identity(cluster: str, node: str, index: int, epoch: int) -> bytes:
    """Canonical bytes naming a node's MAC key share: the sealed key's associated data.

    domain || len|cluster || len|node || index || epoch, as ``record_identity``.
    """
    c = cluster.encode("utf-8")
    n = node.encode("utf-8")
    if not 0 <= int(index) < 2**32 or not 0 <= int(epoch) < 2**64:
        raise InvalidShares("The key's index or epoch is out of range.")
    return b"".join([_KEY_DOMAIN, struct.pack(">I", len(c)), c, struct.pack(">I", len(n)), n,
                     struct.pack(">IQ", int(index), int(epoch))])


def make_records(
    *,
    tenant: str,
    subject: str,
    epoch: int,
    threshold: int,
    shareholders: int,
    dimension: int,
    request_id: str,
    shares: np.ndarray,
) -> list[common_pb2.ShareRecord]:
    """The n ShareRecords of ONE template; ``shares`` has shape (n, d + L)."""
    arr = np.asarray(shares)
    width = int(dimension) + MAC_COUNT
    if arr.ndim != 2 or arr.shape != (int(shareholders), width):
        raise InvalidShares("Shares must have shape (shareholders, dimension + mac_count).")
    records = []
    for i in range(int(shareholders)):
        rec = common_pb2.ShareRecord(
            tenant=tenant,
            subject=subject,
            index=i + 1,
            epoch=int(epoch),
            threshold=int(threshold),
            shareholders=int(shareholders),
            dimension=int(dimension),
            codec_version=codec.CODEC_VERSION,
            mac_count=MAC_COUNT,
            values=pack_values(arr[i]),
            request_id=request_id,
        )
        _validate_metadata(rec)
        records.append(rec)
    return records


def validate_record(rec: common_pb2.ShareRecord) -> None:
    """Raise InvalidShares unless the record's fields are sane (values included)."""
    _validate_metadata(rec)  # includes the values' length
    _field_view(rec)


def join(records: Sequence[common_pb2.ShareRecord], keys: Sequence[common_pb2.MacKeyShare]) -> JoinResult:
    """Rejoin one template from k or more of its share records and their nodes' key shares.

    ``keys[j]`` is the MAC key share of the node that sent ``records[j]``
    (same index and epoch, cut to the record's dimension). All records must
    agree on tenant, subject, epoch, threshold, shareholder count, dimension,
    codec version and MAC count, and come from distinct shareholders
    (InvalidShares otherwise). A node's record share and key share are
    rejoined as one vector [s | t | b], so a subset passes only if the tags
    hold for the key of the same nodes. The first k are rejoined and checked
    (every tag, no early exit); if that fails and more records were given,
    other k-subsets are tried. Records not on the polynomial of the subset
    that passes are reported as ``suspects``. If no subset passes:
    IntegrityError.
    """
    recs = list(records)
    if not recs:
        raise InvalidShares("No share records were given.")
    keys = list(keys)
    if len(keys) != len(recs):
        raise InvalidShares("Every share record needs its node's MAC key share.")
    for rec in recs:
        _validate_metadata(rec)
    first = recs[0]
    # One tuple comparison per record; on a mismatch, name the first field
    # (in _AGREEING_FIELDS order) that any record disagrees on.
    first_fields = _agreeing_fields(first)
    if any(_agreeing_fields(rec) != first_fields for rec in recs[1:]):
        for name in _AGREEING_FIELDS:
            if any(getattr(rec, name) != getattr(first, name) for rec in recs[1:]):
                raise InvalidShares(f"The share records disagree on the {name.replace('_', ' ')}.")
    xs = [int(rec.index) for rec in recs]
    if len(set(xs)) != len(xs):
        raise InvalidShares("The share records must come from distinct shareholders.")
    k = int(first.threshold)
    if len(recs) < k:
        raise InvalidShares("Fewer share records than the threshold were given.")
    d = int(first.dimension)
    for rec, key in zip(recs, keys):
        _validate_key(key, rec)
    width = d + MAC_COUNT
    ys = np.empty((len(recs), 1, width + MAC_COUNT * d), dtype=FIELD_DTYPE)
    scratch: list[np.ndarray] = [ys]
    try:
        for j, (rec, key) in enumerate(zip(recs, keys)):
            # As unpack_values, with the range checked once for all records
            # below (_validate_metadata and _validate_key checked every length).
            values = np.frombuffer(rec.values, dtype="<u4").astype(FIELD_DTYPE)
            ys[j, 0, :width] = values
            wipe(values)
            values = np.frombuffer(key.values, dtype="<u4").astype(FIELD_DTYPE)
            ys[j, 0, width:] = values
            wipe(values)
        if ys.max() >= P:
            raise InvalidShares("Share values contain values outside the field.")
        # From here on xs are distinct ints in [1, 255] and ys field elements:
        # the sharing and integrity helpers that skip re-validation are safe.
        found = _find_consistent_subset(xs, ys, k, d, scratch)
        if found is None:
            raise IntegrityError("The share records do not rejoin to a consistent template.")
        used, extended = found
        used_xs = tuple(xs[j] for j in used)
        used_ys = ys[list(used)]
        scratch.append(used_ys)
        suspects = []
        for j, x in enumerate(xs):
            if j in used:
                continue
            # Where shareholder x's share should be, given the good subset.
            expected = sharing._interpolate_valid(used_xs, used_ys, x)
            scratch.append(expected)
            if not np.array_equal(expected, ys[j]):
                suspects.append(x)
        # extended is FIELD_DTYPE in [0, P) (sharing._combine's output).
        template = codec._from_canonical(extended[0, :d])
        return JoinResult(
            template=template,
            used=used_xs,
            suspects=tuple(sorted(suspects)),
            epoch=int(first.epoch),
        )
    finally:
        wipe(*scratch)


def wipe(*arrays: np.ndarray | None) -> None:
    """Overwrite numpy buffers in place with zeros (None is skipped).

    Best effort only: it cannot reach copies Python or numpy made elsewhere,
    nor read-only views of immutable bytes (those are skipped).
    """
    for arr in arrays:
        if arr is None:
            continue
        if not isinstance(arr, np.ndarray):
            raise TypeError("wipe() takes numpy arrays.")
        if arr.flags.writeable:
            arr.fill(0)


# --- private helpers ----------------------------------------------------------


def _field_view(rec: common_pb2.ShareRecord) -> np.ndarray:
    # A read-only view of the record's values (their length already checked
    # by _validate_metadata), refused unless every value is a field element.
    # No copy of the share is made, so there is none to wipe.
    view = np.frombuffer(rec.values, dtype="<u4")
    if view.size and view.max() >= P:
        raise InvalidShares("Share values contain values outside the field.")
    return view


def _passes(extended: np.ndarray, d: int) -> bool:
    # Every tag of the rejoined [s | t | b] holds (all L compared, no early exit).
    # Copies (never views: they are wiped here, the rejoined vector is not).
    ext = np.array(extended[:, : d + MAC_COUNT], dtype=FIELD_DTYPE, order="C", copy=True)
    key = np.array(extended[0, d + MAC_COUNT :].reshape(MAC_COUNT, d), dtype=FIELD_DTYPE, order="C", copy=True)
    try:
        return bool(epoch_mac.check(ext, key).all())
    finally:
        wipe(ext, key)


def _find_consistent_subset(
    xs: list[int], ys: np.ndarray, k: int, d: int, scratch: list[np.ndarray]
) -> tuple[tuple[int, ...], np.ndarray] | None:
    # The positions of the first k-subset (in combinations order, so the first
    # k records first) whose rejoined vector passes the MAC check, and that
    # vector; None if no subset passes within MAX_SUBSET_TRIALS.
    # ys and xs are validated by join, so the unchecked helpers are used.
    for trial, subset in enumerate(itertools.combinations(range(len(xs)), k)):
        if trial >= MAX_SUBSET_TRIALS:
            break
        if subset[-1] == k - 1:
            chosen = ys[:k]  # the first k records: a view, nothing to copy
        else:
            chosen = ys[list(subset)]
            scratch.append(chosen)
        extended = sharing._reconstruct_valid(tuple(xs[j] for j in subset), chosen)
        scratch.append(extended)
        if _passes(extended, d):
            return subset, extended
    return None


def _name_bytes(value: str, what: str) -> bytes:
    try:
        return names.check_id_bytes(value, what)
    except InvalidName as exc:
        raise InvalidShares(str(exc)) from None


def _validate_metadata(rec: common_pb2.ShareRecord) -> None:
    # Every field except the range of the values themselves.
    if not isinstance(rec, common_pb2.ShareRecord):
        raise InvalidShares("A share record must be a ShareRecord message.")
    _name_bytes(rec.tenant, "tenant")
    _name_bytes(rec.subject, "subject")
    n, k = rec.shareholders, rec.threshold
    if not 2 <= k <= n <= sharing.MAX_SHAREHOLDERS:
        raise InvalidShares("The record's threshold and shareholder count are invalid (need 2 <= k <= n <= 255).")
    if not 1 <= rec.index <= n:
        raise InvalidShares("The record's shareholder index must be between 1 and the shareholder count.")
    if not 0 < rec.dimension <= codec.MAX_DIMENSION:
        raise InvalidShares(f"The record's dimension must be between 1 and {codec.MAX_DIMENSION}.")
    if rec.mac_count != MAC_COUNT:
        raise InvalidShares(f"The record's MAC count must be {MAC_COUNT}.")
    if rec.codec_version not in SUPPORTED_CODEC_VERSIONS:
        raise InvalidShares("The record's codec version is not supported.")
    if len(rec.values) != 4 * (rec.dimension + rec.mac_count):
        raise InvalidShares("The record's values have the wrong length for its dimension.")


def _validate_key(key: common_pb2.MacKeyShare, rec: common_pb2.ShareRecord) -> None:
    # A MAC key share that belongs to this record's node and epoch, of L x d values.
    if not isinstance(key, common_pb2.MacKeyShare):
        raise InvalidShares("A MAC key share must be a MacKeyShare message.")
    if key.index != rec.index or key.epoch != rec.epoch or key.dimension != rec.dimension:
        raise InvalidShares("A MAC key share does not belong to its record's node, epoch or dimension.")
    if len(key.values) != 4 * MAC_COUNT * rec.dimension:
        raise InvalidShares("A MAC key share has the wrong length for its dimension.")
