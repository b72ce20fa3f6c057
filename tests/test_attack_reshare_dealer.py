"""Attack: one sending node destroys every template through a reshare (red team, issue 10).

bank-a's operator (index 1: a sender of every reshare from this committee)
runs its node with every dealt reshare value off by one, so g_a(0) != y_a.
Without a check the new members combine the values, the reshare commits and
finalizes (the old epoch destroyed), and every template rejoins shifted:
the MACs reject it (DATA_LOSS, never a wrong MATCH), but every template is
lost.

The reshare check (vault.proactive, "Reshare check" in docs/architecture.md)
compares a masked random linear combination of the old and new sharings
before any node serves the new epoch: the check fails, `vaultctl reshare`
rolls the session back on every node (the reason in each node's audit log),
the committee stays as it was and every template still MATCHes. The same
node, run honestly, then reshares with the check passing; the auditor
gets one check context per session (a second is refused and logged), and a
rerun after a crash asks the same one again. No node commits a reshare
whose check it has not seen pass, whatever the auditor does.
"""
from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing

import grpc
import pytest

from maintenance_kit import audit_details, decisions, enrolled_cluster, hook_env, json_out, restart_with, vaultctl
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki
from vaultctl import auditor, cluster
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e

DIM = 32
COUNT = 6
HOOK = '''
import os
if os.environ.get("BAD_DEALER_HOOK"):
    import vault.proactive as _p
    _deal = _p.reshare_values
    def _bad(*args, **kwargs):
        out = _deal(*args, **kwargs)
        return (out + 1) % _p.P  # every dealt value off by one: g_i(0) != y_i
    _p.reshare_values = _bad
if os.environ.get("BAD_KEY_HOOK"):
    import vault.epoch_mac as _m
    import vault.field as _f
    _deal_key = _m.reshare_key_values
    def _bad_key(*args, **kwargs):
        out = _deal_key(*args, **kwargs)
        return (out + 1) % _f.P  # only the MAC key stream off by one: records dealt honestly
    _m.reshare_key_values = _bad_key
'''


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("attack-dealer") / "cluster", dim=DIM, count=COUNT, seed=17)








def test_a_sender_dealing_wrong_values_makes_the_reshare_roll_back(running, tmp_path):
    root, templates = running["root"], running["templates"]
    assert set(decisions(root, templates, 1).values()) == {"MATCH"}
    restart_with(root, "bank-a", hook_env(tmp_path / "hooks", HOOK, BAD_DEALER_HOOK="1"))

    out = vaultctl("reshare", "--dir", root, "--shareholders", "4", "--threshold", "2",
                   "--approve-with-dev-operators", "--format", "json", timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    error = json_out(out)["error"]
    assert "reshare check failed" in error["message"] and "rolled back" in error["message"], error
    assert "different values" in error["message"] and "bank-a" in error["message"], error

    # Nothing changed: the old committee serves, every template still MATCHes.
    assert list(cluster.load_spec(root).nodes) == ["bank-a", "bank-b", "bank-c"]
    assert set(decisions(root, templates, 2).values()) == {"MATCH"}
    # Every node of both committees answered one check and logged the rollback with its reason.
    for name in ("bank-a", "bank-b", "bank-c", "bank-d"):
        checks = audit_details(root, name, "reshare_check")
        assert len(checks) == 1 and checks[0]["challenges"] == 3, (name, checks)
        aborts = audit_details(root, name, "maintenance_abort")
        assert aborts and "reshare check failed" in aborts[-1].get("reason", ""), (name, aborts)
    assert len({c["context_sha256"] for n in ("bank-a", "bank-b", "bank-c", "bank-d")
                for c in audit_details(root, n, "reshare_check")}) == 1


def test_no_node_commits_a_reshare_whose_check_failed(running):
    # The auditor (certificate only, raw gRPC) lets the bad dealing through:
    # its CLI stops once every node prepared, it asks the check itself and
    # commits anyway. Each node asks every member for its answer and refuses.
    root, templates = running["root"], running["templates"]
    out = vaultctl("reshare", "--dir", root, "--shareholders", "4", "--threshold", "2",
                   "--approve-with-dev-operators", "--format", "json", fault="prepare:4:self", timeout=300)
    assert out.returncode == -9, out.stderr[-1500:]
    saved = json.loads((root / "maintenance" / "epoch-session.json").read_text())
    sid, members = saved["session_id"], sorted({n for n, _ in saved["old"]} | {n for n, _ in saved["new"]})
    target = auditor.from_cluster_dir(root)
    tls = target.tls.load()
    addresses = {n: json.loads((cluster.Paths(root).node_dir(n) / "ready.json").read_text())["address"]
                 for n in members}
    channels = {n: secure_channel(addresses[n], tls, expect=pki.Identity("shareholder", n)) for n in members}
    try:
        stubs = {n: admin_pb2_grpc.ShareholderAdminStub(ch) for n, ch in channels.items()}
        challenges = [os.urandom(16) for _ in range(3)]
        given = [admin_pb2.MemberContribution(name=n, contribution=stubs[n].CheckReshare(
            admin_pb2.CheckReshareRequest(session_id=sid, challenges=challenges), timeout=60).contribution)
            for n in members]
        for n in members:
            stubs[n].CheckReshare(admin_pb2.CheckReshareRequest(session_id=sid, challenges=challenges,
                                                                contributions=given), timeout=120)
        for n in members:
            with pytest.raises(grpc.RpcError) as err:
                list(stubs[n].CommitSession(admin_pb2.CommitSessionRequest(session_id=sid), timeout=60))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, n
            assert "has not passed the reshare check" in err.value.details() and "different_secret" in \
                err.value.details(), err.value.details()
            assert [r["reason"] for r in audit_details(root, n, "reshare_commit_refused")] == ["different_secret"]
    finally:
        for ch in channels.values():
            ch.close()
    aborted = vaultctl("reshare", "--dir", root, "--abort", "--format", "json", timeout=120)
    assert aborted.returncode == 0, aborted.stderr[-1500:]
    assert list(cluster.load_spec(root).nodes) == ["bank-a", "bank-b", "bank-c"]
    assert set(decisions(root, templates, 5).values()) == {"MATCH"}


def test_a_sender_dealing_a_wrong_mac_key_stream_makes_the_reshare_roll_back(running, tmp_path):
    # Records dealt honestly, only bank-a's reshare of its MAC key share off:
    # without the key in the check the reshare would commit and every
    # template would fail its tags in the new epoch (DATA_LOSS for all).
    root, templates = running["root"], running["templates"]
    restart_with(root, "bank-a", hook_env(tmp_path / "hooks", HOOK, BAD_DEALER_HOOK="", BAD_KEY_HOOK="1"))
    before = {n: len(audit_details(root, n, "maintenance_abort")) for n in ("bank-a", "bank-b", "bank-c")}

    out = vaultctl("reshare", "--dir", root, "--shareholders", "4", "--threshold", "2",
                   "--approve-with-dev-operators", "--format", "json", timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    error = json_out(out)["error"]
    assert "reshare check failed" in error["message"] and "rolled back" in error["message"], error
    assert list(cluster.load_spec(root).nodes) == ["bank-a", "bank-b", "bank-c"]
    assert set(decisions(root, templates, 6).values()) == {"MATCH"}
    for name in ("bank-a", "bank-b", "bank-c"):
        aborts = audit_details(root, name, "maintenance_abort")
        assert len(aborts) == before[name] + 1 and "reshare check failed" in aborts[-1].get("reason", ""), name


def test_the_auditor_gets_one_check_per_session_and_a_rerun_resumes_it(running):
    # bank-a runs honestly again. The CLI dies after the check, before any
    # node commits: the nodes are prepared and answered one check context.
    root, templates = running["root"], running["templates"]
    restart_with(root, "bank-a", {"BAD_DEALER_HOOK": ""})
    args = ("reshare", "--dir", root, "--shareholders", "4", "--threshold", "2", "--approve-with-dev-operators",
            "--format", "json")
    first = vaultctl(*args, fault="commit-start:1:self", timeout=300)
    assert first.returncode == -9, first.stderr[-1500:]
    saved = json.loads((root / "maintenance" / "epoch-session.json").read_text())
    sid, members = saved["session_id"], sorted({n for n, _ in saved["old"]} | {n for n, _ in saved["new"]})
    assert len(saved["extra"]["check_challenges"]) == 3

    # The auditor asks bank-b again with fresh challenges (and contributions
    # of its choosing beside bank-b's own): another context, refused.
    target = auditor.from_cluster_dir(root)
    known = {n.name: n.address for n in target.nodes}
    with secure_channel(known["bank-b"], target.tls.load(), expect=pki.Identity("shareholder", "bank-b")) as ch:
        stub = admin_pb2_grpc.ShareholderAdminStub(ch)
        fresh = [os.urandom(16) for _ in range(3)]
        own = stub.CheckReshare(admin_pb2.CheckReshareRequest(session_id=sid, challenges=fresh), timeout=60)
        given = [admin_pb2.MemberContribution(name=n, contribution=own.contribution if n == "bank-b" else bytes(16))
                 for n in members]
        with pytest.raises(grpc.RpcError) as err:
            stub.CheckReshare(admin_pb2.CheckReshareRequest(session_id=sid, challenges=fresh, contributions=given),
                              timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "one check context" in err.value.details()
    refused = audit_details(root, "bank-b", "reshare_check_refused")
    assert [r["reason"] for r in refused] == ["second_context"]

    # The rerun asks the saved challenges again (the same context: answered)
    # and completes the reshare.
    out = vaultctl(*args, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    report = json_out(out)
    assert report["resumed"] and report["state"] == "finalized" and report["check"]["passed"], report
    assert report["check"]["verdicts"] == ["ok"] * 3
    nodes = list(cluster.load_spec(root).nodes)  # the rolled-back bank-d's folder stays: the next free name
    assert len(nodes) == 4 and nodes[:3] == ["bank-a", "bank-b", "bank-c"], nodes
    assert set(decisions(root, templates, 3).values()) == {"MATCH"}


def test_allow_loss_leaves_the_dropped_records_out_of_the_check(running):
    # bank-b (a sender) lost its share of one subject: without --allow-loss
    # the reshare rolls back; with it, the subject is dropped and left out of
    # the check (every side must cover the same records), which passes.
    root, templates = running["root"], dict(running["templates"])
    spec = cluster.load_spec(root)
    sender = list(spec.nodes)[1]
    victim = "s0002"
    cluster.stop_processes(root, [sender])
    with closing(sqlite3.connect(cluster.Paths(root).node_dir(sender) / "shares.db", isolation_level=None)) as conn:
        assert conn.execute("DELETE FROM shares WHERE subject = ?", (victim,)).rowcount == 1
    cluster.restart_node(root, sender)
    out = vaultctl("reshare", "--dir", root, "--shareholders", "5", "--threshold", "2",
                   "--approve-with-dev-operators", "--allow-loss", "--format", "json", timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    report = json_out(out)
    assert report["state"] == "finalized" and report["check"]["passed"], report
    assert report["check"]["excluded"] == 1 and report["skipped"] == 1, report["check"]
    del templates[victim]
    assert set(decisions(root, templates, 4).values()) == {"MATCH"}
