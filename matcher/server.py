"""Start the matcher: harden the process, open the committee's channels,
serve ``splitvault.v1.Matcher`` over mutual TLS and write the ready file."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
from dataclasses import dataclass, field

from matcher.committee import Committee
from matcher.config import MatcherConfig
from matcher.identify import BATCH_WORKERS
from matcher.service import MatcherService
from splitvault.v1 import matcher_pb2, matcher_pb2_grpc
from vault.pki import ROLE_MATCHER, ROLE_PSP, server_identity_from_pem
from vaultrpc import logs
from vaultrpc import server as rpcserver
from vaultrpc.files import write_atomic
from vaultrpc.metrics import serve_metrics
from vaultrpc.server import harden_process
from vaultrpc.tls import MAX_MESSAGE_BYTES

SERVICE_NAME = matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].full_name
# The largest legitimate message on the public port is an EnrollBatches
# request: up to this many templates (vaultctl's client sends 128) of
# ``dimension`` floats, at most 4 bytes each plus ids and framing.
MAX_TEMPLATES_PER_MESSAGE = 256
_PER_TEMPLATE_OVERHEAD = 512
_MIN_RECEIVE_BYTES = 4 * 1024 * 1024  # gRPC's own default


def max_receive_bytes(dimension: int) -> int:
    """The matcher's receive limit: the largest legitimate request, not 64 MiB,
    so that a PSP's many concurrent calls cannot pin gigabytes."""
    largest = MAX_TEMPLATES_PER_MESSAGE * (4 * int(dimension) + _PER_TEMPLATE_OVERHEAD)
    return min(MAX_MESSAGE_BYTES, max(_MIN_RECEIVE_BYTES, largest))
# Deny by default: only payment providers call the matcher.
ROLES = {
    f"/{SERVICE_NAME}/{method}": frozenset({ROLE_PSP})
    for method in ("Enroll", "EnrollStream", "EnrollBatches", "Verify", "Delete", "Identify", "IdentifyBatch")
}


class _Switch(matcher_pb2_grpc.MatcherServicer):
    """The servicer gRPC calls: it hands each call to the current
    MatcherService, so that a reload (a new committee after a reshare)
    swaps the service between calls and a call in flight finishes on the
    committee it started with."""

    def __init__(self, service: MatcherService):
        self.current = service


for _method in matcher_pb2.DESCRIPTOR.services_by_name["Matcher"].methods:
    setattr(_Switch, _method.name,
            lambda self, request, context, _name=_method.name: getattr(self.current, _name)(request, context))


@dataclass
class MatcherRunning(rpcserver.Running):
    """A started matcher: its port, metrics port and servicer, and how to stop it."""

    metrics_port: int | None = None
    service: MatcherService | None = None
    _switch: _Switch | None = None
    _ready: dict = field(default_factory=dict)
    _logger: logging.Logger | None = None
    _reload_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reload(self, config: MatcherConfig, *, config_sha256: str | None = None) -> None:
        """Switch to a new committee, threshold and tenant table (SIGHUP).

        A new MatcherService with its own channels takes every call from now
        on; calls already running finish on the old one, whose channels close
        once its call deadline has passed. listen, TLS and metrics settings
        need a restart. The ready file is rewritten with the new committee
        and config digest, which is how ``vaultctl reshare`` sees the switch.
        """
        log = self._logger or logging.getLogger("matcher")
        with self._reload_lock:
            tls = config.tls.load()
            committee = Committee(
                config.shareholders, tls, config.call_timeout_s, max_in_flight=min(512, config.max_workers * config.n),
                readers=_readers(config),
            )
            new = MatcherService(config, committee, log)
            old = self._switch.current
            self._switch.current = new
            self.service = new
            timer = threading.Timer(old.cfg.call_timeout_s + 5.0, old.committee.close)
            timer.daemon = True
            timer.start()
            self.on_stop.append(new.committee.close)
            if config.ready_file:
                self._ready.update(_committee_fields(config, config_sha256))
                write_ready_file(config.ready_file, self._ready)
        logs.event(log, "matcher reloaded", threshold=config.threshold,
                   shareholders=[e.name for e in config.shareholders], config_sha256=config_sha256)


def _readers(config) -> int:
    """Identify stream readers one matcher may need at once: every handler
    thread in an IdentifyBatch, its BATCH_WORKERS queries reading two of
    their three streams on the pool (the third on the query's own thread)."""
    return config.max_workers * BATCH_WORKERS * 2


def _committee_fields(config: MatcherConfig, config_sha256: str | None) -> dict:
    return {
        "threshold": config.threshold,
        "committee": [{"name": e.name, "index": e.index, "address": e.address} for e in config.shareholders],
        "config_sha256": config_sha256,
    }


def write_ready_file(path: str, payload: dict) -> None:
    """Write JSON atomically (tmp + rename) so a reader never sees half a file."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, json.dumps(payload, sort_keys=True) + "\n")


def serve(config: MatcherConfig, *, logger: logging.Logger | None = None, harden: bool = True,
          config_sha256: str | None = None) -> MatcherRunning:
    """Start a matcher (``listen`` may use port 0) and return it running."""
    log = logger or logging.getLogger("matcher")
    if harden:
        harden_process(log)
    tls = config.tls.load()
    served = server_identity_from_pem(tls.cert)
    if served is None or served.role != ROLE_MATCHER:
        raise ValueError(
            f"The certificate {config.tls.cert} is not a matcher server certificate (URI and DNS identity names "
            f"and serverAuth): clients would refuse it (docs/operations.md, Server identity)."
        )
    committee = Committee(
        config.shareholders, tls, config.call_timeout_s, max_in_flight=min(512, config.max_workers * config.n),
        readers=_readers(config),
    )
    service = MatcherService(config, committee, log)
    switch = _Switch(service)
    try:
        running = rpcserver.start(
            listen=config.listen,
            tls=tls,
            register=(lambda server: matcher_pb2_grpc.add_MatcherServicer_to_server(switch, server),),
            service_names=(SERVICE_NAME,),
            roles=ROLES,
            logger=log,
            max_workers=config.max_workers,
            max_receive_bytes=max_receive_bytes(config.dimension),
        )
    except Exception:
        committee.close()
        raise
    metrics_port = serve_metrics(config.metrics_host, config.metrics_port)
    result = MatcherRunning(
        running.server, running.port, running.health, running.service_names,
        metrics_port=metrics_port, service=service, _switch=switch, _logger=log,
    )
    result.on_stop.append(committee.close)
    host = config.listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    address = f"{host}:{running.port}"
    result._ready = {"name": "matcher", "address": address, "port": running.port, "metrics_port": metrics_port,
                     "pid": os.getpid(), **_committee_fields(config, config_sha256)}
    if config.ready_file:
        write_ready_file(config.ready_file, result._ready)
    logs.event(
        log, "matcher serving", address=address, metrics_port=metrics_port, threshold=config.threshold,
        shareholders=[e.name for e in config.shareholders], dimension=config.dimension,
    )
    return result
