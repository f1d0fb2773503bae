"""Pure parsers of U-Boot console output.

Every function takes the text a command printed (echo and prompt already removed, line ends
``\\r\\n`` or ``\\n``) and returns a frozen dataclass, or raises :class:`UBootParseError` (a
TransportError: a garbled or unexpected answer is a fault of the link or the device, never a
crash). Nothing here does I/O; the formats are those of U-Boot 2023.01 (``cmd/mem.c``,
``cmd/bdinfo.c``, ``drivers/mtd/cfi_flash.c``, ``cmd/blk_common.c``, ``lib/display_options.c``,
``cmd/sf.c``, ``cmd/nand.c``, ``drivers/mtd/nand/raw/nand_util.c``, ``cmd/mtdparts.c``)
and are fuzzed in the tests.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from unbrick.errors import TransportError

#: Longest text a parser looks at; console answers longer than this are refused.
MAX_TEXT_CHARS = 16 * 1024 * 1024


class UBootParseError(TransportError):
    """U-Boot printed something the parser did not expect."""

    default_hint = "the console answer was garbled or unexpected; check the link and retry"


def _lines(text: str) -> list[str]:
    if len(text) > MAX_TEXT_CHARS:
        raise UBootParseError(f"console answer of {len(text)} characters is too long to parse")
    return [line.rstrip("\r") for line in text.split("\n")]


def _short(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _hex(value: str, what: str) -> int:
    try:
        return int(value, 16)
    except ValueError as e:
        raise UBootParseError(f"{what} {_short(value)!r} is not a hexadecimal number") from e


# ---------------------------------------------------------------------------------------------
# Errors and prompts

#: Lines U-Boot prints when a command failed (matched at the start of a stripped line, or as
#: the whole-line forms of block and flash drivers).
_ERROR_LINE = re.compile(
    r"^(?:"
    r"Unknown command '.*' - try 'help'"
    r"|## Error:.*|Error:.*|ERROR:.*|\*\*\* ?Error.*|### ERROR ###.*"
    r"|Usage:"
    r"|\*\* .* \*\*"
    r"|Can't .*|Could not .*|Cannot .*|Failed .*|.* failed\b.*"
    r"|Bad .*|Wrong .*|Invalid .*|Not enough .*"
    r"|.*\bblocks (?:read|written): ERROR"
    r"|.*Can't write to protected Flash sectors|.*Flash not Erased"
    r"|.*Timeout writing to Flash|.*Flash not erased"
    r"|.*## Write timeout.*|.*Out of memory.*|## .*download aborted.*|Cancelled"
    r")$"
)


def error_lines(text: str) -> list[str]:
    """The lines of ``text`` that are U-Boot error messages, stripped."""
    out = []
    for line in _lines(text):
        stripped = line.strip()
        if stripped and _ERROR_LINE.match(stripped):
            out.append(stripped)
    return out


#: Autoboot countdown banners of common U-Boot builds (stock, keyed, vendor variants).
AUTOBOOT_PATTERN = (
    rb"Hit any key to stop autoboot"
    rb"|Hit key to stop autoboot"
    rb"|Press .{1,40} to (?:stop|abort) autoboot"
    rb"|Autobooting in \d+ seconds"
    rb"|Autoboot in \d+ seconds"
)


# ---------------------------------------------------------------------------------------------
# version, help, printenv, bdinfo

_BANNER = re.compile(r"^U-Boot(?: SPL)? (\S+)(?: \((.{1,60})\))?(.*)$")


@dataclass(frozen=True)
class UBootVersion:
    """What ``version`` prints: the banner and the toolchain lines."""

    banner: str
    #: The version token after "U-Boot", e.g. "2023.01+dfsg-2+deb12u3".
    version: str
    #: The release part of the version, e.g. "2023.01" (empty when it has none).
    release: str
    build_date: str | None
    toolchain: tuple[str, ...] = ()


def parse_version(text: str) -> UBootVersion:
    """Parse ``version`` (or a boot banner): the first line starting with "U-Boot"."""
    lines = [line.strip() for line in _lines(text) if line.strip()]
    for i, line in enumerate(lines):
        m = _BANNER.match(line)
        if m is None:
            continue
        version = m.group(1)
        rel = re.match(r"v?(\d{4}\.\d{2}(?:\.\d+)?)", version)
        tools = tuple(x for x in lines[i + 1 :] if not x.startswith("=>"))
        return UBootVersion(
            banner=line,
            version=version,
            release=rel.group(1) if rel else "",
            build_date=m.group(2),
            toolchain=tools,
        )
    raise UBootParseError(f"no 'U-Boot <version>' line in the answer {_short(text)!r}")


_HELP_LINE = re.compile(r"^([A-Za-z0-9_.?-]{1,40})\s+- ")


def parse_help(text: str) -> frozenset[str]:
    """Command names from ``help`` (``name      - description`` lines)."""
    names = set()
    for line in _lines(text):
        m = _HELP_LINE.match(line)
        if m:
            names.add(m.group(1))
    if not names:
        raise UBootParseError(f"'help' listed no commands: {_short(text)!r}")
    return frozenset(names)


_ENV_NAME = re.compile(r"[A-Za-z0-9_.#:/@+-]{1,128}")


def parse_printenv(text: str) -> dict[str, str]:
    """Variables from ``printenv`` (``name=value`` lines; values may contain ``=``).

    "## Error: "x" not defined" lines (from ``printenv NAME``) and the final size line are
    skipped; anything else that is not ``name=value`` is a parse error.
    """
    env: dict[str, str] = {}
    for line in _lines(text):
        if not line.strip():
            continue
        if line.startswith("Environment size:") or line.startswith("## Error:"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise UBootParseError(f"printenv line {_short(line)!r} is not name=value")
        env[name] = value
    return env


@dataclass(frozen=True)
class BoardInfo:
    """What ``bdinfo`` prints, as fields plus the facts the driver uses."""

    fields: dict[str, str]
    #: (start, size) of each DRAM bank.
    dram: tuple[tuple[int, int], ...]
    #: 32 or 64 ("Build = 64-bit"); None when not printed.
    build_bits: int | None
    #: (start, end exclusive) of memory U-Boot reserved (lmb_dump_all).
    reserved: tuple[tuple[int, int], ...] = ()
    relocaddr: int | None = None

    @property
    def flash_start(self) -> int | None:
        value = self.fields.get("flashstart")
        return _hex(value, "flashstart") if value else None


_BD_FIELD = re.compile(r"^([A-Za-z_#][A-Za-z0-9_ #.-]{0,30}?)\s*=\s*(.*)$")
_BD_DRAM = re.compile(r"^->\s*(start|size)\s*=\s*(?:0x)?([0-9a-fA-F]{1,16})\s*$")
_BD_RESERVED = re.compile(r"^reserved\[\d+\]\s*\[0x([0-9a-fA-F]{1,16})-0x([0-9a-fA-F]{1,16})\]")


def parse_bdinfo(text: str) -> BoardInfo:
    fields: dict[str, str] = {}
    dram: list[tuple[int, int]] = []
    reserved: list[tuple[int, int]] = []
    start: int | None = None
    for raw in _lines(text):
        line = raw.strip()
        if not line:
            continue
        m = _BD_DRAM.match(line)
        if m:
            value = int(m.group(2), 16)
            if m.group(1) == "start":
                start = value
            elif start is not None:
                dram.append((start, value))
                start = None
            continue
        m = _BD_RESERVED.match(line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            if hi >= lo:
                reserved.append((lo, hi + 1))
            continue
        m = _BD_FIELD.match(line)
        if m:
            fields.setdefault(m.group(1).strip(), m.group(2).strip())
    if not fields and not dram:
        raise UBootParseError(f"bdinfo printed no fields: {_short(text)!r}")
    bits = None
    build = fields.get("Build", "")
    bm = re.match(r"(32|64)-bit", build)
    if bm:
        bits = int(bm.group(1))
    reloc = fields.get("relocaddr")
    relocaddr = None
    if reloc and re.fullmatch(r"(?:0x)?[0-9a-fA-F]{1,16}", reloc):
        relocaddr = int(reloc, 16)
    return BoardInfo(
        fields=fields,
        dram=tuple(dram),
        build_bits=bits,
        reserved=tuple(reserved),
        relocaddr=relocaddr,
    )


# ---------------------------------------------------------------------------------------------
# Storage probes: flinfo, virtio/nvme/usb/scsi info, mmc info, mtd list

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "Bytes": 1,
    "kB": 1 << 10,
    "KB": 1 << 10,
    "KiB": 1 << 10,
    "MB": 1 << 20,
    "MiB": 1 << 20,
    "GB": 1 << 30,
    "GiB": 1 << 30,
    "TB": 1 << 40,
    "TiB": 1 << 40,
}


def _size(number: str, unit: str) -> int:
    try:
        value = float(number)
    except ValueError as e:
        raise UBootParseError(f"size {number!r} is not a number") from e
    return int(value * _SIZE_UNITS.get(unit, 1))


@dataclass(frozen=True)
class FlashSector:
    start: int
    size_bytes: int
    protected: bool


@dataclass(frozen=True)
class FlashBank:
    """One CFI flash bank as ``flinfo`` lists it."""

    number: int
    size_bytes: int
    #: "Intel Extended", "AMD Standard", ... (the words before "command set").
    command_set: str
    port_width_bits: int | None
    chip_width_bits: int | None
    sectors: tuple[FlashSector, ...]

    @property
    def base(self) -> int:
        return self.sectors[0].start

    @property
    def end(self) -> int:
        return self.base + self.size_bytes

    @property
    def uniform_sector_bytes(self) -> int | None:
        sizes = {s.size_bytes for s in self.sectors}
        return sizes.pop() if len(sizes) == 1 else None

    def sector_at(self, address: int) -> FlashSector | None:
        for s in self.sectors:
            if s.start <= address < s.start + s.size_bytes:
                return s
        return None


_FL_BANK = re.compile(
    r"^Bank # ?(\d+): (.*?)\s+Size: ([0-9.]+) ?([kKMGT]?i?B?)(?: in (\d+) Sectors)?\s*$"
)
_FL_WIDTH = re.compile(r"\((\d+) x (\d+)\)")
_FL_CMDSET = re.compile(r"^\s*(.+?) command set")
_FL_SECTOR = re.compile(r"([0-9A-Fa-f]{8,16})(\s+RO)?")


def parse_flinfo(text: str) -> tuple[FlashBank, ...]:
    """Banks and sectors from ``flinfo``; a bank without sector addresses is skipped."""
    banks: list[FlashBank] = []
    current: dict[str, object] | None = None
    starts: list[tuple[int, bool]] = []

    def close() -> None:
        if current is None or not starts:
            return
        size = int(str(current["size"]))
        base = starts[0][0]
        sectors = []
        for i, (start, ro) in enumerate(starts):
            nxt = starts[i + 1][0] if i + 1 < len(starts) else base + size
            if nxt <= start:
                raise UBootParseError(f"flinfo lists sector 0x{start:x} out of order")
            sectors.append(FlashSector(start, nxt - start, ro))
        widths = current.get("widths")
        port = chip = None
        if isinstance(widths, tuple):
            port, chip = int(widths[0]), int(widths[1])
        banks.append(
            FlashBank(
                number=int(str(current["number"])),
                size_bytes=size,
                command_set=str(current.get("cmdset", "")),
                port_width_bits=port,
                chip_width_bits=chip,
                sectors=tuple(sectors),
            )
        )

    in_sectors = False
    for line in _lines(text):
        m = _FL_BANK.match(line.strip())
        if m:
            close()
            starts = []
            in_sectors = False
            wm = _FL_WIDTH.search(m.group(2))
            current = {
                "number": m.group(1),
                "size": _size(m.group(3), m.group(4)),
                "widths": (wm.group(1), wm.group(2)) if wm else None,
            }
            continue
        if current is None:
            continue
        cm = _FL_CMDSET.match(line)
        if cm and "cmdset" not in current:
            current["cmdset"] = cm.group(1).strip()
            continue
        if "Sector Start Addresses" in line:
            in_sectors = True
            continue
        if in_sectors and line.strip():
            for sm in _FL_SECTOR.finditer(line):
                starts.append((int(sm.group(1), 16), sm.group(2) is not None))
    close()
    return tuple(banks)


@dataclass(frozen=True)
class BlockDevice:
    """A block device from ``virtio info``/``nvme info``/``usb info``/``scsi info``."""

    interface: str
    index: int
    description: str
    block_bytes: int
    blocks: int

    @property
    def size_bytes(self) -> int:
        return self.block_bytes * self.blocks

    @property
    def name(self) -> str:
        return f"{self.interface}:{self.index}"


_BLK_DEVICE = re.compile(r"^\s*Device (\d+): (.*)$")
_BLK_CAPACITY = re.compile(r"Capacity: .*\((\d+) x (\d+)\)")


def parse_blk_info(text: str, interface: str) -> tuple[BlockDevice, ...]:
    """Devices from ``<interface> info`` (blk_common format); none is an empty tuple."""
    out: list[BlockDevice] = []
    index: int | None = None
    desc = ""
    for line in _lines(text):
        m = _BLK_DEVICE.match(line)
        if m:
            index, desc = int(m.group(1)), " ".join(m.group(2).split())
            continue
        c = _BLK_CAPACITY.search(line)
        if c and index is not None:
            blocks, block_bytes = int(c.group(1)), int(c.group(2))
            if block_bytes <= 0 or block_bytes & (block_bytes - 1):
                raise UBootParseError(f"{interface} device {index} has block size {block_bytes}")
            out.append(BlockDevice(interface, index, desc, block_bytes, blocks))
            index = None
    return tuple(out)


@dataclass(frozen=True)
class MmcInfo:
    """``mmc info`` of the current device (capacity as printed, rounded by U-Boot)."""

    capacity_bytes: int
    read_block_bytes: int
    fields: dict[str, str] = field(default_factory=dict)


def parse_mmc_info(text: str) -> MmcInfo:
    fields: dict[str, str] = {}
    for line in _lines(text):
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip()] = value.strip()
    cap = re.fullmatch(r"([0-9.]+) ?([KMGT]i?B|B|Bytes)", fields.get("Capacity", ""))
    if cap is None:
        raise UBootParseError(f"mmc info printed no capacity: {_short(text)!r}")
    block = re.match(r"(\d+)", fields.get("Rd Block Len", "512"))
    return MmcInfo(
        capacity_bytes=_size(cap.group(1), cap.group(2)),
        read_block_bytes=int(block.group(1)) if block else 512,
        fields=fields,
    )


@dataclass(frozen=True)
class MtdDevice:
    name: str
    type: str
    block_bytes: int | None
    size_bytes: int | None
    min_io_bytes: int | None


_MTD_NAME = re.compile(r"^\* (\S+)")
_MTD_FIELD = re.compile(r"^\s+- ([a-z /]+): (.*)$")
_MTD_RANGE = re.compile(r"^\s+- 0x([0-9a-fA-F]+)-0x([0-9a-fA-F]+) : ")


def parse_mtd_list(text: str) -> tuple[MtdDevice, ...]:
    out: list[MtdDevice] = []
    cur: dict[str, str] | None = None

    def close() -> None:
        if cur is None:
            return

        def num(key: str) -> int | None:
            v = cur.get(key) if cur else None
            if v is None:
                return None
            m = re.match(r"(?:0x)?([0-9a-fA-F]+)", v)
            return int(m.group(1), 16) if m else None

        size = None
        if "range" in cur:
            lo, hi = cur["range"].split("-")
            size = int(hi, 16) - int(lo, 16)
        out.append(
            MtdDevice(
                name=cur["name"],
                type=cur.get("type", ""),
                block_bytes=num("block size"),
                size_bytes=size,
                min_io_bytes=num("min I/O"),
            )
        )

    for line in _lines(text):
        m = _MTD_NAME.match(line)
        if m:
            close()
            cur = {"name": m.group(1)}
            continue
        if cur is None:
            continue
        r = _MTD_RANGE.match(line)
        if r and "range" not in cur:
            cur["range"] = f"{r.group(1)}-{r.group(2)}"
            continue
        f = _MTD_FIELD.match(line)
        if f:
            cur.setdefault(f.group(1).strip(), f.group(2).strip())
    close()
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Data commands: crc32, cmp, md, block transfers, flash erase/protect, loadx


@dataclass(frozen=True)
class Crc32Result:
    start: int
    #: Last address (inclusive), as printed.
    last: int
    crc: int

    @property
    def length(self) -> int:
        return self.last - self.start + 1


_CRC32 = re.compile(
    r"^(?:CRC32|crc32) for (?:0x)?([0-9a-fA-F]{1,16}) \.\.\. (?:0x)?([0-9a-fA-F]{1,16}) ==> "
    r"(?:0x)?([0-9a-fA-F]{8})\s*$"
)


def parse_crc32(text: str) -> Crc32Result:
    """``crc32 ADDR LEN``: "crc32 for 40200000 ... 4023ffff ==> d45bdc03"."""
    for line in _lines(text):
        m = _CRC32.match(line.strip())
        if m:
            return Crc32Result(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))
    raise UBootParseError(f"no crc32 result in the answer {_short(text)!r}")


#: Digest lengths (hex digits) of the algorithms U-Boot's ``hash``/``md5sum`` print.
DIGEST_HEX = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_DIGEST = re.compile(
    r"^(md5|sha1|sha256|sha512) for (?:0x)?([0-9a-fA-F]{1,16}) \.\.\. (?:0x)?([0-9a-fA-F]{1,16}) "
    r"==> ([0-9a-fA-F]+)\s*$"
)


@dataclass(frozen=True)
class DigestResult:
    """``md5sum``/``hash ALGO``: "sha256 for 40000000 ... 4003ffff ==> 3b8e..."."""

    algorithm: str
    start: int
    length: int
    hexdigest: str


def parse_digest(text: str, algorithm: str) -> DigestResult:
    """The ``ALGO for START ... END ==> HEX`` line of ``md5sum`` or ``hash ALGO``."""
    for line in _lines(text):
        m = _DIGEST.match(line.strip())
        if m and m.group(1) == algorithm:
            start, end, digest = int(m.group(2), 16), int(m.group(3), 16), m.group(4).lower()
            if len(digest) != DIGEST_HEX[algorithm] or end < start:
                raise UBootParseError(f"garbled {algorithm} result {line.strip()!r}")
            return DigestResult(algorithm, start, end - start + 1, digest)
    raise UBootParseError(f"no {algorithm} result in the answer {_short(text)!r}")


@dataclass(frozen=True)
class CmpResult:
    """``cmp[.b|.w|.l|.q] A B COUNT``: how many units matched before the first difference."""

    same_units: int
    unit_bytes: int
    #: (address in A, value, address in B, value) of the first difference, if any.
    first_difference: tuple[int, int, int, int] | None

    @property
    def same_bytes(self) -> int:
        return self.same_units * self.unit_bytes


_CMP_TOTAL = re.compile(
    r"^Total of (\d+) (byte|halfword|word|double word)\(s\) (?:were|was) the same\s*$"
)
_CMP_DIFF = re.compile(
    r"^(?:byte|halfword|word|double word) at 0x([0-9a-fA-F]{1,16}) \(0x([0-9a-fA-F]{1,16})\) "
    r"!= (?:byte|halfword|word|double word) at 0x([0-9a-fA-F]{1,16}) \(0x([0-9a-fA-F]{1,16})\)"
)
_UNITS = {"byte": 1, "halfword": 2, "word": 4, "double word": 8}


def parse_cmp(text: str) -> CmpResult:
    diff = None
    for line in _lines(text):
        s = line.strip()
        d = _CMP_DIFF.match(s)
        if d:
            diff = (
                int(d.group(1), 16),
                int(d.group(2), 16),
                int(d.group(3), 16),
                int(d.group(4), 16),
            )
            continue
        m = _CMP_TOTAL.match(s)
        if m:
            return CmpResult(int(m.group(1)), _UNITS[m.group(2)], diff)
    raise UBootParseError(f"no 'Total of N ... were the same' in the answer {_short(text)!r}")


#: md prints 16 bytes per line.
MD_LINE_BYTES = 16
_MD_ADDR = re.compile(r"^([0-9a-fA-F]{8,16}):")


def parse_md(
    text: str, *, start: int, length: int, width: int = 1, byteorder: str = "little"
) -> bytes:
    """The ``length`` bytes an ``md.<w> START COUNT`` dump shows, checked line by line.

    Each line must carry the expected address and exactly the expected number of
    ``width``-byte words; for bytes that are printable the ASCII column must agree too (U-Boot
    shows other bytes as '.'). Words are turned into bytes in ``byteorder`` (the CPU's).
    """
    if width not in (1, 2, 4, 8):
        raise ValueError(f"md width {width} is not 1, 2, 4 or 8")
    if length % width or start % width:
        raise ValueError(f"md of {length} bytes at 0x{start:x} is not {width}-byte aligned")
    if byteorder not in ("little", "big"):
        raise ValueError(f"byte order {byteorder!r}")
    out = bytearray()
    addr = start
    digits = 2 * width
    for line in _lines(text):
        if len(out) >= length:
            if line.strip():
                raise UBootParseError(f"md printed more than {length} bytes: {_short(line)!r}")
            continue
        m = _MD_ADDR.match(line)
        if m is None:
            if line.strip():
                raise UBootParseError(f"md line {_short(line)!r} has no address")
            continue
        got = int(m.group(1), 16)
        if got != addr:
            raise UBootParseError(f"md line at 0x{got:x} where 0x{addr:x} was expected")
        n = min(MD_LINE_BYTES, length - len(out))
        words = n // width
        body = line[m.end() :]
        expect_len = words * (digits + 1)
        hex_part = body[:expect_len]
        if not re.fullmatch(rf"(?: [0-9a-fA-F]{{{digits}}}){{{words}}}", hex_part):
            raise UBootParseError(f"md line at 0x{addr:x} is malformed: {_short(line)!r}")
        chunk = bytearray()
        for tok in hex_part.split():
            chunk += int(tok, 16).to_bytes(width, byteorder)  # type: ignore[arg-type]
        _check_ascii(chunk, body[expect_len:], addr)
        out += chunk
        addr += n
    if len(out) != length:
        raise UBootParseError(f"md showed {len(out)} of {length} bytes from 0x{start:x}")
    return bytes(out)


def _check_ascii(chunk: bytes | bytearray, tail: str, addr: int) -> None:
    """The ASCII column (the line's last ``len(chunk)`` characters, after at least two
    spaces) agrees with the bytes: printable bytes as themselves, the others as '.'."""
    n = len(chunk)
    if len(tail) < n + 2 or tail[: len(tail) - n].strip(" "):
        raise UBootParseError(f"md line at 0x{addr:x} has no proper ASCII column")
    for b, c in zip(chunk, tail[len(tail) - n :], strict=True):
        expected = chr(b) if 0x20 <= b <= 0x7E else "."
        if c != expected:
            raise UBootParseError(f"md line at 0x{addr:x}: ASCII column disagrees with the hex")


@dataclass(frozen=True)
class BlockTransfer:
    """``<if> read|write ADDR BLK CNT``: what the driver reported."""

    operation: str
    device: int
    block: int
    count: int
    done: int
    ok: bool


_BLK_XFER = re.compile(
    r"^(\w+) (read|write): device (\d+) block # (\d+), count (\d+) \.\.\. "
    r"(-?\d+) blocks (?:read|written): (OK|ERROR)\s*$"
)


def parse_blk_transfer(text: str) -> BlockTransfer:
    for line in _lines(text):
        m = _BLK_XFER.match(line.strip())
        if m:
            return BlockTransfer(
                operation=m.group(2),
                device=int(m.group(3)),
                block=int(m.group(4)),
                count=int(m.group(5)),
                done=int(m.group(6)),
                ok=m.group(7) == "OK" and int(m.group(6)) == int(m.group(5)),
            )
    raise UBootParseError(f"no block transfer result in the answer {_short(text)!r}")


def parse_sector_count(text: str, verb: str) -> int:
    """``erase``/``protect``: "Erased 2 sectors", "Un-Protected 2 sectors"..."""
    m = re.search(rf"(?m)^\s*{re.escape(verb)} (\d+) sectors?\s*$", text)
    if m is None:
        raise UBootParseError(f"no '{verb} N sectors' in the answer {_short(text)!r}")
    return int(m.group(1))


def protected_warning(text: str) -> int:
    """Sectors ``erase`` skipped because they were protected (0 when it did not say)."""
    m = re.search(r"Warning: (\d+) protected sectors will not be erased", text)
    return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class LoadResult:
    """``loadx``/``loady``: the size and start U-Boot reports after the transfer."""

    size_bytes: int
    start: int


_LOAD_SIZE = re.compile(r"## Total Size\s*=\s*0x([0-9a-fA-F]+)\s*=\s*(\d+) Bytes")
_LOAD_START = re.compile(r"## Start Addr\s*=\s*0x([0-9a-fA-F]+)")


def parse_load_result(text: str) -> LoadResult:
    size = _LOAD_SIZE.search(text)
    start = _LOAD_START.search(text)
    if size is None or start is None:
        raise UBootParseError(f"no '## Total Size' in the answer {_short(text)!r}")
    return LoadResult(int(size.group(1), 16), int(start.group(1), 16))


_RC = re.compile(r"^<rc=(\d+)>\s*$")


def split_status(text: str) -> tuple[str, int]:
    """Split the ``<rc=N>`` line the console appends (``; echo "<rc=$?>"``) from the output."""
    lines = _lines(text)
    while lines and not lines[-1].strip():
        lines.pop()
    if lines:
        m = _RC.match(lines[-1].strip())
        if m:
            return "\n".join(lines[:-1]), int(m.group(1))
    raise UBootParseError(f"the command's exit status is missing from {_short(text)!r}")


# ---------------------------------------------------------------------------------------------
# SPI NOR (sf), raw NAND (nand), mtdparts (cmd/sf.c, cmd/nand.c, nand_util.c, cmd/mtdparts.c)


@dataclass(frozen=True)
class SpiFlashInfo:
    """``sf probe``: "SF: Detected w25q64cv with page size 256 Bytes, erase size 64 KiB,
    total 8 MiB"."""

    name: str
    page_bytes: int
    erase_bytes: int
    size_bytes: int


_SF_DETECTED = re.compile(
    r"SF: Detected (\S+) with page size ([0-9.]+) ?([KMG]iB|Bytes|B), erase size ([0-9.]+) ?"
    r"([KMG]iB|Bytes|B), total ([0-9.]+) ?([KMG]iB|Bytes|B)"
)


def parse_sf_probe(text: str) -> SpiFlashInfo:
    for line in _lines(text):
        m = _SF_DETECTED.search(line)
        if m:
            info = SpiFlashInfo(
                name=m.group(1),
                page_bytes=_size(m.group(2), m.group(3)),
                erase_bytes=_size(m.group(4), m.group(5)),
                size_bytes=_size(m.group(6), m.group(7)),
            )
            if not 0 < info.erase_bytes <= info.size_bytes or info.page_bytes <= 0:
                raise UBootParseError(f"sf probe reported an impossible geometry: {_short(line)!r}")
            return info
    raise UBootParseError(f"no 'SF: Detected ...' in the answer {_short(text)!r}")


@dataclass(frozen=True)
class SfResult:
    """``sf read|write|erase``: "SF: 65536 bytes @ 0x80000 Written: OK" (or "ERROR -22")."""

    verb: str
    length: int
    offset: int
    ok: bool
    code: int | None = None


_SF_RESULT = re.compile(
    r"SF: (\d+) bytes @ (0x[0-9a-fA-F]+|0) (Read|Written|Erased): (OK|ERROR(?: (-?\d+))?)\s*$"
)


def parse_sf_result(text: str) -> SfResult:
    for line in _lines(text):
        m = _SF_RESULT.search(line)
        if m:
            return SfResult(
                verb=m.group(3),
                length=int(m.group(1)),
                offset=int(m.group(2), 16),
                ok=m.group(4) == "OK",
                code=int(m.group(5)) if m.group(5) else None,
            )
    raise UBootParseError(f"no 'SF: N bytes @ ...' result in the answer {_short(text)!r}")


@dataclass(frozen=True)
class NandChipInfo:
    """One device of ``nand info`` (``nand_print_and_set_info``)."""

    device: int
    name: str
    erase_bytes: int
    page_bytes: int
    oob_bytes: int
    chips: int = 1


_NAND_DEVICE = re.compile(r"^Device (\d+): (?:(\d+)x )?(\S+), sector size (\d+) KiB\s*$")
_NAND_FIELD = re.compile(r"^\s+(Page size|OOB size|Erase size)\s+(\d+) b\s*$")


def parse_nand_info(text: str) -> tuple[NandChipInfo, ...]:
    """Devices from ``nand info`` / ``nand device``; a device without its page and erase sizes
    is a parse error (the answer was cut)."""
    out: list[NandChipInfo] = []
    current: dict[str, int] | None = None
    head: tuple[int, str, int] | None = None

    def close() -> None:
        if head is None or current is None:
            return
        if "Page size" not in current or "Erase size" not in current:
            raise UBootParseError(f"nand info of device {head[0]} lacks its page or erase size")
        erase, page = current["Erase size"], current["Page size"]
        if page <= 0 or erase <= 0 or erase % page:
            raise UBootParseError(f"nand device {head[0]}: erase size {erase}, page size {page}")
        out.append(NandChipInfo(head[0], head[1], erase, page, current.get("OOB size", 0), head[2]))

    for line in _lines(text):
        m = _NAND_DEVICE.match(line.strip())
        if m:
            close()
            head = (int(m.group(1)), m.group(3), int(m.group(2) or 1))
            current = {}
            continue
        f = _NAND_FIELD.match(line)
        if f and current is not None:
            current.setdefault(f.group(1), int(f.group(2)))
    close()
    return tuple(out)


_BAD_LINE = re.compile(r"^\s+(?:0x)?([0-9a-fA-F]{8,16})\s*$")


def parse_nand_bad(text: str) -> tuple[int, ...]:
    """Offsets of bad blocks from ``nand bad`` ("  00500000") or ``mtd bad`` ("\t0x00500000"),
    sorted; any other line after the header is a parse error."""
    out: set[int] = set()
    started = False
    for line in _lines(text):
        if re.match(r"^(?:Device \d+ bad blocks:|MTD device \S+ bad blocks list:)\s*$", line):
            started = True
            continue
        if not line.strip():
            continue
        m = _BAD_LINE.match(line)
        if m is None or not started:
            raise UBootParseError(f"bad block list line {_short(line)!r} is not an offset")
        out.add(int(m.group(1), 16))
    if not started:
        raise UBootParseError(f"no bad block list in the answer {_short(text)!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class NandTransfer:
    """``nand read|write``: the bytes U-Boot reports, whether it said OK, and the bad blocks it
    skipped on the way ("Skip bad block 0x...", "Skipping bad block 0x...")."""

    operation: str
    length: int
    ok: bool
    skipped: tuple[int, ...] = ()
    #: "NAND write to offset ... failed -5", "Attempt to ...", "Size of ... exceeds ...".
    messages: tuple[str, ...] = ()


_NAND_RW = re.compile(r"^ ?(\d+) bytes (read|written): (OK|ERROR)\s*$")
_NAND_SKIP = re.compile(r"^Skip(?:ping)? bad block(?: at)? +0x([0-9a-fA-F]+)\b")
_NAND_PROBLEM = re.compile(
    r"^(NAND [a-z.]+: )?"
    r"(?:NAND (?:write to|read from) offset .* failed.*|Attempt to .*|Size .*exceeds.*|"
    r"Offset exceeds device limit|.*MTD Erase failure.*|.*MTD get bad block failed.*|"
    r"no devices available|partition .* not found)$"
)


def parse_nand_rw(text: str) -> NandTransfer:
    skipped: list[int] = []
    messages: list[str] = []
    for raw in _lines(text):
        line = raw.strip("\r")
        s = line.strip()
        m = _NAND_SKIP.match(s)
        if m:
            skipped.append(int(m.group(1), 16))
            continue
        p = _NAND_PROBLEM.match(s)
        if p:
            messages.append(s[p.end(1) :] if p.group(1) else s)
            continue
        r = _NAND_RW.match(line)
        if r:
            return NandTransfer(
                operation="write" if r.group(2) == "written" else "read",
                length=int(r.group(1)),
                ok=r.group(3) == "OK",
                skipped=tuple(skipped),
                messages=tuple(messages),
            )
    if messages:
        return NandTransfer("", 0, False, tuple(skipped), tuple(messages))
    raise UBootParseError(f"no 'N bytes read|written' in the answer {_short(text)!r}")


@dataclass(frozen=True)
class NandErase:
    """``nand erase``: OK or ERROR, the bad blocks skipped, the blocks that failed to erase
    (U-Boot reports those and still says OK), and the last block it reported erasing."""

    ok: bool
    skipped: tuple[int, ...]
    failures: int
    last_erased: int | None


_ERASING_AT = re.compile(r"Erasing at 0x([0-9a-fA-F]+) -- +(\d+)% complete\.")


def parse_nand_erase(text: str) -> NandErase:
    skipped: list[int] = []
    failures = 0
    last: int | None = None
    verdict: bool | None = None
    for raw in _lines(text):
        for part in raw.split("\r"):
            s = part.strip()
            if not s:
                continue
            m = _NAND_SKIP.match(s)
            if m:
                skipped.append(int(m.group(1), 16))
                continue
            for e in _ERASING_AT.finditer(s):
                last = int(e.group(1), 16)
            if "MTD Erase failure" in s:
                failures += 1
            if s in ("OK", "ERROR"):
                verdict = s == "OK"
    if verdict is None:
        raise UBootParseError(f"no OK or ERROR at the end of the erase: {_short(text)!r}")
    return NandErase(verdict, tuple(skipped), failures, last)


@dataclass(frozen=True)
class MtdPartition:
    name: str
    offset: int
    #: None: the fill-up partition ("-"), to the end of the device.
    size: int | None
    read_only: bool = False


_MTDPART = re.compile(
    r"(-|(?:0[xX][0-9a-fA-F]+|\d+)[kKmMgG]?)(?:@((?:0[xX][0-9a-fA-F]+|\d+)[kKmMgG]?))?"
    r"\(([^()]{1,64})\)((?:ro|lk)*)"
)


def _memsize(text: str) -> int:
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)([kKmMgG]?)", text)
    if m is None:
        raise UBootParseError(f"mtdparts size {text!r} is not a number")
    return int(m.group(1), 0) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def parse_mtdparts(value: str) -> dict[str, tuple[MtdPartition, ...]]:
    """``mtdparts`` (the variable's value, with or without ``mtdparts=``): partitions per
    mtd-id. Partitions without ``@offset`` follow the previous one."""
    text = value.strip().removeprefix("mtdparts=")
    out: dict[str, tuple[MtdPartition, ...]] = {}
    if not text:
        return out
    for device in text.split(";"):
        ident, sep, items = device.partition(":")
        if not sep or not ident.strip():
            raise UBootParseError(f"mtdparts entry {_short(device)!r} has no 'mtd-id:'")
        parts: list[MtdPartition] = []
        pos = 0
        for item in items.split(","):
            m = _MTDPART.fullmatch(item.strip())
            if m is None:
                raise UBootParseError(f"mtdparts partition {_short(item)!r} is malformed")
            if parts and parts[-1].size is None:
                raise UBootParseError("mtdparts has a partition after the fill-up one ('-')")
            start = _memsize(m.group(2)) if m.group(2) else pos
            size = None if m.group(1) == "-" else _memsize(m.group(1))
            if size == 0:
                raise UBootParseError(f"mtdparts partition {m.group(3)!r} is empty")
            parts.append(MtdPartition(m.group(3), start, size, "ro" in m.group(4)))
            pos = start + (size or 0)
        out[ident.strip()] = tuple(parts)
    return out


def parse_mtdids(value: str) -> dict[str, str]:
    """``mtdids``: "nand0=gpmi-nand,nor0=spi0.0" as {"nand0": "gpmi-nand", ...}."""
    out: dict[str, str] = {}
    for item in value.split(","):
        dev, sep, ident = item.partition("=")
        if not item.strip():
            continue
        if not sep or not dev.strip() or not ident.strip():
            raise UBootParseError(f"mtdids entry {_short(item)!r} is not dev=mtd-id")
        out[dev.strip()] = ident.strip()
    return out


def crc32_of_fill(value: int, length: int) -> int:
    """CRC-32 of ``length`` bytes of ``value`` (for fill checks without building the bytes)."""
    crc = 0
    block = bytes([value]) * min(length, 1 << 16)
    left = length
    while left:
        n = min(left, len(block))
        crc = zlib.crc32(block[:n], crc)
        left -= n
    return crc


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """CRC-32 of A+B from CRC-32(A), CRC-32(B) and len(B) (zlib's method: the CRC register
    advanced over len(B) zero bytes by repeated squaring of the one-zero-bit operator)."""
    if length2 <= 0:
        return crc1
    # Operator for one zero bit: the reflected polynomial, then a shift.
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    n = length2
    while True:
        even = _gf2_square(odd)  # first pass: one zero byte
        if n & 1:
            crc1 = _gf2_times(even, crc1)
        n >>= 1
        if not n:
            break
        odd = _gf2_square(even)
        if n & 1:
            crc1 = _gf2_times(odd, crc1)
        n >>= 1
        if not n:
            break
    return crc1 ^ crc2


__all__ = [
    "AUTOBOOT_PATTERN",
    "DIGEST_HEX",
    "MD_LINE_BYTES",
    "BlockDevice",
    "BlockTransfer",
    "BoardInfo",
    "CmpResult",
    "Crc32Result",
    "DigestResult",
    "FlashBank",
    "FlashSector",
    "LoadResult",
    "MmcInfo",
    "MtdDevice",
    "MtdPartition",
    "NandChipInfo",
    "NandErase",
    "NandTransfer",
    "SfResult",
    "SpiFlashInfo",
    "UBootParseError",
    "UBootVersion",
    "crc32_combine",
    "crc32_of_fill",
    "error_lines",
    "parse_bdinfo",
    "parse_blk_info",
    "parse_blk_transfer",
    "parse_cmp",
    "parse_crc32",
    "parse_digest",
    "parse_flinfo",
    "parse_help",
    "parse_load_result",
    "parse_md",
    "parse_mmc_info",
    "parse_mtd_list",
    "parse_mtdids",
    "parse_mtdparts",
    "parse_nand_bad",
    "parse_nand_erase",
    "parse_nand_info",
    "parse_nand_rw",
    "parse_printenv",
    "parse_sector_count",
    "parse_sf_probe",
    "parse_sf_result",
    "protected_warning",
    "split_status",
]
