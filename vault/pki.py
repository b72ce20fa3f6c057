"""Identities and the development PKI (pure recipes: they return PEM bytes;
the CLI writes them to disk).

Every party authenticates with an X.509 client certificate under the cluster
CA. Its role and name travel in one URI subject-alternative name,
``spiffe://splitvault/<role>/<name>``, which servers read to decide what the
caller may do. Keys are ECDSA P-256 (what every TLS stack accepts).

Servers (matcher, shareholder) also carry their identity as one DNS name,
``<name>.<role>.splitvault.invalid`` (``server_dns_name``): a client names
the server it expects and TLS host-name verification checks that name, so a
certificate of any other party fails the handshake. Only server roles get
that name and the serverAuth key usage; a PSP's or auditor's certificate is
for TLS clients only.
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vault.names import check_name, check_server_name, is_name

# The roles a certificate can carry, and nothing else.
ROLE_MATCHER = "matcher"
ROLE_PSP = "psp"
ROLE_AUDITOR = "auditor"
ROLE_SHAREHOLDER = "shareholder"
ROLES = frozenset({ROLE_MATCHER, ROLE_PSP, ROLE_AUDITOR, ROLE_SHAREHOLDER})
# Roles that serve gRPC and so get serverAuth and an identity DNS name.
SERVER_ROLES = frozenset({ROLE_MATCHER, ROLE_SHAREHOLDER})

# ".invalid" (RFC 2606) never resolves: the name is an identity, not a host.
SERVER_DNS_SUFFIX = ".splitvault.invalid"

URI_PREFIX = "spiffe://splitvault/"


@dataclass(frozen=True)
class Identity:
    """Who a peer is: its role and its name (a tenant id for a PSP)."""

    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"

    @property
    def uri(self) -> str:
        return identity_uri(self.role, self.name)


def server_dns_name(identity: Identity) -> str:
    """The DNS name that carries a server's identity in its certificate and
    that a client verifies: ``<name>.<role>.splitvault.invalid``. Parsed from
    the right (the role has no dot), it names exactly one identity."""
    if identity.role not in SERVER_ROLES:
        raise ValueError(f"Role {identity.role!r} does not serve; only {sorted(SERVER_ROLES)} have server names.")
    check_server_name(identity.name)
    return f"{identity.name}.{identity.role}{SERVER_DNS_SUFFIX}"


def identity_uri(role: str, name: str) -> str:
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}; expected one of {sorted(ROLES)}.")
    return f"{URI_PREFIX}{role}/{check_name(name)}"


def parse_identity_uri(uri: str) -> Identity | None:
    """The identity in a SAN URI, or None if it is not one of ours."""
    if not uri.startswith(URI_PREFIX):
        return None
    parts = uri[len(URI_PREFIX):].split("/")
    if len(parts) != 2 or parts[0] not in ROLES or not is_name(parts[1]):
        return None
    return Identity(parts[0], parts[1])


@lru_cache(maxsize=1024)
def identity_from_pem(cert_pem: bytes) -> Identity | None:
    """The single splitvault identity in a certificate, or None (no or several)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = {i for i in (parse_identity_uri(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)) if i}
    return found.pop() if len(found) == 1 else None


def server_identity_from_pem(cert_pem: bytes) -> Identity | None:
    """The identity a certificate can serve as, or None: it needs one
    splitvault URI of a server role, the DNS name of that same identity and
    no other name under splitvault.invalid, and the serverAuth key usage."""
    identity = identity_from_pem(cert_pem)
    if identity is None or identity.role not in SERVER_ROLES:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        expected = server_dns_name(identity)
    except (ValueError, x509.ExtensionNotFound):
        return None
    ours = {d.lower() for d in dns if d.lower().endswith(SERVER_DNS_SUFFIX)}
    if ours != {expected} or ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        return None
    return identity


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(common_name: str = "splitvault dev CA", days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    role: str,
    name: str,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 825,
) -> tuple[bytes, bytes]:
    """A leaf certificate for one party: (certificate PEM, private key PEM).

    A server role (matcher, shareholder) gets TLS server and client use, its
    identity DNS name (``server_dns_name``) and ``hosts``; a PSP or auditor
    gets TLS client use only and no host names, so it can never serve."""
    identity = Identity(role, name)
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(role, name))]
    if role in SERVER_ROLES:
        alt.append(x509.DNSName(server_dns_name(identity)))
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}/{name}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def new_signing_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key (tickets, audit checkpoints): (private PEM, raw 32-byte public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _key_pem(key), public


def load_signing_key(pem: bytes) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("The signing key file does not hold an Ed25519 private key.")
    return key


def load_public_key(raw_or_hex: bytes | str) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from 32 raw bytes or 64 hex characters."""
    raw = bytes.fromhex(raw_or_hex) if isinstance(raw_or_hex, str) else raw_or_hex
    if len(raw) != 32:
        raise ValueError("An Ed25519 public key is 32 bytes (64 hex characters).")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def public_key_raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
