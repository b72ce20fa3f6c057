"""The command registry other commands plug into, and the error contract
(no cluster needed)."""
from __future__ import annotations

import json

import grpc
import pytest

from vaultctl import cli


@pytest.fixture
def extra_command():
    @cli.command("audit", "demo-only", help="a test command", target="any",
                 arguments=lambda p: p.add_argument("--node"))
    def run(args):
        if args.node == "remote":
            raise cli.RemoteError("The node refused.", status="PERMISSION_DENIED")
        if args.node == "boom":
            raise RuntimeError("unexpected")
        return cli.Result({"node": args.node, "dir": str(args.dir)}, [f"node {args.node}"])

    try:
        yield
    finally:
        del cli._COMMANDS[("audit", "demo-only")]


def test_registered_command_gets_format_dir_and_exit_codes(extra_command, capsys):
    assert cli.main(["audit", "demo-only", "--dir", "/x", "--node", "bank-a", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"node": "bank-a", "dir": "/x"}
    assert cli.main(["audit", "demo-only", "--dir", "/x", "--node", "remote", "--format", "json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["status"] == "PERMISSION_DENIED"
    assert cli.main(["audit", "demo-only", "--dir", "/x", "--node", "boom"]) == 1
    err = capsys.readouterr().err
    assert "Unexpected RuntimeError" in err and "Traceback" not in err
    # --dir and --config are mutually exclusive, one is required: usage error, exit 1.
    assert cli.main(["audit", "demo-only", "--node", "x"]) == 1
    assert cli.main(["audit", "demo-only", "--dir", "a", "--config", "b"]) == 1


def test_remote_error_names_the_grpc_status():
    class Fake(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self):
            return "Deadline Exceeded"

    err = cli.remote_error(Fake())
    assert err.exit_code == 2 and err.details["status"] == "DEADLINE_EXCEEDED"
    assert err.message == "The call failed with status DEADLINE_EXCEEDED: Deadline Exceeded."


@pytest.mark.parametrize(
    "argv",
    [
        ["refresh", "--dir", "/nonexistent", "--drain", "nan"],
        ["refresh", "--dir", "/nonexistent", "--drain", "-1"],
        ["refresh", "--dir", "/nonexistent", "--pace", "-5"],
        ["reshare", "--dir", "/nonexistent", "--drain", "inf"],
        ["reshare", "--dir", "/nonexistent", "--pace", "x"],
    ],
)
def test_maintenance_pauses_and_paces_are_checked_locally(argv, capsys):
    # A bad pause or pace is a usage error (exit 1) before any node is asked.
    from vaultctl import cli

    assert cli.main(argv) == 1
    assert "Traceback" not in capsys.readouterr().err
