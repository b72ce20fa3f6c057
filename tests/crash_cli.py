"""vaultctl with crash injection, for tests only (never installed).

``python tests/crash_cli.py <phase>:<count>:<action> ARGS...`` runs
``vaultctl ARGS...`` with a crash seam that fires once ``count`` nodes have
finished ``phase``: action ``self`` kills this CLI with SIGKILL,
``node=NAME`` kills node NAME of the cluster directory (--dir). A phase
``<label>-start`` fires once, just before the phase begins anywhere. E.g.
``prepare:1:self`` or ``commit:1:node=bank-b``.
"""
from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading

from vaultctl import cluster, maintenance
from vaultctl.cli import main


class Faults(maintenance.CrashSeam):
    def __init__(self, spec: str, root: pathlib.Path | None):
        phase, count, action = spec.split(":", 2)
        self.phase, self.count, self.action = phase, int(count), action
        self.root = root
        self._seen = 0
        self._lock = threading.Lock()
        self._fired = False

    def step(self, phase: str) -> None:
        if self.phase != phase:
            return
        with self._lock:
            self._seen += 1
            if self._fired or self._seen < self.count:
                return
            self._fired = True
        if self.action == "self":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action.startswith("node=") and self.root is not None:
            cluster.kill_node(self.root, self.action.split("=", 1)[1])


if __name__ == "__main__":
    spec, argv = sys.argv[1], sys.argv[2:]
    maintenance.crash_seam = lambda root: Faults(spec, root)
    sys.exit(main(argv))
