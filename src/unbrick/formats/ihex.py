"""Intel HEX: text records of data at 16-bit offsets, with segment (type 02) or linear (type 04)
extended addresses and a start address (type 03 or 05).

Addressing follows srecord (checked against srec_info): with a segment base, data offsets wrap
within the 64 KiB segment (but segment + offset is not wrapped at 1 MiB as the 8086 would); with
a linear base, addresses wrap modulo 4 GiB as the specification says.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from typing import Any, BinaryIO

from unbrick.errors import ImageError, UsageError
from unbrick.formats.base import Context, Findings, FormatSpec, Sniff, Source
from unbrick.formats.memmap import (
    ADDRESS_SPACE,
    DEFAULT_MAX_SPAN,
    MAX_LIST,
    Coverage,
    RawLayout,
    Report,
    as_pairs,
    check_overlaps,
    iter_lines,
    write_raw,
)

NAME = "ihex"
#: Longest possible record is 1 + 2 * (5 + 255) = 521 characters; allow some trailing space.
MAX_LINE = 600

_DATA, _EOF, _SEGMENT, _START_SEGMENT, _LINEAR, _START_LINEAR = range(6)
_FIXED_COUNT = {_EOF: 0, _SEGMENT: 2, _START_SEGMENT: 4, _LINEAR: 2, _START_LINEAR: 4}


def _parse_record(line: bytes) -> bytes | str:
    """The bytes of a ``:``-record, or a message saying why the line is not one."""
    if line[:1] != b":":
        return "not an Intel HEX record (does not start with ':')"
    try:
        rec = binascii.a2b_hex(line[1:])
    except (binascii.Error, ValueError):
        return "record is not made of hexadecimal digit pairs"
    if len(rec) < 5:
        return f"record is too short ({len(rec)} bytes)"
    if len(rec) != rec[0] + 5:
        return f"byte count says {rec[0]} data bytes but the record holds {len(rec) - 5}"
    return rec


class _Scan:
    """One pass over the records. With a report, problems are recorded; without, the pass only
    replays the data pieces (for the overlap check and the conversion)."""

    def __init__(self, src: Source, ctx: Context, report: Report | None) -> None:
        self.src = src
        self.ctx = ctx
        self.report = report
        self.record_count = 0
        self.data_records = 0
        self.eof_line = 0
        self.entry: int | None = None
        self.entry_line = 0
        self.start_segment: tuple[int, int] | None = None
        self.address_modes: set[str] = set()
        self.checksum_errors: list[dict[str, int]] = []
        self.checksum_error_count = 0
        self.first_error = ""

    def _problem(self, text: str) -> None:
        if self.report is not None:
            self.report.problem(text)
            if not self.first_error:
                self.first_error = text

    def _set_entry(self, lineno: int, value: int) -> None:
        if self.entry is not None and self.entry != value:
            self._problem(
                f"line {lineno}: start address 0x{value:x} differs from 0x{self.entry:x} "
                f"given on line {self.entry_line}"
            )
            return
        self.entry = value
        self.entry_line = lineno

    def pieces(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(line, address, data)`` for each data record, split where it wraps."""
        base = 0
        segment_mode = False
        for lineno, line in iter_lines(self.src, self.ctx, max_line=MAX_LINE, what="lines"):
            if not line:
                continue
            if self.eof_line:
                self._problem(
                    f"line {lineno}: content after the end-of-file record (line "
                    f"{self.eof_line}) is ignored"
                )
                break
            rec = _parse_record(line)
            if isinstance(rec, str):
                self._problem(f"line {lineno}: {rec}")
                continue
            self.record_count += 1
            if sum(rec) & 0xFF:
                self._checksum_error(lineno, (-sum(rec[:-1])) & 0xFF, rec[-1])
            count, rtype = rec[0], rec[3]
            offset = (rec[1] << 8) | rec[2]
            data = rec[4:-1]
            if rtype == _DATA:
                self.data_records += 1
                if not count:
                    continue
                if segment_mode:
                    first = min(count, 0x10000 - offset)
                    yield lineno, base + offset, data[:first]
                    if first < count:
                        yield lineno, base, data[first:]
                else:
                    address = base + offset
                    first = min(count, ADDRESS_SPACE - address)
                    yield lineno, address, data[:first]
                    if first < count:
                        yield lineno, 0, data[first:]
                continue
            if rtype not in _FIXED_COUNT:
                self._problem(f"line {lineno}: unknown record type 0x{rtype:02x}")
                continue
            if count != _FIXED_COUNT[rtype]:
                self._problem(
                    f"line {lineno}: a type {rtype:02d} record holds {_FIXED_COUNT[rtype]} "
                    f"data bytes, not {count}"
                )
                continue
            if rtype == _EOF:
                self.eof_line = lineno
            elif rtype == _SEGMENT:
                base = int.from_bytes(data, "big") << 4
                segment_mode = True
                self.address_modes.add("segment")
            elif rtype == _LINEAR:
                base = int.from_bytes(data, "big") << 16
                segment_mode = False
                self.address_modes.add("linear")
            elif rtype == _START_SEGMENT:
                cs = int.from_bytes(data[:2], "big")
                ip = int.from_bytes(data[2:], "big")
                self.start_segment = (cs, ip)
                self._set_entry(lineno, (cs << 4) + ip)
            else:
                self._set_entry(lineno, int.from_bytes(data, "big"))

    def _checksum_error(self, lineno: int, expected: int, found: int) -> None:
        if self.report is None:
            return
        self.checksum_error_count += 1
        if len(self.checksum_errors) < MAX_LIST:
            self.checksum_errors.append({"line": lineno, "expected": expected, "found": found})
        self._problem(f"line {lineno}: checksum is 0x{found:02X}, expected 0x{expected:02X}")


def _analyse(src: Source, ctx: Context) -> tuple[Findings, Coverage]:
    f = Findings(format=NAME)
    report = Report(f)
    scan = _Scan(src, ctx, report)
    cov = Coverage()
    for _, address, data in scan.pieces():
        cov.add(address, len(data))
    if not scan.record_count:
        detail = f" ({scan.first_error})" if scan.first_error else ""
        raise ImageError(f"no Intel HEX records found{detail}", format=NAME)
    if not scan.eof_line:
        report.problem("no end-of-file record (type 01): the file may be truncated")
    if len(cov.overlaps):
        check_overlaps(_Scan(src, ctx, None).pieces(), cov.overlaps, report, "line")
    d: dict[str, Any] = f.details
    d["segments"] = as_pairs(cov.ranges.ranges())
    d["entry_point"] = scan.entry
    if scan.start_segment is not None:
        d["start_segment"] = {"cs": scan.start_segment[0], "ip": scan.start_segment[1]}
    d["data_bytes"] = cov.ranges.total()
    d["record_count"] = scan.record_count
    d["data_record_count"] = scan.data_records
    d["address_modes"] = sorted(scan.address_modes)
    d["checksum_errors"] = scan.checksum_errors
    d["checksum_error_count"] = scan.checksum_error_count
    if not len(cov.ranges):
        report.warning("the file holds no data")
    report.close()
    return f, cov


def inspect(src: Source, ctx: Context) -> Findings:
    return _analyse(src, ctx)[0]


def iter_data(src: Source, ctx: Context) -> Iterator[tuple[int, bytes]]:
    """``(address, data)`` of every data record in file order, after checking the whole file
    (ImageError when it is invalid)."""
    f, _ = _analyse(src, ctx)
    if f.problems:
        raise ImageError(f"invalid Intel HEX file: {f.problems[0]}", format=NAME)
    yield from _pieces(src, ctx)


def _pieces(src: Source, ctx: Context) -> Iterator[tuple[int, bytes]]:
    for _, address, data in _Scan(src, ctx, None).pieces():
        yield address, data


def to_raw(
    src: Source,
    out: BinaryIO,
    ctx: Context,
    *,
    fill: int = 0xFF,
    max_span: int = DEFAULT_MAX_SPAN,
) -> RawLayout:
    """Write the data of an Intel HEX file to ``out`` as one raw image starting at its lowest
    address, gaps filled with ``fill``. Refuses invalid files (ImageError) and images spanning
    more than ``max_span`` bytes of address space (LimitError)."""
    f, cov = _analyse(src, ctx)
    if f.problems:
        raise ImageError(f"cannot convert an invalid Intel HEX file: {f.problems[0]}", format=NAME)
    return write_raw(_pieces(src, ctx), cov.ranges, out, fill=fill, max_span=max_span)


def _record(rtype: int, offset: int, data: bytes) -> bytes:
    rec = bytes((len(data), offset >> 8, offset & 0xFF, rtype)) + data
    return b":" + binascii.b2a_hex(rec + bytes(((-sum(rec)) & 0xFF,))).upper() + b"\n"


class IhexWriter:
    """Streams data pieces into Intel HEX records (type 04 linear addressing when needed)."""

    def __init__(self, out: BinaryIO, *, record_size: int = 16) -> None:
        if not 1 <= record_size <= 255:
            raise UsageError(f"record_size must be 1..255, not {record_size}")
        self.out = out
        self.record_size = record_size
        self.upper = 0
        self.records = 0

    def data(self, address: int, data: bytes) -> None:
        if address < 0 or address + len(data) > ADDRESS_SPACE:
            raise UsageError(
                f"data at 0x{address:x}+{len(data)} does not fit the 32-bit address space"
            )
        lines: list[bytes] = []
        pos = 0
        while pos < len(data):
            addr = address + pos
            if addr >> 16 != self.upper:
                self.upper = addr >> 16
                lines.append(_record(_LINEAR, 0, self.upper.to_bytes(2, "big")))
            n = min(self.record_size, len(data) - pos, 0x10000 - (addr & 0xFFFF))
            lines.append(_record(_DATA, addr & 0xFFFF, data[pos : pos + n]))
            pos += n
        self.records += len(lines)
        self.out.write(b"".join(lines))

    def close(self, entry: int | None = None) -> int:
        """Write the start address (if any) and the end-of-file record; return records written."""
        if entry is not None:
            if not 0 <= entry < ADDRESS_SPACE:
                raise UsageError(f"entry 0x{entry:x} does not fit 32 bits")
            self.out.write(_record(_START_LINEAR, 0, entry.to_bytes(4, "big")))
            self.records += 1
        self.out.write(_record(_EOF, 0, b""))
        self.records += 1
        return self.records


def write_ihex(
    data_src: Source,
    out: BinaryIO,
    base_address: int,
    entry: int | None,
    *,
    record_size: int = 16,
) -> int:
    """Write ``data_src`` as an Intel HEX file placing its first byte at ``base_address``.
    Returns the number of records written."""
    if base_address < 0 or base_address + data_src.size > ADDRESS_SPACE:
        raise UsageError(
            f"0x{base_address:x}+{data_src.size} bytes does not fit the 32-bit address space"
        )
    w = IhexWriter(out, record_size=record_size)
    address = base_address
    for chunk in data_src.chunks():
        w.data(address, chunk)
        address += len(chunk)
    return w.close(entry)


def sniff(sn: Sniff) -> bool:
    """The first non-blank line is a well-formed record (length agrees; checksum not needed,
    so that a damaged file is still reported as Intel HEX)."""
    head = sn.head.lstrip(b"\r\n\t ")
    if head[:1] != b":":
        return False
    line = head.split(b"\n", 1)[0].rstrip(b"\r \t")
    if len(line) > MAX_LINE:
        return False
    rec = _parse_record(line)
    return not isinstance(rec, str) and rec[3] <= _START_LINEAR


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=NAME,
        sniff=sniff,
        inspect=inspect,
        priority=60,
        summary="Intel HEX text records (types 00-05), checked record by record",
    ),
)
