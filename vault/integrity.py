"""Share integrity: a polynomial MAC that is itself Shamir-shared.

A shareholder that returns a wrong share must never cause a wrong match
decision. Before splitting, each encoded template s = (s_1..s_d) (field
elements) is extended with L = MAC_COUNT independent MACs:

    extended = [ s_1 .. s_d | a_1 .. a_L | t_1 .. t_L ]
    t_l = a_l^(d+2) + sum_{m=1..d} s_m * a_l^m        (mod P)

with keys a_l uniform in GF(P) from the OS CSPRNG, and the whole extended
vector is Shamir-split as one. Nobody stores the keys in the clear: they exist
only as shares, like the template. After rejoining, ``check`` recomputes the
tags from the rejoined s and a and compares them with the rejoined t.

This is the algebraic-manipulation-detection code of Cramer, Dodis, Fehr,
Padro and Wichs ("Detection of algebraic manipulation with applications to
robust secret sharing and fuzzy extractors", EUROCRYPT 2008); the a^(d+2) term
is what makes it hold even for an attacker who knows the template (a face can
be estimated from a photograph), not just for one who does not.

Why it works (the argument docs/architecture.md repeats):

* Tampering is additive. Reconstruction is linear, f(0) = sum_j lambda_j y_j
  with public Lagrange weights, so a shareholder that adds e to its share adds
  the known error lambda_j * e = (ds, da, dt) to the rejoined (s, a, t). It
  passes MAC l only if
      (a_l + da_l)^(d+2) + sum_m (s_m + ds_m)(a_l + da_l)^m - (t_l + dt_l) = 0
  i.e. if a_l is a root of a polynomial that is nonzero whenever the error is
  nonzero: of degree d + 1 with leading coefficient (d + 2) da_l if da_l != 0,
  else sum_m ds_m a^m - dt_l of degree <= d. a_l is uniform and unknown to
  the attacker (any k - 1 shares say nothing about it: Shamir), so this
  happens with probability <= (d + 1) / P per MAC, and <= ((d + 1) / P)^L for
  all L independent keys: (513 / (2**31 - 1))^4 ~ 3e-27 for d = 512, L = 4.
  A matcher that retries other k-subsets multiplies this by the number of
  subsets it tries (at most C(n, k)).
* A swapped share (another subject's, or another epoch's) is an independent
  uniform value in place of the right one; the error it causes is random and
  independent of the keys, and fails the check the same way.
* Refresh adds a sharing of zero and resharing redistributes shares linearly;
  both leave the shared (s, a, t) unchanged, so tags made at enrolment stay
  valid through every later epoch and committee without recomputation.
* Privacy: any k - 1 shareholders see uniform shares of (s, a, t), which is
  information-theoretically nothing. Only the rejoining matcher learns a and
  t, and it sees s anyway.

Python arithmetic is not constant-time; the check's timing depends only on
public shapes (d, L, batch size).
"""

from __future__ import annotations

import numpy as np

from vault import field, rng
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

# L: independent MACs carried per template.
MAC_COUNT = 4
# Elements of the key-power table processed per chunk (about 2 MiB of uint64).
_CHUNK_ELEMENTS = 1 << 18


def extend(template: np.ndarray) -> np.ndarray:
    """Append fresh MAC keys and tags: (B, d) -> (B, d + 2L), ``FIELD_DTYPE``."""
    s = _check_field(template, "Template values")
    batch, _ = s.shape
    keys = rng.random_field((batch, MAC_COUNT))
    tags = _tags(s, keys)
    out = np.concatenate([s, keys, tags], axis=1)
    keys.fill(0)
    tags.fill(0)
    return out


def check(extended: np.ndarray) -> np.ndarray:
    """Recompute the tags of each rejoined row; True where they all match, shape (B,)."""
    ext = _check_field(extended, "Extended values")
    d = _template_width(ext)
    keys = ext[:, d : d + MAC_COUNT]
    tags = _tags(ext[:, :d], keys)
    ok = (tags == ext[:, d + MAC_COUNT :]).all(axis=1)
    tags.fill(0)
    return ok


def template_part(extended: np.ndarray) -> np.ndarray:
    """The template values of an extended batch, (B, d): a view, not a copy."""
    arr = np.asarray(extended)
    if arr.ndim != 2:
        raise InvalidShares("Extended values must be a 2-D array (batch, width).")
    return arr[:, : _template_width(arr)]


# --- private helpers ----------------------------------------------------------


def _template_width(ext: np.ndarray) -> int:
    # d = width - 2L, which must be at least 1.
    d = ext.shape[1] - 2 * MAC_COUNT
    if d < 1:
        raise InvalidShares("Extended values are too short to hold a template and its MACs.")
    return d


def _check_field(values: np.ndarray, what: str) -> np.ndarray:
    # A non-empty 2-D integer array of field elements, as contiguous FIELD_DTYPE.
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu" or arr.ndim != 2 or arr.size == 0:
        raise InvalidShares(f"{what} must be a non-empty 2-D integer array.")
    if (arr.dtype.kind == "i" and arr.min() < 0) or arr.max() >= P:
        raise InvalidShares(f"{what} contain values outside the field.")
    return np.ascontiguousarray(arr, dtype=FIELD_DTYPE)


def _bsgs_shape(d: int) -> tuple[int, int]:
    # (b, blocks) for d template values: b a power of two >= 8 near sqrt(d + 3),
    # blocks * b >= d + 3 coefficients.
    b = max(8, 1 << (int(np.ceil(np.sqrt(d + 3))) - 1).bit_length())
    return b, -(-(d + 3) // b)


def _tags(s: np.ndarray, keys: np.ndarray) -> np.ndarray:
    # t_l = a_l^(d+2) + sum_{m=1..d} s_m a_l^m (mod P) for each row, (B, L).
    #
    # Written as sum_{m=0..W-1} c_m a^m with c = [0, s_1..s_d, 0, 1, 0...]
    # (padded to W = blocks * b) and evaluated in blocks ("baby steps, giant
    # steps"): with m = i b + j,
    #     t = sum_i (a^b)^i * (sum_j c_{ib+j} a^j)
    # which needs only the powers a^0..a^(b-1) and (a^b)^0..(a^b)^(blocks-1)
    # (about 2 sqrt(d) of them instead of d), and the same d products, in
    # chunks of rows so the key-power table stays small.
    batch, d = s.shape
    b, blocks = _bsgs_shape(d)
    rows = max(1, _CHUNK_ELEMENTS // (MAC_COUNT * blocks * b))


    out = np.empty((batch, MAC_COUNT), dtype=FIELD_DTYPE)
    coeffs = np.zeros((min(rows, batch), blocks * b), dtype=FIELD_DTYPE)
    prod = np.empty((min(rows, batch), MAC_COUNT, blocks, b), dtype=np.uint64)
    for start in range(0, batch, rows):
        stop = min(start + rows, batch)
        c = stop - start
        cf, pr = coeffs[:c], prod[:c]
        cf[:, 1 : d + 1] = s[start:stop]
        cf[:, d + 2] = 1
        baby = _powers(keys[start:stop], b + 1)  # a^0 .. a^b
        giant = _powers(baby[:, :, b], blocks)  # (a^b)^0 .. (a^b)^(blocks-1)
        # Inner sums: c_{ib+j} a^j < 2**62, one fold each leaves < 2**32, and
        # b <= 2**9 terms sum to < 2**41; reduced to [0, P) before reuse.
        np.multiply(
            cf.reshape(c, 1, blocks, b), baby[:, :, np.newaxis, :b], out=pr, dtype=np.uint64
        )
        field._fold(pr)
        inner = pr.sum(axis=3, dtype=np.uint64)
        field._reduce_u64_inplace(inner)
        # Outer sum: inner_i (a^b)^i < 2**62, folded to < 2**32, at most
        # 2**13 blocks sum to < 2**45; then the final reduction.
        np.multiply(inner, giant, out=inner)
        field._fold(inner)
        acc = inner.sum(axis=2, dtype=np.uint64)
        field._reduce_u64_inplace(acc)
        out[start:stop] = acc
        for arr in (baby, giant, inner, acc):
            arr.fill(0)
    coeffs.fill(0)
    prod.fill(0)
    return out


def _powers(base: np.ndarray, count: int) -> np.ndarray:
    # base^0 .. base^(count-1) along a new last axis, uint64 in [0, P), by
    # repeated doubling: with base^0..base^(h-1) known,
    #     base^(h-1+i) = base^i * base^(h-1)   for i = 1..h-1
    # (each product < 2**62, then reduced), so h grows 2, 3, 5, 9, 17, 33, ...
    pw = np.empty(base.shape + (count,), dtype=np.uint64)
    pw[..., 0] = 1
    if count > 1:
        pw[..., 1] = base
    have = min(2, count)
    while have < count:
        step = min(have - 1, count - have)
        block = pw[..., have : have + step]
        np.multiply(pw[..., 1 : step + 1], pw[..., have - 1 : have], out=block)
        field._canon(block)
        have += step
    return pw
