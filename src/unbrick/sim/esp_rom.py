"""A simulated ESP32 (or ESP8266) in its serial download mode: the ROM loader and esptool's
flasher stub.

:class:`EspRomSim` opens a pseudo-terminal pair (``os.openpty``) and answers Espressif's serial
protocol (:mod:`unbrick.transports.esp.protocol`) on the master side; a flasher program opens
the slave path (:attr:`EspRomSim.port`, e.g. ``/dev/pts/7``) as its serial port, exactly as it
would open ``/dev/ttyUSB0``. The real ``esptool`` drives it, so the simulator is checked by
esptool itself (``tests/esp``). The flash is a file of ``flash_size_bytes`` (4 MiB by default),
created erased (0xFF) when missing.

What is modelled:

* **ROM loader** (state ``"rom"``): SYNC (answered eight times, non-zero value), READ_REG and
  WRITE_REG, SPI_ATTACH (required before flash commands, as on the ESP32 ROM),
  SPI_SET_PARAMS (the ROM's flash size defaults to 2 MiB until it is set), CHANGE_BAUDRATE,
  FLASH_BEGIN/DATA/END (the region is erased at BEGIN, each block written whole, padding
  included), FLASH_DEFL_BEGIN/DATA/END (zlib stream inflated as it arrives),
  SPI_FLASH_MD5 (32 hex digits), READ_FLASH_SLOW (64-byte blocks), MEM_BEGIN/DATA/END.
  Responses carry four status bytes; unknown commands (GET_SECURITY_INFO, which the ESP32 ROM
  lacks, and the stub-only ones) fail with 0x05 "invalid message".
* **The flasher stub** (state ``"stub"``): code uploaded with MEM_BEGIN/MEM_DATA into IRAM or
  DRAM and started with MEM_END at an entry point inside it is taken to be esptool's stub
  (its bytes are not executed): the loader answers MEM_END, then sends the unsolicited
  ``OHAI`` frame and from then on answers as the stub does: two status bytes, SYNC value 0,
  FLASH_BEGIN with the encryption word, FLASH_DEFL_BEGIN with the exact uncompressed size and
  just-in-time erasing of the 4 KiB sectors a write touches, SPI_FLASH_MD5 as 16 raw bytes,
  ERASE_FLASH, ERASE_REGION (sector-aligned), READ_FLASH with its acknowledgement protocol
  (data packets, at most ``max_inflight`` unacknowledged, the host acknowledging the total
  received, then the MD5 of the data) and RUN_USER_CODE. Entry points outside the uploaded
  code crash the chip (it goes silent).
* **Registers** esptool reads to identify an ESP32: the chip magic at 0x40001000
  (0x00F01D83), the eFuse words (MAC with its CRC-8, package, chip revision), APB_CTL_DATE,
  the UART clock divider (from the pty's current speed, so the crystal reads as 40 MHz), the
  RTC calibration the stub uses for the crystal, the strapping register. Other addresses
  read 0 and keep what is written to them.
* **The SPI flash controller**: esptool's "user command" sequence (WRITE_REG to SPI_USR,
  SPI_USR1, SPI_USR2, SPI_ADDR, SPI_W0.., then SPI_CMD with the USR bit) runs a command on a
  simulated SPI NOR chip: RDID (0x9F, JEDEC ID ``EF 40 16`` for 4 MiB), SFDP (0x5A, with the
  "SFDP" signature), the status registers (0x05/0x35/0x15 and their writes), WREN/WRDI,
  reset and power-down commands. The USR bit clears when the command is done.
* **Flash as NOR**: erase sets 0xFF per 4 KiB sector; programming ANDs the new bytes into the
  old ones, so data written over unerased flash comes out wrong, as on a real chip.
* **Resets**: DTR/RTS cannot be seen on a pty (setting them fails with ENOTTY, which esptool
  reports as "Chip was NOT reset" and ignores). With ``reset_on_close`` (the default) the
  host closing the port counts as esptool's usual end (``--after hard-reset``) followed by the
  next connection's reset into the bootloader: the stub is gone and the ROM loader answers
  again. FLASH_END/FLASH_DEFL_END asking to run the user code, and the stub's RUN_USER_CODE,
  start the "firmware" (state ``"firmware"``): the chip prints its boot log (ROM banner, and
  the app version from the ``esp_app_desc_t`` of an app image at 0x10000) and no longer
  answers the protocol until the next reset.

**ESP8266** (``EspChip(model="esp8266")``): magic 0xFFF0C101, the MAC in the OTP words at
0x3FF00050, a 26 MHz crystal (the UART runs from twice it), the SPI controller at 0x60000200
with the bit lengths in SPI_USR1, two status bytes from the ROM, and a ROM without
SPI_ATTACH (FLASH_BEGIN attaches the flash), SPI_SET_PARAMS, CHANGE_BAUDRATE,
FLASH_DEFL_*, SPI_FLASH_MD5 and READ_FLASH_SLOW. Its ROM has the FLASH_BEGIN erase bug: it
erases the sectors up to the next 64 KiB block twice over (esptool's ``get_erase_size``
sends the size that makes this come out right). With the stub it behaves as the ESP32 does.

Faults (:class:`EspFaults`, settable while running with :meth:`EspRomSim.set_faults`):
``no_sync`` (the chip is not in download mode: nothing is answered, so esptool fails with
"Failed to connect"), ``corrupt_writes`` (that many flash program operations, or all with -1,
store one flipped bit while reporting success: only an MD5 check catches it).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import hashlib
import logging
import os
import select
import struct
import termios
import threading
import time
import tty
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from unbrick.errors import SourceError, UsageError
from unbrick.transports.esp.protocol import (
    STUB_GREETING,
    STUB_STATUS_BYTES,
    SYNC_PAYLOAD,
    Command,
    DataBlock,
    EspProtocolError,
    Op,
    Response,
    RomError,
    SlipDecoder,
    StubError,
    checksum,
    op_name,
    slip_encode,
    status_bytes,
    words,
)

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
SECTOR_BYTES = 4 * KiB

# Addresses esptool reads (esptool/targets/esp32.py and esp8266.py name the same ones).
CHIP_MAGIC_ADDR = 0x40001000
ESP32_MAGIC = 0x00F01D83
ESP8266_MAGIC = 0xFFF0C101
EFUSE_BASE = 0x3FF5A000
APB_CTL_DATE_ADDR = 0x3FF6607C
RTC_CALI_ADDR = 0x3FF5F06C
GPIO_STRAP_ADDR = 0x3FF44038
ESP8266_OTP_MAC0 = 0x3FF00050
ESP8266_OTP_MAC1 = 0x3FF00054
ESP8266_OTP_MAC3 = 0x3FF0005C
SPI_CMD_USR = 1 << 18
SPI_USR_ADDR = 1 << 30
SPI_USR_MISO = 1 << 28
SPI_USR_MOSI = 1 << 27


@dataclass(frozen=True)
class _Variant:
    """What differs between the simulated chips."""

    name: str
    magic: int
    #: Status bytes of the ROM loader's responses (the stub always sends 2).
    rom_status_bytes: int
    spi_base: int
    spi_w0: int
    #: ESP32: bit lengths in SPI_MOSI_DLEN/SPI_MISO_DLEN; ESP8266: in SPI_USR1.
    spi_dlen_registers: bool
    uart_clkdiv: int
    #: The UART runs from the crystal (ESP32) or from twice it (ESP8266).
    xtal_multiplier: int
    ram: tuple[tuple[int, int], ...]
    #: Commands this chip's ROM loader does not have.
    rom_lacks: frozenset[int]
    #: The ESP8266 ROM attaches the flash on FLASH_BEGIN (it has no SPI_ATTACH).
    attach_on_begin: bool
    #: The ESP8266 ROM's FLASH_BEGIN erase bug (esptool's get_erase_size works around it).
    erase_bug: bool
    default_crystal_mhz: int


ESP32 = _Variant(
    name="esp32",
    magic=ESP32_MAGIC,
    rom_status_bytes=4,
    spi_base=0x3FF42000,
    spi_w0=0x80,
    spi_dlen_registers=True,
    uart_clkdiv=0x3FF40014,
    xtal_multiplier=1,
    # DRAM, IRAM and RTC fast memory.
    ram=((0x3FF80000, 0x40000000), (0x40070000, 0x400C2000)),
    rom_lacks=frozenset({Op.GET_SECURITY_INFO}),
    attach_on_begin=False,
    erase_bug=False,
    default_crystal_mhz=40,
)
ESP8266 = _Variant(
    name="esp8266",
    magic=ESP8266_MAGIC,
    rom_status_bytes=2,
    spi_base=0x60000200,
    spi_w0=0x40,
    spi_dlen_registers=False,
    uart_clkdiv=0x60000014,
    xtal_multiplier=2,
    ram=((0x3FFE8000, 0x40000000), (0x40100000, 0x40120000)),
    rom_lacks=frozenset(
        {
            Op.SPI_ATTACH,
            Op.SPI_SET_PARAMS,
            Op.CHANGE_BAUDRATE,
            Op.FLASH_DEFL_BEGIN,
            Op.FLASH_DEFL_DATA,
            Op.FLASH_DEFL_END,
            Op.SPI_FLASH_MD5,
            Op.READ_FLASH_SLOW,
            Op.GET_SECURITY_INFO,
        }
    ),
    attach_on_begin=True,
    erase_bug=True,
    default_crystal_mhz=26,
)
VARIANTS = {v.name: v for v in (ESP32, ESP8266)}

#: The ROM loader's flash size until SPI_SET_PARAMS sets one.
ROM_DEFAULT_FLASH_BYTES = 2 * MiB
#: The 8-bit calibration constant in eFuse word 4 (EFUSE_RD_CK8M_FREQ).
CK8M_FREQ = 50
ROM_SYNC_VALUE = 0x55201207
SYNC_REPLIES = 8
ROM_BANNER = "ets Jun  8 2016 00:22:57\r\n\r\n"
ESP8266_BANNER = "\r\n ets Jan  8 2013,rst cause:2, boot mode:(3,7)\r\n\r\n"
APP_DESC_MAGIC = 0xABCD5432

_BAUD_CONSTANTS = {
    getattr(termios, name): int(name[1:])
    for name in dir(termios)
    if name.startswith("B") and name[1:].isdigit()
}


class ChipState(enum.Enum):
    ROM = "rom"
    STUB = "stub"
    FIRMWARE = "firmware"


@dataclass(frozen=True)
class EspChip:
    """What the simulated chip reports about itself."""

    #: "esp32" or "esp8266".
    model: str = "esp32"
    #: Base MAC address (ESP32: eFuse BLOCK0; ESP8266: OTP), six bytes.
    mac: bytes = bytes.fromhex("240ac4a1b2c3")
    #: ESP32 chip revision (eFuse and APB_CTL_DATE bits).
    revision_major: int = 3
    revision_minor: int = 0
    #: ESP32 eFuse package version: 1 is ESP32-D0WD(-V3).
    package: int = 1
    #: None: 40 MHz on the ESP32, 26 MHz on the ESP8266.
    crystal_mhz: int | None = None
    #: JEDEC manufacturer and memory type of the SPI flash (Winbond W25Q series).
    flash_manufacturer: int = 0xEF
    flash_memory_type: int = 0x40

    def __post_init__(self) -> None:
        if self.model not in VARIANTS:
            raise UsageError(f"model={self.model!r}: use one of {', '.join(VARIANTS)}")
        if len(self.mac) != 6:
            raise UsageError("a MAC address has 6 bytes")
        if self.revision_major not in (0, 1, 2, 3) or not 0 <= self.revision_minor <= 3:
            raise UsageError("ESP32 revisions are v0.x to v3.x with x in 0..3")
        if self.crystal_mhz not in (None, 26, 40):
            raise UsageError("an ESP crystal is 26 or 40 MHz")

    @property
    def variant(self) -> _Variant:
        return VARIANTS[self.model]

    @property
    def xtal_mhz(self) -> int:
        return self.crystal_mhz or self.variant.default_crystal_mhz


@dataclass(frozen=True)
class EspFaults:
    """Faults of the simulated chip."""

    #: Not in download mode (GPIO0 was high at reset): SYNC and everything else go unanswered.
    no_sync: bool = False
    #: Flash program operations that store one flipped bit and still report success; -1: all.
    corrupt_writes: int = 0


@dataclass
class EspSimStats:
    """What happened, for tests."""

    commands: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    resets: int = 0
    stub_starts: int = 0
    #: Absolute flash offsets of the bits ``corrupt_writes`` flipped.
    corrupted_at: list[int] = field(default_factory=list)
    #: Bytes of input that were not SLIP frames, and frames that could not be decoded.
    noise_bytes: int = 0
    bad_frames: int = 0


class _Reply(Exception):
    """Internal: answer the current command with this error code."""

    def __init__(self, error: int) -> None:
        super().__init__(error)
        self.error = error


class _HostGone(Exception):
    """Internal: the host closed the port."""


# ------------------------------------------------------------------------------------------------
# The flash chip


class SpiFlash:
    """A SPI NOR chip stored in a file: erase to 0xFF per sector, program by AND."""

    def __init__(self, path: Path, size_bytes: int, chip: EspChip) -> None:
        if size_bytes < 64 * KiB or size_bytes & (size_bytes - 1):
            raise UsageError("the simulated flash size must be a power of two, at least 64 KiB")
        self.path = path
        self.size_bytes = size_bytes
        self.jedec_id = bytes(
            [chip.flash_manufacturer, chip.flash_memory_type, size_bytes.bit_length() - 1]
        )
        self.status = bytearray(3)
        self._lock = threading.Lock()
        try:
            if not path.exists():
                with path.open("wb") as f:
                    f.truncate(0)
                    for _ in range(size_bytes // MiB or 1):
                        f.write(b"\xff" * min(MiB, size_bytes))
            actual = path.stat().st_size
            if actual != size_bytes:
                raise UsageError(
                    f"{path} holds {actual} bytes, the simulated flash has {size_bytes}",
                    hint="remove the file or give its size as flash_size_bytes",
                )
            self._fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise SourceError(f"cannot open the simulated flash {path}: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise _Reply(-1)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        with self._lock:
            return os.pread(self._fd, length, offset)

    def erase(self, offset: int, length: int) -> None:
        """Erase the sectors covering ``offset``..``offset+length``."""
        start = offset - offset % SECTOR_BYTES
        end = -(-(offset + length) // SECTOR_BYTES) * SECTOR_BYTES
        self._check(start, end - start)
        blank = b"\xff" * min(end - start, MiB)
        with self._lock:
            for pos in range(start, end, MiB):
                os.pwrite(self._fd, blank[: min(MiB, end - pos)], pos)

    def program(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        if not data:
            return
        with self._lock:
            old = os.pread(self._fd, len(data), offset)
            if old != b"\xff" * len(data):
                n = len(data)
                merged = (int.from_bytes(old, "little") & int.from_bytes(data, "little")).to_bytes(
                    n, "little"
                )
                data = merged
            os.pwrite(self._fd, data, offset)

    def md5(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        h = hashlib.md5()  # noqa: S324 - the protocol's digest, not a security check
        with self._lock:
            for pos in range(offset, offset + length, MiB):
                h.update(os.pread(self._fd, min(MiB, offset + length - pos), pos))
        return h.digest()

    def sfdp(self, address: int, length: int) -> bytes:
        """The chip's SFDP table: signature, one parameter header (JEDEC basic table)."""
        table = bytearray(b"\xff" * 256)
        table[0:8] = b"SFDP\x06\x01\x00\xff"
        table[8:16] = bytes([0x00, 0x06, 0x01, 0x10, 0x80, 0x00, 0x00, 0xFF])
        density = self.size_bytes * 8 - 1
        basic = bytearray(b"\xff" * 64)
        basic[0:4] = bytes([0xE5, 0x20, 0xF1, 0xFF])
        basic[4:8] = struct.pack("<I", density)
        table[0x80:0xC0] = basic
        return bytes(table[(address + i) % 256] for i in range(length))

    def spi_command(self, command: int, address: int, mosi: bytes, miso_len: int) -> bytes:
        """Run one SPI flash command; the bytes the chip shifts out."""
        out = b""
        if command == 0x9F:  # RDID
            out = self.jedec_id
        elif command == 0x5A:  # RDSFDP
            out = self.sfdp(address, miso_len)
        elif command in (0x05, 0x35, 0x15):  # RDSR, RDSR2, RDSR3
            out = bytes([self.status[(0x05, 0x35, 0x15).index(command)]])
        elif command == 0x06:  # WREN
            self.status[0] |= 0x02
        elif command == 0x04:  # WRDI
            self.status[0] &= ~0x02 & 0xFF
        elif command in (0x01, 0x31, 0x11) and mosi:  # WRSR, WRSR2, WRSR3
            first = (0x01, 0x31, 0x11).index(command)
            for i, b in enumerate(mosi[: 3 - first]):
                self.status[first + i] = b & 0xFC if first + i == 0 else b
        return (out + b"\x00" * miso_len)[:miso_len]


# ------------------------------------------------------------------------------------------------
# Sessions


@dataclass
class _FlashWrite:
    offset: int
    size: int
    blocks: int
    block_size: int
    compressed: bool
    jit_erase: bool
    next_seq: int = 0
    written: int = 0
    erased_to: int = 0
    inflater: zlib._Decompress | None = None


@dataclass
class _MemLoad:
    offset: int
    size: int
    blocks: int
    block_size: int
    next_seq: int = 0
    received: bytearray = field(default_factory=bytearray)


# ------------------------------------------------------------------------------------------------
# The simulator


class EspRomSim:
    """An ESP32 in download mode on a pseudo-terminal; see the module documentation.

    ``with EspRomSim(flash_path) as sim: subprocess.run(["esptool", "--port", sim.port, ...])``
    """

    def __init__(
        self,
        flash_path: Path,
        *,
        flash_size_bytes: int = 4 * MiB,
        chip: EspChip | None = None,
        faults: EspFaults | None = None,
        reset_on_close: bool = True,
        read_timeout_s: float = 3.0,
    ) -> None:
        self.chip = chip or EspChip()
        self.flash = SpiFlash(Path(flash_path), flash_size_bytes, self.chip)
        self.reset_on_close = reset_on_close
        self.read_timeout_s = read_timeout_s
        self.stats = EspSimStats()
        self._faults = faults or EspFaults()
        self._faults_left = self._faults.corrupt_writes
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master = -1
        self._wake_r = -1
        self._wake_w = -1
        self._port = ""
        self._decoder = SlipDecoder()
        self._frames: deque[bytes] = deque()
        self._connected = False
        self._state = ChipState.ROM
        self._regs: dict[int, int] = {}
        self._reset_chip_state()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The serial port path a flasher opens (the pty's slave side)."""
        if not self._port:
            raise UsageError("the simulated ESP32 is not started")
        return self._port

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def host_connected(self) -> bool:
        """Whether a host has the port open (as last seen by the simulator's loop)."""
        return self._connected

    @property
    def faults(self) -> EspFaults:
        return self._faults

    def set_faults(self, faults: EspFaults) -> None:
        with self._lock:
            self._faults = faults
            self._faults_left = faults.corrupt_writes

    def start(self) -> str:
        if self._thread is not None:
            return self._port
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self._port = os.ttyname(slave)
        finally:
            # Not holding the slave open lets the master see the host close the port.
            os.close(slave)
        flags = fcntl.fcntl(master, fcntl.F_GETFL)
        fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._master = master
        self._wake_r, self._wake_w = os.pipe()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"esp-sim {self._port}", daemon=True)
        self._thread.start()
        log.debug("simulated ESP32 on %s", self._port)
        return self._port

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self._stop.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            thread.join(timeout=10)
            self._thread = None
        for fd in (self._master, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._wake_r = self._wake_w = -1
        self.flash.close()

    def __enter__(self) -> EspRomSim:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def read_flash(self, offset: int, length: int) -> bytes:
        """The flash content (for checks); UsageError outside the chip."""
        try:
            return self.flash.read(offset, length)
        except _Reply as e:
            raise UsageError(f"0x{offset:x}+0x{length:x} is outside the flash") from e

    def reset(self, *, download_mode: bool = True) -> None:
        """Press EN: the stub is gone; the ROM loader runs (download mode) or the firmware."""
        with self._lock:
            self._reset_chip_state()
            self.stats.resets += 1
            if not download_mode:
                self._state = ChipState.FIRMWARE

    # -- chip state -----------------------------------------------------------------------------

    def _reset_chip_state(self) -> None:
        self._state = ChipState.ROM
        self._attached = False
        self._flash_limit = (
            ROM_DEFAULT_FLASH_BYTES if self.chip.variant is ESP32 else self.flash.size_bytes
        )
        self._write: _FlashWrite | None = None
        self._mem: _MemLoad | None = None
        self._loaded: list[tuple[int, int]] = []
        self._baud = 115200
        self._regs = self._initial_registers()

    def _initial_registers(self) -> dict[int, int]:
        c = self.chip
        mac = c.mac
        if c.variant is ESP8266:
            return {
                CHIP_MAGIC_ADDR: ESP8266_MAGIC,
                ESP8266_OTP_MAC0: mac[5] << 24,
                ESP8266_OTP_MAC1: (mac[3] << 8) | mac[4],
                ESP8266_OTP_MAC3: int.from_bytes(mac[0:3], "big"),
            }
        crc = _crc8_maxim(mac)
        efuse = [0] * 16
        efuse[1] = int.from_bytes(mac[2:6], "big")
        efuse[2] = (crc << 16) | (mac[0] << 8) | mac[1]
        rev_bits = {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1)}[c.revision_major]
        efuse[3] = ((c.package & 0x7) << 9) | (((c.package >> 3) & 1) << 2) | (rev_bits[0] << 15)
        efuse[4] = CK8M_FREQ
        efuse[5] = (rev_bits[1] << 20) | ((c.revision_minor & 0x3) << 24)
        regs = {EFUSE_BASE + 4 * i: v for i, v in enumerate(efuse)}
        regs[CHIP_MAGIC_ADDR] = ESP32_MAGIC
        regs[APB_CTL_DATE_ADDR] = (rev_bits[2] << 31) | 0x16042000
        cali = c.xtal_mhz * 1_000_000 * 40 // (15625 * CK8M_FREQ)
        regs[RTC_CALI_ADDR] = (cali & 0x01FFFFFF) << 7
        regs[GPIO_STRAP_ADDR] = 0x03  # GPIO0 low at reset: download boot
        return regs

    def _read_reg(self, address: int) -> int:
        v = self.chip.variant
        if address == v.uart_clkdiv:
            uart_hz = self.chip.xtal_mhz * 1_000_000 * v.xtal_multiplier
            return round(uart_hz / self._line_baud()) & 0xFFFFF
        return self._regs.get(address, 0)

    def _write_reg(self, address: int, value: int, mask: int) -> None:
        old = self._regs.get(address, 0)
        self._regs[address] = (old & ~mask | value & mask) & 0xFFFFFFFF
        spi_cmd = self.chip.variant.spi_base
        if address == spi_cmd and self._regs[address] & SPI_CMD_USR:
            self._spi_user_command()
            self._regs[spi_cmd] &= ~SPI_CMD_USR

    def _spi_user_command(self) -> None:
        """The SPI controller's "user command": the registers esptool set up, run on the chip."""
        v = self.chip.variant
        regs = self._regs
        base = v.spi_base
        usr = regs.get(base + 0x1C, 0)
        usr1 = regs.get(base + 0x20, 0)
        command = regs.get(base + 0x24, 0) & 0xFF
        if v.spi_dlen_registers:
            mosi_bits = regs.get(base + 0x28, 0) + 1
            miso_bits = regs.get(base + 0x2C, 0) + 1
        else:
            mosi_bits = ((usr1 >> 17) & 0x1FF) + 1
            miso_bits = ((usr1 >> 8) & 0x1FF) + 1
        address = 0
        if usr & SPI_USR_ADDR:
            addr_bits = ((usr1 >> 26) & 0x3F) + 1
            address = regs.get(base + 0x04, 0) >> (32 - addr_bits)
        w0 = base + v.spi_w0
        mosi = b""
        if usr & SPI_USR_MOSI:
            nbytes = (mosi_bits + 7) // 8
            raw = b"".join(
                struct.pack("<I", regs.get(w0 + 4 * i, 0)) for i in range(-(-nbytes // 4))
            )
            mosi = raw[:nbytes]
        miso_len = (miso_bits + 7) // 8 if usr & SPI_USR_MISO else 0
        out = self.flash.spi_command(command, address, mosi, miso_len)
        out += b"\x00" * (-len(out) % 4)
        for i in range(len(out) // 4):
            regs[w0 + 4 * i] = struct.unpack_from("<I", out, 4 * i)[0]

    def _line_baud(self) -> int:
        try:
            speed = termios.tcgetattr(self._master)[4]
        except (termios.error, OSError):
            return self._baud
        return _BAUD_CONSTANTS.get(speed, self._baud) or self._baud

    # -- the I/O loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._master, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            try:
                frame = self._next_frame(None, poller)
            except _HostGone:
                continue
            if frame is None:
                continue
            with self._lock:
                try:
                    self._handle(frame, poller)
                except _HostGone:
                    continue
                except Exception:
                    # The simulator must survive anything a host sends; log and go on.
                    log.exception("simulated ESP32: error while handling a frame")

    def _poll(self, poller: select.poll, timeout_s: float | None) -> bytes | None:
        """Wait for input; bytes, or None on timeout/stop. _HostGone when the host closed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop.is_set():
            if not self._connected:
                # The slave side is closed: poll reports POLLHUP at once, so look every 10 ms.
                events = dict(poller.poll(0))
                if events.get(self._master, 0) & select.POLLHUP and not (
                    events.get(self._master, 0) & select.POLLIN
                ):
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    if self._wake_r in events:
                        return None
                    time.sleep(0.01)
                    continue
                self._connected = True
                self.stats.connections += 1
            wait_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(wait_ms))
            if self._wake_r in events:
                return None
            ev = events.get(self._master, 0)
            if ev & select.POLLIN:
                try:
                    data = os.read(self._master, 65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno == errno.EIO:
                        self._host_closed()
                        raise _HostGone from e
                    raise
                if data:
                    return data
            elif ev & select.POLLHUP:
                self._host_closed()
                raise _HostGone
            elif deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def _host_closed(self) -> None:
        self._decoder.reset()
        self._frames.clear()
        if self.reset_on_close:
            with self._lock:
                self._reset_chip_state()
                self.stats.resets += 1
        # Last: whoever waits for the host to be gone then sees the chip already reset.
        self._connected = False

    def _next_frame(self, timeout_s: float | None, poller: select.poll) -> bytes | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._frames:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            data = self._poll(poller, left)
            if data is None:
                return None
            if self._state is ChipState.FIRMWARE or self._faults.no_sync:
                # Not listening: the bytes end in the firmware's UART buffer.
                continue
            self._frames.extend(self._decoder.feed(data))
            self.stats.noise_bytes = self._decoder.noise_bytes
            self.stats.bad_frames = self._decoder.bad_frames
        return self._frames.popleft()

    def _send(self, payload: bytes) -> None:
        self._write_raw(slip_encode(payload))

    def _write_raw(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10.0
        while view:
            try:
                n = os.write(self._master, view)
                view = view[n:]
            except BlockingIOError:
                if time.monotonic() > deadline or self._stop.is_set():
                    log.warning("simulated ESP32: the host stopped reading; output dropped")
                    return
                select.select([], [self._master], [], 0.1)
            except OSError as e:
                if e.errno == errno.EIO:
                    return  # nobody has the port open
                raise

    # -- commands -------------------------------------------------------------------------------

    @property
    def _status_len(self) -> int:
        if self._state is ChipState.STUB:
            return STUB_STATUS_BYTES
        return self.chip.variant.rom_status_bytes

    def _reply(self, op: int, *, value: int = 0, payload: bytes = b"", error: int = 0) -> None:
        data = payload + status_bytes(error, self._status_len)
        self._send(Response(op, value, data).encode())

    def _fail_code(self, rom: RomError, stub: StubError) -> int:
        return int(stub) if self._state is ChipState.STUB else int(rom)

    def _handle(self, frame: bytes, poller: select.poll) -> None:
        if self._state is ChipState.FIRMWARE or self._faults.no_sync:
            return
        try:
            cmd = Command.parse(frame)
        except EspProtocolError:
            return  # not a command: ignored, as the ROM does
        self.stats.commands[op_name(cmd.op)] += 1
        handler = _HANDLERS.get(cmd.op)
        in_rom = self._state is ChipState.ROM
        stub_only = cmd.op >= Op.ERASE_FLASH
        lacking = in_rom and (stub_only or cmd.op in self.chip.variant.rom_lacks)
        if handler is None or lacking:
            code = self._fail_code(RomError.INVALID_MESSAGE, StubError.CMD_NOT_IMPLEMENTED)
            self._reply(cmd.op, error=code)
            return
        try:
            handler(self, cmd, poller)
        except _Reply as e:
            error = e.error
            if error < 0:  # outside the flash
                error = self._fail_code(RomError.FAILED_TO_ACT, StubError.FAILED_SPI_OP)
            self._reply(cmd.op, error=error)
        except EspProtocolError:
            self._reply(
                cmd.op, error=self._fail_code(RomError.INVALID_MESSAGE, StubError.BAD_DATA_LEN)
            )

    def _sync(self, cmd: Command, poller: select.poll) -> None:
        if cmd.data != SYNC_PAYLOAD:
            return
        value = 0 if self._state is ChipState.STUB else ROM_SYNC_VALUE
        for _ in range(SYNC_REPLIES):
            self._reply(cmd.op, value=value)

    def _cmd_read_reg(self, cmd: Command, poller: select.poll) -> None:
        (address,) = words(cmd.data, 1)
        self._reply(cmd.op, value=self._read_reg(address))

    def _cmd_write_reg(self, cmd: Command, poller: select.poll) -> None:
        if not cmd.data or len(cmd.data) % 16:
            raise EspProtocolError("WRITE_REG takes 16-byte entries")
        for i in range(0, len(cmd.data), 16):
            address, value, mask, _delay_us = words(cmd.data[i : i + 16], 4)
            self._write_reg(address, value, mask)
        self._reply(cmd.op)

    def _cmd_spi_attach(self, cmd: Command, poller: select.poll) -> None:
        expected = 4 if self._state is ChipState.STUB else 8
        if len(cmd.data) != expected:
            raise EspProtocolError(f"SPI_ATTACH takes {expected} bytes here")
        self._attached = True
        self._reply(cmd.op)

    def _cmd_spi_set_params(self, cmd: Command, poller: select.poll) -> None:
        _fl_id, total, _block, _sector, _page, _mask = words(cmd.data, 6)
        self._flash_limit = total
        self._reply(cmd.op)

    def _cmd_change_baud(self, cmd: Command, poller: select.poll) -> None:
        new, _old = words(cmd.data, 2)
        self._reply(cmd.op)
        self._baud = new

    def _need_flash(self, offset: int, length: int) -> None:
        if self._state is ChipState.ROM and not self._attached and length:
            raise _Reply(RomError.FAILED_TO_ACT)
        limit = self._flash_limit if self._state is ChipState.ROM else self.flash.size_bytes
        if offset < 0 or length < 0 or offset + length > min(limit, self.flash.size_bytes):
            raise _Reply(-1)

    def _cmd_flash_begin(self, cmd: Command, poller: select.poll) -> None:
        self._begin_write(cmd, compressed=False)

    def _cmd_defl_begin(self, cmd: Command, poller: select.poll) -> None:
        self._begin_write(cmd, compressed=True)

    def _begin_write(self, cmd: Command, *, compressed: bool) -> None:
        stub = self._state is ChipState.STUB
        size, blocks, block_size, offset = words(cmd.data, 4)
        if len(cmd.data) not in (16, 20):
            raise EspProtocolError("FLASH_BEGIN takes 4 or 5 words")
        if block_size == 0 and blocks:
            raise _Reply(self._fail_code(RomError.INVALID_MESSAGE, StubError.BAD_BLOCKSIZE))
        if not stub and self.chip.variant.attach_on_begin:
            self._attached = True
        if not stub and self.chip.variant.erase_bug:
            size = _esp8266_rom_erase_bytes(offset, size)
        self._need_flash(offset, size)
        session = _FlashWrite(
            offset=offset,
            size=size,
            blocks=blocks,
            block_size=block_size,
            compressed=compressed,
            jit_erase=stub,
            erased_to=offset - offset % SECTOR_BYTES,
            inflater=zlib.decompressobj() if compressed else None,
        )
        if not stub and size:
            # The ROM loader erases the whole region before the first block arrives.
            self.flash.erase(offset, size)
            session.erased_to = -(-(offset + size) // SECTOR_BYTES) * SECTOR_BYTES
        self._write = session
        self._reply(cmd.op)

    def _cmd_flash_data(self, cmd: Command, poller: select.poll) -> None:
        session = self._write
        if session is None or session.compressed != (cmd.op == Op.FLASH_DEFL_DATA):
            raise _Reply(self._fail_code(RomError.FAILED_TO_ACT, StubError.NOT_IN_FLASH_MODE))
        block = DataBlock.parse(cmd.data)
        if checksum(block.data) != cmd.checksum & 0xFF:
            raise _Reply(self._fail_code(RomError.BAD_CRC, StubError.BAD_DATA_CHECKSUM))
        if block.sequence != session.next_seq:
            raise _Reply(self._fail_code(RomError.INVALID_MESSAGE, StubError.BAD_DATA_LEN))
        stub = self._state is ChipState.STUB
        if session.compressed:
            assert session.inflater is not None
            try:
                out = session.inflater.decompress(block.data)
            except zlib.error as e:
                raise _Reply(self._fail_code(RomError.DEFLATE, StubError.INFLATE_ERROR)) from e
            if session.written + len(out) > session.size:
                raise _Reply(self._fail_code(RomError.DEFLATE, StubError.TOO_MUCH_DATA))
            address = session.offset + session.written
        elif stub:
            out = block.data[: max(0, session.size - session.written)]
            address = session.offset + session.written
        else:
            # The ROM writes every block whole, padding included, at its sequence position.
            if len(block.data) != session.block_size:
                raise _Reply(RomError.INVALID_MESSAGE)
            out = block.data
            address = session.offset + block.sequence * session.block_size
        self._program(session, address, out)
        session.written += len(out)
        session.next_seq += 1
        self._reply(cmd.op)

    def _program(self, session: _FlashWrite, address: int, data: bytes) -> None:
        if not data:
            return
        self._need_flash(address, len(data))
        if session.jit_erase and address + len(data) > session.erased_to:
            start = max(session.erased_to, address - address % SECTOR_BYTES)
            end = -(-(address + len(data)) // SECTOR_BYTES) * SECTOR_BYTES
            self.flash.erase(start, end - start)
            session.erased_to = end
        if self._faults_left:
            if self._faults_left > 0:
                self._faults_left -= 1
            spot = len(data) // 2
            data = data[:spot] + bytes([data[spot] ^ 0x10]) + data[spot + 1 :]
            self.stats.corrupted_at.append(address + spot)
        self.flash.program(address, data)

    def _cmd_flash_end(self, cmd: Command, poller: select.poll) -> None:
        (flag,) = words(cmd.data, 1)
        stub = self._state is ChipState.STUB
        if stub and self._write is None:
            raise _Reply(StubError.NOT_IN_FLASH_MODE)
        self._write = None
        self._reply(cmd.op)
        if stub:
            if flag == 0:  # reboot: the stub is gone, the ROM loader starts again
                self._reset_chip_state()
                self.stats.resets += 1
            return
        if flag == 0:
            self._reset_chip_state()
            self.stats.resets += 1
        else:
            self._run_firmware()

    def _cmd_md5(self, cmd: Command, poller: select.poll) -> None:
        address, size, _, _ = words(cmd.data, 4)
        self._need_flash(address, size)
        digest = self.flash.md5(address, size)
        if self._state is ChipState.STUB:
            self._reply(cmd.op, payload=digest)
        else:
            self._reply(cmd.op, payload=digest.hex().encode())

    def _cmd_read_slow(self, cmd: Command, poller: select.poll) -> None:
        address, length = words(cmd.data, 2)
        if length > 64:
            raise _Reply(RomError.READ_LENGTH)
        self._need_flash(address, length)
        data = self.flash.read(address, length)
        self._reply(cmd.op, payload=data + b"\xff" * (64 - len(data)))

    def _cmd_mem_begin(self, cmd: Command, poller: select.poll) -> None:
        size, blocks, block_size, offset = words(cmd.data, 4)
        if not any(lo <= offset and offset + size <= hi for lo, hi in self.chip.variant.ram):
            raise _Reply(self._fail_code(RomError.FAILED_TO_ACT, StubError.BAD_DATA_LEN))
        self._mem = _MemLoad(offset, size, blocks, block_size)
        self._reply(cmd.op)

    def _cmd_mem_data(self, cmd: Command, poller: select.poll) -> None:
        load = self._mem
        if load is None:
            raise _Reply(self._fail_code(RomError.FAILED_TO_ACT, StubError.NOT_IN_FLASH_MODE))
        block = DataBlock.parse(cmd.data)
        if checksum(block.data) != cmd.checksum & 0xFF:
            raise _Reply(self._fail_code(RomError.BAD_CRC, StubError.BAD_DATA_CHECKSUM))
        if block.sequence != load.next_seq or len(load.received) + len(block.data) > load.size:
            raise _Reply(self._fail_code(RomError.INVALID_MESSAGE, StubError.TOO_MUCH_DATA))
        load.received += block.data
        load.next_seq += 1
        if len(load.received) == load.size:
            self._loaded.append((load.offset, load.offset + load.size))
        self._reply(cmd.op)

    def _cmd_mem_end(self, cmd: Command, poller: select.poll) -> None:
        no_entry, entry = words(cmd.data, 2)
        self._mem = None
        self._reply(cmd.op)
        if no_entry:
            return
        if self._state is ChipState.ROM and any(lo <= entry < hi for lo, hi in self._loaded):
            self._state = ChipState.STUB
            self._attached = True
            self.stats.stub_starts += 1
            self._send(STUB_GREETING)
            return
        log.info("simulated ESP32: jump to 0x%08x outside the loaded code: crash", entry)
        self._state = ChipState.FIRMWARE

    def _cmd_erase_flash(self, cmd: Command, poller: select.poll) -> None:
        self.flash.erase(0, self.flash.size_bytes)
        self._reply(cmd.op)

    def _cmd_erase_region(self, cmd: Command, poller: select.poll) -> None:
        offset, size = words(cmd.data, 2)
        if offset % SECTOR_BYTES or size % SECTOR_BYTES:
            raise _Reply(StubError.BAD_DATA_LEN)
        self._need_flash(offset, size)
        self.flash.erase(offset, size)
        self._reply(cmd.op)

    def _cmd_read_flash(self, cmd: Command, poller: select.poll) -> None:
        offset, length, packet, inflight = words(cmd.data, 4)
        if packet == 0 or inflight == 0:
            raise _Reply(StubError.BAD_BLOCKSIZE)
        self._need_flash(offset, length)
        self._reply(cmd.op)
        md5 = hashlib.md5()  # noqa: S324 - the protocol's digest
        sent = acked = 0
        while acked < length:
            while sent < length and sent - acked < inflight * packet:
                chunk = self.flash.read(offset + sent, min(packet, length - sent))
                md5.update(chunk)
                self._send(chunk)
                sent += len(chunk)
            ack = self._next_frame(self.read_timeout_s, poller)
            if ack is None or len(ack) != 4:
                log.info("simulated ESP32: READ_FLASH not acknowledged; back to commands")
                return
            (acked,) = struct.unpack("<I", ack)
            if acked > sent:
                log.info("simulated ESP32: READ_FLASH acknowledgement beyond the data sent")
                return
        self._send(md5.digest())

    def _cmd_run_user_code(self, cmd: Command, poller: select.poll) -> None:
        self._run_firmware()

    def _cmd_security_info(self, cmd: Command, poller: select.poll) -> None:
        # The ESP32 has no GET_SECURITY_INFO (ESP32-S2 and later do).
        code = self._fail_code(RomError.INVALID_MESSAGE, StubError.INVALID_COMMAND)
        self._reply(cmd.op, error=code)

    # -- the firmware ---------------------------------------------------------------------------

    def _run_firmware(self) -> None:
        self._state = ChipState.FIRMWARE
        self._write = None
        self._write_raw(self.boot_log().encode())

    def boot_log(self) -> str:
        """What the chip prints when it boots from flash (ROM banner, bootloader, app)."""
        if self.chip.variant is ESP8266:
            header = self.flash.read(0, 4)
            if header[0] != 0xE9:
                return ESP8266_BANNER + "ets_main.c \r\n"
            return (
                ESP8266_BANNER + f"load 0x{struct.unpack('<I', self.flash.read(8, 4))[0]:08x}\r\n"
            )
        lines = [ROM_BANNER + "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)"]
        header = self.flash.read(0x1000, 4)
        if header[0] != 0xE9:
            word = struct.unpack("<I", header)[0]
            lines += [f"invalid header: 0x{word:08x}"] * 3
            return "\r\n".join(lines) + "\r\n"
        lines.append("I (29) boot: ESP-IDF 2nd stage bootloader")
        version = self.app_version()
        if version is None:
            lines.append("E (120) esp_image: image at 0x10000 has invalid magic byte")
            lines.append("E (126) boot: No bootable app partitions in the partition table")
        else:
            lines.append(f"I (210) app_init: App version:      {version}")
            lines.append("I (240) main_task: Calling app_main()")
        return "\r\n".join(lines) + "\r\n"

    def app_version(self, app_offset: int = 0x10000) -> str | None:
        """The version string of the app image at ``app_offset`` (its esp_app_desc_t)."""
        head = self.flash.read(app_offset, 0x20 + 48)
        if head[0] != 0xE9 or struct.unpack_from("<I", head, 0x20)[0] != APP_DESC_MAGIC:
            return None
        raw = head[0x20 + 16 : 0x20 + 48]
        return raw.split(b"\x00", 1)[0].decode("ascii", "replace")


_HANDLERS: dict[int, Callable[[EspRomSim, Command, select.poll], None]] = {
    Op.SYNC: EspRomSim._sync,
    Op.READ_REG: EspRomSim._cmd_read_reg,
    Op.WRITE_REG: EspRomSim._cmd_write_reg,
    Op.SPI_ATTACH: EspRomSim._cmd_spi_attach,
    Op.SPI_SET_PARAMS: EspRomSim._cmd_spi_set_params,
    Op.CHANGE_BAUDRATE: EspRomSim._cmd_change_baud,
    Op.FLASH_BEGIN: EspRomSim._cmd_flash_begin,
    Op.FLASH_DATA: EspRomSim._cmd_flash_data,
    Op.FLASH_END: EspRomSim._cmd_flash_end,
    Op.FLASH_DEFL_BEGIN: EspRomSim._cmd_defl_begin,
    Op.FLASH_DEFL_DATA: EspRomSim._cmd_flash_data,
    Op.FLASH_DEFL_END: EspRomSim._cmd_flash_end,
    Op.SPI_FLASH_MD5: EspRomSim._cmd_md5,
    Op.READ_FLASH_SLOW: EspRomSim._cmd_read_slow,
    Op.MEM_BEGIN: EspRomSim._cmd_mem_begin,
    Op.MEM_DATA: EspRomSim._cmd_mem_data,
    Op.MEM_END: EspRomSim._cmd_mem_end,
    Op.GET_SECURITY_INFO: EspRomSim._cmd_security_info,
    Op.ERASE_FLASH: EspRomSim._cmd_erase_flash,
    Op.ERASE_REGION: EspRomSim._cmd_erase_region,
    Op.READ_FLASH: EspRomSim._cmd_read_flash,
    Op.RUN_USER_CODE: EspRomSim._cmd_run_user_code,
}


def _esp8266_rom_erase_bytes(offset: int, erase_size: int) -> int:
    """What the ESP8266 ROM really erases for FLASH_BEGIN's erase size: it counts the sectors
    up to the next 64 KiB block twice (esptool's get_erase_size sends the size that makes
    this come out right)."""
    sectors = -(-erase_size // SECTOR_BYTES)
    head = 16 - (offset // SECTOR_BYTES) % 16
    return (sectors + min(sectors, head)) * SECTOR_BYTES


def _crc8_maxim(data: bytes) -> int:
    """CRC-8/MAXIM (reflected polynomial 0x8C), the check byte of the ESP32's eFuse MAC."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc
