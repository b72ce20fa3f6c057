"""KEK rotation on one node (``Shareholder.RotateKek``), in-process over real
mTLS: the end state, the audit trail, the session lock, refusals, releases
and stores racing a rotation, and a crash at every point that leaves a
distinct state on disk (a raise at ``rotation.crash_point``, which, like a
kill -9, loses the open transaction and keeps what the KEK file holds),
each followed by a restart and a rerun that completes.

Real processes killed with SIGKILL: tests/test_rotate_kek_e2e.py."""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import closing

import grpc
import pytest

from shareholders import rotation, storage
from shareholders.config import KEK_ENV
from node_kit import NodeHarness, Provider, kek_json, sample_records
from splitvault.v1 import shareholder_pb2 as pb
from vault import envelope, record
from vault.envelope import KekRing

ACME = Provider.new("acme")
ROWS = 120
Phase = pb.RotateKekResponse.Phase


@pytest.fixture()
def node(tmp_path, dev_pki):
    harness = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME])
    harness.start()
    store_rows(harness, ROWS)
    yield harness
    harness.stop()


def store_rows(node, count, prefix="s"):
    recs = sample_records("acme", [f"{prefix}{i}" for i in range(count)], index=1)
    node.stub("matcher").StoreShares(ACME.store_request(recs), timeout=30)


def rotate(node, session="sess-1", batch=25, pause_ms=0):
    return list(node.stub("auditor").RotateKek(
        pb.RotateKekRequest(session_id=session, batch_size=batch, pause_ms=pause_ms), timeout=60))


def kek_file(node) -> dict:
    return json.loads((node.folder / "kek.json").read_text())


def versions_in_db(node) -> dict[int, int]:
    with closing(sqlite3.connect(node.db_path)) as conn:
        return dict(conn.execute("SELECT kek_version, COUNT(*) FROM shares GROUP BY kek_version").fetchall())


def events(node, prefix="kek_") -> list[tuple[str, dict]]:
    with closing(sqlite3.connect(node.db_path)) as conn:
        rows = conn.execute("SELECT event, details_json FROM audit_log ORDER BY seq").fetchall()
    return [(e, json.loads(d)) for e, d in rows if e.startswith(prefix)]


def every_row_opens(node) -> int:
    """Open every stored share with the KEK file as it is on disk now."""
    data = kek_file(node)
    ring = KekRing({int(v): bytes.fromhex(k) for v, k in data["keys"].items()}, data["active"])
    with closing(sqlite3.connect(node.db_path)) as conn:
        rows = [storage.ShareRow.from_db(r) for r in conn.execute(f"SELECT {storage.SHARE_COLUMNS} FROM shares")]
    for row in rows:
        envelope.open(ring, record.record_identity(row.tenant, row.subject, row.index, row.epoch), row.sealed)
    return len(rows)


def restart(node):
    node.stop()
    node.start()


def test_rotation_rewraps_every_row_and_retires_the_old_key(node):
    before = kek_file(node)
    assert before["active"] == 1 and versions_in_db(node) == {1: ROWS}
    msgs = rotate(node)
    assert [m.phase for m in msgs][0] == Phase.PHASE_STARTED and msgs[-1].phase == Phase.PHASE_DONE
    done = msgs[-1]
    assert (done.to_version, list(done.from_versions), list(done.retired_versions)) == (2, [1], [1])
    assert done.rewrapped == ROWS == done.total and done.batches == 5 and not done.resumed
    after = kek_file(node)
    assert after["active"] == 2 and list(after["keys"]) == ["2"]
    assert after["keys"]["2"] != before["keys"]["1"]
    assert versions_in_db(node) == {2: ROWS}
    assert every_row_opens(node) == ROWS
    assert (node.folder / "kek.json").stat().st_mode & 0o777 == 0o600
    # Only the wrapped data keys changed: the sealed shares are the same bytes.
    info = node.stub("auditor").GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    assert info.kek_version == 2
    reply = node.stub("matcher").ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket("s7")), timeout=10)
    assert len(reply.shares) == 1
    # The audit trail: start, one entry per batch with its count, retirement.
    trail = events(node)
    assert trail[0] == ("kek_rotate_start", {
        "session": "sess-1", "to_version": 2, "from_versions": [1], "records": ROWS, "resumed": False,
        "new_key": True, "batch_size": 25})
    batches = [d for e, d in trail if e == "kek_rewrap"]
    assert [d["records"] for d in batches] == [25, 25, 25, 25, 20]
    assert trail[-1][0] == "kek_retire" and trail[-1][1]["retired"] == [1] and trail[-1][1]["active"] == 2


def test_same_session_again_reports_done_and_a_new_session_rotates_again(node):
    first = rotate(node)[-1]
    again = rotate(node)
    assert len(again) == 1 and again[0].already_done and again[0].phase == Phase.PHASE_DONE
    assert (again[0].to_version, list(again[0].retired_versions), again[0].rewrapped) == (2, [1], first.rewrapped)
    assert kek_file(node)["active"] == 2  # no new key for a finished session
    third = rotate(node, session="sess-2")[-1]
    assert third.to_version == 3 and list(third.retired_versions) == [2]
    assert list(kek_file(node)["keys"]) == ["3"] and versions_in_db(node) == {3: ROWS}


def test_the_node_survives_a_restart_on_the_rotated_key(node):
    rotate(node)
    restart(node)
    reply = node.stub("matcher").ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket("s3")), timeout=10)
    assert len(reply.shares) == 1


def test_only_an_auditor_may_rotate(node):
    for role in ("matcher", "psp", "shareholder"):
        with pytest.raises(grpc.RpcError) as err:
            list(node.stub(role, "x").RotateKek(pb.RotateKekRequest(session_id="s"), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert kek_file(node)["active"] == 1


@pytest.mark.parametrize("request_", [
    pb.RotateKekRequest(session_id=""),
    pb.RotateKekRequest(session_id="x" * 129),
    pb.RotateKekRequest(session_id="bad\nid"),
    pb.RotateKekRequest(session_id="ok", batch_size=rotation.MAX_BATCH + 1),
    pb.RotateKekRequest(session_id="ok", pause_ms=rotation.MAX_PAUSE_MS + 1),
])
def test_bad_requests_are_refused(node, request_):
    with pytest.raises(grpc.RpcError) as err:
        list(node.stub("auditor").RotateKek(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_kek_from_the_environment_is_refused(tmp_path, dev_pki):
    key = envelope.new_kek()
    harness = NodeHarness(tmp_path / "env-node", dev_pki.files, [ACME], kek={1: key})
    harness.start(env={KEK_ENV: kek_json({1: key}, 1)})
    try:
        with pytest.raises(grpc.RpcError) as err:
            rotate(harness)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert KEK_ENV in err.value.details()
    finally:
        harness.stop()


def test_another_open_session_holds_the_lock(node):
    # A refresh session is open on the node (the maintenance lock is shared).
    with closing(storage.connect(node.db_path)) as db, db.transaction():
        db.begin_session("refresh-1", "refresh", "auditor/bob", {}, "begun", 1)
    with pytest.raises(grpc.RpcError) as err:
        rotate(node)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "refresh-1" in err.value.details() and "auditor/bob" in err.value.details()
    assert kek_file(node)["active"] == 1 and versions_in_db(node) == {1: ROWS}
    assert events(node) == []


def test_a_second_auditor_cannot_start_while_one_runs_and_the_first_finishes(node):
    stub = node.stub("auditor")
    first = stub.RotateKek(pb.RotateKekRequest(session_id="alice-1", batch_size=10, pause_ms=40), timeout=60)
    assert next(first).phase == Phase.PHASE_STARTED
    with pytest.raises(grpc.RpcError) as err:
        list(node.stub("auditor", "bob").RotateKek(pb.RotateKekRequest(session_id="bob-1"), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "alice-1" in err.value.details()
    # The same session id follows the running job instead of starting another.
    follower = list(node.stub("auditor", "carol").RotateKek(pb.RotateKekRequest(session_id="alice-1"), timeout=60))
    assert follower[-1].phase == Phase.PHASE_DONE and not follower[-1].already_done
    assert list(first)[-1].phase == Phase.PHASE_DONE
    assert versions_in_db(node) == {2: ROWS}


def test_the_node_goes_on_when_the_caller_goes_away(node):
    call = node.stub("auditor").RotateKek(pb.RotateKekRequest(session_id="gone", batch_size=10, pause_ms=20), timeout=60)
    next(call)
    call.cancel()
    done = rotate(node, session="gone")[-1]  # follows the running job, or learns it finished
    assert done.phase == Phase.PHASE_DONE and versions_in_db(node) == {2: ROWS}
    assert list(kek_file(node)["keys"]) == ["2"]


def test_releases_and_stores_during_a_rotation_never_fail(node):
    """Verify keeps working: releases race the batches; a store sealed under
    the old version lands under the new one."""
    failures, released = [], [0]
    stop = threading.Event()

    def keep_releasing():
        stub = node.stub("matcher", "m2")
        i = 0
        while not stop.is_set():
            try:
                stub.ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket(f"s{i % ROWS}")), timeout=10)
                released[0] += 1
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    failures.append(exc.code())
            i += 1

    worker = threading.Thread(target=keep_releasing)
    worker.start()
    try:
        msgs = node.stub("auditor").RotateKek(pb.RotateKekRequest(session_id="busy", batch_size=10, pause_ms=15), timeout=60)
        for n, msg in enumerate(msgs):
            if n == 3:
                store_rows(node, 20, prefix="late")  # enrolments in the middle of the rotation
    finally:
        stop.set()
        worker.join()
    assert failures == [] and released[0] > 10
    assert versions_in_db(node) == {2: ROWS + 20} and every_row_opens(node) == ROWS + 20


def test_a_store_sealed_before_the_switch_is_committed_under_the_new_version():
    old, new = envelope.new_kek(), envelope.new_kek()
    aad = record.record_identity("acme", "alice", 1, 1)
    sealed = envelope.seal(KekRing({1: old}, 1), aad, b"share")
    row = storage.ShareRow("acme", "alice", 1, 1, 2, 3, 16, 1, 4, "r1", sealed.kek_version, sealed.wrapped_dk,
                           sealed.nonce, sealed.ciphertext, 0)
    ring = KekRing({1: old, 2: new}, 2)
    moved = rotation.current_wrap(ring, row)
    assert moved.kek_version == 2 and (moved.nonce, moved.ciphertext) == (row.nonce, row.ciphertext)
    assert envelope.open(KekRing({2: new}, 2), aad, moved.sealed) == b"share"
    assert rotation.current_wrap(ring, moved) is moved


# --- crashes at each point, then a rerun ------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("point", [
    "begin:key_written", "begin:committed", "batch:committed", "retire:key_written", "retire:committed",
])
def test_a_crash_at_any_point_then_a_rerun_completes(node, monkeypatch, point):
    seen = []

    def crash(name):
        seen.append(name)
        if name == point and (name != "batch:committed" or seen.count(name) == 2):
            raise Crash(name)

    monkeypatch.setattr(rotation, "crash_point", crash)
    with pytest.raises(grpc.RpcError) as err:
        rotate(node, session="crashy")
    assert err.value.code() == grpc.StatusCode.INTERNAL and "crashy" in err.value.details()
    monkeypatch.setattr(rotation, "crash_point", lambda name: None)
    restart(node)  # a fresh process: memory gone, disk as the crash left it
    assert every_row_opens(node) == ROWS  # the KEK file opens every row at every point
    reply = node.stub("matcher").ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket("s1")), timeout=10)
    assert len(reply.shares) == 1
    done = rotate(node, session="crashy")[-1]
    assert done.phase == Phase.PHASE_DONE and done.to_version == 2
    assert kek_file(node) == {"active": 2, "keys": {"2": kek_file(node)["keys"]["2"]}}
    assert versions_in_db(node) == {2: ROWS} and every_row_opens(node) == ROWS
    trail = [e for e, _ in events(node)]
    assert trail.count("kek_retire") == 1 and trail[-1] == "kek_retire"
    # Exactly one new key was ever made, whatever the point.
    # (a crash before the session committed left the key in the file: the rerun uses it)
    made = [d["new_key"] for e, d in events(node) if e == "kek_rotate_start"]
    assert sum(made) == (0 if point == "begin:key_written" else 1)


def test_a_crash_before_the_session_committed_is_finished_without_a_new_key(node, monkeypatch):
    def crash(name):
        if name == "begin:key_written":
            raise Crash(name)

    monkeypatch.setattr(rotation, "crash_point", crash)
    with pytest.raises(grpc.RpcError):
        rotate(node, session="lost")
    monkeypatch.setattr(rotation, "crash_point", lambda name: None)
    written = kek_file(node)
    assert written["active"] == 2 and sorted(written["keys"]) == ["1", "2"]
    restart(node)
    # Even under another session id, the leftover version is completed, not doubled.
    done = rotate(node, session="other")[-1]
    assert done.resumed and done.to_version == 2 and list(done.retired_versions) == [1]
    assert kek_file(node)["keys"] == {"2": written["keys"]["2"]}
