"""`vaultctl reshare` over real processes: grow, replace, shrink and
re-threshold the committee, with kill -9 of the CLI or of a node at several
points, then rerun the same command. Afterwards every template verifies on
the new committee, the old committee's shares are destroyed (a node that
left holds no share), and no node holds two epochs."""
from __future__ import annotations

import json
import shutil

import pytest

from maintenance_kit import enrolled_cluster, epochs_held, fresh_subjects, json_out, prepared_rows, vaultctl, verify_all
from vaultctl import cluster
from vaultctl.client import MatcherClient

pytestmark = pytest.mark.e2e

DIM = 128
COUNT = 240


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("reshare-crash") / "cluster", dim=DIM, count=COUNT, seed=9)


def _reshare(state, *args, fault=None):
    # The dev operators approve every plan here; tests/test_committee_approval.py plays the attacker.
    return vaultctl("reshare", "--dir", state["root"], *args, "--approve-with-dev-operators", "--format", "json",
                    "--drain", "0.2", fault=fault)


def _assert_committee(state, nodes: list[str], k: int, gone: list[str], note=""):
    root = state["root"]
    spec = cluster.load_spec(root)
    assert list(spec.nodes) == nodes and spec.threshold == k, (note, spec)
    info = cluster.status(root)
    assert info["healthy"], (note, info)
    assert [s["name"] for s in info["shareholders"]] == nodes
    for name in nodes:
        db = root / "nodes" / name / "shares.db"
        assert epochs_held(db) == {state["epoch"]: COUNT}, (note, name, epochs_held(db))
        assert prepared_rows(db) == 0, (note, name)
    for name in gone:
        db = root / "nodes" / name / "shares.db"
        assert epochs_held(db) == {}, (note, name)  # the old committee's shares are destroyed
        assert not (root / "nodes" / name / "pid").exists()
    assert not (root / "maintenance" / "epoch-session.json").exists()
    matcher = json.loads((root / "matcher" / "ready.json").read_text())
    assert [m["name"] for m in matcher["committee"]] == nodes and matcher["threshold"] == k
    sample = fresh_subjects(state)
    with MatcherClient.from_cluster_dir(root) as client:
        verify_all(client, state["templates"], sample, state["impostor"], noise_seed=state["epoch"] * 10)
        assert client.verify(sample[0], state["templates"][sample[0]]).epoch == state["epoch"]


def _finish(state, *args):
    done = _reshare(state, *args)
    assert done.returncode == 0, done.stderr[-2500:]
    report = json_out(done)
    assert report["state"] == "finalized"
    state["epoch"] = report["new_epoch"]
    return report


def test_grow_with_the_cli_killed_after_prepare(running):
    state = running
    # Committees keep n >= 2k - 1 throughout (the MAC keys are renewed at each refresh).
    first = _reshare(state, "--shareholders", "4", "--threshold", "2", fault="prepare:2:self")
    assert first.returncode == -9, first.stderr[-1500:]
    with MatcherClient.from_cluster_dir(state["root"]) as client:
        verify_all(client, state["templates"], fresh_subjects(state, 2), state["impostor"], noise_seed=3)
    # Another command while the session is open is refused with its name.
    other = _reshare(state, "--shareholders", "5")
    assert other.returncode == 1 and "is open" in json_out(other)["error"]["message"]
    report = _finish(state, "--shareholders", "4", "--threshold", "2")
    assert report["resumed"] and report["added"] == ["bank-d"] and report["new_threshold"] == 2
    _assert_committee(state, ["bank-a", "bank-b", "bank-c", "bank-d"], 2, [], "grow")


def test_replace_with_the_new_node_killed_after_a_commit(running):
    state = running
    first = _reshare(state, "--replace", "bank-b", fault="commit:1:node=bank-e")
    assert first.returncode == 2, (first.returncode, first.stderr[-1500:])
    with MatcherClient.from_cluster_dir(state["root"]) as client:  # the old committee still verifies
        verify_all(client, state["templates"], fresh_subjects(state, 2), state["impostor"], noise_seed=4)
    cluster.restart_node(state["root"], "bank-e")
    report = _finish(state, "--replace", "bank-b")
    assert report["resumed"] and report["removed"] == ["bank-b"] and report["added"] == ["bank-e"]
    _assert_committee(state, ["bank-a", "bank-e", "bank-c", "bank-d"], 2, ["bank-b"], "replace")


def test_shrink_with_the_cli_killed_after_the_switch(running):
    state = running
    first = _reshare(state, "--shareholders", "3", "--threshold", "2", fault="switch:1:self")
    assert first.returncode == -9
    # The matcher already uses the new committee; the old epoch is still there.
    with MatcherClient.from_cluster_dir(state["root"]) as client:
        verify_all(client, state["templates"], fresh_subjects(state, 2), state["impostor"], noise_seed=5)
    report = _finish(state, "--shareholders", "3", "--threshold", "2")
    assert report["resumed"] and report["removed"] == ["bank-d"]
    _assert_committee(state, ["bank-a", "bank-e", "bank-c"], 2, ["bank-b", "bank-d"], "shrink")


def test_rethreshold_with_an_old_node_killed_during_finalize(running):
    state = running
    # k = 3 on 3 nodes could not renew its MAC keys: refused before anything starts.
    refused = _reshare(state, "--threshold", "3")
    assert refused.returncode == 1 and "2k - 1" in json_out(refused)["error"]["message"]
    first = _reshare(state, "--shareholders", "5", "--threshold", "3", fault="finalize-start:1:node=bank-c")
    assert first.returncode == 2, (first.returncode, first.stderr[-1500:])
    cluster.restart_node(state["root"], "bank-c")
    report = _finish(state, "--shareholders", "5", "--threshold", "3")
    assert report["resumed"] and report["new_threshold"] == 3
    _assert_committee(state, ["bank-a", "bank-e", "bank-c", "bank-f", "bank-g"], 3, ["bank-b", "bank-d"], "k=3")


def test_abort_before_commit_and_whole_cluster_restart(running):
    state = running
    first = _reshare(state, "--shareholders", "6", "--threshold", "3", fault="prepare:1:self")
    assert first.returncode == -9
    # The whole cluster goes down and up again (a power cut) before the rerun.
    cluster.down(state["root"])
    cluster.up(state["root"])
    aborted = vaultctl("reshare", "--dir", state["root"], "--abort", "--format", "json")
    assert aborted.returncode == 0, aborted.stderr[-2000:]
    assert json_out(aborted)["state"] == "aborted"
    _assert_committee(state, ["bank-a", "bank-e", "bank-c", "bank-f", "bank-g"], 3, ["bank-b", "bank-d"], "abort")
    for joined in ("bank-h",):
        assert epochs_held(state["root"] / "nodes" / joined / "shares.db") == {}
        assert not (state["root"] / "nodes" / joined / "pid").exists()
    # Refresh works on the resulting committee too.
    done = vaultctl("refresh", "--dir", state["root"], "--format", "json", "--drain", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    state["epoch"] = json_out(done)["new_epoch"]
    _assert_committee(state, ["bank-a", "bank-e", "bank-c", "bank-f", "bank-g"], 3, [], "refresh after")
    shutil.rmtree(state["root"] / "maintenance", ignore_errors=True)
