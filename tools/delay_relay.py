"""A TCP relay that adds a fixed one-way delay in each direction: the
stand-in for the network between two institutions where the kernel has no
netem qdisc (tests/test_netns_hosts.py, bench/suite_wan.py).

    python tools/delay_relay.py --delay-ms 5 --route LISTEN=TARGET [--route ...] [--ready FILE]

Each byte read on one side is written to the other ``delay`` later
(propagation delay; no bandwidth limit, order kept). A route's LISTEN may
use port 0; ``--ready`` then gets ``{"pid", "routes": [{"listen", "target"}]}``
with the real ports, written atomically once every route listens. It only
moves bytes: TLS runs end to end through it, so it sees nothing but
ciphertext. SIGTERM stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket

CHUNK = 64 * 1024


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT.")
    return host, int(port)


def _route(value: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, target = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r} is not LISTEN=TARGET.")
    return _split(listen), _split(target)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader to writer, each chunk released ``delay_s`` after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def receive():
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                return

    async def send():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    rx = asyncio.create_task(receive())
    try:
        await send()
    finally:
        rx.cancel()


async def _connection(client_r, client_w, target: tuple[str, int], delay_s: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    for w in (client_w, server_w):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pumps = [asyncio.create_task(_pump(client_r, server_w, delay_s)),
             asyncio.create_task(_pump(server_r, client_w, delay_s))]
    try:
        await asyncio.gather(*pumps)
    except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
        pass  # a side went away, or the relay stops: close both
    finally:
        for task in pumps:
            task.cancel()
        for w in (client_w, server_w):
            w.close()


async def serve(routes, delay_s: float, ready: pathlib.Path | None) -> None:
    servers, bound = [], []
    for listen, target in routes:
        server = await asyncio.start_server(
            lambda r, w, t=target: _connection(r, w, t, delay_s), host=listen[0], port=listen[1], reuse_address=True)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        bound.append({"listen": f"{listen[0]}:{port}", "target": f"{target[0]}:{target[1]}"})
    if ready is not None:
        tmp = ready.with_name(f".{ready.name}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "routes": bound}))
        os.replace(tmp, ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="delay_relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--route", type=_route, action="append", required=True, metavar="LISTEN=TARGET")
    parser.add_argument("--ready", type=pathlib.Path, help="file to write once listening")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must not be negative")
    asyncio.run(serve(args.route, args.delay_ms / 1000.0, args.ready))


if __name__ == "__main__":
    main()
