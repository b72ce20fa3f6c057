"""A node whose store is PostgreSQL, over real mTLS, while its database
server stops (a crash or a failover) and comes back: calls in between fail
closed with UNAVAILABLE (nothing released, nothing half-stored), and the
node serves again without its own restart, its audit chain whole."""
from __future__ import annotations

import grpc
import pytest

from node_kit import NodeHarness, Provider, sample_records
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
