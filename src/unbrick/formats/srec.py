"""Motorola S-records: S0 header, S1/S2/S3 data with 16/24/32-bit addresses, S5/S6 record
counts and S7/S8/S9 termination records carrying the start address."""

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

NAME = "srec"
#: Longest possible record is 2 + 2 * 256 = 514 characters; allow some trailing space.
MAX_LINE = 600
#: Address bytes of each record type (S4 is reserved).
_ALEN = {0: 2, 1: 2, 2: 3, 3: 4, 5: 2, 6: 3, 7: 4, 8: 3, 9: 2}
_DATA_TYPES = (1, 2, 3)
_TERMINATION = {7: 4, 8: 3, 9: 2}


def _parse_record(line: bytes) -> tuple[int, bytes] | str:
    """``(type, bytes)`` of an S-record line, or a message saying why the line is not one."""
    if len(line) < 2 or line[0] not in b"Ss" or not 0x30 <= line[1] <= 0x39:
        return "not an S-record (does not start with S0-S9)"
    rtype = line[1] - 0x30
    try:
        rec = binascii.a2b_hex(line[2:])
    except (binascii.Error, ValueError):
        return "record is not made of hexadecimal digit pairs"
    if not rec:
        return "record is empty"
    if len(rec) != rec[0] + 1:
        return f"byte count says {rec[0]} bytes but the record holds {len(rec) - 1}"
    if rtype not in _ALEN:
        return f"unknown record type S{rtype}"
    if rec[0] < _ALEN[rtype] + 1:
        return f"S{rtype} record is too short for its {_ALEN[rtype]}-byte address"
    return rtype, rec


class _Scan:
    """One pass over the records. With a report, problems are recorded; without, the pass only
    replays the data pieces (for the overlap check and the conversion)."""

    def __init__(self, src: Source, ctx: Context, report: Report | None) -> None:
        self.src = src
        self.ctx = ctx
        self.report = report
        self.record_count = 0
        self.data_records = 0
        self.data_types: set[int] = set()
        self.header: str | None = None
        self.declared_count: int | None = None
        self.term_line = 0
        self.term_type = 0
        self.entry: int | None = None
        self.checksum_errors: list[dict[str, int]] = []
        self.checksum_error_count = 0
        self.first_error = ""

    def _problem(self, text: str) -> None:
        if self.report is not None:
            self.report.problem(text)
            if not self.first_error:
                self.first_error = text

    def _warning(self, text: str) -> None:
        if self.report is not None:
            self.report.warning(text)

    def pieces(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(line, address, data)`` for each data record."""
        for lineno, line in iter_lines(self.src, self.ctx, max_line=MAX_LINE, what="lines"):
            if not line:
                continue
            if self.term_line:
                self._problem(
                    f"line {lineno}: content after the termination record (line "
                    f"{self.term_line}) is ignored"
                )
                break
            parsed = _parse_record(line)
            if isinstance(parsed, str):
                self._problem(f"line {lineno}: {parsed}")
                continue
            rtype, rec = parsed
            self.record_count += 1
            if sum(rec) & 0xFF != 0xFF:
                self._checksum_error(lineno, ~sum(rec[:-1]) & 0xFF, rec[-1])
            alen = _ALEN[rtype]
            address = int.from_bytes(rec[1 : 1 + alen], "big")
            data = rec[1 + alen : -1]
            if rtype in _DATA_TYPES:
                self.data_records += 1
                self.data_types.add(rtype)
                if not data:
                    continue
                if address + len(data) > ADDRESS_SPACE:
                    self._problem(f"line {lineno}: data runs past the 4 GiB address space")
                    continue
                yield lineno, address, data
            elif rtype == 0:
                if self.header is None:
                    self.header = data.rstrip(b"\0").decode("latin-1")
                else:
                    self._warning(f"line {lineno}: a second S0 header record")
            elif rtype in (5, 6):
                if data:
                    self._problem(f"line {lineno}: S{rtype} count record carries data")
                if address != self.data_records:
                    self._problem(
                        f"line {lineno}: S{rtype} record count says {address} data records, "
                        f"{self.data_records} came before it"
                    )
                self.declared_count = address
            else:
                if data:
                    self._problem(f"line {lineno}: S{rtype} termination record carries data")
                self.entry = address
                self.term_line = lineno
                self.term_type = rtype

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
        raise ImageError(f"no S-records found{detail}", format=NAME)
    if not scan.term_line:
        # srec_cat writes no termination record when it has no start address, but it always
        # ends with a record count, which vouches that no data record is missing.
        if scan.declared_count is not None and scan.declared_count == scan.data_records:
            report.warning("no termination record (S7/S8/S9): the file has no start address")
        else:
            report.problem(
                "no termination record (S7/S8/S9) and no final record count: the file may be "
                "truncated"
            )
    if len(cov.overlaps):
        check_overlaps(_Scan(src, ctx, None).pieces(), cov.overlaps, report, "line")
    d: dict[str, Any] = f.details
    d["header"] = scan.header
    d["segments"] = as_pairs(cov.ranges.ranges())
    d["entry_point"] = scan.entry
    d["data_bytes"] = cov.ranges.total()
    d["record_count"] = scan.record_count
    d["data_record_count"] = scan.data_records
    d["declared_record_count"] = scan.declared_count
    d["data_record_types"] = [f"S{t}" for t in sorted(scan.data_types)]
    d["termination_record"] = f"S{scan.term_type}" if scan.term_type else None
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
        raise ImageError(f"invalid S-record file: {f.problems[0]}", format=NAME)
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
    """Write the data of an S-record file to ``out`` as one raw image starting at its lowest
    address, gaps filled with ``fill``. Refuses invalid files (ImageError) and images spanning
    more than ``max_span`` bytes of address space (LimitError)."""
    f, cov = _analyse(src, ctx)
    if f.problems:
        raise ImageError(f"cannot convert an invalid S-record file: {f.problems[0]}", format=NAME)
    return write_raw(_pieces(src, ctx), cov.ranges, out, fill=fill, max_span=max_span)


def _record(rtype: int, address: int, alen: int, data: bytes) -> bytes:
    body = address.to_bytes(alen, "big") + data
    rec = bytes((len(body) + 1,)) + body
    return b"S%d" % rtype + binascii.b2a_hex(rec + bytes((~sum(rec) & 0xFF,))).upper() + b"\n"


def address_length_for(highest: int) -> int:
    """Smallest S-record address size (2, 3 or 4 bytes) that holds ``highest``."""
    if highest < 1 << 16:
        return 2
    if highest < 1 << 24:
        return 3
    return 4


class SrecWriter:
    """Streams data pieces into S-records with ``address_length``-byte addresses (2: S1/S9,
    3: S2/S8, 4: S3/S7). The S0 header record is written first."""

    def __init__(
        self,
        out: BinaryIO,
        *,
        header: str = "",
        address_length: int = 4,
        record_size: int = 16,
    ) -> None:
        if address_length not in (2, 3, 4):
            raise UsageError(f"address_length must be 2, 3 or 4, not {address_length}")
        if not 1 <= record_size <= 255 - address_length - 1:
            raise UsageError(f"record_size must be 1..{254 - address_length}, not {record_size}")
        text = header.encode("latin-1", "replace")
        if len(text) > 252:
            raise UsageError("the S0 header text is longer than 252 characters")
        self.out = out
        self.alen = address_length
        self.record_size = record_size
        self.data_records = 0
        self.records = 1
        out.write(_record(0, 0, 2, text))

    def data(self, address: int, data: bytes) -> None:
        limit = 1 << (8 * self.alen)
        if address < 0 or address + len(data) > limit:
            raise UsageError(
                f"data at 0x{address:x}+{len(data)} does not fit {8 * self.alen}-bit addresses"
            )
        rtype = {2: 1, 3: 2, 4: 3}[self.alen]
        lines = [
            _record(rtype, address + pos, self.alen, data[pos : pos + self.record_size])
            for pos in range(0, len(data), self.record_size)
        ]
        self.data_records += len(lines)
        self.records += len(lines)
        self.out.write(b"".join(lines))

    def close(self, entry: int | None = None) -> int:
        """Write the record count (S5/S6, when it fits) and the termination record with
        ``entry`` (0 when None: the record is mandatory). Returns the records written."""
        value = 0 if entry is None else entry
        if not 0 <= value < 1 << (8 * self.alen):
            raise UsageError(f"entry 0x{value:x} does not fit {8 * self.alen}-bit addresses")
        if self.data_records < 1 << 16:
            self.out.write(_record(5, self.data_records, 2, b""))
            self.records += 1
        elif self.data_records < 1 << 24:
            self.out.write(_record(6, self.data_records, 3, b""))
            self.records += 1
        self.out.write(_record({2: 9, 3: 8, 4: 7}[self.alen], value, self.alen, b""))
        self.records += 1
        return self.records


def write_srec(
    data_src: Source,
    out: BinaryIO,
    base_address: int,
    entry: int | None,
    *,
    header: str = "",
    address_length: int | None = None,
    record_size: int = 16,
) -> int:
    """Write ``data_src`` as S-records placing its first byte at ``base_address``. The address
    size is the smallest that holds every address and the entry unless ``address_length`` is
    given. Without an entry the termination record carries 0. Returns the records written."""
    end = base_address + data_src.size
    if base_address < 0 or end > ADDRESS_SPACE:
        raise UsageError(
            f"0x{base_address:x}+{data_src.size} bytes does not fit the 32-bit address space"
        )
    if address_length is None:
        address_length = address_length_for(max(end - 1, entry or 0, 0))
    w = SrecWriter(out, header=header, address_length=address_length, record_size=record_size)
    address = base_address
    for chunk in data_src.chunks():
        w.data(address, chunk)
        address += len(chunk)
    return w.close(entry)


def sniff(sn: Sniff) -> bool:
    """The first non-blank line is a well-formed S-record (length agrees; the checksum is not
    needed, so that a damaged file is still reported as S-records)."""
    head = sn.head.lstrip(b"\r\n\t ")
    if head[:1] not in (b"S", b"s"):
        return False
    line = head.split(b"\n", 1)[0].rstrip(b"\r \t")
    if len(line) > MAX_LINE:
        return False
    return not isinstance(_parse_record(line), str)


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=NAME,
        sniff=sniff,
        inspect=inspect,
        priority=60,
        summary="Motorola S-records (S0-S9), checked record by record",
    ),
)
