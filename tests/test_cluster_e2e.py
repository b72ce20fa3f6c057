"""`vaultctl cluster up/status/down` over real processes: JSON shape, files
and modes, restart on the same data, start-up failures, killed nodes."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import subprocess
import sys

import pytest

from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates

pytestmark = pytest.mark.e2e


def vaultctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaultctl", *args], capture_output=True, text=True, timeout=timeout
    )


def processes_mentioning(path: pathlib.Path) -> list[int]:
    """Live (non-zombie) processes whose command line names ``path``."""
    found = []
    needle = str(path).encode()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def cluster_dir(tmp_path):
    root = tmp_path / "cluster"
    try:
        yield root
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)
        assert processes_mentioning(root) == []


def _mode(path: str | pathlib.Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_up_status_down_over_the_cli(cluster_dir):
    up = vaultctl("cluster", "up", "--dir", str(cluster_dir), "--format", "json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)

    # Every endpoint, pid and the files any gRPC client needs.
    assert info["healthy"] is True and info["running"] is True
    assert info["spec"] == {"shareholders": 3, "threshold": 2, "dim": 512, "tenants": ["demo-psp"], "modalities": [
        {"name": "default", "dimension": 512, "match_threshold": 0.8, "fmr": None}]}
    assert info["matcher"]["address"].startswith("127.0.0.1:") and info["matcher"]["pid"] > 0
    assert [n["name"] for n in info["shareholders"]] == ["bank-a", "bank-b", "bank-c"]
    assert [n["index"] for n in info["shareholders"]] == [1, 2, 3]
    for node in info["shareholders"]:
        assert node["address"].startswith("127.0.0.1:") and node["pid"] > 0 and node["health"] == "SERVING"
    tls = info["tls"]
    assert pathlib.Path(tls["ca"]) == cluster_dir.resolve() / "pki" / "ca.pem"
    roles = [tls["psp"], tls["auditor"], tls["matcher"], *tls["shareholders"].values()]
    assert tls["psp"]["tenant"] == "demo-psp" and set(tls["shareholders"]) == {"bank-a", "bank-b", "bank-c"}
    for files in roles:
        assert pathlib.Path(files["cert"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE")
        assert _mode(files["key"]) == 0o600
    ticket = info["tickets"]["demo-psp"]
    assert ticket["key_id"] == "demo-psp-1" and _mode(ticket["key"]) == 0o600

    # Contract formats: KEK file, audit key, ready file.
    for name in ("bank-a", "bank-b", "bank-c"):
        node_dir = cluster_dir / "nodes" / name
        kek = json.loads((node_dir / "kek.json").read_text())
        assert kek["active"] == 1 and len(bytes.fromhex(kek["keys"]["1"])) == 32
        assert _mode(node_dir / "kek.json") == 0o600 and _mode(node_dir / "audit.key") == 0o600
        ready = json.loads((node_dir / "ready.json").read_text())
        assert {"name", "address", "port", "metrics_port", "pid"} <= set(ready)
    assert _mode(cluster_dir / "pki" / "ca.key") == 0o600
    keks = {(cluster_dir / "nodes" / n / "kek.json").read_text() for n in ("bank-a", "bank-b", "bank-c")}
    assert len(keks) == 3  # every institution its own key

    # A second up leaves the running cluster alone (tests/test_cluster_restart.py).
    again = vaultctl("cluster", "up", "--dir", str(cluster_dir))
    assert again.returncode == 0 and "bank-a: already running" in again.stdout

    st = vaultctl("cluster", "status", "--dir", str(cluster_dir), "--format", "json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["healthy"] is True
    assert [n["pid"] for n in status["shareholders"]] == [n["pid"] for n in info["shareholders"]]
    assert status["matcher"]["pid"] == info["matcher"]["pid"]

    down = vaultctl("cluster", "down", "--dir", str(cluster_dir), "--format", "json")
    assert down.returncode == 0, down.stderr
    result = json.loads(down.stdout)
    assert {p["name"]: p["result"] for p in result["processes"]} == {
        "matcher": "stopped", "bank-a": "stopped", "bank-b": "stopped", "bank-c": "stopped"
    }
    assert processes_mentioning(cluster_dir) == []
    assert not list(cluster_dir.rglob("ready.json"))

    stopped = vaultctl("cluster", "status", "--dir", str(cluster_dir), "--format", "json")
    assert stopped.returncode == 2
    body = json.loads(stopped.stdout)
    assert body["running"] is False and {n["health"] for n in body["shareholders"]} == {"STOPPED"}


def test_second_up_restarts_with_the_same_data(cluster_dir):
    template = synthetic_templates(1, 64, seed=3)[0]
    cluster.up(cluster_dir, shareholders=3, threshold=2, dim=64)
    ca_before = (cluster_dir / "pki" / "ca.pem").read_bytes()
    kek_before = (cluster_dir / "nodes" / "bank-b" / "kek.json").read_bytes()
    with MatcherClient.from_cluster_dir(cluster_dir) as client:
        client.enroll("carol", template)
    cluster.down(cluster_dir)

    info = cluster.up(cluster_dir)  # no sizes: the stored spec is used
    assert info["healthy"] and info["spec"]["dim"] == 64
    assert (cluster_dir / "pki" / "ca.pem").read_bytes() == ca_before
    assert (cluster_dir / "nodes" / "bank-b" / "kek.json").read_bytes() == kek_before
    with MatcherClient.from_cluster_dir(cluster_dir) as client:
        assert client.verify("carol", noisy_copy(template, seed=4)).decision == "MATCH"

    cluster.down(cluster_dir)
    with pytest.raises(cluster.ClusterError, match="threshold = 2"):
        cluster.up(cluster_dir, threshold=3)  # a stored cluster keeps its size


def test_killed_node_shows_in_status_and_down_cleans_up(cluster_dir):
    cluster.up(cluster_dir, dim=32)
    pid = cluster.kill_node(cluster_dir, "bank-a", signal.SIGKILL)
    st = cluster.status(cluster_dir)
    node = st["shareholders"][0]
    assert node["name"] == "bank-a" and node["health"] == "STOPPED" and node["pid"] is None
    assert st["healthy"] is False and st["running"] is True
    assert (cluster_dir / "nodes" / "bank-a" / "ready.json").exists()  # stale until down
    result = cluster.down(cluster_dir)
    assert {p["name"]: p["result"] for p in result["processes"]}["bank-a"] == "not running"
    assert not (cluster_dir / "nodes" / "bank-a" / "ready.json").exists()
    assert pid not in processes_mentioning(cluster_dir)


def test_a_node_that_cannot_start_is_named_with_its_log(cluster_dir):
    cluster.init(cluster_dir, cluster.ClusterSpec(dim=32))
    os.chmod(cluster_dir / "nodes" / "bank-b" / "kek.json", 0o644)  # the node refuses a readable KEK
    with pytest.raises(cluster.ClusterError) as failure:
        cluster.up(cluster_dir, timeout_s=20)
    message = str(failure.value)
    assert "Shareholder bank-b" in message and "node.log" in message
    assert "kek.json" in message  # the tail of its log says why
    # The nodes that did start were stopped again.
    assert processes_mentioning(cluster_dir) == []
    assert cluster.status(cluster_dir)["running"] is False


def test_bad_sizes_are_local_errors(tmp_path):
    r = vaultctl("cluster", "up", "--dir", str(tmp_path / "c"), "--shareholders", "3", "--threshold", "4")
    assert r.returncode == 1 and "threshold" in r.stderr and "Traceback" not in r.stderr
    r = vaultctl("cluster", "status", "--dir", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "not a cluster directory" in r.stderr


@pytest.mark.parametrize("threshold", [0.0, -0.2, 1.5, float("nan")])
def test_a_match_threshold_that_would_match_everything_is_refused(threshold):
    with pytest.raises(cluster.ClusterError, match="match threshold"):
        cluster.ClusterSpec(match_threshold=threshold)


def test_one_cluster_id_in_every_config_and_the_providers_material(cluster_dir):
    paths = cluster.init(cluster_dir, cluster.ClusterSpec(dim=32))
    cid = cluster.cluster_id(cluster_dir)
    assert cid.startswith("splitvault-") and len(cid) == len("splitvault-") + 32
    assert (cluster_dir / "psp" / "cluster_id").read_text().strip() == cid
    for name in cluster.load_spec(cluster_dir).nodes:
        assert f'cluster_id = "{cid}"' in (paths.node_dir(name) / "node.toml").read_text()
    # A second init keeps the id (the nodes' configs are never rewritten).
    cluster.init(cluster_dir, cluster.ClusterSpec(dim=32))
    assert cluster.cluster_id(cluster_dir) == cid
    # Another cluster gets another id: tickets for one are refused by the other.
    other = cluster_dir.parent / "other"
    cluster.init(other, cluster.ClusterSpec(dim=32))
    assert cluster.cluster_id(other) != cid
