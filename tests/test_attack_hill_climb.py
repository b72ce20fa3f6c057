"""Attacks on the decision: hill-climbing against Verify.

An attacker holding a valid provider identity (or a compromised provider)
probes one subject again and again, each time with a fresh, correctly
signed ticket, nudging the probe towards whatever got closer. It is stopped
by the per-subject attempt limit that every shareholder enforces itself:
after N attempts in the window every further one is RESOURCE_EXHAUSTED,
whichever request ids, probes or tickets it uses, and whether it goes
through the matcher or -- as a compromised matcher would -- straight to
the nodes. A provider without the score right never sees a score; one
with it sees scores but is stopped just the same, far from the threshold.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from fault_kit import clean_details
from shareholders.storage import connect
from node_kit import CLUSTER_ID
from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from matcher_kit import DIM, Committee, Tenant, noisy, unit
from vault.pki import Identity
from vaultrpc import wire
from vaultrpc.tls import secure_channel

LIMIT = 8           # attempts per subject per window, at every node
EXTRA = 24          # attempts the attacker makes beyond the limit


@pytest.fixture(scope="module")
def committee(dev_pki, tmp_path_factory):
    c = Committee(dev_pki, tmp_path_factory.mktemp("attack"), attempts=LIMIT,
                  tenants=[Tenant("acme"), Tenant("scores", score_allowed=True)])
    c.start_matcher()
    rng = np.random.default_rng(11)
    c.templates = {}
    for tenant in ("acme", "scores"):
        client = c.client(tenant)
        for subject in ("alice", "bob", "carol"):
            c.templates[(tenant, subject)] = unit(rng)
            client.enroll(subject, c.templates[(tenant, subject)])
    yield c
    c.close()


def node_attempts(c: Committee, tenant: str, subject: str) -> dict[str, dict[str, int]]:
    """Per node: releases and refusals (by reason) logged for the subject."""
    out = {}
    for name, node in c.nodes.items():
        conn = connect(node.cfg.db_path)
        try:
            rows = conn.execute(
                "SELECT event, json_extract(details_json, '$.reason') FROM audit_log WHERE tenant = ? AND subject = ? "
                "AND event IN ('release', 'deny')", (tenant, subject)).fetchall()
        finally:
            conn.close()
        counts: dict[str, int] = {}
        for event, reason in rows:
            key = event if event == "release" else f"deny:{reason}"
            counts[key] = counts.get(key, 0) + 1
        out[name] = counts
    return out


def climb(client, start: np.ndarray, rng, attempts: int, use_score: bool):
    """Greedy hill-climbing: perturb, keep what scored better (or, with
    decisions only, what matched). Returns (outcomes, best score seen)."""
    probe, best = start.copy(), -1.0
    outcomes = []
    for _ in range(attempts):
        candidate = (probe + rng.standard_normal(DIM).astype(np.float32) * 0.2).astype(np.float32)
        try:
            result = client.verify("alice", candidate)
        except grpc.RpcError as err:
            outcomes.append((err.code(), err.details(), None))
            continue
        outcomes.append((grpc.StatusCode.OK, result.decision, result.score))
        if use_score and result.score is not None and result.score > best:
            probe, best = candidate, result.score
    return outcomes, best


def test_hill_climbing_through_the_matcher_is_stopped_without_a_score(committee):
    rng = np.random.default_rng(12)
    client = committee.client("acme")
    outcomes, _ = climb(client, unit(rng), rng, LIMIT + EXTRA, use_score=False)
    answered = [o for o in outcomes if o[0] == grpc.StatusCode.OK]
    refused = [o for o in outcomes if o[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    # N decisions, then nothing but RESOURCE_EXHAUSTED; no score, ever.
    assert len(answered) == LIMIT and len(refused) == EXTRA
    assert [o[0] for o in outcomes[:LIMIT]] == [grpc.StatusCode.OK] * LIMIT
    assert all(o[1] == "NO_MATCH" and o[2] is None for o in answered)
    assert all(clean_details(o[1]) and "bank-" not in o[1] for o in refused)
    # Now even the genuine customer is refused until the window passes:
    # the limit is per subject, not per caller (the price of the defence).
    with pytest.raises(grpc.RpcError) as err:
        client.verify("alice", noisy(committee.templates[("acme", "alice")], rng))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Other subjects are untouched.
    assert client.verify("bob", noisy(committee.templates[("acme", "bob")], rng)).decision == "MATCH"
    # Every node that was asked released at most N shares of alice and
    # logged every refusal; the nodes asked first reached the limit.
    seen = node_attempts(committee, "acme", "alice")
    assert all(c.get("release", 0) <= LIMIT for c in seen.values()), seen
    assert sorted(c.get("release", 0) for c in seen.values())[-committee.k:] == [LIMIT] * committee.k, seen
    assert sum(c.get("deny:rate_limited", 0) for c in seen.values()) >= EXTRA


def test_a_score_right_does_not_buy_more_attempts(committee):
    rng = np.random.default_rng(13)
    client = committee.client("scores")
    outcomes, best = climb(client, unit(rng), rng, LIMIT + EXTRA, use_score=True)
    answered = [o for o in outcomes if o[0] == grpc.StatusCode.OK]
    assert len(answered) == LIMIT and all(o[2] is not None for o in answered)       # scores, for this tenant only
    assert [o[0] for o in outcomes[LIMIT:]] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * EXTRA
    assert best < Tenant("scores").match_threshold - 0.3, best                      # nowhere near a match
    assert all(o[1] == "NO_MATCH" for o in answered)


def test_a_compromised_matcher_going_straight_to_the_nodes_is_stopped_at_each(committee, dev_pki):
    """With the matcher's own certificate and a provider's signing key (the
    worst case: both compromised), every node still counts and refuses on
    its own: at most N shares of a subject per node per window."""
    acme = committee.tenants["acme"]
    for name, node in committee.nodes.items():
        with secure_channel(node.address, dev_pki.tls("matcher", "matcher"), expect=Identity("shareholder", name)) as ch:
            stub = shareholder_pb2_grpc.ShareholderStub(ch)
            codes = []
            for i in range(LIMIT + EXTRA):
                t = wire.issue_ticket(acme.key, acme.key_id, tenant="acme", subject="carol", request_id=f"direct-{name}-{i}",
                                      probe=np.zeros(4, np.float32), audience=CLUSTER_ID)
                try:
                    stub.ReleaseShare(shareholder_pb2.ReleaseShareRequest(ticket=t), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
        assert codes == [grpc.StatusCode.OK] * LIMIT + [grpc.StatusCode.RESOURCE_EXHAUSTED] * EXTRA, name
    seen = node_attempts(committee, "acme", "carol")
    assert all(c == {"release": LIMIT, "deny:rate_limited": EXTRA} for c in seen.values()), seen
