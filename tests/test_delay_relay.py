"""tools/delay_relay.py, the stand-in for the network between hosts (tests/
test_netns_hosts.py, bench/suite_wan.py): bytes arrive whole and in order in
both directions, a half-close is passed on, a target that refuses closes the
client's connection, and SIGTERM stops it. How long it delays is measured by
`make bench` (suite wan), not asserted here."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import pytest

RELAY = pathlib.Path(__file__).resolve().parent.parent / "tools" / "delay_relay.py"


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    """Echoes each connection's bytes, then half-closes after the client does."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture
def relay(tmp_path):
    srv, _ = _echo_server()
    closed = socket.create_server(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    ready = tmp_path / "relay.json"
    proc = subprocess.Popen([sys.executable, str(RELAY), "--delay-ms", "2",
                             "--route", f"127.0.0.1:0=127.0.0.1:{srv.getsockname()[1]}",
                             "--route", f"127.0.0.1:0=127.0.0.1:{refused_port}", "--ready", str(ready)])
    try:
        while not ready.exists():
            assert proc.poll() is None, "the relay exited before listening"
            threading.Event().wait(0.05)
        routes = json.loads(ready.read_text())["routes"]
        assert json.loads(ready.read_text())["pid"] == proc.pid
        yield proc, [r["listen"] for r in routes]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        srv.close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def test_bytes_arrive_whole_and_in_order_and_a_half_close_passes(relay):
    proc, (echo, _refused) = relay
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with _connect(echo) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while chunk := s.recv(65536):  # ends only when the echo's half-close came through
            received += chunk
        sender.join()
    assert bytes(received) == payload


def test_a_refusing_target_closes_the_client_and_sigterm_stops_the_relay(relay):
    proc, (_echo, refused) = relay
    with _connect(refused) as s:
        s.sendall(b"hello")
        try:
            assert s.recv(16) == b""
        except ConnectionResetError:
            pass  # closed with a reset: closed all the same
    proc.terminate()
    assert proc.wait(timeout=10) == 0
