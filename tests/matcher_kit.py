"""The matcher test harness, shared by the matcher, client, attack and
fault tests (test support, not a test module).

``Committee`` starts real shareholder nodes in-process
(``shareholders.server.serve`` on port 0, each with its own data dir and
keys) and a real matcher (``matcher.server.serve``), all over mutual TLS on
loopback with the session's dev PKI. ``ProxyNode`` stands in for one node:
it forwards to a real node and can corrupt or delay what it returns.
``Processes`` runs real ``python -m shareholders`` / ``python -m matcher``
processes from TOML files. The ``committee`` and ``rng`` fixtures are in
conftest.py.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from contextlib import suppress
from typing import TYPE_CHECKING

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from matcher import config as matcher_config
from matcher.server import serve as serve_matcher
from shareholders.config import NodeConfig, NodeKeys
from shareholders.server import serve as serve_node
from node_kit import CLUSTER_ID, deal_first_key
from splitvault.v1 import shareholder_pb2_grpc
from vault import pki, ticket
from vault.envelope import KekRing, new_kek
from vaultctl.client import MatcherClient
from vaultrpc import server as rpcserver
from vaultrpc import wire
from vaultrpc.tls import secure_channel

if TYPE_CHECKING:
    from conftest import DevPki

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIM = 128
# The nodes' MAC key width: the largest template dimension a test uses.
KEY_WIDTH = 2048
SHAREHOLDER_SERVICE = "splitvault.v1.Shareholder"


def unit(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def noisy(template: np.ndarray, rng: np.random.Generator, sigma: float = 0.3) -> np.ndarray:
    """A genuine probe: the unit template plus noise of norm ~sigma (cosine ~0.96 at 0.3)."""
    noise = rng.standard_normal(template.shape) * sigma / np.sqrt(template.size)
    return (template + noise).astype(np.float32)


class Tenant:
    def __init__(self, name: str, match_threshold: float = 0.8, score_allowed: bool = False,
                 verify_on_shares: bool = False):
        self.name = name
        self.match_threshold = match_threshold
        self.score_allowed = score_allowed
        self.verify_on_shares = verify_on_shares
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.key_id = f"{name}-1"

    @property
    def public_hex(self) -> str:
        return pki.public_key_raw(self.key).hex()

    def write_ticket(self, operation: int, subject: str, request_id: str, template=None, *,
                     audience: str = CLUSTER_ID, key=None):
        """This provider's ENROLL / REPLACE (binding ``template``) or DELETE ticket."""
        if template is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                template = np.asarray(template, dtype=np.float32)
        return wire.issue_ticket(key or self.key, self.key_id, tenant=self.name, subject=subject, request_id=request_id,
                                 audience=audience, operation=operation, template=template)

    def enroll_ticket(self, subject: str, request_id: str, template, replace: bool = False, **kw):
        return self.write_ticket(ticket.write_operation(replace), subject, request_id, template, **kw)

    def delete_ticket(self, subject: str, request_id: str, **kw):
        return self.write_ticket(ticket.DELETE, subject, request_id, **kw)


def node_config(pki_: "DevPki", root: pathlib.Path, name: str, index: int, tenants, *, listen="127.0.0.1:0",
                attempts: int = 1000, committee: dict | None = None, threshold: int = 0,
                operators: dict | None = None) -> NodeConfig:
    files = pki_.files("shareholder", name)
    data = root / name
    data.mkdir(parents=True, exist_ok=True)
    return NodeConfig(
        name=name, index=index, listen=listen, data_dir=data, tls=files,
        audit_key_file=str(data / "audit.key"), kek_file=str(data / "kek.json"),
        metrics_port=-1, attempts_per_subject=attempts, attempt_window_s=60.0,
        tenants={t.name: {t.key_id: t.key.public_key()} for t in tenants},
        max_workers=16, cluster_id=CLUSTER_ID, committee=dict(committee or {}), committee_threshold=threshold,
        operators=dict(operators or {}),
    )


def node_keys() -> NodeKeys:
    return NodeKeys(KekRing({1: new_kek()}, 1), ed25519.Ed25519PrivateKey.generate())


def matcher_dict(pki_, endpoints, tenants, *, k: int, dim: int = DIM, call_timeout_ms: int = 2000,
                 ready_file: str | None = None, listen: str = "127.0.0.1:0", enroll_batch: int = 256,
                 hedge_ms: int | None = None) -> dict:
    files = pki_.files("matcher", "matcher")
    data = {
        "matcher": {"listen": listen, "dimension": dim, "threshold": k, "call_timeout_ms": call_timeout_ms,
                    "log_level": "INFO", "enroll_batch": enroll_batch, "cluster_id": CLUSTER_ID},
        "tls": {"ca": files.ca, "cert": files.cert, "key": files.key},
        "metrics": {"host": "127.0.0.1", "port": -1},
        "shareholders": [{"name": n, "index": i, "address": a} for n, i, a in endpoints],
        "tenants": {
            t.name: {"match_threshold": t.match_threshold, "score_allowed": t.score_allowed,
                     "ticket_keys": {t.key_id: t.public_hex}}
            for t in tenants
        },
    }
    for t in tenants:
        if getattr(t, "verify_on_shares", False):
            data["tenants"][t.name]["verify_on_shares"] = True
    if ready_file:
        data["matcher"]["ready_file"] = ready_file
    if hedge_ms is not None:
        data["matcher"]["hedge_ms"] = hedge_ms
    return data


class Committee:
    """n in-process nodes and one in-process matcher; ``close()`` stops all."""

    def __init__(self, pki_, root: pathlib.Path, *, n: int = 3, k: int = 2, tenants=None, attempts: int = 1000,
                 call_timeout_ms: int = 2000, enroll_batch: int = 256):
        self.pki = pki_
        self.root = root
        self.n, self.k = n, k
        self.tenants = {t.name: t for t in (tenants or [Tenant("acme")])}
        self.names = [f"bank-{chr(ord('a') + i)}" for i in range(n)]
        self.nodes = {}
        self.proxies = {}
        self.addresses = {}
        self.call_timeout_ms = call_timeout_ms
        self.enroll_batch = enroll_batch
        self.matcher = None
        self._clients = []
        for i, name in enumerate(self.names, start=1):
            cfg = node_config(pki_, root, name, i, self.tenants.values(), attempts=attempts,
                              committee={m: j for j, m in enumerate(self.names, start=1)}, threshold=k)
            running = serve_node(cfg, keys=node_keys(), harden=False)
            self.nodes[name] = running
            self.addresses[name] = running.address
        # The first epoch's MAC key, dealt by the nodes as `vaultctl cluster up` has them do.
        deal_first_key(self.endpoints(), k, pki_.files("auditor", "auditor"), root / "maintenance", width=KEY_WIDTH)

    def endpoints(self):
        return [(name, i, self.addresses[name]) for i, name in enumerate(self.names, start=1)]

    def start_matcher(self, **overrides):
        data = matcher_dict(self.pki, self.endpoints(), self.tenants.values(), k=self.k,
                            call_timeout_ms=self.call_timeout_ms, enroll_batch=self.enroll_batch, **overrides)
        cfg = matcher_config.from_dict(data)
        self.matcher = serve_matcher(cfg, harden=False)
        return self.matcher

    def proxy(self, name: str, **behaviour) -> "ProxyNode":
        """Put a proxy in front of node ``name``; call before start_matcher."""
        proxy = ProxyNode(self.pki, name, self.addresses[name], **behaviour)
        self.proxies[name] = proxy
        self.addresses[name] = proxy.address
        return proxy

    def client(self, tenant: str = "acme", **kw) -> MatcherClient:
        t = self.tenants[tenant]
        c = MatcherClient(f"127.0.0.1:{self.matcher.port}", self.pki.tls("psp", t.name), tenant=t.name,
                          ticket_key=t.key, key_id=t.key_id, matcher="matcher", cluster_id=kw.pop("cluster_id", CLUSTER_ID), **kw)
        self._clients.append(c)
        return c

    def stop_node(self, name: str) -> None:
        self.nodes[name].stop(0)

    def close(self) -> None:
        for c in self._clients:
            c.close()
        if self.matcher is not None:
            self.matcher.stop(0)
        for p in self.proxies.values():
            p.stop()
        for node in self.nodes.values():
            with suppress(Exception):
                node.stop(0)


class ProxyNode(shareholder_pb2_grpc.ShareholderServicer):
    """A shareholder that forwards to a real node, optionally misbehaving.

    corrupt: "flip" adds 1 to some released share values; "range" puts a
    value outside the field; "dimension" relabels the share with another
    modality's dimension; "swap:<subject>"
    returns the share of another subject that it saw released earlier,
    relabelled as the one asked for;
    delay_s: sleep before answering ReleaseShare (a hung node);
    fail_store: answer StoreShares/StoreShareStream with UNAVAILABLE (or the
    StatusCode given) without storing; store_delay_s: sleep before forwarding them (a slow disk).
    """

    def __init__(self, pki_, name: str, upstream: str, *, corrupt: str | None = None, delay_s: float = 0.0,
                 fail_store: bool = False, store_delay_s: float = 0.0, fail_delete: str | None = None):
        self.corrupt = corrupt
        self.fail_delete = fail_delete  # refuse DeleteShares with FAILED_PRECONDITION and this message
        self.store_delay_s = store_delay_s
        self.delay_s = delay_s
        self.fail_store = fail_store
        self.name = name
        self._channel = secure_channel(upstream, pki_.tls("matcher", "matcher"), expect=pki.Identity("shareholder", name))
        self._up = shareholder_pb2_grpc.ShareholderStub(self._channel)
        self._pki = pki_
        self.releases = 0
        self.captured: dict[str, bytes] = {}
        methods = ("StoreShares", "StoreShareStream", "ReleaseShare", "DeleteShares", "DescribeRecords", "GetNodeInfo",
                   "GetMacKeyShare")
        self.running = rpcserver.start(
            listen="127.0.0.1:0", tls=pki_.tls("shareholder", name),
            register=(lambda s: shareholder_pb2_grpc.add_ShareholderServicer_to_server(self, s),),
            service_names=(SHAREHOLDER_SERVICE,),
            roles={f"/{SHAREHOLDER_SERVICE}/{m}": frozenset({"matcher"}) for m in methods},
            logger=logging.getLogger(f"proxy.{name}"), max_workers=8,
        )
        self.address = f"127.0.0.1:{self.running.port}"

    def stop(self):
        self.running.stop(0)
        self._channel.close()

    def _forward(self, method, request, context):
        try:
            return getattr(self._up, method)(request, timeout=10)
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def StoreShares(self, request, context):
        if self.fail_store:
            code = self.fail_store if isinstance(self.fail_store, grpc.StatusCode) else grpc.StatusCode.UNAVAILABLE
            context.abort(code, "proxy refuses to store")
        if self.store_delay_s:
            time.sleep(self.store_delay_s)
        return self._forward("StoreShares", request, context)

    def StoreShareStream(self, request_iterator, context):
        if self.fail_store:
            code = self.fail_store if isinstance(self.fail_store, grpc.StatusCode) else grpc.StatusCode.UNAVAILABLE
            context.abort(code, "proxy refuses to store")
        messages = list(request_iterator)
        if self.store_delay_s:
            time.sleep(self.store_delay_s)
        try:
            return self._up.StoreShareStream(iter(messages), timeout=30)
        except grpc.RpcError as err:
            context.abort(err.code(), err.details())

    def DeleteShares(self, request, context):
        if self.fail_delete:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.fail_delete)
        return self._forward("DeleteShares", request, context)

    def DescribeRecords(self, request, context):
        return self._forward("DescribeRecords", request, context)

    def GetNodeInfo(self, request, context):
        return self._forward("GetNodeInfo", request, context)

    def GetMacKeyShare(self, request, context):
        return self._forward("GetMacKeyShare", request, context)

    def ReleaseShare(self, request, context):
        self.releases += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        reply = self._forward("ReleaseShare", request, context)
        for share in reply.shares:
            self.captured.setdefault(share.subject, share.values)
        if self.corrupt == "flip":
            for share in reply.shares:
                values = np.frombuffer(share.values, dtype="<u4").copy()
                values[:8] = (values[:8] + 1) % (2**31 - 1)
                share.values = values.astype("<u4").tobytes()
        elif self.corrupt == "range":
            for share in reply.shares:
                values = np.frombuffer(share.values, dtype="<u4").copy()
                values[3] = 0xFFFFFFFF  # not a field element
                share.values = values.tobytes()
        elif self.corrupt == "dimension":
            # The share claims another modality's dimension.
            for share in reply.shares:
                share.dimension = 512 if share.dimension != 512 else 128
        elif self.corrupt and self.corrupt.startswith("swap:"):
            # Another subject's share (released to an earlier verification),
            # relabelled as the one asked for.
            stolen = self.captured[self.corrupt.split(":", 1)[1]]
            for share in reply.shares:
                share.values = stolen
        return reply


# --- real node and matcher processes -------------------------------------------------

NAMES = ("bank-a", "bank-b", "bank-c")


def _secret(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _tls(files) -> str:
    return f'[tls]\nca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'


class Processes:
    """Real node and matcher processes under one folder; ``close()`` stops them all."""

    def __init__(self, dev_pki, root: pathlib.Path, tenant: Tenant, others: tuple[Tenant, ...] = (),
                 attempts: int = 100):
        self.pki, self.root, self.tenant = dev_pki, root, tenant
        self.attempts = attempts
        self.tenants = {t.name: t for t in (tenant, *others)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, pathlib.Path] = {}
        self.addresses: dict[str, str] = {}
        self.node_extra: dict[str, str] = {}  # name -> more of its node.toml (a [store] section, say)

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
        registered = "".join(f'\n[tenants.{t.name}]\nticket_keys = {{ "{t.key_id}" = "{t.public_hex}" }}\n'
                             for t in self.tenants.values())
        for index, name in enumerate(NAMES, start=1):
            d = self.root / name
            d.mkdir(parents=True)
            _secret(d / "kek.json", json.dumps({"active": 1, "keys": {"1": new_kek().hex()}}).encode())
            _secret(d / "audit.key", pki.new_signing_key()[0])
            (d / "node.toml").write_text(
                f'[node]\nname = "{name}"\ncluster_id = "{CLUSTER_ID}"\nindex = {index}\nlisten = "127.0.0.1:0"\ndata_dir = "{d}"\n'
                f'ready_file = "{d / "ready.json"}"\n\n' + _tls(self.pki.files("shareholder", name))
                + f'\n[keys]\nkek_file = "{d / "kek.json"}"\naudit_key_file = "{d / "audit.key"}"\n'
                + f'\n[metrics]\nport = -1\n\n[limits]\nattempts_per_subject = {self.attempts}\nattempt_window_s = 60\n'
                + registered
                + '\n[committee]\nthreshold = 2\nmembers = { '
                + ", ".join(f'"{n}" = {i}' for i, n in enumerate(NAMES, start=1)) + ' }\n'
                + self.node_extra.get(name, "")
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
        nodes = "".join(
            f'\n[[shareholders]]\nname = "{n}"\nindex = {i}\naddress = "{self.addresses[n]}"\n'
            for i, n in enumerate(NAMES, start=1)
        )
        (d / "matcher.toml").write_text(
            f'[matcher]\nlisten = "127.0.0.1:0"\nready_file = "{d / "ready.json"}"\ndimension = {DIM}\n'
            f'threshold = 2\ncall_timeout_ms = {call_timeout_ms}\nlog_level = "INFO"\ncluster_id = "{CLUSTER_ID}"\n\n'
            + _tls(self.pki.files("matcher", "matcher")) + '\n[metrics]\nport = -1\n' + nodes
            + "".join(f'\n[tenants.{t.name}]\nmatch_threshold = {t.match_threshold}\nscore_allowed = false\n'
                      f'verify_on_shares = {str(t.verify_on_shares).lower()}\n'
                      f'ticket_keys = {{ "{t.key_id}" = "{t.public_hex}" }}\n' for t in self.tenants.values())
        )
        self._spawn("matcher", "matcher", d / "matcher.toml")
        return self._ready("matcher", d / "ready.json")["address"]

    def client(self, address: str, tenant: str | None = None) -> MatcherClient:
        t = self.tenants[tenant] if tenant else self.tenant
        return MatcherClient(address, self.pki.tls("psp", t.name), tenant=t.name, ticket_key=t.key, key_id=t.key_id,
                             cluster_id=CLUSTER_ID, matcher="matcher")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, name: str) -> None:
        """Stop a node (SIGTERM) and start it again on the same port, as the matcher knows it."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        d = self.root / name
        (d / "ready.json").unlink(missing_ok=True)
        config = d / "node.toml"
        config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "{self.addresses[name]}"'))
        self._spawn(name, "shareholders", config)
        assert self._ready(name, d / "ready.json")["address"] == self.addresses[name]

    def log_events(self, name: str) -> list[dict]:
        """The process's JSON log lines."""
        out = []
        for line in self.logs[name].read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def matcher_log(self) -> list[dict]:
        return self.log_events("matcher")

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
