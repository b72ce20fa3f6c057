"""A cluster whose nodes keep their shares in PostgreSQL (one database per
node on the tests' real server, tests/pg_kit.py), over real processes and
mTLS: enrol, verify, refresh, the audit chains, and a node killed with
SIGKILL in the middle of a refresh, restarted, the refresh rerun."""
from __future__ import annotations

import pathlib
import shutil
import tempfile

import pytest

from node_kit import wait_until
from maintenance_kit import enrolled_cluster, fresh_subjects, json_out, vaultctl, verify_all
from shareholders import storage
from shareholders.config import load_config
from vaultctl import cluster
from vaultctl.client import MatcherClient

pytestmark = pytest.mark.e2e

DIM = 64
COUNT = 60


@pytest.fixture(scope="module")
def running(pg, tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("pg-cluster") / "cluster", dim=DIM, count=COUNT, seed=11,
                                postgres=pg.uri())


def held(root, name: str) -> tuple[dict[int, int], int]:
    """(epoch -> rows, rows of an epoch not yet served) in a node's PostgreSQL store."""
    db = storage.connect(load_config(root / "nodes" / name / "node.toml").store)
    try:
        db._scope()  # the node's tenant-blind view (row-level security binds this role too)
        epochs = dict(db.execute("SELECT epoch, COUNT(*) FROM shares GROUP BY epoch").fetchall())
        return epochs, sum(n for e, n in epochs.items() if e > db.node_state().current_epoch)
    finally:
        db.close()


def assert_whole(state, note=""):
    root = state["root"]
    for name in cluster.load_spec(root).nodes:
        assert held(root, name) == ({state["epoch"]: COUNT}, 0), (note, name, held(root, name))
        assert not (root / "nodes" / name / "shares.db").exists(), name  # nothing in a SQLite file
    with MatcherClient.from_cluster_dir(root) as client:
        verify_all(client, state["templates"], fresh_subjects(state), state["impostor"], noise_seed=state["epoch"])


def test_nodes_on_postgres_enrol_verify_and_refresh(running):
    state = running
    assert_whole(state, "enrolled")
    done = vaultctl("refresh", "--dir", state["root"], "--format", "json", "--drain", "0.2")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json_out(done)
    assert report["state"] == "finalized" and report["new_epoch"] == state["epoch"] + 1
    state["epoch"] = report["new_epoch"]
    assert_whole(state, "refreshed")
    audit = vaultctl("audit", "verify", "--dir", state["root"], "--format", "json")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


def test_a_node_killed_mid_refresh_comes_back_and_the_rerun_completes(running):
    state = running
    first = vaultctl("refresh", "--dir", state["root"], "--format", "json", "--drain", "0.2",
                     fault="prepare:1:node=bank-c")
    assert first.returncode == 2, (first.returncode, first.stderr[-1500:])
    with MatcherClient.from_cluster_dir(state["root"]) as client:  # 2 of 3 nodes still verify
        verify_all(client, state["templates"], fresh_subjects(state, 2), state["impostor"], noise_seed=77)
    cluster.restart_node(state["root"], "bank-c")
    second = vaultctl("refresh", "--dir", state["root"], "--format", "json", "--drain", "0.2")
    assert second.returncode == 0, second.stderr[-2000:]
    report = json_out(second)
    assert report["resumed"] is True and report["state"] == "finalized"
    state["epoch"] = report["new_epoch"]
    assert_whole(state, "after the kill")


def test_cluster_up_with_its_own_postgres_server_and_down_stops_it():
    pytest.importorskip("pgserver")
    # Not under pytest's 0700 folder: the server's own user must reach its data.
    top = pathlib.Path(tempfile.mkdtemp(prefix="splitvault-own-pg-"))
    top.chmod(0o755)
    root = top / "cluster"
    up = vaultctl("cluster", "up", "--dir", root, "--dim", "16", "--backend", "postgres", "--format", "json",
                  timeout=180)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert (root / "postgres" / "pgdata" / "postmaster.pid").exists()
        for name in cluster.load_spec(root).nodes:
            assert 'backend = "postgres"' in (root / "nodes" / name / "node.toml").read_text()
        with MatcherClient.from_cluster_dir(root) as client:
            template = [1.0] + [0.0] * 15
            assert client.enroll("alice", template).epoch == 1
            assert client.verify("alice", template).decision == "MATCH"
        assert held(root, "bank-a") == ({1: 1}, 0)
    finally:
        down = vaultctl("cluster", "down", "--dir", root, "--format", "json")
    assert down.returncode == 0, down.stderr[-2000:]
    assert {"name": "postgres", "pid": None, "result": "stopped"} in json_out(down)["processes"]
    assert wait_until(lambda: not (root / "postgres" / "pgdata" / "postmaster.pid").exists())
    shutil.rmtree(top, ignore_errors=True)


def test_audit_verify_reads_a_stopped_node_from_its_postgres_database(running):
    state = running
    cluster.kill_node(state["root"], "bank-b")
    try:
        offline = vaultctl("audit", "verify", "--dir", state["root"], "--node", "bank-b", "--format", "json")
        assert offline.returncode == 0, offline.stdout[-2000:] + offline.stderr[-2000:]
        nodes = {n["name"]: n for n in json_out(offline)["nodes"]}
        assert nodes["bank-b"]["source"] == "file a PostgreSQL database" and nodes["bank-b"]["ok"], nodes
    finally:
        cluster.restart_node(state["root"], "bank-b")
