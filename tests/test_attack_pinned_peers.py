"""Attack: a CA holder mints a member's name to fetch its refresh deltas
(issue 10, CA holder row; docs/architecture.md, "Peers are pinned by key").

With one member's disk stolen before a refresh, that member's refresh
deltas bring its old share forward to the new epoch, defeating the refresh.
Peer calls used to check only the caller certificate's name, which the
cluster CA can issue to anyone. Every node now knows every member's
certificate-key fingerprint (``[committee] pins``, written by ``vaultctl
cluster up``, then the committee each commit records), and answers a peer
call only to that key.

Over a real local cluster (real processes, real mTLS), during a real refresh
prepared by ``vaultctl refresh --check``: the attacker holds the CA key and
mints a shareholder certificate named ``bank-b``. Control: the genuine
``bank-b`` certificate gets the same answers.
"""
from __future__ import annotations

import json
import sqlite3

import grpc
import pytest

from maintenance_kit import enrolled_cluster, json_out, vaultctl
from shareholders.config import load_config
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki
from vault import plan as committee_plan
from vaultctl import auditor, cluster
from vaultrpc.tls import TlsMaterial, secure_channel

pytestmark = pytest.mark.e2e

DIM = 64
COUNT = 12


@pytest.fixture(scope="module")
def refreshing(tmp_path_factory):
    """A real cluster with a refresh prepared (and checked) but not committed."""
    for state in enrolled_cluster(tmp_path_factory.mktemp("pinned") / "cluster", dim=DIM, count=COUNT, seed=11):
        out = vaultctl("refresh", "--dir", state["root"], "--check", "--format", "json")
        assert out.returncode == 0, out.stderr[-2000:]
        report = json_out(out)
        assert report["state"] == "prepared" and report["check"]["passed"]
        state["sid"] = report["session_id"]
        state["paths"] = cluster.Paths(state["root"])
        target = auditor.from_cluster_dir(state["root"])
        state["addresses"] = {n.name: n.address for n in target.nodes}
        state["nodes"] = sorted(state["addresses"])
        yield state


def _minted(paths, name: str) -> TlsMaterial:
    """What the CA holder can make: a shareholder certificate with any name and a key of its own."""
    cert, key = pki.issue_cert(paths.ca.read_bytes(), paths.ca_key.read_bytes(), pki.ROLE_SHAREHOLDER, name)
    return TlsMaterial(paths.ca.read_bytes(), cert, key)


def _call(state, node: str, tls: TlsMaterial, request):
    channel = secure_channel(state["addresses"][node], tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, node))
    try:
        return admin_pb2_grpc.ShareholderAdminStub(channel).GetRefreshDeltas(request, timeout=30)
    finally:
        channel.close()


def _keys(state, node: str) -> list[admin_pb2.RecordKey]:
    """Record keys of the session (tenant, subject, k, width), as a peer would ask for them."""
    db = state["root"] / "nodes" / node / "shares.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT tenant, subject, threshold, dimension, mac_count FROM shares WHERE epoch = 1 "
                            "ORDER BY tenant, subject LIMIT 3").fetchall()
    finally:
        conn.close()
    return [admin_pb2.RecordKey(tenant=t, subject=s, threshold=k, width=d + 2 * m) for t, s, k, d, m in rows]


def _denials(state, node: str) -> list[dict]:
    db = state["root"] / "nodes" / node / "shares.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [json.loads(d) for (d,) in conn.execute(
            "SELECT details_json FROM audit_log WHERE event = 'deny' AND request_id = ? ORDER BY seq", (state["sid"],))]
    finally:
        conn.close()


def test_cluster_up_pins_every_member(refreshing):
    paths = refreshing["paths"]
    for node in refreshing["nodes"]:
        cfg = load_config(paths.node_dir(node) / "node.toml", env={})
        assert set(cfg.committee_pins) == set(cfg.committee) == set(refreshing["nodes"])
        for member, pin in cfg.committee_pins.items():
            assert pin == committee_plan.spki_sha256(paths.cert(pki.ROLE_SHAREHOLDER, member).read_bytes())


def test_a_minted_member_gets_no_refresh_deltas(refreshing):
    state, sid = refreshing, refreshing["sid"]
    victim, target = state["nodes"][1], state["nodes"][0]  # the attacker poses as bank-b, asks bank-a
    minted = _minted(state["paths"], victim)
    keys = _keys(state, target)
    asks = {
        "deltas": admin_pb2.GetRefreshDeltasRequest(session_id=sid, keys=keys),
        "check": admin_pb2.GetRefreshDeltasRequest(session_id=sid, check_challenges=[bytes([7]) * 16]),
    }
    before = len(_denials(state, target))
    for what, request in asks.items():
        with pytest.raises(grpc.RpcError) as err:
            _call(state, target, minted, request)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
        assert err.value.details().count(".") == 1 and "pins" in err.value.details(), err.value.details()
    denials = _denials(state, target)[before:]
    assert len(denials) == 2
    wrong = committee_plan.spki_sha256(minted.cert)
    for d in denials:
        assert d["reason"] == "pin_mismatch" and d["peer"] == victim and d["rpc"] == "GetRefreshDeltas"
        assert d["presented_spki_sha256"] == wrong

    # Control: the genuine member's certificate gets both answers.
    genuine = state["paths"].tls(pki.ROLE_SHAREHOLDER, victim).load()
    reply = _call(state, target, genuine, asks["deltas"])
    assert len(reply.values) == 4 * sum(k.width for k in keys)
    reply = _call(state, target, genuine, asks["check"])
    assert len(reply.contribution) == 16 and reply.key_hashes
    assert len(_denials(state, target)) == before + 2


def test_commit_records_the_pins(refreshing):
    """The refresh completes, and the committee each node records keeps the pins,
    so the next session is pinned too."""
    out = vaultctl("refresh", "--dir", refreshing["root"], "--format", "json", "--drain", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    paths = refreshing["paths"]
    expected = {m: committee_plan.spki_sha256(paths.cert(pki.ROLE_SHAREHOLDER, m).read_bytes())
                for m in refreshing["nodes"]}
    for node in refreshing["nodes"]:
        db = refreshing["root"] / "nodes" / node / "shares.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            committee = json.loads(conn.execute("SELECT committee_json FROM node_state WHERE id = 1").fetchone()[0])
        finally:
            conn.close()
        assert committee["pins"] == expected
