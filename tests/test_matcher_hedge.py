"""Hedged release: a verification asks k nodes for shares, and the others
only when one of those fails, lies or is slow (real nodes, real mTLS)."""
from __future__ import annotations

import time

import grpc
import pytest

from node_kit import wait_until
from matcher_kit import Committee, noisy, unit


def proxies_for_all(c: Committee, **behaviour):
    return {name: c.proxy(name, **behaviour) for name in c.names}


def test_a_healthy_committee_releases_exactly_k_shares(committee, rng):
    c = committee(n=3, k=2)
    proxies = proxies_for_all(c)
    c.start_matcher()
    client = c.client()
    templates = {f"s{i}": unit(rng) for i in range(12)}
    for subject, t in templates.items():
        client.enroll(subject, t)
    for subject, t in templates.items():
        assert client.verify(subject, noisy(t, rng)).decision == "MATCH"
    releases = {name: p.releases for name, p in proxies.items()}
    assert sum(releases.values()) == 2 * len(templates)
    # The subject decides which k nodes are asked, so the load spreads.
    assert all(count > 0 for count in releases.values()), releases


def test_one_subject_always_goes_to_the_same_k_nodes(committee, rng):
    c = committee(n=3, k=2)
    proxies = proxies_for_all(c)
    c.start_matcher()
    client = c.client()
    t = unit(rng)
    client.enroll("alice", t)
    for _ in range(4):
        assert client.verify("alice", noisy(t, rng)).decision == "MATCH"
    counts = sorted(p.releases for p in proxies.values())
    assert counts == [0, 4, 4]


def test_a_slow_node_among_the_first_k_is_hedged_around(committee, rng):
    c = committee(n=3, k=2)
    proxies = proxies_for_all(c)
    c.start_matcher(hedge_ms=100)
    client = c.client()
    t = unit(rng)
    client.enroll("alice", t)
    assert client.verify("alice", noisy(t, rng)).decision == "MATCH"
    asked = [name for name, p in proxies.items() if p.releases]
    proxies[asked[0]].delay_s = 1.5
    started = time.monotonic()
    assert client.verify("alice", noisy(t, rng)).decision == "MATCH"
    assert time.monotonic() - started < 1.2  # hedged after 100 ms, not held for the slow node
    assert sum(p.releases for p in proxies.values()) == 2 + 3


def test_a_lying_node_among_the_first_k_brings_in_the_others(committee, rng):
    c = committee(n=3, k=2)
    proxies = proxies_for_all(c)
    c.start_matcher()
    client = c.client()
    t, other = unit(rng), unit(rng)
    client.enroll("alice", t)
    assert client.verify("alice", noisy(t, rng)).decision == "MATCH"
    asked = [name for name, p in proxies.items() if p.releases]
    proxies[asked[0]].corrupt = "flip"
    assert client.verify("alice", noisy(t, rng)).decision == "MATCH"
    assert client.verify("alice", other).decision == "NO_MATCH"
    assert all(p.releases for p in proxies.values())


def test_the_attempt_limit_is_not_worked_around_by_asking_other_nodes(committee, rng):
    c = committee(n=3, k=2, attempts=3)
    proxies = proxies_for_all(c)
    c.start_matcher()
    client = c.client()
    t = unit(rng)
    client.enroll("alice", t)
    for _ in range(3):
        client.verify("alice", noisy(t, rng))
    with pytest.raises(grpc.RpcError) as err:
        client.verify("alice", noisy(t, rng))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The node that was never asked was not asked now either.
    assert sorted(p.releases for p in proxies.values()) == [0, 4, 4]


def test_hedging_off_asks_every_node(committee, rng):
    c = committee(n=3, k=2)
    proxies = proxies_for_all(c)
    c.start_matcher(hedge_ms=0)
    client = c.client()
    t = unit(rng)
    client.enroll("alice", t)
    assert client.verify("alice", noisy(t, rng)).decision == "MATCH"
    # With hedging off the matcher asks all three at once and answers on the
    # first k: the third release may land just after the answer.
    wait_until(lambda: [p.releases for p in proxies.values()] == [1, 1, 1])
    assert [p.releases for p in proxies.values()] == [1, 1, 1]
