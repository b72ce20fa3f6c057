"""The payment provider's client (vaultctl.client.MatcherClient) against a
real matcher and real nodes in-process."""
from __future__ import annotations

import json
import shutil
import uuid

import grpc
import numpy as np
import pytest

from node_kit import CLUSTER_ID
from matcher_kit import Committee, Tenant, noisy, unit
from vault import pki
from vaultctl.client import MatcherClient, VerifyResult


@pytest.fixture(scope="module")
def committee(dev_pki, tmp_path_factory):
    c = Committee(dev_pki, tmp_path_factory.mktemp("client"), tenants=[Tenant("demo-psp"), Tenant("acme")])
    c.start_matcher()
    yield c
    c.close()


def cluster_dir(c: Committee, root, tenant: str = "demo-psp"):
    """The layout of docs/contracts.md, pointing at the in-process matcher."""
    (root / "matcher").mkdir(parents=True)
    (root / "matcher" / "ready.json").write_text(json.dumps({"name": "matcher", "address": f"127.0.0.1:{c.matcher.port}"}))
    files = c.pki.files("psp", tenant)
    (root / "pki").mkdir()
    shutil.copy(files.ca, root / "pki" / "ca.pem")
    shutil.copy(files.cert, root / "pki" / f"psp-{tenant}.pem")
    shutil.copy(files.key, root / "pki" / f"psp-{tenant}.key")
    (root / "psp").mkdir()
    from cryptography.hazmat.primitives import serialization

    pem = c.tenants[tenant].key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (root / "psp" / f"{tenant}.ticket.key").write_bytes(pem)
    (root / "psp" / "cluster_id").write_text(CLUSTER_ID + "\n")
    return root


def test_from_cluster_dir_round_trip(committee, tmp_path):
    rng = np.random.default_rng(1)
    root = cluster_dir(committee, tmp_path / "D")
    template = unit(rng)
    with MatcherClient.from_cluster_dir(root) as client:
        assert client.tenant == "demo-psp" and client.key_id == "demo-psp-1"
        reply = client.enroll("carol", template.tolist())  # any sequence of numbers
        assert uuid.UUID(reply.request_id)  # a fresh uuid4 by default
        result = client.verify("carol", noisy(template, rng))
        assert isinstance(result, VerifyResult) and result.decision == "MATCH" and result.matched
        assert result.score is None and uuid.UUID(result.decision_id)
        assert client.verify("carol", unit(rng)).decision == "NO_MATCH"
        assert client.delete("carol").complete


def test_from_cluster_dir_signs_for_its_cluster(committee, tmp_path):
    # The provider's material names the cluster: a client holding another
    # cluster's id signs tickets this one refuses, for writes and verifications.
    rng = np.random.default_rng(3)
    root = cluster_dir(committee, tmp_path / "D")
    (root / "psp" / "cluster_id").write_text("another-cluster\n")
    with MatcherClient.from_cluster_dir(root) as client:
        assert client.cluster_id == "another-cluster"
        for call in (lambda: client.enroll("erin", unit(rng)), lambda: client.delete("erin"),
                     lambda: client.verify("erin", unit(rng))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "another cluster" in err.value.details()


def test_from_cluster_dir_without_a_running_matcher(tmp_path):
    with pytest.raises(ValueError, match="cluster up"):
        MatcherClient.from_cluster_dir(tmp_path)


def test_errors_surface_as_rpc_errors(committee):
    t = committee.tenants["acme"]
    client = committee.client("acme")
    with pytest.raises(grpc.RpcError) as err:
        client.verify("nobody", np.ones(128, dtype=np.float32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.enroll("short", np.ones(3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A ticket key the matcher does not know: refused, not matched.
    wrong = MatcherClient(f"127.0.0.1:{committee.matcher.port}", committee.pki.tls("psp", "acme"), tenant="acme",
                          ticket_key=pki.load_signing_key(pki.new_signing_key()[0]), key_id=t.key_id,
                          cluster_id=CLUSTER_ID, matcher="matcher")
    with wrong, pytest.raises(grpc.RpcError) as err:
        wrong.verify("nobody", np.ones(128, dtype=np.float32))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_explicit_request_ids_make_retries_idempotent(committee):
    rng = np.random.default_rng(2)
    client = committee.client("acme")
    template = unit(rng)
    assert not client.enroll("dave", template, request_id="enrol-dave").already_enrolled
    assert client.enroll("dave", template, request_id="enrol-dave").already_enrolled
    # A verification request id is single-use at every node (the ticket's replay key).
    assert client.verify("dave", noisy(template, rng), request_id="pay-1").decision == "MATCH"
    with pytest.raises(grpc.RpcError) as err:
        client.verify("dave", noisy(template, rng), request_id="pay-1")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_enroll_many_is_lazy_and_ordered(committee):
    rng = np.random.default_rng(3)
    client = committee.client("acme")
    pulled = []

    def gallery():
        for i in range(300):
            pulled.append(i)
            yield f"bulk-{i}", unit(rng)

    replies = client.enroll_many(gallery())
    first = next(replies)
    assert first.subject == "bulk-0" and first.code == 0
    rest = list(replies)
    assert [r.subject for r in rest] == [f"bulk-{i}" for i in range(1, 300)]
    assert all(r.code == 0 for r in rest) and len(pulled) == 300


def test_client_refuses_a_matrix_locally(committee):
    with pytest.raises(ValueError):
        committee.client("acme").enroll("x", np.ones((2, 64)))
