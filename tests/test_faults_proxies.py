"""Misbehaving shareholders in front of real node processes: every node of a
real three-node cluster (``python -m shareholders`` x 3, ``python -m
matcher``) sits behind an in-test proxy (``fault_kit.GateProxy``), which
the tests turn into a node that never answers, answers slowly, or returns
a corrupted share or another subject's share.

For each: what the payment provider saw, that an impostor probe never
matched, which node the matcher named (in its log, never to the caller),
that the real nodes' data is untouched and what their audit logs show.
"""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from node_kit import audit_entries, wait_until
from fault_kit import (
    NAMES, FaultProcesses, GateProxy, Tenant, clean_details, holdings, noisy, rejoin_everywhere,
    template_intact, unit,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = Tenant("acme")
CALL_TIMEOUT_MS = 1500


@pytest.fixture(scope="module")
def cluster(dev_pki, tmp_path_factory):
    p = FaultProcesses(dev_pki, tmp_path_factory.mktemp("faults-proxies"), TENANT)
    proxies: dict[str, GateProxy] = {}
    try:
        p.start_nodes()
        for name in NAMES:
            proxies[name] = GateProxy(dev_pki, name, p.real(name))
            p.addresses[name] = proxies[name].address
        address = p.start_matcher(call_timeout_ms=CALL_TIMEOUT_MS)
        rng = np.random.default_rng(71)
        gallery = {f"cust-{i:03d}": unit(rng) for i in range(24)}
        with p.client(address) as client:
            for subject, template in gallery.items():
                client.enroll(subject, template)
        yield p, proxies, p.client(address), gallery
    finally:
        for proxy in proxies.values():
            proxy.stop()
        p.close()


@pytest.fixture()
def honest(cluster):
    """Every proxy back to forwarding faithfully after the test."""
    yield cluster
    for proxy in cluster[1].values():
        proxy.hang_release = False
        proxy.release_gate.set()
        proxy.delay_s = 0.0
        proxy.corrupt = None
        proxy.swap_unlabelled = None


def timed(call):
    started = time.perf_counter()
    try:
        return call(), time.perf_counter() - started
    except grpc.RpcError as err:
        return err, time.perf_counter() - started


def real_addresses(p):
    return {name: p.real(name) for name in NAMES}


def test_one_node_never_answers(honest):
    p, proxies, client, gallery = honest
    rng = np.random.default_rng(1)
    proxies["bank-a"].release_gate.clear()
    proxies["bank-a"].hang_release = True
    for subject in ("cust-000", "cust-001", "cust-002"):
        reply, seconds = timed(lambda: client.verify(subject, noisy(gallery[subject], rng)))
        assert reply.decision == "MATCH" and seconds < CALL_TIMEOUT_MS / 1000, seconds   # not held up
        reply, _ = timed(lambda: client.verify(subject, gallery["cust-010"]))
        assert reply.decision == "NO_MATCH"


def test_two_nodes_never_answer_fail_closed_within_the_deadline(honest):
    p, proxies, client, gallery = honest
    rng = np.random.default_rng(2)
    for name in ("bank-a", "bank-b"):
        proxies[name].release_gate.clear()
        proxies[name].hang_release = True
    seen_before = {name: len(audit_entries(p.db(name))) for name in NAMES}
    for probe in (noisy(gallery["cust-003"], rng), gallery["cust-003"]):
        err, seconds = timed(lambda: client.verify("cust-003", probe))
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert clean_details(err.details()) and "bank-" not in err.details()
        assert seconds < CALL_TIMEOUT_MS / 1000 + 1.5, seconds
    # When the hung nodes come back, the held calls reach them late: the
    # nodes log those releases (an auditor's reconcile sees releases for
    # decisions that were never made), and the matcher has long answered.
    for name in ("bank-a", "bank-b"):
        proxies[name].hang_release = False
        proxies[name].release_gate.set()
    def late_releases(name):
        return [e["event"] for e in audit_entries(p.db(name))[seen_before[name]:] if e["subject"] == "cust-003"]

    for name in NAMES:
        wait_until(lambda: len(late_releases(name)) >= 2)
        new = [e for e in audit_entries(p.db(name))[seen_before[name]:] if e["subject"] == "cust-003"]
        assert [e["event"] for e in new] == ["release", "release"], (name, new)


@pytest.mark.parametrize("slow", [["bank-c"], ["bank-b", "bank-c"]])
def test_slow_nodes(honest, slow):
    p, proxies, client, gallery = honest
    rng = np.random.default_rng(3)
    for name in slow:
        proxies[name].delay_s = 0.4
    reply, seconds = timed(lambda: client.verify("cust-004", noisy(gallery["cust-004"], rng)))
    assert reply.decision == "MATCH"
    if len(slow) == 1:
        assert seconds < 0.4  # k = 2 fast nodes decide; the slow one is not waited for
    else:
        assert 0.4 <= seconds < CALL_TIMEOUT_MS / 1000
    assert client.verify("cust-004", gallery["cust-011"]).decision == "NO_MATCH"


@pytest.mark.parametrize("corrupt", ["flip", "swap:cust-020", "swap-unlabelled:cust-020"])
def test_lying_node_is_outvoted_and_named_then_fails_closed(honest, dev_pki, corrupt):
    p, proxies, client, gallery = honest
    rng = np.random.default_rng(4)
    victims, impostor = ["cust-005", "cust-006", "cust-007", "cust-008"], "cust-020"
    liar = proxies["bank-b"]
    # The liar has seen the impostor's share released before (to swap it in).
    liar.delay_s = 0.0
    while impostor not in liar.records:
        assert client.verify(impostor, noisy(gallery[impostor], rng)).decision == "MATCH"
        proxies["bank-a"].delay_s = proxies["bank-c"].delay_s = 0.3   # the liar is asked once they are slow
    proxies["bank-a"].delay_s = proxies["bank-c"].delay_s = 0.0
    if corrupt.startswith("swap-unlabelled:"):
        liar.swap_unlabelled = impostor
    else:
        liar.corrupt = corrupt
    started = time.time()
    try:
        # Three nodes, one liar: outvoted. The genuine probe matches, and the
        # impostor's own template (the very share the liar swaps in) does not.
        # (The matcher asks each subject's k "first" nodes, the others only
        # when one fails or lies: over four victims the liar is consulted.)
        for victim in victims:
            for _ in range(2):
                assert client.verify(victim, noisy(gallery[victim], rng)).decision == "MATCH"
                assert client.verify(victim, gallery[impostor]).decision == "NO_MATCH"
        named = [e for e in p.matcher_log() if e.get("msg") == "inconsistent share" and e.get("ts", 0) >= started]
        assert named and {e["node"] for e in named} == {"bank-b"}
        # The liar and one honest node: nothing to outvote with: fail closed.
        proxies["bank-a"].release_gate.clear()
        proxies["bank-a"].hang_release = True
        for victim in victims[:1]:
            for probe in (noisy(gallery[victim], rng), gallery[impostor]):
                err, _ = timed(lambda: client.verify(victim, probe))
                assert isinstance(err, grpc.RpcError), err
                assert err.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE), err.code()
                assert "bank-b" not in err.details() and clean_details(err.details())
    finally:
        liar.corrupt = None
        liar.swap_unlabelled = None
    # The lie never reached a node's data.
    for victim in victims:
        assert template_intact(rejoin_everywhere(dev_pki, real_addresses(p), TENANT, victim), gallery[victim])


def test_lying_node_leaves_nothing_behind(honest, dev_pki):
    p, proxies, client, gallery = honest
    held = holdings(dev_pki, real_addresses(p), TENANT.name, list(gallery))
    for subject in gallery:
        assert len({tuple(held[name][subject]) for name in NAMES}) == 1 and held["bank-a"][subject]
