"""A shareholder's disk, over real processes: full, and its database made
read-only (while running, and at a restart).

bank-c's data directory is moved onto a small tmpfs of its own (the node
is restarted on it, same port and data); the disk is then filled to the
last byte, or the database files are made immutable (``chattr +i``, which
binds root too). Needs root for ``mount`` and ``chattr``: skipped
otherwise (CI runs as root in its container; docs/reliability.md).

For each: what the provider saw, that nothing was released without an
audit entry, that nothing was lost, and that the node comes back without a
restart once the disk has room again or is writable again.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess

import grpc
import numpy as np
import pytest

from node_kit import audit_entries
from fault_kit import (
    NAMES, FaultProcesses, Tenant, chain_ok, clean_details, holdings, noisy, rejoin_everywhere,
    template_intact, unit, wait_until_used,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = Tenant("acme")
DISK_BYTES = 4 * 1024 * 1024


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A tmpfs of DISK_BYTES for bank-c's data; skipped where mount is not allowed."""
    mount = tmp_path_factory.mktemp("small-disk")
    if os.geteuid() != 0 or _run("mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount)).returncode:
        pytest.skip("needs root and tmpfs mounts (a small disk of its own for one node)")
    try:
        yield mount
    finally:
        _run("chattr", "-R", "-i", str(mount))
        _run("umount", "-l", str(mount))


@pytest.fixture(scope="module")
def cluster(dev_pki, tmp_path_factory, small_disk):
    p = FaultProcesses(dev_pki, tmp_path_factory.mktemp("faults-disk"), TENANT)
    try:
        p.start_nodes()
        address = p.start_matcher()
        # bank-c's database moves onto the small disk: stop, move, restart.
        p.procs["bank-c"].terminate()
        assert p.procs["bank-c"].wait(20) == 0
        node_dir = p.root / "bank-c"
        for f in node_dir.glob("shares.db*"):
            shutil.move(str(f), small_disk / f.name)
        config = node_dir / "node.toml"
        config.write_text(re.sub(r'data_dir = ".*"', f'data_dir = "{small_disk}"', config.read_text()))
        p.restart_node("bank-c")
        rng = np.random.default_rng(91)
        gallery = {f"cust-{i:03d}": unit(rng) for i in range(12)}
        with p.client(address) as client:
            for subject, template in gallery.items():
                client.enroll(subject, template)
        yield p, address, gallery, small_disk
    finally:
        p.close()


def live(gallery: dict) -> dict:
    """The gallery without the subject test_disk_full erases."""
    return {s: t for s, t in gallery.items() if s != "cust-002"}


def real(p) -> dict[str, str]:
    return {name: p.real(name) for name in NAMES}


@contextlib.contextmanager
def disk_full(mount: pathlib.Path):
    """Fill the disk to its last byte; free it again on exit."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as fh:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0")
    try:
        yield
    finally:
        filler.unlink()


@contextlib.contextmanager
def immutable(*paths: pathlib.Path):
    """chattr +i: no write reaches these files, not even through open
    descriptors, not even root's (on ext4; checked first on a probe file,
    since tmpfs, for one, still lets open descriptors write)."""
    probe = paths[0].parent / ".immutable-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if _run("chattr", "+i", str(probe)).returncode:
            pytest.skip("chattr +i is not available here")
        try:
            os.write(fd, b"x")
            pytest.skip("chattr +i does not stop writes through open files on this filesystem")
        except PermissionError:
            pass
    finally:
        os.close(fd)
        _run("chattr", "-i", str(probe))
        probe.unlink()
    for path in paths:
        r = _run("chattr", "+i", str(path))
        if r.returncode:
            pytest.skip(f"chattr +i is not available here: {r.stderr.strip()}")
    try:
        yield
    finally:
        for path in paths:
            _run("chattr", "-i", str(path))


def test_disk_full(cluster, dev_pki):
    p, address, gallery, disk = cluster
    rng = np.random.default_rng(92)
    db = disk / "shares.db"
    with p.client(address) as client:
        wait_until_used(p, client, "bank-c", live(gallery), db=db)
        seen = len(audit_entries(db))
        with disk_full(disk):
            # Verifications: still decided by the two other nodes; bank-c
            # cannot log a release, so it releases nothing.
            for subject in ("cust-000", "cust-001"):
                assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
                assert client.verify(subject, gallery["cust-005"]).decision == "NO_MATCH"
            # Enrolment needs every node: refused, and nothing kept anywhere.
            with pytest.raises(grpc.RpcError) as err:
                client.enroll("while-full", unit(rng))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and clean_details(err.value.details())
            # Erasure reaches the nodes with room and says which one did not confirm.
            reply = client.delete("cust-002")
            assert not reply.complete
            codes = {o.shareholder: o.code for o in reply.outcomes}
            assert codes == {"bank-a": 0, "bank-b": 0, "bank-c": grpc.StatusCode.UNAVAILABLE.value[0]}
            failed = [e for e in p.matcher_log() if e.get("msg") == "shareholder call failed" and e.get("node") == "bank-c"]
            assert failed and {e["code"] for e in failed[-3:]} == {"UNAVAILABLE"}
            assert audit_entries(db)[seen:] == []            # nothing released, stored or erased unlogged
        # Room again: the node carries on without a restart.
        wait_until_used(p, client, "bank-c", live(gallery), db=db)
        assert client.delete("cust-002").complete             # the provider's retry completes the erasure
        client.enroll("after-full", gallery["cust-003"] * -1)
        assert client.verify("after-full", noisy(gallery["cust-003"] * -1, rng)).decision == "MATCH"
    held = holdings(dev_pki, real(p), TENANT.name, ["while-full", "cust-002"])
    assert all(held[n]["while-full"] == [] and held[n]["cust-002"] == [] for n in NAMES)
    for subject in ("cust-000", "cust-001", "cust-004"):
        assert template_intact(rejoin_everywhere(dev_pki, real(p), TENANT, subject), gallery[subject])
    assert chain_ok(db, p.audit_public_key("bank-c"), "bank-c")
    # The operator's log names the reason, not just an exception type.
    assert any(e.get("msg") == "audit commit failed" and "disk is full" in e.get("error", "")
               for e in p.node_log("bank-c"))


def test_database_read_only_while_running(cluster, dev_pki):
    """bank-b (its database on the ordinary disk, where chattr +i binds open files)."""
    p, address, gallery, _disk = cluster
    rng = np.random.default_rng(93)
    db = p.db("bank-b")
    with p.client(address) as client:
        wait_until_used(p, client, "bank-b", live(gallery), db=db)
        seen = len(audit_entries(db))
        with immutable(db, db.with_name("shares.db-wal")):
            for subject in ("cust-006", "cust-007"):
                assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
                assert client.verify(subject, gallery["cust-008"]).decision == "NO_MATCH"
            with pytest.raises(grpc.RpcError) as err:
                client.enroll("while-ro", unit(rng))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and clean_details(err.value.details())
            assert audit_entries(db)[seen:] == []
        wait_until_used(p, client, "bank-b", live(gallery), db=db)
        client.enroll("after-ro", gallery["cust-006"] * -1)
    assert any(e.get("msg") == "audit commit failed" and "I/O error" in e.get("error", "")
               for e in p.node_log("bank-b"))
    held = holdings(dev_pki, real(p), TENANT.name, ["while-ro"])
    assert all(held[n]["while-ro"] == [] for n in NAMES)
    for subject in ("cust-006", "cust-007"):
        assert template_intact(rejoin_everywhere(dev_pki, real(p), TENANT, subject), gallery[subject])
    assert chain_ok(db, p.audit_public_key("bank-b"), "bank-b")


def test_restart_on_a_read_only_database_is_refused_clearly(cluster, dev_pki):
    p, address, gallery, _disk = cluster
    rng = np.random.default_rng(94)
    db = p.db("bank-b")
    p.procs["bank-b"].terminate()
    assert p.procs["bank-b"].wait(20) == 0
    files = [f for f in (db, db.with_name("shares.db-wal"), db.with_name("shares.db-shm")) if f.exists()]
    with immutable(*files):
        code, log = p.restart_node_refused("bank-b")
        assert code == 1
        [line] = [e for e in log if e.get("msg") == "cannot start"]  # after "audit commit failed", the reason
        assert line["msg"] == "cannot start" and "readonly" in line["error"].replace("-", "").replace(" ", "")
        assert "Traceback" not in p.logs["bank-b"].read_text()
        with p.client(address) as client:
            assert client.verify("cust-009", noisy(gallery["cust-009"], rng)).decision == "MATCH"
    p.restart_node("bank-b")
    assert template_intact(rejoin_everywhere(dev_pki, real(p), TENANT, "cust-009"), gallery["cust-009"])
    assert chain_ok(db, p.audit_public_key("bank-b"), "bank-b")
