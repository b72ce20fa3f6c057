"""Fault injection on shareholder PROCESSES (three ``python -m shareholders``
and ``python -m matcher``, real mTLS on loopback): a node killed with
SIGKILL under load and restarted, a node restarted with another KEK.

For each fault: what the payment provider saw (statuses), that no impostor
probe ever matched, that nothing was lost (every node still holds every
subject and all n shares rejoin to the enrolled template) and what the
node's audit log shows. docs/reliability.md has the table.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest

from node_kit import audit_entries
from fault_kit import (
    NAMES, FaultProcesses, Tenant, chain_ok, clean_details, holdings, noisy, rejoin_everywhere,
    run_load, template_intact, unit, wait_until_used,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = Tenant("acme")


@pytest.fixture(scope="module")
def cluster(dev_pki, tmp_path_factory):
    p = FaultProcesses(dev_pki, tmp_path_factory.mktemp("faults-nodes"), TENANT)
    try:
        p.start_nodes()
        address = p.start_matcher()
        rng = np.random.default_rng(61)
        gallery = {f"cust-{i:03d}": unit(rng) for i in range(40)}
        with p.client(address) as client:
            assert [r.code for r in client.enroll_many(gallery.items())] == [0] * len(gallery)
        yield p, address, gallery
    finally:
        p.close()


def real_addresses(p) -> dict[str, str]:
    return {name: p.real(name) for name in NAMES}


def test_kill_9_a_shareholder_under_load_then_restart(cluster, dev_pki):
    p, address, gallery = cluster
    outage_enrolments: dict[str, tuple[str, str]] = {}
    with p.client(address) as client:
        stop = threading.Event()
        box = {}
        load = threading.Thread(target=lambda: box.setdefault("r", run_load(client, gallery, 7.0, seed=1, stop=stop)))
        load.start()
        time.sleep(1.5)
        before_kill = len(audit_entries(p.db("bank-b")))
        p.kill("bank-b")                                  # SIGKILL, mid-load
        # While it is down: a verification still needs only k = 2 nodes; an
        # enrolment needs all n and must leave nothing anywhere.
        rng = np.random.default_rng(62)
        for i in range(3):
            subject = f"outage-{i}"
            with pytest.raises(grpc.RpcError) as err:
                client.enroll(subject, unit(rng))
            outage_enrolments[subject] = (err.value.code().name, err.value.details())
        time.sleep(1.5)
        p.restart_node("bank-b")                          # same port, same data
        load.join(60)
        result = box["r"]
        # After the restart the node is used again.
        wait_until_used(p, client, "bank-b", gallery)
        for subject in list(gallery)[:6]:
            assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"

    # What the provider saw: every genuine probe matched, every impostor
    # probe did not; no error at all (one node down leaves k = 2).
    genuine, impostor = result.count("genuine"), result.count("impostor")
    assert result.false_match == 0 and set(impostor) == {"NO_MATCH"}, impostor
    assert set(genuine) == {"MATCH"}, genuine
    assert sum(genuine.values()) > 100
    for subject, (code, details) in outage_enrolments.items():
        assert code == "UNAVAILABLE" and "nothing was" in details and clean_details(details), details

    # Nothing lost: every node holds every subject of the gallery under the
    # same request id, nobody holds the outage subjects, and all three
    # shares of every subject rejoin to the enrolled template.
    held = holdings(dev_pki, real_addresses(p), TENANT.name, [*gallery, *outage_enrolments])
    for subject in gallery:
        ids = {name: held[name][subject] for name in NAMES}
        assert len({tuple(v) for v in ids.values()}) == 1 and len(ids["bank-a"]) == 1, ids
    for subject in outage_enrolments:
        assert all(held[name][subject] == [] for name in NAMES), subject
    for subject in list(gallery)[:10]:
        assert template_intact(rejoin_everywhere(dev_pki, real_addresses(p), TENANT, subject), gallery[subject])

    # The killed node's audit log: every entry committed before the kill is
    # there, the chain verifies, the restart is a new "start" with no "stop"
    # before it (a crash, not a shutdown), and releases resumed after it.
    events = audit_entries(p.db("bank-b"))
    assert chain_ok(p.db("bank-b"), p.audit_public_key("bank-b"), "bank-b")
    starts = [e["seq"] for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1] > before_kill
    assert events[starts[1] - 2]["event"] != "stop"
    assert any(e["event"] == "release" for e in events if e["seq"] > starts[1])
    # The enrolments during the outage never reached it, nor (the matcher
    # asks every node first) any other node: no store, no delete anywhere
    # (the live nodes did give their MAC key shares, asked in parallel, and logged it).
    for name in NAMES:
        assert not any(e["subject"].startswith("outage-") and e["event"] != "mac_key_release"
                       for e in audit_entries(p.db(name))), name


def test_node_restarted_with_another_kek_refuses_to_start(cluster, dev_pki):
    p, address, gallery = cluster
    rng = np.random.default_rng(63)
    subject = "cust-007"
    kek_file = p.root / "bank-c" / "kek.json"
    right_kek = kek_file.read_text()
    wrong_kek = json.dumps({"active": 1, "keys": {"1": secrets.token_hex(32)}})
    p.kill("bank-c")
    code, log = p.restart_node_refused("bank-c", kek_json=wrong_kek)
    # Found at start-up (shareholders.server.check_kek), one clear line,
    # exit 1: the node never serves, so it can neither release a wrong
    # share nor seal new enrolments under a key that is about to be fixed.
    assert code == 1
    [line] = [e for e in log if e.get("level") == "error"]
    assert line["msg"] == "cannot start" and "opens none of the" in line["error"]
    assert "Traceback" not in p.logs["bank-c"].read_text()
    with p.client(address) as client:
        # Meanwhile the provider is served by the two other nodes.
        wait_until_used(p, client, "bank-a", gallery)
        assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
        assert client.verify(subject, gallery["cust-008"]).decision == "NO_MATCH"
    events = audit_entries(p.db("bank-c"))
    assert events[-1]["event"] != "start"  # the refused start wrote nothing
    p.restart_node("bank-c", kek_json=right_kek)
    assert template_intact(rejoin_everywhere(dev_pki, real_addresses(p), TENANT, subject), gallery[subject])


def test_stored_share_damaged_at_rest_is_data_loss_never_a_wrong_share(cluster, dev_pki):
    p, address, gallery = cluster
    rng = np.random.default_rng(64)
    subject = "cust-011"
    db = sqlite3.connect(p.db("bank-c"), timeout=30)
    try:
        [(original,)] = db.execute("SELECT ciphertext FROM shares WHERE tenant = ? AND subject = ?",
                                   (TENANT.name, subject)).fetchall()
        damaged = bytes([original[0] ^ 1]) + original[1:]
        others = {s: t for s, t in gallery.items() if s != subject}
        with p.client(address) as client:
            wait_until_used(p, client, "bank-c", others)
        seen = len(audit_entries(p.db("bank-c")))
        with db:
            db.execute("UPDATE shares SET ciphertext = ? WHERE tenant = ? AND subject = ?", (damaged, TENANT.name, subject))
        with p.client(address) as client:
            started = time.time()
            # Two good nodes: decided correctly; the damaged one answers DATA_LOSS.
            assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
            assert client.verify(subject, gallery["cust-012"]).decision == "NO_MATCH"
            # One good node and the damaged one: fail closed, never a match.
            p.kill("bank-a")
            try:
                for probe in (noisy(gallery[subject], rng), gallery[subject]):
                    with pytest.raises(grpc.RpcError) as err:
                        client.verify(subject, probe)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and clean_details(err.value.details())
            finally:
                p.restart_node("bank-a")
            wait_until_used(p, client, "bank-a", others)
        # The matcher asks a subject's k "first" nodes and the rest only when
        # one fails, so bank-c heard of the two-node verifications only if it
        # is a first node of this subject; with bank-a down it heard of all.
        # Whatever it heard, it released NOTHING from the damaged record.
        after = [e for e in audit_entries(p.db("bank-c"))[seen:] if e["subject"] == subject]
        assert len(after) >= 2 and {e["event"] for e in after} == {"deny"}
        assert {e["d_reason"] for e in after} == {"data_loss"}
        saw = [e for e in p.matcher_log() if e.get("msg") == "shareholder call failed" and e.get("node") == "bank-c"
               and e.get("ts", 0) >= started and e.get("method") == "ReleaseShare"]
        # (the two fail-closed ones at least; an answer arriving after a decision may go unlogged)
        assert len(saw) >= 2 and {e["code"] for e in saw} == {"DATA_LOSS"}
        assert any(e.get("msg") == "stored share failed to open" for e in p.node_log("bank-c"))
    finally:
        with db:
            db.execute("UPDATE shares SET ciphertext = ? WHERE tenant = ? AND subject = ?", (original, TENANT.name, subject))
        db.close()
    assert template_intact(rejoin_everywhere(dev_pki, real_addresses(p), TENANT, subject), gallery[subject])
