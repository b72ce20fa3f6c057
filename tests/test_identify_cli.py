"""`vaultctl identify` as a user runs it: a real local cluster, exit codes and JSON."""
from __future__ import annotations

import numpy as np
import pytest

from test_cli_e2e import json_out, vaultctl
from vaultctl import cluster
from vaultctl.demo import noisy_copy, synthetic_templates

pytestmark = pytest.mark.e2e

DIM = 128


def test_identify_command(tmp_path):
    root = tmp_path / "cluster"
    t = synthetic_templates(4, DIM, seed=31)
    for i, name in enumerate(("alice", "bob", "carol")):
        np.save(tmp_path / f"{name}.npy", t[i])
    np.save(tmp_path / "alice-probe.npy", noisy_copy(t[0], seed=32))
    np.save(tmp_path / "stranger.npy", t[3])
    try:
        cluster.up(root, dim=DIM)
        for name in ("alice", "bob", "carol"):
            r = vaultctl("enroll", "--dir", root, "--subject", name, "--template", tmp_path / f"{name}.npy")
            assert r.returncode == 0, r.stderr
        r = vaultctl("identify", "--dir", root, "--probe", tmp_path / "alice-probe.npy", "--format", "json")
        assert r.returncode == 0, r.stderr
        body = json_out(r)
        assert body["decision"] == "MATCH" and body["subject"] == "alice" and body["decision_id"]
        r = vaultctl("identify", "--dir", root, "--probe", tmp_path / "stranger.npy", "--format", "json")
        assert r.returncode == 0, r.stderr
        assert json_out(r)["decision"] == "NO_MATCH" and json_out(r)["subject"] is None
        r = vaultctl("identify", "--dir", root, "--probe", tmp_path / "alice-probe.npy")
        assert r.returncode == 0 and r.stdout.startswith("MATCH alice")
        # alice was enrolled under no group: a search of group store-1 does not see her.
        r = vaultctl("identify", "--dir", root, "--probe", tmp_path / "alice-probe.npy", "--group", "store-1",
                     "--format", "json")
        assert r.returncode == 0, r.stderr
        assert json_out(r)["decision"] == "NO_MATCH"
        r = vaultctl("identify", "--dir", root, "--probe", tmp_path / "alice-probe.npy", "--group", "x" * 65)
        assert r.returncode == 1 and "64 bytes" in r.stderr
        # Every node logged each query once, under a provider-signed IDENTIFY ticket.
        r = vaultctl("audit", "reconcile", "--dir", root, "--format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        body = json_out(r)
        assert body["identifications"] == 4 and body["identifications_by_nodes"] == {"3": 4}
        assert body["unexplained_count"] == 0
        # The nodes' galleries follow a proactive refresh (new epoch, new shares) and a KEK rotation.
        for command in (("refresh", "--dir", root), ("rotate", "kek", "--dir", root, "--node", "bank-a")):
            r = vaultctl(*command, "--format", "json", timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            r = vaultctl("identify", "--dir", root, "--probe", tmp_path / "alice-probe.npy", "--format", "json")
            assert r.returncode == 0, r.stderr
            assert (json_out(r)["decision"], json_out(r)["subject"]) == ("MATCH", "alice"), command
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)
