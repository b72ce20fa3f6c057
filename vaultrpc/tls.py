"""Mutual TLS for every connection: servers require a client certificate
under the cluster CA; clients pin the same CA and present their own."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import grpc

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


def secure_channel(address: str, tls: TlsMaterial, extra_options: tuple = ()) -> grpc.Channel:
    """A channel to ``address`` over mutual TLS with the project's limits."""
    return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS + tuple(extra_options))
