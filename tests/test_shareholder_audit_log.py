"""The node's writer: group commit from many threads, a failing job rolls back
alone, checkpoints by count, by time and on close, nothing after close; on
each storage backend (a SQLite file, a PostgreSQL database)."""
from __future__ import annotations

import threading
import time

import pytest

from shareholders import storage
from shareholders.audit_log import AuditWriter, WriterClosed, check_tail, verify_database
from vault import pki
from vault.errors import AuditChainError

KEY = pki.load_signing_key(pki.new_signing_key()[0])
PUBLIC = pki.public_key_raw(KEY)


@pytest.fixture()
def db(store_location):
    return store_location


def append(event="release", **kw):
    return lambda tx: tx.append(event, actor="matcher/m", tenant="t", subject="s", **kw).seq


def test_concurrent_jobs_form_one_chain_and_a_failing_job_rolls_back_alone(db):
    writer = AuditWriter(db, "n", KEY, checkpoint_every=50)
    results, errors = [], []

    def failing(tx):
        tx.append("deny", actor="x")
        tx.db.execute("INSERT INTO node_state (id, name, idx, current_epoch, committee_json, updated_ms) "
                        "VALUES (1, 'n', 1, 1, '{}', 0)")
        raise ValueError("refused")

    def worker(i):
        for j in range(40):
            try:
                results.append(writer.run(failing if (i + j) % 7 == 0 else append()))
            except ValueError:
                errors.append(1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert len(results) + len(errors) == 320 and errors
    assert sorted(results) == list(range(1, len(results) + 1))  # no gap left by a failed job
    report = verify_database(db, PUBLIC, node="n")
    assert report.ok and report.head_seq == len(results) and report.signed_seq == len(results)
    conn = storage.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM node_state").fetchone()[0] == 0  # every failed write undone
    assert conn.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0] >= len(results) // 50
    conn.close()


def test_a_lone_failing_job_leaves_nothing(db):
    writer = AuditWriter(db, "n", KEY)
    assert writer.run(append()) == 1

    def failing(tx):
        tx.append("deny")
        raise KeyError("x")

    with pytest.raises(KeyError):
        writer.run(failing)
    assert writer.run(append()) == 2
    writer.close()
    assert verify_database(db, PUBLIC).ok


def test_checkpoint_after_the_interval_on_a_quiet_log(db):
    writer = AuditWriter(db, "n", KEY, checkpoint_every=1000, checkpoint_interval_s=0.2)
    writer.run(append())
    deadline = time.monotonic() + 10
    conn = storage.connect(db)
    while time.monotonic() < deadline and conn.last_checkpoint_seq() == 0:
        time.sleep(0.05)
    assert conn.last_checkpoint_seq() == 1
    conn.close()
    writer.close()


def test_close_commits_the_final_job_signs_and_refuses_more(db):
    writer = AuditWriter(db, "n", KEY)
    writer.run(append())
    fut = writer.submit(append())
    assert fut.result() == 2
    writer.close(final=append("stop"))
    with pytest.raises(WriterClosed):
        writer.run(append())
    with pytest.raises(WriterClosed):
        writer.submit(append()).result()
    report = verify_database(db, PUBLIC)
    assert report.head_seq == 3 and report.signed_seq == 3


def test_reopened_writer_continues_the_chain(db):
    w = AuditWriter(db, "n", KEY)
    w.run(append())
    w.close()
    w = AuditWriter(db, "n", KEY)
    assert w.run(append()) == 2
    w.close()
    assert verify_database(db, PUBLIC).ok


def test_a_log_signed_by_another_key_is_refused(db):
    w = AuditWriter(db, "n", KEY)
    w.run(append())
    w.close()
    other = pki.load_signing_key(pki.new_signing_key()[0])
    with pytest.raises(AuditChainError):
        AuditWriter(db, "n", other)
    conn = storage.connect(db)
    check_tail(conn, KEY.public_key(), "n")
    conn.close()
