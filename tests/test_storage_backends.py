"""The node's storage layer (shareholders.storage) on each backend: a SQLite
file and a real PostgreSQL database (tests/pg_kit.py). The same calls give
the same answers: schema and migrations, node identity, share rows, key
order, chunked deletes, sessions and the node's lock, check batches, MAC key
shares, transactions. On PostgreSQL, tenant isolation (row-level security,
FORCEd, for a role that does not own the tables) is attacked directly."""
from __future__ import annotations

import pytest

from shareholders import storage
from vault.envelope import SealedShare


def row(tenant="acme", subject="alice", epoch=1, *, request_id="r1", kek=1, fill=b"\x01") -> storage.ShareRow:
    return storage.ShareRow(tenant, subject, epoch, 1, 2, 3, 16, 1, 4, request_id, kek, fill * 40, fill * 12,
                            fill * 80, 1000)


@pytest.fixture()
def db(store_location):
    storage.migrate(store_location)
    d = storage.connect(store_location)
    yield d
    d.close()


def test_a_fresh_store_migrates_once(store_location):
    assert storage.migrate(store_location) == 0
    assert storage.migrate(store_location) == storage.SCHEMA_VERSION
    d = storage.connect(store_location)
    try:
        assert d.init_node_state("bank-a", 1, 5) == storage.NodeState("bank-a", 1, storage.FIRST_EPOCH, {})
        assert d.init_node_state("bank-a", 1, 6).current_epoch == storage.FIRST_EPOCH
        with pytest.raises(storage.SchemaError, match="index 1"):
            d.init_node_state("bank-b", 2, 7)
        with d.transaction():
            d.set_epoch(2, {"members": {"bank-a": 1}}, 8)
        assert d.node_state() == storage.NodeState("bank-a", 1, 2, {"members": {"bank-a": 1}})
    finally:
        d.close()


def test_share_rows_round_trip_and_are_replaced_whole(db):
    rows = [row(subject="alice"), row(subject="alice", epoch=2, request_id="r2"), row(subject="bob")]
    with db.transaction():
        db.insert_shares(rows)
    assert db.subject_rows("acme", "alice") == rows[:2]
    assert db.share_row("acme", "bob", 1) == rows[2] and db.share_row("acme", "bob", 2) is None
    assert db.request_ids_of([("acme", "alice"), ("acme", "bob"), ("acme", "carol")]) == {
        ("acme", "alice"): {"r1", "r2"}, ("acme", "bob"): {"r1"}}
    newer = row(subject="bob", request_id="r9", fill=b"\x02")
    with db.transaction():
        db.insert_shares([newer])
    assert db.subject_rows("acme", "bob") == [newer]
    assert (db.count_records(), db.count_epoch(1), db.count_other_epochs(1), db.newest_epoch()) == (3, 2, 1, 2)
    with db.transaction():
        assert db.delete_subject("acme", "alice") == 2
    assert db.subject_rows("acme", "alice") == [] and db.count_records() == 1


def test_key_order_is_bytewise_on_every_backend(db):
    # Cursors and the members' key hashes need one order on every node, whatever its engine.
    subjects = ["a", "B", "z", "\u00e9", "A1", "a b"]
    with db.transaction():
        db.insert_shares([row(subject=s) for s in subjects])
    ordered = sorted(subjects, key=lambda s: s.encode())
    assert [k[1] for k in db.epoch_keys(1)] == ordered
    assert [r.subject for r in db.rows_after(1, ("acme", ordered[1]), 3)] == ordered[2:5]
    assert [r.subject for r in db.record_keys(1, ("", ""), 2)] == ordered[:2]
    assert db.last_key(1) == ("acme", ordered[-1])
    assert [r.subject for r in db.rows_between(1, ("acme", ordered[1]), ("acme", ordered[3]))] == ordered[1:4]
    assert {k[1] for k in db.live_ids_between(1, ("acme", ordered[0]), ("acme", ordered[2]))} == set(ordered[:3])


def test_prepared_rows_chunked_deletes_and_rewraps(db):
    with db.transaction():
        db.insert_shares([row(subject=f"s{i:02d}") for i in range(10)])
        db.insert_shares([row(subject=f"s{i:02d}", epoch=2, kek=2) for i in range(0, 10, 3)])
    assert db.count_unprepared(1, 2) == 6
    assert [r.subject for r in db.unprepared_rows(1, 2, ("acme", "s03"), 3)] == ["s04", "s05", "s07"]
    assert set(db.sealed_between(2, ("acme", "s00"), ("acme", "s09"))) == {("acme", f"s{i:02d}") for i in (0, 3, 6, 9)}
    assert sorted(db.kek_versions_in_use()) == [1, 2] and db.count_not_under(2) == 10
    sample = db.sample_rows_by_kek(per_version=3)
    assert sorted(sample) == [1, 2] and all(r.kek_version == 1 for r in sample[1]) and 1 <= len(sample[1]) <= 3
    old = db.wrapped_not_under(2, 4)
    assert len(old) == 4
    updates = [(2, b"\x09" * 40, t, s, e, v, w) for t, s, e, _i, v, w in old]
    updates.append((2, b"\x09" * 40, "acme", "s01", 1, 1, b"\x07" * 40))  # changed meanwhile: left alone
    with db.transaction():
        assert db.rewrap_shares(updates) == 4
    assert db.count_not_under(2) == 6
    with db.transaction():
        assert db.delete_epoch_rows(2, 3, older=True) == 3
    assert db.count_before(2) == 7
    with db.transaction():
        assert db.delete_epoch_rows(2, 100) == 4
        assert db.delete_epoch(1) == 7
    assert db.count_records() == 0 and db.flush_erased()


def test_one_open_session_holds_the_lock(db):
    seed = SealedShare(1, b"w" * 40, b"n" * 12, b"c" * 48)
    with db.transaction():
        s = db.begin_session("refresh-1", "refresh", "auditor/bob", '{"x": 1}', "begun", 10, epoch=1, new_epoch=2,
                             seed=seed)
    assert (s.kind, s.from_epoch, s.new_epoch, s.plan, s.sealed_seed, s.open) == ("refresh", 1, 2, {"x": 1}, seed, True)
    assert db.open_session() == s
    with pytest.raises(storage.SessionBusy, match="refresh-1"), db.transaction():
        db.begin_session("kek-1", "kek_rotate", "auditor/bob", {}, "open", 11)
    batch = storage.CheckBatch("refresh-1", "acme", "alice", 20, "[]", b"p" * 16, seed)
    with db.transaction():
        db.put_check_batch(batch)
        assert not db.put_check_batch_once(batch)
        assert db.put_check_batch_once(storage.CheckBatch("refresh-1", "", "mask-old", 8, "[]", b"", seed))
        db.update_session("refresh-1", 12, state="prepared", skipped=3, plan={"x": 2})
    assert db.check_batch("refresh-1", ("acme", "alice"), 20) == batch
    assert [b.first_subject for b in db.check_batches("refresh-1")] == ["mask-old", "alice"]
    got = db.get_session("refresh-1")
    assert (got.state, got.skipped, got.plan, got.updated_ms) == ("prepared", 3, {"x": 2}, 12)
    with db.transaction():
        assert db.delete_check_batches("refresh-1", 1) == 1
        db.close_session("refresh-1", "finalized", 13)
    closed = db.get_session("refresh-1")
    assert not closed.open and closed.sealed_seed is None and list(db.check_batches("refresh-1")) == []
    assert db.open_session() is None
    with pytest.raises(ValueError, match="already used"), db.transaction():
        db.begin_session("refresh-1", "refresh", "auditor/bob", {}, "begun", 14)


def test_mac_keys_and_a_rolled_back_transaction(db):
    key = storage.MacKeyRow(1, 2, 24, "keygen-1", 1, b"w" * 40, b"n" * 12, b"c" * 64)
    with db.transaction():
        db.insert_mac_key(key, 5)
        db.insert_mac_key(storage.MacKeyRow(2, 2, 24, "refresh-1", 1, b"w" * 40, b"n" * 12, b"c" * 64), 5)
    assert db.mac_keys()[1] == key
    with pytest.raises(RuntimeError), db.transaction():
        db.delete_mac_keys(2, older=True)
        db.insert_shares([row()])
        raise RuntimeError("undo")
    assert sorted(db.mac_keys()) == [1, 2] and db.count_records() == 0
    with db.transaction():
        db.rewrap_mac_key(1, 3, b"x" * 40)
        db.delete_mac_keys(2)
    assert list(db.mac_keys()) == [1] and db.mac_keys()[1].kek_version == 3
    assert db.kek_versions_of_keys_and_seeds() == {3}



def test_every_write_to_a_tenants_rows_moves_its_share_version(db):
    # Identify's gallery cache skips its listing while the counter stands
    # still: every write path must move it, in its own transaction (triggers,
    # on PostgreSQL as the node's role under row-level security).
    def moved(tenant="acme"):
        nonlocal last
        now = (db.share_version(tenant), db.share_version("zeta"))
        changed, last = now[0] > last[0], now
        return changed

    last = (db.share_version("acme"), db.share_version("zeta"))
    assert last == (0, 0)
    with db.transaction():  # store
        db.insert_shares([row(subject=f"s{i}") for i in range(4)])
    assert moved() and last[1] == 0
    with db.transaction():  # replace (same key, new values)
        db.insert_shares([row(subject="s0", request_id="r2", fill=b"\x02")])
    assert moved()
    with db.transaction():  # a refresh's prepared rows of the next epoch
        db.insert_shares([row(subject=f"s{i}", epoch=2, kek=2) for i in range(4)])
    assert moved()
    old = db.wrapped_not_under(2, 10)
    with db.transaction():  # KEK rotation's re-wrap (need not move it; it does)
        assert db.rewrap_shares([(2, b"\x09" * 40, t, s, e, v, w) for t, s, e, _i, v, w in old]) == 4
    assert moved()
    with db.transaction():  # a refresh's finalize: the old epoch dropped
        assert db.delete_epoch_rows(2, 2, older=True) == 2
    assert moved()
    with db.transaction():
        assert db.delete_epoch(1) == 2
    assert moved()
    with db.transaction():  # delete (erasure)
        assert db.delete_subject("acme", "s3") == 1
    assert moved()
    with pytest.raises(RuntimeError), db.transaction():  # rolled back: nothing moved
        db.insert_shares([row(subject="s9")])
        db.delete_subject("acme", "s0")
        raise RuntimeError("undo")
    assert not moved()
    with db.transaction():  # a job rolled back to its savepoint, then another write (the audit writer's batches)
        db.savepoint()
        db.insert_shares([row(subject="s8")])
        db.rollback_to()
        db.release()
        db.savepoint()
        db.delete_subject("acme", "s0")
        db.release()
    assert moved() and db.subject_rows("acme", "s0") == [] and db.subject_rows("acme", "s8") == []
    with db.transaction():  # nothing written: nothing moved
        assert db.delete_subject("acme", "nobody") == 0
    assert not moved()
    with db.transaction():  # another tenant's write moves only its own counter
        db.insert_shares([row("zeta", "zoe")])
    assert not moved() and last[1] > 0



def test_schema_8_counts_from_1_for_tenants_already_stored(store_location, monkeypatch):
    # A store of schema 7 holding rows: migration 8 gives each stored tenant
    # version 1 (a gallery cached at 0 is listed again), and the triggers run.
    from shareholders.storage import schema

    loc = storage._location(store_location)
    owner = storage.Database(loc.dialect.connect(loc.owner_dsn or loc.target), loc.dialect)
    try:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:7])
            m.setattr(schema, "SCHEMA_VERSION", 7)
            assert owner.migrate() == 0
        with owner.transaction():  # the owner, scoped to every tenant by migrate
            owner.insert_shares([row(subject="alice"), row("zeta", "zoe")])
        assert storage.migrate(store_location) == 7
    finally:
        owner.close()
    d = storage.connect(store_location)
    try:
        assert (d.share_version("acme"), d.share_version("zeta"), d.share_version("none")) == (1, 1, 0)
        with d.transaction():
            d.delete_subject("acme", "alice")
        assert (d.share_version("acme"), d.share_version("zeta")) == (2, 1)
    finally:
        d.close()


# --- PostgreSQL: tenant isolation, attacked ------------------------------------------------


@pytest.fixture()
def pg_db(pg, pg_database):
    loc = pg.location(pg_database)
    storage.migrate(loc)
    d = storage.connect(loc)
    with d.transaction():
        d.insert_shares([row("acme", "alice"), row("acme", "bob")])
        d.insert_shares([row("zeta", "zoe")])
    yield d
    d.close()


def test_postgres_the_node_role_does_not_own_the_tables_and_rls_is_forced(pg_db):
    owner, forced, enabled = pg_db.execute(
        "SELECT pg_get_userbyid(relowner), relforcerowsecurity, relrowsecurity FROM pg_class WHERE relname = 'shares'"
    ).fetchone()
    assert (pg_db.current_role(), owner, forced, enabled) == ("sv_node", "sv_owner", True, True)


def test_postgres_a_tenant_scoped_connection_sees_and_writes_only_its_tenant(pg, pg_database, pg_db):
    import psycopg

    # A query that forgets its tenant filter still sees one tenant's rows only.
    pg_db._scope("acme")
    assert sorted(r[0] for r in pg_db.execute("SELECT subject FROM shares").fetchall()) == ["alice", "bob"]
    assert pg_db.execute("DELETE FROM shares WHERE subject = 'zoe'").rowcount == 0
    # The change counters (schema 8) under the same policy: one tenant's only.
    assert [r[0] for r in pg_db.execute("SELECT tenant FROM share_versions").fetchall()] == ["acme"]
    assert pg_db.execute("UPDATE share_versions SET version = 0 WHERE tenant = 'zeta'").rowcount == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # WITH CHECK: no row planted for another tenant
        pg_db.execute("INSERT INTO shares SELECT 'zeta', 'mallory', epoch, idx, threshold, n, dimension, "
                      "codec_version, mac_count, request_id, kek_version, wrapped_dk, nonce, ciphertext, stored_ms "
                      "FROM shares WHERE subject = 'alice'")
    # A connection of the node's role that never scoped itself sees nothing.
    with psycopg.connect(pg.uri(pg_database, "sv_node"), autocommit=True) as raw:
        assert raw.execute("SELECT COUNT(*) FROM shares").fetchone()[0] == 0
    assert pg_db.subject_rows("zeta", "zoe") == [row("zeta", "zoe")]


def test_postgres_the_node_role_cannot_rewrite_or_cut_the_audit_chain(pg, pg_database, pg_db):
    import psycopg

    pg_db.insert_entry_row((1, 1, "n", "start", "a", "", "", "", "{}", b"\0" * 32, b"\1" * 32))
    for attack in ("UPDATE audit_log SET actor = 'nobody'", "DELETE FROM audit_log", "TRUNCATE audit_log",
                   "ALTER TABLE shares DISABLE ROW LEVEL SECURITY", "DROP POLICY tenant_scope ON shares",
                   "DELETE FROM share_versions", "DROP TRIGGER shares_version_delete ON shares"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg_db.execute(attack)
    assert pg_db.audit_head() == (1, b"\1" * 32)


def _capture_queries(db, count):
    """Fill the store with `count` rows of acme and return (seen, stop): every
    query the store runs until stop() is called is kept as (sql, params)."""
    with db.transaction():
        db.insert_shares(row(subject=f"s{i:05d}", epoch=1 + i % 2) for i in range(count))
    seen: list[tuple[str, tuple]] = []
    execute = db.execute

    def capture(sql, params=()):
        seen.append((sql, tuple(params)))
        return execute(sql, params)

    def stop():
        db.execute = execute

    db.execute = capture
    return seen, stop


def _read_a_chunk(db) -> None:
    """The three range reads of one chunk of a refresh (prepare, deal, check)
    over acme s00100..s00199 of a store filled by ``_capture_queries``."""
    lo, hi = ("acme", "s00100"), ("acme", "s00199")
    assert len(db.live_ids_between(1, lo, hi)) == 50
    assert len(db.rows_between(1, lo, hi)) == 50
    assert len(db.sealed_between(2, lo, hi)) == 50


def test_every_per_subject_lookup_seeks_on_tenant_and_subject(db):
    # The per-record lookups of a store (request_ids_of, subject_rows) must
    # seek on (tenant, subject) whatever index the planner takes: an index
    # leading with another column made every store scan a tenant's index
    # (bulk enrolment of 10,000 ten times slower, most batches timed out).
    if db.dialect is not storage.dialect.SQLITE:
        pytest.skip("the plan is SQLite's (PostgreSQL plans from its statistics)")
    seen, stop = _capture_queries(db, 2000)
    try:
        assert db.request_ids_of([("acme", "s00007"), ("acme", "s01999")]) == {
            ("acme", "s00007"): {"r1"}, ("acme", "s01999"): {"r1"}}
        assert [r.subject for r in db.subject_rows("acme", "s00042")] == ["s00042"]
    finally:
        stop()
    for sql, params in seen:
        if "shares" not in sql:
            continue
        plan = " | ".join(str(r[-1]) for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
        assert "tenant=? AND subject=?" in plan, (sql, plan)


def test_every_key_range_read_seeks_on_the_key_range(db):
    # The maintenance reads of a key range (a refresh's prepare, deal, check)
    # must seek on (tenant, subject): shares_by_group, a covering index that
    # leads with (tenant, grp), served live_ids_between by tenant alone, so
    # each chunk scanned the whole tenant and a refresh of 200,000 grew
    # quadratic (27 ms per call at 100,000 rows against 0.3 ms).
    if db.dialect is not storage.dialect.SQLITE:
        pytest.skip("the plan is SQLite's (PostgreSQL plans from its statistics)")
    lo = ("acme", "s00100")
    seen, stop = _capture_queries(db, 2000)
    try:
        _read_a_chunk(db)
        assert len(db.rows_after(1, lo, 10)) == 10
        assert len(db.record_keys(1, lo, 10)) == 10
        assert len(db.unprepared_rows(1, 2, lo, 10)) == 10
    finally:
        stop()
    assert len(seen) == 6
    for sql, params in seen:
        plan = " | ".join(str(r[-1]) for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
        assert ("(tenant,subject)>" in plan or "tenant=? AND subject>? AND subject<?" in plan) \
            and "tenant>? AND tenant<?" not in plan, (sql, plan)


def test_key_range_reads_of_one_tenant_use_an_index_on_postgresql(db):
    # PostgreSQL served the row-value range (tenant, subject) >= (...) AND <=
    # (...) with a scan of the whole table (with or without statistics), once
    # per chunk of a refresh; within one tenant the reads now name it.
    if db.dialect is storage.dialect.SQLITE:
        pytest.skip("PostgreSQL's plans")
    seen, stop = _capture_queries(db, 4000)
    try:
        _read_a_chunk(db)
    finally:
        stop()
    for sql, params in seen:
        plan = " | ".join(r[0] for r in db.execute("EXPLAIN " + sql, params).fetchall())
        assert "Index" in plan and "Seq Scan" not in plan and "(tenant = " in plan, (sql, plan)


def test_tenant_dimensions_lists_what_a_preload_loads(db):
    import dataclasses

    with db.transaction():
        db.insert_shares([row(subject="a"), dataclasses.replace(row(subject="b"), dimension=512),
                          dataclasses.replace(row(subject="c", epoch=3), dimension=128), row(tenant="other")])
    assert db.tenant_dimensions("acme", 1) == [16, 512]
    assert db.tenant_dimensions("acme", 3) == [16, 128, 512]
    assert db.tenant_dimensions("nobody", 3) == []


def test_identify_reads_one_gallery_group(db):
    # A record's group round-trips, and Identify's reads narrow to one group ('' = every group).
    import dataclasses

    rows = [dataclasses.replace(row(subject=f"s{i}"), group=("north", "south", "")[i % 3]) for i in range(9)]
    with db.transaction():
        db.insert_shares(rows)
    assert db.subject_rows("acme", "s1") == [rows[1]] and rows[1].group == "south"
    assert [v[0] for v in db.tenant_row_versions("acme", 16, 1, "north")] == ["s0", "s3", "s6"]
    assert len(db.tenant_row_versions("acme", 16, 1)) == 9
    assert [r.subject for r in db.tenant_rows("acme", 16, 1, group="south")] == ["s1", "s4", "s7"]
    assert db.tenant_row_versions("acme", 16, 1, "west") == []
    if db.dialect is storage.dialect.SQLITE:
        sql = ("SELECT subject, epoch, request_id, nonce FROM shares WHERE tenant = ? AND dimension = ? "
               "AND epoch <= ? AND grp = ? ORDER BY subject, epoch")
        plan = " | ".join(str(r[-1]) for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql, ("acme", 16, 1, "north")))
        assert "COVERING INDEX shares_by_group (tenant=? AND grp=?" in plan, plan
