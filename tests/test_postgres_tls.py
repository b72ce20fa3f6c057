"""A node on PostgreSQL the way deploy/ renders it: TLS with
``sslmode=verify-full`` against the database's own CA, each role signing in
with its client certificate (CN = role name), no password anywhere. A real
server of the test's own (tests/pg_kit.py's TlsPgServer: TLS only, pg_hba
``hostssl ... cert`` only), the owner migrating with ``python -m shareholders
--migrate``, then a real node process storing and releasing; and every way
round it is refused at start-up with one line: no client certificate, one
from another CA, the owner's certificate for the node's role, a server
trusted from another CA, a server certificate for another host name, a
password."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import pg_kit
from node_kit import NodeHarness, Provider, sample_records, wait_until
from shareholders import storage
from splitvault.v1 import shareholder_pb2 as pb
from splitvault.v1 import shareholder_pb2_grpc as rpc
from vault import pki
from vault.pki import Identity
from vaultrpc.tls import secure_channel

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
import render  # noqa: E402  (deploy/render.py: the DSN exactly as deployments get it)

ACME = Provider.new("acme")
BANK_A = Identity("shareholder", "bank-a")

pytestmark = pytest.mark.e2e


def leaf(ca_cert: bytes, ca_key: bytes, common_name: str, hosts: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """A certificate from the database CA (as vault/pki.py issues them):
    a client's with CN = its role, or the server's with ``hosts`` in its SAN."""
    ca = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
    )
    if hosts:
        alt = []
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem


def cert_dir(folder: pathlib.Path, ca: bytes, cert_key: tuple[bytes, bytes] | None) -> str:
    """A Secret's folder as deploy/ mounts it: ca.pem, tls.crt, tls.key (0600: libpq refuses a readable key)."""
    folder.mkdir(parents=True)
    (folder / "ca.pem").write_bytes(ca)
    if cert_key is not None:
        (folder / "tls.crt").write_bytes(cert_key[0])
        (folder / "tls.key").write_bytes(cert_key[1])
        (folder / "tls.key").chmod(0o600)
    return str(folder)


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory):
    """The server, its database, and the certificate folders of both roles."""
    ca_cert, ca_key = pki.make_ca("bank-a database CA")
    server_cert, server_key = leaf(ca_cert, ca_key, "localhost", hosts=("localhost", "127.0.0.1"))
    try:
        server = pg_kit.TlsPgServer(server_cert, server_key, ca_cert)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("pg-certs")
    other_cert, other_key = pki.make_ca("another CA")
    try:
        database = server.new_database()
        store = render.postgres_store({"store": {"backend": "postgres", "host": "localhost", "port": server.port,
                                                  "database": database, "role": pg_kit.NODE,
                                                  "owner_role": pg_kit.OWNER},
                                        "secrets": {"store": "bank-a-pg", "store_owner": "bank-a-pg-owner"}})
        dirs = {
            "node": cert_dir(folder / "pg", ca_cert, leaf(ca_cert, ca_key, pg_kit.NODE)),
            "owner": cert_dir(folder / "pg-owner", ca_cert, leaf(ca_cert, ca_key, pg_kit.OWNER)),
            "other_ca": cert_dir(folder / "other-ca", ca_cert, leaf(other_cert, other_key, pg_kit.NODE)),
            "trusts_other": cert_dir(folder / "trusts-other", other_cert, leaf(ca_cert, ca_key, pg_kit.NODE)),
        }
        yield server, store, dirs
    finally:
        server.close()


def spawn(config: pathlib.Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shareholders", "--config", str(config), *args],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def store_toml(dsn: str, owner_dsn: str = "") -> str:
    return f"[store]\nbackend = \"postgres\"\ndsn = {json.dumps(dsn)}\n" + (
        f"owner_dsn = {json.dumps(owner_dsn)}\n" if owner_dsn else "")


def refusal(proc: subprocess.Popen) -> str:
    """The node's one error line when it refuses to start (exit 1, no traceback)."""
    try:
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:  # it started after all: the test fails, the node does not outlive it
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert "Traceback" not in err, err[-1500:]
    [line] = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert line["level"] == "error" and line["msg"] == "cannot start"
    return line["error"]


def test_the_owner_migrates_and_the_node_stores_and_releases_over_verify_full(tls_pg, tmp_path, dev_pki):
    server, store, dirs = tls_pg
    dsn = render._dsn(store, pg_kit.NODE, dirs["node"])
    owner_dsn = render._dsn(store, pg_kit.OWNER, dirs["owner"])
    assert "sslmode=verify-full" in dsn and "password" not in dsn and f"sslcert={dirs['node']}/tls.crt" in dsn
    node = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME], extra=store_toml(dsn, owner_dsn))
    migrate = spawn(node.config_path, "--migrate")
    out, err = migrate.communicate(timeout=60)
    assert migrate.returncode == 0, err[-1500:]
    assert json.loads(out) == {"store": "migrated", "backend": "postgres", "from_version": 0,
                               "to_version": storage.SCHEMA_VERSION}

    node.config_path.write_text(node.config_path.read_text().replace(f"owner_dsn = {json.dumps(owner_dsn)}\n", ""))
    assert "owner_dsn" not in node.config_path.read_text()
    proc = spawn(node.config_path)
    try:
        ready = node.folder / "ready.json"
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout_s=60)
        assert proc.poll() is None, proc.stderr.read()[-1500:]
        info = json.loads(ready.read_text())
        with secure_channel(info["address"], dev_pki.tls("matcher", "m"), expect=BANK_A) as ch:
            stub = rpc.ShareholderStub(ch)
            recs = sample_records("acme", ["alice", "bob"], index=1)
            stub.StoreShares(ACME.store_request(recs), timeout=15)
            got = stub.ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket("bob")), timeout=15)
            assert got.shares[0].values == recs[1].values
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    # The rows are there, over the socket as the superuser: the node's sessions were TLS, signed in by certificate.
    with server._psycopg.connect(server.uri(store["database"])) as c:
        assert c.execute("SELECT count(*) FROM shares").fetchone()[0] == 2
    log = server.log()  # log_connections: each role signed in by its certificate, over TLS
    for role in (pg_kit.OWNER, pg_kit.NODE):
        assert f'connection authenticated: identity="CN={role}" method=cert' in log
    assert f"connection authorized: user={pg_kit.NODE} database={store['database']} SSL enabled" in log


def _without_cert(dsn: str) -> str:
    return " ".join(x for x in dsn.split() if not x.startswith(("sslcert=", "sslkey=")))


@pytest.mark.parametrize("attack, reason", [
    (lambda s, d: _without_cert(render._dsn(s, pg_kit.NODE, d["node"])), "requires a valid client certificate"),
    (lambda s, d: render._dsn(s, pg_kit.NODE, d["other_ca"]), "alert unknown ca"),
    (lambda s, d: render._dsn(s, pg_kit.NODE, d["owner"]), "certificate authentication failed"),
    (lambda s, d: render._dsn(s, pg_kit.NODE, d["trusts_other"]), "certificate verify failed"),
    # The name a DSN's host resolves to is the attacker's; the certificate is checked against the name.
    (lambda s, d: render._dsn({**s, "host": "pg.bank-b.internal"}, pg_kit.NODE, d["node"]) + " hostaddr=127.0.0.1",
     "does not match host name"),
    (lambda s, d: f"host=127.0.0.1 port={s['port']} dbname={s['database']} user={pg_kit.NODE} "
                  f"password=guessed sslmode=disable", "no pg_hba.conf entry"),
    (lambda s, d: f"host=127.0.0.1 port={s['port']} dbname={s['database']} user={pg_kit.NODE} "
                  f"password=guessed sslmode=require sslrootcert={d['node']}/ca.pem", "requires a valid client certificate"),
], ids=["no-client-cert", "client-cert-other-ca", "owner-cert-as-node", "server-from-other-ca",
        "server-cert-other-host", "password-plain", "password-over-tls"])
def test_the_node_refuses_to_start_on_any_other_sign_in(tls_pg, tmp_path, dev_pki, attack, reason):
    server, store, dirs = tls_pg
    with server.admin() as c:  # a password the node's role really has: pg_hba must be what refuses it
        c.execute(f"ALTER ROLE {pg_kit.NODE} PASSWORD 'guessed'")
    node = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME], extra=store_toml(attack(store, dirs)))
    error = refusal(spawn(node.config_path))
    assert error.startswith("OperationalError: ") and reason in error, error
    assert "guessed" not in error
    assert not (node.folder / "ready.json").exists()
