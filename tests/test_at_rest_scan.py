"""Nothing whole at rest, on a real local cluster (``vaultctl cluster up``:
three node processes and the matcher, metrics served on their ports).

The whole story runs -- enrol, verify (genuine and impostor probes), a
proactive refresh (``vaultctl refresh``), a KEK rotation at one node
(``vaultctl rotate kek``) and the erasure of subjects -- and then every
file the cluster wrote (databases, WAL and shared-memory files, logs,
configs, session state) and the metrics pages fetched from every process
are scanned for every enrolled template and every probe sent, as float32,
int8-quantised and field-encoded bytes (``vaultctl.demo``'s scanner).

Erasure and refresh are checked at the byte level: the sealed share of a
deleted subject (each node's ciphertext and wrapped data key, captured
before the delete) and the sealed shares of the epoch a refresh replaced
must be gone from every database file -- main file, WAL and free pages --
as soon as the operation has returned, while the nodes still run.
"""
from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, scan_for_vectors, synthetic_templates, template_encodings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parent.parent
DIM = 128
WINDOW = 32


def vaultctl(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "vaultctl", *map(str, args), "--format", "json"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def sealed(root: pathlib.Path, subjects: list[str], epoch: int | None = None) -> dict[str, list[bytes]]:
    """Every node's sealed bytes (ciphertext, wrapped data key) of the subjects' rows."""
    out = {}
    for node in cluster.load_spec(root).nodes:
        conn = sqlite3.connect(f"file:{cluster.Paths(root).node_dir(node) / 'shares.db'}?mode=ro", uri=True)
        try:
            marks = ",".join("?" * len(subjects))
            sql = f"SELECT ciphertext, wrapped_dk FROM shares WHERE subject IN ({marks})"
            args = list(subjects)
            if epoch is not None:
                sql += " AND epoch = ?"
                args.append(epoch)
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.close()
        out[node] = [bytes(b) for row in rows for b in row]
    return out


def windows(blobs: list[bytes]) -> set[bytes]:
    return {b[i:i + WINDOW] for b in blobs for i in range(0, len(b) - WINDOW + 1, WINDOW)}


def found_in_databases(root: pathlib.Path, needles: set[bytes]) -> list[tuple[str, int]]:
    """(file, offset) of any needle in any node's database files (main, -wal, -shm)."""
    hits = []
    for node in cluster.load_spec(root).nodes:
        for path in sorted(cluster.Paths(root).node_dir(node).glob("shares.db*")):
            data = path.read_bytes()
            for needle in needles:
                at = data.find(needle)
                if at >= 0:
                    hits.append((str(path), at))
    return hits


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    root = tmp_path_factory.mktemp("at-rest") / "cluster"
    cluster.up(root, dim=DIM)
    try:
        yield root
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


def test_nothing_whole_at_rest_and_erasure_reaches_every_byte(story):
    root = story
    templates = synthetic_templates(24, DIM, seed=41)
    subjects = [f"subject-{i:03d}" for i in range(len(templates))]
    probes = [noisy_copy(templates[i], seed=100 + i) for i in range(8)]
    impostors = synthetic_templates(4, DIM, seed=42)
    with MatcherClient.from_cluster_dir(root) as client:
        replies = list(client.enroll_many(zip(subjects, templates)))
        assert [r.code for r in replies] == [0] * len(subjects)
        for i, probe in enumerate(probes):
            assert client.verify(subjects[i], probe).decision == "MATCH"
        for i, probe in enumerate(impostors):
            assert client.verify(subjects[10 + i], probe).decision == "NO_MATCH"

    # A proactive refresh: every subject moves to epoch 2; epoch 1's sealed
    # shares must be destroyed, not just unlinked.
    epoch1 = sealed(root, subjects, epoch=1)
    assert all(len(v) == 2 * len(subjects) for v in epoch1.values())
    vaultctl("refresh", "--dir", root, "--drain", "0")
    assert found_in_databases(root, windows([b for v in epoch1.values() for b in v])) == []
    # A KEK rotation at one node re-wraps every data key; the old wrapped keys go too.
    old_wrapped = [b for b in sealed(root, subjects)["bank-a"] if len(b) < 100]
    vaultctl("rotate", "kek", "--dir", root, "--node", "bank-a")
    assert found_in_databases(root, windows(old_wrapped)) == []

    # Erasure: a customer asks to be forgotten.
    erased = subjects[:3]
    before = sealed(root, erased)
    assert all(len(v) == 2 * len(erased) for v in before.values())
    needles = windows([b for v in before.values() for b in v])
    assert found_in_databases(root, needles)          # counter-check: the search sees them while they exist
    with MatcherClient.from_cluster_dir(root) as client:
        for subject in erased:
            assert client.delete(subject).complete
        # Still in service after all that: the others verify.
        assert client.verify(subjects[5], probes[5]).decision == "MATCH"
    # While the nodes still run (the WAL live), and again after a clean stop.
    assert found_in_databases(root, needles) == [], "erased shares still readable in a database file"

    # Metrics, as a scraper would store them.
    info = cluster.status(root)
    scraped = root.parent / "scraped-metrics"
    scraped.mkdir()
    for proc in [info["matcher"], *info["shareholders"]]:
        assert proc["metrics_port"], proc
        page = urllib.request.urlopen(f"http://127.0.0.1:{proc['metrics_port']}/metrics", timeout=10).read()
        (scraped / f"{proc['name']}.prom").write_bytes(page)
    # Every file the cluster wrote, and the metrics: no template, no probe,
    # in any of its at-rest forms; while running (live WAL and shared
    # memory) and after a clean stop.
    forms = template_encodings(np.concatenate([templates, np.stack(probes), impostors]), DIM)
    for running in (True, False):
        if not running:
            cluster.down(root)
            assert found_in_databases(root, needles) == []
        files = cluster.cluster_files(root) + sorted(scraped.iterdir())
        names = {p.name for p in files}
        assert {"shares.db", "node.log", "matcher.log", "matcher.prom", "bank-a.prom"} <= names, names
        if running:
            assert "shares.db-wal" in names
        report = scan_for_vectors(files, forms, window=WINDOW)
        assert report.files == len(files) and report.bytes > 100_000
        assert report.hits == [], report.hits[:5]
    # Counter-check: the scanner does find a planted template.
    planted = root.parent / "planted.bin"
    planted.write_bytes(b"\x00" * 13 + forms[7][:64] + b"\x00" * 9)
    assert scan_for_vectors([planted], forms, window=WINDOW).hits
