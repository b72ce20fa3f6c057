"""One way to replace a file on disk: atomically and durably.

A reader sees the old file or the whole new one, never half of one, and
after ``write_atomic`` returns the new file survives a power cut: the data
is fsynced before the rename, and the folder after it (the rename itself is
a change of the folder). Every file the services and the CLI write whole
(ready files, KEK files, cluster files, session and witness state) goes
through here.
"""
from __future__ import annotations

import os
import pathlib
import secrets


def write_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``; the file has ``mode`` from its first
    byte (0o600 for secrets), whatever the umask allows."""
    target = pathlib.Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, an unlink) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
