"""The checked-in stubs in splitvault/v1 are exactly what proto/ generates."""
from __future__ import annotations

import filecmp
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gen_proto  # noqa: E402


def test_generated_code_matches_proto(tmp_path):
    gen_proto.generate(tmp_path)
    fresh = tmp_path / "splitvault" / "v1"
    checked_in = ROOT / "splitvault" / "v1"
    names = sorted(p.name for p in fresh.glob("*.py*"))
    assert names == sorted(p.name for p in checked_in.glob("*.py*") if p.suffix in (".py", ".pyi")), (
        "splitvault/v1 has different files than proto/ generates; run `make proto`."
    )
    stale = [n for n in names if not filecmp.cmp(fresh / n, checked_in / n, shallow=False)]
    assert not stale, f"Stale generated code {stale}; run `make proto` and commit."
