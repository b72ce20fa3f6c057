"""Deployment as operators expect it (deploy/): every institution's manifests,
rendered from its own values file and parsed back, keep each institution
apart (own namespace, own Secrets, own volumes, nothing shared), run as an
unprivileged user, carry no secret, and probe health with grpc.health.v1;
the configs they carry load in the real node and matcher loaders; the
image definition runs as non-root with a health check and bakes in no key;
and the probe itself answers for a real running server (and fails for a
stopped one)."""
from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys

import pytest
import yaml

from matcher import config as matcher_config
from shareholders.config import load_config
from vaultctl import cluster

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VALUES = sorted((DEPLOY / "values").glob("*.toml"))
sys.path.insert(0, str(DEPLOY))
import render  # noqa: E402  (deploy/render.py, a script of ours)

SECRET_PATTERNS = (b"PRIVATE KEY", b"BEGIN CERTIFICATE", b"SPLITVAULT_KEK_JSON", b'"keys": {')


def rendered(values_file: pathlib.Path) -> list[dict]:
    r = subprocess.run([sys.executable, str(DEPLOY / "render.py"), str(values_file)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    for pattern in SECRET_PATTERNS:
        assert pattern not in r.stdout, f"{values_file.name}: rendered manifests contain {pattern!r}"
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc is not None]


def workload(objects: list[dict]) -> dict:
    (found,) = [o for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    return found


def test_there_is_one_values_file_per_institution_and_a_matcher():
    names = {render.load_values(v)["institution"]["name"] for v in VALUES}
    assert {"bank-a", "bank-b", "bank-c", "matcher"} <= names and len(names) == len(VALUES)


@pytest.mark.parametrize("values_file", VALUES, ids=lambda p: p.stem)
def test_each_institution_is_alone_in_its_namespace_unprivileged_and_probed(values_file, tmp_path):
    values = render.load_values(values_file)
    ns = values["institution"]["namespace"]
    objects = rendered(values_file)
    kinds = [o["kind"] for o in objects]
    assert "Secret" not in kinds  # never rendered: the institution makes its own
    (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == ns
    assert all(o["metadata"]["namespace"] == ns for o in objects if o["kind"] != "Namespace")
    assert [o for o in objects if o["kind"] == "ServiceAccount"][0]["automountServiceAccountToken"] is False

    w = workload(objects)
    pod = w["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "vaultrpc.probe"] and render.CONFIG_PATH in command

    # Volumes: the institution's own Secrets, in-memory scratch, and (a node
    # only) volumes claimed per pod; no host path, no pre-existing claim that
    # another institution could mount too.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == values["secrets"]["tls"]
    assert all(set(v) <= {"name", "secret", "configMap", "emptyDir"} for v in volumes.values())
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_text = [o for o in objects if o["kind"] == "ConfigMap"][0]["data"]["config.toml"]
    path = tmp_path / "config.toml"
    path.write_text(config_text)
    if "node" in values:
        assert w["kind"] == "StatefulSet" and w["spec"]["replicas"] == 1
        assert volumes["node-keys"]["secret"]["secretName"] == values["secrets"]["node_keys"]
        claims = [c["metadata"]["name"] for c in w["spec"]["volumeClaimTemplates"]]
        assert claims == ["data", "keys"] and set(claims) <= set(mounts) and not set(claims) & set(volumes)
        cfg = load_config(path, env={})  # the real node's loader
        assert cfg.name == values["institution"]["name"] and cfg.index == values["node"]["index"]
        assert cfg.listen == f"0.0.0.0:{render.GRPC_PORT}" and cfg.peers == values["peers"]
        assert str(cfg.data_dir).startswith(mounts["data"])
        assert cfg.kek_file.startswith(mounts["keys"]) and cfg.audit_key_file.startswith(mounts["run"])
        assert volumes["run"]["emptyDir"]["medium"] == "Memory"  # the audit key copy never touches a disk
        tls = cfg.tls
    else:
        assert w["kind"] == "Deployment" and "volumeClaimTemplates" not in w["spec"]
        cfg = matcher_config.load(path, env={})
        assert [(s.name, s.address) for s in cfg.shareholders] == [
            (s["name"], s["address"]) for s in values["shareholders"]]
        tls = cfg.tls
    assert all(str(p).startswith(mounts["tls"]) for p in (tls.ca, tls.cert, tls.key))


def test_no_two_institutions_share_a_namespace_or_a_volume():
    seen_ns, seen_volumes = set(), set()
    for values_file in VALUES:
        objects = rendered(values_file)
        ns = render.load_values(values_file)["institution"]["namespace"]
        assert ns not in seen_ns
        seen_ns.add(ns)
        w = workload(objects)
        for claim in w["spec"].get("volumeClaimTemplates", []):
            # A claim template is per pod and per namespace: (ns, claim) is unique.
            key = (ns, claim["metadata"]["name"])
            assert key not in seen_volumes
            seen_volumes.add(key)


def test_a_joining_node_has_no_committee_of_its_own(tmp_path):
    """A node that joins by a reshare learns the committee from the approved
    plan: its values have no [committee], and its config still loads."""
    values = render.load_values(DEPLOY / "values" / "bank-a.toml")
    founding = load_config(_config_file(render.render(values), tmp_path / "founding.toml"), env={})
    del values["committee"]
    joining = load_config(_config_file(render.render(values), tmp_path / "joining.toml"), env={})
    # A changed config rolls the pod: its template carries the config's digest.
    digest = lambda objects: workload(objects)["spec"]["template"]["metadata"]["annotations"]["splitvault.io/config-sha256"]  # noqa: E731
    assert digest(render.render(values)) != digest(render.render(render.load_values(DEPLOY / "values" / "bank-a.toml")))
    assert founding.committee_threshold == 2 and founding.committee == {"bank-a": 1, "bank-b": 2, "bank-c": 3}
    assert joining.committee == {} and joining.committee_pins == {}


def _config_file(objects: list[dict], path: pathlib.Path) -> pathlib.Path:
    path.write_text([o for o in objects if o["kind"] == "ConfigMap"][0]["data"]["config.toml"])
    return path


def test_a_values_file_missing_a_key_is_one_sentence(tmp_path):
    text = (DEPLOY / "values" / "bank-a.toml").read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text(re.sub(r"(?m)^index = .*$", "", text, count=1))
    r = subprocess.run([sys.executable, str(DEPLOY / "render.py"), str(broken)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "render: The values file is missing node.index."


def test_the_image_runs_unprivileged_with_a_health_check_and_no_key_inside():
    lines = [ln.strip() for ln in (DEPLOY / "Containerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    text = (DEPLOY / "Containerfile").read_text()
    assert '"vaultrpc.probe", "--config", "/etc/splitvault/config.toml"' in text
    copies = [ln for ln in lines if ln.startswith(("COPY", "ADD"))]
    assert not [ln for ln in copies if re.search(r"\.(key|pem)\b|kek|secret|operators|psp/", ln)]
    assert not [ln for ln in lines if ln.startswith("ENV") and "SPLITVAULT_" in ln]
    assert subprocess.run(["sh", "-n", str(DEPLOY / "entrypoint.sh")]).returncode == 0
    # The PostgreSQL client for a node's [store] backend = "postgres".
    assert re.search(r'^RUN pip install .* "psycopg\[binary\]', text, re.M)


@pytest.mark.e2e
def test_the_probe_answers_for_a_running_server_and_fails_for_a_stopped_one(tmp_path):
    root = tmp_path / "cluster"
    cluster.up(root, 3, 2, 8)
    try:
        paths = cluster.Paths(root)
        spec = cluster.load_spec(root)
        node_toml, matcher_toml = paths.config(spec, "bank-a"), paths.config(spec, spec.matcher)

        def probe(config: pathlib.Path) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "vaultrpc.probe", "--config", str(config)],
                                  capture_output=True, text=True, cwd=ROOT, timeout=60)

        for config in (node_toml, matcher_toml):
            r = probe(config)
            assert r.returncode == 0 and r.stderr == "", r.stderr
        address = cluster.status(root)["shareholders"][0]["address"]
        cluster.kill_node(root, "bank-a", signal.SIGKILL)
        r = probe(node_toml)  # its stale ready file still names the old port
        assert r.returncode == 1
        assert r.stderr.strip() == f"probe: shareholder/bank-a at {address} is UNREACHABLE."
    finally:
        cluster.down(root)


NODE_VALUES = [v for v in VALUES if "node" in render.load_values(v)]


def _conninfo(dsn: str) -> dict:
    from psycopg.conninfo import conninfo_to_dict  # libpq's own parser

    return conninfo_to_dict(dsn)


@pytest.mark.parametrize("values_file", NODE_VALUES, ids=lambda p: p.stem)
def test_a_node_on_postgres_signs_in_to_its_own_database_with_certificates_only(values_file, tmp_path):
    pytest.importorskip("psycopg")
    values = render.load_values(values_file)
    store, secrets = values["store"], values["secrets"]
    objects = rendered(values_file)
    files = [o for o in objects if o["kind"] == "ConfigMap"][0]["data"]
    assert "password" not in "".join(files.values()).lower()
    pod = workload(objects)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (init,) = pod["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}

    def dsn_of(config: str, name: str, owner: bool) -> dict:
        (tmp_path / name).write_text(config)
        cfg = load_config(tmp_path / name, env={})  # the real node's loader
        assert cfg.store_backend == "postgres" and bool(cfg.store_owner_dsn) == owner
        info = _conninfo(cfg.store_owner_dsn if owner else cfg.store_dsn)
        assert "password" not in info and "passfile" not in info
        # TLS to the institution's own database server, its certificate checked (CA and host name).
        assert info["sslmode"] == "verify-full"
        assert (info["host"], int(info["port"]), info["dbname"]) == (store["host"], store.get("port", 5432), store["database"])
        return info

    # The serving node: its own role, its certificate from its own Secret; the owner's is not mounted.
    node = dsn_of(files["config.toml"], "config.toml", owner=False)
    assert node["user"] == store["role"]
    assert volumes["pg"]["secret"]["secretName"] == secrets["store"]
    assert all(node[k].startswith(mounts["pg"] + "/") for k in ("sslrootcert", "sslcert", "sslkey"))
    assert "pg-owner" not in mounts
    # The init container: the owner migrates and grants, with the owner's certificate.
    assert init["name"] == "migrate" and init["args"] == ["migrate"] and init["image"] == container["image"]
    assert init["securityContext"] == container["securityContext"]
    owner = dsn_of(files["migrate.toml"], "migrate.toml", owner=True)
    assert owner["user"] == store["owner_role"] != store["role"]
    assert volumes["pg-owner"]["secret"]["secretName"] == secrets["store_owner"] != secrets["store"]
    assert all(owner[k].startswith(init_mounts["pg-owner"] + "/") for k in ("sslrootcert", "sslcert", "sslkey"))
    assert init_mounts["config"] == render.MIGRATE_CONFIG_PATH
    assert render.MIGRATE_CONFIG_PATH in (DEPLOY / "entrypoint.sh").read_text()


def test_no_two_institutions_share_a_database():
    pytest.importorskip("psycopg")
    seen = {}
    for values_file in NODE_VALUES:
        config = [o for o in rendered(values_file) if o["kind"] == "ConfigMap"][0]["data"]["config.toml"]
        dsn = _conninfo(re.search(r'(?m)^dsn = "(.*)"$', config).group(1))
        # Each institution runs its own database server: neither the server nor the database is shared.
        for key in (dsn["host"], (dsn["host"], dsn["port"], dsn["dbname"])):
            assert key not in seen, (values_file.name, seen.get(key))
            seen[key] = values_file.name
    assert len(seen) == 2 * len(NODE_VALUES) == 6


@pytest.mark.parametrize("line, message", [
    ('password = "hunter2"', "The values file's [store] takes no password: the roles sign in with the client "
                             "certificates in secrets.store and secrets.store_owner."),
    ('dsn = "host=pg user=splitvault_node"', "The values file's [store] takes no dsn: the roles sign in with the "
                                             "client certificates in secrets.store and secrets.store_owner."),
    ('owner_role = "splitvault_node"', "The values store.role and store.owner_role must differ: the node's role "
                                       "must not own the tables."),
], ids=["password", "dsn", "owner-is-node"])
def test_a_store_with_a_password_or_the_owners_role_is_refused(tmp_path, line, message):
    text = re.sub(r'(?m)^owner_role = .*$', "", (DEPLOY / "values" / "bank-a.toml").read_text())
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace('backend = "postgres"', f'backend = "postgres"\n{line}'))
    if not line.startswith("owner_role"):
        broken.write_text(broken.read_text().replace(line, f'{line}\nowner_role = "splitvault_owner"'))
    r = subprocess.run([sys.executable, str(DEPLOY / "render.py"), str(broken)], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr.strip()) == (1, "", f"render: {message}")


def test_a_node_without_a_store_section_stays_on_sqlite(tmp_path):
    values = render.load_values(DEPLOY / "values" / "bank-a.toml")
    del values["store"]
    objects = render.render(values)
    cfg = load_config(_config_file(objects, tmp_path / "config.toml"), env={})
    assert cfg.store_backend == "sqlite" and cfg.store_dsn == ""
    pod = workload(objects)["spec"]["template"]["spec"]
    assert "initContainers" not in pod and not {"pg", "pg-owner"} & {v["name"] for v in pod["volumes"]}
