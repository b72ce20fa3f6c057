"""A node whose store is PostgreSQL, over real mTLS, while its database
server stops (a crash or a failover) and comes back: calls in between fail
closed with UNAVAILABLE (nothing released, nothing half-stored), and the
node serves again without its own restart, its audit chain whole."""
from __future__ import annotations

import pathlib

import grpc
import pytest

from node_kit import NodeHarness, Provider, sample_records
from shareholders import storage
from shareholders.audit_log import verify_database
from shareholders.config import load_config
from splitvault.v1 import shareholder_pb2 as pb

ACME = Provider.new("acme")


def release(node, subject):
    return node.stub("matcher").ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket(subject)), timeout=15)


def store(node, subjects):
    recs = sample_records("acme", list(subjects), index=1)
    node.stub("matcher").StoreShares(ACME.store_request(recs), timeout=15)
    return recs


def test_the_node_rides_out_a_restart_of_its_database_server(pg, pg_database, tmp_path, dev_pki):
    node = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME], extra=pg.store_toml(pg_database))
    node.start()
    try:
        recs = store(node, ["alice", "bob"])
        assert release(node, "alice").shares[0].values == recs[0].values
        pg.stop_server()
        try:
            for call in (lambda: release(node, "bob"), lambda: store(node, ["carol"])):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "Traceback" not in (err.value.details() or "")
        finally:
            pg.start_server()
        assert release(node, "bob").shares[0].values == recs[1].values
        carol = store(node, ["carol"])
        assert release(node, "carol").shares[0].values == carol[0].values
    finally:
        node.stop()
    report = verify_database(load_config(node.config_path, env={}).store, node.audit_public_key(), node="bank-a")
    assert report.ok, report.reason


def test_the_owner_migrates_once_and_the_node_runs_without_the_owners_dsn(pg, pg_database, tmp_path, dev_pki):
    """The deployment's init step (deploy/: `python -m shareholders --migrate`
    with the owner's DSN), then the node on a config that has only its own role's."""
    import json
    import subprocess
    import sys

    node = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME], extra=pg.store_toml(pg_database))
    migrate = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "shareholders", "--config", str(node.config_path), "--migrate"],
        cwd=pathlib.Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60)
    for found in (0, storage.SCHEMA_VERSION):  # a second run finds the schema current and changes nothing
        done = migrate()
        assert done.returncode == 0, done.stderr[-1500:]
        assert json.loads(done.stdout) == {"store": "migrated", "backend": "postgres", "from_version": found,
                                           "to_version": storage.SCHEMA_VERSION}
    with pg._psycopg.connect(pg.uri(pg_database)) as c:  # the owner owns every table; the node's role none
        owners = {r[0] for r in c.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall()}
    assert owners == {"sv_owner"}
    text = node.config_path.read_text()
    node.config_path.write_text("\n".join(x for x in text.splitlines() if not x.startswith("owner_dsn")) + "\n")
    node.start()
    try:
        recs = store(node, ["alice"])
        assert release(node, "alice").shares[0].values == recs[0].values
    finally:
        node.stop()
