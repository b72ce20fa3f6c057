"""Test support for the reliability campaign (tests/test_faults_*.py,
tests/test_attack_*.py, tests/test_at_rest_*.py; docs/reliability.md).

Builds on the existing harnesses instead of adding new ones:

- ``FaultProcesses`` is ``test_matcher_e2e.Processes`` (three real
  ``python -m shareholders`` processes and ``python -m matcher``, TOML
  configs as in docs/contracts.md) plus what fault injection needs: restart
  a killed node on the SAME port and data (so the matcher's config still
  points at it), restart the matcher, give a node another KEK.
- ``GateProxy`` is ``matcher_kit.ProxyNode`` (an in-test server in
  front of a real node) that can also hang on an event instead of sleeping,
  so a "never answers" node does not keep a thread asleep after the test.
- The checks every fault test makes: what each node holds
  (``holdings``, over DescribeRecords with the auditor's certificate), that
  every template is intact (``rejoin_everywhere``: every node's share of a
  subject released and rejoined TOGETHER, MACs checked, the rejoined int8
  template compared with the enrolled one), and what each node's audit log
  shows (``audit_events``, read from its database; ``chain_ok``).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field

import grpc
import numpy as np

from shareholders.audit_log import verify_database
from node_kit import CLUSTER_ID, audit_entries
from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from matcher_kit import NAMES, ROOT, Processes
from matcher_kit import DIM, ProxyNode, Tenant, noisy, unit
from vault import codec, pki, record
from vaultrpc import wire
from vaultrpc.tls import secure_channel

__all__ = [
    "DIM", "NAMES", "FaultProcesses", "GateProxy", "LoadResult", "Tenant", "chain_ok",
    "clean_details", "holdings", "wait_until_used", "noisy", "rejoin_everywhere", "run_load", "unit",
]

# What a caller must never see in a status message: a traceback, a Python
# repr of an object, or an internal exception name leaking out of a handler.
_LEAKY = re.compile(r"Traceback|File \"|object at 0x|\bline \d+, in\b|<[a-zA-Z_.]+ object|Exception\(|Error\(")


def clean_details(details: str | None) -> bool:
    """A status message fit for the caller: no traceback or Python repr."""
    return not _LEAKY.search(details or "")


class FaultProcesses(Processes):
    """Real node and matcher processes with restart hooks (see the module doc)."""

    def _spawn(self, name: str, module: str, config: pathlib.Path) -> None:
        # As Processes._spawn, but the log is appended to: a restarted
        # process keeps the story of its previous run.
        log = config.parent / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(config)], cwd=ROOT, stdout=fh, stderr=fh,
                env={k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")},
            )

    def restart_node(self, name: str, *, kek_json: str | None = None, timeout_s: float = 30.0) -> str:
        """Start ``name`` again on its old port and data; optionally with another KEK file."""
        self._respawn_node(name, kek_json)
        d = self.root / name
        port = self.real(name).rsplit(":", 1)[1]
        address = self._ready(name, d / "ready.json", timeout_s)["address"]
        assert address.endswith(f":{port}"), address
        return address

    def restart_node_refused(self, name: str, *, kek_json: str | None = None, timeout_s: float = 30.0) -> tuple[int, list[dict]]:
        """Start ``name`` again expecting it to refuse: (exit status, its JSON log lines of this run)."""
        seen = len(self.node_log(name)) if name in self.logs and self.logs[name].exists() else 0
        self._respawn_node(name, kek_json)
        code = self.procs[name].wait(timeout=timeout_s)
        return code, self.node_log(name)[seen:]

    def _respawn_node(self, name: str, kek_json: str | None) -> None:
        d = self.root / name
        port = self.addresses.get(f"{name}/real", self.addresses[name]).rsplit(":", 1)[1]
        config = d / "node.toml"
        config.write_text(re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"', config.read_text()))
        if kek_json is not None:
            (d / "kek.json").write_text(kek_json)
            (d / "kek.json").chmod(0o600)
        (d / "ready.json").unlink(missing_ok=True)
        self._spawn(name, "shareholders", config)

    def start_nodes(self) -> None:
        super().start_nodes()
        for name in NAMES:  # remembered: a proxy may later stand at addresses[name]
            self.addresses[f"{name}/real"] = self.addresses[name]

    def restart_matcher(self) -> str:
        d = self.root / "matcher"
        (d / "ready.json").unlink(missing_ok=True)
        self._spawn("matcher", "matcher", d / "matcher.toml")
        return self._ready("matcher", d / "ready.json")["address"]

    def real(self, name: str) -> str:
        return self.addresses[f"{name}/real"]

    def db(self, name: str) -> pathlib.Path:
        return self.root / name / "shares.db"

    def audit_public_key(self, name: str) -> bytes:
        return pki.public_key_raw(pki.load_signing_key((self.root / name / "audit.key").read_bytes()))

    def node_log(self, name: str) -> list[dict]:
        out = []
        for line in self.logs[name].read_text(errors="replace").splitlines():
            with suppress(ValueError):
                out.append(json.loads(line))
        return out


class GateProxy(ProxyNode):
    """``ProxyNode`` that can hang on events (released at ``stop``).

    hang_release: ReleaseShare waits until ``release_gate`` is set (never
    answers within any deadline); hang_store: StoreShares waits until
    ``store_gate`` is set and then, if ``drop_store``, answers UNAVAILABLE
    without forwarding (the write never reached the node);
    swap_unlabelled = S: ReleaseShare answers with subject S's share as
    released earlier, still labelled S.
    """

    def __init__(self, pki_, name: str, upstream: str, *, hang_release: bool = False, hang_store: bool = False,
                 drop_store: bool = False, **kw):
        super().__init__(pki_, name, upstream, **kw)
        self.hang_release = hang_release
        self.hang_store = hang_store
        self.drop_store = drop_store
        self.release_gate = threading.Event()
        self.store_gate = threading.Event()
        self.store_arrived = threading.Event()
        self.swap_unlabelled: str | None = None
        self.records: dict[str, object] = {}

    def ReleaseShare(self, request, context):
        if self.hang_release:
            self.release_gate.wait(60)
        reply = super().ReleaseShare(request, context)
        if not self.corrupt:
            for share in reply.shares:
                copy = type(share)()
                copy.CopyFrom(share)
                self.records.setdefault(share.subject, copy)
        if self.swap_unlabelled:
            del reply.shares[:]
            reply.shares.append(self.records[self.swap_unlabelled])
        return reply

    def StoreShares(self, request, context):
        if self.hang_store:
            self.store_arrived.set()
            self.store_gate.wait(60)
            if self.drop_store:
                context.abort(grpc.StatusCode.UNAVAILABLE, "proxy dropped the write")
        return super().StoreShares(request, context)

    def stop(self):
        self.release_gate.set()
        self.store_gate.set()
        super().stop()


# --- what the nodes hold ---------------------------------------------------------


def holdings(pki_, addresses: dict[str, str], tenant: str, subjects) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """node -> subject -> [(request id, epoch)] of its records (DescribeRecords as the auditor)."""
    out: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for name, address in addresses.items():
        with secure_channel(address, pki_.tls("auditor", "auditor"), expect=pki.Identity("shareholder", name)) as ch:
            stub = shareholder_pb2_grpc.ShareholderStub(ch)
            out[name] = {}
            for s in subjects:
                reply = stub.DescribeRecords(shareholder_pb2.DescribeRecordsRequest(tenant=tenant, subject=s), timeout=10)
                out[name][s] = [(r.request_id, r.epoch) for r in reply.records]
    return out


def rejoin_everywhere(pki_, addresses: dict[str, str], tenant: Tenant, subject: str) -> record.JoinResult:
    """Release the subject's share from EVERY node (matcher certificate, a
    fresh provider ticket each) and rejoin them all together, with the nodes'
    MAC key shares: raises unless all n lie on one polynomial and pass the MACs."""
    shares, keys = [], []
    for name, address in addresses.items():
        t = wire.issue_ticket(tenant.key, tenant.key_id, tenant=tenant.name, subject=subject,
                              request_id=f"check-{uuid.uuid4().hex}", probe=np.zeros(4, np.float32), audience=CLUSTER_ID)
        with secure_channel(address, pki_.tls("matcher", "matcher"), expect=pki.Identity("shareholder", name)) as ch:
            reply = shareholder_pb2_grpc.ShareholderStub(ch).ReleaseShare(
                shareholder_pb2.ReleaseShareRequest(ticket=t), timeout=10)
        assert len(reply.shares) == 1 and len(reply.mac_keys) == 1, (name, len(reply.shares))
        shares.append(reply.shares[0])
        keys.append(reply.mac_keys[0])
    result = record.join([wire.share(s) for s in shares], [wire.key_share(k) for k in keys])
    assert result.suspects == (), result.suspects
    assert len(result.used) >= 2
    return result


def template_intact(result: record.JoinResult, template: np.ndarray) -> bool:
    return bool(np.array_equal(result.template.reshape(-1), codec.encode(template, template.size).reshape(-1)))


def wait_until_used(p: "FaultProcesses", client, name: str, gallery: dict[str, np.ndarray],
                    timeout_s: float = 10.0, db: pathlib.Path | None = None) -> int:
    """Verify subjects of ``gallery`` in turn until node ``name`` logs a
    release: the matcher has reconnected to a restarted node (its channel
    backs off up to 2 s). Several subjects, because the matcher asks each
    subject's k "first" nodes (a hash of the subject) and the others only
    when one of those fails. Returns how many verifications it took."""
    rng = np.random.default_rng(0)
    db = db or p.db(name)
    seen = len(audit_entries(db))
    subjects = sorted(gallery)
    deadline = time.monotonic() + timeout_s
    tries = 0
    while time.monotonic() < deadline:
        subject = subjects[tries % len(subjects)]
        tries += 1
        assert client.verify(subject, noisy(gallery[subject], rng)).decision == "MATCH"
        if any(e["event"] == "release" for e in audit_entries(db)[seen:]):
            return tries
        time.sleep(0.05)
    raise AssertionError(f"the matcher did not use {name} again within {timeout_s} s")


# --- audit logs ------------------------------------------------------------------


def chain_ok(db: pathlib.Path, public_key: bytes, node: str) -> bool:
    report = verify_database(db, pki.load_public_key(public_key), node=node)
    assert report.ok, report.reason
    return True


# --- load ----------------------------------------------------------------------


@dataclass
class LoadResult:
    """Outcomes of a closed-loop verification load, by kind of probe."""

    decisions: Counter = field(default_factory=Counter)   # ("genuine"|"impostor", decision or status name)
    false_match: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def count(self, kind: str) -> Counter:
        return Counter({k[1]: v for k, v in self.decisions.items() if k[0] == kind})


def run_load(client, gallery: dict[str, np.ndarray], seconds: float, *, threads: int = 4, seed: int = 0,
             impostor_every: int = 4, stop: threading.Event | None = None) -> LoadResult:
    """Verify genuine and impostor probes against ``gallery`` from several
    threads for ``seconds``; every outcome is counted, a MATCH of an impostor
    probe is a false match."""
    result = LoadResult()
    lock = threading.Lock()
    subjects = sorted(gallery)
    deadline = time.monotonic() + seconds
    stop = stop or threading.Event()

    def worker(w: int) -> None:
        rng = np.random.default_rng(seed * 1000 + w)
        i = w
        while time.monotonic() < deadline and not stop.is_set():
            subject = subjects[i % len(subjects)]
            impostor = i % impostor_every == 0
            probe = gallery[subjects[(i + 1) % len(subjects)]] if impostor else noisy(gallery[subject], rng)
            started = time.perf_counter()
            try:
                outcome = client.verify(subject, probe).decision
            except grpc.RpcError as err:
                outcome = err.code().name
            elapsed = (time.perf_counter() - started) * 1000
            kind = "impostor" if impostor else "genuine"
            with lock:
                result.decisions[(kind, outcome)] += 1
                result.latencies_ms.append(elapsed)
                if impostor and outcome == "MATCH":
                    result.false_match += 1
            i += threads

    pool = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    return result
