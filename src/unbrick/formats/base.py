"""Shared vocabulary of the image parsers: sources, limits, findings and format specs.

Parsers are pure: they receive a :class:`Source` (a bounded random-access view over an already
open binary file) and return :class:`Findings`, or raise :class:`~unbrick.errors.ImageError`.
They never open files or run programs. Everything they read goes through :class:`Source`, which
bounds each read, so a hostile length field cannot make a parser allocate or hang.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from unbrick.errors import ImageError, LimitError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Size of one streaming read. Large enough to amortise Python overhead, small enough for RSS.
CHUNK = 1 * MiB
#: How much of a file's start and end detection looks at.
HEAD_SIZE = 64 * KiB
TAIL_SIZE = 64


@dataclass(frozen=True)
class Limits:
    """Bounds that keep hostile input from exhausting memory, disk or time."""

    #: Nesting of containers (a .tar.gz inside a .zip is depth 2).
    max_depth: int = 4
    #: Total bytes produced by decompression for one inspection or conversion.
    max_expanded_bytes: int = 64 * GiB
    #: Expanded/compressed ratio beyond which a stream is a bomb, checked once
    #: ``ratio_grace_bytes`` have been produced (real disk images compress very well).
    max_ratio: float = 20_000.0
    ratio_grace_bytes: int = 256 * MiB
    #: Archive members listed or followed.
    max_members: int = 100_000
    #: Records (lines, chunks, blocks, TLVs, FDT nodes...) a parser reads.
    max_records: int = 50_000_000
    #: Wall-clock bound for one parse, in seconds.
    max_seconds: float = 3600.0


@dataclass
class Context:
    """What a parser may consult besides its source."""

    limits: Limits = field(default_factory=Limits)
    depth: int = 0
    #: A second file that completes this one (the image a bmap file describes).
    companion: Source | None = None
    #: Monotonic time after which the parse stops with a LimitError.
    deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        if not self.deadline:
            self.deadline = time.monotonic() + self.limits.max_seconds

    def nested(self) -> Context:
        """A context one container level deeper; raises LimitError past ``max_depth``."""
        if self.depth + 1 > self.limits.max_depth:
            raise LimitError(
                f"containers nested deeper than {self.limits.max_depth} levels",
                hint="unpack the outer container by hand if you trust it",
            )
        return Context(limits=self.limits, depth=self.depth + 1, deadline=self.deadline)

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitError(f"parsing took longer than {self.limits.max_seconds:g} s")


class Counter:
    """Counts records against ``Limits.max_records`` and checks the deadline now and then."""

    __slots__ = ("ctx", "n", "what")

    def __init__(self, ctx: Context, what: str) -> None:
        self.ctx = ctx
        self.what = what
        self.n = 0

    def tick(self, k: int = 1) -> None:
        self.n += k
        if self.n > self.ctx.limits.max_records:
            raise LimitError(f"more than {self.ctx.limits.max_records} {self.what}")
        if self.n & 0x3FF == 0:
            self.ctx.check_time()


class Source:
    """A bounded, random-access view of ``size`` bytes of a seekable binary file.

    Reads are positional (``read_at``) so that parsers never depend on a shared file position.
    """

    def __init__(
        self, fileobj: BinaryIO, *, offset: int = 0, size: int | None = None, name: str = ""
    ) -> None:
        self._f = fileobj
        self.offset = offset
        if size is None:
            end = fileobj.seek(0, io.SEEK_END)
            size = max(0, end - offset)
        self.size = size
        self.name = name

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "") -> Source:
        return cls(io.BytesIO(data), size=len(data), name=name)

    def sub(self, offset: int, size: int) -> Source:
        """A view of ``size`` bytes at ``offset`` within this source (clipped to its end)."""
        if offset < 0 or size < 0:
            raise ImageError(f"negative range {offset}+{size}")
        offset = min(offset, self.size)
        size = min(size, self.size - offset)
        return Source(self._f, offset=self.offset + offset, size=size, name=self.name)

    def read_upto(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at the end of the source."""
        if offset < 0 or length < 0:
            raise ImageError(f"negative read {offset}+{length}")
        if offset >= self.size or length == 0:
            return b""
        length = min(length, self.size - offset)
        self._f.seek(self.offset + offset)
        return self._f.read(length)

    def readinto_at(self, offset: int, buf: bytearray | memoryview, what: str = "data") -> None:
        """Fill ``buf`` exactly from ``offset`` (no allocation: for hot loops over big files)."""
        length = len(buf)
        if length > self.size or offset < 0 or offset > self.size - length:
            raise ImageError(
                f"{what} truncated: needs bytes {offset}..{offset + length}, file has {self.size}",
                offset=offset,
            )
        view = memoryview(buf)
        self._f.seek(self.offset + offset)
        got = 0
        while got < length:
            n = self._f.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise ImageError(f"{what} truncated at offset {offset + got}", offset=offset)
            got += n

    def prefetch(
        self, offset: int, length: int, chunk: int = 4 * MiB, what: str = "data"
    ) -> Iterator[bytearray]:
        """Stream ``length`` bytes from ``offset`` while a helper thread reads ahead.

        Two buffers alternate: each yielded buffer is valid only until the next one is asked
        for (consume it, or copy it, before advancing). Reading overlaps the caller's work,
        which matters on big images where copying from the page cache costs as much as the
        work itself. The source must not be read by anyone else meanwhile.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(
                f"range {offset}..{offset + length} is outside the file (size {self.size})",
                offset=offset,
            )
        if length <= chunk:
            if length:
                yield bytearray(self.read_at(offset, length, what))
            return
        free: queue.Queue[bytearray | None] = queue.Queue()
        filled: queue.Queue[tuple[bytearray, BaseException | None] | None] = queue.Queue()
        for _ in range(2):
            free.put(bytearray(chunk))
        end = offset + length

        def reader() -> None:
            pos = offset
            while pos < end:
                buf = free.get()
                if buf is None:
                    return
                n = min(chunk, end - pos)
                if n < chunk:  # the last, short piece gets a buffer of its own size
                    buf = bytearray(n)
                try:
                    self.readinto_at(pos, buf, what)
                except BaseException as e:  # handed to the consumer, re-raised there
                    filled.put((buf, e))
                    return
                filled.put((buf, None))
                pos += n
            filled.put(None)

        thread = threading.Thread(target=reader, name="unbrick-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = filled.get()
                if item is None:
                    return
                buf, err = item
                if err is not None:
                    raise err
                yield buf
                if len(buf) == chunk:
                    free.put(buf)
        finally:
            free.put(None)
            free.put(None)
            thread.join()

    def read_at(self, offset: int, length: int, what: str = "data") -> bytes:
        """Exactly ``length`` bytes at ``offset``, or ImageError naming ``what`` as truncated."""
        if length > self.size or offset > self.size - length:
            raise ImageError(
                f"{what} truncated: needs bytes {offset}..{offset + length}, file has {self.size}",
                offset=offset,
            )
        data = self.read_upto(offset, length)
        if len(data) != length:
            raise ImageError(f"{what} truncated at offset {offset + len(data)}", offset=offset)
        return data

    def chunks(
        self, offset: int = 0, length: int | None = None, chunk: int = CHUNK
    ) -> Iterator[bytes]:
        """Stream ``length`` bytes from ``offset`` in pieces of at most ``chunk`` bytes."""
        if length is None:
            length = self.size - offset
        end = offset + length
        if offset < 0 or end > self.size:
            raise ImageError(
                f"range {offset}..{end} is outside the file (size {self.size})", offset=offset
            )
        pos = offset
        while pos < end:
            data = self.read_upto(pos, min(chunk, end - pos))
            if not data:
                raise ImageError(f"file ended early at offset {pos}", offset=pos)
            pos += len(data)
            yield data

    def head(self, n: int = HEAD_SIZE) -> bytes:
        return self.read_upto(0, n)

    def tail(self, n: int = TAIL_SIZE) -> bytes:
        start = max(0, self.size - n)
        return self.read_upto(start, self.size - start)


class Stream(Protocol):
    """A forward-only binary stream (a decompressor, an archive member)."""

    def read(self, n: int = -1, /) -> bytes: ...


@dataclass
class Findings:
    """What a parser found: validity, problems and format-specific details.

    ``details`` holds only JSON-serialisable values (str, int, float, bool, None, lists, dicts).
    """

    format: str
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    #: Warnings do not make an image invalid (e.g. "all bytes are 0xFF").
    warnings: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        self.problems.append(text)


@dataclass(frozen=True)
class Sniff:
    """What detection sees: the first bytes, the last bytes and the total size."""

    head: bytes
    tail: bytes
    size: int


@dataclass(frozen=True)
class FormatSpec:
    """One image format: how to recognise it cheaply and how to inspect it fully."""

    name: str
    #: Cheap test on the head/tail; must not raise.
    sniff: Callable[[Sniff], bool]
    #: Full parse of a seekable source.
    inspect: Callable[[Source, Context], Findings]
    #: Lower runs first; formats with strong magics at offset 0 come first.
    priority: int = 50
    #: One-line description for docs and ``unbrick image formats``.
    summary: str = ""
