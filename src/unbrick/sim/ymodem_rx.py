"""The XMODEM/YMODEM receiver of the simulated U-Boot console (``loadx`` and ``loady``).

It behaves as U-Boot 2023.01's ``xyzModem`` does on the wire, quirks included, so that a sender
that works against the simulator also works against a real board:

* it opens in CRC mode by sending ``C`` every ``poll_s`` until a block arrives (after
  ``crc_requests`` unanswered requests it falls back to NAK and the 8-bit checksum);
* a damaged or missing block is asked for again with ``C`` (NAK in checksum mode), a repeat of
  the previous block is ACKed and dropped, any other block number cancels the transfer;
* YMODEM block 0 (``name NUL size ...``) is ACKed *without* the ``C`` the protocol asks for: the
  sender has to time out (``poll_s``) or go on by itself;
* EOT is ACKed at once; YMODEM then asks with ``C`` for the closing empty block 0;
* in XMODEM mode (and in YMODEM when the header gives no size) a block whose last three bytes
  are 0x1A (SUB) loses all its trailing SUB bytes: XMODEM's padding is removed, and so is real
  data that happens to end a block that way (a genuine U-Boot quirk; a flasher must check the
  size U-Boot reports and the CRC of what landed in RAM);
* two CAN in a row cancel.

Failures raise :class:`ReceiveError` whose message is U-Boot's text for the cause ("Cancelled",
"Timed out", ...). The link is injected (:class:`ByteLink`), so the receiver runs over a socket
in the simulator and over a scripted fake in tests.
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from unbrick.errors import DeviceError

log = logging.getLogger(__name__)

SOH = 0x01
STX = 0x02
EOT = 0x04
ACK = 0x06
NAK = 0x15
CAN = 0x18
SUB = 0x1A
CRC_REQUEST = b"C"

#: U-Boot's texts for the causes of a failed transfer.
CANCELLED = "Cancelled"
TIMED_OUT = "Timed out"
BAD_CHECK = "CRC/checksum error"
BAD_FRAME = "Invalid framing"
BAD_SEQUENCE = "Block sequence error"
TOO_LARGE = "Download does not fit in RAM"

#: Consecutive bad blocks after which the receiver gives up.
MAX_ERRORS = 20
_CANCEL = bytes([CAN]) * 3


class ReceiveError(DeviceError):
    """The transfer failed; the message is what U-Boot prints for the cause."""

    default_hint = "restart the transfer (loadx/loady) and the sender"


class LinkLost(Exception):
    """Raised by a :class:`ByteLink` when the connection ends (or the device restarts)."""


class ByteLink(Protocol):
    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` when none arrived within ``timeout_s``."""
        ...

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class ReceiveTiming:
    #: Silence after which the receiver asks (again) for a block.
    poll_s: float = 1.0
    #: Longest gap between two bytes of one block.
    char_timeout_s: float = 1.0
    #: No block at all for this long ends the transfer ("Timed out").
    timeout_s: float = 90.0
    #: ``C`` requests without an answer before falling back to checksum mode (NAK).
    crc_requests: int = 10


@dataclass(frozen=True)
class Received:
    size_bytes: int
    #: YMODEM: the file name and declared size from block 0.
    name: str | None = None
    declared_size: int | None = None


def crc16(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


def strip_sub_padding(block: bytes) -> bytes:
    """U-Boot's rule: trailing SUB bytes go when the block ends with at least three of them."""
    if len(block) >= 3 and block[-3:] == bytes([SUB]) * 3:
        return block.rstrip(bytes([SUB]))
    return block


def parse_header(payload: bytes) -> tuple[str, int | None]:
    """(file name, declared size or None) of a YMODEM block 0."""
    name_raw, _, rest = payload.partition(b"\0")
    name = name_raw.decode("utf-8", "replace")
    fields = rest.split(b"\0", 1)[0].split()
    size: int | None = None
    if fields:
        try:
            size = int(fields[0].decode("ascii"), 10)
        except (UnicodeDecodeError, ValueError):
            size = None
    return name, size if size and size > 0 else None


class _Reader:
    def __init__(self, link: ByteLink) -> None:
        self.link = link
        self.buf = bytearray()

    def byte(self, timeout_s: float) -> int | None:
        if not self.buf:
            data = self.link.read(4096, max(timeout_s, 0.0))
            if not data:
                return None
            self.buf += data
        value = self.buf[0]
        del self.buf[0]
        return value

    def exactly(self, n: int, char_timeout_s: float) -> bytes | None:
        while len(self.buf) < n:
            data = self.link.read(max(4096, n - len(self.buf)), char_timeout_s)
            if not data:
                return None
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def purge(self, quiet_s: float) -> None:
        """Drop what is buffered and what arrives until the line is quiet for ``quiet_s``."""
        self.buf.clear()
        while self.link.read(4096, quiet_s):
            pass


class _Receiver:
    def __init__(
        self,
        link: ByteLink,
        ymodem: bool,
        sink: Callable[[int, bytes], None],
        limit_bytes: int,
        timing: ReceiveTiming,
        clock: Callable[[], float],
    ) -> None:
        self.link = link
        self.reader = _Reader(link)
        self.ymodem = ymodem
        self.sink = sink
        self.limit = limit_bytes
        self.timing = timing
        self.clock = clock
        self.crc = True
        self.started = False
        self.requests = 0
        self.errors = 0
        self.expected = 0 if ymodem else 1
        self.in_header = ymodem
        self.closing = False
        self.written = 0
        self.name: str | None = None
        self.declared: int | None = None
        self.last_progress = clock()

    # -- wire helpers -------------------------------------------------------------------

    def _ask(self) -> None:
        """Ask for a (repeated) block: ``C`` in CRC mode, NAK in checksum mode."""
        if not self.started and self.crc:
            self.requests += 1
            if self.requests > self.timing.crc_requests:
                self.crc = False
        self.link.write(CRC_REQUEST if self.crc else bytes([NAK]))

    def _fail(self, reason: str, *, cancel: bool) -> ReceiveError:
        if cancel:
            self.link.write(_CANCEL)
        return ReceiveError(reason)

    def _bad(self, reason: str) -> None:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            raise self._fail(reason, cancel=True)
        self.reader.purge(min(self.timing.char_timeout_s, 0.05))
        self._ask()

    # -- main loop ----------------------------------------------------------------------

    def run(self) -> Received:
        self._ask()
        while True:
            waited = self.clock() - self.last_progress
            if waited >= self.timing.timeout_s:
                raise self._fail(TIMED_OUT, cancel=self.started)
            wait = min(self.timing.poll_s, self.timing.timeout_s - waited)
            head = self.reader.byte(wait)
            if head is None:
                self._ask()
                continue
            if head == CAN:
                nxt = self.reader.byte(self.timing.char_timeout_s)
                if nxt == CAN:
                    raise self._fail(CANCELLED, cancel=False)
                continue
            if head == EOT:
                if self._on_eot():
                    return self._result()
                continue
            if head in (SOH, STX) and self._on_block(128 if head == SOH else 1024):
                return self._result()
            # Anything else is line noise between blocks: ignored.

    def _result(self) -> Received:
        return Received(self.written, self.name, self.declared)

    def _on_eot(self) -> bool:
        if self.in_header or self.closing:
            return False  # no file yet: a stray EOT
        self.link.write(bytes([ACK]))
        self.last_progress = self.clock()
        if not self.ymodem:
            return True
        # YMODEM: ask for the next block 0; an empty one ends the batch.
        self.closing = True
        self.expected = 0
        self.link.write(CRC_REQUEST)
        return False

    def _on_block(self, size: int) -> bool:
        """Handle one block; True when the transfer is complete."""
        check_len = 2 if self.crc else 1
        body = self.reader.exactly(2 + size + check_len, self.timing.char_timeout_s)
        if body is None:
            self._bad(TIMED_OUT)
            return False
        seq, inv = body[0], body[1]
        payload = body[2 : 2 + size]
        check = body[2 + size :]
        if seq ^ inv != 0xFF:
            self._bad(BAD_FRAME)
            return False
        if self.crc:
            good = int.from_bytes(check, "big") == crc16(payload)
        else:
            good = check[0] == sum(payload) & 0xFF
        if not good:
            self._bad(BAD_CHECK)
            return False
        self.errors = 0
        self.started = True
        if self.closing:
            if seq == 0:
                self.link.write(bytes([ACK]))
                return True
            raise self._fail(BAD_SEQUENCE, cancel=True)
        if self.in_header:
            return self._on_header(seq, payload)
        if seq == self.expected & 0xFF:
            self._accept(payload)
            self.expected += 1
            self.link.write(bytes([ACK]))
            self.last_progress = self.clock()
            return False
        if seq == (self.expected - 1) & 0xFF:
            self.link.write(bytes([ACK]))  # a repeat: our ACK was lost
            return False
        raise self._fail(BAD_SEQUENCE, cancel=True)

    def _on_header(self, seq: int, payload: bytes) -> bool:
        if seq != 0:
            raise self._fail(BAD_SEQUENCE, cancel=True)
        self.link.write(bytes([ACK]))
        self.last_progress = self.clock()
        if payload[:1] == b"\0":
            return True  # an empty batch
        self.name, self.declared = parse_header(payload)
        self.in_header = False
        self.expected = 1
        # No 'C' here, as U-Boot: the sender waits for its own timeout or our next request.
        return False

    def _accept(self, payload: bytes) -> None:
        if self.declared is not None:
            data = payload[: max(0, self.declared - self.written)]
        else:
            data = strip_sub_padding(payload)
        if not data:
            return
        if self.written + len(data) > self.limit:
            raise self._fail(TOO_LARGE, cancel=True)
        self.sink(self.written, data)
        self.written += len(data)


def receive(
    link: ByteLink,
    *,
    ymodem: bool,
    sink: Callable[[int, bytes], None],
    limit_bytes: int,
    timing: ReceiveTiming | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Received:
    """Receive one file over ``link``; ``sink(offset, data)`` gets the data as it arrives.

    Raises :class:`ReceiveError` (U-Boot's message) on failure; :class:`LinkLost` from the link
    passes through.
    """
    rx = _Receiver(link, ymodem, sink, limit_bytes, timing or ReceiveTiming(), clock)
    result = rx.run()
    log.debug("received %d bytes (%s)", result.size_bytes, "ymodem" if ymodem else "xmodem")
    return result
