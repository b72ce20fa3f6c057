"""Prometheus metrics on their own port (never the gRPC port)."""
from __future__ import annotations

from prometheus_client import start_http_server


def serve_metrics(host: str, port: int) -> int | None:
    """Start the /metrics endpoint; port 0 picks a free one. Returns the bound port.

    A negative port disables metrics.
    """
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
