"""The node's configuration (docs/contracts.md, "Node config") and its keys.

``load_config`` turns the TOML file (with ``SPLITVAULT_<SECTION>__<KEY>``
environment overrides) into a checked ``NodeConfig``; ``load_keys`` reads the
KEK ring and the audit signing key. Both raise ``ConfigError`` with one
sentence naming the key or file at fault, which ``python -m shareholders``
prints before exiting 1.

Key files must not be readable by group or others (mode & 0o077 == 0): a
node refuses to start on a KEK or audit key another local user could read.
The KEK may instead come from the environment variable SPLITVAULT_KEK_JSON,
holding the same JSON as the file; it then takes precedence.

``[peers]`` is the node's own table of the other nodes' addresses
(``"bank-b" = "HOST:PORT"``). A refresh or reshare dials a known member only
at the address in this table, never at one the auditor's request names, and
expects that member's certificate identity ``shareholder/<name>``.
``load_peers`` reads the table again from the file, so that an operator (or
``vaultctl cluster up``, whose nodes take new ports) can update addresses
without a restart.
"""
from __future__ import annotations

import json
import os
import re
import pathlib
import stat
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import names, pki, ticket
from vault.envelope import KEY_BYTES, KekRing
from vaultrpc import config as rpcconfig
from vaultrpc.config import ConfigError
from vaultrpc.tls import TlsFiles
from shareholders import storage

__all__ = [
    "ConfigError", "NodeConfig", "NodeKeys", "WitnessPeer", "load_config", "load_keys", "load_peers", "parse_kek_json",
]

KEK_ENV = "SPLITVAULT_KEK_JSON"
MAX_INDEX = names.MAX_SHAREHOLDERS
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


@dataclass(frozen=True)
class WitnessPeer:
    """A committee peer that witnesses this node's signed audit checkpoints
    and whose checkpoints this node witnesses (shareholders.witness)."""

    name: str
    audit_key: ed25519.Ed25519PublicKey  # the peer's checkpoint key, pinned here
    address: str | None = None
    # Dev clusters pick ports at start: the address is read from the peer's ready file.
    ready_file: pathlib.Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    name: str
    index: int
    listen: str
    data_dir: pathlib.Path
    tls: TlsFiles
    audit_key_file: str
    kek_file: str | None = None
    ready_file: pathlib.Path | None = None
    log_level: str = "INFO"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1
    attempts_per_subject: int = 10
    attempt_window_s: float = 60.0
    # tenant id -> key id -> the provider's Ed25519 ticket public key
    tenants: dict[str, dict[str, ed25519.Ed25519PublicKey]] = field(default_factory=dict)
    # The cluster this node belongs to: the audience every ticket must name
    # (empty accepts no ticket; the loader requires it).
    cluster_id: str = ""
    # Sign the audit chain head after this many entries or seconds, whichever first.
    checkpoint_every: int = 1000
    checkpoint_interval_s: float = 60.0
    # Records per transaction (and per audit entry) for StoreShareStream.
    stream_batch: int = 1000
    max_workers: int = 32
    # [identify] preload: tenants whose Identify galleries the node loads
    # into memory at start (in the background), not at their first query.
    identify_preload: tuple[str, ...] = ()
    # peer node name -> "HOST:PORT", from [peers]; see load_peers.
    peers: dict[str, str] = field(default_factory=dict)
    # The file this came from: load_peers reads its [peers] again.
    path: pathlib.Path | None = None
    # peer name -> its pinned checkpoint key and address ([[witness.peers]]).
    witness_peers: dict[str, WitnessPeer] = field(default_factory=dict)
    # Committee changes (docs/architecture.md, "Committee changes need the
    # operators"): member node name -> its operator's Ed25519 public key,
    # pinned here; a reshare begins only on a plan k current operators signed.
    operators: dict[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)
    # The founding committee (name -> index) and threshold, used until the
    # node has committed a session (then node_state.committee_json holds it).
    committee: dict[str, int] = field(default_factory=dict)
    committee_threshold: int = 0
    # Each founding member's certificate key (the SHA-256 of its SPKI, hex),
    # from [committee] pins: peer-only calls are answered only to that key.
    # Empty for an old config: callers are then checked by name only.
    committee_pins: dict[str, str] = field(default_factory=dict)
    # [store] backend = "sqlite" (default: <data_dir>/shares.db) or
    # "postgres" with a libpq connection string (dsn, or dsn_env naming the
    # environment variable that holds it, so a password stays out of the file).
    store_backend: str = "sqlite"
    store_dsn: str = field(default="", repr=False)
    store_owner_dsn: str = field(default="", repr=False)

    @property
    def db_path(self) -> pathlib.Path:
        return self.data_dir / "shares.db"

    @property
    def store(self) -> storage.Location:
        """Where this node's store is (``shareholders.storage``)."""
        if self.store_backend == "postgres":
            return storage.Location("postgres", None, self.store_dsn, self.store_owner_dsn)
        return storage.Location("sqlite", self.db_path)


@dataclass
class NodeKeys:
    # A KEK rotation (shareholders.rotation) replaces ``kek`` in place: read
    # ``keys.kek`` where a ring is needed, never keep the ring itself.
    kek: KekRing
    audit_key: ed25519.Ed25519PrivateKey = field(repr=False)
    # The ring came from SPLITVAULT_KEK_JSON, not the node's KEK file: the
    # node cannot rotate it itself.
    kek_from_env: bool = False


def _positive(data: dict[str, Any], key: str, default, kind=int):
    value = rpcconfig.get(data, key, default, (int, float) if kind is float else int)
    if isinstance(value, bool) or value <= 0:
        raise ConfigError(f"The config value {key} must be a positive number.")
    return kind(value)


def _host_port(value, key: str) -> str:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"The config value {key} must be HOST:PORT.")
    return value


def _parse_peers(data: dict[str, Any]) -> dict[str, str]:
    table = rpcconfig.get(data, "peers", {}, dict)
    peers = {}
    for name, address in table.items():
        try:
            names.check_name(name)
        except ValueError:
            raise ConfigError(f"The peer name {name!r} in [peers] is not a valid name.") from None
        peers[name] = _host_port(address, f"peers.{name}")
        if peers[name].endswith(":0"):
            raise ConfigError(f"The config value peers.{name} must name the peer's real port, not 0.")
    return peers


# Config path -> ((file text, overrides), peer table): the file is read on
# every call, parsed only when its text or the overrides changed.
_PEER_TABLES: dict[str, tuple[tuple, dict[str, str]]] = {}


def load_peers(cfg: NodeConfig, env: dict[str, str] | None = None) -> dict[str, str]:
    """The node's peer table as its config file holds it now (peer name -> HOST:PORT)."""
    if cfg.path is None:
        return dict(cfg.peers)
    env = os.environ if env is None else env
    overrides = tuple(sorted((k, v) for k, v in env.items() if k.startswith(rpcconfig.ENV_PREFIX) and k != KEK_ENV))
    key = (rpcconfig.read_text(cfg.path), overrides)
    cached = _PEER_TABLES.get(str(cfg.path))
    if cached is None or cached[0] != key:
        data = rpcconfig.parse(key[0], cfg.path)
        rpcconfig.apply_env(data, dict(overrides))
        cached = (key, _parse_peers(data))
        _PEER_TABLES[str(cfg.path)] = cached
    return dict(cached[1])


def _preload(data: dict[str, Any], tenants: dict) -> tuple[str, ...]:
    """[identify] preload: registered tenants, each named once."""
    names_ = rpcconfig.get(data, "identify.preload", [], list)
    if not all(isinstance(t, str) for t in names_) or len(set(names_)) != len(names_):
        raise ConfigError("The config value identify.preload must be a list of distinct tenant names.")
    unknown = [t for t in names_ if t not in tenants]
    if unknown:
        raise ConfigError(f"identify.preload names {unknown[0]!r}, which is not a tenant in [tenants].")
    return tuple(names_)


def _dsn(data: dict[str, Any], env: dict[str, str], key: str) -> str:
    # A DSN from the file (store.<key>) or from the environment variable that
    # store.<key>_env names (so that a password stays out of the file).
    dsn = rpcconfig.get(data, f"store.{key}", "", str)
    dsn_env = rpcconfig.get(data, f"store.{key}_env", "", str)
    if dsn_env:
        if dsn:
            raise ConfigError(f"The config section [store] takes {key} or {key}_env, not both.")
        dsn = env.get(dsn_env, "")
        if not dsn:
            raise ConfigError(f"The environment variable {dsn_env} named by store.{key}_env is not set.")
    return dsn


def _store(data: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    backend = rpcconfig.get(data, "store.backend", "sqlite", str)
    if backend not in storage.BACKENDS:
        raise ConfigError(f"The config value store.backend must be one of {list(storage.BACKENDS)}.")
    dsn, owner = _dsn(data, env, "dsn"), _dsn(data, env, "owner_dsn")
    if backend == "postgres" and not dsn:
        raise ConfigError('The config value store.dsn (or store.dsn_env) is needed with store.backend = "postgres".')
    if backend == "sqlite" and (dsn or owner):
        raise ConfigError('The config values store.dsn and store.owner_dsn are for store.backend = "postgres" only.')
    return {"store_backend": backend, "store_dsn": dsn, "store_owner_dsn": owner}


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> NodeConfig:
    """Read and check a node config file; relative paths are taken from its folder."""
    env = dict(os.environ) if env is None else env
    # The KEK variable holds JSON for load_keys, not a config override.
    data = rpcconfig.load(path, {k: v for k, v in env.items() if k != KEK_ENV})
    base = pathlib.Path(path).resolve().parent

    name = rpcconfig.need(data, "node.name")
    try:
        names.check_name(name)
    except ValueError as exc:
        raise ConfigError(f"The config value node.name is invalid: {exc}") from None
    try:
        cluster_id = ticket.check_audience(rpcconfig.need(data, "node.cluster_id"))
    except ValueError as exc:
        raise ConfigError(f"The config value node.cluster_id is invalid: {exc}") from None
    index = rpcconfig.need(data, "node.index", int)
    if not 1 <= index <= MAX_INDEX:
        raise ConfigError(f"The config value node.index must be from 1 to {MAX_INDEX} (a Shamir x-coordinate, never 0).")
    listen = rpcconfig.need(data, "node.listen")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("The config value node.listen must be HOST:PORT (port 0 picks a free port).")
    data_dir = rpcconfig.resolve_path(rpcconfig.need(data, "node.data_dir"), "node.data_dir", base)
    ready = rpcconfig.get(data, "node.ready_file", None, str)
    log_level = rpcconfig.get(data, "node.log_level", "INFO").upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"The config value node.log_level must be one of {sorted(_LOG_LEVELS)}.")

    tls = rpcconfig.tls_files(data, base)
    kek_file = rpcconfig.get(data, "keys.kek_file", None, str)
    if kek_file is None and KEK_ENV not in env:
        raise ConfigError(f"The config is missing keys.kek_file (or set the environment variable {KEK_ENV}).")
    audit_key_file = rpcconfig.need(data, "keys.audit_key_file")

    metrics_port = rpcconfig.get(data, "metrics.port", -1)
    if isinstance(metrics_port, bool) or not -1 <= metrics_port <= 65535:
        raise ConfigError("The config value metrics.port must be from -1 (disabled) to 65535.")

    tenants_raw = rpcconfig.get(data, "tenants", {}, dict)
    tenants: dict[str, dict[str, ed25519.Ed25519PublicKey]] = {}
    for tenant, section in tenants_raw.items():
        try:
            names.check_name(tenant)
        except ValueError:
            raise ConfigError(f"The tenant id {tenant!r} in [tenants] is not a valid name.") from None
        keys = section.get("ticket_keys") if isinstance(section, dict) else None
        if not isinstance(keys, dict) or not keys:
            raise ConfigError(f"The config value tenants.{tenant}.ticket_keys must map key ids to public keys.")
        parsed = {}
        for key_id, hex_key in keys.items():
            try:
                parsed[str(key_id)] = pki.load_public_key(str(hex_key))
            except ValueError:
                raise ConfigError(
                    f"The ticket key tenants.{tenant}.ticket_keys.{key_id} is not 64 hex characters of an Ed25519 public key."
                ) from None
        tenants[tenant] = parsed

    operators = _operators(rpcconfig.get(data, "operators", {}, dict))
    committee, committee_threshold, committee_pins = _committee(rpcconfig.get(data, "committee", {}, dict))

    return NodeConfig(
        name=name,
        index=index,
        listen=listen,
        data_dir=data_dir,
        tls=tls,
        kek_file=str(rpcconfig.resolve_path(kek_file, "keys.kek_file", base)) if kek_file is not None else None,
        audit_key_file=str(rpcconfig.resolve_path(audit_key_file, "keys.audit_key_file", base)),
        ready_file=rpcconfig.resolve_path(ready, "node.ready_file", base) if ready else None,
        log_level=log_level,
        metrics_host=rpcconfig.get(data, "metrics.host", "127.0.0.1"),
        metrics_port=metrics_port,
        attempts_per_subject=_positive(data, "limits.attempts_per_subject", 10),
        attempt_window_s=_positive(data, "limits.attempt_window_s", 60.0, float),
        tenants=tenants,
        cluster_id=cluster_id,
        checkpoint_every=_positive(data, "audit.checkpoint_every", 1000),
        checkpoint_interval_s=_positive(data, "audit.checkpoint_interval_s", 60.0, float),
        stream_batch=_positive(data, "store.stream_batch", 1000),
        **_store(data, env),
        max_workers=_positive(data, "node.max_workers", 32),
        identify_preload=_preload(data, tenants),
        peers=_parse_peers(data),
        path=pathlib.Path(path).resolve(),
        witness_peers=_witness_peers(data, name, base),
        operators=operators,
        committee=committee,
        committee_threshold=committee_threshold,
        committee_pins=committee_pins,
    )


def _witness_peers(data: dict[str, Any], own: str, base: pathlib.Path) -> dict[str, WitnessPeer]:
    """``[[witness.peers]]``: name, audit_public_key, and address or ready_file."""
    raw = rpcconfig.get(data, "witness.peers", [], list)
    peers: dict[str, WitnessPeer] = {}
    for i, item in enumerate(raw, start=1):
        where = f"witness.peers[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"The config value {where} needs a name.")
        name = item["name"]
        try:
            names.check_name(name)
        except ValueError:
            raise ConfigError(f"The config value {where}.name is not a valid node name.") from None
        if name == own or name in peers:
            raise ConfigError(f"The config value {where}.name repeats {name!r}: each peer once, never the node itself.")
        try:
            key = pki.load_public_key(str(item.get("audit_public_key", "")))
        except ValueError:
            raise ConfigError(
                f"The config value {where}.audit_public_key is not 64 hex characters of an Ed25519 public key."
            ) from None
        address, ready = item.get("address"), item.get("ready_file")
        if (address is None) == (ready is None) or not isinstance(address or ready, str):
            raise ConfigError(f"The config value {where} needs exactly one of address and ready_file.")
        ready_path = rpcconfig.resolve_path(ready, f"{where}.ready_file", base) if ready else None
        peers[name] = WitnessPeer(name, key, address, ready_path)
    return peers


def _operators(raw: dict) -> dict[str, ed25519.Ed25519PublicKey]:
    out = {}
    for node, hex_key in raw.items():
        try:
            names.check_name(node)
            out[node] = pki.load_public_key(str(hex_key))
        except ValueError:
            raise ConfigError(
                f"The config value operators.{str(node)[:64]} must be 64 hex characters of an Ed25519 public key "
                "under a valid node name."
            ) from None
    return out


def _committee(raw: dict) -> tuple[dict[str, int], int, dict[str, str]]:
    if not raw:
        return {}, 0, {}
    members = raw.get("members")
    threshold = raw.get("threshold")
    if not isinstance(members, dict) or not members or isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ConfigError("The config section [committee] needs threshold (an integer) and members (name = index).")
    out: dict[str, int] = {}
    for node, index in members.items():
        try:
            names.check_name(node)
        except ValueError:
            raise ConfigError(f"The config value committee.members names an invalid node {str(node)[:64]!r}.") from None
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= MAX_INDEX:
            raise ConfigError(f"The config value committee.members.{node} must be an index from 1 to {MAX_INDEX}.")
        out[node] = index
    if len(set(out.values())) != len(out):
        raise ConfigError("The config value committee.members gives two nodes the same index.")
    if not 2 <= threshold <= len(out):
        raise ConfigError("The config value committee.threshold must be from 2 to the number of members.")
    return out, threshold, _committee_pins(raw.get("pins"), out)


def _committee_pins(raw, members: dict[str, int]) -> dict[str, str]:
    """``pins = { name = "<SHA-256 of the member certificate's SPKI, hex>" }``:
    none (an old config) or one for every member, never some."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) != set(members):
        raise ConfigError("The config value committee.pins must give every committee member's key fingerprint, "
                          "and only theirs.")
    pins = {}
    for node, value in raw.items():
        if not isinstance(value, str) or not _HEX64.match(value):
            raise ConfigError(f"The config value committee.pins.{node} must be 64 lowercase hex characters "
                              "(the SHA-256 of the member certificate's public key).")
        pins[node] = value
    return pins


def read_secret_file(path: str, label: str) -> bytes:
    """A key file's bytes, refusing one that group or others may read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"The {label} file {path} is not a regular file.")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"The {label} file {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"restrict it with chmod 600."
            )
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"Cannot read the {label} file {path}: {exc.strerror}.") from None


def parse_kek_json(text: str | bytes, source: str) -> KekRing:
    """A KekRing from ``{"active": 2, "keys": {"1": "<64 hex>", "2": "<64 hex>"}}``."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(f"The KEK in {source} is not valid JSON.") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or not data["keys"]:
        raise ConfigError(f'The KEK in {source} must be {{"active": N, "keys": {{"N": "<64 hex>"}}}}.')
    active = data.get("active")
    if isinstance(active, bool) or not isinstance(active, int):
        raise ConfigError(f"The KEK in {source} must name its active version as an integer.")
    keys: dict[int, bytes] = {}
    for version, hex_key in data["keys"].items():
        try:
            v = int(version)
            raw = bytes.fromhex(hex_key)
        except (TypeError, ValueError):
            raise ConfigError(f"KEK version {version!r} in {source} is not a version number with a hex key.") from None
        if len(raw) != KEY_BYTES:
            raise ConfigError(f"KEK version {version} in {source} is not {KEY_BYTES} bytes (64 hex characters).")
        keys[v] = raw
    try:
        return KekRing(keys, active)
    except ValueError as exc:
        raise ConfigError(f"The KEK in {source} is invalid: {exc}") from None


def load_keys(cfg: NodeConfig, env: dict[str, str] | None = None) -> NodeKeys:
    env = os.environ if env is None else env
    from_env = KEK_ENV in env
    if from_env:
        ring = parse_kek_json(env[KEK_ENV], f"the environment variable {KEK_ENV}")
    else:
        assert cfg.kek_file is not None
        ring = parse_kek_json(read_secret_file(cfg.kek_file, "KEK"), cfg.kek_file)
    pem = read_secret_file(cfg.audit_key_file, "audit key")
    try:
        audit_key = pki.load_signing_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"The audit key file {cfg.audit_key_file} does not hold an Ed25519 private key in PEM.") from None
    return NodeKeys(ring, audit_key, kek_from_env=from_env)
