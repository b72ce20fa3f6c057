"""Who may call what, on every RPC of every service (Matcher, Shareholder,
ShareholderAdmin), with every identity a caller can present: each role the
method's table does not name, a certificate under the cluster CA without a
splitvault identity, a well-formed identity from another CA, and no
certificate at all. Also: a request that does not even parse, from a
caller without the right, is refused for the role first.

The expected status comes from the role tables themselves
(matcher.server.ROLES, shareholders.service.ROLES, shareholders.epochs.ROLES)
and from the service descriptors, so a method added later is covered too.
"""
from __future__ import annotations

import grpc
import pytest

from hostile_kit import clean_details, no_cert_channel, no_identity_tls, other_ca_tls, raw_call, status_of
from matcher.server import ROLES as MATCHER_ROLES
from shareholders.epochs import ROLES as ADMIN_ROLES
from shareholders.service import ROLES as NODE_ROLES
from splitvault.v1 import admin_pb2, matcher_pb2, shareholder_pb2
from matcher_kit import Committee, Tenant
from vault import pki
from vaultrpc.tls import secure_channel

SERVICES = {  # service -> (descriptor, role table, which server)
    "splitvault.v1.Matcher": (matcher_pb2.DESCRIPTOR.services_by_name["Matcher"], MATCHER_ROLES, "matcher"),
    "splitvault.v1.Shareholder": (shareholder_pb2.DESCRIPTOR.services_by_name["Shareholder"], NODE_ROLES, "node"),
    "splitvault.v1.ShareholderAdmin": (admin_pb2.DESCRIPTOR.services_by_name["ShareholderAdmin"], ADMIN_ROLES, "node"),
}


def _methods():
    for service, (desc, table, server) in SERVICES.items():
        for m in desc.methods:
            kind = {(False, False): "unary", (True, False): "stream_unary", (False, True): "unary_stream",
                    (True, True): "stream_stream"}[(m.client_streaming, m.server_streaming)]
            yield f"/{service}/{m.name}", kind, table, server


METHODS = list(_methods())


@pytest.fixture(scope="module")
def committee(dev_pki, tmp_path_factory):
    c = Committee(dev_pki, tmp_path_factory.mktemp("roles"), tenants=[Tenant("acme")])
    c.start_matcher()
    yield c
    c.close()


def _address(c, server: str) -> str:
    return f"127.0.0.1:{c.matcher.port}" if server == "matcher" else c.addresses["bank-a"]


def _identity(server: str) -> pki.Identity:
    return pki.Identity("matcher", "matcher") if server == "matcher" else pki.Identity("shareholder", "bank-a")


def test_every_method_is_in_a_role_table():
    # Deny by default: a method missing from its table would be refused to
    # everyone, which the matrix below would not notice.
    missing = [m for m, _k, table, _s in METHODS if m not in table]
    assert not missing, missing


@pytest.mark.parametrize("method, kind, table, server", METHODS, ids=[m[0].rsplit(".", 1)[-1] for m in METHODS])
def test_wrong_roles_and_wrong_certificates(committee, dev_pki, method, kind, table, server):
    address = _address(committee, server)
    allowed = table[method]
    for role in sorted(pki.ROLES - allowed):
        name = "acme" if role == pki.ROLE_PSP else f"intruder-{role}"
        with secure_channel(address, dev_pki.tls(role, name), expect=_identity(server)) as ch:
            for payload in (b"", b"\xff\xff\xff\xff"):   # an empty request, and one that does not parse
                code, details = status_of(lambda: raw_call(ch, method, payload, stream=kind, timeout=10))
                assert code == grpc.StatusCode.PERMISSION_DENIED, (role, payload, code, details)
                assert clean_details(details) and role in details
    # Signed by the cluster CA, but no splitvault identity in it.
    with grpc.secure_channel(address, no_identity_tls(dev_pki).channel_credentials()) as ch:
        code, details = status_of(lambda: raw_call(ch, method, b"", stream=kind, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and clean_details(details), (code, details)
    # The right role and name, from another CA; and no certificate at all:
    # refused in the TLS handshake, before any handler.
    some_role = sorted(allowed)[0]
    for ch in (grpc.secure_channel(address, other_ca_tls(dev_pki, some_role, "acme").channel_credentials()),
               no_cert_channel(address, dev_pki)):
        with ch:
            code, _details = status_of(lambda: raw_call(ch, method, b"", stream=kind, timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE, code
