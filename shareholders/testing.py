"""Helpers to stand up throw-away nodes: for tests and benchmarks only.

``write_node_files`` writes a node's KEK file, audit key and ``node.toml``
(the docs/contracts.md format) into a folder, with key files at mode 0600;
``sample_records`` makes well-formed share records of random field elements
(not shares of any real template).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from splitvault.v1 import common_pb2
from vault import envelope, integrity, pki, record
from vault.field import P
from vaultrpc.tls import TlsFiles


def _write_secret(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def kek_json(keys: Mapping[int, bytes], active: int) -> str:
    return json.dumps({"active": active, "keys": {str(v): k.hex() for v, k in keys.items()}})


def write_node_files(
    folder: pathlib.Path,
    *,
    name: str,
    index: int,
    tls: TlsFiles,
    tenants: Mapping[str, Mapping[str, bytes]],
    listen: str = "127.0.0.1:0",
    metrics_port: int = -1,
    attempts_per_subject: int = 10,
    attempt_window_s: float = 60,
    extra: str = "",
    kek: Mapping[int, bytes] | None = None,
    kek_active: int | None = None,
) -> pathlib.Path:
    """Write a node's config and keys under ``folder``; returns the node.toml path.

    ``tenants`` maps tenant ids to {key id: raw 32-byte Ed25519 public key}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    kek = dict(kek or {1: envelope.new_kek()})
    _write_secret(folder / "kek.json", kek_json(kek, kek_active or max(kek)).encode())
    audit_pem, _ = pki.new_signing_key()
    _write_secret(folder / "audit.key", audit_pem)
    lines = [
        "[node]",
        f'name = "{name}"',
        f"index = {index}",
        f'listen = "{listen}"',
        f'data_dir = "{folder / "data"}"',
        f'ready_file = "{folder / "ready.json"}"',
        'log_level = "WARNING"',
        "",
        "[tls]",
        f'ca = "{tls.ca}"',
        f'cert = "{tls.cert}"',
        f'key = "{tls.key}"',
        "",
        "[keys]",
        f'kek_file = "{folder / "kek.json"}"',
        f'audit_key_file = "{folder / "audit.key"}"',
        "",
        "[metrics]",
        'host = "127.0.0.1"',
        f"port = {metrics_port}",
        "",
        "[limits]",
        f"attempts_per_subject = {attempts_per_subject}",
        f"attempt_window_s = {attempt_window_s}",
        "",
    ]
    for tenant, keys in tenants.items():
        inner = ", ".join(f'"{kid}" = "{raw.hex()}"' for kid, raw in keys.items())
        lines += [f"[tenants.{tenant}]", f"ticket_keys = {{ {inner} }}", ""]
    path = folder / "node.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def sample_records(
    tenant: str,
    subjects: list[str],
    *,
    index: int,
    shareholders: int = 3,
    threshold: int = 2,
    dimension: int = 16,
    epoch: int = 1,
    request_id: str | None = None,
    rng: np.random.Generator | None = None,
) -> list[common_pb2.ShareRecord]:
    """One well-formed record per subject for shareholder ``index`` (random values)."""
    rng = rng or np.random.default_rng()
    width = dimension + 2 * integrity.MAC_COUNT
    out = []
    for subject in subjects:
        shares = rng.integers(0, P, size=(shareholders, width), dtype=np.uint32)
        recs = record.make_records(
            tenant=tenant, subject=subject, epoch=epoch, threshold=threshold, shareholders=shareholders,
            dimension=dimension, request_id=request_id or f"enrol-{subject}", shares=shares,
        )
        out.append(recs[index - 1])
    return out
