"""A U-Boot console session over a byte link (a pyserial port, or anything that reads and writes).

The session is an explicit state machine (:class:`ConsoleState`): it attaches to a device that
is booting (waits for the autoboot banner and interrupts it) or already sitting at the prompt,
runs one command at a time with the echo stripped and a timeout sized by the data the command
moves, recognises U-Boot's error lines, hands the raw link to a file transfer (``loadx``) and
back, and captures the console while the device resets.

Two rules keep it safe on a device whose last command may have been a write:

- it never sends an empty line (U-Boot repeats the last command on an empty line, and
  ``virtio write`` or ``md`` are repeatable);
- after a timeout it knows nothing about the console's state (LOST) and synchronises before
  the next command: Ctrl-C, then ``echo`` of a fresh marker, then the prompt.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import re
import select
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from unbrick.errors import DeviceError, TransportError, UsageError
from unbrick.transports.uboot.parse import AUTOBOOT_PATTERN, error_lines, split_status

log = logging.getLogger(__name__)

CTRL_C = b"\x03"
#: U-Boot reads a command line into a buffer of CONFIG_SYS_CBSIZE bytes (often 256 or 512).
DEFAULT_MAX_LINE = 250
_READ_CHUNK = 64 * 1024


class ByteLink(Protocol):
    """A bidirectional byte stream (a serial port): what the console and XMODEM speak over."""

    def read(self, n: int, timeout_s: float) -> bytes:
        """Up to ``n`` bytes; waits at most ``timeout_s`` for the first; b"" on timeout."""
        ...

    def write(self, data: bytes) -> None: ...


class PortLink:
    """A pyserial port as a :class:`ByteLink`, with a push-back buffer.

    ``unread`` returns bytes the console read past the point it needed (the first 'C' of an
    XMODEM receiver, say) so the next reader gets them.
    """

    def __init__(self, port: Any, *, name: str = "") -> None:
        self._port = port
        self._pending = b""
        self._timeout: float | None = None
        self.name = name or str(getattr(port, "port", "serial"))

    @classmethod
    def open(
        cls, url: str, *, baudrate: int = 115200, timeout_s: float = 5.0
    ) -> PortLink | SocketLink:
        """Open a pyserial URL: a device path, ``socket://HOST:PORT`` (a plain TCP socket,
        see :class:`SocketLink`) or ``rfc2217://``."""
        if url.startswith("socket://"):
            return SocketLink.open(url, timeout_s=timeout_s)
        import serial  # noqa: PLC0415 - optional at import time, needed only to open a port

        try:
            port = serial.serial_for_url(url, baudrate=baudrate, timeout=timeout_s)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError(
                f"cannot open the console {url}: {e}",
                hint="check the cable or address, and that nothing else holds the port",
            ) from e
        return cls(port, name=url)

    def read(self, n: int, timeout_s: float) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        import serial  # noqa: PLC0415

        try:
            # pyserial re-applies the port settings on every change of timeout.
            timeout = max(0.0, round(timeout_s, 2))
            if timeout != self._timeout:
                self._port.timeout = timeout
                self._timeout = timeout
            first = bytes(self._port.read(1))
            if not first or n == 1:
                return first
            waiting = int(self._port.in_waiting)
            if waiting:
                first += bytes(self._port.read(min(n - 1, waiting)))
            return first
        except (serial.SerialException, OSError) as e:
            raise TransportError(f"the console {self.name} failed while reading: {e}") from e

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    def write(self, data: bytes) -> None:
        import serial  # noqa: PLC0415

        try:
            self._port.write(data)
            self._port.flush()
        except (serial.SerialException, OSError) as e:
            raise TransportError(f"the console {self.name} failed while writing: {e}") from e

    def close(self) -> None:
        try:
            self._port.close()
        except Exception as e:  # closing must not raise
            log.debug("closing %s: %s", self.name, e)


class SocketLink:
    """A serial console reached over TCP (``socket://HOST:PORT``: ser2net, a console server,
    QEMU's ``-serial tcp:``), as a :class:`ByteLink` with a push-back buffer.

    pyserial's ``socket://`` handler discards what arrives while it connects (a banner sent at
    once is lost) and reports one waiting byte at most, so each read would take two bytes;
    this reads the socket directly instead.
    """

    def __init__(self, sock: socket.socket, *, name: str) -> None:
        self._sock = sock
        self._pending = b""
        self.name = name

    @classmethod
    def open(cls, url: str, *, timeout_s: float = 5.0) -> SocketLink:
        parts = urllib.parse.urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise TransportError(f"cannot open the console {url}: {e}") from e
        if not host or port is None:
            raise TransportError(f"cannot open the console {url}: give HOST:PORT")
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise TransportError(
                f"cannot open the console {url}: {e.strerror or e}",
                hint="check the cable or address, and that nothing else holds the port",
            ) from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, name=url)

    def read(self, n: int, timeout_s: float) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        try:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout_s))
            if not ready:
                return b""
            data = self._sock.recv(n)
        except OSError as e:
            raise TransportError(f"the console {self.name} failed while reading: {e}") from e
        if not data:
            raise TransportError(
                f"the console {self.name} closed the connection",
                hint="the console server or the device went away; check it and retry",
            )
        return data

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending

    def write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise TransportError(f"the console {self.name} failed while writing: {e}") from e

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class ConsoleState(enum.Enum):
    DETACHED = "detached"
    PROMPT = "prompt"
    COMMAND = "command"
    TRANSFER = "transfer"
    BOOTING = "booting"
    LOST = "lost"
    CLOSED = "closed"


_ALLOWED: dict[ConsoleState, frozenset[ConsoleState]] = {
    ConsoleState.DETACHED: frozenset({ConsoleState.PROMPT, ConsoleState.LOST}),
    ConsoleState.PROMPT: frozenset(
        {ConsoleState.COMMAND, ConsoleState.TRANSFER, ConsoleState.BOOTING, ConsoleState.LOST}
    ),
    ConsoleState.COMMAND: frozenset({ConsoleState.PROMPT, ConsoleState.LOST}),
    ConsoleState.TRANSFER: frozenset({ConsoleState.PROMPT, ConsoleState.LOST}),
    ConsoleState.BOOTING: frozenset({ConsoleState.PROMPT, ConsoleState.LOST}),
    ConsoleState.LOST: frozenset({ConsoleState.PROMPT, ConsoleState.LOST}),
    ConsoleState.CLOSED: frozenset(),
}


def transition(current: ConsoleState, target: ConsoleState) -> ConsoleState:
    """The one transition function; CLOSED is reachable from anywhere."""
    if target is ConsoleState.CLOSED or target in _ALLOWED[current]:
        return target
    raise UsageError(f"console: cannot go from {current.value} to {target.value}")


@dataclass(frozen=True)
class ConsoleOptions:
    """How to talk to one U-Boot: its prompt, how to stop autoboot, how patient to be."""

    prompt: bytes = b"=> "
    #: Regular expression of the autoboot banner (bytes).
    autoboot_pattern: bytes = AUTOBOOT_PATTERN
    #: What stops autoboot: any key for stock U-Boot; the stop string for keyed builds.
    interrupt: bytes = CTRL_C
    #: How long to wait for the banner or the prompt when attaching.
    attach_timeout_s: float = 15.0
    #: Silence after which an attaching console pokes the device (Ctrl-C and a sync marker).
    poke_after_s: float = 0.7
    #: Base timeout of every command, before the share sized by its data.
    command_timeout_s: float = 10.0
    #: Slowest rate (bytes/s) the link is assumed to move data at, to size timeouts.
    min_rate_bytes_s: float = 4096.0
    #: Line end sent after a command (one character: never "\r\n", which would be two lines).
    line_end: bytes = b"\n"
    #: Longest command line sent (U-Boot's CONFIG_SYS_CBSIZE less a margin).
    max_line_chars: int = DEFAULT_MAX_LINE

    def timeout_for(self, data_bytes: int = 0, factor: float = 1.0) -> float:
        """A command's timeout: the base plus ``data_bytes`` at the slowest assumed rate."""
        return self.command_timeout_s + factor * max(0, data_bytes) / self.min_rate_bytes_s


@dataclass(frozen=True)
class CommandResult:
    command: str
    #: What the command printed, echo and prompt removed, lines joined with "\n".
    output: str
    #: Exit status (``$?``) when it was asked for, else None.
    status: int | None
    #: U-Boot error lines found in the output.
    errors: tuple[str, ...]
    duration_s: float

    @property
    def ok(self) -> bool:
        return not self.errors and self.status in (None, 0)


class Console:
    """One session on one U-Boot console. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        link: ByteLink,
        options: ConsoleOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "console",
    ) -> None:
        self.link = link
        self.options = options or ConsoleOptions()
        self.clock = clock
        self.name = name
        self.state = ConsoleState.DETACHED
        self._buf = bytearray()
        self._marker = itertools.count(1)
        self._prompt_re = re.compile(rb"(?:^|\n)" + re.escape(self.options.prompt) + rb"$")
        self._autoboot_re = re.compile(self.options.autoboot_pattern)
        #: Everything the device printed while attaching (banner, countdown).
        self.attach_log = ""

    # -- state ------------------------------------------------------------------------------

    def _move(self, target: ConsoleState) -> None:
        self.state = transition(self.state, target)

    def close(self) -> None:
        self.state = ConsoleState.CLOSED

    def _require_open(self, what: str) -> None:
        if self.state is ConsoleState.CLOSED:
            raise UsageError(f"{self.name}: cannot {what}: the console is closed")

    # -- low level --------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.link.write(data)

    def _fill(self, deadline: float) -> bool:
        """Read what arrives before ``deadline`` (at least one wait); False on silence."""
        wait = max(0.0, deadline - self.clock())
        data = self.link.read(_READ_CHUNK, min(wait, 0.25))
        if data:
            self._buf += data
            return True
        return False

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _at_prompt(self) -> bool:
        tail = bytes(self._buf[-(len(self.options.prompt) + 2) :])
        return self._prompt_re.search(tail) is not None or bytes(self._buf) == self.options.prompt

    def read_until(
        self, pattern: re.Pattern[bytes], timeout_s: float, *, what: str
    ) -> tuple[bytes, re.Match[bytes]]:
        """Read until ``pattern`` matches the buffered output; returns (text up to and
        including the match, match). Bytes after the match stay buffered."""
        deadline = self.clock() + timeout_s
        scanned = 0
        while True:
            start = max(0, scanned - 256)
            m = pattern.search(self._buf, start)
            if m is not None:
                text = self._take(m.end())
                return text, m
            scanned = len(self._buf)
            if self.clock() >= deadline:
                self._lost(what, timeout_s)
            self._fill(deadline)

    def _lost(self, what: str, timeout_s: float) -> None:
        tail = bytes(self._buf[-200:]).decode("utf-8", "replace")
        self._buf.clear()
        if self.state is not ConsoleState.CLOSED:
            self.state = transition(self.state, ConsoleState.LOST)
        log.warning(
            "%s: no answer to %s within %.1f s; last output %r", self.name, what, timeout_s, tail
        )
        raise TransportError(
            f"U-Boot did not answer {what} within {timeout_s:.1f} s",
            hint="the console stopped answering: check the cable and the device's power, "
            "then run 'unbrick resume'",
        )

    def _read_to_prompt(self, timeout_s: float, *, what: str) -> bytes:
        deadline = self.clock() + timeout_s
        while True:
            if self._at_prompt():
                return self._take(len(self._buf))
            if self.clock() >= deadline:
                self._lost(what, timeout_s)
            self._fill(deadline)

    def unread_to_link(self) -> None:
        """Give buffered bytes back to the link (before a transfer protocol reads it)."""
        if self._buf:
            unread = getattr(self.link, "unread", None)
            if unread is None:
                raise UsageError(f"{self.name}: the link cannot take back {len(self._buf)} bytes")
            unread(bytes(self._buf))
            self._buf.clear()

    # -- attaching and synchronising ---------------------------------------------------------

    def attach(self, timeout_s: float | None = None) -> str:
        """Reach the prompt: interrupt autoboot if the device is counting down, or poke a
        device that is silent (already at the prompt). Returns what the device printed."""
        self._require_open("attach")
        opts = self.options
        limit = opts.attach_timeout_s if timeout_s is None else timeout_s
        deadline = self.clock() + limit
        seen = bytearray()
        dropped = 0  # bytes cut from the front of ``seen`` (positions stay absolute)
        interrupted_at = -1
        last_data = self.clock()
        while self.clock() < deadline:
            before = len(seen)
            if self._fill(min(deadline, self.clock() + 0.1)):
                seen += self._buf
                self._buf.clear()
            if len(seen) != before:
                last_data = self.clock()
            if len(seen) > 256 * 1024:
                cut = len(seen) - 256 * 1024
                del seen[:cut]
                dropped += cut
            banner = None
            for found in self._autoboot_re.finditer(seen):
                banner = found
            if banner is not None and dropped + banner.start() > interrupted_at:
                log.info("%s: autoboot banner seen; interrupting", self.name)
                self._write(opts.interrupt)
                interrupted_at = dropped + banner.start()
                if self._sync(min(3.0, max(0.1, deadline - self.clock())), seen):
                    break
                last_data = self.clock()
                continue
            if self.clock() - last_data >= opts.poke_after_s:
                if self._sync(min(2.0, max(0.1, deadline - self.clock())), seen):
                    break
                last_data = self.clock()
        else:
            self.attach_log = seen.decode("utf-8", "replace")
            self.state = ConsoleState.LOST
            raise TransportError(
                f"no U-Boot prompt '{opts.prompt.decode(errors='replace').strip()}' on "
                f"{self.name} within {limit:.0f} s",
                hint="power-cycle the device and run the command again while it boots; "
                "check the baud rate and that the console is the device's UART",
            )
        self.attach_log = seen.decode("utf-8", "replace")
        return self.attach_log

    def _sync(self, timeout_s: float, seen: bytearray | None = None) -> bool:
        """Ctrl-C, then ``echo`` of a fresh marker; True once the marker and the prompt show.

        While attaching (``seen`` given) it gives up early when an autoboot banner appears,
        so the caller can stop the countdown in time; what arrived goes to ``seen``.
        """
        marker = f"ub-sync-{next(self._marker)}"
        self._write(CTRL_C)
        # Let an interrupted countdown or a half-typed line settle before the next line.
        settle = self.clock() + 0.05
        while self.clock() < settle:
            self._fill(settle)
        self._write(f"echo {marker}".encode() + self.options.line_end)
        pattern = re.compile(
            rb"\n" + re.escape(marker.encode()) + rb"\r?\n" + re.escape(self.options.prompt) + rb"$"
        )
        deadline = self.clock() + timeout_s
        ok = False
        while self.clock() < deadline:
            if pattern.search(self._buf) is not None:
                ok = True
                break
            if seen is not None and self._autoboot_re.search(self._buf) is not None:
                break
            self._fill(deadline)
        if seen is not None:
            seen += self._buf
        self._buf.clear()
        if ok and self.state is not ConsoleState.PROMPT:
            self.state = transition(self.state, ConsoleState.PROMPT)
        return ok

    def resync(self, timeout_s: float = 5.0) -> None:
        """Find the prompt again after a timeout (LOST); TransportError if it is gone."""
        self._require_open("resync")
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            if self._sync(min(2.0, deadline - self.clock())):
                return
        raise TransportError(
            f"the U-Boot prompt on {self.name} did not come back within {timeout_s:.0f} s",
            hint="the device may have reset or hung; power-cycle it and run 'unbrick resume'",
        )

    def ensure_prompt(self) -> None:
        if self.state is ConsoleState.PROMPT:
            return
        if self.state in (ConsoleState.LOST, ConsoleState.BOOTING, ConsoleState.DETACHED):
            self.resync()
            return
        raise UsageError(f"{self.name}: a command cannot start in state {self.state.value}")

    # -- commands ---------------------------------------------------------------------------

    def _send_command(self, command: str) -> None:
        if "\n" in command or "\r" in command or CTRL_C.decode() in command:
            raise UsageError(f"console command {command!r} contains a line break")
        if not command.strip():
            raise UsageError("an empty command would repeat U-Boot's last command")
        if len(command) > self.options.max_line_chars:
            raise UsageError(
                f"console command of {len(command)} characters is longer than "
                f"{self.options.max_line_chars}"
            )
        self.ensure_prompt()
        self._buf.clear()
        self._write(command.encode() + self.options.line_end)

    def _strip_echo(self, command: str, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        first, _, rest = text.partition("\n")
        if first.rstrip("\r").strip() != command.strip():
            self.state = ConsoleState.LOST
            raise TransportError(
                f"U-Boot echoed {first.strip()[:80]!r} for the command {command[:80]!r}",
                hint="the line is garbled (wrong baud rate, noise); nothing is trusted until "
                "the console is synchronised again",
            )
        prompt = self.options.prompt.decode()
        if rest.endswith(prompt):
            rest = rest[: -len(prompt)]
        return rest.replace("\r\n", "\n").rstrip("\n")

    def run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        check: bool = True,
        status: bool = False,
    ) -> CommandResult:
        """Run one command and wait for the prompt.

        ``status`` appends ``; echo "<rc=$?>"`` (U-Boot's hush) and reads the exit status.
        With ``check``, a status other than 0 or an error line raises DeviceError naming the
        command and U-Boot's message.
        """
        self._require_open("run a command")
        line = f'{command}; echo "<rc=$?>"' if status else command
        t0 = self.clock()
        self._send_command(line)
        self._move(ConsoleState.COMMAND)
        limit = self.options.command_timeout_s if timeout_s is None else timeout_s
        raw = self._read_to_prompt(limit, what=f"'{_short(command)}'")
        self._move(ConsoleState.PROMPT)
        output = self._strip_echo(line, raw)
        rc: int | None = None
        if status:
            output, rc = split_status(output)
        result = CommandResult(
            command=command,
            output=output,
            status=rc,
            errors=tuple(error_lines(output)),
            duration_s=self.clock() - t0,
        )
        log.debug(
            "%s: %s -> %d chars in %.3f s", self.name, command, len(output), result.duration_s
        )
        if check and not result.ok:
            why = result.errors[0] if result.errors else f"exit status {rc}"
            raise DeviceError(
                f"U-Boot command '{_short(command)}' failed: {why}",
                hint="see the console log; the device refused the operation",
            )
        return result

    def start_transfer(self, command: str, ready: re.Pattern[bytes], timeout_s: float) -> str:
        """Send a command that then speaks a transfer protocol (``loadx``): wait for its
        ``ready`` line, give the bytes after it back to the link, and hand the link over."""
        self._require_open("start a transfer")
        self._send_command(command)
        self._move(ConsoleState.TRANSFER)
        text, _ = self.read_until(ready, timeout_s, what=f"'{_short(command)}'")
        self.unread_to_link()
        return text.decode("utf-8", "replace")

    def finish_transfer(self, timeout_s: float, *, what: str) -> str:
        """After the transfer protocol ended: read U-Boot's report up to the prompt."""
        if self.state is not ConsoleState.TRANSFER:
            raise UsageError(f"{self.name}: no transfer is running (state {self.state.value})")
        raw = self._read_to_prompt(timeout_s, what=what)
        self._move(ConsoleState.PROMPT)
        return raw.decode("utf-8", "replace").replace("\r\n", "\n")

    def abort_transfer(self) -> None:
        """A transfer failed: the console's state is unknown until the next sync."""
        if self.state is not ConsoleState.CLOSED:
            self.state = ConsoleState.LOST
        self._buf.clear()

    # -- resets -----------------------------------------------------------------------------

    def send_reset(self, command: str = "reset") -> None:
        """Send the reset command without waiting for a prompt (the device restarts); its
        echo is consumed, so a capture starts with what the device printed."""
        self._send_command(command)
        self._move(ConsoleState.BOOTING)
        echo = re.compile(re.escape(command.encode()) + rb"\r?\n")
        deadline = self.clock() + 2.0
        while self.clock() < deadline:
            m = echo.search(self._buf)
            if m is not None:
                del self._buf[: m.end()]
                return
            self._fill(deadline)

    def expect_boot(self) -> None:
        """The device restarts by other means (power cycle): watch it boot."""
        if self.state is not ConsoleState.BOOTING:
            self.state = ConsoleState.BOOTING

    def capture(
        self,
        *,
        timeout_s: float,
        stop: re.Pattern[bytes] | None = None,
        quiet_s: float | None = None,
    ) -> tuple[str, str]:
        """Collect the console while the device boots.

        Ends when ``stop`` matches (reason "stop"), when the console has been silent for
        ``quiet_s`` after printing something (reason "quiet"), when nothing at all arrived
        (reason "silent"), or at ``timeout_s`` (reason "timeout"). Returns (text, reason);
        the bytes after a ``stop`` match stay buffered.
        """
        deadline = self.clock() + timeout_s
        last = self.clock()
        got_any = False
        while True:
            if stop is not None:
                m = stop.search(self._buf)
                if m is not None:
                    return self._take(m.end()).decode("utf-8", "replace"), "stop"
            now = self.clock()
            if now >= deadline:
                return self._take(len(self._buf)).decode("utf-8", "replace"), (
                    "timeout" if got_any else "silent"
                )
            if quiet_s is not None and got_any and now - last >= quiet_s:
                return self._take(len(self._buf)).decode("utf-8", "replace"), "quiet"
            if self._fill(min(deadline, now + 0.2)):
                got_any = True
                last = self.clock()

    def interrupt_boot(self, timeout_s: float) -> None:
        """Stop autoboot (the banner was just seen) and synchronise at the prompt."""
        self._write(self.options.interrupt)
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            if self._sync(min(2.0, max(0.1, deadline - self.clock()))):
                return
        self.state = ConsoleState.LOST
        raise TransportError(
            f"U-Boot on {self.name} did not stop at its prompt after the autoboot banner",
            hint="set the interrupt key of this device (uboot+...?interrupt=...) and retry",
        )


def _short(command: str, limit: int = 60) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


__all__ = [
    "CTRL_C",
    "ByteLink",
    "CommandResult",
    "Console",
    "ConsoleOptions",
    "ConsoleState",
    "PortLink",
    "SocketLink",
    "transition",
]
