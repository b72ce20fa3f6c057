"""Red-team script (issue 10, open): one sender of a reshare destroys every template.

A reshare has no check that the new sharing holds the same secrets as the
old one (a refresh has `CheckRefresh`; a reshare only counts records). One
node operator whose node is a sender deals values off by a constant; the
new members combine them, the auditor's `vaultctl reshare` commits,
switches and finalizes (the old epoch is destroyed), and from then on every
template rejoins shifted: the MACs catch it (fail closed), so no wrong
MATCH, but every template is gone.

Run: .venv/bin/python tools/redteam_reshare_bad_dealer.py
Exit 0 when the hole shows (the genuine probe no longer matches after the
reshare), 1 when the defence holds.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vaultctl import cluster  # noqa: E402
from vaultctl.client import MatcherClient  # noqa: E402
from vaultctl.demo import noisy_copy, synthetic_templates  # noqa: E402

HOOK = '''
import os
if os.environ.get("REDTEAM_BAD_DEALER"):
    import vault.proactive as _p
    _deal = _p.reshare_values
    def _bad(*args, **kwargs):
        out = _deal(*args, **kwargs)
        return (out + 1) % _p.P  # every dealt value off by one: g_i(0) != y_i
    _p.reshare_values = _bad
'''


def decision(client, subject, probe) -> str:
    try:
        return client.verify(subject, probe).decision
    except grpc.RpcError as exc:
        return f"error {exc.code().name}: {exc.details()}"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "cluster"
        hooks = pathlib.Path(tmp) / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(HOOK)
        cluster.up(root, 3, 2, 32)
        try:
            alice = synthetic_templates(1, 32, seed=4)[0]
            with MatcherClient.from_cluster_dir(root) as client:
                client.enroll("alice", alice)
                print("before:", decision(client, "alice", noisy_copy(alice, 1)))
            # bank-a's operator runs its node with the dealing hook (index 1: a sender).
            cluster.stop_processes(root, ["bank-a"])
            saved = dict(os.environ)
            os.environ["REDTEAM_BAD_DEALER"] = "1"
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), saved.get("PYTHONPATH", "")) if p)
            try:
                cluster.restart_node(root, "bank-a")
            finally:
                os.environ.clear()
                os.environ.update(saved)
            out = subprocess.run([sys.executable, "-m", "vaultctl", "reshare", "--dir", str(root), "--shareholders",
                                  "4", "--threshold", "2", "--approve-with-dev-operators", "--format", "json"],
                                 capture_output=True, text=True, cwd=str(ROOT), timeout=300)
            report = json.loads(out.stdout.strip().splitlines()[-1])
            print("reshare:", out.returncode, report.get("state"), report.get("error"))
            with MatcherClient.from_cluster_dir(root) as client:
                after = decision(client, "alice", noisy_copy(alice, 2))
            print("after:", after)
            return 0 if after != "MATCH" else 1
        finally:
            cluster.down(root)


if __name__ == "__main__":
    sys.exit(main())
