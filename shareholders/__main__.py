"""``python -m shareholders --config node.toml``: run one node until SIGTERM.

``--migrate``: bring the node's store to this version's schema and exit,
nothing served. On PostgreSQL with ``store.owner_dsn`` the owner role
migrates and grants the node's role (store.dsn) what it needs, so the
running node's config need not hold the owner's credentials (deploy/: an
init container; docs/operations.md).

Exit status: 0 after a clean shutdown, 1 when the node cannot start (bad
config, unreadable or exposed key file, port in use, database of another
node, an audit log cut short or rewritten at its end): the reason is one JSON log line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# One BLAS thread per calling thread unless the operator sets otherwise: the
# node runs its heavy steps on its own worker threads, and BLAS's threads,
# spinning between the many mid-sized products of a refresh, cost about a
# fifth of a node's CPU in one (docs/benchmarks.md). Set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from shareholders.config import ConfigError, load_config  # noqa: E402 - after the thread settings
from shareholders.server import serve  # noqa: E402 - after the thread settings
from shareholders import storage  # noqa: E402 - after the thread settings
from shareholders.storage import SchemaError, errors as storage_errors  # noqa: E402 - after the thread settings
from vault.errors import AuditChainError  # noqa: E402 - after the thread settings
from vaultrpc import logs  # noqa: E402 - after the thread settings
from vaultrpc.server import run_until_signalled  # noqa: E402 - after the thread settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shareholders", description="Run a splitvault shareholder node.")
    parser.add_argument("--config", required=True, help="the node's TOML config file")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--migrate", action="store_true",
                        help="bring the store's schema up to date (as store.owner_dsn's role, if set) and exit")
    args = parser.parse_args(argv)
    refusal = "cannot migrate" if args.migrate else "cannot start"

    log = logs.setup("shareholders")
    cfg = None
    try:
        cfg = load_config(args.config)
        logging.getLogger().setLevel(cfg.log_level)
        if args.migrate:
            found = storage.migrate(cfg.store)
            # The outcome, one JSON line on stdout (the log level may hide INFO).
            print(json.dumps({"store": "migrated", "backend": cfg.store_backend, "from_version": found,
                              "to_version": storage.SCHEMA_VERSION}), flush=True)
            return 0
        running = serve(cfg)
    except (ConfigError, SchemaError, AuditChainError) as exc:
        logs.event(log, refusal, logging.ERROR, error=str(exc))
        return 1
    except (OSError, ValueError, RuntimeError, *storage_errors()) as exc:
        # Port in use, unwritable data directory, ...: say what, not where.
        if cfg is not None and isinstance(exc, (RuntimeError, ValueError)) and "bind" in str(exc).lower() + " ":
            error = f"Cannot listen on {cfg.listen}: the address is in use or not available here."
        else:
            error = f"{type(exc).__name__}: {exc}"
        logs.event(log, refusal, logging.ERROR, error=error)
        return 1
    run_until_signalled(running.rpc, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
