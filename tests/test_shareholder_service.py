"""The Shareholder service over a real in-process server with real mTLS:
roles, store semantics, the ticket checks on release, the attempt limit,
tenant isolation and bulk streaming."""
from __future__ import annotations

import json

import grpc
import pytest

from node_kit import CLUSTER_ID, NodeHarness, Provider, sample_records
from splitvault.v1 import common_pb2
from splitvault.v1 import shareholder_pb2 as pb
from vault import audit
from vaultrpc import wire

ACME = Provider.new("acme")
GLOBEX = Provider.new("globex")
# Registered nowhere: its tickets name a tenant the node does not know.
STRANGER = Provider.new("stranger")


@pytest.fixture()
def node(tmp_path, dev_pki):
    harness = NodeHarness(tmp_path / "bank-a", dev_pki.files, [ACME, GLOBEX], attempts_per_subject=3)
    harness.start()
    yield harness
    harness.stop()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=10, **kwargs)
    return err.value.code()


def store(node, tenant="acme", subjects=("alice",), **kw):
    recs = sample_records(tenant, list(subjects), index=1, **kw)
    node.stub("matcher").StoreShares({"acme": ACME, "globex": GLOBEX}[tenant].store_request(recs), timeout=10)
    return recs


def release(node, t, role="matcher", timeout=10):
    return node.stub(role).ReleaseShare(pb.ReleaseShareRequest(ticket=t), timeout=timeout)


def audit_entries(node):
    out = list(node.stub("auditor").ReadAuditLog(pb.ReadAuditLogRequest(from_seq=1), timeout=10))
    return [i.entry for i in out if i.HasField("entry")], [i.checkpoint for i in out if i.HasField("checkpoint")]


# --- roles --------------------------------------------------------------------------

CALLS = {
    "StoreShares": lambda s: s.StoreShares(ACME.store_request(sample_records("acme", ["r"], index=1)), timeout=10),
    "StoreShareStream": lambda s: s.StoreShareStream(
        iter([ACME.stream_request(sample_records("acme", ["rs"], index=1))]), timeout=10),
    "ReleaseShare": lambda s: s.ReleaseShare(pb.ReleaseShareRequest(ticket=ACME.ticket("alice")), timeout=10),
    "DeleteShares": lambda s: s.DeleteShares(ACME.delete_request("zz", "d1"), timeout=10),
    "DescribeRecords": lambda s: s.DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject="alice"), timeout=10),
    "GetNodeInfo": lambda s: s.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10),
    "ReadAuditLog": lambda s: list(s.ReadAuditLog(pb.ReadAuditLogRequest(), timeout=10)),
}
ALLOWED = {
    "StoreShares": {"matcher"},
    "StoreShareStream": {"matcher"},
    "ReleaseShare": {"matcher"},
    "DeleteShares": {"matcher"},
    "DescribeRecords": {"matcher", "auditor"},
    "GetNodeInfo": {"matcher", "auditor", "shareholder"},  # not a provider: node internals
    "ReadAuditLog": {"auditor"},
}


def test_each_role_may_call_only_its_methods(node):
    store(node)
    for role in ("matcher", "auditor", "psp", "shareholder"):
        stub = node.stub(role, "x1")
        for method, call in CALLS.items():
            if role in ALLOWED[method]:
                call(stub)  # succeeds
            else:
                with pytest.raises(grpc.RpcError) as err:
                    call(stub)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, method)


# --- store ---------------------------------------------------------------------------


def test_store_then_describe_and_node_info(node):
    recs = store(node, subjects=("alice", "bob"))
    infos = node.stub("auditor").DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject="alice"), timeout=10)
    [info] = infos.records
    assert (info.subject, info.index, info.epoch, info.kek_version, info.request_id) == ("alice", 1, 1, 1, recs[0].request_id)
    ni = node.stub("auditor").GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    assert (ni.name, ni.index, ni.epoch, ni.kek_version, ni.records) == ("bank-a", 1, 1, 1, 2)
    assert ni.audit_public_key == node.audit_public_key()
    assert ni.audit_head_seq >= 3  # start + two stores


def test_store_is_idempotent_per_request_id_and_refuses_others(node):
    s = node.stub("matcher")
    first = sample_records("acme", ["alice"], index=1, request_id="enrol-1")
    assert s.StoreShares(ACME.store_request(first), timeout=10).stored == 1
    # The matcher re-splits on retry: same request id, new values, overwritten.
    retry = sample_records("acme", ["alice"], index=1, request_id="enrol-1")
    r = s.StoreShares(ACME.store_request(retry), timeout=10)
    assert (r.stored, r.already_stored) == (1, 1)
    assert release(node, ACME.ticket("alice")).shares[0].values == retry[0].values
    other = sample_records("acme", ["alice"], index=1, request_id="enrol-2")
    assert code_of(s.StoreShares, ACME.store_request(other)) == grpc.StatusCode.ALREADY_EXISTS
    r = s.StoreShares(ACME.store_request(other, replace=True), timeout=10)
    assert (r.stored, r.already_stored) == (1, 0)
    assert release(node, ACME.ticket("alice")).shares[0].values == other[0].values


def test_store_batch_is_all_or_nothing(node):
    store(node, subjects=("carol",))
    s = node.stub("matcher")
    batch = sample_records("acme", ["dave", "erin", "carol"], index=1, request_id="batch-2")
    assert code_of(s.StoreShares, ACME.store_request(batch)) == grpc.StatusCode.ALREADY_EXISTS
    for subject in ("dave", "erin"):
        assert not s.DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject=subject), timeout=10).records


@pytest.mark.parametrize("mutate", [
    lambda r: setattr(r, "index", 2),                     # another node's share
    lambda r: setattr(r, "values", r.values[:-4]),        # wrong length
    lambda r: setattr(r, "values", b"\xff" * len(r.values)),  # outside the field
    lambda r: setattr(r, "mac_count", 4),                 # the old record format (AMD, L = 4)
    lambda r: setattr(r, "threshold", 9),
    lambda r: setattr(r, "subject", ""),
    lambda r: setattr(r, "request_id", ""),
    lambda r: setattr(r, "request_id", "x" * 129),
    lambda r: setattr(r, "epoch", 2**63),
])
def test_store_validates_records(node, mutate):
    [rec] = sample_records("acme", ["frank"], index=1)
    mutate(rec)
    code = code_of(node.stub("matcher").StoreShares, ACME.store_request([rec]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_store_refuses_empty_and_duplicate_batches(node):
    s = node.stub("matcher")
    assert code_of(s.StoreShares, pb.StoreSharesRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    recs = sample_records("acme", ["gina"], index=1) * 2
    assert code_of(s.StoreShares, ACME.store_request(recs)) == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_store_beyond_one_message_limit(node):
    # ~5.6 MB in total, more than gRPC's default 4 MiB for one message, in 200-record messages.
    recs = sample_records("globex", [f"g{i}" for i in range(2700)], index=1, dimension=512)
    msgs = [GLOBEX.stream_request(recs[i:i + 200]) for i in range(0, len(recs), 200)]
    assert sum(m.ByteSize() for m in msgs) > 4 * 1024 * 1024
    reply = node.stub("matcher").StoreShareStream(iter(msgs), timeout=60)
    assert (reply.stored, reply.already_stored) == (2700, 0)
    got = release(node, GLOBEX.ticket("g2699"))
    assert got.shares[0].values == recs[-1].values
    # Idempotent retry of the whole stream (the provider signs a retry afresh: a used write ticket is spent).
    msgs = [GLOBEX.stream_request(recs[i:i + 200]) for i in range(0, len(recs), 200)]
    reply = node.stub("matcher").StoreShareStream(iter(msgs), timeout=60)
    assert (reply.stored, reply.already_stored) == (2700, 2700)
    entries, _ = audit_entries(node)
    batches = [e for e in entries if e.event == "store_batch"]
    assert len(batches) == 6  # 1000 + 1000 + 700, twice
    assert json.loads(batches[0].details_json)["records"] == 1000


def test_stream_store_stops_at_a_bad_batch_and_keeps_earlier_ones(node):
    good = sample_records("acme", [f"s{i}" for i in range(1000)], index=1)
    bad = sample_records("acme", ["t1"], index=1)
    bad[0].index = 3
    msgs = [ACME.stream_request(good), ACME.stream_request(bad)]
    with pytest.raises(grpc.RpcError) as err:
        node.stub("matcher").StoreShareStream(iter(msgs), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1000 records were stored" in err.value.details()
    assert node.stub("matcher").GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10).records == 1000


def test_delete_erases_every_epoch(node):
    s = node.stub("matcher")
    store(node, subjects=("hana",))
    assert s.DeleteShares(ACME.delete_request("hana", "del-1"), timeout=10).deleted == 1
    assert s.DeleteShares(ACME.delete_request("hana", "del-2"), timeout=10).deleted == 0
    assert code_of(release, node, ACME.ticket("hana")) == grpc.StatusCode.NOT_FOUND
    assert code_of(s.DeleteShares, pb.DeleteSharesRequest(tenant="acme", subject="hana")) == grpc.StatusCode.INVALID_ARGUMENT


# --- release ------------------------------------------------------------------------------


def test_release_returns_the_stored_share_and_logs_it(node):
    [rec] = store(node)
    t = ACME.ticket("alice", "verify-1")
    reply = release(node, t)
    assert [r.values for r in reply.shares] == [rec.values]
    assert reply.shares[0].request_id == rec.request_id and reply.shares[0].index == 1
    entries, _ = audit_entries(node)
    entry = next(e for e in entries if e.seq == reply.audit_seq)
    assert (entry.event, entry.actor, entry.tenant, entry.subject, entry.request_id) == (
        "release", "matcher/t1", "acme", "alice", "verify-1")
    assert rec.values.hex() not in entry.details_json


def test_release_without_a_ticket_is_refused(node):
    store(node)
    assert code_of(node.stub("matcher").ReleaseShare, pb.ReleaseShareRequest()) == grpc.StatusCode.PERMISSION_DENIED
    garbage = common_pb2.VerificationTicket(body=b"\xff\xff\xff", signature=b"x" * 64, key_id="acme-1")
    assert code_of(release, node, garbage) == grpc.StatusCode.PERMISSION_DENIED


def test_expired_ticket_is_refused(node):
    store(node)
    t = ACME.ticket("alice", issued_at_ms=audit_now() - 120_000, ttl_ms=60_000)
    assert code_of(release, node, t) == grpc.StatusCode.PERMISSION_DENIED


def test_replayed_ticket_is_refused(node):
    store(node)
    t = ACME.ticket("alice")
    release(node, t)
    with pytest.raises(grpc.RpcError) as err:
        release(node, t)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "already used" in err.value.details()


def test_forged_ticket_is_refused(node):
    store(node)
    t = ACME.ticket("alice")
    t.signature = bytes(64)
    assert code_of(release, node, t) == grpc.StatusCode.PERMISSION_DENIED
    # Signed by a key that is not acme's, under acme's key id.
    forged = Provider("acme", "acme-1", GLOBEX.key, GLOBEX.public).ticket("alice")
    assert code_of(release, node, forged) == grpc.StatusCode.PERMISSION_DENIED
    # An edited body under a valid signature.
    t = ACME.ticket("alice")
    body = common_pb2.TicketBody.FromString(t.body)
    body.subject = "bob"
    t.body = body.SerializeToString()
    assert code_of(release, node, t) == grpc.StatusCode.PERMISSION_DENIED


def test_wrong_and_unknown_tenant_tickets_are_refused(node):
    store(node, tenant="acme", subjects=("alice",))
    # globex signs a ticket naming acme's subject: not acme's key.
    wrong = Provider("globex", "globex-1", GLOBEX.key, GLOBEX.public).ticket("alice", tenant="acme")
    assert code_of(release, node, wrong) == grpc.StatusCode.PERMISSION_DENIED
    # A tenant the node does not know at all.
    assert code_of(release, node, STRANGER.ticket("alice")) == grpc.StatusCode.PERMISSION_DENIED
    # globex's own valid ticket does not reach acme's alice: tenants are apart.
    assert code_of(release, node, GLOBEX.ticket("alice")) == grpc.StatusCode.NOT_FOUND
    entries, _ = audit_entries(node)
    reasons = [json.loads(e.details_json)["reason"] for e in entries if e.event == "deny"]
    assert reasons == ["invalid_ticket", "unknown_tenant", "not_found"]


def test_attempt_limit_per_subject(node):
    store(node, subjects=("alice", "bob"))
    for _ in range(3):
        release(node, ACME.ticket("alice"))
    with pytest.raises(grpc.RpcError) as err:
        release(node, ACME.ticket("alice"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Another subject is unaffected.
    release(node, ACME.ticket("bob"))
    entries, _ = audit_entries(node)
    assert json.loads(entries[-2].details_json)["reason"] == "rate_limited"


def test_refused_attempts_with_a_valid_signature_count(node):
    # No record: NOT_FOUND, but each attempt counts toward the limit.
    for _ in range(3):
        assert code_of(release, node, ACME.ticket("nobody")) == grpc.StatusCode.NOT_FOUND
    assert code_of(release, node, ACME.ticket("nobody")) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_release_and_denial_is_audited_and_the_chain_verifies(node):
    store(node)
    release(node, ACME.ticket("alice"))
    code_of(release, node, STRANGER.ticket("alice"))
    node.stop()
    node.start()
    entries, cps = audit_entries(node)
    events = [e.event for e in entries]
    assert events[:6] == ["start", "store", "release", "deny", "stop", "start"]
    assert cps and cps[-1].seq == 5  # signed on shutdown
    report = audit.verify_chain(entries, cps, node.audit_public_key(), node="bank-a")
    assert report.ok, report.reason
    assert all(e.actor for e in entries)


def test_read_audit_log_from_a_later_seq(node):
    store(node, subjects=("a1", "a2", "a3"))
    items = list(node.stub("auditor").ReadAuditLog(pb.ReadAuditLogRequest(from_seq=3), timeout=10))
    seqs = [i.entry.seq for i in items if i.HasField("entry")]
    assert seqs[0] == 3 and seqs == sorted(seqs)


def audit_now() -> int:
    from vault.ticket import now_ms

    return now_ms()


# --- batch tickets at the node ---------------------------------------------------------


def _batch_for(records, provider=ACME, op=None):
    from vault import ticket
    return wire.issue_batch(provider.key, provider.key_id, tenant=provider.tenant, audience=CLUSTER_ID,
                            batch_id="b-1", operation=op or ticket.ENROLL,
                            items=[(r.subject, r.request_id, [0.0] * 4) for r in records])


def test_a_stream_store_under_a_batch_ticket(node):
    recs = sample_records("acme", [f"bk{i}" for i in range(10)], index=1)
    batch = _batch_for(recs)
    s = node.stub("matcher")
    reply = s.StoreShareStream(iter([pb.StoreShareStreamRequest(records=recs, batches=[batch])]), timeout=10)
    assert reply.stored == 10
    entries, _ = audit_entries(node)
    [entry] = [e for e in entries if e.event == "store_batch"]
    details = json.loads(entry.details_json)
    assert details["tickets"] == 10 and details["batch_tickets"] == 1
    assert details["batch_ticket_0"][0] == ACME.key_id and "batch_ticket_1" not in details
    # The same batch items again: each is honoured once (a retry is signed afresh).
    again = sample_records("acme", [f"bk{i}" for i in range(10)], index=1)
    assert code_of(s.StoreShareStream, iter([pb.StoreShareStreamRequest(records=again, batches=[batch])])) \
        == grpc.StatusCode.PERMISSION_DENIED
    # A record that is not an item of the batch, and items edited after signing, are refused.
    other = sample_records("acme", ["not-in-batch"], index=1)
    assert code_of(s.StoreShares, pb.StoreSharesRequest(records=other, batches=[_batch_for(recs[:1])])) \
        == grpc.StatusCode.PERMISSION_DENIED
    edited = _batch_for(other)
    edited.items[0].subject = "someone-else"
    assert code_of(s.StoreShares, pb.StoreSharesRequest(records=other, batches=[edited])) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert not s.DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject="not-in-batch"), timeout=10).records
    reasons = [json.loads(e.details_json).get("reason") for e in audit_entries(node)[0] if e.event == "deny"]
    assert reasons == ["replayed", "missing_ticket", "ticket_mismatch"]
    # The batch undoes its own item (the matcher's clean-up), and that item can no longer be stored.
    undo = pb.DeleteSharesRequest(tenant="acme", subject="bk3", request_id=recs[3].request_id, batch=batch)
    assert s.DeleteShares(undo, timeout=10).deleted == 1
    assert code_of(s.DeleteShares, undo) == grpc.StatusCode.PERMISSION_DENIED  # once


def test_a_used_write_ticket_stays_used_across_a_restart(node):
    # The replay set is rebuilt from the audit log: a DELETE ticket honoured
    # before a restart cannot erase a re-enrolment after it.
    s = node.stub("matcher")
    store(node, subjects=("kim",))
    erase = ACME.delete_request("kim", "erase-kim")
    assert s.DeleteShares(erase, timeout=10).deleted == 1
    node.stop()
    node.start()
    s = node.stub("matcher")
    store(node, subjects=("kim",))
    assert code_of(s.DeleteShares, erase) == grpc.StatusCode.PERMISSION_DENIED
    assert s.DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject="kim"), timeout=10).records


def test_used_batch_items_stay_used_across_a_restart(node):
    # A bulk store's audit entry names its batch tickets, not each item; the
    # node keeps the items it honoured until their tickets expire, so after a
    # restart a matcher holding the batch cannot store them again (as a
    # "retry" overwriting the shares) within the ticket's lifetime.
    s = node.stub("matcher")
    recs = sample_records("acme", [f"rb{i:03d}" for i in range(300)], index=1)
    batch = _batch_for(recs)
    assert s.StoreShareStream(iter([pb.StoreShareStreamRequest(records=recs, batches=[batch])]), timeout=30).stored == 300
    node.stop()
    node.start()
    s = node.stub("matcher")
    again = sample_records("acme", [f"rb{i:03d}" for i in range(300)], index=1)
    for req in (pb.StoreShareStreamRequest(records=again, batches=[batch]),
                pb.StoreShareStreamRequest(records=again[200:201], batches=[batch])):
        assert code_of(s.StoreShareStream, iter([req])) == grpc.StatusCode.PERMISSION_DENIED
    stored = s.DescribeRecords(pb.DescribeRecordsRequest(tenant="acme", subject="rb200"), timeout=10).records
    assert [r.request_id for r in stored] == [recs[200].request_id]
    reasons = [json.loads(e.details_json).get("reason") for e in audit_entries(node)[0] if e.event == "deny"]
    assert reasons[-2:] == ["replayed", "replayed"], reasons


def test_a_record_for_another_epoch_than_the_nodes_is_refused_and_logged(node):
    # New records go to this node's current epoch only (tests/test_attack_epoch.py:
    # one node reporting a later epoch must not make the others store rows they
    # never serve).
    recs = sample_records("acme", ["later"], index=1, epoch=99)
    assert code_of(node.stub("matcher").StoreShares, ACME.store_request(recs)) == grpc.StatusCode.FAILED_PRECONDITION
    entries, _ = audit_entries(node)
    denied = [json.loads(e.details_json) for e in entries if e.event == "deny"]
    assert any(d.get("reason") == "wrong_epoch" and d.get("epoch") == 99 for d in denied), denied
    assert node.stub("matcher").DescribeRecords(
        pb.DescribeRecordsRequest(tenant="acme", subject="later"), timeout=10).records == []
