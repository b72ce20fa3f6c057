"""``make demo``: the whole splitvault story on a local cluster, one step a line.

    python -m vaultctl.demo [--dir ./.demo-cluster] [--subjects 300] [--seed 7]

1. start 3 shareholder nodes (threshold 2) and a matcher on loopback;
2. enrol a few hundred synthetic face templates (512-d unit vectors) through
   the bulk stream: each is split into 3 shares, one per node;
3. a genuine probe (a noisy copy of an enrolled template) -> MATCH;
4. an impostor probe -> NO_MATCH;
5. kill -9 one node -> the genuine probe still MATCHes (2 of 3 shares left);
6. kill -9 a second node -> UNAVAILABLE, never a MATCH (fail closed);
7. restart the cluster on the same data -> MATCH again;
8. each node's own audit log shows the verification of step 3 (read with
   the auditor's certificate; the chain is checked against the node's key);
9. the auditor refreshes every share to a new epoch (`vaultctl refresh`,
   checked without rejoining any template) and the genuine probe still
   MATCHes;
10. the committee grows to 4 nodes, threshold 2 (`vaultctl reshare`; a
    committee must keep n >= 2k - 1 to renew its MAC keys at a refresh):
    the auditor proposes the plan, the nodes refuse it unapproved, two node
    operators (k = 2) approve it with their own keys, and it runs; the
    genuine probe MATCHes from the new committee's shares;
11. the auditor verifies every node's audit chain and reconciles every share
    release with a provider-signed ticket (`vaultctl audit verify/reconcile`);
12. stop the cluster;
13. scan every file the cluster wrote for any enrolled template or probe in
    the clear (float32, int8-quantised and field-encoded bytes).

Exit status 0 only if every step behaved as expected. Processes are stopped
even when a step fails.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from splitvault.v1 import shareholder_pb2, shareholder_pb2_grpc
from vault import audit, codec, pki
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultrpc import wire
from vaultrpc.tls import secure_channel

DEFAULT_DIR = pathlib.Path(".demo-cluster")
# Non-overlapping windows of this many bytes of every vector are searched for.
SCAN_WINDOW = 32
# Gaussian noise per coordinate of a genuine probe: cosine to the enrolled
# unit vector about 1 / sqrt(1 + d * sigma^2) = 0.94 for d = 512.
PROBE_NOISE = 0.015


def synthetic_templates(count: int, dim: int, seed: int) -> np.ndarray:
    """``count`` random unit vectors (float32): stand-ins for face embeddings.

    Seeded numpy on purpose: this is the demo's camera, reproducible from
    ``--seed``; no share or key comes from it (the matcher splits these with
    coefficients from the OS CSPRNG, ``vault.rng``).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def noisy_copy(template: np.ndarray, seed: int, sigma: float = PROBE_NOISE) -> np.ndarray:
    """A genuine probe: the same face, captured again."""
    rng = np.random.default_rng(seed)
    probe = template.astype(np.float64) + rng.normal(0.0, sigma, template.shape)
    return (probe / np.linalg.norm(probe)).astype(np.float32)


def story_vectors(subjects: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(templates, genuine probe, impostor probe, index of the genuine subject):
    everything the demo sends, reproducible from the seed."""
    templates = synthetic_templates(subjects, dim, seed)
    genuine_i = subjects // 3
    genuine = noisy_copy(templates[genuine_i], seed + 1)
    impostor = synthetic_templates(1, dim, seed + 2)[0]
    return templates, genuine, impostor, genuine_i


def subject_id(i: int) -> str:
    return f"subject-{i:04d}"


# ---------------------------------------------------------------- scanning


def template_encodings(vectors: np.ndarray, dim: int) -> list[bytes]:
    """Every at-rest form a template could leak in: float32 LE bytes, the
    int8 quantised codes and their field elements (uint32 LE)."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, dim)
    codes = codec.encode(vectors, dim)
    fields = np.asarray(codec.to_field(codes)).astype("<u4")
    forms = []
    for i in range(vectors.shape[0]):
        forms.append(vectors[i].astype("<f4").tobytes())
        forms.append(codes[i].astype(np.int8).tobytes())
        forms.append(fields[i].tobytes())
    return forms


@dataclass
class ScanReport:
    files: int = 0
    bytes: int = 0
    # (file, offset) of every window found
    hits: list[tuple[str, int]] = field(default_factory=list)


def scan_for_vectors(paths: Iterable[pathlib.Path], forms: Sequence[bytes], window: int = SCAN_WINDOW) -> ScanReport:
    """Search every file for any ``window``-byte slice (non-overlapping,
    aligned to the start of the form) of any form, at every byte offset.

    Vectorised: the first 8 bytes of each needle are looked up with np.isin
    at each of the 8 alignments, then candidates are compared in full.
    """
    needles: set[bytes] = set()
    for form in forms:
        for start in range(0, len(form) - window + 1, window):
            needles.add(form[start:start + window])
    keys = np.unique(np.array([np.frombuffer(n[:8], dtype="<u8")[0] for n in needles], dtype=np.uint64))
    report = ScanReport()
    for path in paths:
        data = pathlib.Path(path).read_bytes()
        report.files += 1
        report.bytes += len(data)
        if len(data) < window:
            continue
        for align in range(8):
            usable = (len(data) - align) // 8 * 8
            if usable <= 0:
                continue
            words = np.frombuffer(data, dtype="<u8", count=usable // 8, offset=align)
            for i in np.flatnonzero(np.isin(words, keys)):
                pos = align + 8 * int(i)
                if data[pos:pos + window] in needles:
                    report.hits.append((str(path), pos))
    return report


# ---------------------------------------------------------------- audit


def read_audit_log(root: pathlib.Path, node: str, timeout_s: float = 10.0):
    """(entries, checkpoints) of one node, read with the auditor's certificate."""
    info = cluster.status(root)
    entry = next(p for p in info["shareholders"] if p["name"] == node)
    if not entry["address"]:
        raise RuntimeError(f"Shareholder {node} is not running.")
    paths = cluster.Paths(root)
    spec = cluster.load_spec(root)
    tls = paths.tls("auditor", spec.auditor).load()
    entries, checkpoints = [], []
    with secure_channel(entry["address"], tls, expect=pki.Identity(pki.ROLE_SHAREHOLDER, node)) as channel:
        stub = shareholder_pb2_grpc.ShareholderStub(channel)
        for item in stub.ReadAuditLog(shareholder_pb2.ReadAuditLogRequest(from_seq=1), timeout=timeout_s):
            which = item.WhichOneof("item")
            if which == "entry":
                entries.append(wire.audit_entry(item.entry))
            elif which == "checkpoint":
                checkpoints.append(wire.checkpoint(item.checkpoint))
    return entries, checkpoints


def node_audit_public_key(root: pathlib.Path, node: str) -> bytes:
    """The node's audit public key, from the key file the cluster generated
    (the auditor's trust anchor in this dev setup)."""
    key = pki.load_signing_key((cluster.Paths(root).node_dir(node) / "audit.key").read_bytes())
    return pki.public_key_raw(key)


# ---------------------------------------------------------------- the story


class StepFailed(Exception):
    pass


class Story:
    """Numbered steps, one line each; remembers whether all went as expected."""

    def __init__(self, console):
        self.console = console
        self.number = 0
        self.failures: list[str] = []

    def step(self, text: str) -> None:
        self.number += 1
        self.console.print(f"[bold]{self.number:>2}.[/bold] {text}")

    def ok(self, text: str) -> None:
        self.console.print(f"    [green]ok[/green]  {text}")

    def info(self, text: str) -> None:
        self.console.print(f"        {text}", highlight=False)

    def fail(self, text: str) -> None:
        self.failures.append(f"step {self.number}: {text}")
        self.console.print(f"    [bold red]FAIL[/bold red] {text}")

    def expect(self, condition: bool, good: str, bad: str) -> bool:
        (self.ok if condition else self.fail)(good if condition else bad)
        return condition


def _status_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    return getattr(code, "name", None) or str(code or type(exc).__name__)


def _try_verify(client, subject: str, probe: np.ndarray, request_id: str | None = None):
    """(result, None) or (None, status name) for one verification."""
    try:
        return client.verify(subject, probe, request_id=request_id), None
    except grpc.RpcError as exc:
        return None, _status_code(exc)


def run(root: pathlib.Path, subjects: int, seed: int, console, debug: bool = False) -> int:
    story = Story(console)
    n, k, dim = 3, 2, 512
    templates, genuine, impostor, genuine_i = story_vectors(subjects, dim, seed)
    who = subject_id(genuine_i)
    client = None
    audited_request = ""
    started = False
    try:
        story.step(f"Start a local cluster in {root}: {n} shareholder nodes (any {k} can rejoin) and a matcher")
        t0 = time.perf_counter()
        info = cluster.up(root, n, k, dim)
        started = True
        story.ok(f"all healthy in {time.perf_counter() - t0:.1f} s; matcher at {info['matcher']['address']}")
        story.info("nodes: " + ", ".join(f"{p['name']} {p['address']}" for p in info["shareholders"]))

        client = MatcherClient.from_cluster_dir(root)
        story.step(f"Enrol {subjects} synthetic {dim}-d templates through the bulk stream (each split into {n} shares)")
        t0 = time.perf_counter()
        replies = list(client.enroll_many((subject_id(i), templates[i]) for i in range(subjects)))
        elapsed = time.perf_counter() - t0
        failed = [f"{r.subject}: {r.message}" for r in replies if r.code != 0]
        if len(replies) != subjects:
            failed.append(f"{len(replies)} answers for {subjects} templates")
        story.expect(
            not failed,
            f"{subjects} enrolled in {elapsed:.2f} s ({subjects / elapsed:,.0f}/s); every node holds one share of each",
            f"{len(failed)} enrolments failed, e.g. {failed[:3]}",
        )

        story.step(f"Verify {who} with a genuine probe (a fresh noisy capture of the same face)")
        audited_request = f"demo-verify-{uuid.uuid4().hex[:12]}"
        result, err = _try_verify(client, who, genuine, audited_request)
        story.expect(
            result is not None and result.decision == "MATCH",
            f"MATCH (request {audited_request}, decision {getattr(result, 'decision_id', '')})",
            f"expected MATCH, got {err or result.decision}",
        )

        story.step(f"Verify {who} with an impostor's probe (someone else's face)")
        result, err = _try_verify(client, who, impostor)
        story.expect(
            result is not None and result.decision == "NO_MATCH",
            "NO_MATCH: a completed verification that says no",
            f"expected NO_MATCH, got {err or result.decision}",
        )

        story.step("Identify the customer from the genuine probe alone (1:N on shares: no template is rejoined)")
        t0 = time.perf_counter()
        try:
            found, err = client.identify(genuine), None
        except grpc.RpcError as exc:
            found, err = None, _status_code(exc)
        story.expect(
            found is not None and found.decision == "MATCH" and found.subject == who,
            f"MATCH {who} among {subjects} in {time.perf_counter() - t0:.2f} s; only match bits were opened",
            f"expected MATCH {who}, got {err or (found.decision, found.subject)}",
        )

        victim1, victim2 = info["shareholders"][2]["name"], info["shareholders"][1]["name"]
        story.step(f"kill -9 shareholder {victim1}, then verify the genuine probe again")
        cluster.kill_node(root, victim1, signal.SIGKILL)
        result, err = _try_verify(client, who, genuine)
        story.expect(
            result is not None and result.decision == "MATCH",
            f"still MATCH: {n - 1} shares are left and {k} suffice",
            f"expected MATCH with {n - 1} nodes, got {err or result.decision}",
        )

        story.step(f"kill -9 shareholder {victim2} too (1 of {k} needed shares left), verify again")
        cluster.kill_node(root, victim2, signal.SIGKILL)
        result, err = _try_verify(client, who, genuine)
        story.expect(
            result is None and err == "UNAVAILABLE",
            "UNAVAILABLE and no MATCH: fewer than k shares fail closed",
            f"expected UNAVAILABLE, got {err or result.decision}",
        )
        _close(client)
        client = None

        story.step("Restart the cluster on the same directory (same keys, same sealed shares)")
        cluster.down(root)
        info = cluster.up(root)
        client = MatcherClient.from_cluster_dir(root)
        result, err = _try_verify(client, who, genuine)
        story.expect(
            result is not None and result.decision == "MATCH",
            "all processes back; the genuine probe MATCHes again",
            f"expected MATCH after the restart, got {err or result.decision}",
        )

        story.step("Read each node's own audit log (auditor certificate) for the verification of step 3")
        _show_audit(story, root, info, audited_request, k)

        story.step("Auditor: `vaultctl refresh` moves every share to a new epoch (same templates, none rejoined)")
        refreshed, err = _vaultctl(root, "refresh")
        check = (refreshed or {}).get("check") or {}
        story.expect(
            refreshed is not None and refreshed.get("state") == "finalized" and check.get("passed") is True,
            f"epoch {refreshed and refreshed.get('from_epoch')} -> {refreshed and refreshed.get('new_epoch')}: "
            f"{sum((refreshed or {}).get('records', {}).values())} shares re-randomised, check passed "
            f"({check.get('challenges')} challenges) without rejoining a template; old shares destroyed",
            f"refresh did not complete: {err or refreshed}",
        )
        result, err = _try_verify(client, who, genuine)
        story.expect(
            result is not None and result.decision == "MATCH" and result.epoch == (refreshed or {}).get("new_epoch"),
            f"the genuine probe still MATCHes, now from epoch {getattr(result, 'epoch', '?')} shares",
            f"expected MATCH after the refresh, got {err or result.decision}",
        )

        _show_reshare(story, root, client, who, genuine)

        story.step("Auditor: `vaultctl audit verify` and `audit reconcile` over every node")
        verified, err = _vaultctl(root, "audit", "verify")
        story.expect(
            verified is not None and verified.get("ok") is True,
            "every node's hash chain and signed checkpoints verify against the keys recorded at set-up",
            f"audit verify found a problem: {err or verified}",
        )
        reconciled, err = _vaultctl(root, "audit", "reconcile")
        story.expect(
            reconciled is not None and reconciled.get("ok") is True,
            f"{reconciled and reconciled.get('verifications')} verifications reconciled: every share release "
            "carries a provider-signed ticket, at most one share per node",
            f"audit reconcile found a problem: {err or reconciled}",
        )

        story.step("Stop the cluster")
        _close(client)
        client = None
        down = cluster.down(root)
        started = False
        story.ok(", ".join(f"{p['name']} {p['result']}" for p in down["processes"]))

        story.step("Scan every file the cluster wrote for any template or probe in the clear")
        forms = template_encodings(np.vstack([templates, genuine, impostor]), dim)
        report = scan_for_vectors(cluster.cluster_files(root), forms)
        story.expect(
            not report.hits,
            f"no template found in {report.files} files ({report.bytes / 1e6:.1f} MB; float32, int8 and field forms, "
            f"{SCAN_WINDOW}-byte windows)",
            f"template bytes found in the clear: {report.hits[:5]}",
        )
    except Exception as exc:  # noqa: BLE001 - the story reports and stops cleanly
        story.fail(f"{type(exc).__name__}: {exc}")
        if debug:
            traceback.print_exc()
    finally:
        if client is not None:
            _close(client)
        if started:
            try:
                cluster.down(root)
            except Exception as exc:  # noqa: BLE001
                story.fail(f"stopping the cluster failed: {exc}")

    if story.failures:
        console.print(f"[bold red]The demo did not behave as expected[/bold red] ({len(story.failures)} problem(s)):")
        for f in story.failures:
            console.print(f"  - {f}", highlight=False)
        return 1
    console.print(
        "[bold green]Done.[/bold green] No node ever held a whole template, and none was written to disk; "
        f"the cluster files stay in {root} (start it again with `vaultctl cluster up --dir {root}`)."
    )
    return 0


def _brief(details_json: str) -> str:
    """An audit entry's details for a reader: the provider-signed ticket it keeps
    (for `audit reconcile`) is named, not dumped."""
    try:
        details = json.loads(details_json)
    except json.JSONDecodeError:
        return details_json[:120]
    if isinstance(details, dict) and "ticket" in details:
        key = details.get("key_id", "?")
        details = {k: v for k, v in details.items() if k not in ("ticket", "ticket_sig", "ticket_expires_ms")}
        details["ticket"] = f"signed by {key}, kept for reconcile"
        details.pop("key_id", None)
    return json.dumps(details, separators=(", ", ": "))


def _vaultctl(root: pathlib.Path, *command: str, timeout_s: float = 300.0) -> tuple[dict | None, str]:
    """Run one auditor command as a user would (``vaultctl ... --format json``): (its JSON, error)."""
    argv = [sys.executable, "-m", "vaultctl", *command, "--dir", str(root), "--format", "json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"`vaultctl {' '.join(command)}` did not finish in {timeout_s:.0f} s"
    try:
        out = json.loads(done.stdout) if done.stdout.strip() else None
    except json.JSONDecodeError:
        out = None
    if done.returncode != 0:
        return None, f"`vaultctl {' '.join(command)}` exited {done.returncode}: {(done.stdout or done.stderr).strip()[:300]}"
    return out, ""


def _show_reshare(story: Story, root: pathlib.Path, client, who: str, genuine) -> None:
    """Propose -> (refused unapproved) -> approve by k operators -> run."""
    story.step("Auditor: `vaultctl reshare propose` a committee of 4 with threshold 2 (bank-d joins)")
    proposed, err = _vaultctl(root, "reshare", "propose", "--shareholders", "4", "--threshold", "2")
    plan = (proposed or {}).get("plan_file", "")
    story.expect(
        proposed is not None and proposed.get("approvals") == [],
        f"plan {proposed and proposed.get('session_id')} written: {', '.join((proposed or {}).get('new_committee', []))}"
        f" (k={proposed and proposed.get('new_threshold')}), each new member pinned by its certificate key; "
        f"{proposed and proposed.get('needed')} operator approvals needed",
        f"propose failed: {err or proposed}",
    )
    refused, err = _vaultctl(root, "reshare", "--plan", plan, "--drain", "0")
    story.expect(
        refused is None and "PERMISSION_DENIED" in err,
        "run without approvals: the nodes themselves refuse it (PERMISSION_DENIED), the auditor alone cannot "
        "change the committee",
        f"expected the nodes to refuse an unapproved plan, got {err or refused}",
    )
    approvals = []
    for operator in ("bank-a", "bank-b"):
        approved, err = _vaultctl(root, "reshare", "approve", "--plan", plan, "--operator", operator)
        approvals = (approved or {}).get("approvals", approvals)
        story.expect(approved is not None, f"operator of {operator} approves with its own key",
                     f"approve failed: {err or approved}")
    reshared, err = _vaultctl(root, "reshare", "--plan", plan, "--drain", "0")
    story.expect(
        reshared is not None and reshared.get("state") == "finalized",
        f"approved by {', '.join(approvals)}: {max((reshared or {}).get('records', {}).values(), default=0)} "
        f"templates moved to {', '.join((reshared or {}).get('new_committee', []))} (k="
        f"{reshared and reshared.get('new_threshold')}), epoch {reshared and reshared.get('new_epoch')}, none rejoined",
        f"reshare did not complete: {err or reshared}",
    )
    result, err = _try_verify(client, who, genuine)
    story.expect(
        result is not None and result.decision == "MATCH" and result.epoch == (reshared or {}).get("new_epoch"),
        f"the genuine probe MATCHes from the new committee (epoch {getattr(result, 'epoch', '?')})",
        f"expected MATCH after the reshare, got {err or result.decision}",
    )


def _close(client) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        close()


def _show_audit(story: Story, root: pathlib.Path, info: dict, request_id: str, k: int) -> None:
    if not request_id:
        story.fail("step 3 gave no request id to look up")
        return
    story.info(f"request id {request_id}")
    with_entries = 0
    for node in info["shareholders"]:
        name = node["name"]
        try:
            entries, checkpoints = read_audit_log(root, name)
        except Exception as exc:  # noqa: BLE001
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            story.fail(f"{name}: cannot read the audit log ({_status_code(exc)}: {details})")
            continue
        report = audit.verify_chain(entries, checkpoints, node_audit_public_key(root, name), node=name)
        mine = [e for e in entries if e.request_id == request_id or request_id in e.details_json]
        if mine:
            with_entries += 1
        signed = f"signed up to #{report.signed_seq}" if report.signed_seq else "no checkpoint signed yet"
        chain = (
            f"hash chain of {report.entries} entries intact, {signed}"
            if report.ok
            else f"CHAIN BROKEN at {report.broken_seq}: {report.reason}"
        )
        if not report.ok:
            story.fail(f"{name}: {chain}")
        story.info(f"[bold]{name}[/bold] ({chain})")
        for e in mine:
            when = time.strftime("%H:%M:%S", time.localtime(e.time_ms / 1000))
            story.info(f"  #{e.seq} {when} {e.event:<8} {e.tenant}/{e.subject} by {e.actor}  {_brief(e.details_json)}")
        if not mine:
            story.info("  (no entry: this node's share was not needed or it did not answer)")
    story.expect(
        with_entries >= k,
        f"{with_entries} nodes logged the release of their share for that verification",
        f"only {with_entries} nodes logged it; at least {k} must have released a share",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaultctl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR, help="cluster directory (removed first)")
    parser.add_argument("--subjects", type=int, default=300, help="templates to enrol (default 300)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic templates")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.subjects < 2:
        parser.error("--subjects must be at least 2")

    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    root = args.dir.expanduser().resolve()
    try:
        if (root / "cluster.json").exists():
            try:
                cluster.down(root)  # a previous demo may have left processes running
            except cluster.ClusterError:
                pass
        if root.exists():
            if not (root / "cluster.json").exists() and any(root.iterdir()):
                console.print(f"[red]{root} exists and is not a cluster directory; refusing to remove it.[/red]")
                return 1
            shutil.rmtree(root)
        console.print(
            "[bold]splitvault demo[/bold]: every template is split into shares held by different institutions "
            "and rejoined only for the milliseconds of a verification."
        )
        return run(root, args.subjects, args.seed, console, args.debug)
    except Exception as exc:  # noqa: BLE001 - one sentence, never a traceback
        if args.debug:
            traceback.print_exc()
        console.print(f"[bold red]The demo could not run:[/bold red] {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
