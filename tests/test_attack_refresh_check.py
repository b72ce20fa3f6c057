"""Attack: the auditor turns the refresh check into a delta oracle (issue 10, hole 2).

The review's attack, over real processes, with the auditor's certificate
only: ask one node the same challenges twice with an ``exclude`` differing
by one record, so that the masks cancel and the difference of the two
answers is a linear function of that record's delta (33 rounds give the
whole delta; with one node's disk from before the refresh and another's
from after, the template). Variants: the same challenges with the same
exclude, overlapping challenge sets, the same challenges again after the
node restarted, and the auditor asking a node directly for its masks.

The node must refuse every one of them with a precise status and an audit
entry that says why, and the fresh-challenge answers it does give must be
masked (they pass the zero-polynomial test, and are not the unmasked
combination).
"""
from __future__ import annotations

import json
import sqlite3

import grpc
import pytest

from maintenance_kit import enrolled_cluster, json_out, vaultctl, verify_all, fresh_subjects
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from vault import pki, proactive
from vaultctl import auditor, cluster
from vaultctl.client import MatcherClient
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e

DIM = 64
COUNT = 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real cluster with a refresh prepared and checked by `vaultctl refresh --check`."""
    for state in enrolled_cluster(tmp_path_factory.mktemp("attack-check") / "cluster", dim=DIM, count=COUNT, seed=9):
        out = vaultctl("refresh", "--dir", state["root"], "--check", "--format", "json")
        assert out.returncode == 0, out.stderr[-2000:]
        report = json_out(out)
        assert report["check"]["passed"] and report["state"] == "prepared"
        state["sid"] = report["session_id"]
        yield state


class _Auditor:
    """Raw admin stubs with the auditor's certificate (what the attacker holds)."""

    def __init__(self, root):
        self.target = auditor.from_cluster_dir(root)
        self.tls = self.target.tls.load()
        self.nodes = {n.name: n for n in self.target.nodes}
        self.peers = [admin_pb2.Member(name=n.name, index=n.index, address=n.address) for n in self.target.nodes]
        self.channels = {n.name: secure_channel(n.address, self.tls, expect=pki.Identity("shareholder", n.name)) for n in self.target.nodes}

    def stub(self, name):
        return admin_pb2_grpc.ShareholderAdminStub(self.channels[name])

    def check(self, name, sid, challenges, exclude=()):
        req = admin_pb2.CheckRefreshRequest(session_id=sid, challenges=challenges, peers=self.peers,
                                            exclude=[admin_pb2.RecordKey(tenant=t, subject=s) for t, s in exclude])
        return self.stub(name).CheckRefresh(req, timeout=60)

    def close(self):
        for ch in self.channels.values():
            ch.close()


def _refusals(db, sid):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [json.loads(d)["reason"] for (d,) in conn.execute(
            "SELECT details_json FROM audit_log WHERE event = 'refresh_check_refused' AND request_id = ? ORDER BY seq",
            (sid,))]
    finally:
        conn.close()


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_the_auditor_cannot_cancel_the_masks(prepared):
    state, sid = prepared, prepared["sid"]
    root = state["root"]
    db = root / "nodes" / "bank-a" / "shares.db"
    victim = ("default", "s0007")
    a = _Auditor(root)
    try:
        names = sorted(a.nodes, key=lambda n: a.nodes[n].index)
        challenges = [proactive.new_challenge() for _ in range(16)]
        # Round 1 of the review's attack: every record, the 16 challenges.
        first = {n: a.check(n, sid, challenges) for n in names}
        xs = [a.nodes[n].index for n in names]
        for c in range(16):  # the check itself still works
            assert proactive.on_zero_polynomial(xs, [first[n].values[c] for n in names], 2)
        assert len({(r.keys_sha256, r.context_sha256) for r in first.values()}) == 1
        assert first["bank-a"].records == COUNT and first["bank-a"].call >= 1
        # Round 2: the same challenges with the victim excluded -> refused.
        code, msg = _code(lambda: a.check("bank-a", sid, challenges, exclude=[victim]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exclude" in msg
        # The same challenges, the same (empty) exclude -> refused: answered once.
        code, msg = _code(lambda: a.check("bank-a", sid, challenges))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "answered" in msg
        # Overlapping challenge sets: one old challenge among fresh ones -> refused.
        code, _ = _code(lambda: a.check("bank-a", sid, [proactive.new_challenge(), challenges[5]]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        # A challenge twice in one call -> refused before anything is computed.
        fresh = proactive.new_challenge()
        code, _ = _code(lambda: a.check("bank-a", sid, [fresh, fresh]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        # The auditor asking a node for its check masks directly: not its role.
        req = admin_pb2.GetRefreshDeltasRequest(session_id=sid, check_context=bytes(32), check_count=1,
                                                mask_threshold=2)
        code, _ = _code(lambda: a.stub("bank-b").GetRefreshDeltas(req, timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        req = admin_pb2.GetRefreshDeltasRequest(session_id=sid, check_challenges=challenges)
        code, _ = _code(lambda: a.stub("bank-b").GetRefreshDeltas(req, timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # Fresh challenges are answered, and every answer carries its own mask:
        # the records covered are the same (the nodes decide), the answer is not
        # the first one and the masks changed with the context.
        again = a.check("bank-a", sid, [proactive.new_challenge() for _ in range(16)])
        assert again.keys_sha256 == first["bank-a"].keys_sha256
        assert again.context_sha256 != first["bank-a"].context_sha256
        assert set(again.values).isdisjoint(first["bank-a"].values)
        assert again.call == first["bank-a"].call + 1
    finally:
        a.close()
    assert _refusals(db, sid) == ["exclude", "repeated_challenge", "repeated_challenge"]

    # The node restarts: its memory of the answered challenges survives.
    cluster.kill_node(root, "bank-a")
    cluster.restart_node(root, "bank-a")
    a = _Auditor(root)
    try:
        code, msg = _code(lambda: a.check("bank-a", sid, challenges))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "answered" in msg
    finally:
        a.close()
    assert _refusals(db, sid)[-1] == "repeated_challenge"

    # The auditor's own tool is unaffected: the rerun checks with fresh
    # challenges and completes the refresh.
    out = vaultctl("refresh", "--dir", root, "--format", "json", "--drain", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json_out(out)
    assert report["state"] == "finalized" and report["check"]["passed"] and report["check"]["attempts"] == 1
    with MatcherClient.from_cluster_dir(root) as client:
        verify_all(client, state["templates"], fresh_subjects(state, 3), state["impostor"])
    # The refusals sit in an intact audit chain.
    audit = vaultctl("audit", "verify", "--dir", root, "--format", "json")
    assert audit.returncode == 0, audit.stdout[-1500:] + audit.stderr[-1500:]
