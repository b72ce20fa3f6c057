"""Refresh on in-process nodes over real mTLS: the node's side of the session
(lock, roles, enrolment paused, deletions, the check, abort) and proactive
security (a share from before a refresh does not rejoin with shares after)."""
from __future__ import annotations

import sqlite3

import grpc
import numpy as np
import pytest

from maintenance_kit import epochs_held, join_pairs, prepared_rows, release, verify_all
from splitvault.v1 import admin_pb2, admin_pb2_grpc
from node_kit import audit_events
from matcher_kit import Committee, Tenant, unit
from vault import envelope, record
from vault.errors import IntegrityError
from vault.field import P
from vault.pki import Identity
from vaultctl.maintenance import Admin, MaintenanceError, Node, SessionFile
from vaultctl.refresh import refresh_session
from vaultrpc.tls import secure_channel

SUBJECTS = [f"subject-{i:03d}" for i in range(24)]


@pytest.fixture
def vault(dev_pki, tmp_path):
    c = Committee(dev_pki, tmp_path, n=3, k=2, tenants=[Tenant("acme")])
    try:
        c.start_matcher()
        client = c.client()
        rng = np.random.default_rng(11)
        templates = {s: unit(rng) for s in SUBJECTS}
        for reply in client.enroll_many(templates.items()):
            assert reply.code == 0, reply
        nodes = [Node(n, i, a) for n, i, a in c.endpoints()]
        admin = Admin(nodes, dev_pki.tls("auditor", "auditor"))
        c.templates, c.admin, c.nodes_list, c.client_ = templates, admin, nodes, client
        c.impostor = unit(rng)
        c.sessions = SessionFile(tmp_path / "state")
        yield c
        admin.close()
    finally:
        c.close()


def _db(c, name):
    return c.nodes[name].cfg.db_path


def _check_batches(c, name, masks: bool = False) -> int:
    # The records' sealed check batches; with masks, also the renewal check's
    # sealed masks (tenant "", sealed at prepare before any record).
    conn = sqlite3.connect(f"file:{_db(c, name)}?mode=ro", uri=True)
    try:
        where = "" if masks else " WHERE first_tenant <> ''"
        return conn.execute(f"SELECT COUNT(*) FROM refresh_check_diffs{where}").fetchone()[0]
    finally:
        conn.close()


def _refresh(c, **kw):
    return refresh_session(c.admin, c.nodes_list, 2, c.sessions, drain_s=0, **kw)


def _begin(c, sid="session-under-test-1", names=None):
    members = [admin_pb2.Member(name=n.name, index=n.index) for n in c.nodes_list]
    req = admin_pb2.BeginSessionRequest(session_id=sid, kind=admin_pb2.SESSION_KIND_REFRESH, from_epoch=1, new_epoch=2,
                                        old_committee=members, new_committee=members, old_threshold=2, new_threshold=2)
    for n in names or [n.name for n in c.nodes_list]:
        c.admin.call(n, "BeginSession", req)
    return sid


def test_refresh_keeps_every_template_and_leaves_one_epoch(vault):
    c = vault
    report = _refresh(c)
    assert report["state"] == "finalized" and report["new_epoch"] == 2
    assert report["check"]["passed"] and report["check"]["records"] == len(SUBJECTS)
    for name in c.names:
        assert epochs_held(_db(c, name)) == {2: len(SUBJECTS)}
        assert prepared_rows(_db(c, name)) == 0
        assert _check_batches(c, name, masks=True) == 0  # the check's sealed values went with the old epoch
        events = audit_events(_db(c, name))
        for event in ("maintenance_begin", "epoch_prepare_batch", "epoch_prepare", "refresh_deal", "refresh_check",
                      "renewal_check_mask", "renewal_check_deal", "renewal_check_begin",
                      "epoch_commit", "epoch_destroy_batch", "epoch_finalize"):
            assert event in events, (name, event)
    verify_all(c.client_, c.templates, SUBJECTS[:6], c.impostor)
    assert c.client_.verify(SUBJECTS[0], c.templates[SUBJECTS[0]]).epoch == 2
    # A second refresh moves on again.
    assert _refresh(c)["new_epoch"] == 3
    verify_all(c.client_, c.templates, SUBJECTS[6:9], c.impostor, noise_seed=50)


def test_a_share_from_before_a_refresh_does_not_rejoin_with_shares_after(vault, dev_pki):
    c = vault
    t = c.tenants["acme"]
    subject = SUBJECTS[3]
    probe = c.templates[subject]
    mtls = dev_pki.tls("matcher", "matcher")
    stolen = release(c.addresses["bank-a"], mtls, t.key, t.key_id, "acme", subject, probe, node="bank-a")
    before_b = release(c.addresses["bank-b"], mtls, t.key, t.key_id, "acme", subject, probe, node="bank-b")
    assert [s.epoch for s, _ in stolen] == [1]
    assert join_pairs(stolen[0], before_b[0]).epoch == 1  # control: same epoch rejoins
    _refresh(c)
    after_b = release(c.addresses["bank-b"], mtls, t.key, t.key_id, "acme", subject, probe, node="bank-b")
    after_c = release(c.addresses["bank-c"], mtls, t.key, t.key_id, "acme", subject, probe, node="bank-c")
    assert [s.epoch for s, _ in after_b] == [2] and [s.epoch for s, _ in after_c] == [2]
    assert join_pairs(after_b[0], after_c[0]).epoch == 2
    assert after_b[0][0].values != before_b[0][0].values  # every share changed
    assert after_b[0][1].values != before_b[0][1].values  # and every key share (a new key)
    # The thief relabels the old share and key share with the new epoch: the MACs reject them.
    old, old_key = type(stolen[0][0])(), type(stolen[0][1])()
    old.CopyFrom(stolen[0][0])
    old_key.CopyFrom(stolen[0][1])
    old.epoch = old_key.epoch = 2
    with pytest.raises(IntegrityError):
        join_pairs((old, old_key), after_b[0])
    with pytest.raises(IntegrityError):
        join_pairs((old, old_key), after_c[0])
    # And the old share is gone from the node that held it.
    assert epochs_held(_db(c, "bank-a")) == {2: len(SUBJECTS)}


def test_one_session_at_a_time_enrolment_paused_and_abort(vault):
    c = vault
    sid = _begin(c)
    with pytest.raises(MaintenanceError) as err:
        _begin(c, sid="another-session-22")
    assert err.value.details["status"] == "FAILED_PRECONDITION" and sid in err.value.message
    _begin(c, sid)  # the same id resumes
    with pytest.raises(grpc.RpcError) as rpc:
        c.client_.enroll("newcomer", unit(np.random.default_rng(1)))
    assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "maintenance" in rpc.value.details().lower()
    verify_all(c.client_, c.templates, SUBJECTS[:2], c.impostor)  # verification goes on
    for node in c.nodes_list:
        c.admin.call(node.name, "AbortSession", admin_pb2.AbortSessionRequest(session_id=sid))
    c.client_.enroll("newcomer", unit(np.random.default_rng(1)))
    assert epochs_held(_db(c, "bank-a")) == {1: len(SUBJECTS) + 1}


def test_roles_and_peer_identity(vault, dev_pki):
    c = vault
    sid = _begin(c)
    key = admin_pb2.RecordKey(tenant="acme", subject=SUBJECTS[0], threshold=2, width=131)
    req = admin_pb2.GetRefreshDeltasRequest(session_id=sid, keys=[key])

    def call(role, name, method, request):
        channel = secure_channel(c.addresses["bank-a"], dev_pki.tls(role, name), expect=Identity("shareholder", "bank-a"))
        try:
            return getattr(admin_pb2_grpc.ShareholderAdminStub(channel), method)(request, timeout=10)
        finally:
            channel.close()

    # The auditor orchestrates but never sees a dealt value.
    with pytest.raises(grpc.RpcError) as err:
        call("auditor", "auditor", "GetRefreshDeltas", req)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A shareholder certificate outside the committee gets nothing.
    with pytest.raises(grpc.RpcError) as err:
        call("shareholder", "bank-z", "GetRefreshDeltas", req)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Peers deal; but cannot drive sessions. The matcher can do neither.
    assert len(call("shareholder", "bank-b", "GetRefreshDeltas", req).values) == 4 * 131
    for role, name in (("shareholder", "bank-b"), ("matcher", "matcher"), ("psp", "acme")):
        with pytest.raises(grpc.RpcError) as err:
            call(role, name, "GetSession", admin_pb2.GetSessionRequest())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Deals are deterministic (a retry gets the same values) and per caller index.
    again = call("shareholder", "bank-b", "GetRefreshDeltas", req).values
    assert again == call("shareholder", "bank-b", "GetRefreshDeltas", req).values
    assert again != call("shareholder", "bank-c", "GetRefreshDeltas", req).values
    # The check's node-to-node part: nothing before this node is prepared
    # (its contribution would reveal the challenges while deltas are still
    # being dealt), and the old protocol's per-challenge masks never.
    challenge = bytes(range(16))
    for bad in (admin_pb2.GetRefreshDeltasRequest(session_id=sid, check_challenges=[challenge]),
                admin_pb2.GetRefreshDeltasRequest(session_id=sid, check_context=bytes(32), check_count=1,
                                                  mask_threshold=2),
                admin_pb2.GetRefreshDeltasRequest(session_id=sid, mask_challenges=[challenge], mask_threshold=2)):
        with pytest.raises(grpc.RpcError) as err:
            call("shareholder", "bank-b", "GetRefreshDeltas", bad)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for node in c.nodes_list:
        c.admin.call(node.name, "AbortSession", admin_pb2.AbortSessionRequest(session_id=sid))


def test_check_catches_a_damaged_prepared_share_and_rolls_back(vault):
    c = vault
    # Prepare only (the check stops before the switch), then damage one
    # prepared share at bank-b: resealed properly, one value off by one.
    report = _refresh(c, check_only=True)
    assert report["state"] == "prepared" and report["check"]["passed"]
    sid = report["session_id"]
    node = c.nodes["bank-b"]
    ring = node.service.keys.kek
    conn = sqlite3.connect(node.cfg.db_path)
    row = conn.execute("SELECT tenant, subject, epoch, idx, kek_version, wrapped_dk, nonce, ciphertext, dimension, "
                       "mac_count FROM shares WHERE epoch = 2 ORDER BY subject LIMIT 1").fetchone()
    aad = record.record_identity(row[0], row[1], row[3], row[2])
    values = record.unpack_values(envelope.open(ring, aad, envelope.SealedShare(row[4], row[5], row[6], row[7])),
                                  row[8] + row[9])
    values[5] = (int(values[5]) + 1) % P
    sealed = envelope.seal(ring, aad, record.pack_values(values))
    conn.execute("UPDATE shares SET kek_version=?, wrapped_dk=?, nonce=?, ciphertext=? WHERE tenant=? AND subject=? "
                 "AND epoch = 2", (sealed.kek_version, sealed.wrapped_dk, sealed.nonce, sealed.ciphertext, row[0], row[1]))
    conn.commit()
    conn.close()
    with pytest.raises(MaintenanceError) as err:
        _refresh(c)  # resumes the prepared session, checks again
    assert "check failed" in err.value.message and "rolled back" in err.value.message
    for name in c.names:
        assert epochs_held(_db(c, name)) == {1: len(SUBJECTS)}
        assert prepared_rows(_db(c, name)) == 0
        assert _check_batches(c, name, masks=True) == 0
        st = c.admin.session(name, sid)
        assert admin_pb2.SessionState.Name(st.state) == "SESSION_STATE_ABORTED"
    verify_all(c.client_, c.templates, SUBJECTS[:3], c.impostor)
    assert _refresh(c)["check"]["passed"]  # a fresh session goes through


def test_deletion_during_a_refresh(vault):
    c = vault
    report = _refresh(c, check_only=True)
    assert report["state"] == "prepared"
    for name in c.names:  # prepared beside the old epoch, not served
        assert epochs_held(_db(c, name)) == {1: len(SUBJECTS), 2: len(SUBJECTS)}
        assert prepared_rows(_db(c, name)) == len(SUBJECTS)
        assert _check_batches(c, name) >= 1
    assert c.client_.verify(SUBJECTS[0], c.templates[SUBJECTS[0]]).epoch == 1
    gone = SUBJECTS[5]
    reply = c.client_.delete(gone)
    assert reply.complete
    for name in c.names:
        assert prepared_rows(_db(c, name)) == len(SUBJECTS) - 1
    final = _refresh(c)
    assert final["state"] == "finalized"
    for name in c.names:
        assert epochs_held(_db(c, name)) == {2: len(SUBJECTS) - 1}
    with pytest.raises(grpc.RpcError) as err:
        c.client_.verify(gone, c.templates[gone])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    verify_all(c.client_, c.templates, SUBJECTS[6:8], c.impostor)


def test_check_leaves_out_records_not_held_everywhere(vault, dev_pki):
    c = vault
    # A half-done enrolment: one subject only on bank-a and bank-b.
    from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc

    channel = secure_channel(c.addresses["bank-c"], dev_pki.tls("matcher", "matcher"), expect=Identity("shareholder", "bank-c"))
    shareholder_pb2_grpc.ShareholderStub(channel).DeleteShares(
        shareholder_pb2.DeleteSharesRequest(tenant="acme", subject=SUBJECTS[1], request_id="half-done",
                                            ticket=c.tenants["acme"].delete_ticket(SUBJECTS[1], "half-done")),
        timeout=10)
    channel.close()
    verify_all(c.client_, c.templates, SUBJECTS[1:3], c.impostor)  # 2 of 3 shares still verify
    # Left out of the check, its new shares would be taken on trust: rolled back
    # (tests/test_attack_refresh_unchecked.py), unless the auditor accepts it.
    with pytest.raises(MaintenanceError) as err:
        _refresh(c)
    assert "1 record(s) are not held by every node" in err.value.message and "rolled back" in err.value.message
    report = _refresh(c, allow_unchecked=True)
    assert report["check"]["passed"] and report["check"]["excluded"] == 1
    verify_all(c.client_, c.templates, SUBJECTS[2:3], c.impostor)
    # Its tags could not be renewed (BGW needs all 2k - 1 = 3 nodes' points):
    # after the refresh it fails closed until it is enrolled again.
    with pytest.raises(grpc.RpcError) as err:
        c.client_.verify(SUBJECTS[1], c.templates[SUBJECTS[1]])
    assert err.value.code() == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize("damage", ["flipped_byte", "value_outside_field"])
def test_prepare_refuses_a_damaged_old_share_and_writes_nothing_for_its_chunk(vault, damage):
    # bank-b's stored (old-epoch) share of one subject is damaged: a flipped
    # ciphertext byte (does not open), or resealed with a value outside the
    # field (opens, but is no share). Prepare reads a chunk's shares as one
    # array: the damaged one must still be named, and nothing of its chunk
    # written.
    c = vault
    node = c.nodes["bank-b"]
    conn = sqlite3.connect(node.cfg.db_path)
    row = conn.execute("SELECT tenant, subject, epoch, idx, kek_version, wrapped_dk, nonce, ciphertext, dimension, "
                       "mac_count FROM shares WHERE epoch = 1 ORDER BY subject LIMIT 1 OFFSET 3").fetchone()
    if damage == "flipped_byte":
        ciphertext = bytearray(row[7])
        ciphertext[40] ^= 0x01
        update = (row[4], row[5], row[6], bytes(ciphertext))
    else:
        ring = node.service.keys.kek
        aad = record.record_identity(row[0], row[1], row[3], row[2])
        values = np.frombuffer(envelope.open(ring, aad, envelope.SealedShare(row[4], row[5], row[6], row[7])),
                               dtype="<u4").copy()
        values[7] = P  # outside [0, P)
        update = tuple(envelope.seal(ring, aad, values.tobytes()))
    conn.execute("UPDATE shares SET kek_version=?, wrapped_dk=?, nonce=?, ciphertext=? WHERE tenant=? AND subject=? "
                 "AND epoch = 1", (*update, row[0], row[1]))
    conn.commit()
    conn.close()
    with pytest.raises(MaintenanceError) as err:
        _refresh(c)
    assert "DATA_LOSS" in err.value.message or "does not open" in err.value.message, err.value.message
    assert row[1] in err.value.message and "repair the node" in err.value.message
    assert prepared_rows(_db(c, "bank-b")) == 0
    assert _check_batches(c, "bank-b") == 0
    assert epochs_held(_db(c, "bank-b")) == {1: len(SUBJECTS)}
    _refresh(c, abort=True)
    for name in c.names:
        assert epochs_held(_db(c, name)) == {1: len(SUBJECTS)}
    verify_all(c.client_, c.templates, SUBJECTS[:3], c.impostor)


def _check_all(c, sid):
    # Every node's CheckRefresh answer to fresh challenges, asked at once.
    req = admin_pb2.CheckRefreshRequest(session_id=sid, challenges=[np.random.bytes(16) for _ in range(3)],
                                        peers=c.admin.members(c.names))
    return c.admin.each(c.names, lambda name: c.admin.call(name, "CheckRefresh", req, timeout=120))


def test_the_renewal_check_serves_one_record_set_per_mask_set(vault):
    # The tag part's masks come in RENEWAL_CHECK_SETS sets, each for ONE
    # context (the records covered): the same records again give the same
    # answers, each new record set takes the next set, and one more is refused
    # and logged (two contexts on one mask would open a combination of templates).
    from vault import epoch_mac

    c = vault
    report = _refresh(c, check_only=True)
    assert report["check"]["passed"], report
    sid = report["session_id"]
    first = _check_all(c, sid)
    second = _check_all(c, sid)
    for name in c.names:
        assert list(first[name].renewal_values) == list(second[name].renewal_values)
        assert first[name].renewal_context_sha256 == second[name].renewal_context_sha256
        assert list(first[name].values) != list(second[name].values)  # the template part: fresh challenges
    contexts = {first[c.names[0]].renewal_context_sha256}
    for subject in SUBJECTS[: epoch_mac.RENEWAL_CHECK_SETS - 1]:
        assert c.client_.delete(subject).complete
        answers = _check_all(c, sid)
        contexts.add(answers[c.names[0]].renewal_context_sha256)
        xs = {n.name: n.index for n in c.nodes_list}
        ordered = sorted(c.names, key=xs.get)
        assert epoch_mac.renewal_check([xs[n] for n in ordered], [np.asarray(answers[n].renewal_values)
                                                                  for n in ordered], 2)
    assert len(contexts) == epoch_mac.RENEWAL_CHECK_SETS
    assert c.client_.delete(SUBJECTS[10]).complete
    with pytest.raises(MaintenanceError) as err:
        _check_all(c, sid)
    assert "FAILED_PRECONDITION" in str(err.value.details) and "each mask serves one" in err.value.message
    for name in c.names:
        assert "renewal_check_refused" in audit_events(_db(c, name))
    _refresh(c, abort=True)
    verify_all(c.client_, c.templates, SUBJECTS[11:14], c.impostor)
