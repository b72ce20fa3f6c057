"""``vaultctl``: the command line of providers, node operators and auditors.

I/O only: commands parse arguments, call ``vaultctl.cluster`` or the
payment provider's client, and print either readable text (default) or one
JSON object on stdout (``--format json``).

Exit status (docs/contracts.md): 0 done (a NO_MATCH is a completed
verification), 1 usage or local error, 2 remote/unavailable. Errors are one
sentence on stderr (and, with ``--format json``, ``{"error": {...}}`` on
stdout); a traceback only with ``--debug`` or ``VAULTCTL_DEBUG=1``.

Adding a command: decorate a function ``run(args) -> Result`` with
``@command("rotate", "kek", help=..., arguments=...)`` in a module listed in
``COMMAND_MODULES`` (run the CLI as ``vaultctl`` or ``python -m vaultctl``,
never ``python -m vaultctl.cli``, so that the registry is one module).
Raise ``CliError`` (exit 1) or ``RemoteError`` / ``remote_error(grpc_error)``
(exit 2) with one sentence. ``target="dir"`` gives it ``--dir`` only, ``"any"``
``--dir`` or ``--config``, ``"none"`` neither; ``client_from_args`` and
``load_client_config`` resolve them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pathlib
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from vault import names, pki
from vaultctl import cluster
from vaultctl.client import MatcherClient
from vaultrpc import config as rpcconfig
from vaultrpc.tls import TlsFiles

EXIT_OK = 0
EXIT_LOCAL = 1
EXIT_REMOTE = 2

# Modules that register further commands with @command (imported before the
# parser is built). The core commands live in this module.
COMMAND_MODULES: tuple[str, ...] = ("vaultctl.refresh", "vaultctl.reshare", "vaultctl.rotate", "vaultctl.audit_cmd",
                                     "vaultctl.calibrate_cmd")


class CliError(Exception):
    """A usage or local error: exit 1 with this one-sentence message."""

    exit_code = EXIT_LOCAL

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class RemoteError(CliError):
    """The remote side failed or is unavailable: exit 2."""

    exit_code = EXIT_REMOTE


@dataclass
class Result:
    """What a command produced: ``data`` for JSON, ``lines`` for people."""

    data: dict
    lines: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    help: str
    run: Callable[[argparse.Namespace], Result]
    arguments: Callable[[argparse.ArgumentParser], None]
    target: str


_COMMANDS: dict[tuple[str, ...], Command] = {}
_GROUP_HELP = {
    "cluster": "a local development cluster (start, inspect, stop)",
    "rotate": "key rotation",
    "audit": "audit-log checks",
    "mac-key": "the committee's MAC key (dealt jointly by the nodes)",
}


def command(*words: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None, target: str = "any"):
    """Register ``run(args) -> Result`` as ``vaultctl <words...>``."""
    if target not in ("dir", "any", "none"):
        raise ValueError("target must be 'dir', 'any' or 'none'.")

    def register(run):
        if words in _COMMANDS:
            raise ValueError(f"vaultctl {' '.join(words)} is registered twice.")
        _COMMANDS[words] = Command(words, help, run, arguments or (lambda p: None), target)
        return run

    return register


# ---------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit 2, which means "remote" here
        self.print_usage(sys.stderr)
        raise CliError(f"{message[:1].upper()}{message[1:]}.")


def _common(target: str) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    if target == "dir":
        common.add_argument("--dir", required=True, type=pathlib.Path, help="cluster directory made by `cluster up`")
    elif target == "any":
        where = common.add_mutually_exclusive_group(required=True)
        where.add_argument("--dir", type=pathlib.Path, help="cluster directory made by `cluster up`")
        where.add_argument("--config", type=pathlib.Path, help="client config TOML of a real deployment (docs/operations.md)")
    return common


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = _Parser(
        prog="vaultctl",
        description="splitvault: split-custody biometric template vault.",
        epilog="Exit status: 0 done (NO_MATCH included), 1 usage or local error, 2 remote/unavailable, "
        "3 an audit check found a problem.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): top}
    for words, cmd in sorted(_COMMANDS.items()):
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                group = groups[prefix[:-1]].add_parser(prefix[-1], help=_GROUP_HELP.get(prefix[-1], ""))
                groups[prefix] = group.add_subparsers(dest="_".join(prefix), metavar="COMMAND", required=True)
        leaf = groups[words[:-1]].add_parser(
            words[-1], help=cmd.help, description=cmd.help, parents=[_common(cmd.target)]
        )
        cmd.arguments(leaf)
        leaf.set_defaults(_command=cmd)
    return parser


# ---------------------------------------------------------------- helpers


def remote_error(exc: Exception) -> RemoteError:
    """A RemoteError from a gRPC error (or anything with code()/details())."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    name = getattr(code, "name", None) or (str(code) if code is not None else "UNKNOWN")
    details = getattr(exc, "details", None)
    details = details() if callable(details) else details
    details = (details or str(exc) or "no details").strip()
    return RemoteError(f"The call failed with status {name}: {details.rstrip('.')}.", status=name)


def load_vector(path: pathlib.Path):
    """A template or probe file: ``.npy`` (float, 1-D) or ``.json`` (a list of numbers)."""
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".json"):
        raise CliError(f"The template file {path} must be .npy (float32, 1-D) or .json (a list of numbers).")
    try:
        if suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, EOFError):
                raise CliError(f"The file {path} is not a readable .npy array.") from None
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                raise CliError(f"The array in {path} must hold floats (float32), not {getattr(arr, 'dtype', 'an archive')}.")
        else:
            try:
                values = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                raise CliError(f"The file {path} is not valid JSON.") from None
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise CliError(f"The JSON in {path} must be one flat list of numbers.")
            arr = np.asarray(values, dtype=np.float64)
    except OSError as exc:
        raise CliError(f"Cannot read the template file {path}: {exc.strerror}.") from None
    if arr.ndim != 1 or arr.size == 0:
        raise CliError(f"The template in {path} must be a non-empty 1-D vector, not shape {tuple(arr.shape)}.")
    with np.errstate(over="ignore"):
        vec = arr.astype(np.float32)
    if not np.isfinite(vec).all():
        raise CliError(f"The template in {path} contains NaN or infinite values (or values too large for float32).")
    return vec


@dataclass(frozen=True)
class ClientConfig:
    """The ``--config`` file of a real deployment (docs/operations.md, "Client")."""

    address: str
    matcher: str
    ca: str
    cert: str
    key: str
    tenant: str
    ticket_key: str
    key_id: str
    # The cluster id: the audience of every ticket this client signs.
    cluster_id: str
    timeout_s: float = 10.0


def load_client_config(path: pathlib.Path) -> ClientConfig:
    try:
        data = rpcconfig.read(path)
        base = path.resolve().parent
        timeout = rpcconfig.get(data, "matcher.timeout_s", 10.0, (int, float))
        if isinstance(timeout, bool) or timeout <= 0:
            raise rpcconfig.ConfigError("The config value matcher.timeout_s must be a positive number.")
        address = rpcconfig.text(data, "matcher.address")
        tls = rpcconfig.tls_files(data, base)
        matcher = rpcconfig.text(data, "matcher.name")  # the identity the matcher's certificate must carry
        tenant = rpcconfig.text(data, "tenant.id")
        return ClientConfig(
            address=address,
            matcher=matcher,
            ca=tls.ca,
            cert=tls.cert,
            key=tls.key,
            tenant=tenant,
            ticket_key=rpcconfig.file_path(data, "tenant.ticket_key", base),
            key_id=rpcconfig.get(data, "tenant.key_id", "") or f"{tenant}-1",
            cluster_id=rpcconfig.text(data, "matcher.cluster_id"),
            timeout_s=float(timeout),
        )
    except rpcconfig.ConfigError as exc:
        raise CliError(f"{exc} ({path})") from None


def client_from_args(args: argparse.Namespace):
    """A ``MatcherClient`` for ``--dir`` (the dev cluster) or ``--config``."""
    timeout = getattr(args, "timeout", None)
    try:
        if args.dir is not None:
            spec = cluster.load_spec(args.dir)
            tenant = getattr(args, "tenant", None) or spec.tenant
            if tenant not in spec.tenants:
                raise CliError(f"The cluster has no tenant {tenant!r}; it has {', '.join(spec.tenants)}.")
            ready = cluster.Paths(args.dir).ready(spec, spec.matcher)
            if not ready.exists():
                raise RemoteError(f"The matcher of {args.dir} is not running; run `vaultctl cluster up --dir {args.dir}`.")
            client = MatcherClient.from_cluster_dir(args.dir, tenant=tenant)
            if timeout is not None and hasattr(client, "timeout_s"):
                client.timeout_s = timeout
            return client
        cfg = load_client_config(args.config)
        try:
            ticket_key = pki.load_signing_key(pathlib.Path(cfg.ticket_key).read_bytes())
        except OSError as exc:
            raise CliError(f"Cannot read the ticket key {cfg.ticket_key}: {exc.strerror}.") from None
        return MatcherClient(
            cfg.address,
            TlsFiles(cfg.ca, cfg.cert, cfg.key).load(),
            tenant=cfg.tenant,
            ticket_key=ticket_key,
            key_id=cfg.key_id,
            matcher=cfg.matcher,
            cluster_id=cfg.cluster_id,
            timeout_s=timeout or cfg.timeout_s,
        )
    except cluster.ClusterError as exc:
        raise CliError(str(exc)) from None


def _close(client) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        close()


def _call(fn, *a, **kw):
    """Call the matcher; turn its gRPC failure into a RemoteError (exit 2)."""
    try:
        return fn(*a, **kw)
    except grpc.RpcError as exc:
        raise remote_error(exc) from None


def _check_dimension(args, vector, what: str) -> None:
    if args.dir is None:
        return

    spec = cluster.load_spec(args.dir)
    dims = sorted({spec.dim, *(m.dimension for m in spec.modalities)})
    if vector.size not in dims:
        sizes = " or ".join(map(str, dims))
        raise CliError(f"The {what} has {vector.size} values; this cluster's templates have {sizes}.")


def modality(text: str):
    """An argparse type: NAME:DIM:THRESHOLD:FMR, a checked matcher.config.Modality."""
    from matcher.config import check_modality

    parts = text.split(":")
    try:
        if len(parts) != 4:
            raise ValueError("expected NAME:DIM:THRESHOLD:FMR")
        return check_modality(parts[0], int(parts[1]), float(parts[2]), float(parts[3]))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a modality: {exc}") from None


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds.

    Plain ``float`` let ``--timeout 0`` be ignored (falsy: the default was
    used), and ``-5`` or ``nan`` reach gRPC as a deadline already past, so a
    usage mistake came back as DEADLINE_EXCEEDED from the "remote", exit 2
    (tests/test_hostile_cli.py).
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def seconds_or_zero(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more (a pause that may be skipped)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds of 0 or more")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _tenant_and_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="tenant (PSP) of a cluster dir with several (default: its first)")
    p.add_argument("--timeout", type=seconds, default=None, metavar="S", help="deadline of each call in seconds")


# ---------------------------------------------------------------- cluster


def _cluster_lines(info: dict, verb: str) -> list[str]:
    spec = info["spec"]
    lines = [
        f"cluster {info['dir']} {verb}: {spec['shareholders']} shareholders, threshold {spec['threshold']}, "
        f"dimension {spec['dim']}, tenant {', '.join(spec['tenants'])}"
    ]
    for p in [info["matcher"], *info["shareholders"]]:
        pid = f"pid {p['pid']}" if p["pid"] else "-"
        lines.append(f"  {p['name']:<10} {p['address'] or '-':<22} {pid:<11} {p['health']}")
    tls = info["tls"]
    lines.append(f"  CA {tls['ca']}")
    lines.append(f"  PSP {tls['psp']['tenant']}: {tls['psp']['cert']} {tls['psp']['key']}")
    lines.append(f"  auditor: {tls['auditor']['cert']} {tls['auditor']['key']}")
    return lines


def _cluster_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shareholders", type=int, default=None, metavar="N", help="number of nodes n (default 3)")
    p.add_argument("--threshold", type=int, default=None, metavar="K", help="shares needed k (default 2)")
    p.add_argument("--dim", type=int, default=None, metavar="D", help="template dimension (default 512)")
    p.add_argument("--modality", type=modality, action="append", default=None, metavar="NAME:DIM:THRESHOLD:FMR",
                   help="a further modality of every tenant: its dimension, cosine threshold and the false-match "
                        "rate it was chosen for (repeatable)")
    p.add_argument("--timeout", type=seconds, default=None, metavar="S", help="start-up deadline in seconds (default 30)")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default=None,
                   help="where the nodes keep their shares, first time only (default sqlite: one file per node; "
                        "postgres: one database per node, on --postgres or the cluster's own server)")
    p.add_argument("--postgres", default=None, metavar="DSN",
                   help="with --backend postgres: a superuser connection string of a dev server to use")
    p.add_argument("--identify-confirm", choices=("on", "off"), default=None,
                   help="first time only: Identify confirms its candidates with Verify's MAC-checked rejoin and "
                        "cosine rule (default on; off: the matcher sees only bits, and one lying node can make a "
                        "wrong MATCH)")


@command("cluster", "up", help="create (first time) and start a local cluster in the background", arguments=_cluster_size, target="dir")
def _cluster_up(args) -> Result:
    kwargs = {"timeout_s": args.timeout} if args.timeout else {}
    if args.postgres and args.backend != "postgres":
        raise CliError("--postgres goes with --backend postgres.")
    if args.backend == "postgres":
        kwargs["postgres"] = args.postgres or cluster.LOCAL_POSTGRES
    if args.identify_confirm is not None:
        kwargs["identify_confirm"] = args.identify_confirm == "on"
    try:
        info = cluster.up(args.dir, args.shareholders, args.threshold, args.dim, modalities=args.modality, **kwargs)
    except cluster.ClusterError as exc:
        raise CliError(str(exc)) from None
    lines = _cluster_lines(info, "is up")
    for a in info["actions"]:
        stale = f" (stale pid file of {a['stale_pid']} replaced)" if a.get("stale_pid") else ""
        lines.append(f"  {a['name']}: {a['result']}{stale}")
    return Result(info, lines)


@command("cluster", "status", help="health and process id of every process of a local cluster", target="dir")
def _cluster_status(args) -> Result:
    try:
        info = cluster.status(args.dir)
    except cluster.ClusterError as exc:
        raise CliError(str(exc)) from None
    if info["healthy"]:
        verb, code = "is healthy", EXIT_OK
    elif info["running"]:
        verb, code = "is NOT healthy", EXIT_REMOTE
    else:
        verb, code = "is stopped", EXIT_REMOTE
    return Result(info, _cluster_lines(info, verb), code)


@command("cluster", "down", help="stop every process of a local cluster", target="dir")
def _cluster_down(args) -> Result:
    try:
        info = cluster.down(args.dir)
    except cluster.ClusterError as exc:
        raise CliError(str(exc)) from None
    lines = [f"cluster {info['dir']} is down"] + [
        f"  {p['name']:<10} {p['result']}" + (f" (pid {p['pid']})" if p["pid"] else "") for p in info["processes"]
    ]
    return Result(info, lines)


# ---------------------------------------------------------------- payment provider


def _enroll_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="subject (customer) id")
    p.add_argument("--template", required=True, type=pathlib.Path, help=".npy float32 1-D or .json list of numbers")
    p.add_argument("--request-id", default=None, help="idempotency key (default: a fresh one)")
    p.add_argument("--replace", action="store_true", help="overwrite an enrolled subject")
    p.add_argument("--group", default="", help="gallery group identify can narrow to (a store, a phone-number suffix)")
    _tenant_and_timeout(p)


@command("enroll", help="split a template and store one share on every shareholder", arguments=_enroll_args)
def _enroll(args) -> Result:
    template = load_vector(args.template)
    _check_dimension(args, template, "template")
    request_id = args.request_id or f"enroll-{uuid.uuid4().hex}"
    client = client_from_args(args)
    try:
        reply = _call(client.enroll, args.subject, template, request_id=request_id, replace=args.replace,
                      group=_group(args))
    finally:
        _close(client)
    data = {
        "subject": args.subject,
        "request_id": getattr(reply, "request_id", None) or request_id,
        "enrolled": True,
        "epoch": getattr(reply, "epoch", None),
        "already_enrolled": bool(getattr(reply, "already_enrolled", False)),
        **({"group": args.group} if args.group else {}),
    }
    note = " (already enrolled by this request id)" if data["already_enrolled"] else ""
    return Result(data, [f"enrolled {args.subject}{note}, epoch {data['epoch']}, request {data['request_id']}"])


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="subject (customer) id")
    p.add_argument("--probe", required=True, type=pathlib.Path, help=".npy float32 1-D or .json list of numbers")
    _tenant_and_timeout(p)


@command("verify", help="verify a probe against a subject: MATCH or NO_MATCH", arguments=_verify_args)
def _verify(args) -> Result:
    probe = load_vector(args.probe)
    _check_dimension(args, probe, "probe")
    client = client_from_args(args)
    try:
        reply = _call(client.verify, args.subject, probe)
    finally:
        _close(client)
    decision = str(reply.decision)
    if decision not in ("MATCH", "NO_MATCH"):  # fail closed on anything unexpected
        raise RemoteError(f"The matcher returned no decision ({decision}).")
    data = {"decision": decision, "subject": args.subject, "decision_id": reply.decision_id, "epoch": reply.epoch}
    if getattr(reply, "score", None) is not None:
        data["score"] = reply.score
    score = f", score {reply.score:.4f}" if data.get("score") is not None else ""
    return Result(data, [f"{decision} for {args.subject} (decision {reply.decision_id}, epoch {reply.epoch}{score})"])


def _group(args) -> str:
    """The --group value, checked here (a usage error) before any call."""
    try:
        return names.check_group(args.group, "group (--group)")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _identify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", required=True, type=pathlib.Path, help=".npy float32 1-D or .json list of numbers")
    p.add_argument("--group", default="", help="search only the subjects enrolled under this group")
    _tenant_and_timeout(p)


@command("identify", help="search the gallery for a probe on shares (1:N): MATCH, NO_MATCH or AMBIGUOUS",
         arguments=_identify_args)
def _identify(args) -> Result:
    group = _group(args)
    probe = load_vector(args.probe)
    _check_dimension(args, probe, "probe")
    client = client_from_args(args)
    try:
        reply = _call(client.identify, probe, group or None)
    finally:
        _close(client)
    decision = str(reply.decision)
    if decision not in ("MATCH", "NO_MATCH", "AMBIGUOUS"):  # fail closed on anything unexpected
        raise RemoteError(f"The matcher returned no decision ({decision}).")
    data = {"decision": decision, "subject": reply.subject, "decision_id": reply.decision_id}
    who = f" {reply.subject}" if reply.subject else ""
    return Result(data, [f"{decision}{who} (decision {reply.decision_id})"])


def _delete_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="subject (customer) id")
    _tenant_and_timeout(p)


@command("delete", help="erase a subject's shares on every shareholder", arguments=_delete_args)
def _delete(args) -> Result:
    client = client_from_args(args)
    try:
        reply = _call(client.delete, args.subject)
    finally:
        _close(client)
    outcomes = [
        {"shareholder": o.shareholder, "code": o.code, "message": o.message}
        for o in getattr(reply, "outcomes", ()) or ()
    ]
    complete = bool(getattr(reply, "complete", True))
    data = {"subject": args.subject, "deleted": complete, "complete": complete, "outcomes": outcomes}
    if complete:
        return Result(data, [f"deleted {args.subject} on every shareholder"])
    missing = ", ".join(o["shareholder"] for o in outcomes if o["code"] != 0) or "some shareholders"
    return Result(
        data,
        [f"deleted {args.subject} only partly: {missing} did not confirm; run the delete again"],
        EXIT_REMOTE,
    )


# ---------------------------------------------------------------- main


def _emit_error(fmt: str, exc: CliError) -> int:
    print(f"vaultctl: error: {exc.message}", file=sys.stderr)
    if fmt == "json":
        print(json.dumps({"error": {"message": exc.message, "exit": exc.exit_code, **exc.details}}))
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("VAULTCTL_DEBUG") == "1" or "--debug" in argv
    fmt = "json" if any(a == "--format=json" for a in argv) or (
        "--format" in argv and argv.index("--format") + 1 < len(argv) and argv[argv.index("--format") + 1] == "json"
    ) else "text"
    try:
        args = build_parser().parse_args(argv)
        fmt = args.format
        result = args._command.run(args)
    except CliError as exc:
        if debug:
            traceback.print_exc()
        return _emit_error(fmt, exc)
    except KeyboardInterrupt:
        print("vaultctl: interrupted.", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # config, TLS and file errors carry a sentence
        if debug:
            traceback.print_exc()
        message = str(exc).strip() or type(exc).__name__
        return _emit_error(fmt, CliError(message if message.endswith(".") else message + "."))
    except Exception as exc:  # noqa: BLE001 - never a traceback for users
        if debug:
            traceback.print_exc()
        kind = type(exc).__name__
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        hint = "" if debug else " (rerun with --debug for details)"
        return _emit_error(fmt, CliError(f"Unexpected {kind}: {message.rstrip('.')}{hint}."))
    if fmt == "json":
        print(json.dumps(result.data, default=str))
    else:
        for line in result.lines:
            print(line)
    return result.exit_code
