"""``vaultctl refresh``: proactive share refresh to a new epoch (Herzberg et al.).

    vaultctl refresh --dir D [--check] [--allow-unchecked] [--abort] [--format json]

Every template keeps its value; every share changes, so shares stolen
before the refresh are worthless after it. The steps (docs/operations.md):

1. begin   every node takes its maintenance lock for one session id and
           draws its dealing seed; the session id is written to
           D/maintenance/epoch-session.json first, so a rerun finds it;
2. prepare every node pulls its zero-sharing values from every peer (node to
           node) and writes its new shares beside the old ones, unserved;
3. check   the auditor sends fresh random challenges, which
           the nodes mix with their own contributions; each node answers
           one masked field element per challenge over the records every
           member holds (the nodes decide); the values must lie on a
           polynomial of degree k - 1 through 0 (see vault.proactive):
           templates unchanged, nothing rejoined. A node answers a
           challenge once, so every run (and a resumed one) draws new ones.
           Records some node lacks are outside the check, so the session is
           rolled back when there are any (``--allow-unchecked`` accepts
           them): one node could drop its share of a subject and deal it
           wrong deltas;
4. commit  every node serves the new epoch beside the old;
5. finalize once ALL nodes serve it (and in-flight verifications drained),
           every node destroys the old epoch and its seed.

Rerunning the same command resumes the open session wherever it stopped: a
session that no node has committed is prepared again (idempotent) and goes
on; a committed one is rolled forward. ``--abort`` rolls back a session no
node has committed. ``--check`` alone prepares (or resumes), checks and
stops before the switch, leaving the session for a later ``vaultctl
refresh`` (commit) or ``--abort``.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

from splitvault.v1 import admin_pb2
from vault import epoch_mac, proactive
from vaultctl import auditor, maintenance
from vaultctl.cli import CliError, RemoteError, Result, command, count, seconds_or_zero
from vaultctl.maintenance import (
    KIND_NAMES, STATE_NAMES, Admin, CrashSeam, MaintenanceError, Node, Progress, SessionFile, SessionRecord,
    new_session_id, progress_enabled,
)

CHECK_CHALLENGES = 3
# Verifications started before the last node committed finish within the
# matcher's call deadline; the old epoch is destroyed only after it.
DEFAULT_DRAIN_S = 2.0

_S = admin_pb2


def _state(st) -> str:
    return STATE_NAMES.get(st.state, "unknown") if st is not None else "none"


def refresh_session(
    admin: Admin,
    committee: list[Node],
    threshold: int,
    sessions: SessionFile,
    *,
    check: bool = True,
    check_only: bool = False,
    abort: bool = False,
    challenges: int = CHECK_CHALLENGES,
    drain_s: float = DEFAULT_DRAIN_S,
    progress: Progress | None = None,
    faults: CrashSeam | None = None,
    adopt: str | None = None,
    pace: int = 0,
    allow_unchecked: bool = False,
    mac_key_width: int = 0,
) -> dict:
    """Drive (start, resume, check-only or abort) a refresh; returns the report.

    ``adopt`` takes over an open session by id when this workstation has no
    session file for it (another auditor's, or a lost state folder)."""
    progress = progress or Progress(False)
    faults = faults or CrashSeam()
    names = [n.name for n in sorted(committee, key=lambda n: n.index)]
    started = time.monotonic()
    timings: dict[str, float] = {}
    saved = sessions.load()
    if saved is not None and saved.kind != "refresh":
        raise MaintenanceError(
            f"A {saved.kind} session ({saved.session_id}) is open from this cluster directory; run "
            f"`vaultctl {saved.kind}` again to finish it, or abort it, first.", remote=False)
    open_now = admin.each(names, lambda name: admin.session(name))
    if saved is None and adopt:
        found = [s for s in admin.each(names, lambda name: admin.session(name, adopt)).values() if s is not None]
        if not found:
            raise MaintenanceError(f"No node knows session {adopt}.", remote=False)
        if any(s.kind != _S.SESSION_KIND_REFRESH for s in found):
            raise MaintenanceError(f"Session {adopt} is not a refresh.", remote=False)
        members = [[n.name, n.index] for n in sorted(committee, key=lambda n: n.index)]
        saved = SessionRecord(
            session_id=adopt, kind="refresh", from_epoch=int(found[0].from_epoch), new_epoch=int(found[0].new_epoch),
            old=members, new=members, old_threshold=threshold, new_threshold=threshold,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extra={"adopted": True},
        )
        sessions.save(saved)
    if saved is None:
        foreign = {n: s for n, s in open_now.items() if s is not None}
        if foreign:
            name, s = next(iter(foreign.items()))
            raise MaintenanceError(
                f"Node {name} has another open {KIND_NAMES.get(s.kind, '?')} session {s.session_id} "
                f"(state {_state(s)}, begun by {s.actor}); it is not this workstation's. Finish it where it was "
                f"started, or take it over with `--session {s.session_id}` (add --abort to roll it back).",
                status="FAILED_PRECONDITION")
        if abort:
            return {"action": "abort", "session_id": None, "state": "none", "message": "No refresh session is open."}
        infos = admin.node_info(names)
        epochs = {info.epoch for info in infos.values()}
        if len(epochs) != 1:
            raise MaintenanceError(
                f"The nodes disagree on the current epoch ({', '.join(f'{n}: {i.epoch}' for n, i in infos.items())}); "
                "finish the session that left them so first.")
        from_epoch = epochs.pop()
        members = [[n.name, n.index] for n in sorted(committee, key=lambda n: n.index)]
        saved = SessionRecord(
            session_id=new_session_id("refresh"), kind="refresh", from_epoch=from_epoch, new_epoch=from_epoch + 1,
            old=members, new=members, old_threshold=threshold, new_threshold=threshold,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        sessions.save(saved)  # before any node hears of it
        resumed = False
    else:
        foreign = {n: s for n, s in open_now.items() if s is not None and s.session_id != saved.session_id}
        if foreign:
            name, s = next(iter(foreign.items()))
            raise MaintenanceError(
                f"Node {name} has another open session {s.session_id}; this workstation drives {saved.session_id}.",
                status="FAILED_PRECONDITION")
        resumed = True
    sid = saved.session_id
    plan_members = [_S.Member(name=n, index=i) for n, i in saved.old]
    begin = _S.BeginSessionRequest(
        session_id=sid, kind=_S.SESSION_KIND_REFRESH, from_epoch=saved.from_epoch, new_epoch=saved.new_epoch,
        old_committee=plan_members, new_committee=plan_members, old_threshold=saved.old_threshold,
        new_threshold=saved.new_threshold, mac_key_width=mac_key_width,
    )

    def state_of(name):
        return admin.session(name, sid)

    states = admin.each(names, state_of)
    committed = [n for n, s in states.items() if s is not None and s.state in (_S.SESSION_STATE_COMMITTED, _S.SESSION_STATE_FINALIZED)]
    report: dict = {
        "action": "refresh", "session_id": sid, "from_epoch": saved.from_epoch, "new_epoch": saved.new_epoch,
        "resumed": resumed, "nodes": names,
    }

    if abort:
        if committed:
            raise MaintenanceError(
                f"Session {sid} is already committed on {', '.join(committed)}; it cannot be rolled back. Run "
                "`vaultctl refresh` again to complete it.", status="FAILED_PRECONDITION")
        present = [n for n, s in states.items() if s is not None]
        admin.each(present, lambda name: admin.call(name, "AbortSession", _S.AbortSessionRequest(session_id=sid)))
        sessions.clear()
        return {**report, "action": "abort", "state": "aborted"}

    # 1. begin (idempotent: resumes on nodes that know the session)
    t = time.monotonic()
    admin.each(names, lambda name: admin.call(name, "BeginSession", begin))
    timings["begin_s"] = time.monotonic() - t
    peers = admin.members(names)

    if not committed:
        # 2. prepare, in parallel on every node
        t = time.monotonic()
        prepare = _S.PrepareSessionRequest(session_id=sid, peers=peers, max_records_per_s=pace)
        prepared = admin.phase(names, "prepare", "PrepareSession", prepare, progress, faults)
        timings["prepare_s"] = time.monotonic() - t
        report["records"] = {n: int(s.records_prepared + s.records_new) for n, s in prepared.items()}
        # 3. check
        if check or check_only:
            t = time.monotonic()
            report["check"] = run_check(admin, names, sid, saved.new_threshold, challenges, peers)
            timings["check_s"] = time.monotonic() - t
            left_out = report["check"].get("excluded", 0)
            if report["check"]["passed"] and left_out and not allow_unchecked:
                # Records some member lacks are outside the check: one node
                # that dropped its own share could deal them wrong deltas.
                report["check"].update(passed=False, reason=(
                    f"{left_out} record(s) are not held by every node, so the check cannot cover them; repair those "
                    "subjects (enrol again or delete), or rerun with --allow-unchecked to refresh them on trust"))
            if not report["check"]["passed"]:
                reason = f"refresh check failed ({report['check']['reason']})"[:200]
                admin.each(names, lambda name: admin.call(
                    name, "AbortSession", _S.AbortSessionRequest(session_id=sid, reason=reason)))
                sessions.clear()
                raise MaintenanceError(
                    f"The refresh check failed ({report['check']['reason']}); session {sid} was rolled back on every "
                    "node and the old shares stay in service. Inspect the nodes' logs before trying again.",
                    check=report["check"])
        if check_only:
            return {**report, "action": "check", "state": "prepared", "timings": _round(timings),
                    "message": f"Session {sid} is prepared and checked; run `vaultctl refresh` to switch to epoch "
                               f"{saved.new_epoch}, or `vaultctl refresh --abort` to discard it."}
    elif check_only:
        report["check"] = run_check(admin, names, sid, saved.new_threshold, challenges, peers)
        return {**report, "action": "check", "state": "committed", "timings": _round(timings)}

    # 4. commit on every node
    t = time.monotonic()
    admin.phase(names, "commit", "CommitSession", _S.CommitSessionRequest(session_id=sid), progress, faults)
    timings["commit_s"] = time.monotonic() - t
    if drain_s > 0:
        time.sleep(drain_s)

    # 5. finalize: the old epoch is destroyed everywhere
    t = time.monotonic()
    finals = admin.phase(names, "finalize", "FinalizeSession", _S.FinalizeSessionRequest(session_id=sid),
                         progress, faults)
    timings["finalize_s"] = time.monotonic() - t
    sessions.clear()
    report["records"] = {n: int(s.records_new) for n, s in finals.items()}
    report["state"] = "finalized"
    timings["total_s"] = time.monotonic() - started
    report["timings"] = _round(timings)
    total = max(report["records"].values(), default=0)
    report["templates_per_s"] = round(total / timings["total_s"], 1) if timings["total_s"] > 0 else None
    return report


def _round(t: dict) -> dict:
    return {k: round(v, 3) for k, v in t.items()}


def run_check(admin: Admin, names: list[str], sid: str, threshold: int, count: int, peers) -> dict:
    """Challenge every node; the masked values must lie on a degree k-1 polynomial through 0.

    Every attempt draws fresh challenges (a node answers a challenge once per
    session), and the nodes decide the records covered: those every member
    holds. A second attempt is made only when the nodes' record sets changed
    during the first (a deletion in flight)."""
    xs = {n: admin.nodes[n].index for n in names}
    attempts = 0
    while True:
        attempts += 1
        challenges = [proactive.new_challenge() for _ in range(count)]
        req = _S.CheckRefreshRequest(session_id=sid, challenges=challenges, peers=peers)
        try:
            answers = admin.each(names, lambda name: admin.call(name, "CheckRefresh", req, timeout=600))
        except MaintenanceError as exc:
            if exc.details.get("status") != "DATA_LOSS":
                raise
            # A node found a prepared share damaged or replaced since it was prepared.
            return {"passed": False, "reason": exc.message, "challenges": count, "excluded": 0, "attempts": attempts}
        agreed = len({(a.keys_sha256, a.context_sha256) for a in answers.values()}) == 1
        if agreed or attempts >= 2:
            break
    excluded = max((int(a.excluded) for a in answers.values()), default=0)
    if not agreed:
        return {"passed": False, "reason": "the nodes' records changed during the check", "challenges": count,
                "excluded": excluded, "attempts": attempts}
    ordered = sorted(names, key=lambda n: xs[n])
    passed = all(
        proactive.on_zero_polynomial([xs[n] for n in ordered], [answers[n].values[c] for n in ordered], threshold)
        for c in range(count)
    )
    reason = "" if passed else "the new shares do not differ from the old by a sharing of zero"
    tags = renewal_verdict(answers, ordered, xs, threshold)
    if passed and tags:
        passed, reason = False, f"tags: {tags}"
    records = answers[ordered[0]].records
    return {
        "passed": passed,
        "reason": reason,
        "challenges": count,
        "records": int(records),
        "excluded": excluded,
        "attempts": attempts,
        "soundness": f"a wrong element survives each challenge with probability <= (d + L)/(2^31-1); {count} independent challenges",
        "reveals": "one uniformly random field element per node per challenge (masks bound to the check; no "
                   "challenge answered twice); for the tags, a uniformly random sharing of 0 per slot and tag",
        "tags": "renewed MAC tags checked against the new key: a wrong one survives each of "
                f"{epoch_mac.RENEWAL_CHECK_SLOTS} slots with probability 1/(2^31-1)",
    }


def renewal_verdict(answers: dict, ordered: list[str], xs: dict[str, int], threshold: int) -> str:
    """The tag part (vault.epoch_mac, the renewal check): "" when every slot's
    and tag's answers lie on a polynomial of degree k - 1 through 0, else why not."""
    size = epoch_mac.RENEWAL_CHECK_SLOTS * epoch_mac.TAG_COUNT
    if len({answers[n].renewal_context_sha256 for n in ordered}) != 1:
        return "the nodes checked the renewed tags over different records"
    short = [n for n in ordered if len(answers[n].renewal_values) != size]
    if short:
        return (f"the members' round-A reports do not lie on one polynomial (seen by {', '.join(short)}): a node's "
                "new shares or mask are inconsistent")
    answer = [np.asarray(answers[n].renewal_values, dtype=np.int64) for n in ordered]
    if not epoch_mac.renewal_check([xs[n] for n in ordered], answer, threshold):
        return ("the renewed MAC tags do not match the new key: a renewer dealt wrong renewal values or a node an "
                "inconsistent key contribution")
    return ""


# --- the command ------------------------------------------------------------------------------


def target_nodes(args) -> tuple[list[Node], int, object, pathlib.Path]:
    """The committee of ``--dir`` or ``--config``: nodes (with addresses), k,
    the auditor's TLS material and the state folder (vaultctl.auditor)."""
    try:
        target = auditor.from_args(args)
    except auditor.TargetError as exc:
        raise MaintenanceError(str(exc), remote=False) from None
    nodes = []
    for ref in target.nodes:
        if ref.retired:
            continue
        if not ref.address:
            hint = f"`vaultctl cluster up --dir {args.dir}`" if args.dir is not None else "it"
            raise MaintenanceError(f"Shareholder {ref.name} is not running; start {hint} and run the command again.",
                                   node=ref.name)
        nodes.append(Node(ref.name, ref.index, ref.address))
    try:
        tls = target.tls.load()
    except ValueError as exc:
        raise MaintenanceError(str(exc), remote=False) from None
    return nodes, target.threshold, tls, pathlib.Path(target.state_dir)


def _cluster_dim(args) -> int:
    # A local cluster's template dimension: the width of its first MAC key.
    if getattr(args, "dir", None) is None:
        return 0
    from vaultctl import cluster

    try:
        spec = cluster.load_spec(args.dir)
        return max((spec.dim, *(m.dimension for m in spec.modalities)))
    except Exception:  # noqa: BLE001 - no spec: the nodes' default
        return 0


def deal_first_key(nodes: list[Node], threshold: int, tls, width: int) -> dict:
    """Have the committee deal its first MAC key at the current epoch
    (``DealFirstMacKey`` on every node at once, each pulling every member's
    contribution node to node), then destroy the dealing seeds. Idempotent:
    nodes that hold their key already say so. The report: epoch, width, and
    which nodes dealt now."""
    admin = Admin(nodes, tls)
    members = [n.member() for n in nodes]
    names = [n.name for n in nodes]
    try:
        infos = admin.node_info(names)
        if all(info.mac_key_width for info in infos.values()) and len({i.epoch for i in infos.values()}) == 1:
            info = next(iter(infos.values()))
            return {"epoch": info.epoch, "width": info.mac_key_width, "dealt": []}
        dealt = admin.each(names, lambda name: admin.call(
            name, "DealFirstMacKey", _S.DealFirstMacKeyRequest(peers=members, width=width)))
        admin.each(names, lambda name: admin.call(name, "DealFirstMacKey", _S.DealFirstMacKeyRequest(finish=True)))
    finally:
        admin.close()
    epochs = {r.epoch for r in dealt.values()}
    widths = {r.width for r in dealt.values()}
    if len(epochs) != 1 or len(widths) != 1:
        raise MaintenanceError("The nodes dealt their first MAC key at different epochs or widths; "
                               "finish the session that left them so first.")
    return {"epoch": epochs.pop(), "width": widths.pop(), "dealt": sorted(n for n, r in dealt.items() if not r.already)}


def state_dir(root: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(root).expanduser().resolve() / "maintenance"


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="prepare (or resume), check that the templates are unchanged, and stop before the switch")
    p.add_argument("--allow-unchecked", action="store_true",
                   help="switch even if the check had to leave out records some node lacks (not recommended)")
    p.add_argument("--abort", action="store_true", help="roll back the open session (only before any node committed)")
    p.add_argument("--session", default=None, metavar="ID",
                   help="take over the open session ID (another workstation's, or a lost state folder)")
    p.add_argument("--challenges", type=int, default=CHECK_CHALLENGES, metavar="N", help="check challenges (default 3)")
    p.add_argument("--pace", type=count, default=0, metavar="R",
                   help="at most R records per second per node while preparing (default: no limit)")
    p.add_argument("--mac-key-width", type=count, default=0, metavar="W",
                   help="width of the first MAC key, when the nodes hold none yet (default: the cluster's dimension, "
                        "else 512; later refreshes keep the key's width)")
    p.add_argument("--drain", type=seconds_or_zero, default=DEFAULT_DRAIN_S, metavar="S",
                   help="seconds between the last commit and destroying the old epoch (default 2)")


def _lines(report: dict) -> list[str]:
    action = report.get("action")
    if action == "abort":
        return [report.get("message") or f"refresh session {report['session_id']} rolled back; the old shares stay in service"]
    lines = []
    chk = report.get("check")
    if chk:
        verdict = "PASSED" if chk["passed"] else "FAILED"
        lines.append(f"check {verdict}: {chk['challenges']} challenges over {chk.get('records', '?')} records"
                     + (f" ({chk['excluded']} not held by every node left out)" if chk.get("excluded") else "")
                     + "; nothing was rejoined")
    if action == "check":
        lines.append(report.get("message", ""))
        return lines
    recs = report.get("records", {})
    lines.insert(0, f"refreshed {max(recs.values(), default=0)} templates to epoch {report['new_epoch']} on "
                    f"{', '.join(report['nodes'])}" + (" (resumed)" if report.get("resumed") else ""))
    t = report.get("timings", {})
    if t:
        lines.append(f"  {t.get('total_s', 0):.1f} s" + (f", {report['templates_per_s']} templates/s" if report.get('templates_per_s') else "")
                     + "; the old epoch's shares are destroyed")
    return lines


@command("refresh", help="proactive share refresh to a new epoch (resumable)", arguments=_args, target="any")
def _refresh(args) -> Result:
    if args.abort and args.check:
        raise CliError("--abort takes no check option.")
    if not 1 <= args.challenges <= 16:
        raise CliError("--challenges must be from 1 to 16.")
    try:
        nodes, k, tls, folder = target_nodes(args)
    except MaintenanceError as exc:
        raise (RemoteError if exc.remote else CliError)(exc.message, **exc.details) from None
    sessions = SessionFile(folder)
    admin = Admin(nodes, tls)
    progress = Progress(progress_enabled(args.format))
    try:
        sessions.lock()
        report = refresh_session(
            admin, nodes, k, sessions, check_only=args.check, abort=args.abort,
            challenges=args.challenges, drain_s=args.drain, progress=progress, adopt=args.session, pace=max(0, args.pace),
            faults=maintenance.crash_seam(args.dir),
            allow_unchecked=args.allow_unchecked,
            mac_key_width=args.mac_key_width or _cluster_dim(args),
        )
    except MaintenanceError as exc:
        cls = RemoteError if exc.remote else CliError
        raise cls(exc.message, **{k: v for k, v in exc.details.items() if isinstance(v, (str, int, bool, dict))}) from None
    finally:
        progress.close()
        admin.close()
        sessions.unlock()
    exit_code = 0
    return Result(report, _lines(report), exit_code)


def _mac_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=count, default=0, metavar="W",
                   help="key width: the largest template dimension served (default: the cluster's dimension, else 512)")


def _mac_key_lines(report: dict) -> list[str]:
    dealt = report.get("dealt") or []
    return [f"MAC key of epoch {report['epoch']} (width {report['width']}): "
            + (f"dealt now by {', '.join(dealt)}" if dealt else "every node already held its share")
            + "; the dealing seeds are destroyed"]


@command("mac-key", "deal", help="have the nodes deal the committee's first MAC key (idempotent)",
         arguments=_mac_key_args, target="any")
def _mac_key_deal(args) -> Result:
    try:
        nodes, k, tls, _folder = target_nodes(args)
        report = deal_first_key(nodes, k, tls, args.width or _cluster_dim(args) or 512)
    except MaintenanceError as exc:
        raise (RemoteError if exc.remote else CliError)(exc.message, **{
            k: v for k, v in exc.details.items() if isinstance(v, (str, int, bool, dict))}) from None
    return Result(report, _mac_key_lines(report), 0)
