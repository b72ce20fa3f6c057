"""Attack: one node operator erases chosen subjects from the whole cluster through a reshare (red team, issue 10).

In a reshare the new members page through the records of the lead sender
(the first sender by index) and ask the other senders for the same keys.
The lead's operator deletes its own share of alice from its database (one
share of k: nothing lost yet, no provider ticket needed, no audit entry at
any other node). Its node then never lists alice; the new committee never
receives her, and finalize destroys the old epoch everywhere: alice is
erased from the cluster without a ticket.

`vaultctl reshare` must hold every old member's record count against what
the new members received and roll back on a shortfall (naming the
counts); alice still verifies on the old committee.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing

import grpc
import pytest

from maintenance_kit import enrolled_cluster, json_out, vaultctl
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy

pytestmark = pytest.mark.e2e

DIM = 32
COUNT = 12


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("attack-lead") / "cluster", dim=DIM, count=COUNT, seed=13)


def test_a_lead_sender_cannot_erase_a_subject_through_a_reshare(running):
    root, victim = running["root"], "s0003"
    template = running["templates"][victim]
    # bank-a (index 1, the lead sender) drops its own share of the victim.
    cluster.stop_processes(root, ["bank-a"])
    with closing(sqlite3.connect(cluster.Paths(root).node_dir("bank-a") / "shares.db", isolation_level=None)) as conn:
        assert conn.execute("DELETE FROM shares WHERE subject = ?", (victim,)).rowcount == 1
    cluster.restart_node(root, "bank-a")
    with MatcherClient.from_cluster_dir(root) as client:  # one share of k gone: still verifies
        assert client.verify(victim, noisy_copy(template, 1)).decision == "MATCH"

    out = vaultctl("reshare", "--dir", root, "--shareholders", "4", "--threshold", "2",
                   "--approve-with-dev-operators", "--format", "json", timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    error = json_out(out)["error"]
    assert "rolled back" in error["message"] and f"received {COUNT - 1}" in error["message"], error
    assert "bank-b holds 12" in error["message"], error

    spec = cluster.load_spec(root)
    assert list(spec.nodes) == ["bank-a", "bank-b", "bank-c"]
    with MatcherClient.from_cluster_dir(root) as client:
        try:
            decision = client.verify(victim, noisy_copy(template, 2)).decision
        except grpc.RpcError as exc:
            decision = exc.code().name
        assert decision == "MATCH"
