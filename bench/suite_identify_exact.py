"""Identify on shares against a plaintext exhaustive search: 10,000 queries over a 100,000 gallery."""

from __future__ import annotations

import time

import numpy as np

from bench.run import result
from vault import codec, mpc, sharing

METHOD = """\
Issue 12's exactness check. A gallery of 100,000 seeded 512-d templates (5,000
in a quick run) is encoded to int8 (codec v1) and Shamir-split 2-of-3, and
10,000 probes (200 in a quick run) are identified on shares: half genuine (a
stored template plus noise, sigma 0.5 per element as in suite `identify`), half
impostors. One row in 100 has a near twin (the row plus noise of sigma 0.45), and
every fourth probe is made from a twinned row, so that the pair comparisons
run too (a MATCH by the margin, or AMBIGUOUS). Each probe has its own threshold T = ceil(0.5 |q|^2) and margin
M = ceil(0.02 |q|^2), as in suite `identify`. The three parties run as
threads of one process (`mpc.identify_local`), 32 probes at a time: one
scoring product, one run of the comparison circuit over the 32 galleries'
rows with each probe's T, and one pair round over every probe's
candidates. The reference is a plaintext exhaustive search over the same
int8 codes (`mpc.plaintext_decision`'s rule: candidates at or above T, a
MATCH only for the one candidate ahead of every other by M). `exact` counts
the queries whose decision and subject are the plaintext search's; the
figure must equal the number of queries. `ms per query` is the batched
protocol's time (three parties on this 2-core machine) beside the
plaintext search's."""

D = 512
BATCH = 32
BASELINE = "plaintext exhaustive search over the same int8 codes (numpy)"


def run(quick: bool) -> list[dict]:
    return measure(5_000 if quick else 100_000, 200 if quick else 10_000)


def measure(rows: int, queries: int) -> list[dict]:
    gen = np.random.default_rng(2028)
    floats = gen.standard_normal((rows, D)).astype(np.float32)
    # One row in 100 has a near twin (row + 1), so that queries also reach the
    # pair comparisons: a MATCH by the margin, or AMBIGUOUS.
    twins = np.arange(0, rows - 1, 100)
    floats[twins + 1] = floats[twins] + 0.45 * gen.standard_normal((twins.size, D)).astype(np.float32)
    codes = np.empty((rows, D), dtype=np.int8)
    shares = [np.empty((rows, D), dtype=np.float64) for _ in range(3)]
    for lo in range(0, rows, 20_000):  # a slice at a time: the three float64 shares are 1.2 GB at 100,000
        part = codec.encode(floats[lo : lo + 20_000], D)
        codes[lo : lo + len(part)] = part
        split = sharing.split(codec.to_field(part), 2, 3)
        for j in range(3):
            shares[j][lo : lo + len(part)] = mpc.compute_form(split[j])
    plain = codes.astype(np.float32)  # |score| <= 512 * 127^2 < 2^24: exact in float32

    exact, mpc_s, plain_s = 0, 0.0, 0.0
    counts = {mpc.MATCH: 0, mpc.NO_MATCH: 0, mpc.AMBIGUOUS: 0}
    genuine_matched = 0
    for lo in range(0, queries, BATCH):
        n = min(BATCH, queries - lo)
        truth = gen.integers(rows, size=n)
        truth[::4] = gen.choice(twins, size=truth[::4].size)  # every fourth query is near a twin pair
        noise = gen.standard_normal((n, D)).astype(np.float32)
        genuine = (np.arange(lo, lo + n) % 2) == 0
        noise[genuine] = floats[truth[genuine]] + 0.5 * noise[genuine]
        probes = codec.encode(noise, D)
        norms = (probes.astype(np.int64) ** 2).sum(axis=1)
        thresholds = [int(np.ceil(0.5 * v)) for v in norms]
        margins = [int(np.ceil(0.02 * v)) for v in norms]
        split = sharing.split(codec.to_field(probes), 2, 3)

        t0 = time.perf_counter()
        got = mpc.identify_local(shares, list(split), (1, 2, 3), thresholds, margins)
        mpc_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = probes.astype(np.float32) @ plain.T
        want = []
        for b in range(n):
            cands = np.flatnonzero(scores[b] >= thresholds[b])
            if not cands.size:
                want.append((mpc.NO_MATCH, None))
                continue
            decision, row = mpc.plaintext_decision(codes[cands], probes[b], thresholds[b], margins[b])
            want.append((decision, None if row is None else int(cands[row])))
        plain_s += time.perf_counter() - t0

        for b in range(n):
            exact += got[b] == want[b]
            counts[got[b][0]] += 1
            genuine_matched += bool(genuine[b]) and got[b] == (mpc.MATCH, int(truth[b]))
    params = {"d": D, "gallery": rows, "k": 2, "n": 3, "queries": queries, "batch": BATCH,
              "decisions": dict(counts), "genuine_matched": genuine_matched}
    return [
        result("identify_exact", "exact decisions and subjects (identify on shares)", params, exact, "queries",
               "queries asked", queries, True),
        result("identify_exact", "ms per query (3 parties in one process, batches of 32)", params,
               1000 * mpc_s / queries, "ms", BASELINE, 1000 * plain_s / queries, False),
    ]
