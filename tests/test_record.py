"""vault.record: packing, record identity, validation, join() bookkeeping, wipe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vault import codec, epoch_mac, record, rng, sharing
from vault.errors import IntegrityError, InvalidShares
from vault.field import FIELD_DTYPE, P
from vaultrpc import wire

L = record.MAC_COUNT
D = 16
_KEYS: dict = {}


def _records(k: int = 2, n: int = 3, d: int = D, seed: int = 0, **overrides):
    # A fresh enrolment's records (tags under an epoch key, whose shares are
    # kept for _join) and its int8 code.
    x = np.random.default_rng(seed).normal(size=d)  # test data only
    codes = codec.encode(x, d)
    key = rng.random_field((L, d))
    shares = sharing.split(epoch_mac.extend(codec.to_field(codes), key), k, n)[:, 0, :]
    fields = dict(tenant="psp-1", subject="alice", epoch=3, threshold=k, shareholders=n, dimension=d, request_id="r-1")
    fields.update(overrides)
    recs = record.make_records(shares=shares, **fields)
    key_shares = sharing.split(key.reshape(1, L * d), k, n)[:, 0, :]
    for r in recs:
        _KEYS[id(r)] = record.KeyShare(epoch=r.epoch, index=r.index, dimension=d,
                                       values=record.pack_values(key_shares[r.index - 1]))
    return recs, codes[0]


def _key_of(rec):
    # The key share of the node that holds rec (a copy made by _copy keeps its original's).
    return _KEYS[id(rec)]


def _join(recs):
    return record.join(recs, [_key_of(r) for r in recs])


def _copy(rec, **changes):
    # A Share like rec with some fields changed (InvalidShares if that makes it invalid).
    out = dataclasses.replace(rec, **changes)
    _KEYS[id(out)] = _KEYS.get(id(rec))
    return out


def _message(rec, **changes):
    # rec's wire message with some fields changed, as a node or the matcher may receive it.
    msg = wire.share_message(rec)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


# --- packing ----------------------------------------------------------------------------


@given(st.lists(st.integers(0, P - 1), max_size=64))
def test_pack_unpack_round_trip(values):
    arr = np.array(values, dtype=FIELD_DTYPE)
    data = record.pack_values(arr)
    assert data == b"".join(v.to_bytes(4, "little") for v in values)
    back = record.unpack_values(data, len(values))
    assert back.tolist() == values and back.dtype == FIELD_DTYPE
    assert back.flags.writeable


@pytest.mark.parametrize(
    "values",
    [np.array([P], dtype=np.uint32), np.array([-1]), np.array([[1]], dtype=np.uint32), np.array([1.0])],
)
def test_pack_rejects(values):
    with pytest.raises(InvalidShares):
        record.pack_values(values)


def test_unpack_rejects():
    with pytest.raises(InvalidShares, match="length"):
        record.unpack_values(b"\x00" * 7, 2)
    with pytest.raises(InvalidShares, match="outside"):
        record.unpack_values(b"\xff\xff\xff\x7f", 1)


# --- identity -----------------------------------------------------------------------------


def test_record_identity_layout():
    got = record.record_identity("t", "sü", 2, 2**40)
    assert got == (
        b"splitvault/record/v1\x00"
        + b"\x00\x00\x00\x01t"
        + b"\x00\x00\x00\x03s\xc3\xbc"
        + b"\x00\x00\x00\x02"
        + (2**40).to_bytes(8, "big")
    )


def test_record_identity_is_unambiguous():
    ids = {
        record.record_identity("ab", "c", 1, 1),
        record.record_identity("a", "bc", 1, 1),
        record.record_identity("a", "bc", 2, 1),
        record.record_identity("a", "bc", 1, 2),
        record.record_identity("a", "bc", 256, 1),
    }
    assert len(ids) == 5


@pytest.mark.parametrize(
    "tenant,subject,index,epoch",
    [("", "s", 1, 0), ("t", "", 1, 0), ("t\n", "s", 1, 0), ("t", "x" * 129, 1, 0), ("t", "s", -1, 0), ("t", "s", 1, 2**64)],
)
def test_record_identity_rejects(tenant, subject, index, epoch):
    with pytest.raises(InvalidShares):
        record.record_identity(tenant, subject, index, epoch)


# --- make_records / Share -----------------------------------------------------


def test_make_records_fields():
    recs, _ = _records(k=3, n=5)
    assert [r.index for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        assert (r.tenant, r.subject, r.epoch, r.threshold, r.shareholders, r.dimension) == ("psp-1", "alice", 3, 3, 5, D)
        assert r.codec_version == codec.CODEC_VERSION and r.mac_count == L
        assert len(r.values) == 4 * (D + L) and r.request_id == "r-1"
        assert isinstance(wire.share(wire.share_message(r)), record.Share)


def test_make_records_rejects_wrong_shape():
    shares = np.zeros((3, D + L), dtype=FIELD_DTYPE)
    with pytest.raises(InvalidShares, match="shape"):
        record.make_records(
            tenant="t", subject="s", epoch=0, threshold=2, shareholders=4, dimension=D, request_id="r", shares=shares
        )
    with pytest.raises(InvalidShares):
        record.make_records(
            tenant="t", subject="", epoch=0, threshold=2, shareholders=3, dimension=D, request_id="r", shares=shares
        )


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"index": 0}, "index"),
        ({"index": 4}, "index"),
        ({"threshold": 1}, "threshold"),
        ({"threshold": 4}, "threshold"),
        ({"shareholders": 256, "threshold": 2}, "threshold"),
        ({"dimension": 0}, "dimension"),
        ({"dimension": codec.MAX_DIMENSION + 1}, "dimension"),
        ({"mac_count": 4}, "MAC count"),
        ({"codec_version": 2}, "codec version"),
        ({"values": b"\x00" * 8}, "length"),
        ({"values": b"\xff\xff\xff\xff" * (D + L)}, "outside the field"),
        ({"tenant": ""}, "tenant"),
        ({"subject": ""}, "subject"),
        ({"subject": "a\x00b"}, "control"),
        ({"tenant": "a\tb"}, "control"),
        ({"subject": "é" * 65}, "128 bytes"),
    ],
)
def test_share_rejects(changes, message):
    # The type refuses to hold it, and so does the wire parse of its message.
    recs, _ = _records()
    with pytest.raises(InvalidShares, match=message):
        _copy(recs[0], **changes)
    with pytest.raises(InvalidShares, match=message):
        wire.share(_message(recs[0], **changes))


def test_share_accepts_limits():
    recs, _ = _records()
    _copy(recs[0], subject="é" * 64, tenant="x" * 128)
    wire.share(_message(recs[0], subject="é" * 64, tenant="x" * 128))
    with pytest.raises(InvalidShares):
        wire.share("not a record")


# --- join ---------------------------------------------------------------------------------


def test_join_basic():
    recs, codes = _records(k=3, n=5)
    result = _join(recs[2:])
    assert np.array_equal(result.template, codes)
    assert result.template.dtype == np.int8 and result.template.shape == (D,)
    assert result.used == (3, 4, 5) and result.suspects == () and result.epoch == 3


def test_join_reports_an_extra_inconsistent_share_even_when_first_k_pass():
    recs, codes = _records(k=2, n=4)
    values = record.unpack_values(recs[3].values, D + L)
    values[0] = (int(values[0]) + 1) % P
    bad = _copy(recs[3], values=record.pack_values(values))
    result = _join([recs[0], recs[1], bad])
    assert np.array_equal(result.template, codes)
    assert result.used == (1, 2) and result.suspects == (4,)


@pytest.mark.parametrize(
    "name,value",
    [
        ("tenant", "psp-2"),
        ("subject", "bob"),
        ("epoch", 4),
        ("threshold", 3),
        ("shareholders", 4),
        ("codec_version", 1),  # equal: must not be reported
    ],
)
def test_join_requires_agreement(name, value):
    recs, _ = _records(k=2, n=3)
    other = _copy(recs[1], **{name: value})
    if getattr(recs[0], name) == value:
        _join([recs[0], other])
        return
    with pytest.raises(InvalidShares) as info:
        _join([recs[0], other])
    assert name.replace("_", " ") in str(info.value)
    # The message names the field, never the values.
    assert str(value) not in str(info.value).replace(name, "")


def test_join_dimension_disagreement():
    a, _ = _records(d=D)
    b, _ = _records(d=D + 1)
    with pytest.raises(InvalidShares, match="dimension"):
        _join([a[0], _copy(b[1], subject="alice")])


def test_join_bookkeeping_errors():
    recs, _ = _records(k=3, n=5)
    with pytest.raises(InvalidShares, match="No share records"):
        _join([])
    with pytest.raises(InvalidShares, match="Fewer"):
        _join(recs[:2])
    with pytest.raises(InvalidShares, match="distinct"):
        _join([recs[0], recs[0], recs[1]])
    with pytest.raises(InvalidShares, match="outside the field"):
        _join([recs[0], recs[1], _copy(recs[2], values=b"\xff" * len(recs[2].values))])


def test_join_with_two_bad_shares_and_enough_good_ones():
    recs, codes = _records(k=2, n=5)
    tampered = []
    for r in recs:
        if r.index in (1, 3):
            v = record.unpack_values(r.values, D + L)
            v[D] = (int(v[D]) + 5) % P
            r = _copy(r, values=record.pack_values(v))
        tampered.append(r)
    result = _join(tampered)
    assert np.array_equal(result.template, codes)
    assert result.used == (2, 4) and result.suspects == (1, 3)


def test_join_gives_up_after_max_subset_trials(monkeypatch):
    recs, _ = _records(k=2, n=5)
    v = record.unpack_values(recs[0].values, D + L)
    v[0] = (int(v[0]) + 1) % P
    bad = _copy(recs[0], values=record.pack_values(v))
    monkeypatch.setattr(record, "MAX_SUBSET_TRIALS", 1)
    with pytest.raises(IntegrityError):
        _join([bad] + recs[1:])
    monkeypatch.setattr(record, "MAX_SUBSET_TRIALS", 1024)
    assert _join([bad] + recs[1:]).suspects == (1,)


def test_join_wipes_its_intermediates(monkeypatch):
    seen = []
    real = record.wipe

    def spy(*arrays):
        seen.extend(a for a in arrays if a is not None)
        real(*arrays)

    monkeypatch.setattr(record, "wipe", spy)
    recs, _ = _records(k=2, n=3)
    _join(recs)
    # The stacked shares, the rejoined extended vector and every unpacked copy.
    assert len(seen) >= 3 + 2
    assert all(not a.any() for a in seen)


def test_join_refuses_a_key_share_of_another_node_or_epoch():
    recs, codes = _records(k=2, n=3)
    keys = [_key_of(r) for r in recs[:2]]
    assert np.array_equal(record.join(recs[:2], keys).template, codes)
    with pytest.raises(InvalidShares, match="key share"):
        record.join(recs[:2], keys[:1])
    for change in ({"index": 3}, {"epoch": 4}, {"dimension": D + 1}, {"values": b"\x00" * 8}):
        with pytest.raises(InvalidShares, match="key share"):
            record.join(recs[:2], [keys[0], dataclasses.replace(keys[1], **change)])


def test_join_fails_when_the_key_of_the_same_nodes_does_not_fit_the_tags():
    # A wrong key share is as bad as a wrong record share: the subset fails,
    # another one passes and the node is named.
    recs, codes = _records(k=2, n=4)
    keys = [_key_of(r) for r in recs]
    v = record.unpack_values(keys[0].values, L * D)
    v[0] = (int(v[0]) + 1) % P
    bad = record.KeyShare(epoch=keys[0].epoch, index=1, dimension=D, values=record.pack_values(v))
    with pytest.raises(IntegrityError):
        record.join(recs[:2], [bad, keys[1]])
    result = record.join(recs, [bad, *keys[1:]])
    assert np.array_equal(result.template, codes) and result.suspects == (1,)


def test_wipe():
    a = np.arange(10, dtype=np.uint32)
    b = np.ones((2, 2), dtype=np.int8)
    record.wipe(a, None, b)
    assert not a.any() and not b.any()
    record.wipe(np.frombuffer(b"\x01\x02", dtype=np.uint8))  # read-only: skipped
    with pytest.raises(TypeError):
        record.wipe([1, 2])


def test_late_shares_are_checked_against_the_polynomial_that_passed():
    # The check the matcher runs on (share, key share) pairs that arrive after the decision's k.
    code = codec.encode(np.linspace(-1, 1, D), D)
    key = rng.random_field((epoch_mac.TAG_COUNT, D))
    key_shares = sharing.split(key.reshape(1, -1), 2, 3)[:, 0, :]
    keys = [record.KeyShare(epoch=1, index=i + 1, dimension=D, values=record.pack_values(key_shares[i]))
            for i in range(3)]

    def records():
        shares = sharing.split(epoch_mac.extend(codec.to_field(code), key), 2, 3)
        recs = record.make_records(tenant="acme", subject="s", epoch=1, threshold=2, shareholders=3, dimension=D,
                                   request_id="r", shares=shares[:, 0, :])
        return list(zip(recs, keys))

    good, other = records(), records()
    assert list(record.off_polynomial(good[:2], [good[2]])) == []
    assert list(record.off_polynomial(good[:2], [other[2]])) == [3]
    assert list(record.off_polynomial([good[0], good[2]], [other[1]])) == [2]
    # A key share off the polynomial is named as a share is.
    wrong_key = record.KeyShare(epoch=1, index=3, dimension=D, values=keys[0].values)
    assert list(record.off_polynomial(good[:2], [(good[2][0], wrong_key)])) == [3]
