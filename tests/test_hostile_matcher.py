"""Hostile input on every public RPC of the Matcher, Hypothesis-driven.

One committee (three real nodes and the matcher, in-process, real mTLS on
loopback: tests/matcher_kit.py) serves the whole module. Every
request gets the EXACT status the contract gives it (``hostile_kit``'s
oracles restate docs/contracts.md and matcher.proto), its message is a
sentence (no traceback, no Python repr), and a refused request changes no
record: every node's record count and the victims' records are compared
before and after each example. Accepted requests are tracked in a model
(subject -> request id) that predicts ALREADY_EXISTS and idempotent
retries; accepted verifications are checked against the decision computed
locally from the quantised vectors, and never carry a score.

Example counts are bounded (``SETTINGS``) so the module runs in seconds.
"""
from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_kit import (
    TICKET_MUTATIONS, Snapshot, clean_details, hostile_ids, mutate_ticket, raw_call, request_id_ok, status_of,
    subject_ok, valid_request_ids, valid_subjects, varint, vector_ok, vectors,
)
from matcher.server import max_receive_bytes
from splitvault.v1 import matcher_pb2, matcher_pb2_grpc
from matcher_kit import DIM, Committee, Tenant, noisy, unit
from vault import codec
from vault.pki import Identity
from vaultrpc.tls import secure_channel

MATCHER = Identity("matcher", "matcher")

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
OK, INVALID, DENIED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
ACME = Tenant("acme")
VICTIMS = ["victim-0", "victim-1"]


class World:
    """The module's committee, the acme provider's stub and the model of what is enrolled."""

    def __init__(self, dev_pki, root):
        self.committee = Committee(dev_pki, root, tenants=[ACME, Tenant("beta")], attempts=10**6)
        self.committee.start_matcher()
        self.address = f"127.0.0.1:{self.committee.matcher.port}"
        self.channel = secure_channel(self.address, dev_pki.tls("psp", "acme"), expect=MATCHER)
        self.stub = matcher_pb2_grpc.MatcherStub(self.channel)
        rng = np.random.default_rng(5)
        self.templates = {v: unit(rng) for v in VICTIMS}
        client = self.committee.client("acme")
        self.enrolled: dict[str, str] = {}
        for v, t in self.templates.items():
            client.enroll(v, t, request_id=f"enrol-{v}")
            self.enrolled[v] = f"enrol-{v}"
        # Another tenant's subject of the same name: must never be touched.
        self.committee.client("beta").enroll("victim-0", unit(rng), request_id="beta-victim")
        self.snapshot = Snapshot(dev_pki, dict(self.committee.addresses), "acme", VICTIMS)
        self.beta_snapshot = Snapshot(dev_pki, dict(self.committee.addresses), "beta", ["victim-0"])
        self.baseline = self.snapshot.take()
        self.beta_baseline = self.beta_snapshot.take()
        self.base_records = {n: s["records"] - len(self.enrolled) - 1 for n, s in self.baseline.items()}
        self.used: dict[tuple[str, bytes], object] = {}

    def expected_records(self) -> dict[str, int]:
        return {n: base + len(self.enrolled) + 1 for n, base in self.base_records.items()}

    def check_unchanged(self) -> None:
        """Victims untouched; every node holds exactly what the model says."""
        now = self.snapshot.take()
        for name, state in now.items():
            assert state["victims"] == self.baseline[name]["victims"], name
            assert state["records"] == self.expected_records()[name], (name, state["records"])
        beta = self.beta_snapshot.take()
        assert all(beta[n]["victims"] == self.beta_baseline[n]["victims"] for n in beta)

    def expect_enrol(self, subject: str, request_id: str, template, replace: bool) -> tuple[grpc.StatusCode, bool]:
        """The contract's answer to one Enroll, and the model updated: (code, already_enrolled)."""
        if not subject_ok(subject) or not request_id_ok(request_id) or not vector_ok(template, DIM):
            return INVALID, False
        held = self.enrolled.get(subject)
        if held == request_id:
            return OK, True
        if held is not None and not replace:
            return grpc.StatusCode.ALREADY_EXISTS, False
        self.enrolled[subject] = request_id
        return OK, False

    def close(self):
        self.snapshot.close()
        self.beta_snapshot.close()
        self.channel.close()
        self.committee.close()


@pytest.fixture(scope="module")
def world(dev_pki, tmp_path_factory):
    w = World(dev_pki, tmp_path_factory.mktemp("hostile-matcher"))
    yield w
    w.close()


def assert_status(code, details, expected):
    assert code == expected, (code, details)
    assert clean_details(details), details
    if code != OK:
        assert details and len(details) < 400, details


# --- Enroll ------------------------------------------------------------------------


@SETTINGS
@given(subject=hostile_ids(valid_subjects), request_id=hostile_ids(valid_request_ids), template=vectors(DIM),
       replace=st.booleans())
def test_enroll(world, subject, request_id, template, replace):
    if subject in VICTIMS:
        replace = False
    expected, already = world.expect_enrol(subject, request_id, template, replace)
    request = matcher_pb2.EnrollRequest(subject=subject, template=template, request_id=request_id, replace=replace,
                                        ticket=ACME.enroll_ticket(subject, request_id, template, replace))
    reply = {}
    code, details = status_of(lambda: reply.setdefault("r", world.stub.Enroll(request, timeout=20)))
    assert_status(code, details, expected)
    if code == OK:
        assert reply["r"].subject == subject and reply["r"].request_id == request_id
        assert reply["r"].already_enrolled is already
    world.check_unchanged()


# --- EnrollStream and EnrollBatches -----------------------------------------------------

stream_items = st.lists(
    st.tuples(st.one_of(st.sampled_from(["s-dup", "victim-0"]), hostile_ids(valid_subjects)),
              hostile_ids(valid_request_ids), vectors(DIM), st.booleans()),
    min_size=0, max_size=6,
)


@settings(SETTINGS, max_examples=30)
@given(items=stream_items, batches=st.booleans(), split=st.integers(1, 3))
def test_enroll_stream_and_batches(world, items, batches, split):
    items = [(s, r, t, False if s in VICTIMS else rep) for s, r, t, rep in items]
    expected = [world.expect_enrol(s, r, t, rep)[0] for s, r, t, rep in items]
    reqs = [matcher_pb2.EnrollStreamRequest(subject=s, template=t, request_id=r, replace=rep,
                                            ticket=ACME.enroll_ticket(s, r, t, rep)) for s, r, t, rep in items]
    if batches:
        groups = [reqs[i:i + split] for i in range(0, len(reqs), split)]
        replies = [r for m in world.stub.EnrollBatches(iter(matcher_pb2.EnrollBatchesRequest(items=g) for g in groups),
                                                      timeout=30) for r in m.results]
    else:
        replies = list(world.stub.EnrollStream(iter(reqs), timeout=30))
    got = [grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.code)) for r in replies]
    assert got == expected, [(r.subject, r.code, r.message) for r in replies]
    for r in replies:
        assert clean_details(r.message)
    world.check_unchanged()


# --- Verify ------------------------------------------------------------------------


@SETTINGS
@given(
    who=st.one_of(st.sampled_from(VICTIMS + ["never-enrolled"]), hostile_ids(valid_subjects)),
    probe_kind=st.sampled_from(["genuine", "own_template", "random"]),
    random_probe=vectors(DIM),
    mutation=st.sampled_from(TICKET_MUTATIONS),
    seed=st.integers(0, 2**32 - 1),
)
def test_verify(world, who, probe_kind, random_probe, mutation, seed):
    rng = np.random.default_rng(seed)
    template = world.templates.get(who)
    if template is not None and probe_kind == "genuine":
        probe = noisy(template, rng).tolist()
    elif template is not None and probe_kind == "own_template":
        probe = template.tolist()
    else:
        probe = random_probe
    key = ACME.key
    if mutation == "replayed" and subject_ok(who) and vector_ok(probe, DIM):
        # A ticket the nodes have already honoured, for this very subject and probe.
        first = mutate_ticket("valid", key=key, key_id=ACME.key_id, tenant="acme", subject=who, probe=probe, used=[])
        status_of(lambda: world.stub.Verify(matcher_pb2.VerifyRequest(subject=who, probe=probe, ticket=first), timeout=20))
        used = [first]
    else:
        used = []
    t = mutate_ticket(mutation, key=key, key_id=ACME.key_id, tenant="acme", subject=who if subject_ok(who) else "x",
                      probe=np.asarray(probe, dtype=np.float32) if vector_ok(probe, DIM) else np.zeros(4, np.float32),
                      used=used)
    request = matcher_pb2.VerifyRequest(subject=who, probe=probe)
    if t is not None:
        request.ticket.CopyFrom(t)
    if not subject_ok(who) or not vector_ok(probe, DIM):
        expected = INVALID
    elif mutation != "valid":
        expected = DENIED
    elif who not in world.templates and who not in world.enrolled:
        expected = grpc.StatusCode.NOT_FOUND
    else:
        expected = OK
    if expected == OK and who not in world.templates:
        return  # enrolled by test_enroll with a template we do not keep
    reply = {}
    code, details = status_of(lambda: reply.setdefault("r", world.stub.Verify(request, timeout=20)))
    assert_status(code, details, expected)
    if code == OK:
        r = reply["r"]
        assert not r.HasField("score")                     # acme may not see scores
        score = codec.cosine(codec.encode(np.asarray(probe, np.float32), DIM), codec.encode(template, DIM))
        want = matcher_pb2.DECISION_MATCH if float(np.ravel(score)[0]) >= ACME.match_threshold else matcher_pb2.DECISION_NO_MATCH
        assert r.decision == want, (probe_kind, score)
        assert r.decision_id
    world.check_unchanged()


# --- Delete ------------------------------------------------------------------------


@SETTINGS
@given(subject=hostile_ids(valid_subjects), request_id=st.one_of(st.just(""), hostile_ids(valid_request_ids)))
def test_delete(world, subject, request_id):
    if subject in VICTIMS:
        return
    if not subject_ok(subject) or (request_id and not request_id_ok(request_id)):
        expected = INVALID
    else:
        expected = OK
        world.enrolled.pop(subject, None)
    reply = {}
    code, details = status_of(lambda: reply.setdefault(
        "r", world.stub.Delete(matcher_pb2.DeleteRequest(
            subject=subject, request_id=request_id,
            ticket=ACME.delete_ticket(subject, request_id or f"del-{uuid.uuid4().hex}")), timeout=20)))
    assert_status(code, details, expected)
    if code == OK:
        assert reply["r"].complete and [o.code for o in reply["r"].outcomes] == [0, 0, 0]
    world.check_unchanged()


# --- messages at and over the size limit, garbage on the wire ------------------------------


def test_messages_over_the_size_limit_and_huge_vectors(world, dev_pki):
    # A channel that sends what the project's own client would refuse to.
    opts = (("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20))
    ch = grpc.secure_channel(world.address, dev_pki.tls("psp", "acme").channel_credentials(), options=opts)
    try:
        # The public port takes messages up to its largest legitimate request
        # (matcher.server.max_receive_bytes), not 64 MiB.
        limit = max_receive_bytes(DIM)
        for size, expected in ((limit - (64 << 10), INVALID), (limit + (1 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),
                               (65 << 20, grpc.StatusCode.RESOURCE_EXHAUSTED)):
            floats = np.ones(size // 4, dtype="<f4").tobytes()
            message = b"\x0a\x05alice" + b"\x12" + varint(len(floats)) + floats + b"\x1a\x02r1"
            started = time.perf_counter()
            code, details = status_of(lambda m=message: raw_call(ch, "/splitvault.v1.Matcher/Enroll", m))
            assert code == expected, (size, code, details)
            assert clean_details(details)
            # Refused on its length before any conversion (matcher.vectors.checked).
            assert time.perf_counter() - started < 5
        del floats, message
    finally:
        ch.close()
    world.check_unchanged()


@pytest.mark.parametrize("method, kind", [
    ("Enroll", "unary"), ("Verify", "unary"), ("Delete", "unary"),
    ("EnrollStream", "stream_stream"), ("EnrollBatches", "stream_stream"),
])
def test_unparseable_bytes_are_invalid_argument(world, method, kind):
    for payload in (b"\xff\xff\xff\xff", b"\x0a\x80", b"\x12\x05abc"):
        code, details = status_of(lambda: raw_call(world.channel, f"/splitvault.v1.Matcher/{method}", payload, stream=kind))
        assert code == INVALID, (method, payload, code, details)
        assert clean_details(details)
    world.check_unchanged()


def test_unknown_tenant_is_refused_on_every_method(world, dev_pki):
    with secure_channel(world.address, dev_pki.tls("psp", "ghost"), expect=MATCHER) as ch:
        stub = matcher_pb2_grpc.MatcherStub(ch)
        t = mutate_ticket("valid", key=ACME.key, key_id=ACME.key_id, tenant="acme", subject="victim-0",
                          probe=world.templates["victim-0"], used=[])
        calls = {
            "Enroll": lambda: stub.Enroll(matcher_pb2.EnrollRequest(subject="victim-0", template=[1.0] * DIM,
                                                                    request_id="r", replace=True), timeout=10),
            "Verify": lambda: stub.Verify(matcher_pb2.VerifyRequest(
                subject="victim-0", probe=world.templates["victim-0"].tolist(), ticket=t), timeout=10),
            "Delete": lambda: stub.Delete(matcher_pb2.DeleteRequest(subject="victim-0"), timeout=10),
            "EnrollStream": lambda: list(stub.EnrollStream(iter([matcher_pb2.EnrollStreamRequest(
                subject="victim-0", template=[1.0] * DIM, request_id="r", replace=True)]), timeout=10)),
            "EnrollBatches": lambda: list(stub.EnrollBatches(iter([matcher_pb2.EnrollBatchesRequest(
                items=[matcher_pb2.EnrollStreamRequest(subject="victim-0", template=[1.0] * DIM, request_id="r",
                                                       replace=True)])]), timeout=10)),
        }
        for method, call in calls.items():
            code, details = status_of(call)
            assert code == DENIED and clean_details(details), (method, code, details)
    world.check_unchanged()
