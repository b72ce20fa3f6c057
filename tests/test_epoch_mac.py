"""vault.epoch_mac: per-epoch linear MACs renewed at refresh.

Known answers computed independently in pure Python, every k-subset, round
trips, renewal among in-process nodes, privacy (statistical), and the
attacks: a past matcher (who saw s, b and t of a rejoin) plus one node forges
a substituted template in the epoch it saw, and fails after one renewal; a
malicious refresh or renewal dealer is detected, never passes a changed s.
"""

from __future__ import annotations

import hashlib
import itertools
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from seeded_rng import SeededBytes
from stats_kit import chi2_critical, two_sample_chi2

from vault import codec, epoch_mac, field, proactive, rng, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

L = epoch_mac.TAG_COUNT
D = 24


# --- independent pure-Python references --------------------------------------------


def _py_inner(row, key_row) -> int:
    return sum(int(a) * int(b) for a, b in zip(row, key_row)) % P


def _py_stream(seed: bytes, label: bytes, count: int) -> list[int]:
    # AES-256-CTR from SHA-256(label)[:12] || 0, little-endian u32, 31 bits, P skipped.
    nonce = hashlib.sha256(label).digest()[:12] + bytes(4)
    enc = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()
    out: list[int] = []
    while len(out) < count:
        (word,) = struct.unpack("<I", enc.update(bytes(4)))
        if word & 0x7FFFFFFF != P:
            out.append(word & 0x7FFFFFFF)
    return out


def _py_poly(coeffs: list[int], x: int) -> int:
    return sum(c * x**i for i, c in enumerate(coeffs)) % P


def _templates(batch: int, d: int = D, seed: int = 0) -> np.ndarray:
    # Encoded int8 templates as field elements (test data only).
    gen = np.random.default_rng(seed)
    return codec.to_field(codec.encode(gen.normal(size=(batch, d)), d))


def _subjects(batch: int) -> list[tuple[str, str]]:
    return [("acme", f"subject-{i}") for i in range(batch)]


# --- in-process nodes --------------------------------------------------------------


class Node:
    """One shareholder's state for the math: its x, key share and record shares."""

    def __init__(self, x: int):
        self.x = x
        self.key: np.ndarray | None = None
        self.records: np.ndarray | None = None
        self.seed = proactive.new_seed()


def _deal_keys(nodes: list[Node], epoch: int, k: int, d: int, tamper=None) -> list[np.ndarray]:
    # Every node deals its key contribution to every node; returns the new key shares.
    for node in nodes:
        node.seed = proactive.new_seed()  # a fresh session seed per epoch
    shares = []
    for receiver in nodes:
        parts = []
        for dealer in nodes:
            v = epoch_mac.key_contribution(dealer.seed, epoch, k, d, receiver.x)
            if tamper is not None:
                v = tamper("key", dealer.x, receiver.x, v)
            parts.append(v)
        shares.append(epoch_mac.key_share(parts))
    return shares


def _cluster(n: int, k: int, templates: np.ndarray) -> tuple[list[Node], np.ndarray]:
    # Epoch 1: nodes deal the key; the enrolling matcher rejoins it from k shares,
    # extends and splits. Returns the nodes and the key (for assertions only).
    d = templates.shape[1]
    nodes = [Node(x) for x in range(1, n + 1)]
    for node, share in zip(nodes, _deal_keys(nodes, 1, k, d)):
        node.key = share
    key = epoch_mac.rejoin_key([nd.x for nd in nodes[:k]], np.stack([nd.key for nd in nodes[:k]]))
    shares = sharing.split(epoch_mac.extend(templates, key), k, n)
    for node in nodes:
        node.records = shares[node.x - 1]
    return nodes, key


def _refresh(nodes: list[Node], k: int, epoch: int, subjects, tamper=None) -> None:
    """Refresh to ``epoch`` with MAC renewal, as the nodes would run it.

    ``tamper(kind, dealer, receiver, value) -> value`` lets a test play a
    malicious node: kind is "key" (its key contribution), "h" (its product
    value, receiver None), "g" (its degree-reduction value) or "delta" (its
    zero-sharing delta of the template part).
    """
    tamper = tamper or (lambda kind, dealer, receiver, value: value)
    d = nodes[0].records.shape[1] - L
    old_keys = {nd.x: nd.key for nd in nodes}
    new_keys = dict(zip([nd.x for nd in nodes], _deal_keys(nodes, epoch, k, d, tamper)))
    committee = epoch_mac.renewal_nodes([nd.x for nd in nodes], k)
    by_x = {nd.x: nd for nd in nodes}
    products = {
        j: tamper("h", j, None, epoch_mac.product_share(by_x[j].records, old_keys[j], new_keys[j])) for j in committee
    }
    for node in nodes:
        g = np.stack([
            tamper("g", j, node.x, epoch_mac.renewal_values(by_x[j].seed, subjects, epoch, k, products[j], node.x))
            for j in committee
        ])
        new_tags = epoch_mac.renewed_tags(committee, g, k)
        deltas = [tamper("delta", dl.x, node.x, proactive.refresh_deltas(dl.seed, subjects, k, d, node.x)) for dl in nodes]
        node.next_records = epoch_mac.renew_share(node.records, deltas, new_tags)
    for node in nodes:
        node.records, node.key = node.next_records, new_keys[node.x]
        del node.next_records


def _rejoin(nodes: list[Node], subset) -> tuple[np.ndarray, np.ndarray]:
    # What a matcher does: rejoin [s | t] and b from the subset's released shares.
    chosen = [nd for nd in nodes if nd.x in subset]
    xs = [nd.x for nd in chosen]
    ext = sharing.reconstruct(xs, np.stack([nd.records for nd in chosen]))
    key = epoch_mac.rejoin_key(xs, np.stack([nd.key for nd in chosen]))
    return ext, key


# --- known answers -----------------------------------------------------------------


def test_inner_products_known_answers():
    s = np.array([[1, 2, 3], [P - 1, P - 2, 5], [0, 0, 0]], dtype=FIELD_DTYPE)
    b = np.array([[5, 6, 7], [P - 1, 1, 0], [2**30, 3, P - 1]], dtype=FIELD_DTYPE)
    # Row 0: 5 + 12 + 21 = 38; -1 + 2 = 1; 2^30 + 6 - 3 = 2^30 + 3.
    assert epoch_mac.tags(s, b)[0].tolist() == [38, 1, 2**30 + 3]
    # Row 1 is (-1, -2, 5): -5 - 12 + 35 = 18; 1 - 2 = -1; -2^30 - 6 - 5 = -(2^30 + 11).
    assert epoch_mac.tags(s, b)[1].tolist() == [18, P - 1, P - 2**30 - 11]
    assert epoch_mac.tags(s, b)[2].tolist() == [0, 0, 0]
    # The largest values over a width that needs two column chunks (> 2**11).
    big = np.full((2, 5000), P - 1, dtype=FIELD_DTYPE)
    assert (epoch_mac.tags(big, np.full((L, 5000), P - 1, dtype=FIELD_DTYPE)) == 5000 % P).all()


@pytest.mark.parametrize("d", [1, 7, 512, 2048, 2049, 4100])
def test_inner_products_match_python_integers(d):
    gen = np.random.default_rng(d)
    s = gen.integers(0, P, (5, d)).astype(FIELD_DTYPE)
    b = gen.integers(0, P, (L, d)).astype(FIELD_DTYPE)
    expected = [[_py_inner(s[r], b[l]) for l in range(L)] for r in range(5)]
    assert epoch_mac.tags(s, b).tolist() == expected


def test_inner_products_over_row_chunks(monkeypatch):
    monkeypatch.setattr(epoch_mac, "_ROW_CHUNK", 3)
    gen = np.random.default_rng(3)
    s = gen.integers(0, P, (10, 9)).astype(FIELD_DTYPE)
    b = gen.integers(0, P, (L, 9)).astype(FIELD_DTYPE)
    assert epoch_mac.tags(s, b).tolist() == [[_py_inner(s[r], b[l]) for l in range(L)] for r in range(10)]


@pytest.mark.parametrize("k,x", [(2, 1), (3, 2), (4, 7)])
def test_key_contribution_known_answer(k, x):
    seed, epoch, d = bytes(range(32)), 5, 6
    got = epoch_mac.key_contribution(seed, epoch, k, d, x)
    for l in range(L):
        label = b"splitvault/epoch-mac-key/v1\x00" + struct.pack(">QIII", epoch, k, d, l)
        stream = _py_stream(seed, label, k * d)
        for m in range(d):
            coeffs = [stream[m + i * d] for i in range(k)]  # constant, c_1, ..., c_{k-1}
            assert int(got[l, m]) == _py_poly(coeffs, x)


def test_renewal_values_known_answer():
    seed, epoch, k, x = bytes(range(32, 64)), 9, 3, 4
    subjects = _subjects(2)
    h = np.array([[1, 2, 3], [P - 1, 0, 2**30]], dtype=FIELD_DTYPE)
    got = epoch_mac.renewal_values(seed, subjects, epoch, k, h, x)
    for r, (tenant, subject) in enumerate(subjects):
        label = proactive.record_label(b"splitvault/epoch-mac-renew/v1\x00" + struct.pack(">Q", epoch), tenant, subject, k, L)
        stream = _py_stream(seed, label, (k - 1) * L)
        for l in range(L):
            coeffs = [int(h[r, l])] + [stream[i * L + l] for i in range(k - 1)]
            assert int(got[r, l]) == _py_poly(coeffs, x)


def test_product_share_known_answer():
    # One node's shares: s = (3, 4), t = (10, 20, 30); old key rows, new key rows.
    rec = np.array([[3, 4, 10, 20, 30]], dtype=FIELD_DTYPE)
    old = np.array([[1, 1], [0, 0], [P - 1, 2]], dtype=FIELD_DTYPE)
    new = np.array([[2, 3], [5, 0], [0, 0]], dtype=FIELD_DTYPE)
    # h_l = t_l + <new_l - old_l, s>: 10 + (1*3 + 2*4) = 21; 20 + 15 = 35; 30 + (1*3 - 2*4) = 25
    assert epoch_mac.product_share(rec, old, new).tolist() == [[21, 35, 25]]


# --- every subset, round trips -----------------------------------------------------


COMMITTEES = [(2, 3), (2, 4), (2, 5), (3, 5)]  # every (k, n) with n in 3..5 and 2k - 1 <= n


@pytest.mark.parametrize("k,n", COMMITTEES)
def test_every_k_subset_rejoins_key_and_passes_before_and_after_renewal(k, n):
    s = _templates(5)
    subjects = _subjects(5)
    nodes, key = _cluster(n, k, s)
    for subset in itertools.combinations(range(1, n + 1), k):
        ext, b = _rejoin(nodes, subset)
        assert np.array_equal(b, key) and np.array_equal(ext[:, :D], s)
        assert epoch_mac.check(ext, b).all()
    _refresh(nodes, k, 2, subjects)
    new_key = _rejoin(nodes, range(1, k + 1))[1]
    assert not np.array_equal(new_key, key)
    for subset in itertools.combinations(range(1, n + 1), k):
        ext, b = _rejoin(nodes, subset)
        assert np.array_equal(b, new_key) and np.array_equal(ext[:, :D], s)
        assert epoch_mac.check(ext, b).all()
        assert not epoch_mac.check(ext, key).any()  # the old key is worth nothing
    # And again: tags stay valid through any number of renewals.
    _refresh(nodes, k, 3, subjects)
    ext, b = _rejoin(nodes, range(n - k + 1, n + 1))
    assert np.array_equal(ext[:, :D], s) and epoch_mac.check(ext, b).all()


def test_renewal_by_more_than_2k_minus_1_dealers_is_the_same():
    # The product has degree 2k - 2: Lagrange over all n >= 2k - 1 points gives the same value.
    k, n = 2, 5
    s = _templates(4)
    nodes, _ = _cluster(n, k, s)
    new_keys = _deal_keys(nodes, 2, k, D)
    every = tuple(range(1, n + 1))
    h = {nd.x: epoch_mac.product_share(nd.records, nd.key, new_keys[nd.x - 1]) for nd in nodes}
    subjects = _subjects(4)
    t_all = [epoch_mac.renewed_tags(every, np.stack([epoch_mac.renewal_values(nodes[j - 1].seed, subjects, 2, k, h[j], x)
                                                     for j in every]), k) for x in (1, 2)]
    b2 = sharing.reconstruct([1, 2], np.stack(new_keys[:2]))
    assert np.array_equal(sharing.reconstruct([1, 2], np.stack(t_all)), epoch_mac.tags(s, b2))


def _reshare(nodes: list[Node], k: int, k2: int, n2: int, epoch: int, subjects, tamper=None) -> list[Node]:
    # k old nodes move records and key shares to a new committee of n2 (same epoch key).
    tamper = tamper or (lambda kind, dealer, receiver, value: value)
    senders = nodes[:k]
    xs = [nd.x for nd in senders]
    new_nodes = [Node(x) for x in range(1, n2 + 1)]
    for nd in new_nodes:
        nd.records = proactive.combine(xs, np.stack([
            tamper("record", sd.x, nd.x, proactive.reshare_values(sd.seed, subjects, sd.records, k2, nd.x)) for sd in senders
        ]))
        nd.key = proactive.combine(xs, np.stack([
            epoch_mac.reshare_key_values(sd.seed, epoch, sd.key, k2, nd.x) for sd in senders
        ]))
    return new_nodes


@pytest.mark.parametrize("k,n,k2,n2", [(2, 3, 3, 5), (3, 5, 2, 3), (2, 3, 2, 4)])
def test_reshare_moves_key_and_records_and_the_next_refresh_renews(k, n, k2, n2):
    s = _templates(6)
    subjects = _subjects(6)
    nodes, key = _cluster(n, k, s)
    new_nodes = _reshare(nodes, k, k2, n2, 1, subjects)
    for subset in itertools.combinations(range(1, n2 + 1), k2):
        ext, b = _rejoin(new_nodes, subset)
        assert np.array_equal(b, key) and np.array_equal(ext[:, :D], s)  # same key, same tags
        assert epoch_mac.check(ext, b).all()
    _refresh(new_nodes, k2, 2, subjects)
    ext, b = _rejoin(new_nodes, range(1, k2 + 1))
    assert not np.array_equal(b, key) and np.array_equal(ext[:, :D], s) and epoch_mac.check(ext, b).all()
    # The key reshare stream is not a record's: same seed, different values.
    seed = proactive.new_seed()
    assert not np.array_equal(epoch_mac.reshare_key_values(seed, 1, key, 2, 1),
                              proactive.reshare_values(seed, [("acme", "x")] * L, key, 2, 1))


def test_limit_a_reshare_during_a_matcher_compromise_keeps_a_substitution():
    # The documented limit (docs/architecture.md): a reshare keeps the epoch's
    # key, so a CURRENT matcher (who knows it) plus one sending node can deal a
    # consistent substitution with valid tags, and renewal carries it on.
    s, face = _templates(20, seed=1), _templates(20, seed=2)
    subjects = _subjects(20)
    nodes, key = _cluster(3, 2, s)
    e = field.sub(face, s)
    lam = int(field.lagrange_at_zero((1, 2))[0])
    shift = field.mul(np.concatenate([e, epoch_mac.inner_products(e, key)], axis=1),
                      np.full(1, field.inv(lam), dtype=FIELD_DTYPE))

    def tamper(kind, dealer, receiver, value):
        return field.add(value, shift) if kind == "record" and dealer == 1 else value

    new_nodes = _reshare(nodes, 2, 2, 3, 1, subjects, tamper)
    _refresh(new_nodes, 2, 2, subjects)
    ext, b = _rejoin(new_nodes, (2, 3))
    assert np.array_equal(ext[:, :D], face) and epoch_mac.check(ext, b).all()


def test_k_minus_1_shares_do_not_rejoin_the_key():
    nodes, key = _cluster(5, 3, _templates(2))
    ext, b = _rejoin(nodes, (1, 2))
    assert not np.array_equal(b, key)
    assert not epoch_mac.check(ext, b).any()


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 40),
    batch=st.integers(1, 6),
    kn=st.sampled_from(COMMITTEES),
    data=st.data(),
)
def test_round_trip_property(d, batch, kn, data):
    k, n = kn
    s = np.array(data.draw(st.lists(st.lists(st.integers(0, P - 1), min_size=d, max_size=d), min_size=batch, max_size=batch)),
                 dtype=FIELD_DTYPE)
    b = np.array(data.draw(st.lists(st.lists(st.integers(0, P - 1), min_size=d, max_size=d), min_size=L, max_size=L)),
                 dtype=FIELD_DTYPE)
    ext = epoch_mac.extend(s, b)
    assert ext[:, d:].tolist() == [[_py_inner(row, b[l]) for l in range(L)] for row in s]
    assert epoch_mac.check(ext, b).all()
    # Renewal of these records among n nodes: any k rejoin to s and tags valid under b'.
    nodes = [Node(x) for x in range(1, n + 1)]
    key_shares = sharing.split(b, k, n)
    shares = sharing.split(ext, k, n)
    for node in nodes:
        node.key, node.records = key_shares[node.x - 1], shares[node.x - 1]
    _refresh(nodes, k, 7, _subjects(batch))
    subset = data.draw(st.sampled_from(list(itertools.combinations(range(1, n + 1), k))))
    ext2, b2 = _rejoin(nodes, subset)
    assert np.array_equal(ext2[:, :d], s)
    assert ext2[:, d:].tolist() == [[_py_inner(row, b2[l]) for l in range(L)] for row in s]


def test_renewal_needs_2k_minus_1_nodes():
    assert epoch_mac.renewal_nodes([3, 1, 2, 5], 2) == (1, 2, 3)
    with pytest.raises(InvalidShares, match="2k - 1"):
        epoch_mac.renewal_nodes([1, 2, 3, 4], 3)
    with pytest.raises(InvalidShares, match="2k - 1"):
        epoch_mac.renewal_nodes([1, 2], 2)
    with pytest.raises(InvalidShares, match="2k - 1"):
        epoch_mac.renewed_tags([1, 2], np.zeros((2, 1, L), dtype=FIELD_DTYPE), 2)
    with pytest.raises(InvalidShares, match="distinct"):
        epoch_mac.renewal_nodes([1, 1, 2], 2)


def test_dealing_is_deterministic_and_separated():
    seed = proactive.new_seed()
    a = epoch_mac.key_contribution(seed, 4, 2, 8, 1)
    assert np.array_equal(a, epoch_mac.key_contribution(seed, 4, 2, 8, 1))
    assert not np.array_equal(a, epoch_mac.key_contribution(seed, 5, 2, 8, 1))  # epoch-bound
    # The key stream is not the refresh stream of the same seed.
    assert not np.array_equal(a[:, :8], proactive.refresh_deltas(seed, [("acme", "x")], 2, 8, 1))
    h = np.arange(6, dtype=FIELD_DTYPE).reshape(2, 3)
    g1 = epoch_mac.renewal_values(seed, _subjects(2), 4, 2, h, 1)
    g1_rev = epoch_mac.renewal_values(seed, _subjects(2)[::-1], 4, 2, h[::-1], 1)[::-1]
    assert np.array_equal(g1, g1_rev)  # per record, whatever the batch order
    # The dealt polynomial goes through h at 0.
    pts = np.stack([epoch_mac.renewal_values(seed, _subjects(2), 4, 2, h, x) for x in (1, 2)])
    assert np.array_equal(sharing.reconstruct([1, 2], pts), h)


def test_invalid_input_is_refused():
    b = np.zeros((L, 4), dtype=FIELD_DTYPE)
    with pytest.raises(InvalidShares, match="rows"):
        epoch_mac.tags(np.zeros((1, 4), dtype=FIELD_DTYPE), np.zeros((2, 4), dtype=FIELD_DTYPE))
    with pytest.raises(InvalidShares, match="dimension"):
        epoch_mac.tags(np.zeros((1, 5), dtype=FIELD_DTYPE), b)
    with pytest.raises(InvalidShares, match="outside the field"):
        epoch_mac.tags(np.full((1, 4), P, dtype=np.uint32), b)
    with pytest.raises(InvalidShares, match="dimension"):
        epoch_mac.check(np.zeros((1, 9), dtype=FIELD_DTYPE), b)
    with pytest.raises(InvalidShares, match="epoch"):
        epoch_mac.key_contribution(bytes(32), -1, 2, 4, 1)
    with pytest.raises(InvalidShares, match="threshold"):
        epoch_mac.key_contribution(bytes(32), 1, 1, 4, 1)
    with pytest.raises(InvalidShares, match="x-coordinates"):
        epoch_mac.key_contribution(bytes(32), 1, 2, 4, 0)
    with pytest.raises(InvalidShares, match="records"):
        epoch_mac.renewal_values(bytes(32), _subjects(2), 1, 2, np.zeros((1, L), dtype=FIELD_DTYPE), 1)


# --- privacy -----------------------------------------------------------------------

COUNT = 40_000


@pytest.fixture
def seeded(monkeypatch):
    monkeypatch.setattr(rng, "RANDOM_BYTES", SeededBytes(b"epoch mac privacy"))


def _hist(*cols: np.ndarray) -> np.ndarray:
    # Joint histogram of the top 3 bits of each column.
    idx = np.zeros(cols[0].shape, dtype=np.int64)
    for c in cols:
        idx = idx * 8 + (c >> 28).astype(np.int64)
    return np.bincount(idx, minlength=8 ** len(cols))


def _record_shares_view(k: int, n: int, secret: int, xs) -> list[np.ndarray]:
    # COUNT records of d = 1 with the same template value, under one random key:
    # the template and tag shares that the coalition xs sees.
    key = rng.random_field((L, 1))
    s = np.full((COUNT, 1), secret, dtype=FIELD_DTYPE)
    shares = sharing.split(epoch_mac.extend(s, key), k, n)
    return [shares[x - 1, :, c] for x in xs for c in (0, 1)]


def test_k_minus_1_record_shares_are_independent_of_the_template(seeded):
    a = _record_shares_view(3, 5, 0, (2, 4))
    b = _record_shares_view(3, 5, 2**30 + 12_345, (2, 4))
    stat, df = two_sample_chi2(_hist(*a), _hist(*b))
    assert stat < chi2_critical(df), (stat, df)


def test_the_privacy_statistic_sees_k_shares(seeded):
    a = _record_shares_view(2, 3, 0, (1, 2))
    b = _record_shares_view(2, 3, 2**30 + 12_345, (1, 2))
    stat, df = two_sample_chi2(_hist(a[0], a[2]), _hist(b[0], b[2]))
    assert stat > 10 * chi2_critical(df), (stat, df)


def _renewal_view(secret: int) -> list[np.ndarray]:
    # k = 2, n = 3: what node 1 receives in a renewal of COUNT records of d = 1
    # holding the same template value: the g_j(1) of the two other dealers, and
    # its new tag share that it computes from them.
    subjects = [("acme", f"s{i}") for i in range(COUNT)]
    nodes = [Node(x) for x in (1, 2, 3)]
    key_shares = sharing.split(rng.random_field((L, 1)), 2, 3)
    s = np.full((COUNT, 1), secret, dtype=FIELD_DTYPE)
    key = sharing.reconstruct([1, 2], key_shares[:2])
    shares = sharing.split(epoch_mac.extend(s, key), 2, 3)
    for node in nodes:
        node.key, node.records = key_shares[node.x - 1], shares[node.x - 1]
    seen: list[np.ndarray] = []

    def tamper(kind, dealer, receiver, value):
        if kind == "g" and receiver == 1 and dealer != 1:
            seen.append(value[:, 0].copy())
        return value

    _refresh(nodes, 2, 2, subjects, tamper)
    return [nodes[0].records[:, 1], *seen]


def test_renewal_reveals_nothing_to_one_node(seeded):
    a = _renewal_view(0)
    b = _renewal_view(2**30 + 12_345)
    stat, df = two_sample_chi2(_hist(a[0], a[1], a[2]), _hist(b[0], b[1], b[2]))
    assert stat < chi2_critical(df), (stat, df)


# --- the attacks -------------------------------------------------------------------


def _forge(ext_seen, key_seen, target, k_subset, attacker_x, key_for_tags):
    """The past matcher's forgery: offsets for the attacker's record share.

    It knows s (from ext_seen) and picks the target face; E = target - s and
    dt_l = <key_l, E>; its share is shifted by (E, dt) / lambda_attacker so
    that the Lagrange-weighted rejoin over k_subset is (s + E, t + dt).
    """
    d = target.shape[1]
    e = field.sub(target, ext_seen[:, :d])
    dt = epoch_mac.inner_products(e, key_for_tags)
    lam = int(field.lagrange_at_zero(tuple(k_subset))[list(k_subset).index(attacker_x)])
    inv = np.full(1, field.inv(lam), dtype=FIELD_DTYPE)
    return field.mul(np.concatenate([e, dt], axis=1), inv)


TRIALS = 200


def test_past_matcher_plus_one_node_forges_in_the_epoch_it_saw():
    # Control: the attack works while the key is the one the matcher saw,
    # so the assertion after renewal below is not vacuous.
    s, face = _templates(TRIALS, seed=1), _templates(TRIALS, seed=2)
    nodes, _ = _cluster(3, 2, s)
    seen_ext, seen_key = _rejoin(nodes, (1, 2))  # a verification it ran
    offset = _forge(seen_ext, seen_key, face, (1, 2), 1, seen_key)
    nodes[0].records = field.add(nodes[0].records, offset)  # node 1 releases a shifted share
    ext, key = _rejoin(nodes, (1, 2))
    assert np.array_equal(ext[:, :D], face)  # the attacker's face is rejoined ...
    assert epoch_mac.check(ext, key).all()  # ... and every tag passes: forged.
    assert codec.cosine(codec.from_field(ext[:1, :D]), codec.from_field(face[:1])) > 0.999


@pytest.mark.parametrize("cluster_seed", range(10))  # 10 independent key histories x 200 records
def test_the_same_forgery_fails_after_one_renewal(cluster_seed):
    s, face = _templates(TRIALS, seed=100 + cluster_seed), _templates(TRIALS, seed=200 + cluster_seed)
    subjects = _subjects(TRIALS)
    nodes, _ = _cluster(3, 2, s)
    seen_ext, seen_key = _rejoin(nodes, (1, 2))
    _refresh(nodes, 2, 2, subjects)  # one refresh; the attacker still holds node 1
    own_key = nodes[0].key
    lam1 = field.lagrange_at_zero((1, 2))[0]
    guesses = {
        "old key": seen_key,
        "own new key share": own_key,
        "own share as if the key": field.mul(own_key, np.full(1, int(lam1), dtype=FIELD_DTYPE)),
        "zero": np.zeros_like(seen_key),
    }
    honest = nodes[0].records.copy()
    for subset in ((1, 2), (1, 3)):
        for name, guess in guesses.items():
            nodes[0].records = field.add(honest, _forge(seen_ext, seen_key, face, subset, 1, guess))
            ext, key = _rejoin(nodes, subset)
            assert np.array_equal(ext[:, :D], face)  # the template was shifted ...
            assert not epoch_mac.check(ext, key).any(), name  # ... and every tag of every trial fails
    nodes[0].records = honest
    ext, key = _rejoin(nodes, (1, 2))
    assert epoch_mac.check(ext, key).all()  # control: honest shares still pass


def test_key_share_errors_alone_never_change_the_decision():
    s = _templates(50)
    nodes, _ = _cluster(3, 2, s)
    gen = np.random.default_rng(5)
    nodes[0].key = field.add(nodes[0].key, gen.integers(1, P, nodes[0].key.shape).astype(FIELD_DTYPE))
    ext, key = _rejoin(nodes, (1, 2))
    assert np.array_equal(ext[:, :D], s)  # e = 0: the template is untouched
    assert not epoch_mac.check(ext, key).all(axis=1).any()  # and the check fails closed


def _shift_delta(attacker: int, shift: np.ndarray):
    # A refresh dealer whose "zero-sharing" has the constant `shift`: the
    # template part of every node's new share moves by shift (a consistent
    # substitution of s by s + shift, no node's share looks odd).
    def tamper(kind, dealer, receiver, value):
        if kind == "delta" and dealer == attacker:
            return field.add(value, shift)
        return value

    return tamper


def test_a_refresh_dealer_that_shifts_the_template_is_caught_and_stays_caught():
    s, face = _templates(TRIALS, seed=1), _templates(TRIALS, seed=2)
    subjects = _subjects(TRIALS)
    nodes, key1 = _cluster(3, 2, s)
    shift = field.sub(face, s)  # the attacker knows s: it once ran a matcher
    _refresh(nodes, 2, 2, subjects, _shift_delta(1, shift))
    for subset in itertools.combinations((1, 2, 3), 2):
        ext, key = _rejoin(nodes, subset)
        assert np.array_equal(ext[:, :D], face)  # the substitution is consistent ...
        assert not epoch_mac.check(ext, key).any()  # ... and every tag fails in every subset
    # The defect is carried by the renewal: an honest refresh does not bless it.
    _refresh(nodes, 2, 3, subjects)
    ext, key = _rejoin(nodes, (2, 3))
    assert np.array_equal(ext[:, :D], face) and not epoch_mac.check(ext, key).any()


def test_the_shifting_dealer_cannot_cancel_with_the_old_key():
    # Same attacker, also offsetting its product value by lambda^-1 <b_old, E>
    # (all it knows): still every tag fails.
    s, face = _templates(TRIALS, seed=1), _templates(TRIALS, seed=2)
    subjects = _subjects(TRIALS)
    nodes, key1 = _cluster(3, 2, s)
    shift = field.sub(face, s)
    lam = int(field.lagrange_at_zero((1, 2, 3))[0])
    h_offset = field.mul(epoch_mac.inner_products(shift, key1), np.full(1, field.inv(lam), dtype=FIELD_DTYPE))
    base = _shift_delta(1, shift)

    def tamper(kind, dealer, receiver, value):
        if kind == "h" and dealer == 1:
            return field.add(value, h_offset)
        return base(kind, dealer, receiver, value)

    _refresh(nodes, 2, 2, subjects, tamper)
    ext, key = _rejoin(nodes, (1, 2))
    assert np.array_equal(ext[:, :D], face) and not epoch_mac.check(ext, key).any()


def test_recomputing_tags_from_the_refreshed_template_would_launder_the_shift():
    # Why product_share takes the OLD tag and the old shares: had the nodes
    # recomputed <b', s> from the refreshed s (old tag and old key left out),
    # the shifted template would pass with no key knowledge at all.
    s, face = _templates(20, seed=1), _templates(20, seed=2)
    subjects = _subjects(20)
    nodes, _ = _cluster(3, 2, s)
    shift = field.sub(face, s)
    _refresh(nodes, 2, 2, subjects, _shift_delta(1, shift))
    committee = (1, 2, 3)
    for node in nodes:
        naive = epoch_mac.product_share(
            np.concatenate([node.records[:, :D], np.zeros((20, L), dtype=FIELD_DTYPE)], axis=1),
            np.zeros_like(node.key), node.key,
        )
        node.naive_h = naive
    for node in nodes:
        g = np.stack([epoch_mac.renewal_values(nodes[j - 1].seed, subjects, 2, 2, nodes[j - 1].naive_h, node.x) for j in committee])
        node.naive_records = np.concatenate([node.records[:, :D], epoch_mac.renewed_tags(committee, g, 2)], axis=1)
    for node in nodes:
        node.records = node.naive_records
    ext, key = _rejoin(nodes, (1, 2))
    assert np.array_equal(ext[:, :D], face) and epoch_mac.check(ext, key).all()  # laundered


@pytest.mark.parametrize("how", ["random", "offset", "inconsistent"])
def test_a_malicious_renewal_dealer_is_detected_never_passes_a_changed_template(how):
    s, face = _templates(TRIALS, seed=1), _templates(TRIALS, seed=2)
    subjects = _subjects(TRIALS)
    nodes, key1 = _cluster(3, 2, s)
    seen_ext, seen_key = _rejoin(nodes, (1, 2))
    gen = np.random.default_rng(11)
    offset = gen.integers(1, P, (TRIALS, L)).astype(FIELD_DTYPE)

    def tamper(kind, dealer, receiver, value):
        if kind == "g" and dealer == 1:
            if how == "random":
                return gen.integers(0, P, value.shape).astype(FIELD_DTYPE)
            if how == "offset":
                return field.add(value, offset)
            return field.add(value, offset) if receiver == 2 else value
        return value

    _refresh(nodes, 2, 2, subjects, tamper)
    honest = nodes[0].records.copy()
    failed = set()
    for subset in itertools.combinations((1, 2, 3), 2):
        ext, key = _rejoin(nodes, subset)
        assert np.array_equal(ext[:, :D], s)  # the template itself is untouched
        ok = epoch_mac.check(ext, key)
        if not ok.all():
            failed.add(subset)
        # With a changed s on top (the attacker's share shifted with the old
        # key's tags): never a pass.
        if 1 in subset:
            nodes[0].records = field.add(honest, _forge(seen_ext, seen_key, face, subset, 1, seen_key))
            ext, key = _rejoin(nodes, subset)
            assert np.array_equal(ext[:, :D], face) and not epoch_mac.check(ext, key).any()
            nodes[0].records = honest
    assert failed  # detected: at least one subset's tags fail
