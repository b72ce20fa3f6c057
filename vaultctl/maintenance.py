"""What ``vaultctl refresh`` and ``vaultctl reshare`` share: the nodes'
maintenance API seen from the auditor, the local session file, progress
display and the seam where a run can be interrupted.

- ``Admin``: one mTLS channel per node with the auditor's certificate;
  ``ShareholderAdmin`` and ``Shareholder.GetNodeInfo`` calls with deadlines,
  fanned out in parallel; streaming phases report progress.
- ``SessionFile``: ``<state dir>/epoch-session.json`` names the session this
  auditor workstation is driving (written BEFORE any node hears of it, so a
  CLI killed at any point finds it again), guarded by an ``flock`` so that
  two vaultctl processes never drive a session at once (the lock dies with
  the process, kill -9 included).
- ``Progress``: a rich progress bar on a terminal (stderr), silent otherwise
  (``--format json`` prints one object at the end).
- ``CrashSeam``: ``step(phase)`` at every point where an interrupted run
  leaves a distinct state. It does nothing in the product; only test code
  (tests/crash_cli.py) replaces ``crash_seam`` to kill the CLI or a node there.
"""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import asdict, dataclass, field

import grpc

from splitvault.v1 import admin_pb2, admin_pb2_grpc, shareholder_pb2, shareholder_pb2_grpc
from vault.pki import ROLE_SHAREHOLDER, Identity
from vaultrpc.files import fsync_dir, write_atomic
from vaultrpc.tls import TlsMaterial, secure_channel

# Deadlines: quick calls, and the long streaming phases (per message gap is
# what matters there, the whole phase may take minutes).
CALL_TIMEOUT_S = 30.0
PHASE_TIMEOUT_S = 3600.0
STATE_NAMES = {v: k.removeprefix("SESSION_STATE_").lower() for k, v in admin_pb2.SessionState.items()}
KIND_NAMES = {v: k.removeprefix("SESSION_KIND_").lower() for k, v in admin_pb2.SessionKind.items()}


class MaintenanceError(Exception):
    """A maintenance step failed; ``remote`` says whether a node (exit 2) or
    the local side (exit 1) is at fault."""

    def __init__(self, message: str, *, remote: bool = True, **details):
        super().__init__(message)
        self.message = message
        self.remote = remote
        self.details = details


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    address: str

    def member(self) -> admin_pb2.Member:
        return admin_pb2.Member(name=self.name, index=self.index, address=self.address)


def rpc_message(exc: grpc.RpcError) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or "no details"
    return f"{getattr(code, 'name', 'UNKNOWN')}: {details.rstrip('.')}"


def rpc_code(exc: grpc.RpcError):
    return exc.code() if callable(getattr(exc, "code", None)) else None


class Admin:
    """The auditor's channels to a set of nodes (by name)."""

    def __init__(self, nodes: Iterable[Node], tls: TlsMaterial):
        self.tls = tls
        self.nodes: dict[str, Node] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._admin: dict[str, admin_pb2_grpc.ShareholderAdminStub] = {}
        self._info: dict[str, shareholder_pb2_grpc.ShareholderStub] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="vaultctl")
        for node in nodes:
            self.add(node)

    def add(self, node: Node) -> None:
        if node.name in self._channels:
            self._channels[node.name].close()
        self.nodes[node.name] = node
        channel = secure_channel(node.address, self.tls, expect=Identity(ROLE_SHAREHOLDER, node.name))
        self._channels[node.name] = channel
        self._admin[node.name] = admin_pb2_grpc.ShareholderAdminStub(channel)
        self._info[node.name] = shareholder_pb2_grpc.ShareholderStub(channel)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def members(self, names: Iterable[str]) -> list[admin_pb2.Member]:
        return [self.nodes[n].member() for n in names]

    def call(self, name: str, method: str, request, timeout: float = CALL_TIMEOUT_S):
        try:
            return getattr(self._admin[name], method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise MaintenanceError(f"Node {name} refused {method} ({rpc_message(exc)}).", node=name,
                                   status=getattr(rpc_code(exc), "name", "UNKNOWN")) from None

    def each(self, names: Iterable[str], fn: Callable[[str], object]) -> dict[str, object]:
        """fn(name) on every node in parallel; the first failure is raised after all ended."""
        names = list(names)
        jobs = {name: self._pool.submit(fn, name) for name in names}
        results, errors = {}, []
        for name, job in jobs.items():
            try:
                results[name] = job.result()
            except MaintenanceError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return results

    def node_info(self, names: Iterable[str]) -> dict[str, shareholder_pb2.GetNodeInfoResponse]:
        def one(name):
            try:
                return self._info[name].GetNodeInfo(shareholder_pb2.GetNodeInfoRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                raise MaintenanceError(
                    f"Node {name} at {self.nodes[name].address} did not answer ({rpc_message(exc)}); start it and "
                    "run the command again.", node=name) from None
        return self.each(names, one)

    def session(self, name: str, session_id: str = "") -> admin_pb2.SessionStatus | None:
        reply = self.call(name, "GetSession", admin_pb2.GetSessionRequest(session_id=session_id))
        return reply.status if reply.found else None

    def stream(self, name: str, method: str, request, on_progress: Callable[[str, int, int], None]):
        """Run a streaming phase on one node; the final SessionStatus."""
        final = None
        try:
            for msg in getattr(self._admin[name], method)(request, timeout=PHASE_TIMEOUT_S):
                on_progress(name, msg.done, msg.total)
                if msg.HasField("status"):
                    final = msg.status
        except grpc.RpcError as exc:
            raise MaintenanceError(f"Node {name} failed {method} ({rpc_message(exc)}).", node=name,
                                   status=getattr(rpc_code(exc), "name", "UNKNOWN")) from None
        if final is None:
            raise MaintenanceError(f"Node {name} ended {method} without a result; run the command again.", node=name)
        return final

    def phase(self, names: Iterable[str], label: str, method: str, request, progress: "Progress",
              faults: "CrashSeam", total: int | None = None) -> dict[str, object]:
        """Run one streaming session phase on every node in parallel: {node: final SessionStatus}.

        ``label`` names the phase in the progress bar and the crash-injection
        points (``<label>-start`` before any node is asked, ``<label>`` after
        each node's phase ended); ``total`` stands in when a node reports none.
        """
        def one(name: str):
            final = self.stream(name, method, request,
                                lambda n, done, tot: progress.update(label, n, done, tot or total or 0))
            faults.step(label)
            return final

        faults.step(f"{label}-start")
        return self.each(names, one)


# --- the local session file -----------------------------------------------------------


@dataclass
class SessionRecord:
    """What the auditor's side remembers of the session it drives."""

    session_id: str
    kind: str
    from_epoch: int
    new_epoch: int
    old: list[list]  # [[name, index], ...]
    new: list[list]
    old_threshold: int
    new_threshold: int
    senders: list[int] = field(default_factory=list)
    started: str = ""
    extra: dict = field(default_factory=dict)


class SessionFile:
    """``epoch-session.json`` in a state folder, under an exclusive flock."""

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / "epoch-session.json"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "epoch-session.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MaintenanceError(
                f"Another vaultctl refresh or reshare is running from {self.folder} (lock {self.folder / 'epoch-session.lock'}); "
                "wait for it to end.", remote=False) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> SessionRecord | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise MaintenanceError(f"The session file {self.path} is unreadable; inspect it.", remote=False) from None
        try:
            return SessionRecord(**data)
        except TypeError:
            raise MaintenanceError(f"The session file {self.path} has unknown fields.", remote=False) from None

    def save(self, rec: SessionRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(asdict(rec), indent=2, sort_keys=True) + "\n")

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.folder)


def new_session_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.urandom(6).hex()}"


# --- progress -------------------------------------------------------------------------


class Progress:
    """One progress bar per (phase, node) on a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], int] = {}
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = RichProgress(
                TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._progress.start()

    def update(self, phase: str, node: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        with self._lock:
            key = (phase, node)
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(f"{phase} {node}", total=total or None)
            self._progress.update(self._tasks[key], completed=done, total=total or None)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_enabled(fmt: str) -> bool:
    return fmt != "json" and sys.stderr.isatty()


# --- the crash seam ----------------------------------------------------------------------


class CrashSeam:
    """``step(phase)`` runs once before a phase begins anywhere
    (``<phase>-start``) and after each node finishes it (``<phase>``).
    A no-op: nothing in the product interrupts a run on purpose."""

    def step(self, phase: str) -> None:
        pass


def crash_seam(root: pathlib.Path | None) -> CrashSeam:
    """The seam of a run on the cluster directory ``root`` (None with
    --config). Replaced by tests only (tests/crash_cli.py); never by an
    environment variable."""
    return CrashSeam()
