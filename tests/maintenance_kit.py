"""Helpers shared by the refresh and reshare tests (tests/test_refresh_*.py,
tests/test_reshare_*.py): raw share releases as the matcher would do them,
reading a node's database, running vaultctl as a real process, and checking
that every enrolled template still verifies."""
from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import sys
import uuid

import grpc
import numpy as np

from node_kit import CLUSTER_ID
from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from vault import record
from vault.pki import Identity
from vaultrpc import wire
from vaultrpc.tls import secure_channel

ROOT = pathlib.Path(__file__).resolve().parent.parent


def release(address: str, matcher_tls, tenant_key, key_id: str, tenant: str, subject: str, probe,
            audience: str = CLUSTER_ID, *, node: str) -> list:
    """A node's (share record, MAC key share) pairs of one subject, released for a freshly signed ticket (as the matcher asks)."""
    signed = wire.issue_ticket(tenant_key, key_id, tenant=tenant, subject=subject, request_id=str(uuid.uuid4()),
                               probe=np.asarray(probe, dtype=np.float32), audience=audience)
    channel = secure_channel(address, matcher_tls, expect=Identity("shareholder", node))
    try:
        reply = shareholder_pb2_grpc.ShareholderStub(channel).ReleaseShare(
            shareholder_pb2.ReleaseShareRequest(ticket=signed), timeout=10)
        # Each share with the node's MAC key share of its epoch (what record.join takes).
        keys = {k.epoch: k for k in reply.mac_keys}
        return [(s, keys.get(s.epoch)) for s in reply.shares]
    finally:
        channel.close()


def epochs_held(db: pathlib.Path) -> dict[int, int]:
    """epoch -> number of share rows, read straight from a node's database."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT epoch, COUNT(*) FROM shares GROUP BY epoch").fetchall())
    finally:
        conn.close()


def prepared_rows(db: pathlib.Path) -> int:
    """Rows of an epoch the node does not serve yet (prepared by an open session)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM shares WHERE epoch > (SELECT current_epoch FROM node_state WHERE id = 1)").fetchone()[0]
    finally:
        conn.close()


def vaultctl(*args, fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run vaultctl ARGS; with ``fault`` (``<phase>:<count>:<action>``)
    through the test-only entry point tests/crash_cli.py that crashes there."""
    entry = [str(ROOT / "tests" / "crash_cli.py"), fault] if fault else ["-m", "vaultctl"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def json_out(result: subprocess.CompletedProcess) -> dict:
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output (exit {result.returncode}); stderr: {result.stderr[-2000:]}"
    return json.loads(lines[-1])


def verify_all(client, templates: dict[str, np.ndarray], subjects, impostor: np.ndarray, noise_seed: int = 0) -> None:
    """Genuine probe -> MATCH, impostor -> NO_MATCH for every named subject."""
    from vaultctl.demo import noisy_copy

    for i, s in enumerate(subjects):
        genuine = client.verify(s, noisy_copy(templates[s], seed=noise_seed + i))
        assert genuine.decision == "MATCH", (s, genuine)
        other = client.verify(s, impostor)
        assert other.decision == "NO_MATCH", (s, other)


def rpc_code(exc: grpc.RpcError):
    return exc.code()


def enrolled_cluster(root: pathlib.Path, *, dim: int, count: int, seed: int, postgres: str | None = None):
    """Start a local cluster in ``root`` with ``count`` enrolled synthetic
    templates (the nodes' stores on the PostgreSQL server ``postgres`` names,
    if given); yield the test state, stop the cluster afterwards."""
    from vaultctl import cluster
    from vaultctl.client import MatcherClient
    from vaultctl.demo import synthetic_templates

    try:
        cluster.up(root, dim=dim, postgres=postgres)
        templates = synthetic_templates(count + 1, dim, seed=seed)
        named = {f"s{i:04d}": templates[i] for i in range(count)}
        with MatcherClient.from_cluster_dir(root) as client:
            for reply in client.enroll_many(named.items()):
                assert reply.code == 0, reply
        yield {"root": root, "templates": named, "impostor": templates[count], "epoch": 1, "next": 0,
               "count": count}
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


def fresh_subjects(state: dict, count: int = 4) -> list[str]:
    """Subjects not verified before in this module: every node limits attempts per subject."""
    start = state["next"]
    state["next"] = start + count
    return [f"s{(start + i) * 7 % state['count']:04d}" for i in range(count)]


def join_pairs(*pairs):
    """record.join of released (share, key share) message pairs, parsed as the matcher does."""
    return record.join([wire.share(s) for s, _ in pairs], [wire.key_share(k) for _, k in pairs])


def decisions(root: pathlib.Path, templates: dict[str, np.ndarray], noise: int) -> dict[str, str]:
    """Verify of a noisy copy of every template: subject -> decision, or the
    status code's name when the call fails."""
    from vaultctl.client import MatcherClient
    from vaultctl.demo import noisy_copy

    out = {}
    with MatcherClient.from_cluster_dir(root) as client:
        for subject, template in templates.items():
            try:
                out[subject] = client.verify(subject, noisy_copy(template, noise)).decision
            except grpc.RpcError as exc:
                out[subject] = exc.code().name
    return out


def restart_with(root: pathlib.Path, name: str, env: dict[str, str]) -> None:
    """Stop one node and start it again with ``env`` added to its environment."""
    import os

    from vaultctl import cluster

    cluster.stop_processes(root, [name])
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        cluster.restart_node(root, name)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def hook_env(folder: pathlib.Path, sitecustomize: str, **switches: str) -> dict[str, str]:
    """The environment of a node that runs ``sitecustomize`` at start (a test-only
    hook in ``folder``), with ``switches`` set."""
    import os

    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(sitecustomize)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**switches, "PYTHONPATH": path}


def audit_details(root: pathlib.Path, name: str, event: str) -> list[dict]:
    """The details of every audit entry ``event`` of one node of a local cluster (read-only)."""
    from vaultctl import cluster

    db = cluster.Paths(root).node_dir(name) / "shares.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [json.loads(d) for (d,) in conn.execute("SELECT details_json FROM audit_log WHERE event = ?", (event,))]
    finally:
        conn.close()
