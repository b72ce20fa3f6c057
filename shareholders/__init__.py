"""One institution's shareholder node: it stores one share of every template,
sealed under the institution's own keys, and releases it only for a
verification a payment provider signed, logging every step in its own
hash-chained audit log.

Modules: ``config`` (TOML -> NodeConfig, key files), ``store`` (SQLite
schema, migrations and queries), ``audit_log`` (the database writer: group
commit and the hash chain), ``service`` (the ``Shareholder`` gRPC servicer),
``rotation`` (KEK rotation), ``epochs`` (the refresh and reshare servicer;
its steps in ``maintenance/``),
``server`` (``serve(config) -> NodeRunning``), ``__main__`` (``python -m
shareholders``), ``testing`` (throw-away nodes for tests and benchmarks).
"""
