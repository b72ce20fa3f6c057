"""``python -m matcher --config matcher.toml``: run the matcher until SIGTERM/SIGINT.

A bad config or unreadable TLS file ends the process with one sentence on
stderr and exit status 1 (no traceback).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import pathlib
import signal
import sys
import threading

from matcher import config as matcher_config
from matcher.server import harden_process, serve
from vaultrpc import logs
from vaultrpc.server import run_until_signalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matcher", description="Run the splitvault matcher.")
    parser.add_argument("--config", required=True, help="path to matcher.toml")
    args = parser.parse_args(argv)
    # Before anything secret can be in memory.
    hardened = harden_process()
    try:
        cfg = matcher_config.load(args.config)
    except matcher_config.ConfigError as exc:
        print(f"matcher: {exc}", file=sys.stderr)
        return 1
    log = logs.setup("matcher", cfg.log_level)
    logs.event(log, "process hardened", **hardened)
    try:
        running = serve(cfg, logger=log, harden=False, config_sha256=_digest(args.config))
    except (ValueError, OSError) as exc:
        print(f"matcher: cannot start: {exc}", file=sys.stderr)
        return 1

    def reload() -> None:
        # SIGHUP: re-read the config and switch committee (vaultctl reshare).
        try:
            digest = _digest(args.config)
            running.reload(matcher_config.load(args.config), config_sha256=digest)
        except (matcher_config.ConfigError, ValueError, OSError) as exc:
            logs.event(log, "reload refused; the old config stays in force", logging.ERROR, error=str(exc))

    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=reload, daemon=True).start())
    run_until_signalled(running)
    return 0


def _digest(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
