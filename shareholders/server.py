"""Assemble and start a node: ``serve(config) -> NodeRunning``.

Usable in-process (tests, benchmarks: ``listen = "127.0.0.1:0"``) and by
``python -m shareholders``. Start-up order: keys and TLS material are read
(ConfigError on any problem), the database is opened and migrated, the
node's identity checked against it, the replay set and attempt counters
rebuilt from the audit log, a ``start`` entry committed, the gRPC server
bound and started, metrics served, and only then the ready file written
(atomically). ``stop()`` drains in-flight calls, commits a ``stop`` entry,
signs the audit head and closes the database.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from dataclasses import dataclass, field

from shareholders import storage
from shareholders.audit_log import AuditWriter, WriterClosed, now_ms
from shareholders.config import ConfigError, NodeConfig, NodeKeys, load_keys
from shareholders import epochs, identify, witness
from shareholders.service import AUDIT_HEAD, ROLES, SERVICE, ShareholderService
from splitvault.v1 import admin_pb2_grpc, identify_pb2_grpc, shareholder_pb2_grpc
from vault import envelope, pki, record
from vault.errors import EnvelopeError
from vaultrpc import logs
from vaultrpc import server as rpcserver
from vaultrpc.files import write_atomic
from vaultrpc.metrics import serve_metrics

_log = logging.getLogger("shareholders")


@dataclass
class NodeRunning:
    """A started node."""

    cfg: NodeConfig
    rpc: rpcserver.Running
    service: ShareholderService
    metrics_port: int | None
    address: str
    _extra_stops: list = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.rpc.port

    @property
    def name(self) -> str:
        return self.cfg.name

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds), then close the log cleanly."""
        self.rpc.stop(grace)

    def wait(self) -> None:
        self.rpc.wait()


def _advertised(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_ready_file(path: pathlib.Path, info: dict) -> None:
    """Write JSON atomically: a reader sees the old file, none, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(info, sort_keys=True) + "\n")


def _remove_stale(path: pathlib.Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def check_kek(db: storage.Database, keys: NodeKeys, cfg: NodeConfig) -> None:
    """Refuse to start on a KEK ring that opens none of the sampled stored
    shares of some KEK version in use.

    Without this, a node restarted with the wrong key file (or with a key
    retired too early) starts, answers every release with DATA_LOSS and,
    worse, seals NEW enrolments under the wrong key with the same version
    number, so that they become unreadable once the right file is back
    (tests/test_faults_nodes.py). Up to eight rows per version, spread over
    the table, are tried and one that opens is enough: damaged rows never
    stop a node; they stay DATA_LOSS at release. A lone row that does not
    open cannot tell a wrong key from a damaged row, so it is only logged.
    """
    def opens(row: storage.ShareRow) -> bool:
        try:
            envelope.open(keys.kek, record.record_identity(row.tenant, row.subject, row.index, row.epoch), row.sealed)
        except (EnvelopeError, ValueError):
            return False
        return True

    source = cfg.kek_file or "the environment variable SPLITVAULT_KEK_JSON"
    for version, rows in db.sample_rows_by_kek().items():
        if any(opens(row) for row in rows):
            continue
        message = (
            f"The KEK ring from {source} opens none of the {len(rows)} sampled stored shares under KEK version "
            f"{version}; the key file is wrong or that version was retired too early."
        )
        if len(rows) >= 2:
            raise ConfigError(message)
        logs.event(_log, "stored share does not open at start-up", logging.ERROR, node=cfg.name, detail=message)


def serve(cfg: NodeConfig, *, keys: NodeKeys | None = None, env: dict[str, str] | None = None,
          harden: bool = True) -> NodeRunning:
    """Start a node from its config; raises ConfigError for bad keys or TLS files.

    ``harden`` disables core dumps first (``vaultrpc.server.harden_process``):
    a node holds its KEK ring and opens shares in memory. In-process test
    nodes pass False, so as not to change the test runner's own process."""
    if harden:
        rpcserver.harden_process(_log)
    keys = keys or load_keys(cfg, env)
    try:
        tls = cfg.tls.load()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if pki.server_identity_from_pem(tls.cert) != pki.Identity(pki.ROLE_SHAREHOLDER, cfg.name):
        raise ConfigError(
            f"The certificate {cfg.tls.cert} is not a server certificate of shareholder/{cfg.name} (its URI and "
            f"DNS identity names and serverAuth): clients would refuse it (docs/operations.md, Server identity)."
        )
    # A ready file from a previous run must not point anyone at a dead port.
    _remove_stale(cfg.ready_file)
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"Cannot create the data directory {cfg.data_dir}: {exc.strerror}.") from None

    # Whose database is this? Checked before anything else reads it.
    storage.migrate(cfg.store)
    db = storage.connect(cfg.store)
    try:
        state = db.init_node_state(cfg.name, cfg.index, now_ms())
        check_kek(db, keys, cfg)
    finally:
        db.close()
    head_gauge = AUDIT_HEAD.labels(cfg.name)
    # Signed checkpoints go to the peers as they are made (shareholders.witness).
    publisher = witness.Publisher(cfg.name, cfg.witness_peers, tls)
    writer = AuditWriter(
        cfg.store, cfg.name, keys.audit_key,
        checkpoint_every=cfg.checkpoint_every, checkpoint_interval_s=cfg.checkpoint_interval_s,
        on_commit=head_gauge.set, on_checkpoint=publisher.offer,
    )
    service = None
    try:
        service = ShareholderService(cfg, keys, writer, state)
        rebuilt = service.rebuild_guard()
        actor = f"shareholder/{cfg.name}"
        try:
            writer.run(lambda tx: tx.append(
                "start", actor=actor,
                details={"index": cfg.index, "epoch": state.current_epoch, "kek_version": keys.kek.active,
                         "kek_versions": list(keys.kek.versions), "tenants": sorted(cfg.tenants)[:64]},
            ))
        except WriterClosed as exc:  # the store's own reason ("readonly database", ...) for "cannot start"
            raise (exc.__cause__ or exc) from None
        head_gauge.set(writer.head_seq)
        # Refresh and reshare sessions (shareholders.epochs): auditor and peer RPCs.
        maintenance = epochs.MaintenanceService(service)
        # Identify on shares (shareholders.identify): matcher queries and peer rounds.
        ident = identify.IdentifyService(service)
        ident.rebuild_guard()
        rpc = rpcserver.start(
            listen=cfg.listen,
            tls=tls,
            register=(
                lambda s: shareholder_pb2_grpc.add_ShareholderServicer_to_server(service, s),
                lambda s: admin_pb2_grpc.add_ShareholderAdminServicer_to_server(maintenance, s),
                lambda s: identify_pb2_grpc.add_ShareholderIdentifyServicer_to_server(ident, s),
            ),
            service_names=(SERVICE, epochs.SERVICE, identify.SERVICE),
            roles={**ROLES, **epochs.ROLES, **identify.ROLES},
            logger=_log,
            max_workers=cfg.max_workers,
            unavailable=storage.unavailable_errors(cfg.store),
        )
    except BaseException:
        writer.close()
        publisher.close(0)
        if service is not None:
            service.close_readers()
        raise

    def close_log() -> None:
        maintenance.close()
        ident.close()
        writer.close(final=lambda tx: tx.append("stop", actor=actor))
        publisher.close()  # the head signed just now, if the peers answer within a moment
        service.close_readers()
        _remove_stale(cfg.ready_file)
        logs.event(_log, "node stopped", node=cfg.name, audit_head_seq=writer.head_seq)

    rpc.on_stop.append(close_log)
    publisher.start()
    ident.preload()
    try:
        metrics_port = serve_metrics(cfg.metrics_host, cfg.metrics_port)
    except OSError as exc:
        rpc.stop(0)
        raise ConfigError(f"Cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc.strerror}.") from None
    address = _advertised(cfg.listen, rpc.port)
    running = NodeRunning(cfg, rpc, service, metrics_port, address)
    if cfg.ready_file is not None:
        write_ready_file(cfg.ready_file, {
            "name": cfg.name, "address": address, "port": rpc.port, "metrics_port": metrics_port, "pid": os.getpid(),
        })
    logs.event(_log, "node serving", node=cfg.name, index=cfg.index, address=address, metrics_port=metrics_port,
               audit_head_seq=writer.head_seq, replay_entries=rebuilt, kek_version=keys.kek.active)
    return running
