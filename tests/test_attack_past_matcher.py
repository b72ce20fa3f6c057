"""A past matcher plus one node cannot plant a template after a refresh (issue 10, hole 3).

The attacker acted as the matcher in epoch e: with the matcher's certificate
and a genuine provider ticket it made real ReleaseShare calls to every node
and rejoined alice's record [s | t] and the epoch's MAC key b. It also holds
one node (its database and its KEK). It rewrites that node's share row so
that the rejoined template becomes its own face, with tags <b, face> that
pass. Over real processes (`vaultctl cluster up`, `vaultctl refresh`):

1. in epoch e the forgery works: Verify of the attacker's probe says MATCH
   (the attack is real, the key b of epoch e is all it needs);
2. the attacker puts the row back (to stay hidden) and the auditor runs
   `vaultctl refresh`: the tags are renewed under a new key b' that nobody
   has rejoined;
3. the same forgery, built from what the attacker knows (b of epoch e, the
   node's new share and its KEK), gives no MATCH: the pair with the forged
   share fails its tags, the matcher falls back to the other nodes and names
   the forging node as suspect; alice's genuine probe still MATCHes.
"""
from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import sys
import uuid
import zlib

import grpc
import numpy as np
import pytest

from shareholders.config import load_config, parse_kek_json
from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from vault import codec, envelope, epoch_mac, field, pki, record, sharing, ticket
from vault.envelope import SealedShare
from vault.field import FIELD_DTYPE
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultrpc import wire
from vaultrpc.tls import secure_channel

pytestmark = pytest.mark.e2e
DIM = 32
L = epoch_mac.TAG_COUNT
TENANT = "demo-psp"


def _unit(rng) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def vaultctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaultctl", *args], capture_output=True, text=True, timeout=300)


class PastMatcher:
    """What the attacker holds: the matcher's certificate and what it rejoined."""

    def __init__(self, root: pathlib.Path, info: dict):
        self.root = root
        self.nodes = {n["name"]: n for n in info["shareholders"]}
        tls = cluster.Paths(root).tls(pki.ROLE_MATCHER, "matcher").load()
        self.channels = {name: secure_channel(n["address"], tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, name))
                         for name, n in self.nodes.items()}

    def release_all(self, provider: MatcherClient, subject: str, probe: np.ndarray):
        """Real ReleaseShare calls to every node with one genuine VERIFY ticket: (xs, [s|t], b, epoch)."""
        signed = provider.ticket(ticket.VERIFY, subject, f"v-{uuid.uuid4()}", probe=probe)
        xs, ys, epoch = [], [], None
        for name, ch in self.channels.items():
            reply = shareholder_pb2_grpc.ShareholderStub(ch).ReleaseShare(
                shareholder_pb2.ReleaseShareRequest(ticket=signed), timeout=30)
            share, key = reply.shares[-1], reply.mac_keys[-1]
            assert key.epoch == share.epoch
            epoch = share.epoch
            xs.append(share.index)
            ys.append(np.concatenate([record.unpack_values(share.values, DIM + L),
                                      record.unpack_values(key.values, L * DIM)]))
        joined = sharing.reconstruct(xs, np.stack(ys)[:, np.newaxis, :])[0]
        ext, b = joined[: DIM + L], joined[DIM + L:].reshape(L, DIM)
        assert epoch_mac.check(ext[np.newaxis, :], b).all()  # the attacker really holds s, t and b
        return ext, b, epoch

    def close(self):
        for ch in self.channels.values():
            ch.close()


class StolenNode:
    """One node's database and KEK in the attacker's hands."""

    def __init__(self, config_path: str):
        cfg = load_config(config_path, env={})
        self.name, self.index = cfg.name, cfg.index
        self.db = cfg.db_path
        self.ring = parse_kek_json(pathlib.Path(cfg.kek_file).read_bytes(), cfg.kek_file)

    def _row(self, conn, subject):
        return conn.execute(
            "SELECT epoch, kek_version, wrapped_dk, nonce, ciphertext FROM shares WHERE tenant = ? AND subject = ? "
            "ORDER BY epoch DESC LIMIT 1", (TENANT, subject)).fetchone()

    def read(self, subject: str) -> tuple[int, np.ndarray]:
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            epoch, v, w, n, c = self._row(conn, subject)
        finally:
            conn.close()
        aad = record.record_identity(TENANT, subject, self.index, epoch)
        raw = envelope.open(self.ring, aad, SealedShare(v, bytes(w), bytes(n), bytes(c)))
        return epoch, record.unpack_values(raw, DIM + L)

    def write(self, subject: str, epoch: int, values: np.ndarray) -> None:
        sealed = envelope.seal(self.ring, record.record_identity(TENANT, subject, self.index, epoch),
                               record.pack_values(values))
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            conn.execute("UPDATE shares SET kek_version = ?, wrapped_dk = ?, nonce = ?, ciphertext = ? "
                         "WHERE tenant = ? AND subject = ? AND epoch = ?",
                         (sealed.kek_version, sealed.wrapped_dk, sealed.nonce, sealed.ciphertext, TENANT, subject,
                          epoch))
            conn.commit()
        finally:
            conn.close()


def first_pair(info: dict, subject: str, k: int) -> list[dict]:
    # The k nodes the matcher asks first for this subject (hedged release:
    # matcher.release.release_order; no node has been down).
    nodes = info["shareholders"]
    start = zlib.crc32(f"{TENANT}\x00{subject}".encode()) % len(nodes)
    return (nodes[start:] + nodes[:start])[:k]


def suspects_in(log_path: str, after: int) -> list[str]:
    names = []
    with open(log_path, encoding="utf-8") as fh:
        for line in fh.readlines()[after:]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("msg") == "inconsistent share" or event.get("event") == "inconsistent share":
                names.append(event.get("node"))
    return names


def log_lines(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return len(fh.readlines())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("past-matcher") / "cluster"
    info = cluster.up(root, dim=DIM)
    attacker = None
    try:
        attacker = PastMatcher(root, info)
        yield root, info, attacker
    finally:
        if attacker is not None:
            attacker.close()
        cluster.down(root)


def test_past_matcher_plus_one_node_cannot_plant_a_template_after_a_refresh(world):
    root, info, attacker = world
    rng = np.random.default_rng(20261202)
    alice, face = _unit(rng), _unit(rng)
    k = info["spec"]["threshold"]
    with MatcherClient.from_cluster_dir(root) as provider:
        provider.enroll("alice", alice, request_id="enrol-alice")
        assert provider.verify("alice", alice).decision == "MATCH"
        assert provider.verify("alice", face).decision == "NO_MATCH"

        # Epoch e: the attacker, as the matcher, rejoins s, t and b.
        ext, b_e, epoch_e = attacker.release_all(provider, "alice", alice)
        # It forges through the node the matcher asks first, paired with the next one.
        pair = first_pair(info, "alice", k)
        stolen = StolenNode(pair[0]["config"])
        xs = tuple(n["index"] for n in pair)
        lam = int(field.lagrange_at_zero(xs)[0])
        target = epoch_mac.extend(codec.to_field(codec.encode(face, DIM)), b_e)[0]
        # One shift of the stolen share moves the rejoined [s | t] to [face | <b_e, face>].
        delta = field.mul(field.sub(target, ext), np.full(DIM + L, field.inv(lam), dtype=FIELD_DTYPE))
        epoch, genuine_share = stolen.read("alice")
        assert epoch == epoch_e
        stolen.write("alice", epoch, field.add(genuine_share, delta))

        # 1. The attack is real in the epoch the attacker saw.
        assert provider.verify("alice", face).decision == "MATCH"

        # 2. The attacker hides its tracks; the auditor refreshes.
        stolen.write("alice", epoch, genuine_share)
        assert provider.verify("alice", alice).decision == "MATCH"
        out = vaultctl("refresh", "--dir", str(root), "--format", "json")
        assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
        report = json.loads(out.stdout)
        assert report["state"] == "finalized" and report["new_epoch"] > epoch_e

        # 3. The same forgery, from what the attacker knows, on the node's new share.
        new_epoch, new_share = stolen.read("alice")
        assert new_epoch == report["new_epoch"]
        stolen.write("alice", new_epoch, field.add(new_share, delta))
        log = info["matcher"]["log"]
        before = log_lines(log)
        result = provider.verify("alice", face)
        assert result.decision == "NO_MATCH"
        assert stolen.name in suspects_in(log, before)

        # The genuine customer still pays, and the forging node is named again.
        before = log_lines(log)
        assert provider.verify("alice", alice).decision == "MATCH"
        assert stolen.name in suspects_in(log, before)


def test_key_shares_are_sealed_per_epoch_and_the_old_key_is_destroyed(world):
    root, info, _ = world
    for node in info["shareholders"]:
        stolen = StolenNode(node["config"])
        conn = sqlite3.connect(stolen.db, timeout=30)
        try:
            rows = conn.execute("SELECT epoch, width, kek_version, wrapped_dk, nonce, ciphertext FROM mac_keys").fetchall()
            current = conn.execute("SELECT current_epoch FROM node_state").fetchone()[0]
        finally:
            conn.close()
        # One key share, for the current epoch only (the refresh destroyed the one the attacker saw).
        assert [r[0] for r in rows] == [current]
        epoch, width, v, w, n, c = rows[0]
        assert width >= DIM
        sealed = SealedShare(v, bytes(w), bytes(n), bytes(c))
        aad = record.key_identity(load_config(node["config"], env={}).cluster_id, stolen.name, stolen.index, epoch)
        assert len(envelope.open(stolen.ring, aad, sealed)) == 4 * L * width
        # Bound to node and epoch: it does not open as another epoch's or node's key.
        for other in (record.key_identity("x", stolen.name, stolen.index, epoch),
                      record.key_identity(load_config(node["config"], env={}).cluster_id, stolen.name, stolen.index,
                                          epoch + 1)):
            with pytest.raises(Exception):
                envelope.open(stolen.ring, other, sealed)


def test_key_shares_go_only_to_the_matcher_for_a_provider_authorised_enrolment(world):
    root, info, attacker = world
    paths = cluster.Paths(root)
    node = info["shareholders"][0]
    rng = np.random.default_rng(7)
    face = _unit(rng)

    def ask(role: str, name: str, signed) -> tuple:
        ch = secure_channel(node["address"], paths.tls(role, name).load(),
                            expect=pki.Identity(pki.ROLE_SHAREHOLDER, node["name"]))
        try:
            reply = shareholder_pb2_grpc.ShareholderStub(ch).GetMacKeyShare(
                shareholder_pb2.GetMacKeyShareRequest(dimension=DIM, ticket=signed), timeout=10)
            return "OK", reply
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
        finally:
            ch.close()

    with MatcherClient.from_cluster_dir(root) as provider:
        genuine = provider.ticket(ticket.ENROLL, "carol", "enrol-carol", template=face)
        verify_ticket = provider.ticket(ticket.VERIFY, "carol", "verify-carol", probe=face)
    forged_key = pki.load_signing_key(pki.new_signing_key()[0])
    forged = wire.issue_ticket(forged_key, f"{TENANT}-1", tenant=TENANT, subject="carol", request_id="enrol-carol",
                               audience=load_config(node["config"], env={}).cluster_id, operation=ticket.ENROLL,
                               template=face)
    # Only the matcher role may ask (the auditor and a PSP are refused before the handler).
    assert ask(pki.ROLE_AUDITOR, "auditor", genuine)[0] == "PERMISSION_DENIED"
    assert ask(pki.ROLE_PSP, TENANT, genuine)[0] == "PERMISSION_DENIED"
    # The matcher needs the provider's write ticket: not a forged one, not a verification's.
    for signed in (forged, verify_ticket):
        code, details = ask(pki.ROLE_MATCHER, "matcher", signed)
        assert code == "PERMISSION_DENIED" and details.endswith(".") and "\n" not in details
    code, reply = ask(pki.ROLE_MATCHER, "matcher", genuine)
    assert code == "OK" and reply.key.dimension == DIM and len(reply.key.values) == 4 * L * DIM
    conn = sqlite3.connect(load_config(node["config"], env={}).db_path, timeout=30)
    try:
        events = [r[0] for r in conn.execute("SELECT event FROM audit_log WHERE seq = ?", (reply.audit_seq,))]
    finally:
        conn.close()
    assert events == ["mac_key_release"]


def test_committees_that_cannot_renew_the_key_are_refused(tmp_path):
    for n, k in ((2, 2), (4, 3)):
        with pytest.raises(cluster.ClusterError, match="2k - 1"):
            cluster.up(tmp_path / f"c{n}{k}", shareholders=n, threshold=k, dim=DIM)
        assert not (tmp_path / f"c{n}{k}" / "cluster.json").exists()
