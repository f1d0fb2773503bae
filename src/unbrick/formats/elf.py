"""ELF executables (32/64-bit, little/big endian): header, machine and the PT_LOAD segments that
a loader or a flasher places at their physical addresses."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from unbrick.errors import ImageError
from unbrick.formats.base import Context, Counter, Findings, FormatSpec, Sniff, Source
from unbrick.formats.memmap import (
    DEFAULT_MAX_SPAN,
    MAX_LIST,
    RangeSet,
    RawLayout,
    Report,
    as_pairs,
    write_raw,
)

NAME = "elf"
MAGIC = b"\x7fELF"
PT_LOAD = 1
PN_XNUM = 0xFFFF
SHN_XINDEX = 0xFFFF
#: Loadable segments one file may have; more means a damaged or hostile file.
MAX_LOAD_SEGMENTS = 65535

#: e_machine values seen on devices and hosts (names as commonly written).
MACHINES: dict[int, str] = {
    0: "None",
    2: "SPARC",
    3: "x86",
    4: "68000",
    7: "i860",
    8: "MIPS",
    10: "MIPS RS3000 LE",
    15: "PA-RISC",
    18: "SPARC32+",
    20: "PowerPC",
    21: "PowerPC64",
    22: "S390",
    40: "ARM",
    42: "SuperH",
    43: "SPARC V9",
    44: "TriCore",
    46: "H8/300",
    50: "IA-64",
    52: "ColdFire",
    53: "68HC12",
    62: "x86-64",
    70: "68HC11",
    76: "CRIS",
    83: "AVR",
    87: "V850",
    88: "M32R",
    92: "OpenRISC",
    93: "ARC Compact",
    94: "Xtensa",
    105: "MSP430",
    106: "Blackfin",
    113: "Nios II",
    164: "Hexagon",
    165: "8051",
    173: "RX",
    183: "AArch64",
    185: "AVR32",
    186: "STM8",
    189: "MicroBlaze",
    195: "ARCv2",
    197: "RL78",
    220: "Z80",
    243: "RISC-V",
    247: "BPF",
    252: "C-SKY",
    258: "LoongArch",
}

TYPES = {0: "NONE", 1: "REL", 2: "EXEC", 3: "DYN", 4: "CORE"}


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD program header."""

    index: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int
    align: int

    @property
    def perm(self) -> str:
        return "".join(c if self.flags & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))


@dataclass(frozen=True)
class _Header:
    bits: int
    endian: str
    osabi: int
    type: int
    machine: int
    version: int
    entry: int
    phoff: int
    shoff: int
    flags: int
    ehsize: int
    phentsize: int
    phnum: int
    shentsize: int
    shnum: int
    shstrndx: int


def _read_header(src: Source) -> _Header:
    ident = src.read_at(0, 16, "ELF identification")
    if ident[:4] != MAGIC:
        raise ImageError("not an ELF file (bad magic)", format=NAME, offset=0)
    if ident[4] not in (1, 2):
        raise ImageError(
            f"ELF class {ident[4]} is neither 32-bit (1) nor 64-bit (2)", format=NAME, offset=4
        )
    if ident[5] not in (1, 2):
        raise ImageError(
            f"ELF data encoding {ident[5]} is neither little (1) nor big (2) endian",
            format=NAME,
            offset=5,
        )
    bits = 32 if ident[4] == 1 else 64
    endian = "<" if ident[5] == 1 else ">"
    word = "I" if bits == 32 else "Q"
    fmt = struct.Struct(f"{endian}HHI{word}{word}{word}IHHHHHH")
    raw = src.read_at(16, fmt.size, "ELF header")
    (
        etype,
        machine,
        version,
        entry,
        phoff,
        shoff,
        flags,
        ehsize,
        phentsize,
        phnum,
        shentsize,
        shnum,
        shstrndx,
    ) = fmt.unpack(raw)
    return _Header(
        bits,
        endian,
        ident[7],
        etype,
        machine,
        version,
        entry,
        phoff,
        shoff,
        flags,
        ehsize,
        phentsize,
        phnum,
        shentsize,
        shnum,
        shstrndx,
    )


def _shdr_struct(h: _Header) -> struct.Struct:
    if h.bits == 32:
        return struct.Struct(f"{h.endian}10I")
    return struct.Struct(f"{h.endian}IIQQQQIIQQ")


def _phdr_struct(h: _Header) -> struct.Struct:
    if h.bits == 32:
        return struct.Struct(f"{h.endian}8I")
    return struct.Struct(f"{h.endian}IIQQQQQQ")


@dataclass
class _Elf:
    header: _Header
    program_headers: int
    sections: int
    loads: list[LoadSegment]


def _table_fits(src: Source, offset: int, count: int, entsize: int) -> bool:
    return offset <= src.size and count * entsize <= src.size - offset


def _parse(src: Source, ctx: Context, report: Report) -> _Elf:
    h = _read_header(src)
    min_ehsize = 52 if h.bits == 32 else 64
    shdr = _shdr_struct(h)
    phdr = _phdr_struct(h)
    if h.ehsize < min_ehsize:
        report.warning(f"e_ehsize is {h.ehsize}, smaller than the {min_ehsize}-byte header")
    if h.version != 1:
        report.warning(f"e_version is {h.version}, not 1")

    # Section 0 carries the real counts when they do not fit the header fields.
    sections = h.shnum
    section0: tuple[int, ...] | None = None
    if h.shoff:
        if h.shentsize < shdr.size:
            report.problem(f"section header size {h.shentsize} is smaller than {shdr.size}")
        elif _table_fits(src, h.shoff, 1, h.shentsize):
            section0 = shdr.unpack(src.read_at(h.shoff, shdr.size, "section header 0"))
            if not sections:
                sections = section0[5]
        else:
            report.problem(
                f"section header table at offset 0x{h.shoff:x} lies outside the file (size "
                f"{src.size}): the file is truncated"
            )
        if section0 is not None and not _table_fits(src, h.shoff, sections, h.shentsize):
            report.problem(
                f"section header table ({sections} entries of {h.shentsize} bytes at 0x"
                f"{h.shoff:x}) runs past the end of the file (size {src.size}): the file is "
                "truncated"
            )
    elif sections:
        report.problem(f"{sections} sections declared but no section header table offset")

    phnum = h.phnum
    if phnum == PN_XNUM:
        if section0 is None:
            raise ImageError(
                "program header count is in section 0, which cannot be read", format=NAME
            )
        phnum = section0[7]
    loads: list[LoadSegment] = []
    if phnum:
        if h.phentsize < phdr.size:
            raise ImageError(
                f"program header size {h.phentsize} is smaller than {phdr.size}",
                format=NAME,
                offset=h.phoff,
            )
        if not _table_fits(src, h.phoff, phnum, h.phentsize):
            raise ImageError(
                f"program header table ({phnum} entries of {h.phentsize} bytes at 0x"
                f"{h.phoff:x}) runs past the end of the file (size {src.size})",
                format=NAME,
                offset=h.phoff,
            )
        counter = Counter(ctx, "program headers")
        for i in range(phnum):
            counter.tick()
            at = h.phoff + i * h.phentsize
            fields = phdr.unpack(src.read_at(at, phdr.size, f"program header {i}"))
            if h.bits == 32:
                ptype, offset, vaddr, paddr, filesz, memsz, flags, align = fields
            else:
                ptype, flags, offset, vaddr, paddr, filesz, memsz, align = fields
            if ptype != PT_LOAD:
                continue
            if len(loads) >= MAX_LOAD_SEGMENTS:
                raise ImageError(
                    f"more than {MAX_LOAD_SEGMENTS} loadable segments", format=NAME, offset=at
                )
            loads.append(LoadSegment(i, offset, vaddr, paddr, filesz, memsz, flags, align))
    return _Elf(h, phnum, sections, loads)


def _check_loads(elf: _Elf, src: Source, report: Report) -> RangeSet:
    """Report segments outside the file or overlapping in physical memory; return the merged
    physical ranges of the file-backed parts."""
    ranges = RangeSet()
    space = 1 << elf.header.bits
    for seg in elf.loads:
        if seg.filesz > seg.memsz:
            report.problem(
                f"PT_LOAD segment {seg.index}: file size 0x{seg.filesz:x} is larger than its "
                f"memory size 0x{seg.memsz:x}"
            )
        if seg.filesz and (seg.offset > src.size or seg.filesz > src.size - seg.offset):
            report.problem(
                f"PT_LOAD segment {seg.index}: file range 0x{seg.offset:x}+0x{seg.filesz:x} "
                f"lies outside the file (size {src.size}): the file is truncated or damaged"
            )
            continue
        if seg.paddr + seg.filesz > space:
            report.problem(
                f"PT_LOAD segment {seg.index}: 0x{seg.paddr:x}+0x{seg.filesz:x} runs past the "
                f"{elf.header.bits}-bit address space"
            )
            continue
        if seg.filesz:
            overlap = ranges.add(seg.paddr, seg.paddr + seg.filesz)
            if overlap:
                report.problem(
                    f"PT_LOAD segment {seg.index} overlaps an earlier segment at physical "
                    f"address 0x{overlap[0][0]:x}"
                )
    return ranges


def _analyse(src: Source, ctx: Context) -> tuple[Findings, _Elf, RangeSet]:
    f = Findings(format=NAME)
    report = Report(f)
    elf = _parse(src, ctx, report)
    ranges = _check_loads(elf, src, report)
    h = elf.header
    d: dict[str, Any] = f.details
    d["class"] = f"ELF{h.bits}"
    d["data"] = "little" if h.endian == "<" else "big"
    d["os_abi"] = h.osabi
    d["type"] = TYPES.get(h.type, f"0x{h.type:04x}")
    d["machine"] = h.machine
    d["machine_name"] = MACHINES.get(h.machine, f"unknown ({h.machine})")
    d["entry"] = h.entry
    d["flags"] = h.flags
    d["program_header_count"] = elf.program_headers
    d["section_count"] = elf.sections
    d["segments"] = [
        {
            "index": s.index,
            "offset": s.offset,
            "vaddr": s.vaddr,
            "paddr": s.paddr,
            "filesz": s.filesz,
            "memsz": s.memsz,
            "flags": s.flags,
            "perm": s.perm,
            "align": s.align,
        }
        for s in elf.loads[:MAX_LIST]
    ]
    d["load_segment_count"] = len(elf.loads)
    d["load_ranges"] = as_pairs(ranges.ranges()[:MAX_LIST])
    d["load_bytes"] = ranges.total()
    if not elf.loads:
        report.warning("no PT_LOAD segments: this is not a loadable image (an object file?)")
    report.close()
    return f, elf, ranges


def inspect(src: Source, ctx: Context) -> Findings:
    return _analyse(src, ctx)[0]


def load_segments(src: Source, ctx: Context) -> list[LoadSegment]:
    """The PT_LOAD segments of a valid ELF file; ImageError when the file is not valid."""
    f, elf, _ = _analyse(src, ctx)
    if f.problems:
        raise ImageError(f"invalid ELF file: {f.problems[0]}", format=NAME)
    return list(elf.loads)


def iter_data(src: Source, ctx: Context) -> Iterator[tuple[int, bytes]]:
    """``(physical address, data)`` pieces of the file-backed part of every PT_LOAD segment
    (the zero-filled rest, ``memsz - filesz``, is not part of the image)."""
    for seg in load_segments(src, ctx):
        address = seg.paddr
        for chunk in src.chunks(seg.offset, seg.filesz):
            yield address, chunk
            address += len(chunk)


def to_raw(
    src: Source,
    out: BinaryIO,
    ctx: Context,
    *,
    fill: int = 0xFF,
    max_span: int = DEFAULT_MAX_SPAN,
) -> RawLayout:
    """Write the file-backed parts of the PT_LOAD segments to ``out`` at their physical
    addresses, as one raw image starting at the lowest one, gaps filled with ``fill``."""
    f, elf, ranges = _analyse(src, ctx)
    if f.problems:
        raise ImageError(f"cannot convert an invalid ELF file: {f.problems[0]}", format=NAME)
    if not len(ranges):
        raise ImageError("the ELF file has no loadable data: nothing to convert", format=NAME)

    def pieces() -> Iterator[tuple[int, bytes]]:
        for seg in elf.loads:
            address = seg.paddr
            for chunk in src.chunks(seg.offset, seg.filesz):
                yield address, chunk
                address += len(chunk)

    return write_raw(pieces(), ranges, out, fill=fill, max_span=max_span)


def sniff(sn: Sniff) -> bool:
    h = sn.head
    return (
        len(h) >= 52
        and h[:4] == MAGIC
        and h[4] in (1, 2)
        and h[5] in (1, 2)
        and h[6] == 1
        and (h[4] == 1 or len(h) >= 64)
    )


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=NAME,
        sniff=sniff,
        inspect=inspect,
        priority=20,
        summary="ELF executables: machine, entry point and loadable segments",
    ),
)
