"""Enrolment under faults, over real processes: the matcher killed with
SIGKILL while an enrolment is half written, and a node whose write lands
only after the matcher gave up on it.

The contract (docs/contracts.md, Enroll): idempotent per request id, so the
provider's answer to any failed or unanswered enrolment is to retry with the
same request id; a retry must complete, and afterwards every node holds a
share of ONE split (all n shares rejoin together and pass the MACs).
"""
from __future__ import annotations

import threading

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


@pytest.fixture()
def cluster(dev_pki, tmp_path):
    """bank-a direct; bank-b and bank-c behind proxies that can hold writes."""
    p = FaultProcesses(dev_pki, tmp_path, TENANT)
    proxies: dict[str, GateProxy] = {}
    try:
        p.start_nodes()
        for name in ("bank-b", "bank-c"):
            proxies[name] = GateProxy(dev_pki, name, p.real(name))
            p.addresses[name] = proxies[name].address
        address = p.start_matcher(call_timeout_ms=1500)
        yield p, proxies, address
    finally:
        for proxy in proxies.values():
            proxy.stop()
        p.close()


def real_addresses(p):
    return {name: p.real(name) for name in NAMES}


@pytest.mark.parametrize("stored_before_kill", [["bank-a", "bank-b"], ["bank-a"]], ids=["k-of-n-written", "one-written"])
def test_matcher_killed_mid_enrolment_then_retry_with_the_same_request_id(cluster, dev_pki, stored_before_kill):
    p, proxies, address = cluster
    rng = np.random.default_rng(81)
    template = unit(rng)
    held_back = [name for name in ("bank-b", "bank-c") if name not in stored_before_kill]
    for name in held_back:
        proxies[name].hang_store = True
        proxies[name].drop_store = True  # the write dies with the matcher: it never reaches the node
    outcome = {}

    def enrol():
        with p.client(address) as client:
            try:
                outcome["reply"] = client.enroll("mid", template, request_id="enrol-mid-1")
            except grpc.RpcError as err:
                outcome["error"] = (err.code(), err.details())

    t = threading.Thread(target=enrol)
    t.start()
    for name in held_back:
        assert proxies[name].store_arrived.wait(10)
    wait_until(lambda: all(holdings(dev_pki, {n: p.real(n)}, TENANT.name, ["mid"])[n]["mid"] for n in stored_before_kill))
    p.kill("matcher")                       # SIGKILL with the enrolment half written
    for name in held_back:
        proxies[name].store_gate.set()
    t.join(15)
    # The provider saw the call fail (the connection died), not a success.
    assert "reply" not in outcome and outcome["error"][0] == grpc.StatusCode.UNAVAILABLE
    held = holdings(dev_pki, real_addresses(p), TENANT.name, ["mid"])
    assert {n for n in NAMES if held[n]["mid"]} == set(stored_before_kill)

    address = p.restart_matcher()
    for name in held_back:
        proxies[name].hang_store = proxies[name].drop_store = False
    with p.client(address) as client:
        if len(stored_before_kill) < 2:
            # Fewer than k shares were written: the subject cannot be
            # verified (never a decision from a stray share).
            with pytest.raises(grpc.RpcError) as err:
                client.verify("mid", noisy(template, rng))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The retry with the same request id completes: every node now holds
        # a share of one new split, whatever the crash left behind.
        reply = client.enroll("mid", template, request_id="enrol-mid-1")
        assert reply.request_id == "enrol-mid-1" and not reply.already_enrolled
        assert client.enroll("mid", template, request_id="enrol-mid-1").already_enrolled
        assert client.verify("mid", noisy(template, rng)).decision == "MATCH"
        assert client.verify("mid", unit(rng)).decision == "NO_MATCH"
    held = holdings(dev_pki, real_addresses(p), TENANT.name, ["mid"])
    assert {tuple(held[n]["mid"]) for n in NAMES} == {(("enrol-mid-1", 1),)}
    assert template_intact(rejoin_everywhere(dev_pki, real_addresses(p), TENANT, "mid"), template)
    # The audit logs tell the story: the first write at the nodes that got
    # it, then the retry's write (a replacement of our own leftover) everywhere.
    for name in NAMES:
        stores = [e for e in audit_entries(p.db(name)) if e["subject"] == "mid" and e["event"] == "store"]
        assert len(stores) == (2 if name in stored_before_kill else 1), (name, stores)
        assert all(e["request_id"] == "enrol-mid-1" for e in stores)
        assert stores[-1]["d_retry"] is (name in stored_before_kill)


def test_write_that_lands_after_the_matcher_gave_up(cluster, dev_pki):
    """A node slower than the matcher's deadline: the matcher reports the
    enrolment failed and undoes it with the enrolment's own ticket; the late
    write then reaches the slow node, which refuses it: that ticket was spent
    undoing the enrolment (provider-signed writes), so no stray share is left."""
    p, proxies, address = cluster
    rng = np.random.default_rng(82)
    template = unit(rng)
    slow = proxies["bank-c"]
    slow.hang_store = True               # held past the deadline, then forwarded
    with p.client(address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.enroll("late", template, request_id="enrol-late-1")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and clean_details(err.value.details())
        slow.hang_store = False
        slow.store_gate.set()             # the held write now reaches bank-c
        wait_until(lambda: any(e["event"] == "deny" and e["subject"] == "late" for e in audit_entries(p.db("bank-c"))))
        held = holdings(dev_pki, real_addresses(p), TENANT.name, ["late"])
        assert not any(held[n]["late"] for n in NAMES)   # nothing left behind
        with pytest.raises(grpc.RpcError) as verr:
            client.verify("late", template)
        assert verr.value.code() == grpc.StatusCode.NOT_FOUND
        # Told nothing was kept, the provider enrols afresh under a new request id.
        reply = client.enroll("late", template, request_id="enrol-late-2")
        assert not reply.already_enrolled
        assert client.verify("late", noisy(template, rng)).decision == "MATCH"
    held = holdings(dev_pki, real_addresses(p), TENANT.name, ["late"])
    assert {tuple(held[n]["late"]) for n in NAMES} == {(("enrol-late-2", 1),)}
    assert template_intact(rejoin_everywhere(dev_pki, real_addresses(p), TENANT, "late"), template)
    # bank-c's audit log shows the race: the matcher's compensating delete
    # (nothing to erase yet), the late write refused, then the new enrolment.
    story = [(e["event"], e["request_id"], e.get("d_deleted"), e.get("d_reason"))
             for e in audit_entries(p.db("bank-c"))
             if e["subject"] == "late" and (e["event"] in ("store", "delete") or e.get("d_call") == "store")]
    assert story == [("delete", "enrol-late-1", 0, None), ("deny", "enrol-late-1", None, "undone"),
                     ("store", "enrol-late-2", None, None)], story
