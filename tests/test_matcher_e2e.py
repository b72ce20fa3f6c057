"""End to end over real processes: three ``python -m shareholders`` nodes
and ``python -m matcher``, configured from TOML files as in
docs/contracts.md, driven by the payment provider's client."""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from shareholders.testing import CLUSTER_ID, deal_first_key
from test_matcher_harness import DIM, KEY_WIDTH, ProxyNode, Tenant, noisy, unit
from vault import codec, pki
from vaultctl.client import MatcherClient

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parent.parent
NAMES = ("bank-a", "bank-b", "bank-c")


def _secret(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _tls(files) -> str:
    return f'[tls]\nca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'


class Processes:
    """Real node and matcher processes under one folder; ``close()`` stops them all."""

    def __init__(self, dev_pki, root: pathlib.Path, tenant: Tenant):
        self.pki, self.root, self.tenant = dev_pki, root, tenant
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, pathlib.Path] = {}
        self.addresses: dict[str, str] = {}

    def _spawn(self, name: str, module: str, config: pathlib.Path) -> None:
        log = config.parent / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as fh:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(config)], cwd=ROOT, stdout=fh, stderr=fh,
                env={k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")},
            )

    def _ready(self, name: str, path: pathlib.Path, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.logs[name].read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{name} did not become ready")

    def start_nodes(self) -> None:
        tenant = self.tenant
        for index, name in enumerate(NAMES, start=1):
            d = self.root / name
            d.mkdir(parents=True)
            _secret(d / "kek.json", json.dumps({"active": 1, "keys": {"1": secrets.token_hex(32)}}).encode())
            _secret(d / "audit.key", pki.new_signing_key()[0])
            (d / "node.toml").write_text(
                f'[node]\nname = "{name}"\ncluster_id = "{CLUSTER_ID}"\nindex = {index}\nlisten = "127.0.0.1:0"\ndata_dir = "{d}"\n'
                f'ready_file = "{d / "ready.json"}"\n\n' + _tls(self.pki.files("shareholder", name))
                + f'\n[keys]\nkek_file = "{d / "kek.json"}"\naudit_key_file = "{d / "audit.key"}"\n'
                + '\n[metrics]\nport = -1\n\n[limits]\nattempts_per_subject = 100\nattempt_window_s = 60\n'
                + f'\n[tenants.{tenant.name}]\nticket_keys = {{ "{tenant.key_id}" = "{tenant.public_hex}" }}\n'
                + '\n[committee]\nthreshold = 2\nmembers = { '
                + ", ".join(f'"{n}" = {i}' for i, n in enumerate(NAMES, start=1)) + ' }\n'
            )
            self._spawn(name, "shareholders", d / "node.toml")
        for name in NAMES:
            self.addresses[name] = self._ready(name, self.root / name / "ready.json")["address"]
        # The first epoch's MAC key, dealt by the nodes as `vaultctl cluster up` has them do.
        deal_first_key([(n, i, self.addresses[n]) for i, n in enumerate(NAMES, start=1)], 2,
                       self.pki.files("auditor", "auditor"), self.root / "maintenance", width=KEY_WIDTH)

    def start_matcher(self, call_timeout_ms: int = 2000) -> str:
        d = self.root / "matcher"
        d.mkdir()
        t = self.tenant
        nodes = "".join(
            f'\n[[shareholders]]\nname = "{n}"\nindex = {i}\naddress = "{self.addresses[n]}"\n'
            for i, n in enumerate(NAMES, start=1)
        )
        (d / "matcher.toml").write_text(
            f'[matcher]\nlisten = "127.0.0.1:0"\nready_file = "{d / "ready.json"}"\ndimension = {DIM}\n'
            f'threshold = 2\ncall_timeout_ms = {call_timeout_ms}\nlog_level = "INFO"\ncluster_id = "{CLUSTER_ID}"\n\n'
            + _tls(self.pki.files("matcher", "matcher")) + '\n[metrics]\nport = -1\n' + nodes
            + f'\n[tenants.{t.name}]\nmatch_threshold = {t.match_threshold}\nscore_allowed = false\n'
            f'ticket_keys = {{ "{t.key_id}" = "{t.public_hex}" }}\n'
        )
        self._spawn("matcher", "matcher", d / "matcher.toml")
        return self._ready("matcher", d / "ready.json")["address"]

    def client(self, address: str) -> MatcherClient:
        t = self.tenant
        return MatcherClient(address, self.pki.tls("psp", t.name), tenant=t.name, ticket_key=t.key, key_id=t.key_id,
                             cluster_id=CLUSTER_ID, matcher="matcher")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def matcher_log(self) -> list[dict]:
        out = []
        for line in self.logs["matcher"].read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
