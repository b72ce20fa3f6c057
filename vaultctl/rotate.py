"""``vaultctl rotate kek --node NAME``: a new key-encryption key at one node.

The node makes the key itself and re-wraps every data key under it
(``shareholders.rotation``); this command opens the session, follows its
progress and reports. The session id is kept in the auditor's state folder
(``D/maintenance/`` for a cluster directory) until the node reports the
rotation done, so rerunning the same command after a crash of either side
resumes the same session. ``--session ID`` continues a session started
elsewhere (another auditor's, named in the node's refusal).
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
import uuid

import grpc

from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from vaultctl import auditor
from vaultctl.cli import CliError, RemoteError, Result, command, remote_error
from vaultrpc.files import write_atomic

# Statuses after which the session never began: forget the saved id.
_NEVER_BEGAN = ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED")


def _arguments(p) -> None:
    p.add_argument("--node", required=True, help="the shareholder whose KEK is rotated")
    p.add_argument("--session", default=None, metavar="ID",
                   help="resume this session id (default: the one saved by an interrupted run, else a new one)")
    p.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="rows re-wrapped per transaction (default: the node's, 1000)")
    p.add_argument("--pause-ms", type=int, default=0, metavar="MS",
                   help="pause between batches, to leave room for live traffic (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def session_file(target: auditor.AuditorTarget, node: str) -> pathlib.Path:
    return target.state_dir / f"rotate-kek-{node}.json"


def _save(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(data) + "\n")


def _saved_session(path: pathlib.Path) -> str | None:
    try:
        value = json.loads(path.read_text()).get("session_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


class _Bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, node: str):
        self._progress = None
        self._task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn(f"rotate kek {node}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self._progress.start()

    def update(self, msg, phase: str) -> None:
        if self._progress is None:
            return
        total = max(msg.total, msg.rewrapped, 1)
        if self._task is None:
            self._task = self._progress.add_task(phase, total=total)
        self._progress.update(self._task, total=total, completed=min(msg.rewrapped, total) if phase != "done" else total,
                              description=f"v{msg.to_version} {phase}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def rotate_kek(target: auditor.AuditorTarget, node_name: str, *, session: str | None = None, batch_size: int = 0,
               pause_ms: int = 0, on_progress=None) -> dict:
    """Run (or resume) a rotation at one node; the summary as a dict.

    Raises CliError / RemoteError (exit 1 / 2) with one sentence. Also the
    Python API for scripts and tests: ``on_progress(message)`` sees every
    RotateKekResponse as it arrives.
    """
    node = target.node(node_name)
    if node.address is None:
        raise RemoteError(f"Shareholder {node.name} is not running; start it, then rerun.")
    if batch_size < 0 or pause_ms < 0:
        raise CliError("The batch size and pause must not be negative.")
    path = session_file(target, node.name)
    session_id = session or _saved_session(path) or f"rotate-kek-{uuid.uuid4().hex}"
    _save(path, {"session_id": session_id, "node": node.name, "saved_ms": int(time.time() * 1000)})
    began = time.perf_counter()
    last = None
    started = False
    channel = auditor.channel(target, node)
    try:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        request = shareholder_pb2.RotateKekRequest(session_id=session_id, batch_size=batch_size, pause_ms=pause_ms)
        try:
            for msg in stub.RotateKek(request):
                started = True
                last = msg
                if on_progress is not None:
                    on_progress(msg)
        except grpc.RpcError as exc:
            err = remote_error(exc)
            if not started and err.details.get("status") in _NEVER_BEGAN and session is None:
                path.unlink(missing_ok=True)
            hint = "" if err.details.get("status") in _NEVER_BEGAN else (
                f" Rerun the same command to resume session {session_id}."
            )
            raise RemoteError(f"Rotating the KEK of {node.name} stopped: {err.message}{hint}",
                              status=err.details.get("status"), session_id=session_id) from None
    finally:
        channel.close()
    Phase = shareholder_pb2.RotateKekResponse.Phase
    if last is None or last.phase != Phase.PHASE_DONE:
        raise RemoteError(f"Node {node.name} ended the rotation stream before it was done; rerun to resume session {session_id}.",
                          session_id=session_id)
    path.unlink(missing_ok=True)
    seconds = time.perf_counter() - began
    return {
        "node": node.name,
        "session_id": session_id,
        "to_version": last.to_version,
        "from_versions": list(last.from_versions),
        "retired_versions": list(last.retired_versions),
        "total": last.total,
        "rewrapped": last.rewrapped,
        "batches": last.batches,
        "resumed": last.resumed,
        "already_done": last.already_done,
        "seconds": round(seconds, 3),
        "rate_per_s": round(last.rewrapped / seconds, 1) if seconds > 0 and not last.already_done else None,
        "audit_seq": last.audit_seq,
    }


@command("rotate", "kek", help="new key-encryption key at one node: every data key re-wrapped, the old key retired",
         arguments=_arguments)
def _rotate_kek(args) -> Result:
    try:
        target = auditor.from_args(args)
        target.node(args.node)
    except auditor.TargetError as exc:
        raise CliError(str(exc)) from None
    names = {v: k.removeprefix("PHASE_").lower() for k, v in shareholder_pb2.RotateKekResponse.Phase.items()}
    bar = _Bar(args.format == "text" and not args.no_progress and sys.stderr.isatty(), args.node)
    try:
        data = rotate_kek(target, args.node, session=args.session, batch_size=args.batch_size, pause_ms=args.pause_ms,
                          on_progress=lambda msg: bar.update(msg, names.get(msg.phase, "")))
    finally:
        bar.close()
    retired = ", ".join(str(v) for v in data["retired_versions"]) or "none"
    if data["already_done"]:
        line = (f"{data['node']}: session {data['session_id']} had already finished: KEK version {data['to_version']} "
                f"active, retired {retired}")
    else:
        rate = f", {data['rate_per_s']:,.0f} rows/s" if data["rate_per_s"] else ""
        resumed = " (resumed an unfinished rotation)" if data["resumed"] else ""
        line = (f"{data['node']}: KEK version {data['to_version']} active{resumed}; {data['rewrapped']} data keys "
                f"re-wrapped in {data['batches']} batches ({data['seconds']:.2f} s{rate}); retired version(s) {retired}; "
                f"session {data['session_id']}")
    return Result(data, [line])
