"""``vaultctl reshare``: move every template to a new committee and threshold
(Desmedt-Jajodia; Wong, Wang and Wing), never rejoining one.

    vaultctl reshare propose --dir D --shareholders N --threshold K   (or --replace NAME)
    vaultctl reshare approve --dir D --plan FILE --operator NAME      (k current operators)
    vaultctl reshare --dir D --plan FILE [--format json]              (run the approved plan)
    vaultctl reshare --dir D --abort

    vaultctl reshare propose --config auditor.toml --members committee.toml --plan FILE [--threshold K]
    vaultctl reshare approve --config auditor.toml --plan FILE --operator NAME --key KEY
    vaultctl reshare --config auditor.toml --plan FILE        (runs to commit; stops for the matcher)
    vaultctl reshare --config auditor.toml --finalize         (after the matcher follows the new committee)

A committee change runs only on a plan that k current node operators
approved with their own keys (vault/plan.py); the nodes check it, not only
this command (docs/architecture.md, "Committee changes need the operators").
``propose`` provisions and starts the new nodes (the plan pins their
certificate keys and addresses) and writes the plan file (default
D/maintenance/reshare-plan.json); ``approve`` adds one operator's signature.
On the local dev cluster ``--approve-with-dev-operators`` does propose and
approve with every dev operator key in one go.

k old nodes S (the first k by index) each re-share their own share of every
record with a fresh polynomial of the new degree k' - 1 and hand the new
member j' its value, node to node; j' combines the k values with the
Lagrange coefficients of S (vault.proactive) into a share of the SAME
extended vector, so the MACs still verify. Steps (docs/operations.md):

1. plan     (``propose``) new nodes get the next free names (bank-d, ...), and
            indices after the old ones; shrinking drops the highest indices;
            ``--replace`` gives a new node the replaced one's index. The
            approved plan is written to D/maintenance/epoch-session.json
            before anything else happens;
2. provision new nodes: certificate, KEK, audit key, config; started;
3. begin    every node of both committees takes its lock for the session;
4. prepare  old members deal the check's masks among themselves; every new
            member pulls its values (and the masks' reshare) from the senders;
5. check    every member reports a masked random combination of its shares;
            the old sharing must hold what the new one holds, else every
            node rolls back (vault.proactive, "the reshare check");
6. commit   new members serve the new epoch beside the old one;
7. switch   cluster.json and the matcher's committee change (SIGHUP; the
            matcher rejoins the new epoch from then on);
8. finalize after the drain, every node destroys the old epoch (a node
            leaving the committee: every share), nodes that left are stopped.

A rerun resumes the open session; ``--abort`` rolls back one that no node
has committed (new nodes are stopped; their folders stay, empty).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from dataclasses import dataclass

import numpy as np

from splitvault.v1 import admin_pb2
from vault import pki, plan as committee_plan, proactive
from vaultrpc import config as rpcconfig
from vaultctl import auditor, cluster, maintenance
from vaultctl.cli import CliError, RemoteError, Result, command, count, seconds_or_zero
from vaultctl.cluster import ClusterSpec
from vaultctl.maintenance import (
    KIND_NAMES, Admin, CrashSeam, MaintenanceError, Node, Progress, SessionFile, SessionRecord, new_session_id,
    progress_enabled,
)
from vaultctl.refresh import DEFAULT_DRAIN_S, _round, _state, state_dir

_S = admin_pb2
# The check's step 2 reads every share of one side's epoch on each node.
CHECK_TIMEOUT_S = 600.0


def plan_committee(spec, shareholders: int | None, threshold: int | None, replace: str | None,
                   taken: set[str]) -> tuple[list[str], int]:
    """The new committee (names in index order) and threshold."""
    old = list(spec.nodes)
    if replace is not None:
        if replace not in old:
            raise MaintenanceError(f"The cluster has no shareholder {replace!r}; it has {', '.join(old)}.", remote=False)
        if shareholders not in (None, len(old)):
            raise MaintenanceError("--replace keeps the number of shareholders; give --shareholders separately.",
                                   remote=False)
        n = len(old)
    else:
        n = len(old) if shareholders is None else shareholders
    k = spec.threshold if threshold is None else threshold
    if not 2 <= n <= cluster.MAX_SHAREHOLDERS:
        raise MaintenanceError(f"The number of shareholders must be from 2 to {cluster.MAX_SHAREHOLDERS}.", remote=False)
    if not 2 <= k <= n:
        raise MaintenanceError(f"The threshold must be from 2 to the number of shareholders ({n}).", remote=False)
    if n < 2 * k - 1:
        raise MaintenanceError(
            f"{n} shareholders with threshold {k} cannot renew the MAC keys at a refresh (that needs at least "
            f"2k - 1 = {2 * k - 1}); choose more shareholders or a lower threshold.", remote=False)
    fresh = (name for name in cluster.node_names(len(old) + len(taken) + n + 1) if name not in taken and name not in old)
    if replace is not None:
        new = [next(fresh) if name == replace else name for name in old]
    elif n >= len(old):
        new = old + [next(fresh) for _ in range(n - len(old))]
    else:
        new = old[:n]
    if new == old and k == spec.threshold:
        raise MaintenanceError(
            f"The committee already is {', '.join(old)} with threshold {k}; nothing to reshare.", remote=False)
    return new, k


class LocalCluster:
    """The operations a reshare needs from a local cluster directory."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self.cluster = cluster

    def spec(self):
        return self.cluster.load_spec(self.root)

    def committee_spec(self, names: list[str], threshold: int):
        """This cluster's spec with another committee and threshold."""
        return ClusterSpec(**{**_spec_fields(self.spec()), "shareholders": len(names), "threshold": threshold,
                              "nodes": tuple(names)})

    def taken(self) -> set[str]:
        paths = self.cluster.Paths(self.root)
        folder = paths.root / "nodes"
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def provision(self, spec) -> None:
        self.cluster.add_nodes(self.root, spec)

    def start(self, names: list[str]) -> dict[str, str]:
        ready = self.cluster.start_processes(self.root, names)
        return {name: data["address"] for name, data in ready.items()}

    def switch(self, spec, retired: list[str], addresses: dict[str, str]) -> bool:
        """cluster.json and the matcher follow the new committee; True (done)."""
        self.cluster.write_spec(self.root, spec, retired=retired)
        self.cluster.switch_matcher(self.root, spec, {n: addresses[n] for n in spec.nodes})
        return True

    def retire(self, names: list[str]) -> None:
        if names:
            self.cluster.stop_processes(self.root, names)

    def auditor_tls(self):
        spec = self.spec()
        return self.cluster.Paths(self.root).tls(pki.ROLE_AUDITOR, spec.auditor).load()

    def audience(self) -> str:
        """The plan audience: this cluster's CA and cluster id (``vault.plan.audience_for``)."""
        return committee_plan.audience_for(self.cluster.Paths(self.root).ca.read_bytes(),
                                           self.cluster.cluster_id(self.root))

    def cert_fingerprint(self, name: str) -> str:
        return committee_plan.spki_sha256(self.cluster.Paths(self.root).cert(pki.ROLE_SHAREHOLDER, name).read_bytes())

    def operator_public(self, name: str) -> str:
        return self.cluster.operator_public_hex(self.cluster.Paths(self.root), name)

    def operator_key_pem(self, name: str) -> bytes:
        path = self.cluster.Paths(self.root).operator_key(name)
        try:
            return path.read_bytes()
        except OSError:
            raise MaintenanceError(f"This cluster directory has no dev operator key for {name} ({path}).",
                                   remote=False) from None


@dataclass(frozen=True)
class Committee:
    """A deployment's committee: names in index order and threshold."""

    nodes: tuple[str, ...]
    threshold: int


class Deployment:
    """The operations a reshare needs from a real deployment (``--config``).

    The old committee, its addresses and the auditor's TLS material come from
    the auditor config; the new members from the plan (``propose`` takes them
    from a committee file each institution published to). Nothing is
    provisioned, started or stopped here: each institution runs its own node.
    The matcher belongs to its operator, so the run stops once every node has
    committed (both epochs served) and says so; after the matcher operator
    has switched the matcher to the new committee, the same command with
    ``--finalize`` destroys the old epoch.
    """

    def __init__(self, target: auditor.AuditorTarget, *, plan: dict | None = None, finalize: bool = False):
        live = sorted((n for n in target.nodes if not n.retired), key=lambda n: n.index)
        if [n.index for n in live] != list(range(1, len(live) + 1)):
            raise MaintenanceError(
                f"The committee in {target.source} must have the indices 1 to {len(live)} (one per shareholder).",
                remote=False)
        self.target = target
        self.finalize = finalize
        self.addresses = {n.name: n.address for n in live if n.address}
        self.committee = Committee(tuple(n.name for n in live), target.threshold)
        if plan is not None:
            for m in committee_plan.parse(committee_plan.from_document(plan)[0]).new_committee:
                self.addresses.setdefault(m.name, m.address)

    def spec(self) -> Committee:
        return self.committee

    def committee_spec(self, names: list[str], threshold: int) -> Committee:
        return Committee(tuple(names), threshold)

    def taken(self) -> set[str]:
        return set()

    def provision(self, spec) -> None:
        """Each institution provisions its own node (docs/operations.md)."""

    def start(self, names: list[str]) -> dict[str, str]:
        missing = [n for n in names if n not in self.addresses]
        if missing:
            raise MaintenanceError(
                f"No address for {', '.join(missing)}: list the old committee in {self.target.source} and the new "
                "members in the plan.", remote=False)
        return {n: self.addresses[n] for n in names}

    def switch(self, spec, retired: list[str], addresses: dict[str, str]) -> bool:
        """The matcher is its operator's to switch: done only once told so (``--finalize``)."""
        return self.finalize

    def retire(self, names: list[str]) -> None:
        """Nodes that left hold nothing once finalized; their institutions stop them."""

    def auditor_tls(self):
        try:
            return self.target.tls.load()
        except ValueError as exc:
            raise MaintenanceError(str(exc), remote=False) from None

    def audience(self) -> str:
        try:
            return committee_plan.audience_for(pathlib.Path(self.target.tls.ca).read_bytes(), self.target.cluster_id)
        except OSError as exc:
            raise MaintenanceError(f"Cannot read the CA certificate {self.target.tls.ca}: {exc.strerror}.",
                                   remote=False) from None


def read_members(path: pathlib.Path) -> list[committee_plan.NewMember]:
    """The new committee from a committee file: one ``[[shareholders]]`` entry
    per member (name, index, address as in the auditor config) with the
    values it published: ``spki_sha256`` (its certificate key,
    ``vault.plan.spki_sha256``) and ``operator_key`` (its Ed25519 operator
    public key, hex)."""
    try:
        data = rpcconfig.read(pathlib.Path(path))
        table = rpcconfig.shareholder_table(data)
    except rpcconfig.ConfigError as exc:
        raise MaintenanceError(f"{exc} ({path})", remote=False) from None
    members = []
    for e in table:
        fields = {}
        for key in ("spki_sha256", "operator_key"):
            v = e.entry.get(key)
            if not isinstance(v, str) or not v:
                raise MaintenanceError(f"The member {e.name} in {path} needs {key} (the value it published).",
                                       remote=False)
            fields[key] = v
        members.append(committee_plan.NewMember(e.name, e.index, e.address, fields["spki_sha256"],
                                                fields["operator_key"]))
    return sorted(members, key=lambda m: m.index)


def plan_file(root) -> pathlib.Path:
    """Where ``propose`` writes the plan unless told otherwise."""
    return state_dir(root) / "reshare-plan.json"


def propose(ops: LocalCluster, *, shareholders: int | None = None, threshold: int | None = None,
            replace: str | None = None, ttl_s: float | None = None) -> dict:
    """A committee-change plan for the local cluster (no approvals yet), as the plan file's JSON.

    The new nodes are provisioned and started first: the plan pins each new
    member's certificate key and address."""
    spec = ops.spec()
    new_names, k_new = plan_committee(spec, shareholders, threshold, replace, ops.taken())
    ops.provision(ops.committee_spec(new_names, k_new))
    addresses = ops.start(list(dict.fromkeys(list(spec.nodes) + new_names)))
    members = [committee_plan.NewMember(n, i, addresses[n], ops.cert_fingerprint(n), ops.operator_public(n))
               for i, n in enumerate(new_names, start=1)]
    return _make_plan(ops, members, k_new, ttl_s)


def propose_members(ops: Deployment, members: list[committee_plan.NewMember], *, threshold: int | None = None,
                    ttl_s: float | None = None) -> dict:
    """A committee-change plan for a deployment: the new committee as its
    members published it (``read_members``), checked as ``propose`` checks."""
    spec = ops.spec()
    n, k = len(members), spec.threshold if threshold is None else threshold
    if [m.index for m in members] != list(range(1, n + 1)):
        raise MaintenanceError(f"The new committee's indices must be 1 to {n}, one per member.", remote=False)
    if not 2 <= k <= n or n < 2 * k - 1:
        raise MaintenanceError(
            f"A committee of {n} with threshold {k} is refused: the threshold must be from 2 to n, and n >= 2k - 1 "
            "(the MAC keys' renewal at a refresh needs 2k - 1 nodes).", remote=False)
    if [m.name for m in members] == list(spec.nodes) and k == spec.threshold:
        raise MaintenanceError(
            f"The committee already is {', '.join(spec.nodes)} with threshold {k}; nothing to reshare.", remote=False)
    for m in members:
        ops.addresses[m.name] = m.address
    return _make_plan(ops, members, k, ttl_s)


def _make_plan(ops, members: list[committee_plan.NewMember], k_new: int, ttl_s: float | None) -> dict:
    """The plan document (no approvals yet): epochs asked of every node."""
    spec = ops.spec()
    old_names = list(spec.nodes)
    new_names = [m.name for m in members]
    everyone = list(dict.fromkeys(old_names + new_names))
    addresses = ops.start(everyone)
    index_old = {n: i for i, n in enumerate(old_names, start=1)}
    index_new = {m.name: m.index for m in members}
    admin = Admin([Node(n, index_new.get(n) or index_old[n], addresses[n]) for n in everyone], ops.auditor_tls())
    try:
        infos = admin.node_info(old_names)
        epochs = {info.epoch for info in infos.values()}
        if len(epochs) != 1:
            raise MaintenanceError(
                f"The old committee disagrees on the current epoch ({', '.join(f'{n}: {i.epoch}' for n, i in infos.items())}).")
        from_epoch = epochs.pop()
        new_epoch = max(from_epoch, *(i.epoch for i in admin.node_info(everyone).values())) + 1
    finally:
        admin.close()
    plan = committee_plan.make(
        audience=ops.audience(), session_id=new_session_id("reshare"), from_epoch=from_epoch, new_epoch=new_epoch,
        old_committee=index_old, old_threshold=spec.threshold, new_committee=members, new_threshold=k_new,
        senders=[index_old[n] for n in old_names[: spec.threshold]],
        **({"ttl_ms": int(ttl_s * 1000)} if ttl_s else {}),
    )
    return committee_plan.document(plan.body(), {})


def approve(document: dict, operator: str, key_pem: bytes) -> dict:
    """The plan file's JSON with one more operator's approval."""
    body, approvals = committee_plan.from_document(document)
    old = committee_plan.parse(body).old_committee
    if operator not in old:
        raise MaintenanceError(
            f"Operator {operator} is not a member of the plan's old committee ({', '.join(sorted(old, key=old.get))}); "
            "only current members' operators approve a committee change.", remote=False)
    try:
        key = pki.load_signing_key(key_pem)
    except (ValueError, TypeError):
        raise MaintenanceError(f"The approval key of operator {operator} is not an Ed25519 private key.",
                               remote=False) from None
    approvals[operator] = committee_plan.sign(body, key)
    return committee_plan.document(body, approvals)


def _plan_summary(document: dict) -> dict:
    p = document["plan"]
    return {
        "session_id": p["session_id"], "from_epoch": p["from_epoch"], "new_epoch": p["new_epoch"],
        "old_committee": sorted(p["old_committee"], key=p["old_committee"].get), "old_threshold": p["old_threshold"],
        "new_committee": [m["name"] for m in p["new_committee"]], "new_threshold": p["new_threshold"],
        "expires_at_ms": p["expires_at_ms"], "approvals": sorted(document.get("approvals") or {}),
        "needed": p["old_threshold"],
    }


def reshare_session(
    ops: LocalCluster,
    sessions: SessionFile,
    *,
    shareholders: int | None = None,
    threshold: int | None = None,
    replace: str | None = None,
    abort: bool = False,
    allow_loss: bool = False,
    drain_s: float = DEFAULT_DRAIN_S,
    progress: Progress | None = None,
    faults: CrashSeam | None = None,
    pace: int = 0,
    plan: dict | None = None,
) -> dict:
    """Drive (start, resume or abort) a reshare of a local cluster; returns the report."""
    progress = progress or Progress(False)
    faults = faults or CrashSeam()
    started = time.monotonic()
    timings: dict[str, float] = {}
    spec = ops.spec()
    saved = sessions.load()
    if saved is not None and saved.kind != "reshare":
        raise MaintenanceError(
            f"A {saved.kind} session ({saved.session_id}) is open from this cluster directory; run "
            f"`vaultctl {saved.kind}` again to finish it, or abort it, first.", remote=False)
    resumed = saved is not None
    if saved is None:
        if abort:
            return {"action": "abort", "session_id": None, "state": "none", "message": "No reshare session is open."}
        if plan is None:
            raise MaintenanceError(
                "A reshare runs only on a plan approved by k current node operators: `vaultctl reshare propose`, "
                "then `vaultctl reshare approve` by each operator, then `vaultctl reshare --plan FILE`.", remote=False)
        try:
            body, _approvals = committee_plan.from_document(plan)
            p = committee_plan.parse(body)
        except committee_plan.InvalidPlan as exc:
            raise MaintenanceError(f"The plan file is refused: {exc}", remote=False) from None
        new_names = [m.name for m in p.new_committee]
        if (shareholders is not None and shareholders != len(new_names)) or \
                (threshold is not None and threshold != p.new_threshold) or \
                (replace is not None and replace in new_names):
            raise MaintenanceError(
                f"The plan moves to {', '.join(new_names)} (threshold {p.new_threshold}); the arguments ask for "
                "another committee.", remote=False)
        if p.old_committee != {n: i for i, n in enumerate(spec.nodes, start=1)} or p.old_threshold != spec.threshold:
            raise MaintenanceError(
                f"The plan starts from {', '.join(sorted(p.old_committee, key=p.old_committee.get))} (threshold "
                f"{p.old_threshold}), not from this cluster's committee; propose a new plan.", remote=False)
        old = [[name, i] for name, i in sorted(p.old_committee.items(), key=lambda x: x[1])]
        new = [[m.name, m.index] for m in p.new_committee]
        saved = SessionRecord(
            session_id=p.session_id, kind="reshare", from_epoch=p.from_epoch, new_epoch=p.new_epoch, old=old, new=new,
            old_threshold=p.old_threshold, new_threshold=p.new_threshold, senders=list(p.senders),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            extra={"added": [n for n in new_names if n not in spec.nodes],
                   "removed": [n for n in spec.nodes if n not in new_names], "epoch_known": True, "plan": plan},
        )
    else:
        if plan is not None and committee_plan.parse(committee_plan.from_document(plan)[0]).session_id != saved.session_id:
            raise MaintenanceError(
                f"Reshare session {saved.session_id} is open; run it again with its own plan (or none) to finish "
                "it, or --abort it.", remote=False)
        if plan is not None:
            saved.extra["plan"] = plan  # the same plan, perhaps with more approvals since
        wanted = {n for n, _ in saved.new}
        asked = None
        if shareholders is not None or threshold is not None or replace is not None:
            old_spec = ops.committee_spec([n for n, _ in saved.old], saved.old_threshold)
            try:
                asked = plan_committee(old_spec, shareholders, threshold, replace, ops.taken() - wanted)
            except MaintenanceError:
                asked = None
            if asked is None or set(asked[0]) != wanted or asked[1] != saved.new_threshold:
                raise MaintenanceError(
                    f"Reshare session {saved.session_id} to {', '.join(n for n, _ in saved.new)} (threshold "
                    f"{saved.new_threshold}) is open; run it again with the same arguments to finish it, or --abort it.",
                    remote=False)
    old_names = [n for n, _ in saved.old]
    new_names = [n for n, _ in saved.new]
    everyone = list(dict.fromkeys(old_names + new_names))
    new_spec = ops.committee_spec(new_names, saved.new_threshold)
    # 1-2. plan saved before anything else; new nodes provisioned and started.
    sessions.save(saved)
    ops.provision(new_spec)
    t = time.monotonic()
    addresses = ops.start(everyone)
    timings["start_s"] = time.monotonic() - t
    index_old = dict((n, i) for n, i in saved.old)
    index_new = dict((n, i) for n, i in saved.new)
    nodes = [Node(n, index_new.get(n) or index_old[n], addresses[n]) for n in everyone]
    admin = Admin(nodes, ops.auditor_tls())
    try:
        return _drive(admin, ops, sessions, saved, new_spec, old_names, new_names, everyone, index_old, index_new,
                      abort=abort, allow_loss=allow_loss, drain_s=drain_s, progress=progress, faults=faults,
                      resumed=resumed, started=started, timings=timings, addresses=addresses, pace=pace)
    finally:
        admin.close()


CHECK_CHALLENGES = 3


def check_reshare(admin, saved, sessions, old_names: list[str], new_names: list[str], k_old: int, k_new: int, *,
                  allow_loss: bool = False) -> dict:
    """Run the reshare check on every member of both committees; the verdict
    per challenge (``proactive.reshare_check``) and what it can name.

    The auditor's challenges are drawn once per session and kept in the
    session file, so a rerun after a crash asks the same check again (the
    nodes answer one check context per session). Every side must hold the
    same records; with ``allow_loss`` those some side lacks (dropped by this
    reshare) are left out of the check."""
    if not saved.extra.get("check_challenges"):
        saved.extra["check_challenges"] = [proactive.new_challenge().hex() for _ in range(CHECK_CHALLENGES)]
        sessions.save(saved)
    challenges = [bytes.fromhex(c) for c in saved.extra["check_challenges"]]
    sid = saved.session_id
    members = sorted(set(old_names) | set(new_names))
    step1 = admin.each(members, lambda name: admin.call(
        name, "CheckReshare", _S.CheckReshareRequest(session_id=sid, challenges=challenges)))
    contributions = [_S.MemberContribution(name=n, contribution=step1[n].contribution) for n in members]
    held = [set(np.frombuffer(step1[n].old_key_hashes, dtype="<u8").tolist()) for n in old_names] + \
           [set(np.frombuffer(step1[n].new_key_hashes, dtype="<u8").tolist()) for n in new_names]
    every, some = set.intersection(*held), set.union(*held)
    if some != every and not allow_loss:
        return {"challenges": len(challenges), "passed": False, "suspects": [], "verdicts": [],
                "reason": f"{len(some - every)} record(s) are not held on every side (rerun with --allow-loss to "
                          "drop them)"}
    exclude = np.array(sorted(some - every), dtype="<u8").tobytes()
    req = _S.CheckReshareRequest(session_id=sid, challenges=challenges, contributions=contributions,
                                 exclude_key_hashes=exclude)
    answers = admin.each(members, lambda name: admin.call(name, "CheckReshare", req, timeout=CHECK_TIMEOUT_S))
    old = {a.old_index: (n, list(a.old_values)) for n, a in answers.items() if a.old_index}
    new = {a.new_index: (n, list(a.new_values)) for n, a in answers.items() if a.new_index}
    out: dict = {"challenges": len(challenges), "passed": False, "suspects": [], "excluded": len(exclude) // 8,
                 "records_old": sorted({int(a.old_records) for a in answers.values() if a.old_index}),
                 "records_new": sorted({int(a.new_records) for a in answers.values() if a.new_index})}
    if len({a.context_sha256 for a in answers.values()}) != 1:
        return {**out, "reason": "the nodes checked different contexts"}
    digests = {a.old_keys_sha256 for a in answers.values() if a.old_index} | \
              {a.new_keys_sha256 for a in answers.values() if a.new_index}
    if len(digests) != 1:
        return {**out, "reason": "the members cover different records"}
    verdicts = []
    for c in range(len(challenges)):
        ox, ov = sorted(old), [old[x][1][c] for x in sorted(old)]
        nx, nv = sorted(new), [new[x][1][c] for x in sorted(new)]
        verdict = proactive.reshare_check(ox, ov, k_old, nx, nv, k_new)
        verdicts.append(verdict)
        if verdict == "old_inconsistent":
            out["suspects"] = sorted(set(out["suspects"]) | set(_odd_one(old, c, k_old)))
        elif verdict == "new_inconsistent":
            out["suspects"] = sorted(set(out["suspects"]) | set(_odd_one(new, c, k_new)))
    out["verdicts"] = verdicts
    if all(v == "ok" for v in verdicts):
        return {**out, "passed": True, "reason": ""}
    reason = next(v for v in verdicts if v != "ok")
    text = {"old_inconsistent": "an old member reported a value off the old sharing",
            "new_inconsistent": "a new member's values are off the new sharing (a sender dealt values of the wrong "
                                "degree, or a share is damaged)",
            "different_secret": "the new sharing holds different values (a sender dealt wrong values)"}[reason]
    if reason == "different_secret":
        out["senders"] = [old[x][0] for x in sorted(old) if x in saved.senders]
    return {**out, "reason": text}


def _odd_one(side: dict, c: int, k: int) -> list[str]:
    # The one member whose report, left out, makes the rest consistent (named
    # only when the rest still over-determine the polynomial: n - 1 > k).
    xs = sorted(side)
    if len(xs) - 1 <= k:
        return []
    odd = [side[x][0] for x in xs
           if proactive.value_at_zero([y for y in xs if y != x], [side[y][1][c] for y in xs if y != x], k) is not None]
    return odd if len(odd) == 1 else []


def _suspects(check: dict) -> str:
    if check.get("suspects"):
        return f" (suspect: {', '.join(check['suspects'])})"
    if check.get("senders"):
        return f" (one of the senders {', '.join(check['senders'])})"
    return ""


def _spec_fields(spec) -> dict:
    return {k: getattr(spec, k) for k in ("shareholders", "threshold", "dim", "tenants", "nodes", "auditor", "matcher",
                                          "match_threshold")}


def _drive(admin, ops, sessions, saved, new_spec, old_names, new_names, everyone, index_old, index_new, *, abort,
           allow_loss, drain_s, progress, faults, resumed, started, timings, addresses, pace) -> dict:
    open_now = admin.each(everyone, lambda name: admin.session(name))
    foreign = {n: s for n, s in open_now.items() if s is not None and s.session_id != saved.session_id}
    if foreign:
        name, s = next(iter(foreign.items()))
        raise MaintenanceError(
            f"Node {name} has another open {KIND_NAMES.get(s.kind, '?')} session {s.session_id} (state {_state(s)}); "
            "finish or abort it first.", status="FAILED_PRECONDITION")
    if not saved.extra.get("epoch_known"):
        infos = admin.node_info(old_names)
        epochs = {info.epoch for info in infos.values()}
        if len(epochs) != 1:
            raise MaintenanceError(
                f"The old committee disagrees on the current epoch ({', '.join(f'{n}: {i.epoch}' for n, i in infos.items())}).")
        saved.from_epoch = epochs.pop()
        # A joining node starts at epoch 1; the new epoch is later than every node's.
        saved.new_epoch = max(saved.from_epoch, *(i.epoch for i in admin.node_info(everyone).values())) + 1
        saved.extra["epoch_known"] = True
        sessions.save(saved)
    sid = saved.session_id
    report: dict = {
        "action": "reshare", "session_id": sid, "from_epoch": saved.from_epoch, "new_epoch": saved.new_epoch,
        "resumed": resumed, "old_committee": old_names, "new_committee": new_names,
        "old_threshold": saved.old_threshold, "new_threshold": saved.new_threshold,
        "added": saved.extra.get("added", []), "removed": saved.extra.get("removed", []),
    }
    states = admin.each(everyone, lambda name: admin.session(name, sid))
    committed = [n for n, s in states.items()
                 if s is not None and s.state in (_S.SESSION_STATE_COMMITTED, _S.SESSION_STATE_FINALIZED)]
    if abort:
        if committed:
            raise MaintenanceError(
                f"Session {sid} is already committed on {', '.join(committed)}; it cannot be rolled back. Run "
                "`vaultctl reshare` again to complete it.", status="FAILED_PRECONDITION")
        present = [n for n, s in states.items() if s is not None]
        admin.each(present, lambda name: admin.call(name, "AbortSession", _S.AbortSessionRequest(session_id=sid)))
        ops.retire(saved.extra.get("added", []))
        sessions.clear()
        return {**report, "action": "abort", "state": "aborted"}

    old_members = [_S.Member(name=n, index=index_old[n]) for n in old_names]
    new_members = [_S.Member(name=n, index=index_new[n]) for n in new_names]
    body, approvals = committee_plan.from_document(saved.extra.get("plan") or {})
    begin = _S.BeginSessionRequest(
        session_id=sid, kind=_S.SESSION_KIND_RESHARE, from_epoch=saved.from_epoch, new_epoch=saved.new_epoch,
        old_committee=old_members, new_committee=new_members, old_threshold=saved.old_threshold,
        new_threshold=saved.new_threshold, senders=saved.senders,
        plan=_S.CommitteePlan(body=body, approvals=[_S.PlanApproval(operator=n, signature=sig)
                                                    for n, sig in sorted(approvals.items())]),
    )
    t = time.monotonic()
    admin.each(everyone, lambda name: admin.call(name, "BeginSession", begin))
    timings["begin_s"] = time.monotonic() - t
    peers = [_S.Member(name=n, index=index_old[n], address=addresses[n]) for n in old_names]
    lead = next(n for n in old_names if index_old[n] == saved.senders[0])

    if not committed:
        total = admin.session(lead, sid).records_old
        t = time.monotonic()
        prepare = _S.PrepareSessionRequest(session_id=sid, peers=peers, max_records_per_s=pace)
        prepared = admin.phase(everyone, "prepare", "PrepareSession", prepare, progress, faults, total=total)
        timings["prepare_s"] = time.monotonic() - t
        counts = {n: int(prepared[n].records_prepared + prepared[n].records_new) for n in new_names}
        skipped = max((int(prepared[n].records_skipped) for n in new_names), default=0)
        report["records"] = counts
        report["skipped"] = skipped
        if len(set(counts.values())) != 1:
            raise MaintenanceError(
                f"The new members prepared different numbers of records ({counts}); run the command again.")
        if skipped and not allow_loss:
            admin.each(everyone, lambda name: admin.call(name, "AbortSession", _S.AbortSessionRequest(session_id=sid)))
            ops.retire(saved.extra.get("added", []))
            sessions.clear()
            raise MaintenanceError(
                f"{skipped} record(s) are not held by every sender (half-done enrolments or deletions); the reshare "
                "was rolled back. Repair those subjects (enrol again or delete), or rerun with --allow-loss to "
                "drop them.", skipped=skipped)
        # The new members receive the records the lead sender lists. A lead
        # that leaves some out (its operator deleted its own shares of them)
        # would have them erased everywhere at finalize, so every old member's
        # count is held against what arrived.
        received = next(iter(counts.values()), 0)
        held = {n: int(admin.session(n, sid).records_old) for n in old_names}
        missing = {n: c - received for n, c in held.items() if c > received}
        report["not_received"] = missing
        if missing and not allow_loss:
            admin.each(everyone, lambda name: admin.call(name, "AbortSession", _S.AbortSessionRequest(session_id=sid)))
            ops.retire(saved.extra.get("added", []))
            sessions.clear()
            raise MaintenanceError(
                f"The new members received {received} record(s), but {', '.join(f'{n} holds {held[n]}' for n in missing)}"
                f" (lead sender {lead} listed fewer); the reshare was rolled back. Find out why the lead lacks them "
                "(half-done enrolments, or a damaged or tampered node), or rerun with --allow-loss to drop them.",
                not_received=missing)

        # The check: the new sharing holds the same templates as the old one
        # (vault.proactive), before any node serves it.
        t = time.monotonic()
        check = check_reshare(admin, saved, sessions, old_names, new_names, saved.old_threshold,
                              saved.new_threshold, allow_loss=allow_loss)
        timings["check_s"] = time.monotonic() - t
        report["check"] = check
        if not check["passed"]:
            why = f"reshare check failed: {check['reason']}{_suspects(check)}"
            admin.each(everyone, lambda name: admin.call(name, "AbortSession",
                                                         _S.AbortSessionRequest(session_id=sid, reason=why)))
            ops.retire(saved.extra.get("added", []))
            sessions.clear()
            raise MaintenanceError(
                f"The reshare check failed ({check['reason']}): the new committee's shares do not hold the same "
                f"templates as the old ones{_suspects(check)}; the reshare was rolled back and the old committee "
                "keeps serving. Find the faulty node in the audit logs before running it again.", check=check)

    # 5. commit on every node (new members start serving the new epoch)
    t = time.monotonic()
    admin.phase(everyone, "commit", "CommitSession", _S.CommitSessionRequest(session_id=sid), progress, faults)
    timings["commit_s"] = time.monotonic() - t

    # 6. switch: cluster.json and the matcher follow the new committee
    t = time.monotonic()
    if not ops.switch(new_spec, saved.extra.get("removed", []), addresses):
        # A deployment's matcher is its operator's: both epochs are served
        # until it follows the new committee, then `--finalize`.
        report["state"] = "committed"
        report["message"] = (
            f"Every node committed session {sid}: the new committee ({', '.join(new_names)}, threshold "
            f"{saved.new_threshold}) serves beside the old one. The matcher operator now lists the new committee "
            "under [[shareholders]] and reloads the matcher; then run this command again with --finalize to "
            "destroy the old epoch.")
        timings["total_s"] = time.monotonic() - started
        report["timings"] = _round(timings)
        return report
    faults.step("switch")
    timings["switch_s"] = time.monotonic() - t
    if drain_s > 0:
        time.sleep(drain_s)

    # 7. finalize everywhere: old epoch destroyed; nodes that left hold nothing
    t = time.monotonic()
    finals = admin.phase(everyone, "finalize", "FinalizeSession", _S.FinalizeSessionRequest(session_id=sid),
                         progress, faults)
    timings["finalize_s"] = time.monotonic() - t
    ops.retire(saved.extra.get("removed", []))
    sessions.clear()
    report["records"] = {n: int(finals[n].records_new) for n in new_names}
    report["destroyed"] = {n: True for n in saved.extra.get("removed", [])}
    report["state"] = "finalized"
    timings["total_s"] = time.monotonic() - started
    report["timings"] = _round(timings)
    total = max(report["records"].values(), default=0)
    report["templates_per_s"] = round(total / timings["total_s"], 1) if timings["total_s"] > 0 else None
    return report


# --- the command ------------------------------------------------------------------------------


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("propose", "approve"), default=None,
                   help="propose: write a committee-change plan; approve: sign it as one node operator; "
                        "none: run the approved plan (--plan)")
    p.add_argument("--shareholders", type=int, default=None, metavar="N", help="size of the new committee n'")
    p.add_argument("--threshold", type=int, default=None, metavar="K", help="threshold of the new committee k'")
    p.add_argument("--replace", default=None, metavar="NAME", help="replace this node by a new one (same index)")
    p.add_argument("--plan", type=pathlib.Path, default=None, metavar="FILE",
                   help="the plan file (propose writes it, default D/maintenance/reshare-plan.json; approve signs "
                        "it; a run needs it approved by k current node operators)")
    p.add_argument("--operator", default=None, metavar="NAME", help="approve: the node whose operator signs")
    p.add_argument("--key", type=pathlib.Path, default=None, metavar="FILE",
                   help="approve: the operator's Ed25519 key (PEM); default the dev key D/operators/NAME.key")
    p.add_argument("--ttl", type=seconds_or_zero, default=None, metavar="S",
                   help="propose: seconds the plan stays valid (default one day, at most seven)")
    p.add_argument("--approve-with-dev-operators", action="store_true",
                   help="DEV CLUSTER ONLY: propose and approve with every dev operator key of the cluster "
                        "directory in one go, then run (a real deployment has each operator approve)")
    p.add_argument("--abort", action="store_true", help="roll back the open session (only before any node committed)")
    p.add_argument("--allow-loss", action="store_true",
                   help="go on even if some records are not held by every sender (they are dropped)")
    p.add_argument("--pace", type=count, default=0, metavar="R",
                   help="at most R records per second per new member while preparing (default: no limit)")
    p.add_argument("--drain", type=seconds_or_zero, default=DEFAULT_DRAIN_S, metavar="S",
                   help="seconds between the matcher's switch and destroying the old epoch (default 2)")
    p.add_argument("--members", type=pathlib.Path, default=None, metavar="FILE",
                   help="propose --config: the new committee, one [[shareholders]] entry per member with the "
                        "address, spki_sha256 and operator_key it published")
    p.add_argument("--finalize", action="store_true",
                   help="--config: the matcher now serves the new committee; destroy the old epoch (a run without "
                        "it stops once every node committed)")


def _read_plan(path: pathlib.Path) -> dict:
    try:
        data = json.loads(pathlib.Path(path).read_text())
        committee_plan.from_document(data)
    except OSError as exc:
        raise CliError(f"Cannot read the plan file {path}: {exc.strerror}.") from None
    except (ValueError, committee_plan.InvalidPlan) as exc:
        raise CliError(f"The plan file {path} is not a committee-change plan: {exc}") from None
    return data


def _write_plan(path: pathlib.Path, document: dict) -> None:
    cluster._write(pathlib.Path(path), json.dumps(document, indent=2, sort_keys=True) + "\n")


def _plan_lines(path, document: dict, what: str) -> list[str]:
    s = _plan_summary(document)
    return [
        f"{what} {path}",
        f"  session {s['session_id']}: {', '.join(s['old_committee'])} (k={s['old_threshold']}) -> "
        f"{', '.join(s['new_committee'])} (k={s['new_threshold']}), epoch {s['from_epoch']} -> {s['new_epoch']}",
        f"  approvals: {', '.join(s['approvals']) or 'none'} ({len(s['approvals'])} of {s['needed']} needed)",
    ]


def _propose_and_approve_dev(ops: LocalCluster, args) -> dict:
    document = propose(ops, shareholders=args.shareholders, threshold=args.threshold, replace=args.replace,
                       ttl_s=args.ttl)
    for name in ops.spec().nodes:
        document = approve(document, name, ops.operator_key_pem(name))
    _write_plan(args.plan or plan_file(args.dir), document)
    return document


def _lines(report: dict) -> list[str]:
    if report.get("action") == "abort":
        return [report.get("message") or f"reshare session {report['session_id']} rolled back; the old committee stays"]
    if report.get("state") == "committed":
        return [report["message"]]
    recs = report.get("records", {})
    lines = [
        f"reshared {max(recs.values(), default=0)} templates to {', '.join(report['new_committee'])} "
        f"(threshold {report['new_threshold']}), epoch {report['new_epoch']}" + (" (resumed)" if report.get("resumed") else ""),
    ]
    if report.get("added"):
        lines.append(f"  joined: {', '.join(report['added'])}")
    if report.get("removed"):
        lines.append(f"  left (shares destroyed, process stopped): {', '.join(report['removed'])}")
    t = report.get("timings", {})
    if t:
        lines.append(f"  {t.get('total_s', 0):.1f} s" + (f", {report['templates_per_s']} templates/s" if report.get("templates_per_s") else "")
                     + "; no template was rejoined")
    return lines


@command("reshare", help="change the committee and threshold on an operator-approved plan: propose, approve, "
                    "run (resumable)", arguments=_args, target="any")
def _reshare(args) -> Result:
    if args.abort and (args.shareholders or args.threshold or args.replace or args.action or args.plan or args.finalize):
        raise CliError("--abort takes no committee option, no plan and no --finalize.")
    deployed = args.config is not None
    if deployed and (args.shareholders or args.replace or args.approve_with_dev_operators):
        raise CliError("With --config the new committee comes from --members (propose) or the plan; --shareholders, "
                       "--replace and --approve-with-dev-operators are for a local cluster (--dir).")
    if args.members is not None and not (deployed and args.action == "propose"):
        raise CliError("--members goes with `reshare propose --config`.")
    if args.finalize and (not deployed or args.action):
        raise CliError("--finalize goes with a run of `reshare --config` (the local cluster switches by itself).")
    try:
        if args.action == "propose":
            if deployed:
                if args.members is None:
                    raise CliError("propose --config needs --members FILE (the new committee as its members "
                                   "published it).")
                if args.plan is None:
                    raise CliError("propose --config needs --plan FILE (where to write the plan).")
                ops = Deployment(_target(args))
                document = propose_members(ops, read_members(args.members), threshold=args.threshold, ttl_s=args.ttl)
                path = args.plan
            else:
                ops = LocalCluster(args.dir)
                document = propose(ops, shareholders=args.shareholders, threshold=args.threshold,
                                   replace=args.replace, ttl_s=args.ttl)
                path = args.plan or plan_file(args.dir)
            _write_plan(path, document)
            return Result({"action": "propose", "plan_file": str(path), **_plan_summary(document),
                           "document": document}, _plan_lines(path, document, "plan written to"))
        if args.action == "approve":
            if not args.operator:
                raise CliError("approve needs --operator NAME (the node whose operator signs).")
            if deployed and (args.plan is None or args.key is None):
                raise CliError("approve --config needs --plan FILE and --key FILE (the operator's own key).")
            path = args.plan or plan_file(args.dir)
            key_pem = args.key.read_bytes() if args.key else LocalCluster(args.dir).operator_key_pem(args.operator)
            document = approve(_read_plan(path), args.operator, key_pem)
            _write_plan(path, document)
            return Result({"action": "approve", "plan_file": str(path), "operator": args.operator,
                           **_plan_summary(document)}, _plan_lines(path, document, f"approved by {args.operator}:"))
    except OSError as exc:
        raise CliError(f"Cannot read the key file {args.key}: {exc.strerror}.") from None
    except cluster.ClusterError as exc:
        raise CliError(str(exc)) from None
    except MaintenanceError as exc:
        cls = RemoteError if exc.remote else CliError
        raise cls(exc.message, **{k: v for k, v in exc.details.items() if isinstance(v, (str, int, bool, dict))}) from None
    target = _target(args) if deployed else None
    sessions = SessionFile(pathlib.Path(target.state_dir) if deployed else state_dir(args.dir))
    progress = Progress(progress_enabled(args.format))
    try:
        sessions.lock()
        document = _read_plan(args.plan) if args.plan else None
        if deployed:
            saved = sessions.load()
            known = document or (saved.extra.get("plan") if saved is not None and saved.kind == "reshare" else None)
            ops = Deployment(target, plan=known, finalize=args.finalize)
        else:
            ops = LocalCluster(args.dir)
            ops.spec()
            if document is None and args.approve_with_dev_operators and not args.abort and sessions.load() is None:
                document = _propose_and_approve_dev(ops, args)
        report = reshare_session(
            ops, sessions, shareholders=args.shareholders, threshold=args.threshold, replace=args.replace,
            abort=args.abort, allow_loss=args.allow_loss, drain_s=args.drain, progress=progress,
            faults=maintenance.crash_seam(args.dir) if not deployed else None, pace=max(0, args.pace), plan=document,
        )
    except cluster.ClusterError as exc:
        raise CliError(str(exc)) from None
    except MaintenanceError as exc:
        cls = RemoteError if exc.remote else CliError
        raise cls(exc.message, **{k: v for k, v in exc.details.items() if isinstance(v, (str, int, bool, dict))}) from None
    finally:
        progress.close()
        sessions.unlock()
    return Result(report, _lines(report))


def _target(args) -> auditor.AuditorTarget:
    try:
        return auditor.from_config(args.config)
    except auditor.TargetError as exc:
        raise CliError(str(exc)) from None
