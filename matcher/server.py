"""Start the matcher: harden the process, open the committee's channels,
serve ``splitvault.v1.Matcher`` over mutual TLS and write the ready file."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import pathlib
import resource
from dataclasses import dataclass

from matcher.committee import Committee
from matcher.config import MatcherConfig
from matcher.service import MatcherService
from splitvault.v1 import matcher_pb2, matcher_pb2_grpc
from vault.pki import ROLE_PSP
from vaultrpc import logs
from vaultrpc import server as rpcserver
from vaultrpc.metrics import serve_metrics

SERVICE_NAME = matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].full_name
# Deny by default: only payment providers call the matcher.
ROLES = {
    f"/{SERVICE_NAME}/{method}": frozenset({ROLE_PSP})
    for method in ("Enroll", "EnrollStream", "EnrollBatches", "Verify", "Delete")
}
_PR_SET_DUMPABLE = 4


@dataclass
class MatcherRunning(rpcserver.Running):
    """A started matcher: its port, metrics port and servicer, and how to stop it."""

    metrics_port: int | None = None
    service: MatcherService | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def harden_process(logger: logging.Logger | None = None) -> dict[str, bool]:
    """Keep rejoined templates out of core files (best effort, documented).

    RLIMIT_CORE = 0 stops the kernel writing a core file; PR_SET_DUMPABLE = 0
    (Linux) also refuses core dumps and ptrace attachment by other processes
    of the same user. Either may be unavailable; what took effect is returned
    and logged.
    """
    done = {"rlimit_core": False, "not_dumpable": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["rlimit_core"] = True
    except (ValueError, OSError):
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done["not_dumpable"] = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        pass
    if logger is not None:
        logs.event(logger, "process hardened", **done)
    return done


def write_ready_file(path: str, payload: dict) -> None:
    """Write JSON atomically (tmp + rename) so a reader never sees half a file."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True) + "\n")
    os.replace(tmp, target)


def serve(config: MatcherConfig, *, logger: logging.Logger | None = None, harden: bool = True) -> MatcherRunning:
    """Start a matcher (``listen`` may use port 0) and return it running."""
    log = logger or logging.getLogger("matcher")
    if harden:
        harden_process(log)
    tls = config.tls.load()
    committee = Committee(
        config.shareholders, tls, config.call_timeout_s, max_in_flight=min(512, config.max_workers * config.n)
    )
    service = MatcherService(config, committee, log)
    try:
        running = rpcserver.start(
            listen=config.listen,
            tls=tls,
            register=(lambda server: matcher_pb2_grpc.add_MatcherServicer_to_server(service, server),),
            service_names=(SERVICE_NAME,),
            roles=ROLES,
            logger=log,
            max_workers=config.max_workers,
        )
    except Exception:
        committee.close()
        raise
    metrics_port = serve_metrics(config.metrics_host, config.metrics_port)
    result = MatcherRunning(
        running.server, running.port, running.health, running.service_names,
        metrics_port=metrics_port, service=service,
    )
    result.on_stop.append(committee.close)
    host = config.listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    address = f"{host}:{running.port}"
    if config.ready_file:
        write_ready_file(
            config.ready_file,
            {"name": "matcher", "address": address, "port": running.port, "metrics_port": metrics_port,
             "pid": os.getpid()},
        )
    logs.event(
        log, "matcher serving", address=address, metrics_port=metrics_port, threshold=config.threshold,
        shareholders=[e.name for e in config.shareholders], dimension=config.dimension,
    )
    return result
