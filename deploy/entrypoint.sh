#!/bin/sh
# Start one splitvault server in its container: `splitvault-entrypoint shareholders`
# or `splitvault-entrypoint matcher` (or `migrate`: a node's store schema, then exit).
# The config is always /etc/splitvault/config.toml (so the image's HEALTHCHECK and
# the Kubernetes probes find it).
#
# A node refuses key files other users could read (mode & 077); a mounted Secret
# is group-readable (fsGroup), so the node's keys are installed 0600 here:
# the audit key into memory (/run/splitvault, an in-memory volume) at every start,
# the KEK into the node's own keys volume on the first start only, because
# `vaultctl rotate kek` rewrites it there afterwards.
set -eu
umask 077
role="${1:-}"
config=/etc/splitvault/config.toml
case "$role" in
  shareholders)
    install -m 600 /etc/splitvault/node-keys/audit.key /run/splitvault/audit.key
    if [ ! -e /var/lib/splitvault-keys/kek.json ]; then
      install -m 600 /etc/splitvault/node-keys/kek.json /var/lib/splitvault-keys/kek.json
    fi
    ;;
  matcher)
    ;;
  migrate)
    # The init container of a node on PostgreSQL: the owner role migrates and
    # grants the node's role, then exits (deploy/render.py).
    exec python -m shareholders --config /etc/splitvault/migrate.toml --migrate
    ;;
  *)
    echo "splitvault-entrypoint: the role must be shareholders, matcher or migrate." >&2
    exit 1
    ;;
esac
exec python -m "$role" --config "$config"
