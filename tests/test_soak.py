"""The soak, short: ``bench/loadgen.py`` as its own process for 20 s at 100
verifications per second against a fresh local cluster (3 nodes, k = 2,
d = 512). Zero errors, zero wrong decisions, every request served, and no
process's resident memory growing by more than a generous bound after the
warm-up. The full 10-minute soak is a documented command whose last result
is in docs/reliability.md (``python -m bench.loadgen --duration 600``).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parent.parent
DURATION_S, RATE = 20, 100
# Generous: the replay sets hold every ticket for its 60 s lifetime, so
# memory still climbs a little in a run this short.
MAX_GROWTH_MB = 40


def test_short_soak(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--duration", str(DURATION_S), "--rate", str(RATE),
         "--sample-every", "1", "--workers", "32", "--dir", str(tmp_path / "cluster"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=DURATION_S + 240,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    doc = json.loads(out.read_text())
    s = doc["soak"]
    assert s["ok"] and s["completed"] == s["scheduled"] == DURATION_S * RATE
    assert s["errors_by_status"] == {}
    assert s["false_match"] == 0 and s["false_non_match"] == 0
    assert set(s["genuine"]) == {"MATCH"} and set(s["impostor"]) == {"NO_MATCH"}
    assert s["throughput_per_s"] >= 0.9 * RATE
    assert set(s["memory"]) == {"matcher", "bank-a", "bank-b", "bank-c", "loadgen"}
    for name, m in s["memory"].items():
        assert len(m["samples"]) >= DURATION_S // 2, name
        assert m["growth_after_warmup_mb"] < MAX_GROWTH_MB, (name, m["growth_after_warmup_mb"])
    # A bench.run results document too (docs/benchmarks.md renders it).
    assert doc["suite"] == "soak" and all({"name", "value", "unit", "ratio"} <= set(x) for x in doc["results"])
    # The cluster is gone.
    assert not any((tmp_path / "cluster").glob("**/pid"))
