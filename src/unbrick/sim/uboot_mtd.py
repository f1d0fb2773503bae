"""The ``sf``, ``nand`` and ``mtd`` commands of the simulated U-Boot console.

Devices whose flash is a SPI NOR chip (``spi-nor``) or a raw NAND chip (``nand``) have no CFI
bank in the CPU's address space: U-Boot reaches them through these commands, whose arguments,
checks, output and exit status follow U-Boot 2023.01 (``cmd/sf.c``, ``cmd/nand.c``,
``cmd/mtd.c``, ``cmd/legacy-mtd-utils.c``, ``drivers/mtd/nand/raw/nand_util.c``):

* ``sf probe`` must run before the other ``sf`` commands; ``sf read/write/update`` print the
  ``device 0 offset 0x.., size 0x..`` line of ``mtd_arg_off_size`` and then ``SF: N bytes @
  0x.. Read: OK``; ``sf erase`` of a range that is not a multiple of the erase size fails with
  ``Erased: ERROR -22`` (the "not multiple of erase size" text is a debug message, not printed);
* ``nand read/write`` skip bad blocks as ``nand_read_skip_bad``/``nand_write_skip_bad`` do
  (the data continues in the next good block; the limit is the partition or the chip), and
  ``nand write`` reads every block back and compares it (``WITH_WR_VERIFY``); ``nand erase``
  counts bad blocks in the size it was given and skips them (``.spread`` does not count them);
* ``mtd read/write/erase`` work on the chip (``nand0``, ``nor0``) or on an ``mtdparts``
  partition, with offsets relative to it, and skip bad blocks; ``mtd write`` leaves pages that
  are all 0xFF alone on NAND.

Every flash access goes through :class:`~unbrick.sim.device.SimDevice`, so the chip's rules
(NOR bits only clear, NAND pages programmed once per erase, bad blocks refuse erase and
program) and power-cut faults apply. Partitions come from the session's ``mtdids`` and
``mtdparts`` variables, as U-Boot reads them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unbrick.errors import DeviceError
from unbrick.sim.flash import MAX_OP_BYTES, FlashGeometry, PowerLoss, pad_to_page

if TYPE_CHECKING:
    from unbrick.sim.uboot_face import UBootFace

log = logging.getLogger(__name__)

USAGE = -1
#: Bytes per SPI NOR program page (the ``page size`` ``sf probe`` reports).
SF_PAGE_BYTES = 256
NAND_OOB_BYTES = 64
_EIO = -5
_EINVAL = -22
_ENODEV = -19
_SKIP_PAD = " " * 42
#: What the chips are called: U-Boot's device name and the mtd-id of ``mtdparts``.
MTD_NAMES = {"spi-nor": ("nor0", "spi0.0"), "nand": ("nand0", "sim-nand.0")}

SF_USAGE = (
    "probe [[bus:]cs] [hz] [mode]\t- init flash device on given SPI bus\n"
    "\t\t\t\t  and chip select\n"
    "sf read addr offset|partition len\t- read `len' bytes starting at\n"
    "\t\t\t\t          `offset' or from start of mtd\n"
    "\t\t\t\t\t  `partition'to memory at `addr'\n"
    "sf write addr offset|partition len\t- write `len' bytes from memory\n"
    "\t\t\t\t          at `addr' to flash at `offset'\n"
    "\t\t\t\t\t  or to start of mtd `partition'\n"
    "sf erase offset|partition [+]len\t- erase `len' bytes from `offset'\n"
    "\t\t\t\t\t  or from start of mtd `partition'\n"
    "\t\t\t\t\t `+len' round up `len' to block size\n"
    "sf update addr offset|partition len\t- erase and write `len' bytes from memory\n"
    "\t\t\t\t\t  at `addr' to flash at `offset'\n"
    "\t\t\t\t\t  or to start of mtd `partition'\n"
    "sf protect lock/unlock sector len\t- protect/unprotect 'len' bytes starting\n"
    "\t\t\t\t\t  at address 'sector'"
)
NAND_USAGE = (
    "info - show available NAND devices\n"
    "nand device [dev] - show or set current device\n"
    "nand read - addr off|partition size\n"
    "nand write - addr off|partition size\n"
    "    read/write 'size' bytes starting at offset 'off'\n"
    "    to/from memory address 'addr', skipping bad blocks.\n"
    "nand erase[.spread] [clean] off size - erase 'size' bytes from offset 'off'\n"
    "    With '.spread', erase enough for given file size, otherwise,\n"
    "    'size' includes skipped bad blocks.\n"
    "nand erase.part [clean] partition - erase entire mtd partition'\n"
    "nand erase.chip [clean] - erase entire chip'\n"
    "nand bad - show bad blocks"
)
MTD_USAGE = (
    "- generic operations on memory technology devices\n\n"
    "mtd list\n"
    "mtd read[.raw][.oob]                  <name> <addr> [<off> [<size>]]\n"
    "mtd write[.raw][.oob][.dontskipff]    <name> <addr> [<off> [<size>]]\n"
    "mtd erase[.dontskipbad]               <name>        [<off> [<size>]]\n"
    "\n"
    "Specific functions:\n"
    "mtd bad                               <name>"
)


# -- pure helpers ----------------------------------------------------------------------------


def str2off(text: str) -> int | None:
    """U-Boot's ``str2off``: the whole text as a hexadecimal number (``0x`` optional)."""
    s = text[2:] if text[:2].lower() == "0x" else text
    if not s or any(c not in "0123456789abcdefABCDEF" for c in s):
        return None
    return int(s, 16)


def strtoul0(text: str) -> int | None:
    """``simple_strtoul(text, &end, 0)`` that must use the whole text: decimal, ``0x`` hex,
    or octal with a leading 0."""
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16)
        if len(text) > 1 and text.startswith("0"):
            return int(text[1:], 8)
        return int(text, 10)
    except ValueError:
        return None


def memsize(text: str) -> int | None:
    """A size of ``mtdparts`` (``memparse``): a number with an optional K, M or G suffix."""
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)([kKmMgG]?)", text)
    if m is None:
        return None
    value = int(m.group(1), 0)
    return value << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


@dataclass(frozen=True)
class Part:
    name: str
    offset: int
    size: int
    read_only: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.size


def mtdparts_partitions(value: str, mtd_id: str, chip_bytes: int) -> list[Part]:
    """The partitions ``mtdparts`` gives the chip ``mtd_id`` (none when it names none or is
    malformed: U-Boot then has no partitions either)."""
    text = value.removeprefix("mtdparts=")
    for device in text.split(";"):
        ident, sep, items = device.partition(":")
        if not sep or ident.strip() != mtd_id:
            continue
        parts: list[Part] = []
        pos = 0
        for item in items.split(","):
            m = re.fullmatch(r"\s*(-|[0-9a-fA-FxX]+[kKmMgG]?)(?:@([0-9a-fA-FxX]+[kKmMgG]?))?"
                             r"\((.*?)\)(ro)?\s*", item)  # fmt: skip
            if m is None:
                return []
            start = memsize(m.group(2)) if m.group(2) else pos
            size = chip_bytes - (start or 0) if m.group(1) == "-" else memsize(m.group(1))
            if start is None or size is None or size <= 0 or start + size > chip_bytes:
                return []
            parts.append(Part(m.group(3), start, size, m.group(4) == "ro"))
            pos = start + size
        return parts
    return []


def mtdparts_text(mtd_id: str, parts: list[Part]) -> str:
    """``mtdparts=ID:256k(bootloader)ro,...`` for contiguous or placed partitions."""
    items = []
    pos = 0
    for p in parts:
        size = f"{p.size // 1024}k" if p.size % 1024 == 0 else f"0x{p.size:x}"
        at = "" if p.offset == pos else f"@0x{p.offset:x}"
        items.append(f"{size}{at}({p.name}){'ro' if p.read_only else ''}")
        pos = p.end
    return f"mtdparts={mtd_id}:{','.join(items)}"


def check_skip_len(geo: FlashGeometry, offset: int, length: int) -> tuple[int, int]:
    """``check_skip_len``: (bytes of flash the access spans, 1 when it crosses a bad block,
    0 when not, -1 when it runs off the chip)."""
    eb = geo.erase_block_bytes
    bad = set(geo.bad_blocks)
    used = 0
    excl_bad = 0
    found = 0
    while excl_bad < length:
        if offset >= geo.size_bytes:
            return used, -1
        block_off = offset % eb
        block_len = eb - block_off
        if offset // eb in bad:
            found = 1
        else:
            excl_bad += block_len
        offset += block_len
        used += block_len
    if excl_bad > length:
        used -= excl_bad - length
    return used, found


def flip_one_bit(data: bytes) -> bytes:
    """``data`` with the lowest bit of its middle byte inverted (a marginal cell)."""
    if not data:
        return data
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


# -- the commands ------------------------------------------------------------------------------


class MtdCommands:
    """The MTD commands of one console; ``face`` supplies the terminal, memory and session."""

    def __init__(self, face: UBootFace) -> None:
        self.face = face

    # -- shared --------------------------------------------------------------------------

    @property
    def geo(self) -> FlashGeometry:
        return self.face.device.config.geometry

    @property
    def _nand(self) -> bool:
        return self.geo.type == "nand"

    @property
    def mtd_name(self) -> str:
        return MTD_NAMES[self.geo.type][0]

    def _say(self, text: str) -> None:
        self.face._say(text)

    def partitions(self) -> list[Part]:
        env = self.face._s.env
        name = self.mtd_name
        mtd_id = name
        for item in env.get("mtdids", "").split(","):
            dev, sep, ident = item.partition("=")
            if sep and dev.strip() == name:
                mtd_id = ident.strip()
        return mtdparts_partitions(env.get("mtdparts", ""), mtd_id, self.geo.size_bytes)

    def _find_part(self, name: str) -> Part | None:
        return next((p for p in self.partitions() if p.name == name), None)

    def _arg_off(self, arg: str) -> tuple[int, int, int] | None:
        """``mtd_arg_off``: (offset, size, maxsize) of an offset or partition name; None after
        printing why not."""
        chip = self.geo.size_bytes
        off = str2off(arg)
        if off is None:
            part = self._find_part(arg)
            if part is None:
                self._say(f"partition {arg} not found\n")
                return None
            return part.offset, part.size, part.size
        if off >= chip:
            self._say("Offset exceeds device limit\n")
            return None
        return off, chip - off, chip - off

    def _arg_off_size(self, args: list[str]) -> tuple[int, int, int] | None:
        """``mtd_arg_off_size``: (offset, size, maxsize), printing the ``device 0 ...`` line;
        None after printing why not."""
        chip = self.geo.size_bytes
        if not args:
            off, size, maxsize = 0, chip, chip
        else:
            found = self._arg_off(args[0])
            if found is None:
                return None
            off, size, maxsize = found
            if len(args) > 1:
                given = str2off(args[1])
                if given is None:
                    self._say(f"'{args[1]}' is not a number\n")
                    return None
                if given > maxsize:
                    self._say("Size exceeds partition or device limit\n")
                    return None
                size = given
        if size == chip:
            self._say("device 0 whole chip\n")
        else:
            self._say(f"device 0 offset 0x{off:x}, size 0x{size:x}\n")
        return off, size, maxsize

    def _flash_read(self, offset: int, length: int) -> bytes:
        parts = []
        for pos in range(offset, offset + length, MAX_OP_BYTES):
            parts.append(self.face.device.read(pos, min(MAX_OP_BYTES, offset + length - pos)))
        return b"".join(parts)

    def _flash_program(self, offset: int, data: bytes) -> None:
        for pos in range(0, len(data), MAX_OP_BYTES):
            self.face.device.program(offset + pos, data[pos : pos + MAX_OP_BYTES])

    def _stored(self, data: bytes) -> bytes:
        """What a write command stores: ``data``, unless a write fault is armed."""
        return self.face._corrupt(data)

    # -- sf ------------------------------------------------------------------------------

    def sf(self, args: list[str], size: int | None, repeat: bool) -> int:
        if not args:
            return USAGE
        cmd, rest = args[0], args[1:]
        if cmd == "probe":
            return self._sf_probe(rest)
        if not self.face._s.sf_probed:
            self._say("No SPI flash selected. Please run `sf probe'\n")
            return 1
        if cmd in ("read", "write", "update"):
            return self._sf_read_write(cmd, rest)
        if cmd == "erase":
            return self._sf_erase(rest)
        if cmd == "protect" and len(rest) == 3 and rest[0] in ("lock", "unlock"):
            return 0 if str2off(rest[1]) is not None and str2off(rest[2]) is not None else 1
        return USAGE

    def sf_detected_line(self) -> str:
        geo = self.geo
        chip = self.face.device.config.chip.lower()
        from unbrick.sim.uboot_face import size_text  # noqa: PLC0415 - that module imports this

        return (
            f"SF: Detected {chip} with page size {size_text(SF_PAGE_BYTES)}, erase size "
            f"{size_text(geo.erase_block_bytes)}, total {size_text(geo.size_bytes)}"
        )

    def _sf_probe(self, args: list[str]) -> int:
        bus, cs = 0, 0
        if args:
            head, colon, tail = args[0].partition(":")
            first = strtoul0(head) if head else None
            if first is None or (colon and not tail):
                return USAGE
            cs = first
            if colon:
                second = strtoul0(tail)
                if second is None:
                    return USAGE
                bus, cs = first, second
        if len(args) > 1 and strtoul0(args[1]) is None:
            return USAGE
        if len(args) > 2 and str2off(args[2]) is None:
            return USAGE
        if (bus, cs) != (0, 0):
            self.face._s.sf_probed = False
            self._say(f"Failed to initialize SPI flash at {bus}:{cs} (error {_ENODEV})\n")
            return 1
        self.face._s.sf_probed = True
        self._say(self.sf_detected_line() + "\n")
        return 0

    def _sf_read_write(self, cmd: str, args: list[str]) -> int:
        if len(args) < 2 or str2off(args[0]) is None:
            return USAGE
        addr = str2off(args[0]) or 0
        found = self._arg_off_size(args[1:])
        if found is None:
            return USAGE
        offset, length, _ = found
        chip = self.geo.size_bytes
        if offset + length > chip:
            self._say(f"ERROR: attempting {cmd} past flash size (0x{chip:x})\n")
            return 1
        if cmd == "update":
            return self._sf_update(addr, offset, length)
        if cmd == "read":
            self.face._write_ram(addr, self._flash_read(offset, length))
            self._say(f"SF: {length} bytes @ 0x{offset:x} Read: OK\n")
            return 0
        data = self.face._read_mem(addr, length)
        self._flash_program(offset, self._stored(data))
        self._say(f"SF: {length} bytes @ 0x{offset:x} Written: OK\n")
        return 0

    def _sf_update(self, addr: int, offset: int, length: int) -> int:
        eb = self.geo.erase_block_bytes
        started = time.monotonic()
        skipped = 0
        pos = 0
        while pos < length:
            at = offset + pos
            n = min(length - pos, eb - at % eb)
            want = self.face._read_mem(addr + pos, n)
            sector = at - at % eb
            current = self._flash_read(sector, eb)
            if current[at % eb : at % eb + n] == want:
                skipped += n
            else:
                patched = current[: at % eb] + want + current[at % eb + n :]
                self.face.device.erase(sector, eb)
                self._flash_program(sector, self._stored(patched))
            pos += n
        ms = max(1, int((time.monotonic() - started) * 1000))
        rate = length * 1000 // ms
        self._say(
            f"\r{length - skipped} bytes written, {skipped} bytes skipped in "
            f"{ms // 1000}.{ms % 1000}s, speed {rate} B/s\n"
        )
        return 0

    def _sf_erase(self, args: list[str]) -> int:
        if len(args) < 2:
            return USAGE
        found = self._arg_off(args[0])
        if found is None:
            return USAGE
        offset = found[0]
        text = args[1]
        round_up = text.startswith("+")
        length = str2off(text[1:] if round_up else text)
        if length is None:
            return USAGE
        eb = self.geo.erase_block_bytes
        if round_up:
            length = -(-length // eb) * eb
        chip = self.geo.size_bytes
        if offset + length > chip:
            self._say(f"ERROR: attempting erase past flash size (0x{chip:x})\n")
            return 1
        if offset % eb or length % eb:
            self._say(f"SF: {length} bytes @ 0x{offset:x} Erased: ERROR {_EINVAL}\n")
            return 1
        if length:
            self.face.device.erase(offset, length)
        self._say(f"SF: {length} bytes @ 0x{offset:x} Erased: OK\n")
        return 0

    # -- nand ----------------------------------------------------------------------------

    def nand_info_lines(self) -> str:
        geo = self.geo
        return (
            f"Device 0: {self.mtd_name}, sector size {geo.erase_block_bytes >> 10} KiB\n"
            f"  Page size     {geo.page_bytes:8d} b\n"
            f"  OOB size      {NAND_OOB_BYTES:8d} b\n"
            f"  Erase size    {geo.erase_block_bytes:8d} b\n"
            f"  ecc strength  {8:8d} bits\n"
            f"  ecc step size {512:8d} b\n"
            f"  subpagesize   {geo.page_bytes:8d} b\n"
            "  options       0x40004200\n"
            "  bbt options   0x00008000\n"
        )

    def nand(self, args: list[str], size: int | None, repeat: bool) -> int:
        if not args:
            return USAGE
        cmd = args[0]
        if repeat:
            return 0  # only "nand dump" repeats, and the sim has no dump
        if cmd == "info":
            self._say("\n" + self.nand_info_lines())
            self._set_geometry_env()
            return 0
        if cmd == "device":
            if len(args) < 2:
                self._say("\n" + self.nand_info_lines())
                self._set_geometry_env()
            return 0
        if cmd == "bad":
            eb = self.geo.erase_block_bytes
            lines = "".join(f"  {b * eb:08x}\n" for b in sorted(self.geo.bad_blocks))
            self._say(f"\nDevice 0 bad blocks:\n{lines}")
            return 0
        if cmd.startswith("erase"):
            return self._nand_erase(cmd, args)
        if cmd.startswith(("read", "write")):
            return self._nand_read_write(cmd, args)
        return USAGE

    def _set_geometry_env(self) -> None:
        env = self.face._s.env
        env["nand_writesize"] = f"{self.geo.page_bytes:x}"
        env["nand_oobsize"] = f"{NAND_OOB_BYTES:x}"
        env["nand_erasesize"] = f"{self.geo.erase_block_bytes:x}"

    def _nand_erase(self, cmd: str, args: list[str]) -> int:
        clean = len(args) > 1 and args[1] == "clean"
        first = 2 if clean else 1
        suffix = cmd[5:]
        wanted = {"": 2, ".spread": 2, ".part": 1, ".chip": 0}.get(suffix)
        if wanted is None or len(args) != first + wanted:
            return USAGE
        self._say(f"\nNAND {cmd}: ")
        found = self._arg_off_size(args[first:])
        if found is None:
            return 1
        offset, length, _ = found
        ok = self.erase_skip_bad(offset, length, spread=suffix == ".spread")
        self._say("OK\n" if ok else "ERROR\n")
        return 0 if ok else 1

    def erase_skip_bad(self, offset: int, length: int, *, spread: bool) -> bool:
        """``nand_erase_opts``; False when it failed before erasing."""
        geo = self.geo
        eb = geo.erase_block_bytes
        if offset % eb:
            self._say("Attempt to erase non block-aligned data\n")
            return False
        bad = set(geo.bad_blocks)
        total = -(-length // eb)
        erased = 0
        percent = -1
        addr = offset
        while erased < total:
            if addr >= geo.size_bytes:
                self._say(f"\n{self.mtd_name}: MTD get bad block failed: {_EINVAL}\n")
                return False
            if addr // eb in bad:
                self._say(f"\rSkipping bad block at  0x{addr:08x}{_SKIP_PAD}\n")
                if not spread:
                    erased += 1
                addr += eb
                continue
            erased += 1
            try:
                self.face.device.erase(addr, eb)
            except PowerLoss:
                raise
            except DeviceError as e:
                log.info("sim nand erase at 0x%x failed: %s", addr, e)
                self._say(f"\n{self.mtd_name}: MTD Erase failure: {_EIO}\n")
                addr += eb
                continue
            now = erased * 100 // total
            if now != percent:
                percent = now
                self._say(f"\rErasing at 0x{addr:x} -- {now:3d}% complete.")
            addr += eb
        self._say("\n")
        return True

    def _nand_read_write(self, cmd: str, args: list[str]) -> int:
        if len(args) < 3:
            return USAGE
        addr = str2off(args[1].strip()) or 0
        read = cmd.startswith("read")
        self._say(f"\nNAND {'read' if read else 'write'}: ")
        _, dot, suffix = cmd.partition(".")
        if dot and suffix not in ("e", "i", "jffs2"):
            self._say(f"Unknown nand command suffix '.{suffix}'.\n")
            return 1
        found = self._arg_off_size(args[2:])
        if found is None:
            return 1
        offset, length, maxsize = found
        if len(args) < 4:
            length = self._adjust_for_bad_blocks(offset, length)
        if read:
            done, ok = self.read_skip_bad(offset, length, maxsize, addr)
        else:
            done, ok = self.write_skip_bad(offset, length, maxsize, addr)
        verb = "read" if read else "written"
        self._say(f" {done} bytes {verb}: {'OK' if ok else 'ERROR'}\n")
        return 0 if ok else 1

    def _adjust_for_bad_blocks(self, offset: int, length: int) -> int:
        eb = self.geo.erase_block_bytes
        bad = set(self.geo.bad_blocks)
        count = sum(1 for a in range(offset, offset + length, eb) if a // eb in bad)
        if count:
            length -= count * eb
            self._say(f"size adjusted to 0x{length:x} ({count} bad blocks)\n")
        return length

    def _skip_checks(self, verb: str, offset: int, length: int, limit: int) -> int | None:
        """The checks both skip-bad accesses start with: the bytes of flash spanned, or None
        after printing U-Boot's complaint."""
        if offset % self.geo.page_bytes:
            self._say(f"Attempt to {verb} non page-aligned data\n")
            return None
        used, need_skip = check_skip_len(self.geo, offset, length)
        if need_skip < 0:
            self._say(f"Attempt to {verb} outside the flash area\n")
            return None
        if used > limit:
            self._say(f"Size of {verb} exceeds partition or device limit\n")
            return None
        return need_skip

    def read_skip_bad(self, offset: int, length: int, limit: int, addr: int) -> tuple[int, bool]:
        """``nand_read_skip_bad``: (bytes read, ok)."""
        need_skip = self._skip_checks("read", offset, length, limit)
        if need_skip is None:
            return 0, False
        eb = self.geo.erase_block_bytes
        bad = set(self.geo.bad_blocks)
        pos = 0
        while pos < length:
            if offset // eb in bad:
                self._say(f"Skipping bad block 0x{offset - offset % eb:08x}\n")
                offset += eb - offset % eb
                continue
            n = min(length - pos, eb - offset % eb)
            self.face._write_ram(addr + pos, self._flash_read(offset, n))
            offset += n
            pos += n
        return length, True

    def write_skip_bad(self, offset: int, length: int, limit: int, addr: int) -> tuple[int, bool]:
        """``nand_write_skip_bad`` with ``WITH_WR_VERIFY``: (bytes written, ok)."""
        need_skip = self._skip_checks("write", offset, length, limit)
        if need_skip is None:
            return 0, False
        geo = self.geo
        eb = geo.erase_block_bytes
        bad = set(geo.bad_blocks)
        data = self.face._read_mem(addr, length)
        stored = self._stored(data)
        pos = 0
        start = offset
        while pos < length:
            if offset // eb in bad:
                self._say(f"Skip bad block 0x{offset - offset % eb:08x}\n")
                offset += eb - offset % eb
                continue
            n = min(length - pos, eb - offset % eb)
            ok = self._program_verify(offset, stored[pos : pos + n], data[pos : pos + n])
            offset += n
            if not ok:
                if need_skip:
                    self._say(f"NAND write to offset {offset:x} failed {_EIO}\n")
                    return pos, False
                self._say(f"NAND write to offset {start:x} failed {_EIO}\n")
                return 0, False
            pos += n
        return length, True

    def _program_verify(self, offset: int, stored: bytes, wanted: bytes) -> bool:
        """``nand_write`` (a partial last page is padded with 0xFF) and ``nand_verify``."""
        try:
            self._flash_program(offset, pad_to_page(self.geo, stored))
        except PowerLoss:
            raise
        except DeviceError as e:
            # Programming a page twice leaves garbage that fails ECC and the verify.
            log.info("sim nand program at 0x%x failed: %s", offset, e)
            return False
        return self._flash_read(offset, len(wanted)) == wanted

    # -- mtd -----------------------------------------------------------------------------

    def _mtd_lookup(self, name: str) -> Part | None:
        if name == self.mtd_name:
            return Part(name, 0, self.geo.size_bytes)
        part = self._find_part(name)
        if part is None:
            self._say(f"MTD device {name} not found, ret {_ENODEV}\n")
        return part

    def _min_io(self) -> int:
        return self.geo.page_bytes if self._nand else 1

    def mtd(self, args: list[str], size: int | None, repeat: bool) -> int:
        if not args:
            return USAGE
        sub, _, suffix = args[0].partition(".")
        handlers: dict[str, Callable[[str, list[str]], int]] = {
            "list": lambda s, a: self._mtd_list(),
            "read": self._mtd_io,
            "write": self._mtd_io,
            "erase": self._mtd_erase,
            "bad": lambda s, a: self._mtd_bad(a),
        }
        handler = handlers.get(sub)
        if handler is None or (suffix and sub in ("list", "bad")):
            return USAGE
        return handler(args[0], args[1:])

    def _mtd_list(self) -> int:
        geo = self.geo
        out = ["List of MTD devices:", f"* {self.mtd_name}"]
        if self._nand:
            out += [
                "  - type: NAND flash",
                f"  - block size: 0x{geo.erase_block_bytes:x} bytes",
                f"  - min I/O: 0x{geo.page_bytes:x} bytes",
                f"  - OOB size: {NAND_OOB_BYTES} bytes",
                "  - OOB available: 24 bytes",
                "  - ECC strength: 8 bits",
                "  - ECC step size: 512 bytes",
                "  - bitflip threshold: 6 bits",
            ]
        else:
            out += [
                "  - device: flash@0",
                "  - parent: spi@1e000000",
                "  - driver: jedec_spi_nor",
                "  - path: /spi@1e000000/flash@0",
                "  - type: NOR flash",
                f"  - block size: 0x{geo.erase_block_bytes:x} bytes",
                "  - min I/O: 0x1 bytes",
            ]
        out.append(f'  - 0x{0:012x}-0x{geo.size_bytes:012x} : "{self.mtd_name}"')
        for p in self.partitions():
            out.append(f'\t  - 0x{p.offset:012x}-0x{p.end:012x} : "{p.name}"')
        self._say("\n".join(out) + "\n")
        return 0

    def _mtd_bad(self, args: list[str]) -> int:
        if not args:
            return USAGE
        part = self._mtd_lookup(args[0])
        if part is None:
            return 1
        if not self._nand:
            self._say("Only NAND-based devices can have bad blocks\n")
            return 0
        eb = self.geo.erase_block_bytes
        bad = set(self.geo.bad_blocks)
        lines = "".join(
            f"\t0x{off:08x}\n"
            for off in range(0, part.size, eb)
            if (part.offset + off) // eb in bad
        )
        self._say(f"MTD device {part.name} bad blocks list:\n{lines}")
        return 0

    def _mtd_io(self, cmd: str, args: list[str]) -> int:
        if not args:
            return USAGE
        part = self._mtd_lookup(args[0])
        if part is None:
            return 1
        read = cmd.startswith("read")
        rest = args[1:]
        if not rest:
            return USAGE
        addr = str2off(rest[0]) or 0
        rest = rest[1:]
        page = self._min_io()
        start = (str2off(rest[0]) or 0) if rest else 0
        if start % page:
            self._say(f"Offset not aligned with a page (0x{page:x})\n")
            return 1
        length = (str2off(rest[1]) or 0) if len(rest) > 1 else part.size
        if length % page:
            length = -(-length // page) * page
            self._say(f"Size not on a page boundary (0x{page:x}), rounding to 0x{length:x}\n")
        verb = "Reading" if read else "Writing"
        if self._nand:
            self._say(
                f"{verb} {length} byte(s) ({length // page} page(s)) at offset 0x{start:08x}\n"
            )
        else:
            self._say(f"{verb} {length} byte(s) at offset 0x{start:08x}\n")
        data = b"" if read else self._stored(self.face._read_mem(addr, length))
        eb = self.geo.erase_block_bytes
        bad = set(self.geo.bad_blocks)
        off = start
        while (part.offset + off) // eb in bad:
            off += eb
        step = page if self._nand else max(1, length)
        pos = 0
        while pos < length:
            at = part.offset + off
            if at % eb == 0 and at // eb in bad:
                off += eb
                continue
            n = min(step, length - pos)
            if off + n > part.size:
                return self._mtd_failure(read, off, part.name, _EINVAL)
            if read:
                self.face._write_ram(addr + pos, self._flash_read(at, n))
            else:
                chunk = data[pos : pos + n]
                if not (self._nand and chunk == b"\xff" * n):
                    try:
                        self._flash_program(at, chunk)
                    except PowerLoss:
                        raise
                    except DeviceError as e:
                        log.info("sim mtd write at 0x%x failed: %s", at, e)
                        return self._mtd_failure(read, off, part.name, _EIO)
            off += n
            pos += n
        return 0

    def _mtd_failure(self, read: bool, off: int, name: str, code: int) -> int:
        self._say(
            f"Failure while {'reading' if read else 'writing'} at offset 0x{off:x}\n"
            f"{'Read' if read else 'Write'} on {name} failed with error {code}\n"
        )
        return 1

    def _mtd_erase(self, cmd: str, args: list[str]) -> int:
        if not args:
            return USAGE
        part = self._mtd_lookup(args[0])
        if part is None:
            return 1
        scrub = cmd.endswith(".dontskipbad")
        eb = self.geo.erase_block_bytes
        off = (str2off(args[1]) or 0) if len(args) > 1 else 0
        length = (str2off(args[2]) or 0) if len(args) > 2 else part.size
        if off % eb:
            self._say(f"Offset not aligned with a block (0x{eb:x})\n")
            return 1
        if length % eb:
            self._say(f"Size not a multiple of a block (0x{eb:x})\n")
            return 1
        self._say(
            f"Erasing 0x{off:08x} ... 0x{off + length - 1:08x} ({length // eb} eraseblock(s))\n"
        )
        bad = set(self.geo.bad_blocks)
        while length:
            at = part.offset + off
            if off >= part.size:
                self._say(f"Failed to get bad block at 0x{off:08x}\n")
                return 1
            if not scrub and at // eb in bad:
                self._say(f"Skipping bad block at 0x{off:08x}\n")
            else:
                try:
                    self.face.device.erase(at, eb)
                except PowerLoss:
                    raise
                except DeviceError as e:
                    log.info("sim mtd erase at 0x%x failed: %s", at, e)
            length -= eb
            off += eb
        return 0


__all__ = [
    "MTD_NAMES",
    "MTD_USAGE",
    "NAND_USAGE",
    "SF_USAGE",
    "MtdCommands",
    "Part",
    "check_skip_len",
    "flip_one_bit",
    "memsize",
    "mtdparts_partitions",
    "mtdparts_text",
    "str2off",
    "strtoul0",
]
