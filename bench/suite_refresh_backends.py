"""Benchmark: proactive refresh of one gallery on both node stores, in one
run: a local cluster (3 shareholder nodes, threshold 2, a matcher, each its
own process on loopback over mutual TLS, 512-d templates) with its nodes on
SQLite, then the same cluster with ``--backend postgres`` (the cluster's own
PostgreSQL 16 server from the pgserver wheel, one database and role pair per
node, Unix socket, the node's role bound by row-level security,
synchronous_commit on).

Each cluster is loaded with the same ``TEMPLATES`` templates (100,000;
2,000 in a quick run) through the bulk enrolment stream, then refreshed
once by ``vaultctl refresh --drain 0`` in its own process, timed end to end
as suite_refresh times it (begin, dealing and prepare, the check, commit,
finalize with the erasure of the old epoch).

- ``refresh_s_postgres``: the whole refresh with the nodes on PostgreSQL,
  against the same refresh with the nodes on SQLite in the same run;
- ``refresh_prepare_s_postgres``, ``refresh_check_s_postgres``,
  ``refresh_finalize_s_postgres``: the phases, each against SQLite's.

Every phase of both runs, the bulk enrolment rate and the node processes'
CPU seconds over the refresh (``node_cpu_s``; PostgreSQL's own server
processes are not in it) are in ``params``. On this shared 2-core machine
the servers, the database, the CLI and the client share the cores: compare
the ratio, not the absolute figures.
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

from bench.suite_refresh import DIM, _node_cpu_s, _vaultctl

SUITE = "refresh_backends"
# Gallery size of a full run (a module attribute, so a test can shrink it).
TEMPLATES = 100_000
QUICK_TEMPLATES = 2_000
PHASES = ("prepare_s", "check_s", "finalize_s")
_UNAVAILABLE = 14  # grpc.StatusCode.UNAVAILABLE


def _refresh_once(root: pathlib.Path, templates, count: int, postgres: str | None) -> dict:
    """Bring a cluster up, enrol ``count`` templates, refresh once; its figures."""
    from vaultctl import cluster
    from vaultctl.client import MatcherClient

    cluster.up(root, dim=DIM, postgres=postgres)
    try:
        t0 = time.perf_counter()
        todo, retried = list(range(count)), 0
        with MatcherClient.from_cluster_dir(root) as client:
            # Only loading the gallery: a batch that timed out on the busy
            # machine stored nothing (the matcher says so, UNAVAILABLE) and is
            # enrolled again, as a provider would, up to three times.
            for attempt in range(4):
                replies = list(client.enroll_many((f"s{i:06d}", templates[i % len(templates)]) for i in todo))
                if any(r.code not in (0, _UNAVAILABLE) for r in replies):
                    raise RuntimeError("An enrolment was refused.")
                todo = [i for i, r in zip(todo, replies) if r.code == _UNAVAILABLE]
                if not todo:
                    break
                retried += len(todo)
        enrol_per_s = count / (time.perf_counter() - t0)
        if todo:
            raise RuntimeError(f"{len(todo)} enrolments still failed after three retries.")
        cpu0 = _node_cpu_s(root)
        refresh = _vaultctl("refresh", "--dir", root, "--drain", "0")
        node_cpu = _node_cpu_s(root) - cpu0
        if refresh.get("state") != "finalized" or set(refresh["records"].values()) != {count}:
            raise RuntimeError(f"The refresh did not renew every record at every node: {refresh.get('records')}.")
        return {"timings": refresh["timings"], "enrol_per_s": round(enrol_per_s), "node_cpu_s": round(node_cpu, 1),
                "enrol_retried": retried}
    finally:
        cluster.down(root)


def run(quick: bool) -> list[dict]:
    from vaultctl.demo import synthetic_templates

    count = QUICK_TEMPLATES if quick else TEMPLATES
    templates = synthetic_templates(min(count, 20_000), DIM, seed=2024)  # reused beyond (subjects stay distinct)
    with tempfile.TemporaryDirectory(prefix="splitvault-bench-backends-") as tmp:
        top = pathlib.Path(tmp)
        top.chmod(0o755)  # as root, the PostgreSQL server runs as its own user and must reach its data
        sqlite = _refresh_once(top / "sqlite", templates, count, None)
        postgres = _refresh_once(top / "postgres", templates, count, "local")
    base = {"templates": count, "dim": DIM, "nodes": 3, "threshold": 2}
    params = {**base,
              **{f"sqlite_{k}": round(v, 2) for k, v in sqlite["timings"].items()},
              **{f"postgres_{k}": round(v, 2) for k, v in postgres["timings"].items()},
              "sqlite_enrol_per_s": sqlite["enrol_per_s"], "postgres_enrol_per_s": postgres["enrol_per_s"],
              "sqlite_node_cpu_s": sqlite["node_cpu_s"], "postgres_node_cpu_s": postgres["node_cpu_s"],
              "sqlite_enrol_retried": sqlite["enrol_retried"], "postgres_enrol_retried": postgres["enrol_retried"],
              "store": "postgres 16 (pgserver, the cluster's own), unix socket, synchronous_commit on"}
    results = [_result("refresh_s_postgres", params, postgres["timings"]["total_s"],
                       "the same refresh on SQLite, same run", sqlite["timings"]["total_s"])]
    for phase in PHASES:
        name = phase.removesuffix("_s")
        results.append(_result(f"refresh_{name}_s_postgres", base, postgres["timings"][phase],
                               f"the {name} phase on SQLite, same run", sqlite["timings"][phase]))
    return results


def _result(name: str, params: dict, value: float, baseline: str, baseline_value: float) -> dict:
    return {
        "suite": SUITE, "name": name, "params": params, "value": round(value, 3), "unit": "s",
        "baseline": baseline, "baseline_value": round(baseline_value, 3),
        "ratio": round(value / baseline_value, 3) if baseline_value else None, "higher_is_better": False,
    }


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(json.dumps(r))
