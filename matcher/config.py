"""The matcher's configuration (docs/contracts.md, "Matcher config"), loaded
and checked once at start-up so that a bad file fails with one clear
sentence instead of at the first payment."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from vault import names, pki, ticket
from vaultrpc import config as rpcconfig
from vaultrpc.config import ConfigError
from vaultrpc.tls import TlsFiles

__all__ = ["ConfigError", "MatcherConfig", "Modality", "ShareholderEndpoint", "TenantPolicy", "load", "from_dict",
           "check_modality"]

# The modality of the matcher-wide [matcher] dimension and a tenant's
# top-level match_threshold (configs from before modalities).
DEFAULT_MODALITY = "default"


@dataclass(frozen=True)
class ShareholderEndpoint:
    """One node of the committee: its name (certificate name), Shamir index and address."""

    name: str
    index: int
    address: str


@dataclass(frozen=True)
class Modality:
    """One kind of template a tenant verifies (face 128-d, palm vein, ...):
    its dimension and the cosine threshold, with the false-match rate the
    threshold was chosen for (None: not calibrated)."""

    name: str
    dimension: int
    match_threshold: float
    fmr: float | None = None


def check_modality(name: str, dimension, match_threshold, fmr=None) -> Modality:
    """A checked Modality; ValueError with one sentence otherwise."""
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError("a modality name is 1 to 64 letters, digits, '-', '_' or '.'")
    if isinstance(dimension, bool) or not isinstance(dimension, int) or not 0 < dimension <= 66_572:
        raise ValueError("its dimension must be between 1 and 66572")
    # Cosine similarity: a threshold at or below 0 (or NaN) would let
    # unrelated vectors match; above 1 nothing could.
    if isinstance(match_threshold, bool) or not isinstance(match_threshold, (int, float)) \
            or not 0.0 < float(match_threshold) <= 1.0:
        raise ValueError("its match_threshold must be above 0 and at most 1 (cosine similarity)")
    if fmr is not None and (isinstance(fmr, bool) or not isinstance(fmr, (int, float)) or not 0.0 < float(fmr) < 1.0):
        raise ValueError("its fmr (the false-match rate the threshold was chosen for) must be between 0 and 1")
    return Modality(name, dimension, float(match_threshold), None if fmr is None else float(fmr))


@dataclass(frozen=True)
class TenantPolicy:
    """What one payment provider is registered with."""

    name: str
    match_threshold: float
    score_allowed: bool
    ticket_keys: dict[str, ed25519.Ed25519PublicKey]
    # Every modality of the tenant by dimension: a template's length says
    # which one it is (records carry their dimension, not a modality name),
    # so two modalities of one tenant never share a dimension.
    modalities: dict[int, Modality] = field(default_factory=dict)
    # Identify's MATCH / AMBIGUOUS candidates are confirmed by Verify's
    # MAC-checked rejoin and cosine rule (matcher.identify): a lying node can
    # then hide a match but never make one; the matcher sees the candidates'
    # templates as in Verify. Off: it sees only bits.
    identify_confirm: bool = True
    # Verify runs on shares (matcher.identify.verify_on_shares): the claimed
    # template is never rejoined and the matcher learns the decision and
    # |t|^2 only; semi-honest (docs/architecture.md, "Verify on shares").
    verify_on_shares: bool = False

    def modality(self, dimension: int) -> Modality | None:
        return self.modalities.get(dimension)

    @property
    def dimensions(self) -> tuple[int, ...]:
        return tuple(sorted(self.modalities))


@dataclass(frozen=True)
class MatcherConfig:
    listen: str
    dimension: int
    threshold: int
    shareholders: tuple[ShareholderEndpoint, ...]
    tenants: dict[str, TenantPolicy]
    tls: TlsFiles
    # The cluster id: the audience every provider ticket must name.
    cluster_id: str
    ready_file: str | None = None
    call_timeout_ms: int = 2000
    log_level: str = "INFO"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # Server threads; each in-flight RPC holds one while it waits for nodes.
    max_workers: int = 64
    # Templates per vectorised split / per node write in EnrollStream.
    enroll_batch: int = 512
    # Verify asks k nodes for shares first and the others only when one of
    # those fails, a share does not rejoin, or k shares are not in hand after
    # this many milliseconds. 0 asks every node at once.
    hedge_ms: int = 150

    @property
    def call_timeout_s(self) -> float:
        return self.call_timeout_ms / 1000.0

    @property
    def n(self) -> int:
        return len(self.shareholders)


def load(path: str | os.PathLike, env: dict[str, str] | None = None) -> MatcherConfig:
    """Read and check ``matcher.toml`` (environment overrides as in vaultrpc.config)."""
    data = rpcconfig.load(path, env=env)
    return from_dict(data, base=pathlib.Path(path).resolve().parent)


def from_dict(data: dict[str, Any], base: pathlib.Path | None = None) -> MatcherConfig:
    """Build a checked MatcherConfig from parsed TOML; relative paths are
    taken relative to ``base`` (the config file's folder)."""
    need, get = rpcconfig.need, rpcconfig.get
    listen = need(data, "matcher.listen")
    dimension = need(data, "matcher.dimension", int)
    threshold = need(data, "matcher.threshold", int)
    call_timeout_ms = get(data, "matcher.call_timeout_ms", 2000, int)
    log_level = get(data, "matcher.log_level", "INFO", str)
    ready_file = get(data, "matcher.ready_file", None, str)
    max_workers = get(data, "matcher.max_workers", 64, int)
    enroll_batch = get(data, "matcher.enroll_batch", 512, int)
    hedge_ms = get(data, "matcher.hedge_ms", 150, int)
    try:
        cluster_id = ticket.check_audience(need(data, "matcher.cluster_id"))
    except ValueError as exc:
        raise ConfigError(f"The config value matcher.cluster_id is invalid: {exc}") from None
    if not 0 < dimension <= names.MAX_DIMENSION:
        raise ConfigError(f"The config value matcher.dimension must be between 1 and {names.MAX_DIMENSION}.")
    if not 50 <= call_timeout_ms <= 600_000:
        raise ConfigError("The config value matcher.call_timeout_ms must be between 50 and 600000.")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("The config value matcher.log_level must be DEBUG, INFO, WARNING or ERROR.")
    if not 4 <= max_workers <= 1024:
        raise ConfigError("The config value matcher.max_workers must be between 4 and 1024.")
    if not 0 <= hedge_ms <= 60_000:
        raise ConfigError("The config value matcher.hedge_ms must be between 0 and 60000.")
    if not 1 <= enroll_batch <= 8192:
        raise ConfigError("The config value matcher.enroll_batch must be between 1 and 8192.")

    tls = rpcconfig.tls_files(data, base)

    nodes = [ShareholderEndpoint(e.name, e.index, e.address) for e in rpcconfig.shareholder_table(data)]
    if sorted(n.index for n in nodes) != list(range(1, len(nodes) + 1)):
        raise ConfigError("The [[shareholders]] indices must be 1 to n, one per node (the Shamir x-coordinates).")
    if not 2 <= threshold <= len(nodes):
        raise ConfigError(
            f"The config value matcher.threshold must be between 2 and the number of shareholders ({len(nodes)})."
        )

    raw_tenants = data.get("tenants", {})
    if not isinstance(raw_tenants, dict):
        raise ConfigError("The config section [tenants] must be a table of tables.")
    tenants: dict[str, TenantPolicy] = {}
    for name, raw in raw_tenants.items():
        try:
            names.check_name(name)
        except ValueError as exc:
            raise ConfigError(f"The tenant name {name!r} is invalid: {exc}") from None
        wrapped = {"t": raw}
        match_threshold = need(wrapped, "t.match_threshold", (int, float))
        # Cosine similarity: a threshold at or below 0 (or NaN) would let
        # unrelated vectors match; above 1 nothing could.
        if isinstance(match_threshold, bool) or not 0.0 < float(match_threshold) <= 1.0:
            raise ConfigError(
                f"The config value tenants.{name}.match_threshold must be above 0 and at most 1 (cosine similarity)."
            )
        modalities = _modalities(wrapped, name, dimension, float(match_threshold))
        score_allowed = get(wrapped, "t.score_allowed", False, bool)
        identify_confirm = get(wrapped, "t.identify_confirm", True, bool)
        verify_on_shares = get(wrapped, "t.verify_on_shares", False, bool)
        if verify_on_shares and score_allowed:
            raise ConfigError(f"The tenant {name} cannot set both verify_on_shares and score_allowed: "
                              "Verify on shares opens the decision only, never a score.")
        if verify_on_shares and (threshold != 2 or len(nodes) < 3):
            raise ConfigError(f"The tenant {name} sets verify_on_shares, which needs matcher.threshold = 2 "
                              "and at least three shareholders.")
        raw_keys = get(wrapped, "t.ticket_keys", {}, dict)
        if not raw_keys:
            raise ConfigError(f"The tenant {name} has no ticket_keys.")
        keys = {}
        for key_id, hex_key in raw_keys.items():
            if not isinstance(hex_key, str):
                raise ConfigError(f"The ticket key {key_id} of tenant {name} must be 64 hex characters.")
            try:
                keys[key_id] = pki.load_public_key(hex_key)
            except ValueError:
                raise ConfigError(
                    f"The ticket key {key_id} of tenant {name} is not a 32-byte Ed25519 key in hex."
                ) from None
        tenants[name] = TenantPolicy(name, float(match_threshold), score_allowed, keys, modalities,
                                     identify_confirm, verify_on_shares)

    return MatcherConfig(
        listen=listen,
        dimension=dimension,
        threshold=threshold,
        shareholders=tuple(sorted(nodes, key=lambda n: n.index)),
        tenants=tenants,
        tls=tls,
        cluster_id=cluster_id,
        ready_file=str(rpcconfig.resolve_path(ready_file, "matcher.ready_file", base)) if ready_file else None,
        call_timeout_ms=call_timeout_ms,
        log_level=log_level.upper(),
        metrics_host=get(data, "metrics.host", "127.0.0.1", str),
        metrics_port=get(data, "metrics.port", 0, int),
        max_workers=max_workers,
        enroll_batch=enroll_batch,
        hedge_ms=hedge_ms,
    )


def _modalities(wrapped: dict, tenant: str, dimension: int, match_threshold: float) -> dict[int, Modality]:
    """A tenant's modalities by dimension: the default one ([matcher]
    dimension, the tenant's match_threshold and optional match_fmr) and
    every [tenants.T.modalities.NAME] table (dimension, match_threshold, fmr)."""
    fmr = rpcconfig.get(wrapped, "t.match_fmr", None, (int, float))
    try:
        default = check_modality(DEFAULT_MODALITY, dimension, match_threshold, fmr)
    except ValueError as exc:
        raise ConfigError(f"The default modality of tenant {tenant} is invalid: {exc}.") from None
    out = {dimension: default}
    raw = rpcconfig.get(wrapped, "t.modalities", {}, dict)
    for mname, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"The config entry tenants.{tenant}.modalities.{mname} is not a table.")
        for key in ("dimension", "match_threshold", "fmr"):
            if key not in table:
                raise ConfigError(f"The config is missing tenants.{tenant}.modalities.{mname}.{key}.")
        try:
            modality = check_modality(mname, table["dimension"], table["match_threshold"], table["fmr"])
        except ValueError as exc:
            raise ConfigError(f"The modality {mname} of tenant {tenant} is invalid: {exc}.") from None
        if modality.dimension in out:
            raise ConfigError(
                f"The modalities {out[modality.dimension].name} and {mname} of tenant {tenant} have the same "
                f"dimension {modality.dimension}; a template's length must say which modality it is."
            )
        out[modality.dimension] = modality
    return out
