"""SPI NOR (``sf``) and raw NAND (``nand``) storage through U-Boot's console.

Routers boot from flash that is not in the CPU's address space: a SPI NOR chip (``sf probe``,
``sf read``, ``sf erase``, ``sf write``) or a raw NAND chip (``nand read``, ``nand erase``,
``nand write``). The driver maps such a chip as one window of the device's address space (at
address 0 when no CFI bank sits there); this module probes the chip and moves its data
through the driver's RAM buffers, so that reads, hashes and verification use the same ``md``
and ``crc32`` machinery as the other storages.

NAND bad blocks. U-Boot's ``nand write``/``nand read`` skip bad blocks: the data goes on in the
next good block, so an image written from a partition's start lies in the partition's good
blocks, in order. The driver keeps that layout and makes it addressable:

* the chip is cut into zones: the partitions of ``mtdparts`` (the ``mtdids`` entry of the
  chip names its mtd-id), the gaps between them, or the whole chip when there are none;
* logical block *k* of a zone (device offset ``zone start + k * erase size``) is the *k*-th good
  block of that zone; bytes keep their place inside the block;
* logical blocks past the zone's last good block (there are as many as the zone has bad
  blocks) hold nothing: they read as erased (0xFF), erasing them does nothing, and writing
  anything but 0xFF there is a DeviceError naming the partition that ran out of good blocks.

So a profile's regions, which follow the partitions, read and write exactly what U-Boot's own
``nand read ADDR PARTITION SIZE`` and the board's boot command see. Each access is one
``nand read|write`` from the physical start of its first block, which U-Boot extends past the
bad blocks itself; the driver checks that the blocks U-Boot reports skipping are the ones
``nand bad`` listed (a table that changed under the session is an error, not a silent shift).

Writes. Data goes to RAM with the driver's checked transfer (``load``), then ``sf write`` /
``nand write`` from there; the range is read back into RAM and its ``crc32`` compared with the
host's. A mismatch (or a write U-Boot reports as failed) is retried once, more slowly: the
erase blocks around the range are read into RAM, patched with the data, erased and written
again in :data:`RETRY_CHUNK_BYTES` pieces. If the ``crc32`` still differs the write raises
VerifyError naming the range; it is never reported as done. Ranges of 0xFF that already read
as 0xFF are not written; ``sf``'s "No SPI flash selected" (U-Boot forgets ``sf probe`` at every
reset) is answered with ``sf probe`` and the command once more.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from unbrick.errors import DeviceError, TransportError, UsageError, VerifyError
from unbrick.transports.uboot import parse as P
from unbrick.transports.uboot.console import CommandResult

if TYPE_CHECKING:
    from unbrick.transports.uboot.driver import RamLayout

log = logging.getLogger(__name__)

#: Window kinds this module serves.
MTD_KINDS = ("sf", "nand")
#: Piece size of the slower second attempt of a write.
RETRY_CHUNK_BYTES = 16 * 1024
_NO_SF = "No SPI flash selected"


class Host(Protocol):
    """What this module needs from the driver: commands, its RAM and its checked transfers."""

    @property
    def ram(self) -> RamLayout: ...

    def _run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        check: bool = True,
        status: bool = False,
    ) -> CommandResult: ...

    def _t(self, data_bytes: int = 0, factor: float = 1.0) -> float: ...

    def _crc32(self, address: int, length: int) -> int: ...

    def _fill_of(self, address: int, length: int) -> int | None: ...

    def _ensure_fills(self) -> None: ...

    def load(self, data: bytes, address: int | None = None) -> int: ...


class Runner(Protocol):
    def __call__(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        check: bool = True,
        status: bool = False,
    ) -> CommandResult: ...


# ---------------------------------------------------------------------------------------------
# The bad-block map (pure)


@dataclass(frozen=True)
class Zone:
    """A stretch of the chip whose blocks are addressed skipping bad ones: a partition, a gap
    between partitions, or the whole chip."""

    name: str
    start: int
    size: int
    #: Physical offsets of the zone's good blocks, in order.
    good: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Piece:
    """Part of a logical range inside one zone: mapped to the good block holding ``logical``
    (``physical``, U-Boot's skip-bad carries it over further bad blocks), or past the zone's
    good blocks (``physical`` None)."""

    logical: int
    length: int
    physical: int | None
    zone: Zone


@dataclass(frozen=True)
class NandLayout:
    size_bytes: int
    erase_bytes: int
    page_bytes: int
    #: Offsets of the bad blocks.
    bad: frozenset[int]
    zones: tuple[Zone, ...]

    @classmethod
    def build(
        cls,
        size_bytes: int,
        erase_bytes: int,
        page_bytes: int,
        bad: Sequence[int],
        partitions: Sequence[tuple[str, int, int]] = (),
    ) -> NandLayout:
        """Zones from ``partitions`` (name, offset, size; they must be erase-block aligned and
        not overlap); the gaps become zones of their own."""
        eb = erase_bytes
        if size_bytes <= 0 or eb <= 0 or size_bytes % eb or eb % page_bytes:
            raise DeviceError(f"NAND geometry {size_bytes}/{eb}/{page_bytes} is inconsistent")
        bad_set = frozenset(b - b % eb for b in bad if 0 <= b < size_bytes)
        spans: list[tuple[str, int, int]] = []
        pos = 0
        for name, offset, size in sorted(partitions, key=lambda p: p[1]):
            if offset % eb or size % eb or offset < pos or offset + size > size_bytes:
                raise DeviceError(
                    f"mtdparts partition {name!r} (0x{offset:x}+0x{size:x}) is not aligned to "
                    f"the 0x{eb:x}-byte erase block or overlaps another",
                    hint="fix mtdparts, or map the chip without partitions",
                )
            if offset > pos:
                spans.append((f"(gap at 0x{pos:x})", pos, offset - pos))
            spans.append((name, offset, size))
            pos = offset + size
        if pos < size_bytes:
            spans.append(("(rest of the chip)" if spans else "(whole chip)", pos, size_bytes - pos))
        zones = tuple(
            Zone(name, start, size, _good(start, size, eb, bad_set)) for name, start, size in spans
        )
        return cls(size_bytes, eb, page_bytes, bad_set, zones)

    def zone_at(self, offset: int) -> Zone:
        for zone in self.zones:
            if zone.start <= offset < zone.end:
                return zone
        raise UsageError(f"NAND offset 0x{offset:x} is outside the chip (0x{self.size_bytes:x})")

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """The logical range ``offset``..``+length`` as pieces (see :class:`Piece`)."""
        eb = self.erase_bytes
        out: list[Piece] = []
        pos, end = offset, offset + length
        if offset < 0 or end > self.size_bytes:
            raise UsageError(f"NAND range 0x{offset:x}+0x{length:x} is outside the chip")
        while pos < end:
            zone = self.zone_at(pos)
            k = (pos - zone.start) // eb
            mapped_end = zone.start + len(zone.good) * eb
            if pos < mapped_end:
                n = min(end, mapped_end) - pos
                out.append(Piece(pos, n, zone.good[k] + (pos - zone.start) % eb, zone))
            else:
                n = min(end, zone.end) - pos
                out.append(Piece(pos, n, None, zone))
            pos += n
        return out

    def bad_between(self, physical: int, length: int) -> tuple[int, ...]:
        """Bad blocks U-Boot skips while it moves ``length`` bytes from ``physical`` on."""
        eb = self.erase_bytes
        skipped: list[int] = []
        pos, left = physical, length
        while left > 0:
            block = pos - pos % eb
            if block in self.bad:
                skipped.append(block)
                pos = block + eb
                continue
            n = min(left, block + eb - pos)
            pos += n
            left -= n
        return tuple(skipped)

    def physical_span(self, piece: Piece) -> tuple[int, int]:
        """(first byte, end) of flash a mapped piece touches, bad blocks included."""
        assert piece.physical is not None
        eb = self.erase_bytes
        skipped = len(self.bad_between(piece.physical, piece.length))
        return piece.physical, piece.physical + piece.length + skipped * eb

    def describe(self) -> str:
        bad = ", ".join(f"0x{b:x}" for b in sorted(self.bad)) or "none"
        return f"bad blocks: {bad}"


# ---------------------------------------------------------------------------------------------
# What the chip is


@dataclass(frozen=True)
class MtdFlash:
    """The SPI NOR or NAND chip U-Boot reaches (what the probe found)."""

    #: "sf" or "nand".
    kind: str
    #: The window's name: "sf:0:0" (bus:cs), "nand0".
    name: str
    #: The chip's name as U-Boot printed it ("w25q64cv", "nand0").
    chip: str
    size_bytes: int
    erase_bytes: int
    page_bytes: int
    #: NAND: the bad-block map and zones.
    layout: NandLayout | None = None

    def describe(self) -> str:
        text = (
            f"{self.name} {self.chip} 0x{self.size_bytes:x} bytes, erase 0x{self.erase_bytes:x}, "
            f"page 0x{self.page_bytes:x}"
        )
        return text + (f", {self.layout.describe()}" if self.layout is not None else "")


def partitions_for(env: dict[str, str], device: str, size_bytes: int) -> list[tuple[str, int, int]]:
    """(name, offset, size) of the ``mtdparts`` partitions of U-Boot's ``device`` ("nand0")."""
    try:
        ids = P.parse_mtdids(env.get("mtdids", ""))
        table = P.parse_mtdparts(env.get("mtdparts", ""))
    except P.UBootParseError as e:
        log.warning("mtdids/mtdparts unreadable (%s); mapping the whole chip", e)
        return []
    parts = table.get(ids.get(device, device), ())
    out = []
    for p in parts:
        size = size_bytes - p.offset if p.size is None else p.size
        out.append((p.name, p.offset, size))
    return out


def probe_flash(
    run: Runner,
    commands: frozenset[str],
    env: dict[str, str],
    mtd_devices: Sequence[P.MtdDevice],
    scratch: int,
) -> MtdFlash | None:
    """The SPI NOR chip (``sf probe``), else the NAND chip (``nand info``, ``nand bad``, its
    size from ``mtd list`` or found by asking for offsets), or None. ``scratch`` is a RAM
    address for the size search (nothing is written there)."""
    if "sf" in commands:
        out = run("sf probe", check=False, status=True)
        try:
            info = P.parse_sf_probe(out.output)
        except P.UBootParseError:
            info = None
        if info is not None and out.status == 0:
            return MtdFlash(
                "sf", "sf:0:0", info.name, info.size_bytes, info.erase_bytes, info.page_bytes
            )
        log.info("sf probe found no SPI flash: %s", out.output.strip()[:200])
    if "nand" in commands:
        chips = P.parse_nand_info(run("nand info", check=False).output)
        if chips:
            chip = chips[0]
            size = next(
                (
                    m.size_bytes
                    for m in mtd_devices
                    if m.name == chip.name and m.size_bytes and "NAND" in m.type
                ),
                None,
            )
            if size is None:
                size = _nand_size(run, chip.erase_bytes, scratch)
            bad = P.parse_nand_bad(run("nand bad", check=False).output)
            layout = NandLayout.build(
                size,
                chip.erase_bytes,
                chip.page_bytes,
                bad,
                partitions_for(env, chip.name, size),
            )
            return MtdFlash(
                "nand", chip.name, chip.name, size, chip.erase_bytes, chip.page_bytes, layout
            )
    return None


def _nand_size(run: Runner, erase_bytes: int, scratch: int) -> int:
    """The chip's size without ``mtd list``: the first offset ``nand read`` refuses with
    "Offset exceeds device limit" (zero-byte reads, doubling then bisecting by blocks)."""

    def exists(block: int) -> bool:
        out = run(f"nand read 0x{scratch:x} 0x{block * erase_bytes:x} 0", check=False, status=True)
        return out.status == 0 and "exceeds" not in out.output

    if not exists(0):
        raise DeviceError("nand read of 0 bytes at offset 0 failed: no usable NAND chip")
    lo, hi = 0, 1
    while exists(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            raise DeviceError("the NAND chip seems larger than any real one; giving up")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if exists(mid):
            lo = mid
        else:
            hi = mid
    return hi * erase_bytes


# ---------------------------------------------------------------------------------------------
# Data path


class MtdIO:
    """Reads, erases and writes of one chip, through ``host`` (the driver)."""

    def __init__(
        self, host: Host, flash: MtdFlash, retries: list[tuple[int, int, bool]] | None = None
    ) -> None:
        self.host = host
        self.flash = flash
        #: (device offset, length, verified after the retry) of every write retried.
        self.retries = retries if retries is not None else []

    @property
    def _layout(self) -> NandLayout:
        if self.flash.layout is None:
            raise UsageError(f"{self.flash.name} has no NAND layout")
        return self.flash.layout

    # -- commands --------------------------------------------------------------------------

    def _run(self, command: str, data_bytes: int = 0) -> CommandResult:
        timeout = self.host._t(data_bytes, 0.05)
        res = self.host._run(command, check=False, status=True, timeout_s=timeout)
        if self.flash.kind == "sf" and _NO_SF in res.output:
            # U-Boot forgot the chip (a reset since the probe): probe again, once.
            probe = self.host._run("sf probe", check=False, status=True)
            if probe.status != 0:
                raise DeviceError(
                    f"{self.flash.name}: sf probe failed: {probe.output.strip()[:120]}",
                    hint="check that the SPI flash is still detected (power, wiring)",
                )
            res = self.host._run(command, check=False, status=True, timeout_s=timeout)
        return res

    def _sf(self, verb: str, command: str, offset: int, length: int) -> bool:
        res = self._run(command, length)
        try:
            got = P.parse_sf_result(res.output)
        except P.UBootParseError as e:
            raise DeviceError(
                f"{self.flash.name}: '{command}' failed: {_first_line(res)}",
                hint="see the console log; the flash refused the operation",
            ) from e
        if got.verb != verb or got.offset != offset or got.length != length:
            raise TransportError(f"'{command}' answered for {got.length} bytes at 0x{got.offset:x}")
        return got.ok and res.status == 0

    def _nand(self, op: str, ram: int, piece: Piece) -> bool:
        """``nand read|write`` of one mapped piece; False when U-Boot reports a failure."""
        assert piece.physical is not None
        command = f"nand {op} 0x{ram:x} 0x{piece.physical:x} 0x{piece.length:x}"
        res = self._run(command, piece.length)
        try:
            got = P.parse_nand_rw(res.output)
        except P.UBootParseError as e:
            raise DeviceError(
                f"{self.flash.name}: '{command}' failed: {_first_line(res)}",
                hint="see the console log; the NAND refused the operation",
            ) from e
        self._check_skipped(command, got.skipped, piece)
        if got.ok and res.status == 0 and got.length == piece.length:
            return True
        if op == "read":
            why = "; ".join(got.messages) or f"{got.length} bytes read"
            raise DeviceError(f"{self.flash.name}: '{command}' failed: {why}")
        log.warning("%s: '%s' failed: %s", self.flash.name, command, "; ".join(got.messages))
        return False

    def _check_skipped(self, command: str, skipped: tuple[int, ...], piece: Piece) -> None:
        assert piece.physical is not None
        expected = self._layout.bad_between(piece.physical, piece.length)
        if tuple(skipped) != expected:
            shown = ", ".join(f"0x{b:x}" for b in skipped) or "none"
            raise DeviceError(
                f"{self.flash.name}: '{command}' skipped bad blocks {shown}, the bad-block table "
                f"read at the start lists {', '.join(f'0x{b:x}' for b in expected) or 'none'} "
                "there",
                hint="the NAND's bad-block table changed: reconnect so it is read again",
            )

    # -- reading ---------------------------------------------------------------------------

    def stage(self, offset: int, length: int) -> int:
        """Read ``offset``..``+length`` of the chip (logical offsets on NAND) into the stage
        buffer; returns the RAM address of ``offset``."""
        ram = self.host.ram
        if length <= 0:
            return ram.stage
        if self.flash.kind == "sf":
            if length > ram.stage_bytes:
                raise UsageError(f"sf read of {length} bytes exceeds the stage buffer")
            command = f"sf read 0x{ram.stage:x} 0x{offset:x} 0x{length:x}"
            if not self._sf("Read", command, offset, length):
                raise DeviceError(f"{self.flash.name}: '{command}' failed")
            return ram.stage
        page = self.flash.page_bytes
        start = offset - offset % page
        if offset + length - start > ram.stage_bytes:
            raise UsageError(f"nand read of {length} bytes exceeds the stage buffer")
        for piece in self._layout.pieces(start, offset + length - start):
            dst = ram.stage + piece.logical - start
            if piece.physical is None:
                self.host._run(f"mw.b 0x{dst:x} 0xff 0x{piece.length:x}", timeout_s=self.host._t())
            else:
                self._nand("read", dst, piece)
        return ram.stage + offset - start

    def crc32(self, offset: int, length: int) -> int:
        """The device's CRC-32 of a range (staged in RAM)."""
        if length <= 0:
            return 0
        return self.host._crc32(self.stage(offset, length), length)

    # -- erasing ---------------------------------------------------------------------------

    def erase(self, offset: int, length: int) -> None:
        """Erase whole erase blocks (logical on NAND: past a zone's good blocks, nothing)."""
        eb = self.flash.erase_bytes
        if offset % eb or length % eb:
            raise UsageError(
                f"{self.flash.name}: erase of 0x{offset:x}+0x{length:x} is not on "
                f"0x{eb:x}-byte erase blocks",
                hint="the profile's erase_block must be a multiple of the chip's erase size",
            )
        if length == 0:
            return
        if self.flash.kind == "sf":
            command = f"sf erase 0x{offset:x} 0x{length:x}"
            if not self._sf("Erased", command, offset, length):
                raise DeviceError(
                    f"{self.flash.name}: '{command}' failed",
                    hint="the flash may be write-protected (WP pin, status register)",
                )
            return
        layout = self._layout
        for piece in layout.pieces(offset, length):
            if piece.physical is None:
                continue  # past the zone's good blocks: nothing is stored there
            start, end = layout.physical_span(piece)
            command = f"nand erase 0x{start:x} 0x{end - start:x}"
            res = self._run(command, (end - start) // 64)
            try:
                got = P.parse_nand_erase(res.output)
            except P.UBootParseError as e:
                raise DeviceError(
                    f"{self.flash.name}: '{command}' failed: {_first_line(res)}"
                ) from e
            expected = layout.bad_between(piece.physical, piece.length)
            if tuple(got.skipped) != expected:
                raise DeviceError(
                    f"{self.flash.name}: '{command}' skipped blocks "
                    f"{[hex(b) for b in got.skipped]}, expected {[hex(b) for b in expected]}",
                    hint="the NAND's bad-block table changed: reconnect so it is read again",
                )
            if not got.ok or got.failures or res.status != 0:
                raise DeviceError(
                    f"{self.flash.name}: '{command}' failed ({got.failures} blocks did not erase)",
                    hint="a block may have worn out: mark it bad (nand markbad) and retry",
                )

    # -- writing ---------------------------------------------------------------------------

    def program(self, offset: int, data: bytes, device_offset: int) -> str:
        """Write ``data`` at ``offset`` (erased before) and check it with ``crc32``; a
        mismatch is retried once in small pieces. Returns "skipped" (already there),
        "written" or "retried"; raises VerifyError when the retry does not verify either."""
        n = len(data)
        if n == 0:
            return "skipped"
        self._check_room(offset, data)
        fill = data[0] if data.count(data[:1]) == n else None
        if fill == 0xFF and n <= self.host.ram.stage_bytes:
            addr = self.stage(offset, n)
            if self.host._fill_of(addr, n) == 0xFF:
                return "skipped"
        if fill == 0x00 and n <= self.host.ram.fill_bytes:
            self.host._ensure_fills()
            src = self.host.ram.fill_00
        else:
            src = self.host.load(data)
        want = zlib.crc32(data)
        aligned = self.flash.kind == "sf" or offset % self.flash.page_bytes == 0
        if aligned and self._write(src, offset, n) and self.crc32(offset, n) == want:
            return "written"
        if aligned:
            log.warning(
                "%s: write of 0x%x+0x%x did not verify; writing it again in %d-byte pieces",
                self.flash.name,
                offset,
                n,
                RETRY_CHUNK_BYTES,
            )
        ok = self._rewrite(src, offset, n) and self.crc32(offset, n) == want
        if aligned:
            self.retries.append((device_offset, n, ok))
        if ok:
            return "retried" if aligned else "written"
        got = self.crc32(offset, n)
        raise VerifyError(
            f"{self.flash.name}: 0x{device_offset:x}+0x{n:x} reads back with crc32 {got:08x}, "
            f"not {want:08x}, after a write and a slower rewrite",
            ranges=[(device_offset, n)],
            hint="the flash does not keep what is written (worn blocks, a marginal supply); "
            "the backup can be restored",
        )

    def _check_room(self, offset: int, data: bytes) -> None:
        if self.flash.kind != "nand":
            return
        for piece in self._layout.pieces(offset, len(data)):
            if piece.physical is not None:
                continue
            chunk = data[piece.logical - offset : piece.logical - offset + piece.length]
            if chunk.count(0xFF) != len(chunk):
                zone = piece.zone
                blocks = zone.size // self._layout.erase_bytes
                raise DeviceError(
                    f"{self.flash.name}: partition '{zone.name}' has {len(zone.good)} good "
                    f"blocks of {blocks}; data at 0x{piece.logical:x} falls past the last one",
                    hint="the image does not fit this partition on this chip (its bad blocks "
                    "take room); use a smaller image",
                )

    def _write(self, src: int, offset: int, length: int) -> bool:
        """``sf write`` / ``nand write`` of RAM at ``src``; False when U-Boot reports an error."""
        if self.flash.kind == "sf":
            command = f"sf write 0x{src:x} 0x{offset:x} 0x{length:x}"
            return self._sf("Written", command, offset, length)
        ok = True
        for piece in self._layout.pieces(offset, length):
            if piece.physical is None:
                continue  # 0xFF (checked): nothing to store
            ok = self._nand("write", src + piece.logical - offset, piece) and ok
        return ok

    def _rewrite(self, src: int, offset: int, length: int) -> bool:
        """The slow way: read the erase blocks around the range into RAM, patch them with the
        data (in RAM at ``src``), erase them, write them back in small pieces."""
        eb = self.flash.erase_bytes
        first = offset - offset % eb
        end = -(-(offset + length) // eb) * eb
        ram = self.host.ram
        if end - first > ram.stage_bytes:
            raise UsageError(f"a rewrite of 0x{end - first:x} bytes exceeds the stage buffer")
        stage = self.stage(first, end - first)
        self.host._run(
            f"cp.b 0x{src:x} 0x{stage + offset - first:x} 0x{length:x}", timeout_s=self.host._t()
        )
        self.erase(first, end - first)
        ok = True
        for pos in range(0, end - first, RETRY_CHUNK_BYTES):
            n = min(RETRY_CHUNK_BYTES, end - first - pos)
            if self.host._fill_of(stage + pos, n) == 0xFF:
                continue  # erased flash already holds it
            ok = self._write(stage + pos, first + pos, n) and ok
        return ok


def _good(start: int, size: int, eb: int, bad: frozenset[int]) -> tuple[int, ...]:
    return tuple(b for b in range(start, start + size, eb) if b not in bad)


def _first_line(res: CommandResult) -> str:
    if res.errors:
        return res.errors[0]
    lines = [line.strip() for line in res.output.splitlines() if line.strip()]
    return lines[-1][:160] if lines else f"exit status {res.status}"


def window_storage_type(kind: str) -> str:
    """The StorageInfo type of a window kind."""
    return {"sf": "spi-nor", "nand": "nand"}.get(kind, kind)


__all__ = [
    "MTD_KINDS",
    "RETRY_CHUNK_BYTES",
    "Host",
    "MtdFlash",
    "MtdIO",
    "NandLayout",
    "Piece",
    "Zone",
    "partitions_for",
    "probe_flash",
    "window_storage_type",
]
