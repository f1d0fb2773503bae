"""Microsoft UF2: a file of independent 512-byte blocks, each carrying up to 476 bytes of data for
one flash address, numbered within the file (or within one family when files for several
families are concatenated)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from unbrick.errors import ImageError, UsageError
from unbrick.formats.base import CHUNK, Context, Counter, Findings, FormatSpec, Sniff, Source
from unbrick.formats.memmap import (
    ADDRESS_SPACE,
    DEFAULT_MAX_SPAN,
    MAX_LIST,
    Coverage,
    RangeSet,
    RawLayout,
    Report,
    as_pairs,
    check_overlaps,
    write_raw,
)

NAME = "uf2"
BLOCK = 512
DATA_SIZE = 476
MAGIC_START0 = 0x0A324655
MAGIC_START1 = 0x9E5D5157
MAGIC_END = 0x0AB16F30

FLAG_NOT_MAIN_FLASH = 0x00000001
FLAG_FILE_CONTAINER = 0x00001000
FLAG_FAMILY_ID = 0x00002000
FLAG_MD5 = 0x00004000
FLAG_EXTENSION_TAGS = 0x00008000

_HEADER = struct.Struct("<8I")
_END = struct.Struct("<I")

#: Well-known family IDs (from the UF2 family list and the Raspberry Pi SDK).
FAMILIES: dict[int, str] = {
    0x16573617: "ATMEGA32",
    0x1851780A: "SAML21",
    0x1B57745F: "NRF52",
    0x1C5F21B0: "ESP32",
    0x1E1F432D: "STM32L1",
    0x202E3A91: "STM32L0",
    0x21460FF0: "STM32WL",
    0x2ABC77EC: "LPC55",
    0x300F5633: "STM32G0",
    0x04240BDF: "STM32L5",
    0x4C71240A: "STM32G4",
    0x4FB2D5BD: "MIMXRT10XX",
    0x53B80F00: "STM32F7",
    0x55114460: "SAMD51",
    0x57755A57: "STM32F4",
    0x5D1A0A2E: "STM32F2",
    0x5EE21072: "STM32F1",
    0x621E937A: "NRF52833",
    0x647824B6: "STM32F0",
    0x68ED2B88: "SAMD21",
    0x6B846188: "STM32F3",
    0x6DB66082: "STM32H7",
    0x70D16653: "STM32WB",
    0x7EAB61ED: "ESP8266",
    0xADA52840: "NRF52840",
    0xBFDD4EEE: "ESP32S2",
    0xC47E5767: "ESP32S3",
    0xD42BA06C: "ESP32C3",
    0x2B88D29C: "ESP32C2",
    0x332726F6: "ESP32H2",
    0x540DDF62: "ESP32C6",
    0x3D308E94: "ESP32P4",
    0xE48BFF56: "RP2040",
    0xE48BFF57: "RP2XXX_ABSOLUTE",
    0xE48BFF58: "RP2XXX_DATA",
    0xE48BFF59: "RP2350_ARM_S",
    0xE48BFF5A: "RP2350_RISCV",
    0xE48BFF5B: "RP2350_ARM_NS",
    0x00FF6919: "STM32L4",
    0x9AF03E33: "GD32VF103",
}

#: Standard extension tags.
TAGS: dict[int, str] = {
    0x9FC7BC: "version",
    0x650D9D: "description",
    0x0BE9F7: "page_size",
    0xB46DB0: "sha2",
    0xC8A729: "device_type",
}


def family_name(family_id: int) -> str | None:
    return FAMILIES.get(family_id)


def _hex_id(family_id: int) -> str:
    return f"0x{family_id:08x}"


@dataclass
class _Group:
    """Blocks numbered together: one family, or the file's blocks without a family."""

    family: int | None
    blocks: int = 0
    num_blocks: int | None = None
    numbers: RangeSet = field(default_factory=RangeSet)
    duplicates: list[int] = field(default_factory=list)
    duplicate_count: int = 0
    coverage: Coverage = field(default_factory=Coverage)


class _Block:
    __slots__ = (
        "address",
        "flags",
        "index",
        "num_blocks",
        "number",
        "payload",
        "raw",
        "size",
        "word",
    )

    def __init__(self, index: int, raw: bytes) -> None:
        self.index = index
        self.raw = raw
        _, _, self.flags, self.address, self.size, self.number, self.num_blocks, self.word = (
            _HEADER.unpack_from(raw)
        )
        self.payload = raw[32 : 32 + self.size]

    @property
    def family(self) -> int | None:
        return self.word if self.flags & FLAG_FAMILY_ID else None


def _block_error(raw: bytes) -> str:
    """Why a 512-byte block is not a usable UF2 block, or ""."""
    m0, m1, flags, address, size, _, _, _ = _HEADER.unpack_from(raw)
    if m0 != MAGIC_START0 or m1 != MAGIC_START1:
        return "bad start magic"
    if _END.unpack_from(raw, BLOCK - 4)[0] != MAGIC_END:
        return "bad end magic"
    if size > DATA_SIZE:
        return f"payload size {size} is larger than {DATA_SIZE}"
    if flags & FLAG_MD5 and size > DATA_SIZE - 24:
        return f"payload size {size} overlaps the MD5 checksum area"
    if not flags & FLAG_FILE_CONTAINER and address + size > ADDRESS_SPACE:
        return "payload runs past the 4 GiB address space"
    return ""


def _iter_blocks(src: Source, ctx: Context) -> Iterator[tuple[int, bytes]]:
    counter = Counter(ctx, "UF2 blocks")
    whole = src.size - src.size % BLOCK
    index = 0
    carry = b""
    for chunk in src.chunks(0, whole, chunk=CHUNK - CHUNK % BLOCK):
        data = carry + chunk if carry else chunk
        usable = len(data) - len(data) % BLOCK
        for pos in range(0, usable, BLOCK):
            counter.tick()
            yield index, data[pos : pos + BLOCK]
            index += 1
        carry = data[usable:]


def _parse_tags(blk: _Block, report: Report, tags: dict[str, Any]) -> None:
    pos = 32 + ((blk.size + 3) & ~3)
    end = BLOCK - 4 - (24 if blk.flags & FLAG_MD5 else 0)
    raw = blk.raw
    while pos + 4 <= end:
        size = raw[pos]
        kind = int.from_bytes(raw[pos + 1 : pos + 4], "little")
        if size == 0 or (size == 0xFF and kind == 0xFFFFFF):
            return
        if size < 4 or pos + size > end:
            report.problem(f"block {blk.index}: extension tag 0x{kind:06x} runs past the data area")
            return
        value = raw[pos + 4 : pos + size]
        name = TAGS.get(kind, f"0x{kind:06x}")
        if name not in tags and len(tags) < 32:
            if name == "page_size" and len(value) == 4:
                tags[name] = int.from_bytes(value, "little")
            elif name in ("version", "description"):
                tags[name] = value.rstrip(b"\0").decode("utf-8", "replace")
            else:
                tags[name] = value.hex()
        pos += (size + 3) & ~3


class _Analysis:
    def __init__(self) -> None:
        self.groups: dict[int | None, _Group] = {}
        self.block_count = 0
        self.bad_blocks = 0
        self.not_main_flash = 0
        self.file_blocks = 0
        self.md5_blocks = 0
        self.payload_sizes: set[int] = set()
        self.files: dict[str, int] = {}
        self.tags: dict[str, Any] = {}
        self.misaligned = 0


def _flash_pieces(
    src: Source, ctx: Context, family: int | None
) -> Iterator[tuple[int, int, bytes]]:
    """``(block index, address, payload)`` of the good main-flash blocks of one family."""
    for index, raw in _iter_blocks(src, ctx):
        if _block_error(raw):
            continue
        blk = _Block(index, raw)
        if blk.flags & (FLAG_FILE_CONTAINER | FLAG_NOT_MAIN_FLASH) or not blk.size:
            continue
        if blk.family == family:
            yield index, blk.address, blk.payload


def _analyse(src: Source, ctx: Context) -> tuple[Findings, _Analysis]:
    f = Findings(format=NAME)
    report = Report(f)
    a = _Analysis()
    if src.size < BLOCK:
        raise ImageError(f"a UF2 file holds 512-byte blocks; this one has {src.size} bytes")
    if src.size % BLOCK:
        report.problem(
            f"file size {src.size} is not a multiple of 512: {src.size % BLOCK} trailing bytes"
        )
    for index, raw in _iter_blocks(src, ctx):
        a.block_count += 1
        err = _block_error(raw)
        if err:
            a.bad_blocks += 1
            report.problem(f"block {index} at offset 0x{index * BLOCK:x}: {err}")
            continue
        blk = _Block(index, raw)
        is_file = bool(blk.flags & FLAG_FILE_CONTAINER)
        key = None if is_file else blk.family
        group = a.groups.get(key)
        if group is None:
            group = a.groups[key] = _Group(family=key)
        group.blocks += 1
        if group.num_blocks is None:
            group.num_blocks = blk.num_blocks
        elif blk.num_blocks != group.num_blocks:
            report.problem(
                f"block {index}: numBlocks is {blk.num_blocks}, earlier blocks of "
                f"{_group_label(group)} say {group.num_blocks}"
            )
        if blk.number >= blk.num_blocks:
            report.problem(
                f"block {index}: block number {blk.number} is not below numBlocks {blk.num_blocks}"
            )
        elif group.numbers.add(blk.number, blk.number + 1):
            group.duplicate_count += 1
            if len(group.duplicates) < MAX_LIST:
                group.duplicates.append(blk.number)
        a.payload_sizes.add(blk.size)
        if blk.flags & FLAG_MD5:
            a.md5_blocks += 1
        if blk.flags & FLAG_EXTENSION_TAGS:
            _parse_tags(blk, report, a.tags)
        if is_file:
            a.file_blocks += 1
            _file_block(blk, report, a)
            continue
        if blk.flags & FLAG_NOT_MAIN_FLASH:
            a.not_main_flash += 1
            continue
        if (blk.address | blk.size) & 3:
            a.misaligned += 1
        if blk.size:
            group.coverage.add(blk.address, blk.size)
    _missing_and_overlaps(src, ctx, a, report)
    _details(f, a)
    if a.misaligned:
        report.warning(
            f"{a.misaligned} blocks have an address or payload size that is not a multiple of 4"
        )
    if a.block_count == a.bad_blocks:
        raise ImageError("no valid UF2 block in the file", format=NAME)
    report.close()
    return f, a


def _group_label(group: _Group) -> str:
    if group.family is None:
        return "the blocks without a family"
    name = family_name(group.family)
    return f"family {_hex_id(group.family)}" + (f" ({name})" if name else "")


def _file_block(blk: _Block, report: Report, a: _Analysis) -> None:
    name_bytes = blk.raw[32 + blk.size : 32 + DATA_SIZE].split(b"\0", 1)[0]
    name = name_bytes.decode("utf-8", "replace")
    if blk.address + blk.size > blk.word:
        report.problem(
            f"block {blk.index}: file {name!r} data at offset {blk.address}+{blk.size} is past "
            f"its size {blk.word}"
        )
    if name not in a.files and len(a.files) < MAX_LIST:
        a.files[name] = blk.word


def _missing_and_overlaps(src: Source, ctx: Context, a: _Analysis, report: Report) -> None:
    several = len([k for k in a.groups if k is not None]) > 1
    for group in a.groups.values():
        label = f" of {_group_label(group)}" if several else ""
        declared = group.num_blocks or 0
        seen = group.numbers.total()
        if seen < declared:
            missing = declared - seen
            first = _missing_numbers(group.numbers, declared, 10)
            shown = ", ".join(str(n) for n in first) + (", ..." if missing > len(first) else "")
            report.problem(f"{missing} of {declared} blocks{label} are missing ({shown})")
        if group.duplicate_count:
            report.warning(f"{group.duplicate_count} blocks{label} appear more than once")
        if len(group.coverage.overlaps):
            check_overlaps(
                _flash_pieces(src, ctx, group.family),
                group.coverage.overlaps,
                report,
                "block",
            )


def _missing_numbers(numbers: RangeSet, declared: int, limit: int) -> list[int]:
    out: list[int] = []
    nxt = 0
    for s, e in [*numbers.ranges(), (declared, declared)]:
        while nxt < min(s, declared) and len(out) < limit:
            out.append(nxt)
            nxt += 1
        if len(out) >= limit:
            break
        nxt = max(nxt, e)
    return out


def _details(f: Findings, a: _Analysis) -> None:
    d: dict[str, Any] = f.details
    flash_groups = [g for g in a.groups.values() if g.coverage.pieces]
    families = [g.family for g in a.groups.values() if g.family is not None]
    main = flash_groups[0] if flash_groups else next(iter(a.groups.values()), None)
    d["family_id"] = _hex_id(families[0]) if families else None
    d["family_name"] = family_name(families[0]) if families else None
    if len(families) > 1:
        d["families"] = [
            {
                "family_id": _hex_id(g.family),
                "name": family_name(g.family),
                "blocks": g.blocks,
                "num_blocks_declared": g.num_blocks,
                "ranges": as_pairs(g.coverage.ranges.ranges()),
            }
            for g in a.groups.values()
            if g.family is not None
        ]
    d["block_count"] = a.block_count
    d["num_blocks_declared"] = main.num_blocks if main else None
    sizes = sorted(a.payload_sizes)
    d["payload_size"] = sizes[0] if len(sizes) == 1 else None
    if len(sizes) > 1:
        d["payload_sizes"] = sizes[:MAX_LIST]
    merged = RangeSet()
    for g in flash_groups:
        for s, e in g.coverage.ranges.ranges():
            merged.add(s, e)
    d["ranges"] = as_pairs(merged.ranges())
    d["gaps"] = as_pairs(merged.gaps()[:MAX_LIST])
    d["data_bytes"] = merged.total()
    missing: list[int] = []
    duplicates: list[int] = []
    for g in a.groups.values():
        missing += _missing_numbers(g.numbers, g.num_blocks or 0, MAX_LIST - len(missing))
        duplicates += g.duplicates[: MAX_LIST - len(duplicates)]
    d["missing_blocks"] = missing
    d["duplicate_blocks"] = duplicates
    d["bad_blocks"] = a.bad_blocks
    d["not_main_flash_blocks"] = a.not_main_flash
    d["file_container_blocks"] = a.file_blocks
    if a.files:
        d["files"] = [{"name": n, "size": s} for n, s in a.files.items()]
    d["md5_blocks"] = a.md5_blocks
    if a.tags:
        d["tags"] = a.tags


def inspect(src: Source, ctx: Context) -> Findings:
    return _analyse(src, ctx)[0]


def to_raw(
    src: Source,
    out: BinaryIO,
    ctx: Context,
    *,
    fill: int = 0xFF,
    max_span: int = DEFAULT_MAX_SPAN,
    family_id: int | None = None,
) -> RawLayout:
    """Write the main-flash data of a UF2 file to ``out`` as one raw image starting at its
    lowest address, gaps filled with ``fill``. Not-main-flash and file-container blocks are
    left out. A file holding images for several families needs ``family_id`` to pick one.
    Refuses invalid files (ImageError) and images spanning more than ``max_span`` (LimitError).
    """
    group = _choose(src, ctx, family_id, "cannot convert an invalid UF2 file")
    pieces = ((addr, data) for _, addr, data in _flash_pieces(src, ctx, group.family))
    return write_raw(pieces, group.coverage.ranges, out, fill=fill, max_span=max_span)


def iter_data(
    src: Source, ctx: Context, *, family_id: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """``(address, payload)`` of the main-flash blocks of one family in file order, after
    checking the whole file (ImageError when it is invalid; UsageError when several families
    are present and ``family_id`` does not pick one)."""
    group = _choose(src, ctx, family_id, "invalid UF2 file")
    for _, address, data in _flash_pieces(src, ctx, group.family):
        yield address, data


def _choose(src: Source, ctx: Context, family_id: int | None, what: str) -> _Group:
    f, a = _analyse(src, ctx)
    if f.problems:
        raise ImageError(f"{what}: {f.problems[0]}", format=NAME)
    groups = {k: g for k, g in a.groups.items() if g.coverage.pieces}
    if family_id is not None:
        if family_id not in groups:
            have = ", ".join(_hex_id(k) for k in groups if k is not None) or "none"
            raise UsageError(
                f"the file has no data for family {_hex_id(family_id)} (families: {have})"
            )
        return groups[family_id]
    if len(groups) > 1:
        have = ", ".join(_hex_id(k) if k is not None else "none" for k in groups)
        raise UsageError(
            f"the file holds images for several families ({have}); choose one",
            hint="pass family_id (--family) to pick the image to convert",
        )
    if not groups:
        raise ImageError("the UF2 file holds no main-flash data: nothing to convert", format=NAME)
    return next(iter(groups.values()))


def _block(flags: int, address: int, payload: bytes, number: int, count: int, word: int) -> bytes:
    head = _HEADER.pack(
        MAGIC_START0, MAGIC_START1, flags, address, len(payload), number, count, word
    )
    return head + payload + bytes(DATA_SIZE - len(payload)) + _END.pack(MAGIC_END)


class Uf2Writer:
    """Streams data pieces into UF2 blocks of ``payload_size`` bytes. The number of blocks is
    patched into every block header by :meth:`close`, so ``out`` must be seekable."""

    def __init__(self, out: BinaryIO, *, family_id: int | None, payload_size: int = 256) -> None:
        if not 4 <= payload_size <= DATA_SIZE or payload_size % 4:
            raise UsageError(f"payload_size must be a multiple of 4 in 4..476, not {payload_size}")
        if family_id is not None and not 0 <= family_id < ADDRESS_SPACE:
            raise UsageError(f"family_id 0x{family_id:x} does not fit 32 bits")
        self.out = out
        self.origin = out.tell()
        self.flags = FLAG_FAMILY_ID if family_id is not None else 0
        self.word = family_id or 0
        self.payload_size = payload_size
        self.blocks = 0

    def data(self, address: int, data: bytes) -> None:
        """Write ``data`` at ``address``; a short final piece is one short block."""
        if address < 0 or address + len(data) > ADDRESS_SPACE:
            raise UsageError(
                f"data at 0x{address:x}+{len(data)} does not fit the 32-bit address space"
            )
        parts = []
        for pos in range(0, len(data), self.payload_size):
            payload = data[pos : pos + self.payload_size]
            parts.append(_block(self.flags, address + pos, payload, self.blocks, 0, self.word))
            self.blocks += 1
        self.out.write(b"".join(parts))

    def close(self) -> int:
        """Patch numBlocks into every block; return the number of blocks."""
        count = struct.pack("<I", self.blocks)
        end = self.out.tell()
        for i in range(self.blocks):
            self.out.seek(self.origin + i * BLOCK + 24)
            self.out.write(count)
        self.out.seek(end)
        return self.blocks


def write_uf2(
    src: Source,
    out: BinaryIO,
    *,
    base_address: int,
    family_id: int | None,
    payload_size: int = 256,
) -> int:
    """Write ``src`` as UF2 blocks placing its first byte at ``base_address``; returns the
    number of blocks. A final partial block is padded with 0xFF (erased flash) to
    ``payload_size``, since bootloaders such as the RP2040's accept only full blocks."""
    if not src.size:
        raise UsageError("nothing to write: the source is empty")
    if not 4 <= payload_size <= DATA_SIZE or payload_size % 4:
        raise UsageError(f"payload_size must be a multiple of 4 in 4..476, not {payload_size}")
    padded = -(-src.size // payload_size) * payload_size
    if base_address < 0 or base_address + padded > ADDRESS_SPACE:
        raise UsageError(f"0x{base_address:x}+{padded} bytes does not fit the 32-bit address space")
    count = padded // payload_size
    word = family_id or 0
    flags = FLAG_FAMILY_ID if family_id is not None else 0
    if family_id is not None and not 0 <= family_id < ADDRESS_SPACE:
        raise UsageError(f"family_id 0x{family_id:x} does not fit 32 bits")
    step = (CHUNK // payload_size) * payload_size
    number = 0
    for pos in range(0, src.size, step):
        data = src.read_at(pos, min(step, src.size - pos), "source data")
        parts = []
        for off in range(0, len(data), payload_size):
            payload = data[off : off + payload_size]
            payload += b"\xff" * (payload_size - len(payload))
            parts.append(_block(flags, base_address + pos + off, payload, number, count, word))
            number += 1
        out.write(b"".join(parts))
    return number


def sniff(sn: Sniff) -> bool:
    if sn.size < BLOCK or len(sn.head) < BLOCK:
        return False
    try:
        return not _block_error(sn.head[:BLOCK])
    except struct.error:
        return False


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=NAME,
        sniff=sniff,
        inspect=inspect,
        priority=15,
        summary="Microsoft UF2 blocks (RP2040, SAMD, nRF52, ESP32-S2...), checked block by block",
    ),
)
