"""vault.proactive: refresh and reshare keep the secret, mix no epochs, and the
check catches what it should without revealing anything."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from vault import epoch_mac, field, proactive, record, sharing
from vault.errors import IntegrityError, InvalidShares
from vault.field import FIELD_DTYPE, P

D = 16
# One epoch's MAC key for these records (vault.epoch_mac; test data only).
KEY = np.random.default_rng(99).integers(0, P, (epoch_mac.TAG_COUNT, D), dtype=np.int64).astype(FIELD_DTYPE)


def _extended(batch: int = 6, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return epoch_mac.extend(field.from_signed(rng.integers(-127, 128, (batch, D))), KEY)


def _check(values: np.ndarray) -> np.ndarray:
    return epoch_mac.check(values, KEY)


def _join(recs, n: int):
    # join() with the key shares of the records' nodes (one sharing of KEY over n).
    key_shares = sharing.split(KEY.reshape(1, -1), recs[0].threshold, n)[:, 0, :]
    return record.join(recs, [record.KeyShare(
        epoch=r.epoch, index=r.index, dimension=D, values=record.pack_values(key_shares[r.index - 1])) for r in recs])


def _keys(batch: int) -> list[tuple[str, str]]:
    return [("acme", f"subject-{i}") for i in range(batch)]


def _refresh(shares: np.ndarray, k: int, seeds: list[bytes], keys) -> np.ndarray:
    """Every node j adds every dealer's delta_i(j) (what the nodes do, in one place)."""
    n, _, width = shares.shape
    return np.stack([
        proactive.add_rows(shares[j - 1], *(proactive.refresh_deltas(s, keys, k, width, j) for s in seeds))
        for j in range(1, n + 1)
    ])


@pytest.mark.parametrize("k,n", [(2, 2), (2, 3), (3, 5), (4, 4), (5, 9)])
def test_refresh_keeps_the_secret_for_every_subset(k, n):
    ext = _extended()
    shares = sharing.split(ext, k, n)
    keys = _keys(ext.shape[0])
    new = _refresh(shares, k, [proactive.new_seed() for _ in range(n)], keys)
    assert not np.array_equal(new, shares)
    for subset in itertools.combinations(range(1, n + 1), k):
        got = sharing.reconstruct(subset, new[[x - 1 for x in subset]])
        assert np.array_equal(got, ext)
    assert _check(sharing.reconstruct(range(1, k + 1), new[:k])).all()


def test_old_share_with_new_shares_does_not_rejoin():
    k, n = 3, 4
    ext = _extended()
    shares = sharing.split(ext, k, n)
    new = _refresh(shares, k, [proactive.new_seed() for _ in range(n)], _keys(ext.shape[0]))
    mixed = np.stack([shares[0], new[1], new[2]])  # x = 1 stolen before, 2 and 3 after
    got = sharing.reconstruct([1, 2, 3], mixed)
    assert not np.array_equal(got, ext)
    assert not _check(got).any()  # the MACs reject every record
    # Control: the same indices from one epoch rejoin.
    assert np.array_equal(sharing.reconstruct([1, 2, 3], new[:3]), ext)


def test_dealing_is_deterministic_per_seed_and_record():
    seed = proactive.new_seed()
    keys = _keys(5)
    a = proactive.refresh_deltas(seed, keys, 3, 40, 2)
    b = proactive.refresh_deltas(seed, list(reversed(keys)), 3, 40, 2)[::-1]
    assert np.array_equal(a, b)  # per record, whatever the batch
    assert not np.array_equal(a, proactive.refresh_deltas(proactive.new_seed(), keys, 3, 40, 2))
    assert not np.array_equal(a, proactive.refresh_deltas(seed, keys, 3, 40, 3))
    # The zero sharing is zero at 0: interpolating a node's deltas at x=1..k gives 0.
    pts = np.stack([proactive.refresh_deltas(seed, keys, 3, 40, x) for x in (1, 2, 3)])
    assert not sharing.reconstruct([1, 2, 3], pts).any()


def test_derived_elements_are_field_elements_and_labels_separate():
    seed = proactive.new_seed()
    out = proactive.derive_field(seed, [b"a", b"b"], 1000)
    assert out.dtype == FIELD_DTYPE and out.shape == (2, 1000) and int(out.max()) < P
    assert not np.array_equal(out[0], out[1])
    assert np.array_equal(proactive.derive_field(seed, [b"b"], 1000)[0], out[1])
    with pytest.raises(ValueError):
        proactive.derive_field(b"short", [b"a"], 1)


def test_rare_rejection_path_is_exact(monkeypatch):
    # Force the slow path and check it yields the same stream minus P.
    seed = bytes(32)
    fast = proactive.derive_field(seed, [b"x"], 64)[0]
    slow = proactive._derive_row_slow(seed, b"x", 64)
    assert np.array_equal(fast, slow)


@pytest.mark.parametrize("k,n,k2,n2", [(2, 3, 3, 4), (3, 4, 2, 3), (2, 3, 2, 3), (3, 5, 5, 7), (2, 2, 2, 5)])
def test_reshare_to_a_new_committee_keeps_the_vector(k, n, k2, n2):
    ext = _extended()
    keys = _keys(ext.shape[0])
    shares = sharing.split(ext, k, n)
    senders = list(range(1, k + 1))
    seeds = {i: proactive.new_seed() for i in senders}
    new = np.stack([
        proactive.combine(senders, np.stack([proactive.reshare_values(seeds[i], keys, shares[i - 1], k2, j) for i in senders]))
        for j in range(1, n2 + 1)
    ])
    for subset in itertools.combinations(range(1, n2 + 1), k2):
        assert np.array_equal(sharing.reconstruct(subset, new[[x - 1 for x in subset]]), ext)
    if k2 > 2:
        # k2 - 1 new shares say nothing: they do not rejoin.
        got = sharing.reconstruct(range(1, k2), new[: k2 - 1])
        assert not _check(got).any()
    # The records still rejoin through join(): MACs valid in the new committee.
    recs = record.make_records(tenant="acme", subject="subject-0", epoch=2, threshold=k2, shareholders=n2,
                               dimension=D, request_id="r", shares=new[:, 0, :])
    joined = _join(recs[:k2], n2)
    assert joined.template.shape == (D,)


def test_reshare_with_a_wrong_sender_set_fails_the_macs():
    ext = _extended()
    keys = _keys(ext.shape[0])
    shares = sharing.split(ext, 2, 3)
    seeds = {i: proactive.new_seed() for i in (1, 2)}
    values = np.stack([proactive.reshare_values(seeds[i], keys, shares[i - 1], 2, j) for i in (1, 2) for j in (1,)])
    # Lagrange over {1, 3} instead of {1, 2}: a different value at 0.
    new = [proactive.combine([1, 3], np.stack([proactive.reshare_values(seeds[i], keys, shares[i - 1], 2, j) for i in (1, 2)]))
           for j in (1, 2)]
    assert values.shape[0] == 2
    got = sharing.reconstruct([1, 2], np.stack(new))
    assert not _check(got).any()
    recs = record.make_records(tenant="acme", subject="subject-0", epoch=2, threshold=2, shareholders=2,
                               dimension=D, request_id="r", shares=np.stack(new)[:, 0, :])
    with pytest.raises(IntegrityError):
        _join(recs, 2)
    with pytest.raises(InvalidShares):
        proactive.combine([1, 1], np.zeros((2, 1, 4), dtype=FIELD_DTYPE))


def _check_values(old, new, keys, seeds, challenges, k):
    n = old.shape[0]
    out = []
    for j in range(1, n + 1):
        diff = field.sub(new[j - 1], old[j - 1])
        combo = proactive.check_combinations(challenges, keys, diff)
        ctx = proactive.check_context("session-0001", k, "digest", challenges)
        masks = [sum(int(proactive.check_masks(s, ctx, len(challenges), k, j)[c]) for s in seeds) % P
                 for c in range(len(challenges))]
        out.append([(a + b) % P for a, b in zip(combo, masks)])
    return out


def test_check_passes_an_honest_refresh_and_catches_one_wrong_element():
    k, n = 2, 4
    ext = _extended(batch=20)
    keys = _keys(20)
    old = sharing.split(ext, k, n)
    seeds = [proactive.new_seed() for _ in range(n)]
    new = _refresh(old, k, seeds, keys)
    challenges = [proactive.new_challenge() for _ in range(3)]
    vals = _check_values(old, new, keys, seeds, challenges, k)
    for c in range(3):
        assert proactive.on_zero_polynomial(range(1, n + 1), [v[c] for v in vals], k)
    bad = new.copy()
    bad[2, 13, 7] = (int(bad[2, 13, 7]) + 1) % P  # one element of one record at one node
    vals = _check_values(old, bad, keys, seeds, challenges, k)
    assert not any(proactive.on_zero_polynomial(range(1, n + 1), [v[c] for v in vals], k) for c in range(3))
    # A node that applied another node's deltas twice (a bug) is caught too.
    twice = new.copy()
    twice[0] = proactive.add_rows(new[0], proactive.refresh_deltas(seeds[1], keys, k, new.shape[2], 1))
    vals = _check_values(old, twice, keys, seeds, challenges, k)
    assert not proactive.on_zero_polynomial(range(1, n + 1), [v[0] for v in vals], k)


def test_check_values_are_masked():
    # Two refreshes whose new shares are the same but whose masks differ give
    # unrelated check values: the values carry the mask, not the deltas.
    k, n = 2, 3
    ext = _extended(batch=4)
    keys = _keys(4)
    old = sharing.split(ext, k, n)
    seeds = [proactive.new_seed() for _ in range(n)]
    new = _refresh(old, k, seeds, keys)
    challenge = [proactive.new_challenge()]
    a = _check_values(old, new, keys, seeds, challenge, k)
    b = _check_values(old, new, keys, [proactive.new_seed() for _ in range(n)], challenge, k)
    assert [v[0] for v in a] != [v[0] for v in b]
    unmasked = [proactive.check_combinations(challenge, keys, field.sub(new[j], old[j]))[0] for j in range(n)]
    assert [v[0] for v in a] != unmasked


def test_masks_are_bound_to_the_whole_check_context():
    # The review's attack at the level of the math: one node's answers to
    # the same challenges over record sets differing by one record. With
    # masks bound to (challenges) only, the difference is record r's
    # combination; bound to the context (which names the records covered),
    # it is uniformly random.
    k, n = 2, 3
    ext = _extended(batch=5)
    keys = _keys(5)
    old = sharing.split(ext, k, n)
    seeds = [proactive.new_seed() for _ in range(n)]
    new = _refresh(old, k, seeds, keys)
    challenges = [proactive.new_challenge()]
    j = 1
    diff = field.sub(new[j - 1], old[j - 1])

    def answer(rows, digest):
        ctx = proactive.check_context("session-0001", k, digest, challenges)
        combo = proactive.check_combinations(challenges, [keys[r] for r in rows], diff[rows])[0]
        return (combo + sum(int(proactive.check_masks(s, ctx, 1, k, j)[0]) for s in seeds)) % P

    full, less = answer([0, 1, 2, 3, 4], "all"), answer([0, 1, 2, 3], "all-but-4")
    leaked = proactive.check_combinations(challenges, [keys[4]], diff[[4]])[0]
    assert (full - less) % P != leaked
    # Another context (other challenges, other k, other session) never repeats a mask.
    ctxs = {proactive.check_context(sid, kk, "d", ch) for sid in ("session-0001", "session-0002") for kk in (2, 3)
            for ch in (challenges, [proactive.new_challenge()], challenges + [proactive.new_challenge()])}
    assert len(ctxs) == 12
    masks = {int(proactive.check_masks(seeds[0], c, 1, 2, 1)[0]) for c in ctxs}
    assert len(masks) == 12


def test_mixed_challenges_depend_on_every_contribution():
    sid, ch = "session-0001", [proactive.new_challenge(), proactive.new_challenge()]
    seeds = [proactive.new_seed() for _ in range(3)]
    contribs = [proactive.check_contribution(s, sid, ch) for s in seeds]
    assert contribs == [proactive.check_contribution(s, sid, ch) for s in seeds]  # stable on retry
    mixed = proactive.mixed_challenges(sid, ch, contribs)
    assert len(mixed) == 2 and len(set(mixed)) == 2 and not set(mixed) & set(ch)
    for i in range(3):
        other = list(contribs)
        other[i] = proactive.check_contribution(proactive.new_seed(), sid, ch)
        assert not set(proactive.mixed_challenges(sid, ch, other)) & set(mixed)
    assert proactive.check_contribution(seeds[0], sid, ch[:1]) != contribs[0]


def test_key_hashes_are_stable_and_distinct():
    keys = _keys(50)
    h = proactive.key_hashes(keys)
    assert h.dtype == np.uint64 and len(set(h.tolist())) == 50
    assert (proactive.key_hashes(keys[10:20]) == h[10:20]).all()


def test_check_combination_is_exact_against_plain_integers():
    rng = np.random.default_rng(5)
    keys = _keys(7)
    diff = rng.integers(0, P, (7, 30)).astype(FIELD_DTYPE)
    challenges = [proactive.new_challenge(), proactive.new_challenge()]
    got = proactive.check_combinations(challenges, keys, diff)
    import hashlib

    key = hashlib.sha256(proactive.CHALLENGE_DOMAIN + b"".join(challenges)).digest()
    betas = proactive.derive_field(key, [proactive.CHALLENGE_DOMAIN + b"beta"], 2)[0]
    alphas = proactive.derive_field(key, [proactive.record_label(proactive.CHALLENGE_DOMAIN, t, s, 30) for t, s in keys], 2)
    for c in range(2):
        want = sum(int(alphas[r, c]) * sum(int(diff[r, m]) * pow(int(betas[c]), m, P) for m in range(30))
                   for r in range(7)) % P
        assert got[c] == want
    # Additive over batches (nodes sum chunk by chunk).
    parts = [proactive.check_combinations(challenges, keys[:3], diff[:3]),
             proactive.check_combinations(challenges, keys[3:], diff[3:])]
    assert [(a + b) % P for a, b in zip(*parts)] == got


def test_zero_polynomial_test():
    # f(x) = 5x + 7x^2: degree 2 through 0.
    xs = [1, 2, 3, 4]
    ys = [(5 * x + 7 * x * x) % P for x in xs]
    assert proactive.on_zero_polynomial(xs, ys, 3)
    assert not proactive.on_zero_polynomial(xs, ys, 2)  # degree too high for k = 2
    assert not proactive.on_zero_polynomial(xs, [(y + 1) % P for y in ys], 3)  # not through 0
    with pytest.raises(InvalidShares):
        proactive.on_zero_polynomial([1, 1, 2], [0, 0, 0], 2)
