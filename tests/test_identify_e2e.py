"""Identify (1:N) on shares end to end over real processes: three
``python -m shareholders`` nodes and ``python -m matcher`` over mutual TLS,
driven by the payment provider's client. No template is rejoined anywhere."""
from __future__ import annotations

import json
import sqlite3
import time

import grpc
import numpy as np
import pytest

from matcher_kit import DIM, NAMES, Processes, Tenant, noisy, unit
from vault import codec, mpc

pytestmark = pytest.mark.e2e


@pytest.fixture()
def cluster(dev_pki, tmp_path):
    # Cosine threshold 0.8 for the tenant (Tenant's default), so T = ceil(0.8 |q|^2).
    p = Processes(dev_pki, tmp_path, Tenant("acme"))
    try:
        p.start_nodes()
        address = p.start_matcher(call_timeout_ms=5000)
        yield p, address
    finally:
        p.close()


def _identify_entries(root, name: str) -> list[dict]:
    db = root / name / "shares.db"
    conn = sqlite3.connect(f"file:{db if db.exists() else next((root / name).glob('*.db'))}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT event, details_json FROM audit_log WHERE event = 'identify'").fetchall()
    finally:
        conn.close()
    return [json.loads(d) for _e, d in rows]


def test_identify_story_over_real_processes(cluster, tmp_path):
    p, address = cluster
    rng = np.random.default_rng(21)
    gallery = {f"customer-{i:02d}": unit(rng) for i in range(50)}
    # Two near-duplicate enrolments (the same person enrolled twice, say).
    twin = gallery["customer-07"]
    gallery["customer-07b"] = (twin + 0.02 * rng.standard_normal(DIM) / np.sqrt(DIM)).astype(np.float32)
    with p.client(address) as client:
        assert [r.code for r in client.enroll_many(gallery.items())] == [0] * len(gallery)

        genuine = client.identify(noisy(gallery["customer-31"], rng, sigma=0.2))
        assert (genuine.decision, genuine.subject) == ("MATCH", "customer-31")
        impostor = client.identify(unit(rng))
        assert (impostor.decision, impostor.subject) == ("NO_MATCH", None)
        twins = client.identify(noisy(twin, rng, sigma=0.05))
        assert (twins.decision, twins.subject) == ("AMBIGUOUS", None)

        # The same decisions as a plaintext exhaustive search over the same int8 codes.
        names = sorted(gallery)
        codes = codec.encode(np.stack([gallery[n] for n in names]), DIM)
        for probe, got in ((noisy(gallery["customer-31"], rng, sigma=0.2), "customer-31"), (unit(rng), None)):
            q = codec.encode(probe, DIM)[0]
            norm_sq = int(q.astype(np.int64) @ q.astype(np.int64))
            want = mpc.plaintext_decision(codes, q, int(np.ceil(0.8 * norm_sq)), int(np.ceil(0.02 * norm_sq)))
            res = client.identify(probe)
            assert res.decision == want[0]
            assert res.subject == (names[want[1]] if want[1] is not None else None) == got

        # A delete is seen by the next query (the nodes' galleries follow the store).
        assert client.delete("customer-31").complete
        assert client.identify(noisy(gallery["customer-31"], rng, sigma=0.2)).decision == "NO_MATCH"

        # Each node wrote one audit entry per query, never one per row.
        for name in NAMES:
            entries = _identify_entries(tmp_path, name)
            assert len(entries) == 6
            assert all(len(e["committee"]) == 3 for e in entries)

        # One node down: UNAVAILABLE, never a MATCH.
        p.kill("bank-b")
        for probe in (noisy(gallery["customer-12"], rng, sigma=0.2), gallery["customer-12"]):
            with pytest.raises(grpc.RpcError) as err:
                client.identify(probe)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_identify_refuses_a_verify_ticket_and_a_wrong_probe(cluster):
    p, address = cluster
    rng = np.random.default_rng(3)
    with p.client(address) as client:
        client.enroll("someone", unit(rng))
        from splitvault.v1 import matcher_pb2
        from vault import ticket

        probe = unit(rng)
        wrong_kind = client.ticket(ticket.VERIFY, "someone", "r-1", probe=probe)
        other_probe = client.ticket(ticket.IDENTIFY, "", "r-2", probe=unit(rng))
        for signed in (wrong_kind, other_probe):
            with pytest.raises(grpc.RpcError) as err:
                client._stub.Identify(matcher_pb2.IdentifyRequest(probe=probe.tolist(), ticket=signed), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_node_loads_its_gallery_at_start_before_any_query(dev_pki, tmp_path):
    # [identify] preload: a restarted node opens the tenant's gallery in the
    # background at start, so the first query after a restart finds it in memory.
    p = Processes(dev_pki, tmp_path, Tenant("acme"))
    p.node_extra = {name: '\n[identify]\npreload = ["acme"]\n' for name in NAMES}
    try:
        p.start_nodes()
        address = p.start_matcher(call_timeout_ms=5000)
        assert not [e for e in p.log_events("bank-a") if e.get("msg") == "identify gallery loaded"]  # nothing yet
        rng = np.random.default_rng(8)
        gallery = {f"customer-{i:02d}": unit(rng) for i in range(40)}
        with p.client(address) as client:
            assert [r.code for r in client.enroll_many(gallery.items())] == [0] * len(gallery)
            p.restart("bank-a")
            deadline = time.monotonic() + 30
            while not (loaded := [e for e in p.log_events("bank-a") if e.get("msg") == "identify gallery loaded"]):
                assert time.monotonic() < deadline, p.logs["bank-a"].read_text()[-2000:]
                time.sleep(0.1)
            assert [(e["tenant"], e["dimension"], e["rows"]) for e in loaded] == [("acme", DIM, 40)]
            assert _identify_entries(tmp_path, "bank-a") == []  # loaded with no query asked
            got = client.identify(noisy(gallery["customer-05"], rng, sigma=0.2))
            assert (got.decision, got.subject) == ("MATCH", "customer-05")
    finally:
        p.close()
