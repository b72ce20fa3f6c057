"""Hostile input on the CLI (``vaultctl enroll/verify/delete --config``),
Hypothesis-driven, in-process (``vaultctl.cli.main``) against one in-process
committee; and a few of the same cases through a real ``vaultctl`` process,
as users run it.

Every run ends with the exit status the contract gives it (0 done, 1 usage
or local error, 2 remote) -- predicted exactly from the inputs --, one
sentence on stderr and never a traceback, and with ``--format json`` one
JSON object on stdout naming the gRPC status of a remote error. The
victims' records never change.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import uuid

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_kit import Snapshot, hostile_ids, request_id_ok, subject_ok, valid_subjects, vector_ok
from node_kit import CLUSTER_ID
from matcher_kit import DIM, Committee, Tenant, noisy, unit
from vaultctl import cli

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROOT = pathlib.Path(__file__).resolve().parent.parent
ACME = Tenant("acme")
VICTIMS = ["victim-0"]


class World:
    def __init__(self, dev_pki, root: pathlib.Path):
        self.root = root
        self.committee = Committee(dev_pki, root / "committee", tenants=[ACME])
        self.committee.start_matcher()
        files = dev_pki.files("psp", "acme")
        key = root / "acme.ticket.key"
        key.write_bytes(ACME.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key.chmod(0o600)
        self.config = root / "client.toml"
        self.config.write_text(
            f'[matcher]\naddress = "127.0.0.1:{self.committee.matcher.port}"\nname = "matcher"\ntimeout_s = 10\ncluster_id = "{CLUSTER_ID}"\n\n'
            f'[tls]\nca = "{files.ca}"\ncert = "{files.cert}"\nkey = "{files.key}"\n\n'
            f'[tenant]\nid = "acme"\nticket_key = "{key}"\nkey_id = "{ACME.key_id}"\n'
        )
        rng = np.random.default_rng(3)
        self.templates = {v: unit(rng) for v in VICTIMS}
        self.committee.client().enroll("victim-0", self.templates["victim-0"], request_id="enrol-victim-0")
        self.enrolled = set(VICTIMS)
        self.snapshot = Snapshot(dev_pki, dict(self.committee.addresses), "acme", VICTIMS)
        self.baseline = self.snapshot.take()

    def victims_unchanged(self):
        now = self.snapshot.take()
        assert all(now[n]["victims"] == self.baseline[n]["victims"] for n in now)

    def close(self):
        self.snapshot.close()
        self.committee.close()


@pytest.fixture(scope="module")
def world(dev_pki, tmp_path_factory):
    w = World(dev_pki, tmp_path_factory.mktemp("hostile-cli"))
    yield w
    w.close()


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def check_output(code: int, out: str, err: str, fmt: str, expected: int, status: str | None = None):
    assert code == expected, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code:
        lines = err.strip().splitlines()
        assert len(lines) >= 1 and lines[-1].startswith("vaultctl: error: "), err
        assert len(lines[-1]) < 600
    if fmt == "json":
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        body = json.loads(lines[0])
        if code:
            assert body["error"]["exit"] == code
            if status:
                assert body["error"]["status"] == status, body
        return body
    return None


# --- template files ------------------------------------------------------------------

FILE_KINDS = ["npy", "json", "npy-float64", "npy-ints", "npy-2d", "npy-empty", "json-nested", "json-strings",
              "json-bool", "json-huge-number", "json-nan", "json-object", "json-truncated", "garbage-npy", "txt",
              "missing", "directory", "npy-pickle"]


def write_file(folder: pathlib.Path, kind: str, vector: list[float]) -> tuple[pathlib.Path, bool]:
    """A template file of the given kind; (path, whether the CLI can read it as a vector)."""
    path = folder / f"t-{uuid.uuid4().hex}"
    arr = np.asarray(vector, dtype=np.float32)
    finite = bool(np.isfinite(arr).all()) if arr.size else True
    if kind == "npy":
        np.save(path.with_suffix(".npy"), arr)
        return path.with_suffix(".npy"), arr.size > 0 and finite
    if kind == "npy-float64":
        np.save(path.with_suffix(".npy"), arr.astype(np.float64))
        return path.with_suffix(".npy"), arr.size > 0 and finite
    if kind == "npy-ints":
        np.save(path.with_suffix(".npy"), np.arange(max(1, arr.size)))
        return path.with_suffix(".npy"), False
    if kind == "npy-2d":
        np.save(path.with_suffix(".npy"), np.stack([arr, arr]) if arr.size else np.zeros((2, 2), np.float32))
        return path.with_suffix(".npy"), False
    if kind == "npy-empty":
        np.save(path.with_suffix(".npy"), np.zeros(0, np.float32))
        return path.with_suffix(".npy"), False
    if kind == "npy-pickle":
        np.save(path.with_suffix(".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return path.with_suffix(".npy"), False
    if kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps([float(x) for x in arr], allow_nan=True))
        return path, arr.size > 0 and finite
    if kind == "json-huge-number":
        path = path.with_suffix(".json")
        path.write_text("[" + ", ".join(["1e400"] + ["1.0"] * (DIM - 1)) + "]")
        return path, False          # 1e400 is inf in float
    contents = {
        "json-nested": "[[1.0, 2.0]]", "json-strings": json.dumps(["1.0"] * DIM), "json-bool": json.dumps([True] * DIM),
        "json-nan": json.dumps([math.nan] * DIM), "json-object": '{"template": [1.0]}', "json-truncated": "[1.0, 2.0,",
    }
    if kind in contents:
        path = path.with_suffix(".json")
        path.write_text(contents[kind])
        return path, False
    if kind == "garbage-npy":
        path = path.with_suffix(".npy")
        path.write_bytes(b"\x93NUMPY garbage" + os.urandom(64))
        return path, False
    if kind == "txt":
        path = path.with_suffix(".txt")
        path.write_text("1 2 3")
        return path, False
    if kind == "directory":
        path = path.with_suffix(".npy")
        path.mkdir()
        return path, False
    return path.with_suffix(".npy"), False   # missing


def vectors_for_cli():
    f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
    return st.one_of(
        st.lists(f32, min_size=DIM, max_size=DIM),
        st.lists(f32, min_size=1, max_size=DIM + 3),
        st.just([0.0] * DIM),
        st.just([float("nan")] + [1.0] * (DIM - 1)),
        st.just([float("inf")] + [1.0] * (DIM - 1)),
    )


@SETTINGS
@given(
    command=st.sampled_from(["enroll", "verify", "delete"]),
    subject=st.one_of(st.sampled_from(VICTIMS + ["stranger"]), hostile_ids(valid_subjects)).filter(lambda s: "\x00" not in s),
    kind=st.sampled_from(FILE_KINDS),
    vector=vectors_for_cli(),
    request_id=st.one_of(st.none(), st.just(""), st.sampled_from(["ok-1", "é", "x" * 200, "tab\there"])),
    fmt=st.sampled_from(["text", "json"]),
)
def test_cli_commands(world, tmp_path_factory, command, subject, kind, vector, request_id, fmt):
    if subject in VICTIMS and command in ("enroll", "delete"):
        subject = subject + "-not"
    folder = tmp_path_factory.mktemp("files", numbered=True)
    argv = [command, "--config", str(world.config), f"--subject={subject}", "--format", fmt]
    readable = True
    if command != "delete":
        path, readable = write_file(folder, kind, vector)
        argv += ["--template" if command == "enroll" else "--probe", str(path)]
    if command == "enroll" and request_id is not None:
        argv.append(f"--request-id={request_id}")
        rid = request_id
    else:
        rid = "generated"
    # The contract, as an oracle.
    status = None
    if not readable:
        expected = 1
    elif not subject_ok(subject):
        expected, status = 2, "INVALID_ARGUMENT"
    elif command == "enroll" and not (request_id_ok(rid) if request_id is not None else True):
        expected, status = 2, "INVALID_ARGUMENT"
    elif command != "delete" and not vector_ok(list(np.float32(vector)), DIM):
        expected, status = 2, "INVALID_ARGUMENT"
    elif command == "enroll" and subject in world.enrolled:
        expected, status = 2, "ALREADY_EXISTS"
    elif command == "verify" and subject not in world.enrolled:
        expected, status = 2, "NOT_FOUND"
    else:
        expected = 0
    code, out, err = run(argv)
    body = check_output(code, out, err, fmt, expected, status)
    if code == 0 and command == "enroll":
        world.enrolled.add(subject)
    if code == 0 and command == "delete":
        world.enrolled.discard(subject)
    if code == 0 and command == "verify" and body is not None:
        assert body["decision"] in ("MATCH", "NO_MATCH") and "score" not in body
    world.victims_unchanged()


@pytest.mark.parametrize("argv, expected", [
    (["verify", "--subject", "victim-0"], 1),                                  # no --probe, no --config
    (["enroll", "--config", "/nonexistent.toml", "--subject", "a", "--template", "x.npy"], 1),
    (["frobnicate"], 1),
    (["verify", "--config", "CONFIG", "--subject", "victim-0", "--probe", "PROBE", "--timeout", "0"], 1),
    (["verify", "--config", "CONFIG", "--subject", "victim-0", "--probe", "PROBE", "--timeout", "-5"], 1),
    (["verify", "--config", "CONFIG", "--subject", "victim-0", "--probe", "PROBE", "--timeout", "nan"], 1),
    (["verify", "--config", "CONFIG", "--subject", "victim-0", "--probe", "PROBE", "--timeout", "abc"], 1),
    (["verify", "--config", "CONFIG", "--subject", "victim-0", "--probe", "PROBE", "--format", "yaml"], 1),
], ids=["no-config", "missing-config", "unknown-command", "timeout-0", "timeout-negative", "timeout-nan",
        "timeout-text", "format-yaml"])
def test_cli_usage_errors(world, tmp_path, argv, expected):
    probe = tmp_path / "probe.npy"
    np.save(probe, noisy(world.templates["victim-0"], np.random.default_rng(1)))
    argv = [str(world.config) if a == "CONFIG" else str(probe) if a == "PROBE" else a for a in argv]
    code, out, err = run(argv)
    check_output(code, out, err, "text", expected)
    world.victims_unchanged()


@pytest.mark.parametrize("subject, expected", [
    ("😀-customer", 2),          # valid unicode id, never enrolled: NOT_FOUND
    ("é" * 70, 2),               # 140 bytes: INVALID_ARGUMENT
    ("rtl\u202eevil", 2),        # invisible control of text direction: INVALID_ARGUMENT
    ("victim-0", 0),
], ids=["emoji", "140-bytes", "rtl-override", "enrolled"])
def test_real_vaultctl_process(world, tmp_path, subject, expected):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(noisy(world.templates["victim-0"], np.random.default_rng(2)).tolist()))
    env = {k: v for k, v in os.environ.items() if k not in ("LANG", "LC_ALL", "LC_CTYPE")}
    env["LANG"] = "C"   # the least helpful locale a user may have
    r = subprocess.run([sys.executable, "-m", "vaultctl", "verify", "--config", str(world.config), "--subject", subject,
                        "--probe", str(probe), "--format", "json"], capture_output=True, text=True, env=env, timeout=60,
                       cwd=ROOT, encoding="utf-8", errors="replace")
    check_output(r.returncode, r.stdout, r.stderr, "json", expected)
    world.victims_unchanged()
