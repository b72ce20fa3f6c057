"""The one randomness seam of the vault.

Every random value on a share or key path (Shamir coefficients, MAC keys,
refresh and reshare polynomials) comes from ``RANDOM_BYTES``, which is the
operating system's CSPRNG. Tests replace this module attribute with a seeded
deterministic source to produce known-answer vectors (as SLIP-39's reference
implementation does); production code never does. numpy's random generators
are not cryptographic and are never used here.
"""

from __future__ import annotations

import os

import numpy as np

from vault.field import FIELD_DTYPE, P

# The OS CSPRNG. Looked up at call time (``rng.RANDOM_BYTES``) so that tests
# can monkeypatch it.
RANDOM_BYTES = os.urandom

# The 31 low bits of a 32-bit draw.
_MASK31 = np.uint32(0x7FFFFFFF)


def _draw_masked(count: int) -> np.ndarray:
    # count independent uniform 31-bit values in [0, 2**31), writable.
    raw = RANDOM_BYTES(4 * count)
    if len(raw) != 4 * count:
        raise RuntimeError("The random source returned the wrong number of bytes.")
    values = np.frombuffer(raw, dtype="<u4").astype(FIELD_DTYPE)
    np.bitwise_and(values, _MASK31, out=values)
    return values


def random_field(shape: int | tuple[int, ...]) -> np.ndarray:
    """Uniform field elements in [0, P) of the given shape (``FIELD_DTYPE``).

    Each element is 4 random bytes masked to 31 bits: uniform on
    [0, 2**31) = [0, P]. The single value P (= 2**31 - 1) is rejected and only
    those elements are drawn again, so the result is exactly uniform on [0, P).
    """
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    count = 1
    for dim in shape:
        count *= int(dim)
    values = _draw_masked(count)
    bad = np.flatnonzero(values == P)
    while bad.size:
        # Rejection sampling: redraw only the rejected positions.
        values[bad] = _draw_masked(bad.size)
        bad = bad[values[bad] == P]
    return values.reshape(shape)
