"""Mutual TLS for every connection: servers require a client certificate
under the cluster CA; clients pin the same CA, present their own, and name
the server they expect.

Every outgoing channel names one server identity (``expect``): gRPC's own
host-name verification then checks the server certificate for that
identity's DNS name (``vault.pki.server_dns_name``), whatever address the
channel dials. A certificate of another role or name, or of a client-only
party (PSP, auditor), fails the handshake before any request is sent.
grpc-python gives a client no view of the server's certificate, so the URI
SAN itself is not read on this side; the CA binds the two (docs/operations.md,
"Server identity")."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import grpc

from vault.pki import Identity, server_dns_name

# Large galleries move in many messages; still, one message may carry a batch
# of share records, so allow well above gRPC's 4 MiB default on both sides.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
)


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS material lives."""

    ca: str
    cert: str
    key: str

    def load(self) -> "TlsMaterial":
        def read(label: str, path: str) -> bytes:
            try:
                data = pathlib.Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"Cannot read the TLS {label} file {path}: {exc.strerror}.") from None
            if b"-----BEGIN" not in data:
                raise ValueError(f"The TLS {label} file {path} is not PEM.")
            return data

        return TlsMaterial(read("CA", self.ca), read("certificate", self.cert), read("key", self.key))


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes
    cert: bytes
    key: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def identity_options(expect: Identity) -> tuple:
    """Channel options that make the TLS handshake accept only ``expect``."""
    if not isinstance(expect, Identity):
        raise TypeError("A channel must name the server identity it expects (a vault.pki.Identity).")
    return (("grpc.ssl_target_name_override", server_dns_name(expect)),)


def secure_channel(address: str, tls: TlsMaterial, *, expect: Identity, extra_options: tuple = ()) -> grpc.Channel:
    """A channel to ``address`` over mutual TLS with the project's limits,
    to the server ``expect`` and no other."""
    options = CHANNEL_OPTIONS + identity_options(expect) + tuple(extra_options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)
