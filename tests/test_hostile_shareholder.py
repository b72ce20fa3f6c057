"""Hostile input on the Shareholder RPCs, called with the MATCHER's
certificate (the one role that can store and release): what a compromised
or buggy matcher could send. Hypothesis-driven, one node for the module
(node_kit.NodeHarness, real mTLS on loopback).

Each request gets the exact status the node's contract gives it, never a
traceback or repr, and never a changed record: the node's record count and
the victims' stored rows (sealed bytes included) are compared after every
example. Every release attempt, granted or refused, is one audit entry; a
granted one returns exactly the stored share.
"""
from __future__ import annotations

import sqlite3

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_kit import (
    TICKET_MUTATIONS, clean_details, hostile_ids, mutate_ticket, raw_call, status_of, subject_ok, valid_request_ids,
    valid_subjects, varint,
)
from node_kit import NodeHarness, Provider, sample_records
from splitvault.v1 import shareholder_pb2 as pb
from vault.field import P

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
OK, INVALID, DENIED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
ACME = Provider.new("acme")
VICTIMS = ["victim-0", "victim-1"]


def name_ok(s: str) -> bool:
    """A node's tenant or subject: the one identifier rule, as at the matcher (vault.names)."""
    return subject_ok(s)


class Node:
    def __init__(self, folder, dev_pki):
        self.h = NodeHarness(folder, dev_pki.files, [ACME], attempts_per_subject=10**6)
        self.h.start()
        self.stub = self.h.stub("matcher", "matcher")
        self.auditor = self.h.stub("auditor", "auditor")
        self.victims = {r.subject: r for r in sample_records("acme", VICTIMS, index=1, dimension=16)}
        self.stub.StoreShares(ACME.store_request(list(self.victims.values())), timeout=10)
        self.baseline = self.rows()

    def rows(self):
        conn = sqlite3.connect(f"file:{self.h.db_path}?mode=ro", uri=True)
        try:
            count = conn.execute("SELECT COUNT(*) FROM shares").fetchone()[0]
            victims = conn.execute(
                "SELECT subject, epoch, request_id, wrapped_dk, nonce, ciphertext FROM shares WHERE tenant = 'acme' "
                "AND subject IN ('victim-0', 'victim-1') ORDER BY subject").fetchall()
        finally:
            conn.close()
        return count, victims

    def head(self) -> int:
        return self.auditor.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10).audit_head_seq

    def check_unchanged(self):
        assert self.rows() == self.baseline


@pytest.fixture(scope="module")
def node(dev_pki, tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("hostile-node") / "bank-a", dev_pki)
    yield n
    n.h.stop()


def assert_status(code, details, expected):
    assert code == expected, (code, details)
    assert clean_details(details), details


# --- StoreShares: malformed records ---------------------------------------------------

MUTATIONS = {
    "index 0": lambda r: setattr(r, "index", 0),
    "another node's index": lambda r: setattr(r, "index", 2),
    "index beyond n": lambda r: setattr(r, "index", 9),
    "threshold 1": lambda r: setattr(r, "threshold", 1),
    "threshold above n": lambda r: setattr(r, "threshold", 4),
    "n above 255": lambda r: setattr(r, "shareholders", 300),
    "dimension 0": lambda r: setattr(r, "dimension", 0),
    "dimension disagrees with values": lambda r: setattr(r, "dimension", r.dimension + 1),
    "mac count 0": lambda r: setattr(r, "mac_count", 0),
    "codec version 0": lambda r: setattr(r, "codec_version", 0),
    "codec version 99": lambda r: setattr(r, "codec_version", 99),
    "values cut short": lambda r: setattr(r, "values", r.values[:-3]),
    "values empty": lambda r: setattr(r, "values", b""),
    "value = p": lambda r: setattr(r, "values", int(P).to_bytes(4, "little") + r.values[4:]),
    "value = 2^32-1": lambda r: setattr(r, "values", b"\xff\xff\xff\xff" + r.values[4:]),
    "epoch 2^63": lambda r: setattr(r, "epoch", 2**63),
    "epoch 2^64-1": lambda r: setattr(r, "epoch", 2**64 - 1),
    "no request id": lambda r: setattr(r, "request_id", ""),
    "request id not ascii": lambda r: setattr(r, "request_id", "enrôle"),
    "request id too long": lambda r: setattr(r, "request_id", "r" * 129),
    "empty subject": lambda r: setattr(r, "subject", ""),
    "subject with NUL": lambda r: setattr(r, "subject", "a\x00b"),
    "subject over 128 bytes": lambda r: setattr(r, "subject", "漢" * 43),
    "empty tenant": lambda r: setattr(r, "tenant", ""),
}


@SETTINGS
@given(mutations=st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3, unique=True),
       subject=st.sampled_from(VICTIMS + ["new-subject"]), replace=st.booleans(), batch=st.integers(0, 2),
       streamed=st.booleans())
def test_store_malformed_records(node, mutations, subject, replace, batch, streamed):
    good = sample_records("acme", [f"ok-{i}" for i in range(batch)], index=1, dimension=16)
    [bad] = sample_records("acme", [subject], index=1, dimension=16)
    for m in mutations:
        MUTATIONS[m](bad)
    records = good + [bad]   # one bad record: the whole request (or batch) is refused
    if streamed:
        call = lambda: node.stub.StoreShareStream(iter([ACME.stream_request(records, replace=replace)]),  # noqa: E731
                                                  timeout=10)
    else:
        call = lambda: node.stub.StoreShares(ACME.store_request(records, replace=replace), timeout=10)  # noqa: E731
    code, details = status_of(call)
    assert_status(code, details, INVALID)
    node.check_unchanged()


def test_store_empty_and_duplicate_batches(node):
    assert status_of(lambda: node.stub.StoreShares(pb.StoreSharesRequest(), timeout=10))[0] == INVALID
    recs = sample_records("acme", ["dup", "dup"], index=1, dimension=16)
    assert status_of(lambda: node.stub.StoreShares(ACME.store_request(recs), timeout=10))[0] == INVALID
    node.check_unchanged()


def test_store_over_the_size_limit(node, dev_pki):
    opts = (("grpc.max_send_message_length", 256 << 20),)
    ch = grpc.secure_channel(node.h.running.address, dev_pki.tls("matcher", "matcher").channel_credentials(), options=opts)
    try:
        values = b"\x01\x00\x00\x00" * ((65 << 20) // 4)
        record = b"\x52" + varint(len(values)) + values                      # ShareRecord.values (field 10)
        message = b"\x0a" + varint(len(record)) + record                      # StoreSharesRequest.records
        code, details = status_of(lambda: raw_call(ch, "/splitvault.v1.Shareholder/StoreShares", message))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and clean_details(details)
    finally:
        ch.close()
    node.check_unchanged()


# --- StoreShares / DeleteShares / DescribeRecords: names ---------------------------------


@SETTINGS
@given(tenant=st.one_of(st.just("acme"), hostile_ids(st.just("other-tenant"))),
       subject=hostile_ids(valid_subjects), request_id=hostile_ids(valid_request_ids))
def test_names_on_store_describe_delete(node, tenant, subject, request_id):
    if subject in VICTIMS:
        return
    names_ok = name_ok(tenant) and name_ok(subject)
    rid_ok = bool(request_id) and len(request_id) <= 128 and request_id.isascii() and request_id.isprintable()
    code, details = status_of(lambda: node.auditor.DescribeRecords(
        pb.DescribeRecordsRequest(tenant=tenant, subject=subject), timeout=10))
    assert_status(code, details, OK if names_ok else INVALID)
    [rec] = sample_records("acme", ["placeholder"], index=1, dimension=16)
    rec.tenant, rec.subject, rec.request_id = tenant, subject, request_id
    # Well-formed names of a tenant not registered here: its tickets cannot verify.
    expected = INVALID if not (names_ok and rid_ok) else OK if tenant == "acme" else grpc.StatusCode.PERMISSION_DENIED
    code, details = status_of(lambda: node.stub.StoreShares(ACME.store_request([rec], replace=True), timeout=10))
    assert_status(code, details, expected)
    code, details = status_of(lambda: node.stub.DeleteShares(
        ACME.delete_request(subject, request_id, tenant=tenant), timeout=10))
    assert_status(code, details, expected)
    node.check_unchanged()


# --- ReleaseShare: hostile tickets -----------------------------------------------------

# At a node (which never sees the probe): the probe digest is not checked
# here, a ticket for another subject is a valid ticket for a subject it
# does not hold, and the other tenant is not registered at this node.
NODE_EXPECT = {"valid": OK, "other_probe": OK, "other_subject": grpc.StatusCode.NOT_FOUND}


@SETTINGS
@given(mutation=st.sampled_from(TICKET_MUTATIONS), victim=st.sampled_from(VICTIMS))
def test_release_with_hostile_tickets(node, mutation, victim):
    used = []
    if mutation == "replayed":
        used = [mutate_ticket("valid", key=ACME.key, key_id=ACME.key_id, tenant="acme", subject=victim,
                              probe=np.zeros(4, np.float32), used=[])]
        node.stub.ReleaseShare(pb.ReleaseShareRequest(ticket=used[0]), timeout=10)
    t = mutate_ticket(mutation, key=ACME.key, key_id=ACME.key_id, tenant="acme", subject=victim,
                      probe=np.zeros(4, np.float32), used=used)
    request = pb.ReleaseShareRequest() if t is None else pb.ReleaseShareRequest(ticket=t)
    before = node.head()
    reply = {}
    code, details = status_of(lambda: reply.setdefault("r", node.stub.ReleaseShare(request, timeout=10)))
    assert_status(code, details, NODE_EXPECT.get(mutation, DENIED))
    if code == OK:
        [share] = reply["r"].shares
        assert share.values == node.victims[victim].values and share.subject == victim   # exactly the stored share
    assert node.head() == before + 1          # every attempt, granted or refused, is one audit entry
    node.check_unchanged()


def test_read_audit_log_beyond_its_end(node):
    items = list(node.auditor.ReadAuditLog(pb.ReadAuditLogRequest(from_seq=2**63), timeout=10))
    assert items == []
