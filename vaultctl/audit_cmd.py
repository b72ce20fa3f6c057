"""``vaultctl audit verify`` and ``vaultctl audit reconcile``.

**verify** fetches each node's audit log and signed checkpoints
(``ReadAuditLog``, auditor certificate) and checks them with the node's audit
public key *as recorded* in cluster.json's ``trust`` (or the auditor config),
never the key the node reports now (a mismatch is itself a finding). It names
the first broken entry: an edited entry (hash), a removed or reordered one
(sequence, links), a rewritten tail (a signed checkpoint disagrees), a tail
cut below a signed checkpoint. Entries after a node's last signed checkpoint
can be cut without a trace in the log itself; two things narrow that gap:
the node's live head (``GetNodeInfo``) must be in the log it streams, and
each clean run records every node's head in the auditor's witness file
(``<state>/audit-witness.json``), which later runs hold the log to. Signed
heads also leave the node as they are made: its peers record them in their
own chains (``witness`` entries, shareholders.witness), and every node's
chain must still hold each checkpoint its peers witnessed (same sequence
number, same hash), so a cut or a re-signed rewrite of signed entries is a
finding even when the node's own file shows nothing. Every node's log is
read for that, also with ``--node``.
With ``--dir`` a node that is not running is read from its database file
(read-only), so a node that refuses to start over a damaged log can still
be examined; ``--db FILE`` reads a copy of a node's database.

**reconcile** verifies every chain, then checks each ``release`` entry of
every node against the provider-signed ticket it records: signature under
the tenant's ticket key as recorded (cluster.json / auditor config), the
ticket naming the same tenant, subject and request id, valid at the time of
the release, the node a member of the committee, the caller a matcher, and
one release per node per verification. Verifications (tenant + request id)
that released fewer than k shares are reported (a verification that could
not complete), as are denials; neither is an error. A ``verify_on_shares``
entry (Verify on shares: nothing released) is held to the same ticket
check; its ticket must not also appear in a release, nor twice at one node.

Writes are held to the same standard (docs/contracts.md, "Provider-signed
writes"): every ``store`` and ``delete`` entry must record a provider ticket
that verifies under the recorded key, for this cluster (audience), naming
the entry's tenant, subject and request id, with an operation that allows
it (a store that replaced another request's records needs REPLACE; a
delete needs DELETE, or the ENROLL / REPLACE ticket of the enrolment it
undid), made by a matcher; every ``store_batch`` entry must name the
digest of its records' tickets. A write without one is a finding.

Exit status: 0 clean; 3 a broken chain, an unexplained release or write; 2 a node
could not be read; 1 a usage or local error (e.g. no recorded key).
"""
from __future__ import annotations

import json
import pathlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from shareholders import storage
from splitvault.v1 import common_pb2, shareholder_pb2, shareholder_pb2_grpc
from vault import audit, pki, ticket as tickets
from vault.errors import InvalidTicket
from vaultctl import auditor
from vaultctl.cli import EXIT_LOCAL, EXIT_OK, EXIT_REMOTE, CliError, Result, command
from vaultrpc import wire
from vaultrpc.files import write_atomic

# The check ran and found a problem (contracts.md, exit codes).
EXIT_FINDING = 3
# Items listed in full in JSON; text shows the first few.
MAX_LISTED = 1000
TEXT_LISTED = 10
WITNESS_FILE = "audit-witness.json"
# A node's signed checkpoint older than this must be witnessed by a peer: a
# node that keeps its checkpoints to itself could cut them unseen. Peers
# retry publishing at most 30 s apart, so this is ample for a live peer.
WITNESS_GRACE_MS = 10 * 60 * 1000


@dataclass
class NodeLog:
    """One node's log as read, and how."""

    node: auditor.NodeRef
    source: str = ""  # "rpc", "file <path>"
    entries: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    reported_head: int | None = None
    reported_key: bytes | None = None
    error: str | None = None  # could not be read


# ---------------------------------------------------------------- reading


def _store_exists(where) -> bool:
    return isinstance(where, storage.Location) or (where is not None and pathlib.Path(where).exists())


def read_database(where):
    """(entries, checkpoints) from a node's store (a SQLite file or a
    storage.Location), read-only."""
    if not _store_exists(where):
        raise FileNotFoundError(f"There is no database at {where}.")
    db = storage.connect_readonly(where)
    try:
        return db.read_chain()
    finally:
        db.close()


def read_node(target: auditor.AuditorTarget, node: auditor.NodeRef, db: pathlib.Path | None = None) -> NodeLog:
    log = NodeLog(node)
    offline = db or (node.db_path if node.address is None else None)
    if offline is not None:
        log.source = f"file {offline}"
        try:
            log.entries, log.checkpoints = read_database(offline)
        except (OSError, *storage.errors()) as exc:
            log.error = f"cannot read {offline}: {exc}"
        return log
    if node.address is None:
        log.error = "not running"
        return log
    log.source = f"rpc {node.address}"
    try:
        channel = auditor.channel(target, node)
    except (auditor.TargetError, ValueError) as exc:
        log.error = str(exc)
        return log
    try:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        info = stub.GetNodeInfo(shareholder_pb2.GetNodeInfoRequest(), timeout=target.timeout_s)
        log.reported_head, log.reported_key = info.audit_head_seq, bytes(info.audit_public_key)
        # Taken after the head: the streamed log must reach at least that far.
        for item in stub.ReadAuditLog(shareholder_pb2.ReadAuditLogRequest(from_seq=1), timeout=max(600.0, target.timeout_s)):
            if item.WhichOneof("item") == "entry":
                log.entries.append(wire.audit_entry(item.entry))
            else:
                log.checkpoints.append(wire.checkpoint(item.checkpoint))
    except grpc.RpcError as exc:
        log.error = f"{exc.code().name}: {exc.details()}"
    finally:
        channel.close()
    return log


# ---------------------------------------------------------------- verify


def _witness_path(target: auditor.AuditorTarget) -> pathlib.Path:
    return target.state_dir / WITNESS_FILE


def _load_witness(target: auditor.AuditorTarget) -> dict:
    try:
        data = json.loads(_witness_path(target).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_witness(target: auditor.AuditorTarget, data: dict) -> None:
    path = _witness_path(target)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def verify_log(log: NodeLog, witness: dict | None) -> dict:
    """One node's verdict as a dict (``ok``, ``broken_seq``, ``reason``, ...)."""
    node = log.node
    out = {"name": node.name, "retired": node.retired, "source": log.source, "ok": False, "state": "", "entries": len(log.entries),
           "checkpoints": len(log.checkpoints), "head_seq": 0, "signed_seq": 0, "unsigned_tail": 0,
           "broken_seq": None, "reason": None, "problems": [], "warnings": [],
           "witnessed_seq": 0, "witnessed_by": {}}
    if log.error is not None:
        out.update(state="unreadable", reason=f"The log of {node.name} could not be read: {log.error}.")
        return out
    if node.audit_key is None:
        out.update(state="no_key", reason=f"No audit public key is recorded for {node.name}; nothing to check it against.")
        return out
    report = audit.verify_chain(log.entries, log.checkpoints, node.audit_key, node=node.name)
    problems = list(report.problems)
    head = report.head_seq
    if log.reported_key is not None and log.reported_key != node.audit_key:
        problems.append((0, f"Node {node.name} presents an audit key other than the recorded one."))
    if report.ok and log.reported_head is not None and head < log.reported_head:
        problems.append((head + 1, f"The log ends at entry {head} but the node reports its head at entry "
                                   f"{log.reported_head}: entries were removed from the database."))
    if witness and report.ok:
        seen_seq, seen_hash = int(witness.get("seq", 0)), witness.get("hash", "")
        when = _when(int(witness.get("at_ms", 0)))
        if seen_seq > head:
            problems.append((head + 1, f"The log ends at entry {head}, but audit verify saw it reach entry {seen_seq} "
                                       f"on {when}: entries were removed."))
        elif seen_seq and log.entries[seen_seq - 1].entry_hash.hex() != seen_hash:
            problems.append((seen_seq, f"Entry {seen_seq} differs from the one audit verify saw on {when}: the log "
                                       "was rewritten up to there."))
    problems.sort(key=lambda p: p[0])
    ok = not problems
    signed = report.signed_seq
    out.update(
        ok=ok, state="ok" if ok else "broken", head_seq=head, head_hash=report.head_hash.hex() if ok else None,
        signed_seq=signed, unsigned_tail=max(0, head - signed) if ok else 0,
        broken_seq=problems[0][0] if problems else None, reason=problems[0][1] if problems else None,
        problems=[{"seq": s, "reason": r} for s, r in problems[:MAX_LISTED]],
    )
    if ok and head > signed:
        out["warnings"].append(
            f"{head - signed} entries after the last signed checkpoint (entry {signed}) are vouched for by no "
            "signature yet: cutting them would leave no trace in this log."
        )
    return out


def _exit_code(verdicts: list[dict], unexplained: int = 0) -> int:
    states = {v["state"] for v in verdicts}
    if "broken" in states or unexplained:
        return EXIT_FINDING
    if "unreadable" in states:
        return EXIT_REMOTE
    if "no_key" in states:
        return EXIT_LOCAL
    return EXIT_OK


def _target(args) -> auditor.AuditorTarget:
    try:
        target = auditor.from_args(args)
        if getattr(args, "node", None):
            target.node(args.node)
    except auditor.TargetError as exc:
        raise CliError(str(exc)) from None
    return target


def _witnessed(logs: dict[str, NodeLog], verdicts: dict[str, dict]) -> dict[str, list[tuple[str, object, int]]]:
    """node -> [(witness, checkpoint, time witnessed)]: the peers' checkpoints
    each chain records, from the part of it that verifies."""
    out: dict[str, list] = defaultdict(list)
    for name, log in logs.items():
        verdict = verdicts[name]
        if verdict["state"] not in ("ok", "broken"):
            continue
        usable = log.entries if verdict["ok"] else log.entries[: max(0, (verdict["broken_seq"] or 1) - 1)]
        for e in usable:
            if e.event == audit.WITNESS_EVENT:
                cp = audit.witnessed_checkpoint(e.details_json)
                if cp is not None and cp.node != name:
                    out[cp.node].append((name, cp, e.time_ms))
    return out


def hold_to_witnesses(verdict: dict, log: NodeLog, witnessed: list) -> bool:
    """Check one node's chain against the checkpoints its peers witnessed: each
    must still be in the chain, with the same hash. Adds the findings to
    ``verdict``; True when one is a witnessed entry past the end of the log."""
    if verdict["state"] not in ("ok", "broken") or log.node.audit_key is None:
        return False
    name, head, intact = log.node.name, verdict["head_seq"], verdict["ok"]
    problems, beyond, by = [], False, {}
    for peer, cp, at_ms in witnessed:
        if not audit.checkpoint_valid(cp, log.node.audit_key):
            verdict["warnings"].append(f"{peer} recorded a checkpoint of {name} (entry {cp.seq}) whose signature does "
                                       "not verify under the recorded key; it was ignored.")
            continue
        when = _when(at_ms)
        if cp.seq > head:
            if intact:
                beyond = True
                problems.append((head + 1, f"The log ends at entry {head}, but {peer} witnessed a signed checkpoint of "
                                           f"entry {cp.seq} on {when}: entries were removed."))
        elif log.entries[cp.seq - 1].entry_hash != cp.entry_hash:
            problems.append((cp.seq, f"Entry {cp.seq} differs from the signed checkpoint {peer} witnessed on {when}: "
                                     "the log was rewritten and signed again."))
        else:
            by[peer] = max(by.get(peer, 0), cp.seq)
    verdict["witnessed_seq"] = max(by.values(), default=0)
    verdict["witnessed_by"] = dict(sorted(by.items()))
    if problems:
        merged = sorted([(p["seq"], p["reason"]) for p in verdict["problems"]] + problems, key=lambda p: p[0])
        verdict.update(ok=False, state="broken", head_hash=None, unsigned_tail=0, broken_seq=merged[0][0],
                       reason=merged[0][1], problems=[{"seq": q, "reason": r} for q, r in merged[:MAX_LISTED]])
    return beyond


def hold_to_publication(verdict: dict, log: NodeLog, now_ms: int) -> None:
    """A finding when the node's newest checkpoint older than WITNESS_GRACE_MS
    is past every entry its peers witnessed: checkpoints that never left the
    node (its operator stopped publishing them, e.g. by emptying
    ``[[witness.peers]]``) prove nothing against a cut."""
    if verdict["state"] not in ("ok", "broken") or log.node.retired:
        return
    due = [cp.seq for cp in log.checkpoints if cp.time_ms <= now_ms - WITNESS_GRACE_MS]
    if not due or max(due) <= verdict["witnessed_seq"]:
        return
    seq = verdict["witnessed_seq"] + 1
    reason = (f"No peer has witnessed {log.node.name}'s checkpoints past entry {verdict['witnessed_seq']}, although "
              f"it signed entry {max(due)} more than {WITNESS_GRACE_MS // 60000} minutes ago: its signed entries "
              "could be cut unseen (is it publishing its checkpoints to its peers?).")
    merged = sorted([(p["seq"], p["reason"]) for p in verdict["problems"]] + [(seq, reason)], key=lambda p: p[0])
    verdict.update(ok=False, state="broken", head_hash=None, unsigned_tail=0, broken_seq=merged[0][0],
                   reason=merged[0][1], problems=[{"seq": q, "reason": r} for q, r in merged[:MAX_LISTED]])


def verify(target: auditor.AuditorTarget, node: str | None = None, db: pathlib.Path | None = None,
           update_witness: bool = True) -> tuple[list[dict], list[NodeLog]]:
    """Verdicts and logs of the selected nodes (the Python API).

    Every node's log is read, the selected ones' and their peers' (whose
    witness entries the selected chains are held to).
    """
    witness = _load_witness(target)
    selected = [ref.name for ref in target.select(node)]
    logs: dict[str, NodeLog] = {}
    for ref in target.nodes:
        gone = ref.address is None and not _store_exists(ref.db_path)
        if ref.retired and gone and ref.name not in selected:
            continue  # a retired node whose data is gone: nothing left to check
        logs[ref.name] = read_node(target, ref, db if ref.name in selected else None)
    verdicts = {name: verify_log(log, witness.get(name)) for name, log in logs.items()}
    seen = _witnessed(logs, verdicts)
    for name in selected:
        if name not in logs:
            continue
        if hold_to_witnesses(verdicts[name], logs[name], seen.get(name, [])) and logs[name].source.startswith("rpc"):
            # A live node may have signed (and been witnessed) after its log was read: read it once more.
            logs[name] = read_node(target, logs[name].node)
            verdicts[name] = verify_log(logs[name], witness.get(name))
            hold_to_witnesses(verdicts[name], logs[name], seen.get(name, []))
        unread = [peer for peer, log in logs.items() if peer != name and log.error is not None]
        if unread and verdicts[name]["state"] in ("ok", "broken"):
            verdicts[name]["warnings"].append(
                f"The logs of {', '.join(unread)} could not be read: what they witnessed of {name} was not checked.")
        elif len(logs) > 1:
            hold_to_publication(verdicts[name], logs[name], int(time.time() * 1000))
    out_verdicts, out_logs = [], []
    for name in selected:
        if name not in logs:
            continue
        verdict = verdicts[name]
        out_verdicts.append(verdict)
        out_logs.append(logs[name])
        if verdict["ok"] and update_witness and db is None:
            witness[name] = {"seq": verdict["head_seq"], "hash": verdict["head_hash"],
                             "signed_seq": verdict["signed_seq"], "at_ms": int(time.time() * 1000)}
    if update_witness and db is None and any(v["ok"] for v in out_verdicts):
        _save_witness(target, witness)
    return out_verdicts, out_logs


def _verify_args(p) -> None:
    p.add_argument("--node", default=None, help="check this node only (default: every node)")
    p.add_argument("--db", type=pathlib.Path, default=None, metavar="FILE",
                   help="read this copy of the node's database instead of asking the node (needs --node)")


@command("audit", "verify", help="check each node's audit chain and signed checkpoints; exit 3 on any break",
         arguments=_verify_args)
def _audit_verify(args) -> Result:
    if args.db is not None and not args.node:
        raise CliError("--db needs --node: a database file belongs to one node.")
    target = _target(args)
    verdicts, _logs = verify(target, args.node, args.db)
    code = _exit_code(verdicts)
    lines = [f"{'node':<10} {'entries':>8} {'signed to':>10} {'unsigned':>9} {'witnessed':>10}  result"]
    for v in verdicts:
        result = "OK" if v["ok"] else (
            f"BROKEN at entry {v['broken_seq']}: {v['reason']}" if v["state"] == "broken" else v["reason"])
        name = v["name"] + (" (retired)" if v.get("retired") else "")
        lines.append(f"{name:<10} {v['entries']:>8} {v['signed_seq']:>10} {v['unsigned_tail']:>9} "
                     f"{v['witnessed_seq']:>10}  {result}")
        for w in v["warnings"]:
            lines.append(f"{'':<10} note: {w}")
        if v["source"].startswith("file"):
            lines.append(f"{'':<10} read offline from {v['source'][5:]}")
    lines.append("every chain verifies" if code == EXIT_OK else "the audit logs do NOT all verify")
    return Result({"ok": code == EXIT_OK, "nodes": verdicts}, lines, code)


# ---------------------------------------------------------------- reconcile


def _finding(log, e, why: str) -> dict:
    """An entry ``audit reconcile`` cannot explain, as it reports it."""
    return {"node": log.node.name, "seq": e.seq, "event": e.event, "tenant": e.tenant, "subject": e.subject,
            "request_id": e.request_id, "time_ms": e.time_ms, "reason": why}


def reconcile(target: auditor.AuditorTarget, logs: list[NodeLog], verdicts: list[dict]) -> dict:
    """Cross-check releases against provider-signed tickets (the Python API)."""
    # Members past and present: a node retired by a reshare released shares
    # while it was one.
    committee = {n.name for n in target.nodes}
    keys = {t: {kid: pki.load_public_key(raw) for kid, raw in ks.items()} for t, ks in target.ticket_keys.items()}
    releases: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    bodies: dict[tuple[str, str], set] = defaultdict(set)
    unexplained: list[dict] = []
    writes: Counter = Counter()
    write_tickets: dict[tuple[str, str, str], set] = defaultdict(set)

    def check_ticket(e, details: dict, operations: tuple, ticket=None, batch: bool = False) -> tuple[str | None, object]:
        # Why the ticket an entry records does not authorise it (None: it does), and its body.
        # A batch ticket names no subject: that the record is one of its items the node checked
        # against the items it was sent, which the entry does not carry.
        ticket = tickets.from_audit_details(details) if ticket is None else ticket
        tenant_keys: dict[str, ed25519.Ed25519PublicKey] | None = keys.get(e.tenant)
        if not e.actor.startswith("matcher/"):
            return f"the call came from {e.actor or 'an unnamed caller'}, not a matcher", None
        if ticket is None:
            return f"the {e.event} records no ticket", None
        if tenant_keys is None:
            return f"no ticket key is recorded for tenant {e.tenant!r}", None
        try:
            body = wire.verify_ticket(ticket, tenant_keys, tenant=e.tenant, audience=target.cluster_id,
                                      operations=operations, batch=batch, at_ms=e.time_ms)
        except InvalidTicket as exc:
            return str(exc).rstrip(".").lower(), None
        if not batch and (body.subject, body.request_id) != (e.subject, e.request_id):
            return f"the ticket is for another subject or request than the {e.event} names", None
        return None, body

    def check_identify_release(log: NodeLog, e, details: dict) -> str | None:
        ticket = tickets.from_audit_details(details)
        tenant_keys = keys.get(e.tenant)
        if ticket is None or tenant_keys is None:
            return "the identify confirmation records no ticket of a known tenant"
        try:
            body = wire.verify_ticket(ticket, tenant_keys, tenant=e.tenant, audience=target.cluster_id,
                                      operations=(tickets.IDENTIFY,), at_ms=e.time_ms)
        except InvalidTicket as exc:
            return str(exc).rstrip(".").lower()
        if body.request_id != e.request_id:
            return "the ticket is for another request than the release names"
        if log.node.name not in identifications.get((e.tenant, e.request_id), ()):
            return "the identify confirmation follows no identify query of this node"
        return None

    def check_write(log: NodeLog, e) -> None:
        details = json.loads(e.details_json or "{}")
        writes[e.event] += 1
        if e.event == "store_batch":
            ok = isinstance(details.get("tickets_sha256"), str) and details.get("tickets") == details.get("records")
            why = None if ok else "the bulk store records no digest of its records' provider tickets"
            operations = (tickets.REPLACE,) if details.get("replaced") else tickets.WRITES
            recorded = [details[k] for k in sorted(details) if k.startswith("batch_ticket_")]
            for packed in recorded if why is None else []:
                parts = packed if isinstance(packed, list) and len(packed) >= 3 else ["", "", ""]
                batch_ticket = tickets.from_audit_details({"key_id": parts[0], "ticket_sig": parts[1],
                                                           "ticket": list(parts[2:])})
                why, _ = check_ticket(e, {}, operations, ticket=batch_ticket or common_pb2.VerificationTicket(),
                                      batch=True)
                if why is not None:
                    why = f"a batch ticket of the bulk store: {why}"
                    break
        else:
            if e.event == "store":
                operations = (tickets.REPLACE,) if details.get("replaced") else tickets.WRITES
            elif e.event == "mac_key_release":
                # A MAC key share given to the matcher for an enrolment: under that enrolment's write ticket.
                operations = tickets.WRITES
                if not e.actor.startswith("matcher/"):
                    unexplained.append(_finding(
                        log, e, f"the key share went to {e.actor or 'an unnamed caller'}, not a matcher"))
                    return
            else:
                operations = (tickets.DELETE, *tickets.WRITES)
            batch_item = details.get("batch_item")
            why, body = check_ticket(e, details, operations, batch=bool(batch_item))
            if why is None and batch_item is not None and batch_item != e.request_id:
                why = f"the batch item the {e.event} names is another request than its own"
            if why is None:
                write_tickets[(e.event, e.tenant, e.request_id)].add(tickets.ticket_digest(tickets.from_audit_details(details)))
        if why is not None:
            unexplained.append(_finding(log, e, why))

    denials: Counter = Counter()
    denied: list[dict] = []
    identifications: dict[tuple[str, str], set] = defaultdict(set)
    on_shares: dict[tuple[str, str], list] = defaultdict(list)
    per_node = []
    for log, verdict in zip(logs, verdicts):
        # Only what the chain vouches for: entries up to the first break.
        usable = log.entries if verdict["ok"] else log.entries[: max(0, (verdict["broken_seq"] or 1) - 1)]
        n_rel = n_deny = 0
        for e in usable:
            if e.event == "deny":
                n_deny += 1
                details = json.loads(e.details_json or "{}")
                denials[details.get("reason", "unknown")] += 1
                if len(denied) < MAX_LISTED:
                    denied.append({"node": log.node.name, "seq": e.seq, "tenant": e.tenant, "subject": e.subject,
                                   "request_id": e.request_id, "reason": details.get("reason")})
                continue
            if e.event in ("store", "store_batch", "delete", "mac_key_release"):
                check_write(log, e)
                continue
            if e.event == "identify":
                # One entry per query per node: under a provider-signed IDENTIFY ticket, asked by a matcher.
                why, _ = check_ticket(e, json.loads(e.details_json or "{}"), (tickets.IDENTIFY,))
                identifications[(e.tenant, e.request_id)].add(log.node.name)
                if why is not None:
                    unexplained.append(_finding(log, e, why))
                continue
            if e.event == "verify_on_shares":
                # One entry per verification per node of its three, under the provider's VERIFY
                # ticket for this subject, asked by a matcher; nothing was released.
                details = json.loads(e.details_json or "{}")
                why = (f"node {log.node.name} is not a member of the committee" if log.node.name not in committee
                       else check_ticket(e, details, (tickets.VERIFY,))[0])
                on_shares[(e.tenant, e.request_id)].append(log.node.name)
                if why is not None:
                    unexplained.append(_finding(log, e, why))
                continue
            if e.event != "release":
                continue
            n_rel += 1
            item = {"node": log.node.name, "seq": e.seq, "tenant": e.tenant, "subject": e.subject,
                    "request_id": e.request_id, "time_ms": e.time_ms}
            why = None
            details = json.loads(e.details_json or "{}")
            if log.node.name not in committee:
                why = f"node {log.node.name} is not a member of the committee"
            elif not e.actor.startswith("matcher/"):
                why = f"the share went to {e.actor or 'an unnamed caller'}, not a matcher"
            elif details.get("identify_query"):
                # Confirmation of an identify query's candidate: under the query's IDENTIFY
                # ticket, after this node's own entry for that query (one share per subject).
                why = check_identify_release(log, e, details)
                item["request_id"] = f"{e.request_id}/{e.subject}"
            else:
                why, body = check_ticket(e, details, (tickets.VERIFY,))
                if why is None:
                    bodies[(e.tenant, e.request_id)].add(tickets.from_audit_details(details).body)
            if why is not None:
                unexplained.append({**item, "reason": why})
                continue
            releases[(e.tenant, item["request_id"])][log.node.name].append(item)
        per_node.append({"name": log.node.name, "source": log.source, "chain_ok": verdict["ok"],
                         "broken_seq": verdict["broken_seq"], "error": verdict["reason"] if verdict["state"] in
                         ("unreadable", "no_key") else None, "entries": len(log.entries), "releases": n_rel,
                         "denials": n_deny})

    for (tenant, request_id), nodes in sorted(on_shares.items()):
        if (tenant, request_id) in releases:  # also released (a node logged it before the other's release)
            unexplained.append({"node": nodes[0], "seq": 0, "event": "verify_on_shares", "tenant": tenant,
                                "subject": "", "request_id": request_id, "time_ms": 0,
                                "reason": "a verification ticket was used both on shares and for releases"})
        for node in sorted({n for n in nodes if nodes.count(n) > 1}):
            unexplained.append({"node": node, "seq": 0, "event": "verify_on_shares", "tenant": tenant, "subject": "",
                                "request_id": request_id, "time_ms": 0,
                                "reason": f"node {node} logged one verification on shares twice"})
    incomplete, conflicting = [], []
    complete = 0
    for (tenant, request_id), by_node in sorted(releases.items()):
        for node, items in by_node.items():
            for extra in items[1:]:  # one share per node per verification
                unexplained.append({**extra, "reason": f"node {node} released a second share for one verification"})
        if len(bodies[(tenant, request_id)]) > 1:
            conflicting.append({"tenant": tenant, "request_id": request_id, "tickets": len(bodies[(tenant, request_id)])})
        if len(by_node) >= target.threshold:
            complete += 1
        else:
            if len(incomplete) < MAX_LISTED:
                first = next(iter(by_node.values()))[0]
                incomplete.append({"tenant": tenant, "request_id": request_id, "subject": first["subject"],
                                   "nodes": sorted(by_node), "released": len(by_node), "needed": target.threshold})
    unexplained.sort(key=lambda u: (u["node"], u["seq"]))
    return {
        "nodes": per_node,
        "threshold": target.threshold,
        "verifications": len(releases),
        "complete": complete,
        "incomplete_count": len(releases) - complete,
        "incomplete": incomplete,
        "unexplained_count": len(unexplained),
        "unexplained": unexplained[:MAX_LISTED],
        "conflicting": conflicting[:MAX_LISTED],
        "denials": dict(sorted(denials.items())),
        "denied": denied,
        "writes": dict(sorted(writes.items())),
        # Identify queries (each logged once by every node of its three), by how many nodes logged them.
        "identifications": len(identifications),
        "identifications_by_nodes": dict(sorted(Counter(len(v) for v in identifications.values()).items())),
        # Verifications on shares (each logged once by every node of its three; nothing released).
        "verifications_on_shares": len(on_shares),
        "verifications_on_shares_by_nodes": dict(sorted(Counter(len(set(v)) for v in on_shares.values()).items())),
        # Writes of one request signed as several tickets (a provider's retry re-signs: a note, not a finding).
        "write_tickets_differ": [{"event": ev, "tenant": t, "request_id": r, "tickets": len(d)}
                                 for (ev, t, r), d in sorted(write_tickets.items()) if len(d) > 1][:MAX_LISTED],
    }


@command("audit", "reconcile", help="cross-check every share release against provider-signed verifications; "
         "exit 3 on any unexplained release")
def _audit_reconcile(args) -> Result:
    target = _target(args)
    verdicts, logs = verify(target)
    data = reconcile(target, logs, verdicts)
    code = _exit_code(verdicts, data["unexplained_count"])
    data = {"ok": code == EXIT_OK, **data, "chains": verdicts}
    lines = [f"{'node':<10} {'entries':>8} {'releases':>9} {'denials':>8}  chain"]
    for n, v in zip(data["nodes"], verdicts):
        chain = "OK" if v["ok"] else (f"BROKEN at entry {v['broken_seq']}" if v["state"] == "broken" else v["reason"])
        lines.append(f"{n['name']:<10} {n['entries']:>8} {n['releases']:>9} {n['denials']:>8}  {chain}")
    lines.append(
        f"verifications: {data['verifications']} ({data['complete']} released >= k = {data['threshold']} shares, "
        f"{data['incomplete_count']} fewer: did not complete)"
    )
    if data["denials"]:
        lines.append("denials: " + ", ".join(f"{r} {c}" for r, c in data["denials"].items()))
    for item in data["incomplete"][:TEXT_LISTED]:
        lines.append(f"  incomplete: {item['tenant']}/{item['request_id']} ({item['subject']}): "
                     f"{item['released']} of {item['needed']} shares ({', '.join(item['nodes'])})")
    for item in data["conflicting"][:TEXT_LISTED]:
        lines.append(f"  note: request {item['tenant']}/{item['request_id']} was signed as {item['tickets']} different tickets")
    if data["writes"]:
        lines.append("writes: " + ", ".join(f"{ev} {c}" for ev, c in data["writes"].items()))
    if data["identifications"]:
        lines.append(f"identifications: {data['identifications']} (by nodes that logged them: "
                     + ", ".join(f"{n}: {c}" for n, c in data["identifications_by_nodes"].items()) + ")")
    if data["verifications_on_shares"]:
        lines.append(f"verifications on shares: {data['verifications_on_shares']} (by nodes that logged them: "
                     + ", ".join(f"{n}: {c}" for n, c in data["verifications_on_shares_by_nodes"].items())
                     + "; nothing released)")
    lines.append(f"unexplained releases and writes: {data['unexplained_count']}")
    for u in data["unexplained"][:TEXT_LISTED]:
        what = f"{u['event']} " if u.get("event") else ""
        lines.append(f"  {u['node']} entry {u['seq']}: {what}{u['tenant']}/{u['subject']} request {u['request_id']!r}: {u['reason']}")
    if data["unexplained_count"] > TEXT_LISTED:
        lines.append(f"  ... and {data['unexplained_count'] - TEXT_LISTED} more (--format json lists them)")
    lines.append("every release and write is explained" if code == EXIT_OK else "reconciliation FAILED" if code == EXIT_FINDING
                 else "reconciliation incomplete: a node could not be read")
    return Result(data, lines, code)
