"""Generate tests/vectors/sharing.json: known-answer vectors for vault.sharing.

Run from the repository root: ``.venv/bin/python tools/gen_vectors.py``.
Randomness comes from tests/seeded_rng.py (SHAKE-256 of a fixed seed)
patched into ``vault.rng.RANDOM_BYTES``, so the output is reproducible; the
test suite checks that split() with the same seed gives exactly these shares.
Negative vectors record the exception each bad input must raise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from seeded_rng import SeededBytes  # noqa: E402

from vault import errors, integrity, rng, sharing  # noqa: E402
from vault.field import P  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "sharing.json"

# (name, k, n, secrets as B x m lists)
POSITIVE = [
    ("2-of-2, one element", 2, 2, [[42]]),
    ("2-of-3, small vector", 2, 3, [[0, 1, 2, 127, P - 127, P - 1]]),
    ("3-of-5, batch of two", 3, 5, [[7, 0, 123456789], [P - 1, 1, 2**30]]),
    ("4-of-7, int8 codes", 4, 7, [[1, P - 1, 127, P - 127, 0]]),
    ("5-of-9, one element", 5, 9, [[1234567890]]),
]

NEGATIVE = [
    {
        "name": "duplicate x-coordinate",
        "op": "reconstruct",
        "xs": [1, 1],
        "ys": [[[5]], [[6]]],
        "error": "InvalidShares",
    },
    {"name": "x-coordinate zero", "op": "reconstruct", "xs": [0, 1], "ys": [[[5]], [[6]]], "error": "InvalidShares"},
    {"name": "x-coordinate P", "op": "reconstruct", "xs": [1, P], "ys": [[[5]], [[6]]], "error": "InvalidShares"},
    {"name": "too few shares", "op": "reconstruct", "xs": [1], "ys": [[[5]]], "error": "InvalidShares"},
    {"name": "share value outside the field", "op": "reconstruct", "xs": [1, 2], "ys": [[[P]], [[6]]], "error": "InvalidShares"},
    {"name": "shares of different shapes", "op": "reconstruct", "xs": [1, 2], "ys": [[[5, 6]], [[6]]], "error": "InvalidShares"},
    {"name": "secret outside the field", "op": "split", "secrets": [[P]], "threshold": 2, "shareholders": 3, "error": "InvalidShares"},
    {"name": "threshold 1", "op": "split", "secrets": [[1]], "threshold": 1, "shareholders": 3, "error": "InvalidShares"},
    {"name": "threshold above n", "op": "split", "secrets": [[1]], "threshold": 4, "shareholders": 3, "error": "InvalidShares"},
    {"name": "too many shareholders", "op": "split", "secrets": [[1]], "threshold": 2, "shareholders": 256, "error": "InvalidShares"},
]


def _seeded(name: str) -> SeededBytes:
    # One seed per vector, derived from its name.
    return SeededBytes(name.encode("utf-8"))


def main() -> None:
    positive = []
    for name, k, n, secrets in POSITIVE:
        rng.RANDOM_BYTES = _seeded(name)
        shares = sharing.split(np.array(secrets, dtype=np.uint32), k, n)
        positive.append(
            {
                "name": name,
                "seed": name,
                "threshold": k,
                "shareholders": n,
                "secrets": secrets,
                "shares": shares.tolist(),
            }
        )
    mac_name = "integrity, d=6"
    template = [[1, 2, 3, P - 1, P - 127, 127]]
    rng.RANDOM_BYTES = _seeded(mac_name)
    extended = integrity.extend(np.array(template, dtype=np.uint32))
    for case in NEGATIVE:
        if case["op"] == "reconstruct":
            call = lambda: sharing.reconstruct(case["xs"], [np.array(y, dtype=np.int64) for y in case["ys"]])  # noqa: E731
        else:
            call = lambda: sharing.split(np.array(case["secrets"], dtype=np.int64), case["threshold"], case["shareholders"])  # noqa: E731
        try:
            call()
        except errors.VaultError as exc:
            assert type(exc).__name__ == case["error"], (case, exc)
        else:
            raise AssertionError(f"negative vector did not fail: {case['name']}")
    doc = {
        "description": "Known answers for vault.sharing (Shamir over GF(2**31 - 1)). "
        "RANDOM_BYTES is the SHAKE-256 stream of tests/seeded_rng.py seeded with the UTF-8 'seed'. "
        "shares[i] belongs to x = i + 1.",
        "p": P,
        "positive": positive,
        "integrity": [{"name": mac_name, "seed": mac_name, "template": template, "extended": extended.tolist()}],
        "negative": NEGATIVE,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
