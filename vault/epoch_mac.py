"""Per-epoch linear MACs whose keys are renewed at every refresh (pure: no I/O).

The integrity check of the target design (docs/architecture.md, "Share
integrity"; the services still use ``vault.integrity`` until they are
switched over). It closes the hole of a MAC whose keys never change: a
matcher sees the keys at every verification, so anyone who once ran one
could, with one shareholder, later make a substituted template pass.

**Keys.** For each epoch e there are L = TAG_COUNT key vectors
b_1..b_L in GF(P)^d, one set for ALL records of the epoch, Shamir-shared of
degree k - 1 among the nodes and never stored whole. Nobody chooses them:
every node j deals a random sharing beta_j(X) (random constant, random
coefficients, from its session seed as ``vault.proactive`` deals refresh
deltas) and node i's key share is  [b]_i = sum_j beta_j(i),  so
b = sum_j beta_j(0) is uniform as long as one dealer is honest.

**Records.**  [ s_1..s_d | t_1..t_L ]  with  t_l = <b_l, s>  (mod P), split as
one vector (width d + L). The enrolling matcher rejoins b from k key shares
and computes the tags (``extend``); a verifying matcher rejoins s, t and b
and checks every t_l = <b_l, s> (``check``).

**Why a cheating node cannot forge.** It adds errors it knows to what is
rejoined: s + e, b + db, t + dt. Tag l passes iff
    dt_l = <b_l, e> + <db_l, s> + <db_l, e>.
For e != 0 the term <b_l, e> is uniform over GF(P) to anyone who does not
know this epoch's b_l: one node holds one share of it and a past matcher
knows only earlier epochs' keys, which are independent. So each tag is fooled
with probability 1/P and all L with P^-L (L = 3: about 1e-28); a matcher that
tries several k-subsets multiplies this by their number. e = 0 leaves the
template unchanged: at worst the check fails (fail closed).

**Renewal at refresh** (BGW degree reduction: Ben-Or, Goldwasser and
Wigderson, STOC 1988; Gennaro, Rabin and Rabin, PODC 1998). The new epoch's
key b' is dealt as above. Every node j of a set T of at least 2k - 1 nodes
computes, from its shares of the epoch being LEFT (its record share [s | t]
and key share [b]) and its new key share [b'], the local value

    h_j = [t]_j + <[b']_j - [b]_j, [s]_j>                            (mod P)

which is the point at j of the degree-2(k-1) polynomial
T(X) + <B'(X) - B(X), S(X)>, whose value at 0 is t + <b' - b, s> = <b', s>.
Node j deals a random degree-(k-1) sharing g_j of h_j (``renewal_values``)
and node i's new tag share is  [t']_i = sum_{j in T} lambda_j^T g_j(i)
(``renewed_tags``): a fresh degree-(k-1) sharing of <b', s>. The template
part is refreshed with zero-sharings as before (``renew_share``).

Why the old tag and the old shares, not <b', s> from the refreshed s: tags
recomputed from whatever s the sharing holds would bless any shift of s,
and one dealer can shift s by a constant E through a refresh delta with a
non-zero constant (a value it chose, so a template it chose). With
t' = t + <b' - b, s_old> the MAC defect carries over: if the old record was
valid, t' = <b', s_old>, and the shifted s_old + E passes only if
<b', E> is guessed; if the old record was already invalid (t = <b, s> + D),
t' = <b', s> + D and stays invalid at every later renewal unless someone who
knows the key being left cancels D exactly.

Needs n >= 2k - 1 (the product has degree 2k - 2). A malicious node can deal
a wrong g_j or h_j: known offsets on the new tags, so the tag check fails
(a denial of service it could cause by refusing anyway), never a pass with
a changed s; the refresh check's tag part ("the renewal check" below) finds
it before the old epoch is destroyed.

**Privacy** stays information-theoretic: keys, tags and the product values
h_j exist only inside degree-(k-1) sharings; k - 1 nodes see k - 1 points of
each, which are uniform whatever s is.

Python arithmetic is not constant-time; the work here depends only on public
shapes (batch, d, L, k), never on a value (``check`` compares every tag).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

import numpy as np

from vault import field, proactive, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE

# L: tags per record (each fooled with probability 1/P).
TAG_COUNT = 3
# Domain separation of the streams a session seed feeds (vault.proactive has the others).
KEY_DOMAIN = b"splitvault/epoch-mac-key/v1\x00"
RENEW_DOMAIN = b"splitvault/epoch-mac-renew/v1\x00"
KEY_RESHARE_DOMAIN = b"splitvault/epoch-mac-key-reshare/v1\x00"

# Exact inner products on float64 BLAS: the key is split into 3 limbs of 11
# bits, so each product value * limb is < 2**31 * 2**11 = 2**42 and a sum of
# up to 2**11 of them stays below 2**53, where float64 integers are exact.
_LIMB_BITS = 11
_LIMBS = 3  # 3 * 11 >= 31
_INNER_CHUNK = 1 << 11
# Rows converted to float64 at a time (4096 x 512 doubles = 16 MiB).
_ROW_CHUNK = 4096
_LIMB_MASK = np.uint32((1 << _LIMB_BITS) - 1)


# --- keys ------------------------------------------------------------------------


def key_contribution(seed: bytes, epoch: int, threshold: int, dimension: int, x: int) -> np.ndarray:
    """This dealer's beta(x) for epoch ``epoch``: (L, d), ``FIELD_DTYPE``.

    One polynomial of degree k - 1 per key element, constant and coefficients
    uniform, all from ``proactive.derive_field(seed, label_l, k * d)`` with
    label_l = KEY_DOMAIN || u64 epoch || u32 k || u32 d || u32 l; the first d
    elements are the constants beta(0), then c_1 (d elements), ..., c_{k-1}.
    Deterministic in (seed, epoch, k, d), so a receiver that crashed asks again
    and gets the same value.
    """
    k, d = _check_shape_parameters(threshold, dimension)
    labels = [KEY_DOMAIN + struct.pack(">QIII", _epoch(epoch), k, d, l) for l in range(TAG_COUNT)]
    flat = proactive.derive_field(seed, labels, k * d)
    coeffs = np.ascontiguousarray(flat[:, d:].reshape(TAG_COUNT, k - 1, d).transpose(1, 0, 2))
    try:
        return proactive.evaluate_at(coeffs, flat[:, :d], x)
    finally:
        flat.fill(0)
        coeffs.fill(0)


def key_share(contributions: Sequence[np.ndarray]) -> np.ndarray:
    """A node's key share: the sum of every dealer's beta_j(i) it received, (L, d)."""
    parts = [_field_array(c, "Key contributions", 2) for c in contributions]
    if not parts or len({p.shape for p in parts}) != 1 or parts[0].shape[0] != TAG_COUNT:
        raise InvalidShares(f"Key contributions must be equally shaped ({TAG_COUNT}, dimension) arrays.")
    return proactive.add_rows(*parts)


def rejoin_key(xs: Sequence[int], key_shares: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """The epoch's key b from k key shares (the matcher's side): (L, d)."""
    return sharing.reconstruct(xs, key_shares)


def reshare_key_values(seed: bytes, epoch: int, key_share_values: np.ndarray, new_threshold: int, x: int) -> np.ndarray:
    """An old shareholder's reshare of its key share to new member x: (L, d).

    The key moves to a new committee as a record does (``proactive``'s
    Desmedt-Jajodia resharing: g(x) = [b]_i + c_1 x + ... + c_{k'-1}
    x^{k'-1}, combined by the new member with ``proactive.combine``); the key
    itself is unchanged and the next refresh renews it. Coefficients from the
    session seed under KEY_RESHARE_DOMAIN || u64 epoch || u32 k' || u32 d || u32 l,
    a stream no record's reshare label can share.
    """
    b = _key(key_share_values)
    k2, d = _check_shape_parameters(new_threshold, b.shape[1])
    labels = [KEY_RESHARE_DOMAIN + struct.pack(">QIII", _epoch(epoch), k2, d, l) for l in range(TAG_COUNT)]
    flat = proactive.derive_field(seed, labels, (k2 - 1) * d)
    coeffs = np.ascontiguousarray(flat.reshape(TAG_COUNT, k2 - 1, d).transpose(1, 0, 2))
    try:
        return proactive.evaluate_at(coeffs, b, x)
    finally:
        flat.fill(0)
        coeffs.fill(0)


def key_check_keys() -> list[tuple[str, str]]:
    """The record keys under which a key share's L rows enter a reshare check
    (``proactive.check_combinations``): the empty tenant is no record's, so
    no record's challenge coefficients can be the key's."""
    return [("", f"mac-key/{l}") for l in range(TAG_COUNT)]


# --- tags and the matcher's check ------------------------------------------------


def inner_products(values: np.ndarray, key: np.ndarray) -> np.ndarray:
    """sum_m values[r, m] * key[l, m]  (mod P) for every row r and key l: (B, L).

    Exact: float64 matrix products on 11-bit limbs of the key (bounds at the
    constants above), in chunks of rows (so no full-size float64 copy is made)
    and of columns (so any d works).
    """
    v = _field_array(values, "Values", 2)
    b = _field_array(key, "Key", 2)
    batch, d = v.shape
    if b.shape[1] != d:
        raise InvalidShares("The key and the values must have the same dimension.")
    count = b.shape[0]
    # limbs[m, q * L + l] = 11-bit limb q of key[l, m].
    limbs = np.concatenate([((b >> np.uint32(_LIMB_BITS * q)) & _LIMB_MASK).T for q in range(_LIMBS)], axis=1)
    limbs = limbs.astype(np.float64)
    out = np.empty((batch, count), dtype=FIELD_DTYPE)
    rows = max(1, min(_ROW_CHUNK, batch))
    work = np.empty((rows, min(d, _INNER_CHUNK)), dtype=np.float64)
    try:
        for r0 in range(0, batch, rows):
            r1 = min(r0 + rows, batch)
            acc = np.zeros((r1 - r0, count), dtype=np.uint64)
            for c0 in range(0, d, _INNER_CHUNK):
                c1 = min(c0 + _INNER_CHUNK, d)
                w = work[: r1 - r0, : c1 - c0]
                w[...] = v[r0:r1, c0:c1]
                part = (w @ limbs[c0:c1]).astype(np.uint64)  # < 2**53 each: exact
                field._reduce_u64_inplace(part)  # [0, P)
                # sum_q part_q 2**(11 q) < 2**31 + 2**42 + 2**53; acc < 2**34 before.
                np.add(acc, part[:, :count], out=acc)
                np.add(acc, part[:, count : 2 * count] << np.uint64(_LIMB_BITS), out=acc)
                np.add(acc, part[:, 2 * count :] << np.uint64(2 * _LIMB_BITS), out=acc)
                field._fold(acc)
                part.fill(0)
            field._reduce_u64_inplace(acc)
            out[r0:r1] = acc
            acc.fill(0)
    finally:
        work.fill(0)
        limbs.fill(0)
    return out


def tags(templates: np.ndarray, key: np.ndarray) -> np.ndarray:
    """t_l = <b_l, s> for each template row: (B, d) and key (L, d) -> (B, L)."""
    b = _key(key)
    return inner_products(templates, b)


def extend(templates: np.ndarray, key: np.ndarray) -> np.ndarray:
    """[s | t]: each template row followed by its L tags, (B, d + L), ready to split."""
    s = _field_array(templates, "Templates", 2)
    t = tags(s, key)
    try:
        return np.concatenate([s, t], axis=1)
    finally:
        t.fill(0)


def check(extended: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Which tags of each rejoined row hold: (B, L) booleans; a row passes iff all do.

    Every tag is recomputed and compared (no early exit), so the work depends
    only on the shapes.
    """
    ext = _field_array(extended, "Extended values", 2)
    b = _key(key)
    d = _template_width(ext, b)
    expected = inner_products(ext[:, :d], b)
    try:
        return expected == ext[:, d:]
    finally:
        expected.fill(0)


def template_part(extended: np.ndarray) -> np.ndarray:
    """The template values of an extended batch (B, d + L) -> (B, d): a view."""
    arr = np.asarray(extended)
    if arr.ndim != 2 or arr.shape[1] <= TAG_COUNT:
        raise InvalidShares("Extended values are too short to hold a template and its tags.")
    return arr[:, : arr.shape[1] - TAG_COUNT]


# --- renewal at refresh ----------------------------------------------------------


def renewal_nodes(xs: Sequence[int], threshold: int) -> tuple[int, ...]:
    """The set T that renews the tags: the 2k - 1 smallest x-coordinates of the committee.

    The product of two degree-(k-1) sharings has degree 2k - 2, so 2k - 1
    points are needed: a committee of fewer than 2k - 1 nodes cannot renew.
    """
    given = tuple(int(x) for x in xs)
    pts = sorted(set(given))
    if len(pts) != len(given) or any(not 1 <= x <= sharing.MAX_SHAREHOLDERS for x in pts):
        raise InvalidShares("The committee's x-coordinates must be distinct, from 1 to 255.")
    need = 2 * int(threshold) - 1
    if len(pts) < need:
        raise InvalidShares("Renewing the MAC keys needs at least 2k - 1 nodes in the committee.")
    return tuple(pts[:need])


def product_share(record_shares: np.ndarray, old_key_share: np.ndarray, new_key_share: np.ndarray) -> np.ndarray:
    """h_j = [t]_j + <[b']_j - [b]_j, [s]_j> for each record: (B, d + L) -> (B, L).

    ``record_shares`` are this node's shares of the epoch being LEFT (before
    the refresh deltas are added), ``old_key_share`` its share of that epoch's
    key, ``new_key_share`` its share of the new one. The values are points of
    a degree-2(k-1) polynomial that is <b', s> at 0 when the old tags were
    valid; they are secret (deal them with ``renewal_values``, never send them).
    """
    ext = _field_array(record_shares, "Record shares", 2)
    old = _key(old_key_share)
    new = _key(new_key_share)
    if old.shape != new.shape:
        raise InvalidShares("The old and new key shares must have the same shape.")
    d = _template_width(ext, new)
    diff = field.sub(new, old)
    prod = inner_products(ext[:, :d], diff)
    try:
        return field.add(ext[:, d:], prod)
    finally:
        diff.fill(0)
        prod.fill(0)


def renewal_values(
    seed: bytes, keys: Sequence[tuple[str, str]], epoch: int, threshold: int, products: np.ndarray, x: int
) -> np.ndarray:
    """g_j(x) = h_j + c_1 x + ... + c_{k-1} x^{k-1} for each record: (B, L).

    The degree-reduction dealing of node j for receiver x; coefficients from
    the session seed, one stream per record (label: RENEW_DOMAIN || u64 new
    epoch, then the record's tenant and subject, k and L), so a retry gets
    the same polynomial.
    """
    return renewal_values_at(seed, keys, epoch, threshold, products, (x,))[0]


def renewal_values_at(
    seed: bytes, keys: Sequence[tuple[str, str]], epoch: int, threshold: int, products: np.ndarray, xs: Sequence[int]
) -> np.ndarray:
    """``renewal_values`` for several receivers at once: (len(xs), B, L).

    The coefficients are derived once for all receivers (the same polynomial
    for each), which is most of the cost.
    """
    h = _field_array(products, "Product values", 2)
    k, _ = _check_shape_parameters(threshold, 1)
    if h.shape != (len(keys), TAG_COUNT):
        raise InvalidShares(f"Product values must have shape (records, {TAG_COUNT}).")
    domain = RENEW_DOMAIN + struct.pack(">Q", _epoch(epoch))
    labels = proactive.record_labels(domain, keys, k, TAG_COUNT)
    coeffs = proactive._coefficients(seed, labels, k - 1, TAG_COUNT)
    try:
        return np.stack([proactive.evaluate_at(coeffs, h, int(x)) for x in xs])
    finally:
        coeffs.fill(0)


def renewed_tags(xs: Sequence[int], values: np.ndarray, threshold: int) -> np.ndarray:
    """[t']_i = sum_{j in T} lambda_j^T g_j(i): this node's new tag shares, (B, L).

    ``xs`` is T (at least 2k - 1 dealers) and ``values`` (|T|, B, L) the
    g_j(i) received from each, in the order of ``xs``.
    """
    xs = tuple(xs)
    if len(xs) < 2 * int(threshold) - 1:
        raise InvalidShares("Renewing the MAC keys needs the values of at least 2k - 1 nodes.")
    if np.ndim(values) != 3 or np.shape(values)[2] != TAG_COUNT:
        raise InvalidShares(f"Renewal values must have shape (dealers, records, {TAG_COUNT}).")
    return proactive.combine(xs, values)


def renew_share(old_shares: np.ndarray, deltas: Sequence[np.ndarray], new_tags: np.ndarray) -> np.ndarray:
    """A node's record shares of the new epoch: [s + sum of zero-sharing deltas | t'], (B, d + L).

    ``deltas`` are the refresh deltas (B, d) of the template part received
    from every dealer (``proactive.refresh_deltas`` with width d); the old tag
    shares are replaced, not refreshed.
    """
    ext = _field_array(old_shares, "Record shares", 2)
    t = _field_array(new_tags, "New tag shares", 2)
    d = ext.shape[1] - TAG_COUNT
    if d < 1 or t.shape != (ext.shape[0], TAG_COUNT):
        raise InvalidShares("The new tag shares do not fit the record shares.")
    s = proactive.add_rows(ext[:, :d], *(_field_array(x, "Refresh deltas", 2) for x in deltas))
    try:
        return np.concatenate([s, t], axis=1)
    finally:
        s.fill(0)


# --- the renewal check ------------------------------------------------------------
#
# The refresh check (vault.proactive) shows the template part unchanged; the
# renewed tags are no zero-sharing's sum, so it cannot see them. One renewer
# dealing wrong g_j (or one node dealing an inconsistent key contribution)
# would make every tag wrong once the old epoch is destroyed. This check
# shows, for C random combinations alpha (one coefficient per record),
#
#     sum_r alpha_r t'_r = <b', sum_r alpha_r pad(s'_r)>        on shares,
#
# with s'_r padded with zeros to the key width W (tags use the key's first d
# columns, so t'_r = <b', pad(s'_r)>):
#
#   mask rho_c (C slots, W elements): every node deals a random degree-(k-1)
#       sharing of a random W-vector (``renewal_mask_deal``); node i sums what
#       it receives, rho_c(i). Its tags are renewed like a record's
#       (``renewal_mask_products`` dealt with ``renewal_values_at`` under the
#       keys ``renewal_mask_keys``): t'_rho_c(i). Both sealed at prepare.
#   round A  node i reports u_c(i) = sum_r alpha_r pad(s'_r(i)) + rho_c(i)
#       (``renewal_report``): a uniformly random degree-(k-1) sharing.
#   round B  node i takes EVERY member's u_c(j) node to node, requires them on
#       one polynomial of degree k - 1 and opens u_c (``open_reports``), then
#       reports w_c(i) = sum_r alpha_r t'_r(i) + t'_rho_c(i) - <b'(i), u_c>
#       (``renewal_answer``): L values per slot.
#   pass iff for every slot and tag the w lie on a polynomial of degree
#       <= k - 1 with value 0 at 0 (``renewal_check``).
#
# Soundness. Renewal errors e_r (record r's new tags at 0 minus <b', s_r>) and
# e_rho (the mask's) are fixed at prepare, before alpha is known (alpha comes
# from every node's contribution, revealed only once prepared). w_c(0) =
# sum_r alpha_r e_r + e_rho, which is 0 with probability 1/P per slot for any
# non-zero error; the slots have independent alphas and masks (C = 3: P^-3).
# A key contribution dealt inconsistently (key shares off one polynomial by
# D(i)) adds -<D(i), u_c> to w_c(i) with u_c uniform, which breaks the degree.
# A node's own report is its own to choose, but with n >= 2k - 1 >= k + 1 one
# point cannot move the value at 0 of the others' polynomial.
#
# What it reveals. u_c is rho_c's uniformly random degree-(k-1) sharing
# shifted by a fixed combination of the templates: uniform, whatever the
# templates. w_c is a sharing of 0 whose other coefficients carry t'_rho_c's,
# which the renewers' fresh g_j make uniform: a uniform zero sharing,
# independent of u_c. So nothing about a template or the key. Each mask
# serves ONE context (set of alphas): two contexts would subtract to
# (alpha - alpha') applied to the templates. And u_c must reach a node from its
# peers, never from the auditor: a node given u_c + delta would report
# shares of -<b', delta>, and k of them open a linear function of the key.

RENEWAL_CHECK_SLOTS = 3
# Mask sets dealt at prepare: each serves ONE check context, so a session can
# be checked over up to this many record sets (a deletion between two checks
# changes the records covered); a further context is refused.
RENEWAL_CHECK_SETS = 4
RENEWAL_MASK_ROWS = RENEWAL_CHECK_SETS * RENEWAL_CHECK_SLOTS
RENEWAL_MASK_DOMAIN = b"splitvault/renewal-check-mask/v1\x00"
RENEWAL_CONTRIBUTION_DOMAIN = b"splitvault/renewal-check-contribution/v1\x00"
RENEWAL_CONTEXT_DOMAIN = b"splitvault/renewal-check-context/v1\x00"
RENEWAL_ALPHA_DOMAIN = b"splitvault/renewal-check-alpha/v1\x00"
CONTRIBUTION_BYTES = 16


def renewal_mask_deal(seed: bytes, session_id: str, threshold: int, width: int, x: int,
                      rows: int = RENEWAL_MASK_ROWS) -> np.ndarray:
    """rho_j(x) of this dealer for each mask row: (rows, W), random constant, degree k - 1.

    Rows come in sets of C slots (set s: rows s*C .. s*C + C - 1). Label
    RENEWAL_MASK_DOMAIN || lp(session) || u32 k || u32 W || u32 row, so a rerun
    deals the same, row c is the same whatever ``rows`` is, and no record's
    stream can be the mask's.
    """
    k, w = _check_shape_parameters(threshold, width)
    if not 1 <= int(rows) <= 64:
        raise InvalidShares("A renewal check mask has 1 to 64 rows.")
    sid = session_id.encode()
    labels = [RENEWAL_MASK_DOMAIN + struct.pack(">I", len(sid)) + sid + struct.pack(">III", k, w, c)
              for c in range(int(rows))]
    flat = proactive.derive_field(seed, labels, k * w)  # constant, then c_1 .. c_{k-1}
    coeffs = np.ascontiguousarray(flat[:, w:].reshape(int(rows), k - 1, w).transpose(1, 0, 2))
    try:
        return proactive.evaluate_at(coeffs, flat[:, :w], x)
    finally:
        flat.fill(0)
        coeffs.fill(0)


def renewal_mask_keys(rows: int = RENEWAL_MASK_ROWS) -> list[tuple[str, str]]:
    """The record keys under which the mask rows' tags are renewed
    (``renewal_values_at``): the empty tenant is no record's."""
    return [("", f"renewal-check-mask/{c}") for c in range(int(rows))]


def renewal_mask_products(mask_share: np.ndarray, new_key_share: np.ndarray) -> np.ndarray:
    """h_j = <[b']_j, [rho_c]_j> for each mask row: (rows, L), a point of a degree-2(k-1)
    polynomial that is <b', rho_c> at 0; deal it with ``renewal_values_at``."""
    m = _field_array(mask_share, "Mask shares", 2)
    b = _key(new_key_share)
    if m.shape[1] != b.shape[1]:
        raise InvalidShares("The mask and the key must have the same width.")
    return inner_products(m, b)


def renewal_contribution(seed: bytes, session_id: str) -> bytes:
    """This node's 16-byte contribution to the renewal check's coefficients:
    a PRF of its session seed, revealed only once it is prepared."""
    if len(seed) != proactive.SEED_BYTES:
        raise ValueError("A session seed is 32 bytes.")
    sid = session_id.encode()
    return hmac.new(seed, RENEWAL_CONTRIBUTION_DOMAIN + struct.pack(">I", len(sid)) + sid,
                    hashlib.sha256).digest()[:CONTRIBUTION_BYTES]


def renewal_check_context(session_id: str, threshold: int, keys_sha256: str, contributions: Sequence[bytes]) -> bytes:
    """32 bytes naming one renewal check: session, k, the records covered
    (digest) and every node's contribution (in index order)."""
    parts = [session_id.encode(), struct.pack(">I", int(threshold)), keys_sha256.encode(),
             *(bytes(c) for c in contributions)]
    return hashlib.sha256(RENEWAL_CONTEXT_DOMAIN + b"".join(struct.pack(">I", len(p)) + p for p in parts)).digest()


def renewal_coefficients(context: bytes, keys: Sequence[tuple[str, str]]) -> np.ndarray:
    """alpha: one uniform coefficient per record and slot, (B, C), from the context."""
    if len(context) != 32:
        raise ValueError("A renewal check context is 32 bytes.")
    key = hashlib.sha256(RENEWAL_ALPHA_DOMAIN + bytes(context)).digest()
    return proactive.derive_field(key, proactive.record_labels(RENEWAL_ALPHA_DOMAIN, keys),
                                  RENEWAL_CHECK_SLOTS)


def renewal_sums(alphas: np.ndarray, shares: np.ndarray, width: int) -> np.ndarray:
    """[sum_r alpha_r pad(s'_r) | sum_r alpha_r t'_r] of one batch: (C, W + L).

    ``shares`` are this node's new record shares [s' | t'] (B, d + L) with
    d <= W; additive over batches (``proactive.add_rows``).
    """
    a = _field_array(alphas, "Coefficients", 2)
    ext = _field_array(shares, "Record shares", 2)
    d = ext.shape[1] - TAG_COUNT
    if a.shape != (ext.shape[0], RENEWAL_CHECK_SLOTS) or not 1 <= d <= int(width):
        raise InvalidShares("The coefficients or the records do not fit the renewal check.")
    sums = _weighted_rows(a, ext)  # (C, d + L)
    out = np.zeros((RENEWAL_CHECK_SLOTS, int(width) + TAG_COUNT), dtype=FIELD_DTYPE)
    try:
        out[:, :d] = sums[:, :d]
        out[:, int(width):] = sums[:, d:]
    finally:
        sums.fill(0)
    return out


def _weighted_rows(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    # sum_r weights[r, c] * values[r, m] (mod P): (C, w). Exact float64 BLAS:
    # the weights cut into 11-bit limbs, so each product is < 2**42 and a sum
    # over _INNER_CHUNK (2**11) rows stays below 2**53; values are read in
    # place (values.T @ limbs), with no transposed copy.
    count = weights.shape[1]
    acc = np.zeros((count, values.shape[1]), dtype=np.uint64)
    for r0 in range(0, values.shape[0], _INNER_CHUNK):
        r1 = min(r0 + _INNER_CHUNK, values.shape[0])
        w = weights[r0:r1]
        limbs = np.concatenate([(w >> np.uint32(_LIMB_BITS * q)) & _LIMB_MASK for q in range(_LIMBS)], axis=1)
        x = values[r0:r1].astype(np.float64)
        try:
            part = (x.T @ limbs.astype(np.float64)).T.astype(np.uint64)  # (3C, w), each < 2**53: exact
        finally:
            x.fill(0)
        field._reduce_u64_inplace(part)
        # sum_q part_q 2**(11 q) < 2**31 + 2**42 + 2**53; acc < 2**34 before.
        np.add(acc, part[:count], out=acc)
        np.add(acc, part[count : 2 * count] << np.uint64(_LIMB_BITS), out=acc)
        np.add(acc, part[2 * count :] << np.uint64(2 * _LIMB_BITS), out=acc)
        field._fold(acc)
        part.fill(0)
    field._reduce_u64_inplace(acc)
    try:
        return acc.astype(FIELD_DTYPE)
    finally:
        acc.fill(0)


def renewal_report(sums: np.ndarray, mask_share: np.ndarray) -> np.ndarray:
    """Round A: u_c(i) = sum_r alpha_r pad(s'_r(i)) + rho_c(i), (C, W)."""
    total = _field_array(sums, "Sums", 2)
    m = _field_array(mask_share, "Mask shares", 2)
    w = m.shape[1]
    if total.shape != (RENEWAL_CHECK_SLOTS, w + TAG_COUNT) or m.shape[0] != RENEWAL_CHECK_SLOTS:
        raise InvalidShares("The sums and the mask do not fit.")
    return field.add(total[:, :w], m)


def open_reports(xs: Sequence[int], reports: np.ndarray, threshold: int) -> np.ndarray | None:
    """u_c: the value at 0 of every member's round-A reports, (C, W), or None
    unless all of them lie on one polynomial of degree <= k - 1."""
    pts = tuple(int(x) for x in xs)
    stacked = _field_array(reports, "Reports", 3)
    k = int(threshold)
    if len(pts) != stacked.shape[0] or len(pts) < k:
        raise InvalidShares("The renewal check needs at least k reports, one per x-coordinate.")
    base = pts[:k]
    for a in range(k, len(pts)):
        if not np.array_equal(sharing.interpolate_at(base, stacked[:k], pts[a]), stacked[a]):
            return None
    return sharing.reconstruct(base, stacked[:k])


def renewal_answer(sums: np.ndarray, mask_tags: np.ndarray, new_key_share: np.ndarray, opened: np.ndarray) -> np.ndarray:
    """Round B: w_c(i) = sum_r alpha_r t'_r(i) + t'_rho_c(i) - <b'(i), u_c>, (C, L)."""
    total = _field_array(sums, "Sums", 2)
    t = _field_array(mask_tags, "Mask tags", 2)
    b = _key(new_key_share)
    u = _field_array(opened, "Opened reports", 2)
    w = b.shape[1]
    if (total.shape != (RENEWAL_CHECK_SLOTS, w + TAG_COUNT) or t.shape != (RENEWAL_CHECK_SLOTS, TAG_COUNT)
            or u.shape != (RENEWAL_CHECK_SLOTS, w)):
        raise InvalidShares("The renewal check's values do not fit the key.")
    return field.sub(field.add(total[:, w:], t), inner_products(u, b))


def renewal_check(xs: Sequence[int], answers: Sequence[np.ndarray], threshold: int) -> bool:
    """Whether every slot's and tag's round-B answers lie on a polynomial of
    degree <= k - 1 with value 0 at 0 (``answers``: one (C, L) array per x)."""
    stacked = np.asarray(answers).reshape(len(answers), -1)
    return all(proactive.on_zero_polynomial(xs, [int(v) for v in stacked[:, e]], threshold)
               for e in range(stacked.shape[1]))


# --- private helpers ----------------------------------------------------------


def _field_array(values: np.ndarray, what: str, ndim: int) -> np.ndarray:
    # A non-empty integer array of field elements of rank ndim, contiguous FIELD_DTYPE.
    return sharing._check_field_array(values, what, ndim)


def _key(key: np.ndarray) -> np.ndarray:
    # A key or key share: (L, d) field elements.
    b = _field_array(key, "Key", 2)
    if b.shape[0] != TAG_COUNT:
        raise InvalidShares(f"A key has {TAG_COUNT} rows, one per tag.")
    return b


def _template_width(ext: np.ndarray, key: np.ndarray) -> int:
    # d = width - L, which must match the key's dimension.
    d = ext.shape[1] - TAG_COUNT
    if d != key.shape[1]:
        raise InvalidShares("The records' dimension does not match the key's.")
    return d


def _epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or not 0 <= int(epoch) < 2**64:
        raise InvalidShares("The epoch must be an integer from 0 to 2**64 - 1.")
    return int(epoch)


def _check_shape_parameters(threshold: int, dimension: int) -> tuple[int, int]:
    # 2 <= k <= 255 and 1 <= d: the public shapes of a dealing.
    for name, value in (("threshold", threshold), ("dimension", dimension)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidShares(f"The {name} must be an integer.")
    k, d = int(threshold), int(dimension)
    if not 2 <= k <= sharing.MAX_SHAREHOLDERS:
        raise InvalidShares("The threshold must be from 2 to 255.")
    if d < 1:
        raise InvalidShares("The dimension must be at least 1.")
    return k, d
