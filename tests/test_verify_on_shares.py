"""Verify (1:1) on shares end to end over real processes: three ``python -m
shareholders`` nodes and ``python -m matcher`` over mutual TLS. Tenant
``onshares`` has ``verify_on_shares = true``, tenant ``acme`` today's
rejoin-in-the-matcher Verify; the same templates and probes must give the
same decisions, and nothing of ``onshares`` is ever released."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid

import grpc
import numpy as np
import pytest

from matcher_kit import DIM, NAMES, Processes, Tenant, noisy, unit
from node_kit import CLUSTER_ID
from splitvault.v1 import matcher_pb2
from shareholders.audit_log import now_ms
from vault import codec, mpc, pki, ticket
from vaultctl import audit_cmd, auditor
from vaultrpc import wire

pytestmark = pytest.mark.e2e

TAU = 0.8
ATTEMPTS = 30


@pytest.fixture(scope="module")
def cluster(dev_pki, tmp_path_factory):
    root = tmp_path_factory.mktemp("vsh")
    p = Processes(dev_pki, root, Tenant("acme", TAU), others=(Tenant("onshares", TAU, verify_on_shares=True),),
                  attempts=ATTEMPTS)
    try:
        p.start_nodes()
        address = p.start_matcher(call_timeout_ms=5000)
        yield p, address, root
    finally:
        p.close()


def _entries(root, name: str) -> list[tuple[str, str, str, dict]]:
    conn = sqlite3.connect(f"file:{root / name / 'shares.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT event, tenant, subject, details_json FROM audit_log ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(e, t, s, json.loads(d)) for e, t, s, d in rows]


def _code_cosine(template, probe) -> float:
    return codec.cosine(codec.encode(probe, DIM)[0], codec.encode(template, DIM)[0])


def _straddling(template, rng) -> list[np.ndarray]:
    """Two probes whose code cosine with the template lies just above and just below TAU."""
    e = rng.standard_normal(DIM)
    e -= (e @ template) * template
    e /= np.linalg.norm(e)
    def at(a: float) -> np.ndarray:  # float32: the probe exactly as the client sends it
        return (np.cos(a) * template + np.sin(a) * e).astype(np.float32)

    lo, hi = 0.0, np.pi / 2  # cosine falls from 1 to ~0 along the arc
    for _ in range(60):
        mid = (lo + hi) / 2
        if _code_cosine(template, at(mid)) >= TAU:
            lo = mid
        else:
            hi = mid
    return [at(lo), at(hi)]


def test_same_decisions_as_rejoin_and_nothing_released(cluster):
    p, address, root = cluster
    rng = np.random.default_rng(12)
    gallery = {f"cust-{i:02d}": unit(rng) for i in range(10)}
    probes: list[tuple[str, np.ndarray]] = []
    for name, t in gallery.items():
        probes.append((name, noisy(t, rng, sigma=0.3)))  # genuine
        probes.append((name, unit(rng)))  # impostor
        probes += [(name, q) for q in _straddling(t.astype(np.float64), rng)]  # near the threshold
    near = [abs(_code_cosine(gallery[n], q) - TAU) for n, q in probes[2::4] + probes[3::4]]
    assert max(near) < 1e-3  # the bisection found pairs at the threshold's edge
    with p.client(address, "acme") as rejoin, p.client(address, "onshares") as shares:
        for client in (rejoin, shares):
            assert [r.code for r in client.enroll_many(gallery.items())] == [0] * len(gallery)
        want, got_rejoin, got_shares = [], [], []
        for name, probe in probes:
            want.append("MATCH" if _code_cosine(gallery[name], probe) >= TAU else "NO_MATCH")
            got_rejoin.append(rejoin.verify(name, probe).decision)
            res = shares.verify(name, probe)
            assert res.score is None and res.epoch >= 1
            got_shares.append(res.decision)
    assert got_shares == got_rejoin == want
    # Both sides of the threshold were exercised, near it too.
    assert {want[i] for i in range(2, len(probes), 4)} == {"MATCH"}
    assert {want[i] for i in range(3, len(probes), 4)} == {"NO_MATCH"}

    # Each node: one verify_on_shares entry per verification of the tenant, never a release of it.
    for name in NAMES:
        entries = _entries(root, name)
        on_shares = [e for e in entries if e[0] == "verify_on_shares"]
        assert len(on_shares) == len(probes)
        assert all(t == "onshares" and d["counted"] and len(d["committee"]) == 3 for _e, t, _s, d in on_shares)
        assert [e for e in entries if e[0] == "release" and e[1] == "onshares"] == []
    # The rejoin tenant's releases: at least k = 2 nodes per verification.
    releases = sum(1 for name in NAMES for e in _entries(root, name) if e[0] == "release" and e[1] == "acme")
    assert releases >= 2 * len(probes)

    # `audit reconcile` explains every entry: each verification on shares logged by all three nodes.
    data = _reconcile(p, root)
    assert data["unexplained_count"] == 0, data["unexplained"]
    assert data["verifications_on_shares"] == len(probes)
    assert data["verifications_on_shares_by_nodes"] == {3: len(probes)}
    assert data["verifications"] == len(probes)  # the rejoin tenant's


def _reconcile(p, root) -> dict:
    """`vaultctl audit reconcile`'s Python API over the nodes' stores, read-only."""
    nodes = tuple(
        auditor.NodeRef(name, i, None, pki.public_key_raw(pki.load_signing_key((root / name / "audit.key").read_bytes())),
                        db_path=root / name / "shares.db")
        for i, name in enumerate(NAMES, start=1))
    target = auditor.AuditorTarget(
        source=str(root), tls=p.pki.files("auditor", "auditor"), nodes=nodes, threshold=2,
        ticket_keys={t.name: {t.key_id: bytes.fromhex(t.public_hex)} for t in p.tenants.values()},
        state_dir=root, cluster_id=CLUSTER_ID)
    verdicts, logs = audit_cmd.verify(target, update_witness=False)
    return audit_cmd.reconcile(target, logs, verdicts)


def test_tickets_refused_replayed_and_wrong_subject(cluster):
    p, address, root = cluster
    rng = np.random.default_rng(5)
    template = unit(rng)
    with p.client(address, "onshares") as client:
        client.enroll("alice", template)
        client.enroll("bob", unit(rng))
        probe = noisy(template, rng, sigma=0.2)
        signed = client.ticket(ticket.VERIFY, "alice", "replay-1", probe=probe)
        request = matcher_pb2.VerifyRequest(subject="alice", probe=probe.tolist(), ticket=signed)
        assert client._stub.Verify(request, timeout=10).decision == matcher_pb2.DECISION_MATCH
        with pytest.raises(grpc.RpcError) as err:  # the same ticket again: every node refuses it
            client._stub.Verify(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "already used" not in err.value.details()  # Verify's own words, nothing of the nodes

        other = matcher_pb2.VerifyRequest(subject="bob", probe=probe.tolist(),
                                          ticket=client.ticket(ticket.VERIFY, "alice", "r-2", probe=probe))
        with pytest.raises(grpc.RpcError) as err:
            client._stub.Verify(other, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        wrong_kind = matcher_pb2.VerifyRequest(subject="alice", probe=probe.tolist(),
                                               ticket=client.ticket(ticket.IDENTIFY, "", "r-3", probe=probe))
        with pytest.raises(grpc.RpcError) as err:
            client._stub.Verify(wrong_kind, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        with pytest.raises(grpc.RpcError) as err:
            client.verify("nobody", probe)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The replay was refused as a counted denial of alice by every node it
    # reached (the matcher cancels the other calls at the first refusal, so a
    # node may never see it), and no node scored alice a second time.
    deadline = time.monotonic() + 10
    while True:
        denied = {name: [d["reason"] for e, _t, s, d in _entries(root, name) if e == "deny" and s == "alice"]
                  for name in NAMES}
        if all(denied.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(denied.values()) and all(v in ([], ["replayed"]) for v in denied.values()), denied
    for name in NAMES:
        assert sum(1 for e, _t, s, _d in _entries(root, name) if e == "verify_on_shares" and s == "alice") == 1


def test_ticket_refused_by_the_nodes(cluster):
    # A ticket the matcher would accept but the nodes do not: signed for another cluster.
    p, address, _root = cluster
    rng = np.random.default_rng(8)
    template = unit(rng)
    with p.client(address, "onshares") as client:
        client.enroll("carol", template)
        probe = noisy(template, rng, sigma=0.2)
        t = p.tenants["onshares"]
        foreign = wire.issue_ticket(t.key, t.key_id, tenant=t.name, subject="carol", request_id=str(uuid.uuid4()),
                                    audience="another-cluster", operation=ticket.VERIFY, probe=probe)
        with pytest.raises(grpc.RpcError) as err:
            client._stub.Verify(matcher_pb2.VerifyRequest(subject="carol", probe=probe.tolist(), ticket=foreign),
                                timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_attempt_limit(cluster):
    p, address, _root = cluster
    rng = np.random.default_rng(9)
    template = unit(rng)
    with p.client(address, "onshares") as client:
        client.enroll("dave", template)
        for _ in range(ATTEMPTS):
            assert client.verify("dave", unit(rng)).decision == "NO_MATCH"
        for probe in (unit(rng), template):
            with pytest.raises(grpc.RpcError) as err:
                client.verify("dave", probe)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_four_nodes_one_down_still_verify_on_the_other_three(committee):
    # In-process nodes over mTLS: with n = 4 the matcher picks three nodes not recently down.
    c = committee(n=4, tenants=[Tenant("acme", TAU, verify_on_shares=True)])
    c.start_matcher()
    rng = np.random.default_rng(4)
    template = unit(rng)
    client = c.client()
    client.enroll("frank", template)
    assert client.verify("frank", noisy(template, rng, sigma=0.2)).decision == "MATCH"
    c.stop_node("bank-a")
    answers = []
    for _ in range(3):
        try:
            answers.append(client.verify("frank", noisy(template, rng, sigma=0.2)).decision)
        except grpc.RpcError as exc:  # the first call may still pick bank-a: fail closed, then avoided
            answers.append(exc.code().name)
    assert answers[-1] == "MATCH" and set(answers) <= {"MATCH", "UNAVAILABLE"}
    assert client.verify("frank", unit(rng)).decision == "NO_MATCH"


def test_a_restarted_node_remembers_tickets_and_attempts_used_on_shares(committee):
    c = committee(tenants=[Tenant("acme", TAU, verify_on_shares=True)], attempts=3)
    c.start_matcher()
    rng = np.random.default_rng(6)
    client = c.client()
    client.enroll("gina", unit(rng))
    for i in range(2):
        assert client.verify("gina", unit(rng), request_id=f"used-{i}").decision == "NO_MATCH"
    svc = c.nodes["bank-b"].service
    svc.guard = type(svc.guard)(svc.guard.limit, svc.guard.window_ms)  # what a restart starts from
    assert svc.rebuild_guard() >= 2  # from the verify_on_shares entries
    now = now_ms()
    used = ticket.ticket_id(ticket.TicketBody(tenant="acme", request_id="used-0"))
    assert svc.guard.admit("acme", "gina", used, now + 60_000, now) == "replayed"  # the 3rd attempt
    fresh = ticket.ticket_id(ticket.TicketBody(tenant="acme", request_id="fresh-1"))
    assert svc.guard.admit("acme", "gina", fresh, now + 60_000, now) == "rate_limited"  # past 3


def test_one_lying_node_can_flip_the_decision_on_shares_not_with_rejoin(committee, monkeypatch):
    # The stated limit (docs/architecture.md, "Verify on shares"): semi-honest. The node at
    # position 0 of S flips its opened component; the rejoin tenant's MACs are not involved.
    c = committee(tenants=[Tenant("acme", TAU), Tenant("onshares", TAU, verify_on_shares=True)])
    c.start_matcher()
    rng = np.random.default_rng(11)
    template, impostor = unit(rng), unit(rng)
    rejoin, shares = c.client("acme"), c.client("onshares")
    rejoin.enroll("hana", template)
    shares.enroll("hana", template)
    assert shares.verify("hana", impostor).decision == rejoin.verify("hana", impostor).decision == "NO_MATCH"
    honest = mpc.Party.sign_bits

    def lying(self, dimension):
        words = np.frombuffer(honest(self, dimension), dtype="<u8").copy()
        if self.position == 0:
            words[0] ^= np.uint64(1)
        return words.astype("<u8").tobytes()

    monkeypatch.setattr(mpc.Party, "sign_bits", lying)
    assert shares.verify("hana", impostor).decision == "MATCH"  # a wrong MATCH: the price of no rejoin
    assert rejoin.verify("hana", impostor).decision == "NO_MATCH"


def test_a_restarted_peer_gets_a_new_round_stream(cluster):
    # Each node's rounds go to its predecessor over one long-lived stream
    # (shareholders.identify._Link). bank-b restarts: bank-c's stream to it
    # ends with the old process, and the next verification opens a new one.
    p, address, _root = cluster
    rng = np.random.default_rng(13)
    template = unit(rng)
    with p.client(address, "onshares") as shares:
        shares.enroll("ivan", template)
        assert shares.verify("ivan", noisy(template, rng, sigma=0.2)).decision == "MATCH"
        p.restart("bank-b")
        answers = []
        for _ in range(3):
            try:
                answers.append(shares.verify("ivan", noisy(template, rng, sigma=0.2)).decision)
            except grpc.RpcError as exc:  # only ever fail closed
                answers.append(exc.code().name)
        assert answers[1:] == ["MATCH", "MATCH"] and answers[0] in ("MATCH", "UNAVAILABLE")
        assert shares.verify("ivan", unit(rng)).decision == "NO_MATCH"


def test_a_node_down_is_unavailable_never_a_match(cluster):
    # Runs last: it stops a node. The circuit needs three nodes (k = 2, 2k - 1 = 3);
    # with n = 3 one node down leaves two, so Verify on shares is UNAVAILABLE
    # while the rejoin tenant still answers from k = 2 nodes.
    p, address, _root = cluster
    rng = np.random.default_rng(10)
    template = unit(rng)
    with p.client(address, "acme") as rejoin, p.client(address, "onshares") as shares:
        rejoin.enroll("erin", template)
        shares.enroll("erin", template)
        p.kill("bank-c")
        for probe in (template, noisy(template, rng, sigma=0.2)):
            with pytest.raises(grpc.RpcError) as err:
                shares.verify("erin", probe)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rejoin.verify("erin", template).decision == "MATCH"
