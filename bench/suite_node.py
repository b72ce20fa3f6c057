"""Benchmark: one shareholder node on loopback over mutual TLS.

Measures, in one run and against a bare gRPC echo of the same payload sizes
over the same mTLS (the baseline each figure's ``ratio`` is taken against):

- ``release_per_s``: ReleaseShare calls per second with the full ticket
  check (Ed25519 signature, tenant, expiry, replay set, attempt counter), the
  AES-GCM open of a 512-d share record, and a durable audit entry each
  (group commit, synchronous=FULL). Tickets are signed before the clock
  starts (signing is the payment provider's cost, not the node's).
- ``stream_store_per_s``: share records per second through one
  StoreShareStream (100 records per message, committed 1000 per
  transaction with one audit entry per batch), validated and sealed, each
  message under one provider batch ticket (as the matcher forwards a bulk
  enrolment: one signature check per message).

- ``release_per_s_postgres``, ``stream_store_per_s_postgres``: the same
  two figures for the same node with its store in PostgreSQL (a real server
  from the pgserver wheel, tests/pg_kit.py, on a Unix socket; the node's
  role bound by row-level security), measured in the same run; their
  baseline is the SQLite node's figure. Left out, saying why, where the
  server cannot start.

Each figure is the best of 1 (quick) or 3 node-then-echo rounds; every
round's rate is listed in ``params``, with the CPU microseconds the node
(and the echo server) spent per operation in the best round, a figure that
a loaded machine distorts much less than a rate. On a 2-core machine the client and the
server share the cores, so rates here are a floor for a real deployment.

The node and the echo server each run in their own process (``python -m
shareholders`` and ``python -m bench.suite_node echo-server``), the clients
in this one with grpc.aio, so neither side's GIL slows the other. Nothing is
mocked; errors are counted and a run with any error reports no figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from splitvault.v1 import common_pb2, shareholder_pb2
from vault import pki, ticket
from vault.field import P
from vault.record import MAC_COUNT
from vaultrpc import wire
from vaultrpc.files import write_atomic
from vaultrpc.tls import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, TlsFiles, identity_options

# The node-file helpers are test support (tests/node_kit.py), not the product.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import node_kit as testing  # noqa: E402
import pg_kit  # noqa: E402

SUITE = "node"
ROOT = pathlib.Path(__file__).resolve().parent.parent
DIM = 512
TENANT = "bench-psp"
KEY_ID = "bench-psp-1"
ECHO_UNARY = "/bench.Echo/Unary"
ECHO_STREAM = "/bench.Echo/Stream"
RELEASE = "/splitvault.v1.Shareholder/ReleaseShare"
STORE_STREAM = "/splitvault.v1.Shareholder/StoreShareStream"
TARGETS = {"release_per_s": 2000.0, "stream_store_per_s": 20000.0}


# --- the baseline: a bare echo service (generic handlers, no interceptor) -------


def _echo_server(args) -> None:
    reply = bytes(args.reply_bytes)

    def unary(request: bytes, context) -> bytes:
        return reply

    def stream(request_iterator, context) -> bytes:
        n = 0
        for message in request_iterator:
            n += len(message)
        return n.to_bytes(8, "big")

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_unary_rpc_method_handler(stream),
        },
    )
    tls = TlsFiles(args.ca, args.cert, args.key).load()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        handlers=(handler,),
        options=(
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ),
        maximum_concurrent_rpcs=256,
    )
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    server.start()
    write_atomic(args.ready, json.dumps({"port": port, "pid": os.getpid()}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


# --- process management ------------------------------------------------------------


def _wait_ready(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited with {proc.returncode} before it was ready.")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise RuntimeError("A benchmark server did not become ready in time.")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- workloads ------------------------------------------------------------------------


def _records(subjects: list[str], index: int, rng: np.random.Generator) -> list[common_pb2.ShareRecord]:
    values = rng.integers(0, P, size=(len(subjects), DIM + MAC_COUNT), dtype=np.uint32).astype("<u4")
    return [
        common_pb2.ShareRecord(
            tenant=TENANT, subject=s, index=index, epoch=1, threshold=2, shareholders=3, dimension=DIM,
            codec_version=1, mac_count=MAC_COUNT, values=values[i].tobytes(), request_id=f"enrol-{s}",
        )
        for i, s in enumerate(subjects)
    ]


def _stream_messages(records, ticket_key, per_message: int = 100) -> list[bytes]:
    # Each message carries the provider's batch ticket for its records, as the
    # matcher forwards a bulk enrolment (signed here, before the clock starts:
    # the node's cost is the check, once per message, and each record's membership).
    out = []
    for i in range(0, len(records), per_message):
        chunk = records[i : i + per_message]
        batch = wire.issue_batch(
            ticket_key, KEY_ID, tenant=TENANT, audience=testing.CLUSTER_ID, batch_id=f"batch-{i}",
            operation=ticket.ENROLL, items=[(r.subject, r.request_id, np.zeros(4, np.float32)) for r in chunk],
            ttl_ms=240_000,
        )
        out.append(shareholder_pb2.StoreShareStreamRequest(records=chunk, batches=[batch]).SerializeToString())
    return out


async def _unary_rate(channel, method: str, payloads: list[bytes], concurrency: int) -> tuple[float, int]:
    call = channel.unary_unary(method)
    it = iter(payloads)
    errors = 0

    async def worker():
        nonlocal errors
        for payload in it:
            try:
                await call(payload, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(payloads) / (time.perf_counter() - started), errors


async def _stream_rate(channel, method: str, messages: list[bytes], records: int) -> float:
    call = channel.stream_unary(method)

    async def gen():
        for m in messages:
            yield m

    started = time.perf_counter()
    await call(gen(), timeout=600)
    return records / (time.perf_counter() - started)


def _secure_aio(address: str, tls, expect: pki.Identity) -> grpc.aio.Channel:
    options = CHANNEL_OPTIONS + identity_options(expect)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


def _result(name, params, value, unit, baseline_name, baseline_value):
    return {
        "suite": SUITE,
        "name": name,
        "params": params,
        "value": round(value, 1) if value is not None else None,
        "unit": unit,
        "baseline": baseline_name,
        "baseline_value": round(baseline_value, 1),
        "ratio": round(value / baseline_value, 3) if value else None,
        "higher_is_better": True,
        "target": TARGETS.get(name),
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Meter:
    """CPU microseconds per operation of one server process over a section."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.start = _cpu_s(self.pid)
        return self

    def __exit__(self, *exc):
        self.spent = _cpu_s(self.pid) - self.start

    def per_op_us(self, ops: int) -> int:
        return round(self.spent / ops * 1e6)


def run(quick: bool) -> list[dict]:
    n_releases = 3000 if quick else 8000
    n_stream = 5000 if quick else 20000
    rounds = 1 if quick else 3
    concurrency = 64
    rng = np.random.default_rng()
    with tempfile.TemporaryDirectory(prefix="sv-bench-node-") as tmp:
        root = pathlib.Path(tmp)
        files = testing.write_dev_pki(
            root / "pki", [("shareholder", "bank-a"), ("matcher", "bench"), ("shareholder", "echo")]
        )
        ticket_pem, ticket_pub = pki.new_signing_key()
        ticket_key = pki.load_signing_key(ticket_pem)
        sqlite = _run_node(root / "bank-a", "", files, ticket_key, ticket_pub, rng, n_releases, n_stream, rounds,
                           concurrency, quick)
        try:
            server = pg_kit.server()
        except RuntimeError as exc:
            print(f"suite_node: no PostgreSQL figures: {exc}", file=sys.stderr)
            return sqlite
        try:
            database = server.new_database("bench")
            pg = _run_node(root / "bank-a-pg", server.store_toml(database), files, ticket_key, ticket_pub, rng,
                           n_releases, n_stream, rounds, concurrency, quick)
        finally:
            pg_kit.stop()
    by_name = {r["name"]: r for r in sqlite}
    for r in pg:
        base = by_name[r["name"]]
        r["params"]["echo_baseline"] = {"value": r["baseline_value"], "name": r["baseline"]}
        r.update(name=r["name"] + "_postgres", baseline=f"the same node on SQLite ({base['name']}), same run",
                 baseline_value=base["value"] or 0.0, target=None,
                 ratio=round(r["value"] / base["value"], 3) if r["value"] and base["value"] else None)
        r["params"]["store"] = "postgres 16 (pgserver), unix socket, synchronous_commit on"
    return sqlite + pg


def _run_node(folder, store_toml, files, ticket_key, ticket_pub, rng, n_releases, n_stream, rounds, concurrency,
              quick) -> list[dict]:
    # The attempt limit is the node's defence, not what is measured here:
    # raised so that 2,000 subjects can take every ticket of the run.
    cfg = testing.write_node_files(
        folder, name="bank-a", index=1, tls=files[("shareholder", "bank-a")],
        tenants={TENANT: {KEY_ID: ticket_pub}}, attempts_per_subject=1_000_000, extra=store_toml,
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    node = subprocess.Popen(
        [sys.executable, "-m", "shareholders", "--config", str(cfg)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    echo_ready = folder / "echo.json"
    echo_tls = files[("shareholder", "echo")]
    try:
        node_info = _wait_ready(folder / "ready.json", node)
        # One fresh set of subjects per round, so every round stores new records.
        record_sets = [
            _records([f"r{r}-subject-{i:06d}" for i in range(n_stream)], 1, rng) for r in range(rounds)
        ]
        # Payload sizes of the real calls, so the echo moves the same bytes.
        sample_release = shareholder_pb2.ReleaseShareResponse(shares=[record_sets[0][0]], audit_seq=123456)
        echo = subprocess.Popen(
            [sys.executable, "-m", "bench.suite_node", "echo-server", "--ca", echo_tls.ca, "--cert",
             echo_tls.cert, "--key", echo_tls.key, "--ready", str(echo_ready), "--reply-bytes",
             str(sample_release.ByteSize())],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            echo_info = _wait_ready(echo_ready, echo)
            return asyncio.run(_measure(
                node_info, echo_info, node.pid, echo.pid, files[("matcher", "bench")].load(), ticket_key,
                record_sets, n_releases, concurrency, quick,
            ))
        finally:
            _stop(echo)
    finally:
        _stop(node)


async def _measure(node_info, echo_info, node_pid, echo_pid, tls, ticket_key, record_sets, n_releases,
                   concurrency, quick):
    """Each round measures the node, then the echo, back to back; the best
    round is reported and every round is listed in ``params``."""
    node_addr = node_info["address"]
    echo_addr = f"127.0.0.1:{echo_info['port']}"
    load_before = round(os.getloadavg()[0], 2)
    store_rounds, release_rounds = [], []
    async with _secure_aio(node_addr, tls, pki.Identity("shareholder", "bank-a")) as node_ch, \
            _secure_aio(echo_addr, tls, pki.Identity("shareholder", "echo")) as echo_ch:
        # Bulk store: the node first, then the echo of the same messages.
        for records in record_sets:
            messages = _stream_messages(records, ticket_key)
            with _Meter(node_pid) as m_node:
                rate = await _stream_rate(node_ch, STORE_STREAM, messages, len(records))
            with _Meter(echo_pid) as m_echo:
                echo_rate = await _stream_rate(echo_ch, ECHO_STREAM, messages, len(records))
            store_rounds.append({
                "rate": round(rate), "echo_rate": round(echo_rate),
                "node_cpu_us_per_record": m_node.per_op_us(len(records)),
                "echo_cpu_us_per_record": m_echo.per_op_us(len(records)),
            })

        # Releases: subjects cycle, every ticket fresh, all signed before timing.
        subjects = [r.subject for r in record_sets[0][:2000]]
        probe = np.zeros(DIM, dtype=np.float32)
        counter = iter(range(10**9))

        def tickets(n):
            return [
                shareholder_pb2.ReleaseShareRequest(ticket=wire.issue_ticket(
                    ticket_key, KEY_ID, tenant=TENANT, subject=subjects[i % len(subjects)],
                    request_id=f"verify-{i}", probe=probe, ttl_ms=240_000, audience=testing.CLUSTER_ID,
                )).SerializeToString()
                for i in (next(counter) for _ in range(n))
            ]

        warm = tickets(500)
        _, warm_errors = await _unary_rate(node_ch, RELEASE, warm, concurrency)
        await _unary_rate(echo_ch, ECHO_UNARY, warm, concurrency)
        for _ in record_sets:
            timed = tickets(n_releases)
            with _Meter(node_pid) as m_node:
                rate, errors = await _unary_rate(node_ch, RELEASE, timed, concurrency)
            with _Meter(echo_pid) as m_echo:
                echo_rate, echo_errors = await _unary_rate(echo_ch, ECHO_UNARY, timed, concurrency)
            release_rounds.append({
                "rate": round(rate), "errors": errors + warm_errors, "echo_rate": round(echo_rate),
                "echo_errors": echo_errors, "node_cpu_us_per_release": m_node.per_op_us(len(timed)),
                "echo_cpu_us_per_call": m_echo.per_op_us(len(timed)),
            })
    load_after = round(os.getloadavg()[0], 2)
    common = {"dimension": DIM, "quick": quick, "cpus": os.cpu_count(), "loadavg_1m_before": load_before,
              "loadavg_1m_after": load_after}

    best_store = max(store_rounds, key=lambda r: r["rate"])
    best_release = max(release_rounds, key=lambda r: r["rate"] if r["errors"] == 0 else -1)
    return [
        _result(
            "stream_store_per_s",
            {**common, "records": len(record_sets[0]), "records_per_message": 100, "records_per_commit": 1000,
             "round_rates": [r["rate"] for r in store_rounds],
             "round_echo_rates": [r["echo_rate"] for r in store_rounds],
             "node_cpu_us_per_record": best_store["node_cpu_us_per_record"],
             "echo_cpu_us_per_record": best_store["echo_cpu_us_per_record"]},
            best_store["rate"], "records/s", "bare gRPC stream echo, same messages, same mTLS",
            best_store["echo_rate"],
        ),
        _result(
            "release_per_s",
            {**common, "releases": n_releases, "concurrency": concurrency, "ticket_check": True,
             "durable_audit": True, "errors": sum(r["errors"] for r in release_rounds),
             "round_rates": [r["rate"] for r in release_rounds],
             "round_echo_rates": [r["echo_rate"] for r in release_rounds],
             "node_cpu_us_per_release": best_release["node_cpu_us_per_release"],
             "echo_cpu_us_per_call": best_release["echo_cpu_us_per_call"]},
            best_release["rate"] if best_release["errors"] == 0 else None, "releases/s",
            "bare gRPC unary echo, same request and response sizes, same mTLS", best_release["echo_rate"],
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite_node")
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo-server", help="(internal) the baseline echo server")
    for flag in ("--ca", "--cert", "--key", "--ready"):
        e.add_argument(flag, required=True)
    e.add_argument("--reply-bytes", type=int, required=True)
    r = sub.add_parser("run", help="run the suite and print its results as JSON")
    r.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "echo-server":
        _echo_server(args)
    else:
        print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
