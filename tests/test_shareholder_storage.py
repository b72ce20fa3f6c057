"""At rest: no share value in the clear in the SQLite file or its WAL; a
tampered or moved ciphertext gives DATA_LOSS, never a wrong share; replay and
attempt state survive a restart; an edited, removed or reordered audit entry
in the stored log is named by the verifier."""
from __future__ import annotations

import json
import sqlite3

import grpc
import pytest

from shareholders.audit_log import verify_database
from node_kit import NodeHarness, Provider, sample_records
from splitvault.v1 import shareholder_pb2 as pb
from vault import audit
from vault.errors import AuditChainError

ACME = Provider.new("acme")
WINDOW = 8  # bytes: two field elements; a chance match in random data is ~2**-64 per offset


@pytest.fixture()
def node(tmp_path, dev_pki):
    harness = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME], attempts_per_subject=4)
    harness.start()
    yield harness
    harness.stop()


def release(node, subject, t=None):
    return node.stub("matcher").ReleaseShare(pb.ReleaseShareRequest(ticket=t or ACME.ticket(subject)), timeout=10)


def release_code(node, subject, t=None):
    with pytest.raises(grpc.RpcError) as err:
        release(node, subject, t)
    return err.value.code()


def store(node, subjects, **kw):
    recs = sample_records("acme", list(subjects), index=1, **kw)
    node.stub("matcher").StoreShares(ACME.store_request(recs), timeout=10)
    return recs


def windows(values: bytes) -> set[bytes]:
    return {values[i:i + WINDOW] for i in range(0, len(values) - WINDOW + 1, 4)}


def leaks(data: bytes, needles: set[bytes]) -> int:
    return sum(1 for i in range(len(data) - WINDOW + 1) if data[i:i + WINDOW] in needles)


def raw_files(node) -> dict[str, bytes]:
    folder = node.db_path.parent
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("shares.db")}


def test_no_share_value_in_the_clear_on_disk(node):
    recs = store(node, [f"s{i}" for i in range(12)], dimension=512)
    needles = set().union(*(windows(r.values) for r in recs))
    kek = bytes.fromhex(json.loads((node.folder / "kek.json").read_text())["keys"]["1"])
    # While running: the records sit in the WAL.
    files = raw_files(node)
    assert "shares.db-wal" in files and len(files["shares.db-wal"]) > 12 * 2080
    for name, data in files.items():
        assert leaks(data, needles) == 0, name
        assert recs[0].values not in data and kek not in data
    # After a clean stop (WAL checkpointed into the main file).
    node.stop()
    files = raw_files(node)
    assert sum(len(d) for d in files.values()) > 12 * 2080
    for name, data in files.items():
        assert leaks(data, needles) == 0, name
        assert kek not in data
    # Counter-check: the scan does find a value written in the clear.
    assert leaks(b"\x00" * 10 + recs[3].values[100:140] + b"\x00", needles) > 0


def _edit_db(node, *statements):
    node.stop()
    conn = sqlite3.connect(node.db_path)
    with conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()
    node.start()


def test_flipped_ciphertext_byte_gives_data_loss(node):
    store(node, ["alice", "bob"])
    ct = sqlite3.connect(node.db_path).execute(
        "SELECT ciphertext FROM shares WHERE subject = 'alice'").fetchone()[0]
    flipped = bytearray(ct)
    flipped[len(ct) // 2] ^= 0x01
    _edit_db(node, ("UPDATE shares SET ciphertext = ? WHERE subject = 'alice'", (bytes(flipped),)))
    assert release_code(node, "alice") == grpc.StatusCode.DATA_LOSS
    assert release(node, "bob").shares  # the others are untouched


@pytest.mark.parametrize("column", ["wrapped_dk", "nonce"])
def test_flipped_key_or_nonce_byte_gives_data_loss(node, column):
    store(node, ["alice"])
    value = bytearray(sqlite3.connect(node.db_path).execute(f"SELECT {column} FROM shares").fetchone()[0])
    value[0] ^= 0x80
    _edit_db(node, (f"UPDATE shares SET {column} = ?", (bytes(value),)))
    assert release_code(node, "alice") == grpc.StatusCode.DATA_LOSS


def test_ciphertext_moved_to_another_row_gives_data_loss(node):
    store(node, ["alice", "bob"])
    _edit_db(node, (
        "UPDATE shares SET (kek_version, wrapped_dk, nonce, ciphertext) = "
        "(SELECT kek_version, wrapped_dk, nonce, ciphertext FROM shares WHERE subject = 'bob') "
        "WHERE subject = 'alice'", ()))
    assert release_code(node, "alice") == grpc.StatusCode.DATA_LOSS
    entries = [i.entry for i in node.stub("auditor").ReadAuditLog(pb.ReadAuditLogRequest(), timeout=10)
               if i.HasField("entry")]
    assert json.loads(entries[-1].details_json)["reason"] == "data_loss"


@pytest.mark.parametrize("sql", [
    "UPDATE shares SET epoch = 0 WHERE subject = 'alice'",  # an epoch the node serves
    "UPDATE shares SET subject = 'carol' WHERE subject = 'alice'",
    "UPDATE shares SET idx = 2 WHERE subject = 'alice'",
    "UPDATE shares SET tenant = 'globex' WHERE subject = 'alice'",
])
def test_row_relabelled_gives_data_loss(node, sql):
    store(node, ["alice"])
    _edit_db(node, (sql, ()))
    subject = "carol" if "carol" in sql else "alice"
    code = release_code(node, subject)
    if "globex" in sql:
        assert code == grpc.StatusCode.NOT_FOUND  # acme's ticket never reaches globex's rows
    else:
        assert code == grpc.StatusCode.DATA_LOSS


def test_replay_and_attempts_survive_a_restart(node):
    store(node, ["alice"])
    t = ACME.ticket("alice")
    release(node, "alice", t)
    for _ in range(2):
        release(node, "alice")
    node.stop()
    node.start()
    assert release_code(node, "alice", t) == grpc.StatusCode.PERMISSION_DENIED
    # Four attempts (three releases, one replay) were counted before or after the restart.
    assert release_code(node, "alice") == grpc.StatusCode.RESOURCE_EXHAUSTED


def _chain_activity(node):
    store(node, ["a", "b", "c"])
    release(node, "a")
    release(node, "b")
    node.stub("matcher").DeleteShares(ACME.delete_request("c", "d1"), timeout=10)
    node.stop()


def test_stored_chain_verifies(node):
    _chain_activity(node)
    report = verify_database(node.db_path, node.audit_public_key(), node="bank-a")
    assert report.ok and report.head_seq == 8 and report.signed_seq == 8


@pytest.mark.parametrize("tamper, first, node_starts", [
    # Edit: entry 5 (the release of "a") now names another subject.
    ("UPDATE audit_log SET subject = 'zz' WHERE seq = 5", 5, True),
    ("UPDATE audit_log SET details_json = '{}' WHERE seq = 3", 3, True),
    # Remove entry 4.
    ("DELETE FROM audit_log WHERE seq = 4", 4, True),
    # Reorder: entries 3 and 4 swap places (each keeps its own row content).
    ("UPDATE audit_log SET seq = -seq WHERE seq IN (3, 4); "
     "UPDATE audit_log SET seq = 11 WHERE seq = -3; UPDATE audit_log SET seq = 3 WHERE seq = -4; "
     "UPDATE audit_log SET seq = 4 WHERE seq = 11", 3, True),
    # The same near the end: the node also refuses to extend such a log.
    ("UPDATE audit_log SET seq = -seq WHERE seq IN (6, 7); "
     "UPDATE audit_log SET seq = 11 WHERE seq = -6; UPDATE audit_log SET seq = 6 WHERE seq = -7; "
     "UPDATE audit_log SET seq = 7 WHERE seq = 11", 6, False),
    # Remove the tail: a signed checkpoint still covers it.
    ("DELETE FROM audit_log WHERE seq >= 7", 7, False),
])
def test_tampered_stored_chain_names_the_first_broken_entry(node, tamper, first, node_starts):
    _chain_activity(node)
    conn = sqlite3.connect(node.db_path)
    conn.executescript(tamper)
    conn.close()
    report = verify_database(node.db_path, node.audit_public_key(), node="bank-a")
    assert not report.ok and report.broken_seq == first, report.reason
    if not node_starts:
        with pytest.raises(AuditChainError):
            node.start()
        return
    # Earlier breaks: the node starts, and ReadAuditLog gives the same verdict.
    node.start()
    items = list(node.stub("auditor").ReadAuditLog(pb.ReadAuditLogRequest(), timeout=10))
    entries = [i.entry for i in items if i.HasField("entry")]
    cps = [i.checkpoint for i in items if i.HasField("checkpoint")]
    assert audit.verify_chain(entries, cps, node.audit_public_key()).broken_seq == first


def test_forged_checkpoint_is_named(node):
    _chain_activity(node)
    conn = sqlite3.connect(node.db_path)
    with conn:
        conn.execute("UPDATE audit_checkpoints SET time_ms = time_ms + 1")
    conn.close()
    report = verify_database(node.db_path, node.audit_public_key())
    assert report.broken_seq == 8 and "signature" in report.reason
    with pytest.raises(AuditChainError):
        node.start()


def test_edited_head_entry_stops_the_node(node):
    _chain_activity(node)
    conn = sqlite3.connect(node.db_path)
    with conn:
        conn.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 8")
    conn.close()
    with pytest.raises(AuditChainError) as err:
        node.start()
    assert err.value.seq == 8


def test_database_of_another_node_is_refused(node, tmp_path, dev_pki):
    store(node, ["a"])
    node.stop()
    other = NodeHarness(tmp_path / "bank-b", dev_pki.files, [ACME], name="bank-a", index=2)
    (tmp_path / "bank-b" / "data").mkdir()
    (tmp_path / "bank-b" / "data" / "shares.db").write_bytes(node.db_path.read_bytes())
    from shareholders.storage import SchemaError

    with pytest.raises(SchemaError, match="index 1"):
        other.start()
    other.stop()


def test_replaced_shares_leave_the_files_when_the_call_returns(node):
    # Enrolment with replace overwrites a subject's row; the old sealed bytes
    # must be gone from the main file and the WAL when StoreShares returns,
    # as for an erasure (found by the at-rest campaign, docs/reliability.md).
    store(node, ["alice", "bob"], dimension=256)
    conn = sqlite3.connect(node.db_path)
    old = conn.execute("SELECT ciphertext FROM shares WHERE subject = 'alice'").fetchone()[0]
    conn.close()
    assert any(old in data for data in raw_files(node).values())
    recs = sample_records("acme", ["alice"], index=1, dimension=256, request_id="replacement")
    node.stub("matcher").StoreShares(ACME.store_request(recs, replace=True), timeout=10)
    for name, data in raw_files(node).items():
        assert old not in data, name
    assert release(node, "alice").shares[0].values == recs[0].values


def test_bulk_replaced_shares_leave_the_files_when_the_stream_returns(node):
    # The same for a replacing StoreShareStream (bulk migrations): the old
    # sealed bytes must leave the main file and the WAL before it answers.
    store(node, ["alice", "bob", "carol"], dimension=256)
    conn = sqlite3.connect(node.db_path)
    old = [row[0] for row in conn.execute("SELECT ciphertext FROM shares ORDER BY subject")]
    conn.close()
    assert all(any(o in data for data in raw_files(node).values()) for o in old)
    recs = sample_records("acme", ["alice", "bob", "carol"], index=1, dimension=256, request_id="bulk-replacement")
    reply = node.stub("matcher").StoreShareStream(
        iter([ACME.stream_request(recs[:2], replace=True), ACME.stream_request(recs[2:], replace=True)]), timeout=10)
    assert reply.stored == 3
    for name, data in raw_files(node).items():
        for o in old:
            assert o not in data, name
    assert release(node, "bob").shares[0].values == recs[1].values


def test_a_database_in_the_old_record_format_is_refused_not_converted(tmp_path):
    # Schema 3 (records with the AMD MAC, width d + 8) holding a share: the node
    # refuses to start on it with one sentence; an empty one is migrated.
    from shareholders import storage
    from shareholders.storage import schema

    for holds_share in (True, False):
        conn = storage.connect(tmp_path / f"old-{holds_share}.db")
        saved = schema.MIGRATIONS
        try:
            schema.MIGRATIONS = saved[:3]
            schema.SCHEMA_VERSION = 3
            conn.migrate()
        finally:
            schema.MIGRATIONS, schema.SCHEMA_VERSION = saved, len(saved)
        if holds_share:
            conn.execute("INSERT INTO shares VALUES ('acme', 'alice', 1, 1, 2, 3, 16, 1, 4, 'r', 1, x'00', x'00', "
                         "x'00', 0)")
        if holds_share:
            with pytest.raises(storage.SchemaError) as err:
                conn.migrate()
            message = str(err.value)
            assert "old record format" in message and message.count(". ") == 0 and message.endswith(".")
            assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == 3
        else:
            assert conn.migrate() == 3
            assert conn.execute("SELECT COUNT(*) FROM mac_keys").fetchone()[0] == 0
        conn.close()
