"""The shared server plumbing over real mTLS on loopback."""
from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vault import names, pki
from vaultrpc import server as rpcserver
from vaultrpc import config
from vaultrpc.tls import secure_channel


@pytest.fixture()
def health_only(dev_pki):
    running = rpcserver.start(
        listen="127.0.0.1:0",
        tls=dev_pki.tls("shareholder", "node-a"),
        register=(),
        service_names=(),
        roles={},
        logger=logging.getLogger("test"),
        max_workers=4,
    )
    yield running
    running.stop(0)


def test_health_over_mtls(dev_pki, health_only):
    with secure_channel(f"localhost:{health_only.port}", dev_pki.tls("auditor", "alice"),
                        expect=pki.Identity("shareholder", "node-a")) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_no_client_certificate_is_refused(dev_pki, health_only):
    creds = grpc.ssl_channel_credentials(root_certificates=dev_pki.ca_cert)
    with grpc.secure_channel(f"localhost:{health_only.port}", creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(dev_pki, health_only, tmp_path):
    other_ca, other_key = pki.make_ca("intruder CA")
    cert, key = pki.issue_cert(other_ca, other_key, "auditor", "mallory")
    creds = grpc.ssl_channel_credentials(root_certificates=dev_pki.ca_cert, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(f"localhost:{health_only.port}", creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_identity_round_trip():
    ca, key = pki.make_ca()
    cert, _ = pki.issue_cert(ca, key, "psp", "acme-pay")
    assert pki.identity_from_pem(cert) == pki.Identity("psp", "acme-pay")
    with pytest.raises(ValueError):
        pki.identity_uri("root", "x")
    with pytest.raises(ValueError):
        names.check_name("../etc")


def test_config_env_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[node]\nname = "a"\nrate = 5\n')
    data = config.load(path, env={"SPLITVAULT_NODE__RATE": "9", "SPLITVAULT_NODE__NAME": "b"})
    assert data["node"] == {"name": "b", "rate": 9}
    with pytest.raises(config.ConfigError):
        config.need(data, "node.missing")
    path.write_text("not toml [")
    with pytest.raises(config.ConfigError):
        config.load(path, env={})
