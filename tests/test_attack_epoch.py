"""Attack: one node operator makes every new enrolment and replacement vanish (red team, issue 10).

The matcher stores new shares at "the committee's current epoch", which it
takes as the newest epoch any node reports (GetNodeInfo), and nodes stored
a record at whatever epoch it named. One node operator sets its node's
epoch far ahead (its own database, `node_state.current_epoch`); from then
on every honest node stores new records at an epoch it does not serve.
Enrolments report success and never verify; a replacement deletes the
subject's template everywhere and stores one nobody serves; both silently.

Each node must store new records at its own current epoch only: the
honest nodes refuse (FAILED_PRECONDITION, a `deny` entry with reason
`wrong_epoch`), the matcher undoes the enrolment and the provider gets an
error instead of a success that never verifies. With the per-epoch MAC the
matcher already stops earlier (no agreeing key shares of the claimed epoch).
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import grpc
import pytest

from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates

pytestmark = pytest.mark.e2e

DIM = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack-epoch") / "cluster"
    cluster.up(root, 3, 2, DIM)
    try:
        yield root
    finally:
        cluster.down(root)


def _db(root, node):
    return cluster.Paths(root).node_dir(node) / "shares.db"


def test_a_node_claiming_a_later_epoch_cannot_make_writes_vanish(root):
    alice, bob, mallory = synthetic_templates(3, DIM, seed=21)
    with MatcherClient.from_cluster_dir(root) as client:
        client.enroll("alice", alice)
        assert client.verify("alice", noisy_copy(alice, 1)).decision == "MATCH"

    # bank-a's operator moves its node's epoch far ahead.
    cluster.stop_processes(root, ["bank-a"])
    with closing(sqlite3.connect(_db(root, "bank-a"), isolation_level=None)) as conn:
        conn.execute("UPDATE node_state SET current_epoch = 99 WHERE id = 1")
    cluster.restart_node(root, "bank-a")

    with MatcherClient.from_cluster_dir(root) as client:
        # A new enrolment: refused by the honest nodes, not reported as done.
        with pytest.raises(grpc.RpcError) as err:
            client.enroll("bob", bob)
        assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE), err.value
        assert "Traceback" not in (err.value.details() or "")
        # A replacement: refused too, so the provider knows it did not happen
        # (the matcher undoes a failed replacement, as for any node's refusal).
        with pytest.raises(grpc.RpcError) as err:
            client.enroll("alice", mallory, replace=True)
        assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE), err.value
        try:
            assert client.verify("alice", mallory).decision == "NO_MATCH"
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), exc

    for node in ("bank-b", "bank-c"):
        with closing(sqlite3.connect(f"file:{_db(root, node)}?mode=ro", uri=True)) as conn:
            assert conn.execute("SELECT COUNT(*) FROM shares WHERE epoch != 1").fetchone()[0] == 0, node
            reasons = [json.loads(d) for (d,) in conn.execute(
                "SELECT details_json FROM audit_log WHERE event = 'deny'")]
        # Refused before any honest node stores: the matcher finds no MAC key
        # share of epoch 99 that agrees (bank-a holds none), so the write
        # stops there; a record that reaches a node at another epoch than its
        # own is refused and logged (wrong_epoch; test_shareholder_service.py).
        wrong = [d for d in reasons if d.get("reason") == "wrong_epoch"]
        assert all(d["epoch"] == 99 and d["current_epoch"] == 1 for d in wrong), (node, reasons)
