"""XMODEM (checksum, CRC-16, 1K) and YMODEM (batch) as pure state machines: no I/O.

The machines consume the bytes received from the peer and the passing of time, and answer with
an :class:`Action`: the bytes to send now, the time by which the next input is due (after which
``timeout()`` must be called), whether input buffered so far must be discarded first, events
(for the receiver: a file starts, data, a file ends) and, when the transfer failed, the
:class:`~unbrick.errors.TransportError` to raise after sending the cancel bytes. Time is passed
in by the caller (``now_s``, any monotonic clock), so the machines run over any link, under a
simulated clock in tests, and can be fuzzed. :mod:`unbrick.transports.xymodem_io` drives them
over a real byte link.

The wire format (Forsberg, "XMODEM/YMODEM protocol reference", 1988):

* a block is ``SOH|STX, n, 255-n, payload (128|1024 bytes), check``; the check is one byte
  (sum of the payload mod 256) when the receiver opened with NAK, two bytes (CRC-16/XMODEM,
  polynomial 0x1021, initial value 0, big-endian) when it opened with ``C``;
* blocks count from 1 modulo 256; the receiver ACKs a good block, NAKs a bad one, ACKs and
  drops a repeat of the previous one; the last block is padded with 0x1A (SUB);
* the sender ends a file with EOT, repeated until the receiver ACKs it;
* YMODEM sends block 0 first: ``name NUL "size mtime mode" NUL`` (size decimal, mtime and mode
  octal), ACKed and followed by a fresh ``C`` for the data; after each file's EOT the receiver
  asks (``C``) for the next block 0, and an empty block 0 ends the batch;
* two CAN in a row cancel the transfer from either side.

Interoperability decisions (see docs/transports/xymodem.md): the sender treats ``C`` like NAK
after the start (U-Boot's xyzModem asks for retransmission with ``C`` in CRC mode), does not
insist on the ``C`` that should follow the ACK of YMODEM block 0 (U-Boot never sends it; lrzsz
``sz`` waits ~4 s for U-Boot's timeout there), and, for the first block of a file, waits a short
while after a NAK/``C`` in case the ACK of that block is still on its way (receivers repeat
``C`` while they wait for the first block; retransmitting on every one would leave a stray ACK
that desynchronises the rest of the transfer).
"""

from __future__ import annotations

import binascii
import enum
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from unbrick.errors import TransportError, UsageError

log = logging.getLogger(__name__)

SOH = 0x01
STX = 0x02
EOT = 0x04
ACK = 0x06
NAK = 0x15
CAN = 0x18
SUB = 0x1A
CRC_REQUEST = 0x43  # 'C'

#: What either side sends to cancel: more than the two CAN the protocol needs (U-Boot waits
#: for three), so a cancel survives a lost byte.
CANCEL = bytes([CAN]) * 8

SMALL_BLOCK = 128
LARGE_BLOCK = 1024
#: Largest frame on the wire: STX, n, ~n, 1024 bytes, CRC-16.
MAX_FRAME = 3 + LARGE_BLOCK + 2

_RETRY_HINT = "check the cable and the baud rate, or retry with a slower link"


class Variant(enum.Enum):
    XMODEM = "XMODEM"
    YMODEM = "YMODEM"


# --- codec ---------------------------------------------------------------------------------------


def crc16_xmodem(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/XMODEM (CCITT polynomial 0x1021, initial value 0, no reflection)."""
    return binascii.crc_hqx(data, 0)


def checksum8(data: bytes | bytearray | memoryview) -> int:
    """The original XMODEM check: the sum of the payload bytes modulo 256."""
    return sum(data) & 0xFF


def encode_block(number: int, payload: bytes | bytearray | memoryview, *, crc: bool) -> bytes:
    """One frame: header, block number and its complement, payload, check (CRC-16 or sum)."""
    size = len(payload)
    if size not in (SMALL_BLOCK, LARGE_BLOCK):
        raise UsageError(f"an XMODEM block holds 128 or 1024 bytes, not {size}")
    seq = number & 0xFF
    head = bytes((SOH if size == SMALL_BLOCK else STX, seq, 0xFF - seq))
    check = crc16_xmodem(payload).to_bytes(2, "big") if crc else bytes((checksum8(payload),))
    return b"".join((head, payload, check))


def block_layout(total_bytes: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """(offset, data length, frame payload size) of each data block the sender sends.

    Full blocks of ``block_size``; a tail of at most 128 bytes goes in a 128-byte block (less
    padding on the wire, as lrzsz does), a longer tail in a padded ``block_size`` block.
    """
    offset = 0
    while offset < total_bytes:
        left = total_bytes - offset
        frame = SMALL_BLOCK if left <= SMALL_BLOCK else block_size
        length = min(left, frame)
        yield offset, length, frame
        offset += length


def _padded(data: bytes | memoryview, frame: int) -> bytes:
    chunk = bytes(data)
    if len(chunk) < frame:
        chunk += bytes([SUB]) * (frame - len(chunk))
    return chunk


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What a YMODEM block 0 says about a file (None: not given)."""

    name: str
    size_bytes: int | None = None
    mtime_s: int | None = None
    mode: int | None = None


def encode_header(info: FileInfo | None) -> bytes:
    """The payload of YMODEM block 0 (128 bytes, or 1024 when the name is long).

    ``None`` gives the empty block that ends a batch. Size is decimal, mtime and mode octal, as
    lrzsz and Forsberg's reference write them.
    """
    if info is None:
        return bytes(SMALL_BLOCK)
    name = info.name.encode("utf-8")
    if not name or b"\0" in name:
        raise UsageError(f"a YMODEM file name must be non-empty and without NUL: {info.name!r}")
    fields = [str(info.size_bytes if info.size_bytes is not None else 0)]
    if info.mtime_s is not None or info.mode is not None:
        fields.append(f"{max(info.mtime_s or 0, 0):o}")
        fields.append(f"{info.mode or 0:o}")
    body = name + b"\0" + " ".join(fields).encode("ascii") + b"\0"
    if len(body) > LARGE_BLOCK:
        raise UsageError(
            f"YMODEM file name too long ({len(name)} bytes)", hint="use a name under 1000 bytes"
        )
    size = SMALL_BLOCK if len(body) <= SMALL_BLOCK else LARGE_BLOCK
    return body + bytes(size - len(body))


def _parse_int(text: bytes, base: int) -> int | None:
    try:
        value = int(text.decode("ascii"), base)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if value >= 0 else None


def parse_header(payload: bytes | bytearray | memoryview) -> FileInfo | None:
    """Decode a YMODEM block 0; ``None`` for the empty block that ends the batch.

    Unparsable numbers are reported as not given, as a receiver cannot do better.
    """
    raw = bytes(payload)
    nul = raw.find(b"\0")
    name_bytes = raw if nul < 0 else raw[:nul]
    if not name_bytes:
        return None
    name = name_bytes.decode("utf-8", "replace")
    rest = b"" if nul < 0 else raw[nul + 1 :]
    end = rest.find(b"\0")
    fields = (rest if end < 0 else rest[:end]).split()
    size = _parse_int(fields[0], 10) if fields else None
    mtime = _parse_int(fields[1], 8) if len(fields) > 1 else None
    mode = _parse_int(fields[2], 8) if len(fields) > 2 else None
    return FileInfo(name=name, size_bytes=size, mtime_s=mtime, mode=mode)


def uboot_loadx_image(data: bytes, block_size: int = LARGE_BLOCK) -> bytes:
    """What U-Boot's ``loadx`` stores in RAM when :class:`Sender` sends ``data`` by XMODEM.

    U-Boot's xyzModem drops trailing 0x1A bytes from every block whose last three bytes are 0x1A
    (it cannot tell padding from data in XMODEM, nor in YMODEM when block 0 gives size 0). The
    stored image then differs from ``data`` when a block in the middle ends in three 0x1A bytes
    (the rest shifts) or when ``data`` itself ends in 0x1A; use YMODEM with a size then.
    """
    stored = bytearray()
    for offset, length, frame in block_layout(len(data), block_size):
        block = _padded(memoryview(data)[offset : offset + length], frame)
        if block.endswith(b"\x1a\x1a\x1a"):
            block = block.rstrip(b"\x1a")
        stored += block
    return bytes(stored)


# --- actions and events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileStart:
    """Receiver event: YMODEM block 0 announced a file (XMODEM: a nameless one)."""

    info: FileInfo


@dataclass(frozen=True, slots=True)
class FileData:
    """Receiver event: the payload of an accepted block (cut to the announced size)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FileEnd:
    """Receiver event: the sender ended the file (EOT acknowledged)."""

    received_bytes: int


Event = FileStart | FileData | FileEnd


@dataclass(frozen=True, slots=True)
class Action:
    """What the driver must do next.

    In order: discard buffered input if ``flush_input``; handle ``events``; write ``send``;
    raise ``error`` if set; stop if ``deadline_s`` is None; otherwise read (about
    ``want_bytes``) and pass what arrives to ``receive()``, or call ``timeout()`` once the
    clock reaches ``deadline_s`` with nothing received.
    """

    send: bytes = b""
    deadline_s: float | None = None
    want_bytes: int = 1
    flush_input: bool = False
    events: tuple[Event, ...] = ()
    error: TransportError | None = None

    @property
    def finished(self) -> bool:
        return self.deadline_s is None


class _Out:
    """Collects what one call to a machine produces."""

    __slots__ = ("error", "events", "flush", "send")

    def __init__(self) -> None:
        self.send = bytearray()
        self.flush = False
        self.events: list[Event] = []
        self.error: TransportError | None = None


# --- sender --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    """A file for the YMODEM batch (for XMODEM only ``data`` matters)."""

    name: str
    data: bytes
    mtime_s: int = 0
    mode: int = 0o100644


class SenderState(enum.Enum):
    WAIT_START = "waiting for the receiver's C or NAK"
    WAIT_ACK = "waiting for ACK"
    SETTLE = "waiting for a late ACK after NAK"
    WAIT_DATA_START = "waiting for C after the YMODEM header"
    DONE = "done"
    FAILED = "failed"


class _Unit(enum.Enum):
    HEADER = "header block"
    DATA = "data block"
    EOT = "EOT"
    END = "end-of-batch block"


class Sender:
    """The sending side of XMODEM or YMODEM.

    XMODEM sends ``files[0].data``; YMODEM sends every file of ``files`` as one batch.
    ``block_size`` is 1024 (XMODEM-1K, YMODEM) or 128; a receiver that opens with NAK (checksum
    mode) gets 128-byte blocks, as 1K blocks with an 8-bit sum are outside the protocol.
    ``timeout_s`` bounds each wait for the receiver; ``retries`` bounds the transmissions of
    one block; ``settle_s`` is how long a NAK/C that may be stale (on a file's first block,
    or after a retransmission that followed a timeout) waits for a late ACK;
    ``start_grace_s`` is how long the sender waits for the C after YMODEM block 0 is ACKed
    before sending the first data block anyway.
    """

    def __init__(
        self,
        variant: Variant,
        files: Sequence[OutgoingFile],
        *,
        block_size: int = LARGE_BLOCK,
        timeout_s: float = 10.0,
        retries: int = 10,
        settle_s: float = 1.0,
        start_grace_s: float = 0.3,
    ) -> None:
        if block_size not in (SMALL_BLOCK, LARGE_BLOCK):
            raise UsageError(f"block_size must be 128 or 1024, not {block_size}")
        if variant is Variant.XMODEM and len(files) != 1:
            raise UsageError("XMODEM sends exactly one file")
        if variant is Variant.YMODEM:
            for f in files:
                encode_header(FileInfo(f.name, len(f.data), f.mtime_s, f.mode))
        if timeout_s <= 0 or retries < 1 or settle_s < 0 or start_grace_s < 0:
            raise UsageError("timeout_s must be > 0, retries >= 1, settle/grace >= 0")
        self.variant = variant
        self._files = list(files)
        self._block_size = block_size
        self._timeout_s = timeout_s
        self._retries = retries
        self._settle_s = settle_s
        self._grace_s = start_grace_s
        self.state = SenderState.WAIT_START
        self.crc = True
        self._started = False
        self._file_index = 0
        self._unit = _Unit.HEADER if variant is Variant.YMODEM else _Unit.DATA
        self._layout: list[tuple[int, int, int]] = []
        self._block_index = 0
        self._frame = b""
        self._tries = 0
        self._naks = 0
        self._first_of_file = True
        self._ambiguous = False
        self._last_can = False
        self._deadline = 0.0
        self._settle_deadline = 0.0
        #: Data bytes the receiver has acknowledged (over the whole batch).
        self.bytes_acked = 0
        #: Whether the receiver acknowledged the end-of-batch block (YMODEM).
        self.batch_end_acked = False
        self._prepare_file()

    # public ------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state in (SenderState.DONE, SenderState.FAILED)

    def describe(self) -> str:
        """The current step, for messages: 'XMODEM block 37', 'YMODEM header block'."""
        v = self.variant.value
        if self._unit is _Unit.DATA:
            if self._block_index < len(self._layout):
                return f"{v} block {self._block_index + 1}"
            return f"{v} {_Unit.EOT.value}"
        return f"{v} {self._unit.value}"

    def start(self, now_s: float) -> Action:
        self._deadline = now_s + self._timeout_s
        return self._action(_Out())

    def receive(self, data: bytes, now_s: float) -> Action:
        out = _Out()
        sent_before = False
        for byte in data:
            if self.finished:
                break
            if sent_before:
                # Bytes that arrived together with the trigger of a transmission were sent before
                # the receiver saw it: they cannot answer it. Only a cancel still counts.
                self._watch_cancel(byte, out)
                continue
            self._on_byte(byte, now_s, out)
            sent_before = bool(out.send)
        return self._action(out)

    def timeout(self, now_s: float) -> Action:
        out = _Out()
        if self.finished:
            return self._action(out)
        if self.state is SenderState.SETTLE:
            if now_s >= self._settle_deadline:
                self._retransmit(now_s, out)
        elif now_s < self._deadline:
            pass
        elif self.state is SenderState.WAIT_START:
            self._fail_start(out)
        elif self.state is SenderState.WAIT_DATA_START:
            self._send_next(now_s, out)
        elif self.state is SenderState.WAIT_ACK:
            self._retransmit(now_s, out, after_timeout=True)
        return self._action(out)

    def cancel(self) -> bytes:
        """Bytes that abort the transfer at the receiver (the driver's Ctrl-C path)."""
        self.state = SenderState.FAILED
        return CANCEL

    # internals ---------------------------------------------------------------------------------

    def _action(self, out: _Out) -> Action:
        deadline: float | None
        if self.finished:
            deadline = None
        elif self.state is SenderState.SETTLE:
            deadline = self._settle_deadline
        else:
            deadline = self._deadline
        return Action(
            send=bytes(out.send),
            deadline_s=deadline,
            want_bytes=64,  # answers are one byte; take whatever else is there with it
            flush_input=out.flush,
            error=out.error,
        )

    def _prepare_file(self) -> None:
        if self._file_index < len(self._files):
            size = len(self._files[self._file_index].data)
            self._layout = list(block_layout(size, self._effective_block()))
        else:
            self._layout = []
        self._block_index = 0
        self._first_of_file = True

    def _effective_block(self) -> int:
        return self._block_size if self.crc else SMALL_BLOCK

    def _watch_cancel(self, byte: int, out: _Out) -> None:
        if byte == CAN:
            if self._last_can:
                self._fail(out, f"{self.describe()}: receiver cancelled (CAN CAN)", cancel=False)
            self._last_can = True
        else:
            self._last_can = False

    def _on_byte(self, byte: int, now_s: float, out: _Out) -> None:
        if byte == CAN:
            self._watch_cancel(byte, out)
            return
        self._last_can = False
        state = self.state
        if state is SenderState.WAIT_START:
            if byte in (CRC_REQUEST, NAK):
                if not self._started:
                    self._started = True
                    self.crc = byte == CRC_REQUEST
                    if not self.crc:
                        log.info("receiver asked for checksum mode: 128-byte blocks")
                    self._prepare_file()
                self._send_next(now_s, out)
        elif state is SenderState.WAIT_DATA_START:
            if byte in (CRC_REQUEST, NAK):
                self._send_next(now_s, out)
        elif state is SenderState.WAIT_ACK:
            if byte == ACK:
                self._acked(now_s, out)
            elif byte in (NAK, CRC_REQUEST):
                self._naks += 1
                if self._ambiguous:
                    self.state = SenderState.SETTLE
                    self._settle_deadline = now_s + self._settle_s
                else:
                    self._retransmit(now_s, out)
        elif state is SenderState.SETTLE and byte == ACK:
            self._acked(now_s, out)

    def _frame_for_unit(self) -> bytes:
        unit = self._unit
        if unit is _Unit.HEADER:
            f = self._files[self._file_index]
            info = FileInfo(f.name, len(f.data), f.mtime_s, f.mode)
            return encode_block(0, encode_header(info), crc=self.crc)
        if unit is _Unit.END:
            return encode_block(0, encode_header(None), crc=self.crc)
        if unit is _Unit.EOT:
            return bytes((EOT,))
        data = self._files[self._file_index].data
        offset, length, frame = self._layout[self._block_index]
        payload = _padded(memoryview(data)[offset : offset + length], frame)
        return encode_block(self._block_index + 1, payload, crc=self.crc)

    def _send_next(self, now_s: float, out: _Out) -> None:
        """Transmit the current unit for the first time."""
        if self._unit is _Unit.DATA and self._block_index >= len(self._layout):
            self._unit = _Unit.EOT
        self._frame = self._frame_for_unit()
        self._tries = 1
        self._naks = 0
        # A NAK/C may be on its way that does not answer this transmission: receivers repeat
        # C while they wait for a file's first block.
        self._ambiguous = self._first_of_file and self._unit is not _Unit.EOT
        out.send += self._frame
        self.state = SenderState.WAIT_ACK
        self._deadline = now_s + self._timeout_s

    def _retransmit(self, now_s: float, out: _Out, *, after_timeout: bool = False) -> None:
        limit = min(self._retries, 3) if self._unit is _Unit.END else self._retries
        if self._tries >= limit:
            if self._unit is _Unit.END:
                # Every file was acknowledged; lrzsz and U-Boot end the same way.
                log.warning("the receiver did not acknowledge the end of the YMODEM batch")
                self.state = SenderState.DONE
                return
            what = self.describe()
            if self._naks >= self._tries:
                msg = f"{what}: receiver sent NAK {self._naks} times"
            else:
                msg = (
                    f"{what}: not acknowledged after {self._tries} tries "
                    f"({self._naks} NAK, {self._tries - self._naks} timeouts of "
                    f"{self._timeout_s:g} s)"
                )
            self._fail(out, msg)
            return
        self._tries += 1
        # After our timeout, the receiver's own timeout NAK may cross this retransmission
        # (equal timeouts on both sides): its answer is then ambiguous too.
        self._ambiguous = self._ambiguous or after_timeout
        log.debug("%s: retransmission %d", self.describe(), self._tries)
        out.flush = True
        out.send += self._frame
        self.state = SenderState.WAIT_ACK
        self._deadline = now_s + self._timeout_s

    def _acked(self, now_s: float, out: _Out) -> None:
        unit = self._unit
        if unit is _Unit.HEADER:
            self._unit = _Unit.DATA
            self._first_of_file = True
            self.state = SenderState.WAIT_DATA_START
            self._deadline = now_s + self._grace_s
            return
        if unit is _Unit.DATA:
            self.bytes_acked += self._layout[self._block_index][1]
            self._block_index += 1
            self._first_of_file = False
            self._send_next(now_s, out)
            return
        if unit is _Unit.EOT:
            self._file_index += 1
            if self.variant is Variant.XMODEM:
                self.state = SenderState.DONE
                return
            self._unit = _Unit.HEADER if self._file_index < len(self._files) else _Unit.END
            self._prepare_file()
            self.state = SenderState.WAIT_START
            self._deadline = now_s + self._timeout_s
            return
        self.batch_end_acked = True
        self.state = SenderState.DONE

    def _fail_start(self, out: _Out) -> None:
        if not self._started:
            command = "loadx" if self.variant is Variant.XMODEM else "loady"
            self._fail(
                out,
                f"no 'C' or NAK from the receiver within {self._timeout_s:g} s: "
                f"is `{command}` running?",
                hint="start the receiving command first (loadx/loady, rx, rz) and check the link",
            )
        else:
            self._fail(
                out, f"{self.describe()}: no 'C' from the receiver within {self._timeout_s:g} s"
            )

    def _fail(
        self, out: _Out, message: str, *, cancel: bool = True, hint: str | None = None
    ) -> None:
        if cancel:
            out.send += CANCEL
        out.error = TransportError(message, hint=hint or _RETRY_HINT)
        self.state = SenderState.FAILED


# --- receiver ------------------------------------------------------------------------------------


class ReceiverState(enum.Enum):
    HEADER = "waiting for a block"
    BODY = "reading a block"
    PURGE = "discarding a bad block"
    DONE = "done"
    FAILED = "failed"


class Receiver:
    """The receiving side of XMODEM or YMODEM.

    Opens with ``C`` (CRC-16) or, with ``crc=False``, NAK (checksum). There is no automatic
    fall-back from CRC to checksum: a sender that answered a late ``C`` would then send frames
    one byte longer than the receiver reads, for ever. ``timeout_s`` bounds the
    wait for each block, ``char_timeout_s`` a pause inside one, ``purge_s`` is the quiet time
    that ends a bad block before the NAK. ``retries`` bounds the bad blocks and timeouts in a
    row; ``max_bytes`` the accepted data (a hostile sender cannot fill the disk). A YMODEM file
    is cut to the size of its block 0; an XMODEM file keeps its 0x1A padding (the protocol
    does not carry the length).
    """

    def __init__(
        self,
        variant: Variant,
        *,
        crc: bool = True,
        timeout_s: float = 10.0,
        char_timeout_s: float = 1.0,
        purge_s: float = 0.2,
        retries: int = 10,
        max_bytes: int | None = None,
        nak_first_eot: bool = True,
    ) -> None:
        if timeout_s <= 0 or char_timeout_s <= 0 or purge_s <= 0 or retries < 1:
            raise UsageError("timeouts must be > 0 and retries >= 1")
        self.variant = variant
        self.crc = crc
        self._timeout_s = timeout_s
        self._char_timeout_s = min(char_timeout_s, timeout_s)
        self._purge_s = purge_s
        self._retries = retries
        self._max_bytes = max_bytes
        self._nak_first_eot = nak_first_eot
        self.state = ReceiverState.HEADER
        self._awaiting_header = variant is Variant.YMODEM
        self._expected = 0 if self._awaiting_header else 1
        self._got_block = False  # any block of the current unit (header or data) seen
        self._errors = 0
        self._starts = 0
        self._eot_seen = False
        self._last_can = False
        self._buf = bytearray()
        self._need = 0
        self._frame_size = 0
        self._deadline = 0.0
        self._purge_limit = 0.0
        self._file: FileInfo | None = None
        self._file_bytes = 0
        self._blocks = 0  # data blocks accepted in the current file (the running count)
        #: Data bytes accepted over the whole transfer.
        self.bytes_received = 0
        #: Files completed so far.
        self.files_done = 0

    @property
    def finished(self) -> bool:
        return self.state in (ReceiverState.DONE, ReceiverState.FAILED)

    def describe(self) -> str:
        v = self.variant.value
        if self._awaiting_header:
            return f"{v} header block"
        return f"{v} block {self._blocks + 1}"

    def start(self, now_s: float) -> Action:
        out = _Out()
        self._starts = 1
        out.send += self._start_char()
        self._deadline = now_s + self._start_interval()
        return self._action(out)

    def receive(self, data: bytes, now_s: float) -> Action:
        out = _Out()
        view = memoryview(data)
        pos = 0
        total = len(view)
        while pos < total and not self.finished:
            state = self.state
            if state is ReceiverState.BODY:
                take = min(self._need - len(self._buf), total - pos)
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) == self._need:
                    self._complete_block(now_s, out)
                else:
                    self._deadline = now_s + self._char_timeout_s
            elif state is ReceiverState.PURGE:
                pos = total
                self._deadline = min(now_s + self._purge_s, self._purge_limit)
            else:
                byte = view[pos]
                pos += 1
                self._on_header_byte(byte, now_s, out)
        return self._action(out)

    def timeout(self, now_s: float) -> Action:
        out = _Out()
        if self.finished or now_s < self._deadline:
            return self._action(out)
        state = self.state
        if state is ReceiverState.PURGE or state is ReceiverState.BODY:
            self._error(now_s, out, "bad block" if state is ReceiverState.PURGE else "timeout")
        elif not self._got_block and not self._eot_seen:
            self._starts += 1
            if self._starts > self._retries and self._awaiting_header and self.files_done:
                # Every file arrived whole; only the end-of-batch block is missing (U-Boot's
                # loady ends the same way).
                log.warning("YMODEM: no end-of-batch block after %d files", self.files_done)
                self.state = ReceiverState.DONE
            elif self._starts > self._retries:
                who = "sx" if self.variant is Variant.XMODEM else "sz --ymodem"
                what = "the first block" if not self.files_done else "the next header block"
                self._fail(
                    out,
                    f"{self.describe()}: no block from the sender within "
                    f"{self._retries * self._start_interval():g} s "
                    f"(waiting for {what}): is `{who}` running?",
                    hint="start the sending program and check the link",
                )
            else:
                out.send += self._start_char()
                self._deadline = now_s + self._start_interval()
        else:
            self._error(now_s, out, "timeout")
        return self._action(out)

    def cancel(self) -> bytes:
        self.state = ReceiverState.FAILED
        return CANCEL

    # internals ---------------------------------------------------------------------------------

    def _start_interval(self) -> float:
        return min(self._timeout_s, 3.0)

    def _start_char(self) -> bytes:
        return b"C" if self.crc else bytes((NAK,))

    def _action(self, out: _Out) -> Action:
        if self.state is ReceiverState.BODY:
            want = max(self._need - len(self._buf), 1)
        elif self.state is ReceiverState.PURGE:
            want = 4096
        else:
            want = MAX_FRAME
        return Action(
            send=bytes(out.send),
            deadline_s=None if self.finished else self._deadline,
            want_bytes=want,
            flush_input=out.flush,
            events=tuple(out.events),
            error=out.error,
        )

    def _on_header_byte(self, byte: int, now_s: float, out: _Out) -> None:
        if byte == CAN:
            if self._last_can:
                self._fail(out, f"{self.describe()}: sender cancelled (CAN CAN)", cancel=False)
            self._last_can = True
            return
        self._last_can = False
        if byte in (SOH, STX):
            size = SMALL_BLOCK if byte == SOH else LARGE_BLOCK
            self._frame_size = size
            self._need = 2 + size + (2 if self.crc else 1)
            self._buf.clear()
            self.state = ReceiverState.BODY
            self._deadline = now_s + self._char_timeout_s
        elif byte == EOT:
            self._on_eot(now_s, out)
        # Anything else is line noise before a header: skipped; the deadline stays.

    def _on_eot(self, now_s: float, out: _Out) -> None:
        if self._awaiting_header:
            if self.files_done:
                # A repeated EOT whose ACK was lost: ACK it again and ask for the header.
                out.send += bytes((ACK,)) + self._start_char()
                self._deadline = now_s + self._timeout_s
            return
        if self._nak_first_eot and not self._eot_seen:
            self._eot_seen = True
            out.send += bytes((NAK,))
            self._deadline = now_s + self._timeout_s
            return
        self._end_file(now_s, out)

    def _end_file(self, now_s: float, out: _Out) -> None:
        info = self._file
        declared = info.size_bytes if info is not None else None
        if declared is not None and self._file_bytes < declared:
            name = info.name if info is not None else ""
            self._fail(
                out,
                f"{self.variant.value} file {name!r}: the sender ended after "
                f"{self._file_bytes} of {declared} bytes",
                hint="send the file again",
            )
            return
        # Twice, as U-Boot does: a lost ACK here would leave the sender repeating EOT to a
        # receiver that has moved on. A sender ignores the extra one.
        out.send += bytes((ACK, ACK))
        out.events.append(FileEnd(self._file_bytes))
        self.files_done += 1
        if self.variant is Variant.XMODEM:
            self.state = ReceiverState.DONE
            return
        self._awaiting_header = True
        self._expected = 0
        self._got_block = False
        self._eot_seen = False
        self._errors = 0
        self._file = None
        self._file_bytes = 0
        self._blocks = 0
        self._frame_size = 0
        out.send += self._start_char()
        self._deadline = now_s + self._start_interval()
        self._starts = 1

    def _complete_block(self, now_s: float, out: _Out) -> None:
        buf = self._buf
        size = self._frame_size
        seq = buf[0]
        payload = bytes(buf[2 : 2 + size])
        good = seq ^ buf[1] == 0xFF
        if good:
            if self.crc:
                good = crc16_xmodem(payload) == int.from_bytes(buf[2 + size : 4 + size], "big")
            else:
                good = checksum8(payload) == buf[2 + size]
        if not good:
            self._purge(now_s)
            return
        self.state = ReceiverState.HEADER
        self._deadline = now_s + self._timeout_s
        if self._awaiting_header:
            self._on_header_block(seq, payload, now_s, out)
        else:
            self._on_data_block(seq, payload, now_s, out)

    def _on_header_block(self, seq: int, payload: bytes, now_s: float, out: _Out) -> None:
        if seq != 0:
            self._fail(out, f"YMODEM header block: got block {seq} instead of block 0")
            return
        self._errors = 0
        info = parse_header(payload)
        if info is None:
            out.send += bytes((ACK, ACK))
            self.state = ReceiverState.DONE
            return
        declared = info.size_bytes
        if (
            declared is not None
            and self._max_bytes is not None
            and self.bytes_received + declared > self._max_bytes
        ):
            self._fail(
                out,
                f"YMODEM file {info.name!r} is {declared} bytes: over the limit "
                f"of {self._max_bytes}",
                hint="raise the size limit if the file is expected",
            )
            return
        self._file = info
        self._file_bytes = 0
        self._awaiting_header = False
        self._expected = 1
        self._got_block = False
        self._eot_seen = False
        self._blocks = 0
        self._starts = 1
        out.events.append(FileStart(info))
        out.send += bytes((ACK,)) + self._start_char()

    def _on_data_block(self, seq: int, payload: bytes, now_s: float, out: _Out) -> None:
        expected = self._expected & 0xFF
        if seq == expected:
            self._got_block = True
            self._eot_seen = False
            self._errors = 0
            chunk = payload
            declared = self._file.size_bytes if self._file is not None else None
            if declared is not None:
                chunk = chunk[: max(declared - self._file_bytes, 0)]
            if self._max_bytes is not None and self.bytes_received + len(chunk) > self._max_bytes:
                self._fail(
                    out,
                    f"{self.describe()}: more than {self._max_bytes} bytes received",
                    hint="raise the size limit if the file is expected",
                )
                return
            if chunk:
                out.events.append(FileData(chunk))
            self._file_bytes += len(chunk)
            self.bytes_received += len(chunk)
            self._blocks += 1
            self._expected = (self._expected + 1) & 0xFF
            out.send += bytes((ACK,))
        elif seq == (expected - 1) & 0xFF:
            # The sender missed our ACK and repeated the block; for block 0 (the YMODEM
            # header) it also waits for the C again.
            out.send += bytes((ACK,))
            if self.variant is Variant.YMODEM and seq == 0 and not self._got_block:
                out.send += self._start_char()
        else:
            self._fail(
                out,
                f"{self.describe()}: got block {seq} (lost sync with the sender)",
                hint="send the file again",
            )

    def _purge(self, now_s: float) -> None:
        self.state = ReceiverState.PURGE
        self._purge_limit = now_s + self._timeout_s
        self._deadline = now_s + self._purge_s

    def _error(self, now_s: float, out: _Out, why: str) -> None:
        self._errors += 1
        if self._errors > self._retries:
            self._fail(
                out,
                f"{self.describe()}: {self._errors - 1} bad blocks or timeouts in a "
                f"row (last: {why})",
            )
            return
        log.debug("%s: %s, asking again", self.describe(), why)
        first = not self._got_block and not self._eot_seen
        out.send += self._start_char() if first else bytes((NAK,))
        self.state = ReceiverState.HEADER
        self._buf.clear()
        self._deadline = now_s + self._timeout_s

    def _fail(
        self, out: _Out, message: str, *, cancel: bool = True, hint: str | None = None
    ) -> None:
        if cancel:
            out.send += CANCEL
        out.error = TransportError(message, hint=hint or _RETRY_HINT)
        self.state = ReceiverState.FAILED
