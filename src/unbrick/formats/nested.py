"""Forward-only streams and the inspection of what one holds.

A compressed file or an archive member is not seekable: it can only be read once, front to
back. :func:`inspect_stream` reads such a stream exactly once: it detects the format from the
first bytes, hashes everything, and when the content is itself a compressed stream or a tar/cpio
archive it descends into it (one :meth:`Context.nested` level per container). Other formats are
reported by detection only, since their parsers need random access.

The small stream classes here (:class:`SourceStream`, :class:`Tap`, :class:`Prefixed`,
:class:`Window`, :class:`Reader`) are shared by the compression and archive parsers.
"""

from __future__ import annotations

import hashlib
from typing import Any

from unbrick.errors import ImageError, LimitError
from unbrick.formats.base import CHUNK, HEAD_SIZE, Context, Findings, Limits, Source, Stream

#: Formats :func:`inspect_stream` descends into.
STREAM_COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2")
STREAM_ARCHIVES = ("tar", "cpio")
CONTAINERS = (*STREAM_COMPRESSIONS, *STREAM_ARCHIVES)


class ExpansionBudget:
    """Bytes produced by every decompressor of one inspection, against ``max_expanded_bytes``.

    One budget is shared by the outer stream, the members of an archive and the streams nested
    in them, so that many small bombs cannot add up to one large one.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limits: Limits) -> None:
        self.limit = limits.max_expanded_bytes
        self.used = 0

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)


def read_full(stream: Stream, n: int) -> bytes:
    """Up to ``n`` bytes from ``stream``; fewer only at its end."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class SourceStream:
    """Forward-only reading of ``length`` bytes of a :class:`Source` from ``offset``."""

    def __init__(self, src: Source, offset: int = 0, length: int | None = None) -> None:
        if offset < 0 or offset > src.size:
            raise ImageError(f"stream start {offset} is outside the file (size {src.size})")
        self._src = src
        self._pos = offset
        end = src.size if length is None else offset + length
        if length is not None and (length < 0 or end > src.size):
            raise ImageError(
                f"range {offset}..{end} is outside the file (size {src.size})", offset=offset
            )
        self._end = end

    def read(self, n: int = -1, /) -> bytes:
        left = self._end - self._pos
        if n < 0 or n > left:
            n = left
        data = self._src.read_upto(self._pos, n)
        self._pos += len(data)
        return data


class Tap:
    """Passes reads through, counting and hashing them, and remembers its source's error.

    ``failed`` is the ImageError the wrapped stream raised, if any. Code that reads through a
    tap uses it to tell "the stream I was given broke" (its caller's problem) from "what I
    parsed out of it is wrong" (mine).
    """

    def __init__(self, stream: Stream, *, hashed: bool = True) -> None:
        self._s = stream
        self._h = hashlib.sha256() if hashed else None
        self.size = 0
        self.failed: ImageError | None = None

    def read(self, n: int = -1, /) -> bytes:
        try:
            data = self._s.read(n)
        except ImageError as e:
            self.failed = e
            raise
        self.size += len(data)
        if self._h is not None:
            self._h.update(data)
        return data

    def hexdigest(self) -> str:
        return self._h.hexdigest() if self._h is not None else ""


class Prefixed:
    """Bytes already read (``head``) followed by the rest of ``stream``."""

    def __init__(self, head: bytes, stream: Stream) -> None:
        self._head = head
        self._pos = 0
        self._s = stream

    def read(self, n: int = -1, /) -> bytes:
        if self._pos < len(self._head):
            if n < 0:
                rest = self._head[self._pos :] + self._s.read(-1)
                self._pos = len(self._head)
                return rest
            data = self._head[self._pos : self._pos + n]
            self._pos += len(data)
            return data
        return self._s.read(n)


class Reader:
    """A forward-only stream with an offset, exact reads, skips and push-back (for parsers)."""

    def __init__(self, stream: Stream) -> None:
        self._s = stream
        self._back = b""
        self.offset = 0

    def read(self, n: int = -1, /) -> bytes:
        if self._back:
            if n < 0 or n >= len(self._back):
                data, self._back = self._back, b""
            else:
                data, self._back = self._back[:n], self._back[n:]
        else:
            data = self._s.read(n)
        self.offset += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Push ``data`` (the bytes just read) back in front of the stream."""
        self._back = data + self._back
        self.offset -= len(data)

    def read_upto(self, n: int) -> bytes:
        return read_full(self, n)

    def peek(self, n: int) -> bytes:
        data = read_full(self, n)
        self.unread(data)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        start = self.offset
        data = read_full(self, n)
        if len(data) != n:
            raise ImageError(
                f"{what} truncated at offset {start + len(data)} (needs {n} bytes from {start})",
                offset=start,
            )
        return data

    def skip(self, n: int, what: str) -> None:
        start = self.offset
        left = n
        while left > 0:
            data = self.read(min(left, CHUNK))
            if not data:
                raise ImageError(
                    f"{what} truncated at offset {self.offset} (needs {n} bytes from {start})",
                    offset=start,
                )
            left -= len(data)


class Window:
    """Exactly ``length`` bytes of ``stream``; ImageError naming ``what`` if it ends early."""

    def __init__(self, stream: Stream, length: int, what: str) -> None:
        self._s = stream
        self.length = length
        self.left = length
        self._what = what

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            return read_full(self, self.left)
        if self.left <= 0:
            return b""
        data = self._s.read(min(n, self.left))
        if not data:
            raise ImageError(
                f"{self._what} truncated: {self.left} of its {self.length} bytes are missing"
            )
        self.left -= len(data)
        return data


def drain(stream: Stream, ctx: Context) -> int:
    """Read ``stream`` to its end; return how many bytes that was."""
    total = 0
    while True:
        ctx.check_time()
        data = stream.read(CHUNK)
        if not data:
            return total
        total += len(data)


def as_dict(f: Findings, size: int, sha256: str) -> dict[str, Any]:
    """The JSON shape of a nested inspection."""
    return {
        "format": f.format,
        "size": size,
        "sha256": sha256,
        "details": f.details,
        "problems": f.problems,
        "warnings": f.warnings,
    }


def lift(f: Findings, inner: dict[str, Any], prefix: str) -> None:
    """Copy the problems and warnings of a nested inspection into ``f`` under ``prefix``."""
    for p in inner.get("problems", []):
        f.problem(f"{prefix}: {p}")
    for w in inner.get("warnings", []):
        f.warnings.append(f"{prefix}: {w}")


def inspect_stream(
    stream: Stream,
    ctx: Context,
    size_hint: int | None = None,
    *,
    budget: ExpansionBudget | None = None,
) -> dict[str, Any]:
    """Read ``stream`` once: detect, hash and, for containers, descend.

    Returns ``{"format", "size", "sha256", "details", "problems", "warnings"}``. A problem in
    the content (a corrupt nested stream, a bad archive member) is reported in ``problems``; an
    ImageError raised by ``stream`` itself propagates, since it belongs to whoever made the
    stream. LimitError always propagates.
    """
    # Imported here: detect imports the registry, which imports the modules that import us.
    from unbrick.formats import archive, compress, detect  # noqa: PLC0415

    if budget is None:
        budget = ExpansionBudget(ctx.limits)
    tap = Tap(stream)
    head = read_full(tap, HEAD_SIZE)
    fmt = detect.detect_head(head, size_hint)
    f = Findings(format=fmt)
    body = Prefixed(head, tap)
    try:
        if fmt in STREAM_COMPRESSIONS:
            child = ctx.nested()
            dec = compress.open_decompressor(fmt, body, child, budget=budget)
            compress.inspect_decompressor(dec, child, f, budget=budget)
        elif fmt in STREAM_ARCHIVES:
            child = ctx.nested()
            archive.scan_stream(fmt, body, child, f, budget=budget)
    except LimitError:
        raise
    except ImageError as e:
        if e is tap.failed:
            raise
        f.problem(e.message)
    drain(tap, ctx)
    return as_dict(f, tap.size, tap.hexdigest())
