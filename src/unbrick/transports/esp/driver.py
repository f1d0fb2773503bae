"""ESP32/ESP8266 boards through esptool's Python API: ``esp:///dev/ttyUSB0?baud=460800``.

esptool (GPL-2.0-or-later) is an optional extra (``pip install 'unbrick[esp]'``). It is imported
only inside the functions of this module, when an ``esp://`` device is opened, never at import
time; without it, opening such a device is a UsageError that names the extra.

The driver connects once (esptool's ``detect_chip``: the DTR/RTS reset into the ROM loader,
SYNC, chip detection), uploads esptool's flasher stub (``run_stub``), raises the link to the
requested speed (``change_baud``) and attaches the SPI flash (``attach_flash``, then the flash
size from the JEDEC ID). It keeps that session for every later call until :meth:`close`,
:meth:`reboot` or a link failure. Capabilities:

* Identify: chip (``ESP32``) as the model, the base MAC as the serial, the chip revision
  (``v3.0``), flash size, and in ``extra`` the chip description, features, crystal, flash ID,
  and whether secure boot or flash encryption are on.
* FlashRead: ``read_flash`` (the stub's acknowledged transfer, checked by its MD5).
* FlashErase: ``erase_region`` (whole 4 KiB sectors).
* FlashWrite: ``write_flash`` with zlib compression; the stub erases each 4 KiB sector it
  writes to (so a program starts at a sector boundary and clears the rest of its last
  sector), and esptool checks every write with the chip's MD5 of the range; a mismatch is
  retried once, then it is a VerifyError naming the range.
* DeviceHash: ``md5`` is computed by the chip (SPI_FLASH_MD5). ``sha256`` is the digest of
  bytes the chip's own MD5 of the range confirms: the bytes this session just read or wrote
  there when it knows them (so verifying a write or a backup costs one MD5 on the chip, no
  read-back), else the range read back.
* Reboot: a hard reset (RTS pulls EN low), then the boot log is read for ``boot_log_s`` at
  115200 baud; ``enter_recovery`` reconnects, which resets the chip into download mode.

esptool's errors are translated at this boundary (:func:`translate_error`): a chip that does
not answer SYNC is a TransportError whose hint says how to enter download mode, lower the baud
rate and check the cable and power; a port that cannot be opened names the usual causes; link
faults during a transfer are TransportErrors (the engine then offers ``unbrick resume``);
refusals by the chip are DeviceErrors. esptool prints through its own process-wide logger:
while it works for this driver, its output goes to this module's ``logging`` logger instead of
stdout, and esptool calls from several drivers in one process take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from unbrick.errors import (
    DeviceError,
    TransportError,
    UnbrickError,
    UsageError,
    VerifyError,
)
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import BootReport, Capability

log = logging.getLogger(__name__)
#: esptool's own messages (connecting, stub upload, warnings) are re-logged here.
tool_log = logging.getLogger(__name__ + ".esptool")

KiB = 1024
MiB = 1024 * KiB
SECTOR_BYTES = 4 * KiB
#: Below this offset the ESP32's second-stage bootloader lives (secure boot v1 protects it).
BOOTLOADER_REGION_END = 0x8000
MAX_BOOT_LOG_CHARS = 64 * KiB

INSTALL_HINT = "pip install 'unbrick[esp]' (esptool, GPL-2.0-or-later, is an optional extra)"
DOWNLOAD_MODE_HINT = (
    "put the board in download mode: hold BOOT (GPIO0), press and release EN (reset), then "
    "release BOOT; retry with a lower baud rate (?baud=115200); check the USB cable (a data "
    "cable, not a charging one) and the power supply"
)
PORT_HINT = (
    "check the port name (ls /dev/ttyUSB* /dev/ttyACM*), that no serial monitor holds it, "
    "and that you may open it (group dialout)"
)
LINK_HINT = (
    "the serial link failed: lower the baud rate (?baud=115200), use a short data USB cable, "
    "check the power supply, then run 'unbrick resume'"
)

_CHIP_NAMES = (
    "auto",
    "esp8266",
    "esp32",
    "esp32s2",
    "esp32s3",
    "esp32c2",
    "esp32c3",
    "esp32c5",
    "esp32c6",
    "esp32c61",
    "esp32h2",
    "esp32h21",
    "esp32h4",
    "esp32p4",
)
_BEFORE = ("default-reset", "usb-reset", "no-reset", "no-reset-no-sync")

_CONNECT_MARKERS = (
    "failed to connect",
    "no serial data received",
    "wrong boot mode",
    "invalid head of packet",
    "getting no sync reply",
)
_PORT_MARKERS = (
    "could not open",
    "port is busy",
    "permission denied",
    "no such file or directory",
    "could not exclusively lock",
)
_LINK_MARKERS = (
    "timed out",
    "timeout",
    "stream stopped",
    "transfer stopped",
    "corrupt data",
    "digest mismatch",
    "invalid slip",
    "response doesn't match",
    "serial",
    "guru meditation",
    "failed to start stub",
    "read more than expected",
    "expected digest",
    "input/output error",
    "returned no data",
)
_MD5_MARKERS = ("md5 of file does not match", "written flash region is empty")

_APP_VERSION = re.compile(r"App version:\s*(\S+)")

#: esptool logs through one process-wide logger; calls that swap it in and out are serialised.
_OUTPUT_LOCK = threading.RLock()


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class EspOptions:
    """How the driver works one board; the URI's query parameters set them
    (:meth:`from_address`)."""

    #: Speed after the stub runs (the ROM loader always syncs at ``initial_baud``).
    baud: int = 460800
    initial_baud: int = 115200
    #: The chip the board must carry (esptool's names: esp32, esp8266, esp32s3...); "auto"
    #: takes whatever answers.
    chip: str = "auto"
    #: esptool's reset before connecting: default-reset (DTR/RTS into download mode),
    #: usb-reset, no-reset (the board is already in download mode), no-reset-no-sync.
    before: str = "default-reset"
    connect_attempts: int = 7
    #: Upload esptool's flasher stub (faster; READ_FLASH and ERASE_REGION need it).
    stub: bool = True
    compress: bool = True
    #: Largest read or program one call handles (a multiple of the 4 KiB sector).
    max_transfer: int = 256 * KiB
    #: The flash size ("4MB"); None: detected from the flash chip's JEDEC ID.
    flash_size: str | None = None
    #: How long the boot log is read after a hard reset.
    boot_log_s: float = 3.0
    #: Speed of the boot log (the ESP32 ROM and ESP-IDF print at 115200 with a 40 MHz crystal).
    log_baud: int = 115200
    #: Bytes read or written this session that the driver keeps, so that a sha256 of them
    #: costs only the chip's MD5 (no read-back).
    known_bytes: int = 16 * MiB

    def __post_init__(self) -> None:
        if self.chip not in _CHIP_NAMES:
            raise UsageError(f"chip={self.chip!r}: use one of {', '.join(_CHIP_NAMES)}")
        if self.before not in _BEFORE:
            raise UsageError(f"before={self.before!r}: use one of {', '.join(_BEFORE)}")
        for name in ("baud", "initial_baud", "log_baud"):
            value = getattr(self, name)
            if not 300 <= value <= 5_000_000:
                raise UsageError(f"{name}={value} is not a serial speed")
        if self.connect_attempts < 0:
            raise UsageError("connect_attempts must be 0 (forever) or more")
        if self.max_transfer < SECTOR_BYTES or self.max_transfer % SECTOR_BYTES:
            raise UsageError("max_transfer must be a multiple of 4 KiB (the flash sector)")
        if self.flash_size is not None:
            parse_flash_size(self.flash_size)
        if not 0 <= self.boot_log_s <= 600:
            raise UsageError("boot_log must be 0 to 600 seconds")
        if self.known_bytes < 0:
            raise UsageError("known_bytes must be 0 or more")

    @classmethod
    def from_address(cls, address: DeviceAddress, base: EspOptions | None = None) -> EspOptions:
        """Options from ``esp://PORT?baud=&initial_baud=&chip=&before=&connect_attempts=&stub=
        &compress=&max_transfer=&flash_size=&boot_log=&log_baud=&known_bytes=`` over
        ``base``."""
        opts = base or cls()
        stub = _flag(address, "stub")
        compress = _flag(address, "compress")
        boot_log = address.param("boot_log")
        boot_log_s = opts.boot_log_s
        if boot_log is not None:
            try:
                boot_log_s = float(boot_log)
            except ValueError as e:
                raise UsageError(f"{address.uri}: boot_log={boot_log!r} is not seconds") from e
        return replace(
            opts,
            baud=address.int_param("baud", opts.baud),
            initial_baud=address.int_param("initial_baud", opts.initial_baud),
            chip=(address.param("chip") or opts.chip).lower(),
            before=address.param("before") or opts.before,
            connect_attempts=address.int_param("connect_attempts", opts.connect_attempts),
            stub=opts.stub if stub is None else stub,
            compress=opts.compress if compress is None else compress,
            max_transfer=address.int_param("max_transfer", opts.max_transfer),
            flash_size=address.param("flash_size") or opts.flash_size,
            boot_log_s=boot_log_s,
            log_baud=address.int_param("log_baud", opts.log_baud),
            known_bytes=address.int_param("known_bytes", opts.known_bytes),
        )


def _flag(address: DeviceAddress, name: str) -> bool | None:
    value = address.param(name)
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("1", "yes", "true", "on", ""):
        return True
    if text in ("0", "no", "false", "off"):
        return False
    raise UsageError(f"{address.uri}: {name}={value!r} is not on/off (use 1 or 0)")


def parse_flash_size(text: str) -> int:
    """``"4MB"`` -> 4194304, ``"512KB"`` -> 524288 (esptool's spelling); UsageError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([KM])i?B\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"flash size {text!r} is not like 4MB or 512KB")
    size = int(m.group(1)) * (MiB if m.group(2).upper() == "M" else KiB)
    if size < 64 * KiB or size & (size - 1):
        raise UsageError(f"flash size {text!r} is not a power of two of at least 64KB")
    return size


def _size_text(size: int) -> str:
    return f"{size // MiB}MB" if size % MiB == 0 else f"{size // KiB}KB"


def chip_key(chip_name: str) -> str:
    """esptool's CHIP_NAME (``ESP32-S3``) as its ``--chip`` spelling (``esp32s3``)."""
    return re.sub(r"[^a-z0-9]", "", chip_name.lower().split("(")[0])


# ---------------------------------------------------------------------------------------------
# Error translation (pure)


def translate_error(
    error: BaseException,
    *,
    action: str,
    port: str,
    ranges: list[tuple[int, int]] | None = None,
) -> UnbrickError:
    """The unbrick error for an esptool/pyserial exception raised while doing ``action``."""
    full = str(error)
    lowered = full.lower()
    first = " ".join(full.strip().splitlines()[0].split()) if full.strip() else ""
    text = first or type(error).__name__
    if any(m in lowered for m in _MD5_MARKERS):
        return VerifyError(
            f"{action}: the flash does not hold what was written (the chip's MD5 differs)",
            ranges=ranges,
            hint="the write did not take: retry with a lower baud rate, check the power "
            "supply; the flash chip may be worn or write-protected",
        )
    if any(m in lowered for m in _CONNECT_MARKERS):
        return TransportError(
            f"no answer from the ESP bootloader on {port} ({text})", hint=DOWNLOAD_MODE_HINT
        )
    if any(m in lowered for m in _PORT_MARKERS):
        return TransportError(f"cannot open {port}: {text}", hint=PORT_HINT)
    if any(m in lowered for m in _LINK_MARKERS) or isinstance(error, OSError | struct.error):
        return TransportError(f"{action} on {port}: {text}", hint=LINK_HINT)
    if "failed to" in lowered and "result was" in lowered:
        return DeviceError(
            f"the ESP refused to {action}: {text}",
            hint="the chip answered with an error: check the address and size, the flash "
            "size (?flash_size=), and that the flash is not write-protected",
        )
    return DeviceError(f"{action} on {port}: {text}", hint=DOWNLOAD_MODE_HINT)


# ---------------------------------------------------------------------------------------------
# esptool, loaded lazily


@dataclass(frozen=True)
class _Esptool:
    """The parts of esptool the driver uses, imported on first use."""

    cmds: Any
    fatal_error: type[BaseException]
    log: Any
    logger: Any
    version: str
    current_logger: Callable[[], Any]
    restore_logger: Callable[[Any], None]


def load_esptool() -> _Esptool:
    """Import esptool (the ``esp`` extra); UsageError naming the extra when it is missing."""
    try:
        import esptool  # noqa: PLC0415 - GPL optional extra: imported only when used
        from esptool import cmds  # noqa: PLC0415
        from esptool.logger import TemplateLogger  # noqa: PLC0415
        from esptool.logger import log as esptool_log  # noqa: PLC0415
        from esptool.util import FatalError  # noqa: PLC0415
    except ImportError as e:
        raise UsageError(
            "esp:// devices need esptool, which is not installed", hint=INSTALL_HINT
        ) from e

    class ToLogging(TemplateLogger):  # type: ignore[misc]
        """esptool's output to Python logging instead of the terminal."""

        def print(self, *args: Any, **kwargs: Any) -> None:
            text = " ".join(str(a) for a in args).strip()
            if text:
                tool_log.debug("%s", text)

        def note(self, message: str) -> None:
            tool_log.info("%s", message)

        def warning(self, message: str) -> None:
            tool_log.warning("%s", message)

        def error(self, message: str) -> None:
            tool_log.error("%s", message)

        def stage(self, finish: bool = False) -> None:
            return None

        def progress_bar(
            self,
            cur_iter: int,
            total_iters: int,
            prefix: str = "",
            suffix: str = "",
            bar_length: int = 30,
        ) -> None:
            return None

        def set_verbosity(self, verbosity: str) -> None:
            return None

    def current() -> Any:
        try:
            from esp_pylib.logger import EspLog  # noqa: PLC0415 - esptool's dependency
        except ImportError:
            return None
        return EspLog.instance

    def restore(previous: Any) -> None:
        if previous is None:
            return
        try:
            from esp_pylib.logger import EspLog  # noqa: PLC0415
        except ImportError:
            return
        EspLog.instance = previous

    return _Esptool(
        cmds=cmds,
        fatal_error=FatalError,
        log=esptool_log,
        logger=ToLogging(),
        version=str(getattr(esptool, "__version__", "?")),
        current_logger=current,
        restore_logger=restore,
    )


# ---------------------------------------------------------------------------------------------
# The driver


class KnownBytes:
    """Flash bytes this session read or wrote (each checked by the chip's MD5), by range;
    the oldest pieces are forgotten beyond ``cap_bytes``."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        #: start -> bytes, oldest first (dicts keep insertion order).
        self._pieces: dict[int, bytes] = {}
        self._stored = 0

    def clear(self) -> None:
        self._pieces.clear()
        self._stored = 0

    def drop(self, offset: int, length: int) -> None:
        end = offset + length
        for start, data in list(self._pieces.items()):
            stop = start + len(data)
            if stop <= offset or start >= end:
                continue
            del self._pieces[start]
            self._stored -= len(data)
            if start < offset:
                self._pieces[start] = data[: offset - start]
                self._stored += offset - start
            if stop > end:
                self._pieces[end] = data[end - start :]
                self._stored += stop - end

    def put(self, offset: int, data: bytes) -> None:
        self.drop(offset, len(data))
        if not data or len(data) > self.cap_bytes:
            return
        self._pieces[offset] = bytes(data)
        self._stored += len(data)
        while self._stored > self.cap_bytes:
            oldest = next(iter(self._pieces))
            self._stored -= len(self._pieces.pop(oldest))

    def get(self, offset: int, length: int) -> bytes | None:
        """The bytes of the range, or None when part of it is unknown."""
        out = bytearray()
        pos, end = offset, offset + length
        for start in sorted(self._pieces):
            data = self._pieces[start]
            stop = start + len(data)
            if stop <= pos:
                continue
            if start > pos:
                return None
            take = min(stop, end) - pos
            out += data[pos - start : pos - start + take]
            pos += take
            if pos >= end:
                break
        return bytes(out) if pos >= end else None


@dataclass
class EspDriverStats:
    """What the driver did in this session (for logs and tests)."""

    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    write_retries: int = 0
    chip_md5s: int = 0
    #: sha256 digests answered from known bytes that the chip's MD5 confirmed (no read-back).
    known_hits: int = 0


@dataclass(frozen=True)
class _Security:
    flash_encryption: bool = False
    secure_boot: bool = False
    secure_boot_v1: bool = False


class EspDriver:
    """An ESP board on a serial port. Implements Identify, FlashRead, FlashErase, FlashWrite,
    DeviceHash (``md5`` on the chip, ``sha256`` confirmed by it) and Reboot."""

    def __init__(
        self,
        address: DeviceAddress,
        options: EspOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if address.protocol != "esp" or not address.path:
            raise UsageError(f"{address.uri} is not an esp:// serial port address")
        self.address = address
        self.options = options or EspOptions()
        self.port = address.path
        self.max_transfer = self.options.max_transfer
        self.capabilities: frozenset[Capability] = frozenset(
            {
                Capability.IDENTIFY,
                Capability.READ,
                Capability.ERASE,
                Capability.WRITE,
                Capability.DEVICE_HASH,
                Capability.REBOOT,
            }
        )
        #: ``md5`` is computed by the chip; ``sha256`` is of bytes the chip's MD5 confirms.
        self.hash_algorithms: tuple[str, ...] = ("md5", "sha256")
        self._clock = clock
        self._sleep = sleep
        self._api = load_esptool()
        self._quiet_depth = 0
        self.stats = EspDriverStats()
        self._known = KnownBytes(self.options.known_bytes)
        self._esp: Any = None
        self._session: contextlib.ExitStack | None = None
        self._flash_size: int | None = None
        self._security = _Security()
        self._identity: DeviceIdentity | None = None

    # -- session ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the port (the chip stays where it is: stub or ROM loader)."""
        session, self._session = self._session, None
        self._esp = None
        self._identity = None
        # The firmware may write its flash (NVS) once it runs: forget what we knew.
        self._known.clear()
        if session is not None:
            with self._quiet(), contextlib.suppress(Exception):
                session.close()

    @property
    def connected(self) -> bool:
        """Whether a session (port open, chip synced) is in place."""
        return self._esp is not None

    def __enter__(self) -> EspDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """esptool's output to logging for the duration of a call (the outermost one swaps
        esptool's logger; nested calls find it in place)."""
        api = self._api
        with _OUTPUT_LOCK:
            if self._quiet_depth:
                self._quiet_depth += 1
                try:
                    yield
                finally:
                    self._quiet_depth -= 1
                return
            previous = api.current_logger()
            api.log.set_logger(api.logger)
            self._quiet_depth = 1
            try:
                yield
            finally:
                self._quiet_depth = 0
                api.restore_logger(previous)

    @contextlib.contextmanager
    def _call(self, action: str, ranges: list[tuple[int, int]] | None = None) -> Iterator[None]:
        """Run esptool calls, translating what they raise; a broken link ends the session."""
        with self._quiet():
            try:
                yield
            except UnbrickError:
                raise
            except (self._api.fatal_error, OSError, struct.error, IndexError, EOFError) as e:
                err = translate_error(e, action=action, port=self.port, ranges=ranges)
                if isinstance(err, TransportError):
                    self.close()
                log.debug("%s: %s failed: %r", self.port, action, e)
                raise err from e

    def connect(self) -> Any:
        """The esptool loader of this session (connecting, stub, speed, flash attach)."""
        if self._esp is not None:
            return self._esp
        api = self._api
        opts = self.options
        session = contextlib.ExitStack()
        try:
            with self._call("connect"):
                esp = api.cmds.detect_chip(
                    self.port,
                    baud=opts.initial_baud,
                    connect_mode=opts.before,
                    connect_attempts=opts.connect_attempts,
                )
                session.enter_context(esp)
                found = chip_key(esp.CHIP_NAME)
                if opts.chip not in ("auto", found):
                    raise DeviceError(
                        f"the chip on {self.port} is an {esp.CHIP_NAME}, not {opts.chip}",
                        hint="fix ?chip= in the device address, or use the right port",
                    )
                if opts.stub:
                    esp = api.cmds.run_stub(esp)
                if opts.baud != opts.initial_baud:
                    try:
                        esp.change_baud(opts.baud)
                    except api.fatal_error as e:  # the ESP8266 ROM cannot
                        log.info("%s: staying at %d baud (%s)", self.port, opts.initial_baud, e)
                api.cmds.attach_flash(esp)
                size = self._detect_flash_size(esp)
                esp.flash_set_parameters(size)
                self._security = _Security(
                    flash_encryption=bool(esp.get_flash_encryption_enabled()),
                    secure_boot=bool(esp.get_secure_boot_enabled()),
                    secure_boot_v1=bool(_optional(esp, "get_secure_boot_v1_enabled", False)),
                )
        except BaseException:
            with self._quiet(), contextlib.suppress(Exception):
                session.close()
            raise
        self._esp = esp
        self._session = session
        self._flash_size = size
        log.info(
            "%s: %s, %s flash, %s, esptool %s",
            self.port,
            esp.CHIP_NAME,
            _size_text(size),
            "stub" if opts.stub else "ROM loader",
            api.version,
        )
        return esp

    def _detect_flash_size(self, esp: Any) -> int:
        if self.options.flash_size:
            return parse_flash_size(self.options.flash_size)
        text = self._api.cmds.detect_flash_size(esp)
        if not text:
            flash_id = esp.flash_id()
            raise DeviceError(
                f"cannot tell the flash size of the chip on {self.port} "
                f"(JEDEC ID 0x{flash_id:06x})",
                hint="give it in the device address, e.g. ?flash_size=4MB",
            )
        return parse_flash_size(str(text))

    @property
    def flash_size_bytes(self) -> int:
        self.connect()
        assert self._flash_size is not None
        return self._flash_size

    def _check_range(self, offset: int, length: int) -> None:
        size = self.flash_size_bytes
        if offset < 0 or length < 0 or offset + length > size:
            raise UsageError(
                f"0x{offset:x}+0x{length:x} is outside the {_size_text(size)} flash of {self.port}"
            )

    def _check_writable(self, offset: int) -> None:
        sec = self._security
        if sec.flash_encryption:
            raise DeviceError(
                f"flash encryption is on in the chip on {self.port}: plain data written now "
                "would not boot",
                hint="use the vendor's encrypted-flash workflow; unbrick writes no encrypted data",
            )
        if sec.secure_boot_v1 and offset < BOOTLOADER_REGION_END:
            raise DeviceError(
                f"secure boot v1 is on in the chip on {self.port}: its bootloader "
                f"(below 0x{BOOTLOADER_REGION_END:x}) must not be rewritten",
                hint="write only the app and data partitions",
            )

    # -- Identify ---------------------------------------------------------------------------

    def identify(self) -> DeviceIdentity:
        if self._identity is not None:
            return self._identity
        esp = self.connect()
        with self._call("identify"):
            mac_bytes = _optional(esp, "read_mac", None, "BASE_MAC")
            description = _optional(esp, "get_chip_description", esp.CHIP_NAME)
            features = _optional(esp, "get_chip_features", [])
            revision = _optional(esp, "get_chip_revision", None)
            crystal = _optional(esp, "get_crystal_freq", None)
            flash_id = int(esp.flash_id())
        mac = ":".join(f"{b:02x}" for b in mac_bytes) if mac_bytes else None
        size = self.flash_size_bytes
        extra = {
            "chip": str(description),
            "port": self.port,
            "flash_id": f"0x{flash_id:06x}",
            "flash_manufacturer": f"0x{flash_id & 0xFF:02x}",
            "flash_device": f"0x{((flash_id >> 8) & 0xFF) << 8 | (flash_id >> 16) & 0xFF:04x}",
            "flash_size": _size_text(size),
            "loader": "stub" if self.options.stub else "rom",
            "secure_boot": "yes" if self._security.secure_boot else "no",
            "flash_encryption": "yes" if self._security.flash_encryption else "no",
        }
        if mac:
            extra["mac"] = mac
        if features:
            extra["features"] = ", ".join(str(f) for f in features)
        if crystal:
            extra["crystal_mhz"] = str(crystal)
        if revision is not None:
            extra["chip_revision"] = str(revision)
        self._identity = DeviceIdentity(
            model=str(esp.CHIP_NAME),
            serial=mac or f"{self.port}",
            hw_revision=(
                f"v{int(revision) // 100}.{int(revision) % 100}" if revision is not None else None
            ),
            storage=StorageInfo(
                type="spi-nor", size_bytes=size, erase_block_bytes=SECTOR_BYTES, page_bytes=1
            ),
            extra=extra,
        )
        return self._identity

    # -- FlashRead --------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if length == 0:
            return b""
        esp = self.connect()
        span = f"0x{offset:x}+0x{length:x}"
        with self._call(f"read {span}"):
            data = self._api.cmds.read_flash(
                esp, offset, length, flash_size="keep", no_progress=True
            )
        if not isinstance(data, bytes | bytearray) or len(data) != length:
            got = len(data) if isinstance(data, bytes | bytearray) else 0
            raise TransportError(
                f"read {span} on {self.port}: {got} bytes came back", hint=LINK_HINT
            )
        self.stats.reads += 1
        self.stats.bytes_read += length
        self._known.put(offset, bytes(data))
        return bytes(data)

    # -- FlashErase / FlashWrite ------------------------------------------------------------

    def erase(self, offset: int, length: int) -> None:
        if offset % SECTOR_BYTES or length % SECTOR_BYTES:
            raise UsageError(
                f"erase 0x{offset:x}+0x{length:x}: the ESP erases whole 4 KiB sectors",
                hint="align offset and length to 0x1000",
            )
        self._check_range(offset, length)
        if length == 0:
            return
        self._check_writable(offset)
        esp = self.connect()
        self._known.drop(offset, length)
        with self._call(f"erase 0x{offset:x}+0x{length:x}"):
            self._api.cmds.erase_region(esp, offset, length, force=True)

    def program(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (a sector boundary); each 4 KiB sector written to is
        erased first (the stub does so) and the result is checked by the chip's MD5."""
        if offset % SECTOR_BYTES:
            raise UsageError(
                f"program at 0x{offset:x}: the ESP writes from 4 KiB sector boundaries",
                hint="align the offset to 0x1000",
            )
        self._check_range(offset, len(data))
        if not data:
            return
        self._check_writable(offset)
        span = f"write 0x{offset:x}+0x{len(data):x}"
        ranges = [(offset, len(data))]
        opts = self.options
        end = offset + len(data)
        # The stub erases every sector it writes to: the tail of the last one changes too.
        self._known.drop(offset, -(-end // SECTOR_BYTES) * SECTOR_BYTES - offset)
        for attempt in (1, 2):
            esp = self.connect()
            try:
                with self._call(span, ranges):
                    self._api.cmds.write_flash(
                        esp,
                        [(offset, bytes(data))],
                        flash_freq="keep",
                        flash_mode="keep",
                        flash_size="keep",
                        compress=opts.compress,
                        no_compress=not opts.compress,
                        force=True,
                        no_progress=True,
                    )
                self.stats.writes += 1
                # esptool compared the chip's MD5 of the range with the data's: it holds it.
                self._known.put(offset, bytes(data))
                return
            except VerifyError:
                if attempt == 2:
                    raise
                self.stats.write_retries += 1
                log.warning("%s: %s did not verify (MD5); writing it again", self.port, span)

    # -- DeviceHash -------------------------------------------------------------------------

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        """``md5``: computed by the chip. ``sha256``: of the bytes the chip's MD5 of the range
        confirms (known from this session's reads and writes, else read back)."""
        alg = algorithm.lower()
        if alg not in self.hash_algorithms:
            raise UsageError(
                f"the ESP loader cannot hash with {algorithm!r}",
                hint="use md5 (computed by the chip) or sha256 (read back, checked by its MD5)",
            )
        self._check_range(offset, length)
        if length == 0:
            return hashlib.new(alg, b"").hexdigest()
        if alg == "md5":
            return self._chip_md5(offset, length)
        chip = self._chip_md5(offset, length)
        known = self._known.get(offset, length)
        if known is not None and _md5(known) == chip:
            self.stats.known_hits += 1
            return hashlib.sha256(known).hexdigest()
        # Unknown, or not what the flash holds now: read it back, checked by the chip's MD5.
        for attempt in (1, 2):
            data = b"".join(
                self.read(offset + pos, min(self.max_transfer, length - pos))
                for pos in range(0, length, self.max_transfer)
            )
            if _md5(data) == chip:
                return hashlib.sha256(data).hexdigest()
            if attempt == 1:
                chip = self._chip_md5(offset, length)
        raise TransportError(
            f"0x{offset:x}+0x{length:x} on {self.port} reads back differently from what the "
            "chip's MD5 says, twice",
            hint=LINK_HINT,
        )

    def _chip_md5(self, offset: int, length: int) -> str:
        esp = self.connect()
        with self._call(f"md5 0x{offset:x}+0x{length:x}"):
            value = esp.flash_md5sum(offset, length)
        self.stats.chip_md5s += 1
        text = value.decode() if isinstance(value, bytes | bytearray) else str(value)
        return text.strip().lower()

    # -- Reboot -----------------------------------------------------------------------------

    def reboot(self, timeout_s: float) -> BootReport:
        """Hard reset (RTS pulls EN low, DTR keeps GPIO0 high: the chip boots its flash), then
        read the boot log for ``boot_log_s`` (at most ``timeout_s``)."""
        window = max(0.0, min(timeout_s, self.options.boot_log_s))
        esp = self._esp
        if esp is not None:
            with self._call("reset"):
                self._api.cmds.reset_chip(esp, "hard-reset")
                port = getattr(esp, "_port", None)
                text = self._read_boot_log(port, window) if port is not None else ""
            self.close()
        else:
            text = self._reset_by_port(window)
        return boot_report(text)

    def _read_boot_log(self, port: Any, window_s: float) -> str:
        port.baudrate = self.options.log_baud
        port.timeout = 0.1
        out = bytearray()
        deadline = self._clock() + window_s
        while self._clock() < deadline and len(out) < MAX_BOOT_LOG_CHARS:
            out += port.read(4096)
            if b"waiting for download" in out:
                break
        return out.decode("utf-8", "replace")

    def _reset_by_port(self, window_s: float) -> str:
        """Pulse RTS on a port esptool does not hold, and read what the chip prints."""
        import serial  # noqa: PLC0415 - pyserial, only when resetting without a session

        try:
            with serial.Serial(self.port, self.options.log_baud, timeout=0.1) as port:
                try:
                    port.dtr = False
                    port.rts = True
                    self._sleep(0.1)
                    port.rts = False
                except OSError as e:
                    log.warning(
                        "%s: cannot drive RTS (%s): reset the board by hand (EN)", self.port, e
                    )
                return self._read_boot_log(port, window_s)
        except (serial.SerialException, OSError) as e:
            raise translate_error(e, action="reset", port=self.port) from e

    def enter_recovery(self, timeout_s: float) -> None:
        """Back to the ROM loader: reconnect, which resets the chip into download mode."""
        self.close()
        self.connect()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - compared with the chip's MD5


def boot_report(text: str) -> BootReport:
    """What a boot log says: "bootloader" when the ROM waits for a download, else
    "firmware"; the app version from ESP-IDF's ``App version:`` line."""
    text = text[-MAX_BOOT_LOG_CHARS:]
    state = "bootloader" if "waiting for download" in text else "firmware"
    versions = _APP_VERSION.findall(text)
    return BootReport(log=text, state=state, firmware_version=versions[-1] if versions else None)


def _optional(esp: Any, method: str, default: Any, *args: Any) -> Any:
    """``esp.method(*args)``, or ``default`` where this chip or esptool version lacks it."""
    fn = getattr(esp, method, None)
    if fn is None:
        return default
    try:
        return fn(*args)
    except NotImplementedError:
        return default
    except TypeError as e:
        # esptool 5.6 raises NotImplementedInROMError without its arguments for chips that
        # lack a method (ESP8266 chip revision): a TypeError naming the class.
        if "NotImplementedInROMError" in str(e):
            return default
        raise
    except Exception as e:
        # esptool's NotImplementedInROMError/NotSupportedError derive from its FatalError.
        if type(e).__name__ in ("NotImplementedInROMError", "NotSupportedError"):
            return default
        raise


def open_esp(
    address: DeviceAddress,
    *,
    timeout_s: float = 10.0,
    options: EspOptions | None = None,
) -> EspDriver:
    """Open ``esp:///dev/ttyUSB0?baud=460800``: connect, run the stub, identify the chip.

    ``timeout_s`` is accepted for the registry's signature; how long connecting may take is set
    by ``connect_attempts`` (about 0.8 s each).
    """
    if address.protocol != "esp":
        raise UsageError(f"{address.uri} is not an esp:// address")
    opts = EspOptions.from_address(address, options)
    driver = EspDriver(address, opts)
    try:
        driver.identify()
    except BaseException:
        driver.close()
        raise
    return driver
