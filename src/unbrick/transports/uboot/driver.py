"""The U-Boot console driver: identify, read, erase, write, hash and reset through ``=>``.

Layers: a pyserial link (:class:`~unbrick.transports.uboot.console.PortLink`) -> the console
session (:class:`~unbrick.transports.uboot.console.Console`) -> pure parsers
(:mod:`unbrick.transports.uboot.parse`) -> this driver, which implements the capability
Protocols of :mod:`unbrick.transports.base`.

Device addresses. A profile gives one storage address space; U-Boot sees several storages. The
driver maps them with a :class:`StorageMap` of windows:

- each CFI NOR bank that ``flinfo`` lists away from address 0 is a window at its CPU address
  (bank 2 of QEMU's ``virt`` machine: 0x04000000, 32 MiB as U-Boot sees it);
- the first block device (``virtio``, else ``nvme``, ``mmc``, ``usb``, ``scsi``; or the one
  named by ``?block=nvme:0``) is a window at address 0, cut at the lowest NOR window;
- a SPI NOR chip (``sf probe``) or a raw NAND chip (``nand info``) takes address 0 instead when
  no CFI bank is mapped there and no ``?block=`` is asked for (:mod:`.mtd`: NAND offsets skip
  bad blocks per partition, as ``nand write`` does).

So ``firmware`` at 0x100000 is 1 MiB into the virtio disk and ``nor-firmware`` at 0x04040000 is
the NOR bank at that CPU address. Addresses outside every window are refused.

Data path. Writes go host -> RAM by ``tftpboot`` from a TFTP server of the session's own when
the address gives ``serverip=`` (:mod:`unbrick.transports.uboot.netxfer`; a failing network
hands over to the serial line), else by ``loadx`` (XMODEM-1K; ``loady`` when XMODEM would
mangle the data, see :func:`unbrick.transports.xymodem.uboot_loadx_image`), are checked in RAM
with ``crc32``, then go RAM -> storage: ``<if> write`` of whole blocks (partial blocks are read,
patched and written back), or for NOR ``cp.b`` followed by ``cmp.b``; a NOR write that does not
compare equal is programmed again word by word with raw CFI commands (QEMU 7.2's pflash keeps
only the first 4 KiB of each sector of a buffered write), and compared again. Reads are
``tftpput`` uploads where U-Boot has the command and a network is configured, else ``md``
dumps parsed; both are cross-checked with ``crc32``; ranges that ``cmp`` shows to be all 0xFF
or all 0x00 are not sent at all.

Hashes. U-Boot has ``crc32`` (``md5sum``/``hash`` are often compiled out).
``device_hash(..., "crc32")`` is the device's own CRC-32. ``device_hash(..., "sha256")`` is
the SHA-256 of bytes the device confirmed: the driver keeps what it last wrote or read per
range, and returns its SHA-256 only when the device's CRC-32 of the range equals the CRC-32 of
those bytes; otherwise it reads the range back (verified) and hashes what it read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from unbrick.errors import DeviceError, TransportError, UnbrickError, UsageError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import BootReport, BootState, Capability
from unbrick.transports.uboot import mtd as M
from unbrick.transports.uboot import parse as P
from unbrick.transports.uboot.console import (
    CTRL_C,
    ByteLink,
    CommandResult,
    Console,
    ConsoleOptions,
    ConsoleState,
    PortLink,
)
from unbrick.transports.uboot.netxfer import (
    NetConfig,
    NetworkError,
    SessionServer,
    parse_tftp_transfer,
)

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * 1024
DEFAULT_MAX_TRANSFER = 256 * KiB
#: Block interfaces in the order the default map prefers them.
BLOCK_INTERFACES = ("virtio", "nvme", "mmc", "usb", "scsi")
#: Boot logs longer than this keep their end.
MAX_BOOT_LOG_CHARS = 64 * 1024
#: Lines that show a boot has left U-Boot for the operating system.
OS_STARTED = re.compile(
    rb"Starting kernel|Booting Linux|Linux version \d|## Starting application|"
    rb"Booting kernel|Uncompressing Linux|EFI stub: Booting"
)
#: Environment variables boards use for their hardware revision and their market region.
HW_REVISION_VARS = ("board_rev", "board_revision", "hw_rev", "hwrev", "hw_revision", "hwver")
REGION_VARS = ("region", "country", "country_code", "regioncode")
_BANNER = re.compile(rb"U-Boot(?: SPL)? 20\d\d\.\d\d")
_FIRMWARE_MODES = ("auto", "uboot", "os")
_TRANSFERS = ("auto", "tftp", "loadx", "loady")
#: Shell variables the NOR word-program loop uses (removed afterwards).
_LOOP_VARS = ("ubk_a", "ubk_d", "ubk_e", "ubk_v")


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class UBootOptions:
    """How the driver works one device; the URI's query parameters set them
    (:meth:`from_address`)."""

    console: ConsoleOptions = field(default_factory=ConsoleOptions)
    baudrate: int = 115200
    #: Largest read or program the engine asks for (and the RAM buffers' size).
    max_transfer: int = DEFAULT_MAX_TRANSFER
    #: Granularity of ``md`` dumps and their crc32 cross-checks.
    read_page_bytes: int = 32 * KiB
    #: Which block device is the window at address 0 ("virtio:0"); None: the first found.
    block: str | None = None
    #: "uboot": U-Boot itself is the firmware (a reset that reaches U-Boot is a good boot);
    #: "os": U-Boot boots an operating system, which is the firmware; "auto": "uboot" for
    #: QEMU's boards (env vendor=emulation), else "os".
    firmware: str = "auto"
    #: Program NOR word by word when ``cp.b`` did not compare equal.
    nor_fallback: bool = True
    #: Map a NOR bank at CPU address 0 too (boards whose firmware shares the boot flash, as
    #: most routers); by default that bank is left out, as U-Boot runs from it on QEMU.
    boot_bank: bool = False
    #: Bytes per word of the word-program loop; None: the port width ``flinfo`` reports.
    nor_word_bytes: int | None = None
    #: "auto" (tftp when ``net`` is set and U-Boot has tftpboot, falling back to the serial
    #: line; loadx, or loady when XMODEM would mangle the data), "tftp", "loadx", "loady".
    transfer: str = "auto"
    #: Where the device reaches this host's TFTP server (``?serverip=``); None: serial only.
    net: NetConfig | None = None
    #: Start of the RAM the driver uses; None: ${loadaddr}, else DRAM start + 2 MiB.
    ram_base: int | None = None
    #: Silence that ends the capture of an operating system's boot (firmware "os").
    boot_quiet_s: float = 5.0
    #: Typed at the operating system's console to get back to U-Boot (after a boot into the
    #: firmware); empty: wait for a power cycle.
    os_reboot: str = "reboot"
    #: A/B boot control: the environment variable naming the slot that boots (U-Boot's
    #: bootcount scheme: ``upgrade_available=1`` makes the bootloader try the other slot
    #: until ``bootcount`` exceeds ``bootlimit``, then ``altbootcmd`` boots this one again).
    slot_var: str = "active_slot"
    #: XMODEM/YMODEM: wait for each answer, and retransmissions per block.
    transfer_timeout_s: float = 10.0
    transfer_retries: int = 10
    #: Bytes of device data the driver keeps to confirm SHA-256 hashes by CRC-32.
    shadow_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if self.firmware not in _FIRMWARE_MODES:
            raise UsageError(f"firmware={self.firmware!r}: use {', '.join(_FIRMWARE_MODES)}")
        if self.transfer not in _TRANSFERS:
            raise UsageError(f"transfer={self.transfer!r}: use {', '.join(_TRANSFERS)}")
        if self.max_transfer < 4 * KiB or self.max_transfer % KiB:
            raise UsageError("max_transfer must be a multiple of 1 KiB, at least 4 KiB")
        if self.read_page_bytes < 256 or self.read_page_bytes % 16:
            raise UsageError("read_page_bytes must be a multiple of 16, at least 256")
        if self.nor_word_bytes not in (None, 1, 2, 4, 8):
            raise UsageError("nor_word must be 1, 2, 4 or 8")
        if self.block is not None:
            _parse_block_name(self.block)

    @classmethod
    def from_address(cls, address: DeviceAddress, base: UBootOptions | None = None) -> UBootOptions:
        """Options from ``uboot+...?baud=&interrupt=&prompt=&block=&firmware=&nor_fallback=
        &boot_bank=&nor_word=&transfer=&ram=&timeout=&max_transfer=&os_reboot=&slot_var=``
        and the
        network ones of :meth:`NetConfig.from_address` over ``base``."""
        opts = base or cls()
        console = opts.console
        interrupt = address.param("interrupt")
        if interrupt is not None:
            console = replace(console, interrupt=_interrupt_bytes(interrupt))
        prompt = address.param("prompt")
        if prompt:
            console = replace(console, prompt=prompt.encode())
        timeout = address.param("timeout")
        if timeout is not None:
            try:
                value = float(timeout)
            except ValueError as e:
                raise UsageError(f"{address.uri}: timeout={timeout!r} is not seconds") from e
            if not 0 < value <= 3600:
                raise UsageError(f"{address.uri}: timeout={timeout} is out of range")
            console = replace(console, command_timeout_s=value)
        fallback = _flag(address, "nor_fallback")
        boot_bank = _flag(address, "boot_bank")
        ram = address.param("ram")
        return replace(
            opts,
            console=console,
            baudrate=address.int_param("baud", opts.baudrate),
            block=address.param("block", opts.block),
            firmware=address.param("firmware", opts.firmware) or opts.firmware,
            nor_fallback=opts.nor_fallback if fallback is None else fallback,
            boot_bank=opts.boot_bank if boot_bank is None else boot_bank,
            nor_word_bytes=address.int_param("nor_word", opts.nor_word_bytes or 0) or None,
            transfer=address.param("transfer", opts.transfer) or opts.transfer,
            ram_base=address.int_param("ram", 0) if ram else opts.ram_base,
            os_reboot=address.param("os_reboot", opts.os_reboot) or "",
            slot_var=address.param("slot_var", opts.slot_var) or opts.slot_var,
            net=NetConfig.from_address(address) or opts.net,
            max_transfer=address.int_param("max_transfer", opts.max_transfer),
        )


def _flag(address: DeviceAddress, name: str) -> bool | None:
    """An on/off query parameter; None when absent."""
    value = address.param(name)
    if value is None:
        return None
    if value.lower() in ("1", "on", "yes", "true"):
        return True
    if value.lower() in ("0", "off", "no", "false"):
        return False
    raise UsageError(f"{address.uri}: {name}={value!r}: use on or off")


def _interrupt_bytes(text: str) -> bytes:
    named = {"ctrl-c": CTRL_C, "space": b" ", "enter": b"\r", "esc": b"\x1b"}
    if text.lower() in named:
        return named[text.lower()]
    if not text or len(text) > 32:
        raise UsageError(f"interrupt={text!r}: give a key name (ctrl-c, space) or the stop string")
    return text.encode()


def _parse_block_name(text: str) -> tuple[str, int]:
    iface, sep, index = text.partition(":")
    if iface not in BLOCK_INTERFACES or (sep and not index.isdigit()):
        raise UsageError(
            f"block={text!r} is not a block device",
            hint=f"use INTERFACE:INDEX with one of {', '.join(BLOCK_INTERFACES)}, e.g. virtio:0",
        )
    return iface, int(index or 0)


# ---------------------------------------------------------------------------------------------
# Storage map


@dataclass(frozen=True)
class Window:
    """One storage as a range of device addresses."""

    start: int
    size: int
    #: "block", "nor", "sf" (SPI NOR) or "nand".
    kind: str
    #: "virtio:0", "nor:0x04000000".
    name: str
    #: block: byte offset on the disk of ``start``; nor: CPU address of ``start``.
    base: int
    #: block: bytes per block; nor: bytes per sector; sf, nand: bytes per erase block.
    unit: int
    interface: str = ""
    index: int = 0

    @property
    def end(self) -> int:
        return self.start + self.size

    def describe(self) -> str:
        return f"{self.name}@0x{self.start:x}+0x{self.size:x}"


@dataclass(frozen=True)
class StorageMap:
    windows: tuple[Window, ...]

    @property
    def size_bytes(self) -> int:
        return max((w.end for w in self.windows), default=0)

    def describe(self) -> str:
        return "; ".join(w.describe() for w in self.windows)

    def split(self, offset: int, length: int) -> list[tuple[Window, int, int]]:
        """``(window, offset inside the window, length)`` pieces of a device range."""
        if offset < 0 or length < 0:
            raise UsageError(f"bad device range 0x{offset:x}+{length}")
        out: list[tuple[Window, int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            win = next((w for w in self.windows if w.start <= pos < w.end), None)
            if win is None:
                raise UsageError(
                    f"device address 0x{pos:x} is on none of this device's storages "
                    f"({self.describe()})",
                    hint="check the profile's offsets against 'unbrick device probe'",
                )
            n = min(end, win.end) - pos
            out.append((win, pos - win.start, n))
            pos += n
        return out


def default_map(
    blocks: tuple[P.BlockDevice, ...],
    banks: tuple[P.FlashBank, ...],
    preferred: str | None = None,
    *,
    boot_bank: bool = False,
    flash: M.MtdFlash | None = None,
) -> StorageMap:
    """The default address map (see the module's docstring); ``boot_bank`` maps a NOR bank at
    address 0 too (the disk then gets no window); ``flash`` (SPI NOR or NAND) goes at 0 when
    nothing else is there and no block device was asked for."""
    windows: list[Window] = []
    for bank in banks:
        if bank.base == 0 and not boot_bank:
            continue  # the boot flash U-Boot runs from
        unit = bank.uniform_sector_bytes or max(s.size_bytes for s in bank.sectors)
        windows.append(
            Window(
                start=bank.base,
                size=bank.size_bytes,
                kind="nor",
                name=f"nor:0x{bank.base:08x}",
                base=bank.base,
                unit=unit,
                interface="nor",
                index=bank.number,
            )
        )
    if flash is not None and preferred is None and not any(w.start == 0 for w in windows):
        # The SPI NOR or NAND chip the board boots from; block devices are then left out.
        limit = min((w.start for w in windows), default=flash.size_bytes)
        windows.append(
            Window(0, min(flash.size_bytes, limit), flash.kind, flash.name, 0, flash.erase_bytes)
        )
        blocks = ()
    chosen: P.BlockDevice | None = None
    if preferred is not None:
        iface, index = _parse_block_name(preferred)
        chosen = next((b for b in blocks if b.interface == iface and b.index == index), None)
        if chosen is None:
            found = ", ".join(b.name for b in blocks) or "none"
            raise DeviceError(
                f"U-Boot reports no block device {preferred} (found: {found})",
                hint="check the disk is attached, or choose another with ?block=",
            )
    else:
        for iface in BLOCK_INTERFACES:
            chosen = next((b for b in blocks if b.interface == iface), None)
            if chosen is not None:
                break
    if chosen is not None:
        limit = min((w.start for w in windows), default=chosen.size_bytes)
        size = min(chosen.size_bytes, limit)
        size -= size % chosen.block_bytes
        if size > 0:
            windows.append(
                Window(
                    start=0,
                    size=size,
                    kind="block",
                    name=chosen.name,
                    base=0,
                    unit=chosen.block_bytes,
                    interface=chosen.interface,
                    index=chosen.index,
                )
            )
    windows.sort(key=lambda w: w.start)
    return StorageMap(tuple(windows))


# ---------------------------------------------------------------------------------------------
# RAM the driver uses


@dataclass(frozen=True)
class RamLayout:
    """Buffers in the device's RAM: transfers land in ``transfer``; block reads and
    read-modify-write use ``stage``; ``fill_ff``/``fill_00`` hold fills to ``cmp`` against;
    ``scratch`` is for probes (byte order)."""

    transfer: int
    stage: int
    stage_bytes: int
    fill_ff: int
    fill_00: int
    fill_bytes: int
    scratch: int

    @property
    def end(self) -> int:
        return self.scratch + 64 * KiB


def plan_ram(
    board: P.BoardInfo, env: dict[str, str], max_transfer: int, base: int | None = None
) -> RamLayout:
    """Place the buffers at ``base`` (or ${loadaddr}, or DRAM start + 2 MiB), inside DRAM and
    below what U-Boot reserved for itself."""
    if base is None:
        value = env.get("loadaddr")
        if value:
            try:
                base = int(value, 16)
            except ValueError:
                base = None
    if base is None:
        if not board.dram:
            raise DeviceError("U-Boot's bdinfo shows no DRAM bank and ${loadaddr} is not set")
        base = board.dram[0][0] + 2 * MiB
    align = 64 * KiB
    transfer_bytes = -(-(max_transfer + 2 * KiB) // align) * align
    stage_bytes = max(4 * MiB, transfer_bytes)
    layout = RamLayout(
        transfer=base,
        stage=base + transfer_bytes,
        stage_bytes=stage_bytes,
        fill_ff=base + transfer_bytes + stage_bytes,
        fill_00=base + 2 * transfer_bytes + stage_bytes,
        fill_bytes=transfer_bytes,
        scratch=base + 3 * transfer_bytes + stage_bytes,
    )
    bank = next((b for b in board.dram if b[0] <= base < b[0] + b[1]), None)
    if board.dram and (bank is None or layout.end > bank[0] + bank[1]):
        raise DeviceError(
            f"the driver's RAM buffers 0x{base:x}-0x{layout.end:x} are not inside DRAM",
            hint="give a RAM address with ?ram=0x...",
        )
    limits = [lo for lo, _ in board.reserved if lo > base]
    if board.relocaddr is not None and board.relocaddr > base:
        limits.append(board.relocaddr)
    if limits and layout.end > min(limits):
        raise DeviceError(
            f"the driver's RAM buffers 0x{base:x}-0x{layout.end:x} overlap memory U-Boot "
            f"uses (from 0x{min(limits):x})",
            hint="give a lower RAM address with ?ram=0x... or a smaller ?max_transfer=",
        )
    return layout


# ---------------------------------------------------------------------------------------------
# What the driver knows of the device's content


class Shadow:
    """Bytes the driver wrote to or read from the device, per device range (bounded).

    Segments are ``(start, length, data)`` with ``data`` bytes or a fill byte (an int, so a
    blank megabyte costs nothing). The oldest byte segments are dropped beyond ``cap_bytes``.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._segs: list[tuple[int, int, bytes | int, int]] = []
        self._seq = 0
        self._stored = 0

    def _cut(self, start: int, end: int) -> None:
        kept: list[tuple[int, int, bytes | int, int]] = []
        for s, n, data, seq in self._segs:
            e = s + n
            if e <= start or s >= end:
                kept.append((s, n, data, seq))
                continue
            if s < start:
                kept.append(
                    (s, start - s, data if isinstance(data, int) else data[: start - s], seq)
                )
            if e > end:
                cut = end - s
                kept.append((end, e - end, data if isinstance(data, int) else data[cut:], seq))
        self._segs = sorted(kept, key=lambda t: t[0])
        self._stored = sum(n for _, n, d, _ in self._segs if not isinstance(d, int))

    def put(self, offset: int, data: bytes) -> None:
        if not data or len(data) > self.cap_bytes:
            self.drop(offset, len(data))
            return
        self._cut(offset, offset + len(data))
        self._seq += 1
        self._segs.append((offset, len(data), bytes(data), self._seq))
        self._segs.sort(key=lambda t: t[0])
        self._stored += len(data)
        while self._stored > self.cap_bytes:
            oldest = min((t for t in self._segs if not isinstance(t[2], int)), key=lambda t: t[3])
            self._segs.remove(oldest)
            self._stored -= oldest[1]

    def put_fill(self, offset: int, length: int, value: int) -> None:
        if length <= 0:
            return
        self._cut(offset, offset + length)
        self._seq += 1
        self._segs.append((offset, length, value, self._seq))
        self._segs.sort(key=lambda t: t[0])

    def drop(self, offset: int, length: int) -> None:
        if length > 0:
            self._cut(offset, offset + length)

    def get(self, offset: int, length: int) -> bytes | None:
        """The bytes of the range, or None when any part of it is unknown."""
        out = bytearray()
        pos, end = offset, offset + length
        for s, n, data, _ in self._segs:
            e = s + n
            if e <= pos:
                continue
            if s > pos:
                return None
            take = min(e, end) - pos
            if isinstance(data, int):
                out += bytes([data]) * take
            else:
                out += data[pos - s : pos - s + take]
            pos += take
            if pos >= end:
                return bytes(out)
        return bytes(out) if pos >= end else None

    def clear(self) -> None:
        self._segs.clear()
        self._stored = 0


# ---------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class Probe:
    """What the driver read from U-Boot when it attached."""

    version: P.UBootVersion
    board: P.BoardInfo
    env: dict[str, str]
    commands: frozenset[str]
    banks: tuple[P.FlashBank, ...]
    blocks: tuple[P.BlockDevice, ...]
    mtd: tuple[P.MtdDevice, ...]
    #: The SPI NOR or NAND chip (``sf probe``, ``nand info``), if any.
    flash: M.MtdFlash | None = None


@dataclass
class DriverStats:
    """What happened in this session (for logs and tests)."""

    loads: int = 0
    load_retries: int = 0
    bytes_loaded: int = 0
    dumps: int = 0
    bytes_dumped: int = 0
    #: Pieces that went by TFTP (tftpboot to RAM, tftpput from the device).
    net_loads: int = 0
    net_reads: int = 0
    #: Why the network was given up for this session (the serial line took over).
    net_failure: str = ""
    fill_hits: int = 0
    #: Digests (sha256, md5) the device computed itself with hash/md5sum.
    device_digests: int = 0
    shadow_hits: int = 0
    #: Bytes not sent because the device already held them (blank ranges).
    skipped_bytes: int = 0
    #: NOR ranges whose cp.b did not compare equal: (device offset, length).
    nor_mismatches: list[tuple[int, int]] = field(default_factory=list)
    #: NOR ranges programmed word by word, and whether they then compared equal.
    nor_fallbacks: list[tuple[int, int, bool]] = field(default_factory=list)
    #: SPI NOR/NAND writes retried in small pieces: (device offset, length, verified then).
    mtd_retries: list[tuple[int, int, bool]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The driver


class UBootDriver:
    """A device at its U-Boot prompt. Implements Identify, FlashRead, FlashErase, FlashWrite,
    DeviceHash (``crc32``, and ``sha256`` confirmed by CRC-32) and Reboot."""

    def __init__(
        self,
        address: DeviceAddress,
        console: Console,
        options: UBootOptions | None = None,
        *,
        closer: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.console = console
        self.options = options or UBootOptions()
        self.max_transfer = self.options.max_transfer
        self.capabilities: frozenset[Capability] = frozenset(
            {
                Capability.IDENTIFY,
                Capability.READ,
                Capability.ERASE,
                Capability.WRITE,
                Capability.DEVICE_HASH,
                Capability.REBOOT,
                Capability.CONSOLE,
            }
        )
        #: What ``device_hash`` computes on the device itself ("sha256" is confirmed by it).
        self.hash_algorithms: tuple[str, ...] = ("crc32", "sha256")
        self.stats = DriverStats()
        self.shadow = Shadow(self.options.shadow_bytes)
        self._closer = closer
        self._clock = clock
        self._probe: Probe | None = None
        self._map: StorageMap | None = None
        self._ram: RamLayout | None = None
        self._fills_ready = False
        self._byteorder: str | None = None
        self._scanned: set[str] = set()
        #: Digests U-Boot failed to compute here (hash not compiled in): host-side from now.
        self._no_native: set[str] = set()
        self._net: SessionServer | None = None
        #: The server port the device's environment was set up for (lost at every reset).
        self._net_env_port: int | None = None
        #: The last boot handed the console to the operating system: the next command must
        #: first bring U-Boot back (see :meth:`enter_recovery`).
        self._in_os = False

    # -- session ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._net is not None:
            self._net.close()
            self._net = None
        self.console.close()
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> UBootDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        check: bool = True,
        status: bool = False,
    ) -> CommandResult:
        if self._in_os:
            self._in_os = False
            log.info("%s: the firmware runs; going back to U-Boot for %r", self.address, command)
            self.enter_recovery(self.options.console.attach_timeout_s + 60.0)
        return self.console.run(command, timeout_s=timeout_s, check=check, status=status)

    def command(self, command: str, timeout_s: float | None = None) -> str:
        """Run one console command and return what it printed (the CONSOLE capability)."""
        return self._run(command, timeout_s=timeout_s, check=False).output

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = self._read_probe()
        return self._probe

    @property
    def storage_map(self) -> StorageMap:
        if self._map is None:
            p = self.probe
            self._map = default_map(
                p.blocks,
                p.banks,
                self.options.block,
                boot_bank=self.options.boot_bank,
                flash=p.flash,
            )
        return self._map

    @property
    def ram(self) -> RamLayout:
        if self._ram is None:
            p = self.probe
            self._ram = plan_ram(p.board, p.env, self.max_transfer, self.options.ram_base)
        return self._ram

    @property
    def firmware_mode(self) -> str:
        if self.options.firmware != "auto":
            return self.options.firmware
        return "uboot" if self.probe.env.get("vendor") == "emulation" else "os"

    def _read_probe(self) -> Probe:
        commands = P.parse_help(self._run("help", check=False).output)
        version = P.parse_version(self._run("version").output)
        board = P.parse_bdinfo(self._run("bdinfo").output)
        env = P.parse_printenv(self._run("printenv").output)
        banks: tuple[P.FlashBank, ...] = ()
        if "flinfo" in commands:
            banks = P.parse_flinfo(self._run("flinfo", check=False).output)
        blocks: list[P.BlockDevice] = []
        wanted = {_parse_block_name(self.options.block)[0]} if self.options.block else set()
        for iface in BLOCK_INTERFACES:
            if iface not in commands or iface == "mmc":
                continue
            if iface in ("usb", "scsi") and iface not in wanted:
                continue  # starting USB or SCSI takes seconds: only on request
            self._scan(iface)
            out = self._run(f"{iface} info", check=False).output
            blocks += P.parse_blk_info(out, iface)
        if "mmc" in commands and (not wanted or "mmc" in wanted):
            blocks += self._mmc_devices()
        mtd: tuple[P.MtdDevice, ...] = ()
        if "mtd" in commands:
            mtd = P.parse_mtd_list(self._run("mtd list", check=False).output)
        scratch = board.dram[0][0] if board.dram else 0
        flash = M.probe_flash(self._run, commands, env, mtd, scratch)
        return Probe(version, board, env, commands, banks, tuple(blocks), mtd, flash)

    def _scan(self, iface: str) -> None:
        if iface in self._scanned:
            return
        self._scanned.add(iface)
        start = {"nvme": "nvme scan", "usb": "usb start", "scsi": "scsi scan"}.get(iface)
        if start:
            self._run(start, check=False, timeout_s=self.options.console.command_timeout_s + 20)

    def _mmc_devices(self) -> list[P.BlockDevice]:
        out = self._run("mmc list", check=False).output
        found = []
        for m in re.finditer(r"^\s*(\S+): (\d+)", out, re.M):
            index = int(m.group(2))
            dev = self._run(f"mmc dev {index}", check=False)
            if dev.errors:
                continue
            try:
                info = P.parse_mmc_info(self._run("mmc info", check=False).output)
            except P.UBootParseError:
                continue
            found.append(
                P.BlockDevice(
                    "mmc",
                    index,
                    m.group(1),
                    info.read_block_bytes,
                    info.capacity_bytes // info.read_block_bytes,
                )
            )
        return found

    # -- Identify ---------------------------------------------------------------------------

    def identify(self) -> DeviceIdentity:
        """Read the identity: ``version``, ``printenv`` and the storage probes."""
        probe = self.probe
        # The environment may have changed (setenv) since the probe: read it again.
        env = P.parse_printenv(self._run("printenv").output)
        version = P.parse_version(self._run("version").output)
        smap = self.storage_map
        model = env.get("board_name") or env.get("board") or "U-Boot device"
        serial = env.get("serial#") or env.get("ethaddr") or ""
        extra: dict[str, str] = {
            "uboot_version": version.version,
            "uboot_banner": version.banner,
            "firmware_mode": self.firmware_mode,
            "storage_map": smap.describe(),
        }
        if version.release:
            extra["uboot_release"] = version.release
        for key in (
            "board",
            "board_name",
            "arch",
            "cpu",
            "soc",
            "vendor",
            "serial#",
            "ethaddr",
            "mtdparts",
            "bootcmd",
        ):
            if key in env:
                extra[key] = env[key][:512]
        if probe.board.build_bits:
            extra["build"] = f"{probe.board.build_bits}-bit"
        if probe.board.dram:
            extra["dram"] = " ".join(f"0x{s:x}+0x{n:x}" for s, n in probe.board.dram)
        if probe.blocks:
            extra["block_devices"] = " ".join(f"{b.name}:{b.size_bytes}" for b in probe.blocks)
        if probe.banks:
            extra["flash_banks"] = " ".join(
                f"#{b.number}@0x{b.base:08x}+0x{b.size_bytes:x}" for b in probe.banks
            )
        if probe.mtd:
            extra["mtd"] = " ".join(m.name for m in probe.mtd)
        if probe.flash is not None:
            extra["mtd_flash"] = probe.flash.describe()
        storage = None
        if smap.windows:
            kinds = {w.kind for w in smap.windows}
            kind = next((k for k in ("block", "nand", "sf") if k in kinds), "nor")
            page = max((w.unit for w in smap.windows if w.kind == "block"), default=1)
            if kind == "nand" and probe.flash is not None:
                page = probe.flash.page_bytes
            storage = StorageInfo(
                type=M.window_storage_type(kind),
                size_bytes=smap.size_bytes,
                erase_block_bytes=max(w.unit for w in smap.windows),
                page_bytes=page,
            )
        return DeviceIdentity(
            model=model,
            serial=serial,
            hw_revision=_first(env, HW_REVISION_VARS),
            region=_first(env, REGION_VARS),
            bootloader_version=version.version,
            # Which firmware the storage holds is not something U-Boot can say.
            firmware_version=None,
            storage=storage,
            extra=extra,
        )

    # -- RAM helpers ------------------------------------------------------------------------

    def _ensure_fills(self) -> None:
        if self._fills_ready:
            return
        ram = self.ram
        size = ram.fill_bytes
        self._run(f"mw.b 0x{ram.fill_ff:x} 0xff 0x{size:x}", timeout_s=self._t())
        self._run(f"mw.b 0x{ram.fill_00:x} 0x00 0x{size:x}", timeout_s=self._t())
        self._fills_ready = True

    def _t(self, data_bytes: int = 0, factor: float = 1.0) -> float:
        return self.console.options.timeout_for(data_bytes, factor)

    def _crc32(self, address: int, length: int) -> int:
        if length <= 0:
            return 0
        res = P.parse_crc32(
            self._run(f"crc32 0x{address:x} 0x{length:x}", timeout_s=self._t()).output
        )
        if res.start != address or res.length != length:
            raise P.UBootParseError(
                f"crc32 answered for 0x{res.start:x}+0x{res.length:x}, "
                f"not 0x{address:x}+0x{length:x}"
            )
        return res.crc

    def _cmp(self, a: int, b: int, length: int) -> int:
        """Bytes equal at the start of ``a`` and ``b`` (``length`` when all are)."""
        out = self._run(f"cmp.b 0x{a:x} 0x{b:x} 0x{length:x}", check=False, timeout_s=self._t())
        res = P.parse_cmp(out.output)
        if res.same_bytes > length:
            raise P.UBootParseError(f"cmp counted {res.same_bytes} of {length} bytes")
        return res.same_bytes

    def _fill_of(self, address: int, length: int) -> int | None:
        """0xFF or 0x00 when the whole range holds that byte (exact, by ``cmp``)."""
        self._ensure_fills()
        ram = self.ram
        if length > ram.fill_bytes:
            return None
        for value, fill in ((0xFF, ram.fill_ff), (0x00, ram.fill_00)):
            if self._cmp(address, fill, length) == length:
                return value
        return None

    def _cpu_byteorder(self) -> str:
        """The CPU's byte order, seen through ``md.l`` of known bytes."""
        if self._byteorder is None:
            addr = self.ram.scratch
            self._run(f"mw.l 0x{addr:x} 0x04030201 1")
            out = self._run(f"md.b 0x{addr:x} 4").output
            first = P.parse_md(out, start=addr, length=4)
            self._byteorder = "little" if first == b"\x01\x02\x03\x04" else "big"
        return self._byteorder

    def _dump(self, address: int, length: int, *, ram: bool) -> bytes:
        """Bytes at a CPU address by ``md``, each page cross-checked with ``crc32``."""
        out = bytearray()
        page = self.options.read_page_bytes
        for pos in range(0, length, page):
            n = min(page, length - pos)
            out += self._dump_page(address + pos, n, ram=ram)
        return bytes(out)

    def _dump_page(self, address: int, length: int, *, ram: bool) -> bytes:
        fill = self._fill_of(address, length)
        if fill is not None:
            self.stats.fill_hits += 1
            return bytes([fill]) * length
        width = 1
        wide = 8 if (ram and self.probe.board.build_bits == 64) else 4
        if address % wide == 0 and length % wide == 0:
            width = wide
        order = self._cpu_byteorder() if width > 1 else "little"
        want = self._crc32(address, length)
        suffix = {1: "b", 2: "w", 4: "l", 8: "q"}[width]
        last: UnbrickError | None = None
        for attempt in range(2):
            text = self._run(
                f"md.{suffix} 0x{address:x} 0x{length // width:x}",
                timeout_s=self._t(length * 5),
            ).output
            try:
                data = P.parse_md(text, start=address, length=length, width=width, byteorder=order)
            except P.UBootParseError as e:
                last = e
                log.warning("md dump at 0x%x unreadable (attempt %d): %s", address, attempt + 1, e)
                continue
            self.stats.dumps += 1
            self.stats.bytes_dumped += length
            if zlib.crc32(data) == want:
                return data
            last = TransportError(f"md dump at 0x{address:x} does not match the device's crc32")
            log.warning("md dump at 0x%x does not match crc32 (attempt %d)", address, attempt + 1)
        raise TransportError(
            f"reading 0x{length:x} bytes at 0x{address:x} failed twice: {last}",
            hint="the console garbles long output; check the cable and baud rate",
        )

    # -- block devices ----------------------------------------------------------------------

    def _blk(self, win: Window, op: str, ram_addr: int, block: int, count: int) -> None:
        if count <= 0:
            raise UsageError("a block transfer of 0 blocks hangs U-Boot; refusing it")
        if win.interface == "mmc":
            self._run(f"mmc dev {win.index}", timeout_s=self._t())
            cmd = f"mmc {op} 0x{ram_addr:x} 0x{block:x} 0x{count:x}"
        else:
            self._scan(win.interface)
            cmd = f"{win.interface} {op} 0x{ram_addr:x} 0x{block:x} 0x{count:x}"
        out = self._run(cmd, check=False, timeout_s=self._t(count * win.unit, 0.05))
        try:
            res = P.parse_blk_transfer(out.output)
        except P.UBootParseError as e:
            raise DeviceError(
                f"{win.name}: '{cmd}' failed: {out.errors[0] if out.errors else e.message}"
            ) from e
        if not res.ok or res.block != block or res.count != count:
            raise DeviceError(
                f"{win.name}: {op} of {count} blocks at block {block} failed "
                f"({res.done} blocks {op})",
                hint="the disk refused the transfer; check it is attached and not read-only",
            )

    def _block_read(self, win: Window, offset: int, length: int) -> tuple[int, int]:
        """Read the blocks covering ``offset``..``+length`` into stage RAM; returns
        (RAM address of ``offset``, bytes read into RAM)."""
        bs = win.unit
        first = (win.base + offset) // bs
        last = -(-(win.base + offset + length) // bs)
        count = last - first
        if count * bs > self.ram.stage_bytes:
            raise UsageError(f"block read of {count} blocks is larger than the stage buffer")
        self._blk(win, "read", self.ram.stage, first, count)
        return self.ram.stage + (win.base + offset) % bs, count * bs

    # -- FlashRead --------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for win, off, n in self.storage_map.split(offset, length):
            step = min(self.max_transfer, self.ram.stage_bytes - win.unit)
            for pos in range(0, n, step):
                k = min(step, n - pos)
                data = self._read_piece(win, off + pos, k)
                self._remember(win.start + off + pos, data)
                out += data
        return bytes(out)

    def _read_piece(self, win: Window, offset: int, length: int) -> bytes:
        if win.kind in M.MTD_KINDS:
            addr = self._mtd().stage(win.base + offset, length)
            return self._dump_chunk(addr, length, ram=True)
        if win.kind == "block":
            addr, _ = self._block_read(win, offset, length)
            return self._dump_chunk(addr, length, ram=True)
        return self._dump_chunk(win.base + offset, length, ram=False)

    def _dump_chunk(self, address: int, length: int, *, ram: bool) -> bytes:
        fill = self._fill_of(address, length)
        if fill is not None:
            self.stats.fill_hits += 1
            return bytes([fill]) * length
        if self._net_usable("tftpput"):
            try:
                return self._tftp_dump(address, length)
            except TransportError as e:
                self.stats.net_failure = e.message
                self.console.abort_transfer()
                log.warning("%s: tftpput failed (%s); reading by md dumps", self.address, e)
        return self._dump(address, length, ram=ram)

    def _remember(self, offset: int, data: bytes) -> None:
        fill = _uniform(data)
        if fill is not None:
            self.shadow.put_fill(offset, len(data), fill)
        else:
            self.shadow.put(offset, data)

    # -- DeviceHash -------------------------------------------------------------------------

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        """``crc32``: the device's CRC-32 of the range. ``sha256``/``md5``/``sha1``: the
        device's own digest where U-Boot has ``hash``/``md5sum`` and the range is one piece
        in RAM or on NOR; otherwise the digest of the bytes the device's CRC-32 confirms
        (known bytes, else read back)."""
        if algorithm not in ("sha256", "crc32", "md5", "sha1"):
            raise UsageError(
                f"U-Boot cannot hash with {algorithm!r}", hint="use sha256, md5, sha1 or crc32"
            )
        pieces = [
            (win, off + pos, min(self._hash_step(win, n), n - pos))
            for win, off, n in self.storage_map.split(offset, length)
            for pos in range(0, n, self._hash_step(win, n))
        ]
        if algorithm != "crc32" and len(pieces) == 1 and self._native_hash(algorithm):
            win, off, n = pieces[0]
            native = self._device_digest(self._stage_addr(win, off, n), n, algorithm)
            if native is not None:
                return native
        digest = hashlib.new(algorithm if algorithm != "crc32" else "sha256")
        crc = 0
        for win, off, k in pieces:
            start = win.start + off
            device_crc = self._device_crc(win, off, k)
            if algorithm == "crc32":
                crc = P.crc32_combine(crc, device_crc, k)
                continue
            known = self.shadow.get(start, k)
            if known is not None and zlib.crc32(known) == device_crc:
                self.stats.shadow_hits += 1
            else:
                known = self.read(start, k)
                if zlib.crc32(known) != device_crc:
                    raise TransportError(
                        f"the device changed while 0x{start:x}+0x{k:x} was hashed",
                        hint="retry; if it repeats, the storage does not read back stably",
                    )
            digest.update(known)
        return f"{crc:08x}" if algorithm == "crc32" else digest.hexdigest()

    def _hash_step(self, win: Window, n: int) -> int:
        return self.ram.stage_bytes - win.unit if win.kind != "nor" else max(n, 1)

    def _native_hash(self, algorithm: str) -> str | None:
        """The command that computes ``algorithm`` on the device, if U-Boot has one that has
        not failed in this session."""
        if algorithm in self._no_native:
            return None
        commands = self.probe.commands
        if algorithm == "md5" and "md5sum" in commands:
            return "md5sum"
        if "hash" in commands:
            return f"hash {algorithm}"
        return None

    def _device_digest(self, address: int, length: int, algorithm: str) -> str | None:
        command = self._native_hash(algorithm)
        if command is None:
            return None
        out = self._run(
            f"{command} 0x{address:x} 0x{length:x}", check=False, timeout_s=self._t(length, 0.05)
        )
        try:
            res = P.parse_digest(out.output, algorithm)
        except P.UBootParseError:
            # "Unknown command", or the algorithm is not compiled in: not again this session.
            log.info("%s: U-Boot cannot %r here; hashing on the host", self.address, command)
            self._no_native.add(algorithm)
            return None
        if res.start != address or res.length != length:
            raise P.UBootParseError(
                f"{command} answered for 0x{res.start:x}+0x{res.length:x}, "
                f"not 0x{address:x}+0x{length:x}"
            )
        self.stats.device_digests += 1
        return res.hexdigest

    def _stage_addr(self, win: Window, offset: int, length: int) -> int:
        """The CPU address that holds the window's bytes (staged in RAM where needed)."""
        if win.kind in M.MTD_KINDS:
            return self._mtd().stage(win.base + offset, length)
        if win.kind == "block":
            addr, _ = self._block_read(win, offset, length)
            return addr
        return win.base + offset

    def _device_crc(self, win: Window, offset: int, length: int) -> int:
        if length <= 0:
            return 0
        return self._crc32(self._stage_addr(win, offset, length), length)

    # -- FlashErase -------------------------------------------------------------------------

    def erase(self, offset: int, length: int) -> None:
        """NOR: ``protect off`` and ``erase`` of whole sectors. Block devices have nothing to
        erase: the next program overwrites the blocks (their content is left as it was)."""
        for win, off, n in self.storage_map.split(offset, length):
            if win.kind == "block":
                continue
            if win.kind in M.MTD_KINDS:
                self.shadow.drop(win.start + off, n)
                self._mtd().erase(win.base + off, n)
                continue
            start = win.base + off
            bank = self._bank(start)
            first = bank.sector_at(start)
            last = bank.sector_at(start + n - 1)
            if (
                first is None
                or last is None
                or first.start != start
                or (last.start + last.size_bytes != start + n)
            ):
                raise UsageError(
                    f"{win.name}: erase of 0x{start:x}+0x{n:x} is not on sector boundaries",
                    hint="the profile's erase_block must be a multiple of the NOR sector size",
                )
            sectors = sum(1 for s in bank.sectors if start <= s.start < start + n)
            self.shadow.drop(win.start + off, n)
            self._run(f"protect off 0x{start:x} +0x{n:x}", timeout_s=self._t())
            out = self._run(
                f"erase 0x{start:x} +0x{n:x}", timeout_s=self._t() + 2.0 * sectors
            ).output
            skipped = P.protected_warning(out)
            erased = P.parse_sector_count(out, "Erased")
            if skipped or erased != sectors:
                raise DeviceError(
                    f"{win.name}: erase of 0x{start:x}+0x{n:x} erased {erased - skipped} of "
                    f"{sectors} sectors",
                    hint="a sector is protected or the flash refused the erase",
                )

    def _bank(self, address: int) -> P.FlashBank:
        for bank in self.probe.banks:
            if bank.base <= address < bank.end:
                return bank
        raise UsageError(f"0x{address:x} is in no NOR bank")

    def _mtd(self) -> M.MtdIO:
        """The SPI NOR or NAND chip's data path (:mod:`.mtd`)."""
        flash = self.probe.flash
        if flash is None:
            raise UsageError(f"{self.address}: no SPI NOR or NAND flash was found")
        return M.MtdIO(self, flash, self.stats.mtd_retries)

    # -- FlashWrite -------------------------------------------------------------------------

    def program(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        for win, off, n in self.storage_map.split(offset, len(data)):
            for pos in range(0, n, self.max_transfer):
                k = min(self.max_transfer, n - pos)
                chunk = bytes(view[done + pos : done + pos + k])
                if win.kind == "block":
                    self._program_block(win, off + pos, chunk)
                elif win.kind in M.MTD_KINDS:
                    self._program_mtd(win, off + pos, chunk)
                else:
                    self._program_nor(win, off + pos, chunk)
            done += n

    def _program_mtd(self, win: Window, offset: int, data: bytes) -> None:
        """``sf write``/``nand write``, checked with crc32 and retried once (:mod:`.mtd`)."""
        start = win.start + offset
        self.shadow.drop(start, len(data))
        if self._mtd().program(win.base + offset, data, start) == "skipped":
            self.stats.skipped_bytes += len(data)
        self._remember(start, data)

    def _already(self, win: Window, offset: int, data: bytes) -> int | None:
        """The fill byte when ``data`` is one byte repeated; the range is checked with
        ``cmp`` against the fill buffer. Returns the fill when the device already holds it."""
        fill = _uniform(data)
        if fill is None or fill not in (0x00, 0xFF) or len(data) > self.ram.fill_bytes:
            return None
        if win.kind == "block":
            addr, _ = self._block_read(win, offset, len(data))
        else:
            addr = win.base + offset
        return fill if self._fill_of(addr, len(data)) == fill else None

    def _program_block(self, win: Window, offset: int, data: bytes) -> None:
        bs = win.unit
        at = win.base + offset
        first = at // bs
        count = -(-(at + len(data)) // bs) - first
        if self._already(win, offset, data) is not None:
            self.stats.skipped_bytes += len(data)
            self.shadow.put_fill(win.start + offset, len(data), data[0])
            return
        fill = _uniform(data)
        if fill in (0x00, 0xFF) and at % bs == 0 and len(data) % bs == 0:
            self._ensure_fills()
            src = self.ram.fill_ff if fill == 0xFF else self.ram.fill_00
        else:
            src = self.load(data)
        if at % bs or len(data) % bs:
            # Read-modify-write of the partial blocks at either end.
            ram = self.ram.stage
            self._blk(win, "read", ram, first, count)
            self._run(f"cp.b 0x{src:x} 0x{ram + at % bs:x} 0x{len(data):x}", timeout_s=self._t())
            src = ram
        self._blk(win, "write", src, first, count)
        self.shadow.put(win.start + offset, data)

    def _program_nor(self, win: Window, offset: int, data: bytes) -> None:
        dst = win.base + offset
        start = win.start + offset
        n = len(data)
        if _uniform(data) == 0xFF and self._already(win, offset, data) is not None:
            # Erased flash already reads 0xFF: nothing to program.
            self.stats.skipped_bytes += n
            self.shadow.put_fill(start, n, 0xFF)
            return
        src = self.load(data)
        out = self._run(f"cp.b 0x{src:x} 0x{dst:x} 0x{n:x}", check=False, timeout_s=self._t(n, 0.5))
        if any("protected" in e for e in out.errors):
            raise DeviceError(
                f"{win.name}: copy to flash at 0x{dst:x} failed: {out.errors[0]}",
                hint="the sector is protected; unprotect it (the driver does so before erasing)",
            )
        if out.errors:
            # A buffered write that timed out may have left the chip in status mode.
            log.warning("%s: cp.b to 0x%x reported: %s", win.name, dst, "; ".join(out.errors))
            self._read_array(dst)
        same = self._cmp(src, dst, n)
        if same == n:
            self.shadow.put(start, data)
            return
        self.stats.nor_mismatches.append((start + same, n - same))
        log.warning(
            "%s: cp.b to 0x%x did not stick from byte %d of %d (the flash reads back other data)%s",
            win.name,
            dst,
            same,
            n,
            "; programming word by word" if self.options.nor_fallback else "",
        )
        self.shadow.drop(start, n)
        if not self.options.nor_fallback:
            return
        try:
            ok = self._word_program(src, dst, data, same)
        except DeviceError as e:
            log.error("%s: no word-program fallback: %s", win.name, e.message)
            return
        self.stats.nor_fallbacks.append((start, n, ok))
        if ok:
            self.shadow.put(start, data)
        else:
            log.error("%s: word programming at 0x%x did not verify either", win.name, dst)

    def _read_array(self, dst: int) -> None:
        with contextlib.suppress(DeviceError):
            word, _, read_array = self._word_geometry(dst)
            suffix = {1: "b", 2: "w", 4: "l", 8: "q"}[word]
            self._run(f"mw.{suffix} 0x{dst - dst % word:x} 0x{read_array:x}", timeout_s=self._t())

    # -- NOR word programming ---------------------------------------------------------------

    def _word_geometry(self, dst: int) -> tuple[int, int, int]:
        """(word bytes, program command word, read-array command word) for the bank."""
        bank = self._bank(dst)
        if "intel" not in bank.command_set.lower():
            raise DeviceError(
                f"NOR bank #{bank.number} uses the {bank.command_set or 'unknown'} command "
                "set; the word-program fallback knows Intel's",
            )
        port = (bank.port_width_bits or 16) // 8
        chip = (bank.chip_width_bits or 16) // 8
        word = self.options.nor_word_bytes or port
        copies = max(1, word // max(1, min(chip, word)))
        lane = 8 * min(chip, word)
        program = sum(0x40 << (lane * i) for i in range(copies))
        read_array = sum(0xFF << (lane * i) for i in range(copies))
        return word, program, read_array

    def _word_program(self, src: int, dst: int, data: bytes, same: int) -> bool:
        """Program ``data`` (already in RAM at ``src``) at ``dst`` word by word from the first
        byte that differs, page by page; True when it then compares equal."""
        word, program, read_array = self._word_geometry(dst)
        suffix = {1: "b", 2: "w", 4: "l", 8: "q"}[word]
        n = len(data)
        if dst % word:
            raise UsageError(f"NOR programming at 0x{dst:x} is not {word}-byte aligned")
        # Pad the tail word with 0xFF (programming 1-bits changes nothing).
        tail = -n % word
        if tail:
            self._run(f"mw.b 0x{src + n:x} 0xff 0x{tail:x}", timeout_s=self._t())
        padded = data + b"\xff" * tail
        page = 4 * KiB
        pos = (same // word) * word
        use_loop = {"setexpr", "itest"} <= self.probe.commands
        try:
            while pos < len(padded):
                page_end = min(len(padded), (pos // page + 1) * page)
                for a, b in _spans(padded, pos, page_end, word):
                    if use_loop:
                        self._program_loop(src + a, dst + a, b - a, suffix, program)
                    else:
                        self._program_lines(dst + a, padded[a:b], word, suffix, program)
                self._run(f"mw.{suffix} 0x{dst:x} 0x{read_array:x}", timeout_s=self._t())
                if page_end >= n:
                    break
                more = self._cmp(src + page_end, dst + page_end, n - page_end)
                if page_end + more >= n:
                    break
                pos = ((page_end + more) // word) * word
        finally:
            with contextlib.suppress(UnbrickError):
                if self.console.state is ConsoleState.PROMPT:
                    self._run(f"mw.{suffix} 0x{dst:x} 0x{read_array:x}", timeout_s=self._t())
                    if use_loop:
                        self._run("; ".join(f"setenv {v}" for v in _LOOP_VARS))
        return self._cmp(src, dst, n) == n

    def _program_loop(self, src: int, dst: int, length: int, suffix: str, program: int) -> None:
        """A hush loop on the device: per word, the program command, then the word."""
        a, d, e, v = _LOOP_VARS
        self._run(f"setenv {a} 0x{src:x}; setenv {d} 0x{dst:x}; setenv {e} 0x{dst + length:x}")
        step = {"b": 1, "w": 2, "l": 4, "q": 8}[suffix]
        loop = (
            f"while itest ${d} -lt ${e}; do setexpr.{suffix} {v} *${a}; "
            f"mw.{suffix} ${d} 0x{program:x}; mw.{suffix} ${d} ${v}; "
            f"setexpr {a} ${a} + {step}; setexpr {d} ${d} + {step}; done"
        )
        self._run(loop, timeout_s=self._t() + (length / step) * 0.005)

    def _program_lines(self, dst: int, data: bytes, word: int, suffix: str, program: int) -> None:
        """The same from the host: a few words per command line (no shell loop needed)."""
        limit = self.console.options.max_line_chars
        parts: list[str] = []
        for i in range(0, len(data), word):
            value = int.from_bytes(data[i : i + word], self._cpu_byteorder())  # type: ignore[arg-type]
            addr = dst + i
            part = f"mw.{suffix} 0x{addr:x} 0x{program:x}; mw.{suffix} 0x{addr:x} 0x{value:x}"
            if parts and len("; ".join([*parts, part])) > limit:
                self._run("; ".join(parts), timeout_s=self._t())
                parts = []
            parts.append(part)
        if parts:
            self._run("; ".join(parts), timeout_s=self._t())

    # -- transfers to RAM -------------------------------------------------------------------

    def load(self, data: bytes, address: int | None = None) -> int:
        """Send ``data`` to RAM (``address``, else the transfer buffer) and check it there
        with ``crc32``; one retry per method. TFTP that fails hands over to the serial line
        for the rest of the session. Returns the RAM address."""
        addr = self.ram.transfer if address is None else address
        if not data:
            raise UsageError("nothing to send")
        if address is None and len(data) > self.max_transfer:
            raise UsageError(f"{len(data)} bytes exceed the {self.max_transfer}-byte buffer")
        methods = self._load_methods(data)
        for i, method in enumerate(methods):
            try:
                self._load_with(method, addr, data)
            except TransportError as e:
                if method != "tftp" or i + 1 == len(methods):
                    raise
                self.stats.net_failure = e.message
                log.warning(
                    "%s: TFTP failed (%s); using %s from now on", self.address, e, methods[i + 1]
                )
                continue
            return addr
        raise AssertionError("unreachable")  # pragma: no cover

    def _serial_method(self, data: bytes) -> str:
        from unbrick.transports.xymodem import uboot_loadx_image  # noqa: PLC0415

        method = "loadx" if "loadx" in self.probe.commands else "loady"
        if method == "loadx" and uboot_loadx_image(data) != data:
            method = "loady" if "loady" in self.probe.commands else "loadx"
        return method

    def _net_usable(self, command: str) -> bool:
        return (
            self.options.net is not None
            and not self.stats.net_failure
            and command in self.probe.commands
        )

    def _load_methods(self, data: bytes) -> list[str]:
        method = self.options.transfer
        if method == "tftp":
            if self.options.net is None:
                raise UsageError(
                    "transfer=tftp needs serverip= (this host's address as the device reaches it)"
                )
            return ["tftp"]
        if method != "auto":
            return [method]
        serial = self._serial_method(data)
        return ["tftp", serial] if self._net_usable("tftpboot") else [serial]

    def _load_with(self, method: str, addr: int, data: bytes) -> None:
        want = zlib.crc32(data)
        errors: list[UnbrickError] = []
        for attempt in range(2):
            try:
                if method == "tftp":
                    self._tftp_send(addr, data)
                else:
                    self._send(method, addr, data)
                got = self._crc32(addr, len(data))
                if got == want:
                    self.stats.loads += 1
                    self.stats.bytes_loaded += len(data)
                    if method == "tftp":
                        self.stats.net_loads += 1
                    return
                errors.append(TransportError(f"crc32 {got:08x} in RAM, {want:08x} sent"))
            except NetworkError as e:
                errors.append(e)
                self.console.abort_transfer()
                break  # the network gave up after its own retries: do not wait twice
            except TransportError as e:
                errors.append(e)
                self.console.abort_transfer()
            self.stats.load_retries += 1
            log.warning("transfer to RAM failed (attempt %d): %s", attempt + 1, errors[-1])
        first, again = errors[0].message, errors[-1].message
        command = "tftpboot" if method == "tftp" else method
        times = "twice" if len(errors) > 1 else "once"
        raise TransportError(
            f"'{command} 0x{addr:x}' of {len(data)} bytes failed {times}: {first}"
            + ("" if again == first else f"; then: {again}"),
            hint="check the cable and the baud rate; transfers are checked and safe to retry"
            if method != "tftp"
            else "check the network cable, serverip/ipaddr and that port 69 is not firewalled",
        )

    # -- TFTP -------------------------------------------------------------------------------

    def _net_server(self) -> SessionServer:
        """The session's TFTP server, started and announced to the device's environment."""
        net = self.options.net
        if net is None:
            raise UsageError("no network configured (serverip=)")
        if self._net is None:
            self._net = SessionServer(net)
        port = self._net.start()
        if self._net_env_port != port:
            pairs = net.env(port)
            self._run("; ".join(f"setenv {k} {v}" for k, v in pairs), timeout_s=self._t())
            if net.ipaddr is None:
                env = P.parse_printenv(self._run("printenv ipaddr", check=False).output)
                if not env.get("ipaddr"):
                    raise TransportError(
                        "the device has no ipaddr for TFTP",
                        hint="give the device an address with ipaddr= in the device URI",
                    )
            self._net_env_port = port
        return self._net

    def _tftp_send(self, addr: int, data: bytes) -> None:
        server = self._net_server()
        name = server.offer(data)
        try:
            out = self._run(
                f"tftpboot 0x{addr:x} {name}",
                check=False,
                timeout_s=self._t() + 30.0 + len(data) / (256 * KiB),
            )
        finally:
            server.withdraw(name)
        count = parse_tftp_transfer(out.output)
        if count != len(data):
            raise TransportError(f"tftpboot moved {count} bytes of {len(data)}")

    def _tftp_dump(self, address: int, length: int) -> bytes:
        """Bytes at a CPU address, sent by the device with ``tftpput`` and checked against
        its ``crc32``."""
        server = self._net_server()
        want = self._crc32(address, length)
        name = server.upload_name()
        timeout = self._t() + 30.0 + length / (256 * KiB)
        command = f"tftpput 0x{address:x} 0x{length:x} {name}"
        out = self._run(command, check=False, timeout_s=timeout)
        count = parse_tftp_transfer(out.output)
        data = server.take(name, timeout_s=5.0)
        if count != length or len(data) != length:
            raise TransportError(f"tftpput sent {len(data)} bytes of {length}")
        if zlib.crc32(data) != want:
            raise TransportError(f"tftpput of 0x{address:x}+0x{length:x} does not match crc32")
        self.stats.net_reads += 1
        return data

    def _send(self, method: str, addr: int, data: bytes) -> None:
        from unbrick.transports.xymodem_io import send_xmodem, send_ymodem  # noqa: PLC0415

        opts = self.options
        ready = re.compile(rb"## Ready for binary \((?:xmodem|ymodem)\) download[^\n]*\n")
        self.console.start_transfer(f"{method} 0x{addr:x}", ready, self._t())
        link: ByteLink = self.console.link
        if method == "loadx":
            send_xmodem(
                link, data, timeout_s=opts.transfer_timeout_s, retries=opts.transfer_retries
            )
        else:
            send_ymodem(
                link,
                "unbrick.bin",
                data,
                timeout_s=opts.transfer_timeout_s,
                retries=opts.transfer_retries,
            )
        text = self.console.finish_transfer(self._t(), what=f"the end of {method}")
        result = P.parse_load_result(text)
        if result.start != addr or result.size_bytes < len(data):
            raise TransportError(
                f"{method}: U-Boot stored {result.size_bytes} bytes at 0x{result.start:x}, "
                f"expected {len(data)} at 0x{addr:x}"
            )

    # -- Reboot -----------------------------------------------------------------------------

    def enter_recovery(self, timeout_s: float) -> None:
        """Be at the U-Boot prompt: a quick check when the session is there, else wait (up to
        ``timeout_s``) for the device to boot and stop its autoboot."""
        con = self.console
        if con.state is ConsoleState.PROMPT:
            try:
                con.resync(timeout_s=min(3.0, timeout_s))
                return
            except TransportError:
                log.info("%s: no prompt; waiting for the device to boot", self.address)
        elif con.state is ConsoleState.LOST and self.options.os_reboot:
            # The operating system owns the console (the last boot reached it): ask it to
            # restart, so that U-Boot's countdown comes round again.
            log.info("%s: asking the operating system to %r", self.address, self.options.os_reboot)
            con.link.write(b"\r" + self.options.os_reboot.encode() + b"\r")
        con.expect_boot()
        con.attach(timeout_s)
        self._fills_ready = False
        self._net_env_port = None

    def reboot(self, timeout_s: float) -> BootReport:
        """``reset`` and watch the console. Firmware "uboot": U-Boot coming back (banner and
        autoboot, which is then stopped) is a good boot. Firmware "os": the console is watched
        until the operating system has started and gone quiet, or U-Boot's prompt comes back
        (state "bootloader"), or the banner repeats (a boot loop, "bootloader")."""
        mode = self.firmware_mode
        con = self.console
        con.ensure_prompt()
        con.send_reset("reset")
        self._fills_ready = False
        self._net_env_port = None
        prompt = re.escape(con.options.prompt)
        autoboot = con.options.autoboot_pattern
        if mode == "uboot":
            stop = re.compile(rb"(?:" + autoboot + rb")|\n" + prompt + rb"$")
            text, reason = con.capture(timeout_s=timeout_s, stop=stop)
            if reason != "stop":
                return BootReport(log=_tail(text), state="dead")
            con.interrupt_boot(min(10.0, timeout_s))
            version = None
            with contextlib.suppress(P.UBootParseError):
                version = P.parse_version(text).version
            state = "firmware" if _BANNER.search(text.encode()) else "bootloader"
            return BootReport(log=_tail(text), state=state, firmware_version=version)
        # A second banner ends the capture right there: its countdown stays buffered.
        stop = re.compile(
            rb"\n" + prompt + rb"$|" + _BANNER.pattern + rb"(?s:.*?)" + _BANNER.pattern
        )
        text, reason = con.capture(
            timeout_s=timeout_s, stop=stop, quiet_s=self.options.boot_quiet_s
        )
        raw = text.encode()
        if reason == "stop":
            with contextlib.suppress(TransportError):
                if len(_BANNER.findall(raw)) >= 2:
                    # Stop the loop at the next countdown: the driver keeps the console, so
                    # the engine can roll back through it.
                    log.warning(
                        "%s: U-Boot started twice after the reset: a boot loop", self.address
                    )
                    con.expect_boot()
                    con.attach(min(10.0, timeout_s))
                else:
                    con.resync(timeout_s=3.0)
            return BootReport(log=_tail(text), state="bootloader")
        if reason == "silent":
            con.state = ConsoleState.LOST
            return BootReport(log="", state="dead")
        con.state = ConsoleState.LOST  # the operating system owns the console now
        state = "firmware" if OS_STARTED.search(raw) else "dead"
        self._in_os = state == "firmware"
        return BootReport(log=_tail(text), state=state)

    # -- BootControl (U-Boot's bootcount scheme) ---------------------------------------------

    def _boot_env(self) -> dict[str, str]:
        env = P.parse_printenv(self._run("printenv").output)
        var = self.options.slot_var
        if not env.get(var) or not ("bootlimit" in env or "altbootcmd" in env):
            raise DeviceError(
                f"U-Boot's environment has no A/B boot control ({var}, bootlimit, altbootcmd)",
                hint="write the slot's region with --partition, or name the slot variable "
                "with slot_var=",
            )
        return env

    def boot_state(self) -> BootState:
        env = self._boot_env()
        active = env[self.options.slot_var]
        trial = None
        if env.get("upgrade_available") == "1":
            trial = f"not {active}"
        return BootState(
            active_slot=active,
            trial_slot=trial,
            bootcount=_int_or(env.get("bootcount"), 0),
            bootlimit=_int_or(env.get("bootlimit"), 0),
            extra={"upgrade_available": env.get("upgrade_available", "0")},
        )

    def set_trial(self, slot: str) -> None:
        """Try the other slot on the next boot: ``upgrade_available=1``, ``bootcount=0``,
        saved; U-Boot falls back through ``altbootcmd`` after ``bootlimit`` failed boots."""
        env = self._boot_env()
        if env[self.options.slot_var] == slot:
            raise DeviceError(
                f"slot {slot} is the active slot; only the other slot can be tried",
                hint="write the inactive slot and try that one",
            )
        self._save_env({"upgrade_available": "1", "bootcount": "0"})

    def commit(self, slot: str) -> None:
        """Make ``slot`` the one that boots and clear the trial state. After a boot into the
        firmware this goes back to U-Boot (see :meth:`enter_recovery`), saves, and boots."""
        was_in_os = self._in_os
        self._boot_env()
        self._save_env({self.options.slot_var: slot, "upgrade_available": "0", "bootcount": "0"})
        if was_in_os:
            self.console.send_reset("boot")
            self._in_os = True

    def _save_env(self, values: dict[str, str]) -> None:
        sets = "; ".join(f"setenv {k} {v}" for k, v in values.items())
        out = self._run(f"{sets}; saveenv", timeout_s=self._t() + 10.0).output
        # "Saving Environment to MMC... Writing to MMC(0)... OK", or for NOR the erase and
        # write lines and then "OK" alone: either way OK ends it ("FAILED" otherwise).
        if "Saving Environment to" not in out or not re.search(r"\bOK\s*$", out):
            raise DeviceError(
                f"saveenv did not report OK: {_tail(out).strip()[-200:]!r}",
                hint="the environment is not stored; check U-Boot's env storage",
            )
        env = P.parse_printenv(self._run("printenv").output)
        wrong = [k for k, v in values.items() if env.get(k) != v]
        if wrong:
            raise DeviceError(f"U-Boot did not keep {', '.join(wrong)} in its environment")


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text, 0) if text is not None else default
    except ValueError:
        return default


def _first(env: dict[str, str], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` set (non-empty) in ``env``."""
    return next((env[n] for n in names if env.get(n)), None)


def _uniform(data: bytes) -> int | None:
    """The byte ``data`` repeats, or None."""
    if data and data.count(data[:1]) == len(data):
        return data[0]
    return None


def _tail(text: str) -> str:
    return text[-MAX_BOOT_LOG_CHARS:]


def _spans(data: bytes, start: int, end: int, word: int) -> Iterator[tuple[int, int]]:
    """Ranges of ``data[start:end]`` (word aligned) holding words other than all-0xFF, with
    gaps of fewer than 16 words merged."""
    blank = b"\xff" * word
    span_start: int | None = None
    gap = 0
    pos = start
    while pos < end:
        if data[pos : pos + word] == blank:
            if span_start is not None:
                gap += word
                if gap >= 16 * word:
                    yield span_start, pos - gap + word
                    span_start, gap = None, 0
        else:
            if span_start is None:
                span_start = pos
            gap = 0
        pos += word
    if span_start is not None:
        yield span_start, end - gap


# ---------------------------------------------------------------------------------------------
# Opening


def open_uboot(
    address: DeviceAddress,
    *,
    timeout_s: float = 10.0,
    options: UBootOptions | None = None,
    link: ByteLink | None = None,
) -> UBootDriver:
    """Open ``uboot+serial:///dev/ttyUSB0?baud=115200``, ``uboot+tcp://HOST:PORT`` or
    ``uboot+rfc2217://HOST:PORT`` and reach the U-Boot prompt (interrupting autoboot).

    ``timeout_s`` bounds the wait for the prompt (at least the console's attach timeout).
    ``link`` replaces the serial port (tests).
    """
    if address.protocol != "uboot":
        raise UsageError(f"{address.uri} is not a U-Boot console address")
    opts = UBootOptions.from_address(address, options)
    closer: Callable[[], None] | None = None
    if link is None:
        port = PortLink.open(address.pyserial_url, baudrate=opts.baudrate)
        link, closer = port, port.close
    console = Console(link, opts.console, name=str(address))
    driver = UBootDriver(address, console, opts, closer=closer)
    try:
        console.attach(max(timeout_s, opts.console.attach_timeout_s))
        env = driver.probe.env  # read the device once, up front
        if env.get(opts.slot_var) and ("bootlimit" in env or "altbootcmd" in env):
            driver.capabilities = driver.capabilities | {Capability.BOOT_CONTROL}
    except BaseException:
        driver.close()
        raise
    return driver


__all__ = [
    "DEFAULT_MAX_TRANSFER",
    "DriverStats",
    "Probe",
    "RamLayout",
    "Shadow",
    "StorageMap",
    "UBootDriver",
    "UBootOptions",
    "Window",
    "default_map",
    "open_uboot",
    "plan_ram",
]
