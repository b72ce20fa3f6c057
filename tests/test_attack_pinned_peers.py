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

import dataclasses
import json
import sqlite3

import grpc
import pytest

from hostile_kit import Impostor
from maintenance_kit import enrolled_cluster, json_out, vaultctl
from shareholders.config import load_config
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki
from vault import plan as committee_plan
from vaultctl import auditor, cluster
from vaultrpc import wire
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
    return [admin_pb2.RecordKey(tenant=t, subject=s, threshold=k, width=d + m) for t, s, k, d, m in rows]


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


def test_a_minted_member_cannot_publish_checkpoints(refreshing):
    """WitnessCheckpoint, the other peer-only call: a minted certificate with a
    member's name is refused before its checkpoint is even read."""
    from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
    from vault import audit

    state = refreshing
    victim, target = state["nodes"][1], state["nodes"][0]
    db = state["root"] / "nodes" / victim / "shares.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        seq, entry_hash, time_ms = conn.execute(
            "SELECT seq, entry_hash, time_ms FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    # A genuine signed head of the victim's log (as the victim itself publishes
    # them), which the attacker would replay or withhold under the victim's name.
    key = pki.load_signing_key((state["paths"].node_dir(victim) / "audit.key").read_bytes())
    genuine = audit.sign_checkpoint(key, victim, seq, bytes(entry_hash), time_ms)

    def publish(tls):
        channel = secure_channel(state["addresses"][target], tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, target))
        try:
            return shareholder_pb2_grpc.ShareholderStub(channel).WitnessCheckpoint(
                shareholder_pb2.WitnessCheckpointRequest(checkpoint=wire.checkpoint_message(genuine)), timeout=30)
        finally:
            channel.close()

    minted = _minted(state["paths"], victim)
    with pytest.raises(grpc.RpcError) as err:
        publish(minted)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "pins" in err.value.details()
    db = state["root"] / "nodes" / target / "shares.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        last = json.loads(conn.execute("SELECT details_json FROM audit_log WHERE event = 'deny' "
                                       "ORDER BY seq DESC LIMIT 1").fetchone()[0])
    finally:
        conn.close()
    assert last["reason"] == "witness_pin_mismatch"
    assert last["presented_spki_sha256"] == committee_plan.spki_sha256(minted.cert)
    # Control: the member's own certificate publishes the same checkpoint.
    publish(state["paths"].tls(pki.ROLE_SHAREHOLDER, victim).load())


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


# --- a new member of a reshare dials only addresses it knows -----------------------------


class _Minted:
    """A dev_pki stand-in for hostile_kit.Impostor: serves a CA-minted certificate."""

    def __init__(self, paths):
        self.paths = paths

    def tls(self, role: str, name: str) -> TlsMaterial:
        return _minted(self.paths, name)


def _members(committee: dict[str, int], addresses: dict[str, str] | None = None):
    return [admin_pb2.Member(name=n, index=i, address=(addresses or {}).get(n, "")) for n, i in committee.items()]


def test_a_new_member_dials_senders_only_where_its_table_or_the_plan_says(tmp_path_factory):
    """The auditor's request points the joining node at an impostor holding a
    CA-minted certificate named like a sender. With the sender missing from the
    joiner's [peers] table, the joiner takes the approved plan's address (and
    refuses the request's); a member neither names is not dialled at all."""
    root = tmp_path_factory.mktemp("pinned-reshare") / "cluster"
    try:
        info = cluster.up(root, shareholders=3, threshold=2, dim=DIM)
        addresses = {s["name"]: s["address"] for s in info["shareholders"]}
        old = {n: i for i, n in enumerate(sorted(addresses), start=1)}
        assert vaultctl("reshare", "propose", "--dir", root, "--shareholders", "4").returncode == 0
        for name in sorted(old)[:2]:
            assert vaultctl("reshare", "approve", "--dir", root, "--operator", name).returncode == 0
        body, approvals = committee_plan.from_document(
            json.loads((root / "maintenance" / "reshare-plan.json").read_text()))
        p = committee_plan.parse(body)
        newcomer = next(m.name for m in p.new_committee if m.name not in old)
        addresses[newcomer] = p.member(newcomer).address
        auditor_tls = cluster.Paths(root).tls(pki.ROLE_AUDITOR, "auditor").load()
        request = admin_pb2.BeginSessionRequest(
            session_id=p.session_id, kind=admin_pb2.SESSION_KIND_RESHARE, from_epoch=p.from_epoch,
            new_epoch=p.new_epoch, old_committee=_members(p.old_committee), new_committee=_members(p.new_indices),
            old_threshold=p.old_threshold, new_threshold=p.new_threshold, senders=list(p.senders),
            plan=admin_pb2.CommitteePlan(body=body, approvals=[
                admin_pb2.PlanApproval(operator=n, signature=s) for n, s in approvals.items()]))

        def admin(node, method, req):
            channel = secure_channel(addresses[node], auditor_tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, node))
            try:
                reply = getattr(admin_pb2_grpc.ShareholderAdminStub(channel), method)(req, timeout=30)
                return list(reply) if method == "PrepareSession" else reply
            finally:
                channel.close()

        for node in [*old, newcomer]:
            admin(node, "BeginSession", request)
        sender = next(n for n, i in old.items() if i == p.senders[0])
        # The joiner's own table forgets the sender (as if its operator never listed it).
        config = cluster.Paths(root).node_dir(newcomer) / "node.toml"
        head, _, table = config.read_text().partition(cluster.PEERS_HEADER)
        config.write_text(head + cluster.PEERS_HEADER + "".join(
            line + "\n" for line in table.splitlines() if not line.startswith(f'"{sender}"')))
        impostor = Impostor(_Minted(cluster.Paths(root)), pki.ROLE_SHAREHOLDER, sender)
        try:
            lure = _members(p.old_committee, {**addresses, sender: impostor.address})
            with pytest.raises(grpc.RpcError) as err:
                admin(newcomer, "PrepareSession", admin_pb2.PrepareSessionRequest(session_id=p.session_id, peers=lure))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert impostor.calls == []
            db = root / "nodes" / newcomer / "shares.db"
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                denied = [json.loads(d) for (d,) in conn.execute(
                    "SELECT details_json FROM audit_log WHERE event = 'deny' ORDER BY seq")]
            finally:
                conn.close()
            assert denied[-1] == {"reason": "peer_address", "peer": sender, "given": impostor.address,
                                  "configured": p.member(sender).address}
            # Control: the plan's address is dialled, and the joiner prepares.
            done = admin(newcomer, "PrepareSession", admin_pb2.PrepareSessionRequest(
                session_id=p.session_id, peers=_members(p.old_committee, addresses)))
            assert done[-1].status.state == admin_pb2.SESSION_STATE_PREPARED
            assert impostor.calls == []
        finally:
            impostor.close()
        for node in [*old, newcomer]:
            admin(node, "AbortSession", admin_pb2.AbortSessionRequest(session_id=p.session_id))
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


def test_a_committee_without_pins_warns_at_start(dev_pki, tmp_path, caplog):
    """An old config (no [committee] pins) keeps name-only checking, and says so when the node starts."""
    import logging

    from matcher_kit import Committee, Tenant

    with caplog.at_level(logging.WARNING, logger="shareholders.epochs"):
        c = Committee(dev_pki, tmp_path, n=3, k=2, tenants=[Tenant("acme")])
        c.close()
    warned = [r for r in caplog.records if r.name == "shareholders.epochs" and "without key pins" in r.getMessage()]
    assert len(warned) == 3


def test_a_sender_neither_table_nor_plan_names_is_not_dialled(tmp_path):
    """A reshare that retires a sender: the plan carries no address for it, so a
    joiner whose [peers] table lacks it refuses rather than dial the request's."""
    import types

    from shareholders import epochs
    from shareholders.maintenance import sessions
    from shareholders.config import NodeConfig
    from vaultrpc import status
    from vaultrpc.tls import TlsFiles

    body = json.dumps({"new_committee": [
        {"name": "bank-a", "index": 1, "address": "127.0.0.1:7001"},
        {"name": "bank-e", "index": 5, "address": "127.0.0.1:7005"}]})
    plan = sessions.Plan({"bank-a": 1, "bank-b": 2}, {"bank-a": 1, "bank-e": 5}, 2, 2, (1, 2),
                         approved={"body": body, "approvals": {}})
    s = sessions.Session("reshare-unit-0001", sessions.RESHARE, sessions.BEGUN, 1, 2, plan, None, 0, "auditor", 0, 0)
    cfg = NodeConfig(name="bank-e", index=5, listen="127.0.0.1:0", data_dir=tmp_path, tls=TlsFiles("", "", ""),
                     audit_key_file="", peers={})
    node = types.SimpleNamespace(cfg=cfg, name="bank-e")
    given = [admin_pb2.Member(name="bank-a", index=1, address="127.0.0.1:7001"),
             admin_pb2.Member(name="bank-b", index=2, address="127.0.0.1:6666")]
    with pytest.raises(status.FailedPrecondition, match="knows no address for node.s. bank-b"):
        epochs.MaintenanceService._check_peers(node, s, given, plan.old)
    # With bank-b in its own table, both are dialled where this node knows them.
    node.cfg = dataclasses.replace(cfg, peers={"bank-b": "127.0.0.1:7002"})
    given[1].address = "127.0.0.1:7002"
    assert epochs.MaintenanceService._check_peers(node, s, given, plan.old) == {
        "bank-a": (1, "127.0.0.1:7001"), "bank-b": (2, "127.0.0.1:7002")}
