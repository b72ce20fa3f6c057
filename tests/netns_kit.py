"""Separate hosts on one machine: every server of a committee in its own
network namespace, joined through a bridge in a hub namespace by veth pairs,
with a delaying TCP relay (tools/delay_relay.py) at each server host's
ingress standing in for the network between institutions (this kernel has
no netem qdisc).

    hub namespace: bridge br0 ── v<i> ══ eth0 of host i (10.77.0.<i+1>/24)

A server listens on 127.0.0.1:PORT inside its host; the host's relay
listens on the host's own address (``<ip>:7443``, the address in every
config, as a deployment has it) and forwards there, ``delay`` later in
each direction. Nothing is added to the machine's own namespace; ``close()``
kills every process started here (and anything left in the namespaces) and
deletes the namespaces, whose deletion removes the veths and the bridge.

Needs root (``ip netns``): ``available()`` says whether it works here.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RELAY = ROOT / "tools" / "delay_relay.py"
SUBNET = "10.77.0"
PUBLIC_PORT = 7443
LOCAL_PORT = 7001
START_TIMEOUT_S = 60.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """None if namespaces work here, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"svprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "iproute2 (ip) is not installed"
    if made.returncode != 0:
        return f"ip netns add does not work here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """A hub and named hosts, each with one address; processes run inside."""

    def __init__(self, workdir: pathlib.Path, delay_ms: float):
        self.workdir = workdir
        self.delay_ms = delay_ms
        self.prefix = f"sv{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.namespaces: list[str] = []
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, ip, hub-side veth)
        self.procs: list[subprocess.Popen] = []
        try:
            self._add_namespace(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, ns: str) -> None:
        self.namespaces.append(ns)  # first: close() deletes it even if adding failed half-way
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str) -> str:
        """A host joined to the hub; returns its address."""
        i = len(self.hosts) + 1
        ns, ip, veth = f"{self.prefix}-{name}", f"{SUBNET}.{i + 1}", f"v{i}"
        self._add_namespace(ns)
        _ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub, "link", "set", veth, "master", "br0")
        _ip("-n", self.hub, "link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = (ns, ip, veth)
        return ip

    def public(self, name: str) -> str:
        return f"{self.hosts[name][1]}:{PUBLIC_PORT}"

    def spawn(self, host: str, argv: list[str], log: pathlib.Path, cwd: pathlib.Path | None = None) -> subprocess.Popen:
        """Run ``argv`` inside ``host``'s namespace (``ip netns exec`` execs
        in place, so the pid is the program's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_") and k != "VAULTCTL_FAULT"}
        env["PYTHONPATH"] = str(ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[host][0], *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=str(cwd or ROOT), env=env)
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` to completion, capturing its output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_") and k != "VAULTCTL_FAULT"}
        env["PYTHONPATH"] = str(ROOT)
        return subprocess.run(["ip", "netns", "exec", self.hosts[host][0], *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=str(ROOT), env=env)

    def start_relay(self, host: str) -> None:
        """The host's ingress: public address -> 127.0.0.1:LOCAL_PORT, delayed."""
        ready = self.workdir / f"relay-{host}.json"
        proc = self.spawn(host, [sys.executable, str(RELAY), "--delay-ms", str(self.delay_ms), "--route",
                                 f"{self.public(host)}=127.0.0.1:{LOCAL_PORT}", "--ready", str(ready)],
                          self.workdir / f"relay-{host}.log")
        wait_file(ready, proc, self.workdir / f"relay-{host}.log")

    def partition(self, host: str) -> None:
        """Drop ``host``'s link: packets to and from it are lost (no reset)."""
        _ip("-n", self.hub, "link", "set", self.hosts[host][2], "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.hub, "link", "set", self.hosts[host][2], "up")

    def close(self) -> list[str]:
        """Stop everything; returns what could not be cleaned (empty when all went)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:  # anything else still inside (only ours: the names are fresh)
            listed = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in listed:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        existing = _ip("netns", "list", check=False).stdout.split()
        return [ns for ns in self.namespaces if ns in existing]


def wait_file(path: pathlib.Path, proc: subprocess.Popen, log: pathlib.Path, timeout_s: float = START_TIMEOUT_S) -> dict:
    """The JSON in ``path`` once ``proc`` wrote it; fails (with the log's tail) if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name} ended with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} was not written in time: {log.read_text(errors='replace')[-2000:]}")
