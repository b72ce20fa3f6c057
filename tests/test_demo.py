"""`make demo` end to end, and the at-rest scan that closes it."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vaultctl import cluster, demo

SUBJECTS = 200
SEED = 11


def _live_processes_mentioning(path: pathlib.Path) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_scan_finds_a_planted_template(tmp_path):
    """The scan is not vacuous: any 32-byte window of any form, at any offset, is found."""
    templates = demo.synthetic_templates(5, 512, seed=1)
    forms = demo.template_encodings(templates, 512)
    clean = tmp_path / "clean.bin"
    clean.write_bytes(os.urandom(200_000))
    assert demo.scan_for_vectors([clean], forms).hits == []
    for k, (form, offset) in enumerate([(forms[0], 1001), (forms[4], 77), (forms[8], 3)]):
        blob = bytearray(os.urandom(10_000))
        blob[offset:offset + 70] = form[64:134]  # float32, int8 and field forms
        dirty = tmp_path / f"dirty{k}.bin"
        dirty.write_bytes(bytes(blob))
        assert demo.scan_for_vectors([dirty], forms).hits, f"form {k} not found"


@pytest.mark.e2e
def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path):
    root = tmp_path / "demo-cluster"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "vaultctl.demo", "--dir", str(root), "--subjects", str(SUBJECTS), "--seed", str(SEED)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if (root / "cluster.json").exists() and _live_processes_mentioning(root.resolve()):
            cluster.down(root)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for expected in ("MATCH", "NO_MATCH", "UNAVAILABLE", "release", "no template found in"):
        assert expected in out, out
    assert "FAIL" not in out and "Traceback" not in run.stderr
    assert _live_processes_mentioning(root.resolve()) == []
    assert not list(root.rglob("ready.json"))

    # Independently of the demo's own check: nothing it enrolled or sent is
    # anywhere under the cluster dir, in any at-rest form.
    templates, genuine, impostor, _ = demo.story_vectors(SUBJECTS, 512, SEED)
    forms = demo.template_encodings(np.vstack([templates, genuine, impostor]), 512)
    files = cluster.cluster_files(root)
    assert any(f.name.startswith("shares.db") for f in files)
    report = demo.scan_for_vectors(files, forms)
    assert report.files == len(files) and report.hits == []
