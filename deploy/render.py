"""Render one institution's Kubernetes manifests from its own values file.

    python deploy/render.py deploy/values/bank-a.toml > bank-a.yaml
    kubectl apply -f bank-a.yaml      # in the institution's own cluster/account

One values file per institution (deploy/values/*.toml): a shareholder node
(``[node]``) or the matcher (``[matcher]``). What comes out, all in the
institution's own namespace: the Namespace, a ServiceAccount without an API
token, the server's config (a ConfigMap holding its config.toml), a Service
and a NetworkPolicy for the gRPC port, and a StatefulSet (a node: one
replica, its own data and keys volumes from volumeClaimTemplates) or a
Deployment (the matcher: stateless, no volume). Liveness and readiness
probes run ``python -m vaultrpc.probe`` (grpc.health.v1 over the server's own
mTLS). Secrets are never rendered: the institution creates them itself
(names in ``[secrets]``) from its own key material; this script only refers
to them by name. Errors are one sentence on stderr, exit 1.

A node's store is SQLite on its data volume unless its values have a
``[store]`` with ``backend = "postgres"``: then the node uses its own
institution's PostgreSQL database (``host``, ``port``, ``database``) as the
role ``role`` (not the tables' owner, bound by row-level security), over
TLS with ``sslmode=verify-full`` against the database's CA, authenticated
by a client certificate (the Secret ``secrets.store``: ca.pem, tls.crt,
tls.key); no password, no DSN in the values. An init container
(``migrate``) runs ``python -m shareholders --migrate`` as ``owner_role``
(its certificate in ``secrets.store_owner``, mounted there only) before
each start: it migrates the schema and grants the node's role.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import re
import sys
import tomllib

import yaml

GRPC_PORT = 7443
METRICS_PORT = 9464
USER_ID = 10001
CONFIG_PATH = "/etc/splitvault/config.toml"
TLS_DIR = "/etc/splitvault/tls"
NODE_KEYS_DIR = "/etc/splitvault/node-keys"
MIGRATE_CONFIG_PATH = "/etc/splitvault/migrate.toml"
PG_DIR = "/etc/splitvault/pg"              # the node role's client certificate and the database CA
PG_OWNER_DIR = "/etc/splitvault/pg-owner"  # the owner role's, in the migrate init container only
DATA_DIR = "/var/lib/splitvault"
KEYS_DIR = "/var/lib/splitvault-keys"
RUN_DIR = "/run/splitvault"
PROBE = ["python", "-m", "vaultrpc.probe", "--config", CONFIG_PATH]


class ValuesError(ValueError):
    """A values file is unusable; the message says which key and why."""


def _q(value) -> str:
    return json.dumps(value)  # a JSON string or number is valid TOML


def _need(values: dict, dotted: str, kind=str):
    target = values
    for part in dotted.split("."):
        if not isinstance(target, dict) or part not in target:
            raise ValuesError(f"The values file is missing {dotted}.")
        target = target[part]
    if not isinstance(target, kind) or (kind is int and isinstance(target, bool)):
        raise ValuesError(f"The value {dotted} has the wrong type.")
    return target


def _table(name: str, mapping: dict) -> str:
    return f"\n[{name}]\n" + "".join(f"{_q(k)} = {_q(v)}\n" for k, v in mapping.items())


def _tenants(values: dict, matcher: bool) -> str:
    out = ""
    for tenant, t in _need(values, "tenants", dict).items():
        out += f"\n[tenants.{_q(tenant)}]\n"
        if matcher:
            out += f"match_threshold = {_q(float(t.get('match_threshold', 0.8)))}\n"
            out += f"score_allowed = {'true' if t.get('score_allowed') else 'false'}\n"
        keys = ", ".join(f"{_q(k)} = {_q(v)}" for k, v in _need(t, "ticket_keys", dict).items())
        out += f"ticket_keys = {{ {keys} }}\n"
    return out


def _tls_toml() -> str:
    return f"\n[tls]\nca = {_q(TLS_DIR + '/ca.pem')}\ncert = {_q(TLS_DIR + '/tls.crt')}\nkey = {_q(TLS_DIR + '/tls.key')}\n"


_STORE_KEYS = {"backend", "host", "port", "database", "role", "owner_role"}
_PG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PG_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def postgres_store(values: dict) -> dict | None:
    """The node's [store] on PostgreSQL, checked; None for SQLite (the default)."""
    store = values.get("store", {})
    if not isinstance(store, dict):
        raise ValuesError("The value store has the wrong type.")
    if store.get("backend", "sqlite") == "sqlite" and set(store) <= {"backend"}:
        return None
    if store.get("backend") != "postgres":
        raise ValuesError('The value store.backend must be "sqlite" or "postgres".')
    extra = sorted(set(store) - _STORE_KEYS)
    if extra:
        # A password or a whole DSN would land in the ConfigMap: the roles
        # authenticate with their client certificates from the Secrets.
        raise ValuesError(f"The values file's [store] takes no {extra[0]}: the roles sign in with the client "
                          f"certificates in secrets.store and secrets.store_owner.")
    host, database = _need(values, "store.host"), _need(values, "store.database")
    role, owner = _need(values, "store.role"), _need(values, "store.owner_role")
    port = _need(values, "store.port", int) if "port" in store else 5432
    if not _PG_HOST.fullmatch(host):
        raise ValuesError("The value store.host must be a host name.")
    for key, value in (("database", database), ("role", role), ("owner_role", owner)):
        if not _PG_NAME.fullmatch(value):
            raise ValuesError(f"The value store.{key} must be a plain PostgreSQL name.")
    if role == owner:
        raise ValuesError("The values store.role and store.owner_role must differ: the node's role must not own the tables.")
    if not 0 < port < 65536:
        raise ValuesError("The value store.port must be a TCP port.")
    secrets = _need(values, "secrets", dict)
    _need(secrets, "store"), _need(secrets, "store_owner")
    return {"host": host, "port": port, "database": database, "role": role, "owner_role": owner}


def _dsn(store: dict, role: str, certs: str) -> str:
    """A libpq connection string with no password: TLS to the institution's
    own database, its server certificate checked against the database's CA
    and its host name (verify-full), the role signing in with its certificate."""
    return (f"host={store['host']} port={store['port']} dbname={store['database']} user={role} "
            f"sslmode=verify-full sslrootcert={certs}/ca.pem sslcert={certs}/tls.crt sslkey={certs}/tls.key")


def _store_toml(values: dict, *, owner: bool) -> str:
    store = postgres_store(values)
    if store is None:
        return ""
    out = f"\n[store]\nbackend = \"postgres\"\ndsn = {_q(_dsn(store, store['role'], PG_DIR))}\n"
    if owner:
        out += f"owner_dsn = {_q(_dsn(store, store['owner_role'], PG_OWNER_DIR))}\n"
    return out


def node_config(values: dict, *, migrate: bool = False) -> str:
    """The node's config.toml (docs/contracts.md, "Node config") for its
    container; with ``migrate``, the init container's (the owner's DSN too)."""
    name = _need(values, "institution.name")
    # A founding member names the committee; a node joining by a reshare has
    # none of its own yet (it learns it from the approved plan).
    committee_toml = ""
    if "committee" in values:
        committee = _need(values, "committee", dict)
        members = ", ".join(f"{_q(k)} = {int(v)}" for k, v in _need(committee, "members", dict).items())
        pins = ", ".join(f"{_q(k)} = {_q(v)}" for k, v in _need(committee, "pins", dict).items())
        committee_toml = (f"\n[committee]\nthreshold = {_need(committee, 'threshold', int)}\nmembers = {{ {members} }}\n"
                          f"pins = {{ {pins} }}\n")
    limits = values.get("limits", {})
    witness = "".join(
        f"\n[[witness.peers]]\nname = {_q(_need(w, 'name'))}\naudit_public_key = {_q(_need(w, 'audit_public_key'))}\n"
        f"address = {_q(_need(w, 'address'))}\n" for w in values.get("witness", []))
    what = "Migrate init container of shareholder node" if migrate else "Shareholder node"
    return (
        f"# {what} {name}; rendered by deploy/render.py from its values file.\n"
        f"[node]\nname = {_q(name)}\ncluster_id = {_q(_need(values, 'node.cluster_id'))}\n"
        f"index = {_need(values, 'node.index', int)}\nlisten = {_q(f'0.0.0.0:{GRPC_PORT}')}\n"
        f"data_dir = {_q(DATA_DIR)}\nlog_level = {_q(values.get('node', {}).get('log_level', 'INFO'))}\n"
        + _tls_toml()
        + f"\n[keys]\nkek_file = {_q(KEYS_DIR + '/kek.json')}\naudit_key_file = {_q(RUN_DIR + '/audit.key')}\n"
        + f"\n[metrics]\nhost = \"0.0.0.0\"\nport = {METRICS_PORT}\n"
        + f"\n[limits]\nattempts_per_subject = {int(limits.get('attempts_per_subject', 10))}\n"
          f"attempt_window_s = {int(limits.get('attempt_window_s', 60))}\n"
        + _tenants(values, matcher=False)
        + witness
        + _table("operators", _need(values, "operators", dict))
        + committee_toml
        + _table("peers", _need(values, "peers", dict))
        + _store_toml(values, owner=migrate)
    )


def matcher_config(values: dict) -> str:
    m = _need(values, "matcher", dict)
    nodes = "".join(
        f"\n[[shareholders]]\nname = {_q(_need(s, 'name'))}\nindex = {_need(s, 'index', int)}\n"
        f"address = {_q(_need(s, 'address'))}\n" for s in _need(values, "shareholders", list))
    return (
        f"# Matcher {_need(values, 'institution.name')}; rendered by deploy/render.py from its values file.\n"
        f"[matcher]\nlisten = {_q(f'0.0.0.0:{GRPC_PORT}')}\ncluster_id = {_q(_need(m, 'cluster_id'))}\n"
        f"dimension = {_need(m, 'dimension', int)}\nthreshold = {_need(m, 'threshold', int)}\n"
        f"call_timeout_ms = {int(m.get('call_timeout_ms', 2000))}\nlog_level = {_q(m.get('log_level', 'INFO'))}\n"
        + _tls_toml()
        + f"\n[metrics]\nhost = \"0.0.0.0\"\nport = {METRICS_PORT}\n"
        + nodes
        + _tenants(values, matcher=True)
    )


def _probe(period: int, failures: int) -> dict:
    return {"exec": {"command": PROBE}, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}


def _secret_volume(name: str, secret: str) -> dict:
    # Owner and group (fsGroup) read only; the entrypoint installs the
    # node's keys 0600 where the node reads them.
    return {"name": name, "secret": {"secretName": secret, "defaultMode": 0o440}}


def render(values: dict) -> list[dict]:
    """The institution's Kubernetes objects, in apply order."""
    name = _need(values, "institution.name")
    ns = _need(values, "institution.namespace")
    image = _need(values, "institution.image")
    is_node = "node" in values
    if is_node == ("matcher" in values):
        raise ValuesError("A values file describes either a [node] or a [matcher], not both or neither.")
    role = "shareholders" if is_node else "matcher"
    config = node_config(values) if is_node else matcher_config(values)
    store = postgres_store(values) if is_node else None
    config_files = {"config.toml": config}
    if store:
        config_files["migrate.toml"] = node_config(values, migrate=True)
    secrets = _need(values, "secrets", dict)
    labels = {"app.kubernetes.io/name": "splitvault", "app.kubernetes.io/component": role,
              "splitvault.io/institution": name}
    meta = lambda n: {"name": n, "namespace": ns, "labels": labels}  # noqa: E731

    mounts = [{"name": "config", "mountPath": CONFIG_PATH, "subPath": "config.toml", "readOnly": True},
              {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "config", "configMap": {"name": "splitvault-config"}},
               _secret_volume("tls", _need(secrets, "tls")),
               {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]
    if is_node:
        mounts += [{"name": "node-keys", "mountPath": NODE_KEYS_DIR, "readOnly": True},
                   {"name": "run", "mountPath": RUN_DIR},
                   {"name": "data", "mountPath": DATA_DIR},
                   {"name": "keys", "mountPath": KEYS_DIR}]
        volumes += [_secret_volume("node-keys", _need(secrets, "node_keys")),
                    {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]
    if store:
        # libpq takes a key file owned by root with mode 0640 or less (a Secret's, 0440 here).
        mounts.append({"name": "pg", "mountPath": PG_DIR, "readOnly": True})
        volumes += [_secret_volume("pg", _need(secrets, "store")),
                    _secret_volume("pg-owner", _need(secrets, "store_owner"))]
    security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    container = {
        "name": "node" if is_node else "matcher",
        "image": image,
        "args": [role],
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT}, {"name": "metrics", "containerPort": METRICS_PORT}],
        "volumeMounts": mounts,
        "startupProbe": _probe(5, 24),
        "readinessProbe": _probe(10, 2),
        "livenessProbe": _probe(20, 3),
        "resources": values.get("resources", {"requests": {"cpu": "500m", "memory": "512Mi"}}),
        "securityContext": security,
    }
    pod = {
        # A changed config changes the pod template, so `kubectl apply` rolls
        # the server (a subPath-mounted file is not updated in a running pod).
        "metadata": {"labels": labels,
                     "annotations": {"splitvault.io/config-sha256": hashlib.sha256(
                         "".join(config_files.values()).encode()).hexdigest()}},
        "spec": {
            "serviceAccountName": "splitvault",
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                                "fsGroup": USER_ID, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        },
    }
    if store:
        # Before every start: the owner brings the schema up to date and
        # grants the node's role (a no-op when current); the owner's
        # certificate is mounted here only, never in the serving container.
        pod["spec"]["initContainers"] = [{
            "name": "migrate", "image": image, "args": ["migrate"],
            "volumeMounts": [{"name": "config", "mountPath": MIGRATE_CONFIG_PATH, "subPath": "migrate.toml",
                              "readOnly": True},
                             {"name": "pg", "mountPath": PG_DIR, "readOnly": True},
                             {"name": "pg-owner", "mountPath": PG_OWNER_DIR, "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
            "securityContext": security,
        }]
    selector = {"matchLabels": labels}
    if is_node:
        node = values["node"]

        def claim(claim_name: str, size_key: str, default: str) -> dict:
            spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": node.get(size_key, default)}}}
            if node.get("storage_class"):
                spec["storageClassName"] = node["storage_class"]
            return {"metadata": {"name": claim_name, "labels": labels}, "spec": spec}

        workload = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("splitvault-node"),
                    "spec": {"replicas": 1, "serviceName": "splitvault", "selector": selector, "template": pod,
                             "volumeClaimTemplates": [claim("data", "storage", "20Gi"),
                                                      claim("keys", "key_storage", "64Mi")]}}
    else:
        replicas = _need(values, "matcher.replicas", int) if "replicas" in values["matcher"] else 2
        workload = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("splitvault-matcher"),
                    "spec": {"replicas": replicas, "selector": selector, "template": pod}}
    service = values.get("service", {})
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("splitvault"), "automountServiceAccountToken": False},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("splitvault-config"), "data": config_files},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta("splitvault"),
         "spec": {"type": service.get("type", "ClusterIP"), "selector": labels,
                  "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"}]}},
        # gRPC (mTLS) from anywhere: the peers, the matcher and the auditor are
        # other institutions; metrics only from the institution's own namespace.
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("splitvault"),
         "spec": {"podSelector": selector, "policyTypes": ["Ingress"],
                  "ingress": [{"ports": [{"protocol": "TCP", "port": GRPC_PORT}]},
                              {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]}]}},
        workload,
    ]


def load_values(path: str | pathlib.Path) -> dict:
    try:
        return tomllib.loads(pathlib.Path(path).read_text())
    except OSError as exc:
        raise ValuesError(f"Cannot read the values file {path}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValuesError(f"The values file {path} is not valid TOML: {exc}.") from None


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the config files stay readable)."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python deploy/render.py VALUES.toml", file=sys.stderr)
        return 1
    try:
        objects = render(load_values(args[0]))
    except ValuesError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(dump(objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
