"""Message digests computed in one streaming pass.

Several algorithms are fed from the same 1 MiB buffer, so a multi-GiB image is read once however
many digests a check needs. The buffer is reused (``readinto`` into a ``memoryview``) so the loop
allocates nothing per chunk; hashlib releases the GIL for large updates and uses OpenSSL's
implementations, which keeps SHA-256 at the speed of ``sha256sum``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from unbrick.errors import SourceError, UsageError

CHUNK_BYTES = 1 << 20
"""Read size of the hashing loop."""


class Hasher(Protocol):
    """The part of a hashlib object this module uses."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def _blake2b() -> Hasher:
    return hashlib.blake2b()


_FACTORIES: dict[str, Callable[[], Hasher]] = {
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "sha384": hashlib.sha384,
    "sha224": hashlib.sha224,
    "blake2b": _blake2b,  # BLAKE2b-512, as b2sum and minisign use it
}

ALGORITHMS: tuple[str, ...] = tuple(_FACTORIES)
"""Every algorithm name :func:`hash_stream` accepts."""

DIGEST_HEX_LENGTH: dict[str, int] = {
    "sha256": 64,
    "sha512": 128,
    "sha1": 40,
    "md5": 32,
    "sha384": 96,
    "sha224": 56,
    "blake2b": 128,
}

WEAK = frozenset({"md5", "sha1"})
"""Algorithms with practical collision attacks: a match proves little against an attacker."""


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hash object for one of :data:`ALGORITHMS`; UsageError for any other name."""
    factory = _FACTORIES.get(algorithm)
    if factory is None:
        raise UsageError(
            f"unknown digest algorithm '{algorithm}'",
            hint=f"use one of: {', '.join(ALGORITHMS)}",
        )
    return factory()


def hash_stream(f: BinaryIO, algorithms: Sequence[str]) -> dict[str, str]:
    """Read ``f`` to its end once and return ``{algorithm: lowercase hex digest}``.

    Raises UsageError for an unknown algorithm name; OSError from ``f`` propagates (callers that
    opened a file translate it, see :func:`hash_file`).
    """
    names = list(dict.fromkeys(algorithms))
    hashers = [new_hasher(name) for name in names]
    if not hashers:
        return {}
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    readinto: Callable[[bytearray], int | None] | None = getattr(f, "readinto", None)
    if readinto is None:  # a BinaryIO without readinto: copy once per chunk instead
        readinto = _reader(f)
    if len(hashers) == 1:
        update = hashers[0].update
        while n := readinto(buf):
            update(view[:n] if n < CHUNK_BYTES else view)
    else:
        updates = [h.update for h in hashers]
        while n := readinto(buf):
            chunk = view[:n] if n < CHUNK_BYTES else view
            for update in updates:
                update(chunk)
    return {name: h.hexdigest() for name, h in zip(names, hashers, strict=True)}


def _reader(f: BinaryIO) -> Callable[[bytearray], int]:
    def readinto(buf: bytearray) -> int:
        data = f.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    return readinto


def hash_file(path: Path, algorithms: Sequence[str]) -> dict[str, str]:
    """:func:`hash_stream` over a file; an unreadable file raises SourceError."""
    try:
        with open(path, "rb") as f:
            return hash_stream(f, algorithms)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
