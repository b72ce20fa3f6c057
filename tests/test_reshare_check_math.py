"""vault.proactive's reshare check: an honest reshare passes for every
committee change, a sender dealing wrong values (or lying in its report) is
caught, and the reported values say nothing about the templates."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from stats_kit import chi2_critical, two_sample_chi2
from vault import field, proactive, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

D = 12
SID = "session-0001"


def _keys(batch: int) -> list[tuple[str, str]]:
    return [("acme", f"subject-{i}") for i in range(batch)]


def _templates(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # test data only; shares come from the CSPRNG
    return field.from_signed(rng.integers(-127, 128, (batch, D)))


def _run(ext, k, n, k2, n2, count=3, senders=None, bad_sender=None, bad_mask=None, lie=None, challenges=None):
    """The whole protocol in one place: old sharing, mask dealing among the old
    members, reshare of records and masks, then every member's report.
    Returns (old values, new values) per challenge, and the new shares."""
    keys = _keys(ext.shape[0])
    old = sharing.split(ext, k, n)
    senders = list(senders or range(1, k + 1))
    seeds = {i: proactive.new_seed() for i in range(1, n + 1)}
    # R_m = sum_i rho_i(m) over every old member i.
    masks = {m: proactive.add_rows(*(proactive.reshare_mask_deal(seeds[i], SID, count, k, m)
                                     for i in range(1, n + 1))) for m in range(1, n + 1)}
    new_shares, new_masks = {}, {}
    for j in range(1, n2 + 1):
        dealt, dealt_mask = [], []
        for i in senders:
            g = proactive.reshare_values(seeds[i], keys, old[i - 1], k2, j)
            r = proactive.reshare_mask_values(seeds[i], SID, masks[i], k2, j)
            if i == bad_sender:
                g = (g.astype(np.int64) + 1) % P  # the red team's hook: every dealt value off by one
            if i == bad_mask:
                r = (r.astype(np.int64) + 5) % P
            dealt.append(g.astype(FIELD_DTYPE))
            dealt_mask.append(r.astype(FIELD_DTYPE).reshape(1, -1))
        new_shares[j] = proactive.combine(senders, np.stack(dealt))
        new_masks[j] = proactive.combine(senders, np.stack(dealt_mask))[0]
    challenges = challenges or [proactive.new_challenge() for _ in range(count)]
    old_v = {m: proactive.reshare_check_values(challenges, keys, old[m - 1], masks[m]) for m in range(1, n + 1)}
    if lie is not None:
        m, shift = lie
        old_v[m] = [(v + shift[c]) % P for c, v in enumerate(old_v[m])]
    new_v = {j: proactive.reshare_check_values(challenges, keys, new_shares[j], new_masks[j]) for j in range(1, n2 + 1)}
    return old_v, new_v, new_shares, challenges


def _verdicts(old_v, new_v, k, k2, count=3):
    return [proactive.reshare_check(list(old_v), [old_v[m][c] for m in old_v], k,
                                    list(new_v), [new_v[j][c] for j in new_v], k2) for c in range(count)]


@pytest.mark.parametrize("k,n,k2,n2", [(2, 2, 2, 3), (2, 3, 3, 4), (3, 4, 2, 3), (3, 5, 5, 7), (2, 3, 2, 5)])
def test_an_honest_reshare_passes_and_keeps_every_subset(k, n, k2, n2):
    ext = _templates(8, 1)
    old_v, new_v, new_shares, _ = _run(ext, k, n, k2, n2)
    assert _verdicts(old_v, new_v, k, k2) == ["ok"] * 3
    stacked = np.stack([new_shares[j] for j in range(1, n2 + 1)])
    for subset in itertools.combinations(range(1, n2 + 1), k2):
        assert np.array_equal(sharing.reconstruct(subset, stacked[[x - 1 for x in subset]]), ext)
    # Any k values of either side pass on their own (every subset interpolates
    # to the same value): the verdict does not depend on which members answer.
    for sub in itertools.combinations(range(1, n + 1), k):
        for sub2 in itertools.combinations(range(1, n2 + 1), k2):
            assert proactive.reshare_check(sub, [old_v[m][0] for m in sub], k,
                                           sub2, [new_v[j][0] for j in sub2], k2) == "ok"


@pytest.mark.parametrize("k,n,k2,n2", [(2, 3, 2, 4), (3, 4, 3, 5), (2, 2, 2, 3)])
def test_a_sender_dealing_wrong_values_is_caught(k, n, k2, n2):
    ext = _templates(8, 2)
    for bad in range(1, k + 1):
        old_v, new_v, _, _ = _run(ext, k, n, k2, n2, bad_sender=bad)
        assert _verdicts(old_v, new_v, k, k2) == ["different_secret"] * 3


def test_a_wrong_mask_reshare_alone_is_caught():
    ext = _templates(4, 3)
    old_v, new_v, _, _ = _run(ext, 2, 3, 2, 4, bad_mask=2)
    assert _verdicts(old_v, new_v, 2, 2) == ["different_secret"] * 3


def test_a_sender_lying_in_its_report_is_caught_with_a_spare_old_member():
    # The cheating sender deals +1 everywhere and, once it knows L, shifts its
    # own report so that the two sides' values at 0 agree again. With n = k + 1
    # the old side no longer lies on one polynomial of degree k - 1.
    k, n, k2, n2 = 2, 3, 2, 4
    ext = _templates(6, 4)
    old_v, new_v, _, ch = _run(ext, k, n, k2, n2, bad_sender=1)
    lam = field.lagrange_at_zero(tuple(range(1, k + 1)))
    gap = [(new_v_at0 - old_at0) % P for new_v_at0, old_at0 in zip(
        [proactive.value_at_zero(list(new_v), [new_v[j][c] for j in new_v], k2) for c in range(3)],
        [proactive.value_at_zero(list(old_v), [old_v[m][c] for m in old_v], k) for c in range(3)])]
    shift = [g * pow(int(lam[0]), P - 2, P) % P for g in gap]
    lied = dict(old_v)
    lied[1] = [(v + s) % P for v, s in zip(old_v[1], shift)]
    assert _verdicts(lied, new_v, k, k2) == ["old_inconsistent"] * 3
    assert proactive.reshare_check_sound(n, k)
    # With n = k the same lie passes: the check is unsound there, and says so.
    two = {m: lied[m] for m in (1, 2)}
    assert _verdicts(two, new_v, k, k2) == ["ok"] * 3
    assert not proactive.reshare_check_sound(2, 2)


def test_a_damaged_new_share_is_caught():
    ext = _templates(6, 5)
    old_v, new_v, new_shares, ch = _run(ext, 2, 3, 2, 4)
    keys = _keys(6)
    damaged = new_shares[3].copy()
    damaged[4, 7] = (int(damaged[4, 7]) + 1) % P
    combo = proactive.check_combinations(ch, keys, damaged)
    honest = proactive.check_combinations(ch, keys, new_shares[3])
    new_v[3] = [(v - h + c) % P for v, h, c in zip(new_v[3], honest, combo)]
    assert _verdicts(old_v, new_v, 2, 2) == ["new_inconsistent"] * 3


def test_known_answers():
    # f(x) = 4 + 3x (k = 2), G(x) = 4 + 9x + 2x^2 (k' = 3): same value at 0.
    assert proactive.value_at_zero([1, 2, 3], [7, 10, 13], 2) == 4
    assert proactive.value_at_zero([1, 2, 3, 5], [15, 30, 49, 99], 3) == 4
    assert proactive.reshare_check([1, 2, 3], [7, 10, 13], 2, [1, 2, 3, 5], [15, 30, 49, 99], 3) == "ok"
    assert proactive.reshare_check([1, 2, 3], [7, 10, 14], 2, [1, 2, 3, 5], [15, 30, 49, 99], 3) == "old_inconsistent"
    assert proactive.reshare_check([1, 2, 3], [7, 10, 13], 2, [1, 2, 3, 5], [15, 30, 49, 98], 3) == "new_inconsistent"
    assert proactive.reshare_check([1, 2, 3], [8, 11, 14], 2, [1, 2, 3, 5], [15, 30, 49, 99], 3) == "different_secret"
    # Degree too high for k = 2 (a quadratic through 3 points).
    assert proactive.value_at_zero([1, 2, 3], [15, 30, 49], 2) is None
    with pytest.raises(InvalidShares):
        proactive.value_at_zero([1, 1, 2], [0, 0, 0], 2)
    with pytest.raises(InvalidShares):
        proactive.value_at_zero([1], [0], 2)


def test_mask_dealing_is_deterministic_and_a_degree_k_minus_1_sharing():
    seed = proactive.new_seed()
    a = proactive.reshare_mask_deal(seed, SID, 4, 3, 2)
    assert np.array_equal(a, proactive.reshare_mask_deal(seed, SID, 4, 3, 2))
    assert not np.array_equal(a, proactive.reshare_mask_deal(seed, "session-0002", 4, 3, 2))
    # One dealer's rho at 5 points lies on one polynomial of degree 2 for each slot.
    pts = {x: proactive.reshare_mask_deal(seed, SID, 4, 3, x) for x in range(1, 6)}
    for c in range(4):
        assert proactive.value_at_zero(list(pts), [int(pts[x][c]) for x in pts], 3) is not None
    # The mask record's dealing is separate from every record's.
    r = proactive.reshare_mask_values(seed, SID, a, 2, 1)
    assert r.shape == (4,) and not np.array_equal(r, a)


def test_reported_values_do_not_depend_on_the_templates():
    # Two very different template sets, the same challenges: every member's
    # report is uniform on both sides (chi-square of the top bits against
    # each other, as the refresh-check tests do).
    k, n, k2, n2 = 2, 3, 2, 3
    ch = [proactive.new_challenge() for _ in range(3)]
    zero = np.zeros((3, D), dtype=FIELD_DTYPE)
    full = _templates(3, 6)
    bins, trials = 16, 400
    for who in ("old", "new"):
        hist = []
        for ext in (zero, full):
            vals = []
            for _ in range(trials):
                old_v, new_v, _, _ = _run(ext, k, n, k2, n2, challenges=ch)
                side = old_v if who == "old" else new_v
                vals.extend(v for m in side for v in side[m])
            hist.append(np.bincount(np.array(vals, dtype=np.int64) * bins // P, minlength=bins))
        stat, df = two_sample_chi2(*hist)
        assert stat < chi2_critical(df), who
        # and uniform: no bin far from its expectation
        expected = trials * 3 * 3 / bins
        assert np.abs(hist[0] - expected).max() < 6 * np.sqrt(expected)
