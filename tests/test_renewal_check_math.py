"""vault.epoch_mac's renewal check: the refresh check's tag part.

An honest refresh passes for every set of k reporters; one renewer dealing
wrong renewal values, one node dealing an inconsistent key contribution, or
one renewer dealing a wrong renewal of the mask each fail it; and what the
nodes report (u in round A, w in round B) does not depend on the templates
or the key (statistical, as tests/test_reshare_check_math.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from stats_kit import chi2_critical, two_sample_chi2
from vault import codec, epoch_mac, field, proactive, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

L = epoch_mac.TAG_COUNT
C = epoch_mac.RENEWAL_CHECK_SLOTS
D = 10
W = 13  # the key is wider than the records: tags use its first D columns
SID = "session-renew"


def _keys(batch: int) -> list[tuple[str, str]]:
    return [("acme", f"subject-{i}") for i in range(batch)]


def _templates(batch: int, seed: int) -> np.ndarray:
    gen = np.random.default_rng(seed)  # test data only; shares come from the CSPRNG
    return codec.to_field(codec.encode(gen.normal(size=(batch, D)), D))


def _off(value, by=1):
    return ((np.asarray(value).astype(np.int64) + by) % P).astype(FIELD_DTYPE)


def _run(templates, k, n, bad=None, lie=None):
    """A whole refresh with tag renewal, then the renewal check, in process.

    ``bad``: "g" (renewer 1 deals every renewal value off by one), "key" (node
    1 deals node 2 a key contribution off by one: key shares off one
    polynomial), "mask_g" (renewer 1 deals the mask's renewal off by one) or
    "delta" (node 1 shifts the template part). ``lie``: (x, shift) added to x's
    round-B answer. Returns (u reports, w answers, new record shares, new key shares)."""
    xs = list(range(1, n + 1))
    keys = _keys(templates.shape[0])
    seeds = {x: proactive.new_seed() for x in xs}
    # Epoch 1: the key and the records.
    old_key = {x: epoch_mac.key_share([epoch_mac.key_contribution(seeds[j], 1, k, W, x) for j in xs]) for x in xs}
    b = epoch_mac.rejoin_key(xs[:k], np.stack([old_key[x] for x in xs[:k]]))
    old = sharing.split(epoch_mac.extend(templates, np.ascontiguousarray(b[:, :D])), k, n)
    # The refresh to epoch 2: new key, zero-sharing deltas, renewed tags.
    seeds = {x: proactive.new_seed() for x in xs}
    new_key = {}
    for x in xs:
        parts = [epoch_mac.key_contribution(seeds[j], 2, k, W, x) for j in xs]
        if bad == "key" and x == 2:
            parts[0] = _off(parts[0])
        new_key[x] = epoch_mac.key_share(parts)
    renewers = epoch_mac.renewal_nodes(xs, k)
    h = {j: epoch_mac.product_share(old[j - 1], np.ascontiguousarray(old_key[j][:, :D]),
                                    np.ascontiguousarray(new_key[j][:, :D])) for j in renewers}
    new = {}
    for x in xs:
        g = [epoch_mac.renewal_values(seeds[j], keys, 2, k, h[j], x) for j in renewers]
        if bad == "g":
            g[0] = _off(g[0])
        deltas = [proactive.refresh_deltas(seeds[j], keys, k, D, x) for j in xs]
        if bad == "delta":
            deltas[0] = _off(deltas[0])
        new[x] = epoch_mac.renew_share(old[x - 1], deltas, epoch_mac.renewed_tags(renewers, np.stack(g), k))
    # Prepare: the masks and their renewed tags.
    mask = {x: proactive.add_rows(*(epoch_mac.renewal_mask_deal(seeds[j], SID, k, W, x, C) for j in xs)) for x in xs}
    hm = {j: epoch_mac.renewal_mask_products(mask[j], new_key[j]) for j in renewers}
    mask_tags = {}
    for x in xs:
        g = [epoch_mac.renewal_values(seeds[j], epoch_mac.renewal_mask_keys(C), 2, k, hm[j], x) for j in renewers]
        if bad == "mask_g":
            g[0] = _off(g[0], 7)
        mask_tags[x] = epoch_mac.renewed_tags(renewers, np.stack(g), k)
    # The check: coefficients from every node's contribution.
    ctx = epoch_mac.renewal_check_context(SID, k, "digest", [epoch_mac.renewal_contribution(seeds[x], SID) for x in xs])
    alphas = epoch_mac.renewal_coefficients(ctx, keys)
    # Two batches, summed: the sums are additive.
    sums = {x: proactive.add_rows(epoch_mac.renewal_sums(alphas[:3], new[x][:3], W),
                                  epoch_mac.renewal_sums(alphas[3:], new[x][3:], W)) for x in xs}
    u = {x: epoch_mac.renewal_report(sums[x], mask[x]) for x in xs}
    opened = epoch_mac.open_reports(xs, np.stack([u[x] for x in xs]), k)
    assert opened is not None
    w = {x: epoch_mac.renewal_answer(sums[x], mask_tags[x], new_key[x], opened) for x in xs}
    if lie is not None:
        w[lie[0]] = field.add(w[lie[0]], lie[1])
    return u, w, new, new_key


def _passes(w, k, subset=None):
    xs = sorted(subset or w)
    return epoch_mac.renewal_check(xs, [w[x] for x in xs], k)


@pytest.mark.parametrize("k,n", [(2, 3), (2, 4), (3, 5)])
def test_an_honest_refresh_passes_for_every_set_of_k_reporters(k, n):
    templates = _templates(6, 1)
    u, w, new, new_key = _run(templates, k, n)
    assert _passes(w, k)
    for size in range(k, n + 1):
        for subset in itertools.combinations(range(1, n + 1), size):
            assert _passes(w, k, subset)
            assert epoch_mac.open_reports(subset, np.stack([u[x] for x in subset]), k) is not None
    # and the renewed records check under the new key from any k nodes
    for subset in itertools.combinations(range(1, n + 1), k):
        ext = sharing.reconstruct(subset, np.stack([new[x] for x in subset]))
        key = epoch_mac.rejoin_key(subset, np.stack([new_key[x] for x in subset]))
        assert np.array_equal(ext[:, :D], templates)
        assert epoch_mac.check(ext, np.ascontiguousarray(key[:, :D])).all()


@pytest.mark.parametrize("bad", ["g", "key", "mask_g"])
@pytest.mark.parametrize("k,n", [(2, 3), (3, 5)])
def test_a_wrong_renewal_a_wrong_key_contribution_or_a_wrong_mask_renewal_fails(bad, k, n):
    u, w, _, _ = _run(_templates(6, 2), k, n, bad=bad)
    assert not _passes(w, k)


def test_a_shifted_template_part_fails_it_too():
    # A dealer shifting the template part: the tags were renewed from the old
    # shares, and this check holds t' against s' as the nodes hold them, so the
    # shift fails it too (the zero-sharing check is the one that names it).
    u, w, _, _ = _run(_templates(6, 3), 2, 3, bad="delta")
    assert not _passes(w, 2)


def test_one_node_lying_in_its_answer_cannot_hide_a_wrong_renewal():
    # Renewer 1 deals wrong values and then shifts its own answer so that the
    # value at 0 through (0, 0) and its point fits one honest node: the other
    # honest node is off the line (n = 2k - 1 = 3 has one spare point).
    k, n = 2, 3
    templates = _templates(6, 4)
    u, w, _, _ = _run(templates, k, n, bad="g")
    # For each element, the line through (0, 0) and node 2's answer, at x = 1.
    lam = field.lagrange_at((0, 2), 1)
    fitted = (np.asarray(w[2], dtype=np.int64) * int(lam[1])) % P
    w[1] = fitted.astype(FIELD_DTYPE)
    assert epoch_mac.renewal_check([1, 2], [w[1], w[2]], k)  # two points alone always fit
    assert not _passes(w, k)


def test_open_reports_refuses_reports_off_one_polynomial():
    u, _, _, _ = _run(_templates(6, 5), 2, 3)
    stacked = np.stack([u[x] for x in (1, 2, 3)])
    stacked[2, 1, 4] = (int(stacked[2, 1, 4]) + 1) % P
    assert epoch_mac.open_reports([1, 2, 3], stacked, 2) is None
    with pytest.raises(InvalidShares):
        epoch_mac.open_reports([1], stacked[:1], 2)


def test_mask_dealing_is_deterministic_separated_and_of_degree_k_minus_1():
    seed = proactive.new_seed()
    a = epoch_mac.renewal_mask_deal(seed, SID, 3, W, 2, C)
    assert a.shape == (C, W)
    assert np.array_equal(a, epoch_mac.renewal_mask_deal(seed, SID, 3, W, 2, C))
    assert not np.array_equal(a, epoch_mac.renewal_mask_deal(seed, "other", 3, W, 2, C))
    # The node deals every set at once: row c is the same either way; sets differ.
    every = epoch_mac.renewal_mask_deal(seed, SID, 3, W, 2)
    assert every.shape == (epoch_mac.RENEWAL_MASK_ROWS, W) and np.array_equal(every[:C], a)
    assert not np.array_equal(every[C : 2 * C], a)
    pts = [epoch_mac.renewal_mask_deal(seed, SID, 3, W, x, C) for x in range(1, 6)]
    assert epoch_mac.open_reports(range(1, 6), np.stack(pts), 3) is not None
    assert epoch_mac.open_reports(range(1, 6), np.stack(pts), 2) is None
    assert epoch_mac.renewal_contribution(seed, SID) == epoch_mac.renewal_contribution(seed, SID)
    assert epoch_mac.renewal_contribution(seed, SID) != epoch_mac.renewal_contribution(seed, "other")
    assert {t for t, _ in epoch_mac.renewal_mask_keys()} == {""}


def _histograms(values: list[np.ndarray], bins: int) -> np.ndarray:
    flat = np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1) for v in values])
    return np.bincount(flat * bins // P, minlength=bins)


def test_reports_and_answers_do_not_depend_on_the_templates_or_the_key():
    # All-zero templates against random ones (and a fresh key every run): the
    # round-A reports and round-B answers of every node have the same
    # distribution (chi-square of the top bits) and are uniform.
    k, n, bins, trials = 2, 3, 16, 120
    zero = np.zeros((6, D), dtype=FIELD_DTYPE)
    full = _templates(6, 6)
    hist_u, hist_w = [], []
    for templates in (zero, full):
        us, ws = [], []
        for _ in range(trials):
            u, w, _, _ = _run(templates, k, n)
            us.extend(u.values())
            ws.extend(w.values())
        hist_u.append(_histograms(us, bins))
        hist_w.append(_histograms(ws, bins))
    for hist in (hist_u, hist_w):
        stat, df = two_sample_chi2(*hist)
        assert stat < chi2_critical(df)
        expected = hist[0].sum() / bins
        assert np.abs(hist[0] - expected).max() < 6 * np.sqrt(expected)
    # w is a sharing of 0, yet each single answer is uniform: not all zero.
    assert hist_w[1][0] < hist_w[1].sum() / 2


def test_renewal_sums_known_answer_over_several_row_chunks():
    # Against Python integers, with more rows than one exact float64 chunk (2**11).
    gen = np.random.default_rng(7)
    rows = 2 * 2048 + 5
    shares = gen.integers(0, P, (rows, D + L)).astype(FIELD_DTYPE)
    alphas = gen.integers(0, P, (rows, C)).astype(FIELD_DTYPE)
    out = epoch_mac.renewal_sums(alphas, shares, W)
    assert out.shape == (C, W + L) and not out[:, D:W].any()  # padded with zeros to the key width
    for c, m in [(0, 0), (1, D - 1), (2, D), (0, D + L - 1)]:
        want = sum(int(alphas[r, c]) * int(shares[r, m]) for r in range(rows)) % P
        col = m if m < D else W + (m - D)
        assert int(out[c, col]) == want
    with pytest.raises(InvalidShares):
        epoch_mac.renewal_sums(alphas[:, :2], shares, W)
    with pytest.raises(InvalidShares):
        epoch_mac.renewal_sums(alphas, shares, D - 1)  # records wider than the key
