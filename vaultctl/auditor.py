"""What an auditor's command talks to: the nodes, their trust anchors, and
the auditor's own TLS identity. From a cluster directory (``--dir``) or an
auditor config of a real deployment (``--config``, docs/operations.md):

```toml
[auditor]
threshold = 2                       # k of the committee (audit reconcile)
cluster_id = "splitvault-..."        # the cluster id, the tickets' audience (audit reconcile)
timeout_s = 30                      # deadline of each unary call (optional)
state_dir = "/var/lib/vaultctl"     # session ids and audit witnesses (optional)

[tls]                               # the auditor's client certificate (role auditor)
ca = "/etc/splitvault/ca.pem"
cert = "/etc/splitvault/auditor-alice.pem"
key = "/etc/splitvault/auditor-alice.key"

[[shareholders]]
name = "bank-a"
index = 1
address = "bank-a.vault.example:7443"
audit_public_key = "<64 hex: the node's Ed25519 audit key, from its operator>"

[tenants.acme]
ticket_keys = { "acme-1" = "<64 hex: the provider's ticket public key>" }
```

The node and tenant public keys are the trust anchors of ``vaultctl
audit``: always the ones recorded here (or in cluster.json's ``trust``),
never what a node reports about itself.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vault import pki
from vault.pki import ROLE_SHAREHOLDER, Identity
from vaultctl import cluster
from vaultrpc import config as rpcconfig
from vaultrpc.tls import TlsFiles, secure_channel

if TYPE_CHECKING:
    from shareholders import storage

DEFAULT_TIMEOUT_S = 30.0


class TargetError(ValueError):
    """The cluster directory or auditor config is unusable (one sentence)."""


@dataclass(frozen=True)
class NodeRef:
    name: str
    index: int
    address: str | None  # None: not running (cluster dir)
    audit_key: bytes | None  # raw Ed25519 public key recorded for it
    # A dev cluster's store, for offline reads: its SQLite file, or its
    # PostgreSQL database (a shareholders.storage.Location).
    db_path: "pathlib.Path | storage.Location | None" = None
    retired: bool = False  # left the committee (reshare); its log stays auditable


@dataclass(frozen=True)
class AuditorTarget:
    source: str  # the --dir or --config path
    tls: TlsFiles
    nodes: tuple[NodeRef, ...]
    threshold: int
    # tenant -> key id -> raw Ed25519 ticket public key
    ticket_keys: dict[str, dict[str, bytes]] = field(default_factory=dict)
    state_dir: pathlib.Path = pathlib.Path(".")
    timeout_s: float = DEFAULT_TIMEOUT_S
    # The tickets' audience (audit reconcile); empty: none is accepted.
    cluster_id: str = ""

    def node(self, name: str) -> NodeRef:
        for node in self.nodes:
            if node.name == name:
                return node
        raise TargetError(f"There is no shareholder named {name!r}; the committee is {', '.join(n.name for n in self.nodes)}.")

    def select(self, name: str | None) -> tuple[NodeRef, ...]:
        return self.nodes if name is None else (self.node(name),)


def _hex_key(value, what: str) -> bytes:
    """Raw 32 bytes of an Ed25519 public key given as 64 hex characters."""
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        raw = bytes.fromhex(value)
        pki.load_public_key(raw)  # a usable Ed25519 key
    except ValueError:
        raise TargetError(f"The {what} is not 64 hex characters of an Ed25519 public key.") from None
    return raw


def from_cluster_dir(root: str | os.PathLike) -> AuditorTarget:
    try:
        spec = cluster.load_spec(root)
        trust = cluster.load_trust(root)
    except cluster.ClusterError as exc:
        raise TargetError(str(exc)) from None
    paths = cluster.Paths(root)
    try:
        retired = [n for n in json.loads(paths.spec.read_text()).get("retired") or [] if n not in spec.nodes]
    except (OSError, ValueError, AttributeError):
        retired = []
    nodes = []
    for i, name in [*enumerate(spec.nodes, start=1), *((0, n) for n in retired)]:
        ready = cluster._read_json(paths.ready(spec, name))
        pid = cluster._read_pid(paths.pid(spec, name))
        alive = pid is not None and cluster._alive(pid, paths.config(spec, name))
        address = ready.get("address") if ready and alive and ready.get("pid") == pid else None
        recorded = trust["audit_keys"].get(name)
        nodes.append(NodeRef(
            name, i, address, _hex_key(recorded, f"audit key of {name} in cluster.json") if recorded else None,
            cluster.node_store(paths, name), retired=i == 0,
        ))
    tickets = {
        tenant: {kid: _hex_key(v, f"ticket key {kid} in cluster.json") for kid, v in keys.items()}
        for tenant, keys in trust["ticket_keys"].items()
    }
    return AuditorTarget(
        source=str(paths.root), tls=paths.tls(pki.ROLE_AUDITOR, spec.auditor), nodes=tuple(nodes),
        threshold=spec.threshold, ticket_keys=tickets, state_dir=paths.root / "maintenance",
        cluster_id=json.loads(paths.spec.read_text()).get("cluster_id") or "",
    )


def from_config(path: str | os.PathLike) -> AuditorTarget:
    path = pathlib.Path(path)
    try:
        data = rpcconfig.read(path)
        tls = rpcconfig.tls_files(data, path.resolve().parent)
    except rpcconfig.ConfigError as exc:
        raise TargetError(f"{exc} ({path})") from None
    section = data.get("auditor") if isinstance(data.get("auditor"), dict) else {}
    try:
        table = rpcconfig.shareholder_table(data, index_required=False)
    except rpcconfig.ConfigError as exc:
        raise TargetError(f"{exc} ({path})") from None
    nodes = []
    for e in table:
        key = e.entry.get("audit_public_key")
        nodes.append(NodeRef(e.name, e.index, e.address, _hex_key(key, f"audit_public_key of {e.name}") if key else None))
    threshold = section.get("threshold", 2)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(nodes):
        raise TargetError(f"The value auditor.threshold in {path} must be from 1 to the number of shareholders.")
    timeout = section.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise TargetError(f"The value auditor.timeout_s in {path} must be a positive number.")
    tickets: dict[str, dict[str, bytes]] = {}
    for tenant, tsec in (data.get("tenants") or {}).items():
        keys = tsec.get("ticket_keys") if isinstance(tsec, dict) else None
        if not isinstance(keys, dict):
            raise TargetError(f"The value tenants.{tenant}.ticket_keys in {path} must map key ids to public keys.")
        tickets[tenant] = {str(k): _hex_key(v, f"ticket key tenants.{tenant}.{k}") for k, v in keys.items()}
    try:
        state = rpcconfig.get(data, "auditor.state_dir", None, str)
    except rpcconfig.ConfigError as exc:
        raise TargetError(f"{exc} ({path})") from None
    state_dir = rpcconfig.resolve_path(state, "auditor.state_dir", path.resolve().parent) if state else (
        pathlib.Path(os.environ.get("XDG_STATE_HOME") or pathlib.Path.home() / ".local" / "state") / "vaultctl"
    )
    return AuditorTarget(
        source=str(path), tls=tls, nodes=tuple(nodes), threshold=threshold, ticket_keys=tickets,
        state_dir=state_dir, timeout_s=float(timeout), cluster_id=str(section.get("cluster_id") or ""),
    )


def from_args(args) -> AuditorTarget:
    """The target of a ``--dir`` / ``--config`` command."""
    return from_cluster_dir(args.dir) if getattr(args, "dir", None) is not None else from_config(args.config)


def channel(target: AuditorTarget, node: NodeRef):
    """An mTLS channel to ``node`` with the auditor's certificate."""
    if node.address is None:
        raise TargetError(f"Shareholder {node.name} is not running.")
    return secure_channel(node.address, target.tls.load(), expect=Identity(ROLE_SHAREHOLDER, node.name))
