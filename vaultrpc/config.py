"""TOML configuration: one reader for every config file (node, matcher,
the CLI's client and auditor files), typed accessors, and the [tls] section.

``SPLITVAULT_<SECTION>__<KEY>=value`` overrides ``[section] key`` (and
``SPLITVAULT_<KEY>`` a top-level key); the value is parsed as TOML when it
can be (numbers, booleans, lists), else taken as a string. The services
``load`` (with overrides); the CLI ``read``s its files as they are.
Relative paths are taken relative to the config file's folder.
"""
from __future__ import annotations

import os
import pathlib
import tomllib
from dataclasses import dataclass
from typing import Any

from vault import names
from vaultrpc.tls import TlsFiles

ENV_PREFIX = "SPLITVAULT_"


class ConfigError(ValueError):
    """A configuration cannot be loaded; the message says which key and why."""


def load(path: str | os.PathLike, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The TOML of ``path`` with the SPLITVAULT_ overrides of ``env`` (default os.environ) applied."""
    data = read(path)
    apply_env(data, os.environ if env is None else env)
    return data


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The TOML of ``path``, as written (ConfigError if unreadable or not TOML)."""
    return parse(read_text(path), path)


def read_text(path: str | os.PathLike) -> str:
    """The text of the config file ``path`` (ConfigError if unreadable)."""
    try:
        return pathlib.Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc.strerror}.") from None


def parse(text: str, path: str | os.PathLike) -> dict[str, Any]:
    """The TOML ``text`` of the config file ``path`` (ConfigError if not TOML)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The config file {path} is not valid TOML: {exc}.") from None


def _parse(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def apply_env(data: dict[str, Any], env) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Environment variable {name} overrides a value that is not a table.")
        target[path[-1]] = _parse(value)


def need(data: dict[str, Any], dotted: str, kind: type | tuple[type, ...] = str) -> Any:
    """The value at ``section.key``, which must exist and have type ``kind``."""
    target: Any = data
    for part in dotted.split("."):
        if not isinstance(target, dict) or part not in target:
            raise ConfigError(f"The config is missing {dotted}.")
        target = target[part]
    if not isinstance(target, kind) or (kind is int and isinstance(target, bool)):
        raise ConfigError(f"The config value {dotted} has the wrong type.")
    return target


def get(data: dict[str, Any], dotted: str, default: Any, kind: type | tuple[type, ...] | None = None) -> Any:
    target: Any = data
    for part in dotted.split("."):
        if not isinstance(target, dict) or part not in target:
            return default
        target = target[part]
    expected = kind or type(default)
    if default is not None and not isinstance(target, expected):
        raise ConfigError(f"The config value {dotted} has the wrong type.")
    return target


def text(data: dict[str, Any], dotted: str) -> str:
    """A required, non-empty string value."""
    value = need(data, dotted)
    if not value:
        raise ConfigError(f"The config value {dotted} is empty.")
    return value


def resolve_path(value: str, dotted: str, base: pathlib.Path | None) -> pathlib.Path:
    """A path value (``~`` expanded), relative to ``base`` (the config file's folder) unless absolute."""
    if not value:
        raise ConfigError(f"The config value {dotted} is empty.")
    path = pathlib.Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


def file_path(data: dict[str, Any], dotted: str, base: pathlib.Path | None) -> str:
    """A required path value, resolved as resolve_path does."""
    return str(resolve_path(need(data, dotted), dotted, base))


def tls_files(data: dict[str, Any], base: pathlib.Path | None) -> TlsFiles:
    """The [tls] section every config has: ca, cert and key files."""
    return TlsFiles(file_path(data, "tls.ca", base), file_path(data, "tls.cert", base),
                    file_path(data, "tls.key", base))


@dataclass(frozen=True)
class TableEntry:
    """One [[shareholders]] entry: a node's name, Shamir index and address,
    and the whole entry for the keys a reader adds (audit_public_key...)."""

    name: str
    index: int
    address: str
    entry: dict


def shareholder_table(data: dict[str, Any], *, index_required: bool = True) -> list[TableEntry]:
    """The [[shareholders]] table of the matcher's and the auditor's
    configs: valid names, indices 1 to 255, host:port addresses, no name or
    index twice. Without ``index_required`` an entry's index defaults to its
    position (1-based)."""
    raw_nodes = data.get("shareholders")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError("The config needs at least one [[shareholders]] entry.")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise ConfigError(f"The config entry shareholders[{i}] is not a table.")
        wrapped = {"s": raw}
        name = need(wrapped, "s.name")
        try:
            names.check_name(name)
        except ValueError as exc:
            raise ConfigError(f"The config value shareholders[{i}].name is invalid: {exc}") from None
        index = need(wrapped, "s.index", int) if index_required or "index" in raw else i + 1
        address = need(wrapped, "s.address")
        if not 1 <= index <= names.MAX_SHAREHOLDERS:
            raise ConfigError(f"The config value shareholders[{i}].index must be between 1 and {names.MAX_SHAREHOLDERS}.")
        if ":" not in address:
            raise ConfigError(f"The config value shareholders[{i}].address must be host:port.")
        nodes.append(TableEntry(name, index, address, raw))
    if len({n.name for n in nodes}) != len(nodes):
        raise ConfigError("Two [[shareholders]] entries have the same name.")
    if len({n.index for n in nodes}) != len(nodes):
        raise ConfigError("Two [[shareholders]] entries have the same index.")
    return nodes
