"""Committee changes need the node operators, not the auditor (issue 10,
attack 1), played over a real local cluster (real processes, real mTLS).

The attacker holds the auditor's certificate and the cluster CA (which
`vaultctl reshare` holds), so it can mint certificates for "new members" of
its own, and at most k-1 operator keys. It tries to have the senders deal
reshare values to its members, to lower the threshold over the same nodes,
to slip an extra member into a refresh, and to fetch values under a pinned
member's name with a certificate of its own. Every attempt is refused,
nothing is dealt, and each node's audit log records the refusal.
"""
from __future__ import annotations

import json
import sqlite3

import grpc
import numpy as np
import pytest

from maintenance_kit import json_out, vaultctl
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki
from vault import plan as committee_plan
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import synthetic_templates
from vaultrpc.tls import TlsMaterial, secure_channel

pytestmark = pytest.mark.e2e

DIM = 64
COUNT = 6
# 3-of-5: a committee keeps n >= 2k - 1 so that a refresh can renew its MAC keys.
OLD = {"bank-a": 1, "bank-b": 2, "bank-c": 3, "bank-d": 4, "bank-e": 5}
K = 3


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    root = tmp_path_factory.mktemp("approval") / "cluster"
    try:
        info = cluster.up(root, shareholders=len(OLD), threshold=K, dim=DIM)
        templates = synthetic_templates(COUNT, DIM, seed=5)
        with MatcherClient.from_cluster_dir(root) as client:
            for reply in client.enroll_many({f"s{i}": templates[i] for i in range(COUNT)}.items()):
                assert reply.code == 0, reply
        paths = cluster.Paths(root)
        yield {"root": root, "paths": paths, "addresses": {s["name"]: s["address"] for s in info["shareholders"]}}
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


# --- the attacker's tools ----------------------------------------------------------------


def _tls(paths, role: str, name: str) -> TlsMaterial:
    return paths.tls(role, name).load()


def _minted(paths, name: str) -> TlsMaterial:
    """A certificate the CA holder issues itself: role shareholder, any name, a fresh key."""
    cert, key = pki.issue_cert(paths.ca.read_bytes(), paths.ca_key.read_bytes(), pki.ROLE_SHAREHOLDER, name)
    return TlsMaterial(paths.ca.read_bytes(), cert, key)


def _admin(address: str, tls: TlsMaterial, node: str):
    channel = secure_channel(address, tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, node))
    return channel, admin_pb2_grpc.ShareholderAdminStub(channel)


def _call(vault, node: str, method: str, request, tls=None):
    channel, stub = _admin(vault["addresses"][node], tls or _tls(vault["paths"], pki.ROLE_AUDITOR, "auditor"), node)
    try:
        return getattr(stub, method)(request, timeout=20)
    finally:
        channel.close()


def _refused(vault, node: str, method: str, request, tls=None) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        _call(vault, node, method, request, tls)
    return err.value.code(), err.value.details()


def _members(committee: dict[str, int]):
    return [admin_pb2.Member(name=n, index=i) for n, i in committee.items()]


def _reshare_request(sid: str, new: dict[str, int], k_new: int, plan=None, *, k_old: int = K):
    return admin_pb2.BeginSessionRequest(
        session_id=sid, kind=admin_pb2.SESSION_KIND_RESHARE, from_epoch=1, new_epoch=2,
        old_committee=_members(OLD), new_committee=_members(new), old_threshold=k_old, new_threshold=k_new,
        senders=list(range(1, k_old + 1)), plan=plan)


def _plan_for(vault, sid: str, new: dict[str, int], k_new: int, pins: dict[str, str], *,
              cluster_id: str | None = None) -> bytes:
    """The plan the attacker would like approved (its own members pinned)."""
    members = [committee_plan.NewMember(n, i, "127.0.0.1:1", pins[n], "11" * 32) for n, i in new.items()]
    cid = cluster.cluster_id(vault["root"]) if cluster_id is None else cluster_id
    return committee_plan.make(
        audience=committee_plan.audience_for(vault["paths"].ca.read_bytes(), cid),
        session_id=sid, from_epoch=1,
        new_epoch=2, old_committee=OLD, old_threshold=K, new_committee=members, new_threshold=k_new,
        senders=list(range(1, K + 1))).body()


def _signed(body: bytes, keys: dict) -> admin_pb2.CommitteePlan:
    return admin_pb2.CommitteePlan(body=body, approvals=[
        admin_pb2.PlanApproval(operator=name, signature=committee_plan.sign(body, key)) for name, key in keys.items()])


def _operator(paths, name: str):
    return pki.load_signing_key(paths.operator_key(name).read_bytes())


def _events(vault, node: str, *events: str, sessions=None) -> list[tuple[str, dict]]:
    """(event, details) of a node's audit entries of these kinds (for these session ids)."""
    db = vault["root"] / "nodes" / node / "shares.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        marks = ",".join("?" * len(events))
        rows = conn.execute(
            f"SELECT event, request_id, details_json FROM audit_log WHERE event IN ({marks}) ORDER BY seq", events)
        return [(e, json.loads(d)) for e, r, d in rows if sessions is None or r in sessions]
    finally:
        conn.close()


def _no_session_anywhere(vault, sessions) -> None:
    """No node has a session open, began one of these, or dealt anything for them."""
    for node in OLD:
        reply = _call(vault, node, "GetSession", admin_pb2.GetSessionRequest())
        assert not reply.found, (node, reply)
        assert _events(vault, node, "reshare_deal", "refresh_deal", "maintenance_begin", sessions=sessions) == [], node


# --- (a) the auditor names its own members ------------------------------------------------


def test_auditor_cannot_reshare_to_members_it_minted(vault):
    paths = vault["paths"]
    evil = {f"evil-{i}": 5 + i for i in range(1, 6)}
    fake = {n: _minted(paths, n) for n in evil}
    pins = {n: committee_plan.spki_sha256(t.cert) for n, t in fake.items()}
    stolen = {"bank-a": _operator(paths, "bank-a"), "bank-b": _operator(paths, "bank-b")}  # k-1 operators
    forged = {n: pki.load_signing_key(pki.new_signing_key()[0]) for n in OLD}  # keys the attacker made itself
    attempts = {
        "no plan": (_reshare_request("evil-session-0001", evil, 3), "no_plan"),
        "unsigned plan": (_reshare_request("evil-session-0002", evil, 3, admin_pb2.CommitteePlan(
            body=_plan_for(vault, "evil-session-0002", evil, 3, pins))), "quorum"),
        "forged operator signatures": (_reshare_request("evil-session-0003", evil, 3, _signed(
            _plan_for(vault, "evil-session-0003", evil, 3, pins), forged)), "quorum"),
        "k-1 operators": (_reshare_request("evil-session-0004", evil, 3, _signed(
            _plan_for(vault, "evil-session-0004", evil, 3, pins), stolen)), "quorum"),
    }
    for what, (request, reason) in attempts.items():
        for node in OLD:
            code, details = _refused(vault, node, "BeginSession", request)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (what, node, code, details)
            assert details.endswith(".") and "\n" not in details, details
    # A plan k operators really approved, for another committee: the request
    # may not swap in the attacker's members or threshold.
    approved = vaultctl("reshare", "propose", "--dir", vault["root"], "--threshold", "2", "--format", "json")
    assert approved.returncode == 0, approved.stderr[-2000:]
    assert json_out(approved)["approvals"] == []
    for name in ("bank-a", "bank-b", "bank-c"):
        done = vaultctl("reshare", "approve", "--dir", vault["root"], "--operator", name, "--format", "json")
        assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((vault["root"] / "maintenance" / "reshare-plan.json").read_text())
    body, approvals = committee_plan.from_document(document)
    legit = committee_plan.parse(body)
    signed = admin_pb2.CommitteePlan(body=body, approvals=[
        admin_pb2.PlanApproval(operator=n, signature=s) for n, s in approvals.items()])
    swapped = _reshare_request(legit.session_id, evil, 3, signed)  # the attacker's members
    other_k = _reshare_request(legit.session_id, legit.new_indices, 3, signed)  # another threshold
    for request in (swapped, other_k):
        for node in OLD:
            code, details = _refused(vault, node, "BeginSession", request)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (node, details)
            assert "differs from the approved plan" in details, details
    # Nothing was dealt: no session anywhere, and a minted member asking gets nothing.
    _no_session_anywhere(vault, [f"evil-session-000{i}" for i in range(1, 5)] + [legit.session_id])
    for sid in ("evil-session-0004", legit.session_id):
        code, _ = _refused(vault, "bank-a", "GetReshareShares", admin_pb2.GetReshareSharesRequest(session_id=sid),
                           tls=fake["evil-1"])
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    # Every node wrote each refusal, with its reason, to its audit log.
    for node in OLD:
        reasons = [d["reason"] for _, d in _events(vault, node, "maintenance_refused")]
        for reason in ("no_plan", "quorum", "plan_mismatch"):
            assert reason in reasons, (node, reasons)
        assert len(reasons) >= len(attempts) + 2, (node, reasons)


def test_a_plan_approved_for_another_cluster_under_the_same_ca_is_refused(vault):
    # One institution's CA and operator keys serve two clusters (production
    # and disaster recovery, say). Every operator approved a plan for the
    # other cluster; replayed here it would move this cluster's templates to
    # the members it pins. Its audience names the other cluster id: refused.
    paths = vault["paths"]
    new = {**OLD, "evil-1": len(OLD) + 1}
    pins = {n: committee_plan.spki_sha256(paths.cert(pki.ROLE_SHAREHOLDER, n).read_bytes()) for n in OLD}
    pins["evil-1"] = committee_plan.spki_sha256(_minted(paths, "evil-1").cert)
    everyone = {n: _operator(paths, n) for n in OLD}
    sid = "other-cluster-0001"
    request = _reshare_request(sid, new, K, _signed(_plan_for(vault, sid, new, K, pins, cluster_id="splitvault-dr"),
                                                    everyone))
    # The same with an audience naming the CA alone (what binds no cluster).
    members = [committee_plan.NewMember(n, i, "127.0.0.1:1", pins[n], "11" * 32) for n, i in new.items()]
    ca_only = committee_plan.make(
        audience=committee_plan.spki_sha256(paths.ca.read_bytes()), session_id="other-cluster-0002", from_epoch=1,
        new_epoch=2, old_committee=OLD, old_threshold=K, new_committee=members, new_threshold=K,
        senders=list(range(1, K + 1))).body()
    loose = _reshare_request("other-cluster-0002", new, K, _signed(ca_only, everyone))
    for node in OLD:
        for req in (request, loose):
            code, details = _refused(vault, node, "BeginSession", req)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "another cluster" in details, (node, details)
        refused = [d["reason"] for _, d in _events(vault, node, "maintenance_refused",
                                                   sessions=[sid, "other-cluster-0002"])]
        assert refused == ["audience", "audience"], (node, refused)
    _no_session_anywhere(vault, [sid, "other-cluster-0002"])


# --- (b) a pinned member's name on another key ---------------------------------------------


def test_a_minted_certificate_with_a_pinned_name_gets_no_reshare_values(vault):
    paths, root = vault["paths"], vault["root"]
    proposed = vaultctl("reshare", "propose", "--dir", root, "--shareholders", "6", "--format", "json")
    assert proposed.returncode == 0, proposed.stderr[-2000:]
    for name in ("bank-a", "bank-b", "bank-c"):
        assert vaultctl("reshare", "approve", "--dir", root, "--operator", name).returncode == 0
    newcomer_approves = vaultctl("reshare", "approve", "--dir", root, "--operator", "bank-f")
    assert newcomer_approves.returncode == 1 and "not a member" in newcomer_approves.stderr
    # The run refuses without a plan; the nodes would refuse one with too few approvals.
    no_plan = vaultctl("reshare", "--dir", root, "--shareholders", "6", "--format", "json")
    assert no_plan.returncode == 1 and "approved by k current node operators" in no_plan.stdout + no_plan.stderr
    document = json.loads((root / "maintenance" / "reshare-plan.json").read_text())
    body, approvals = committee_plan.from_document(document)
    p = committee_plan.parse(body)
    newcomer = next(m.name for m in p.new_committee if m.name not in OLD)
    signed = admin_pb2.CommitteePlan(body=body, approvals=[
        admin_pb2.PlanApproval(operator=n, signature=s) for n, s in approvals.items()])
    request = _reshare_request(p.session_id, p.new_indices, p.new_threshold, signed)
    request.from_epoch, request.new_epoch = p.from_epoch, p.new_epoch
    vault["addresses"][newcomer] = p.member(newcomer).address
    try:
        for node in [*OLD, newcomer]:
            _call(vault, node, "BeginSession", request)  # the approved plan: every node begins it
        sender = next(n for n, i in OLD.items() if i == p.senders[0])
        ask = admin_pb2.GetReshareSharesRequest(session_id=p.session_id, limit=4)
        impostor = _minted(paths, newcomer)  # the CA can mint the name, not the pinned key
        code, details = _refused(vault, sender, "GetReshareShares", ask, tls=impostor)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "pins" in details and details.endswith(".")
        refused = _events(vault, sender, "reshare_refused")
        assert refused and refused[-1][1]["reason"] == "pin_mismatch" and refused[-1][1]["to"] == newcomer
        assert _events(vault, sender, "reshare_deal", sessions=[p.session_id]) == []
        # Control: the member's own certificate (the pinned key) is dealt its values.
        real = _tls(paths, pki.ROLE_SHAREHOLDER, newcomer)
        assert len(_call(vault, sender, "GetReshareShares", ask, tls=real).items) == 4
    finally:
        for node in [*OLD, newcomer]:
            try:
                _call(vault, node, "AbortSession", admin_pb2.AbortSessionRequest(session_id=p.session_id))
            except grpc.RpcError:
                pass
        cluster.stop_processes(root, [newcomer])
        vault["addresses"].pop(newcomer, None)


# --- (c) lowering the threshold over the same nodes -----------------------------------------


def test_lowering_the_threshold_needs_the_operator_quorum(vault):
    paths = vault["paths"]
    pins = {n: committee_plan.spki_sha256(_tls(paths, pki.ROLE_SHAREHOLDER, n).cert) for n in OLD}
    body = _plan_for(vault, "lower-threshold-01", OLD, 2, pins)
    two = {n: _operator(paths, n) for n in ("bank-c", "bank-d")}
    for plan in (None, _signed(body, two)):
        request = _reshare_request("lower-threshold-01", OLD, 2, plan)
        for node in OLD:
            code, details = _refused(vault, node, "BeginSession", request)
            assert code == grpc.StatusCode.PERMISSION_DENIED, details
    _no_session_anywhere(vault, ["lower-threshold-01"])
    for node in OLD:
        refused = [d for _, d in _events(vault, node, "maintenance_refused")]
        assert any(d["reason"] == "quorum" and "needs 3" in d["message"] for d in refused), node


# --- (d) a refresh naming an extra member ------------------------------------------------------


def test_a_refresh_cannot_name_an_extra_member(vault):
    committee = {**OLD, "evil-1": 6}
    request = admin_pb2.BeginSessionRequest(
        session_id="refresh-extra-001", kind=admin_pb2.SESSION_KIND_REFRESH, from_epoch=1, new_epoch=2,
        old_committee=_members(committee), new_committee=_members(committee), old_threshold=K, new_threshold=K)
    for node in OLD:
        code, details = _refused(vault, node, "BeginSession", request)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "keeps this node's committee" in details
    _no_session_anywhere(vault, ["refresh-extra-001"])
    for node in OLD:
        assert "refresh_committee" in [d["reason"] for _, d in _events(vault, node, "maintenance_refused")], node
    # The real committee still refreshes (no operator approval needed for that).
    done = vaultctl("refresh", "--dir", vault["root"], "--drain", "0", "--format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json_out(done)["state"] == "finalized"
    with MatcherClient.from_cluster_dir(vault["root"]) as client:
        probe = synthetic_templates(COUNT, DIM, seed=5)[0]
        assert client.verify("s0", np.asarray(probe)).decision == "MATCH"
