"""A shareholder whose store is PostgreSQL runs out of disk, over real
processes (tests/test_faults_disk.py is the same fault on SQLite).

bank-c keeps its shares in its own database on the tests' PostgreSQL
server (tests/pg_kit.py); that database lives in a tablespace on a small
tmpfs of its own, while the server's WAL and log stay on the ordinary disk.
Filling the tmpfs is then what PostgreSQL does with a full data disk: the
statement that must extend a table or index file fails with ERROR
``could not extend file ...: No space left on device`` (SQLSTATE 53100) and
the server keeps running. A full WAL disk is another fault, tested last on
a server of the module's own with ``pg_wal`` on a small tmpfs: PostgreSQL
PANICs at the next COMMIT and then shuts down.

What the provider sees: enrolment refused with UNAVAILABLE and one
sentence, the refused subject held nowhere, Verify still decided by the
other nodes, never a MATCH on error, never INTERNAL; bank-c's audit chain
still verifies. With room again (and the server started again) the node
serves without a restart of its own, every earlier template intact. Needs
root for ``mount`` (skipped otherwise, as the SQLite test).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import re
import shutil
import tempfile

import grpc
import numpy as np
import pytest

from fault_kit import (
    NAMES, FaultProcesses, Tenant, clean_details, holdings, noisy, rejoin_everywhere, template_intact, unit,
)
from node_kit import wait_until
from test_faults_disk import _run, disk_full
from shareholders.audit_log import verify_database
from shareholders.config import load_config
from vault import pki

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = Tenant("acme")
# A new database copies template1 (about 8 MB on PostgreSQL 16) into the tablespace.
DISK_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def small_database(pg):
    """bank-c's database, in a tablespace on a tmpfs of DISK_BYTES; skipped where mount is not allowed."""
    if os.geteuid() != 0 or pg.server.system_user is None:
        pytest.skip("needs root and tmpfs mounts (a small disk of its own for one node's database)")
    # Under /tmp, not pytest's 0700 folder: the server's own user must reach it.
    top = pathlib.Path(tempfile.mkdtemp(prefix="splitvault-pg-disk-"))
    top.chmod(0o755)
    mount = top / "disk"
    mount.mkdir()
    if _run("mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount)).returncode:
        shutil.rmtree(top, ignore_errors=True)
        pytest.skip("needs root and tmpfs mounts (a small disk of its own for one node's database)")
    user = pwd.getpwnam(pg.server.system_user)
    os.chown(mount, user.pw_uid, user.pw_gid)
    space = f"small_{os.getpid()}"
    database = None
    try:
        with pg.admin() as c:
            c.execute(f"CREATE TABLESPACE {space} LOCATION '{mount}'")
        database = pg.new_database("disk", tablespace=space)
        yield database, mount
    finally:
        if database:
            pg.drop_database(database)
        with pg.admin() as c:
            c.execute(f"DROP TABLESPACE IF EXISTS {space}")
        _run("umount", "-l", str(mount))
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(dev_pki, tmp_path_factory, pg, small_database):
    database, mount = small_database
    p = FaultProcesses(dev_pki, tmp_path_factory.mktemp("faults-disk-pg"), TENANT)
    p.node_extra["bank-c"] = "\n" + pg.store_toml(database)
    try:
        yield (p, *_enrolled(p, seed=95), database, mount)
    finally:
        p.close()


def _enrolled(p: FaultProcesses, seed: int) -> tuple[str, dict]:
    """Start the nodes and the matcher and enrol 12 subjects: (matcher address, gallery)."""
    p.start_nodes()
    address = p.start_matcher()
    rng = np.random.default_rng(seed)
    gallery = {f"cust-{i:03d}": unit(rng) for i in range(12)}
    with p.client(address) as client:
        for subject, template in gallery.items():
            client.enroll(subject, template)
    return address, gallery


def audit_events(pg, database: str) -> list[tuple[str, str | None]]:
    """(event, subject) of bank-c's stored audit log, in order (as the
    server's superuser, whom row-level security does not bind)."""
    with pg._psycopg.connect(pg.uri(database)) as c:
        return [tuple(r) for r in c.execute("SELECT event, subject FROM audit_log ORDER BY seq").fetchall()]


def used_again(pg, database: str, client, gallery: dict) -> bool:
    """Verify subjects in turn until bank-c logs a release (the matcher asks
    each subject's k "first" nodes, the others when one of those fails)."""
    rng = np.random.default_rng(0)
    seen = len(audit_events(pg, database))
    subjects = iter(sorted(gallery) * 20)

    def released() -> bool:
        subject = next(subjects)
        assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
        return any(e == "release" for e, _ in audit_events(pg, database)[seen:])

    return wait_until(released, timeout_s=15)


def test_disk_full_under_a_postgres_store(cluster, dev_pki, pg):
    p, address, gallery, database, mount = cluster
    rng = np.random.default_rng(96)
    real = {name: p.real(name) for name in NAMES}
    during: list[str] = []
    with p.client(address) as client:
        assert used_again(pg, database, client, gallery)
        seen = len(audit_events(pg, database))
        with disk_full(mount):
            # Enrol until bank-c's INSERT must extend a file (within a few
            # records: a page holds a handful of shares). PostgreSQL fails
            # the statement; the enrolment needs every node, so it fails
            # closed, and nothing of it is kept anywhere.
            for i in range(60):
                subject, template = f"while-full-{i:02d}", unit(rng)
                try:
                    client.enroll(subject, template)
                except grpc.RpcError as err:
                    refused = subject
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
                    assert clean_details(err.details()) and err.details().count(". ") == 0, err.details()
                    break
                during.append((subject, template))
            else:
                pytest.fail("bank-c stored 60 enrolments on a full disk")
            # The server did not stop (a full data disk is an ERROR; only a full WAL disk PANICs).
            with pg.admin() as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
            # Verify is decided by the other two nodes, whether or not bank-c can log a release.
            for subject in ("cust-000", "cust-001"):
                assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
                assert client.verify(subject, gallery["cust-005"]).decision == "NO_MATCH"
            logged = audit_events(pg, database)[seen:]
            stored = [s for e, s in logged if e == "store"]
            assert stored == [s for s, _ in during], logged      # every store it kept is logged, once
            assert refused not in {s for _e, s in logged}
        failed = [e for e in p.matcher_log() if e.get("msg") == "shareholder call failed" and e.get("node") == "bank-c"]
        assert failed and {e["code"] for e in failed} == {"UNAVAILABLE"}, failed
        # Room again: the node carries on without a restart; the refused enrolment can be retried.
        assert used_again(pg, database, client, gallery)
        held = holdings(dev_pki, real, TENANT.name, [refused])
        assert all(held[n][refused] == [] for n in NAMES), held  # all or nothing: nothing
        again = unit(rng)
        client.enroll(refused, again)
        assert client.verify(refused, noisy(again, rng)).decision == "MATCH"
    for subject, template in [*during, (refused, again), ("cust-000", gallery["cust-000"]), ("cust-011", gallery["cust-011"])]:
        assert template_intact(rejoin_everywhere(dev_pki, real, TENANT, subject), template), subject
    report = verify_database(load_config(p.root / "bank-c" / "node.toml", env={}).store,
                             pki.load_public_key(p.audit_public_key("bank-c")), node="bank-c")
    assert report.ok, report.reason
    # The operator's log names PostgreSQL's reason; the server's own log says the same.
    assert any(e.get("msg") == "audit commit failed" and "No space left on device" in e.get("error", "")
               for e in p.node_log("bank-c"))
    assert "No space left on device" in (pg.server.pgdata / "log").read_text(errors="replace")
    assert "Traceback" not in p.logs["bank-c"].read_text()
    assert not [e for e in p.node_log("bank-c") if e.get("msg") == "unhandled error"]  # never INTERNAL


# --- the WAL's disk full -------------------------------------------------------------

WAL_DISK_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def wal_server():
    """A PostgreSQL server of this module's own whose WAL (pg_wal) is on a
    tmpfs of WAL_DISK_BYTES: 1 MiB segments, none recycled (wal_recycle =
    off), so a new segment is a new file on that disk."""
    import pg_kit

    pytest.importorskip("pgserver")
    if os.geteuid() != 0:
        pytest.skip("needs root and tmpfs mounts (a small disk of its own for a server's WAL)")
    top = pathlib.Path(tempfile.mkdtemp(prefix="splitvault-pg-wal-"))
    top.chmod(0o755)
    mount = top / "wal"
    mount.mkdir()
    if _run("mount", "-t", "tmpfs", "-o", f"size={WAL_DISK_BYTES},mode=0755", "tmpfs", str(mount)).returncode:
        shutil.rmtree(top, ignore_errors=True)
        pytest.skip("needs root and tmpfs mounts (a small disk of its own for a server's WAL)")
    server = None
    try:
        from pgserver.utils import ensure_user_exists

        user = ensure_user_exists("pgserver")  # as root the server runs as pgserver's own user (tests/pg_kit.py)
        os.chown(mount, user.pw_uid, user.pw_gid)
        server = pg_kit.PgServer(initdb_args=("--wal-segsize=1", "-X", str(mount / "pg_wal")),
                                 settings={"wal_recycle": "off", "min_wal_size": "2MB", "max_wal_size": "4MB"})
        yield server, mount
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.close()
        _run("umount", "-l", str(mount))
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def wal_cluster(dev_pki, tmp_path_factory, wal_server):
    server, mount = wal_server
    database = server.new_database("wal")
    p = FaultProcesses(dev_pki, tmp_path_factory.mktemp("faults-wal-pg"), TENANT)
    p.node_extra["bank-c"] = "\n" + server.store_toml(database)
    try:
        yield (p, *_enrolled(p, seed=97), database)
    finally:
        p.close()


def _no_spare_segment(server, mount: pathlib.Path) -> None:
    """Move the server's WAL past any segment file made ahead of need. With
    wal_recycle off none is recycled, but a checkpoint can leave files made
    ahead (three, seen here after a CHECKPOINT at 85% of a segment); a switch
    into one needs no new disk space, and the enrolments that follow fit in it
    (one CI run: 20 enrolments taken on a full WAL disk)."""
    for _ in range(10):
        with server.admin() as c:
            current = c.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
            spare = [f.name for f in (mount / "pg_wal").iterdir() if len(f.name) == 24 and f.name > current]
            if not spare:
                return
            c.execute("SELECT pg_logical_emit_message(false, 'splitvault-test', 'next segment')")
            c.execute("SELECT pg_switch_wal()")
    raise AssertionError(f"the server keeps WAL segments ahead of need: {spare}")


def after_restart(call, tries: int = 10):
    """``call()``, again while it fails UNAVAILABLE (stale connections, one failure each)."""
    for _ in range(tries - 1):
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    return call()


def test_wal_disk_full_stops_the_server_and_the_node_fails_closed(wal_cluster, wal_server, dev_pki):
    """What PostgreSQL does (seen here, and stated so the test fails if it
    changes): the first COMMIT that needs a new WAL segment PANICs; the
    postmaster ends every process and restarts, its recovery cannot write
    its end-of-recovery record either, and the server shuts down. The node
    over it: UNAVAILABLE, nothing half-stored; once the WAL disk has room and
    the server is started again, it serves without its own restart."""
    p, address, gallery, database = wal_cluster
    server, mount = wal_server
    rng = np.random.default_rng(98)
    real = {name: p.real(name) for name in NAMES}
    log = server.server.pgdata / "log"
    with p.client(address) as client:
        assert used_again(server, database, client, gallery)
        _no_spare_segment(server, mount)
        with disk_full(mount):
            with contextlib.suppress(server._psycopg.Error), server.admin() as c:
                c.execute("SELECT pg_switch_wal()")  # the next WAL record needs a new segment file
            during, refused = [], []
            for i in range(20):
                subject, template = f"wal-full-{i:02d}", unit(rng)
                try:
                    client.enroll(subject, template)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
                    assert clean_details(err.details()) and err.details().count(". ") == 0, err.details()
                    refused.append(subject)
                    break
                during.append((subject, template))
            assert refused, "bank-c's server took 20 enrolments on a full WAL disk"
            # Down for good: the postmaster gone, after the recovery it tried failed too.
            assert wait_until(lambda: not server.running(), timeout_s=60)
            text = log.read_text(errors="replace")
            assert re.search(r"PANIC: .*pg_wal/.*No space left on device", text), text[-2000:]
            assert "shutting down due to startup process failure" in text, text[-2000:]
            # The server is down: Verify is decided by the other two; enrolment still fails closed.
            for subject in ("cust-000", "cust-001"):
                assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
                assert client.verify(subject, gallery["cust-005"]).decision == "NO_MATCH"
            with pytest.raises(grpc.RpcError) as err:
                client.enroll("wal-full-down", unit(rng))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and clean_details(err.value.details())
            refused.append("wal-full-down")
        server.start_server()  # room again; PostgreSQL recovers from its WAL
        assert used_again(server, database, client, gallery)
        # A node's connection that sat idle through the server's restart fails
        # its first call once (docs/operations.md): the provider retries.
        held = after_restart(lambda: holdings(dev_pki, real, TENANT.name, refused))
        assert all(held[n][s] == [] for n in NAMES for s in refused), held
        again = unit(rng)
        after_restart(lambda: client.enroll(refused[0], again))
        assert client.verify(refused[0], noisy(again, rng)).decision == "MATCH"
    for subject, template in [*during, (refused[0], again), ("cust-000", gallery["cust-000"]),
                              ("cust-011", gallery["cust-011"])]:
        assert template_intact(rejoin_everywhere(dev_pki, real, TENANT, subject), template), subject
    report = verify_database(load_config(p.root / "bank-c" / "node.toml", env={}).store,
                             pki.load_public_key(p.audit_public_key("bank-c")), node="bank-c")
    assert report.ok, report.reason
    assert any(e.get("msg") == "audit commit failed" and "No space left on device" in e.get("error", "")
               for e in p.node_log("bank-c"))
    assert "Traceback" not in p.logs["bank-c"].read_text()
    assert not [e for e in p.node_log("bank-c") if e.get("msg") == "unhandled error"]  # never INTERNAL
