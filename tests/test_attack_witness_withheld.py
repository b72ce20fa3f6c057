"""Attack: a node operator keeps its checkpoints to itself, then cuts signed entries (red team, issue 10).

Signed checkpoints leave the node so that one operator cannot cut its own
signed entries unseen (tests/test_audit_witness.py). But publishing is the
node's own doing, from its own config: its operator empties
``[[witness.peers]]`` in node.toml (or drops the outgoing traffic), so no
peer ever witnesses a checkpoint of it. The node then signs as usual; later
its operator cuts its last signed releases together with their
checkpoints, and every chain verifies: nobody outside the node saw them.

`audit verify` must name that node: a checkpoint signed longer ago than the
grace (audit_cmd.WITNESS_GRACE_MS, 10 minutes; 0 here, so that the test
need not wait) that no peer witnessed is a finding, exit 3.

The same operator, holding its node's audit key and certificate, can also
sign checkpoints without end and send them to its peers, each one an audit
entry (an fsync) there: its peers must record at most a burst and then a
steady rate (RESOURCE_EXHAUSTED beyond).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from contextlib import closing

import grpc
import pytest

from shareholders import witness
from splitvault.v1 import shareholder_pb2 as pb
from splitvault.v1 import shareholder_pb2_grpc
from vault import audit, pki
from vaultctl import audit_cmd, auditor, cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates
from vaultrpc import wire
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e

DIM = 16
SUBJECTS = 4


def _db(root, node):
    return closing(sqlite3.connect(cluster.Paths(root).node_dir(node) / "shares.db", isolation_level=None))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("withheld") / "cluster"
    cluster.up(root, 3, 2, DIM)
    try:
        cluster.down(root)
        for node in ("bank-a", "bank-b", "bank-c"):
            config = cluster.Paths(root).node_dir(node) / "node.toml"
            text = config.read_text()
            if node == "bank-a":  # the hostile operator: nobody to publish to
                text = re.sub(r"\[\[witness\.peers\]\]\n[^\[]*", "", text)
                assert "witness.peers" not in text
            config.write_text(text + "\n[audit]\ncheckpoint_every = 3\ncheckpoint_interval_s = 2\n")
        cluster.up(root, 3, 2, DIM)
        templates = synthetic_templates(SUBJECTS, DIM, seed=3)
        with MatcherClient.from_cluster_dir(root) as client:
            assert not [r for r in client.enroll_many((f"s{i}", templates[i]) for i in range(SUBJECTS)) if r.code]
            for i in range(SUBJECTS):
                assert client.verify(f"s{i}", noisy_copy(templates[i], i)).decision == "MATCH"
        yield root
    finally:
        cluster.down(root)


def test_checkpoints_no_peer_witnessed_are_a_finding(root, monkeypatch):
    # bank-a signs its releases (a checkpoint past the last one) ...
    with _db(root, "bank-a") as conn:
        last_release = conn.execute("SELECT MAX(seq) FROM audit_log WHERE event = 'release'").fetchone()[0]
    deadline = time.monotonic() + 90
    while True:
        with _db(root, "bank-a") as conn:
            if (conn.execute("SELECT MAX(seq) FROM audit_checkpoints").fetchone()[0] or 0) >= last_release:
                break
        assert time.monotonic() < deadline, "bank-a signed no checkpoint past its releases"
        time.sleep(0.5)
    # ... and its operator cuts the last three, with the checkpoints covering them.
    cluster.stop_processes(root, ["bank-a"])
    with _db(root, "bank-a") as conn:
        releases = [r[0] for r in conn.execute(
            "SELECT seq FROM audit_log WHERE event = 'release' ORDER BY seq DESC LIMIT 3")]
        cut = min(releases)
        conn.execute("DELETE FROM audit_log WHERE seq >= ?", (cut,))
        conn.execute("DELETE FROM audit_checkpoints WHERE seq >= ?", (cut,))
        assert conn.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0] >= 1  # earlier ones stay
    cluster.restart_node(root, "bank-a")

    monkeypatch.setattr(audit_cmd, "WITNESS_GRACE_MS", 0, raising=False)
    verdicts, _ = audit_cmd.verify(auditor.from_cluster_dir(root), node="bank-a", update_witness=False)
    a = verdicts[0]
    assert a["name"] == "bank-a" and a["witnessed_by"] == {}, a
    assert not a["ok"] and a["state"] == "broken", a
    assert "No peer has witnessed bank-a's checkpoints" in a["reason"] and "publishing" in a["reason"], a
    assert audit_cmd._exit_code(verdicts) == audit_cmd.EXIT_FINDING


def _witnessed_from(root, node: str, peer: str) -> int:
    with closing(sqlite3.connect(f"file:{cluster.Paths(root).node_dir(node) / 'shares.db'}?mode=ro", uri=True)) as c:
        return c.execute("SELECT COUNT(*) FROM audit_log WHERE event = 'witness' AND actor = ?",
                         (f"shareholder/{peer}",)).fetchone()[0]


def test_a_node_cannot_flood_its_peers_logs_with_checkpoints(root):
    paths, spec = cluster.Paths(root), cluster.load_spec(root)
    key = pki.load_signing_key((paths.node_dir("bank-a") / "audit.key").read_bytes())
    tls = paths.tls(pki.ROLE_SHAREHOLDER, "bank-a").load()  # bank-a's operator: its own key and certificate
    address = json.loads(paths.ready(spec, "bank-b").read_text())["address"]
    before = _witnessed_from(root, "bank-b", "bank-a")
    sent, refused = 200, 0
    start = time.monotonic()
    with secure_channel(address, tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, "bank-b")) as channel:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        for i in range(sent):
            cp = audit.sign_checkpoint(key, "bank-a", 10_000 + i, os.urandom(32), int(time.time() * 1000))
            try:
                stub.WitnessCheckpoint(pb.WitnessCheckpointRequest(checkpoint=wire.checkpoint_message(cp)), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "faster than this node records them" in exc.details()
                refused += 1
    elapsed = time.monotonic() - start
    recorded = _witnessed_from(root, "bank-b", "bank-a") - before
    assert recorded + refused == sent
    burst, rate = getattr(witness, "RECORD_BURST", 20), getattr(witness, "RECORD_PER_S", 2.0)
    assert recorded <= burst + rate * elapsed + 1, (recorded, elapsed)
    assert refused > 0
