"""Nodes on separate hosts: each shareholder node, the matcher, and the
provider's/auditor's workstation in its own network namespace (tests/
netns_kit.py), 5 ms each way between hosts through a delaying relay, the
addresses in every config being the hosts' own (10.77.0.x:7443), as a
deployment has them; servers are recognised by certificate name, never by
address. Then one node is cut off (its link dropped: packets lost, no reset):

- Verify keeps answering (inside the client's deadline) with k = 2 of 3
  reachable, and fails closed (UNAVAILABLE, never MATCH) with fewer;
- a refresh interrupted by the partition resumes after the link comes back
  and completes; every template still matches on the new shares.

Root-only (``ip netns``), skipped cleanly otherwise; every namespace, veth
and process is removed at the end, even on failure.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import netns_kit
from vaultctl import cluster
from vaultctl.demo import noisy_copy, synthetic_templates

_UNAVAILABLE = netns_kit.available()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")]

DIM = 64
SUBJECTS = 30
DELAY_MS = 5
NODES = ("bank-a", "bank-b", "bank-c")
OPS = "ops"  # the provider's and the auditor's workstation
# A refresh prepares at most PACE records per second per node, so that the
# partition lands while it runs (SUBJECTS / PACE seconds of preparing).
PACE = 3

ENROLL_DRIVER = """
import json, pathlib, sys
import numpy as np
from vault import pki
from vaultctl.cli import load_client_config
from vaultctl.client import MatcherClient
from vaultrpc.tls import TlsFiles
cfg = load_client_config(pathlib.Path(sys.argv[1]))
client = MatcherClient(cfg.address, TlsFiles(cfg.ca, cfg.cert, cfg.key).load(), tenant=cfg.tenant,
                       ticket_key=pki.load_signing_key(pathlib.Path(cfg.ticket_key).read_bytes()),
                       key_id=cfg.key_id, matcher=cfg.matcher, cluster_id=cfg.cluster_id, timeout_s=cfg.timeout_s)
templates = np.load(sys.argv[2])
replies = list(client.enroll_many((f"s{i}", templates[i]) for i in range(len(templates))))
# A batch that timed out on a loaded machine stored nothing (UNAVAILABLE): enrol those subjects once more.
again = [i for i, r in enumerate(replies) if r.code]
codes = sorted({str(replies[i].code) for i in again})
if again:
    replies = list(client.enroll_many((f"s{i}", templates[i]) for i in again))
print(json.dumps({"failed": sum(1 for r in replies if r.code), "first_try": codes}))
client.close()
"""


def _q(value) -> str:
    return json.dumps(str(value))


def _node_config(paths: cluster.Paths, spec: cluster.ClusterSpec, name: str, hosts: netns_kit.Hosts) -> None:
    """The dev cluster's node.toml, with the deployment's addresses: it
    listens behind its host's relay, and reaches its peers (refresh pulls,
    checkpoint witnesses) at their hosts' addresses."""
    config = paths.config(spec, name)
    text = config.read_text().split(cluster.PEERS_HEADER, 1)[0]
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{netns_kit.LOCAL_PORT}"')
    for peer in spec.nodes:
        if peer != name:
            text = text.replace(f"ready_file = {_q(paths.ready(spec, peer))}", f"address = {_q(hosts.public(peer))}")
    assert f"listen = \"127.0.0.1:{netns_kit.LOCAL_PORT}\"" in text and "127.0.0.1:0" not in text
    assert text.count("[[witness.peers]]") == text.count("\naddress = ") == len(spec.nodes) - 1
    text += cluster.PEERS_HEADER + "".join(f"{_q(p)} = {_q(hosts.public(p))}\n" for p in spec.nodes if p != name)
    config.write_text(text)


def _client_configs(paths: cluster.Paths, spec: cluster.ClusterSpec, hosts: netns_kit.Hosts) -> tuple[pathlib.Path, pathlib.Path]:
    cid = cluster.cluster_id(paths.root)
    psp = paths.tls("psp", spec.tenant)
    client = paths.root / "client.toml"
    client.write_text(
        f"[matcher]\naddress = {_q(hosts.public('matcher'))}\nname = {_q(spec.matcher)}\ncluster_id = {_q(cid)}\n"
        f"timeout_s = 10\n\n[tls]\nca = {_q(psp.ca)}\ncert = {_q(psp.cert)}\nkey = {_q(psp.key)}\n\n"
        f"[tenant]\nid = {_q(spec.tenant)}\nticket_key = {_q(paths.ticket_key(spec.tenant))}\n"
        f"key_id = {_q(cluster.key_id(spec.tenant))}\n")
    auditor = paths.tls("auditor", spec.auditor)
    trust = cluster.load_trust(paths.root)
    nodes = "".join(
        f"\n[[shareholders]]\nname = {_q(n)}\nindex = {i}\naddress = {_q(hosts.public(n))}\n"
        f"audit_public_key = {_q(trust['audit_keys'][n])}\n" for i, n in enumerate(spec.nodes, start=1))
    audit = paths.root / "auditor.toml"
    audit.write_text(
        f"[auditor]\nthreshold = {spec.threshold}\ncluster_id = {_q(cid)}\ntimeout_s = 30\n"
        f"state_dir = {_q(paths.root / 'auditor-state')}\n\n"
        f"[tls]\nca = {_q(auditor.ca)}\ncert = {_q(auditor.cert)}\nkey = {_q(auditor.key)}\n{nodes}")
    return client, audit


@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts") / "cluster"
    spec = cluster.ClusterSpec(dim=DIM)
    paths = cluster.init(root, spec)
    hosts = netns_kit.Hosts(root, DELAY_MS)
    try:
        for name in (*NODES, spec.matcher, OPS):
            hosts.add_host(name)
        for name in NODES:
            _node_config(paths, spec, name, hosts)
        matcher_toml = paths.config(spec, spec.matcher)
        matcher_toml.write_text(cluster.matcher_config_text(paths, spec, {n: hosts.public(n) for n in NODES}).replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{netns_kit.LOCAL_PORT}"'))
        client_toml, auditor_toml = _client_configs(paths, spec, hosts)
        for name in (*NODES, spec.matcher):
            hosts.start_relay(name)
            module = "matcher" if name == spec.matcher else "shareholders"
            proc = hosts.spawn(name, [sys.executable, "-m", module, "--config", str(paths.config(spec, name))],
                               paths.log(spec, name), cwd=paths.process_dir(spec, name))
            netns_kit.wait_file(paths.ready(spec, name), proc, paths.log(spec, name))
        # The committee's first MAC key, dealt by the nodes across the hosts (the auditor's workstation asks).
        dealt = hosts.run(OPS, [sys.executable, "-m", "vaultctl", "mac-key", "deal", "--config", str(auditor_toml),
                                "--width", str(DIM), "--format", "json"])
        assert dealt.returncode == 0, dealt.stderr[-2000:]
        templates = np.stack(synthetic_templates(SUBJECTS, DIM, seed=77)).astype(np.float32)
        np.save(root / "templates.npy", templates)
        (root / "enroll.py").write_text(ENROLL_DRIVER)
        enrolled = hosts.run(OPS, [sys.executable, str(root / "enroll.py"), str(client_toml), str(root / "templates.npy")])
        assert enrolled.returncode == 0, enrolled.stderr[-2000:]
        assert json.loads(enrolled.stdout)["failed"] == 0, enrolled.stdout
        yield {"root": root, "hosts": hosts, "client": client_toml, "auditor": auditor_toml, "templates": templates}
    finally:
        left = hosts.close()
        assert left == [], f"namespaces left behind: {left}"


def vaultctl(c: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return c["hosts"].run(OPS, [sys.executable, "-m", "vaultctl", *args, "--format", "json"], timeout=timeout)


def verify(c: dict, i: int, seed: int, genuine: bool = True) -> subprocess.CompletedProcess:
    probe = noisy_copy(c["templates"][i if genuine else (i + 1) % SUBJECTS], seed=seed)
    path = c["root"] / f"probe-{i}-{seed}.json"
    path.write_text(json.dumps([float(x) for x in probe]))
    # The client's deadline: Verify must answer inside it (10 s, well above
    # the matcher's 2 s per node call), whatever the partition does.
    return vaultctl(c, "verify", "--config", str(c["client"]), "--subject", f"s{i}", "--probe", str(path),
                    "--timeout", "10")


def decision(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    return json.loads(r.stdout)["decision"]


def test_verify_answers_with_k_reachable_and_fails_closed_with_fewer(committee):
    c, hosts = committee, committee["hosts"]
    assert decision(verify(c, 0, seed=1)) == "MATCH"
    assert decision(verify(c, 1, seed=2, genuine=False)) == "NO_MATCH"

    hosts.partition("bank-c")
    try:
        # k = 2 reachable: answers, right both ways, whichever nodes the matcher asks first.
        for i in range(2, 6):
            assert decision(verify(c, i, seed=i)) == "MATCH"
        assert decision(verify(c, 6, seed=6, genuine=False)) == "NO_MATCH"

        hosts.partition("bank-b")
        try:
            for i in (7, 8):  # one share reachable: an error, never a MATCH
                r = verify(c, i, seed=i)
                assert r.returncode == 2, r.stdout
                err = json.loads(r.stdout)["error"]
                assert err["status"] == "UNAVAILABLE" and "decision" not in json.loads(r.stdout)
        finally:
            hosts.heal("bank-b")
    finally:
        hosts.heal("bank-c")
    # Back together: every node answers again (the channels reconnect).
    _until_match(c, 9)
    hosts.partition("bank-a")  # now b and c must both serve
    try:
        _until_match(c, 10)
    finally:
        hosts.heal("bank-a")


def _until_match(c: dict, i: int, attempts: int = 10) -> None:
    """A healed link comes back after gRPC's reconnect backoff: a verification
    may be refused (UNAVAILABLE) meanwhile, never answered wrongly."""
    for attempt in range(attempts):
        r = verify(c, i, seed=100 + attempt)
        if r.returncode == 0:
            assert json.loads(r.stdout)["decision"] == "MATCH"
            return
        assert json.loads(r.stdout)["error"]["status"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), r.stdout
        time.sleep(2)
    pytest.fail(f"subject s{i} did not verify after {attempts} attempts with every link up")


def test_a_refresh_interrupted_by_a_partition_resumes_and_completes(committee):
    c, hosts = committee, committee["hosts"]
    session_file = c["root"] / "auditor-state" / "epoch-session.json"
    log = c["root"] / "refresh-1.log"
    first = hosts.spawn(OPS, [sys.executable, "-m", "vaultctl", "refresh", "--config", str(c["auditor"]),
                              "--pace", str(PACE), "--format", "json"], log)
    try:
        netns_kit.wait_file(session_file, first, log)  # the session exists: the nodes are being asked
        time.sleep(2)  # into preparing (SUBJECTS / PACE = 10 s of it)
        assert first.poll() is None, log.read_text()[-2000:]
        hosts.partition("bank-c")
        # The run cannot finish without bank-c: it fails (its calls to bank-c
        # die on their deadlines or keepalives), naming the node.
        first.wait(timeout=300)
    finally:
        hosts.heal("bank-c")
    out = log.read_text()
    assert first.returncode == 2, out[-2000:]
    assert "bank-c" in json.loads(out.strip().splitlines()[-1])["error"]["message"]
    session = json.loads(session_file.read_text())
    assert session["kind"] == "refresh"

    # The link is back: the same command resumes the open session and completes.
    for attempt in range(6):
        again = vaultctl(c, "refresh", "--config", str(c["auditor"]), timeout=300)
        if again.returncode == 0:
            break
        assert json.loads(again.stdout)["error"]["status"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), again.stdout
        time.sleep(3)  # reconnect backoff after the partition
    report = json.loads(again.stdout)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    assert report["resumed"] is True and report["session_id"] == session["session_id"]
    assert report["new_epoch"] == session["new_epoch"] and sorted(report["nodes"]) == list(NODES)
    assert report["check"]["passed"] is True
    assert not session_file.exists()
    # Every template survived, on the new shares, whichever two nodes answer.
    hosts.partition("bank-a")
    try:
        for i in (0, 11, SUBJECTS - 1):
            _until_match(c, i)
    finally:
        hosts.heal("bank-a")
