"""The gRPC plumbing both services share: mutual TLS, caller identity and
roles, one exception-to-status mapping, JSON logs, Prometheus metrics,
health, reflection, graceful shutdown and TOML config."""
