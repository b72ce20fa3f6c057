"""Signed audit checkpoints leave the node (issue 10, attack 6).

A node operator holds the node's database and its audit key: cutting signed
release entries together with their checkpoints, or rewriting the chain and
signing it again, leaves a log that verifies on its own. Each node therefore
publishes its checkpoints to its peers as it makes them, the peers record
them in their own chains (``witness`` entries), and ``vaultctl audit verify``
/ ``reconcile`` hold every chain to what its peers witnessed.

Real processes throughout: a dev cluster (``vaultctl cluster up``), the
attacker editing a stopped node's SQLite file with sqlite3 (as the review
did), the real CLI in its own process for the verdicts, and a CA-minted or
wrong-key caller against a live node's WitnessCheckpoint.
"""
from __future__ import annotations

import itertools
import json
import re
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing

import grpc
import pytest

from shareholders import storage
from shareholders.storage.dialect import SQLITE
from splitvault.v1 import common_pb2
from splitvault.v1 import shareholder_pb2 as pb
from splitvault.v1 import shareholder_pb2_grpc
from vault import audit, pki
from vaultctl import audit_cmd, auditor, cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates
from vaultrpc import wire
from vaultrpc.tls import TlsFiles, secure_channel

DIM = 16
SUBJECTS = 6
NODES = ("bank-a", "bank-b", "bank-c")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")}


def vaultctl_json(*args: str) -> tuple[int, dict]:
    """The real CLI in its own process."""
    proc = subprocess.run([sys.executable, "-m", "vaultctl", *args, "--format", "json"], capture_output=True,
                          text=True, env=ENV, timeout=120)
    return proc.returncode, json.loads(proc.stdout)


def db(root, node: str):
    return closing(sqlite3.connect(cluster.Paths(root).node_dir(node) / "shares.db", isolation_level=None))


def verify_quietly(root) -> dict[str, dict]:
    """Verdicts by node without touching the auditor's witness file."""
    verdicts, _logs = audit_cmd.verify(auditor.from_cluster_dir(root), update_witness=False)
    return {v["name"]: v for v in verdicts}


def last_release_seq(root, node: str) -> int:
    with closing(sqlite3.connect(f"file:{cluster.Paths(root).node_dir(node) / 'shares.db'}?mode=ro", uri=True)) as c:
        return c.execute("SELECT MAX(seq) FROM audit_log WHERE event = 'release'").fetchone()[0]


def wait_witnessed(root, nodes=NODES, timeout_s: float = 90.0) -> dict[str, dict]:
    """Until both peers of each node witnessed a checkpoint past its last release."""
    deadline = time.monotonic() + timeout_s
    want = {n: last_release_seq(root, n) for n in nodes}
    while True:
        verdicts = verify_quietly(root)
        if all(len(verdicts[n]["witnessed_by"]) == 2 and min(verdicts[n]["witnessed_by"].values()) >= want[n]
               for n in nodes):
            return verdicts
        assert time.monotonic() < deadline, {n: verdicts[n]["witnessed_by"] for n in nodes}
        time.sleep(0.5)


def metric(root, node: str, name: str, **labels) -> float | None:
    paths, spec = cluster.Paths(root), cluster.load_spec(root)
    port = json.loads(paths.ready(spec, node).read_text())["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A 3-node cluster signing its chain head every 3 entries or 2 s, after
    some verifications; stopped at the end of the module."""
    root = tmp_path_factory.mktemp("witness") / "cluster"
    cluster.up(root, 3, 2, DIM)
    try:
        cluster.down(root)
        for node in NODES:  # sign often, so that releases are signed (and witnessed) quickly
            with open(cluster.Paths(root).node_dir(node) / "node.toml", "a") as fh:
                fh.write("\n[audit]\ncheckpoint_every = 3\ncheckpoint_interval_s = 2\n")
        cluster.up(root, 3, 2, DIM)
        templates = synthetic_templates(SUBJECTS, DIM, seed=11)
        with MatcherClient.from_cluster_dir(root) as client:
            assert not [r for r in client.enroll_many((f"s{i}", templates[i]) for i in range(SUBJECTS)) if r.code]
            for i in range(SUBJECTS):
                assert client.verify(f"s{i}", noisy_copy(templates[i], i)).decision == "MATCH"
        wait_witnessed(root)
        yield root
    finally:
        cluster.down(root)


def test_a_clean_cluster_verifies_with_every_node_witnessed(root):
    code, out = vaultctl_json("audit", "verify", "--dir", str(root))
    assert code == 0 and out["ok"], out
    for n in out["nodes"]:
        assert set(n["witnessed_by"]) == set(NODES) - {n["name"]} and n["witnessed_seq"] > 0
    code, out = vaultctl_json("audit", "reconcile", "--dir", str(root))
    assert code == 0 and out["ok"] and out["unexplained_count"] == 0, out
    # Each witness entry is the peer's checkpoint, signed by the peer's own key.
    keys = cluster.load_trust(root)["audit_keys"]
    with db(root, "bank-b") as conn:
        rows = conn.execute("SELECT actor, details_json FROM audit_log WHERE event = 'witness'").fetchall()
    assert {actor for actor, _ in rows} == {"shareholder/bank-a", "shareholder/bank-c"}
    for actor, details in rows:
        cp = audit.witnessed_checkpoint(details)
        assert actor == f"shareholder/{cp.node}" and audit.checkpoint_valid(cp, bytes.fromhex(keys[cp.node]))


def test_a_peer_down_blocks_nothing_and_is_caught_up_later(root):
    cluster.stop_processes(root, ["bank-c"])
    try:
        templates = synthetic_templates(SUBJECTS, DIM, seed=11)
        with MatcherClient.from_cluster_dir(root) as client:  # k = 2 of 3: still served, never slowed to a failure
            for i in range(3):
                assert client.verify(f"s{i}", noisy_copy(templates[i], 10 + i)).decision == "MATCH"
        deadline = time.monotonic() + 30
        while (metric(root, "bank-a", "splitvault_node_witness_unpublished_checkpoints", peer="bank-c") or 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert (metric(root, "bank-a", "splitvault_node_witness_publish_failures_total", peer="bank-c") or 0) >= 1
    finally:
        cluster.restart_node(root, "bank-c")
    deadline = time.monotonic() + 60  # retried with backoff (at most 30 s apart)
    while metric(root, "bank-a", "splitvault_node_witness_unpublished_checkpoints", peer="bank-c") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    wait_witnessed(root)


def _read_log(root, node: str) -> list[common_pb2.AuditEntry]:
    paths, spec = cluster.Paths(root), cluster.load_spec(root)
    address = json.loads(paths.ready(spec, node).read_text())["address"]
    with secure_channel(address, paths.tls("auditor", spec.auditor).load(),
                        expect=pki.Identity(pki.ROLE_SHAREHOLDER, node)) as channel:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        return [i.entry for i in stub.ReadAuditLog(pb.ReadAuditLogRequest(from_seq=1), timeout=30)
                if i.WhichOneof("item") == "entry"]


def _witness_call(root, node: str, tls, cp) -> grpc.RpcError:
    paths, spec = cluster.Paths(root), cluster.load_spec(root)
    address = json.loads(paths.ready(spec, node).read_text())["address"]
    with secure_channel(address, tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, node)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            shareholder_pb2_grpc.ShareholderStub(channel).WitnessCheckpoint(
                pb.WitnessCheckpointRequest(checkpoint=wire.checkpoint_message(cp)), timeout=10)
    return info.value


def test_only_a_pinned_peer_can_have_its_checkpoints_witnessed(root, tmp_path):
    paths, spec = cluster.Paths(root), cluster.load_spec(root)
    real_key = pki.load_signing_key((paths.node_dir("bank-a") / "audit.key").read_bytes())
    stranger = pki.load_signing_key(pki.new_signing_key()[0])
    good = audit.sign_checkpoint(real_key, "bank-a", 1, bytes(32), 1)
    # The auditor's certificate: the role may not call it at all.
    err = _witness_call(root, "bank-b", paths.tls("auditor", spec.auditor).load(), good)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # A CA holder mints a shareholder certificate for a node no config pins.
    cert, key = pki.issue_cert(paths.ca.read_bytes(), paths.ca_key.read_bytes(), pki.ROLE_SHAREHOLDER, "bank-z")
    (tmp_path / "z.pem").write_bytes(cert)
    (tmp_path / "z.key").write_bytes(key)
    minted = TlsFiles(str(paths.ca), str(tmp_path / "z.pem"), str(tmp_path / "z.key")).load()
    err = _witness_call(root, "bank-b", minted, audit.sign_checkpoint(stranger, "bank-z", 1, bytes(32), 1))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "peer named in this node's config" in err.details()
    # bank-a's own certificate (its operator), a checkpoint signed by another key: a forged head.
    own = paths.tls(pki.ROLE_SHAREHOLDER, "bank-a").load()
    err = _witness_call(root, "bank-b", own, audit.sign_checkpoint(stranger, "bank-a", 99, bytes(32), 1))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "does not verify" in err.details()
    # ... or another node's checkpoint passed off as its own.
    c_key = pki.load_signing_key((paths.node_dir("bank-c") / "audit.key").read_bytes())
    err = _witness_call(root, "bank-b", own, audit.sign_checkpoint(c_key, "bank-c", 99, bytes(32), 1))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "only its own" in err.details()
    denied = [json.loads(e.details_json) | {"actor": e.actor} for e in _read_log(root, "bank-b") if e.event == "deny"]
    reasons = {(d["actor"], d["reason"]) for d in denied}
    assert {("shareholder/bank-z", "witness_unknown_peer"), ("shareholder/bank-a", "witness_bad_signature"),
            ("shareholder/bank-a", "witness_other_node")} <= reasons
    # A genuine checkpoint sent twice (a retry whose answer was lost) is recorded once.
    with closing(sqlite3.connect(f"file:{paths.node_dir('bank-a') / 'shares.db'}?mode=ro", uri=True)) as conn:
        genuine = wire.checkpoint_message(storage.Database(conn, SQLITE).checkpoints()[0])
    address = json.loads(paths.ready(spec, "bank-b").read_text())["address"]
    with secure_channel(address, own, expect=pki.Identity(pki.ROLE_SHAREHOLDER, "bank-b")) as channel:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        first = stub.WitnessCheckpoint(pb.WitnessCheckpointRequest(checkpoint=genuine), timeout=10)
        again = stub.WitnessCheckpoint(pb.WitnessCheckpointRequest(checkpoint=genuine), timeout=10)
    assert not first.already_witnessed and again.already_witnessed and again.audit_seq == first.audit_seq
    # None of the forged ones was recorded as witnessed.
    assert not [e for e in _read_log(root, "bank-b") if e.event == "witness"
                and audit.witnessed_checkpoint(e.details_json).seq == 99]


def _rechain(conn, key, node: str, drop: set[int]) -> None:
    """Drop entries, re-number, re-hash and re-link the rest, and sign the new
    head with the node's own audit key: an insider's rewrite."""
    db = storage.Database(conn, SQLITE)
    entries, _cps = db.read_chain()
    conn.execute("BEGIN")
    conn.execute("DELETE FROM audit_log")
    conn.execute("DELETE FROM audit_checkpoints")
    prev, seq = audit.GENESIS_HASH, 0
    for e in entries:
        if e.seq in drop:
            continue
        seq += 1
        entry = audit.make_entry(seq=seq, prev_hash=prev, time_ms=e.time_ms, node=node, event=e.event, actor=e.actor,
                                 request_id=e.request_id, tenant=e.tenant, subject=e.subject,
                                 details=json.loads(e.details_json))
        db.insert_entry(entry)
        prev = entry.entry_hash
    db.insert_checkpoint(audit.sign_checkpoint(key, node, seq, prev, entries[-1].time_ms))
    conn.execute("COMMIT")


def test_a_peer_that_refuses_is_not_asked_again_for_the_same_checkpoint(root):
    # bank-c's operator drops bank-a from its peers: each of bank-a's
    # checkpoints is refused there once (a deny entry), never retried (which
    # would fill bank-c's log), and stays counted as unpublished at bank-a.
    config = cluster.Paths(root).node_dir("bank-c") / "node.toml"
    original = config.read_text()
    cluster.stop_processes(root, ["bank-c"])
    config.write_text(re.sub(r'\n\[\[witness\.peers\]\]\nname = "bank-a"\n[^\[]*', "\n", original))
    try:
        cluster.restart_node(root, "bank-c")
        deadline = time.monotonic() + 180  # a loaded 2-core machine signs slowly
        templates = synthetic_templates(SUBJECTS, DIM, seed=11)
        with MatcherClient.from_cluster_dir(root) as client:
            for n in itertools.count():
                denied = [json.loads(e.details_json) for e in _read_log(root, "bank-c")
                          if e.event == "deny" and e.actor == "shareholder/bank-a"]
                if len(denied) >= 2:
                    break
                assert time.monotonic() < deadline, denied
                # A store moves bank-a's chain on, so it signs (and offers bank-c) a new checkpoint.
                client.enroll(f"refused-{n}", templates[n % SUBJECTS])
                time.sleep(0.5)
        time.sleep(4)  # a retry would have come by now (1 s, then 2 s)
        denied = [json.loads(e.details_json) for e in _read_log(root, "bank-c")
                  if e.event == "deny" and e.actor == "shareholder/bank-a"]
        assert {d["reason"] for d in denied} == {"witness_unknown_peer"}
        seqs = [d["claimed_seq"] for d in denied]
        assert len(seqs) == len(set(seqs)), seqs  # one try per checkpoint
        assert metric(root, "bank-a", "splitvault_node_witness_unpublished_checkpoints", peer="bank-c") >= 1
    finally:
        cluster.stop_processes(root, ["bank-c"])
        config.write_text(original)
        cluster.restart_node(root, "bank-c")


def test_signed_releases_cut_or_rewritten_are_caught_by_the_peers(root):
    paths = cluster.Paths(root)
    wait_witnessed(root)
    # The auditor has not run since: only the peers' witness entries can tell.
    (paths.root / "maintenance" / "audit-witness.json").unlink(missing_ok=True)

    # bank-a: its last three (signed, witnessed) releases cut off with their checkpoints.
    cluster.stop_processes(root, ["bank-a"])
    with db(root, "bank-a") as conn:
        releases = [r[0] for r in conn.execute(
            "SELECT seq FROM audit_log WHERE event = 'release' ORDER BY seq DESC LIMIT 3")]
        cut = min(releases)
        assert conn.execute("SELECT COUNT(*) FROM audit_checkpoints WHERE seq >= ?", (max(releases),)).fetchone()[0]
        conn.execute("DELETE FROM audit_log WHERE seq >= ?", (cut,))
        conn.execute("DELETE FROM audit_checkpoints WHERE seq >= ?", (cut,))
    # bank-b: three releases taken out of the middle, the chain rewritten and signed again with its key.
    cluster.stop_processes(root, ["bank-b"])
    b_key = pki.load_signing_key((paths.node_dir("bank-b") / "audit.key").read_bytes())
    with db(root, "bank-b") as conn:
        dropped = {r[0] for r in conn.execute("SELECT seq FROM audit_log WHERE event = 'release' ORDER BY seq LIMIT 3")}
        _rechain(conn, b_key, "bank-b", dropped)
    # Each file alone verifies: this is the hole.
    keys = cluster.load_trust(root)["audit_keys"]
    for node in ("bank-a", "bank-b"):
        with closing(sqlite3.connect(paths.node_dir(node) / "shares.db")) as conn:
            entries, cps = storage.Database(conn, SQLITE).read_chain()
        assert audit.verify_chain(entries, cps, bytes.fromhex(keys[node]), node=node).ok
    # Both nodes start again on their doctored files (their own start-up check passes).
    cluster.restart_node(root, "bank-a")
    cluster.restart_node(root, "bank-b")

    code, out = vaultctl_json("audit", "verify", "--dir", str(root))
    assert code == 3 and not out["ok"]
    verdicts = {n["name"]: n for n in out["nodes"]}
    assert verdicts["bank-c"]["ok"]
    a, b = verdicts["bank-a"], verdicts["bank-b"]
    # The restarted node has logged on from the cut: the witnessed entries
    # are gone or are other entries now, whichever the witnessed seq hits.
    assert a["state"] == "broken" and a["broken_seq"] >= cut
    assert "witnessed" in a["reason"] and ("entries were removed" in a["reason"] or "rewritten" in a["reason"])
    assert b["state"] == "broken" and b["broken_seq"] >= min(dropped)  # the first witnessed head past the rewrite
    assert "witnessed" in b["reason"] and "rewritten" in b["reason"]
    code, out = vaultctl_json("audit", "verify", "--dir", str(root), "--node", "bank-a")
    assert code == 3 and out["nodes"][0]["name"] == "bank-a" and out["nodes"][0]["broken_seq"] == a["broken_seq"]
    code, out = vaultctl_json("audit", "reconcile", "--dir", str(root))
    assert code == 3 and not out["ok"]
    assert {c["name"] for c in out["chains"] if not c["ok"]} == {"bank-a", "bank-b"}
    # The text form names the node too.
    proc = subprocess.run([sys.executable, "-m", "vaultctl", "audit", "verify", "--dir", str(root)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 3 and "bank-a" in proc.stdout and "witnessed" in proc.stdout
