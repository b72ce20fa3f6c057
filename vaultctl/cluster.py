"""A local development cluster: N shareholder nodes and one matcher, each a
background process on a free loopback port, under one cluster directory.

Layout and formats are fixed in docs/contracts.md ("Cluster directory"):

    D/cluster.json                 the spec (n, k, dim, tenants, node names)
    D/pki/ca.pem, ca.key           dev CA
    D/pki/<role>-<name>.pem/.key   one certificate per party
    D/psp/<tenant>.ticket.key      the provider's Ed25519 ticket key ("<tenant>-1")
    D/psp/cluster_id               the cluster id, the audience of every ticket
    D/nodes/<name>/node.toml, kek.json, audit.key, shares.db*, node.log, ready.json
    D/matcher/matcher.toml, matcher.log, ready.json
    D/operators/<name>.key         dev only: the Ed25519 key of each node's
                                   operator, which approves committee changes
                                   (``vaultctl reshare approve``); pinned in
                                   every node.toml's [operators]

cluster.json also holds ``trust``: each node's audit public key and each
tenant's ticket public key, recorded when the keys are made
(``record_trust``); ``vaultctl audit`` checks against these, never against
what a node says about itself.

Besides those, each process has a ``pid`` file next to its ready file,
written when it is spawned, so that ``down`` can stop a process that never
became ready.

The first ``up`` creates everything; a later ``up`` reuses the PKI, keys,
node configs and data (only the matcher config and the nodes' ``[peers]``
tables are rewritten, because the nodes get new ports). On a cluster that
is partly running, ``up`` starts only what is stopped and leaves the rest
alone (a running matcher is sent the new node addresses by SIGHUP). Every secret file,
log and pid file is written 0600.

Python API (used by the CLI, the demo and the tests): ``ClusterSpec``,
``up(dir, ...)``, ``status(dir)``, ``down(dir)``, ``kill_node(dir, name, sig)``,
``cluster_files(dir)``. They raise ``ClusterError`` with one sentence (plus,
when a process failed to start, the tail of its log).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import secrets
import signal
import stat
import subprocess
import sys
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass


from matcher.config import DEFAULT_MODALITY, Modality, check_modality
from vault import envelope, names, pki, plan as committee_plan
from vaultrpc import probe
from vaultrpc.files import write_atomic
from vaultrpc.tls import TlsFiles

SPEC_VERSION = 1
DEFAULT_SHAREHOLDERS = 3
DEFAULT_THRESHOLD = 2
DEFAULT_DIMENSION = 512
DEFAULT_TENANT = "demo-psp"
DEFAULT_AUDITOR = "auditor"
MATCHER_NAME = "matcher"
# Cosine on quantised vectors above which a probe matches (dev cluster).
DEFAULT_MATCH_THRESHOLD = 0.80
MAX_SHAREHOLDERS = names.MAX_SHAREHOLDERS
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 15
# The dev cluster ignores SPLITVAULT_* overrides in the caller's environment:
# a stray SPLITVAULT_KEK_JSON would otherwise give every node the same key.
_ENV_PREFIX = "SPLITVAULT_"
_PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
# What `python -m <module> --config <file>` starts each kind of process.
SERVER_MODULES = {"shareholder": "shareholders", "matcher": "matcher"}

# Processes this Python process spawned, kept so that they are reaped (no
# zombies, no "still running" warnings) when they stop.
_CHILDREN: dict[int, subprocess.Popen] = {}


class ClusterError(Exception):
    """A cluster operation failed; the message says which process and why."""


def node_names(n: int) -> list[str]:
    """bank-a, bank-b, ..., bank-z, bank-aa, ... (docs/contracts.md)."""
    names = []
    for i in range(n):
        suffix, j = "", i
        while True:
            suffix = chr(ord("a") + j % 26) + suffix
            j = j // 26 - 1
            if j < 0:
                break
        names.append(f"bank-{suffix}")
    return names


@dataclass(frozen=True)
class ClusterSpec:
    """What a cluster is made of; stored as D/cluster.json."""

    shareholders: int = DEFAULT_SHAREHOLDERS
    threshold: int = DEFAULT_THRESHOLD
    dim: int = DEFAULT_DIMENSION
    tenants: tuple[str, ...] = (DEFAULT_TENANT,)
    nodes: tuple[str, ...] = ()
    auditor: str = DEFAULT_AUDITOR
    matcher: str = MATCHER_NAME
    match_threshold: float = DEFAULT_MATCH_THRESHOLD
    # Further modalities of every tenant beside the default (dim,
    # match_threshold): matcher.config.Modality, each with its own dimension.
    modalities: tuple[Modality, ...] = ()
    # Nodes' stores on PostgreSQL: a superuser connection string of a dev
    # server (trust or peer authentication), from which each node gets its
    # own database, an owner role and a node role (``postgres_store``).
    # Empty: each node's store is its SQLite file.
    postgres: str = ""
    # Identify confirms its candidates with Verify's rejoin and cosine rule
    # (matcher tenants' identify_confirm).
    identify_confirm: bool = True

    def __post_init__(self):
        if isinstance(self.shareholders, bool) or not isinstance(self.shareholders, int) or not 2 <= self.shareholders <= MAX_SHAREHOLDERS:
            raise ClusterError(f"The number of shareholders must be between 2 and {MAX_SHAREHOLDERS}.")
        # k >= 2: with k = 1 every node would hold the template itself.
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or not 2 <= self.threshold <= self.shareholders:
            raise ClusterError(
                f"The threshold must be between 2 and the number of shareholders ({self.shareholders})."
            )
        if self.shareholders < 2 * self.threshold - 1:
            raise ClusterError(
                f"{self.shareholders} shareholders with threshold {self.threshold} cannot renew the MAC keys at a "
                f"refresh (that needs at least 2k - 1 = {2 * self.threshold - 1}); add shareholders or lower the "
                "threshold.")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ClusterError("The template dimension must be a positive integer.")
        if not self.tenants:
            raise ClusterError("A cluster needs at least one tenant.")
        if isinstance(self.match_threshold, bool) or not 0.0 < float(self.match_threshold) <= 1.0:
            raise ClusterError("The match threshold must be above 0 and at most 1 (cosine similarity).")
        modalities = []
        for m in self.modalities:
            try:
                modalities.append(check_modality(m.name, m.dimension, m.match_threshold, m.fmr))
            except ValueError as exc:
                raise ClusterError(f"The modality {m.name!r} is invalid: {exc}.") from None
        dims = [self.dim, *(m.dimension for m in modalities)]
        if len(set(dims)) != len(dims) or len({m.name for m in modalities} | {DEFAULT_MODALITY}) != len(dims):
            raise ClusterError("Each modality needs its own name and its own dimension (the default one included).")
        object.__setattr__(self, "modalities", tuple(modalities))
        if not self.nodes:
            object.__setattr__(self, "nodes", tuple(node_names(self.shareholders)))
        if len(self.nodes) != self.shareholders or len(set(self.nodes)) != len(self.nodes):
            raise ClusterError("The cluster spec must name each shareholder once.")
        for name in (*self.nodes, *self.tenants, self.auditor, self.matcher):
            try:
                names.check_name(name)
            except ValueError as exc:
                raise ClusterError(f"The name {name!r} in the cluster spec is invalid: {exc}") from None
        for identity in (pki.Identity(pki.ROLE_MATCHER, self.matcher),
                         *(pki.Identity(pki.ROLE_SHAREHOLDER, n) for n in self.nodes)):
            try:
                pki.server_dns_name(identity)  # servers carry their name as a DNS name
            except ValueError as exc:
                raise ClusterError(f"The server name {identity.name!r} in the cluster spec is invalid: {exc}") from None

    @property
    def tenant(self) -> str:
        """The default tenant (the first one)."""
        return self.tenants[0]

    def to_json(self) -> dict:
        data = asdict(self)
        data["tenants"] = list(self.tenants)
        data["nodes"] = list(self.nodes)
        data["modalities"] = [asdict(m) for m in self.modalities]
        return {"version": SPEC_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict) -> "ClusterSpec":
        if not isinstance(data, dict) or data.get("version") != SPEC_VERSION:
            raise ClusterError(f"The cluster spec is not version {SPEC_VERSION} of cluster.json.")
        try:
            return cls(
                shareholders=data["shareholders"],
                threshold=data["threshold"],
                dim=data["dim"],
                tenants=tuple(data["tenants"]),
                nodes=tuple(data["nodes"]),
                auditor=data.get("auditor", DEFAULT_AUDITOR),
                matcher=data.get("matcher", MATCHER_NAME),
                match_threshold=float(data.get("match_threshold", DEFAULT_MATCH_THRESHOLD)),
                modalities=tuple(Modality(**m) for m in data.get("modalities", ())),
                postgres=str(data.get("postgres", "")),
                identify_confirm=bool(data.get("identify_confirm", True)),
            )
        except (KeyError, TypeError, ValueError):
            raise ClusterError("The cluster spec cluster.json is missing a field or has a wrong type.") from None


class Paths:
    """Where every file of a cluster directory lives (docs/contracts.md)."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).expanduser().resolve()

    spec = property(lambda self: self.root / "cluster.json")
    pki = property(lambda self: self.root / "pki")
    ca = property(lambda self: self.pki / "ca.pem")
    ca_key = property(lambda self: self.pki / "ca.key")
    matcher_dir = property(lambda self: self.root / "matcher")

    def cert(self, role: str, name: str) -> pathlib.Path:
        return self.pki / f"{role}-{name}.pem"

    def key(self, role: str, name: str) -> pathlib.Path:
        return self.pki / f"{role}-{name}.key"

    def tls(self, role: str, name: str) -> TlsFiles:
        return TlsFiles(str(self.ca), str(self.cert(role, name)), str(self.key(role, name)))

    def ticket_key(self, tenant: str) -> pathlib.Path:
        return self.root / "psp" / f"{tenant}.ticket.key"

    def operator_key(self, name: str) -> pathlib.Path:
        """A node operator's Ed25519 approval key (dev cluster only: a real
        operator keeps it in its own institution)."""
        return self.root / "operators" / f"{name}.key"
    # The cluster id (tickets' audience), for the provider's client.
    psp_cluster_id = property(lambda self: self.root / "psp" / "cluster_id")

    def node_dir(self, name: str) -> pathlib.Path:
        return self.root / "nodes" / name

    def process_dir(self, spec: ClusterSpec, name: str) -> pathlib.Path:
        return self.matcher_dir if name == spec.matcher else self.node_dir(name)

    def config(self, spec: ClusterSpec, name: str) -> pathlib.Path:
        d = self.process_dir(spec, name)
        return d / ("matcher.toml" if name == spec.matcher else "node.toml")

    def log(self, spec: ClusterSpec, name: str) -> pathlib.Path:
        d = self.process_dir(spec, name)
        return d / ("matcher.log" if name == spec.matcher else "node.log")

    def ready(self, spec: ClusterSpec, name: str) -> pathlib.Path:
        return self.process_dir(spec, name) / "ready.json"

    def pid(self, spec: ClusterSpec, name: str) -> pathlib.Path:
        return self.process_dir(spec, name) / "pid"


def key_id(tenant: str) -> str:
    """The dev cluster's ticket key id for a tenant (docs/contracts.md)."""
    return f"{tenant}-1"


# ---------------------------------------------------------------- files


def _write(path: pathlib.Path, data: bytes | str, secret: bool = False) -> None:
    """Write atomically (vaultrpc.files); secret files are 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600 if secret else 0o644)


def _toml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def load_spec(root: str | os.PathLike) -> ClusterSpec:
    paths = Paths(root)
    if not paths.spec.exists():
        raise ClusterError(f"{paths.root} is not a cluster directory (no cluster.json); run `vaultctl cluster up --dir {root}` first.")
    try:
        data = json.loads(paths.spec.read_text())
    except (OSError, ValueError):
        raise ClusterError(f"Cannot read the cluster spec {paths.spec}.") from None
    return ClusterSpec.from_json(data)


def _ticket_public_hex(paths: Paths, tenant: str) -> str:
    key = pki.load_signing_key(paths.ticket_key(tenant).read_bytes())
    return pki.public_key_raw(key).hex()


def _tenants_toml(paths: Paths, spec: ClusterSpec, matcher: bool) -> str:
    out = []
    for tenant in spec.tenants:
        out.append(f"\n[tenants.{_toml_str(tenant)}]")
        if matcher:
            out.append(f"match_threshold = {spec.match_threshold!r}")
            out.append("score_allowed = false")
            out.append(f"identify_confirm = {'true' if spec.identify_confirm else 'false'}")
        out.append(f"ticket_keys = {{ {_toml_str(key_id(tenant))} = {_toml_str(_ticket_public_hex(paths, tenant))} }}")
        for m in spec.modalities if matcher else ():
            out.append(f"\n[tenants.{_toml_str(tenant)}.modalities.{_toml_str(m.name)}]")
            out.append(f"dimension = {m.dimension}\nmatch_threshold = {m.match_threshold!r}\nfmr = {m.fmr!r}")
    return "\n".join(out) + "\n"


def _tls_toml(paths: Paths, role: str, name: str) -> str:
    return (
        "[tls]\n"
        f"ca = {_toml_str(paths.ca)}\n"
        f"cert = {_toml_str(paths.cert(role, name))}\n"
        f"key = {_toml_str(paths.key(role, name))}\n"
    )


def operator_public_hex(paths: Paths, name: str) -> str:
    return pki.public_key_raw(pki.load_signing_key(paths.operator_key(name).read_bytes())).hex()


def _make_operator_key(paths: Paths, name: str) -> None:
    if not paths.operator_key(name).exists():
        private_pem, _public = pki.new_signing_key()
        _write(paths.operator_key(name), private_pem, secret=True)


def _operators_toml(paths: Paths, spec: ClusterSpec, founding: bool) -> str:
    """[operators]: every dev operator key made so far; [committee]: the
    founding committee (a node joining by a reshare has none of its own yet)."""
    folder = paths.root / "operators"
    names = sorted(p.stem for p in folder.glob("*.key")) if folder.is_dir() else []
    out = "\n[operators]\n" + "".join(f"{_toml_str(n)} = {_toml_str(operator_public_hex(paths, n))}\n" for n in names)
    if founding:
        members = ", ".join(f"{_toml_str(n)} = {i}" for i, n in enumerate(spec.nodes, start=1))
        # Each member's certificate key, from the certificate issued above:
        # peer calls are answered only to that key, not to any certificate
        # the CA could mint with the member's name.
        pins = ", ".join(
            f"{_toml_str(n)} = {_toml_str(committee_plan.spki_sha256(paths.cert(pki.ROLE_SHAREHOLDER, n).read_bytes()))}"
            for n in spec.nodes)
        out += f"\n[committee]\nthreshold = {spec.threshold}\nmembers = {{ {members} }}\npins = {{ {pins} }}\n"
    return out


def node_config_text(paths: Paths, spec: ClusterSpec, name: str, founding: bool = True) -> str:
    d = paths.node_dir(name)
    return (
        "# Shareholder node of a local splitvault dev cluster (docs/contracts.md).\n"
        "[node]\n"
        f"name = {_toml_str(name)}\n"
        f"cluster_id = {_toml_str(cluster_id(paths.root))}\n"
        f"index = {spec.nodes.index(name) + 1}\n"
        'listen = "127.0.0.1:0"\n'
        f"data_dir = {_toml_str(d)}\n"
        f"ready_file = {_toml_str(d / 'ready.json')}\n"
        'log_level = "INFO"\n\n'
        + _tls_toml(paths, pki.ROLE_SHAREHOLDER, name)
        + "\n[keys]\n"
        f"kek_file = {_toml_str(d / 'kek.json')}\n"
        f"audit_key_file = {_toml_str(d / 'audit.key')}\n\n"
        "[metrics]\n"
        'host = "127.0.0.1"\n'
        "port = 0\n\n"
        "[limits]\n"
        "attempts_per_subject = 10\n"
        "attempt_window_s = 60\n\n"
        "[identify]\n"
        f"preload = [{', '.join(_toml_str(t) for t in spec.tenants)}]\n"
        + _tenants_toml(paths, spec, matcher=False)
        + _witness_toml(paths, spec, name)
        + _operators_toml(paths, spec, founding)
    )


PEERS_HEADER = "\n# The other nodes' addresses; rewritten whenever a node of the cluster starts.\n[peers]\n"


def write_peer_tables(root: str | os.PathLike) -> None:
    """Give every node's config the addresses of the other running nodes
    (its ``[peers]`` table, which the node reads at each maintenance step):
    a node dials its peers there, not where an auditor's request says."""
    paths = Paths(root)
    spec = load_spec(root)
    addresses = {}
    for name in _node_dirs(paths):
        pid = _read_pid(paths.pid(spec, name))
        data = _read_json(paths.ready(spec, name)) if pid is not None else None
        if data and data.get("pid") == pid and data.get("address") and _alive(pid, paths.config(spec, name)):
            addresses[name] = data["address"]
    for name in _node_dirs(paths):
        config = paths.config(spec, name)
        text = config.read_text()
        head = text.split(PEERS_HEADER, 1)[0]
        table = "".join(f"{_toml_str(n)} = {_toml_str(a)}\n" for n, a in sorted(addresses.items()) if n != name)
        new = head + PEERS_HEADER + table
        if new != text:
            _write(config, new)
def _witness_toml(paths: Paths, spec: ClusterSpec, name: str) -> str:
    # The committee peers that witness this node's signed audit checkpoints
    # (shareholders.witness), their checkpoint keys pinned; ports are picked
    # at start, so the address comes from each peer's ready file.
    out = []
    for peer in spec.nodes:
        if peer == name:
            continue
        key = pki.load_signing_key((paths.node_dir(peer) / "audit.key").read_bytes())
        out.append(
            f"\n[[witness.peers]]\nname = {_toml_str(peer)}\n"
            f"audit_public_key = {_toml_str(pki.public_key_raw(key).hex())}\n"
            f"ready_file = {_toml_str(paths.ready(spec, peer))}\n"
        )
    return "".join(out)


def matcher_config_text(paths: Paths, spec: ClusterSpec, addresses: dict[str, str]) -> str:
    d = paths.matcher_dir
    nodes = "".join(
        f"\n[[shareholders]]\nname = {_toml_str(name)}\nindex = {i}\naddress = {_toml_str(addresses[name])}\n"
        for i, name in enumerate(spec.nodes, start=1)
    )
    return (
        "# Matcher of a local splitvault dev cluster (docs/contracts.md).\n"
        "# Rewritten by every `vaultctl cluster up`: the nodes' ports change.\n"
        "[matcher]\n"
        'listen = "127.0.0.1:0"\n'
        f"ready_file = {_toml_str(d / 'ready.json')}\n"
        f"cluster_id = {_toml_str(cluster_id(paths.root))}\n"
        f"dimension = {spec.dim}\n"
        f"threshold = {spec.threshold}\n"
        "call_timeout_ms = 2000\n"
        'log_level = "INFO"\n\n'
        + _tls_toml(paths, pki.ROLE_MATCHER, spec.matcher)
        + "\n[metrics]\n"
        'host = "127.0.0.1"\n'
        "port = 0\n"
        + nodes
        + _tenants_toml(paths, spec, matcher=True)
    )


def _parties(spec: ClusterSpec) -> list[tuple[str, str]]:
    return (
        [(pki.ROLE_SHAREHOLDER, n) for n in spec.nodes]
        + [(pki.ROLE_MATCHER, spec.matcher), (pki.ROLE_AUDITOR, spec.auditor)]
        + [(pki.ROLE_PSP, t) for t in spec.tenants]
    )


def init(root: str | os.PathLike, spec: ClusterSpec) -> Paths:
    """Create whatever is missing: spec, PKI, keys and node configs. Never
    overwrites an existing file (a second ``up`` keeps the same identities
    and data)."""
    paths = Paths(root)
    paths.root.mkdir(parents=True, exist_ok=True)
    if not paths.spec.exists():
        _write(paths.spec, json.dumps(spec.to_json(), indent=2) + "\n")

    if not paths.ca.exists() or not paths.ca_key.exists():
        ca_cert, ca_key = pki.make_ca()
        _write(paths.ca_key, ca_key, secret=True)
        _write(paths.ca, ca_cert)
    ca_cert, ca_key = paths.ca.read_bytes(), paths.ca_key.read_bytes()
    for role, name in _parties(spec):
        if not paths.cert(role, name).exists() or not paths.key(role, name).exists():
            cert, key = pki.issue_cert(ca_cert, ca_key, role, name)
            _write(paths.key(role, name), key, secret=True)
            _write(paths.cert(role, name), cert)

    for tenant in spec.tenants:
        if not paths.ticket_key(tenant).exists():
            private_pem, _public = pki.new_signing_key()
            _write(paths.ticket_key(tenant), private_pem, secret=True)
    _ensure_cluster_id(paths)

    for name in spec.nodes:
        _make_operator_key(paths, name)
    for name in spec.nodes:
        _make_node_files(paths, spec, name)
    for name in spec.nodes:  # once every audit key exists: each config pins its peers'
        _write_node_config(paths, spec, name)
    paths.matcher_dir.mkdir(parents=True, exist_ok=True)
    record_trust(paths, spec)
    return paths


# ---------------------------------------------------------------- trust anchors


def _make_node_files(paths: Paths, spec: ClusterSpec, name: str) -> None:
    """A node's folder (0700), KEK file and audit key (0600, OS CSPRNG); what
    exists already is kept (a second `up` reuses it). Its config is written
    by ``_write_node_config`` once every node's audit key exists."""
    d = paths.node_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if not (d / "kek.json").exists():
        kek = {"active": 1, "keys": {"1": envelope.new_kek().hex()}}
        _write(d / "kek.json", json.dumps(kek) + "\n", secret=True)
    if not (d / "audit.key").exists():
        private_pem, _public = pki.new_signing_key()
        _write(d / "audit.key", private_pem, secret=True)


def _write_node_config(paths: Paths, spec: ClusterSpec, name: str, founding: bool = True) -> None:
    config = paths.node_dir(name) / "node.toml"
    if not config.exists():
        text = node_config_text(paths, spec, name, founding)
        if spec.postgres:
            dsn, owner = postgres_store(_admin_dsn(paths, spec), cluster_id(paths.root), name)
            text += f"\n[store]\nbackend = \"postgres\"\ndsn = {_toml_str(dsn)}\nowner_dsn = {_toml_str(owner)}\n"
        _write(config, text)


def node_store(paths: Paths, name: str):
    """Where a dev cluster's node keeps its store: its SQLite file, or the
    PostgreSQL database its node.toml names (a shareholders.storage.Location)."""
    try:
        with open(paths.node_dir(name) / "node.toml", "rb") as f:
            section = tomllib.load(f).get("store") or {}
    except (OSError, tomllib.TOMLDecodeError):
        section = {}
    if section.get("backend") == "postgres":
        from shareholders import storage

        return storage.Location("postgres", None, str(section.get("dsn", "")))
    return paths.node_dir(name) / "shares.db"


LOCAL_POSTGRES = "local"  # spec.postgres: the cluster's own server under D/postgres


def _pgdata(paths: Paths) -> pathlib.Path:
    return paths.root / "postgres" / "pgdata"


def _admin_dsn(paths: Paths, spec: ClusterSpec) -> str:
    return start_postgres(paths) if spec.postgres == LOCAL_POSTGRES else spec.postgres


def start_postgres(paths: Paths) -> str:
    """Start (or find running) the cluster's own PostgreSQL server (the
    pgserver wheel's binaries, on a Unix socket in its data folder; as root it
    runs as pgserver's own system user); its superuser connection string."""
    try:
        with warnings.catch_warnings():  # platformdirs, at import: no XDG_RUNTIME_DIR on a server
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise ClusterError("The postgres backend needs the postgres extra (pip install 'splitvault[postgres]').") from None
    pgdata = _pgdata(paths)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: pgserver runs it as its own user,
        # which must be able to pass through the folders above its data
        # (search permission only: it cannot list them).
        for folder in pgdata.parents:
            folder.chmod(folder.stat().st_mode | stat.S_IXOTH)
    try:
        with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR on a server, falls back to /tmp
            warnings.simplefilter("ignore")
            return pgserver.get_server(pgdata, cleanup_mode=None).get_uri()
    except Exception as exc:  # noqa: BLE001 - pgserver raises several kinds
        raise ClusterError(f"Cannot start the cluster's PostgreSQL server: {type(exc).__name__}: {exc}") from None


def stop_postgres(paths: Paths) -> str:
    """Stop the cluster's own PostgreSQL server, if it runs."""
    pgdata = _pgdata(paths)
    if not (pgdata / "postmaster.pid").exists():
        return "not running"
    import pgserver

    try:
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user="pgserver" if os.geteuid() == 0 else None)
    except subprocess.CalledProcessError:
        # pg_ctl could not do it (its user cannot reach the folder any more):
        # a fast shutdown by signal, to the postmaster the pid file names.
        try:
            pid = int((pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGINT)
        except (OSError, ValueError, IndexError):
            return "not running"
    return "stopped"


def postgres_store(admin_dsn: str, cluster: str, name: str) -> tuple[str, str]:
    """Make (once) node ``name``'s PostgreSQL database, owned by its owner role
    and open to its node role (neither a superuser: row-level security binds
    the node); returns the node's and the owner's connection strings."""
    try:
        import psycopg
        from psycopg import conninfo, sql
    except ImportError:
        raise ClusterError("The postgres backend needs the postgres extra (pip install 'splitvault[postgres]').") from None
    tag = hashlib.sha256(cluster.encode()).hexdigest()[:10]
    base = f"sv_{tag}_{name.replace('-', '_').lower()}"[:50]
    database, owner, node = base, f"{base}_owner", f"{base}_node"
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as c:
            for role in (owner, node):
                if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    c.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS").format(sql.Identifier(role)))
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner)))
                c.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
                c.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database),
                                                                               sql.Identifier(node)))
    except psycopg.Error as exc:
        raise ClusterError(f"Cannot prepare node {name}'s PostgreSQL database: {str(exc).strip()}") from None
    return (conninfo.make_conninfo(admin_dsn, user=node, dbname=database, password=None),
            conninfo.make_conninfo(admin_dsn, user=owner, dbname=database, password=None))


def record_trust(paths: Paths, spec: ClusterSpec) -> dict:
    """Record in cluster.json, once, each node's audit public key and each
    tenant's ticket public key: the auditor's trust anchors (``vaultctl
    audit``), fixed when the keys are made, so that a node or a file changed
    later cannot vouch for itself. Existing entries are never overwritten;
    other fields of cluster.json are kept."""
    data = json.loads(paths.spec.read_text())
    trust = data.setdefault("trust", {})
    audit_keys = trust.setdefault("audit_keys", {})
    ticket_keys = trust.setdefault("ticket_keys", {})
    changed = False
    for name in spec.nodes:
        key_file = paths.node_dir(name) / "audit.key"
        if name not in audit_keys and key_file.exists():
            audit_keys[name] = pki.public_key_raw(pki.load_signing_key(key_file.read_bytes())).hex()
            changed = True
    for tenant in spec.tenants:
        keys = ticket_keys.setdefault(tenant, {})
        if key_id(tenant) not in keys and paths.ticket_key(tenant).exists():
            keys[key_id(tenant)] = _ticket_public_hex(paths, tenant)
            changed = True
    if changed:
        _write(paths.spec, json.dumps(data, indent=2) + "\n")
    return trust


def _ensure_cluster_id(paths: Paths) -> str:
    """Make the cluster's random id once (cluster.json's ``cluster_id``) and
    hand it to the provider (psp/cluster_id): the audience of every ticket,
    so one made for this cluster is refused by any other."""
    data = json.loads(paths.spec.read_text())
    value = data.get("cluster_id")
    if not isinstance(value, str) or not value:
        value = f"splitvault-{secrets.token_hex(16)}"
        data["cluster_id"] = value
        _write(paths.spec, json.dumps(data, indent=2) + "\n")
    if not paths.psp_cluster_id.exists():
        _write(paths.psp_cluster_id, value + "\n")
    return value


def cluster_id(root: str | os.PathLike) -> str:
    """The cluster id recorded in cluster.json."""
    paths = Paths(root)
    try:
        value = json.loads(paths.spec.read_text()).get("cluster_id")
    except (OSError, ValueError, AttributeError):
        raise ClusterError(f"Cannot read the cluster spec {paths.spec}.") from None
    if not isinstance(value, str) or not value:
        raise ClusterError(f"The cluster spec {paths.spec} has no cluster_id; it was made by an older vaultctl.")
    return value


def load_trust(root: str | os.PathLike) -> dict:
    """``{"audit_keys": {node: hex}, "ticket_keys": {tenant: {key_id: hex}}}``
    from cluster.json (empty maps when none were recorded)."""
    try:
        data = json.loads(Paths(root).spec.read_text())
    except (OSError, ValueError):
        raise ClusterError(f"Cannot read the cluster spec {Paths(root).spec}.") from None
    trust = data.get("trust") if isinstance(data.get("trust"), dict) else {}
    return {"audit_keys": dict(trust.get("audit_keys") or {}), "ticket_keys": dict(trust.get("ticket_keys") or {})}


# ---------------------------------------------------------------- processes


def _read_json(path: pathlib.Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_pid(path: pathlib.Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _alive(pid: int, config: pathlib.Path) -> bool:
    """Whether ``pid`` is a running process of ours: started with ``config``
    on its command line (so a recycled pid is never signalled)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config).encode() in cmdline


def _log_tail(path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) or "    (empty log)"


def _spawn(paths: Paths, spec: ClusterSpec, name: str) -> int:
    module = SERVER_MODULES["matcher" if name == spec.matcher else "shareholder"]
    config = paths.config(spec, name)
    paths.ready(spec, name).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    log_path = paths.log(spec, name)
    # Logs name subjects, tenants and peers: owner-only, like the data.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log:
        log.write(f"--- vaultctl: starting {module} {name} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(paths.process_dir(spec, name)),
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    _write(paths.pid(spec, name), f"{proc.pid}\n", secret=True)
    return proc.pid


def _wait_ready(paths: Paths, spec: ClusterSpec, pids: dict[str, int], deadline: float) -> dict[str, dict]:
    """Wait for every named process's ready file; fail fast if one exits."""
    ready: dict[str, dict] = {}
    while True:
        for name, pid in pids.items():
            if name in ready:
                continue
            data = _read_json(paths.ready(spec, name))
            if data and data.get("pid") == pid and data.get("address"):
                ready[name] = data
                continue
            if not _alive(pid, paths.config(spec, name)):
                raise ClusterError(
                    f"{_label(spec, name)} (pid {pid}) exited during start-up; the end of "
                    f"{paths.log(spec, name)}:\n{_log_tail(paths.log(spec, name))}"
                )
        if len(ready) == len(pids):
            return ready
        if time.monotonic() > deadline:
            late = [n for n in pids if n not in ready]
            name = late[0]
            raise ClusterError(
                f"{_label(spec, name)} (pid {pids[name]}) did not become ready in time; the end of "
                f"{paths.log(spec, name)}:\n{_log_tail(paths.log(spec, name))}"
            )
        time.sleep(0.05)


def _identity(spec: ClusterSpec, name: str) -> pki.Identity:
    """The server identity a client must find at process ``name``."""
    return pki.Identity(pki.ROLE_MATCHER if name == spec.matcher else pki.ROLE_SHAREHOLDER, name)


def _label(spec: ClusterSpec, name: str) -> str:
    return "The matcher" if name == spec.matcher else f"Shareholder {name}"


def check_health(address: str, tls: TlsFiles, expect: pki.Identity, timeout_s: float = HEALTH_TIMEOUT_S) -> str:
    """grpc.health.v1 Check over mTLS: SERVING, NOT_SERVING, ... or UNREACHABLE."""
    return probe.check(address, tls, expect, timeout_s)


def _wait_healthy(paths: Paths, spec: ClusterSpec, ready: dict[str, dict], deadline: float) -> None:
    tls = paths.tls(pki.ROLE_AUDITOR, spec.auditor)
    for name, data in ready.items():
        while True:
            left = min(HEALTH_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
            state = check_health(data["address"], tls, _identity(spec, name), left)
            if state == "SERVING":
                break
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{_label(spec, name)} at {data['address']} is not healthy ({state}); the end of "
                    f"{paths.log(spec, name)}:\n{_log_tail(paths.log(spec, name))}"
                )
            time.sleep(0.1)


def _running(paths: Paths, spec: ClusterSpec) -> dict[str, int]:
    """The processes of this cluster that are alive: name -> pid."""
    alive = {}
    for name in (*spec.nodes, spec.matcher):
        pid = _read_pid(paths.pid(spec, name))
        if pid is not None and _alive(pid, paths.config(spec, name)):
            alive[name] = pid
    return alive


def up(
    root: str | os.PathLike,
    shareholders: int | None = None,
    threshold: int | None = None,
    dim: int | None = None,
    *,
    timeout_s: float = START_TIMEOUT_S,
    modalities: tuple[Modality, ...] | None = None,
    postgres: str | None = None,
    identify_confirm: bool | None = None,
) -> dict:
    """Create (first time) and start the cluster; return ``status(root)``
    plus ``actions``: what this call did to each process.

    On a directory that already holds a cluster, the stored spec is used and
    any explicitly given size must agree with it; members that run are left
    alone, stopped ones (killed, crashed, a stale pid file) are started on
    their own data, and a running matcher is pointed at nodes that came back
    on new ports. Each action is one of ``started``, ``already running``,
    ``reconfigured`` (the matcher, given the new node addresses).
    """
    paths = Paths(root)
    if paths.spec.exists():
        spec = load_spec(root)
        for label, given, stored in (
            ("shareholders", shareholders, spec.shareholders),
            ("threshold", threshold, spec.threshold),
            ("dim", dim, spec.dim),
            ("modality", modalities if modalities is None else tuple(modalities), spec.modalities),
            ("postgres", postgres, spec.postgres),
            ("identify-confirm", identify_confirm, spec.identify_confirm),
        ):
            if given is not None and given != stored:
                if label == "modality":
                    stored = ", ".join(f"{m.name}:{m.dimension}:{m.match_threshold}:{m.fmr}" for m in stored) or "none"
                raise ClusterError(
                    f"{paths.root} already holds a cluster with {label} = {stored}; "
                    f"use another --dir or omit --{label}."
                )
    else:
        n = DEFAULT_SHAREHOLDERS if shareholders is None else shareholders
        k = DEFAULT_THRESHOLD if threshold is None else threshold
        spec = ClusterSpec(shareholders=n, threshold=k, dim=DEFAULT_DIMENSION if dim is None else dim,
                           modalities=tuple(modalities or ()), postgres=postgres or "",
                           identify_confirm=True if identify_confirm is None else identify_confirm)
    if spec.postgres == LOCAL_POSTGRES:
        start_postgres(paths)  # before init: a new node's config names its database
    init(root, spec)

    deadline = time.monotonic() + timeout_s
    running = _running(paths, spec)
    actions: dict[str, dict] = {}
    started: dict[str, int] = {}  # spawned by this call: the only ones a failure stops
    try:
        waiting: dict[str, int] = {}
        ready: dict[str, dict] = {}
        for name in spec.nodes:
            if name in running:
                actions[name] = {"result": "already running", "pid": running[name]}
                data = _read_json(paths.ready(spec, name))
                if data and data.get("pid") == running[name] and data.get("address"):
                    ready[name] = data
                else:
                    waiting[name] = running[name]  # still starting: wait for it, leave it be
                continue
            stale = _read_pid(paths.pid(spec, name))
            started[name] = _spawn(paths, spec, name)
            actions[name] = {"result": "started", "pid": started[name]}
            if stale is not None:
                actions[name]["stale_pid"] = stale
        fresh = _wait_ready(paths, spec, {**waiting, **{n: started[n] for n in spec.nodes if n in started}}, deadline)
        _wait_healthy(paths, spec, {n: d for n, d in fresh.items() if n in started}, deadline)
        ready.update(fresh)
        if started:
            write_peer_tables(root)
        addresses = {name: ready[name]["address"] for name in spec.nodes}
        _deal_first_key(paths, spec, addresses)
        text = matcher_config_text(paths, spec, addresses)
        config = paths.config(spec, spec.matcher)
        if spec.matcher in running:
            pid = running[spec.matcher]
            actions[spec.matcher] = {"result": "already running", "pid": pid}
            _wait_ready(paths, spec, {spec.matcher: pid}, deadline)
            if not config.exists() or config.read_text() != text:
                switch_matcher(root, spec, addresses, timeout_s=max(0.1, deadline - time.monotonic()))
                actions[spec.matcher]["result"] = "reconfigured"
        else:
            stale = _read_pid(paths.pid(spec, spec.matcher))
            _write(config, text)
            started[spec.matcher] = _spawn(paths, spec, spec.matcher)
            actions[spec.matcher] = {"result": "started", "pid": started[spec.matcher]}
            if stale is not None:
                actions[spec.matcher]["stale_pid"] = stale
            matcher_ready = _wait_ready(paths, spec, {spec.matcher: started[spec.matcher]}, deadline)
            _wait_healthy(paths, spec, matcher_ready, deadline)
    except BaseException:
        _stop(paths, spec, started)
        raise
    info = status(root)
    info["actions"] = [{"name": name, **actions[name]} for name in (spec.matcher, *spec.nodes)]
    return info


def _deal_first_key(paths: "Paths", spec: ClusterSpec, addresses: dict[str, str]) -> None:
    """The committee's first MAC key, dealt jointly by the nodes (each node
    that holds one already just says so)."""
    from vaultctl import refresh
    from vaultctl.maintenance import MaintenanceError, Node

    nodes = [Node(name, i, addresses[name]) for i, name in enumerate(spec.nodes, start=1)]
    try:
        # One key wide enough for every modality's dimension (tags use its first d columns).
        width = max((spec.dim, *(m.dimension for m in spec.modalities)))
        refresh.deal_first_key(nodes, spec.threshold, paths.tls(pki.ROLE_AUDITOR, spec.auditor).load(), width)
    except MaintenanceError as exc:
        raise ClusterError(f"The nodes could not deal their first MAC key: {exc.message}") from None


def status(root: str | os.PathLike) -> dict:
    """Every process of the cluster: pid, address, health; and every file a
    client needs (CA, certificates and keys of each role, ticket keys)."""
    paths = Paths(root)
    spec = load_spec(root)
    auditor_tls = paths.tls(pki.ROLE_AUDITOR, spec.auditor)

    def process(name: str) -> dict:
        pid = _read_pid(paths.pid(spec, name))
        alive = pid is not None and _alive(pid, paths.config(spec, name))
        ready = _read_json(paths.ready(spec, name)) if alive else None
        if ready and ready.get("pid") != pid:
            ready = None
        address = ready.get("address") if ready else None
        if not alive:
            health = "STOPPED"
        elif address is None:
            health = "STARTING"
        else:
            health = check_health(address, auditor_tls, _identity(spec, name))
        role = pki.ROLE_MATCHER if name == spec.matcher else pki.ROLE_SHAREHOLDER
        entry = {
            "name": name,
            "address": address,
            "pid": pid if alive else None,
            "health": health,
            "metrics_port": ready.get("metrics_port") if ready else None,
            "cert": str(paths.cert(role, name)),
            "key": str(paths.key(role, name)),
            "config": str(paths.config(spec, name)),
            "log": str(paths.log(spec, name)),
        }
        if role == pki.ROLE_SHAREHOLDER:
            entry = {"index": spec.nodes.index(name) + 1, **entry, "data_dir": str(paths.node_dir(name))}
        return entry

    nodes = [process(name) for name in spec.nodes]
    matcher = process(spec.matcher)
    everything = [*nodes, matcher]

    def files(role: str, name: str) -> dict:
        return {"name": name, "cert": str(paths.cert(role, name)), "key": str(paths.key(role, name))}

    tenant = spec.tenant
    return {
        "dir": str(paths.root),
        "running": any(p["pid"] for p in everything),
        "healthy": all(p["health"] == "SERVING" for p in everything),
        "spec": {
            "shareholders": spec.shareholders,
            "threshold": spec.threshold,
            "dim": spec.dim,
            "tenants": list(spec.tenants),
            "modalities": [
                {"name": DEFAULT_MODALITY, "dimension": spec.dim, "match_threshold": spec.match_threshold, "fmr": None},
                *(asdict(m) for m in spec.modalities),
            ],
        },
        "matcher": matcher,
        "shareholders": nodes,
        "tls": {
            "ca": str(paths.ca),
            "psp": {**files(pki.ROLE_PSP, tenant), "tenant": tenant},
            "auditor": files(pki.ROLE_AUDITOR, spec.auditor),
            "matcher": files(pki.ROLE_MATCHER, spec.matcher),
            "shareholders": {n: files(pki.ROLE_SHAREHOLDER, n) for n in spec.nodes},
        },
        "tickets": {t: {"key": str(paths.ticket_key(t)), "key_id": key_id(t)} for t in spec.tenants},
        "cluster_id": cluster_id(paths.root),
    }


def _wait_exit(pid: int, config: pathlib.Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid, config):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(paths: Paths, spec: ClusterSpec, pids: dict[str, int], timeout_s: float = STOP_TIMEOUT_S) -> dict[str, str]:
    """SIGTERM the matcher, then the nodes; SIGKILL whatever outlives the
    timeout; remove pid and ready files. Returns name -> how it stopped."""
    outcome: dict[str, str] = {}
    order = [n for n in (spec.matcher, *spec.nodes) if n in pids]
    for name in order:
        if _alive(pids[name], paths.config(spec, name)):
            _signal(pids[name], signal.SIGTERM)
            outcome[name] = "stopped"
        else:
            outcome[name] = "not running"
    deadline = time.monotonic() + timeout_s
    for name in order:
        config = paths.config(spec, name)
        if not _wait_exit(pids[name], config, max(0.0, deadline - time.monotonic())):
            _signal(pids[name], signal.SIGKILL)
            _wait_exit(pids[name], config, 5.0)
            outcome[name] = "killed"
        _CHILDREN.pop(pids[name], None)
    for name in (spec.matcher, *spec.nodes):
        # A member this call did not stop keeps its files while it runs.
        pid = pids.get(name) or _read_pid(paths.pid(spec, name))
        if pid is None or not _alive(pid, paths.config(spec, name)):
            paths.pid(spec, name).unlink(missing_ok=True)
            paths.ready(spec, name).unlink(missing_ok=True)
    return outcome


def down(root: str | os.PathLike, *, timeout_s: float = STOP_TIMEOUT_S) -> dict:
    """Stop every process of the cluster; returns ``{"dir", "processes": [...]}``."""
    paths = Paths(root)
    spec = load_spec(root)
    pids = {}
    for name in (spec.matcher, *spec.nodes):
        pid = _read_pid(paths.pid(spec, name))
        if pid is not None:
            pids[name] = pid
    outcome = _stop(paths, spec, pids, timeout_s)
    # Nodes outside the spec (joining or leaving during a reshare) stop too.
    extra = [n for n in _node_dirs(paths) if n not in spec.nodes and paths.pid(spec, n).exists()]
    if extra:
        outcome.update(stop_processes(root, extra, timeout_s=timeout_s))
    processes = [{"name": name, "pid": pids.get(name), "result": outcome.get(name, "not running")}
                 for name in (spec.matcher, *spec.nodes, *extra)]
    if spec.postgres == LOCAL_POSTGRES:  # after the nodes: they close their connections first
        processes.append({"name": "postgres", "pid": None, "result": stop_postgres(paths)})
    return {"dir": str(paths.root), "processes": processes}


def kill_node(root: str | os.PathLike, name: str, sig: int = signal.SIGKILL, *, wait_s: float = 10.0) -> int:
    """Send ``sig`` to one process of the cluster (a node name or the
    matcher's) and, for SIGKILL/SIGTERM, wait until it is gone. Returns its pid."""
    paths = Paths(root)
    spec = load_spec(root)
    if name not in (*spec.nodes, spec.matcher) and not (paths.node_dir(name) / "node.toml").exists():
        raise ClusterError(f"The cluster has no process named {name!r}; it has {', '.join((*spec.nodes, spec.matcher))}.")
    pid = _read_pid(paths.pid(spec, name))
    config = paths.config(spec, name)
    if pid is None or not _alive(pid, config):
        raise ClusterError(f"{_label(spec, name)} is not running.")
    _signal(pid, sig)
    if sig in (signal.SIGKILL, signal.SIGTERM):
        if not _wait_exit(pid, config, wait_s):
            raise ClusterError(f"{_label(spec, name)} (pid {pid}) did not exit after signal {signal.Signals(sig).name}.")
        _CHILDREN.pop(pid, None)
    return pid


def cluster_files(root: str | os.PathLike) -> list[pathlib.Path]:
    """Every regular file under the cluster directory."""
    return sorted(p for p in Paths(root).root.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------- committee changes (vaultctl reshare)


def _node_dirs(paths: Paths) -> list[str]:
    folder = paths.root / "nodes"
    return sorted(p.name for p in folder.iterdir() if (p / "node.toml").exists()) if folder.is_dir() else []


def write_spec(root: str | os.PathLike, spec: ClusterSpec, *, retired: list[str] | None = None) -> None:
    """Rewrite the spec fields of cluster.json (n, k, node names, ...),
    keeping every other field (``trust``); ``retired`` names are added to
    its ``retired`` list (nodes that left the committee: their folders and
    audit logs stay)."""
    paths = Paths(root)
    data = json.loads(paths.spec.read_text())
    data.update(spec.to_json())
    if retired:
        data["retired"] = sorted(set(data.get("retired") or []) | set(retired))
    _write(paths.spec, json.dumps(data, indent=2) + "\n")


def add_nodes(root: str | os.PathLike, spec: ClusterSpec) -> Paths:
    """Certificates, KEK, audit key and node.toml for every node of ``spec``
    that has none yet (its index is its position in ``spec.nodes``); records
    the new audit keys in cluster.json's trust anchors. Never touches an
    existing file."""
    paths = Paths(root)
    ca_cert, ca_key = paths.ca.read_bytes(), paths.ca_key.read_bytes()
    for name in spec.nodes:
        _make_operator_key(paths, name)
    for name in spec.nodes:
        role = pki.ROLE_SHAREHOLDER
        if not paths.cert(role, name).exists() or not paths.key(role, name).exists():
            cert, key = pki.issue_cert(ca_cert, ca_key, role, name)
            _write(paths.key(role, name), key, secret=True)
            _write(paths.cert(role, name), cert)
        _make_node_files(paths, spec, name)
    for name in spec.nodes:
        _write_node_config(paths, spec, name, founding=False)
    record_trust(paths, spec)
    return paths


def start_processes(root: str | os.PathLike, names: list[str], *, timeout_s: float = START_TIMEOUT_S) -> dict[str, dict]:
    """Start the named nodes that are not running (any node folder, in the
    spec or not) and wait until each is ready and healthy; returns every
    named node's ready file."""
    paths = Paths(root)
    spec = load_spec(root)
    deadline = time.monotonic() + timeout_s
    started: dict[str, int] = {}
    ready: dict[str, dict] = {}
    try:
        for name in names:
            pid = _read_pid(paths.pid(spec, name))
            if pid is not None and _alive(pid, paths.config(spec, name)):
                data = _read_json(paths.ready(spec, name))
                if data and data.get("pid") == pid and data.get("address"):
                    ready[name] = data
                    continue
                started[name] = pid  # starting: wait for it
                continue
            started[name] = _spawn(paths, spec, name)
        fresh = _wait_ready(paths, spec, started, deadline)
        _wait_healthy(paths, spec, fresh, deadline)
    except BaseException:
        # Stop what this call spawned through its process handle (not only
        # by the pid file), so that nothing outlives a failed start.
        for name, pid in started.items():
            child = _CHILDREN.pop(pid, None)
            if child is not None and child.poll() is None:
                child.terminate()
                try:
                    child.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        stop_processes(root, list(started))
        raise
    ready.update(fresh)
    if fresh:
        write_peer_tables(root)
    return ready


def stop_processes(root: str | os.PathLike, names: list[str], *, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, str]:
    """SIGTERM the named nodes (any node folder), SIGKILL after ``timeout_s``."""
    paths = Paths(root)
    spec = load_spec(root)
    outcome: dict[str, str] = {}
    pids = {}
    for name in names:
        pid = _read_pid(paths.pid(spec, name))
        if pid is not None and _alive(pid, paths.config(spec, name)):
            _signal(pid, signal.SIGTERM)
            pids[name] = pid
            outcome[name] = "stopped"
        else:
            outcome[name] = "not running"
    deadline = time.monotonic() + timeout_s
    for name, pid in pids.items():
        config = paths.config(spec, name)
        if not _wait_exit(pid, config, max(0.0, deadline - time.monotonic())):
            _signal(pid, signal.SIGKILL)
            _wait_exit(pid, config, 5.0)
            outcome[name] = "killed"
        _CHILDREN.pop(pid, None)
    for name in names:
        paths.pid(spec, name).unlink(missing_ok=True)
        paths.ready(spec, name).unlink(missing_ok=True)
    return outcome


def switch_matcher(root: str | os.PathLike, spec: ClusterSpec, addresses: dict[str, str], *,
                   timeout_s: float = START_TIMEOUT_S) -> dict:
    """Point the running matcher at ``spec``'s committee: rewrite matcher.toml,
    SIGHUP it, and wait until its ready file shows the new config's digest."""
    paths = Paths(root)
    current = load_spec(root)
    config = paths.config(current, current.matcher)
    text = matcher_config_text(paths, spec, addresses)
    _write(config, text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    pid = _read_pid(paths.pid(current, current.matcher))
    if pid is None or not _alive(pid, config):
        raise ClusterError("The matcher is not running; start the cluster and run the command again.")
    _signal(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while True:
        data = _read_json(paths.ready(current, current.matcher))
        if data and data.get("pid") == pid and data.get("config_sha256") == digest:
            return data
        if time.monotonic() > deadline:
            raise ClusterError(
                f"The matcher did not take the new committee in time; the end of {paths.log(current, current.matcher)}:\n"
                f"{_log_tail(paths.log(current, current.matcher))}"
            )
        time.sleep(0.05)


def restart_node(root: str | os.PathLike, name: str, *, timeout_s: float = START_TIMEOUT_S) -> dict:
    """Start one node of a running cluster again (after a crash) and point the
    matcher at its new port; returns the node's ready file."""
    spec = load_spec(root)
    ready = start_processes(root, [name], timeout_s=timeout_s)[name]
    if name in spec.nodes:
        paths = Paths(root)
        addresses = {}
        for n in spec.nodes:
            data = _read_json(paths.ready(spec, n))
            if data and data.get("address"):
                addresses[n] = data["address"]
        if len(addresses) == len(spec.nodes):
            switch_matcher(root, spec, addresses, timeout_s=timeout_s)
    return ready
