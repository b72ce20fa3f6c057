"""Identify's gallery group over a real local cluster (``vaultctl cluster up``:
three node processes and the matcher over mutual TLS): the provider signs a
record's group at enrolment and the group searched in the IDENTIFY ticket;
the nodes store the signed group, search only that group, refuse a start
naming another, and keep the group across a proactive refresh and a reshare."""
from __future__ import annotations

import json
import sqlite3

import grpc
import numpy as np
import pytest

from test_cli_e2e import json_out, vaultctl
from splitvault.v1 import matcher_pb2
from vault import ticket
from vault.errors import InvalidTicket
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates
from vaultrpc import wire

DIM = 128


def _node_dbs(root, nodes: int = 3) -> dict[str, sqlite3.Connection]:
    """Every node's store, read-only, by its path."""
    out = {}
    for db in sorted(root.rglob("*.db")):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'shares'").fetchone():
            out[str(db)] = conn
        else:
            conn.close()
    assert len(out) == nodes
    return out


def _refused_for_group(conn: sqlite3.Connection) -> int:
    rows = conn.execute("SELECT details_json FROM audit_log WHERE event = 'deny'").fetchall()
    return sum(json.loads(d).get("reason") == "wrong_group" for (d,) in rows)


def test_group_narrows_identify_and_survives_a_refresh_and_a_reshare(tmp_path):
    root = tmp_path / "cluster"
    t = synthetic_templates(8, DIM, seed=41)
    cluster.up(root, dim=DIM)
    try:
        with MatcherClient.from_cluster_dir(root) as client:
            store_a = {f"a-{i}": t[i] for i in range(5)}
            assert [r.code for r in client.enroll_many(store_a.items(), group="store-a")] == [0] * 5
            np.save(tmp_path / "b.npy", t[5])
            r = vaultctl("enroll", "--dir", root, "--subject", "b-0", "--template", tmp_path / "b.npy",
                         "--group", "store-b", "--format", "json")
            assert r.returncode == 0 and json_out(r)["group"] == "store-b", r.stderr
            client.enroll("nobody-group", t[6])
            probe = noisy_copy(t[2], seed=42)

            def decide(group=None):
                res = client.identify(probe, group)
                return res.decision, res.subject

            assert decide("store-a") == ("MATCH", "a-2")
            assert decide() == ("MATCH", "a-2")  # no group: the whole tenant
            assert decide("store-b") == ("NO_MATCH", None)
            assert decide("store-c") == ("NO_MATCH", None)  # a group nobody is in
            assert client.identify(noisy_copy(t[5], seed=43), "store-b").subject == "b-0"
            assert client.identify(noisy_copy(t[6], seed=44), "store-a").decision == "NO_MATCH"

            # A ticket signed for store-a, sent with group store-b: the matcher forwards, every node refuses.
            signed = client.ticket(ticket.IDENTIFY, "", "wrong-group-1", probe=probe, group="store-a")
            with pytest.raises(grpc.RpcError) as err:
                client._stub.Identify(matcher_pb2.IdentifyRequest(probe=probe.tolist(), ticket=signed,
                                                                  group="store-b"), timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # An enrolment ticket for one group cannot store the template under another.
            signed = client.ticket(ticket.ENROLL, "a-9", "enrol-wrong-group", template=t[7], group="store-a")
            with pytest.raises(grpc.RpcError) as err:
                client._stub.Enroll(matcher_pb2.EnrollRequest(subject="a-9", template=t[7].tolist(),
                                                              request_id="enrol-wrong-group", ticket=signed,
                                                              group="store-b"), timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # A bad group name is INVALID_ARGUMENT, for a search and for an enrolment.
            for bad in ("x" * 65, "tab\there"):
                with pytest.raises(grpc.RpcError) as err:
                    client.identify(probe, bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.RpcError) as err:
                    client.enroll("a-bad", t[7], group=bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [r.code for r in client.enroll_many([("a-bad", t[7])], group="x" * 65)] == [
                grpc.StatusCode.INVALID_ARGUMENT.value[0]]

        dbs = _node_dbs(root)
        try:
            # Each node that took the start refused it (the matcher cancels the rest at the first
            # refusal), and no node served it: no identify entry for the wrong-group ticket anywhere.
            assert sum(_refused_for_group(conn) for conn in dbs.values()) >= 1
            for name, conn in dbs.items():
                assert _refused_for_group(conn) <= 1, name
                assert not conn.execute("SELECT COUNT(*) FROM audit_log WHERE event = 'identify' AND request_id = ?",
                                        ("wrong-group-1",)).fetchone()[0], name
                stored = dict(conn.execute("SELECT subject, grp FROM shares").fetchall())
                assert stored == {**{s: "store-a" for s in store_a}, "b-0": "store-b", "nobody-group": ""}, name
        finally:
            for conn in dbs.values():
                conn.close()

        # A proactive refresh: new shares at a new epoch, each under its record's group.
        r = vaultctl("refresh", "--dir", root, "--format", "json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        with MatcherClient.from_cluster_dir(root) as client:
            assert (client.identify(probe, "store-a").subject, client.identify(probe, "store-b").decision) == (
                "a-2", "NO_MATCH")
            assert client.identify(noisy_copy(t[5], seed=45), "store-b").subject == "b-0"
        dbs = _node_dbs(root)
        try:
            for name, conn in dbs.items():
                rows = conn.execute("SELECT subject, epoch, grp FROM shares").fetchall()
                assert {e for _, e, _ in rows} == {2}, name
                assert {s: g for s, _, g in rows}["a-4"] == "store-a" and len(rows) == 7, name
        finally:
            for conn in dbs.values():
                conn.close()

        # A reshare to a new committee of four: every record moves with its group.
        r = vaultctl("reshare", "--dir", root, "--shareholders", "4", "--threshold", "2",
                     "--approve-with-dev-operators", "--format", "json", timeout=300)
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
        with MatcherClient.from_cluster_dir(root) as client:
            assert (client.identify(probe, "store-a").subject, client.identify(probe, "store-b").decision) == (
                "a-2", "NO_MATCH")
        dbs = _node_dbs(root, nodes=4)
        try:
            for name, conn in dbs.items():
                stored = dict(conn.execute("SELECT subject, grp FROM shares WHERE epoch = 3").fetchall())
                assert stored == {**{s: "store-a" for s in store_a}, "b-0": "store-b", "nobody-group": ""}, name
        finally:
            for conn in dbs.values():
                conn.close()
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


def test_the_group_is_signed_and_only_where_it_means_something():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    keys = {"k1": key.public_key()}
    probe = np.ones(8, dtype=np.float32)
    signed = wire.issue_ticket(key, "k1", tenant="acme", subject="", request_id="r1", audience="c1", probe=probe,
                               operation=ticket.IDENTIFY, group="store-a")
    assert wire.verify_ticket(signed, keys, audience="c1", operations=(ticket.IDENTIFY,)).group == "store-a"
    for operation, kw in ((ticket.VERIFY, {"probe": probe}), (ticket.DELETE, {})):
        bad = wire.issue_ticket(key, "k1", tenant="acme", subject="s", request_id="r2", audience="c1",
                                operation=operation, group="store-a", **kw)
        with pytest.raises(InvalidTicket, match="group"):
            wire.verify_ticket(bad, keys, audience="c1", operations=(operation,))
    bad = wire.issue_ticket(key, "k1", tenant="acme", subject="", request_id="r3", audience="c1", probe=probe,
                            operation=ticket.IDENTIFY, group="x" * 65)
    with pytest.raises(InvalidTicket, match="64 bytes"):
        wire.verify_ticket(bad, keys, audience="c1", operations=(ticket.IDENTIFY,))
    # A batch ticket signs each item's group: moving an item to another group breaks it.
    batch = wire.issue_batch(key, "k1", tenant="acme", audience="c1", batch_id="b1", operation=ticket.ENROLL,
                             items=[("s1", "r1", probe, "store-a"), ("s2", "r2", probe)])
    body = wire.verify_ticket(batch.ticket, keys, audience="c1", operations=(ticket.ENROLL,), batch=True)
    assert ticket.batch_matches(body, batch.items)
    batch.items[1].group = "store-a"
    assert not ticket.batch_matches(body, batch.items)


def test_a_batch_gives_exactly_the_single_decisions(tmp_path):
    root = tmp_path / "cluster"
    t = synthetic_templates(12, DIM, seed=51)
    twin = (t[3] + 0.02 * np.random.default_rng(52).standard_normal(DIM) / np.sqrt(DIM)).astype(np.float32)
    cluster.up(root, dim=DIM)
    try:
        with MatcherClient.from_cluster_dir(root) as client:
            gallery = {f"c-{i}": t[i] for i in range(8)}
            assert [r.code for r in client.enroll_many(gallery.items(), group="g1")] == [0] * 8
            client.enroll("c-3-twin", twin, group="g2")
            probes = [noisy_copy(t[i], seed=60 + i) for i in range(8)] + [t[8], t[9], noisy_copy(t[3], seed=70)]
            for group in (None, "g1", "g2"):
                single = [client.identify(p, group) for p in probes]
                batch = client.identify_many(probes, group)
                assert [(r.decision, r.subject) for r in batch] == [(r.decision, r.subject) for r in single], group
                assert all(r.code == "OK" and r.decision_id for r in batch)
                assert len({r.decision_id for r in batch}) == len(probes)
            assert {r.decision for r in single} >= {"MATCH", "NO_MATCH"}
            assert client.identify_many(probes[-1:])[0].decision == "AMBIGUOUS"  # c-3 and its twin
            # A query that fails does not fail the others, and never reads as a MATCH.
            mixed = client.identify_many([probes[0], np.ones(DIM + 1, dtype=np.float32), probes[1]])
            assert [(r.decision, r.code) for r in mixed] == [("MATCH", "OK"), ("ERROR", "INVALID_ARGUMENT"),
                                                             ("MATCH", "OK")]
            with pytest.raises(grpc.RpcError) as err:
                client.identify_many([probes[0]] * 33)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Every node wrote one identify entry per query, batch or not (3 x 2 x 11, then 1 + 2).
        dbs = _node_dbs(root)
        try:
            for name, conn in dbs.items():
                n = conn.execute("SELECT COUNT(*) FROM audit_log WHERE event = 'identify'").fetchone()[0]
                assert n == 3 * 2 * len(probes) + 1 + 2, name
        finally:
            for conn in dbs.values():
                conn.close()
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)
