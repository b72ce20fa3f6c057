"""Shared fixtures: a dev PKI written to a temporary folder (real X.509, real
mTLS on loopback)."""
from __future__ import annotations

import pathlib
import zlib

import numpy as np
import pytest

from vault import pki
from vaultrpc.tls import TlsFiles


class DevPki:
    """A CA and on-demand party certificates under one folder."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_cert, self.ca_key = pki.make_ca()
        (root / "ca.pem").write_bytes(self.ca_cert)

    def files(self, role: str, name: str) -> TlsFiles:
        cert = self.root / f"{role}-{name}.pem"
        key = self.root / f"{role}-{name}.key"
        if not cert.exists():
            c, k = pki.issue_cert(self.ca_cert, self.ca_key, role, name)
            cert.write_bytes(c)
            key.write_bytes(k)
            key.chmod(0o600)
        return TlsFiles(str(self.root / "ca.pem"), str(cert), str(key))

    def tls(self, role: str, name: str):
        return self.files(role, name).load()


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory) -> DevPki:
    return DevPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def committee(dev_pki, tmp_path):
    """A fresh in-process matcher committee per test (tests/matcher_kit.py),
    for tests that stop or replace nodes."""
    from matcher_kit import Committee

    made = []

    def make(**kw):
        c = Committee(dev_pki, tmp_path / f"c{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def pg():
    """The session's PostgreSQL server (tests/pg_kit.py); skips, saying why,
    only where the server package cannot start."""
    import pg_kit

    try:
        server = pg_kit.server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield server
    pg_kit.stop()


@pytest.fixture()
def pg_database(pg):
    """A fresh database on the session's server, dropped after the test."""
    name = pg.new_database()
    yield name
    pg.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path):
    """Where a node's store is, once per backend: a SQLite file, a PostgreSQL database."""
    from shareholders import storage

    if request.param == "sqlite":
        yield storage.Location("sqlite", tmp_path / "shares.db")
        return
    pg = request.getfixturevalue("pg")
    yield pg.location(request.getfixturevalue("pg_database"))


@pytest.fixture()
def rng(request):
    """A generator seeded by the test's name: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
