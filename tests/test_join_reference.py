"""join and the pieces under it against plain Python integers: integrity.check
per row and in batches, sharing.reconstruct in one chunk and in many,
codec.from_field against the reference decoder, and join itself (records
[s | t] with the epoch key's shares) on random inputs including tampered and
out-of-field shares."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vault import codec, epoch_mac, field, integrity, record, sharing
from vault.errors import IntegrityError, InvalidShares
from vault.field import FIELD_DTYPE, P

L = integrity.MAC_COUNT
# Widths around the baby-step/giant-step shape changes (d + 3 = 64, 65, 256,
# 257, 1024, 1025), the matcher's 512, and a wide one.
EDGE_WIDTHS = (1, 2, 5, 61, 62, 253, 254, 512, 1021, 1022, 4097)


def _python_tags(s: list[int], keys: list[int]) -> list[int]:
    # t = a^(d+2) + sum_{m=1..d} s_m a^m by Horner over c = [0, s, 0, 1].
    coeffs = [0, *s, 0, 1]
    out = []
    for a in keys:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * a + c) % P
        out.append(acc)
    return out


field_values = st.one_of(st.integers(0, P - 1), st.sampled_from([0, 1, 2, 127, P - 127, P - 2, P - 1]))


# --- integrity.check, sharing.reconstruct and codec.from_field against Python ------------


@pytest.mark.parametrize("d", EDGE_WIDTHS)
@pytest.mark.parametrize("fill", [0, 1, P - 1, None])
def test_tags_at_shape_edges_and_extreme_values_match_python(d, fill):
    gen = np.random.default_rng(d)  # test data only
    s = gen.integers(0, P, size=(2, d), dtype=np.uint64).astype(FIELD_DTYPE)
    if fill is not None:
        s[:] = fill
    ext = integrity.extend(s)
    assert integrity.check(ext).tolist() == [True, True]
    assert integrity.check(ext[1:]).tolist() == [True]
    if d <= 254:
        for row in range(2):
            keys, tags = ext[row, d : d + L].tolist(), ext[row, d + L :].tolist()
            assert tags == _python_tags(s[row].tolist(), keys)


def test_check_one_row_agrees_with_batches():
    ext = integrity.extend(np.arange(40, dtype=FIELD_DTYPE).reshape(4, 10))
    assert integrity.check(ext).tolist() == [True] * 4
    for row in range(4):
        assert integrity.check(ext[row : row + 1]).tolist() == [True]
        bad = ext[row : row + 1].copy()
        bad[0, 3] = (int(bad[0, 3]) + 1) % P
        assert integrity.check(bad).tolist() == [False]



@settings(max_examples=100, deadline=None)
@given(k=st.integers(2, 7), width=st.integers(1, 30), data=st.data())
def test_reconstruct_in_one_chunk_and_in_many_matches_python(k, width, data):
    xs = tuple(data.draw(st.lists(st.integers(1, 255), min_size=k, max_size=k, unique=True)))
    ys = np.array(data.draw(st.lists(field_values, min_size=k * width, max_size=k * width)), dtype=np.uint64)
    ys = ys.reshape(k, 1, width).astype(FIELD_DTYPE)
    fast = sharing.reconstruct(xs, ys)  # one chunk
    with mock.patch.object(sharing, "CHUNK_ELEMENTS", 7):  # the chunked loop
        slow = sharing.reconstruct(xs, ys)
    assert fast.dtype == slow.dtype == FIELD_DTYPE
    assert fast.tolist() == slow.tolist()
    lam = [int(v) for v in field.lagrange_at_zero(xs)]
    want = [sum(lam[j] * int(ys[j, 0, i]) for j in range(k)) % P for i in range(width)]
    assert fast[0].tolist() == want


def _old_from_field(values: np.ndarray) -> np.ndarray:
    # The reference decoder: centred signed values, then int8.
    signed = field.to_signed(values)
    if signed.size and (signed.min() < -codec.QMAX or signed.max() > codec.QMAX):
        raise IntegrityError("The rejoined vector is not a valid template encoding.")
    return signed.astype(np.int8)


@pytest.mark.parametrize("v", [0, 1, 126, 127, 128, 129, 254, 255, P // 2, P - 129, P - 128, P - 127, P - 126, P - 1])
def test_from_field_at_the_code_boundaries(v):
    arr = np.array([v, 3], dtype=FIELD_DTYPE)
    try:
        want = _old_from_field(arr)
    except IntegrityError:
        with pytest.raises(IntegrityError, match="not a valid template encoding"):
            codec.from_field(arr)
    else:
        got = codec.from_field(arr)
        assert got.dtype == np.int8 and got.tolist() == want.tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-127, 127), max_size=50), st.lists(field_values, max_size=3))
def test_from_field_matches_the_reference_decoder(codes, noise):
    arr = codec.to_field(np.array(codes + [0], dtype=np.int8))
    assert codec.from_field(arr).tolist() == _old_from_field(arr).tolist() == codes + [0]
    mixed = np.concatenate([arr, np.array(noise, dtype=FIELD_DTYPE)])
    try:
        want = _old_from_field(mixed).tolist()
    except IntegrityError:
        with pytest.raises(IntegrityError):
            codec.from_field(mixed)
    else:
        assert codec.from_field(mixed).tolist() == want


# --- join (one path) against plain Python integers -----------------------------------


def _records(seed: int, k: int, n: int, d: int):
    # Records [s | t] under a random epoch key, and each node's key share.
    gen = np.random.default_rng(seed)  # test data only
    codes = codec.encode(gen.normal(size=d), d)
    key = gen.integers(0, P, size=(epoch_mac.TAG_COUNT, d), dtype=np.int64).astype(FIELD_DTYPE)
    shares = sharing.split(epoch_mac.extend(codec.to_field(codes), key), k, n)[:, 0, :]
    recs = record.make_records(
        tenant="psp-1", subject="alice", epoch=7, threshold=k, shareholders=n, dimension=d, request_id="r", shares=shares
    )
    key_shares = sharing.split(key.reshape(1, -1), k, n)[:, 0, :]
    keys = [record.KeyShare(epoch=7, index=i + 1, dimension=d, values=record.pack_values(key_shares[i]))
            for i in range(n)]
    return recs, keys, codes[0]


def _copy(rec, **changes):
    return dataclasses.replace(rec, **changes)


def _python_join(recs, keys) -> list[int]:
    # Lagrange at 0, every tag t_l = <b_l, s> and the decoding, all in Python
    # integers; raises IntegrityError as join must.
    first = recs[0]
    d, width = first.dimension, first.dimension + epoch_mac.TAG_COUNT
    xs = [r.index for r in recs]
    ys = [[int.from_bytes((r.values + k.values)[4 * i : 4 * i + 4], "little")
           for i in range(width + epoch_mac.TAG_COUNT * d)] for r, k in zip(recs, keys)]
    lam = []
    for j, xj in enumerate(xs):
        num = den = 1
        for i, xi in enumerate(xs):
            if i != j:
                num, den = num * xi % P, den * (xi - xj) % P
        lam.append(num * pow(den, P - 2, P) % P)
    joined = [sum(lam[j] * ys[j][i] for j in range(len(xs))) % P for i in range(len(ys[0]))]
    s, t, b = joined[:d], joined[d:width], joined[width:]
    for l in range(epoch_mac.TAG_COUNT):
        if sum(s[m] * b[l * d + m] for m in range(d)) % P != t[l]:
            raise IntegrityError("MAC")
    if any(127 < v < P - 127 for v in s):
        raise IntegrityError("encoding")
    return [v if v <= 127 else v - P for v in s]


schemes = st.sampled_from([(2, 3), (3, 5), (2, 5), (4, 7)])
widths = st.sampled_from([1, 3, 16, 61, 512])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scheme=schemes, d=widths, data=st.data())
def test_join_matches_python(seed, scheme, d, data):
    k, n = scheme
    recs, keys, codes = _records(seed, k, n, d)
    order = data.draw(st.permutations(range(n)))[:k]
    chosen, chosen_keys = [recs[i] for i in order], [keys[i] for i in order]
    result = record.join(chosen, chosen_keys)
    assert result.template.dtype == np.int8
    assert result.template.tolist() == codes.tolist() == _python_join(chosen, chosen_keys)
    assert result.used == tuple(r.index for r in chosen) and result.suspects == () and result.epoch == 7


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scheme=schemes, d=widths,
       part=st.sampled_from(["template", "tag", "key"]), delta=st.integers(1, P - 1))
def test_join_rejects_a_tampered_share_as_python_does(seed, scheme, d, part, delta):
    k, n = scheme
    recs, keys, _ = _records(seed, k, n, d)
    recs, keys = recs[:k], keys[:k]
    position = {"template": 0, "tag": d, "key": 0}[part]
    if part == "key":
        v = record.unpack_values(keys[0].values, epoch_mac.TAG_COUNT * d)
        v[position] = (int(v[position]) + delta) % P
        keys = [record.KeyShare(epoch=7, index=1, dimension=d, values=record.pack_values(v)), *keys[1:]]
    else:
        v = record.unpack_values(recs[0].values, d + epoch_mac.TAG_COUNT)
        v[position] = (int(v[position]) + delta) % P
        recs = [_copy(recs[0], values=record.pack_values(v)), *recs[1:]]
    with pytest.raises(IntegrityError):
        _python_join(recs, keys)
    with pytest.raises(IntegrityError):
        record.join(recs, keys)


def test_join_rejects_out_of_field_shares():
    recs, keys, _ = _records(1, 2, 3, 16)
    v = bytearray(recs[1].values)
    v[4 * 5 : 4 * 6] = (P).to_bytes(4, "little")
    with pytest.raises(InvalidShares, match="outside the field"):
        record.join([recs[0], _copy(recs[1], values=bytes(v))], keys[:2])


def test_join_agreement_errors_name_the_first_disagreeing_field():
    recs, keys, _ = _records(3, 2, 3, 16)
    for name, value in (("subject", "bob"), ("epoch", 8), ("dimension", 17)):
        extra = {"values": recs[1].values + b"\x00" * 4} if name == "dimension" else {}
        changed = _copy(recs[1], **{name: value}, **extra)
        with pytest.raises(InvalidShares, match=f"disagree on the {name}"):
            record.join([recs[0], changed], keys[:2])
    both = _copy(recs[1], epoch=8, subject="bob")  # subject comes first
    with pytest.raises(InvalidShares, match="disagree on the subject"):
        record.join([recs[0], both, recs[2]], keys)
