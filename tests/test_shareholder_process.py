"""``python -m shareholders --config`` as a real process: start-up errors exit
1 with one clear line, SIGTERM shuts down cleanly, and kill -9 after a store
returned loses nothing."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shareholders.audit_log import verify_database
from node_kit import NodeHarness, Provider, sample_records
from splitvault.v1 import shareholder_pb2 as pb
from splitvault.v1 import shareholder_pb2_grpc as rpc
from vault.pki import Identity
from vaultrpc.tls import secure_channel

ROOT = pathlib.Path(__file__).resolve().parent.parent
ACME = Provider.new("acme")

pytestmark = pytest.mark.e2e


def spawn(config: pathlib.Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shareholders", "--config", str(config)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_ready(proc: subprocess.Popen, ready: pathlib.Path, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"node exited early: {proc.stderr.read()}")
        if ready.exists():
            return json.loads(ready.read_text())
        time.sleep(0.05)
    raise AssertionError("node never wrote its ready file")


BANK_A = Identity("shareholder", "bank-a")


@pytest.fixture()
def harness(tmp_path, dev_pki):
    h = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME], metrics_port=0)
    procs: list[subprocess.Popen] = []
    yield h, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        for stream in (p.stdout, p.stderr):
            stream.close()
    h.stop()


def test_sigterm_shuts_down_cleanly(harness, dev_pki):
    h, procs = harness
    proc = spawn(h.config_path, SPLITVAULT_NODE__LOG_LEVEL="INFO")
    procs.append(proc)
    info = wait_ready(proc, h.folder / "ready.json")
    assert info["name"] == "bank-a" and info["pid"] == proc.pid and info["address"].endswith(f":{info['port']}")
    with secure_channel(info["address"], dev_pki.tls("auditor", "au"), expect=BANK_A) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert rpc.ShareholderStub(ch).GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10).name == "bank-a"
    with secure_channel(info["address"], dev_pki.tls("matcher", "m"), expect=BANK_A) as ch:
        recs = sample_records("acme", ["alice"], index=1)
        rpc.ShareholderStub(ch).StoreShares(ACME.store_request(recs), timeout=10)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10).read().decode()
    assert 'splitvault_node_audit_head_seq{node="bank-a"} 2.0' in metrics
    assert 'splitvault_node_stored_records_total{node="bank-a"} 1.0' in metrics
    assert recs[0].values.hex() not in metrics

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not (h.folder / "ready.json").exists()
    while _held:
        _held.pop().close()
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "node stopped" for line in logs)
    report = verify_database(h.db_path, h.audit_public_key(), node="bank-a")
    assert report.ok and report.head_seq == 3 and report.signed_seq == 3  # start, store, stop; signed


def test_kill_9_after_a_store_returned_loses_nothing(harness, dev_pki):
    h, procs = harness
    proc = spawn(h.config_path)
    procs.append(proc)
    info = wait_ready(proc, h.folder / "ready.json")
    recs = sample_records("acme", [f"s{i}" for i in range(40)], index=1, dimension=128)
    ticket = ACME.ticket("s0")
    with secure_channel(info["address"], dev_pki.tls("matcher", "m"), expect=BANK_A) as ch:
        stub = rpc.ShareholderStub(ch)
        for i in range(0, 20, 5):
            stub.StoreShares(ACME.store_request(recs[i:i + 5]), timeout=10)
        stub.StoreShareStream(iter([ACME.stream_request(recs[20:])]), timeout=10)
        stub.ReleaseShare(pb.ReleaseShareRequest(ticket=ticket), timeout=10)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    h.start()
    stub = h.stub("matcher")
    for rec in recs:
        [info_] = stub.DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject=rec.subject), timeout=10).records
        assert info_.request_id == rec.request_id
    got = stub.ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket("s39")), timeout=10)
    assert got.shares[0].values == recs[39].values
    # The release before the kill is remembered: its ticket stays used.
    with pytest.raises(Exception, match="already used"):
        stub.ReleaseShare(pb.ReleaseShareRequest(ticket=ticket), timeout=10)
    h.stop()
    report = verify_database(h.db_path, h.audit_public_key(), node="bank-a")
    assert report.ok, report.reason
    # Before the kill: start, 20 stores, 1 stream batch, 1 release; after: start, release, deny, stop.
    assert report.head_seq == 27 and report.signed_seq == 27


def _hold_port(h):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _held.append(sock)
    text = h.config_path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{sock.getsockname()[1]}"')
    h.config_path.write_text(text)


_held: list = []


@pytest.mark.parametrize("breakage, message", [
    (_hold_port, "Cannot listen"),
    (lambda h: h.config_path.write_text(h.config_path.read_text().replace("index = 1", "index = -3")), "node.index"),
    (lambda h: (h.folder / "kek.json").chmod(0o644), "readable by other users"),
    (lambda h: (h.folder / "audit.key").unlink(), "Cannot read the audit key file"),
])
def test_start_up_errors_exit_1_with_one_clear_line(harness, breakage, message):
    h, procs = harness
    breakage(h)
    proc = spawn(h.config_path)
    procs.append(proc)
    assert proc.wait(timeout=30) == 1
    err = proc.stderr.read()
    assert "Traceback" not in err
    # One JSON line (gRPC's core may add its own plain-text line before it).
    [line] = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert line["level"] == "error" and line["msg"] == "cannot start" and message in line["error"]
    assert not (h.folder / "ready.json").exists()
    while _held:
        _held.pop().close()
