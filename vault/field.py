"""The prime field GF(P), P = 2**31 - 1, in which templates are shared.

P is a Mersenne prime fixed here for all time: it is never derived from the
data, so a share says nothing about the size of the secret it belongs to.
Field elements are stored as ``np.uint32`` (``FIELD_DTYPE``) and computed in
``np.uint64`` / ``np.int64``: a product of two elements is < 2**62, so it fits
in 64 bits and is brought back into [0, P) by the Mersenne reduction
``x = (x & P) + (x >> 31)`` (because 2**31 = 1 mod P), with no division.

Everything here is elementwise numpy arithmetic on public shapes. Python and
numpy make no constant-time promises; the design relies on the secrets never
being handled by an untrusted process, not on timing.
"""

from __future__ import annotations

import functools

import numpy as np

# The field modulus, a Mersenne prime: 2**31 - 1.
P: int = (1 << 31) - 1
# How field elements are stored (every value < P < 2**31 fits).
FIELD_DTYPE = np.uint32

_P64 = np.uint64(P)
_S31 = np.uint64(31)
_ONE64 = np.uint64(1)
# The same constants as 0-d uint64 arrays: as ufunc operands they cost about
# half the per-call overhead of numpy scalars. Read-only.
_P0 = np.array(P, dtype=np.uint64)
_S31_0 = np.array(31, dtype=np.uint64)
_P0.setflags(write=False)
_S31_0.setflags(write=False)
# Half-range used by to_signed: values above it stand for negatives.
_HALF = (P - 1) // 2


def _as_u64(x: np.ndarray) -> np.ndarray:
    # Non-negative int64 has the same bits as uint64; view, do not copy.
    x = np.asarray(x)
    if x.dtype == np.uint64:
        return x
    if x.dtype == np.int64:
        return x.view(np.uint64)
    return x.astype(np.uint64)


def _fold(x: np.ndarray) -> np.ndarray:
    # One Mersenne fold, in place: x = (x & P) + (x >> 31) = x (mod P).
    # For x < 2**64 the result is < 2**31 + 2**33 < 2**34.
    hi = x >> _S31_0
    np.bitwise_and(x, _P0, out=x)
    np.add(x, hi, out=x)
    return x


def _canon(x: np.ndarray) -> np.ndarray:
    # Canonical step, in place, for uint64 x <= 2**62 - 2 (e.g. any product of
    # two field elements, (P-1)**2 < 2**62 - 2**32): one fold gives
    # (x & P) + (x >> 31) <= (P - 1) + P < 2P, then subtract P once if x >= P.
    _fold(x)
    # Branch-free conditional subtract: in unsigned arithmetic x - P wraps to a
    # huge value when x < P, so min(x, x - P) is x if x < P else x - P.
    np.minimum(x, x - _P0, out=x)
    return x


def _reduce_u64_inplace(x: np.ndarray) -> np.ndarray:
    # Any uint64 x -> x mod P in [0, P), in place: the first fold brings
    # x < 2**64 to < 2**34, then _canon finishes.
    _fold(x)
    return _canon(x)


def reduce(x: np.ndarray) -> np.ndarray:
    """Return ``x mod P`` as field elements (``FIELD_DTYPE``).

    ``x`` is an int64 or uint64 array of non-negative values < 2**63 (any
    uint64 value works). The input is not modified.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError("reduce expects an integer array.")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise ValueError("reduce expects non-negative values; use from_signed.")
    work = arr.astype(np.uint64, copy=True)
    return _reduce_u64_inplace(work).astype(FIELD_DTYPE)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise ``(a + b) mod P`` of field elements."""
    # a + b < 2P < 2**32: fits in uint64 with room; one conditional subtract.
    s = np.add(a, b, dtype=np.uint64)
    np.minimum(s, s - _P64, out=s)
    return s.astype(FIELD_DTYPE)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise ``(a - b) mod P`` of field elements."""
    # a + (P - b) is in [0, 2P); then one conditional subtract.
    s = np.add(a, _P64 - np.asarray(b, dtype=np.uint64), dtype=np.uint64)
    np.minimum(s, s - _P64, out=s)
    return s.astype(FIELD_DTYPE)


def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise ``(a * b) mod P`` of field elements."""
    # a * b < P**2 < 2**62: exact in uint64, then Mersenne reduction.
    prod = np.multiply(a, b, dtype=np.uint64)
    return _reduce_u64_inplace(np.atleast_1d(prod)).astype(FIELD_DTYPE).reshape(prod.shape)


def inv(a: int) -> int:
    """Multiplicative inverse of ``a`` mod P (Fermat: a**(P-2) = a**-1)."""
    a = int(a) % P
    if a == 0:
        raise ValueError("Zero has no inverse in the field.")
    return pow(a, P - 2, P)


def from_signed(v: np.ndarray) -> np.ndarray:
    """Map signed integers with ``|v| < P`` into the field: ``-v -> P - v``."""
    arr = np.asarray(v)
    if arr.dtype.kind not in "iu":
        raise TypeError("from_signed expects an integer array.")
    wide = arr.astype(np.int64)
    if wide.size and (int(np.abs(wide).max()) >= P):
        raise ValueError("from_signed expects |v| < P.")
    # v mod P for -P < v < P: add P to the negatives.
    return np.where(wide < 0, wide + P, wide).astype(FIELD_DTYPE)


def to_signed(f: np.ndarray) -> np.ndarray:
    """Map field elements to int64 in the centred range (-(P-1)/2, (P-1)/2]."""
    wide = np.asarray(f).astype(np.int64)
    return np.where(wide > _HALF, wide - P, wide)


@functools.lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    """Lagrange coefficients for evaluating at 0 the polynomial through ``xs``.

    lambda_j = prod_{i != j} x_i / (x_i - x_j)  (mod P), so that
    f(0) = sum_j lambda_j * f(x_j). Returned read-only (it is cached).
    """
    return lagrange_at(xs, 0)


@functools.lru_cache(maxsize=4096)
def lagrange_at(xs: tuple[int, ...], x: int) -> np.ndarray:
    """Lagrange coefficients for evaluating at ``x`` the polynomial through ``xs``.

    lambda_j(x) = prod_{i != j} (x - x_i) / (x_j - x_i)  (mod P), so that
    f(x) = sum_j lambda_j(x) * f(x_j). ``xs`` must be distinct mod P.
    Returned as a read-only int64 array with values in [0, P).
    """
    pts = [int(v) % P for v in xs]
    if len(set(pts)) != len(pts):
        raise ValueError("Lagrange interpolation needs distinct x-coordinates.")
    x = int(x) % P
    coeffs = []
    for j, xj in enumerate(pts):
        num, den = 1, 1
        for i, xi in enumerate(pts):
            if i != j:
                num = num * (x - xi) % P
                den = den * (xj - xi) % P
        coeffs.append(num * inv(den) % P)
    out = np.array(coeffs, dtype=np.int64)
    out.setflags(write=False)
    return out
