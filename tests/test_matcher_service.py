"""The matcher over real gRPC and mutual TLS, with real shareholder nodes
in-process (tests/matcher_kit.py): decisions, idempotency,
fail-closed behaviour, corrupt shareholders, tickets, roles and tenants."""
from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from node_kit import CLUSTER_ID
from splitvault.v1 import matcher_pb2, matcher_pb2_grpc, shareholder_pb2, shareholder_pb2_grpc
from matcher_kit import DIM, Committee, Tenant, noisy, unit
from vault import ticket
from vault.pki import Identity
from vaultrpc import wire
from vaultrpc.tls import secure_channel

MATCHER = Identity("matcher", "matcher")


@pytest.fixture(scope="module")
def shared(dev_pki, tmp_path_factory):
    """One committee for the tests that leave every node running."""
    c = Committee(
        dev_pki, tmp_path_factory.mktemp("shared"),
        tenants=[Tenant("acme"), Tenant("beta", score_allowed=True), Tenant("gamma")],
    )
    c.start_matcher()
    yield c
    c.close()


def records_at(c: Committee, tenant: str, subject: str) -> dict[str, int]:
    """How many records each real node holds for the subject (read as the matcher would)."""
    out = {}
    for name, node in c.nodes.items():
        with secure_channel(node.address, c.pki.tls("auditor", "auditor"), expect=Identity("shareholder", name)) as ch:
            stub = shareholder_pb2_grpc.ShareholderStub(ch)
            reply = stub.DescribeRecords(shareholder_pb2.DescribeRecordsRequest(tenant=tenant, subject=subject), timeout=5)
        out[name] = len(reply.records)
    return out


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def suspects(node: str) -> float:
    return REGISTRY.get_sample_value("splitvault_matcher_share_suspects_total", {"node": node}) or 0.0


# --- decisions --------------------------------------------------------------------


def decisions(label: str) -> float:
    return REGISTRY.get_sample_value("splitvault_matcher_verifications_total", {"decision": label}) or 0.0


def test_genuine_probe_matches_and_impostor_does_not(shared, rng):
    before = decisions("MATCH"), decisions("NO_MATCH")
    client = shared.client()
    template = unit(rng)
    reply = client.enroll("alice", template)
    assert not reply.already_enrolled and reply.epoch >= 0
    result = client.verify("alice", noisy(template, rng))
    assert result.decision == "MATCH" and result.score is None and len(result.decision_id) == 36
    assert client.verify("alice", unit(rng)).decision == "NO_MATCH"
    # Every decision has its own id.
    assert client.verify("alice", noisy(template, rng)).decision_id != result.decision_id
    assert (decisions("MATCH"), decisions("NO_MATCH")) == (before[0] + 2, before[1] + 1)


def test_score_only_for_a_score_allowed_tenant(shared, rng):
    template = unit(rng)
    for tenant, expect_score in (("acme", False), ("beta", True)):
        client = shared.client(tenant)
        client.enroll("scored", template)
        result = client.verify("scored", noisy(template, rng))
        assert result.decision == "MATCH"
        assert (result.score is not None) == expect_score
    assert 0.9 < result.score <= 1.0


def test_enrol_is_idempotent_per_request_id(shared, rng):
    client = shared.client()
    template = unit(rng)
    first = client.enroll("idem", template, request_id="req-idem-1")
    again = client.enroll("idem", template, request_id="req-idem-1")
    assert again.already_enrolled and again.epoch == first.epoch
    assert client.verify("idem", noisy(template, rng)).decision == "MATCH"


def test_duplicate_subject_needs_replace(shared, rng):
    client = shared.client()
    old, new = unit(rng), unit(rng)
    client.enroll("dup", old)
    err = pytest.raises(grpc.RpcError, client.enroll, "dup", new).value
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "replace" in err.details()
    assert client.verify("dup", noisy(old, rng)).decision == "MATCH"
    client.enroll("dup", new, replace=True)
    assert client.verify("dup", noisy(new, rng)).decision == "MATCH"
    assert client.verify("dup", noisy(old, rng)).decision == "NO_MATCH"
    assert records_at(shared, "acme", "dup") == {name: 1 for name in shared.names}


@pytest.mark.parametrize(
    "subject, template, words",
    [
        ("ok", np.ones(DIM - 1), "exactly"),
        ("ok", np.full(DIM, np.nan), "non-finite"),
        ("ok", np.zeros(DIM), "zero"),
        ("", np.ones(DIM), "subject"),
        ("x" * 129, np.ones(DIM), "subject"),
        ("bad\nname", np.ones(DIM), "subject"),
    ],
)
def test_invalid_enrolment_is_invalid_argument(shared, subject, template, words):
    err = pytest.raises(grpc.RpcError, shared.client().enroll, subject, template).value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details()


def test_delete_then_verify_is_not_found(shared, rng):
    client = shared.client()
    template = unit(rng)
    client.enroll("gone", template)
    reply = client.delete("gone")
    assert reply.complete and [o.code for o in reply.outcomes] == [0, 0, 0]
    assert [o.shareholder for o in reply.outcomes] == shared.names
    assert code_of(lambda: client.verify("gone", noisy(template, rng))) == grpc.StatusCode.NOT_FOUND
    assert records_at(shared, "acme", "gone") == {name: 0 for name in shared.names}


def test_never_enrolled_is_not_found(shared, rng):
    assert code_of(lambda: shared.client().verify("nobody", unit(rng))) == grpc.StatusCode.NOT_FOUND


# --- tickets, roles, tenants -----------------------------------------------------------


def _raw_verify(c: Committee, tenant: str, subject: str, probe, signed_over, *, subject_in_ticket=None, key=None):
    t = c.tenants[tenant]
    signed = wire.issue_ticket(key or t.key, t.key_id, tenant=tenant, subject=subject_in_ticket or subject,
                               request_id=f"raw-{time.monotonic_ns()}", probe=signed_over, audience=CLUSTER_ID)
    with secure_channel(f"127.0.0.1:{c.matcher.port}", c.pki.tls("psp", tenant), expect=MATCHER) as ch:
        return matcher_pb2_grpc.MatcherStub(ch).Verify(
            matcher_pb2.VerifyRequest(subject=subject, probe=probe, ticket=signed), timeout=10
        )


def test_ticket_must_match_probe_subject_and_key(shared, rng):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    client = shared.client()
    template = unit(rng)
    client.enroll("ticketed", template)
    probe = noisy(template, rng)
    other = noisy(template, rng)
    cases = {
        "probe digest": lambda: _raw_verify(shared, "acme", "ticketed", probe, signed_over=other),
        "subject": lambda: _raw_verify(shared, "acme", "ticketed", probe, signed_over=probe, subject_in_ticket="alice"),
        "key": lambda: _raw_verify(shared, "acme", "ticketed", probe, signed_over=probe,
                                   key=ed25519.Ed25519PrivateKey.generate()),
    }
    for name, call in cases.items():
        assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, name
    # Unsigned: no ticket at all.
    with secure_channel(f"127.0.0.1:{shared.matcher.port}", shared.pki.tls("psp", "acme"), expect=MATCHER) as ch:
        stub = matcher_pb2_grpc.MatcherStub(ch)
        assert code_of(lambda: stub.Verify(matcher_pb2.VerifyRequest(subject="ticketed", probe=probe), timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED
    assert _raw_verify(shared, "acme", "ticketed", probe, signed_over=probe).decision == matcher_pb2.DECISION_MATCH


def test_replayed_ticket_is_refused_by_the_nodes(shared, rng):
    client = shared.client()
    template = unit(rng)
    client.enroll("replay", template)
    probe = noisy(template, rng)
    t = shared.tenants["acme"]
    signed = wire.issue_ticket(t.key, t.key_id, tenant="acme", subject="replay", request_id="once", probe=probe,
                               audience=CLUSTER_ID)
    request = matcher_pb2.VerifyRequest(subject="replay", probe=probe, ticket=signed)
    with secure_channel(f"127.0.0.1:{shared.matcher.port}", shared.pki.tls("psp", "acme"), expect=MATCHER) as ch:
        stub = matcher_pb2_grpc.MatcherStub(ch)
        assert stub.Verify(request, timeout=10).decision == matcher_pb2.DECISION_MATCH
        assert code_of(lambda: stub.Verify(request, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("role, name", [("matcher", "matcher"), ("auditor", "auditor"), ("shareholder", "bank-a"),
                                        ("psp", "unregistered")])
def test_only_registered_payment_providers_may_call(shared, role, name):
    with secure_channel(f"127.0.0.1:{shared.matcher.port}", shared.pki.tls(role, name), expect=MATCHER) as ch:
        stub = matcher_pb2_grpc.MatcherStub(ch)
        request = matcher_pb2.EnrollRequest(subject="x", template=[1.0] * DIM, request_id="r")
        assert code_of(lambda: stub.Enroll(request, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: stub.Delete(matcher_pb2.DeleteRequest(subject="x"), timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED


def test_tenants_are_isolated(shared, rng):
    acme, gamma = shared.client("acme"), shared.client("gamma")
    template = unit(rng)
    acme.enroll("shared-name", template)
    # gamma's own ticket for the same subject id finds nothing of acme's.
    assert code_of(lambda: gamma.verify("shared-name", noisy(template, rng))) == grpc.StatusCode.NOT_FOUND
    reply = gamma.delete("shared-name")
    assert reply.complete and all("Erased 0" in o.message for o in reply.outcomes)
    assert acme.verify("shared-name", noisy(template, rng)).decision == "MATCH"
    # A ticket signed by gamma for acme's tenant does not verify anywhere.
    signed_by_gamma = shared.tenants["gamma"].key
    probe = noisy(template, rng)
    assert code_of(lambda: _raw_verify(shared, "acme", "shared-name", probe, signed_over=probe,
                                       key=signed_by_gamma)) == grpc.StatusCode.PERMISSION_DENIED


# --- shareholders down, slow or lying ---------------------------------------------------


def test_one_node_down_still_matches_two_down_is_unavailable(committee, rng):
    c = committee()
    c.start_matcher()
    client = c.client()
    template = unit(rng)
    client.enroll("alice", template)
    c.stop_node("bank-b")
    assert client.verify("alice", noisy(template, rng)).decision == "MATCH"
    c.stop_node("bank-a")
    err = pytest.raises(grpc.RpcError, client.verify, "alice", noisy(template, rng)).value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "fewer than k" in err.details().lower()
    # Enrolment needs every node.
    err = pytest.raises(grpc.RpcError, client.enroll, "bob", unit(rng)).value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "nothing was stored" in err.details()
    assert not client.delete("alice").complete


def test_partial_enrolment_leaves_no_half_enrolled_subject(committee, rng):
    c = committee()
    c.proxy("bank-c", fail_store=True)
    c.start_matcher()
    client = c.client()
    err = pytest.raises(grpc.RpcError, client.enroll, "half", unit(rng), request_id="half-1").value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "1 of 3" in err.details() and "not enrolled" in err.details()
    assert records_at(c, "acme", "half") == {name: 0 for name in c.names}
    # Once the node stores again, a retry with the same request id completes.
    c.proxies["bank-c"].fail_store = False
    template = unit(rng)
    assert not client.enroll("half", template, request_id="half-1").already_enrolled
    assert records_at(c, "acme", "half") == {name: 1 for name in c.names}
    assert client.verify("half", noisy(template, rng)).decision == "MATCH"


def test_failed_replace_does_not_leave_a_mixed_subject(committee, rng):
    c = committee()
    proxy = c.proxy("bank-c")
    c.start_matcher()
    client = c.client()
    old = unit(rng)
    client.enroll("mixed", old)
    proxy.fail_store = True
    err = pytest.raises(grpc.RpcError, client.enroll, "mixed", unit(rng), replace=True).value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # No share of the new split survives beside an old one: the subject is gone.
    assert records_at(c, "acme", "mixed") == {name: 0 for name in c.names}
    assert code_of(lambda: client.verify("mixed", noisy(old, rng))) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("corruption", ["flip", "swap", "range"])
def test_corrupt_share_is_outvoted_and_named(committee, rng, caplog, corruption):
    c = committee()
    proxy = c.proxy("bank-b")
    slow = c.proxy("bank-c")
    c.start_matcher()
    client = c.client()
    alice, bob = unit(rng), unit(rng)
    client.enroll("alice", alice)
    client.enroll("bob", bob)
    assert client.verify("bob", noisy(bob, rng)).decision == "MATCH"  # the proxy sees bob's share
    proxy.corrupt = "swap:bob" if corruption == "swap" else corruption
    # bank-c answers last, so the first two shares (one of them bad) fail
    # the MAC check and the matcher must wait for the third to outvote.
    slow.delay_s = 0.05
    # The suspect counter is process-wide (other tests' matchers count too): compare deltas.
    before = {name: suspects(name) for name in ("bank-a", "bank-b", "bank-c")}
    with caplog.at_level(logging.WARNING, logger="matcher"):
        for _ in range(3):
            assert client.verify("alice", noisy(alice, rng)).decision == "MATCH"
            assert client.verify("alice", noisy(bob, rng)).decision == "NO_MATCH"
    named = [r for r in caplog.records if r.getMessage() == "inconsistent share"]
    assert named and {r.fields["node"] for r in named} == {"bank-b"}
    assert suspects("bank-b") >= before["bank-b"] + 6
    assert suspects("bank-a") == before["bank-a"] and suspects("bank-c") == before["bank-c"]


@pytest.mark.parametrize("corruption", ["flip", "swap", "range"])
def test_corrupt_share_that_cannot_be_outvoted_fails_closed(committee, rng, corruption):
    c = committee()
    proxy = c.proxy("bank-b")
    c.start_matcher()
    client = c.client()
    alice, bob = unit(rng), unit(rng)
    client.enroll("alice", alice)
    client.enroll("bob", bob)
    assert client.verify("bob", noisy(bob, rng)).decision == "MATCH"
    proxy.corrupt = "swap:bob" if corruption == "swap" else corruption
    c.stop_node("bank-c")  # only the liar and one honest node answer
    for probe in (noisy(alice, rng), alice, noisy(bob, rng)):
        try:
            result = client.verify("alice", probe)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DATA_LOSS
            assert "bank-b" not in err.details()
        else:  # pragma: no cover - a NO_MATCH would be acceptable, a MATCH never
            assert result.decision == "NO_MATCH"


def test_hung_node_does_not_hold_up_the_answer(committee, rng):
    c = committee(call_timeout_ms=400)
    c.proxy("bank-a", delay_s=3.0)
    c.start_matcher()
    client = c.client()
    template = unit(rng)
    client.enroll("slow", template)
    started = time.monotonic()
    assert client.verify("slow", noisy(template, rng)).decision == "MATCH"
    assert time.monotonic() - started < 0.4  # two quick nodes suffice
    c.proxies["bank-a"].delay_s = 0


def test_two_hung_nodes_answer_unavailable_within_the_deadline(committee, rng):
    c = committee(call_timeout_ms=400)
    slow_a = c.proxy("bank-a")
    slow_b = c.proxy("bank-b")
    c.start_matcher()
    client = c.client()
    template = unit(rng)
    client.enroll("slow", template)
    slow_a.delay_s = slow_b.delay_s = 2.0
    started = time.monotonic()
    err = pytest.raises(grpc.RpcError, client.verify, "slow", noisy(template, rng)).value
    elapsed = time.monotonic() - started
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert 0.35 < elapsed < 1.2
    slow_a.delay_s = slow_b.delay_s = 0


def test_attempt_limit_at_the_nodes_is_resource_exhausted(committee, rng):
    c = committee(attempts=3)
    c.start_matcher()
    client = c.client()
    template = unit(rng)
    client.enroll("limited", template)
    for _ in range(3):
        assert client.verify("limited", noisy(template, rng)).decision == "MATCH"
    assert code_of(lambda: client.verify("limited", noisy(template, rng))) == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- bulk enrolment ----------------------------------------------------------------------


def test_enroll_stream_of_thousands_in_order(committee, rng):
    c = committee(enroll_batch=256)
    c.start_matcher()
    client = c.client()
    templates = {f"gallery-{i}": unit(rng) for i in range(2500)}
    client.enroll("gallery-7", templates["gallery-7"])  # already enrolled under another request id

    def items():
        for i, (subject, template) in enumerate(templates.items()):
            if i == 100:
                yield "bad\x00id", template
            if i == 200:
                yield "short", template[:-1]
            yield subject, template
        yield "gallery-3", templates["gallery-3"]  # repeated within the stream

    replies = list(client.enroll_many(items()))
    assert len(replies) == len(templates) + 3
    by_subject = {}
    for r in replies:
        by_subject.setdefault(r.subject, []).append(r)
    assert [r.code for r in by_subject["bad\x00id"]] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert [r.code for r in by_subject["short"]] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert [r.code for r in by_subject["gallery-7"]] == [grpc.StatusCode.ALREADY_EXISTS.value[0]]
    assert [r.code for r in by_subject["gallery-3"]] == [0, grpc.StatusCode.ALREADY_EXISTS.value[0]]
    assert sum(r.code == 0 for r in replies) == len(templates) - 1
    # Order is the request order.
    assert [r.subject for r in replies[:3]] == ["gallery-0", "gallery-1", "gallery-2"]
    for subject in ("gallery-0", "gallery-1234", "gallery-2499"):
        assert client.verify(subject, noisy(templates[subject], rng)).decision == "MATCH"
    assert client.verify("gallery-5", noisy(templates["gallery-6"], rng)).decision == "NO_MATCH"


def test_enroll_stream_with_a_node_down_reports_every_item(committee, rng):
    c = committee(enroll_batch=64)
    c.start_matcher()
    client = c.client()
    c.stop_node("bank-c")
    replies = list(client.enroll_many((f"m{i}", unit(rng)) for i in range(150)))
    assert len(replies) == 150
    assert {r.code for r in replies} == {grpc.StatusCode.UNAVAILABLE.value[0]}
    assert records_at_live(c, "acme", "m42") == 0


def records_at_live(c: Committee, tenant: str, subject: str) -> int:
    total = 0
    for name, node in c.nodes.items():
        if name == "bank-c":
            continue
        with secure_channel(node.address, c.pki.tls("auditor", "auditor"), expect=Identity("shareholder", name)) as ch:
            stub = shareholder_pb2_grpc.ShareholderStub(ch)
            total += len(stub.DescribeRecords(
                shareholder_pb2.DescribeRecordsRequest(tenant=tenant, subject=subject), timeout=5).records)
    return total


# --- what leaves the matcher ------------------------------------------------------------


def test_logs_carry_no_scores_or_vectors(committee, rng, caplog):
    c = committee(tenants=[Tenant("beta", score_allowed=True)])
    c.start_matcher()
    client = c.client("beta")
    template = unit(rng)
    with caplog.at_level(logging.DEBUG):
        client.enroll("quiet", template)
        result = client.verify("quiet", noisy(template, rng))
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert f"{result.score:.6f}"[:6] not in text and "score" not in text
    assert f"{template[0]:.5f}" not in text
    verified = [r for r in caplog.records if r.getMessage() == "verified"]
    assert verified and verified[0].fields["decision_id"] == result.decision_id
    assert set(verified[0].fields) >= {"decision", "tenant", "subject", "nodes_used"}


def test_enroll_stream_applies_back_pressure(committee, rng):
    # 8 KiB templates and a slow node: the matcher reads the stream only as
    # fast as the nodes store it, so the producer is held back by gRPC flow
    # control instead of the matcher buffering the gallery.
    c = committee(enroll_batch=64)
    c.proxy("bank-a", store_delay_s=0.3)
    c.start_matcher(dim=2048)
    client = c.client()
    produced = 0
    template = unit(rng, 2048)
    total = 4000

    def items():
        nonlocal produced
        for i in range(total):
            produced += 1
            yield f"bp-{i}", template

    replies = client.enroll_many(items())
    first = next(replies)
    assert first.code == 0 and first.subject == "bp-0"
    time.sleep(0.5)
    held_back = produced
    replies.cancel()
    assert held_back < total / 2, held_back


def test_enroll_stream_one_template_per_message(shared, rng):
    # The plain EnrollStream (grpcurl, other languages): same results as EnrollBatches.
    templates = [unit(rng) for _ in range(300)]
    acme = shared.tenants["acme"]
    requests = [matcher_pb2.EnrollStreamRequest(subject=f"plain-{i}", template=t.tolist(), request_id=f"p-{i}",
                                                ticket=acme.enroll_ticket(f"plain-{i}", f"p-{i}", t))
                for i, t in enumerate(templates)]
    requests.insert(5, matcher_pb2.EnrollStreamRequest(subject="plain-bad", template=[0.0] * DIM, request_id="pb",
                                                       ticket=acme.enroll_ticket("plain-bad", "pb", [0.0] * DIM)))
    with secure_channel(f"127.0.0.1:{shared.matcher.port}", shared.pki.tls("psp", "acme"), expect=MATCHER) as ch:
        replies = list(matcher_pb2_grpc.MatcherStub(ch).EnrollStream(iter(requests), timeout=60))
    assert [r.subject for r in replies] == [r.subject for r in requests]
    assert [r.code for r in replies if r.subject == "plain-bad"] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert sum(r.code == 0 for r in replies) == 300
    assert shared.client().verify("plain-299", noisy(templates[299], rng)).decision == "MATCH"


def test_enroll_stream_partial_store_failure_is_cleaned_up(committee, rng):
    c = committee(enroll_batch=50)
    c.proxy("bank-b", fail_store=True)
    c.start_matcher()
    replies = list(c.client().enroll_many((f"p{i}", unit(rng)) for i in range(120)))
    assert len(replies) == 120 and {r.code for r in replies} == {grpc.StatusCode.UNAVAILABLE.value[0]}
    assert "not enrolled" in replies[0].message
    for subject in ("p0", "p77", "p119"):
        assert records_at(c, "acme", subject) == {name: 0 for name in c.names}


def test_enrolment_paused_by_node_maintenance_is_failed_precondition(committee, rng):
    c = committee()
    c.proxy("bank-a", fail_store=grpc.StatusCode.FAILED_PRECONDITION)
    c.start_matcher()
    client = c.client()
    err = pytest.raises(grpc.RpcError, client.enroll, "paused", unit(rng)).value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "maintenance" in err.details()
    assert records_at(c, "acme", "paused") == {name: 0 for name in c.names}
    replies = list(client.enroll_many((f"pz{i}", unit(rng)) for i in range(10)))
    assert {r.code for r in replies} == {grpc.StatusCode.FAILED_PRECONDITION.value[0]}


def test_delete_outcomes_do_not_show_node_internals_to_the_provider(committee, rng):
    # A node in maintenance refuses the delete naming its session (maintenance.sessions.guard_delete);
    # the provider is told the node is in maintenance, not which session, state or actor.
    c = committee()
    internal = ("Maintenance in progress on this node (reshare session sess-7f3a (state prepared, begun by "
                "auditor/alice)); deletion is paused until the committee change ends. Retry later.")
    c.proxy("bank-b", fail_delete=internal)
    c.start_matcher()
    client = c.client()
    client.enroll("quiet", unit(rng))
    reply = client.delete("quiet")
    assert not reply.complete
    by_node = {o.shareholder: o for o in reply.outcomes}
    assert by_node["bank-b"].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    for o in reply.outcomes:
        assert "sess-7f3a" not in o.message and "auditor" not in o.message and "prepared" not in o.message
    assert "maintenance" in by_node["bank-b"].message


def test_a_delete_needs_the_providers_delete_ticket(shared, rng):
    # A DELETE ticket for another subject, or none at all, erases nothing.
    client = shared.client("acme")
    template = unit(rng)
    client.enroll("keep", template)
    t = shared.tenants["acme"]
    with secure_channel(f"127.0.0.1:{shared.matcher.port}", shared.pki.tls("psp", "acme"), expect=MATCHER) as ch:
        stub = matcher_pb2_grpc.MatcherStub(ch)
        for request in (matcher_pb2.DeleteRequest(subject="keep", request_id="d-1"),
                        matcher_pb2.DeleteRequest(subject="keep", request_id="d-2",
                                                  ticket=t.delete_ticket("someone-else", "d-2")),
                        matcher_pb2.DeleteRequest(subject="keep", request_id="d-3",
                                                  ticket=t.delete_ticket("keep", "d-other"))):
            assert code_of(lambda: stub.Delete(request, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    assert client.verify("keep", noisy(template, rng)).decision == "MATCH"


def _batch_message(t, items, op=None, key=None, replace=False):
    """An EnrollBatchesRequest of (subject, request id, template) items under one batch ticket."""
    signed = wire.issue_batch(key or t.key, t.key_id, tenant=t.name, audience=CLUSTER_ID, batch_id="b-1",
                              operation=op or ticket.write_operation(replace), items=items)
    return matcher_pb2.EnrollBatchesRequest(
        items=[matcher_pb2.EnrollStreamRequest(subject=s, request_id=r, template=v.tolist(), replace=replace)
               for s, r, v in items],
        batch_ticket=signed.ticket)


def _batch_codes(c, messages) -> list[tuple[str, int, str]]:
    with secure_channel(f"127.0.0.1:{c.matcher.port}", c.pki.tls("psp", "acme"), expect=MATCHER) as ch:
        replies = matcher_pb2_grpc.MatcherStub(ch).EnrollBatches(iter(messages), timeout=30)
        return [(r.subject, r.code, r.message) for m in replies for r in m.results]


def test_a_batch_ticket_signs_exactly_its_templates(shared, rng):
    t = shared.tenants["acme"]
    items = [(f"bt-{i}", f"bt-r{i}", unit(rng)) for i in range(5)]
    good = _batch_message(t, items)
    # The same ticket over one swapped template: every item of the message is refused, nothing stored.
    tampered = _batch_message(t, [(f"bx-{i}", f"bx-r{i}", unit(rng)) for i in range(3)])
    tampered.items[1].template[:] = unit(rng).tolist()
    forged = _batch_message(t, [("by-0", "by-r0", unit(rng))], key=ed25519_key())
    got = _batch_codes(shared, [good, tampered, forged])
    ok, denied = grpc.StatusCode.OK.value[0], grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert [code for _, code, _ in got] == [ok] * 5 + [denied] * 4, got
    assert "batch ticket" in got[5][2] and "signature" in got[8][2]
    client = shared.client("acme")
    assert client.verify("bt-3", noisy(items[3][2], rng)).decision == "MATCH"
    assert records_at(shared, "acme", "bx-1") == {name: 0 for name in shared.names}
    # An ENROLL batch cannot carry a replace.
    again = _batch_message(t, [("bt-0", "bt-r0b", unit(rng))], op=ticket.ENROLL)
    again.items[0].replace = True
    [(_, code, message)] = _batch_codes(shared, [again])
    assert code == denied and "not this item" in message
    assert client.verify("bt-0", noisy(items[0][2], rng)).decision == "MATCH"


def ed25519_key():
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate()
