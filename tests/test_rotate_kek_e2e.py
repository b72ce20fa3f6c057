"""``vaultctl rotate kek`` on a real local cluster (separate node and
matcher processes, the CLI as a subprocess): the end to end result, kill -9
of the node at two points of a rotation and, separately, kill -9 of the CLI,
each followed by rerunning the same command, which completes.

After every scenario every enrolled template is rejoined offline from the
rotated nodes' stored shares, opened with their KEK files as they are on
disk, and must equal the enrolled template's code exactly; a sample is also
verified through the matcher (genuine MATCH, impostor NO_MATCH)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import numpy as np
import pytest

from shareholders import storage
from shareholders.config import parse_kek_json
from vault import codec, envelope, record
from vaultrpc import wire
from node_kit import wait_until
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates

DIM = 32
SUBJECTS = 3000
SAMPLE = 25
ROOT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotate") / "cluster"
    templates = synthetic_templates(SUBJECTS, DIM, seed=11)
    cluster.up(root, 3, 2, DIM)
    try:
        with MatcherClient.from_cluster_dir(root) as client:
            failed = [r for r in client.enroll_many((f"s{i:04d}", templates[i]) for i in range(SUBJECTS)) if r.code]
        assert not failed
        yield root, templates
    finally:
        cluster.down(root)


def vaultctl(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaultctl", *args, "--format", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ROOT_ENV, text=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, dict]:
    out, _err = proc.communicate(timeout=timeout)
    return proc.returncode, json.loads(out) if out.strip() else {}


def rotate(root, node: str, *extra: str) -> tuple[int, dict]:
    return finish(vaultctl("rotate", "kek", "--dir", str(root), "--node", node, *extra))


def versions(root, node: str) -> dict[int, int]:
    with closing(sqlite3.connect(cluster.Paths(root).node_dir(node) / "shares.db", timeout=10)) as conn:
        return dict(conn.execute("SELECT kek_version, COUNT(*) FROM shares GROUP BY kek_version").fetchall())


def kek(root, node: str) -> dict:
    return json.loads((cluster.Paths(root).node_dir(node) / "kek.json").read_text())


def node_records(root, node: str) -> dict[str, object]:
    """subject -> ShareRecord, every row opened with the node's KEK file as on disk."""
    d = cluster.Paths(root).node_dir(node)
    ring = parse_kek_json((d / "kek.json").read_bytes(), "kek.json")
    with closing(sqlite3.connect(d / "shares.db", timeout=10)) as conn:
        rows = [storage.ShareRow.from_db(r) for r in conn.execute(f"SELECT {storage.SHARE_COLUMNS} FROM shares")]
    return {
        row.subject: row.record(envelope.open(ring, record.record_identity(row.tenant, row.subject, row.index, row.epoch),
                                              row.sealed))
        for row in rows
    }


def node_key(root, node: str, index: int, epoch: int):
    """The node's MAC key share of ``epoch``, opened with its KEK file as on disk (re-wrapped by the rotation too)."""
    d = cluster.Paths(root).node_dir(node)
    ring = parse_kek_json((d / "kek.json").read_bytes(), "kek.json")
    with closing(storage.connect(d / "shares.db")) as db:
        row = db.mac_keys()[epoch]
    raw = envelope.open(ring, record.key_identity(cluster.cluster_id(cluster.Paths(root).root), node, index, epoch),
                        row.sealed)
    return record.KeyShare(epoch=epoch, index=index, dimension=DIM, values=raw[: 4 * record.MAC_COUNT * DIM])


def assert_every_template_rejoins(root, templates, nodes: tuple[str, str]) -> None:
    first, second = (node_records(root, n) for n in nodes)
    assert len(first) == len(second) == SUBJECTS
    codes = codec.encode(templates, DIM)
    some = next(iter(first.values())), next(iter(second.values()))
    keys = [node_key(root, n, r.index, r.epoch) for n, r in zip(nodes, some)]
    for i in range(SUBJECTS):
        subject = f"s{i:04d}"
        joined = record.join([wire.share(first[subject]), wire.share(second[subject])], keys)
        assert np.array_equal(joined.template, codes[i]), subject


def assert_sample_verifies(root, templates) -> None:
    rng = np.random.default_rng(int(time.time()))
    impostor = synthetic_templates(1, DIM, seed=999)[0]
    with MatcherClient.from_cluster_dir(root) as client:
        for i in rng.choice(SUBJECTS, SAMPLE, replace=False):
            assert client.verify(f"s{i:04d}", noisy_copy(templates[i], int(i))).decision == "MATCH"
            assert client.verify(f"s{i:04d}", impostor).decision == "NO_MATCH"


def restart(root) -> None:
    cluster.down(root)
    cluster.up(root)


def test_rotate_kek_end_to_end(gallery):
    root, templates = gallery
    assert versions(root, "bank-a") == {1: SUBJECTS} and kek(root, "bank-a")["active"] == 1
    old_key = kek(root, "bank-a")["keys"]["1"]
    code, out = rotate(root, "bank-a", "--batch-size", "500")
    assert code == 0, out
    assert (out["node"], out["to_version"], out["from_versions"], out["retired_versions"]) == ("bank-a", 2, [1], [1])
    assert out["rewrapped"] == out["total"] == SUBJECTS and out["batches"] == 6 and not out["resumed"]
    assert out["rate_per_s"] > 0
    assert versions(root, "bank-a") == {2: SUBJECTS}
    after = kek(root, "bank-a")
    assert after["active"] == 2 and list(after["keys"]) == ["2"] and old_key not in json.dumps(after)
    assert not (cluster.Paths(root).root / "maintenance" / "rotate-kek-bank-a.json").exists()
    assert_every_template_rejoins(root, templates, ("bank-a", "bank-b"))
    assert_sample_verifies(root, templates)


@pytest.mark.parametrize("node, when", [("bank-b", "mid-rewrap"), ("bank-c", "new key written")])
def test_kill_the_node_during_a_rotation_then_rerun(gallery, node, when):
    root, templates = gallery
    start = kek(root, node)["active"]
    proc = vaultctl("rotate", "kek", "--dir", str(root), "--node", node, "--batch-size", "50", "--pause-ms", "40")
    try:
        if when == "mid-rewrap":
            wait_until(lambda: versions(root, node).get(start + 1, 0) >= 300, every_s=0.005)
        else:
            wait_until(lambda: len(kek(root, node)["keys"]) == 2, every_s=0.001)
        cluster.kill_node(root, node, signal.SIGKILL)
        code, out = finish(proc)
    finally:
        proc.kill()
    assert code == 2 and out["error"]["status"] == "UNAVAILABLE", out
    session = out["error"]["session_id"]
    left = versions(root, node)
    assert sum(left.values()) == SUBJECTS and left.get(start, 0) > 0  # cut off half-way
    assert_sample_verifies(root, templates)  # two nodes of three still answer
    restart(root)
    code, out = rotate(root, node)  # the same command again
    assert code == 0, out
    assert out["session_id"] == session and out["resumed"] and out["to_version"] == start + 1
    assert out["retired_versions"] == [start]
    assert versions(root, node) == {start + 1: SUBJECTS}
    assert list(kek(root, node)["keys"]) == [str(start + 1)]
    assert_every_template_rejoins(root, templates, (node, "bank-a"))
    assert_sample_verifies(root, templates)


def test_kill_the_cli_during_a_rotation_then_rerun(gallery):
    root, templates = gallery
    node = "bank-a"
    start = kek(root, node)["active"]
    proc = vaultctl("rotate", "kek", "--dir", str(root), "--node", node, "--batch-size", "50", "--pause-ms", "40")
    try:
        wait_until(lambda: versions(root, node).get(start + 1, 0) >= 200, every_s=0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    saved = json.loads((cluster.Paths(root).root / "maintenance" / f"rotate-kek-{node}.json").read_text())
    assert versions(root, node).get(start, 0) > 0  # the node is still at it
    code, out = rotate(root, node)  # follows the node's job (or learns it finished)
    assert code == 0, out
    assert out["session_id"] == saved["session_id"] and out["to_version"] == start + 1
    assert versions(root, node) == {start + 1: SUBJECTS}
    assert list(kek(root, node)["keys"]) == [str(start + 1)]
    assert_every_template_rejoins(root, templates, (node, "bank-c"))
    assert_sample_verifies(root, templates)
