"""``python -m shareholders --config node.toml``: run one node until SIGTERM.

Exit status: 0 after a clean shutdown, 1 when the node cannot start (bad
config, unreadable or exposed key file, port in use, database of another
node, an audit log cut short or rewritten at its end): the reason is one JSON log line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys

from shareholders.config import ConfigError, load_config
from shareholders.server import serve
from shareholders.storage import SchemaError, errors as storage_errors
from vault.errors import AuditChainError
from vaultrpc import logs
from vaultrpc.server import run_until_signalled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shareholders", description="Run a splitvault shareholder node.")
    parser.add_argument("--config", required=True, help="the node's TOML config file")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on SIGTERM")
    args = parser.parse_args(argv)

    log = logs.setup("shareholders")
    cfg = None
    try:
        cfg = load_config(args.config)
        logging.getLogger().setLevel(cfg.log_level)
        running = serve(cfg)
    except (ConfigError, SchemaError, AuditChainError) as exc:
        logs.event(log, "cannot start", logging.ERROR, error=str(exc))
        return 1
    except (OSError, ValueError, RuntimeError, *storage_errors()) as exc:
        # Port in use, unwritable data directory, ...: say what, not where.
        if cfg is not None and isinstance(exc, (RuntimeError, ValueError)) and "bind" in str(exc).lower() + " ":
            error = f"Cannot listen on {cfg.listen}: the address is in use or not available here."
        else:
            error = f"{type(exc).__name__}: {exc}"
        logs.event(log, "cannot start", logging.ERROR, error=error)
        return 1
    run_until_signalled(running.rpc, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
