"""Identify's confirmation (identify_confirm) over real processes (issue 12).

Attack: bank-b's operator runs its node with every opened match-bit
component of row 0 flipped (a test-only hook via sitecustomize, as in
tests/test_attack_reshare_dealer.py). The opened bits then name row 0 for an
impostor probe. With confirmation off (the stated limit) that is a wrong
MATCH; with it on the matcher rejoins row 0's template through Verify's
MAC-checked release under the query's IDENTIFY ticket and applies the cosine
rule: NO_MATCH (and a node naming other subjects for the candidates makes
the query DATA_LOSS). Near the threshold, Identify with confirmation decides as
Verify does, also where the integer screening rule says MATCH and the cosine
rule does not.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
from contextlib import closing

import grpc
import numpy as np
import pytest

from maintenance_kit import json_out, vaultctl
from vault import codec
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates

pytestmark = pytest.mark.e2e

DIM = 32
COUNT = 12
TAU = cluster.DEFAULT_MATCH_THRESHOLD
HOOK = '''
import os
if os.environ.get("LYING_BITS_HOOK"):
    import numpy as _np
    import vault.mpc as _m
    _honest = _m.Party.threshold_bits
    def _lying(self, *args, **kwargs):
        words = _np.frombuffer(_honest(self, *args, **kwargs), dtype="<u8").copy()
        words[0] ^= _np.uint64(1)  # flip this node's component of row 0's match bit
        return words.astype("<u8").tobytes()
    _m.Party.threshold_bits = _lying
if os.environ.get("LYING_SUBJECTS_HOOK"):
    import shareholders.identify as _i
    _honest_confirm = _i.IdentifyService._confirm
    def _lying_confirm(self, query, rows):
        out = _honest_confirm(self, query, rows)
        out.subjects[:] = [query.gallery.subjects[0]] * len(out.subjects)  # name row 0 for every candidate
        return out
    _i.IdentifyService._confirm = _lying_confirm
'''


def _start(root, confirm: bool) -> dict:
    cluster.up(root, dim=DIM, identify_confirm=confirm)
    templates = synthetic_templates(COUNT + 1, DIM, seed=29)
    named = {f"s{i:04d}": templates[i] for i in range(COUNT)}
    with MatcherClient.from_cluster_dir(root) as client:
        assert [r.code for r in client.enroll_many(named.items())] == [0] * COUNT
    return {"templates": named, "impostor": templates[COUNT]}


def _lie(root, tmp_path, name: str = "bank-b", hook: str = "LYING_BITS_HOOK") -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    cluster.stop_processes(root, [name])
    saved = dict(os.environ)
    os.environ.update({hook: "1", "PYTHONPATH": path})
    try:
        cluster.restart_node(root, name)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _audit(root, name: str, event: str) -> list[tuple[str, dict]]:
    db = cluster.Paths(root).node_dir(name) / "shares.db"
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [(s, json.loads(d)) for s, d in
                conn.execute("SELECT subject, details_json FROM audit_log WHERE event = ?", (event,))]


def _rules(template: np.ndarray, probe: np.ndarray) -> tuple[bool, bool, float]:
    # (integer screening rule s >= ceil(tau |q|^2), Verify's cosine rule, cosine) on the int8 codes.
    t, q = codec.encode(template, DIM)[0], codec.encode(probe, DIM)[0]
    s = int(t.astype(np.int64) @ q.astype(np.int64))
    cos = codec.cosine(q, t)
    return s >= math.ceil(TAU * int(q.astype(np.int64) @ q.astype(np.int64))), cos >= TAU, cos


def _near_threshold(templates: dict) -> list[tuple[str, np.ndarray, bool, bool]]:
    """One probe per subject with cosine within 0.06 of tau, the integer rule catching every cosine MATCH."""
    out = []
    for i, (subject, template) in enumerate(sorted(templates.items())):
        for seed in range(4000):
            probe = noisy_copy(template, 1000 * i + seed, sigma=0.13)
            integer, cosine, cos = _rules(template, probe)
            if abs(cos - TAU) < 0.06 and integer >= cosine:
                out.append((subject, probe, integer, cosine))
                break
    return out


def test_confirmation_stops_a_lying_nodes_wrong_match_and_follows_verify(tmp_path):
    root = tmp_path / "on"
    try:
        state = _start(root, confirm=True)
        templates = state["templates"]
        row0 = sorted(templates)[0]
        probes = _near_threshold({s: t for s, t in templates.items() if s != row0})
        # The test needs both kinds near the threshold, and one the integer rule alone gets wrong.
        assert any(c for _s, _p, _i, c in probes) and any(not c for _s, _p, _i, c in probes)
        assert any(i and not c for _s, _p, i, c in probes)
        with MatcherClient.from_cluster_dir(root) as client:
            for subject, probe, _integer, cosine in probes:
                got = client.identify(probe)
                want = client.verify(subject, probe).decision
                assert want == ("MATCH" if cosine else "NO_MATCH")
                assert (got.decision, got.subject) == ((want, subject) if want == "MATCH" else ("NO_MATCH", None))

            _lie(root, tmp_path)
            # The lie names row 0 for an impostor: confirmation rejoins it and the cosine rule says no.
            res = client.identify(state["impostor"])
            assert (res.decision, res.subject) == ("NO_MATCH", None)
            # A genuine probe still finds its subject (row 0 is a second candidate, confirmed away).
            genuine = sorted(templates)[5]
            res = client.identify(noisy_copy(templates[genuine], 7, sigma=0.02))
            assert (res.decision, res.subject) == ("MATCH", genuine)
            # What the lie can still do: hide row 0's own match (NO_MATCH, never another subject).
            res = client.identify(noisy_copy(templates[row0], 8, sigma=0.02))
            assert (res.decision, res.subject) == ("NO_MATCH", None)

            # A node naming other subjects for the candidates: DATA_LOSS, before any release.
            _lie(root, tmp_path, hook="LYING_SUBJECTS_HOOK")
            with pytest.raises(grpc.RpcError) as err:
                client.identify(noisy_copy(templates[genuine], 9, sigma=0.02))
            assert err.value.code() == grpc.StatusCode.DATA_LOSS

        # The confirmations are in every releasing node's log as releases under the query's ticket.
        releases = [(s, d) for name in cluster.load_spec(root).nodes for s, d in _audit(root, name, "release")
                    if d.get("identify_query")]
        assert row0 in {s for s, _ in releases}
        out = cluster_reconcile(root)
        assert out["unexplained_count"] == 0, out["unexplained"]
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


def test_without_confirmation_a_lying_node_makes_a_wrong_match(tmp_path):
    # The stated limit of identify_confirm = off: the matcher sees only bits, and trusts them.
    root = tmp_path / "off"
    try:
        state = _start(root, confirm=False)
        with MatcherClient.from_cluster_dir(root) as client:
            assert client.identify(state["impostor"]).decision == "NO_MATCH"
            _lie(root, tmp_path)
            res = client.identify(state["impostor"])
            assert (res.decision, res.subject) == ("MATCH", sorted(state["templates"])[0])
        releases = [d for name in cluster.load_spec(root).nodes for _s, d in _audit(root, name, "release")]
        assert not any(d.get("identify_query") for d in releases)
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


def cluster_reconcile(root) -> dict:
    out = vaultctl("audit", "reconcile", "--dir", root, "--format", "json", timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    return json_out(out)
