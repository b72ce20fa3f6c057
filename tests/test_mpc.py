"""vault.mpc: Identify on shares, the math (score shares, zero-sharing, the
replicated binary sharing, the comparison circuit), run in-process."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_kit import chi2_critical, two_sample_chi2

from vault import codec, field, mpc, rng, sharing
from vault.errors import InvalidShares
from vault.field import FIELD_DTYPE, P

D = 512
MAX = mpc.max_score(D)


def additive(values, pattern: str = "random") -> list[np.ndarray]:
    """Three additive shares (mod P) of the integers ``values``."""
    v = np.asarray([int(x) % P for x in values], dtype=FIELD_DTYPE)
    if pattern == "random":
        a, b = rng.random_field(v.size), rng.random_field(v.size)
    elif pattern == "max":  # z_0 = z_1 = P - 1: the largest sums, every carry
        a = b = np.full(v.size, P - 1, dtype=FIELD_DTYPE)
    elif pattern == "zero":
        a = b = np.zeros(v.size, dtype=FIELD_DTYPE)
    else:
        raise ValueError(pattern)
    c = field.sub(field.sub(v, a), b)
    return [a, b, c]


def open_with(trio: mpc.LocalTrio, work, rows: int) -> np.ndarray:
    return mpc.open_bits(trio.run(work), rows)


def threshold_bits(scores, threshold: int, pattern: str = "random", dimension: int = D) -> np.ndarray:
    z = additive(scores, pattern)
    trio = mpc.LocalTrio()

    def work(j, party):
        party.share_input(z[j])
        return party.threshold_bits(threshold, dimension)

    return open_with(trio, work, len(scores))


def shares_of(codes: np.ndarray, committee=(1, 2, 3), n: int = 3):
    full = sharing.split(codec.to_field(codes), 2, n)
    return [full[x - 1] for x in committee]


def gallery_of(codes: np.ndarray, committee=(1, 2, 3), n: int = 3):
    return [mpc.compute_form(s) for s in shares_of(codes, committee, n)]


# --- the arithmetic layer --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, P - 1), max_size=200), st.integers(1, 31))
def test_slice_bits_puts_bit_j_of_row_g_at_word_g_over_64(values, bits):
    v = np.array(values, dtype=np.uint32) >> np.uint32(31 - bits)  # < 2^bits
    words = mpc.slice_bits(v, bits)
    assert words.shape == (bits, mpc.words_for(len(values))) and words.dtype == np.uint64
    for j in range(bits):
        want = [0] * words.shape[1]
        for g, x in enumerate(v.tolist()):
            want[g // 64] |= ((x >> j) & 1) << (g % 64)
        assert words[j].tolist() == want
        assert mpc.unslice_bit(words[j], len(values)).tolist() == [bool((x >> j) & 1) for x in v.tolist()]


@pytest.mark.parametrize("committee", [(1, 2, 3), (2, 4, 5), (1, 3, 5)])
def test_score_shares_add_up_to_the_scores(committee):
    gen = np.random.default_rng(7)
    codes = gen.integers(-127, 128, (300, D)).astype(np.int8)
    probe = gen.integers(-127, 128, D).astype(np.int8)
    t = gallery_of(codes, committee, n=5)
    q = shares_of(probe[np.newaxis, :], committee, n=5)
    ys = [mpc.score_shares(t[j], q[j][0], mpc.lagrange(committee, j)) for j in range(3)]
    total = field.add(field.add(ys[0], ys[1]), ys[2])
    assert field.to_signed(total).tolist() == (codes.astype(np.int64) @ probe.astype(np.int64)).tolist()


def test_extreme_scores_are_exact():
    codes = np.array([[127] * D, [-127] * D, [127, -127] * (D // 2)], dtype=np.int8)
    probe = np.full(D, 127, dtype=np.int8)
    t, q = gallery_of(codes), shares_of(probe[np.newaxis, :])
    ys = [mpc.score_shares(t[j], q[j][0], mpc.lagrange((1, 2, 3), j)) for j in range(3)]
    total = field.to_signed(field.add(field.add(ys[0], ys[1]), ys[2]))
    assert total.tolist() == [MAX, -MAX, 0]


def test_score_shares_are_exact_past_2048_columns():
    gen = np.random.default_rng(9)
    d = 5000
    codes = gen.integers(-127, 128, (20, d)).astype(np.int8)
    codes[0] = 127
    probe = np.full(d, 127, dtype=np.int8)
    t, q = gallery_of(codes), shares_of(probe[np.newaxis, :])
    ys = [mpc.score_shares(t[j], q[j][0], mpc.lagrange((1, 2, 3), j)) for j in range(3)]
    total = field.to_signed(field.add(field.add(ys[0], ys[1]), ys[2]))
    assert total.tolist() == (codes.astype(np.int64) @ probe.astype(np.int64)).tolist()


def test_score_shares_of_a_batch_are_the_single_scores():
    # A batch of probes is one matrix product: exactly the rows of B single products (past 2048 columns too).
    gen = np.random.default_rng(11)
    for d in (D, 2100):
        codes = gen.integers(-127, 128, (40, d)).astype(np.int8)
        probes = gen.integers(-127, 128, (5, d)).astype(np.int8)
        t, q = gallery_of(codes), shares_of(probes)
        lam = mpc.lagrange((1, 2, 3), 1)
        batch = mpc.score_shares(t[1], q[1], lam)
        assert batch.shape == (5, 40)
        assert np.array_equal(batch, np.stack([mpc.score_shares(t[1], q[1][b], lam) for b in range(5)]))
    with pytest.raises(ValueError, match="dimension"):
        mpc.score_shares(t[1], q[1][:, :-1], lam)
    # An empty gallery scores to nothing, for one probe or a batch.
    empty = np.zeros((0, D))
    assert mpc.score_shares(empty, q[1][0, :D], lam).shape == (0,)
    assert mpc.score_shares(empty, q[1][:, :D], lam).shape == (5, 0)


def test_score_shares_need_the_compute_form():
    with pytest.raises(ValueError, match="compute form"):
        mpc.score_shares(rng.random_field((3, 4)), rng.random_field(4), 1)
    with pytest.raises(ValueError, match="field elements"):  # a probe share outside the field
        mpc.score_shares(mpc.compute_form(rng.random_field((3, 4))), np.full(4, P, dtype=np.uint32), 1)
    with pytest.raises(ValueError, match="field elements"):
        mpc.compute_form(np.full((1, 2), P, dtype=np.uint32))


def test_rerandomised_shares_keep_the_sum_and_change_every_share():
    y = [rng.random_field(100) for _ in range(3)]
    keys = [mpc.new_pair_key() for _ in range(3)]
    z = [mpc.rerandomise(y[j], keys[j], keys[(j - 1) % 3], b"q1") for j in range(3)]
    assert np.array_equal(field.add(field.add(*z[:2]), z[2]), field.add(field.add(*y[:2]), y[2]))
    assert all((z[j] != y[j]).mean() > 0.99 for j in range(3))


def test_committee_other_than_three_is_refused():
    with pytest.raises(ValueError, match="exactly 3 nodes"):
        mpc.lagrange((1, 2), 0)


def test_offset_bit_for_512_is_25_and_large_dimensions_are_refused():
    assert mpc.offset_bit(512) == 25
    assert mpc.offset_bit(16_643) == 30
    with pytest.raises(ValueError, match="16,643"):
        mpc.offset_bit(16_644)


# --- the comparison circuit ------------------------------------------------------


@pytest.mark.parametrize("pattern", ["random", "max", "zero"])
def test_end_around_adder_gives_every_bit_of_v_for_v_from_1_to_p_minus_1(pattern):
    # W = S + rot1(C) + carry_out (mod 2^31) equals v for every v in [1, P - 1]:
    # the edges, every power of two and its neighbours, and random values.
    edges = {1, 2, 3, P - 1, P - 2, (P - 1) // 2}
    for e in range(31):
        edges |= {max(1, (1 << e) - 1), 1 << e, min(P - 1, (1 << e) + 1)}
    values = sorted(edges) + [int(x) for x in rng.random_field(200) if x]
    z = additive(values, pattern)
    for bit in (0, 12, 25, 30):
        trio = mpc.LocalTrio()
        got = open_with(trio, lambda j, p: p.compare_shifted(z[j], z[(j + 1) % 3], 0, bit), len(values))
        assert got.tolist() == [bool((v >> bit) & 1) for v in values], bit


def test_v_zero_is_the_one_value_the_adder_gets_wrong():
    # Why the circuit needs v >= 1: shares of 0 that sum to exactly P give W = P
    # (every bit set), shares that sum to 0 or 2P give W = 0.
    z = [np.array([P - 1, 0], dtype=FIELD_DTYPE), np.array([1, 0], dtype=FIELD_DTYPE),
         np.array([0, 0], dtype=FIELD_DTYPE)]
    trio = mpc.LocalTrio()
    got = open_with(trio, lambda j, p: p.compare_shifted(z[j], z[(j + 1) % 3], 0, 25), 2)
    assert got.tolist() == [True, False]


@pytest.mark.parametrize("pattern", ["random", "max", "zero"])
@pytest.mark.parametrize("threshold", [0, 1, -1, 1_000_000, -1_000_000, MAX, -MAX, MAX + 1, -MAX - 1])
def test_threshold_edges(threshold, pattern):
    scores = [threshold, threshold - 1, threshold + 1, MAX, -MAX, 0, 1, -1]
    scores = [s for s in scores if -MAX <= s <= MAX]
    got = threshold_bits(scores, threshold, pattern)
    assert got.tolist() == [s >= threshold for s in scores]


def test_thresholds_beyond_the_largest_score_are_clamped():
    assert threshold_bits([MAX, -MAX], 10**9).tolist() == [False, False]
    assert threshold_bits([MAX, -MAX], -(10**9)).tolist() == [True, True]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(-MAX, MAX), min_size=1, max_size=130),
    st.integers(-MAX - 2, MAX + 2),
)
def test_threshold_bits_property(scores, threshold):
    assert threshold_bits(scores, threshold).tolist() == [s >= threshold for s in scores]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(-MAX, MAX), min_size=2, max_size=6, unique=True),
    st.integers(0, 2 * MAX),
)
def test_pair_bits_property(scores, margin):
    z = additive(scores)
    pairs = mpc.candidate_pairs(range(len(scores)))
    trio = mpc.LocalTrio()

    def work(j, party):
        party.share_input(z[j])
        return party.pair_bits(pairs, margin, D)

    got = open_with(trio, work, len(pairs))
    assert got.tolist() == [scores[a] - scores[b] >= margin for a, b in pairs]


def test_pair_bits_refuse_rows_outside_the_gallery():
    z = additive([1, 2])
    trio = mpc.LocalTrio()
    with pytest.raises(ValueError, match="outside the gallery"):
        trio.run(lambda j, p: (p.share_input(z[j]), p.pair_bits([(0, 2)], 0, D))[1])


# --- decisions -------------------------------------------------------------------


def test_decide():
    assert mpc.decide([]) == (mpc.NO_MATCH, None)
    assert mpc.decide([7]) == (mpc.MATCH, 7)
    assert mpc.decide([3, 9], np.array([True, False])) == (mpc.MATCH, 3)
    assert mpc.decide([3, 9], np.array([False, True])) == (mpc.MATCH, 9)
    assert mpc.decide([3, 9], np.array([False, False])) == (mpc.AMBIGUOUS, None)
    # margin 0 and equal scores: both "beat" each other, so no single winner
    assert mpc.decide([3, 9], np.array([True, True])) == (mpc.AMBIGUOUS, None)
    assert mpc.decide(list(range(mpc.MAX_CANDIDATES + 1))) == (mpc.AMBIGUOUS, None)


def _near_duplicates(gen, rows: int = 2000):
    """Seeded codes with near-duplicates (rows 1..4 close to row 0, row 11 somewhat close to row 10)
    and probes that give every decision: genuine, impostors, and two that hit the near-duplicates."""
    floats = gen.standard_normal((rows, D)).astype(np.float32)
    floats[1:5] = floats[0] + 0.05 * gen.standard_normal((4, D))
    floats[11] = floats[10] + 0.6 * gen.standard_normal(D)
    probes = [floats[g] + 0.3 * gen.standard_normal(D) for g in gen.choice(rows, 12, replace=False)]  # genuine
    probes += [gen.standard_normal(D) for _ in range(8)]  # impostors
    probes += [floats[0] + 0.02 * gen.standard_normal(D), floats[10] + 0.05 * gen.standard_normal(D)]
    return codec.encode(floats, D), [codec.encode(np.asarray(p, dtype=np.float32), D)[0] for p in probes]


def test_identify_matches_plaintext_exhaustive_search_on_2000_rows():
    codes, probes = _near_duplicates(np.random.default_rng(12))
    t = gallery_of(codes)
    threshold, margin = 400_000, 50_000
    seen = set()
    for q in probes:
        got = mpc.identify_local(t, [s[0] for s in shares_of(q[np.newaxis, :])], (1, 2, 3), threshold, margin)
        want = mpc.plaintext_decision(codes, q, threshold, margin)
        assert got == want
        seen.add(got[0])
    assert seen == {mpc.MATCH, mpc.NO_MATCH, mpc.AMBIGUOUS}


def test_identify_of_a_batch_is_each_query_alone():
    # One circuit over B galleries' rows, each query with its own threshold
    # and margin, and one pair round over every query's candidates: each
    # decision is the plaintext search's (and a margin too wide for the
    # near-duplicates turns a MATCH into AMBIGUOUS within the same batch).
    codes, probes = _near_duplicates(np.random.default_rng(13))
    t = gallery_of(codes)
    probes += [probes[-1], probes[-1]]  # two candidates, 185,000 apart
    thresholds = [400_000 if i % 3 else 380_000 for i in range(len(probes))]
    margins = [50_000] * (len(probes) - 1) + [2 * mpc.max_score(D)]
    q = shares_of(np.stack(probes))
    got = mpc.identify_local(t, q, (1, 2, 3), thresholds, margins)
    want = [mpc.plaintext_decision(codes, p, th, m) for p, th, m in zip(probes, thresholds, margins, strict=True)]
    assert got == want
    assert {g[0] for g in got} == {mpc.MATCH, mpc.NO_MATCH, mpc.AMBIGUOUS}
    assert got[-2][0] == mpc.MATCH and got[-1] == (mpc.AMBIGUOUS, None)
    with pytest.raises(ValueError, match="per probe"):
        mpc.identify_local(t, q, (1, 2, 3), thresholds[:-1], margins)


# --- what each party sees --------------------------------------------------------


def _views(codes: np.ndarray, probe: np.ndarray, runs: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of the bytes party ``position`` receives, and of the matcher's openings from parties 0 and 1."""
    received = np.zeros(256, dtype=np.int64)
    opened = np.zeros(256, dtype=np.int64)
    for _ in range(runs):
        t = gallery_of(codes)
        q = [s[0] for s in shares_of(probe[np.newaxis, :])]
        views: list = []
        trio = mpc.LocalTrio(views)

        def work(j, party):
            y = mpc.score_shares(t[j], q[j], mpc.lagrange((1, 2, 3), j))
            party.share_input(mpc.rerandomise(y, trio.keys[j], trio.keys[(j - 1) % 3], trio.label))
            return party.threshold_bits(0, codes.shape[1])

        comps = trio.run(work)
        for pos, rnd, data in views:
            if pos == position:
                arr = np.frombuffer(data, dtype=np.uint8)
                if rnd == 1:  # field elements: the top byte has 7 random bits
                    arr = arr.reshape(-1, 4)[:, :3].reshape(-1)
                received += np.bincount(arr, minlength=256)
        opened += np.bincount(np.frombuffer(comps[0] + comps[1], dtype=np.uint8), minlength=256)
    return received, opened


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_node_view_and_the_matcher_openings_are_independent_of_probe_and_templates(position):
    gen = np.random.default_rng(position)
    d = 32
    # A: every row matches (score > 0); B: different templates and probe, no row matches.
    probe_a = np.full(d, 100, dtype=np.int8)
    codes_a = gen.integers(1, 128, (64, d)).astype(np.int8)
    probe_b = gen.integers(-127, 128, d).astype(np.int8)
    codes_b = (-np.sign(probe_b)[np.newaxis, :] * gen.integers(1, 128, (64, d))).astype(np.int8)
    assert (codes_a.astype(int) @ probe_a > 0).all() and (codes_b.astype(int) @ probe_b < 0).all()
    recv_a, open_a = _views(codes_a, probe_a, 60, position)
    recv_b, open_b = _views(codes_b, probe_b, 60, position)
    for h1, h2 in ((recv_a, recv_b), (open_a, open_b)):
        stat, df = two_sample_chi2(h1, h2)
        assert stat < chi2_critical(df)
    # and uniform: each byte value about equally often
    expected = recv_a.sum() / 256
    assert ((recv_a - expected) ** 2 / expected).sum() < chi2_critical(255)


# --- Verify on shares ---------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.8, 0.5, 0.75, 0.36, 0.6123456789, 1.0, 0.05])
def test_verify_threshold_is_codecs_cosine_rule_at_the_boundary(tau):
    # Integer scores on both sides of the boundary: [s >= T] must be codec.cosine_of(s, ...) >= tau,
    # float64 rounding included; most of these pairs have cosines within 1e-6 of tau.
    gen = np.random.default_rng(int(tau * 1e6))
    lo, hi = mpc.norm_bounds(D)
    within = checked = 0
    for _ in range(3000):
        aa = int(gen.integers(hi // 4, hi + 1))
        bb = int(gen.integers(lo, hi + 1))
        t = mpc.verify_threshold(tau, aa, bb, D)
        for s in range(t - 3, t + 3):
            if abs(s) > MAX:
                continue
            cos = codec.cosine_of(s, aa, bb)
            assert (s >= t) == (cos >= tau), (aa, bb, s, t)
            within += abs(cos - tau) < 1e-6
            checked += 1
    assert checked >= 15_000 and within >= 3000


def test_verify_threshold_exact_ties_and_refusals():
    # cos = 3/4 exactly: a perfect square aa * bb and s = 3/4 sqrt(aa bb): a MATCH (>=), as in float.
    aa, bb = 64 * 16129, 16129  # sqrt(aa bb) = 8 * 16129
    s = 6 * 16129
    assert codec.cosine_of(s, aa, bb) == 0.75
    assert mpc.verify_threshold(0.75, aa, bb, D) == s
    for bad in ((0.8, 0, 16129), (0.8, 16129, 16128), (0.8, 16129, MAX + 1)):
        with pytest.raises(InvalidShares):
            mpc.verify_threshold(*bad, D)
    with pytest.raises(ValueError):
        mpc.verify_threshold(0.0, 16129, 16129, D)


def test_threshold_shares_sum_to_minus_t_and_open_sum_is_signed():
    for t in (0, 1, -5, MAX + 1, 123456):
        parts = mpc.threshold_shares(t)
        assert len(parts) == 3 and all(0 <= x < P for x in parts)
        assert mpc.open_sum(parts) == -t
    assert len({tuple(mpc.threshold_shares(7)) for _ in range(20)}) == 20


def _near_threshold_pairs(gen, count: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(count, D) template and probe codes, half just above and half just below tau (bisection on an arc)."""
    ts, qs = [], []
    for i in range(count // 2):
        t = gen.standard_normal(D)
        t /= np.linalg.norm(t)
        e = gen.standard_normal(D)
        e -= (e @ t) * t
        e /= np.linalg.norm(e)
        tc = codec.encode(t, D)[0]
        lo, hi = 0.0, np.pi / 2
        for _ in range(40):
            mid = (lo + hi) / 2
            if codec.cosine(tc, codec.encode(np.cos(mid) * t + np.sin(mid) * e, D)[0]) >= tau:
                lo = mid
            else:
                hi = mid
        for a in (lo, hi):
            ts.append(tc)
            qs.append(codec.encode(np.cos(a) * t + np.sin(a) * e, D)[0])
    return np.stack(ts), np.stack(qs)


def test_verify_on_shares_gives_codecs_decisions_on_near_threshold_pairs():
    gen = np.random.default_rng(2026)
    tau = 0.8
    tcodes, qcodes = _near_threshold_pairs(gen, 200, tau)
    extra_t = codec.encode(gen.standard_normal((40, D)), D)
    tcodes = np.concatenate([tcodes, extra_t, extra_t[:20]])
    noise = gen.standard_normal((20, D)) * 0.02
    qcodes = np.concatenate([qcodes, codec.encode(gen.standard_normal((40, D)), D),  # impostors
                             codec.encode(extra_t[:20] / 127.0 + noise, D)])  # genuine
    want = np.array([codec.cosine(q, t) >= tau for t, q in zip(tcodes, qcodes)])
    committee = (1, 2, 3)
    tsh = sharing.split(codec.to_field(tcodes).reshape(1, -1), 2, 3)[:, 0].reshape(3, *tcodes.shape)
    qsh = sharing.split(codec.to_field(qcodes).reshape(1, -1), 2, 3)[:, 0].reshape(3, *qcodes.shape)
    norms = [int(q.astype(np.int64) @ q.astype(np.int64)) for q in qcodes]
    got = mpc.verify_local(tsh, qsh, committee, tau, norms)
    assert got.tolist() == want.tolist()
    cos = np.array([codec.cosine(q, t) for t, q in zip(tcodes, qcodes)])
    assert np.sum(np.abs(cos[:200] - tau) < 1e-3) == 200 and want[:200].sum() == 100
    assert want[200:240].sum() == 0 and want[240:].all()
