"""Benchmark: the payment path, split custody against single custody.

Everything runs on this machine as separate processes over mutual TLS on
loopback: three shareholder nodes (``python -m shareholders``, threshold 2)
and the matcher (``python -m matcher``); beside them, in the same run, the
baselines (``python -m bench.suite_verify serve ...``), built on the same
gRPC stack (``vaultrpc.server.start``: same interceptor, TLS, logging and
thread pool), the same messages (VerifyRequest/VerifyResponse) and the same
matching (``codec.encode`` then ``codec.cosine`` on int8 codes against the
same threshold):

- single custody (the ``baseline`` of every Verify figure): the provider
  calls a verification service that fetches the whole quantised template
  from ONE store over gRPC (mTLS, deadline) and matches it. The store keeps
  templates in memory, which is the most favourable store possible for the
  baseline.
- one hop (``verify_p50_vs_one_hop``): a verification service that holds the
  templates in memory itself.
- Verify on shares (``verify_on_shares_p50``): the same provider's second
  tenant, configured ``verify_on_shares = true`` (nothing rejoined), with
  the first 1,000 templates enrolled; its baseline is today's Verify p50 of
  the same run (issue 12's target: at most 3x), interleaved with the others.

The provider (this process) signs a fresh ticket per split-custody verify
(Ed25519, its real cost); the baselines take no ticket. Latency: sequential
calls from one client, interleaved in rounds across the three systems.
Throughput: ``concurrency`` client threads for a fixed time. Bulk enrolment:
one EnrollStream of the whole gallery (matcher batches of ``enroll_batch``),
against loading the same codes into the single store in batches of the same
size. Nodes keep their default attempt limit (10 per subject per 60 s); the
bench stays under it by spreading verifications over many enrolled subjects
(``subjects`` in the params). All processes log at WARNING. Errors are
counted; a figure measured with errors says so in its params.

Because the machine may be shared, every Verify figure also carries the CPU
time each process spent per verification (``cpu_us_per_verify``: client,
matcher, the three nodes together; the baseline's client, verifier and
store), read from /proc around the measurement, and the load average before
the run: CPU per verification is what a design costs whatever else runs,
and 2 cores divided by it bounds the throughput any run could reach.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures

import grpc
import numpy as np

from bench.run import result as bench_result
from splitvault.v1 import common_pb2, matcher_pb2, shareholder_pb2
from vault import codec, pki
from vaultctl.client import MatcherClient
from vaultrpc import logs
from vaultrpc import server as rpcserver
from vaultrpc.server import caller
from vaultrpc.files import write_atomic
from vaultrpc.tls import TlsFiles, secure_channel

# The node-file helpers are test support (tests/node_kit.py), not the product.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import node_kit as testing  # noqa: E402

SUITE = "verify"
ROOT = pathlib.Path(__file__).resolve().parent.parent
DIM = 512
TENANT = "bench-psp"
KEY_ID = "bench-psp-1"
# The same provider's second tenant, with verify_on_shares = true (nothing rejoined).
SHARES_TENANT = "bench-psp-shares"
SHARES_SUBJECTS = 1_000
NODES = ("bank-a", "bank-b", "bank-c")
K = 2
MATCH_THRESHOLD = 0.8
ATTEMPTS_PER_SUBJECT = 10
ENROLL_BATCH = 512
BASELINE = "single custody: verifier fetches the whole template from one store over gRPC (same stack, mTLS, matching)"
ONE_HOP = "one hop: verifier holding the templates in memory (same stack, mTLS, matching)"
TARGETS = {"verify_p50_ratio": 1.5, "verify_per_s": 500.0, "enrol_per_s": 5000.0,
           "verify_on_shares_p50_ratio": 3.0}

STORE_SERVICE = "bench.TemplateStore"
VERIFIER_SERVICE = "bench.PlainVerifier"


# --- the baselines: generic handlers on the project's server plumbing -------------


def _serve(args) -> None:
    log = logs.setup(f"bench-{args.kind}", "WARNING")
    tls = TlsFiles(args.ca, args.cert, args.key).load()
    templates: dict[tuple[str, str], np.ndarray] = {}
    lock = threading.Lock()

    def put(request, context):
        who = caller(context)
        with lock:
            for rec in request.records:
                templates[(rec.tenant if args.kind == "store" else who.name, rec.subject)] = np.frombuffer(
                    rec.values, dtype=np.int8
                )
        return shareholder_pb2.StoreSharesResponse(stored=len(request.records))

    def fetch(request, context):
        code = templates.get((request.tenant, request.subject))
        if code is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "No template is stored for this subject.")
        return common_pb2.ShareRecord(tenant=request.tenant, subject=request.subject, dimension=DIM,
                                      values=code.tobytes())

    store = None
    if args.kind == "verifier":
        store = _Stub(secure_channel(args.store, tls, expect=pki.Identity("shareholder", "store")), STORE_SERVICE, "Fetch",
                      shareholder_pb2.DescribeRecordsRequest, common_pb2.ShareRecord)

    def verify(request, context):
        tenant = caller(context).name
        probe = np.array(request.probe, dtype=np.float32)
        if probe.shape != (DIM,) or not np.isfinite(probe).all() or not probe.any():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "The probe is not a valid vector.")
        if store is not None:
            try:
                rec = store(shareholder_pb2.DescribeRecordsRequest(tenant=tenant, subject=request.subject), 2.0)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())
            template = np.frombuffer(rec.values, dtype=np.int8)
        else:
            template = templates.get((tenant, request.subject))
            if template is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "No template is stored for this subject.")
        score = codec.cosine(codec.encode(probe, DIM), template)
        decision = matcher_pb2.DECISION_MATCH if score >= MATCH_THRESHOLD else matcher_pb2.DECISION_NO_MATCH
        return matcher_pb2.VerifyResponse(decision=decision, decision_id=str(uuid.uuid4()))

    def unary(fn, req, resp):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    if args.kind == "store":
        service = STORE_SERVICE
        methods = {
            "Put": unary(put, shareholder_pb2.StoreSharesRequest, shareholder_pb2.StoreSharesResponse),
            "Fetch": unary(fetch, shareholder_pb2.DescribeRecordsRequest, common_pb2.ShareRecord),
        }
        roles = {f"/{service}/{m}": frozenset({pki.ROLE_MATCHER}) for m in methods}
    else:
        service = VERIFIER_SERVICE
        methods = {
            "Verify": unary(verify, matcher_pb2.VerifyRequest, matcher_pb2.VerifyResponse),
            "Put": unary(put, shareholder_pb2.StoreSharesRequest, shareholder_pb2.StoreSharesResponse),
        }
        roles = {f"/{service}/{m}": frozenset({pki.ROLE_PSP}) for m in methods}
    handler = grpc.method_handlers_generic_handler(service, methods)
    running = rpcserver.start(
        listen="127.0.0.1:0", tls=tls, register=(lambda s: s.add_generic_rpc_handlers((handler,)),),
        service_names=(service,), roles=roles, logger=log, max_workers=64,
    )
    write_atomic(args.ready, json.dumps({"address": f"127.0.0.1:{running.port}", "pid": os.getpid()}))
    rpcserver.run_until_signalled(running, grace=1.0)


# The one-hop baseline serves under a server certificate of its own.
MEMORY = pki.Identity("matcher", "memory")


class _Stub:
    """A unary call on a generic service: (request, timeout) -> response."""

    def __init__(self, channel, service: str, method: str, req, resp):
        self.channel = channel
        self._call = channel.unary_unary(
            f"/{service}/{method}", request_serializer=req.SerializeToString, response_deserializer=resp.FromString
        )

    def __call__(self, request, timeout: float):
        return self._call(request, timeout=timeout)


# --- the processes ---------------------------------------------------------------------


class Processes:
    """Every server of the bench as its own process; ``close()`` stops them."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = testing.write_dev_pki(
            root / "pki",
            [("shareholder", n) for n in NODES] + [("matcher", "matcher"), ("psp", TENANT), ("psp", SHARES_TENANT),
                                                  ("auditor", "auditor"),
                                                  ("shareholder", "store"), ("matcher", "memory")],
        )
        self.ticket_key = pki.load_signing_key(pki.new_signing_key()[0])

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")}
        self.procs[name] = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=log, env=env)
        log.close()

    def _ready(self, name: str, path: pathlib.Path, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())["address"]
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.root / f'{name}.log').read_text()[-1500:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not become ready in {timeout_s} s")

    def start(self) -> dict[str, str]:
        public = pki.public_key_raw(self.ticket_key)
        members = ", ".join(f'"{n}" = {i}' for i, n in enumerate(NODES, start=1))
        committee = f"\n[committee]\nthreshold = {K}\nmembers = {{ {members} }}\n"
        for index, name in enumerate(NODES, start=1):
            cfg = testing.write_node_files(
                self.root / name, name=name, index=index, tls=self.files[("shareholder", name)],
                tenants={TENANT: {KEY_ID: public}, SHARES_TENANT: {KEY_ID: public}},
                attempts_per_subject=ATTEMPTS_PER_SUBJECT,
                extra=committee,
            )
            self._spawn(name, ["-m", "shareholders", "--config", str(cfg)])
        for kind in ("store", "memory"):
            files = self.files[("shareholder", "store")] if kind == "store" else self.files[("matcher", "memory")]
            self._spawn(kind, ["-m", "bench.suite_verify", "serve", "--kind", kind, "--ca", files.ca, "--cert",
                               files.cert, "--key", files.key, "--ready", str(self.root / f"{kind}.ready")])
        addresses = {name: self._ready(name, self.root / name / "ready.json") for name in NODES}
        # The first epoch's MAC key, dealt by the nodes as `vaultctl cluster up` has them do.
        testing.deal_first_key([(n, i, addresses[n]) for i, n in enumerate(NODES, start=1)], K,
                               self.files[("auditor", "auditor")], width=DIM)
        addresses["store"] = self._ready("store", self.root / "store.ready")
        addresses["memory"] = self._ready("memory", self.root / "memory.ready")
        # The single-custody verifier uses the matcher's certificate to reach its store.
        m = self.files[("matcher", "matcher")]
        self._spawn("verifier", ["-m", "bench.suite_verify", "serve", "--kind", "verifier", "--ca", m.ca, "--cert",
                                 m.cert, "--key", m.key, "--store", addresses["store"],
                                 "--ready", str(self.root / "verifier.ready")])
        matcher_toml = self.root / "matcher.toml"
        nodes = "".join(
            f'[[shareholders]]\nname = "{n}"\nindex = {i}\naddress = "{addresses[n]}"\n\n'
            for i, n in enumerate(NODES, start=1)
        )
        matcher_toml.write_text(
            f'[matcher]\nlisten = "127.0.0.1:0"\nready_file = "{self.root / "matcher.ready"}"\n'
            f'dimension = {DIM}\nthreshold = {K}\ncall_timeout_ms = 2000\nlog_level = "WARNING"\n'
            f'enroll_batch = {ENROLL_BATCH}\ncluster_id = "{testing.CLUSTER_ID}"\n\n'
            f'[tls]\nca = "{m.ca}"\ncert = "{m.cert}"\nkey = "{m.key}"\n\n[metrics]\nport = -1\n\n{nodes}'
            f'[tenants.{TENANT}]\nmatch_threshold = {MATCH_THRESHOLD}\nscore_allowed = false\n'
            f'ticket_keys = {{ "{KEY_ID}" = "{public.hex()}" }}\n\n'
            f'[tenants.{SHARES_TENANT}]\nmatch_threshold = {MATCH_THRESHOLD}\nscore_allowed = false\n'
            f'verify_on_shares = true\nticket_keys = {{ "{KEY_ID}" = "{public.hex()}" }}\n'
        )
        self._spawn("matcher", ["-m", "matcher", "--config", str(matcher_toml)])
        addresses["verifier"] = self._ready("verifier", self.root / "verifier.ready")
        addresses["matcher"] = self._ready("matcher", self.root / "matcher.ready")
        return addresses

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- measuring ------------------------------------------------------------------------


def _gallery(count: int, seed: int = 20240601) -> tuple[np.ndarray, np.ndarray]:
    """Unit templates and a genuine probe (template + noise, cosine ~0.95) for each."""
    gen = np.random.default_rng(seed)
    templates = gen.standard_normal((count, DIM)).astype(np.float32)
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    probes = templates + gen.standard_normal((count, DIM)).astype(np.float32) * (0.3 / np.sqrt(DIM))
    return templates, probes.astype(np.float32)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU time per operation of each bench process: the cost of a design,
    independent of how busy the machine is."""

    GROUPS = {"split": {"client": ("client",), "matcher": ("matcher",), "nodes": NODES},
              "shares": {"client": ("client",), "matcher": ("matcher",), "nodes": NODES},
              "single": {"client": ("client",), "verifier": ("verifier",), "store": ("store",)},
              "one_hop": {"client": ("client",), "verifier": ("memory",)}}

    def __init__(self, procs: "Processes"):
        self.pids = {name: proc.pid for name, proc in procs.procs.items()}

    def snapshot(self) -> dict[str, float]:
        snap = {"client": time.process_time()}
        for name, pid in self.pids.items():
            try:
                snap[name] = _cpu_s(pid)
            except (OSError, IndexError, ValueError):
                snap[name] = 0.0
        return snap

    def per_op_us(self, system: str, before: dict, after: dict, ops: int) -> dict[str, int]:
        out = {}
        for group, names in self.GROUPS[system].items():
            out[group] = round(sum(after[n] - before[n] for n in names) / max(1, ops) * 1e6)
        out["total"] = sum(out.values())
        return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _result(name, params, value, unit, baseline, baseline_value, higher) -> dict:
    return bench_result(SUITE, name, params, value, unit, baseline, baseline_value, higher)


class _Systems:
    """One callable per system under test: verify(subject_index) -> decision (1 MATCH, 2 NO_MATCH)."""

    def __init__(self, procs: Processes, addresses: dict[str, str], probes: np.ndarray):
        self.probes = probes
        psp = procs.files[("psp", TENANT)].load()
        self.client = MatcherClient(addresses["matcher"], psp, tenant=TENANT, ticket_key=procs.ticket_key,
                                    key_id=KEY_ID, matcher="matcher", cluster_id=testing.CLUSTER_ID, timeout_s=10.0)
        self.on_shares = MatcherClient(addresses["matcher"], procs.files[("psp", SHARES_TENANT)].load(),
                                       tenant=SHARES_TENANT, ticket_key=procs.ticket_key, key_id=KEY_ID,
                                       matcher="matcher", cluster_id=testing.CLUSTER_ID, timeout_s=10.0)
        self.plain = _Stub(secure_channel(addresses["verifier"], psp, expect=pki.Identity("matcher", "matcher")),
                           VERIFIER_SERVICE, "Verify",
                           matcher_pb2.VerifyRequest, matcher_pb2.VerifyResponse)
        self.memory = _Stub(secure_channel(addresses["memory"], psp, expect=MEMORY), VERIFIER_SERVICE, "Verify",
                            matcher_pb2.VerifyRequest, matcher_pb2.VerifyResponse)

    def split(self, i: int) -> int:
        result = self.client.verify(f"s{i}", self.probes[i])
        return 1 if result.decision == "MATCH" else 2

    def shares(self, i: int) -> int:
        # Verify on shares (the second tenant): its own, smaller, gallery.
        i %= SHARES_SUBJECTS
        result = self.on_shares.verify(f"s{i}", self.probes[i])
        return 1 if result.decision == "MATCH" else 2

    def single(self, i: int) -> int:
        return self.plain(matcher_pb2.VerifyRequest(subject=f"s{i}", probe=self.probes[i].tolist()), 10.0).decision

    def one_hop(self, i: int) -> int:
        return self.memory(matcher_pb2.VerifyRequest(subject=f"s{i}", probe=self.probes[i].tolist()), 10.0).decision

    def close(self) -> None:
        self.client.close()
        self.on_shares.close()
        self.plain.channel.close()
        self.memory.channel.close()


def _latencies(systems: _Systems, names: tuple[str, ...], calls: int, subjects: int, start: int, meter=None):
    # Sequential calls, interleaved in rounds so drift hits every system alike.
    lat = {name: [] for name in names}
    errors = {name: 0 for name in names}
    matches = {name: 0 for name in names}
    cpu = {name: {} for name in names}
    rounds = 10
    i = start
    for _ in range(rounds):
        for name in names:
            fn = getattr(systems, name)
            before = meter.snapshot() if meter else None
            for _ in range(calls // rounds):
                t0 = time.perf_counter()
                try:
                    decision = fn(i % subjects)
                except grpc.RpcError:
                    errors[name] += 1
                else:
                    lat[name].append(time.perf_counter() - t0)
                    matches[name] += decision == 1
                i += 1
            if meter:
                used = meter.per_op_us(name, before, meter.snapshot(), calls // rounds)
                for group, us in used.items():
                    cpu[name][group] = cpu[name].get(group, 0) + us / rounds
    cpu = {name: {g: round(v) for g, v in groups.items()} for name, groups in cpu.items()}
    return lat, errors, matches, i, cpu


def _throughput(fn, *, seconds: float, concurrency: int, subjects: int, start: int) -> tuple[float, int, int]:
    """(calls/s, errors, next subject index) with ``concurrency`` threads calling fn for ``seconds``."""
    counter = iter(range(start, start + 10_000_000))
    lock = threading.Lock()
    done = [0, 0]
    stop_at = time.perf_counter() + seconds

    def worker():
        while time.perf_counter() < stop_at:
            with lock:
                i = next(counter)
            try:
                fn(i % subjects)
                ok = True
            except grpc.RpcError:
                ok = False
            with lock:
                done[0 if ok else 1] += 1

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    elapsed = time.perf_counter() - t0
    with lock:
        nxt = next(counter)
    return done[0] / elapsed, done[1], nxt


def run(quick: bool) -> list[dict]:
    subjects = 5_000 if quick else 20_000
    latency_calls = 300 if quick else 2_000
    seconds = 3.0 if quick else 10.0
    concurrency = 16
    templates, probes = _gallery(subjects)
    load_before = round(os.getloadavg()[0], 2)
    codes = codec.encode(templates, DIM)
    results = []
    with tempfile.TemporaryDirectory(prefix="splitvault-bench-") as tmp:
        procs = Processes(pathlib.Path(tmp))
        try:
            addresses = procs.start()
            systems = _Systems(procs, addresses, probes)
            try:
                # Bulk enrolment: the gallery through one EnrollStream ...
                t0 = time.perf_counter()
                replies = systems.client.enroll_many(((f"s{i}", templates[i]) for i in range(subjects)))
                failed = sum(1 for r in replies if r.code != 0)
                enrol_rate = subjects / (time.perf_counter() - t0)
                # ... against loading the same codes into the single store and the one-hop service.
                put_store = _Stub(secure_channel(addresses["store"], procs.files[("matcher", "matcher")].load(),
                                                 expect=pki.Identity("shareholder", "store")),
                                  STORE_SERVICE, "Put", shareholder_pb2.StoreSharesRequest,
                                  shareholder_pb2.StoreSharesResponse)
                put_memory = _Stub(secure_channel(addresses["memory"], procs.files[("psp", TENANT)].load(), expect=MEMORY),
                                   VERIFIER_SERVICE, "Put", shareholder_pb2.StoreSharesRequest,
                                   shareholder_pb2.StoreSharesResponse)
                t0 = time.perf_counter()
                for lo in range(0, subjects, ENROLL_BATCH):
                    batch = [common_pb2.ShareRecord(tenant=TENANT, subject=f"s{i}", dimension=DIM,
                                                    values=codes[i].tobytes())
                             for i in range(lo, min(lo + ENROLL_BATCH, subjects))]
                    put_store(shareholder_pb2.StoreSharesRequest(records=batch), 30.0)
                plain_rate = subjects / (time.perf_counter() - t0)
                for lo in range(0, subjects, ENROLL_BATCH):
                    batch = [common_pb2.ShareRecord(tenant=TENANT, subject=f"s{i}", dimension=DIM,
                                                    values=codes[i].tobytes())
                             for i in range(lo, min(lo + ENROLL_BATCH, subjects))]
                    put_memory(shareholder_pb2.StoreSharesRequest(records=batch), 30.0)
                put_store.channel.close()
                put_memory.channel.close()
                shares_failed = sum(1 for r in systems.on_shares.enroll_many(
                    (f"s{i}", templates[i]) for i in range(min(SHARES_SUBJECTS, subjects))) if r.code != 0)
                results.append(_result(
                    "enrol_per_s",
                    {"templates": subjects, "dim": DIM, "n": len(NODES), "k": K, "matcher_batch": ENROLL_BATCH,
                     "failed": failed, "target": f">= {TARGETS['enrol_per_s']:.0f}"},
                    enrol_rate, "templates/s",
                    "single custody: the same int8 codes loaded into one in-memory store over gRPC, same batch size",
                    plain_rate, True,
                ))

                # Warm up every path (channels, caches), then latency.
                next_i = 0
                meter = _CpuMeter(procs)
                _latencies(systems, ("split", "shares", "single", "one_hop"), 60, subjects, next_i)
                next_i += 60 * 4
                lat, errors, matches, next_i, cpu = _latencies(
                    systems, ("split", "shares", "single", "one_hop"), latency_calls, subjects, next_i, meter)
                p = {name: (_percentile(v, 50) * 1000, _percentile(v, 99) * 1000) for name, v in lat.items()}
                common = {"n": len(NODES), "k": K, "dim": DIM, "calls": latency_calls, "concurrency": 1,
                          "subjects": subjects, "attempts_per_subject": ATTEMPTS_PER_SUBJECT,
                          "errors": errors["split"], "baseline_errors": errors["single"],
                          "genuine_match_rate": round(matches["split"] / max(1, len(lat["split"])), 4),
                          "cpu_us_per_verify": cpu["split"], "baseline_cpu_us_per_verify": cpu["single"],
                          "loadavg_1m_before": load_before}
                results.append(_result("verify_p50", {**common, "target": "<= 1.5x baseline"}, p["split"][0], "ms",
                                       BASELINE, p["single"][0], False))
                results.append(_result("verify_p99", common, p["split"][1], "ms", BASELINE, p["single"][1], False))
                results.append(_result("verify_p50_vs_one_hop", common, p["split"][0], "ms", ONE_HOP,
                                       p["one_hop"][0], False))
                # Verify on shares against today's Verify (rejoin in the matcher), same run, same probes.
                results.append(_result(
                    "verify_on_shares_p50",
                    {**common, "subjects": min(SHARES_SUBJECTS, subjects), "enrol_failed": shares_failed,
                     "errors": errors["shares"], "baseline_errors": errors["split"],
                     "genuine_match_rate": round(matches["shares"] / max(1, len(lat["shares"])), 4),
                     "cpu_us_per_verify": cpu["shares"], "baseline_cpu_us_per_verify": cpu["split"],
                     "p99_ms": round(p["shares"][1], 2), "baseline_p99_ms": round(p["split"][1], 2),
                     "target": "<= 3x baseline"},
                    p["shares"][0], "ms", "today's Verify: hedged MAC-checked release, rejoin in the matcher",
                    p["split"][0], False))
                results.append(_result("single_custody_p50_vs_one_hop", common, p["single"][0], "ms", ONE_HOP,
                                       p["one_hop"][0], False))

                # Throughput with concurrent clients.
                before = meter.snapshot()
                t0 = time.perf_counter()
                rate, errs, next_i = _throughput(systems.split, seconds=seconds, concurrency=concurrency,
                                                 subjects=subjects, start=next_i)
                after = meter.snapshot()
                split_cpu = meter.per_op_us("split", before, after, int(rate * (time.perf_counter() - t0)))
                busy = round(sum(after[k] - before[k] for k in after) / (time.perf_counter() - t0), 2)
                base_rate, base_errs, next_i = _throughput(systems.single, seconds=seconds, concurrency=concurrency,
                                                           subjects=subjects, start=next_i)
                results.append(_result(
                    "verify_per_s",
                    {"n": len(NODES), "k": K, "dim": DIM, "concurrency": concurrency, "seconds": seconds,
                     "subjects": subjects, "attempts_per_subject": ATTEMPTS_PER_SUBJECT, "errors": errs,
                     "baseline_errors": base_errs, "cpus": os.cpu_count(),
                     "cpu_us_per_verify": split_cpu, "bench_processes_cores_busy": busy,
                     "loadavg_1m_before": load_before,
                     "target": f">= {TARGETS['verify_per_s']:.0f}"},
                    rate, "verifications/s", BASELINE, base_rate, True,
                ))
            finally:
                systems.close()
        finally:
            procs.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.suite_verify")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one baseline service (used by run())")
    serve.add_argument("--kind", choices=("store", "verifier", "memory"), required=True)
    for name in ("ca", "cert", "key", "ready"):
        serve.add_argument(f"--{name}", required=True)
    serve.add_argument("--store")
    bench = sub.add_parser("run", help="run the suite and print its results")
    bench.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args)
    else:
        print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
