"""Shamir secret sharing of batches of field-element vectors over GF(2**31 - 1).

Two public functions, ``split`` and ``reconstruct`` (plus ``interpolate_at``,
which the integrity check uses to find the share that is off the polynomial).
Every element of a secret vector gets its own random polynomial of degree
k - 1 whose constant term is the element:

    f(X) = s + c_1 X + ... + c_{k-1} X^{k-1}   (mod P),  c_i uniform in [0, P)

and shareholder i (i = 1..n, the Shamir x-coordinate; never 0, which would be
the secret itself) receives y_i = f(i). Any k shares determine f and hence
s = f(0); any k - 1 shares are uniformly distributed whatever s is
(information-theoretic privacy).

All coefficients come from ``vault.rng`` (the OS CSPRNG). Arithmetic is
vectorised numpy on uint64 with the Mersenne reduction of ``vault.field``;
large batches are processed in fixed-size chunks so that temporaries stay in
cache. Timing depends only on public shapes, but Python gives no
constant-time guarantee.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from vault import field, names, rng
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

# Most shareholders a template can be split across (x-coordinates 1..255).
MAX_SHAREHOLDERS = names.MAX_SHAREHOLDERS
# Elements processed per chunk: 2**16 uint64 temporaries are 512 KiB, which
# stays in L2 on this class of machine.
CHUNK_ELEMENTS = 1 << 16

_P64 = np.uint64(P)


def split(secrets: np.ndarray, threshold: int, shareholders: int) -> np.ndarray:
    """Split each field element of ``secrets`` k-of-n.

    ``secrets`` has shape (B, m) with integer values in [0, P) (B vectors of
    m field elements). Returns shares of shape (n, B, m), ``FIELD_DTYPE``:
    ``shares[i]`` belongs to shareholder x = i + 1.
    """
    k, n = _check_parameters(threshold, shareholders)
    flat = _check_field_array(secrets, "Secrets", ndim=2).reshape(-1)
    batch, width = np.shape(secrets)
    out = np.empty((n, flat.size), dtype=FIELD_DTYPE)
    acc = np.empty(min(flat.size, CHUNK_ELEMENTS), dtype=np.uint64)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, flat.size)
        size = stop - start
        # c_1..c_{k-1} for every element of the chunk, uniform in [0, P).
        coeffs = rng.random_field((k - 1, size))
        for x in range(1, n + 1):
            _evaluate(coeffs, flat[start:stop], x, acc[:size], out[x - 1, start:stop])
        coeffs.fill(0)  # the coefficients would reveal the secret with any one share
    acc.fill(0)
    return out.reshape(n, batch, width)


def reconstruct(xs: Sequence[int], ys: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Rejoin shares: the secrets f(0), shape (B, m), ``FIELD_DTYPE``.

    ``xs`` are the shareholders' x-coordinates (distinct, in [1, P)) and
    ``ys`` their shares, shape (len(xs), B, m) or a list of (B, m) arrays.
    The caller picks the shares: the result is the value at 0 of the
    polynomial through ALL the given points, which is the secret when at least
    k consistent shares are given and an unrelated value when fewer are (the
    caller knows k; ``vault.record.join`` does this bookkeeping).
    """
    key, stacked = _check_shares(xs, ys)
    return _combine(stacked, _lagrange_u64(key, 0))


def interpolate_at(xs: Sequence[int], ys: np.ndarray | Sequence[np.ndarray], x: int) -> np.ndarray:
    """Evaluate at ``x`` the polynomials through the given shares.

    Same inputs as ``reconstruct``; ``x`` in [0, P). With k consistent shares
    of a k-of-n split, ``interpolate_at(xs, ys, j)`` is what shareholder j
    should hold, which is how an inconsistent share is identified.
    """
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= int(x) < P:
        raise InvalidShares("The evaluation point must be an integer in [0, P).")
    key, stacked = _check_shares(xs, ys)
    return _combine(stacked, _lagrange_u64(key, int(x)))


# --- private helpers ----------------------------------------------------------


def _check_parameters(threshold: int, shareholders: int) -> tuple[int, int]:
    # Validate k and n: 2 <= k <= n <= MAX_SHAREHOLDERS.
    for name, value in (("threshold", threshold), ("shareholder count", shareholders)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidShares(f"The {name} must be an integer.")
    k, n = int(threshold), int(shareholders)
    if k < 2:
        raise InvalidShares("The threshold must be at least 2; a 1-of-n split would store the secret itself.")
    if k > n:
        raise InvalidShares("The threshold cannot exceed the number of shareholders.")
    if n > MAX_SHAREHOLDERS:
        raise InvalidShares(f"At most {MAX_SHAREHOLDERS} shareholders are supported.")
    return k, n


def _check_field_array(values: np.ndarray, what: str, ndim: int) -> np.ndarray:
    # Validate an integer array of field elements of the given rank; return it
    # as a contiguous FIELD_DTYPE array (no copy when it already is one).
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise InvalidShares(f"{what} must be an integer array of field elements.")
    if arr.ndim != ndim:
        raise InvalidShares(f"{what} must be a {ndim}-dimensional array.")
    if arr.size == 0:
        raise InvalidShares(f"{what} must not be empty.")
    if arr.dtype.kind == "i" and arr.min() < 0:
        raise InvalidShares(f"{what} contain values outside the field.")
    if arr.max() >= P:
        raise InvalidShares(f"{what} contain values outside the field.")
    return np.ascontiguousarray(arr, dtype=FIELD_DTYPE)


def _check_shares(xs: Sequence[int], ys) -> tuple[tuple[int, ...], np.ndarray]:
    # Validate x-coordinates and share values for reconstruction; return the
    # x-coordinates as a hashable tuple (the Lagrange cache key) and the shares
    # as one contiguous (k, B*m) view plus their (B, m) shape.
    try:
        key = tuple(xs)
    except TypeError:
        raise InvalidShares("The x-coordinates must be a sequence of integers.") from None
    for x in key:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise InvalidShares("The x-coordinates must be integers.")
    key = tuple(int(x) for x in key)
    if len(key) < 2:
        raise InvalidShares("At least two shares are needed to rejoin a secret.")
    if any(x == 0 for x in key):
        raise InvalidShares("Share x-coordinate 0 is not allowed; it would be the secret itself.")
    if any(not 0 < x < P for x in key):
        raise InvalidShares("Share x-coordinates must be in [1, P).")
    if len(set(key)) != len(key):
        raise InvalidShares("Share x-coordinates must be unique.")
    if isinstance(ys, np.ndarray):
        stacked = ys
    else:
        parts = [np.asarray(y) for y in ys]
        if len({p.shape for p in parts}) > 1:
            raise InvalidShares("All shares must have the same shape.")
        if parts and any(p.dtype.kind not in "iu" for p in parts):
            raise InvalidShares("Shares must be an integer array of field elements.")
        stacked = np.stack(parts) if parts else np.empty((0,), dtype=FIELD_DTYPE)
    if stacked.ndim != 3:
        raise InvalidShares("Shares must have shape (number of shares, batch, width).")
    if stacked.shape[0] != len(key):
        raise InvalidShares("The number of shares does not match the number of x-coordinates.")
    stacked = _check_field_array(stacked, "Shares", ndim=3)
    return key, stacked


def _evaluate(coeffs: np.ndarray, secret: np.ndarray, x: int, acc: np.ndarray, out: np.ndarray) -> None:
    # Horner at the small point x (1 <= x <= 255), into out (FIELD_DTYPE):
    #   f(x) = (((c_{k-1} x + c_{k-2}) x + ...) x + c_1) x + s   (mod P).
    # Each step keeps acc < 2**32 + 2**12 after one fold, so acc * x + c < 2**43
    # (never near 2**64); the last step is brought into [0, P) canonically.
    xv = np.uint64(x)
    k_minus_1 = coeffs.shape[0]
    np.multiply(coeffs[k_minus_1 - 1], xv, out=acc, dtype=np.uint64)
    for j in range(k_minus_1 - 2, -1, -1):
        np.add(acc, coeffs[j], out=acc, dtype=np.uint64)
        field._fold(acc)
        np.multiply(acc, xv, out=acc)
    np.add(acc, secret, out=acc, dtype=np.uint64)
    field._canon(acc)
    out[...] = acc


@functools.lru_cache(maxsize=4096)
def _lagrange_u64(key: tuple[int, ...], x: int) -> tuple[np.ndarray, ...]:
    # field.lagrange_at(key, x) as read-only 0-d uint64 arrays, the cheapest
    # ufunc operands (public values, so caching them is fine).
    out = []
    for v in field.lagrange_at(key, x):
        lam = np.array(int(v), dtype=np.uint64)
        lam.setflags(write=False)
        out.append(lam)
    return tuple(out)


def _combine(stacked: np.ndarray, lam: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    # sum_j lam_j * y_j (mod P) over the first axis of stacked (k, B, m); lam
    # as _lagrange_u64 gives it, or field.lagrange_at's int64 array (which
    # vault.proactive passes). Each product is < P**2 < 2**62, so three can
    # be summed raw (< 3 * 2**62 < 2**64); before every third product acc is
    # folded back below 2**34, and acc is reduced to [0, P) once at the end.
    if isinstance(lam, np.ndarray):
        lam = [np.uint64(int(v)) for v in lam]
    k, batch, width = stacked.shape
    flat = stacked.reshape(k, -1)
    total = flat.shape[1]
    out = np.empty(total, dtype=FIELD_DTYPE)
    acc = np.empty(min(total, CHUNK_ELEMENTS), dtype=np.uint64)
    prod = np.empty(acc.shape, dtype=np.uint64)
    for start in range(0, total, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, total)
        size = stop - start
        a, p = acc[:size], prod[:size]
        np.multiply(flat[0, start:stop], lam[0], out=a, dtype=np.uint64)
        for j in range(1, k):
            if j % 3 == 0:
                field._fold(a)  # a < 2**64 -> < 2**34, so two more products still fit
            np.multiply(flat[j, start:stop], lam[j], out=p, dtype=np.uint64)
            np.add(a, p, out=a)
        field._reduce_u64_inplace(a)
        out[start:stop] = a
    acc.fill(0)
    prod.fill(0)
    return out.reshape(batch, width)
