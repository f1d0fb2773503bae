"""TFTP packets and option negotiation: a pure codec (no I/O), fuzzable.

Packets (RFC 1350, RFC 2347)::

    RRQ/WRQ  | 01/02 | filename | 0 | mode | 0 | opt1 | 0 | value1 | 0 | ...
    DATA     | 03 | block | payload (0..blksize bytes)
    ACK      | 04 | block
    ERROR    | 05 | code | message | 0
    OACK     | 06 | opt1 | 0 | value1 | 0 | ...

All integers are big-endian u16. :func:`decode` checks every bound before it allocates
anything and raises :class:`MalformedPacket` (a ``TransportError``) for anything it cannot
accept; it never raises another exception. Options are negotiated by :func:`negotiate` (server
side) and checked by :func:`accept_oack` (client side): ``blksize`` 8..65464 (RFC 2348),
``timeout`` 1..255 s and ``tsize`` (RFC 2349), ``windowsize`` 1..65535 (RFC 7440). Unknown
options are ignored, as RFC 2347 says.

netascii (RFC 764 as used by RFC 1350) is handled by :func:`netascii_encode` (stateless) and
:class:`NetasciiDecoder` (a CR may end one block and its LF begin the next).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from unbrick.errors import TransportError

#: Largest DATA payload any peer may negotiate (RFC 2348).
MAX_BLKSIZE = 65464
MIN_BLKSIZE = 8
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535
MIN_TIMEOUT_S = 1
MAX_TIMEOUT_S = 255
#: Largest datagram the codec accepts: a DATA header and the largest payload.
MAX_DATAGRAM_BYTES = 4 + MAX_BLKSIZE
#: Largest RRQ/WRQ/OACK accepted. RFC 2347 says 512 octets; some clients send long paths, so
#: twice that is accepted, and no more.
MAX_REQUEST_BYTES = 1024
MAX_ERROR_MESSAGE_BYTES = 512
MAX_OPTIONS = 16
#: Digits in a numeric option value: enough for a 64-bit tsize.
MAX_NUMBER_DIGITS = 20
BLOCK_MODULUS = 1 << 16

MODES = ("octet", "netascii", "mail")

_HEAD = struct.Struct("!HH")
_OPCODE = struct.Struct("!H")


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    #: RFC 2347: the transfer ends because option negotiation failed.
    OPTION_REFUSED = 8


ERROR_TEXT: dict[int, str] = {
    ErrorCode.NOT_DEFINED: "Not defined",
    ErrorCode.FILE_NOT_FOUND: "File not found",
    ErrorCode.ACCESS_VIOLATION: "Access violation",
    ErrorCode.DISK_FULL: "Disk full or allocation exceeded",
    ErrorCode.ILLEGAL_OPERATION: "Illegal TFTP operation",
    ErrorCode.UNKNOWN_TID: "Unknown transfer ID",
    ErrorCode.FILE_EXISTS: "File already exists",
    ErrorCode.NO_SUCH_USER: "No such user",
    ErrorCode.OPTION_REFUSED: "Option negotiation refused",
}


class MalformedPacket(TransportError):
    """A datagram that is not a TFTP packet this codec accepts."""

    default_hint = "the peer is not speaking TFTP, or the packet was damaged on the way"


class TftpRemoteError(TransportError):
    """The peer ended the transfer with an ERROR packet; ``code`` is its error code."""

    default_hint = "check the file name, the server's root and whether it allows this transfer"

    def __init__(self, message: str, *, code: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class OptionError(TransportError):
    """Option negotiation failed (a value out of range, or an answer not asked for)."""

    default_hint = "retry without options (--blksize 512 --windowsize 1)"


Options = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Request:
    """RRQ or WRQ. ``mode`` and option names are lower case; ``options`` keep their order."""

    opcode: Opcode
    filename: str
    mode: str = "octet"
    options: Options = ()

    @property
    def is_read(self) -> bool:
        return self.opcode is Opcode.RRQ

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    message: str = ""

    def describe(self) -> str:
        name = ERROR_TEXT.get(self.code, f"error {self.code}")
        if self.message and self.message != name:
            return f"{name} ({self.code}): {self.message}"
        return f"{name} ({self.code})"


@dataclass(frozen=True)
class OptionAck:
    options: Options = ()

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None


Packet = Request | Data | Ack | Error | OptionAck


# --- encoding ---------------------------------------------------------------------------------


def _field(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise MalformedPacket(f"TFTP {what} {text!r} contains a NUL byte")
    return raw + b"\0"


def _encode_options(options: Options) -> bytes:
    if any(not name for name, _ in options):
        raise MalformedPacket("TFTP option with an empty name")
    return b"".join(_field(k, "option name") + _field(v, "option value") for k, v in options)


def encode(packet: Packet) -> bytes:
    """The datagram for ``packet``. Raises MalformedPacket for values that do not fit."""
    if isinstance(packet, Data):
        _check_block(packet.block)
        if len(packet.payload) > MAX_BLKSIZE:
            raise MalformedPacket(f"DATA payload of {len(packet.payload)} bytes > {MAX_BLKSIZE}")
        return _HEAD.pack(Opcode.DATA, packet.block) + packet.payload
    if isinstance(packet, Ack):
        _check_block(packet.block)
        return _HEAD.pack(Opcode.ACK, packet.block)
    if isinstance(packet, Error):
        if not 0 <= packet.code < BLOCK_MODULUS:
            raise MalformedPacket(f"TFTP error code {packet.code} does not fit 16 bits")
        message = packet.message.encode("utf-8", "replace")[: MAX_ERROR_MESSAGE_BYTES - 1]
        if b"\0" in message:
            message = message.replace(b"\0", b" ")
        return _HEAD.pack(Opcode.ERROR, packet.code) + message + b"\0"
    if isinstance(packet, OptionAck):
        out = _OPCODE.pack(Opcode.OACK) + _encode_options(packet.options)
        if len(out) > MAX_REQUEST_BYTES:
            raise MalformedPacket(f"OACK of {len(out)} bytes > {MAX_REQUEST_BYTES}")
        return out
    if isinstance(packet, Request):
        if packet.opcode not in (Opcode.RRQ, Opcode.WRQ):
            raise MalformedPacket(f"opcode {packet.opcode} is not a request")
        if not packet.filename:
            raise MalformedPacket("TFTP request without a file name")
        out = (
            _OPCODE.pack(packet.opcode)
            + _field(packet.filename, "file name")
            + _field(packet.mode, "mode")
            + _encode_options(packet.options)
        )
        if len(out) > MAX_REQUEST_BYTES:
            raise MalformedPacket(f"request of {len(out)} bytes > {MAX_REQUEST_BYTES}")
        return out
    raise MalformedPacket(f"cannot encode {type(packet).__name__}")  # pragma: no cover


def data_header(block: int) -> bytes:
    """The 4-byte header of DATA ``block`` (already reduced modulo 65536)."""
    return _HEAD.pack(Opcode.DATA, block)


def ack_bytes(block: int) -> bytes:
    return _HEAD.pack(Opcode.ACK, block)


def error_bytes(code: int, message: str = "") -> bytes:
    return encode(Error(code, message or ERROR_TEXT.get(code, "")))


def _check_block(block: int) -> None:
    if not 0 <= block < BLOCK_MODULUS:
        raise MalformedPacket(f"block number {block} does not fit 16 bits")


# --- decoding ---------------------------------------------------------------------------------


def _split_fields(body: bytes, what: str) -> list[bytes]:
    if not body:
        return []
    if not body.endswith(b"\0"):
        raise MalformedPacket(f"TFTP {what} does not end with a NUL byte")
    return body[:-1].split(b"\0")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedPacket(f"TFTP {what} is not valid UTF-8") from e


def _decode_options(fields: Sequence[bytes], what: str) -> Options:
    # A trailing name without a value, and NUL padding after the last pair, are ignored.
    if len(fields) // 2 > MAX_OPTIONS:
        raise MalformedPacket(f"TFTP {what} carries more than {MAX_OPTIONS} options")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for i in range(0, len(fields) - 1, 2):
        if not fields[i] and not fields[i + 1]:
            continue
        name = _text(fields[i], f"{what} option name").lower()
        value = _text(fields[i + 1], f"{what} option value")
        if not name:
            raise MalformedPacket(f"TFTP {what} has an empty option name")
        if name in seen:
            raise MalformedPacket(f"TFTP {what} names option {name!r} twice")
        seen.add(name)
        out.append((name, value))
    return tuple(out)


def decode(datagram: bytes) -> Packet:
    """Parse one datagram. Raises MalformedPacket for anything else."""
    size = len(datagram)
    if size < 2:
        raise MalformedPacket(f"TFTP packet of {size} bytes is too short")
    if size > MAX_DATAGRAM_BYTES:
        raise MalformedPacket(f"TFTP packet of {size} bytes > {MAX_DATAGRAM_BYTES}")
    (code,) = _OPCODE.unpack_from(datagram)
    if code == Opcode.DATA:
        if size < 4:
            raise MalformedPacket("DATA packet without a block number")
        return Data(_OPCODE.unpack_from(datagram, 2)[0], bytes(datagram[4:]))
    if code == Opcode.ACK:
        if size != 4:
            raise MalformedPacket(f"ACK packet of {size} bytes (expected 4)")
        return Ack(_OPCODE.unpack_from(datagram, 2)[0])
    if code == Opcode.ERROR:
        if size < 4:
            raise MalformedPacket("ERROR packet without an error code")
        if size > 4 + MAX_ERROR_MESSAGE_BYTES:
            raise MalformedPacket(f"ERROR packet of {size} bytes is too long")
        raw = bytes(datagram[4:])
        # Some peers omit the final NUL; the message is only shown to people.
        message = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return Error(_OPCODE.unpack_from(datagram, 2)[0], message)
    if code in (Opcode.RRQ, Opcode.WRQ):
        if size > MAX_REQUEST_BYTES:
            raise MalformedPacket(f"request of {size} bytes > {MAX_REQUEST_BYTES}")
        fields = _split_fields(bytes(datagram[2:]), "request")
        if len(fields) < 2:
            raise MalformedPacket("TFTP request without a file name and a mode")
        filename = _text(fields[0], "file name")
        if not filename:
            raise MalformedPacket("TFTP request with an empty file name")
        mode = _text(fields[1], "mode").lower()
        if mode not in MODES:
            raise MalformedPacket(f"TFTP request with unknown mode {mode[:32]!r}")
        options = _decode_options(fields[2:], "request")
        return Request(Opcode(code), filename, mode, options)
    if code == Opcode.OACK:
        if size > MAX_REQUEST_BYTES:
            raise MalformedPacket(f"OACK of {size} bytes > {MAX_REQUEST_BYTES}")
        fields = _split_fields(bytes(datagram[2:]), "OACK")
        return OptionAck(_decode_options(fields, "OACK"))
    raise MalformedPacket(f"unknown TFTP opcode {code}")


# --- options ----------------------------------------------------------------------------------


def parse_number(text: str, low: int, high: int) -> int | None:
    """A decimal option value within ``low..high``; None when it is not one."""
    if not text or len(text) > MAX_NUMBER_DIGITS or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if low <= value <= high else None


@dataclass(frozen=True)
class TransferOptions:
    """What a transfer runs with once negotiation is over (RFC 1350 defaults otherwise)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    #: Retransmission timeout negotiated with the ``timeout`` option; None: the local default.
    timeout_s: int | None = None
    #: Size announced by the sender (``tsize``); None when not negotiated.
    tsize: int | None = None


@dataclass(frozen=True)
class ServerLimits:
    """The largest values the server grants, and the largest upload it accepts."""

    blksize_max: int = MAX_BLKSIZE
    windowsize_max: int = 64
    #: Bytes a window may carry; a larger window is cut to fit (a burst of big blocks overflows
    #: receive buffers on loopback and collapses throughput). 0: no cap.
    window_bytes_max: int = 128 * 1024
    max_upload_bytes: int = 8 << 30


@dataclass(frozen=True)
class Negotiation:
    """The server's decision: options in force, the OACK to send (empty: send none), or an
    error to send instead of starting the transfer."""

    options: TransferOptions
    oack: Options = ()
    error: Error | None = None


def negotiate(request: Request, *, file_size: int | None, limits: ServerLimits) -> Negotiation:
    """Decide the options of ``request``.

    ``file_size``: size of the file a read serves (its netascii size in netascii mode), None
    when unknown. Invalid values and unknown options are ignored (not acknowledged).
    """
    blksize = DEFAULT_BLKSIZE
    windowsize = 1
    timeout_s: int | None = None
    tsize: int | None = None
    oack: list[tuple[str, str]] = []
    for name, value in request.options:
        if name == "blksize":
            asked = parse_number(value, MIN_BLKSIZE, MAX_BLKSIZE)
            if asked is None:
                continue
            blksize = max(MIN_BLKSIZE, min(asked, limits.blksize_max))
            oack.append((name, str(blksize)))
        elif name == "timeout":
            asked = parse_number(value, MIN_TIMEOUT_S, MAX_TIMEOUT_S)
            if asked is None:
                continue
            timeout_s = asked
            oack.append((name, str(asked)))
        elif name == "tsize":
            asked = parse_number(value, 0, (1 << 64) - 1)
            if asked is None:
                continue
            if request.is_read:
                if file_size is None:
                    continue
                tsize = file_size
            else:
                if asked > limits.max_upload_bytes:
                    return Negotiation(
                        TransferOptions(),
                        error=Error(
                            ErrorCode.DISK_FULL,
                            f"file of {asked} bytes exceeds the upload limit "
                            f"of {limits.max_upload_bytes} bytes",
                        ),
                    )
                tsize = asked
            oack.append((name, str(tsize)))
        elif name == "windowsize":
            asked = parse_number(value, 1, MAX_WINDOWSIZE)
            if asked is None:
                continue
            windowsize = max(1, min(asked, limits.windowsize_max))
            oack.append((name, str(windowsize)))
    if windowsize > 1 and limits.window_bytes_max > 0:
        fitting = max(1, limits.window_bytes_max // blksize)
        if fitting < windowsize:
            windowsize = fitting
            oack = [(k, str(windowsize) if k == "windowsize" else v) for k, v in oack]
    options = TransferOptions(blksize, windowsize, timeout_s, tsize)
    return Negotiation(options, tuple(oack))


def request_options(
    *, blksize: int, windowsize: int, timeout_s: float | None, tsize: int | None
) -> Options:
    """Options a client asks for; RFC 1350 defaults are not sent."""
    out: list[tuple[str, str]] = []
    if blksize != DEFAULT_BLKSIZE:
        if not MIN_BLKSIZE <= blksize <= MAX_BLKSIZE:
            raise OptionError(f"blksize {blksize} is outside {MIN_BLKSIZE}..{MAX_BLKSIZE}")
        out.append(("blksize", str(blksize)))
    if timeout_s is not None:
        seconds = round(timeout_s)
        if MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
            out.append(("timeout", str(seconds)))
    if tsize is not None:
        if tsize < 0:
            raise OptionError(f"tsize {tsize} is negative")
        out.append(("tsize", str(tsize)))
    if windowsize != 1:
        if not 1 <= windowsize <= MAX_WINDOWSIZE:
            raise OptionError(f"windowsize {windowsize} is outside 1..{MAX_WINDOWSIZE}")
        out.append(("windowsize", str(windowsize)))
    return tuple(out)


def accept_oack(oack: OptionAck, asked: Options, *, is_read: bool) -> TransferOptions:
    """Check the server's OACK against what the client asked (client side, RFC 2347).

    A server may lower blksize and windowsize but not raise them, must echo timeout, and may
    only acknowledge options that were asked. Raises OptionError otherwise.
    """
    wanted = dict(asked)
    blksize = DEFAULT_BLKSIZE
    windowsize = 1
    timeout_s: int | None = None
    tsize: int | None = None
    for name, value in oack.options:
        if name not in wanted:
            raise OptionError(f"server acknowledged option {name!r}, which was not requested")
        if name == "blksize":
            got = parse_number(value, MIN_BLKSIZE, int(wanted[name]))
            if got is None:
                raise OptionError(f"server answered blksize {value!r} to {wanted[name]}")
            blksize = got
        elif name == "windowsize":
            got = parse_number(value, 1, int(wanted[name]))
            if got is None:
                raise OptionError(f"server answered windowsize {value!r} to {wanted[name]}")
            windowsize = got
        elif name == "timeout":
            if value != wanted[name]:
                raise OptionError(f"server answered timeout {value!r} to {wanted[name]}")
            timeout_s = int(value)
        elif name == "tsize":
            got = parse_number(value, 0, (1 << 64) - 1)
            if got is None:
                raise OptionError(f"server answered tsize {value!r}")
            if not is_read and got != int(wanted[name]):
                raise OptionError(f"server answered tsize {got} to {wanted[name]}")
            tsize = got
    return TransferOptions(blksize, windowsize, timeout_s, tsize)


# --- netascii ---------------------------------------------------------------------------------


def netascii_encode(data: bytes) -> bytes:
    """Local text to netascii: LF -> CR LF, CR -> CR NUL. Stateless, so it may run per chunk."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def netascii_size(data: bytes) -> int:
    """The netascii length of ``data`` without building it."""
    return len(data) + data.count(b"\r") + data.count(b"\n")


class NetasciiDecoder:
    """netascii to local text: CR LF -> LF, CR NUL -> CR; a lone CR is kept as it is.

    ``feed`` may be given any split of the stream; ``finish`` returns a CR left pending at the
    end of the last chunk.
    """

    def __init__(self) -> None:
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if b"\r" not in chunk:
            return chunk
        out = bytearray()
        i = 0
        n = len(chunk)
        while i < n:
            j = chunk.find(b"\r", i)
            if j < 0 or j == n - 1:
                out += chunk[i:]
                break
            out += chunk[i:j]
            nxt = chunk[j + 1]
            if nxt == 0x0A:
                out += b"\n"
                i = j + 2
            elif nxt == 0x00:
                out += b"\r"
                i = j + 2
            else:
                out += b"\r"
                i = j + 1
        return bytes(out)

    def finish(self) -> bytes:
        if self._pending_cr:
            self._pending_cr = False
            return b"\r"
        return b""
