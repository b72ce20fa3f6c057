"""Attack: one node operator destroys a chosen template through a refresh (red team, issue 10).

The refresh check covers the records every member holds; the others
(half-done enrolments) are refreshed unchecked. bank-a's operator deletes
its own share of the victim (one share of k: nothing lost, no ticket, no
audit entry elsewhere), which takes the victim out of the check, and runs
its node with code that deals wrong deltas for the victim only (a real
node process with a patch loaded at start). The other nodes add those
deltas to their shares; the check passes ("excluded": 1); finalize
destroys the old epoch: the victim's template rejoins shifted and the MACs
refuse it for ever (DATA_LOSS), while every other subject verifies.

`vaultctl refresh` must not switch to shares the check did not cover: it
rolls back when the nodes leave records out (naming how many), unless the
auditor explicitly accepts it (`--allow-unchecked`).
"""
from __future__ import annotations

import os
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
VICTIM = "s0004"

HOOK = '''
import os
_victim = os.environ.get("REDTEAM_BAD_DELTAS")
if _victim:
    import vault.proactive as _p
    _deal = _p.refresh_deltas
    def _bad(seed, keys, *args, **kwargs):
        out = _deal(seed, keys, *args, **kwargs)
        for i, (_tenant, subject) in enumerate(keys):
            if subject == _victim:
                out[i] = (out[i] + 1) % _p.P  # a sharing of a non-zero vector for the victim only
        return out
    _p.refresh_deltas = _bad
'''


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("attack-unchecked") / "cluster", dim=DIM, count=COUNT, seed=17)


def _decision(root, subject, probe) -> str:
    with MatcherClient.from_cluster_dir(root) as client:
        try:
            return client.verify(subject, probe).decision
        except grpc.RpcError as exc:
            return exc.code().name


def test_a_node_cannot_take_a_template_out_of_the_check_and_destroy_it(running, tmp_path):
    root, template = running["root"], running["templates"][VICTIM]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    cluster.stop_processes(root, ["bank-a"])
    with closing(sqlite3.connect(cluster.Paths(root).node_dir("bank-a") / "shares.db", isolation_level=None)) as conn:
        assert conn.execute("DELETE FROM shares WHERE subject = ?", (VICTIM,)).rowcount == 1
    saved = dict(os.environ)
    os.environ["REDTEAM_BAD_DELTAS"] = VICTIM
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), saved.get("PYTHONPATH", "")) if p)
    try:
        cluster.restart_node(root, "bank-a")  # the operator's own node, running its own code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert _decision(root, VICTIM, noisy_copy(template, 1)) == "MATCH"  # 2 of 3 shares left

    out = vaultctl("refresh", "--dir", root, "--format", "json", timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    error = json_out(out)["error"]
    assert "rolled back" in error["message"] and "1 record(s)" in error["message"], error
    assert _decision(root, VICTIM, noisy_copy(template, 2)) == "MATCH"
    other = running["templates"]["s0005"]
    assert _decision(root, "s0005", noisy_copy(other, 3)) == "MATCH"
