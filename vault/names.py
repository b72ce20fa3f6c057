"""Identifier rules and limits, stated once for every layer (pure).

Every service, config reader and the CLI checks names here; a failure is
``InvalidName`` (a ``ValueError``), which the one status map turns into
INVALID_ARGUMENT. Lengths are counted in UTF-8 bytes, never characters (for
the ASCII kinds the two are the same), so a limit means one thing in SQLite,
in the audit log and on the wire. docs/contracts.md states the same rules.

| kind | rule | where |
|---|---|---|
| identifier (tenant, subject in a record or ticket) | 1-128 bytes of UTF-8, every character printable (``str.isprintable``: no control, format, separator other than space, surrogate or unassigned character) | ``check_id`` |
| gallery group (Identify's narrowing, set at enrolment) | empty (no group), or up to 64 bytes of UTF-8, every character printable | ``check_group`` |
| token (request id, KEK-rotation session id, cluster id) | 1-128 printable ASCII characters | ``check_token`` |
| name (node, party, certificate name, tenant in a config) | 1-63 of ``[A-Za-z0-9._-]``, starting with a letter or digit | ``check_name`` |
| server name (matcher, node) | a name that is also a DNS name: lowercase labels of ``[a-z0-9-]``, no label starting or ending with ``-`` | ``check_server_name`` |
| plan session id (refresh, reshare) | 8-64 of ``[A-Za-z0-9_-]``, starting with a letter or digit | ``is_session_id`` |
| shareholder index | an int from 1 to 255 (a Shamir x-coordinate, never 0) | ``check_index`` |
"""
from __future__ import annotations

import re

from vault.errors import InvalidName

__all__ = [
    "InvalidName", "MAX_DIMENSION", "MAX_ID_BYTES", "MAX_SHAREHOLDERS", "SESSION_ID", "check_id", "check_id_bytes", "check_index",
    "check_group", "check_name", "check_server_name", "check_token", "is_name", "is_session_id",
]

# Longest identifier or token, in UTF-8 bytes.
MAX_ID_BYTES = 128
# Longest gallery group, in UTF-8 bytes.
MAX_GROUP_BYTES = 64
# Most shareholders: x-coordinates 1..255 stay small, which keeps Horner's
# intermediate values < 2**43 (vault.sharing._evaluate).
MAX_SHAREHOLDERS = 255
# Longest template: d * 127**2 <= (P - 1) / 2 keeps inner products of encoded
# vectors exact in the field (vault.codec derives and asserts it).
MAX_DIMENSION = 66_572

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# A server name as a DNS name: lowercase labels, so that case-insensitive
# host-name matching can never make two names one.
_DNS_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$")


def check_id_bytes(value: str, what: str) -> bytes:
    """The UTF-8 of an identifier (tenant or subject), or InvalidName."""
    if not isinstance(value, str) or not value:
        raise InvalidName(f"The {what} must be a non-empty string.")
    # isprintable is False for every control character (category Cc) and for
    # lone surrogates, so the encode below cannot fail.
    if not value.isprintable():
        raise InvalidName(f"The {what} must be printable text without control characters.")
    raw = value.encode("utf-8")
    if len(raw) > MAX_ID_BYTES:
        raise InvalidName(f"The {what} must be at most {MAX_ID_BYTES} bytes of UTF-8.")
    return raw


def check_id(value: str, what: str) -> str:
    """An identifier (tenant or subject): see the table above."""
    check_id_bytes(value, what)
    return value


def check_group(value: str, what: str = "group") -> str:
    """A gallery group: empty (none), or 1-64 bytes of printable UTF-8."""
    if not isinstance(value, str):
        raise InvalidName(f"The {what} must be a string.")
    if value and (not value.isprintable() or len(value.encode("utf-8")) > MAX_GROUP_BYTES):
        raise InvalidName(f"The {what} must be at most {MAX_GROUP_BYTES} bytes of printable text.")
    return value


def check_token(value: str, what: str) -> str:
    """A request id, KEK-rotation session id or cluster id: 1-128 printable ASCII characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_BYTES or not value.isascii() \
            or not value.isprintable():
        raise InvalidName(f"The {what} must be 1 to {MAX_ID_BYTES} printable ASCII characters.")
    return value


def is_name(value) -> bool:
    """Whether value is a node, tenant or party name."""
    return isinstance(value, str) and bool(_NAME.match(value))


def check_name(name: str) -> str:
    """A node, tenant or party name (1-63 of [A-Za-z0-9._-])."""
    if not is_name(name):
        raise InvalidName(
            "A name must be 1 to 63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return name


def check_server_name(name: str) -> str:
    """A matcher's or node's name: a name that is also a lowercase DNS name."""
    check_name(name)
    if not _DNS_NAME.match(name):
        raise InvalidName(
            f"Server name {name!r} cannot be a DNS name: use lowercase letters, digits, '-' and '.' "
            "(no '_', no label starting or ending with '-')."
        )
    return name


def is_session_id(value) -> bool:
    """Whether value is a refresh or reshare plan's session id."""
    return isinstance(value, str) and bool(SESSION_ID.match(value))


def check_index(value, what: str) -> int:
    """A shareholder index: an int from 1 to 255 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHAREHOLDERS:
        raise InvalidName(f"The {what} must be an index from 1 to {MAX_SHAREHOLDERS}.")
    return value
