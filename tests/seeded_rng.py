"""A seeded, deterministic stand-in for ``vault.rng.RANDOM_BYTES`` (tests only).

The byte stream is SHAKE-256 of the seed in 64 KiB blocks,
block_i = SHAKE-256(b"splitvault/test-rng/v1\\x00" || seed || i as 8 bytes BE),
so a given seed always yields the same bytes regardless of how the caller
slices its requests. Never use this outside tests: it is predictable.
"""

from __future__ import annotations

import hashlib

_DOMAIN = b"splitvault/test-rng/v1\x00"
_BLOCK = 1 << 16


class SeededBytes:
    """Callable like os.urandom(n), returning the next n bytes of the stream."""

    def __init__(self, seed: bytes):
        self._seed = bytes(seed)
        self._block = 0
        self._buffer = bytearray()

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            h = hashlib.shake_256(_DOMAIN + self._seed + self._block.to_bytes(8, "big"))
            self._buffer += h.digest(_BLOCK)
            self._block += 1
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out
