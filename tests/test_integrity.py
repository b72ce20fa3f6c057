"""vault.integrity (the AMD MAC, kept for the refresh check's power tables)
detects corrupt shares; and through record.join, the services' per-epoch MAC
(vault.epoch_mac, with the nodes' key shares) detects corrupt, swapped and
mixed-epoch shares and survives refresh."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from seeded_rng import SeededBytes

from vault import codec, epoch_mac, field, integrity, record, rng, sharing
from vault.errors import IntegrityError, InvalidShares
from vault.field import FIELD_DTYPE, P

L = integrity.MAC_COUNT
# One epoch's MAC key for the record tests (cut to each template's dimension).
_KEY = rng.random_field((epoch_mac.TAG_COUNT, 128))
_KEY_SHARES: dict = {}


def _extend(values: np.ndarray) -> np.ndarray:
    # [s | t] under the epoch key, as the matcher enrols.
    return epoch_mac.extend(values, np.ascontiguousarray(_KEY[:, : values.shape[1]]))


def _join(recs):
    # record.join with each record's node's key share (one sharing of the key per k, n, d).
    r0 = recs[0]
    d, k, n = r0.dimension, r0.threshold, r0.shareholders
    if (k, n, d) not in _KEY_SHARES:
        _KEY_SHARES[(k, n, d)] = sharing.split(np.ascontiguousarray(_KEY[:, :d]).reshape(1, -1), k, n)[:, 0, :]
    shares = _KEY_SHARES[(k, n, d)]
    return record.join(recs, [record.KeyShare(epoch=r.epoch, index=r.index, dimension=d,
                                              values=record.pack_values(shares[r.index - 1])) for r in recs])


VECTORS = json.loads((Path(__file__).parent / "vectors" / "sharing.json").read_text())


def _template(seed: int, d: int = 64) -> np.ndarray:
    # One encoded template as field elements, (1, d). Test data generator only.
    x = np.random.default_rng(seed).normal(size=d)
    return codec.to_field(codec.encode(x, d))


def _python_tag(s: list[int], key: int) -> int:
    # t = a^(d+2) + sum_{m=1..d} s_m a^m, in Python integers.
    d = len(s)
    return (pow(key, d + 2, P) + sum(sm * pow(key, m, P) for m, sm in enumerate(s, start=1))) % P


def test_extend_layout_and_python_tags():
    s = rng.random_field((3, 20))
    ext = integrity.extend(s)
    assert ext.shape == (3, 20 + 2 * L) and ext.dtype == FIELD_DTYPE
    assert np.array_equal(ext[:, :20], s)
    assert np.array_equal(integrity.template_part(ext), s)
    for b in range(3):
        for l in range(L):
            key = int(ext[b, 20 + l])
            assert int(ext[b, 20 + L + l]) == _python_tag([int(v) for v in s[b]], key)
    assert integrity.check(ext).tolist() == [True, True, True]


def test_known_answer_extend(monkeypatch):
    (case,) = VECTORS["integrity"]
    monkeypatch.setattr(rng, "RANDOM_BYTES", SeededBytes(case["seed"].encode()))
    got = integrity.extend(np.array(case["template"], dtype=FIELD_DTYPE))
    assert got.tolist() == case["extended"]


def test_keys_are_fresh_per_template():
    s = np.repeat(_template(1), 4, axis=0)
    ext = integrity.extend(s)
    keys = ext[:, -2 * L : -L]
    assert len({tuple(row) for row in keys.tolist()}) == 4


def test_large_batches_are_chunked_correctly(monkeypatch):
    monkeypatch.setattr(integrity, "_CHUNK_ELEMENTS", 2 * L * 24)  # d=20: 3 blocks of 8, so 2 rows per chunk
    s = rng.random_field((10, 20))
    ext = integrity.extend(s)
    assert integrity.check(ext).all()
    for b in (0, 4, 9):
        assert int(ext[b, 20 + L]) == _python_tag([int(v) for v in s[b]], int(ext[b, 20]))


@pytest.mark.parametrize("position", ["template", "key", "tag"])
def test_any_changed_value_fails_check(position):
    ext = integrity.extend(_template(2))
    d = ext.shape[1] - 2 * L
    column = {"template": 5, "key": d + 1, "tag": d + L + 2}[position]
    for delta in (1, P - 1, 12345):
        bad = ext.copy()
        bad[0, column] = (int(bad[0, column]) + delta) % P
        assert not integrity.check(bad)[0]


def test_check_rejects_bad_input():
    with pytest.raises(InvalidShares):
        integrity.check(np.zeros((1, 2 * L), dtype=FIELD_DTYPE))
    with pytest.raises(InvalidShares):
        integrity.check(np.full((1, 10), P, dtype=np.uint32))
    with pytest.raises(InvalidShares):
        integrity.extend(np.zeros((0, 3), dtype=FIELD_DTYPE))
    with pytest.raises(InvalidShares):
        integrity.extend(np.array([[1.5]]))
    with pytest.raises(InvalidShares):
        integrity.template_part(np.zeros(20, dtype=FIELD_DTYPE))


# --- corrupt shares ------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(2, 3), (3, 5)])
def test_corrupting_any_single_share_of_a_k_subset_is_detected(k, n):
    ext = integrity.extend(_template(3))
    d = ext.shape[1] - 2 * L
    shares = sharing.split(ext, k, n)
    positions = [0, d // 2, d - 1, d, d + L - 1, d + L, d + 2 * L - 1]  # template, keys, tags
    for subset in itertools.combinations(range(n), k):
        xs = [i + 1 for i in subset]
        ys = shares[list(subset)].copy()
        assert integrity.check(sharing.reconstruct(xs, ys))[0]
        for victim in range(k):
            for pos in positions:
                for delta in (1, 2**30):
                    bad = ys.copy()
                    bad[victim, 0, pos] = (int(bad[victim, 0, pos]) + delta) % P
                    assert not integrity.check(sharing.reconstruct(xs, bad))[0], (subset, victim, pos)


def _records(ext_shares: np.ndarray, *, k: int, n: int, d: int, subject: str = "alice", epoch: int = 7):
    # ShareRecords for one split template.
    return record.make_records(
        tenant="psp-1",
        subject=subject,
        epoch=epoch,
        threshold=k,
        shareholders=n,
        dimension=d,
        request_id="enrol-1",
        shares=ext_shares[:, 0, :],
    )


def _corrupt(rec, position: int, delta: int):
    # A copy of rec whose value at position is shifted by delta (mod P).
    values = record.unpack_values(rec.values, len(rec.values) // 4)
    values[position] = (int(values[position]) + delta) % P
    return dataclasses.replace(rec, values=record.pack_values(values))


@pytest.mark.parametrize("k,n", [(2, 3), (3, 5), (4, 7)])
def test_with_k_plus_1_shares_the_bad_index_is_identified(k, n):
    d = 64
    ext = _extend(_template(4, d))
    want = codec.from_field(ext[0, :d])
    recs = _records(sharing.split(ext, k, n), k=k, n=n, d=d)
    for bad_index in range(1, n + 1):
        for pos in (0, d + 1, d + epoch_mac.TAG_COUNT - 1):  # template, tags
            tampered = [(_corrupt(r, pos, 99) if r.index == bad_index else r) for r in recs]
            # Give k + 1 records including the bad one, bad one first.
            chosen = [tampered[bad_index - 1]] + [r for r in tampered if r.index != bad_index][:k]
            result = _join(chosen)
            assert np.array_equal(result.template, want)
            assert result.suspects == (bad_index,)
            assert bad_index not in result.used
            # With only k records including the bad one: detected, not identified.
            with pytest.raises(IntegrityError) as info:
                _join(chosen[:k])
            assert info.value.suspects == ()


def test_a_swapped_share_from_another_subject_is_detected():
    d, k, n = 64, 3, 5
    alice = _records(sharing.split(_extend(_template(5, d)), k, n), k=k, n=n, d=d)
    bob = _records(sharing.split(_extend(_template(6, d)), k, n), k=k, n=n, d=d, subject="bob")
    # A shareholder returns Bob's share relabelled as Alice's.
    swapped = dataclasses.replace(bob[1], subject="alice")
    with pytest.raises(IntegrityError):
        _join([alice[0], swapped, alice[2]])
    result = _join([alice[0], swapped, alice[2], alice[3]])
    assert result.suspects == (2,)
    # Unrelabelled, the metadata alone refuses it.
    with pytest.raises(InvalidShares, match="subject"):
        _join([alice[0], bob[1], alice[2]])


def _refresh(shares: np.ndarray, k: int) -> np.ndarray:
    # Proactive refresh: add a fresh sharing of zero to every share.
    n = shares.shape[0]
    zero = sharing.split(np.zeros(shares.shape[1:], dtype=FIELD_DTYPE), k, n)
    return np.stack([field.add(shares[i], zero[i]) for i in range(n)])


def test_refresh_keeps_the_template_and_the_tags():
    d, k, n = 64, 3, 5
    ext = _extend(_template(7, d))
    old = sharing.split(ext, k, n)
    new = _refresh(old, k)
    assert not np.array_equal(old, new)
    for subset in itertools.combinations(range(n), k):
        xs = [i + 1 for i in subset]
        rejoined = sharing.reconstruct(xs, new[list(subset)])
        assert np.array_equal(rejoined, ext)
        assert epoch_mac.check(rejoined, np.ascontiguousarray(_KEY[:, :d]))[0].all()
    result = _join(_records(new, k=k, n=n, d=d, epoch=8))
    assert np.array_equal(result.template, codec.from_field(ext[0, :d]))
    assert result.epoch == 8


def test_shares_of_two_epochs_do_not_join():
    d, k, n = 64, 3, 5
    old = sharing.split(_extend(_template(8, d)), k, n)
    new = _refresh(old, k)
    e7 = _records(old, k=k, n=n, d=d, epoch=7)
    e8 = _records(new, k=k, n=n, d=d, epoch=8)
    # Honest metadata: refused before any arithmetic.
    with pytest.raises(InvalidShares, match="epoch"):
        _join([e7[0], e8[1], e8[2]])
    # A share relabelled to the other epoch: caught by the MAC.
    relabelled = dataclasses.replace(e7[0], epoch=8)
    with pytest.raises(IntegrityError):
        _join([relabelled, e8[1], e8[2]])
    # The mixed-epoch polynomial is only the old shares' sum with a random one:
    # no k-subset containing it passes; with enough honest shares it is named.
    result = _join([relabelled, e8[1], e8[2], e8[3]])
    assert result.suspects == (1,)


# --- property round trip ---------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    vector=hnp.arrays(np.float32, st.integers(2, 96), elements=st.floats(-100, 100, width=32)),
    kn=st.integers(2, 5).flatmap(lambda k: st.tuples(st.just(k), st.integers(k, 7))),
    data=st.data(),
)
def test_encode_split_join_round_trip(vector, kn, data):
    if not np.any(vector):
        return
    k, n = kn
    d = vector.size
    codes = codec.encode(vector, d)
    shares = sharing.split(_extend(codec.to_field(codes)), k, n)
    recs = _records(shares, k=k, n=n, d=d)
    order = data.draw(st.permutations(range(n)))
    size = data.draw(st.integers(k, n))
    result = _join([recs[i] for i in order[:size]])
    assert np.array_equal(result.template, codes[0])
    assert result.suspects == ()
    assert result.used == tuple(recs[i].index for i in order[:k])
