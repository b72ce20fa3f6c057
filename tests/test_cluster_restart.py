"""`vaultctl cluster up` on an existing cluster starts whatever is stopped and
leaves running members alone, over real processes: a node killed with
SIGKILL comes back on its own data, a stale pid file (even one naming a live
process that is not ours) is replaced, and an `up` with everything running
changes nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates

pytestmark = pytest.mark.e2e

DIM = 32


def vaultctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaultctl", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "cluster"
    try:
        yield d
    finally:
        if (d / "cluster.json").exists():
            cluster.down(d)


def _actions(info: dict) -> dict[str, dict]:
    return {a["name"]: a for a in info["actions"]}


def _pids(info: dict) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in [info["matcher"], *info["shareholders"]]}


def test_up_brings_back_a_killed_node_on_its_data_and_leaves_the_rest_alone(root):
    templates = synthetic_templates(2, DIM, seed=21)
    first = cluster.up(root, 3, 2, DIM)
    assert {a["result"] for a in first["actions"]} == {"started"}
    with MatcherClient.from_cluster_dir(root) as client:
        assert not [r for r in client.enroll_many([("ann", templates[0]), ("bo", templates[1])]) if r.code]
    before = _pids(first)
    db = root / "nodes" / "bank-b" / "shares.db"
    size_before = db.stat().st_size

    killed = cluster.kill_node(root, "bank-b", signal.SIGKILL)
    assert killed == before["bank-b"]
    r = vaultctl("cluster", "up", "--dir", str(root), "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    acts = _actions(info)
    assert acts["bank-b"]["result"] == "started" and acts["bank-b"]["stale_pid"] == killed
    assert acts["bank-a"] == {"name": "bank-a", "result": "already running", "pid": before["bank-a"]}
    assert acts["bank-c"] == {"name": "bank-c", "result": "already running", "pid": before["bank-c"]}
    # The matcher keeps running and is given bank-b's new port.
    assert acts["matcher"] == {"name": "matcher", "result": "reconfigured", "pid": before["matcher"]}
    after = _pids(info)
    assert after["bank-b"] != killed and {n: after[n] for n in ("matcher", "bank-a", "bank-c")} == {
        n: before[n] for n in ("matcher", "bank-a", "bank-c")}
    assert info["healthy"] is True
    assert db.stat().st_size >= size_before  # the same database, not a fresh one

    # Every node serves: MATCH with all three; then with bank-a gone, the
    # MATCH needs bank-b's shares, so its data came back intact.
    with MatcherClient.from_cluster_dir(root) as client:
        assert client.verify("ann", noisy_copy(templates[0], seed=1)).decision == "MATCH"
        assert client.verify("bo", noisy_copy(templates[0], seed=2)).decision == "NO_MATCH"
    cluster.kill_node(root, "bank-a", signal.SIGKILL)
    with MatcherClient.from_cluster_dir(root) as client:
        assert client.verify("bo", noisy_copy(templates[1], seed=3)).decision == "MATCH"
        assert client.verify("ann", noisy_copy(templates[0], seed=4)).decision == "MATCH"

    # A stale pid file that names a live process which is not a node of the
    # cluster (pid reuse): `up` must start the node and never signal that process.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (root / "nodes" / "bank-a" / "pid").write_text(f"{bystander.pid}\n")
        r = vaultctl("cluster", "up", "--dir", str(root))
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"bank-a: started (stale pid file of {bystander.pid} replaced)" in r.stdout
        assert "bank-b: already running" in r.stdout and "matcher: reconfigured" in r.stdout
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    with MatcherClient.from_cluster_dir(root) as client:
        cluster.kill_node(root, "bank-c", signal.SIGKILL)  # now a and b must answer
        assert client.verify("ann", noisy_copy(templates[0], seed=5)).decision == "MATCH"

    # The matcher killed too: `up` starts it and bank-c, on the nodes' addresses.
    running = _pids(cluster.status(root))
    cluster.kill_node(root, "matcher", signal.SIGKILL)
    info = cluster.up(root)
    acts = _actions(info)
    assert acts["matcher"]["result"] == "started" and acts["bank-c"]["result"] == "started"
    assert acts["bank-a"] == {"name": "bank-a", "result": "already running", "pid": running["bank-a"]}
    assert acts["bank-b"] == {"name": "bank-b", "result": "already running", "pid": running["bank-b"]}
    with MatcherClient.from_cluster_dir(root) as client:
        assert client.verify("bo", noisy_copy(templates[1], seed=6)).decision == "MATCH"


def test_up_with_everything_running_changes_nothing(root):
    first = cluster.up(root, 3, 2, DIM)
    matcher_toml = root / "matcher" / "matcher.toml"
    node_toml = root / "nodes" / "bank-a" / "node.toml"
    configs = (matcher_toml.read_bytes(), node_toml.read_bytes(), matcher_toml.stat().st_mtime_ns)
    r = vaultctl("cluster", "up", "--dir", str(root), "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert {a["result"] for a in info["actions"]} == {"already running"}
    assert _pids(info) == _pids(first)
    assert info["healthy"] is True
    assert (matcher_toml.read_bytes(), node_toml.read_bytes(), matcher_toml.stat().st_mtime_ns) == configs


def test_a_failed_restart_leaves_the_running_members_alone(root):
    first = cluster.up(root, 3, 2, DIM)
    cluster.kill_node(root, "bank-c", signal.SIGKILL)
    kek = root / "nodes" / "bank-c" / "kek.json"
    os.chmod(kek, 0o644)  # the node refuses a readable KEK: it cannot start
    r = vaultctl("cluster", "up", "--dir", str(root), "--format", "json", "--timeout", "20")
    assert r.returncode == 1
    assert "Shareholder bank-c" in json.loads(r.stdout)["error"]["message"]
    st = cluster.status(root)
    pids = _pids(st)
    assert pids["bank-c"] is None
    assert {n: pids[n] for n in ("matcher", "bank-a", "bank-b")} == {
        n: _pids(first)[n] for n in ("matcher", "bank-a", "bank-b")}
    os.chmod(kek, 0o600)
    again = cluster.up(root)
    assert _actions(again)["bank-c"]["result"] == "started" and again["healthy"] is True
