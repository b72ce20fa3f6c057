"""A new institution joins a deployed committee, driven from an auditor
config (``vaultctl reshare --config``), as docs/operations.md walks it.

The institutions' own steps (bank-d's certificate, keys and node; every
member's values) are done with the cluster directory's tools, which stand in
for each institution's deployment. Everything the auditor and the operators
do goes through the deployment form only: the committee file bank-d and the
members published, `reshare propose --config --members`, each operator's
`approve --key` with its own key, a run that stops once every node
committed (the matcher is its operator's), the matcher operator's switch,
and `--finalize`. Real processes over mTLS throughout.
"""
from __future__ import annotations

import json

import pytest

from maintenance_kit import decisions, enrolled_cluster, epochs_held, json_out, vaultctl
from vault import plan as committee_plan
from vaultctl import cluster
from vaultctl.reshare import LocalCluster

pytestmark = pytest.mark.e2e

DIM = 32
COUNT = 6


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    yield from enrolled_cluster(tmp_path_factory.mktemp("reshare-config") / "cluster", dim=DIM, count=COUNT, seed=31)




def _auditor_config(root, tmp_path) -> str:
    info = cluster.status(root)
    trust = cluster.load_trust(root)
    lines = ["[auditor]", "threshold = 2", f'state_dir = "{tmp_path / "state"}"',
             f'cluster_id = "{cluster.cluster_id(root)}"', "",
             "[tls]", f'ca = "{info["tls"]["ca"]}"', f'cert = "{info["tls"]["auditor"]["cert"]}"',
             f'key = "{info["tls"]["auditor"]["key"]}"', ""]
    for n in info["shareholders"]:
        lines += ["[[shareholders]]", f'name = "{n["name"]}"', f"index = {n['index']}", f'address = "{n["address"]}"',
                  f'audit_public_key = "{trust["audit_keys"][n["name"]]}"', ""]
    path = tmp_path / "auditor.toml"
    path.write_text("\n".join(lines))
    return str(path)


def _published(paths, names: list[str], addresses: dict[str, str]) -> str:
    """The committee file: what each member published (address, certificate key, operator key)."""
    lines = []
    for i, name in enumerate(names, start=1):
        spki = committee_plan.spki_sha256(paths.cert("shareholder", name).read_bytes())
        lines += ["[[shareholders]]", f'name = "{name}"', f"index = {i}", f'address = "{addresses[name]}"',
                  f'spki_sha256 = "{spki}"', f'operator_key = "{cluster.operator_public_hex(paths, name)}"', ""]
    return "\n".join(lines)


def test_a_new_institution_joins_through_the_deployment_form(running, tmp_path):
    root, templates = running["root"], running["templates"]
    paths = cluster.Paths(root)
    config = _auditor_config(root, tmp_path)
    old = ["bank-a", "bank-b", "bank-c"]
    new = old + ["bank-d"]

    # bank-d's institution provisions and starts its node; every member adds it to its values.
    new_spec = LocalCluster(root).committee_spec(new, 2)
    cluster.add_nodes(root, new_spec)
    addresses = {n: d["address"] for n, d in cluster.start_processes(root, new).items()}
    members = tmp_path / "committee.toml"
    members.write_text(_published(paths, new, addresses))
    plan = tmp_path / "plan.json"

    proposed = vaultctl("reshare", "propose", "--config", config, "--members", members, "--plan", plan,
                        "--format", "json")
    assert proposed.returncode == 0, proposed.stderr[-1500:]
    summary = json_out(proposed)
    assert summary["new_committee"] == new and summary["approvals"] == [] and summary["needed"] == 2

    # One approval is not enough: every node refuses the plan, nothing changes.
    signed = vaultctl("reshare", "approve", "--config", config, "--plan", plan, "--operator", "bank-a",
                      "--key", paths.operator_key("bank-a"), "--format", "json")
    assert signed.returncode == 0, signed.stderr[-1500:]
    short = vaultctl("reshare", "--config", config, "--plan", plan, "--format", "json", timeout=300)
    assert short.returncode != 0 and "approv" in json_out(short)["error"]["message"], short.stdout[-1500:]
    aborted = vaultctl("reshare", "--config", config, "--abort", "--format", "json", timeout=120)
    assert aborted.returncode == 0, aborted.stderr[-1500:]

    signed = vaultctl("reshare", "approve", "--config", config, "--plan", plan, "--operator", "bank-b",
                      "--key", paths.operator_key("bank-b"), "--format", "json")
    assert signed.returncode == 0 and json_out(signed)["approvals"] == ["bank-a", "bank-b"]

    # The run stops once every node committed: the matcher still serves the old committee.
    run = vaultctl("reshare", "--config", config, "--plan", plan, "--format", "json", timeout=300)
    assert run.returncode == 0, (run.stdout[-1500:], run.stderr[-1500:])
    report = json_out(run)
    assert report["state"] == "committed" and "--finalize" in report["message"], report
    assert report["check"]["passed"] and report["check"]["verdicts"] == ["ok"] * 3, report["check"]
    assert set(decisions(root, templates, 1).values()) == {"MATCH"}
    assert epochs_held(paths.node_dir("bank-d") / "shares.db") == {report["new_epoch"]: COUNT}

    # The matcher operator lists the new committee and reloads; then the auditor finalizes.
    cluster.write_spec(root, new_spec)
    cluster.switch_matcher(root, new_spec, addresses)
    done = vaultctl("reshare", "--config", config, "--finalize", "--format", "json", timeout=300)
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-1500:])
    final = json_out(done)
    assert final["state"] == "finalized" and final["resumed"] and final["records"] == {n: COUNT for n in new}, final
    for name in new:
        assert epochs_held(paths.node_dir(name) / "shares.db") == {final["new_epoch"]: COUNT}, name
    assert set(decisions(root, templates, 2).values()) == {"MATCH"}
    assert not list((tmp_path / "state").glob("*.json")), "the finished session leaves nothing to resume"
    assert json.loads(plan.read_text())["plan"]["new_threshold"] == 2
