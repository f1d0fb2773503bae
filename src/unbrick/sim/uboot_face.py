"""The serial console of a simulated device, as U-Boot 2023.01 shows it (the "console face").

A client connects over TCP as a terminal would to a UART: it sees the ROM lines and U-Boot's
banner, the ``Hit any key to stop autoboot`` countdown, and either the autoboot (the same boot
chain, and boot log, as :class:`~unbrick.sim.device.SimDevice`) or, after a key, the ``=> ``
prompt. Lines end in ``\\r\\n``; typed characters are echoed; Backspace and Ctrl-C work as in
U-Boot; an empty line repeats the last repeatable command (``md`` goes on where it stopped);
``;``, ``&&``, ``||``, quotes, ``$var``, ``${var}`` and ``$?`` work as in U-Boot's hush shell.

Address map (32-bit, like a small ARM router):

* ``0x00000000`` - the device's flash as one CFI NOR bank (8 MiB, 64 KiB sectors for the sim
  kinds), so a flash offset *is* its address. The bootloader and environment sectors are
  write-protected at every boot, as U-Boot protects its own sectors. Kinds whose flash is SPI
  NOR or NAND have no bank there (``flinfo``: ``missing or unknown FLASH type``): their chip
  is reached with ``sf`` or ``nand``, and ``mtd`` (:mod:`unbrick.sim.uboot_mtd`).
* ``0x40000000`` - 128 MiB of RAM (allocated lazily, zero-filled), like QEMU's ``virt``;
  ``loadaddr`` is ``0x40200000``.
* Reads elsewhere return zeros; writes elsewhere (and ``mw`` to flash addresses: CFI command
  cycles are not modelled) are ignored.

Commands: version, bdinfo, printenv, setenv, saveenv, run, echo, true, false, help, reset,
boot/bootd, flinfo, protect, erase, cp, md, mw, crc32, md5sum, hash, cmp, loadx, loady,
tftpboot, tftpput, bootm, iminfo, and sf or nand, and mtd, by flash type; the formats of their
output and of their errors are U-Boot 2023.01's. ``md5sum`` and ``hash`` (crc32, md5, sha1,
sha256; ``-v`` verifies) are compiled into many vendor builds but not into Debian's QEMU
builds: ``ConsoleConfig(hash_commands=())`` presents a U-Boot without them. Flash writes go
through the device (NOR rules and power-cut faults apply); like U-Boot's CFI driver, ``cp`` to
flash refuses a write buffer that needs a 0 bit to become 1 (``Flash not Erased``), so copying
over data that was not erased leaves a mix of old and new data, which ``crc32`` shows.
:class:`ConsoleConfig` can make flash writes store a flipped bit (``corrupt_writes``).

The console follows the device: each power-on is played once to the terminal (a boot that
happened while no terminal was attached is played to the next one, as QEMU's ``wait=on``
serial port holds the machine until someone listens); interrupting the countdown of a boot
whose chain already reached the firmware puts the device back in its bootloader (modelled as
a reset into recovery). A reset (``reset``, or a reboot through another face) keeps the
terminal attached and shows the new banner; a power cut drops it (the server closes the
connection). ``bootm`` checks an image as the boot chain does; a kernel started from RAM is not
simulated (the device then restarts and boots from flash).
"""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from unbrick.errors import DeviceError, UnbrickError, UsageError
from unbrick.formats.uimage import HEADER_SIZE, IH_MAGIC
from unbrick.sim.device import (
    SimDevice,
    decode_env,
    default_env,
    encode_env,
    env_copies,
)
from unbrick.sim.firmware import check_boot, read_calibration
from unbrick.sim.flash import MAX_OP_BYTES, PowerLoss, pad_to_page
from unbrick.sim.uboot_mtd import (
    MTD_NAMES,
    MTD_USAGE,
    NAND_USAGE,
    SF_USAGE,
    MtdCommands,
    Part,
    flip_one_bit,
    mtdparts_text,
)
from unbrick.sim.ymodem_rx import (
    LinkLost,
    ReceiveError,
    ReceiveTiming,
    receive,
)

log = logging.getLogger(__name__)

FLASH_BASE = 0x00000000
RAM_BASE = 0x40000000
RAM_BYTES = 128 * 1024 * 1024
LOAD_ADDRESS = 0x40200000
BAUD_RATE = 115200
#: The build date in the version line (the sim firmware's fixed build time).
BUILD_DATE = "Nov 14 2023 - 22:13:20 +0000"
#: The CFI write buffer: ``cp`` checks and programs flash in units of this many bytes.
FLASH_BUFFER_BYTES = 32
PROMPT = b"=> "
#: U-Boot's CONFIG_SYS_CBSIZE: longest command line.
LINE_MAX_CHARS = 512
_POLL_S = 0.05
#: Pause after an XMODEM/YMODEM transfer before U-Boot prints again.
SETTLE_S = 0.25
_PAGE = 64 * 1024
_USAGE = -1
_CTRL_C = "\x03"
_LEGACY = struct.Struct(">7I4B32s")
#: U-Boot's optional digest commands the console can offer.
HASH_COMMANDS = ("md5sum", "hash")
#: Algorithms of ``hash`` (common/hash.c) and their digest sizes in bytes.
HASH_ALGORITHMS = {"sha1": 20, "sha256": 32, "crc32": 4, "md5": 16}
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ConsoleConfig:
    """Timing of the console face (per run: short in tests)."""

    #: Wall-clock length of the autoboot countdown; None: ``bootdelay`` seconds, as U-Boot.
    autoboot_delay_s: float | None = None
    #: loadx/loady: silence after which the receiver asks again with ``C``.
    xmodem_poll_s: float = 1.0
    #: loadx/loady: no block for this long aborts (U-Boot's CONFIG_CMD_LOADXY_TIMEOUT=90).
    xmodem_timeout_s: float = 90.0
    #: Pause before the first output to a new terminal. pyserial's ``socket://`` handler
    #: discards what arrives while it opens the connection, so a banner sent at once is lost.
    greeting_delay_s: float = 0.1
    #: Fault: the next N flash writes made by console commands (``sf write``/``update``,
    #: ``nand write``, ``mtd write``, ``cp`` to flash) store one bit flipped (a marginal cell);
    #: ``nand write`` notices it in its read-back, the others do not.
    corrupt_writes: int = 0
    #: Which of U-Boot's optional digest commands the build has (``md5sum``, ``hash``); ``()``
    #: is a U-Boot with ``crc32`` only, like Debian's QEMU builds.
    hash_commands: tuple[str, ...] = HASH_COMMANDS

    def __post_init__(self) -> None:
        if self.autoboot_delay_s is not None and self.autoboot_delay_s < 0:
            raise UsageError("the autoboot delay must not be negative")
        if self.greeting_delay_s < 0 or self.corrupt_writes < 0:
            raise UsageError("the greeting delay and corrupt_writes must not be negative")
        if self.xmodem_poll_s <= 0 or self.xmodem_timeout_s <= 0:
            raise UsageError("XMODEM poll and timeout must be positive")
        unknown = sorted(set(self.hash_commands) - set(HASH_COMMANDS))
        if unknown:
            raise UsageError(
                f"unknown hash commands {unknown}", hint=f"choose from {', '.join(HASH_COMMANDS)}"
            )


class _Closed(Exception):
    """The terminal is gone (client left, power cut, server stopping)."""


class _Restart(Exception):
    """The device restarts: the rest of the command line is not run."""


class _BootChanged(Exception):
    """The device restarted under the console (another face reset it)."""


# -- helpers (pure) -------------------------------------------------------------------------


def parse_hex(text: str) -> int:
    """U-Boot's ``hextoul``: an optional ``0x``, then hex digits up to the first other char."""
    s = text.strip()
    if s[:2].lower() == "0x":
        s = s[2:]
    value = 0
    for ch in s:
        digit = "0123456789abcdef".find(ch.lower())
        if digit < 0:
            break
        value = value * 16 + digit
    return value


def is_hex(text: str) -> bool:
    s = text[2:] if text[:2].lower() == "0x" else text
    return bool(s) and all(c in "0123456789abcdefABCDEF" for c in s)


def size_text(n: int) -> str:
    """U-Boot's ``print_size``: "512 Bytes", "2.9 KiB", "1 MiB"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            tenths = (n * 10 + (1 << shift) // 2) >> shift
            whole, frac = divmod(tenths, 10)
            return f"{whole}.{frac} {unit}" if frac else f"{whole} {unit}"
    return f"{n} Bytes"


def dump_lines(address: int, data: bytes, width: int) -> list[str]:
    """``md`` lines: address, 16 bytes as items of ``width`` bytes, then the ASCII column."""
    per_line = 16 // width
    out = []
    for pos in range(0, len(data), 16):
        chunk = data[pos : pos + 16]
        items = [
            f" {int.from_bytes(chunk[i : i + width], 'little'):0{width * 2}x}"
            for i in range(0, len(chunk) - len(chunk) % width, width)
        ]
        pad = " " * ((width * 2 + 1) * (per_line - len(items)))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        out.append(f"{address + pos:08x}:{''.join(items)}{pad}  {text}")
    return out


def split_commands(line: str) -> list[tuple[str, str]]:
    """Split a command line at unquoted ``;``, ``&&`` and ``||``: (connector, command)."""
    parts: list[tuple[str, str]] = []
    cur: list[str] = []
    quote: str | None = None
    connector = ";"
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"' and i + 1 < len(line):
                cur += [ch, line[i + 1]]
                i += 2
                continue
            if ch == quote:
                quote = None
            cur.append(ch)
            i += 1
            continue
        if ch == "\\" and i + 1 < len(line):
            cur += [ch, line[i + 1]]
            i += 2
            continue
        if ch in "'\"":
            quote = ch
            cur.append(ch)
            i += 1
            continue
        op = line[i : i + 2]
        if ch == ";" or op in ("&&", "||"):
            parts.append((connector, "".join(cur)))
            cur = []
            connector = ";" if ch == ";" else op
            i += 1 if ch == ";" else 2
            continue
        cur.append(ch)
        i += 1
    parts.append((connector, "".join(cur)))
    return [(c, text) for c, text in parts if text.strip()]


def expand_words(command: str, lookup: Callable[[str], str]) -> list[str]:
    """Words of one command: quotes removed, ``$name``/``${name}``/``$?`` expanded."""
    words: list[str] = []
    cur: list[str] = []
    have = False
    quote: str | None = None
    i = 0
    n = len(command)
    while i < n:
        ch = command[i]
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                cur.append(ch)
            i += 1
            continue
        if ch == "\\" and i + 1 < n:
            cur.append(command[i + 1])
            have = True
            i += 2
            continue
        if ch == '"':
            quote = None if quote == '"' else '"'
            have = True
            i += 1
            continue
        if ch == "'" and quote is None:
            quote = "'"
            have = True
            i += 1
            continue
        if ch == "$" and i + 1 < n:
            name, j = _var_name(command, i + 1)
            if name is None:
                cur.append("$")
                i += 1
                continue
            i = j
            cur.append(lookup(name))
            have = True
            continue
        if ch in " \t" and quote is None:
            if have or cur:
                words.append("".join(cur))
            cur, have = [], False
            i += 1
            continue
        cur.append(ch)
        have = True
        i += 1
    if have or cur:
        words.append("".join(cur))
    return words


def _var_name(text: str, i: int) -> tuple[str | None, int]:
    if text[i] == "?":
        return "?", i + 1
    if text[i] == "{":
        end = text.find("}", i)
        if end < 0:
            return None, i
        return text[i + 1 : end], end + 1
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] == "_"):
        j += 1
    if j == i:
        return None, i
    return text[i:j], j


# -- RAM ----------------------------------------------------------------------------------


class SparseRam:
    """``size_bytes`` of zero-filled RAM at ``base``; pages are allocated on first write."""

    def __init__(self, base: int = RAM_BASE, size_bytes: int = RAM_BYTES) -> None:
        self.base = base
        self.size_bytes = size_bytes
        self._pages: dict[int, bytearray] = {}

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.base + self.size_bytes

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        pos = offset
        end = offset + length
        while pos < end:
            page, start = divmod(pos, _PAGE)
            n = min(_PAGE - start, end - pos)
            yield page, start, n, pos - offset
            pos += n

    def read(self, address: int, length: int) -> bytes:
        out = bytearray(length)
        for page, start, n, at in self._spans(address - self.base, length):
            data = self._pages.get(page)
            if data is not None:
                out[at : at + n] = data[start : start + n]
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        for page, start, n, at in self._spans(address - self.base, len(data)):
            buf = self._pages.get(page)
            if buf is None:
                buf = self._pages[page] = bytearray(_PAGE)
            buf[start : start + n] = data[at : at + n]


# -- the terminal ---------------------------------------------------------------------------


class Terminal:
    """One client connection seen as a serial line: timed reads, pushback, CRLF output."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.stopping = stopping
        self.pending = bytearray()

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        if not self.pending:
            if self.stopping.is_set():
                raise _Closed
            try:
                ready, _, _ = select.select([self.sock], [], [], max(timeout_s, 0.0))
                if not ready:
                    return b""
                data = self.sock.recv(65536)
            except (OSError, ValueError) as e:
                raise _Closed from e
            if not data:
                raise _Closed
            self.pending += data
        out = bytes(self.pending[:max_bytes])
        del self.pending[:max_bytes]
        return out

    def unread(self, data: bytes) -> None:
        self.pending[:0] = data

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Closed from e

    def say(self, text: str) -> None:
        """Write ``text`` with its line ends as ``\\r\\n``."""
        self.write(text.replace("\n", "\r\n").encode("utf-8", "replace"))


class _XferLink:
    """The terminal as the XMODEM receiver's link; a restart of the device ends it."""

    def __init__(self, term: Terminal, alive: Callable[[], bool]) -> None:
        self.term = term
        self.alive = alive

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise LinkLost("the device restarted")
            left = deadline - time.monotonic()
            data = self.term.read(max_bytes, min(max(left, 0.0), 0.2))
            if data or left <= 0:
                return data

    def write(self, data: bytes) -> None:
        self.term.write(data)


# -- commands -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Command:
    name: str
    summary: str
    usage: str
    repeatable: bool
    run: Callable[[list[str], int | None, bool], int]


@dataclass
class _BootSession:
    """What U-Boot holds in RAM between two power-ons."""

    ram: SparseRam = field(default_factory=SparseRam)
    env: dict[str, str] = field(default_factory=dict)
    protected: list[bool] = field(default_factory=list)
    version: str = "2023.01-sim"
    last_line: str = ""
    md_address: int = 0
    md_length: int = 0x40
    md_size: int = 4
    rc: int = 0
    #: ``sf probe`` ran (the other ``sf`` commands need it).
    sf_probed: bool = False


class UBootFace:
    """The console of one device; one terminal at a time (a newer one takes over)."""

    def __init__(
        self,
        device: SimDevice,
        config: ConsoleConfig | None = None,
        *,
        stopping: threading.Event | None = None,
    ) -> None:
        self.device = device
        self.config = config or ConsoleConfig()
        self._stopping = stopping or threading.Event()
        self._session_lock = threading.Lock()
        self._shown_boot: int | None = None
        self._mode = "off"
        self._quiet_next_boot = False
        self._skip_lf = False
        self._s = _BootSession()
        self._term: Terminal | None = None
        self._corrupt_left = self.config.corrupt_writes
        self._mtd = MtdCommands(self)
        self._commands = self._command_table()

    # -- serving ------------------------------------------------------------------------

    def serve(self, sock: socket.socket) -> None:
        """Run the console on ``sock`` until the client leaves, a power cut or a stop."""
        term = Terminal(sock, self._stopping)
        while not self._session_lock.acquire(timeout=_POLL_S):
            if self._stopping.is_set():
                return
        try:
            self._term = term
            self._skip_lf = False
            if self.config.greeting_delay_s:
                time.sleep(self.config.greeting_delay_s)
            self._loop(term)
        except _Closed:
            pass
        except DeviceError as e:
            log.info("sim %s console: %s", self.device.name, e)
        finally:
            self._term = None
            self._session_lock.release()

    def _loop(self, term: Terminal) -> None:
        while not self._stopping.is_set():
            status = self.device.status()
            try:
                if status["state"] == "off":
                    self._idle(term)
                elif status["boot_id"] != self._shown_boot:
                    self._play_boot(term)
                elif self._mode == "prompt":
                    self._prompt_step(term)
                elif self._mode == "firmware":
                    self._firmware_step(term)
                else:
                    self._idle(term)
            except _BootChanged:
                continue

    def _idle(self, term: Terminal) -> None:
        term.read(4096, _POLL_S)  # nobody listens: input is lost

    def _boot_changed(self) -> bool:
        return self.device.boot_id != self._shown_boot or self.device.state == "off"

    # -- power-on -----------------------------------------------------------------------

    def _snapshot(self) -> tuple[int, str, str]:
        for _ in range(10):
            first = self.device.status()
            text = self.device.boot_log
            second = self.device.status()
            if first["boot_id"] == second["boot_id"]:
                break
        return int(second["boot_id"]), str(second["state"]), text

    def _play_boot(self, term: Terminal) -> None:
        boot_id, state, text = self._snapshot()
        if state == "off":
            return
        self._shown_boot = boot_id
        self._s = _BootSession()
        lines = text.split("\n")
        hit = next((i for i, s in enumerate(lines) if s.startswith("Hit any key")), None)
        if state == "dead" or hit is None:
            term.say("\n".join(lines).rstrip("\n") + "\n")
            self._mode = "dead" if state == "dead" else state
            if state == "bootloader":
                self._enter_prompt(term)
            return
        start = next((i for i, s in enumerate(lines[:hit]) if s.startswith("U-Boot ")), hit)
        if start < hit:
            self._s.version = lines[start].split()[1] if len(lines[start].split()) > 1 else ""
        env, env_ok = self._load_env()
        self._s.env = env
        self._s.protected = self._default_protection()
        after = lines[hit + 1 :]
        if after and after[-1] == "=> ":
            after = after[:-1]
        if self._quiet_next_boot:
            self._quiet_next_boot = False
            self._show_autoboot(term, state, after)
            return
        rom = "\n".join(lines[:start]).rstrip("\n")
        if rom:
            term.say(rom + "\n")
        term.say(self._banner(env_ok))
        recovery = bool(after) and after[0] == "sim: recovery requested"
        if recovery or self._countdown(term, _int(env.get("bootdelay"), 2)):
            if self.device.state != "bootloader":
                self._stop_in_bootloader()
            self._enter_prompt(term)
            return
        self._show_autoboot(term, state, after)

    def _show_autoboot(self, term: Terminal, state: str, after: list[str]) -> None:
        text = "\n".join(after)
        if state == "firmware":
            term.say(text)
            self._mode = "firmware"
            return
        if text:
            term.say(text + "\n")
        self._enter_prompt(term)

    def _enter_prompt(self, term: Terminal) -> None:
        self._mode = "prompt"
        term.write(PROMPT)

    def _countdown(self, term: Terminal, bootdelay: int) -> bool:
        """U-Boot's countdown; True when a key stopped it (the key is consumed)."""
        count = max(bootdelay, 0)
        configured = self.config.autoboot_delay_s
        tick_s = 1.0 if configured is None else configured / max(count, 1)
        term.write(f"Hit any key to stop autoboot: {count:2d} ".encode())
        remaining = count
        while True:
            deadline = time.monotonic() + (tick_s if remaining > 0 else 0.0)
            while True:
                if self._boot_changed():
                    raise _BootChanged
                left = deadline - time.monotonic()
                if term.read(1, min(max(left, 0.0), _POLL_S)):
                    term.write(b"\x08\x08\x08 0 \r\n")
                    return True
                if left <= 0:
                    break
            if remaining <= 0:
                term.write(b"\r\n")
                return False
            remaining -= 1
            term.write(f"\x08\x08\x08{remaining:2d} ".encode())

    def _stop_in_bootloader(self) -> None:
        """The chain went on to the firmware; a key in the countdown stops it in U-Boot."""
        delay = self.device.faults.power_on_delay_s
        self.device.reset(recovery=True)
        self.device.wait_state(("bootloader", "dead"), 10.0 + delay)
        self._shown_boot = self.device.boot_id

    def _banner(self, env_ok: bool) -> str:
        cfg = self.device.config
        mib = cfg.geometry.size_bytes // (1024 * 1024)
        env_line = "OK\n" if env_ok else "*** Warning - bad CRC, using default environment\n\n"
        kind = cfg.geometry.type
        if kind == "spi-nor":
            # The environment driver probes the chip, which prints its line.
            flash, source = "", f"SPIFlash... {self._mtd.sf_detected_line()}\n"
        elif kind == "nand":
            flash, source = f"NAND:  {mib} MiB\n", "NAND... "
        else:
            flash, source = f"Flash: {mib} MiB\n", "Flash... "
        return (
            f"\n\nU-Boot {self._s.version} ({BUILD_DATE})\n\n"
            f"Model: {cfg.model} rev {cfg.hw_revision}\n"
            f"DRAM:  {RAM_BYTES // (1024 * 1024)} MiB\n"
            f"{flash}"
            f"Loading Environment from {source}{env_line}"
            "In:    serial\nOut:   serial\nErr:   serial\n"
            "Net:   eth0: sim-eth\n"
        )

    def _load_env(self) -> tuple[dict[str, str], bool]:
        cfg = self.device.config
        eb = cfg.geometry.erase_block_bytes
        copies = [decode_env(self.device.spi_read(off, eb)) for off in env_copies(cfg)]
        valid = [c for c in copies if c is not None]
        if valid:
            env, ok = dict(max(valid, key=lambda c: c[0])[1]), True
        else:
            env, ok = default_env(cfg), False
        for key, value in self._runtime_env().items():
            env.setdefault(key, value)
        return env, ok

    def _runtime_env(self) -> dict[str, str]:
        cfg = self.device.config
        parts = [Part(r.name, r.offset, r.size, r.critical) for r in cfg.regions]
        dev, mtd_id = MTD_NAMES.get(cfg.geometry.type, ("nor0", "sim-nor.0"))
        env = {
            "arch": "arm",
            "cpu": "armv7",
            "vendor": "sim",
            "board": cfg.model.lower(),
            "board_name": cfg.model,
            "board_rev": cfg.hw_revision,
            "region": cfg.region,
            "serial#": cfg.serial,
            "loadaddr": f"0x{LOAD_ADDRESS:x}",
            "stdin": "serial",
            "stdout": "serial",
            "stderr": "serial",
            "mtdids": f"{dev}={mtd_id}",
            "mtdparts": mtdparts_text(mtd_id, parts),
        }
        cal = cfg.find_region("calibration")
        if cal is not None:
            fields = read_calibration(self.device.spi_read(cal.offset, cal.size))
            if fields and "mac" in fields:
                env["ethaddr"] = fields["mac"]
        return env

    def _default_protection(self) -> list[bool]:
        cfg = self.device.config
        if not self._cfi:
            return []
        eb = cfg.geometry.erase_block_bytes
        flags = [False] * cfg.geometry.blocks
        for r in cfg.regions:
            if r.kind in ("bootloader", "env"):
                for i in range(r.offset // eb, (r.offset + r.size + eb - 1) // eb):
                    flags[i] = True
        return flags

    # -- the line editor ------------------------------------------------------------------

    def _read_line(self, term: Terminal) -> str | None:
        """One line as U-Boot's editor reads it; None when the device restarted meanwhile."""
        buf: list[str] = []
        escape = 0
        while True:
            if self._boot_changed():
                return None
            data = term.read(512, _POLL_S)
            echo = bytearray()
            for i, b in enumerate(data):
                if self._skip_lf:
                    self._skip_lf = False
                    if b == 0x0A:
                        continue
                if escape == 2:
                    escape = 1 if b == 0x5B else 0
                    continue
                if escape == 1:
                    escape = 0
                    continue
                if b in (0x0D, 0x0A):
                    self._skip_lf = b == 0x0D
                    term.write(bytes(echo) + b"\r\n")
                    term.unread(data[i + 1 :])
                    return "".join(buf)
                if b == 0x03:
                    term.write(bytes(echo) + b"<INTERRUPT>\r\n")
                    term.unread(data[i + 1 :])
                    return _CTRL_C
                if b in (0x08, 0x7F):
                    if buf:
                        buf.pop()
                        echo += b"\x08 \x08"
                elif b == 0x1B:
                    escape = 2
                elif 0x20 <= b < 0x7F and len(buf) < LINE_MAX_CHARS - 1:
                    buf.append(chr(b))
                    echo.append(b)
            if echo:
                term.write(bytes(echo))

    def _prompt_step(self, term: Terminal) -> None:
        line = self._read_line(term)
        if line is None:
            return
        if line != _CTRL_C:
            try:
                self._run_line(line)
            except (_Restart, _BootChanged):
                return
        if not self._boot_changed():
            term.write(PROMPT)

    def _firmware_step(self, term: Terminal) -> None:
        line = self._read_line(term)
        if line is None:
            return
        if line.strip() == "reboot":
            term.say("reboot: Restarting system\n")
            self.device.reset()
            return
        term.write(b"login: ")

    # -- running commands -----------------------------------------------------------------

    @property
    def _out(self) -> Terminal:
        if self._term is None:
            raise _Closed
        return self._term

    def _say(self, text: str) -> None:
        self._out.say(text)

    def _run_line(self, line: str) -> None:
        s = self._s
        repeat = False
        if not line.strip():
            if not s.last_line:
                return
            line, repeat = s.last_line, True
        rc, repeatable = self._run_commands(line, repeat, depth=0)
        s.last_line = line if repeatable and rc == 0 else ""

    def _run_commands(self, line: str, repeat: bool, depth: int) -> tuple[int, bool]:
        s = self._s
        repeatable = True
        rc = 0
        for connector, text in split_commands(line):
            if (connector == "&&" and rc != 0) or (connector == "||" and rc == 0):
                continue
            words = expand_words(text, self._lookup)
            if not words:
                continue
            rc, can_repeat = self._dispatch(words, repeat, depth)
            s.rc = rc
            repeatable = repeatable and can_repeat
        return rc, repeatable

    def _lookup(self, name: str) -> str:
        if name == "?":
            return str(self._s.rc)
        return self._s.env.get(name, "")

    def _find(self, name: str) -> _Command | None:
        base = name.split(".", 1)[0]
        if base in self._commands:
            return self._commands[base]
        found = [c for n, c in self._commands.items() if n.startswith(base)] if base else []
        return found[0] if len(found) == 1 else None

    def _dispatch(self, words: list[str], repeat: bool, depth: int) -> tuple[int, bool]:
        cmd = self._find(words[0])
        if cmd is None:
            self._say(f"Unknown command '{words[0]}' - try 'help'\n")
            return 1, False
        size: int | None = None
        if "." in words[0]:
            size = {"b": 1, "w": 2, "l": 4}.get(words[0].split(".", 1)[1], 0)
        try:
            if cmd.name == "run":
                rc = self._run(words[1:], depth)
            else:
                rc = cmd.run(words[1:], size, repeat)
        except PowerLoss as e:
            raise _Closed from e
        except UnbrickError as e:
            if self._boot_changed():
                raise _BootChanged from e
            self._say(f"sim: {e.message}\n")
            rc = 1
        if rc == _USAGE:
            self._usage(cmd)
            rc = 1
        return rc, cmd.repeatable

    def _usage(self, cmd: _Command) -> None:
        self._say(f"{cmd.name} - {cmd.summary}\n\nUsage:\n{cmd.name} {cmd.usage}\n")

    def _command_table(self) -> dict[str, _Command]:
        table = [
            ("?", "alias for 'help'", "[command ...]", True, self._help),
            ("bdinfo", "print Board Info structure", "", True, self._bdinfo),
            ("boot", "boot default, i.e., run 'bootcmd'", "", False, self._boot),
            ("bootd", "boot default, i.e., run 'bootcmd'", "", False, self._boot),
            ("bootm", "boot application image from memory", "[addr [arg ...]]", True, self._bootm),
            ("cmp", "memory compare", "[.b, .w, .l] addr1 addr2 count", True, self._cmp),
            ("cp", "memory copy", "[.b, .w, .l] source target count", True, self._cp),
            ("crc32", "checksum calculation", _CRC32_USAGE, True, self._crc32),
            ("echo", "echo args to console", "[args..]", True, self._echo),
            ("erase", "erase FLASH memory", _ERASE_USAGE, False, self._erase),
            ("false", "do nothing, unsuccessfully", "", True, lambda a, s, r: 1),
            ("flinfo", "print FLASH memory information", _FLINFO_USAGE, True, self._flinfo),
            ("help", "print command description/usage", "[command ...]", True, self._help),
            ("iminfo", "print header information for application image", "addr", True,
             self._iminfo),
            ("loadx", "load binary file over serial line (xmodem mode)", _LOAD_USAGE, False,
             self._loadx),
            ("loady", "load binary file over serial line (ymodem mode)", _LOAD_USAGE, False,
             self._loady),
            ("md", "memory display", "[.b, .w, .l] address [# of objects]", True, self._md),
            ("mw", "memory write (fill)", "[.b, .w, .l] address value [count]", True, self._mw),
            ("printenv", "print environment variables", _PRINTENV_USAGE, True, self._printenv),
            ("protect", "enable or disable FLASH write protection", _PROTECT_USAGE, False,
             self._protect),
            ("reset", "Perform RESET of the CPU", "", False, self._reset),
            ("run", "run commands in an environment variable", "var [...]", True,
             lambda a, s, r: 0),
            ("saveenv", "save environment variables to persistent storage", "", False,
             self._saveenv),
            ("setenv", "set environment variables", _SETENV_USAGE, False, self._setenv),
            ("tftpboot", "load file via network using TFTP protocol",
             "[loadAddress] [[hostIPaddr:]bootfilename]", True, self._tftpboot),
            ("tftpput", "TFTP put command, for uploading files to a server",
             "Address Size [[hostIPaddr:]filename]", True, self._tftpput),
            ("true", "do nothing, successfully", "", True, lambda a, s, r: 0),
            ("version", "print monitor, compiler and linker version", "", True, self._version),
        ]  # fmt: skip
        if "md5sum" in self.config.hash_commands:
            table.append(
                ("md5sum", "compute MD5 message digest", _MD5SUM_USAGE, True, self._md5sum)
            )
        if "hash" in self.config.hash_commands:
            table.append(("hash", "compute hash message digest", _HASH_USAGE, True, self._hash))
        kind = self.device.config.geometry.type
        if kind == "spi-nor":
            table.append(("sf", "SPI flash sub-system", SF_USAGE, True, self._mtd.sf))
        if kind == "nand":
            table.append(("nand", "NAND sub-system", NAND_USAGE, True, self._mtd.nand))
        if kind in ("spi-nor", "nand"):
            table.append(("mtd", "MTD utils", MTD_USAGE, True, self._mtd.mtd))
        return {name: _Command(name, summ, use, rep, fn) for name, summ, use, rep, fn in table}

    # -- memory ---------------------------------------------------------------------------

    @property
    def _cfi(self) -> bool:
        """The flash is a CFI NOR bank in the CPU's address space (SPI NOR and NAND are not)."""
        return self.device.config.geometry.type == "nor"

    def _flash_size(self) -> int:
        """Bytes of CFI flash at FLASH_BASE (0 when the chip is not memory mapped)."""
        return self.device.config.geometry.size_bytes if self._cfi else 0

    def _corrupt(self, data: bytes) -> bytes:
        """What a flash write stores: ``data``, or ``data`` with one bit flipped while the
        ``corrupt_writes`` fault lasts."""
        if self._corrupt_left <= 0 or not data:
            return data
        self._corrupt_left -= 1
        log.info("sim %s console: corrupting a flash write", self.device.name)
        return flip_one_bit(data)

    def _in_flash(self, address: int, length: int = 1) -> bool:
        return address >= FLASH_BASE and address + length <= FLASH_BASE + self._flash_size()

    def _read_mem(self, address: int, length: int) -> bytes:
        """Memory as the CPU sees it: flash, RAM, zeros elsewhere."""
        out = bytearray(length)
        ram = self._s.ram
        flash_end = FLASH_BASE + self._flash_size()
        for lo, hi, kind in (
            (FLASH_BASE, flash_end, "flash"),
            (ram.base, ram.base + ram.size_bytes, "ram"),
        ):
            a, b = max(address, lo), min(address + length, hi)
            if a >= b:
                continue
            if kind == "ram":
                out[a - address : b - address] = ram.read(a, b - a)
                continue
            for pos in range(a, b, MAX_OP_BYTES):
                n = min(MAX_OP_BYTES, b - pos)
                out[pos - address : pos - address + n] = self.device.read(pos - FLASH_BASE, n)
        return bytes(out)

    def _write_ram(self, address: int, data: bytes) -> None:
        ram = self._s.ram
        a, b = max(address, ram.base), min(address + len(data), ram.base + ram.size_bytes)
        if a < b:
            ram.write(a, data[a - address : b - address])

    # -- commands: information ------------------------------------------------------------

    def _help(self, args: list[str], size: int | None, repeat: bool) -> int:
        if not args:
            for name in sorted(self._commands):
                self._say(f"{name:<10}- {self._commands[name].summary}\n")
            return 0
        rc = 0
        for name in args:
            cmd = self._find(name)
            if cmd is None:
                self._say(
                    f"Unknown command '{name}' - try 'help' without arguments for list of all "
                    "known commands\n\n"
                )
                rc = 1
                continue
            self._usage(cmd)
        return rc

    def _version(self, args: list[str], size: int | None, repeat: bool) -> int:
        self._say(
            f"U-Boot {self._s.version} ({BUILD_DATE})\n\n"
            "arm-linux-gnueabihf-gcc (sim) 12.2.0\nGNU ld (sim) 2.40\n"
        )
        return 0

    def _bdinfo(self, args: list[str], size: int | None, repeat: bool) -> int:
        env = self._s.env
        top = RAM_BASE + RAM_BYTES
        rows = [
            ("boot_params", f"0x{0:08x}"),
            ("DRAM bank", f"0x{0:08x}"),
            ("-> start", f"0x{RAM_BASE:08x}"),
            ("-> size", f"0x{RAM_BYTES:08x}"),
            ("flashstart", f"0x{FLASH_BASE:08x}"),
            ("flashsize", f"0x{self._flash_size():08x}"),
            ("flashoffset", f"0x{0x20000:08x}"),
            ("baudrate", f"{_int(env.get('baudrate'), BAUD_RATE)} bps"),
            ("relocaddr", f"0x{top - 0xC0000:08x}"),
            ("reloc off", f"0x{top - 0xC0000 - 0x40008000:08x}"),
            ("Build", "32-bit"),
            ("current eth", "eth0"),
            ("ethaddr", env.get("ethaddr", "(not set)")),
            ("IP addr", env.get("ipaddr", "<NULL>")),
            ("fdt_blob", f"0x{top - 0x208000:08x}"),
            ("new_fdt", f"0x{top - 0x208000:08x}"),
            ("fdt_size", f"0x{0x4000:08x}"),
            ("devicetree", "board"),
            ("arch_number", f"0x{0:08x}"),
            ("TLB addr", f"0x{top - 0x10000:08x}"),
            ("irq_sp", f"0x{top - 0x208010:08x}"),
            ("sp start", f"0x{top - 0x208020:08x}"),
        ]
        self._say("".join(f"{k:<12}= {v}\n" for k, v in rows))
        return 0

    def _printenv(self, args: list[str], size: int | None, repeat: bool) -> int:
        env = self._s.env
        if not args:
            text = "".join(f"{k}={env[k]}\n" for k in sorted(env))
            total = sum(len(k) + len(v) + 2 for k, v in env.items())
            limit = self.device.config.geometry.erase_block_bytes - 16
            self._say(f"{text}\nEnvironment size: {total}/{limit} bytes\n")
            return 0
        rc = 0
        for name in args:
            if name in env:
                self._say(f"{name}={env[name]}\n")
            else:
                self._say(f'## Error: "{name}" not defined\n')
                rc = 1
        return rc

    def _echo(self, args: list[str], size: int | None, repeat: bool) -> int:
        self._say(" ".join(args) + "\n")
        return 0

    # -- commands: environment -------------------------------------------------------------

    def _setenv(self, args: list[str], size: int | None, repeat: bool) -> int:
        force = bool(args) and args[0] == "-f"
        if force:
            args = args[1:]
        if not args:
            return _USAGE
        name, value = args[0], " ".join(args[1:])
        if "=" in name:
            self._say(f"## Error: illegal character '='in variable name \"{name}\"\n")
            return 1
        env = self._s.env
        if name in ("ethaddr", "serial#") and name in env and not force:
            self._say(
                f'## Error: Can\'t overwrite "{name}"\n'
                f'## Error inserting "{name}" variable, errno=1\n'
            )
            return 1
        if args[1:]:
            env[name] = value
        else:
            env.pop(name, None)
        return 0

    def _run(self, args: list[str], depth: int) -> int:
        if not args:
            self._usage(self._commands["run"])
            return 1
        for name in args:
            if name not in self._s.env:
                self._say(f'## Error: "{name}" not defined\n')
                return 1
            if depth >= 16:
                self._say("## Error: run: nested too deeply\n")
                return 1
            rc, _ = self._run_commands(self._s.env[name], False, depth + 1)
            if rc:
                return rc
        return 0

    def _saveenv(self, args: list[str], size: int | None, repeat: bool) -> int:
        cfg = self.device.config
        eb = cfg.geometry.erase_block_bytes
        copies = env_copies(cfg)
        found = [(decode_env(self.device.read(off, eb)), off) for off in copies]
        valid = [(d[0], off) for d, off in found if d is not None]
        seq, newest = max(valid) if valid else (0, copies[1])
        target = copies[0] if newest == copies[1] else copies[1]
        where = {"spi-nor": "SPIFlash", "nand": "NAND"}.get(cfg.geometry.type, "Flash")
        self._say(f"Saving Environment to {where}... ")
        try:
            blob = pad_to_page(cfg.geometry, encode_env(seq + 1, self._s.env, eb))
        except DeviceError:
            self._say("Failed (1)\n")
            return 1
        if not self._cfi:
            return self._saveenv_mtd(target, blob, redundant=target == copies[1])
        self._say("Un-Protected 1 sectors\nErasing Flash...\n")
        self.device.erase(target, eb)
        self._say(". done\nErased 1 sectors\nWriting to Flash... ")
        self.device.program(target, blob)
        self._say("done\nProtected 1 sectors\nOK\n")
        self._s.protected[(target - FLASH_BASE) // eb] = True
        return 0

    def _saveenv_mtd(self, target: int, blob: bytes, *, redundant: bool) -> int:
        """``saveenv`` of the SPI flash and NAND environment drivers (their messages)."""
        eb = self.device.config.geometry.erase_block_bytes
        if self.device.config.geometry.type == "spi-nor":
            self._say("Erasing SPI flash...")
            self.device.erase(target, eb)
            self._say("Writing to SPI flash...")
            self.device.program(target, blob)
            self._say(f"done\nValid environment: {2 if redundant else 1}\nOK\n")
            return 0
        name = "redundant NAND" if redundant else "NAND"
        self._say(f"Erasing {name}...\n")
        self.device.erase(target, eb)
        self._say(f"\rErasing at 0x{target:x} -- 100% complete.\nWriting to {name}... ")
        self.device.program(target, blob)
        self._say("OK\nOK\n")
        return 0

    # -- commands: restarting --------------------------------------------------------------

    def _reset(self, args: list[str], size: int | None, repeat: bool) -> int:
        self._say("resetting ...\n")
        self.device.reset()
        raise _Restart

    def _boot(self, args: list[str], size: int | None, repeat: bool) -> int:
        # The sim's bootcmd is its boot chain: run it (without the banner) through a restart.
        self._quiet_next_boot = True
        self.device.reset()
        raise _Restart

    # -- commands: memory --------------------------------------------------------------------

    def _md(self, args: list[str], size: int | None, repeat: bool) -> int:
        s = self._s
        if size == 0:
            return 1
        width = size or 4
        if not repeat:
            if not args:
                return _USAGE
            s.md_address = parse_hex(args[0])
            s.md_size = width
            if len(args) > 1:
                s.md_length = parse_hex(args[1])
        width = s.md_size
        nbytes = s.md_length * width
        for pos in range(0, nbytes, 64 * 1024):
            n = min(64 * 1024, nbytes - pos)
            data = self._read_mem(s.md_address + pos, n)
            self._say("".join(line + "\n" for line in dump_lines(s.md_address + pos, data, width)))
        s.md_address += nbytes
        return 0

    def _mw(self, args: list[str], size: int | None, repeat: bool) -> int:
        if size == 0:
            return 1
        width = size or 4
        if len(args) < 2:
            return _USAGE
        address, value = parse_hex(args[0]), parse_hex(args[1])
        count = parse_hex(args[2]) if len(args) > 2 else 1
        item = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        self._write_ram(address, item * count)
        return 0

    def _cp(self, args: list[str], size: int | None, repeat: bool) -> int:
        if size == 0:
            return 1
        if len(args) < 3:
            return _USAGE
        width = size or 4
        src, dst = parse_hex(args[0]), parse_hex(args[1])
        length = parse_hex(args[2]) * width
        if length == 0:
            self._say("Zero length ???\n")
            return 1
        data = self._read_mem(src, length)
        if self._in_flash(dst):
            self._say("Copy to Flash... ")
            error = self._flash_write(dst - FLASH_BASE, data)
            if error:
                self._say(error + "\n")
                return 1
            self._say("done\n")
            return 0
        self._write_ram(dst, data)
        return 0

    def _flash_write(self, offset: int, data: bytes) -> str | None:
        """Program ``data`` at flash ``offset`` as U-Boot's CFI driver does; an error text."""
        eb = self.device.config.geometry.erase_block_bytes
        data = self._corrupt(data)
        if offset + len(data) > self._flash_size():
            return "Outside available Flash"
        first, last = offset // eb, (offset + len(data) - 1) // eb
        if any(self._s.protected[first : last + 1]):
            return "Can't write to protected Flash sectors"
        pos = 0
        while pos < len(data):
            at = offset + pos
            n = min(eb - at % eb, len(data) - pos)
            chunk = data[pos : pos + n]
            old = self.device.read(at, n)
            good = n if old == b"\xff" * n else _programmable_prefix(at, old, chunk)
            if good:
                self.device.program(at, chunk[:good])
            if good < n:
                return "Flash not Erased"
            pos += n
        return None

    def _crc32(self, args: list[str], size: int | None, repeat: bool) -> int:
        if len(args) < 2:
            return _USAGE
        address, length = parse_hex(args[0]), parse_hex(args[1])
        crc = 0
        for pos in range(0, length, 1024 * 1024):
            crc = zlib.crc32(self._read_mem(address + pos, min(1024 * 1024, length - pos)), crc)
        end = (address + length - 1) & 0xFFFFFFFF
        self._say(f"crc32 for {address:08x} ... {end:08x} ==> {crc:08x}\n")
        if len(args) > 2:
            self._write_ram(parse_hex(args[2]), crc.to_bytes(4, "big"))
        return 0

    def _md5sum(self, args: list[str], size: int | None, repeat: bool) -> int:
        verify = bool(args) and args[0] == "-v"
        if verify:
            args = args[1:]
        if len(args) < 2 or (verify and len(args) < 3):
            return _USAGE
        return self._hash_command("md5", args, verify)

    def _hash(self, args: list[str], size: int | None, repeat: bool) -> int:
        verify = bool(args) and args[0] == "-v"
        if verify:
            args = args[1:]
        if len(args) < 3 or (verify and len(args) < 4):
            return _USAGE
        return self._hash_command(args[0].lower(), args[1:], verify)

    def _digest(self, algorithm: str, address: int, length: int) -> bytes:
        """The digest of memory as the CPU sees it (RAM, CFI flash, zeros elsewhere)."""
        if algorithm == "crc32":
            crc = 0
            for pos in range(0, length, _HASH_CHUNK):
                crc = zlib.crc32(self._read_mem(address + pos, min(_HASH_CHUNK, length - pos)), crc)
            return crc.to_bytes(4, "big")
        h = hashlib.new(algorithm)
        for pos in range(0, length, _HASH_CHUNK):
            h.update(self._read_mem(address + pos, min(_HASH_CHUNK, length - pos)))
        return h.digest()

    def _hash_command(self, algorithm: str, args: list[str], verify: bool) -> int:
        """common/hash.c's ``hash_command``: ``ADDR LEN [[*]dest]``, or with ``verify``
        ``ADDR LEN [*]expected``; ``dest``/``expected`` name an environment variable, or with
        ``*`` a memory address (an ``expected`` of exactly the digest's hex length is the
        digest itself)."""
        size = HASH_ALGORITHMS.get(algorithm)
        if size is None:
            self._say(f"Unknown hash algorithm '{algorithm}'\n")
            return _USAGE
        address, length = parse_hex(args[0]), parse_hex(args[1])
        digest = self._digest(algorithm, address, length)
        end = (address + length - 1) & 0xFFFFFFFF
        shown = f"{algorithm} for {address:08x} ... {end:08x} ==> {digest.hex()}"
        if not verify:
            self._say(shown + "\n")
            if len(args) > 2:
                dest = args[2]
                if dest.startswith("*"):
                    self._write_ram(parse_hex(dest[1:]), digest)
                else:
                    self._s.env[dest] = digest.hex()
            return 0
        expected = self._expected_digest(args[2], size)
        if expected is None:
            self._say(f"ERROR: {args[2]} does not contain a valid {algorithm} sum\n")
            return 1
        if expected != digest:
            self._say(f"{shown} != {expected.hex()} ** ERROR **\n")
            return 1
        return 0

    def _expected_digest(self, text: str, size: int) -> bytes | None:
        if text.startswith("*"):
            return self._read_mem(parse_hex(text[1:]), size)
        value = text if len(text) == 2 * size else self._s.env.get(text)
        if value is None or len(value) != 2 * size:
            self._say(f"Expected {2 * size} hex digits in env var\n")
            return None
        # U-Boot reads each pair with simple_strtoul: a non-hex pair reads as its hex prefix.
        return bytes(parse_hex(value[i : i + 2]) for i in range(0, 2 * size, 2))

    def _cmp(self, args: list[str], size: int | None, repeat: bool) -> int:
        if size == 0:
            return 1
        if len(args) < 3:
            return _USAGE
        width = size or 4
        a, b, count = parse_hex(args[0]), parse_hex(args[1]), parse_hex(args[2])
        kind = {1: "byte", 2: "halfword", 4: "word"}[width]
        same = 0
        step = (1024 * 1024) // width
        for start in range(0, count, step):
            n = min(step, count - start) * width
            da = self._read_mem(a + start * width, n)
            db = self._read_mem(b + start * width, n)
            if da == db:
                same += n // width
                continue
            for i in range(0, n, width):
                wa = int.from_bytes(da[i : i + width], "little")
                wb = int.from_bytes(db[i : i + width], "little")
                if wa != wb:
                    at = start * width + i
                    self._say(
                        f"{kind} at 0x{a + at:08x} (0x{wa:x}) != "
                        f"{kind} at 0x{b + at:08x} (0x{wb:x})\n"
                        f"Total of {same} {kind}(s) were the same\n"
                    )
                    return 1
                same += 1
        self._say(f"Total of {same} {kind}(s) were the same\n")
        return 0

    # -- commands: flash ---------------------------------------------------------------------

    def _sector_range(self, args: list[str]) -> tuple[int, int] | int:
        """Sectors named by ``START END`` or ``START +LEN``; an rc after printing an error."""
        geo = self.device.config.geometry
        eb = geo.erase_block_bytes
        start = parse_hex(args[0])
        if args[1].startswith("+"):
            end = start + parse_hex(args[1][1:]) - 1
            if not self._in_flash(end):
                self._say(f"Error: end address (0x{end:08x}) not in flash!\nBad address format\n")
                return 1
            end = FLASH_BASE + ((end - FLASH_BASE) // eb + 1) * eb - 1
        else:
            end = parse_hex(args[1])
        if start >= end:
            return _USAGE
        if not (self._in_flash(start) and self._in_flash(end)):
            self._say("Error: start and/or end address not on sector boundary\n")
            return 1
        if (start - FLASH_BASE) % eb:
            self._say("Error: start address not on sector boundary\n")
            return 1
        if (end + 1 - FLASH_BASE) % eb:
            self._say("Error: end address not on sector boundary\n")
            return 1
        return (start - FLASH_BASE) // eb, (end - FLASH_BASE) // eb

    def _bank_sectors(self, args: list[str]) -> tuple[int, int, str] | int:
        """``all``, ``bank N`` and ``N:SF[-SL]`` forms: (first, last, description) or an rc."""
        blocks = self.device.config.geometry.blocks if self._cfi else 0
        if args[0] == "all" and len(args) == 1:
            return 0, blocks - 1, "bank"
        if args[0] == "bank" and len(args) == 2:
            if parse_hex(args[1]) != 1:
                self._say("Only FLASH Banks # 1 ... # 1 supported\n")
                return 1
            return 0, blocks - 1, "bank"
        bank, sep, rest = args[0].partition(":")
        if sep and len(args) == 1 and bank.isdigit():
            first_s, _, last_s = rest.partition("-")
            first = int(first_s) if first_s.isdigit() else -1
            last = int(last_s) if last_s.isdigit() else first
            if int(bank) != 1 or not 0 <= first <= last < blocks:
                self._say("Bad sector specification\n")
                return 1
            return first, last, "sectors"
        return _USAGE

    def _flinfo(self, args: list[str], size: int | None, repeat: bool) -> int:
        if args and parse_hex(args[0]) != 1:
            self._say("Only FLASH Banks # 1 ... # 1 supported\n")
            return 1
        if not self._cfi:
            self._say("\nBank # 1: missing or unknown FLASH type\n")
            return 0
        geo = self.device.config.geometry
        eb = geo.erase_block_bytes
        out = [
            "",
            f"Bank # 1: CFI conformant flash (16 x 16)  Size: {geo.size_bytes >> 20} MB in "
            f"{geo.blocks} Sectors",
            "  AMD Standard command set, Manufacturer ID: 0xC2, Device ID: 0x22CB",
            "  Erase timeout: 16384 ms, write timeout: 1 ms",
            f"  Buffer write timeout: 5 ms, buffer size: {FLASH_BUFFER_BYTES} bytes",
            "",
            "  Sector Start Addresses:",
        ]
        row = ""
        for i in range(geo.blocks):
            if i and i % 5 == 0:
                out.append(row)
                row = ""
            flag = "   RO " if self._s.protected[i] else "      "
            row += f"  {FLASH_BASE + i * eb:08X}{flag}"
        out.append(row)
        self._say("\n".join(out) + "\n")
        return 0

    def _protect(self, args: list[str], size: int | None, repeat: bool) -> int:
        if len(args) < 2 or args[0] not in ("on", "off"):
            return _USAGE
        on = args[0] == "on"
        rest = args[1:]
        if len(rest) == 2 and rest[0] != "bank":
            span = self._sector_range(rest)
            if isinstance(span, int):
                return span
            first, last = span
            for i in range(first, last + 1):
                self._s.protected[i] = on
            self._say(f"{'Protected' if on else 'Un-Protected'} {last - first + 1} sectors\n")
            return 0
        form = self._bank_sectors(rest)
        if isinstance(form, int):
            return form
        first, last, kind = form
        if not self._cfi:
            return 0  # U-Boot passes over banks of unknown type silently
        for i in range(first, last + 1):
            self._s.protected[i] = on
        verb = "Protect" if on else "Un-Protect"
        if kind == "bank":
            self._say(f"{verb} Flash Bank # 1\n")
        else:
            self._say(f"{verb} Flash Sectors {first}-{last} in Bank # 1\n")
        return 0

    def _erase(self, args: list[str], size: int | None, repeat: bool) -> int:
        if not args:
            return _USAGE
        if len(args) == 2 and args[0] != "bank":
            span = self._sector_range(args)
            if isinstance(span, int):
                return span
            self._erase_sectors(*span)
            self._say(f"Erased {span[1] - span[0] + 1} sectors\n")
            return 0
        form = self._bank_sectors(args)
        if isinstance(form, int):
            return form
        first, last, kind = form
        if not self._cfi:
            self._say("Erase Flash Bank # 1 Can't erase unknown flash type - aborted\n")
            return 1
        if kind == "bank":
            self._say("Erase Flash Bank # 1 ")
        else:
            self._say(f"Erase Flash Sectors {first}-{last} in Bank # 1 ")
        self._erase_sectors(first, last)
        return 0

    def _erase_sectors(self, first: int, last: int) -> None:
        eb = self.device.config.geometry.erase_block_bytes
        locked = sum(self._s.protected[first : last + 1])
        if locked:
            self._say(f"- Warning: {locked} protected sectors will not be erased!\n")
        else:
            self._say("\n")
        for i in range(first, last + 1):
            if not self._s.protected[i]:
                self.device.erase(i * eb, eb)
                self._say(".")
        self._say(" done\n")

    # -- commands: loading -------------------------------------------------------------------

    def _loadx(self, args: list[str], size: int | None, repeat: bool) -> int:
        return self._load_serial(args, ymodem=False)

    def _loady(self, args: list[str], size: int | None, repeat: bool) -> int:
        return self._load_serial(args, ymodem=True)

    def _load_serial(self, args: list[str], *, ymodem: bool) -> int:
        env = self._s.env
        address = parse_hex(args[0]) if args else parse_hex(env.get("loadaddr", "")) or LOAD_ADDRESS
        baud = _int(args[1], BAUD_RATE) if len(args) > 1 else _int(env.get("baudrate"), BAUD_RATE)
        mode = "ymodem" if ymodem else "xmodem"
        self._say(f"## Ready for binary ({mode}) download to 0x{address:08X} at {baud} bps...\n")
        term = self._out
        link = _XferLink(term, lambda: not self._boot_changed())
        timing = ReceiveTiming(
            poll_s=self.config.xmodem_poll_s,
            char_timeout_s=min(1.0, self.config.xmodem_poll_s),
            timeout_s=self.config.xmodem_timeout_s,
        )
        ram = self._s.ram
        limit = max(0, ram.base + ram.size_bytes - address) if ram.contains(address) else 1 << 30
        try:
            got = receive(
                link,
                ymodem=ymodem,
                sink=lambda off, data: self._write_ram(address + off, data),
                limit_bytes=limit,
                timing=timing,
            )
        except LinkLost as e:
            raise _BootChanged from e
        except ReceiveError as e:
            self._settle(link)
            self._say(f"\n{e.message}\n## Binary ({mode}) download aborted\n")
            return 1
        self._settle(link)
        self._say(
            f"## Total Size      = 0x{got.size_bytes:08x} = {got.size_bytes} Bytes\n"
            f"## Start Addr      = 0x{address:08X}\n"
        )
        env["filesize"] = f"{got.size_bytes:x}"
        return 0

    @staticmethod
    def _settle(link: _XferLink) -> None:
        """As U-Boot after a transfer: eat what is left on the line, then give the sender a
        moment to exit before printing (or a terminal program would read our text)."""
        while link.read(4096, 0.05):
            pass
        time.sleep(SETTLE_S)

    def _tftpboot(self, args: list[str], size: int | None, repeat: bool) -> int:
        env = self._s.env
        address = parse_hex(env.get("loadaddr", "")) or LOAD_ADDRESS
        name = env.get("bootfile", "")
        server = env.get("serverip", "")
        if len(args) == 1:
            if is_hex(args[0]):
                address = parse_hex(args[0])
            else:
                name = args[0]
        elif len(args) >= 2:
            address, name = parse_hex(args[0]), args[1]
        if ":" in name:
            server, name = name.split(":", 1)
        if not server:
            self._say("*** ERROR: `serverip' not set\n")
            return 1
        ip = env.get("ipaddr", "")
        if not ip:
            self._say("*** ERROR: `ipaddr' not set\n")
            return 1
        if not name:
            name = "".join(f"{int(p):02X}" for p in ip.split(".") if p.isdigit()) + ".img"
            self._say(f"*** Warning: no boot file name; using '{name}'\n")
        client = _TftpClient(
            self,
            server=server,
            port=_int(env.get("tftpdstp"), 69),
            blksize=_int(env.get("tftpblocksize"), 1468),
            windowsize=_int(env.get("tftpwindowsize"), 1),
            timeout_s=_int(env.get("tftptimeout"), 5000) / 1000,
            retries=_int(env.get("tftptimeoutcountmax"), 10),
        )
        self._say(
            f"Using sim-eth device\nTFTP from server {server}; our IP address is {ip}\n"
            f"Filename '{name}'.\nLoad address: 0x{address:x}\nLoading: *\x08"
        )
        total = client.fetch(name, address)
        if total is None:
            return 1
        env["filesize"] = f"{total:x}"
        env["fileaddr"] = f"{address:x}"
        return 0

    def _tftpput(self, args: list[str], size: int | None, repeat: bool) -> int:
        """``tftpput ADDR SIZE [[HOST:]NAME]``: send memory to a TFTP server (a WRQ)."""
        env = self._s.env
        if len(args) not in (2, 3) or not (is_hex(args[0]) and is_hex(args[1])):
            if len(args) in (2, 3):
                self._say("Invalid address/size\n")
            return _USAGE
        address, length = parse_hex(args[0]), parse_hex(args[1])
        name = args[2] if len(args) == 3 else ""
        server = env.get("serverip", "")
        if ":" in name:
            server, name = name.split(":", 1)
        if not server:
            self._say("*** ERROR: `serverip' not set\n")
            return 1
        ip = env.get("ipaddr", "")
        if not ip:
            self._say("*** ERROR: `ipaddr' not set\n")
            return 1
        if not name:
            name = "".join(f"{int(p):02X}" for p in ip.split(".") if p.isdigit()) + ".img"
            self._say(f"*** Warning: no boot file name; using '{name}'\n")
        client = _TftpClient(
            self,
            server=server,
            port=_int(env.get("tftpdstp"), 69),
            blksize=_int(env.get("tftpblocksize"), 1468),
            windowsize=1,
            timeout_s=_int(env.get("tftptimeout"), 5000) / 1000,
            retries=_int(env.get("tftptimeoutcountmax"), 10),
        )
        self._say(
            f"Using sim-eth device\nTFTP to server {server}; our IP address is {ip}\n"
            f"Filename '{name}'.\nSave address: 0x{address:x}\nSave size:    0x{length:x}\n"
            "Saving: *\x08"
        )
        total = client.put(name, self._read_mem(address, length))
        if total is None:
            return 1
        env["filesize"] = f"{total:x}"
        env["fileaddr"] = f"{address:x}"
        return 0

    # -- commands: images --------------------------------------------------------------------

    def _image_lines(self, address: int) -> tuple[str, list[str]] | None:
        """(outcome, lines) of the legacy image at ``address`` as the boot chain checks it."""
        header = self._read_mem(address, HEADER_SIZE)
        if int.from_bytes(header[:4], "big") != IH_MAGIC:
            return None
        fields = _LEGACY.unpack(header)
        data_bytes = min(fields[3], 256 * 1024 * 1024)
        image = header + self._read_mem(address + HEADER_SIZE, data_bytes)
        cfg = self.device.config
        result = check_boot(
            image,
            min_security_version=cfg.security_version,
            model=cfg.model,
            hw_revision=cfg.hw_revision,
        )
        lines = list(result.lines)
        created = time.strftime("%Y-%m-%d  %H:%M:%S UTC", time.gmtime(fields[2]))
        for i, line in enumerate(lines):
            if line.startswith("## Booting kernel from Legacy Image at"):
                lines[i] = f"## Booting kernel from Legacy Image at {address:08x} ..."
            if line.startswith("   Image Name:"):
                lines.insert(i + 1, f"   Created:      {created}")
                break
        return result.outcome, lines

    def _bootm(self, args: list[str], size: int | None, repeat: bool) -> int:
        address = parse_hex(args[0]) if args else parse_hex(self._s.env.get("loadaddr", ""))
        found = self._image_lines(address)
        if found is None:
            self._say("Wrong Image Format for bootm command\nERROR: can't get kernel image!\n")
            return 1
        outcome, lines = found
        if outcome == "bad":
            self._say("\n".join(lines) + "\n")
            return 1
        end = lines.index("Starting kernel ...") + 1 if "Starting kernel ..." in lines else None
        self._say(
            "\n".join(lines[:end]) + "\n\nsim: a kernel started from RAM is not simulated; "
            "the device restarts and boots from flash\n"
        )
        self.device.reset()
        raise _Restart

    def _iminfo(self, args: list[str], size: int | None, repeat: bool) -> int:
        address = parse_hex(args[0]) if args else parse_hex(self._s.env.get("loadaddr", ""))
        self._say(f"\n## Checking Image at {address:08x} ...\n")
        found = self._image_lines(address)
        if found is None:
            self._say("Unknown image format!\n")
            return 1
        _, lines = found
        shown = ["   Legacy image found"]
        for line in lines[1:]:
            if not line.startswith("   "):
                if line.startswith("Bad"):
                    shown.append("   " + line)
                break
            shown.append(line)
            if line.startswith("   Verifying Checksum"):
                break
        self._say("\n".join(shown) + "\n")
        return 0 if shown[-1].endswith("OK") else 1


_CRC32_USAGE = "address count [addr]\n    - compute CRC32 checksum [save at addr]"
_MD5SUM_USAGE = (
    "address count [[*]sum]\n    - compute MD5 message digest [save to sum]\n"
    "md5sum -v address count [*]sum\n    - verify md5sum of memory area"
)
_HASH_USAGE = (
    "algorithm address count [[*]hash_dest]\n"
    "    - compute message digest [save to env var / *address]\n"
    "hash -v algorithm address count [*]hash\n"
    "    - verify message digest of memory area to immediate value, \n"
    "      env var or *address"
)
_LOAD_USAGE = (
    "[ addr [ baud ] ]\n    - load binary file over serial line at address 'addr' with "
    "baudrate 'baud'"
)
_FLINFO_USAGE = (
    "\n    - print information for all FLASH memory banks\n"
    "flinfo N\n    - print information for FLASH memory bank # N"
)
_ERASE_USAGE = (
    "start end\n    - erase FLASH from addr 'start' to addr 'end'\n"
    "erase start +len\n    - erase FLASH from addr 'start' to the end of sect w/addr "
    "'start'+'len'-1\n"
    "erase N:SF[-SL]\n    - erase sectors SF-SL in FLASH bank # N\n"
    "erase bank N\n    - erase FLASH bank # N\n"
    "erase all\n    - erase all FLASH banks"
)
_PROTECT_USAGE = (
    "on  start end\n    - protect FLASH from addr 'start' to addr 'end'\n"
    "protect on start +len\n    - protect FLASH from addr 'start' to end of sect w/addr "
    "'start'+'len'-1\n"
    "protect on  N:SF[-SL]\n    - protect sectors SF-SL in FLASH bank # N\n"
    "protect on  bank N\n    - protect FLASH bank # N\n"
    "protect on  all\n    - protect all FLASH banks\n"
    "protect off start end\n    - make FLASH from addr 'start' to addr 'end' writable\n"
    "protect off start +len\n    - make FLASH from addr 'start' to end of sect w/addr "
    "'start'+'len'-1 wrtable\n"
    "protect off N:SF[-SL]\n    - make sectors SF-SL writable in FLASH bank # N\n"
    "protect off bank N\n    - make FLASH bank # N writable\n"
    "protect off all\n    - make all FLASH banks writable"
)
_PRINTENV_USAGE = (
    "\n    - print values of all environment variables\n"
    "printenv name ...\n    - print value of environment variable 'name'"
)
_SETENV_USAGE = (
    "[-f] name value ...\n    - [forcibly] set environment variable 'name' to 'value ...'\n"
    "setenv [-f] name\n    - [forcibly] delete environment variable 'name'"
)


def _programmable_prefix(offset: int, old: bytes, new: bytes) -> int:
    """Bytes of ``new`` that can be programmed over ``old`` before the first write buffer
    that would need a 0 bit to become 1 (U-Boot's "Flash not Erased" check)."""
    n = len(new)
    if int.from_bytes(old, "big") & int.from_bytes(new, "big") == int.from_bytes(new, "big"):
        return n
    pos = 0
    while pos < n:
        step = min(FLASH_BUFFER_BYTES - (offset + pos) % FLASH_BUFFER_BYTES, n - pos)
        a, b = old[pos : pos + step], new[pos : pos + step]
        if int.from_bytes(a, "big") & int.from_bytes(b, "big") != int.from_bytes(b, "big"):
            return pos
        pos += step
    return n


def _int(text: str | None, default: int) -> int:
    try:
        return int(text, 0) if text is not None else default
    except ValueError:
        return default


# -- tftpboot ---------------------------------------------------------------------------------


_HASHES_PER_LINE = 65


class _TftpClient:
    """U-Boot's TFTP client, with its output: ``tftpboot`` (RRQ with blksize and windowsize
    options) and ``tftpput`` (WRQ with timeout and blksize, one block at a time)."""

    def __init__(
        self,
        face: UBootFace,
        *,
        server: str,
        port: int,
        blksize: int,
        windowsize: int,
        timeout_s: float,
        retries: int,
    ) -> None:
        self.face = face
        self.server = server
        self.port = port
        self.blksize = max(8, min(blksize, 65464))
        self.windowsize = max(1, windowsize)
        self.timeout_s = max(0.05, timeout_s)
        self.retries = max(1, retries)
        self.hashes = 0

    def _hash(self) -> None:
        if self.hashes and self.hashes % _HASHES_PER_LINE == 0:
            self.face._say("\n\t ")
        self.face._say("#")
        self.hashes += 1

    def fetch(self, name: str, address: int) -> int | None:
        """Bytes loaded to ``address``; None after printing U-Boot's error."""
        return self._with_socket(lambda sock, dest: self._transfer(sock, dest, name, address))

    def put(self, name: str, data: bytes) -> int | None:
        """Send ``data`` as ``name`` (a WRQ); bytes sent, or None after printing the error."""
        return self._with_socket(lambda sock, dest: self._send(sock, dest, name, data))

    def _with_socket(
        self, run: Callable[[socket.socket, tuple[object, ...]], int | None]
    ) -> int | None:
        try:
            addr = socket.getaddrinfo(self.server, self.port, type=socket.SOCK_DGRAM)[0]
        except (OSError, UnicodeError):
            self.face._say(f"\n*** ERROR: cannot reach '{self.server}'\n")
            return None
        sock = socket.socket(addr[0], socket.SOCK_DGRAM)
        try:
            return run(sock, addr[4])
        finally:
            sock.close()

    def _error(self, packet: bytes) -> None:
        code = int.from_bytes(packet[2:4], "big")
        text = packet[4:].split(b"\0", 1)[0].decode("utf-8", "replace")
        self.face._say(f"\nTFTP error: '{text}' ({code})\nNot retrying...\n")

    def _done(self, total: int, started: float) -> int:
        rate = size_text(int(total / max(time.monotonic() - started, 1e-6)))
        self.face._say(f"\n\t {rate}/s\ndone\nBytes transferred = {total} ({total:x} hex)\n")
        return total

    def _send(
        self, sock: socket.socket, dest: tuple[object, ...], name: str, data: bytes
    ) -> int | None:
        """U-Boot's put: WRQ with timeout and blksize options; then one block at a time, each
        sent again after a timeout, until the short (possibly empty) last block is ACKed."""
        timeout_opt = max(1, int(self.timeout_s))
        options = (
            b"timeout\0" + str(timeout_opt).encode() + b"\0"
            + b"blksize\0" + str(self.blksize).encode() + b"\0"
        )  # fmt: skip
        wire = _Wire(
            self, sock, dest, struct.pack(">H", 2) + name.encode() + b"\0octet\0" + options
        )
        blksize = 512
        block = 0  # the block whose ACK we wait for (0: the WRQ's)
        started = time.monotonic()
        while (packet := wire.receive()) is not None:
            op = int.from_bytes(packet[:2], "big")
            if op == 5:
                self._error(packet)
                return None
            if op == 6 and block == 0:
                blksize = _option(packet, b"blksize", 512)
            elif op != 4 or len(packet) < 4 or int.from_bytes(packet[2:4], "big") != block & 0xFFFF:
                continue  # a duplicate or stray ACK: wait for the one expected
            wire.timeouts = 0
            pos = block * blksize
            if block and len(wire.last) - 4 < blksize:
                return self._done(len(data), started)
            block += 1
            if (block - 1) % 10 == 0:
                self._hash()
            wire.send(struct.pack(">HH", 3, block & 0xFFFF) + data[pos : pos + blksize])
        return None

    def _transfer(
        self, sock: socket.socket, dest: tuple[object, ...], name: str, address: int
    ) -> int | None:
        say = self.face._say
        ram = self.face._s.ram
        options = b"blksize\0" + str(self.blksize).encode() + b"\0"
        if self.windowsize > 1:
            options += b"windowsize\0" + str(self.windowsize).encode() + b"\0"
        wire = _Wire(
            self, sock, dest, struct.pack(">H", 1) + name.encode() + b"\0octet\0" + options
        )
        blksize, window = 512, 1
        expected, total = 1, 0
        started = time.monotonic()
        while (packet := wire.receive()) is not None:
            wire.timeouts = 0
            op = int.from_bytes(packet[:2], "big")
            if op == 5:
                self._error(packet)
                return None
            if op == 6:
                blksize = _option(packet, b"blksize", 512)
                window = _option(packet, b"windowsize", 1)
                wire.send(struct.pack(">HH", 4, 0))
                continue
            if op != 3 or len(packet) < 4:
                continue
            block = int.from_bytes(packet[2:4], "big")
            data = packet[4:]
            if block != expected & 0xFFFF:
                # Out of order: acknowledge what we have so the server goes back.
                wire.send(struct.pack(">HH", 4, (expected - 1) & 0xFFFF))
                continue
            if data:
                if not ram.contains(address + total, len(data)):
                    say("\nError: trying to overwrite reserved memory...\n")
                    return None
                ram.write(address + total, data)
            total += len(data)
            if (expected - 1) % 10 == 0:
                self._hash()
            done = len(data) < blksize
            if done or expected % window == 0:
                wire.send(struct.pack(">HH", 4, block))
            expected += 1
            if done:
                return self._done(total, started)
        return None


class _Wire:
    """The socket of one TFTP transfer as U-Boot drives it: the last packet it sent (sent again
    after each timeout) and the server's port (fixed by its first answer)."""

    def __init__(
        self, tftp: _TftpClient, sock: socket.socket, dest: tuple[object, ...], request: bytes
    ) -> None:
        self.tftp = tftp
        self.sock = sock
        self.dest = dest
        self.peer: tuple[object, ...] | None = None
        self.last = request
        self.timeouts = 0
        sock.sendto(request, dest)

    def send(self, packet: bytes) -> None:
        self.last = packet
        self.sock.sendto(packet, self.peer or self.dest)

    def receive(self) -> bytes | None:
        """The server's next packet; None after U-Boot's message when the retries ran out or
        the socket failed. Timeouts count up until the caller sets ``timeouts`` back to 0."""
        face = self.tftp.face
        while True:
            if face._boot_changed():
                raise _BootChanged
            ready, _, _ = select.select([self.sock], [], [], self.tftp.timeout_s)
            if not ready:
                self.timeouts += 1
                if self.timeouts > self.tftp.retries:
                    face._say("\nRetry count exceeded; starting again\n")
                    return None
                face._say("T ")
                self.sock.sendto(self.last, self.peer or self.dest)
                continue
            try:
                packet, source = self.sock.recvfrom(65536 + 4)
            except OSError as e:
                face._say(f"\nTFTP error: {e.strerror or e}\n")
                return None
            if self.peer is None:
                self.peer = source
            elif source != self.peer:
                continue
            return packet


def _option(oack: bytes, name: bytes, default: int) -> int:
    """An integer option of an OACK packet."""
    opts = oack[2:].split(b"\0")
    pairs = dict(zip(opts[0::2], opts[1::2], strict=False))
    return _int(pairs.get(name, str(default).encode()).decode(), default)
