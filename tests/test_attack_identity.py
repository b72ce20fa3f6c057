"""Attack 5 of issue 10: clients that never checked whom they talk to.

The attacker holds one real certificate of the cluster CA (a PSP's, the
auditor's, or another node's) and stands a server at an address a victim
dials. Every client now names the identity it expects (role and name, via
the server certificate's identity DNS name), so the handshake fails and the
impostor receives nothing; and a node dials the peers its own config knows
at the config's address, whatever the auditor's request says.

Over real processes (``test_matcher_e2e.Processes``: ``python -m
shareholders`` and ``python -m matcher``); the impostors are gRPC servers in
the test that record every call that reaches them. Each attack has a
control: the same impostor holding the certificate the victim expects does
receive the call, so "nothing arrived" means "refused at the handshake".
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import time

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shareholders.config import ConfigError, load_config, load_peers
from shareholders.server import serve
from node_kit import audit_events, CLUSTER_ID, write_node_files
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from hostile_kit import Impostor
from matcher_kit import NAMES, Processes, Tenant, unit
from vault import pki
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e

ACME = Tenant("acme")


@pytest.fixture()
def nodes(dev_pki, tmp_path):
    p = Processes(dev_pki, tmp_path / "cluster", ACME)
    try:
        p.start_nodes()
        yield p
    finally:
        p.close()


@pytest.fixture()
def impostors():
    made: list[Impostor] = []

    def make(dev_pki, role, name):
        made.append(Impostor(dev_pki, role, name))
        return made[-1]

    yield make
    for i in made:
        i.close()


def _matcher_with(dev_pki, p: Processes, tmp_path, case: str, addresses: dict[str, str]) -> Processes:
    """A real matcher process whose committee table points at ``addresses``."""
    m = Processes(dev_pki, tmp_path / case, ACME)
    m.root.mkdir(parents=True)
    m.addresses = dict(addresses)
    m.address = m.start_matcher()
    p.procs[f"matcher-{case}"] = m.procs["matcher"]  # stopped with the nodes
    return m


# --- (a) the matcher's StoreShares -----------------------------------------------------


@pytest.mark.parametrize("role, name", [("psp", "acme"), ("auditor", "auditor"), ("shareholder", "bank-b")])
def test_matcher_sends_no_share_to_a_server_with_another_certificate(dev_pki, nodes, impostors, tmp_path, role, name):
    """An impostor at bank-c's address with a PSP's, the auditor's or bank-b's
    certificate: the matcher's channel expects shareholder/bank-c, the
    handshake fails, and no call at all (no StoreShares, no share) reaches
    the impostor."""
    fake = impostors(dev_pki, role, name)
    m = _matcher_with(dev_pki, nodes, tmp_path, f"{role}-{name}", {**nodes.addresses, "bank-c": fake.address})
    with m.client(m.address) as client:
        with pytest.raises(grpc.RpcError):
            client.enroll("alice", unit(np.random.default_rng(1)))
    time.sleep(0.2)
    assert fake.calls == [], fake.calls


def test_control_the_matcher_does_reach_an_impostor_holding_the_expected_certificate(dev_pki, nodes, impostors, tmp_path):
    """The same set-up with bank-c's own certificate (its key stolen): the
    call arrives. So the refusals above are the identity check, nothing else."""
    fake = impostors(dev_pki, "shareholder", "bank-c")
    m = _matcher_with(dev_pki, nodes, tmp_path, "control", {**nodes.addresses, "bank-c": fake.address})
    with m.client(m.address) as client:
        with pytest.raises(grpc.RpcError):
            client.enroll("alice", unit(np.random.default_rng(1)))
    assert fake.calls and all(c.startswith("/splitvault.v1.Shareholder/") for c in fake.calls), fake.calls


# --- (a) the PSP's Verify ---------------------------------------------------------------


@pytest.mark.parametrize("role, name", [("psp", "acme"), ("auditor", "auditor"), ("shareholder", "bank-a"),
                                        ("matcher", "other-matcher")])
def test_psp_sends_no_probe_to_a_server_that_is_not_its_matcher(dev_pki, impostors, role, name):
    fake = impostors(dev_pki, role, name)
    client = MatcherClient(fake.address, dev_pki.tls("psp", ACME.name), tenant=ACME.name, ticket_key=ACME.key,
                           key_id=ACME.key_id, matcher="matcher", cluster_id=CLUSTER_ID, timeout_s=5)
    with client, pytest.raises(grpc.RpcError) as err:
        client.verify("alice", unit(np.random.default_rng(2)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fake.calls == []
    # Control: the matcher's own certificate is accepted (and the call arrives).
    genuine = impostors(dev_pki, "matcher", "matcher")
    with MatcherClient(genuine.address, dev_pki.tls("psp", ACME.name), tenant=ACME.name, ticket_key=ACME.key,
                       key_id=ACME.key_id, matcher="matcher", cluster_id=CLUSTER_ID, timeout_s=5) as client:
        with pytest.raises(grpc.RpcError):
            client.verify("alice", unit(np.random.default_rng(2)))
    assert [c.rsplit("/", 1)[-1] for c in genuine.calls] == ["Verify"]


# --- (a) and (b) a node's peer calls ----------------------------------------------------


def _members(p: Processes, address_of: dict[str, str] | None = None):
    address_of = {**p.addresses, **(address_of or {})}
    return [admin_pb2.Member(name=n, index=i, address=address_of[n]) for i, n in enumerate(NAMES, start=1)]


def _begin_refresh(dev_pki, p: Processes, sid: str) -> None:
    members = [admin_pb2.Member(name=n, index=i) for i, n in enumerate(NAMES, start=1)]
    req = admin_pb2.BeginSessionRequest(session_id=sid, kind=admin_pb2.SESSION_KIND_REFRESH, from_epoch=1,
                                        new_epoch=2, old_committee=members, new_committee=members,
                                        old_threshold=2, new_threshold=2)
    for n in NAMES:
        with secure_channel(p.addresses[n], dev_pki.tls("auditor", "auditor"), expect=pki.Identity("shareholder", n)) as ch:
            admin_pb2_grpc.ShareholderAdminStub(ch).BeginSession(req, timeout=10)


def _prepare(dev_pki, p: Processes, node: str, sid: str, peers) -> grpc.RpcError | None:
    with secure_channel(p.addresses[node], dev_pki.tls("auditor", "auditor"), expect=pki.Identity("shareholder", node)) as ch:
        try:
            for _ in admin_pb2_grpc.ShareholderAdminStub(ch).PrepareSession(
                    admin_pb2.PrepareSessionRequest(session_id=sid, peers=peers), timeout=20):
                pass
        except grpc.RpcError as exc:
            return exc
    return None


def _enrol_one(dev_pki, p: Processes, tmp_path) -> None:
    m = _matcher_with(dev_pki, p, tmp_path, "enrol", p.addresses)
    with m.client(m.address) as client:
        client.enroll("alice", unit(np.random.default_rng(3)))


def _write_peer_tables(p: Processes) -> None:
    """Each node's own [peers] table (as `vaultctl cluster up` writes it)."""
    for name in NAMES:
        config = p.root / name / "node.toml"
        table = "".join(f'"{n}" = "{p.addresses[n]}"\n' for n in NAMES if n != name)
        config.write_text(config.read_text() + "\n[peers]\n" + table)


@pytest.mark.parametrize("role, name", [("shareholder", "bank-c"), ("auditor", "auditor"), ("psp", "acme")])
def test_a_node_sends_no_delta_request_to_a_peer_with_another_certificate(dev_pki, nodes, impostors, tmp_path,
                                                                          role, name):
    """bank-a does not know bank-b from its config (no [peers]); the auditor's
    request names the impostor's address for bank-b. bank-a's channel expects
    shareholder/bank-b: the handshake fails and nothing reaches the impostor."""
    _enrol_one(dev_pki, nodes, tmp_path)
    fake = impostors(dev_pki, role, name)
    _begin_refresh(dev_pki, nodes, "identity-attack-1")
    err = _prepare(dev_pki, nodes, "bank-a", "identity-attack-1", _members(nodes, {"bank-b": fake.address}))
    assert err is not None and err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), err
    assert fake.calls == []
    # Control: with bank-b's own certificate the impostor is dialled.
    genuine = impostors(dev_pki, "shareholder", "bank-b")
    err = _prepare(dev_pki, nodes, "bank-a", "identity-attack-1", _members(nodes, {"bank-b": genuine.address}))
    assert err is not None
    assert any(c.endswith("/GetRefreshDeltas") for c in genuine.calls), genuine.calls


def test_auditor_cannot_point_a_node_at_another_address_for_a_known_peer(dev_pki, nodes, impostors, tmp_path):
    """With each node's own peer table, an auditor's request giving bank-b an
    attacker's address is refused INVALID_ARGUMENT and logged as a ``deny``;
    the node never dials it, even though the impostor holds bank-b's own
    certificate (the worst case: a stolen node key)."""
    _enrol_one(dev_pki, nodes, tmp_path)
    _write_peer_tables(nodes)
    fake = impostors(dev_pki, "shareholder", "bank-b")
    _begin_refresh(dev_pki, nodes, "identity-attack-2")
    err = _prepare(dev_pki, nodes, "bank-a", "identity-attack-2", _members(nodes, {"bank-b": fake.address}))
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "peer table" in err.details()
    time.sleep(0.2)
    assert fake.calls == []
    events = audit_events(nodes.root / "bank-a" / "shares.db")
    assert "deny" in events
    conn = sqlite3.connect(nodes.root / "bank-a" / "shares.db")
    try:
        rows = [json.loads(d) for (d,) in conn.execute("SELECT details_json FROM audit_log WHERE event = 'deny'")]
    finally:
        conn.close()
    assert any(r.get("reason") == "peer_address" and r.get("peer") == "bank-b" and r.get("given") == fake.address
               for r in rows), rows
    # The same session, with the addresses the nodes know, goes on.
    for n in NAMES:
        assert _prepare(dev_pki, nodes, n, "identity-attack-2", _members(nodes)) is None


# --- (c) what the dev CA issues ---------------------------------------------------------


@pytest.mark.parametrize("role", ["psp", "auditor"])
def test_a_client_certificate_cannot_serve(dev_pki, impostors, role):
    """A PSP's or the auditor's certificate has clientAuth only and no host
    names: no client accepts it as a server, not even one that checks the
    CA and the address alone (no expected identity)."""
    cert = x509.load_pem_x509_certificate(dev_pki.tls(role, "acme" if role == "psp" else "auditor").cert)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert not san.get_values_for_type(x509.DNSName) and not san.get_values_for_type(x509.IPAddress)
    fake = impostors(dev_pki, role, "acme" if role == "psp" else "auditor")
    mine = dev_pki.tls("matcher", "matcher")
    creds = grpc.ssl_channel_credentials(root_certificates=mine.ca, private_key=mine.key, certificate_chain=mine.cert)
    with grpc.secure_channel(fake.address, creds) as ch:
        call = ch.unary_unary("/splitvault.v1.Shareholder/StoreShares")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fake.calls == []


def test_server_names_are_one_per_identity():
    ca, key = pki.make_ca()
    cert, _ = pki.issue_cert(ca, key, "shareholder", "bank-a")
    san = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "bank-a.shareholder.splitvault.invalid" in san.get_values_for_type(x509.DNSName)
    assert pki.server_dns_name(pki.Identity("matcher", "m1")) == "m1.matcher.splitvault.invalid"
    for bad in (pki.Identity("psp", "acme"), pki.Identity("shareholder", "Bank-A"), pki.Identity("shareholder", "b_a")):
        with pytest.raises(ValueError):
            pki.server_dns_name(bad)
    with pytest.raises(TypeError):
        secure_channel("127.0.0.1:1", None, expect="shareholder/bank-a")  # type: ignore[arg-type]


# --- the dev cluster writes what the nodes need --------------------------------------------


def test_cluster_up_gives_each_node_its_peer_table_and_private_logs(tmp_path):
    """`vaultctl cluster up` puts the other running nodes' addresses into
    each node's [peers] (so the nodes, not the auditor, decide where peers
    are), and writes logs and pid files 0600; a restarted node's new address
    reaches its peers' tables."""
    root = tmp_path / "cluster"
    try:
        info = cluster.up(root, shareholders=3, threshold=2, dim=8)
        addresses = {p["name"]: p["address"] for p in info["shareholders"]}
        for p in info["shareholders"]:
            cfg = load_config(p["config"], env={})
            assert cfg.peers == {n: a for n, a in addresses.items() if n != p["name"]}
            for path in (p["log"], cluster.Paths(root).pid(cluster.load_spec(root), p["name"])):
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        assert stat.S_IMODE(os.stat(info["matcher"]["log"]).st_mode) == 0o600
        cluster.kill_node(root, "bank-b")
        moved = cluster.restart_node(root, "bank-b")["address"]
        cfg_a = load_config(info["shareholders"][0]["config"], env={})
        assert load_peers(cfg_a, env={})["bank-b"] == moved
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


@pytest.mark.parametrize("role, name", [("psp", "acme"), ("auditor", "auditor"), ("shareholder", "bank-b")])
def test_a_node_refuses_to_serve_under_a_certificate_that_is_not_its_own(dev_pki, tmp_path, role, name):
    """A node configured with a client-only certificate or another node's
    does not start: its clients would refuse it anyway, so say so at once."""
    config = write_node_files(tmp_path / "bank-a", name="bank-a", index=1, tls=dev_pki.files(role, name),
                              tenants={ACME.name: {ACME.key_id: pki.public_key_raw(ACME.key)}})
    with pytest.raises(ConfigError, match="not a server certificate of shareholder/bank-a"):
        serve(load_config(config, env={}), env={}, harden=False)
    ca, key = pki.make_ca()
    assert pki.server_identity_from_pem(pki.issue_cert(ca, key, "shareholder", "bank-a")[0]) == \
        pki.Identity("shareholder", "bank-a")
    assert pki.server_identity_from_pem(pki.issue_cert(ca, key, "psp", "acme")[0]) is None
