"""Crash safety of `vaultctl refresh` over real processes: kill -9 the CLI, or
a node, at several points of a refresh, then rerun the same command. It
completes (or, with --abort, rolls back); every enrolled template still
verifies (genuine -> MATCH, impostor -> NO_MATCH); no template is lost and
none is left in two epochs.

The crash points come from the test-only entry point tests/crash_cli.py
("<phase>:<count>:<action>": after <count> nodes finished <phase>, kill -9
the CLI itself, or node=<name>)."""
from __future__ import annotations

import json

import pytest

from maintenance_kit import enrolled_cluster, epochs_held, fresh_subjects, json_out, prepared_rows, vaultctl, verify_all
from vaultctl import cluster
from vaultctl.client import MatcherClient

pytestmark = pytest.mark.e2e

DIM = 128
COUNT = 300


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("refresh-crash") / "cluster", dim=DIM, count=COUNT, seed=5)


def _assert_whole(state, note=""):
    root = state["root"]
    spec = cluster.load_spec(root)
    for name in spec.nodes:
        db = root / "nodes" / name / "shares.db"
        assert epochs_held(db) == {state["epoch"]: COUNT}, (note, name, epochs_held(db))
        assert prepared_rows(db) == 0, (note, name)
    assert not (root / "maintenance" / "epoch-session.json").exists()
    sample = fresh_subjects(state)
    with MatcherClient.from_cluster_dir(root) as client:
        verify_all(client, state["templates"], sample, state["impostor"], noise_seed=state["epoch"] * 10)
        assert client.verify(sample[0], state["templates"][sample[0]]).epoch == state["epoch"]


def _refresh(state, fault=None):
    return vaultctl("refresh", "--dir", state["root"], "--format", "json", "--drain", "0.2", fault=fault)


@pytest.mark.parametrize("fault", [
    "prepare:1:self",          # the CLI dies with one node prepared (others mid-way)
    "commit:1:self",           # the CLI dies with one node serving both epochs
    "finalize:1:self",         # the CLI dies while the old epoch is being destroyed
])
def test_cli_killed_then_rerun_completes(running, fault):
    state = running
    first = _refresh(state, fault)
    assert first.returncode == -9, (first.returncode, first.stderr[-1500:])
    assert (state["root"] / "maintenance" / "epoch-session.json").exists()
    with MatcherClient.from_cluster_dir(state["root"]) as client:  # verification goes on meanwhile
        verify_all(client, state["templates"], fresh_subjects(state, 2), state["impostor"], noise_seed=99)
    second = _refresh(state)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json_out(second)
    assert report["resumed"] is True and report["state"] == "finalized"
    state["epoch"] = report["new_epoch"]
    _assert_whole(state, fault)


@pytest.mark.parametrize("fault,victim", [
    ("prepare:1:node=bank-c", "bank-c"),   # a node dies during prepare
    ("commit:1:node=bank-b", "bank-b"),    # a node dies after another one committed
    ("finalize-start:1:node=bank-a", "bank-a"),  # a node dies as finalize starts: the others destroy epoch e
])
def test_node_killed_then_restarted_and_rerun_completes(running, fault, victim):
    state = running
    first = _refresh(state, fault)
    assert first.returncode == 2, (first.returncode, first.stderr[-1500:])
    assert "bank" in json_out(first)["error"]["message"]
    with MatcherClient.from_cluster_dir(state["root"]) as client:  # 2 of 3 nodes still verify
        verify_all(client, state["templates"], fresh_subjects(state, 2), state["impostor"], noise_seed=77)
    cluster.restart_node(state["root"], victim)
    second = _refresh(state)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json_out(second)
    assert report["resumed"] is True and report["state"] == "finalized"
    state["epoch"] = report["new_epoch"]
    _assert_whole(state, fault)


def test_abort_rolls_back_a_session_no_node_committed(running):
    state = running
    first = _refresh(state, "prepare:2:self")
    assert first.returncode == -9
    # A second auditor workstation (no session file) is refused, naming the session.
    import shutil

    moved = state["root"] / "maintenance" / "epoch-session.json.elsewhere"
    shutil.move(state["root"] / "maintenance" / "epoch-session.json", moved)
    other = _refresh(state)
    message = json_out(other)["error"]["message"]
    assert other.returncode == 2 and "refresh-" in message and "--session" in message
    sid = json.loads(moved.read_text())["session_id"]
    moved.unlink()
    # That workstation takes the session over by id and rolls it back.
    aborted = vaultctl("refresh", "--dir", state["root"], "--abort", "--session", sid, "--format", "json")
    assert aborted.returncode == 0, aborted.stderr
    assert json_out(aborted)["state"] == "aborted"
    _assert_whole(state, "abort")  # same epoch as before, nothing prepared left
    again = _refresh(state)
    assert again.returncode == 0, again.stderr[-2000:]
    state["epoch"] = json_out(again)["new_epoch"]
    _assert_whole(state, "after abort")


def test_committed_session_cannot_be_aborted(running):
    state = running
    first = _refresh(state, "commit:1:self")
    assert first.returncode == -9
    refused = vaultctl("refresh", "--dir", state["root"], "--abort", "--format", "json")
    assert refused.returncode == 2 and "cannot be rolled back" in json_out(refused)["error"]["message"]
    done = _refresh(state)
    assert done.returncode == 0, done.stderr[-2000:]
    state["epoch"] = json_out(done)["new_epoch"]
    _assert_whole(state, "forward")


def test_refresh_with_an_auditor_config(running, tmp_path):
    """A real deployment's form: `--config` naming the nodes, TLS and a state folder."""
    state = running
    info = cluster.status(state["root"])
    lines = [
        "[auditor]", "threshold = 2", f'state_dir = "{tmp_path / "state"}"', "",
        "[tls]", f'ca = "{info["tls"]["ca"]}"', f'cert = "{info["tls"]["auditor"]["cert"]}"',
        f'key = "{info["tls"]["auditor"]["key"]}"', "",
    ]
    for n in info["shareholders"]:
        lines += ["[[shareholders]]", f'name = "{n["name"]}"', f'index = {n["index"]}', f'address = "{n["address"]}"', ""]
    config = tmp_path / "auditor.toml"
    config.write_text("\n".join(lines))
    first = vaultctl("refresh", "--config", config, "--format", "json", "--drain", "0", fault="commit:1:self")
    assert first.returncode == -9
    assert (tmp_path / "state" / "epoch-session.json").exists()
    done = vaultctl("refresh", "--config", config, "--format", "json", "--drain", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json_out(done)
    assert report["resumed"] and report["state"] == "finalized"
    state["epoch"] = report["new_epoch"]
    _assert_whole(state, "--config")


def test_paced_refresh(running):
    """--pace caps each node's prepare rate (an operator's lever on a busy machine)."""
    state = running
    done = vaultctl("refresh", "--dir", state["root"], "--format", "json", "--drain", "0", "--pace", "400")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json_out(done)
    assert report["timings"]["prepare_s"] >= COUNT / 400 * 0.8
    state["epoch"] = report["new_epoch"]
    _assert_whole(state, "paced")
