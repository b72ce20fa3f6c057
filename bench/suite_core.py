"""The pure sharing core (vault.sharing, vault.epoch_mac, vault.record)."""

from __future__ import annotations

import statistics
import time

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir

from vault import codec, epoch_mac, record, rng, sharing

METHOD = """\
Templates are 512-d float vectors (seeded test data) encoded with codec v1 to
int8 and mapped into GF(2^31 - 1); one template is 512 field elements (515 with
its three tags under the epoch's MAC key). Throughput is templates per second of one process
on one core (numpy, no threads), the median of several timed repetitions after
a warm-up, including input validation and, for split, drawing every
coefficient from the OS CSPRNG (os.urandom). Latency is the median of
thousands of single-template calls, in microseconds. The baseline is
pycryptodome's `Crypto.Protocol.SecretSharing.Shamir` doing the same job in the
same run: it shares 16-byte secrets in GF(2^128), so a 512-byte int8 template
is 32 blocks split (or combined) one by one; it is timed on a few templates
only, since it is slow. `split + MAC` includes `vault.epoch_mac.extend`
(three tags <b_l, s> per template under one epoch key); `reconstruct + check`
includes `vault.epoch_mac.check`; `join` is the matcher's entry point from
ShareRecords and the nodes' key shares (unpack, validate, reconstruct record
and key, MAC check, decode, wipe).
Ratio = our figure / baseline figure. The batch-100,000 figures include
first-touch page faults on the n x 200 MB of fresh share buffers, which are
expensive on this VM; on a shared machine (see the load average) every figure
can move by tens of percent between runs."""

D = 512
SCHEMES = ((2, 3), (3, 5))
BASELINE = "pycryptodome Shamir GF(2^128)"
# One epoch's MAC key (bench data; the nodes deal real ones).
KEY = rng.random_field((epoch_mac.TAG_COUNT, D))


def run(quick: bool) -> list[dict]:
    batches = (1, 1_000, 10_000) if quick else (1, 1_000, 100_000)
    min_time = 0.2 if quick else 1.0
    base_templates = 2 if quick else 8
    codes = _templates(max(batches))
    field_values = codec.to_field(codes)
    results = []
    for k, n in SCHEMES:
        base_split, base_combine, base_latency = _pycryptodome(codes[:base_templates], k, n)
        for batch in batches:
            secrets = field_values[:batch]
            shares = sharing.split(secrets, k, n)
            xs = list(range(1, k + 1))
            ys = shares[:k]
            params = {"k": k, "n": n, "d": D, "batch": batch}
            rate = batch / _median_time(lambda: sharing.split(secrets, k, n), min_time)
            results.append(_result("split", params, rate, "templates/s", base_split))
            rate = batch / _median_time(lambda: sharing.reconstruct(xs, ys), min_time)
            results.append(_result("reconstruct", params, rate, "templates/s", base_combine))
            del shares, ys
            if batch == 1:
                continue
            rate = batch / _median_time(lambda: sharing.split(epoch_mac.extend(secrets, KEY), k, n), min_time)
            results.append(_result("split + MAC", params, rate, "templates/s", base_split))
            ext_shares = sharing.split(epoch_mac.extend(secrets, KEY), k, n)
            ext_ys = ext_shares[:k]
            rate = batch / _median_time(lambda ys=ext_ys: epoch_mac.check(sharing.reconstruct(xs, ys), KEY), min_time)
            results.append(_result("reconstruct + check", params, rate, "templates/s", base_combine))
            del ext_shares, ext_ys
        one = field_values[:1]
        shares = sharing.split(one, k, n)
        xs = list(range(1, k + 1))
        ys = shares[:k]
        params = {"k": k, "n": n, "d": D, "batch": 1}
        calls = 300 if quick else 3000
        results.append(
            _result("reconstruct latency", params, _latency_us(lambda: sharing.reconstruct(xs, ys), calls), "us", base_latency, higher=False)
        )
        recs = record.make_records(
            tenant="bench",
            subject="subject-1",
            epoch=1,
            threshold=k,
            shareholders=n,
            dimension=D,
            request_id="bench",
            shares=sharing.split(epoch_mac.extend(one, KEY), k, n)[:, 0, :],
        )
        chosen = recs[:k]
        key_shares = sharing.split(KEY.reshape(1, -1), k, n)[:, 0, :]
        keys = [record.KeyShare(epoch=1, index=r.index, dimension=D,
                                values=record.pack_values(key_shares[r.index - 1])) for r in chosen]

        def join_once():
            record.wipe(record.join(chosen, keys).template)

        results.append(_result("join latency", params, _latency_us(join_once, calls), "us", base_latency, higher=False))
    return results


def _templates(count: int) -> np.ndarray:
    # count encoded 512-d templates (int8). Test data, so numpy's generator is fine.
    gen = np.random.default_rng(512)
    return np.concatenate([codec.encode(gen.normal(size=(min(10_000, count - i), D)), D) for i in range(0, count, 10_000)])


def _pycryptodome(codes: np.ndarray, k: int, n: int) -> tuple[float, float, float]:
    # The baseline: split and combine templates as 32 16-byte blocks each;
    # returns (split templates/s, combine templates/s, combine latency us).
    blocks = [[row.tobytes()[i : i + 16] for i in range(0, D, 16)] for row in codes]
    start = time.perf_counter()
    shared = [[Shamir.split(k, n, block) for block in template] for template in blocks]
    split_rate = len(blocks) / (time.perf_counter() - start)
    times = []
    for template in shared:
        t0 = time.perf_counter()
        out = b"".join(Shamir.combine(block[:k]) for block in template)
        times.append(time.perf_counter() - t0)
        assert len(out) == D
    return split_rate, len(times) / sum(times), statistics.median(times) * 1e6


def _median_time(fn, min_time: float) -> float:
    # Seconds per call: one warm-up, then at least 3 calls and min_time seconds.
    fn()
    times = []
    total = 0.0
    while len(times) < 3 or total < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return statistics.median(times)


def _latency_us(fn, calls: int) -> float:
    # Median microseconds of single calls, after a warm-up.
    for _ in range(min(100, calls)):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _result(name: str, params: dict, value: float, unit: str, baseline_value: float, higher: bool = True) -> dict:
    # One result row in bench.run's format.
    return {
        "suite": "core",
        "name": name,
        "params": dict(params),
        "value": float(f"{value:.4g}"),
        "unit": unit,
        "baseline": BASELINE,
        "baseline_value": float(f"{baseline_value:.4g}"),
        "ratio": float(f"{value / baseline_value:.4g}"),
        "higher_is_better": higher,
    }


# The seam must be the OS CSPRNG while measuring (a test could have patched it).
assert rng.RANDOM_BYTES.__module__ in ("posix", "nt", "os"), "benchmark with the real CSPRNG only"
