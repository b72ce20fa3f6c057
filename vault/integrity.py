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

import threading

import numpy as np

from vault import field, rng
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

# L: independent MACs carried per template.
MAC_COUNT = 4
# Elements of the key-power table processed per chunk (about 2 MiB of uint64).
_CHUNK_ELEMENTS = 1 << 18
# Largest d + 3 (coefficients of one tag polynomial) the single-row path takes:
# it keeps the baby-step block b <= 2**10, which bounds its sums (_tags_one).
_ONE_ROW_MAX_COEFFS = 1 << 20

_M16 = np.array(0xFFFF, dtype=np.uint64)
_S16 = np.array(16, dtype=np.uint64)
_M16.setflags(write=False)
_S16.setflags(write=False)


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
    return _check_valid(_check_field(extended, "Extended values"))


def template_part(extended: np.ndarray) -> np.ndarray:
    """The template values of an extended batch, (B, d): a view, not a copy."""
    arr = np.asarray(extended)
    if arr.ndim != 2:
        raise InvalidShares("Extended values must be a 2-D array (batch, width).")
    return arr[:, : _template_width(arr)]


# --- private helpers ----------------------------------------------------------


def _check_valid(ext: np.ndarray) -> np.ndarray:
    # check() on an array already known to be a contiguous 2-D FIELD_DTYPE
    # array of field elements (what _check_field returns, or what
    # sharing._combine returns to vault.record.join).
    d = _template_width(ext)
    keys = ext[:, d : d + MAC_COUNT]
    tags = _tags(ext[:, :d], keys)
    ok = (tags == ext[:, d + MAC_COUNT :]).all(axis=1)
    tags.fill(0)
    return ok


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


def _tags(s: np.ndarray, keys: np.ndarray) -> np.ndarray:
    # t_l = a_l^(d+2) + sum_{m=1..d} s_m a_l^m (mod P) for each row, (B, L).
    #
    # Written as sum_{m=0..W-1} c_m a^m with c = [0, s_1..s_d, 0, 1, 0...]
    # (padded to W = blocks * b) and evaluated in blocks ("baby steps, giant
    # steps"): with m = i b + j,
    #     t = sum_i (a^b)^i * (sum_j c_{ib+j} a^j)
    # which needs only the powers a^0..a^(b-1) and (a^b)^0..(a^b)^(blocks-1)
    # (about 2 sqrt(d) of them instead of d), and the same d products.
    #
    # One row (the matcher's join, one enrolment) takes _tags_one, which costs
    # far fewer numpy calls; batches take _tags_chunked. Both are exact mod P,
    # so they return the same tags (tests/test_join_fastpath.py checks it).
    batch, d = s.shape
    if batch == 1 and d + 3 <= _ONE_ROW_MAX_COEFFS:
        return _tags_one(s[0], keys[0])
    return _tags_chunked(s, keys)


def _bsgs_shape(d: int) -> tuple[int, int]:
    # (b, blocks) for d template values: b a power of two >= 8 near sqrt(d + 3),
    # blocks * b >= d + 3 coefficients.
    b = max(8, 1 << (int(np.ceil(np.sqrt(d + 3))) - 1).bit_length())
    return b, -(-(d + 3) // b)


class _OneRowPlan:
    """The workspace of _tags_one for one d, with every view it uses made once.

    One uint64 workspace holds a (rows, L) table -- baby powers a^0..a^b,
    giant powers (a^b)^0..(a^b)^(blocks-1), scratch rows, the matrix product
    (2 blocks rows) and the tag accumulator and its scratch -- followed by the
    (2 blocks, b) coefficient limbs. Slicing is a large part of what a numpy
    call costs on arrays this small, so the views (including those of every
    doubling step) are made here, once per thread and d, not per call. The
    workspace holds zeros between calls: _tags_one wipes it before returning.
    """

    def __init__(self, d: int) -> None:
        L = MAC_COUNT
        b, blocks = _bsgs_shape(d)
        scratch_rows = max(b + 1, blocks)
        rows = (b + 1) + blocks + scratch_rows + 2 * blocks + 2
        self.busy = False
        self.ws = np.zeros(rows * L + 2 * blocks * b, dtype=np.uint64)
        table = self.ws[: rows * L].reshape(rows, L)
        baby = table[: b + 1]
        giant = table[b + 1 : b + 1 + blocks]
        tmp = table[b + 1 + blocks : b + 1 + blocks + scratch_rows]
        top = b + 1 + blocks + scratch_rows
        self.baby_1, self.baby_b, self.baby_head = baby[1], baby[b], baby[:b]
        self.giant, self.giant_1 = giant, giant[1:2]
        self.ones = (baby[0], giant[0])
        self.baby_steps = _doubling_views(baby, tmp)
        self.giant_steps = _doubling_views(giant, tmp)
        self.coeffs = self.ws[rows * L :].reshape(2 * blocks, b)
        limbs = self.ws[rows * L :]
        self.lo_limbs = limbs[1 : d + 1]  # c_1..c_d = s, low 16 bits
        self.hi_limbs = limbs[blocks * b + 1 : blocks * b + d + 1]  # high 15 bits
        self.lead = rows * L + d + 2  # c_{d+2} = 1 (its low limb)
        self.prods = table[top : top + 2 * blocks]
        self.lo, self.hi = table[top : top + blocks], table[top + blocks : top + 2 * blocks]
        self.t = tmp[:blocks]
        self.acc, self.acc_tmp = table[rows - 2], table[rows - 1]


def _doubling_views(out: np.ndarray, tmp: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    # The views of each step of _powers' doubling on a (count, L) table:
    # (out[1..step], out[have-1], out[have..have+step-1], scratch of that shape).
    steps = []
    have, count = 2, out.shape[0]
    while have < count:
        step = min(have - 1, count - have)
        steps.append((out[1 : step + 1], out[have - 1], out[have : have + step], tmp[:step]))
        have += step
    return steps


_plans = threading.local()
# Widest d whose plan is kept between calls (about 16 d bytes of workspace).
_PLAN_CACHE_MAX_WIDTH = 1 << 12


def _one_row_plan(d: int) -> _OneRowPlan:
    # This thread's cached plan for d (a few kept); a fresh one if it is in
    # use (re-entry from a signal handler), so no two calls share a workspace.
    if d > _PLAN_CACHE_MAX_WIDTH:
        return _OneRowPlan(d)  # large: allocation is cheap next to the work
    cache = getattr(_plans, "by_width", None)
    if cache is None:
        cache = _plans.by_width = {}
    plan = cache.get(d)
    if plan is None:
        if len(cache) >= 4:
            cache.clear()
        plan = cache[d] = _OneRowPlan(d)
    elif plan.busy:
        plan = _OneRowPlan(d)
    return plan


def _tags_one(s: np.ndarray, keys: np.ndarray) -> np.ndarray:
    # _tags for ONE row: s (d,) and keys (L,) of field elements; returns (1, L).
    #
    # Same baby-step/giant-step split as _tags_chunked, laid out so that each
    # numpy call works on a small contiguous array, with few calls (per-call
    # overhead, not arithmetic, is what a single template costs):
    #   * powers in (exponent, key) tables, built by _powers' doubling, each
    #     step reduced to [0, P) in place with a scratch row block (as
    #     field._canon_with, inlined: products of two values < P are < 2**62);
    #   * the inner sums sum_j c_{ib+j} a^j for all blocks i and keys at once as
    #     one integer matrix product (2 blocks, b) @ (b, L), with c split into
    #     16-bit limbs so that no sum can overflow (bounds below);
    #   * the outer sum over blocks with one fold per product.
    # All of it in the plan's workspace, wiped before returning.
    p = _one_row_plan(s.shape[0])
    p.busy = True
    mul, shr, band, add, sub, low = np.multiply, np.right_shift, np.bitwise_and, np.add, np.subtract, np.minimum
    p64, s31 = field._P0, field._S31_0
    try:
        for one in p.ones:
            one.fill(1)  # a^0 = (a^b)^0 = 1
        p.baby_1[...] = keys
        for src, m, dst, t in p.baby_steps:
            mul(src, m, dst)  # < 2**62
            shr(dst, s31, t)
            band(dst, p64, dst)
            add(dst, t, dst)  # <= 2P - 1
            sub(dst, p64, t)
            low(dst, t, out=dst)  # [0, P)
        p.giant_1[...] = p.baby_b
        for src, m, dst, t in p.giant_steps:
            mul(src, m, dst)
            shr(dst, s31, t)
            band(dst, p64, dst)
            add(dst, t, dst)
            sub(dst, p64, t)
            low(dst, t, out=dst)
        # c = [0, s_1..s_d, 0, 1, 0 ...] as limbs c = lo + 2**16 hi, lo < 2**16
        # and hi < 2**15 (s < P < 2**31); the padding is the workspace's zeros.
        band(s, _M16, p.lo_limbs)
        shr(s, _S16, p.hi_limbs)
        p.ws[p.lead] = 1
        # Inner sums over j < b <= 2**10 of limb * a^j (a^j < 2**31): each
        # product < 2**47, so lo sums < 2**57 and hi sums < 2**56: exact.
        np.matmul(p.coeffs, p.baby_head, out=p.prods)
        lo, hi, t = p.lo, p.hi, p.t
        field._fold_with(hi, t)  # < 2**31 + 2**25
        np.left_shift(hi, _S16, hi)  # 2**16 hi < 2**48
        add(lo, hi, lo)  # = inner_i (mod P), < 2**57 + 2**48 < 2**58
        field._fold_with(lo, t)  # < 2**31 + 2**27 < 2**32
        # Outer sum: inner_i (a^b)^i < 2**32 * 2**31 = 2**63, one fold each
        # leaves < 2**31 + 2**32 < 2**33, and blocks <= 2**10 of them sum to
        # < 2**43; then to [0, P).
        mul(lo, p.giant, lo)
        field._fold_with(lo, t)
        add.reduce(lo, axis=0, out=p.acc)
        field._canon_with(p.acc, p.acc_tmp)
        return p.acc.astype(FIELD_DTYPE)[np.newaxis, :]
    finally:
        p.ws.fill(0)
        p.busy = False


def _tags_chunked(s: np.ndarray, keys: np.ndarray) -> np.ndarray:
    # _tags for a batch, in chunks of rows so the key-power table stays small.
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
