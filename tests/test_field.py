"""vault.field and vault.rng: field arithmetic against Python integers, the seam."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vault import field, rng
from vault.field import FIELD_DTYPE, P

elements = st.integers(min_value=0, max_value=P - 1)
element_lists = st.lists(elements, min_size=1, max_size=40)


def test_p_is_the_mersenne_prime_2_31_minus_1():
    assert P == 2**31 - 1
    # Trial division up to sqrt(P) ~ 46341 (fast enough, and independent of field.py).
    assert all(P % q for q in range(2, 46342))


@pytest.mark.parametrize(
    "value",
    [0, 1, P - 1, P, P + 1, 2 * P, 2**32, (P - 1) ** 2, 2**62 - 1, 2**62, 2**63 - 1],
)
def test_reduce_edge_values(value):
    for dtype in (np.int64, np.uint64):
        got = field.reduce(np.array([value], dtype=dtype))
        assert got.dtype == FIELD_DTYPE
        assert int(got[0]) == value % P


def test_reduce_accepts_any_uint64():
    values = [2**64 - 1, 2**64 - 2, 2**63, 3 * 2**62]
    got = field.reduce(np.array(values, dtype=np.uint64))
    assert [int(v) for v in got] == [v % P for v in values]


def test_reduce_rejects_negative_and_float():
    with pytest.raises(ValueError):
        field.reduce(np.array([-1], dtype=np.int64))
    with pytest.raises(TypeError):
        field.reduce(np.array([1.0]))


@given(st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=1, max_size=50))
def test_reduce_matches_python(values):
    got = field.reduce(np.array(values, dtype=np.int64))
    assert [int(v) for v in got] == [v % P for v in values]


@given(st.data())
def test_add_sub_mul_match_python(data):
    a = data.draw(element_lists)
    b = data.draw(st.lists(elements, min_size=len(a), max_size=len(a)))
    fa, fb = np.array(a, dtype=FIELD_DTYPE), np.array(b, dtype=FIELD_DTYPE)
    for op, ref in ((field.add, lambda x, y: x + y), (field.sub, lambda x, y: x - y), (field.mul, lambda x, y: x * y)):
        got = op(fa, fb)
        assert got.dtype == FIELD_DTYPE
        assert [int(v) for v in got] == [ref(x, y) % P for x, y in zip(a, b)]


def test_mul_extremes():
    a = np.array([P - 1, P - 1, 0, 1], dtype=FIELD_DTYPE)
    b = np.array([P - 1, 2, P - 1, P - 1], dtype=FIELD_DTYPE)
    assert [int(v) for v in field.mul(a, b)] == [1, P - 2, 0, P - 1]


@given(st.integers(min_value=1, max_value=P - 1))
def test_inv(a):
    assert a * field.inv(a) % P == 1


def test_inv_of_zero_raises():
    with pytest.raises(ValueError):
        field.inv(0)
    with pytest.raises(ValueError):
        field.inv(P)


@given(st.lists(st.integers(min_value=-(P - 1) // 2 + 1, max_value=(P - 1) // 2), min_size=1, max_size=50))
def test_signed_round_trip(values):
    f = field.from_signed(np.array(values, dtype=np.int64))
    assert f.dtype == FIELD_DTYPE
    assert [int(v) for v in f] == [v % P for v in values]
    assert field.to_signed(f).tolist() == values


def test_to_signed_range():
    half = (P - 1) // 2
    got = field.to_signed(np.array([0, half, half + 1, P - 1], dtype=FIELD_DTYPE))
    assert got.tolist() == [0, half, -half, -1]


def test_from_signed_rejects_out_of_range():
    with pytest.raises(ValueError):
        field.from_signed(np.array([P], dtype=np.int64))
    with pytest.raises(TypeError):
        field.from_signed(np.array([0.5]))


@given(st.lists(st.integers(min_value=1, max_value=300), min_size=2, max_size=8, unique=True), st.integers(0, P - 1))
def test_lagrange_interpolates_python_polynomials(xs, x):
    # A random polynomial of degree len(xs) - 1, evaluated in Python ints.
    coeffs = [(7 * i * i + 3 * i + 11) % P for i in range(len(xs))]

    def f(t):
        return sum(c * pow(t, i, P) for i, c in enumerate(coeffs)) % P

    lam0 = field.lagrange_at_zero(tuple(xs))
    assert sum(int(l) * f(xi) for l, xi in zip(lam0, xs)) % P == f(0)
    lam = field.lagrange_at(tuple(xs), x)
    assert sum(int(l) * f(xi) for l, xi in zip(lam, xs)) % P == f(x)


def test_lagrange_is_cached_and_read_only():
    a = field.lagrange_at_zero((1, 2, 3))
    assert field.lagrange_at_zero((1, 2, 3)) is a
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        field.lagrange_at_zero((1, 1))


# --- vault.rng ------------------------------------------------------------------


def test_random_field_shape_dtype_range():
    v = rng.random_field((3, 1000))
    assert v.shape == (3, 1000) and v.dtype == FIELD_DTYPE
    assert int(v.max()) < P
    assert rng.random_field(5).shape == (5,)


def test_random_field_uses_the_seam_at_call_time(monkeypatch):
    calls = []

    def fake(n):
        calls.append(n)
        return bytes(n)

    monkeypatch.setattr(rng, "RANDOM_BYTES", fake)
    assert not rng.random_field((2, 3)).any()
    assert calls == [24]


def test_random_field_rejects_p_and_redraws_only_those(monkeypatch):
    # First draw: [P, 5 | high bit set, P]; redraw of the two rejected: [P, 9]; then [3].
    p_bytes = (2**31 - 1).to_bytes(4, "little")
    stream = [
        p_bytes + (5 | 2**31).to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little"),
        p_bytes + (9).to_bytes(4, "little"),
        (3).to_bytes(4, "little"),
    ]
    sizes = []

    def fake(n):
        sizes.append(n)
        return stream.pop(0)

    monkeypatch.setattr(rng, "RANDOM_BYTES", fake)
    got = rng.random_field(3)
    # 0xFFFFFFFF masks to P and is rejected too; redraws fill positions 0 and 2
    # in order, and position 0 (P again) is redrawn once more.
    assert got.tolist() == [3, 5, 9]
    assert sizes == [12, 8, 4]


def test_random_field_rejects_a_short_source(monkeypatch):
    monkeypatch.setattr(rng, "RANDOM_BYTES", lambda n: bytes(n - 1))
    with pytest.raises(RuntimeError):
        rng.random_field(4)


def test_random_field_is_roughly_uniform():
    # 200,000 draws in 16 equal bins: chi-square with 15 df; 50 is p ~ 1e-5.
    v = rng.random_field(200_000)
    counts = np.bincount((v >> 27).astype(np.int64), minlength=16)
    expected = v.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50


def test_no_numpy_generator_on_the_share_path():
    import inspect

    from vault import integrity, sharing

    for module in (rng, sharing, integrity, field):
        src = inspect.getsource(module)
        assert "np.random" not in src and "default_rng" not in src, module.__name__
