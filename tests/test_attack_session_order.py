"""Attack: the auditor destroys templates by ordering session steps (red team, issue 10).

`vaultctl` commits every node before it finalizes any, and rolls back only
while no node committed; the nodes used to take each step on their own
state alone. With the auditor's certificate only (raw gRPC, no CLI), a
session prepared everywhere could be finalized on some nodes and rolled
back on the others:

- refresh (2 of 3): commit and finalize bank-a (its epoch e is destroyed),
  roll back bank-b and bank-c (their epoch e+1 is destroyed): bank-a's
  shares are useless from then on, every payment depends on the two others,
  and no refresh can run again;
- reshare the operators approved (bank-c replaced by bank-d, k = 2):
  finalize bank-c (it destroys every share), commit and finalize bank-a,
  roll back bank-b: one share of the old epoch and one of the new are
  left, and every template is gone.

The nodes must refuse: finalize until k members of the new committee
committed (FAILED_PRECONDITION naming those behind), roll back once any
member did,
each refusal a `maintenance_refused` audit entry; and the session still
completes afterwards with every template verifying.
"""
from __future__ import annotations

import json
import sqlite3

import grpc
import pytest

from maintenance_kit import enrolled_cluster, epochs_held, fresh_subjects, json_out, vaultctl, verify_all
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki
from vaultctl import auditor
from vaultctl.client import MatcherClient
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e

DIM = 64
COUNT = 24


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("attack-order") / "cluster", dim=DIM, count=COUNT, seed=5)


class _Auditor:
    """Raw admin stubs with the auditor's certificate, one per node of the cluster directory."""

    def __init__(self, root, names):
        target = auditor.from_cluster_dir(root)
        tls = target.tls.load()
        known = {n.name: n.address for n in target.nodes}
        self.channels = {n: secure_channel(known[n], tls, expect=pki.Identity("shareholder", n)) for n in names}

    def stub(self, name):
        return admin_pb2_grpc.ShareholderAdminStub(self.channels[name])

    def commit(self, name, sid):
        return list(self.stub(name).CommitSession(admin_pb2.CommitSessionRequest(session_id=sid), timeout=60))

    def finalize(self, name, sid):
        return list(self.stub(name).FinalizeSession(admin_pb2.FinalizeSessionRequest(session_id=sid), timeout=60))

    def abort(self, name, sid):
        return self.stub(name).AbortSession(admin_pb2.AbortSessionRequest(session_id=sid), timeout=60)

    def close(self):
        for ch in self.channels.values():
            ch.close()


def _refused(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _refusal_reasons(db, sid):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [json.loads(d)["reason"] for (d,) in conn.execute(
            "SELECT details_json FROM audit_log WHERE event = 'maintenance_refused' AND request_id = ? ORDER BY seq",
            (sid,))]
    finally:
        conn.close()


def _db(root, name):
    return root / "nodes" / name / "shares.db"


def test_the_auditor_cannot_finalize_one_node_and_roll_back_the_others_in_a_refresh(running):
    state, root = running, running["root"]
    out = vaultctl("refresh", "--dir", root, "--check", "--format", "json")
    assert out.returncode == 0, out.stderr[-2000:]
    sid = json_out(out)["session_id"]  # prepared and checked on every node, nothing committed
    a = _Auditor(root, ["bank-a", "bank-b", "bank-c"])
    try:
        a.commit("bank-a", sid)
        code, msg = _refused(lambda: a.finalize("bank-a", sid))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
        assert "bank-b" in msg and "bank-c" in msg and "not committed" in msg
        assert epochs_held(_db(root, "bank-a")) == {1: COUNT, 2: COUNT}  # the old epoch stays
        for name in ("bank-b", "bank-c"):
            code, msg = _refused(lambda: a.abort(name, sid))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "bank-a" in msg, (name, code, msg)
            assert epochs_held(_db(root, name)) == {1: COUNT, 2: COUNT}  # the prepared epoch stays
    finally:
        a.close()
    assert _refusal_reasons(_db(root, "bank-a"), sid) == ["finalize_early"]
    assert _refusal_reasons(_db(root, "bank-b"), sid) == ["abort_after_commit"]
    # The session rolls forward as usual, and every template verifies.
    done = vaultctl("refresh", "--dir", root, "--format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json_out(done)["state"] == "finalized"
    for name in ("bank-a", "bank-b", "bank-c"):
        assert epochs_held(_db(root, name)) == {2: COUNT}
    state["epoch"] = 2
    with MatcherClient.from_cluster_dir(root) as client:
        verify_all(client, state["templates"], fresh_subjects(state), state["impostor"], noise_seed=20)


def test_the_auditor_cannot_destroy_every_template_through_an_approved_reshare(running):
    state, root = running, running["root"]
    # The operators approve replacing bank-c by bank-d (bank-c leaves); the
    # auditor's CLI is stopped after prepare, before anything is committed.
    out = vaultctl("reshare", "--dir", root, "--replace", "bank-c", "--approve-with-dev-operators",
                   "--format", "json", fault="commit-start:1:self")
    assert out.returncode == -9, out.stderr[-2000:]
    sid = json.loads((root / "maintenance" / "epoch-session.json").read_text())["session_id"]
    a = _Auditor(root, ["bank-a", "bank-b", "bank-c"])
    try:
        a.commit("bank-c", sid)
        code, msg = _refused(lambda: a.finalize("bank-c", sid))  # would destroy all of bank-c's shares
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "bank-a" in msg and "bank-b" in msg, (code, msg)
        assert epochs_held(_db(root, "bank-c")) == {2: COUNT}
        a.commit("bank-a", sid)
        code, msg = _refused(lambda: a.finalize("bank-a", sid))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "bank-b" in msg, (code, msg)
        code, msg = _refused(lambda: a.abort("bank-b", sid))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "bank-a" in msg and "bank-c" in msg, (code, msg)
        assert epochs_held(_db(root, "bank-b")) == {2: COUNT, 3: COUNT}
    finally:
        a.close()
    assert _refusal_reasons(_db(root, "bank-c"), sid) == ["finalize_early"]
    assert _refusal_reasons(_db(root, "bank-b"), sid) == ["abort_after_commit"]
    # The approved reshare completes, and every template verifies on the new committee.
    done = vaultctl("reshare", "--dir", root, "--replace", "bank-c", "--approve-with-dev-operators",
                    "--format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json_out(done)["state"] == "finalized"
    for name in ("bank-a", "bank-b", "bank-d"):
        assert epochs_held(_db(root, name)) == {3: COUNT}
    state["epoch"] = 3
    with MatcherClient.from_cluster_dir(root) as client:
        verify_all(client, state["templates"], fresh_subjects(state), state["impostor"], noise_seed=30)
