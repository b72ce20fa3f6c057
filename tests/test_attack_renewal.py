"""Attack: one node destroys every template through a refresh's tag renewal.

At a refresh each of 2k - 1 renewers deals a sharing of its local product
h_j = <b'(j), s(j)> (BGW degree reduction), and every node's new tag share
is sum lambda_j g_j(i). bank-a's operator runs its node with every renewal
value it deals off by one. The template shares themselves are refreshed
honestly (the refresh check on the zero-sharings passes), but every
renewed tag is wrong: once the refresh finalizes (the old epoch
destroyed), no subset of nodes gives a tag that checks, and every
template fails closed (DATA_LOSS) for good.

The refresh check covers the renewal ("Refresh check" in
docs/architecture.md, the tag part): the refresh rolls back on every node,
the reason in each audit log, and every template still MATCHes. The same
holds for a node dealing one peer an inconsistent key contribution.

A hostile auditor in league with that node skips the check (the auditor's
own certificate, driving the maintenance library with the check off) and
commits: every member verifies the check itself, node to node, before it
commits, so each refuses (FAILED_PRECONDITION, the reason in its audit
log), and after the roll-back every template still MATCHes.
"""
from __future__ import annotations

import argparse

import pytest

from maintenance_kit import audit_details, decisions, enrolled_cluster, hook_env, json_out, restart_with, vaultctl
from splitvault.v1 import admin_pb2
from vaultctl.maintenance import Admin, MaintenanceError, SessionFile
from vaultctl.refresh import refresh_session, run_check, target_nodes

pytestmark = pytest.mark.e2e

DIM = 32
COUNT = 6
HOOK = '''
import os
if os.environ.get("BAD_RENEWER_HOOK"):
    import vault.epoch_mac as _m
    import vault.field as _f
    _deal = _m.renewal_values_at
    def _bad(*args, **kwargs):
        out = _deal(*args, **kwargs)
        return (out + 1) % _f.P  # every renewal value dealt off by one
    _m.renewal_values_at = _bad
if os.environ.get("BAD_KEY_HOOK"):
    import vault.epoch_mac as _m
    import vault.field as _f
    _contribution = _m.key_contribution
    def _bad_key(seed, epoch, threshold, dimension, x):
        out = _contribution(seed, epoch, threshold, dimension, x)
        return (out + 1) % _f.P if x == 2 else out  # bank-b's key contribution off: shares off one polynomial
    _m.key_contribution = _bad_key
'''


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("attack-renewal") / "cluster", dim=DIM, count=COUNT, seed=23)








def test_a_renewer_dealing_wrong_renewal_values_makes_the_refresh_roll_back(running, tmp_path):
    root, templates = running["root"], running["templates"]
    assert set(decisions(root, templates, 1).values()) == {"MATCH"}
    restart_with(root, "bank-a", hook_env(tmp_path / "hooks", HOOK, BAD_RENEWER_HOOK="1"))

    out = vaultctl("refresh", "--dir", root, "--format", "json", timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    error = json_out(out)["error"]
    assert "check failed" in error["message"] and "rolled back" in error["message"], error
    assert set(decisions(root, templates, 2).values()) == {"MATCH"}
    for name in ("bank-a", "bank-b", "bank-c"):
        aborts = audit_details(root, name, "maintenance_abort")
        assert aborts and "check failed" in aborts[-1].get("reason", ""), (name, aborts)


def test_the_same_node_run_honestly_refreshes_and_every_template_matches(running):
    root, templates = running["root"], running["templates"]
    restart_with(root, "bank-a", {"BAD_RENEWER_HOOK": ""})
    out = vaultctl("refresh", "--dir", root, "--format", "json", timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    assert json_out(out)["state"] == "finalized"
    assert set(decisions(root, templates, 3).values()) == {"MATCH"}


def test_a_node_dealing_an_inconsistent_key_contribution_makes_the_refresh_roll_back(running, tmp_path):
    # bank-a deals bank-b a key contribution off by one (the new key shares no
    # longer lie on one polynomial), everything else honest: every tag renewed
    # under that key would fail at Verify once the old epoch is gone.
    root, templates = running["root"], running["templates"]
    restart_with(root, "bank-a", hook_env(tmp_path / "hooks", HOOK, BAD_KEY_HOOK="1"))
    try:
        out = vaultctl("refresh", "--dir", root, "--format", "json", timeout=300)
        assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
        error = json_out(out)["error"]
        assert "check failed (tags" in error["message"] and "rolled back" in error["message"], error
        assert set(decisions(root, templates, 4).values()) == {"MATCH"}
        for name in ("bank-a", "bank-b", "bank-c"):
            aborts = audit_details(root, name, "maintenance_abort")
            assert aborts and "check failed (tags" in aborts[-1].get("reason", ""), (name, aborts)
    finally:
        restart_with(root, "bank-a", {"BAD_KEY_HOOK": ""})


def test_a_hostile_auditor_skipping_the_check_cannot_commit_the_lying_renewers_tags(running, tmp_path):
    root, templates = running["root"], running["templates"]
    restart_with(root, "bank-a", hook_env(tmp_path / "hooks", HOOK, BAD_RENEWER_HOOK="1"))
    nodes, k, tls, _ = target_nodes(argparse.Namespace(dir=root, config=None))
    admin = Admin(nodes, tls)
    sessions = SessionFile(tmp_path / "hostile-auditor")
    try:
        with pytest.raises(MaintenanceError) as refused:
            refresh_session(admin, nodes, k, sessions, check=False, drain_s=0)
        assert "has not passed the refresh check" in refused.value.message, refused.value.message
        for name in ("bank-a", "bank-b", "bank-c"):
            refusals = audit_details(root, name, "refresh_commit_refused")
            assert refusals and refusals[-1]["reason"] == "this node answered no check", (name, refusals)
        # The same auditor now runs the check, which fails, and commits anyway.
        opened = sessions.load()
        assert opened is not None, "the hostile auditor's session is still open"
        sid = opened.session_id
        names = [n.name for n in nodes]
        verdict = run_check(admin, names, sid, k, 3, admin.members(names))
        assert not verdict["passed"], verdict
        for name in names:
            with pytest.raises(MaintenanceError) as again:
                admin.stream(name, "CommitSession", admin_pb2.CommitSessionRequest(session_id=sid),
                             lambda *progress: None)
            assert "renewed MAC tags do not match" in again.value.message, again.value.message
    finally:
        admin.close()
        restart_with(root, "bank-a", {"BAD_RENEWER_HOOK": ""})
    out = vaultctl("refresh", "--dir", root, "--abort", "--format", "json", "--session", sid, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    assert set(decisions(root, templates, 5).values()) == {"MATCH"}
