"""Helpers to stand up throw-away nodes and watch them: for tests and benchmarks only.

``write_node_files`` writes a node's KEK file, audit key and ``node.toml``
(the docs/contracts.md format) into a folder, with key files at mode 0600;
``sample_records`` makes well-formed share records of random field elements
(not shares of any real template).
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from splitvault.v1 import common_pb2, shareholder_pb2, shareholder_pb2_grpc
from vault import envelope, pki, record, rng, ticket
from vaultrpc import wire
from vaultrpc.tls import TlsFiles, secure_channel

# The cluster id (tickets' audience) of throw-away nodes.
CLUSTER_ID = "test-cluster"


def write_dev_pki(folder: pathlib.Path, parties: list[tuple[str, str]]) -> dict[tuple[str, str], TlsFiles]:
    """A throw-away CA and one certificate per (role, name), keys at 0600."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki.make_ca()
    (folder / "ca.pem").write_bytes(ca_cert)
    out = {}
    for role, name in parties:
        cert, key = pki.issue_cert(ca_cert, ca_key, role, name)
        (folder / f"{role}-{name}.pem").write_bytes(cert)
        _write_secret(folder / f"{role}-{name}.key", key)
        out[(role, name)] = TlsFiles(str(folder / "ca.pem"), str(folder / f"{role}-{name}.pem"), str(folder / f"{role}-{name}.key"))
    return out


def _write_secret(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def kek_json(keys: Mapping[int, bytes], active: int) -> str:
    return json.dumps({"active": active, "keys": {str(v): k.hex() for v, k in keys.items()}})


def write_node_files(
    folder: pathlib.Path,
    *,
    name: str,
    index: int,
    tls: TlsFiles,
    tenants: Mapping[str, Mapping[str, bytes]],
    listen: str = "127.0.0.1:0",
    metrics_port: int = -1,
    attempts_per_subject: int = 10,
    attempt_window_s: float = 60,
    extra: str = "",
    kek: Mapping[int, bytes] | None = None,
    kek_active: int | None = None,
    cluster_id: str = CLUSTER_ID,
) -> pathlib.Path:
    """Write a node's config and keys under ``folder``; returns the node.toml path.

    ``tenants`` maps tenant ids to {key id: raw 32-byte Ed25519 public key}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    kek = dict(kek or {1: envelope.new_kek()})
    _write_secret(folder / "kek.json", kek_json(kek, kek_active or max(kek)).encode())
    audit_pem, _ = pki.new_signing_key()
    _write_secret(folder / "audit.key", audit_pem)
    lines = [
        "[node]",
        f'name = "{name}"',
        f'cluster_id = "{cluster_id}"',
        f"index = {index}",
        f'listen = "{listen}"',
        f'data_dir = "{folder / "data"}"',
        f'ready_file = "{folder / "ready.json"}"',
        'log_level = "WARNING"',
        "",
        "[tls]",
        f'ca = "{tls.ca}"',
        f'cert = "{tls.cert}"',
        f'key = "{tls.key}"',
        "",
        "[keys]",
        f'kek_file = "{folder / "kek.json"}"',
        f'audit_key_file = "{folder / "audit.key"}"',
        "",
        "[metrics]",
        'host = "127.0.0.1"',
        f"port = {metrics_port}",
        "",
        "[limits]",
        f"attempts_per_subject = {attempts_per_subject}",
        f"attempt_window_s = {attempt_window_s}",
        "",
    ]
    for tenant, keys in tenants.items():
        inner = ", ".join(f'"{kid}" = "{raw.hex()}"' for kid, raw in keys.items())
        lines += [f"[tenants.{tenant}]", f"ticket_keys = {{ {inner} }}", ""]
    path = folder / "node.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def sample_records(
    tenant: str,
    subjects: list[str],
    *,
    index: int,
    shareholders: int = 3,
    threshold: int = 2,
    dimension: int = 16,
    epoch: int = 1,
    request_id: str | None = None,
) -> list[common_pb2.ShareRecord]:
    """One well-formed record per subject for shareholder ``index`` (uniform
    field elements from the CSPRNG seam, like every share value)."""
    width = dimension + record.MAC_COUNT
    out = []
    for subject in subjects:
        shares = rng.random_field((shareholders, width))
        recs = record.make_records(
            tenant=tenant, subject=subject, epoch=epoch, threshold=threshold, shareholders=shareholders,
            dimension=dimension, request_id=request_id or f"enrol-{subject}", shares=shares,
        )
        out.append(wire.share_message(recs[index - 1]))
    return out


def deal_first_key(nodes: list[tuple[str, int, str]], threshold: int, auditor_tls: TlsFiles,
                   state_dir: pathlib.Path | None = None, width: int = 16) -> dict:
    """Have throw-away nodes ((name, index, address) each) deal their first
    MAC key, as ``vaultctl cluster up`` does, with the auditor's certificate."""
    from vaultctl.maintenance import Node
    from vaultctl.refresh import deal_first_key as deal

    return deal([Node(n, i, a) for n, i, a in nodes], threshold, auditor_tls.load(), width)


@dataclass
class Provider:
    """A payment provider's ticket signing key (the PSP's side of a ticket)."""

    tenant: str
    key_id: str
    key: ed25519.Ed25519PrivateKey
    public: bytes

    @classmethod
    def new(cls, tenant: str, key_id: str | None = None) -> "Provider":
        pem, public = pki.new_signing_key()
        return cls(tenant, key_id or f"{tenant}-1", pki.load_signing_key(pem), public)

    def ticket(
        self, subject: str, request_id: str | None = None, *, tenant: str | None = None, ttl_ms: int = 60_000,
        issued_at_ms: int | None = None, audience: str = CLUSTER_ID,
    ) -> common_pb2.VerificationTicket:
        return wire.issue_ticket(
            self.key, self.key_id, tenant=tenant or self.tenant, subject=subject,
            request_id=request_id or f"verify-{secrets.token_hex(8)}", probe=np.zeros(4, dtype=np.float32),
            ttl_ms=ttl_ms, issued_at_ms=issued_at_ms, audience=audience,
        )

    def write_ticket(
        self, operation: int, subject: str, request_id: str, *, template=None, tenant: str | None = None,
        audience: str = CLUSTER_ID, ttl_ms: int = 60_000,
    ) -> common_pb2.VerificationTicket:
        """An ENROLL / REPLACE (binding ``template``, zeros by default) or DELETE ticket."""
        if operation in ticket.WRITES and template is None:
            template = np.zeros(4, dtype=np.float32)
        return wire.issue_ticket(
            self.key, self.key_id, tenant=self.tenant if tenant is None else tenant, subject=subject,
            request_id=request_id, audience=audience, operation=operation, template=template, ttl_ms=ttl_ms,
        )

    def store_tickets(self, records, replace: bool = False) -> list[common_pb2.VerificationTicket]:
        """One write ticket per share record (what the matcher forwards with a store)."""
        op = ticket.write_operation(replace)
        return [self.write_ticket(op, r.subject, r.request_id, tenant=r.tenant) for r in records]

    def store_request(self, records, replace: bool = False) -> shareholder_pb2.StoreSharesRequest:
        """A StoreSharesRequest carrying this provider's write ticket for each record."""
        records = list(records)
        return shareholder_pb2.StoreSharesRequest(records=records, replace=replace,
                                                  tickets=self.store_tickets(records, replace))

    def stream_request(self, records, replace: bool = False) -> shareholder_pb2.StoreShareStreamRequest:
        """One StoreShareStream message, with a write ticket for each record."""
        records = list(records)
        return shareholder_pb2.StoreShareStreamRequest(records=records, replace=replace,
                                                       tickets=self.store_tickets(records, replace))

    def delete_request(self, subject: str, request_id: str, *, tenant: str | None = None,
                       **kw) -> shareholder_pb2.DeleteSharesRequest:
        """A DeleteSharesRequest with this provider's DELETE ticket."""
        tenant = self.tenant if tenant is None else tenant
        return shareholder_pb2.DeleteSharesRequest(
            tenant=tenant, subject=subject, request_id=request_id,
            ticket=self.write_ticket(ticket.DELETE, subject, request_id, tenant=tenant, **kw))


class NodeHarness:
    """One node's files under a folder, started in-process, with role stubs.

    ``tls_files(role, name) -> TlsFiles`` hands out certificates (the tests'
    DevPki). Every channel opened through ``stub`` is closed by ``close``.
    """

    def __init__(
        self, folder: pathlib.Path, tls_files: Callable[[str, str], TlsFiles], providers: list[Provider], *,
        name: str = "bank-a", index: int = 1, **node_options,
    ):
        self.folder = folder
        self.tls_files = tls_files
        self.name = name
        if (folder / "node.toml").exists() and not node_options.pop("fresh", False):
            self.config_path = folder / "node.toml"  # an existing node: keep its keys and data
        else:
            self.config_path = write_node_files(
                folder, name=name, index=index, tls=tls_files("shareholder", name),
                tenants={p.tenant: {p.key_id: p.public} for p in providers}, **node_options,
            )
        self.running = None
        self._channels: list[grpc.Channel] = []

    @property
    def db_path(self) -> pathlib.Path:
        return self.folder / "data" / "shares.db"

    def start(self, env: dict[str, str] | None = None):
        from shareholders.config import load_config
        from shareholders.server import serve

        self.running = serve(load_config(self.config_path, env=env or {}), env=env or {}, harden=False)
        return self.running

    def stop(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self.running is not None:
            self.running.stop(0)
            self.running = None

    close = stop

    def stub(self, role: str, name: str = "t1") -> shareholder_pb2_grpc.ShareholderStub:
        ch = secure_channel(self.running.address, self.tls_files(role, name).load(),
                            expect=pki.Identity(pki.ROLE_SHAREHOLDER, self.name))
        self._channels.append(ch)
        return shareholder_pb2_grpc.ShareholderStub(ch)

    def audit_public_key(self) -> bytes:
        return pki.public_key_raw(pki.load_signing_key((self.folder / "audit.key").read_bytes()))


# --- watching a running node ---------------------------------------------------------


def audit_entries(db: pathlib.Path) -> list[dict]:
    """Every entry of a node's stored audit log (read-only, the node may run)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT seq, event, actor, request_id, tenant, subject, details_json FROM audit_log ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    return [
        {"seq": r[0], "event": r[1], "actor": r[2], "request_id": r[3], "tenant": r[4], "subject": r[5],
         **{f"d_{k}": v for k, v in json.loads(r[6]).items()}}
        for r in rows
    ]


def audit_events(db: pathlib.Path) -> list[str]:
    """The event names of a node's stored audit log, in order."""
    return [e["event"] for e in audit_entries(db)]


def wait_until(predicate, timeout_s: float = 20.0, every_s: float = 0.02):
    """Poll ``predicate`` until it returns something true, and return that;
    AssertionError after ``timeout_s`` (a bound for a hung test, not a
    speed requirement)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not reached within {timeout_s} s")
        time.sleep(every_s)
