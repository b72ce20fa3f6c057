"""The math of proactive refresh and resharing (pure: no I/O).

Both operations are linear maps on the sharing, so the extended vector
[template | MAC keys | MAC tags] is unchanged and the MACs stay valid
(``vault.integrity``). Nothing here ever rejoins a template.

**Refresh** (Herzberg, Jarecki, Krawczyk and Yung, CRYPTO 1995). Every node i
deals, for every record, a random sharing of ZERO of degree k - 1,

    delta_i(X) = c_1 X + c_2 X^2 + ... + c_{k-1} X^{k-1}      (mod P)

(one independent polynomial per element of the d + 2L vector), and node j's
new share is  y_j' = y_j + sum_i delta_i(j).  The new shares lie on
f(X) + sum_i delta_i(X), which has the same value at 0: the same secret.
Shares of the old epoch and of the new one lie on different polynomials, so
a mix of them rejoins to garbage (which the MACs reject).

**Resharing** (Desmedt and Jajodia 1997; Wong, Wang and Wing 2002). k old
shareholders S each re-share their own share y_i with a fresh polynomial of
the NEW degree k' - 1,  g_i(X) = y_i + c_1 X + ... + c_{k'-1} X^{k'-1},
and new member j' keeps

    y'_{j'} = sum_{i in S} lambda_i^S * g_i(j')                (mod P)

where lambda_i^S are the Lagrange coefficients at 0 over S. Then
y'_{j'} = G(j') with G = sum lambda_i g_i, of degree k' - 1 and
G(0) = sum lambda_i y_i = f(0): a fresh (k', n') sharing of the same vector.

**Deterministic dealing.** A node draws its polynomial coefficients from a
per-session secret seed (32 bytes from ``vault.rng``, sealed at rest by the
node and destroyed when the session ends) expanded with AES-256 in counter
mode, one stream per record label: an AES-CTR DRBG keyed from the OS
CSPRNG. Asking again for the same record gives the same polynomial, so a
receiver that crashed half-way simply asks again: no staging of deltas, and
no way for a retry to mix two different dealings of one record.

**The check** (``vaultctl refresh --check``). For a public random challenge,
node j reports  v_j = sum_{r,m} c_{r,m} (y'_{r,m}(j) - y_{r,m}(j)) + rho(j)
with public coefficients c_{r,m} = alpha_r beta^m from the challenge and rho
a joint sharing of zero of degree k - 1 (every node deals one more zero
polynomial for the check). If every record was refreshed correctly the n
values lie on a polynomial of degree <= k - 1 that is 0 at 0; any wrong
element survives one challenge with probability at most w/P (about 2.4e-7
for d = 512), and independent challenges multiply.

What the check reveals, however it is called. For one answered challenge
the n values are  L(diff(j)) + rho(j); rho is a uniformly random zero
polynomial as long as one dealer's seed is secret, so the n values are a
uniformly random point of the space of zero polynomials of degree k - 1:
nothing about the deltas. That holds for a *set* of answers only if no two
answers share a mask: two answers with the same rho and different
coefficient sets (say, the same challenge over record sets that differ by
one record) subtract to  alpha_r e_r(beta)(j)  -- a linear function of one
record's delta; ~33 such pairs give the whole delta. So the masks here are
bound to the whole *check context* (``check_context``): the session, k, the
set of records covered (its digest) and the full list of mixed challenges,
and the node that answers refuses any challenge it has answered before in
the session (shareholders.epochs keeps them in its audit log). Any two
answers a node gives therefore carry independent masks, and every answer
set an auditor collects is uniform and independent of the templates.

Each node computes its answer from the new-minus-old values it kept,
sealed, when it prepared each batch (shareholders.epochs): the challenge
is drawn after every node finished preparing, so no dealer knew it when it
dealt, and the check stays a test of every record (no sampling).

The challenges a node uses are *mixed* (``mixed_challenges``): the
auditor's 16-byte challenges hashed with every node's contribution
(``check_contribution``, a PRF of the node's secret seed and the auditor's
challenges), so the auditor alone does not choose the coefficients, and a
node's contribution is fixed by a seed it drew before any dealing.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vault import field, integrity, rng, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

SEED_BYTES = 32
# Domain separation of the streams one seed feeds.
REFRESH_DOMAIN = b"splitvault/refresh/v1\x00"
RESHARE_DOMAIN = b"splitvault/reshare/v1\x00"
MASK_DOMAIN = b"splitvault/refresh-check-mask/v1\x00"
CHALLENGE_DOMAIN = b"splitvault/refresh-check/v1\x00"
CONTEXT_DOMAIN = b"splitvault/refresh-check-context/v1\x00"
CONTRIBUTION_DOMAIN = b"splitvault/refresh-check-contribution/v1\x00"
KEY_HASH_DOMAIN = b"splitvault/refresh-check-keys/v1\x00"
CHALLENGE_BYTES = 16
_NONCE_BYTES = 12
_MASK31 = np.uint32(0x7FFFFFFF)
_U32 = struct.Struct(">I")


def new_seed() -> bytes:
    """A fresh session seed from the randomness seam (the OS CSPRNG)."""
    seed = rng.RANDOM_BYTES(SEED_BYTES)
    if len(seed) != SEED_BYTES:
        raise RuntimeError("The random source returned the wrong number of bytes.")
    return seed


def record_label(domain: bytes, tenant: str, subject: str, *params: int) -> bytes:
    """Canonical label of one record's stream: domain || lp(tenant) || lp(subject) || u32 params."""
    return record_labels(domain, ((tenant, subject),), *params)[0]


def record_labels(domain: bytes, keys: Sequence[tuple[str, str]], *params: int) -> list[bytes]:
    """``record_label(domain, tenant, subject, *params)`` of every key, in order
    (the shared tail packed once: a fifth of the per-key cost in a refresh)."""
    tail = struct.pack(f">{len(params)}I", *params)
    pack = _U32.pack
    out = []
    for tenant, subject in keys:
        t, s = tenant.encode("utf-8"), subject.encode("utf-8")
        out.append(b"".join((domain, pack(len(t)), t, pack(len(s)), s, tail)))
    return out


def derive_field(seed: bytes, labels: Sequence[bytes], count: int) -> np.ndarray:
    """``count`` uniform field elements per label, deterministic in (seed, label): (B, count).

    Stream of a label: AES-256-CTR under ``seed`` with the 16-byte counter
    block  SHA-256(label)[:12] || u32 counter  (counter from 0), read as
    little-endian uint32, masked to 31 bits, the value P skipped (so the
    elements are exactly uniform on [0, P)). All labels of a batch are
    encrypted in one AES-ECB call over their counter blocks.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError("A session seed is 32 bytes.")
    batch = len(labels)
    if count <= 0 or batch == 0:
        return np.zeros((batch, max(count, 0)), dtype=FIELD_DTYPE)
    nblocks = -(-count // 4)  # 4 elements per 16-byte block
    sha256 = hashlib.sha256
    nonces = np.frombuffer(
        b"".join([sha256(label).digest()[:_NONCE_BYTES] for label in labels]), dtype=np.uint32
    ).reshape(batch, 1, _NONCE_BYTES // 4)
    # The counter blocks as 32-bit words (the same bytes, written four at a
    # time): nonce words, then the big-endian block counter.
    blocks = np.empty((batch, nblocks, 4), dtype=np.uint32)
    blocks[:, :, : _NONCE_BYTES // 4] = nonces
    blocks[:, :, 3] = np.arange(nblocks, dtype=">u4").view(np.uint32)
    encryptor = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    stream = encryptor.update(memoryview(blocks).cast("B")) + encryptor.finalize()
    values = np.bitwise_and(
        np.frombuffer(stream, dtype="<u4").reshape(batch, nblocks * 4)[:, :count], _MASK31, dtype=FIELD_DTYPE
    )
    for row in np.flatnonzero((values == P).any(axis=1)):
        # Rare (2**-31 per element): redo this row with the same stream, skipping P.
        values[row] = _derive_row_slow(seed, labels[row], count)
    return values


def _derive_row_slow(seed: bytes, label: bytes, count: int) -> np.ndarray:
    # One label's stream, read until ``count`` values other than P were found.
    nonce = hashlib.sha256(label).digest()[:_NONCE_BYTES] + bytes(4)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()
    out: list[np.ndarray] = []
    have = 0
    while have < count:
        chunk = np.frombuffer(encryptor.update(bytes(4 * count)), dtype="<u4").astype(FIELD_DTYPE) & _MASK31
        chunk = chunk[chunk != P]
        out.append(chunk)
        have += chunk.size
    return np.concatenate(out)[:count]


def _coefficients(seed: bytes, labels: Sequence[bytes], degree: int, width: int) -> np.ndarray:
    # (degree, B, width): c_1 .. c_degree of every element of every record.
    flat = derive_field(seed, labels, degree * width)
    return np.ascontiguousarray(flat.reshape(len(labels), degree, width).transpose(1, 0, 2))


def evaluate_at(coeffs: np.ndarray, constant: np.ndarray | None, x: int) -> np.ndarray:
    """constant + c_1 x + ... + c_t x^t for coefficients (t, B, w), at 1 <= x <= 255: (B, w)."""
    degree, batch, width = coeffs.shape
    if not 1 <= int(x) <= sharing.MAX_SHAREHOLDERS:
        raise InvalidShares("Shares are evaluated at x-coordinates 1 to 255.")
    const = None if constant is None else np.asarray(constant, dtype=FIELD_DTYPE).reshape(-1)
    if degree == 0:
        return np.zeros((batch, width), dtype=FIELD_DTYPE) if const is None else const.reshape(batch, width).copy()
    flat_c = coeffs.reshape(degree, -1)
    total = batch * width
    out = np.empty(total, dtype=FIELD_DTYPE)
    acc = np.empty(min(total, sharing.CHUNK_ELEMENTS), dtype=np.uint64)
    # In cache-sized chunks, as vault.sharing.split does; a zero-sharing (no
    # constant) skips the constant term.
    for start in range(0, total, sharing.CHUNK_ELEMENTS):
        stop = min(start + sharing.CHUNK_ELEMENTS, total)
        sharing._evaluate(flat_c[:, start:stop], 0 if const is None else const[start:stop], int(x),
                          acc[: stop - start], out[start:stop])
    acc.fill(0)
    return out.reshape(batch, width)


def refresh_coefficients(seed: bytes, keys: Sequence[tuple[str, str]], threshold: int, width: int) -> np.ndarray:
    """This dealer's zero-sharing polynomials for each record key: coefficients
    c_1 .. c_{k-1} of every element, (k - 1, B, width).

    One polynomial of degree k - 1 per element; the label binds the record, k
    and the width so that two receivers can never be handed different
    polynomials for one record. ``evaluate_at(coeffs, None, x)`` gives a
    receiver's deltas; the caller wipes the coefficients.
    """
    labels = record_labels(REFRESH_DOMAIN, keys, threshold, width)
    return _coefficients(seed, labels, threshold - 1, width)


def refresh_deltas(seed: bytes, keys: Sequence[tuple[str, str]], threshold: int, width: int, x: int) -> np.ndarray:
    """delta_i(x) of this dealer (seed) for each record key: (B, width)."""
    coeffs = refresh_coefficients(seed, keys, threshold, width)
    try:
        return evaluate_at(coeffs, None, x)
    finally:
        coeffs.fill(0)


def check_masks(seed: bytes, context: bytes, count: int, threshold: int, x: int) -> np.ndarray:
    """This dealer's zero-sharing masks rho_i(x) for one check context, one per challenge: (count,).

    The label binds the context (``check_context``: session, k, records
    covered, every mixed challenge) and the challenge's position, so two
    different checks never share a mask.
    """
    if len(context) != 32 or not 1 <= count <= 64:
        raise ValueError("A check context is 32 bytes and covers 1 to 64 challenges.")
    labels = [MASK_DOMAIN + bytes(context) + struct.pack(">II", threshold, c) for c in range(count)]
    coeffs = _coefficients(seed, labels, threshold - 1, 1)
    return evaluate_at(coeffs, None, x)[:, 0]


def reshare_values(
    seed: bytes, keys: Sequence[tuple[str, str]], shares: np.ndarray, new_threshold: int, x: int
) -> np.ndarray:
    """g_i(x) = y_i + c_1 x + ... + c_{k'-1} x^{k'-1} for each record: (B, width)."""
    shares = np.asarray(shares, dtype=FIELD_DTYPE)
    batch, width = shares.shape
    labels = record_labels(RESHARE_DOMAIN, keys, new_threshold, width)
    coeffs = _coefficients(seed, labels, new_threshold - 1, width)
    try:
        return evaluate_at(coeffs, shares, x)
    finally:
        coeffs.fill(0)


def combine(xs: Sequence[int], values: np.ndarray) -> np.ndarray:
    """sum_i lambda_i^S * values_i with Lagrange coefficients at 0 over xs: (B, width).

    ``values`` is (len(xs), B, width): the g_i(j') received from each old
    shareholder i in S (in the order of ``xs``).
    """
    key = tuple(int(x) for x in xs)
    if len(set(key)) != len(key) or any(not 1 <= x <= sharing.MAX_SHAREHOLDERS for x in key):
        raise InvalidShares("The old shareholders' x-coordinates must be distinct, from 1 to 255.")
    stacked = np.ascontiguousarray(values, dtype=FIELD_DTYPE)
    if stacked.ndim != 3 or stacked.shape[0] != len(key):
        raise InvalidShares("Reshare values must have shape (old shareholders, batch, width).")
    return sharing._combine(stacked, field.lagrange_at_zero(key))


def add_rows(*arrays: np.ndarray) -> np.ndarray:
    """Elementwise sum mod P of equally shaped field arrays."""
    total = np.zeros(np.shape(arrays[0]), dtype=np.uint64)
    for i, arr in enumerate(arrays):
        np.add(total, np.asarray(arr, dtype=np.uint64), out=total)
        if i % 1024 == 1023:
            field._fold(total)
    field._reduce_u64_inplace(total)
    return total.astype(FIELD_DTYPE)


# --- the refresh check -----------------------------------------------------------


def new_challenge() -> bytes:
    """A fresh public challenge (16 random bytes)."""
    return rng.RANDOM_BYTES(CHALLENGE_BYTES)


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def check_contribution(seed: bytes, session_id: str, challenges: Sequence[bytes]) -> bytes:
    """This node's 16-byte contribution to the mixed challenges of one check.

    HMAC-SHA-256 under the session seed (drawn at begin, before any dealing)
    of the session and the auditor's challenges: unknown to everyone else
    until the node reveals it, and the same on every retry.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError("A session seed is 32 bytes.")
    msg = CONTRIBUTION_DOMAIN + _lp(session_id.encode()) + b"".join(_lp(bytes(c)) for c in challenges)
    return hmac.new(seed, msg, hashlib.sha256).digest()[:CHALLENGE_BYTES]


def mixed_challenges(session_id: str, challenges: Sequence[bytes], contributions: Sequence[bytes]) -> list[bytes]:
    """The challenges the nodes really use: each auditor challenge hashed with
    every node's contribution (in index order), so no single party picks them."""
    mix = b"".join(_lp(bytes(c)) for c in contributions)
    base = CHALLENGE_DOMAIN + b"mix" + _lp(session_id.encode()) + mix
    return [hashlib.sha256(base + struct.pack(">I", i) + _lp(bytes(c))).digest()[:CHALLENGE_BYTES]
            for i, c in enumerate(challenges)]


def check_context(session_id: str, threshold: int, keys_sha256: str, mixed: Sequence[bytes]) -> bytes:
    """32 bytes naming one check: session, k, records covered (digest) and every mixed challenge."""
    return hashlib.sha256(
        CONTEXT_DOMAIN + _lp(session_id.encode()) + struct.pack(">I", threshold) + _lp(keys_sha256.encode())
        + b"".join(_lp(bytes(c)) for c in mixed)
    ).digest()


def key_hashes(keys: Sequence[tuple[str, str]]) -> np.ndarray:
    """A 64-bit hash of each record key (uint64, in the keys' order): what
    nodes exchange to agree on the records every member holds."""
    sha256 = hashlib.sha256
    raw = b"".join([sha256(label).digest()[:8] for label in record_labels(KEY_HASH_DOMAIN, keys)])
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def check_combinations(challenges: Sequence[bytes], keys: Sequence[tuple[str, str]], diff: np.ndarray) -> list[int]:
    """For each challenge: sum_r alpha_r * sum_m beta^m * diff[r, m]  (mod P).

    The public coefficients are c_{r,m} = alpha_r * beta^m, with beta and one
    alpha per record derived from the challenge (far cheaper than one random
    coefficient per element, and nearly as sound): for a non-zero error E,
    sum_r alpha_r e_r(beta) with e_r(X) = sum_m E_{r,m} X^m vanishes with
    probability at most (w - 1)/P (beta a root of a non-zero e_r) + 1/P.

    The inner sums are one exact float64 matrix product: diff (31-bit
    values) against the powers cut into limbs of ``bits`` bits, chosen so
    that every partial sum stays below 2**53 (2**31 * 2**bits * w):
    e_r(beta) = sum_l 2**(bits * l) * sum_m diff[r, m] * limb_l(beta^m).
    """
    diff = np.asarray(diff, dtype=FIELD_DTYPE)
    batch, width = diff.shape
    count = len(challenges)
    # One key for the whole (public, random) set of challenges; column c of
    # every derived table belongs to challenge c.
    key = hashlib.sha256(CHALLENGE_DOMAIN + b"".join(bytes(c) for c in challenges)).digest()
    betas = derive_field(key, [CHALLENGE_DOMAIN + b"beta"], count)[0].astype(np.uint64)
    pw = np.ascontiguousarray(integrity._powers(betas, width).T)  # (w, C): beta_c^0 .. beta_c^(w-1)
    alphas = derive_field(key, record_labels(CHALLENGE_DOMAIN, keys, width), count).astype(np.uint64)
    bits = 53 - 31 - max(1, int(width)).bit_length()
    if bits < 1:
        raise ValueError("A record is too wide for the check.")
    limbs = -(-31 // bits)
    mask = np.uint64((1 << bits) - 1)
    d = diff.astype(np.float64)
    per_record = np.zeros((batch, count), dtype=np.uint64)
    for l in range(limbs):
        # One product per limb (narrow products stay on BLAS's fast path).
        cut = ((pw >> np.uint64(bits * l)) & mask).astype(np.float64)  # (w, C)
        part = (d @ cut).astype(np.uint64)  # each < 2**53: exact
        field._reduce_u64_inplace(part)
        # (x mod P) * 2**(bits l): a 31-bit value shifted by < 31 bits fits in 64.
        part <<= np.uint64(bits * l)
        field._reduce_u64_inplace(part)
        per_record += part  # <= limbs * P < 2**34
    field._reduce_u64_inplace(per_record)
    d.fill(0)
    return [weighted_sum(alphas[:, c], per_record[:, c]) for c in range(count)]


def weighted_sum(coefficients: np.ndarray, values: np.ndarray) -> int:
    """sum c * v over every element (mod P), as an int."""
    prod = np.multiply(np.asarray(coefficients, dtype=np.uint64), np.asarray(values, dtype=np.uint64))
    field._fold(prod)  # < 2**32 + 2**31 each after one fold
    total = 0
    # Sums of up to 2**30 folded values fit in 64 bits; do it in slices.
    flat = prod.reshape(-1)
    for start in range(0, flat.size, 1 << 30):
        total = (total + int(flat[start : start + (1 << 30)].sum(dtype=np.uint64))) % P
    prod.fill(0)
    return total


def on_zero_polynomial(xs: Sequence[int], values: Sequence[int], threshold: int) -> bool:
    """Whether the points (x_j, v_j) lie on a polynomial of degree <= k - 1 with value 0 at 0.

    That is: the points lie on one polynomial of degree <= k - 1
    (``value_at_zero``) and its value at 0 is 0.
    """
    return value_at_zero(xs, values, threshold) == 0


# --- the reshare check ---------------------------------------------------------------
#
# A reshare moves f (degree k - 1, old committee) to G = sum_{i in S} lambda_i g_i
# (degree k' - 1, new committee). A sender i that deals g_i(0) != y_i (or
# reshares a wrong mask) makes G(0) != f(0): every template is lost once the
# old epoch is destroyed. The check compares a random linear combination L of
# the records (``check_combinations``) on both sides, masked:
#
#   mask R, C values: every OLD member i deals rho_i (degree k - 1, random
#       constant) to every old member; member m holds R_m = sum_i rho_i(m),
#       a degree-(k - 1) sharing of R = sum_i rho_i(0) that no k - 1 old
#       members know anything of. The senders reshare R_m like one more
#       record (``reshare_mask_values``), so R is shared on both sides.
#   old member m reports  v_m  = L(y_m) + R_m          (every old member)
#   new member j reports  v'_j = L(y'_j) + R'_j        (every new member)
#   pass iff the v lie on one polynomial of degree <= k - 1, the v' on one of
#   degree <= k' - 1, and both have the same value at 0.
#
# Soundness. Everything dealt (records and masks) is fixed before L is
# drawn. A dealing error adds  sum_i lambda_i (L(e_i) + delta_i)  to the new
# side's value at 0, with e_i the record error and delta_i the mask error of
# sender i; for a non-zero record error this equals 0 with probability at
# most w/P per challenge (the bound of ``check_combinations``, for any fixed
# target), independently for each challenge's mask. A sender cannot fix its
# report afterwards: the old side is checked at all n old members, so with
# at most n - k dishonest old members (one cheat needs n >= k + 1) a report
# off f's polynomial fails the degree test. With n = k the old side always
# fits (k points define the polynomial) and a sender could lie in its
# report once it knows L: the check is then not sound against a cheating
# sender, only against bugs and damage; ``reshare_check`` says so.
#
# What it reveals. Per challenge, the old values are L(f) + R at the n old
# points and the new ones L(G) + R' at the n' new points. With one honest
# old dealer, R is uniform and its sharing (every coefficient) uniform to
# any k - 1 old members; the senders' mask reshares r_i are uniform of degree
# k' - 1 around R_i. So the n values are a uniform point of "degree k - 1",
# the n' values a uniform point of "degree k' - 1 with that value at 0":
# nothing about the templates, whatever L was. Each mask (one per
# challenge) may be used for ONE check context only: two contexts with one
# mask subtract to L1(f) - L2(f), a linear function of the templates. The
# node refuses a second context (shareholders.epochs), as the refresh check
# refuses a second answer.

RESHARE_MASK_DOMAIN = b"splitvault/reshare-check-mask/v1\x00"
RESHARE_MASK_RECORD = b"splitvault/reshare-check-mask-record/v1\x00"


def reshare_mask_deal(seed: bytes, session_id: str, count: int, old_threshold: int, x: int) -> np.ndarray:
    """rho_i(x) of this old member (seed) for each of ``count`` mask slots: (count,).

    rho_i has degree k - 1 and a random constant; old member x keeps
    R_x = sum_i rho_i(x) (``add_rows`` over every old member's deal).
    """
    if not 1 <= count <= 64 or old_threshold < 1:
        raise ValueError("A reshare check has 1 to 64 mask slots and k >= 1.")
    label = RESHARE_MASK_DOMAIN + _lp(session_id.encode()) + struct.pack(">I", old_threshold)
    flat = derive_field(seed, [label], old_threshold * count)  # (1, k * count)
    coeffs = np.ascontiguousarray(flat.reshape(old_threshold, 1, count))  # constant, c_1 .. c_{k-1}
    try:
        return evaluate_at(coeffs[1:], coeffs[0], x)[0]
    finally:
        coeffs.fill(0)


def reshare_mask_values(seed: bytes, session_id: str, mask: np.ndarray, new_threshold: int, x: int) -> np.ndarray:
    """r_i(x) = R_i + c_1 x + ... : sender i's reshare of its mask shares, (count,).

    The same dealing as a record's (``reshare_values``) under a label that no
    record key can take; receivers combine it with ``combine`` like a record.
    """
    mask = np.asarray(mask, dtype=FIELD_DTYPE).reshape(1, -1)
    label = RESHARE_MASK_RECORD + _lp(session_id.encode()) + struct.pack(">II", new_threshold, mask.shape[1])
    coeffs = _coefficients(seed, [label], new_threshold - 1, mask.shape[1])
    try:
        return evaluate_at(coeffs, mask, x)[0]
    finally:
        coeffs.fill(0)


def reshare_check_values(challenges: Sequence[bytes], keys: Sequence[tuple[str, str]], shares: np.ndarray,
                         mask: np.ndarray) -> list[int]:
    """L_c(y) + R_c for each challenge c: what one member (old or new) reports.

    ``shares`` are the member's shares of the covered records (one side's
    epoch), ``mask`` its mask shares (at least one per challenge). Additive
    over batches: sum ``check_combinations`` chunk by chunk, add the mask once.
    """
    mask = np.asarray(mask, dtype=FIELD_DTYPE).reshape(-1)
    if mask.size < len(challenges):
        raise ValueError("One mask share per challenge.")
    combo = check_combinations(challenges, keys, shares)
    return [(int(v) + int(m)) % P for v, m in zip(combo, mask)]


def value_at_zero(xs: Sequence[int], values: Sequence[int], threshold: int) -> int | None:
    """f(0) if the points (x_j, v_j) lie on one polynomial f of degree <= k - 1, else None.

    The first k points determine f; every other point must agree with it.
    """
    pts = [int(x) for x in xs]
    vals = [int(v) % P for v in values]
    if len(pts) != len(vals) or len(set(pts)) != len(pts) or 0 in pts:
        raise InvalidShares("The check needs distinct non-zero x-coordinates, one value each.")
    if len(pts) < threshold:
        raise InvalidShares("The check needs at least k values.")
    base_x, base_y = tuple(pts[:threshold]), vals[:threshold]
    for x, v in zip(pts[threshold:], vals[threshold:]):
        lam = field.lagrange_at(base_x, x)
        if sum(int(l) * y for l, y in zip(lam, base_y)) % P != v:
            return None
    lam0 = field.lagrange_at_zero(base_x)
    return sum(int(l) * y for l, y in zip(lam0, base_y)) % P


def reshare_check(old_xs: Sequence[int], old_values: Sequence[int], old_threshold: int,
                  new_xs: Sequence[int], new_values: Sequence[int], new_threshold: int) -> str:
    """The verdict on one challenge: "ok", or which test failed.

    "old_inconsistent": the old members' reports do not lie on one
    polynomial of degree <= k - 1 (an old member lied or dealt a bad mask
    share); "new_inconsistent": the new members' do not lie on one of
    degree <= k' - 1 (a sender dealt values of the wrong degree, or a new
    member's share is damaged); "different_secret": both sides are
    consistent but hold different values (a sender dealt a wrong constant).
    ``reshare_check_sound`` says whether the old side can bind a sender's
    report at all (it needs a spare old member).
    """
    a = value_at_zero(old_xs, old_values, old_threshold)
    if a is None:
        return "old_inconsistent"
    b = value_at_zero(new_xs, new_values, new_threshold)
    if b is None:
        return "new_inconsistent"
    return "ok" if a == b else "different_secret"


def reshare_check_sound(old_members: int, old_threshold: int) -> bool:
    """Whether the check holds against one sender lying in its report: the old
    side needs a spare member (n >= k + 1) for its degree test to bind."""
    return old_members >= old_threshold + 1
