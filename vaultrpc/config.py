"""TOML configuration with environment overrides.

``SPLITVAULT_<SECTION>__<KEY>=value`` overrides ``[section] key`` (and
``SPLITVAULT_<KEY>`` a top-level key); the value is parsed as TOML when it
can be (numbers, booleans, lists), else taken as a string.
"""
from __future__ import annotations

import os
import pathlib
import tomllib
from typing import Any

ENV_PREFIX = "SPLITVAULT_"


class ConfigError(ValueError):
    """A configuration cannot be loaded; the message says which key and why."""


def load(path: str | os.PathLike, env: dict[str, str] | None = None) -> dict[str, Any]:
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc.strerror}.") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The config file {path} is not valid TOML: {exc}.") from None
    apply_env(data, os.environ if env is None else env)
    return data


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
