"""vault.sharing: known answers, every subset, round trips, invalid input, privacy."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from seeded_rng import SeededBytes
from stats_kit import chi2_critical, two_sample_chi2

from vault import errors, rng, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

VECTORS = json.loads((Path(__file__).parent / "vectors" / "sharing.json").read_text())


# --- known answers ---------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["positive"], ids=lambda c: c["name"])
def test_known_answer_split(case, monkeypatch):
    monkeypatch.setattr(rng, "RANDOM_BYTES", SeededBytes(case["seed"].encode()))
    secrets = np.array(case["secrets"], dtype=FIELD_DTYPE)
    shares = sharing.split(secrets, case["threshold"], case["shareholders"])
    assert shares.tolist() == case["shares"]


@pytest.mark.parametrize("case", VECTORS["positive"], ids=lambda c: c["name"])
def test_known_answer_reconstruct(case):
    k, n = case["threshold"], case["shareholders"]
    shares = np.array(case["shares"], dtype=FIELD_DTYPE)
    for subset in itertools.combinations(range(n), k):
        got = sharing.reconstruct([i + 1 for i in subset], shares[list(subset)])
        assert got.tolist() == case["secrets"]


@pytest.mark.parametrize("case", VECTORS["positive"], ids=lambda c: c["name"])
def test_known_answers_lie_on_a_degree_k_minus_1_polynomial(case):
    # Independent of vault: pure-Python Lagrange through the first k points
    # must give the secret at 0 and every other share at its x.
    k, n = case["threshold"], case["shareholders"]
    shares = case["shares"]

    def at(t, b, m):
        total = 0
        for j in range(k):
            num = den = 1
            for i in range(k):
                if i != j:
                    num = num * (t - (i + 1)) % P
                    den = den * ((j + 1) - (i + 1)) % P
            total += shares[j][b][m] * num * pow(den, P - 2, P)
        return total % P

    for b, row in enumerate(case["secrets"]):
        for m, secret in enumerate(row):
            assert at(0, b, m) == secret
            for x in range(k + 1, n + 1):
                assert at(x, b, m) == shares[x - 1][b][m]


@pytest.mark.parametrize("case", VECTORS["negative"], ids=lambda c: c["name"])
def test_negative_vectors(case):
    exc = getattr(errors, case["error"])
    with pytest.raises(exc):
        if case["op"] == "reconstruct":
            sharing.reconstruct(case["xs"], [np.array(y, dtype=np.int64) for y in case["ys"]])
        else:
            sharing.split(np.array(case["secrets"], dtype=np.int64), case["threshold"], case["shareholders"])


# --- every subset ------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(2, 2), (2, 3), (3, 5), (4, 7), (5, 9)])
def test_every_subset_of_k_or_more_reconstructs(k, n):
    secrets = rng.random_field((3, 17))
    secrets[0, :3] = [0, 1, P - 1]
    shares = sharing.split(secrets, k, n)
    assert shares.shape == (n, 3, 17) and shares.dtype == FIELD_DTYPE
    for size in range(k, n + 1):
        for subset in itertools.combinations(range(n), size):
            xs = [i + 1 for i in subset]
            assert np.array_equal(sharing.reconstruct(xs, shares[list(subset)]), secrets)
            # Order of the shares does not matter, nor list-of-arrays input.
            rev = list(reversed(subset))
            assert np.array_equal(sharing.reconstruct([i + 1 for i in rev], [shares[i] for i in rev]), secrets)


@pytest.mark.parametrize("k,n", [(2, 3), (3, 5)])
def test_fewer_than_k_shares_do_not_give_the_secret(k, n):
    secrets = rng.random_field((4, 64))
    shares = sharing.split(secrets, k, n)
    for subset in itertools.combinations(range(n), k - 1):
        if len(subset) < 2:
            continue
        got = sharing.reconstruct([i + 1 for i in subset], shares[list(subset)])
        assert (got != secrets).mean() > 0.99


def test_interpolate_at_predicts_the_other_shares():
    secrets = rng.random_field((2, 9))
    shares = sharing.split(secrets, 3, 6)
    for x in range(1, 7):
        assert np.array_equal(sharing.interpolate_at([2, 4, 5], shares[[1, 3, 4]], x), shares[x - 1])
    assert np.array_equal(sharing.interpolate_at([2, 4, 5], shares[[1, 3, 4]], 0), secrets)
    with pytest.raises(InvalidShares):
        sharing.interpolate_at([1, 2], shares[:2], P)
    with pytest.raises(InvalidShares):
        sharing.interpolate_at([1, 2], shares[:2], -1)


def test_chunked_batches_match_unchunked(monkeypatch):
    # A batch spanning several chunks (and a ragged last chunk) splits and rejoins.
    monkeypatch.setattr(sharing, "CHUNK_ELEMENTS", 100)
    secrets = rng.random_field((7, 61))
    shares = sharing.split(secrets, 3, 4)
    assert np.array_equal(sharing.reconstruct([4, 1, 3], shares[[3, 0, 2]]), secrets)
    # Same randomness, chunk size changed: shares identical (draws are element-wise).
    monkeypatch.setattr(rng, "RANDOM_BYTES", SeededBytes(b"chunks"))
    a = sharing.split(secrets, 3, 4)
    monkeypatch.setattr(sharing, "CHUNK_ELEMENTS", 1 << 16)
    monkeypatch.setattr(rng, "RANDOM_BYTES", SeededBytes(b"chunks"))
    b = sharing.split(secrets, 3, 4)
    assert np.array_equal(sharing.reconstruct([1, 2, 3], a[:3]), sharing.reconstruct([1, 2, 3], b[:3]))


def test_many_shareholders_and_large_x():
    secrets = rng.random_field((1, 5))
    shares = sharing.split(secrets, 9, 255)
    subset = [254, 3, 100, 200, 7, 0, 50, 150, 251]
    assert np.array_equal(sharing.reconstruct([i + 1 for i in subset], shares[subset]), secrets)
    # reconstruct also accepts x-coordinates far beyond 255: f(X) = 5 + 7X + 11X^2.
    xs = [P - 1, P - 2, 2**30]
    ys = [np.array([[(5 + 7 * x + 11 * x * x) % P]], dtype=np.uint32) for x in xs]
    assert sharing.reconstruct(xs, ys).tolist() == [[5]]


# --- property round trips ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    secrets=hnp.arrays(FIELD_DTYPE, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12), elements=st.integers(0, P - 1)),
    kn=st.integers(2, 8).flatmap(lambda k: st.tuples(st.just(k), st.integers(k, 12))),
    data=st.data(),
)
def test_split_reconstruct_round_trip(secrets, kn, data):
    k, n = kn
    shares = sharing.split(secrets, k, n)
    size = data.draw(st.integers(k, n))
    subset = data.draw(st.permutations(range(n)))[:size]
    assert np.array_equal(sharing.reconstruct([i + 1 for i in subset], shares[list(subset)]), secrets)


@settings(max_examples=40, deadline=None)
@given(
    secrets=hnp.arrays(np.int64, (2, 5), elements=st.integers(0, P - 1)),
    k=st.integers(2, 5),
)
def test_shares_match_python_polynomial(secrets, k):
    # Draw the coefficients through the seam and evaluate them in Python ints.
    drawn = []
    real = rng.random_field

    def spy(shape):
        v = real(shape)
        drawn.append(v.copy())
        return v

    rng_random_field, sharing.rng.random_field = sharing.rng.random_field, spy
    try:
        shares = sharing.split(secrets, k, k + 1)
    finally:
        sharing.rng.random_field = rng_random_field
    coeffs = drawn[0].reshape(k - 1, 2, 5)
    for x in range(1, k + 2):
        for b in range(2):
            for m in range(5):
                want = int(secrets[b, m]) + sum(int(coeffs[j, b, m]) * x ** (j + 1) for j in range(k - 1))
                assert int(shares[x - 1, b, m]) == want % P


# --- invalid input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "secrets,k,n,message",
    [
        (np.array([[1]], dtype=np.uint32), 1, 3, "at least 2"),
        (np.array([[1]], dtype=np.uint32), 0, 3, "at least 2"),
        (np.array([[1]], dtype=np.uint32), 4, 3, "cannot exceed"),
        (np.array([[1]], dtype=np.uint32), 2, 256, "At most 255"),
        (np.array([[1]], dtype=np.uint32), 2.0, 3, "must be an integer"),
        (np.array([[1]], dtype=np.uint32), True, 3, "must be an integer"),
        (np.array([[P]], dtype=np.uint32), 2, 3, "outside the field"),
        (np.array([[2**32 - 1]], dtype=np.uint32), 2, 3, "outside the field"),
        (np.array([[-1]], dtype=np.int64), 2, 3, "outside the field"),
        (np.array([[1.0]]), 2, 3, "integer array"),
        (np.array([1, 2], dtype=np.uint32), 2, 3, "2-dimensional"),
        (np.zeros((0, 3), dtype=np.uint32), 2, 3, "must not be empty"),
        (np.array([["a"]]), 2, 3, "integer array"),
    ],
)
def test_split_rejects(secrets, k, n, message):
    with pytest.raises(InvalidShares, match=message):
        sharing.split(secrets, k, n)


GOOD = sharing.split(np.array([[1, 2, 3]], dtype=np.uint32), 2, 3)


@pytest.mark.parametrize(
    "xs,ys,message",
    [
        ([1], GOOD[:1], "At least two"),
        ([], GOOD[:0], "At least two"),
        ([1, 1], GOOD[:2], "unique"),
        ([0, 1], GOOD[:2], "0 is not allowed"),
        ([1, P], GOOD[:2], r"\[1, P\)"),
        ([1, -2], GOOD[:2], r"\[1, P\)"),
        ([1, 2.0], GOOD[:2], "integers"),
        ([1, True], GOOD[:2], "integers"),
        (5, GOOD[:2], "sequence"),
        ([1, 2, 3], GOOD[:2], "does not match"),
        ([1, 2], GOOD[:2, 0], "shape"),
        ([1, 2], [GOOD[0], GOOD[1][:, :2]], "same shape"),
        ([1, 2], GOOD[:2].astype(np.float64), "integer array"),
        ([1, 2], [GOOD[0].astype(np.float64), GOOD[1].astype(np.float64)], "integer array"),
        ([1, 2], np.full((2, 1, 3), P, dtype=np.uint32), "outside the field"),
        ([1, 2], np.full((2, 1, 3), -5, dtype=np.int64), "outside the field"),
        ([1, 2], np.zeros((2, 0, 3), dtype=np.uint32), "empty"),
    ],
)
def test_reconstruct_rejects(xs, ys, message):
    with pytest.raises(InvalidShares, match=message):
        sharing.reconstruct(xs, ys)


def test_errors_are_value_errors_with_sentences():
    with pytest.raises(ValueError) as info:
        sharing.reconstruct([1, 1], GOOD[:2])
    assert str(info.value).endswith(".") and str(info.value)[0].isupper()


# --- privacy: k - 1 shares do not depend on the secret --------------------------------


def _pair_histogram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Joint histogram of two shares, each binned on its top 3 bits (8 x 8 cells).
    return np.bincount((a >> 28).astype(np.int64) * 8 + (b >> 28).astype(np.int64), minlength=64)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    # Two-sample Kolmogorov-Smirnov D = max |F_a - F_b|, in numpy.
    both = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), both, side="right") / a.size
    fb = np.searchsorted(np.sort(b), both, side="right") / b.size
    return float(np.abs(fa - fb).max())


def _ks_critical(n: int, m: int, alpha: float = 1e-4) -> float:
    # c(alpha) * sqrt((n + m) / (n m)), c = sqrt(-ln(alpha / 2) / 2).
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


SECRET_A, SECRET_B = 0, 2**30 + 12_345  # far apart in the field
COUNT = 40_000


def _pairs(k: int, n: int, secret: int, xs: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    # COUNT sharings of the same constant secret; the shares at two x-coordinates.
    shares = sharing.split(np.full((1, COUNT), secret, dtype=FIELD_DTYPE), k, n)
    return shares[xs[0] - 1, 0], shares[xs[1] - 1, 0]


@pytest.fixture
def seeded(monkeypatch):
    # Deterministic randomness: the statistical verdicts below are reproducible.
    monkeypatch.setattr(rng, "RANDOM_BYTES", SeededBytes(b"privacy test"))


def test_k_minus_1_shares_are_independent_of_the_secret(seeded):
    # 3-of-5: shareholders 2 and 4 together see the same distribution for A and B.
    a2, a4 = _pairs(3, 5, SECRET_A, (2, 4))
    b2, b4 = _pairs(3, 5, SECRET_B, (2, 4))
    stat, df = two_sample_chi2(_pair_histogram(a2, a4), _pair_histogram(b2, b4))
    assert stat < chi2_critical(df), (stat, df)
    for a, b in ((a2, b2), (a4, b4)):
        assert _ks_statistic(a, b) < _ks_critical(a.size, b.size)


def test_the_privacy_test_detects_k_shares(seeded):
    # Counter-check: in a 2-of-3 split two shares DO determine the secret, and
    # the same statistic must see it (else the test above proves nothing).
    a1, a2 = _pairs(2, 3, SECRET_A, (1, 2))
    b1, b2 = _pairs(2, 3, SECRET_B, (1, 2))
    stat, df = two_sample_chi2(_pair_histogram(a1, a2), _pair_histogram(b1, b2))
    assert stat > 10 * chi2_critical(df), (stat, df)


def test_the_privacy_test_detects_a_broken_sharer(seeded, monkeypatch):
    # Counter-check: a sharer whose top coefficient is 0 (degree k - 2) leaks
    # the secret to k - 1 shareholders; the statistic must notice.
    real = rng.random_field

    def broken(shape):
        v = real(shape)
        v[-1] = 0
        return v

    monkeypatch.setattr(sharing.rng, "random_field", broken)
    a2, a4 = _pairs(3, 5, SECRET_A, (2, 4))
    b2, b4 = _pairs(3, 5, SECRET_B, (2, 4))
    stat, df = two_sample_chi2(_pair_histogram(a2, a4), _pair_histogram(b2, b4))
    assert stat > 10 * chi2_critical(df), (stat, df)


def test_shares_never_use_x_zero():
    secrets = rng.random_field((1, 8))
    shares = sharing.split(secrets, 2, 2)
    # If a share were f(0) it would equal the secret; with random c_1 that is ~never.
    assert not np.array_equal(shares[0], secrets) and not np.array_equal(shares[1], secrets)
