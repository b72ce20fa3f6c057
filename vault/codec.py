"""Template codec, version 1: float vectors <-> int8 vectors <-> field elements.

Splitting works on integers in GF(P), so a template (a float feature vector
compared by cosine similarity) is encoded first:

1. Checked: 1-D or 2-D, numeric, non-empty, the expected dimension d, every
   value finite, not the zero vector.
2. Normalised to unit L2 length (in float64).
3. Scaled by 127 / max_i |x_i| and rounded to the nearest integer with
   ``np.rint`` (ties to even), giving int8 values in [-127, 127]; -128 never
   occurs, so the code is symmetric and negation is exact.

Cosine similarity is scale-invariant (cos(a x, b y) = cos(x, y) for a, b > 0),
so the per-vector scale in step 3 costs nothing and need not be stored: the
only error is rounding, at most 0.5 per coordinate against a largest
coordinate of 127. On 512-d embeddings this moves a cosine by well under
0.005 (tests/test_codec.py measures it on 20,000 pairs), so match decisions
change only for pairs already that close to the threshold.

Field mapping: v in [-127, 127] -> v mod P. Integer inner products of two
encoded vectors are bounded by d * 127**2; keeping that <= (P - 1) / 2 means an
inner product computed in the field (e.g. on shares, for a future Identify)
maps back to the exact signed integer. Hence d <= 66,572 = MAX_DIMENSION.
"""

from __future__ import annotations

import numpy as np

from vault import field, names
from vault.errors import IntegrityError, InvalidTemplate
from vault.field import FIELD_DTYPE, P

CODEC_VERSION = 1
# Largest encoded magnitude; int8's -128 is never produced.
QMAX = 127
# d * 127**2 <= (P - 1) / 2  <=>  d <= 66,572: exact inner products in the field.
MAX_DIMENSION = ((P - 1) // 2) // (QMAX * QMAX)
assert MAX_DIMENSION == names.MAX_DIMENSION == 66_572
# 0-d uint32 operands for from_field (uint32 arithmetic, no widening).
_QMAX_U32 = np.array(QMAX, dtype=FIELD_DTYPE)
_P_U32 = np.array(P, dtype=FIELD_DTYPE)
_QMAX_U32.setflags(write=False)
_P_U32.setflags(write=False)


def encode(vectors: np.ndarray, dimension: int) -> np.ndarray:
    """Encode float templates as int8, shape (B, d); a 1-D input gives (1, d)."""
    if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)):
        raise InvalidTemplate("The template dimension must be an integer.")
    if not 0 < int(dimension) <= MAX_DIMENSION:
        raise InvalidTemplate(f"The template dimension must be between 1 and {MAX_DIMENSION}.")
    try:
        arr = np.asarray(vectors)
    except (ValueError, TypeError):
        raise InvalidTemplate("A template must be a numeric array.") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidTemplate("A template must be a numeric (integer or float) array.")
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2:
        raise InvalidTemplate("Templates must be a vector or a 2-D batch of vectors.")
    if arr.shape[0] == 0:
        raise InvalidTemplate("The batch of templates is empty.")
    if arr.shape[1] != dimension:
        raise InvalidTemplate(f"A template must have exactly {int(dimension)} values.")
    # Every float buffer holding (a function of) the template is ours and
    # overwritten before returning, also on a refusal: two full-size ones,
    # all arithmetic in place, and (B, 1) per-vector scales.
    x = _float_buffer(arr.shape)
    scratch = _float_buffer(arr.shape)
    scales: list[np.ndarray] = []
    try:
        x[...] = arr
        if not np.isfinite(x).all():
            raise InvalidTemplate("A template contains a non-finite value (NaN or infinity).")
        peak = np.abs(x, out=scratch).max(axis=1, keepdims=True)
        scales.append(peak)
        if (peak == 0).any():
            raise InvalidTemplate("A template is the zero vector and has no direction.")
        # Unit L2 length first (scale x first so huge-but-finite inputs cannot
        # overflow the sum of squares), then 127 / max|x_i| per vector.
        x /= peak
        norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, np.newaxis]
        scales.append(norm)
        x /= norm
        factor = QMAX / np.abs(x, out=scratch).max(axis=1, keepdims=True)
        scales.append(factor)
        x *= factor
        np.rint(x, out=x)
        np.clip(x, -QMAX, QMAX, out=x)
        return x.astype(np.int8)
    finally:
        for buf in (x, scratch, *scales):
            buf.fill(0)


def _float_buffer(shape: tuple[int, ...]) -> np.ndarray:
    # encode's float64 working memory (a seam: tests/test_codec.py checks it is wiped).
    return np.empty(shape, dtype=np.float64)


def to_field(codes: np.ndarray) -> np.ndarray:
    """Map int8 codes in [-127, 127] to field elements (``FIELD_DTYPE``)."""
    arr = np.asarray(codes)
    if arr.dtype.kind not in "iu":
        raise InvalidTemplate("Encoded templates must be an integer array.")
    if arr.size and (arr.min() < -QMAX or arr.max() > QMAX):
        raise InvalidTemplate("Encoded template values must be in [-127, 127].")
    return field.from_signed(arr)


def from_field(values: np.ndarray) -> np.ndarray:
    """Map rejoined field elements back to int8 codes.

    Raises IntegrityError when any value is not the image of [-127, 127]: the
    vector is not a template (wrong or mixed shares), and is never matched.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= P)):
        raise IntegrityError("The rejoined vector is not made of field elements.")
    cast = arr.astype(FIELD_DTYPE, copy=False)
    # Shift by QMAX in the field: w = (v + 127) mod P. The codes c in
    # [-127, 127] are exactly the v with w in [0, 254] (c >= 0: v = c, w =
    # c + 127; c < 0: v = P + c, w = c + 127), and then c = w - 127.
    # v + 127 < P + 127 < 2**32 fits in uint32; the conditional subtract is
    # branch-free as in vault.field (w - P wraps to > 2**31 when w < P).
    w = np.add(cast, _QMAX_U32, out=np.empty(cast.shape, dtype=FIELD_DTYPE))
    tmp = np.subtract(w, _P_U32, out=np.empty(cast.shape, dtype=FIELD_DTYPE))
    try:
        np.minimum(w, tmp, out=w)
        if w.size and w.max() > 2 * QMAX:
            raise IntegrityError("The rejoined vector is not a valid template encoding.")
        # w - 127 in [-127, 127], wrapped mod 2**32; its low byte read as int8
        # is the code (two's complement).
        np.subtract(w, _QMAX_U32, out=w)
        return w.astype(np.uint8).view(np.int8)
    finally:
        w.fill(0)
        tmp.fill(0)
        if cast is not arr:
            cast.fill(0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two int8 codes, from exact integer inner products."""
    # Copies (np.array always copies), wiped below: they hold the template and the probe.
    a64 = np.array(a, dtype=np.int64).reshape(-1)
    b64 = np.array(b, dtype=np.int64).reshape(-1)
    try:
        if a64.shape != b64.shape:
            raise InvalidTemplate("Templates of different dimensions cannot be compared.")
        # <a,b>, <a,a>, <b,b> are exact integers (|.| <= d * 127**2 < 2**31).
        ab, aa, bb = int(a64 @ b64), int(a64 @ a64), int(b64 @ b64)
    finally:
        a64.fill(0)
        b64.fill(0)
    if aa == 0 or bb == 0:
        raise InvalidTemplate("A zero vector has no cosine similarity.")
    return cosine_of(ab, aa, bb)


def cosine_of(ab: int, aa: int, bb: int) -> float:
    """<a,b> / sqrt(<a,a> <b,b>) in float64, from the exact integer inner products.

    The one expression Verify's decision rests on: Verify on shares
    (``vault.mpc.verify_threshold``) inverts this very function, so both give
    the same decision for every pair.
    """
    return ab / (aa * bb) ** 0.5


def cosine_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (B, d) int8 batches, shape (B,)."""
    a64 = np.atleast_2d(np.asarray(a, dtype=np.int64))
    b64 = np.atleast_2d(np.asarray(b, dtype=np.int64))
    if a64.shape != b64.shape:
        raise InvalidTemplate("Batches of different shapes cannot be compared.")
    ab = np.einsum("ij,ij->i", a64, b64)
    aa = np.einsum("ij,ij->i", a64, a64)
    bb = np.einsum("ij,ij->i", b64, b64)
    if (aa == 0).any() or (bb == 0).any():
        raise InvalidTemplate("A zero vector has no cosine similarity.")
    # Exact integers up to here; one float division per row.
    return ab / np.sqrt(aa.astype(np.float64) * bb.astype(np.float64))
