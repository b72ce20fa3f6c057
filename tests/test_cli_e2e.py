"""`vaultctl enroll/verify/delete` as a user runs them: real processes,
exit codes (0 done, 1 local, 2 remote) and the JSON they print."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from vaultctl import cluster
from vaultctl.demo import noisy_copy, synthetic_templates

pytestmark = pytest.mark.e2e

DIM = 128


def vaultctl(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaultctl", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def json_out(result: subprocess.CompletedProcess) -> dict:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON object, got {result.stdout!r} (stderr {result.stderr!r})"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "cluster"
    try:
        cluster.up(root, dim=DIM)
        yield root
    finally:
        if (root / "cluster.json").exists():
            cluster.down(root)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("templates")
    t = synthetic_templates(3, DIM, seed=21)
    np.save(d / "alice.npy", t[0])
    np.save(d / "alice-probe.npy", noisy_copy(t[0], seed=22))
    (d / "bob.json").write_text(json.dumps(t[1].tolist()))
    (d / "bob-probe.json").write_text(json.dumps(noisy_copy(t[1], seed=23).tolist()))
    np.save(d / "stranger.npy", t[2])
    # Bad inputs, each a local error.
    np.save(d / "batch.npy", t)
    np.save(d / "ints.npy", np.arange(DIM))
    np.save(d / "short.npy", t[0][:10])
    (d / "nan.json").write_text(json.dumps([float("nan")] * DIM))
    (d / "nested.json").write_text(json.dumps([[1.0, 2.0]]))
    (d / "strings.json").write_text(json.dumps(["a"] * DIM))
    (d / "broken.json").write_text("[1, 2,")
    (d / "template.csv").write_text("1,2,3")
    (d / "garbage.npy").write_bytes(b"not numpy at all")
    return d


def test_enroll_verify_delete(running, files):
    r = vaultctl("enroll", "--dir", running, "--subject", "alice", "--template", files / "alice.npy", "--format", "json")
    assert r.returncode == 0, r.stderr
    body = json_out(r)
    assert body["subject"] == "alice" and body["enrolled"] is True and body["epoch"] >= 1 and body["request_id"]

    r = vaultctl("enroll", "--dir", running, "--subject", "bob", "--template", files / "bob.json")
    assert r.returncode == 0, r.stderr
    assert "enrolled bob" in r.stdout

    r = vaultctl("verify", "--dir", running, "--subject", "alice", "--probe", files / "alice-probe.npy", "--format", "json")
    assert r.returncode == 0, r.stderr
    body = json_out(r)
    assert body["decision"] == "MATCH" and body["subject"] == "alice" and body["decision_id"]
    assert "score" not in body  # the demo tenant is not allowed raw scores

    r = vaultctl("verify", "--dir", running, "--subject", "bob", "--probe", files / "bob-probe.json")
    assert r.returncode == 0 and r.stdout.startswith("MATCH for bob")

    # An impostor: a completed verification, exit 0.
    r = vaultctl("verify", "--dir", running, "--subject", "alice", "--probe", files / "stranger.npy", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json_out(r)["decision"] == "NO_MATCH"

    # Enrolling an enrolled subject is a remote refusal (2) unless --replace.
    r = vaultctl("enroll", "--dir", running, "--subject", "alice", "--template", files / "alice.npy", "--format", "json")
    assert r.returncode == 2
    assert json_out(r)["error"]["status"] == "ALREADY_EXISTS"
    r = vaultctl("enroll", "--dir", running, "--subject", "alice", "--template", files / "alice.npy", "--replace")
    assert r.returncode == 0, r.stderr

    r = vaultctl("delete", "--dir", running, "--subject", "alice", "--format", "json")
    assert r.returncode == 0, r.stderr
    body = json_out(r)
    assert body["complete"] is True and {o["shareholder"] for o in body["outcomes"]} == {"bank-a", "bank-b", "bank-c"}

    r = vaultctl("verify", "--dir", running, "--subject", "alice", "--probe", files / "alice-probe.npy", "--format", "json")
    assert r.returncode == 2
    assert json_out(r)["error"]["status"] == "NOT_FOUND"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "name, message",
    [
        ("batch.npy", "1-D"),
        ("ints.npy", "floats"),
        ("short.npy", f"this cluster's templates have {DIM}"),
        ("nan.json", "NaN"),
        ("nested.json", "flat list of numbers"),
        ("strings.json", "flat list of numbers"),
        ("broken.json", "not valid JSON"),
        ("template.csv", "must be .npy"),
        ("garbage.npy", "not a readable .npy"),
        ("missing.npy", "No such file"),
    ],
)
def test_bad_template_files_are_local_errors(running, files, name, message):
    from vaultctl.cli import main

    # In-process (the same code as the console script) to keep the suite fast.
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["enroll", "--dir", str(running), "--subject", "x", "--template", str(files / name), "--format", "json"])
    assert code == 1
    assert message in json.loads(out.getvalue())["error"]["message"]
    assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue()


def test_config_file_instead_of_dir(running, files, tmp_path):
    info = cluster.status(running)
    config = tmp_path / "client.toml"
    config.write_text(
        "[matcher]\n"
        f'address = "{info["matcher"]["address"]}"\n'
        'name = "matcher"\n'
        "timeout_s = 5\n"
        f'cluster_id = "{info["cluster_id"]}"\n\n'
        "[tls]\n"
        f'ca = "{info["tls"]["ca"]}"\n'
        f'cert = "{info["tls"]["psp"]["cert"]}"\n'
        f'key = "{info["tls"]["psp"]["key"]}"\n\n'
        "[tenant]\n"
        'id = "demo-psp"\n'
        f'ticket_key = "{info["tickets"]["demo-psp"]["key"]}"\n'
        'key_id = "demo-psp-1"\n'
    )
    r = vaultctl("enroll", "--config", config, "--subject", "dave", "--template", files / "bob.json")
    assert r.returncode == 0, r.stderr
    r = vaultctl("verify", "--config", config, "--subject", "dave", "--probe", files / "bob-probe.json", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json_out(r)["decision"] == "MATCH"

    broken = tmp_path / "broken.toml"
    broken.write_text("[matcher]\naddress = 'x:1'\n")
    r = vaultctl("verify", "--config", broken, "--subject", "dave", "--probe", files / "bob-probe.json")
    assert r.returncode == 1 and "missing tls.ca" in r.stderr


def test_stopped_cluster_is_exit_2(running, files):
    cluster.down(running)
    try:
        r = vaultctl("verify", "--dir", running, "--subject", "bob", "--probe", files / "bob-probe.json", "--format", "json")
        assert r.returncode == 2
        assert "not running" in json_out(r)["error"]["message"]
        # A matcher that died without cleaning up (stale ready file): the call itself fails.
        cluster.up(running)
        cluster.kill_node(running, "matcher")
        r = vaultctl("verify", "--dir", running, "--subject", "bob", "--probe", files / "bob-probe.json", "--format", "json", "--timeout", "3")
        assert r.returncode == 2
        assert json_out(r)["error"]["status"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        cluster.down(running)
        cluster.up(running)  # leave the module's cluster as it was


def test_usage_errors_exit_1():
    r = vaultctl("verify", "--subject", "x", "--probe", "p.npy")
    assert r.returncode == 1 and "--dir" in r.stderr
    r = vaultctl("frobnicate")
    assert r.returncode == 1
    r = vaultctl("--help")
    assert r.returncode == 0
    for word in ("cluster", "enroll", "verify", "delete"):
        assert word in r.stdout
