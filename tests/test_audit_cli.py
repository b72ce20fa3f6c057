"""``vaultctl audit verify`` and ``vaultctl audit reconcile`` on a real local
cluster after a demo-like run (enrolments, genuine and impostor
verifications, one verification that released a single share, one refused
ticket): clean results first, over RPC with ``--dir`` and ``--config``; then,
with the cluster stopped, the logs are tampered with in the nodes' SQLite
files and read offline: an edited, a removed and a reordered entry, a cut
tail (caught by the witness of an earlier run, and, documented, not without
it), and forged releases appended with the chain recomputed and re-signed by
an insider holding the node's audit key (the chain verifies; reconciliation
catches every one), beside a forged release the chain catches first."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing

import numpy as np
import pytest

from shareholders import storage
from shareholders.storage.dialect import SQLITE
from splitvault.v1 import shareholder_pb2 as pb
from splitvault.v1 import shareholder_pb2_grpc
from vault import audit, pki
from vault import ticket as tickets
from vaultctl import cluster
from vaultctl.cli import main
from vaultctl.client import MatcherClient
from vaultctl.demo import noisy_copy, synthetic_templates
from vaultrpc import wire
from vaultrpc.tls import secure_channel

DIM = 16
SUBJECTS = 12
TENANT = cluster.DEFAULT_TENANT
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")}


def vaultctl_json(*args: str) -> tuple[int, dict]:
    """The real CLI in its own process."""
    proc = subprocess.run([sys.executable, "-m", "vaultctl", *args, "--format", "json"], capture_output=True,
                          text=True, env=ENV, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def run(capsys, *args: str) -> tuple[int, dict]:
    """The CLI in this process (quicker; same code path after start-up)."""
    capsys.readouterr()
    code = main([*args, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def psp_ticket(root, subject: str, request_id: str, key=None):
    key = key or pki.load_signing_key(cluster.Paths(root).ticket_key(TENANT).read_bytes())
    return wire.issue_ticket(key, cluster.key_id(TENANT), tenant=TENANT, subject=subject, request_id=request_id,
                         probe=np.zeros(DIM, dtype=np.float32), audience=cluster.cluster_id(root))


def release_direct(root, node: str, ticket):
    """A ReleaseShare straight to one node with the matcher's certificate."""
    paths, spec = cluster.Paths(root), cluster.load_spec(root)
    address = json.loads(paths.ready(spec, node).read_text())["address"]
    with secure_channel(address, paths.tls("matcher", spec.matcher).load(), expect=pki.Identity("shareholder", node)) as channel:
        return shareholder_pb2_grpc.ShareholderStub(channel).ReleaseShare(pb.ReleaseShareRequest(ticket=ticket), timeout=10)


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A cluster after a short demo; stopped at the end of the module."""
    import grpc

    root = tmp_path_factory.mktemp("audit") / "cluster"
    cluster.up(root, 3, 2, DIM)
    try:
        templates = synthetic_templates(SUBJECTS, DIM, seed=5)
        impostor = synthetic_templates(1, DIM, seed=6)[0]
        with MatcherClient.from_cluster_dir(root) as client:
            assert not [r for r in client.enroll_many((f"s{i}", templates[i]) for i in range(SUBJECTS)) if r.code]
            for i in range(4):
                assert client.verify(f"s{i}", noisy_copy(templates[i], i)).decision == "MATCH"
            for i in range(2):
                assert client.verify(f"s{i}", impostor).decision == "NO_MATCH"
            # Writes one at a time too (per-record store entries, a replace, a delete), each under its ticket.
            client.enroll("w1", templates[0], request_id="enrol-w1")
            client.enroll("w1", templates[1], request_id="enrol-w1b", replace=True)
            assert client.delete("w1", request_id="erase-w1").complete
        # A verification that reached one node only: it released fewer than k shares.
        release_direct(root, "bank-a", psp_ticket(root, "s5", "lonely-1"))
        # A ticket signed by a key the provider never registered: refused and logged.
        forged_key = pki.load_signing_key(pki.new_signing_key()[0])
        with pytest.raises(grpc.RpcError):
            release_direct(root, "bank-b", psp_ticket(root, "s6", "forged-1", key=forged_key))
        yield root
    finally:
        cluster.down(root)


# ---------------------------------------------------------------- clean, over RPC


def test_trust_anchors_are_recorded_in_cluster_json(story):
    spec = json.loads(cluster.Paths(story).spec.read_text())
    for node in ("bank-a", "bank-b", "bank-c"):
        key = pki.load_signing_key((cluster.Paths(story).node_dir(node) / "audit.key").read_bytes())
        assert spec["trust"]["audit_keys"][node] == pki.public_key_raw(key).hex()
    assert list(spec["trust"]["ticket_keys"][TENANT]) == [cluster.key_id(TENANT)]


def test_audit_verify_clean(story):
    code, out = vaultctl_json("audit", "verify", "--dir", str(story))
    assert code == 0 and out["ok"], out
    assert [n["name"] for n in out["nodes"]] == ["bank-a", "bank-b", "bank-c"]
    for n in out["nodes"]:
        assert n["ok"] and n["source"].startswith("rpc") and n["broken_seq"] is None and n["entries"] > 2
    witness = json.loads((cluster.Paths(story).root / "maintenance" / "audit-witness.json").read_text())
    assert set(witness) == {"bank-a", "bank-b", "bank-c"}


def test_audit_verify_with_an_auditor_config(story, tmp_path, capsys):
    info = cluster.status(story)
    trust = cluster.load_trust(story)
    lines = [
        "[auditor]", "threshold = 2", f'state_dir = "{tmp_path / "state"}"', "",
        "[tls]", f'ca = "{info["tls"]["ca"]}"', f'cert = "{info["tls"]["auditor"]["cert"]}"',
        f'key = "{info["tls"]["auditor"]["key"]}"', "",
    ]
    for n in info["shareholders"]:
        lines += ["[[shareholders]]", f'name = "{n["name"]}"', f"index = {n['index']}", f'address = "{n["address"]}"',
                  f'audit_public_key = "{trust["audit_keys"][n["name"]]}"', ""]
    config = tmp_path / "auditor.toml"
    config.write_text("\n".join(lines))
    code, out = run(capsys, "audit", "verify", "--config", str(config), "--node", "bank-b")
    assert code == 0 and [n["name"] for n in out["nodes"]] == ["bank-b"]
    # The auditor's other command on the same config: a KEK rotation, then a clean chain.
    code, out = run(capsys, "rotate", "kek", "--config", str(config), "--node", "bank-c")
    assert code == 0 and (out["to_version"], out["retired_versions"]) == (2, [1])
    assert list((tmp_path / "state").glob("rotate-kek-*")) == []  # done: no session left to resume
    code, out = run(capsys, "audit", "verify", "--config", str(config), "--node", "bank-c")
    assert code == 0
    # A wrong recorded key is a finding: the node cannot vouch for itself.
    config.write_text(config.read_text().replace(trust["audit_keys"]["bank-b"], trust["audit_keys"]["bank-c"]))
    code, out = run(capsys, "audit", "verify", "--config", str(config), "--node", "bank-b")
    assert code == 3 and not out["ok"]
    assert "other than the recorded one" in json.dumps(out["nodes"][0]["problems"])


def test_audit_reconcile_clean(story):
    code, out = vaultctl_json("audit", "reconcile", "--dir", str(story))
    assert code == 0 and out["ok"], out
    assert out["unexplained_count"] == 0 and out["unexplained"] == []
    assert out["verifications"] == 7 and out["complete"] == 6 and out["incomplete_count"] == 1
    assert out["incomplete"][0]["request_id"] == "lonely-1" and out["incomplete"][0]["nodes"] == ["bank-a"]
    assert out["denials"] == {"invalid_ticket": 1}
    # Every store, bulk store, delete and MAC key share given for an enrolment
    # (one per node per enrolment or bulk batch) is explained by the provider's ticket too.
    assert out["writes"] == {"delete": 3, "mac_key_release": 9, "store": 6, "store_batch": 3}, out["writes"]
    # The matcher asks k nodes or all n: between k and n releases per verification.
    assert 6 * 2 + 1 <= sum(n["releases"] for n in out["nodes"]) <= 6 * 3 + 1


def test_unknown_node_is_a_usage_error(story, capsys):
    code, out = run(capsys, "audit", "verify", "--dir", str(story), "--node", "bank-z")
    assert code == 1 and "bank-z" in out["error"]["message"]


# ---------------------------------------------------------------- tampering, offline


@pytest.fixture(scope="module")
def pristine(story, tmp_path_factory):
    """Stop the cluster; keep a copy of every node's database."""
    cluster.down(story)
    keep = tmp_path_factory.mktemp("pristine")
    for node in ("bank-a", "bank-b", "bank-c"):
        db = cluster.Paths(story).node_dir(node) / "shares.db"
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copy(db, keep / f"{node}.db")
    return keep


@pytest.fixture()
def offline(story, pristine):
    """Fresh copies of the stopped nodes' databases and no witness."""
    paths = cluster.Paths(story)
    for node in ("bank-a", "bank-b", "bank-c"):
        db = paths.node_dir(node) / "shares.db"
        for extra in ("-wal", "-shm"):
            db.with_name(db.name + extra).unlink(missing_ok=True)
        shutil.copy(pristine / f"{node}.db", db)
    (paths.root / "maintenance" / "audit-witness.json").unlink(missing_ok=True)
    return story


def db(root, node: str):
    """A connection to a stopped node's database, closed on leaving the block."""
    return closing(sqlite3.connect(cluster.Paths(root).node_dir(node) / "shares.db", isolation_level=None))


def test_offline_verify_is_clean_before_tampering(offline, capsys):
    code, out = run(capsys, "audit", "verify", "--dir", str(offline))
    assert code == 0 and all(n["source"].startswith("file") for n in out["nodes"])
    assert all(n["signed_seq"] == n["head_seq"] for n in out["nodes"])  # signed at shutdown


def _edit(conn):
    conn.execute("UPDATE audit_log SET details_json = '{\"reason\":\"nothing to see\"}' WHERE seq = 5")


def _delete(conn):
    conn.execute("DELETE FROM audit_log WHERE seq = 5")


def _reorder(conn):
    cols = "time_ms, node, event, actor, request_id, tenant, subject, details_json, prev_hash, entry_hash"
    five = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 5").fetchone()
    six = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 6").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = 5", six)
    conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = 6", five)


@pytest.mark.parametrize("tamper, words", [(_edit, "was altered"), (_delete, "is missing"), (_reorder, "was altered")])
def test_audit_verify_names_the_first_broken_entry(offline, capsys, tamper, words):
    with db(offline, "bank-b") as conn:
        tamper(conn)
    code, out = run(capsys, "audit", "verify", "--dir", str(offline))
    assert code == 3 and not out["ok"]
    verdicts = {n["name"]: n for n in out["nodes"]}
    assert verdicts["bank-a"]["ok"] and verdicts["bank-c"]["ok"]
    assert verdicts["bank-b"]["broken_seq"] == 5 and words in verdicts["bank-b"]["reason"]


def test_the_real_cli_exits_3_on_a_break(offline):
    with db(offline, "bank-c") as conn:
        _edit(conn)
    code, out = vaultctl_json("audit", "verify", "--dir", str(offline), "--node", "bank-c")
    assert code == 3 and out["nodes"][0]["broken_seq"] == 5
    # The same with a copy of the database, as an operator would hand it over.
    code, out = vaultctl_json("audit", "verify", "--dir", str(offline), "--node", "bank-c", "--db",
                              str(cluster.Paths(offline).node_dir("bank-c") / "shares.db"))
    assert code == 3 and out["nodes"][0]["broken_seq"] == 5


def test_a_cut_tail_is_caught_by_the_witness_and_not_without_it(offline, capsys):
    code, out = run(capsys, "audit", "verify", "--dir", str(offline), "--node", "bank-a")
    assert code == 0
    head, witnessed = out["nodes"][0]["head_seq"], out["nodes"][0]["witnessed_seq"]
    cut = head - 3
    with db(offline, "bank-a") as conn:  # everything after `cut`, its signatures too
        conn.execute("DELETE FROM audit_log WHERE seq > ?", (cut,))
        conn.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (cut,))
    code, out = run(capsys, "audit", "verify", "--dir", str(offline), "--node", "bank-a")
    assert code == 3 and out["nodes"][0]["broken_seq"] == cut + 1
    assert "entries were removed" in out["nodes"][0]["reason"]
    # Without an earlier run's witness, a cut is visible only if a peer
    # witnessed a checkpoint past it (tests/test_audit_witness.py): the
    # nodes signed their heads at the same shutdown, peers often already
    # gone. Otherwise it is invisible (docs/operations.md): the log
    # verifies, with a note.
    (cluster.Paths(offline).root / "maintenance" / "audit-witness.json").unlink()
    code, out = run(capsys, "audit", "verify", "--dir", str(offline), "--node", "bank-a")
    if witnessed > cut:
        assert code == 3 and "witnessed" in out["nodes"][0]["reason"]
    else:
        assert code == 0 and out["nodes"][0]["head_seq"] == cut and out["nodes"][0]["warnings"]


def _append(conn, node_key, node: str, **fields) -> int:
    """Append an entry the way a node would, and re-sign the head (an insider
    with the node's audit key): the chain and its checkpoints verify."""
    db = storage.Database(conn, SQLITE)
    seq, head = db.audit_head()
    entry = audit.make_entry(seq=seq + 1, prev_hash=head, time_ms=tickets.now_ms(), node=node, **fields)
    db.insert_entry(entry)
    db.insert_checkpoint(audit.sign_checkpoint(node_key, node, entry.seq, entry.entry_hash, entry.time_ms))
    return entry.seq


def test_forged_releases_pass_the_chain_but_not_reconciliation(offline, capsys):
    root = offline
    key = pki.load_signing_key((cluster.Paths(root).node_dir("bank-a") / "audit.key").read_bytes())
    stranger = pki.load_signing_key(pki.new_signing_key()[0])
    with db(root, "bank-a") as conn:
        genuine = conn.execute(
            "SELECT actor, request_id, tenant, subject, details_json FROM audit_log WHERE event = 'release' "
            "AND request_id != 'lonely-1' LIMIT 1").fetchone()
        base = {"counted": True, "key_id": cluster.key_id(TENANT), "epochs": [1], "ticket_expires_ms": 0}
        who = dict(actor="matcher/matcher", tenant=TENANT, subject="s9")
        no_ticket = _append(conn, key, "bank-a", event="release", request_id="ghost-1", details=base, **who)
        fake = psp_ticket(root, "s9", "ghost-2", key=stranger)
        bad_sig = _append(conn, key, "bank-a", event="release", request_id="ghost-2",
                          details={**base, **tickets.audit_details(fake)}, **who)
        # The same genuine ticket honoured twice by one node.
        twice = _append(conn, key, "bank-a", event="release", actor=genuine[0], request_id=genuine[1],
                        tenant=genuine[2], subject=genuine[3], details=json.loads(genuine[4]))
    code, out = run(capsys, "audit", "verify", "--dir", str(root))
    assert code == 0, out  # the insider re-signed the chain: it verifies
    code, out = run(capsys, "audit", "reconcile", "--dir", str(root))
    assert code == 3 and not out["ok"]
    found = {u["seq"]: u["reason"] for u in out["unexplained"] if u["node"] == "bank-a"}
    assert out["unexplained_count"] == 3 and set(found) == {no_ticket, bad_sig, twice}
    assert "records no ticket" in found[no_ticket]
    assert "signature does not verify" in found[bad_sig]
    assert "second share" in found[twice]
    capsys.readouterr()
    assert main(["audit", "reconcile", "--dir", str(root)]) == 3
    text = capsys.readouterr().out
    assert "unexplained releases and writes: 3" in text and "reconciliation FAILED" in text


def test_a_forged_release_without_the_audit_key_is_caught_by_the_chain_first(offline, capsys):
    with db(offline, "bank-c") as conn:
        seq = conn.execute("SELECT MIN(seq) FROM audit_log WHERE event = 'store_batch'").fetchone()[0]
        conn.execute("UPDATE audit_log SET event = 'release', request_id = ?, actor = 'matcher/matcher' WHERE seq = ?",
                     (f"ghost-{uuid.uuid4().hex[:6]}", seq))
    code, out = run(capsys, "audit", "verify", "--dir", str(offline))
    assert code == 3 and {n["name"]: n["broken_seq"] for n in out["nodes"]}["bank-c"] == seq
    code, out = run(capsys, "audit", "reconcile", "--dir", str(offline))
    # Reconciliation reports the break and trusts nothing from it on.
    assert code == 3 and out["unexplained_count"] == 0
    assert {n["name"]: n["broken_seq"] for n in out["nodes"]}["bank-c"] == seq


def test_forged_writes_pass_the_chain_but_not_reconciliation(offline, capsys):
    # An insider with bank-a's audit key writes entries for writes no provider signed.
    root = offline
    key = pki.load_signing_key((cluster.Paths(root).node_dir("bank-a") / "audit.key").read_bytes())
    provider = pki.load_signing_key(cluster.Paths(root).ticket_key(TENANT).read_bytes())
    aud = cluster.cluster_id(root)
    who = dict(actor="matcher/matcher", tenant=TENANT)

    def signed(subject, request_id, operation, audience=aud, **vectors):
        t = wire.issue_ticket(provider, cluster.key_id(TENANT), tenant=TENANT, subject=subject, request_id=request_id,
                          audience=audience, operation=operation, **vectors)
        return {"key_id": cluster.key_id(TENANT), **tickets.audit_details(t)}

    zeros = np.zeros(DIM, dtype=np.float32)

    def forged_batch():
        stranger = pki.load_signing_key(pki.new_signing_key()[0])
        b = wire.issue_batch(stranger, cluster.key_id(TENANT), tenant=TENANT, audience=aud, batch_id="b-x",
                             operation=tickets.ENROLL, items=[("s7", "plant-3", zeros)])
        d = tickets.audit_details(b.ticket)
        return [b.ticket.key_id, d["ticket_sig"], *d["ticket"]]
    with db(root, "bank-a") as conn:
        found_expected = {
            _append(conn, key, "bank-a", event="store", request_id="plant-1", subject="s3",
                    details={"epoch": 1, "replaced": True}, **who): "records no ticket",
            # The provider's genuine VERIFY ticket recorded as the authority for a delete.
            _append(conn, key, "bank-a", event="delete", request_id="pay-9", subject="s4",
                    details={"deleted": 1, **signed("s4", "pay-9", tickets.VERIFY, probe=zeros)}, **who):
                "authorises verify",
            # A genuine ENROLL ticket behind a store that replaced another request's records.
            _append(conn, key, "bank-a", event="store", request_id="plant-2", subject="s5",
                    details={"epoch": 1, "replaced": True, **signed("s5", "plant-2", tickets.ENROLL, template=zeros)},
                    **who): "authorises enroll",
            # A ticket for another cluster.
            _append(conn, key, "bank-a", event="delete", request_id="erase-9", subject="s6",
                    details={"deleted": 1, **signed("s6", "erase-9", tickets.DELETE, audience="elsewhere")}, **who):
                "another cluster",
            # A bulk store under a batch ticket signed by a key the provider never registered.
            _append(conn, key, "bank-a", event="store_batch", request_id="", subject="",
                    details={"records": 1, "tickets": 1, "tickets_sha256": "0" * 64, "batch_tickets": 1,
                             "batch_ticket_0": forged_batch(), "records_sha256": "0" * 64}, **who):
                "signature does not verify",
            # A bulk store that names no tickets.
            _append(conn, key, "bank-a", event="store_batch", request_id="", subject="",
                    details={"records": 5, "records_sha256": "0" * 64}, **who): "no digest",
        }
    code, out = run(capsys, "audit", "verify", "--dir", str(root))
    assert code == 0, out  # the insider re-signed the chain: it verifies
    code, out = run(capsys, "audit", "reconcile", "--dir", str(root))
    assert code == 3 and not out["ok"]
    found = {u["seq"]: u for u in out["unexplained"] if u["node"] == "bank-a"}
    assert out["unexplained_count"] == len(found_expected) and set(found) == set(found_expected), out["unexplained"]
    for seq, words in found_expected.items():
        assert words in found[seq]["reason"], (words, found[seq])
        assert found[seq]["event"] in ("store", "delete", "store_batch")
