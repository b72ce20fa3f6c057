"""Identify's per-query gallery check at one node, before and after schema 8.

    python -m bench.gallery_check [--postgres] [rows ...]

A node store (a SQLite file; with --postgres, a database of the tests'
PostgreSQL server, tests/pg_kit.py, as the node's role under RLS) of ``rows`` share rows of one tenant (512-d sized
sealed rows, fresh nonces) and a cached gallery of them; then per query
``Galleries.get`` on the unchanged gallery: the listing path (what every
query did before schema 8: ``tenant_row_versions`` and a compare) and the
counter path (``share_version``: one row). Prints the median of 20 of each.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np

from shareholders import identify, storage

D = 512


def measure(rows: int, path) -> tuple[float, float]:
    storage.migrate(path)
    db = storage.connect(path)
    blob = os.urandom(4 * (D + 4) + 16)
    with db.transaction():
        for start in range(0, rows, 5000):
            db.insert_shares(storage.ShareRow("acme", f"s{i:07d}", 1, 1, 2, 3, D, 1, 4, f"r{i}", 1, os.urandom(40),
                                              os.urandom(12), blob, 0) for i in range(start, min(rows, start + 5000)))
    sh = types.SimpleNamespace(serving_epoch=1)
    galleries = identify.Galleries()
    listed = db.tenant_row_versions("acme", D, 1)
    subjects = tuple(r[0] for r in listed)
    versions = tuple((r[1], r[2], r[3]) for r in listed)
    # values are never read on the unchanged path: an empty array stands in for (G, d) float64
    galleries._cache[("acme", D, "")] = identify.Gallery(subjects, versions, np.empty((rows, 0)), 2, b"", listed,
                                                        db.share_version("acme"), 1)
    key = ("acme", D, "")

    def timed(force_listing: bool) -> float:
        times = []
        for _ in range(20):
            if force_listing:
                g = galleries._cache[key]
                galleries._cache[key] = identify.Gallery(g.subjects, g.versions, g.values, g.threshold, g.digest,
                                                         g.listed, -1, g.epoch)
            t = time.perf_counter()
            galleries.get(sh, db, "acme", D)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000

    try:
        return timed(True), timed(False)
    finally:
        db.close()


def main(argv: list[str]) -> int:
    postgres = "--postgres" in argv
    sizes = [int(a) for a in argv if a != "--postgres"] or [20_000, 100_000]
    pg = None
    if postgres:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        import pg_kit

        pg = pg_kit.server()
    try:
        with tempfile.TemporaryDirectory() as where:
            for rows in sizes:
                path = pg.location(pg.new_database()) if pg else os.path.join(where, f"node-{rows}.db")
                listing, counter = measure(rows, path)
                print(f"{'postgres' if pg else 'sqlite'} rows={rows}: listing {listing:.1f} ms/query, "
                      f"counter {counter:.3f} ms/query")
    finally:
        if pg:
            pg_kit.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
