"""Shares: the validated type of one node's share, and the matcher's rejoin.

``Share`` is one shareholder's share of one extended template [s | t] with
the metadata that places it; ``KeyShare`` is one node's share of its epoch's
MAC key b (``vault.epoch_mac``). Both are frozen and validated when built, so
holding one means its fields are sane and its values are field elements:
nothing downstream checks them again. The wire messages they come from are
converted at the service edge (``vaultrpc.wire``); this module never sees
protobuf.

``make_records`` turns the n shares of one extended template into n Shares;
``join`` is the matcher's rejoin entry point: it checks that the shares
belong together, reconstructs [s | t] and the epoch's MAC key b from the same
nodes' shares, checks every tag t_l = <b_l, s>, falls back to other k-subsets
when a share is bad, and names the shareholders whose shares are
inconsistent (``off_polynomial``, the one place suspects are found).

``record_identity`` is the canonical byte string that binds a sealed record to
its place (AES-GCM associated data in ``vault.envelope``).

About wiping: ``wipe`` overwrites numpy buffers in place, and ``join`` wipes
every intermediate it creates. Python cannot promise that no other copy of a
secret remains: a share's ``values`` bytes are immutable, numpy and the
allocator may leave copies in freed memory, and the interpreter may copy
buffers behind our back. Wiping narrows the window; it is not a guarantee.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
_U32 = struct.Struct(">I")
_INDEX_EPOCH = struct.Struct(">IQ")
_KEY_DOMAIN = b"splitvault/mac-key/v1\x00"
# The fields every share given to join must agree on, in the order join names them.
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


@dataclass(frozen=True, eq=False)
class Share:
    """One shareholder's share of one template, with the metadata that places it.

    ``values`` are d + L field elements as little-endian uint32 bytes. Built
    only valid (InvalidShares otherwise): ids follow ``vault.names``,
    2 <= threshold <= shareholders <= 255, 1 <= index <= shareholders,
    0 < dimension <= the codec's limit, a supported codec version, L MACs,
    the right length and every value in [0, P).
    """

    tenant: str
    subject: str
    index: int
    epoch: int
    threshold: int
    shareholders: int
    dimension: int
    codec_version: int
    mac_count: int
    values: bytes
    request_id: str = ""

    def __post_init__(self) -> None:
        for name in ("index", "epoch", "threshold", "shareholders", "dimension", "codec_version", "mac_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidShares(f"The record's {name.replace('_', ' ')} must be an integer.")
        if not isinstance(self.values, bytes) or not isinstance(self.request_id, str):
            raise InvalidShares("A share's values must be bytes and its request id a string.")
        _name_bytes(self.tenant, "tenant")
        _name_bytes(self.subject, "subject")
        n, k = self.shareholders, self.threshold
        if not 2 <= k <= n <= sharing.MAX_SHAREHOLDERS:
            raise InvalidShares("The record's threshold and shareholder count are invalid (need 2 <= k <= n <= 255).")
        if not 1 <= self.index <= n:
            raise InvalidShares("The record's shareholder index must be between 1 and the shareholder count.")
        if not 0 <= self.epoch < 2**64:
            raise InvalidShares("The record's epoch is out of range.")
        if not 0 < self.dimension <= codec.MAX_DIMENSION:
            raise InvalidShares(f"The record's dimension must be between 1 and {codec.MAX_DIMENSION}.")
        if self.mac_count != MAC_COUNT:
            raise InvalidShares(f"The record's MAC count must be {MAC_COUNT}.")
        if self.codec_version not in SUPPORTED_CODEC_VERSIONS:
            raise InvalidShares("The record's codec version is not supported.")
        if len(self.values) != 4 * (self.dimension + self.mac_count):
            raise InvalidShares("The record's values have the wrong length for its dimension.")
        _check_range(self.values)


@dataclass(frozen=True, eq=False)
class KeyShare:
    """One node's share of its epoch's MAC key b, cut to ``dimension`` columns.

    ``values`` are L * dimension field elements (little-endian uint32 bytes).
    Built only valid (InvalidShares otherwise).
    """

    index: int
    epoch: int
    dimension: int
    values: bytes

    def __post_init__(self) -> None:
        for name in ("index", "epoch", "dimension"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidShares(f"A MAC key share's {name} must be an integer.")
        if not isinstance(self.values, bytes):
            raise InvalidShares("A MAC key share's values must be bytes.")
        if not 1 <= self.index <= sharing.MAX_SHAREHOLDERS or not 0 <= self.epoch < 2**64:
            raise InvalidShares("A MAC key share's index or epoch is out of range.")
        if not 0 < self.dimension <= codec.MAX_DIMENSION:
            raise InvalidShares(f"A MAC key share's dimension must be between 1 and {codec.MAX_DIMENSION}.")
        if len(self.values) != 4 * MAC_COUNT * self.dimension:
            raise InvalidShares("A MAC key share has the wrong length for its dimension.")
        _check_range(self.values)

    def fits(self, share: Share) -> bool:
        """Whether this is the key share of ``share``'s node, epoch and dimension."""
        return (self.index, self.epoch, self.dimension) == (share.index, share.epoch, share.dimension)


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
    index, epoch = int(index), int(epoch)
    if not 0 <= index < 2**32 or not 0 <= epoch < 2**64:
        raise InvalidShares("The record index or epoch is out of range.")
    return b"".join((_IDENTITY_DOMAIN, _U32.pack(len(t)), t, _U32.pack(len(s)), s, _INDEX_EPOCH.pack(index, epoch)))


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
) -> list[Share]:
    """The n Shares of ONE template; ``shares`` has shape (n, d + L)."""
    arr = np.asarray(shares)
    width = int(dimension) + MAC_COUNT
    if arr.ndim != 2 or arr.shape != (int(shareholders), width):
        raise InvalidShares("Shares must have shape (shareholders, dimension + mac_count).")
    return [
        Share(
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
        for i in range(int(shareholders))
    ]


def join(records: Sequence[Share], keys: Sequence[KeyShare]) -> JoinResult:
    """Rejoin one template from k or more of its Shares and their nodes' key shares.

    ``keys[j]`` is the MAC key share of the node that sent ``records[j]``
    (same index, epoch and dimension). All shares must agree on tenant,
    subject, epoch, threshold, shareholder count, dimension, codec version
    and MAC count, and come from distinct shareholders (InvalidShares
    otherwise). A node's record share and key share are rejoined as one
    vector [s | t | b], so a subset passes only if the tags hold for the key
    of the same nodes. The first k are rejoined and checked (every tag, no
    early exit); if that fails and more shares were given, other k-subsets
    are tried. Shares not on the polynomial of the subset that passes are
    reported as ``suspects``. If no subset passes: IntegrityError.
    """
    recs, keys = list(records), list(keys)
    if not recs:
        raise InvalidShares("No share records were given.")
    if len(keys) != len(recs):
        raise InvalidShares("Every share record needs its node's MAC key share.")
    if not all(isinstance(r, Share) for r in recs) or not all(isinstance(k, KeyShare) for k in keys):
        raise InvalidShares("join takes record.Share and record.KeyShare values (vaultrpc.wire builds them).")
    first = recs[0]
    for name in _AGREEING_FIELDS:
        if any(getattr(rec, name) != getattr(first, name) for rec in recs[1:]):
            raise InvalidShares(f"The share records disagree on the {name.replace('_', ' ')}.")
    xs = [int(rec.index) for rec in recs]
    if len(set(xs)) != len(xs):
        raise InvalidShares("The share records must come from distinct shareholders.")
    k = int(first.threshold)
    if len(recs) < k:
        raise InvalidShares("Fewer share records than the threshold were given.")
    if not all(key.fits(rec) for rec, key in zip(recs, keys)):
        raise InvalidShares("A MAC key share does not belong to its record's node, epoch or dimension.")
    d = int(first.dimension)
    ys = _stack(recs, keys)
    scratch: list[np.ndarray] = [ys]
    try:
        found = _find_consistent_subset(xs, ys, k, d, scratch)
        if found is None:
            raise IntegrityError("The share records do not rejoin to a consistent template.")
        used, extended = found
        others = [j for j in range(len(xs)) if j not in used]
        suspects = _off_polynomial([xs[j] for j in used], ys[list(used)], [xs[j] for j in others], ys[others], scratch)
        template = codec.from_field(extended[0, :d])
        return JoinResult(
            template=template,
            used=tuple(xs[j] for j in used),
            suspects=tuple(sorted(suspects)),
            epoch=int(first.epoch),
        )
    finally:
        wipe(*scratch)


def off_polynomial(used: Sequence[tuple[Share, KeyShare]], others: Sequence[tuple[Share, KeyShare]]) -> tuple[int, ...]:
    """Indices of the ``others`` (share, key share) pairs not on the polynomial through ``used``.

    ``used`` are the k pairs that rejoined and passed the MAC check; with them
    known good, any other node's pair is where the polynomial says or it is a
    lie. ``join`` names its own suspects this way; the matcher calls it for
    shares that arrived after the decision.
    """
    if not used or not others:
        return ()
    scratch: list[np.ndarray] = []
    try:
        ys_used = _stack([s for s, _ in used], [k for _, k in used])
        ys_other = _stack([s for s, _ in others], [k for _, k in others])
        scratch += [ys_used, ys_other]
        return tuple(_off_polynomial([int(s.index) for s, _ in used], ys_used,
                                     [int(s.index) for s, _ in others], ys_other, scratch))
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


def _check_range(values: bytes) -> None:
    # Every little-endian uint32 of values is a field element (a read-only
    # view of the immutable bytes: no copy to wipe).
    view = np.frombuffer(values, dtype="<u4")
    if view.size and view.max() >= P:
        raise InvalidShares("Share values contain values outside the field.")


def _stack(recs: Sequence[Share], keys: Sequence[KeyShare]) -> np.ndarray:
    # Each node's [s | t | b] as one row: shape (len(recs), 1, d + L + L d),
    # FIELD_DTYPE; the caller wipes it. Shares of one dimension (join checked).
    d = int(recs[0].dimension)
    width = d + MAC_COUNT
    ys = np.empty((len(recs), 1, width + MAC_COUNT * d), dtype=FIELD_DTYPE)
    for j, (rec, key) in enumerate(zip(recs, keys)):
        ys[j, 0, :width] = np.frombuffer(rec.values, dtype="<u4")
        ys[j, 0, width:] = np.frombuffer(key.values, dtype="<u4")
    return ys


def _off_polynomial(xs_used: list[int], ys_used: np.ndarray, xs_other: list[int], ys_other: np.ndarray,
                    scratch: list[np.ndarray]) -> list[int]:
    # The x of each other row that differs from the polynomial through the used rows.
    off = []
    for x, y in zip(xs_other, ys_other):
        # Where shareholder x's share should be, given the good subset.
        expected = sharing.interpolate_at(xs_used, ys_used, x)
        scratch.append(expected)
        if not np.array_equal(expected, y):
            off.append(x)
    return off


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
    # k shares first) whose rejoined vector passes the MAC check, and that
    # vector; None if no subset passes within MAX_SUBSET_TRIALS.
    for trial, subset in enumerate(itertools.combinations(range(len(xs)), k)):
        if trial >= MAX_SUBSET_TRIALS:
            break
        if subset[-1] == k - 1:
            chosen = ys[:k]  # the first k shares: a view of ys, which is wiped anyway
        else:
            chosen = ys[list(subset)]
            scratch.append(chosen)
        extended = sharing.reconstruct([xs[j] for j in subset], chosen)
        scratch.append(extended)
        if _passes(extended, d):
            return subset, extended
    return None


def _name_bytes(value: str, what: str) -> bytes:
    try:
        return names.check_id_bytes(value, what)
    except InvalidName as exc:
        raise InvalidShares(str(exc)) from None
