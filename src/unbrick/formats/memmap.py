"""Address-space helpers shared by the microcontroller image formats (ihex, srec, uf2, elf).

These formats describe memory as pieces of data at addresses. This module holds what they have
in common: a merged set of address ranges, a second-pass check that bytes written more than once
agree, a bounded line reader for the text formats, and the writer that lays the pieces out as one
raw image whose gaps are filled.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats.base import CHUNK, Context, Counter, Findings, MiB, Source

#: Largest address span ``to_raw`` writes unless told otherwise.
DEFAULT_MAX_SPAN = 256 * MiB
#: Separate (non-touching) address ranges one image may have; beyond this a file is hostile.
MAX_RANGES = 100_000
#: Bytes written more than once whose values are compared in a second pass.
MAX_OVERLAP_BYTES = 16 * MiB
#: Problems kept in a report before the rest are only counted.
MAX_PROBLEMS = 100
#: Entries kept in long detail lists (missing blocks, checksum errors...).
MAX_LIST = 1000
ADDRESS_SPACE = 1 << 32


@dataclass(frozen=True)
class RawLayout:
    """Where a raw image produced by ``to_raw`` sits in the device's address space.

    Byte 0 of the output is ``base_address``; ``segments`` are the ``[start, end)`` address
    ranges that hold data (everything else in ``[base_address, base_address + size)`` is fill).
    """

    base_address: int
    size: int
    segments: list[tuple[int, int]]


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


class RangeSet:
    """Sorted, disjoint half-open ranges; touching ranges are merged as they are added."""

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add ``[start, end)``; return the parts of it that were already covered."""
        if end <= start:
            return []
        starts, ends = self._starts, self._ends
        # Fast paths: data usually arrives in ascending order.
        if not starts or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            self._check_count()
            return []
        if start == ends[-1]:
            ends[-1] = end
            return []
        lo = bisect_left(ends, start)  # first range ending at or after start
        hi = bisect_right(starts, end)  # first range starting after end
        covered: list[tuple[int, int]] = []
        for i in range(lo, hi):
            a, b = max(starts[i], start), min(ends[i], end)
            if a < b:
                covered.append((a, b))
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]
        self._check_count()
        return covered

    def _check_count(self) -> None:
        if len(self._starts) > MAX_RANGES:
            raise LimitError(
                f"more than {MAX_RANGES} separate address ranges",
                hint="the file scatters data over the address space; it is damaged or hostile",
            )

    def intersect(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that lie inside this set."""
        lo = bisect_right(self._ends, start)
        out: list[tuple[int, int]] = []
        for i in range(lo, len(self._starts)):
            s = self._starts[i]
            if s >= end:
                break
            a, b = max(s, start), min(self._ends[i], end)
            if a < b:
                out.append((a, b))
        return out

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def lowest(self) -> int:
        return self._starts[0]

    def highest(self) -> int:
        return self._ends[-1]

    def gaps(self) -> list[tuple[int, int]]:
        """The holes between consecutive ranges."""
        return list(zip(self._ends[:-1], self._starts[1:], strict=True))


def as_pairs(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """Ranges as JSON-friendly ``[start, end]`` lists."""
    return [[s, e] for s, e in ranges]


class Report:
    """Problems and warnings of one parse, capped so hostile input cannot grow them forever."""

    def __init__(self, findings: Findings) -> None:
        self.findings = findings
        self.dropped = 0
        self.dropped_warnings = 0

    def problem(self, text: str) -> None:
        if len(self.findings.problems) < MAX_PROBLEMS:
            self.findings.problem(text)
        else:
            self.dropped += 1

    def warning(self, text: str) -> None:
        if len(self.findings.warnings) < MAX_PROBLEMS:
            self.findings.warnings.append(text)
        else:
            self.dropped_warnings += 1

    def close(self) -> None:
        if self.dropped:
            self.findings.problem(f"... and {self.dropped} more problems")
        if self.dropped_warnings:
            self.findings.warnings.append(f"... and {self.dropped_warnings} more warnings")


class Coverage:
    """First pass over the data pieces of an image: merged ranges and twice-written bytes."""

    def __init__(self) -> None:
        self.ranges = RangeSet()
        self.overlaps = RangeSet()
        self.pieces = 0

    def add(self, address: int, length: int) -> None:
        self.pieces += 1
        for a, b in self.ranges.add(address, address + length):
            self.overlaps.add(a, b)

    def overlap_bytes(self) -> int:
        return self.overlaps.total()


class OverlapChecker:
    """Second pass: remember the first value of every byte written more than once and report
    later writes that disagree.

    Memory is bounded by the size of the overlapping ranges (at most ``MAX_OVERLAP_BYTES``).
    """

    def __init__(self, overlaps: RangeSet) -> None:
        self._set = overlaps
        self._vals: dict[int, bytearray] = {}
        self._seen: dict[int, bytearray] = {}
        for s, e in overlaps.ranges():
            self._vals[s] = bytearray(e - s)
            self._seen[s] = bytearray(e - s)
        self._starts = [s for s, _ in overlaps.ranges()]

    def feed(self, address: int, data: bytes) -> int | None:
        """Record ``data`` at ``address``; return the first address whose value disagrees with
        an earlier write, or None."""
        bad: int | None = None
        for a, b in self._set.intersect(address, address + len(data)):
            i = bisect_right(self._starts, a) - 1
            base = self._starts[i]
            vals, seen = self._vals[base], self._seen[base]
            lo, hi = a - base, b - base
            piece = data[a - address : b - address]
            mask = seen[lo:hi]
            if mask.count(0) == len(mask):
                vals[lo:hi] = piece
                seen[lo:hi] = b"\x01" * (hi - lo)
                continue
            if mask.count(1) == len(mask):
                if vals[lo:hi] != piece and bad is None:
                    bad = a + _first_difference(vals[lo:hi], piece)
                continue
            for k in range(hi - lo):
                if seen[lo + k]:
                    if vals[lo + k] != piece[k] and bad is None:
                        bad = a + k
                else:
                    vals[lo + k] = piece[k]
                    seen[lo + k] = 1
        return bad


def _first_difference(x: bytes | bytearray, y: bytes | bytearray) -> int:
    for i, (p, q) in enumerate(zip(x, y, strict=False)):
        if p != q:
            return i
    return min(len(x), len(y))


def check_span(ranges: RangeSet, max_span: int) -> tuple[int, int]:
    """Lowest address and span of the data; LimitError when the span is above ``max_span``."""
    if not len(ranges):
        raise ImageError("the image holds no data: nothing to convert")
    lo, hi = ranges.lowest(), ranges.highest()
    span = hi - lo
    if span > max_span:
        raise LimitError(
            f"the data spans {human_size(span)} of address space (0x{lo:x}..0x{hi:x}) for "
            f"{human_size(ranges.total())} of data, more than max_span {human_size(max_span)}",
            hint="pass a larger max_span (--max-span) if a raw file this large is really wanted",
        )
    return lo, span


class RawWriter:
    """Lays data pieces out in ``out`` relative to ``base``; fills the gaps at the end."""

    def __init__(self, out: BinaryIO, base: int, span: int, fill: int) -> None:
        if not 0 <= fill <= 0xFF:
            raise UsageError(f"fill must be a byte value (0..255), not {fill}")
        self.out = out
        self.origin = out.tell()
        self.base = base
        self.span = span
        self.fill = fill

    def write(self, address: int, data: bytes) -> None:
        off = address - self.base
        if off < 0 or off + len(data) > self.span:
            raise ImageError(f"data at 0x{address:x} lies outside the planned layout")
        self.out.seek(self.origin + off)
        self.out.write(data)

    def finish(self, ranges: RangeSet) -> RawLayout:
        block = bytes([self.fill]) * min(CHUNK, max(1, self.span))
        for gs, ge in ranges.gaps():
            self.out.seek(self.origin + gs - self.base)
            left = ge - gs
            while left:
                n = min(left, len(block))
                self.out.write(block[:n] if n < len(block) else block)
                left -= n
        self.out.seek(self.origin + self.span)
        return RawLayout(base_address=self.base, size=self.span, segments=ranges.ranges())


def check_overlaps(
    pieces: Iterable[tuple[int, int, bytes]], overlaps: RangeSet, report: Report, unit: str
) -> None:
    """Second pass over ``(where, address, data)`` pieces: report each piece that writes a value
    different from an earlier piece at the same address, naming it as ``f"{unit} {where}"``."""
    total = overlaps.total()
    if total > MAX_OVERLAP_BYTES:
        report.problem(
            f"{human_size(total)} of data is written more than once; too much to compare the "
            "values, so the image is ambiguous"
        )
        return
    checker = OverlapChecker(overlaps)
    conflicts = 0
    for where, address, data in pieces:
        bad = checker.feed(address, data)
        if bad is not None:
            conflicts += 1
            report.problem(
                f"{unit} {where}: data at 0x{bad:x} differs from data written earlier at the "
                "same address"
            )
    if not conflicts:
        report.warning(f"{total} bytes are written more than once (with the same values)")


def write_raw(
    pieces: Iterable[tuple[int, bytes]],
    ranges: RangeSet,
    out: BinaryIO,
    *,
    fill: int,
    max_span: int,
) -> RawLayout:
    """Write ``(address, data)`` pieces covering ``ranges`` to ``out`` as one raw image that
    starts at the lowest address, gaps filled with ``fill``."""
    base, span = check_span(ranges, max_span)
    writer = RawWriter(out, base, span, fill)
    for address, data in pieces:
        writer.write(address, data)
    return writer.finish(ranges)


def iter_lines(
    src: Source, ctx: Context, *, max_line: int, what: str = "lines"
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for each line of a text file, 1-based, without the line
    ending and trailing white space. Reads in chunks; a line longer than ``max_line`` bytes is
    an ImageError (a record file never has one, and this bounds memory)."""
    counter = Counter(ctx, what)
    carry = b""
    lineno = 0
    pos = 0  # file offset of the start of ``carry``
    for chunk in src.chunks():
        data = carry + chunk if carry else chunk
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if nl - start > max_line:
                raise ImageError(
                    f"line {lineno + 1} is longer than {max_line} characters",
                    offset=pos + start,
                )
            lineno += 1
            counter.tick()
            yield lineno, data[start:nl].rstrip(b"\r \t")
            start = nl + 1
        carry = data[start:]
        pos += start
        if len(carry) > max_line:
            raise ImageError(f"line {lineno + 1} is longer than {max_line} characters", offset=pos)
    if carry:
        lineno += 1
        counter.tick()
        yield lineno, carry.rstrip(b"\r \t\x1a")
