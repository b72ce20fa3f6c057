"""End to end over real processes: three ``python -m shareholders`` nodes
and ``python -m matcher``, configured from TOML files as in
docs/contracts.md, driven by the payment provider's client."""
from __future__ import annotations

import pathlib
import signal

import grpc
import numpy as np
import pytest

from matcher_kit import DIM, Processes, ProxyNode, Tenant, noisy, unit
from vault import codec

pytestmark = pytest.mark.e2e
@pytest.fixture()
def processes(dev_pki, tmp_path):
    made = []

    def make(tenant: Tenant):
        p = Processes(dev_pki, tmp_path, tenant)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_payment_story_over_real_processes(processes):
    rng = np.random.default_rng(7)
    p = processes(Tenant("acme"))
    p.start_nodes()
    address = p.start_matcher()
    gallery = {f"customer-{i}": unit(rng) for i in range(40)}
    with p.client(address) as client:
        replies = list(client.enroll_many(gallery.items()))
        assert [r.code for r in replies] == [0] * len(gallery)
        alice = gallery["customer-3"]
        assert client.verify("customer-3", noisy(alice, rng)).decision == "MATCH"
        assert client.verify("customer-3", gallery["customer-4"]).decision == "NO_MATCH"
        client.enroll("late", unit(rng), request_id="late-1")
        assert client.enroll("late", unit(rng), request_id="late-1").already_enrolled
        assert client.delete("customer-9").complete
        with pytest.raises(grpc.RpcError) as err:
            client.verify("customer-9", gallery["customer-9"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        p.kill("bank-b")
        assert client.verify("customer-3", noisy(alice, rng)).decision == "MATCH"
        p.kill("bank-c")
        for probe in (noisy(alice, rng), alice):
            with pytest.raises(grpc.RpcError) as err:
                client.verify("customer-3", probe)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # Nothing whole at rest: no file written by any process holds a template,
    # as float32 or as its int8 encoding.
    needles = []
    for template in gallery.values():
        needles.append(template.astype("<f4").tobytes()[:64])
        needles.append(codec.encode(template, DIM).tobytes()[:48])
    for path in p.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), path
    # Core dumps are off in the matcher process.
    limits = pathlib.Path(f"/proc/{p.procs['matcher'].pid}/limits").read_text()
    assert [line.split()[4:6] for line in limits.splitlines() if line.startswith("Max core file size")] == [["0", "0"]]
    # SIGTERM stops it cleanly.
    p.procs["matcher"].send_signal(signal.SIGTERM)
    assert p.procs["matcher"].wait(timeout=15) == 0
    # The matcher logged decisions with ids, never a score.
    log = p.matcher_log()
    decisions = [e for e in log if e.get("msg") == "verified"]
    assert {e["decision"] for e in decisions} == {"MATCH", "NO_MATCH"}
    assert all("score" not in e for e in log)


def test_corrupt_shareholder_process_is_outvoted_then_fails_closed(processes, dev_pki):
    rng = np.random.default_rng(8)
    p = processes(Tenant("acme"))
    p.start_nodes()
    real_b = p.addresses["bank-b"]
    liar = ProxyNode(dev_pki, "bank-b", real_b)
    slow = ProxyNode(dev_pki, "bank-c", p.addresses["bank-c"])
    p.addresses["bank-b"], p.addresses["bank-c"] = liar.address, slow.address
    try:
        address = p.start_matcher()
        with p.client(address) as client:
            alice = unit(rng)
            client.enroll("alice", alice)
            liar.corrupt, slow.delay_s = "flip", 0.05
            for _ in range(3):
                assert client.verify("alice", noisy(alice, rng)).decision == "MATCH"
            named = [e for e in p.matcher_log() if e.get("msg") == "inconsistent share"]
            assert named and {e["node"] for e in named} == {"bank-b"}
            p.kill("bank-c")  # now the liar cannot be outvoted
            for probe in (noisy(alice, rng), alice):
                with pytest.raises(grpc.RpcError) as err:
                    client.verify("alice", probe)
                assert err.value.code() == grpc.StatusCode.DATA_LOSS
                assert "bank-b" not in err.value.details()
    finally:
        liar.stop()
        slow.stop()
