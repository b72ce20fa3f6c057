"""Health probe of one server over its own mTLS: grpc.health.v1 ``Check``.

    python -m vaultrpc.probe --config node.toml|matcher.toml [--timeout S]

For container health checks and Kubernetes liveness/readiness probes
(deploy/): the servers require a client certificate, which a plain gRPC
probe cannot present, so the probe runs inside the server's container with
the server's own certificate (Health is open to every authenticated party)
and expects the identity in that certificate, as every client does. It
dials the config's ``listen`` address (a wildcard host becomes loopback);
with port 0 it takes the address from the ready file. Exit 0 when the
server answers SERVING, 1 otherwise, with one line on stderr saying why.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vault import pki
from vaultrpc import config as rpcconfig
from vaultrpc.tls import TlsFiles, secure_channel

DEFAULT_TIMEOUT_S = 2.0
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}


def check(address: str, tls: TlsFiles, expect: pki.Identity, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """SERVING, NOT_SERVING, ... as the server says, or UNREACHABLE."""
    try:
        material = tls.load()
    except ValueError:
        return "UNREACHABLE"
    channel = secure_channel(address, material, expect=expect)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        channel.close()


def target(config_path: str) -> tuple[str, TlsFiles, pki.Identity]:
    """The address, own TLS files and own server identity of a node or matcher config."""
    data = rpcconfig.load(config_path)
    section = "node" if isinstance(data.get("node"), dict) else "matcher"
    base = pathlib.Path(config_path).resolve().parent

    def path(key: str) -> str:
        return str(base / pathlib.Path(rpcconfig.need(data, f"tls.{key}")).expanduser())

    tls = TlsFiles(path("ca"), path("cert"), path("key"))
    try:
        identity = pki.server_identity_from_pem(pathlib.Path(tls.cert).read_bytes())
    except OSError as exc:
        raise rpcconfig.ConfigError(f"Cannot read the certificate {tls.cert}: {exc.strerror}.") from None
    if identity is None:
        raise rpcconfig.ConfigError(f"The certificate {tls.cert} is not a splitvault server certificate.")
    host, _, port = rpcconfig.need(data, f"{section}.listen").rpartition(":")
    address = f"{_WILDCARDS.get(host, host)}:{port}"
    if port == "0":
        ready = rpcconfig.get(data, f"{section}.ready_file", None, str)
        try:
            address = json.loads((base / ready).read_text())["address"] if ready else ""
        except (OSError, ValueError, KeyError, TypeError):
            address = ""
        if not address:
            raise rpcconfig.ConfigError("The server listens on port 0 and has written no ready file yet.")
    return address, tls, identity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaultrpc.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the server's own node.toml or matcher.toml")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default 2)")
    args = parser.parse_args(argv)
    try:
        address, tls, identity = target(args.config)
    except rpcconfig.ConfigError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 1
    state = check(address, tls, identity, args.timeout)
    if state != "SERVING":
        print(f"probe: {identity.role}/{identity.name} at {address} is {state}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
