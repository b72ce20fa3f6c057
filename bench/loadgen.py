"""Load generator and soak: a steady verification rate against a local
three-node cluster, with latency, errors and every process's memory.

    python -m bench.loadgen [--duration 600] [--rate 200] [--subjects N] [--dim 512]
                            [--impostors 0.1] [--workers 48] [--sample-every 5]
                            [--dir D] [--out bench/results/soak.json]

What it does, in its own process, on loopback only:

1. ``vaultctl.cluster.up`` a fresh cluster (3 nodes, k = 2) in a temporary
   folder (or ``--dir``; a cluster already there is refused, so a soak never
   mixes with someone's data), and enrol N synthetic templates.
2. Send verifications OPEN-LOOP at ``--rate`` per second for ``--duration``
   seconds: request i is due at t0 + i / rate whatever happened to earlier
   ones, so a slow cluster shows as latency and backlog, not as a politely
   lower rate (no coordinated omission). Latency is measured from the time
   a request was DUE, and also from the moment it was sent (service time).
   A fraction ``--impostors`` of the probes are another subject's template
   (must be NO_MATCH); the rest are noisy copies of the subject's own
   (must be MATCH). Subjects are taken round-robin.
3. Every ``--sample-every`` seconds, read the resident memory (VmRSS,
   /proc/<pid>/status) of the matcher, each node and this process.
4. Stop scheduling at the deadline, wait at most 30 s for calls in flight,
   stop the cluster, and write one JSON document.

The attempt limit: every node allows ``attempts_per_subject`` (10 in the
dev cluster) releases of one subject per 60 s. A steady rate R over N
subjects costs each subject 60 R / N attempts a minute at each node asked,
so N defaults to ceil(60 R / 6) (six a minute, under the limit of ten):
2,000 subjects at 200/s. The cluster's limits are left as shipped.

Bounded: it never sends more than rate x duration requests, and a watchdog
stops the cluster and exits (status 3) if the run overstays its duration by
two minutes. Exit status 0 when the run completed with no error and no
wrong decision, 1 otherwise (the JSON says which).

The JSON (``bench/results/soak.json`` by default) is also a ``bench.run``
results document (suite "soak"), so ``docs/benchmarks.md`` shows its
figures beside their targets; the details are under ``"soak"``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter

import grpc
import numpy as np

from bench.run import machine_info
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "soak.json"
ATTEMPTS_PER_MINUTE = 6          # per subject and node; the dev cluster allows 10 per 60 s
DRAIN_S = 30.0
WATCHDOG_GRACE_S = 120.0
MAX_DURATION_S = 6 * 3600


def rss_mb(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {"count": int(a.size), "p50": round(float(np.percentile(a, 50)), 2),
            "p90": round(float(np.percentile(a, 90)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "max": round(float(a.max()), 2), "mean": round(float(a.mean()), 2)}


def memory_summary(samples: list[tuple[float, float]], warmup_s: float) -> dict:
    """First/last/max, and the least-squares slope after the warm-up (MB per minute)."""
    if not samples:
        return {}
    steady = [(t, m) for t, m in samples if t >= warmup_s] or samples
    t = np.array([s[0] for s in steady])
    m = np.array([s[1] for s in steady])
    slope = float(np.polyfit(t, m, 1)[0]) * 60 if len(steady) >= 3 and np.ptp(t) > 0 else 0.0
    # The second half alone: whether memory has levelled off (caches and the
    # replay sets fill during the first minutes, then stay).
    half = [(a, b) for a, b in samples if a >= samples[-1][0] / 2]
    th, mh = np.array([s[0] for s in half]), np.array([s[1] for s in half])
    slope_half = float(np.polyfit(th, mh, 1)[0]) * 60 if len(half) >= 3 and np.ptp(th) > 0 else 0.0
    return {
        "first_mb": round(samples[0][1], 1), "after_warmup_mb": round(steady[0][1], 1),
        "last_mb": round(samples[-1][1], 1), "max_mb": round(max(s[1] for s in samples), 1),
        "growth_after_warmup_mb": round(steady[-1][1] - steady[0][1], 1),
        "slope_mb_per_min": round(slope, 3),
        "second_half_slope_mb_per_min": round(slope_half, 3),
        "second_half_growth_mb": round(half[-1][1] - half[0][1], 1) if half else 0.0,
        "samples": [[round(a, 1), round(b, 1)] for a, b in samples],
    }


class Run:
    def __init__(self, args):
        self.args = args
        self.outcomes: Counter = Counter()        # (kind, decision or status name)
        self.errors: Counter = Counter()          # status name -> count
        self.due_ms: list[float] = []
        self.service_ms: list[float] = []
        self.lock = threading.Lock()
        self.sent = 0
        self.late_starts = 0                      # requests started > 1 s after they were due
        self.memory: dict[str, list[tuple[float, float]]] = {}
        self.cpu_start: dict[str, float | None] = {}
        self.cpu_end: dict[str, float | None] = {}

    # --- the load ------------------------------------------------------------------

    def worker(self, client: MatcherClient, jobs: queue.Queue, probes, templates, subjects, t0: float) -> None:
        rng = np.random.default_rng(threading.get_native_id())
        while True:
            job = jobs.get()
            if job is None:
                return
            i, due = job
            s = i % len(subjects)
            impostor = rng.random() < self.args.impostors
            probe = templates[(s + 1) % len(subjects)] if impostor else probes[s]
            started = time.monotonic()
            try:
                outcome = client.verify(subjects[s], probe).decision
            except grpc.RpcError as err:
                outcome = err.code().name
            done = time.monotonic()
            kind = "impostor" if impostor else "genuine"
            with self.lock:
                self.outcomes[(kind, outcome)] += 1
                if outcome not in ("MATCH", "NO_MATCH"):
                    self.errors[outcome] += 1
                self.due_ms.append((done - due) * 1000)
                self.service_ms.append((done - started) * 1000)
                if started - due > 1.0:
                    self.late_starts += 1

    def sampler(self, pids: dict[str, int], t0: float, stop: threading.Event) -> None:
        while True:
            now = time.monotonic() - t0
            for name, pid in pids.items():
                mb = rss_mb(pid)
                if mb is not None:
                    self.memory.setdefault(name, []).append((now, mb))
            if stop.wait(self.args.sample_every):
                break

    def go(self, root: pathlib.Path) -> dict:
        a = self.args
        info = cluster.up(root, dim=a.dim)
        addresses = [info["matcher"]["address"]] + [s["address"] for s in info["shareholders"]]
        if not all(addr.startswith("127.0.0.1:") for addr in addresses):
            raise SystemExit(f"refusing to load anything but loopback: {addresses}")
        pids = {"matcher": info["matcher"]["pid"], **{s["name"]: s["pid"] for s in info["shareholders"]},
                "loadgen": os.getpid()}
        templates = synthetic_templates(a.subjects, a.dim, seed=a.seed)
        probes = np.stack([noisy_copy(templates[i], seed=a.seed + 1 + i) for i in range(a.subjects)])
        subjects = [f"soak-{i:06d}" for i in range(a.subjects)]
        started_enrol = time.monotonic()
        with MatcherClient.from_cluster_dir(root, timeout_s=60) as enroller:
            codes = Counter(r.code for r in enroller.enroll_many(zip(subjects, templates)))
        enrol_s = time.monotonic() - started_enrol
        if set(codes) != {0}:
            raise SystemExit(f"enrolment failed: {dict(codes)}")

        total = int(a.rate * a.duration)
        jobs: queue.Queue = queue.Queue()
        client = MatcherClient.from_cluster_dir(root, timeout_s=10)
        stop_sampling = threading.Event()
        t0 = time.monotonic()
        self.cpu_start = {n: cpu_s(p) for n, p in pids.items()}
        sampler = threading.Thread(target=self.sampler, args=(pids, t0, stop_sampling), daemon=True)
        sampler.start()
        workers = [threading.Thread(target=self.worker, args=(client, jobs, probes, templates, subjects, t0), daemon=True)
                   for _ in range(a.workers)]
        for w in workers:
            w.start()
        # Open loop: request i is due at t0 + i / rate.
        for i in range(total):
            due = t0 + i / a.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            jobs.put((i, due))
            self.sent += 1
        sent_s = time.monotonic() - t0
        for _ in workers:
            jobs.put(None)
        drain_deadline = time.monotonic() + DRAIN_S
        for w in workers:
            w.join(max(0.0, drain_deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        stop_sampling.set()
        sampler.join(5)
        self.cpu_end = {n: cpu_s(p) for n, p in pids.items()}
        client.close()
        with self.lock:
            completed = sum(self.outcomes.values())
        cluster.down(root)
        return self.report(info, enrol_s, total, completed, sent_s, elapsed, pids)

    # --- the report ------------------------------------------------------------------

    def report(self, info, enrol_s, total, completed, sent_s, elapsed, pids) -> dict:
        a = self.args
        genuine = {k[1]: v for k, v in self.outcomes.items() if k[0] == "genuine"}
        impostor = {k[1]: v for k, v in self.outcomes.items() if k[0] == "impostor"}
        false_match = impostor.get("MATCH", 0)
        false_non_match = genuine.get("NO_MATCH", 0)
        warmup = min(60.0, a.duration * 0.2)
        memory = {name: memory_summary(samples, warmup) for name, samples in self.memory.items()}
        cpu = {n: (round(self.cpu_end[n] - self.cpu_start[n], 2) if self.cpu_end.get(n) is not None
                   and self.cpu_start.get(n) is not None else None) for n in pids}
        due, service = percentiles(self.due_ms), percentiles(self.service_ms)
        throughput = completed / sent_s if sent_s > 0 else 0.0
        errors = sum(self.errors.values())
        ok = errors == 0 and false_match == 0 and false_non_match == 0 and completed == total
        soak = {
            "ok": ok,
            "config": {"duration_s": a.duration, "rate_per_s": a.rate, "subjects": a.subjects, "dim": a.dim,
                       "impostor_fraction": a.impostors, "workers": a.workers, "sample_every_s": a.sample_every,
                       "shareholders": info["spec"]["shareholders"], "threshold": info["spec"]["threshold"],
                       "attempts_per_subject_per_min_at_each_node": round(60 * a.rate / a.subjects, 2),
                       "node_limit": "attempts_per_subject = 10 per 60 s (dev cluster default, unchanged)"},
            "enrolment_s": round(enrol_s, 2),
            "scheduled": total, "sent": self.sent, "completed": completed,
            "elapsed_s": round(elapsed, 2), "sending_s": round(sent_s, 2),
            "throughput_per_s": round(throughput, 1),
            "late_starts": self.late_starts,
            "latency_from_due_ms": due, "service_time_ms": service,
            "genuine": genuine, "impostor": impostor,
            "false_match": false_match, "false_non_match": false_non_match,
            "errors_by_status": dict(self.errors),
            "cpu_s": cpu,
            "memory": memory,
        }

        def result(name, value, unit, baseline, baseline_value, higher):
            ratio = (value / baseline_value) if baseline_value else None
            return {"suite": "soak", "name": name, "params": {"rate": a.rate, "duration_s": a.duration,
                                                               "subjects": a.subjects, "d": a.dim},
                    "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
                    "ratio": ratio, "higher_is_better": higher}

        results = [
            result("verifications served", round(throughput, 1), "/s", "target rate", a.rate, True),
            result("latency p50 (from due)", due.get("p50"), "ms", "—", None, False),
            result("latency p99 (from due)", due.get("p99"), "ms", "—", None, False),
            result("errors", errors, "calls", "target", 0, False),
            result("false matches", false_match, "calls", "target", 0, False),
            result("matcher RSS slope", memory.get("matcher", {}).get("slope_mb_per_min"), "MB/min", "target (flat)", 0, False),
        ]
        for name in [s["name"] for s in info["shareholders"]]:
            results.append(result(f"{name} RSS slope", memory.get(name, {}).get("slope_mb_per_min"), "MB/min",
                                  "target (flat)", 0, False))
        return {
            "suite": "soak", "quick": a.duration < 600, "machine": machine_info(),
            "method": (
                f"`python -m bench.loadgen --duration {a.duration:g} --rate {a.rate:g}`: a fresh local cluster "
                f"(3 nodes, k = 2, d = {a.dim}), {a.subjects} subjects, open-loop verifications at a fixed rate "
                f"({a.impostors:.0%} impostor probes), latency from each request's due time; resident memory of "
                f"every process sampled every {a.sample_every:g} s, slope by least squares after a "
                f"{warmup:g} s warm-up. Targets: the rate, zero errors, zero false matches, flat memory."
            ),
            "results": results,
            "soak": soak,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--rate", type=float, default=200.0, help="verifications per second (default 200)")
    p.add_argument("--subjects", type=int, default=None, help="enrolled subjects (default: ceil(60 * rate / 6))")
    p.add_argument("--dim", type=int, default=512, help="template dimension (default 512)")
    p.add_argument("--impostors", type=float, default=0.1, help="fraction of impostor probes (default 0.1)")
    p.add_argument("--workers", type=int, default=48, help="client threads (default 48)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples (default 5)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dir", type=pathlib.Path, default=None, help="cluster folder (default: a fresh temporary one)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S or not 0 < args.rate <= 10_000:
        p.error(f"--duration must be in (0, {MAX_DURATION_S}] and --rate in (0, 10000]")
    if not 0 <= args.impostors < 1 or args.workers < 1 or args.sample_every <= 0:
        p.error("--impostors must be in [0, 1), --workers and --sample-every positive")
    args.subjects = args.subjects or max(50, math.ceil(60 * args.rate / ATTEMPTS_PER_MINUTE))

    made = args.dir is None
    root = pathlib.Path(tempfile.mkdtemp(prefix="splitvault-soak-")) / "cluster" if made else args.dir
    if not made and (root / "cluster.json").exists():
        p.error(f"{root} already holds a cluster; the soak starts a fresh one")

    def watchdog() -> None:
        print("loadgen: overstayed its duration; stopping the cluster", file=sys.stderr, flush=True)
        try:
            cluster.down(root)
        finally:
            os._exit(3)

    timer = threading.Timer(args.duration + DRAIN_S + WATCHDOG_GRACE_S + 300, watchdog)  # + start-up and enrolment
    timer.daemon = True
    timer.start()
    run = Run(args)
    try:
        doc = run.go(root)
    finally:
        timer.cancel()
        if (root / "cluster.json").exists():
            try:
                cluster.down(root)
            except cluster.ClusterError:
                pass
        if made:
            shutil.rmtree(root.parent, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    s = doc["soak"]
    print(
        f"soak: {s['completed']}/{s['scheduled']} verifications in {s['sending_s']} s = {s['throughput_per_s']}/s; "
        f"latency p50 {s['latency_from_due_ms'].get('p50')} ms, p99 {s['latency_from_due_ms'].get('p99')} ms; "
        f"errors {s['errors_by_status'] or 0}; false matches {s['false_match']}; "
        + "; ".join(f"{n} RSS {m.get('after_warmup_mb')}->{m.get('last_mb')} MB ({m.get('slope_mb_per_min')} MB/min, "
                    f"second half {m.get('second_half_slope_mb_per_min')} MB/min)"
                    for n, m in s["memory"].items())
        + f"; wrote {args.out}",
        flush=True,
    )
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
