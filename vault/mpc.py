"""1:N identification on shares: a semi-honest 3-party computation (honest majority).

No template and no score is ever rejoined. Three nodes S = (x_0, x_1, x_2)
hold degree-1 Shamir shares t_i[g] of every gallery template (k = 2) and
degree-1 shares q_i of the probe. Party j (position j in S) computes

    y_j[g] = lambda_j^S * <t_j[g], q_j>  (mod P)           (score_shares)

and, since <t(X), q(X)> has degree 2, y_0 + y_1 + y_2 = <t_g, q> = s_g. It
re-randomises with pairwise streams, z_j = y_j + r(j, j+1) - r(j-1, j)
(rerandomise), so (z_0, z_1, z_2) is a uniform additive sharing of s_g.

The comparison runs in the replicated XOR sharing of Araki, Furukawa,
Lindell, Nof and Ohara (CCS 2016): a bit x = x_0 ^ x_1 ^ x_2, party j holds
(x_j, x_{j+1}); an AND costs one round in which every party sends one bit per
gate to its predecessor, masked by a zero-sharing from the pairwise keys.
Bits are sliced over all gallery rows (uint64 words), so one round carries
every row. Party j's arithmetic share z_j is its own XOR component (its
predecessor learns it too: any one party then sees two of the three uniform
additive shares, which say nothing about s_g).

The circuit (``Party.compare_shifted``), for v = s - T + 2^B with |s - T| < 2^B
(B = ``offset_bit(d)``), so v in [1, 2^(B+1)) and the match bit is bit B:

    z_0 + z_1 + z_2                          a carry-save adder:  = S + 2 C
    2 C = rot1(C)  (mod P)                   2^31 = 1 (mod P): a rotation, free
    W = S + rot1(C) + carry_out   (mod 2^31) one's-complement (end-around) add:
                                             W = v unless v = 0 (never here)
    bit B of W = p_B ^ G[B-1:0] ^ (P[B-1:0] & G[30:0])
               = p_B ^ G(B..30, 0..B-1)

with (G, P) group generate/propagate. The end-around carry into bit B is
the group generate of the 31 bits taken cyclically from B (bits B..30 low,
0..B-1 high; equal because P[B-1:0] & G[B-1:0] = 0), so one log-depth tree
of 31 leaves gives it. Rounds: 1 (inputs) + 1 (carry-save) + 1 (generate)
+ 5 (the tree) = 8 node-to-node rounds, then one opening to the matcher.
The same circuit on s_a - s_b - M decides whether candidate a beats
candidate b by the margin M (``Party.pair_bits``; inputs local, 7 rounds).

Verify on shares (1:1) is the same machinery on a one-row gallery:
``verify_threshold`` finds the integer T with [s >= T] == Verify's
``codec.cosine(q, t) >= tau`` from |q|^2 and the opened |t|^2,
``threshold_shares`` deals -T additively so no node learns it (each node
gets its share and its successor's, after the input round, which runs while
the matcher finds T: ``Party.add_inputs``), and ``Party.sign_bits`` opens
[s - T >= 0] (``verify_local``: in one process).

Security model: semi-honest, one corrupted party of three. A party that
deviates can flip any output bit; the matcher therefore confirms the
candidates the bits name with a MAC-checked rejoin and Verify's cosine rule
(identify_confirm, docs/architecture.md), so a lying node can hide a match
but not make one. Randomness: the pairwise keys come
from the OS CSPRNG (``new_pair_key``); every mask is AES-256-CTR under such a
key, with a label naming the query and the round.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vault import field, proactive
from vault.codec import cosine_of
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

PARTIES = 3
# Identify on shares runs with k = 2 only: 2k - 1 = 3 parties.
THRESHOLD = 2
KEY_BYTES = 32
# Bits of a field element.
FIELD_BITS = 31
# Largest |code| of the int8 codec, so |<t, q>| <= d * QMAX^2.
_QMAX_SQ = 127 * 127
# Most candidates compared pairwise; more is AMBIGUOUS without comparing.
MAX_CANDIDATES = 16
# Most candidates whose templates are released to the matcher to confirm one
# query (identify_confirm); with more the answer is AMBIGUOUS, nothing released.
CONFIRM_CANDIDATES = 4
# Pairwise-stream labels (domain separation).
_ARITH_DOMAIN = b"splitvault/identify-zero/v1\x00"
_BIT_DOMAIN = b"splitvault/identify-and/v1\x00"

MATCH = "MATCH"
NO_MATCH = "NO_MATCH"
AMBIGUOUS = "AMBIGUOUS"


# --- parameters ------------------------------------------------------------------


def max_score(dimension: int) -> int:
    """The largest |<t, q>| of two int8 codes of this dimension."""
    return int(dimension) * _QMAX_SQ


def offset_bit(dimension: int) -> int:
    """B such that every compared difference delta has |delta| < 2^B.

    Differences are s - T (|T| clamped to max_score + 1) and s_a - s_b - M
    (0 <= M <= 2 max_score): |delta| <= 4 max_score + 1. v = delta + 2^B then
    lies in [1, 2^(B+1)) and must stay below 2^31: B <= 30.
    """
    b = (4 * max_score(dimension) + 2).bit_length()
    if b > FIELD_BITS - 1:
        raise ValueError("Identify on shares supports templates of at most 16,643 dimensions.")
    return b


def clamp_threshold(threshold: int, dimension: int) -> int:
    """T clamped to [-(max+1), max+1]: outside it every or no row matches anyway."""
    m = max_score(dimension) + 1
    return max(-m, min(m, int(threshold)))


def check_margin(margin: int, dimension: int) -> int:
    m = int(margin)
    if not 0 <= m <= 2 * max_score(dimension):
        raise ValueError("The identify margin must be between 0 and twice the largest score.")
    return m


def new_pair_key() -> bytes:
    """A fresh pairwise key (per query, per neighbouring pair) from the OS CSPRNG."""
    return os.urandom(KEY_BYTES)


# --- arithmetic layer ------------------------------------------------------------


def lagrange(committee: Sequence[int], position: int) -> int:
    """lambda_position^S at 0 for the committee's x-coordinates."""
    xs = tuple(int(x) for x in committee)
    if len(xs) != PARTIES:
        raise InvalidShares("Identify on shares needs a committee of exactly 3 nodes.")
    return int(field.lagrange_at_zero(xs)[position])


def compute_form(gallery: np.ndarray) -> np.ndarray:
    """A node's gallery shares (G, d) as float64, the form ``score_shares`` reads.

    Every share is < 2^31, exact in float64; kept this way (8 bytes per
    element) so that a query reads the gallery once, in BLAS products, with
    no conversion of it.
    """
    g = np.asarray(gallery)
    if g.ndim != 2 or g.dtype.kind not in "iu" or (g.size and int(g.max()) >= P):
        raise InvalidShares("Gallery shares are a 2-D array of field elements.")
    return np.ascontiguousarray(g, dtype=np.float64)


# 11-bit limbs of the probe share: a product share * limb is < 2^42 and a
# sum of 2^11 of them stays below 2^53, where float64 integers are exact.
_LIMB_BITS = 11
_LIMB_COLUMNS = 1 << 11


# Rows per BLAS call: a block of the gallery is read from memory once and
# multiplied by every limb of every probe while it sits in cache (a
# matrix-vector product per limb read the whole gallery three times). The
# best block depends on how many limb columns there are (measured with
# OpenBLAS on one core, docs/identify.md).
_FEW_LIMBS = 24
_ROWS_FEW = 64
_ROWS_MANY = 256
# Rows reduced at a time: bounds the float64 products held at once.
_CHUNK_ROWS = 1 << 11


def score_shares(gallery: np.ndarray, probe: np.ndarray, coefficient: int) -> np.ndarray:
    """y[g] = coefficient * <gallery[g], probe>  (mod P) for every row: (G,) field elements.

    ``gallery`` is a node's shares in ``compute_form`` (G, d), ``probe`` its
    share of the probe (d,), or of B probes (B, d), then y is (B, G). Exact:
    each probe is cut into three 11-bit limbs, the 3B limb vectors are the
    columns of one float64 matrix L, and the gallery is multiplied by L a
    block of rows at a time (every partial sum over at most 2^11 columns is
    < 2^53); the products are reduced mod P and recombined in uint64.
    """
    g = np.asarray(gallery)
    q = np.asarray(probe)
    if g.dtype != np.float64 or g.ndim != 2:
        raise InvalidShares("Gallery shares must be in compute form (mpc.compute_form).")
    if q.ndim not in (1, 2) or q.shape[-1] != g.shape[1]:
        raise InvalidShares("A probe share is one vector (or a batch of vectors) of the gallery's dimension.")
    # coefficient * <g, q> = <g, coefficient * q>: scale the probe (d values), not the scores (G).
    raw = np.atleast_2d(q).astype(np.uint32)
    try:
        if raw.size and int(raw.max()) >= P:
            raise InvalidShares("A probe share is a vector of field elements.")
        q32 = field.mul(raw, np.full(raw.shape, int(coefficient) % P, dtype=FIELD_DTYPE)).astype(np.uint32, copy=False)
    finally:
        raw.fill(0)
    batch, (rows, dim) = q32.shape[0], g.shape
    mask = np.uint32((1 << _LIMB_BITS) - 1)
    # L[c, limb * B + b] = limb `limb` of probe b's column c.
    limbs = np.concatenate([(q32 >> np.uint32(_LIMB_BITS * limb)) & mask for limb in range(3)]).T.astype(np.float64)
    step = _ROWS_FEW if 3 * batch <= _FEW_LIMBS else _ROWS_MANY
    chunk = max(1, min(rows, _CHUNK_ROWS))
    products = np.empty((chunk, 3 * batch), dtype=np.float64)
    words = np.empty((chunk, 3 * batch), dtype=np.uint64)
    acc = np.empty((chunk, batch), dtype=np.uint64)
    out = np.empty((batch, rows), dtype=FIELD_DTYPE)
    blocks = [(c0, min(c0 + _LIMB_COLUMNS, dim)) for c0 in range(0, dim, _LIMB_COLUMNS)]
    columns = [np.ascontiguousarray(limbs[c0:c1]) for c0, c1 in blocks]
    try:
        for r0 in range(0, rows, chunk):
            n = min(chunk, rows - r0)
            acc[:n] = 0
            for (c0, c1), lc in zip(blocks, columns):
                for b0 in range(0, n, step):
                    b1 = min(b0 + step, n)
                    np.matmul(g[r0 + b0:r0 + b1, c0:c1], lc, out=products[b0:b1])  # < 2^53: exact
                w, a = words[:n], acc[:n]
                np.copyto(w, products[:n], casting="unsafe")
                np.add(a, w[:, :batch], out=a)  # limb 0: < 2^53 (+ a < 2^34)
                for limb in (1, 2):
                    x = field._fold(w[:, limb * batch:(limb + 1) * batch])  # < 2^34
                    np.left_shift(x, np.uint64(_LIMB_BITS * limb), out=x)  # < 2^56
                    np.add(a, x, out=a)  # in all < 2^57
                field._fold(a)  # < 2^34, so the next column block adds safely
            field._reduce_u64_inplace(acc[:n])
            out[:, r0:r0 + n] = acc[:n].T
    finally:
        for buffer in (products, words, acc, limbs, q32, *columns):
            buffer.fill(0)
    return out[0] if q.ndim == 1 else out


def pair_field_stream(key: bytes, label: bytes, count: int) -> np.ndarray:
    """``count`` uniform field elements of the pairwise stream (key, label)."""
    return proactive.derive_field(key, [_ARITH_DOMAIN + label], count)[0]


def rerandomise(y: np.ndarray, key_next: bytes, key_prev: bytes, label: bytes) -> np.ndarray:
    """z = y + r(j, j+1) - r(j-1, j)  (mod P): the three z sum to the three y."""
    r_next = pair_field_stream(key_next, label, y.size)
    r_prev = pair_field_stream(key_prev, label, y.size)
    return field.sub(field.add(y, r_next), r_prev)


# --- bit slicing -----------------------------------------------------------------


def words_for(rows: int) -> int:
    return max(1, -(-int(rows) // 64))


def slice_bits(values: np.ndarray, bits: int = FIELD_BITS) -> np.ndarray:
    """(G,) integers < 2^bits -> (bits, W) uint64: bit j of row g is bit g % 64 of word g // 64."""
    v = np.ascontiguousarray(np.asarray(values, dtype=np.uint32))
    rows = v.size
    out = np.zeros((bits, words_for(rows) * 8), dtype=np.uint8)
    masked = np.empty(rows, dtype=np.uint32)
    flags = np.empty(rows, dtype=bool)
    try:
        for j in range(bits):  # one bit plane at a time: two passes over the rows and a pack
            np.bitwise_and(v, np.uint32(1 << j), out=masked)
            np.not_equal(masked, 0, out=flags)
            out[j, : -(-rows // 8)] = np.packbits(flags, bitorder="little")
    finally:
        masked.fill(0)
        flags.fill(False)
    return out.view("<u8").astype(np.uint64, copy=False)


def unslice_bit(words: np.ndarray, rows: int) -> np.ndarray:
    """(W,) uint64 -> (rows,) bool."""
    w = np.ascontiguousarray(np.asarray(words, dtype="<u8"))
    return np.unpackbits(w.view(np.uint8), bitorder="little")[:rows].astype(bool)


def bit_stream(key: bytes, label: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform uint64 words of the pairwise bit stream (key, label): AES-256-CTR."""
    count = int(np.prod(shape))
    nonce = hashlib.sha256(_BIT_DOMAIN + label).digest()[:16]
    enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    raw = enc.update(bytes(8 * count)) + enc.finalize()
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64).reshape(shape)


# --- the replicated binary sharing -------------------------------------------------


@dataclass
class Bits:
    """One party's replicated shares of bit-sliced values: (mine, nxt), each (m, W)."""

    mine: np.ndarray
    nxt: np.ndarray

    def __xor__(self, other: Bits) -> Bits:
        return Bits(self.mine ^ other.mine, self.nxt ^ other.nxt)

    def __getitem__(self, idx) -> Bits:
        return Bits(self.mine[idx], self.nxt[idx])

    def wipe(self) -> None:
        self.mine.fill(0)
        self.nxt.fill(0)


# exchange(round, payload to the predecessor) -> payload from the successor.
Exchange = Callable[[int, bytes], bytes]


class Party:
    """Party ``position`` of the three: its pairwise keys and its channel.

    ``key_next`` is shared with party position + 1, ``key_prev`` with
    position - 1 (mod 3); ``exchange`` sends bytes to the predecessor and
    returns the successor's bytes of the same round. ``label`` names the
    query (unique per query: the streams must never repeat).
    """

    def __init__(self, position: int, key_next: bytes, key_prev: bytes, label: bytes, exchange: Exchange):
        if position not in range(PARTIES):
            raise ValueError("A party's position is 0, 1 or 2.")
        if len(key_next) != KEY_BYTES or len(key_prev) != KEY_BYTES:
            raise ValueError("Pairwise keys are 32 bytes.")
        self.position = position
        self._key_next = key_next
        self._key_prev = key_prev
        self._label = bytes(label)
        self._exchange = exchange
        self._round = 0
        self.rows = 0
        # The successor's z (arithmetic share) after the input round.
        self._z_next: np.ndarray | None = None
        self._z: np.ndarray | None = None

    # -- one round --

    def _next_round(self) -> int:
        self._round += 1
        return self._round

    def _zero_bits(self, rnd: int, shape: tuple[int, ...]) -> np.ndarray:
        # alpha_j = F(k_{j,j+1}) ^ F(k_{j-1,j}): the three XOR to zero.
        lab = self._label + struct.pack(">I", rnd)
        return bit_stream(self._key_next, lab, shape) ^ bit_stream(self._key_prev, lab, shape)

    def and_(self, x: Bits, y: Bits) -> Bits:
        """x & y for every (row-sliced) bit: one round."""
        rnd = self._next_round()
        c = (x.mine & y.mine) ^ (x.mine & y.nxt) ^ (x.nxt & y.mine)
        c ^= self._zero_bits(rnd, c.shape)
        got = self._exchange(rnd, c.astype("<u8").tobytes())
        nxt = np.frombuffer(got, dtype="<u8").astype(np.uint64)
        if nxt.size != c.size:
            raise InvalidShares("A peer sent a round of the wrong size.")
        return Bits(c, nxt.reshape(c.shape))

    # -- inputs --

    def share_input(self, z: np.ndarray) -> None:
        """Take this party's additive shares z (G,) and send them to the predecessor: one round."""
        self._z = np.asarray(z, dtype=FIELD_DTYPE).copy()
        self.rows = self._z.size
        rnd = self._next_round()
        got = self._exchange(rnd, self._z.astype("<u4").tobytes())
        nxt = np.frombuffer(got, dtype="<u4")
        if nxt.size != self._z.size:
            raise InvalidShares("A peer sent a round of the wrong size.")
        self._z_next = nxt.astype(FIELD_DTYPE)

    def add_inputs(self, own: np.ndarray, succ: np.ndarray) -> None:
        """Add a replicated additive sharing to the inputs: ``own`` to this party's share, ``succ`` to its
        copy of its successor's (Verify on shares: -T, dealt after the input round)."""
        if self._z is None or self._z_next is None:
            raise ValueError("share_input must come first.")
        z, z_next = self._z, self._z_next
        self._z = field.add(z, np.asarray(own, dtype=FIELD_DTYPE))
        self._z_next = field.add(z_next, np.asarray(succ, dtype=FIELD_DTYPE))
        z.fill(0)
        z_next.fill(0)

    def _operands(self, mine: np.ndarray, nxt: np.ndarray) -> tuple[Bits, Bits, Bits]:
        # X_j = z_j as component j alone: party j holds (z_j, 0) of X_j,
        # (0, z_{j+1}) of X_{j+1} and (0, 0) of X_{j+2}.
        a = slice_bits(mine)
        b = slice_bits(nxt)
        zero = np.zeros_like(a)
        own = Bits(a, zero)
        succ = Bits(zero, b)
        other = Bits(zero, zero)
        return {0: (own, succ, other), 1: (other, own, succ), 2: (succ, other, own)}[self.position]

    # -- the circuit --

    def _circuit(self, x0: Bits, x1: Bits, x2: Bits, bit: int) -> Bits:
        # Carry-save: x0 + x1 + x2 = S + 2 C, C = maj = ((x0^x2) & (x1^x2)) ^ x2.
        s = x0 ^ x1 ^ x2
        carry = self.and_(x0 ^ x2, x1 ^ x2) ^ x2
        # 2 C mod P: bit 30 wraps to bit 0 (2^31 = 1 mod P).
        r = Bits(np.roll(carry.mine, 1, axis=0), np.roll(carry.nxt, 1, axis=0))
        p = s ^ r
        g = self.and_(s, r)
        # The end-around carry into bit B is the group generate of the 31
        # bits taken cyclically from B: B..30 (low), then 0..B-1 (high).
        # (With carry-in G[30:0] it is G[B-1:0] ^ (P[B-1:0] & G[30:0]), and
        # G[30:0] = G[30:B] ^ (P[30:B] & G[B-1:0]), and P[B-1:0] & G[B-1:0]
        # = 0.) One tree of 31 leaves: 5 rounds, pairs merged a level at a time.
        order = np.r_[bit:FIELD_BITS, 0:bit]
        gg, pp = g[order], p[order]
        while len(gg.mine) > 1:
            n = len(gg.mine)
            half = n // 2
            lo, hi = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
            top = n == 2  # the last merge needs no group propagate
            # (G, P) of hi above lo: G = G_hi ^ (P_hi & G_lo), P = P_hi & P_lo.
            left = pp[hi] if top else _concat(pp[hi], pp[hi])
            right = gg[lo] if top else _concat(gg[lo], pp[lo])
            prods = self.and_(left, right)
            merged_g = gg[hi] ^ prods[:half]
            merged_p = prods[half:]
            if n % 2:  # the odd top leaf passes up as it is
                merged_g = _concat(merged_g, gg[n - 1 :])
                merged_p = _concat(merged_p, pp[n - 1 :])
            gg, pp = merged_g, merged_p
        return p[bit] ^ gg[0]

    def open_to(self, result: Bits) -> bytes:
        """This party's XOR component of the result, re-masked by a fresh zero-sharing: for the matcher."""
        rnd = self._next_round()
        return (result.mine ^ self._zero_bits(rnd, result.mine.shape)).astype("<u8").tobytes()

    def threshold_bits(self, threshold: int | Sequence[int], dimension: int) -> bytes:
        """[s_g >= T] for every row, as this party's opening component (W * 8 bytes).

        A batch of B queries is B galleries' rows one after the other, with
        one T per query (``threshold`` a sequence of B).
        """
        if self._z is None or self._z_next is None:
            raise ValueError("share_input must come first.")
        bit = offset_bit(dimension)
        shift = _shifts(threshold, clamp_threshold, dimension, self.rows)
        return self.compare_shifted(self._z, self._z_next, shift, bit)

    def pair_bits(self, pairs: Sequence[tuple[int, int]], margin: int | Sequence[int], dimension: int) -> bytes:
        """[s_a - s_b >= M] for every (a, b), as this party's opening component (one M, or one per pair)."""
        if self._z is None or self._z_next is None:
            raise ValueError("share_input must come first.")
        if not pairs:
            raise ValueError("No pairs to compare.")
        a = np.array([p[0] for p in pairs], dtype=np.int64)
        b = np.array([p[1] for p in pairs], dtype=np.int64)
        if a.min() < 0 or b.min() < 0 or max(a.max(), b.max()) >= self.rows:
            raise ValueError("A pair names a row outside the gallery.")
        bit = offset_bit(dimension)
        shift = _shifts(margin, check_margin, dimension, len(pairs))
        mine = field.sub(self._z[a], self._z[b])
        nxt = field.sub(self._z_next[a], self._z_next[b])
        return self.compare_shifted(mine, nxt, shift, bit)

    def compare_shifted(self, mine: np.ndarray, nxt: np.ndarray, shift: int | np.ndarray, bit: int) -> bytes:
        """Bit ``bit`` of ((z_0 + shift) + z_1 + z_2 mod P) per row, as this party's opening.

        ``mine`` and ``nxt`` are this party's and its successor's additive
        shares. Correct when the value v lies in [1, 2^31 - 1) (v = 0 is the
        one value the end-around adder gives as P).
        """
        mine, nxt = self._shifted(mine, nxt, shift)
        return self.open_to(self._circuit(*self._operands(mine, nxt), bit))

    def _shifted(self, mine: np.ndarray, nxt: np.ndarray, shift: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The public shift (one, or one per row) goes into component 0: party 0's own share and party 2's copy.
        add = np.broadcast_to(np.asarray(shift, dtype=FIELD_DTYPE), mine.shape)
        if self.position == 0:
            mine = field.add(mine, add)
        elif self.position == PARTIES - 1:
            nxt = field.add(nxt, add)
        return mine, nxt

    def sign_bits(self, dimension: int) -> bytes:
        """[v >= 0] per row, v the value the three input shares sum to, as this party's opening.

        Verify on shares: the threshold is already in the inputs (each node
        added its additive share of -T, ``threshold_shares``), so no node
        learns T; |v| = |s - T| <= 2 max_score + 1 < 2^B.
        """
        if self._z is None or self._z_next is None:
            raise ValueError("share_input must come first.")
        bit = offset_bit(dimension)
        return self.compare_shifted(self._z, self._z_next, 1 << bit, bit)

    def wipe(self) -> None:
        for arr in (self._z, self._z_next):
            if arr is not None:
                arr.fill(0)


def _shifts(values: int | Sequence[int], check: Callable[[int, int], int], dimension: int,
            rows: int) -> int | np.ndarray:
    """The public shift 2^B - v of a comparison with v (a threshold or a margin, checked by ``check``):
    one int for one v, or one per row for a sequence of v over equal consecutive blocks of ``rows``."""
    top = 1 << offset_bit(dimension)
    if np.ndim(values) == 0:
        return (top - check(int(values), dimension)) % P
    per = [(top - check(int(v), dimension)) % P for v in values]
    if not per or rows % len(per):
        raise ValueError("One value per query (or per pair) of the batch.")
    return np.repeat(np.array(per, dtype=FIELD_DTYPE), rows // len(per))


def _concat(a: Bits, b: Bits) -> Bits:
    return Bits(np.concatenate([a.mine, b.mine]), np.concatenate([a.nxt, b.nxt]))



# --- the matcher's side ----------------------------------------------------------


def open_bits(components: Sequence[bytes], rows: int) -> np.ndarray:
    """XOR the three parties' components: (rows,) bool."""
    if len(components) != PARTIES:
        raise InvalidShares("Opening needs the three parties' components.")
    words = words_for(rows)
    acc = np.zeros(words, dtype=np.uint64)
    for comp in components:
        arr = np.frombuffer(comp, dtype="<u8")
        if arr.size != words:
            raise InvalidShares("A party sent an opening of the wrong size.")
        acc ^= arr.astype(np.uint64)
    return unslice_bit(acc, rows)


def candidate_pairs(candidates: Sequence[int]) -> list[tuple[int, int]]:
    """Every ordered pair (a, b), a != b, of the candidate rows."""
    return [(a, b) for a in candidates for b in candidates if a != b]


def decide(candidates: Sequence[int], pair_bits: np.ndarray | None = None) -> tuple[str, int | None]:
    """The decision from the candidate rows and, for two or more, their pair bits.

    MATCH (row) when exactly one candidate beats every other by the margin;
    NO_MATCH with none; AMBIGUOUS otherwise (also with more than
    MAX_CANDIDATES candidates, which are not compared).
    """
    cands = list(candidates)
    if not cands:
        return NO_MATCH, None
    if len(cands) == 1:
        return MATCH, cands[0]
    if len(cands) > MAX_CANDIDATES or pair_bits is None:
        return AMBIGUOUS, None
    pairs = candidate_pairs(cands)
    beats = dict(zip(pairs, (bool(b) for b in pair_bits), strict=True))
    winners = [a for a in cands if all(beats[(a, b)] for b in cands if b != a)]
    if len(winners) == 1:
        return MATCH, winners[0]
    return AMBIGUOUS, None


def plaintext_decision(codes: np.ndarray, probe: np.ndarray, threshold: int, margin: int) -> tuple[str, int | None]:
    """The same decision by exhaustive search on plaintext int8 codes (the reference)."""
    scores = np.asarray(codes, dtype=np.int64) @ np.asarray(probe, dtype=np.int64)
    cands = [int(g) for g in np.flatnonzero(scores >= int(threshold))]
    if len(cands) < 2 or len(cands) > MAX_CANDIDATES:
        return decide(cands)
    bits = np.array([scores[a] - scores[b] >= int(margin) for a, b in candidate_pairs(cands)])
    return decide(cands, bits)


# --- Verify on shares (1:1) --------------------------------------------------------
#
# The claimed subject's row is a one-row gallery. Verify decides
# codec.cosine_of(s, |q|^2, |t|^2) >= tau with s = <t, q>; that is
# non-decreasing in s for fixed norms, so it equals [s >= T] for one integer
# T. The nodes open |t|^2 to the matcher (a degree-2 sharing made additive
# and re-randomised like the scores); the matcher, which holds |q|^2, finds T
# (verify_threshold) and deals each node an additive share of -T
# (threshold_shares); the circuit then opens only [s - T >= 0].


def norm_bounds(dimension: int) -> tuple[int, int]:
    """The least and largest |t|^2 of an int8 code (its largest |coordinate| is 127)."""
    return _QMAX_SQ, max_score(dimension)


def verify_threshold(match_threshold: float, probe_norm_sq: int, template_norm_sq: int, dimension: int) -> int:
    """The least integer T with codec.cosine_of(T, |q|^2, |t|^2) >= tau, clamped like ``clamp_threshold``.

    Then for every integer score s, [s >= T] == [codec.cosine_of(s, ...) >= tau]:
    float64 rounding included, because the float expression itself is
    inverted (a correctly rounded s / c is monotone in s). Start: the real
    boundary from tau's exact rational value, T0 = ceil(tau sqrt(aa bb))
    (integer square root), then stepped to where the float expression turns
    (one step at most at d <= 16,643).
    """
    tau = float(match_threshold)
    aa, bb = int(probe_norm_sq), int(template_norm_sq)
    lo, hi = norm_bounds(dimension)
    if not 0.0 < tau <= 1.0:
        raise ValueError("The match threshold must be above 0 and at most 1.")
    if not (1 <= aa <= hi and lo <= bb <= hi):
        raise InvalidShares("A squared norm is outside the range of int8 codes of this dimension.")
    frac = Fraction(tau)
    # s >= tau sqrt(aa bb)  <=>  s >= 0 and s^2 >= N^2 aa bb / D^2 (tau = N / D > 0).
    need = -((-(frac.numerator ** 2) * aa * bb) // (frac.denominator ** 2))  # ceil
    t = 0 if need <= 0 else math.isqrt(need - 1) + 1
    top = max_score(dimension) + 1
    while t > -top and cosine_of(t - 1, aa, bb) >= tau:
        t -= 1
    while t < top and cosine_of(t, aa, bb) < tau:
        t += 1
    return clamp_threshold(t, dimension)


def threshold_shares(threshold: int, count: int = PARTIES) -> list[int]:
    """``count`` uniform additive shares of -threshold (mod P), from the OS CSPRNG."""
    parts = [secrets.randbelow(P) for _ in range(count - 1)]
    parts.append((-int(threshold) - sum(parts)) % P)
    return parts


def open_sum(components: Sequence[int]) -> int:
    """The signed value in (-P/2, P/2) that additive shares sum to."""
    if len(components) != PARTIES:
        raise InvalidShares("Opening needs the three parties' components.")
    v = sum(int(c) for c in components) % P
    return v - P if v > P // 2 else v


def verify_local(template_shares: Sequence[np.ndarray], probe_shares: Sequence[np.ndarray],
                 committee: Sequence[int], match_threshold: float, probe_norms_sq: Sequence[int]) -> np.ndarray:
    """Verify on shares with the three parties as threads of this process (tests).

    Row g is one verification: ``template_shares[j][g]`` and
    ``probe_shares[j][g]`` (d field elements) are the node at ``committee[j]``'s
    shares of the claimed template and of the probe. Returns the decisions
    (G,) bool; every row runs the nodes' steps (shareholders.identify), sliced
    into one circuit.
    """
    trio = LocalTrio()
    rows, dimension = np.shape(template_shares[0])
    norms_z: list = [None] * PARTIES
    z: list = [None] * PARTIES

    def own_products(j: int) -> tuple[np.ndarray, np.ndarray]:
        lam = lagrange(committee, j)
        t = np.asarray(template_shares[j])
        q = np.asarray(probe_shares[j])
        y = np.array([score_shares(compute_form(t[g:g + 1]), q[g], lam)[0] for g in range(rows)], dtype=FIELD_DTYPE)
        n = np.array([score_shares(compute_form(t[g:g + 1]), t[g], lam)[0] for g in range(rows)], dtype=FIELD_DTYPE)
        return y, n

    for j in range(PARTIES):
        y, n = own_products(j)
        z[j] = rerandomise(y, trio.keys[j], trio.keys[(j - 1) % PARTIES], trio.label)
        norms_z[j] = rerandomise(n, trio.keys[j], trio.keys[(j - 1) % PARTIES], trio.label + b"/norm")
    norms = [open_sum([int(norms_z[j][g]) for j in range(PARTIES)]) for g in range(rows)]
    thresholds = [verify_threshold(match_threshold, probe_norms_sq[g], norms[g], dimension) for g in range(rows)]
    dealt = np.array([threshold_shares(t) for t in thresholds], dtype=FIELD_DTYPE)  # (G, 3)

    def phase(j: int, party: Party) -> bytes:
        party.share_input(z[j])
        party.add_inputs(dealt[:, j], dealt[:, (j + 1) % PARTIES])
        return party.sign_bits(dimension)

    try:
        return open_bits(trio.run(phase), rows)
    finally:
        trio.wipe()


# --- an in-process run of the three parties (tests, bench) -----------------------


class LocalTrio:
    """The three parties as threads of this process, joined by in-memory mailboxes.

    With ``views`` (a list), every byte string a party receives from its
    successor is appended as (position, round, bytes).
    """

    def __init__(self, views: list | None = None):
        import queue

        self.keys = [new_pair_key() for _ in range(PARTIES)]  # keys[j]: pair (j, j+1)
        self.label = os.urandom(16)
        self._boxes = [queue.Queue() for _ in range(PARTIES)]
        self._views = views
        self.parties = [
            Party(j, self.keys[j], self.keys[(j - 1) % PARTIES], self.label, self._exchange_for(j))
            for j in range(PARTIES)
        ]

    def _exchange_for(self, j: int) -> Exchange:
        def exchange(rnd: int, payload: bytes) -> bytes:
            self._boxes[(j - 1) % PARTIES].put((rnd, payload))
            got_rnd, got = self._boxes[j].get(timeout=60)
            if got_rnd != rnd:
                raise RuntimeError("Rounds out of step.")
            if self._views is not None:
                self._views.append((j, rnd, got))
            return got

        return exchange

    def run(self, work: Callable[[int, Party], bytes]) -> list[bytes]:
        """work(position, party) in three threads; their results in position order."""
        import threading

        out: list = [None] * PARTIES
        errors: list = []

        def run(j: int) -> None:
            try:
                out[j] = work(j, self.parties[j])
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(j,)) for j in range(PARTIES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def wipe(self) -> None:
        for p in self.parties:
            p.wipe()


def identify_local(gallery_shares: Sequence[np.ndarray], probe_shares: Sequence[np.ndarray],
                   committee: Sequence[int], threshold: int | Sequence[int], margin: int | Sequence[int],
                   views: list | None = None):
    """Identify with the three parties as threads of this process (tests, bench).

    ``gallery_shares[j]`` (G, d, in ``compute_form``) and ``probe_shares[j]``
    (d,) are the shares of the node at ``committee[j]``: one decision. With
    B probes, ``probe_shares[j]`` is (B, d) and ``threshold`` and ``margin``
    are sequences of B: a list of B decisions from one run of the circuit
    over B * G rows (and one of the pair comparisons over every query's
    candidate pairs).
    """
    single = np.ndim(probe_shares[0]) == 1
    batch = 1 if single else len(probe_shares[0])
    thresholds = [threshold] if single else [int(t) for t in threshold]
    margins = [margin] if single else [int(m) for m in margin]
    if len(thresholds) != batch or len(margins) != batch:
        raise ValueError("One threshold and one margin per probe of the batch.")
    trio = LocalTrio(views)
    rows, dimension = np.shape(gallery_shares[0])

    def phase1(j: int, party: Party) -> bytes:
        y = score_shares(gallery_shares[j], probe_shares[j], lagrange(committee, j)).reshape(-1)
        z = rerandomise(y, trio.keys[j], trio.keys[(j - 1) % PARTIES], trio.label)
        y.fill(0)
        party.share_input(z)
        z.fill(0)
        return party.threshold_bits(thresholds[0] if single else thresholds, dimension)

    try:
        bits = open_bits(trio.run(phase1), batch * rows).reshape(batch, rows)
        cands = [[int(g) for g in np.flatnonzero(bits[b])] for b in range(batch)]
        pairs: list[tuple[int, int]] = []
        pair_margins: list[int] = []
        spans: list[tuple[int, int] | None] = []
        for b, c in enumerate(cands):
            if 2 <= len(c) <= MAX_CANDIDATES:
                mine = candidate_pairs(c)
                spans.append((len(pairs), len(pairs) + len(mine)))
                pairs += [(b * rows + x, b * rows + y) for x, y in mine]
                pair_margins += [margins[b]] * len(mine)
            else:
                spans.append(None)
        pair_bits = None
        if pairs:
            comps = trio.run(lambda j, party: party.pair_bits(pairs, pair_margins, dimension))
            pair_bits = open_bits(comps, len(pairs))
        out = [decide(c) if span is None else decide(c, pair_bits[span[0]:span[1]])
               for c, span in zip(cands, spans, strict=True)]
        return out[0] if single else out
    finally:
        trio.wipe()
