"""The fastboot wire protocol: commands, responses, TCP and UDP framing. Pure (no I/O), fuzzed.

fastboot is host-driven and synchronous. The host sends one command (ASCII, no terminator);
the device answers with one or more responses whose first four bytes say what they are:

    OKAY<text>   done (for getvar, <text> is the value)
    FAIL<text>   failed, <text> says why
    DATA<hex>    ready for a data phase of <hex> bytes (download, upload, fetch)
    INFO<text>   progress or diagnostics; more responses follow
    TEXT<text>   like INFO, printed without formatting (newer devices); more follow

Over USB each command, response and data chunk is a bulk transfer. Over TCP both sides first
send ``FB`` and a two-digit version (``FB01``), then every message either way is an 8-byte
big-endian length and the payload. Over UDP every packet carries a 4-byte header (packet id,
flags, big-endian sequence number); the host sends Query (learn the sequence number), then
Init (version and largest packet, the smaller of both sides' values is used), then only
Fastboot packets, each answered by exactly one device packet with the same id and sequence.
A packet with the continuation flag says the message goes on in the next packet; the peer
answers it with an empty packet. To read, the host sends an empty Fastboot packet.

Every decoder here checks its bounds and raises :class:`FastbootProtocolError` (a
``TransportError``) for anything it cannot accept; it never raises another exception.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from unbrick.errors import TransportError

#: USB interface that carries fastboot (vendor-specific class, subclass 0x42, protocol 3).
USB_INTERFACE_CLASS = 0xFF
USB_INTERFACE_SUBCLASS = 0x42
USB_INTERFACE_PROTOCOL = 0x03

#: Longest command the current protocol allows; old bootloaders accept only 64 bytes.
MAX_COMMAND_BYTES = 4096
LEGACY_COMMAND_BYTES = 64
#: Longest response the protocol allows (4 status bytes and 252 of text).
MAX_RESPONSE_BYTES = 256
#: Largest response a reader accepts from a lenient device (longer INFO lines exist).
MAX_READ_RESPONSE_BYTES = 64 * 1024
#: ``download:%08x`` carries 32 bits.
MAX_DOWNLOAD_BYTES = 0xFFFFFFFF
DEFAULT_PORT = 5554

TCP_VERSION = 1
TCP_HANDSHAKE = b"FB%02d" % TCP_VERSION
TCP_HANDSHAKE_BYTES = 4
TCP_LENGTH = struct.Struct(">Q")
TCP_LENGTH_BYTES = TCP_LENGTH.size

UDP_HEADER = struct.Struct(">BBH")
UDP_HEADER_BYTES = UDP_HEADER.size
UDP_VERSION = 1
#: Every device supports 512-byte packets; Query and Init packets never exceed it.
UDP_MIN_PACKET_BYTES = 512
UDP_MAX_PACKET_BYTES = 65507
FLAG_CONTINUATION = 0x01
SEQ_MODULUS = 1 << 16

_STATUS = ("OKAY", "FAIL", "DATA", "INFO", "TEXT")
_HEX = frozenset("0123456789abcdefABCDEF")


class FastbootProtocolError(TransportError):
    """A peer sent something the fastboot protocol does not allow."""

    default_hint = "the device's fastboot answered something unexpected; reconnect and retry"


class ResponseKind(enum.Enum):
    OKAY = "OKAY"
    FAIL = "FAIL"
    DATA = "DATA"
    INFO = "INFO"
    TEXT = "TEXT"


@dataclass(frozen=True)
class Response:
    """One device response. ``size`` is the data phase length of a DATA response."""

    kind: ResponseKind
    message: str = ""
    size: int | None = None

    @property
    def final(self) -> bool:
        """True when no further response follows for this command (OKAY, FAIL, DATA)."""
        return self.kind not in (ResponseKind.INFO, ResponseKind.TEXT)


def _text(data: bytes) -> str:
    return data.decode("ascii", "replace").replace("\ufffd", "?")


def parse_response(payload: bytes) -> Response:
    """Decode one response; FastbootProtocolError for anything else."""
    if len(payload) < 4:
        raise FastbootProtocolError(f"response of {len(payload)} bytes is too short: {payload!r}")
    if len(payload) > MAX_READ_RESPONSE_BYTES:
        raise FastbootProtocolError(f"response of {len(payload)} bytes is too long")
    status = payload[:4].decode("ascii", "replace")
    if status not in _STATUS:
        raise FastbootProtocolError(f"unknown response status {payload[:4]!r}")
    kind = ResponseKind(status)
    rest = payload[4:]
    if kind is ResponseKind.TEXT:
        return Response(kind, _text(rest.split(b"\0", 1)[0]))
    message = _text(rest.rstrip(b"\0"))
    if kind is ResponseKind.DATA:
        return Response(kind, message, parse_hex_size(message, "DATA response"))
    return Response(kind, message)


def parse_hex_size(text: str, what: str) -> int:
    """The hexadecimal length of ``download:``/``DATA`` (1 to 16 digits, no prefix)."""
    if not 1 <= len(text) <= 16 or not set(text) <= _HEX:
        raise FastbootProtocolError(f"{what}: {text!r} is not a hexadecimal size")
    return int(text, 16)


def encode_response(kind: ResponseKind, message: str = "") -> bytes:
    """A response as a device sends it (the simulator's side)."""
    data = kind.value.encode() + message.encode("ascii", "replace")
    if len(data) > MAX_RESPONSE_BYTES:
        raise FastbootProtocolError(f"response of {len(data)} bytes is longer than 256")
    return data


def encode_data(size: int) -> bytes:
    """``DATA%08x`` (16 digits when the size needs them, as for fetch)."""
    if size < 0 or size >= 1 << 64:
        raise FastbootProtocolError(f"data size {size} is out of range")
    return b"DATA%08x" % size if size <= MAX_DOWNLOAD_BYTES else b"DATA%016x" % size


# --------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Command:
    """A parsed command: ``name`` up to the first ``:`` or space, ``arg`` the rest."""

    name: str
    arg: str = ""

    def encode(self) -> bytes:
        if not self.arg:
            return encode_command(self.name)
        sep = " " if self.name in ("oem", "flashing") else ":"
        return encode_command(f"{self.name}{sep}{self.arg}")


def encode_command(text: str) -> bytes:
    """A command as the host sends it: printable ASCII, 1..4096 bytes, no terminator."""
    if not text or len(text) > MAX_COMMAND_BYTES:
        raise FastbootProtocolError(f"command of {len(text)} characters is not 1..4096")
    if not text.isascii() or not text.isprintable():
        raise FastbootProtocolError(f"command {text!r} is not printable ASCII")
    return text.encode("ascii")


def parse_command(payload: bytes) -> Command:
    """Split a command into name and argument (the device's side)."""
    if not payload or len(payload) > MAX_COMMAND_BYTES:
        raise FastbootProtocolError(f"command of {len(payload)} bytes is not 1..4096")
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError as e:
        raise FastbootProtocolError(f"command {payload[:64]!r} is not ASCII") from e
    if not text.isprintable():
        raise FastbootProtocolError(f"command {text[:64]!r} has control characters")
    cut = len(text)
    for sep in (":", " "):
        at = text.find(sep)
        if 0 <= at < cut:
            cut = at
    return Command(text[:cut], text[cut + 1 :])


def getvar_command(name: str) -> bytes:
    return encode_command(f"getvar:{name}")


def download_command(size: int) -> bytes:
    if not 0 < size <= MAX_DOWNLOAD_BYTES:
        raise FastbootProtocolError(f"download size {size} is not 1..{MAX_DOWNLOAD_BYTES}")
    return encode_command(f"download:{size:08x}")


def fetch_command(partition: str, offset: int, size: int) -> bytes:
    if offset < 0 or size <= 0:
        raise FastbootProtocolError(f"fetch range {offset}+{size} is invalid")
    return encode_command(f"fetch:{partition}:0x{offset:08x}:0x{size:08x}")


def parse_fetch_arg(arg: str) -> tuple[str, int | None, int | None]:
    """``PARTITION[:OFFSET[:SIZE]]`` of a fetch command (numbers in C notation)."""
    parts = arg.split(":")
    if not parts[0] or len(parts) > 3:
        raise FastbootProtocolError(f"fetch argument {arg!r} is not PARTITION[:OFFSET[:SIZE]]")
    numbers = [parse_number(p, "fetch") for p in parts[1:]]
    offset = numbers[0] if numbers else None
    size = numbers[1] if len(numbers) > 1 else None
    return parts[0], offset, size


def parse_number(text: str, what: str) -> int:
    """A number as fastboot's ``ParseUint`` reads it: ``0x`` hex or decimal, whitespace trimmed."""
    value = text.strip()
    try:
        if value[:2].lower() == "0x":
            if not value[2:] or not set(value[2:]) <= _HEX:
                raise ValueError(value)
            number = int(value[2:], 16)
        else:
            if not value.isdigit() or not value.isascii():
                raise ValueError(value)
            number = int(value, 10)
    except ValueError as e:
        raise FastbootProtocolError(f"{what}: {text!r} is not a number") from e
    if number >= 1 << 64:
        raise FastbootProtocolError(f"{what}: {text!r} does not fit in 64 bits")
    return number


def parse_yes_no(text: str | None) -> bool | None:
    """``yes``/``no`` answers (``true``/``false``, ``1``/``0`` too); None when unclear."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("yes", "true", "1"):
        return True
    if value in ("no", "false", "0"):
        return False
    return None


# --------------------------------------------------------------------------------------------
# getvar all


def parse_var_line(line: str) -> tuple[str, str] | None:
    """One INFO line of ``getvar all``: ``name: value`` or ``name:value``.

    Names have no spaces but may hold colons (``partition-size:boot_a: 0x4000000``), so the
    first ``": "`` ends the name; without one (fastbootd's ``name:value``) the last ``:`` does.
    Lines that are not variables (banners, blank lines) give None.
    """
    text = line.strip().rstrip("\0")
    if ": " in text:
        name, _, value = text.partition(": ")
    elif ":" in text:
        name, _, value = text.rpartition(":")
    else:
        return None
    name = name.strip()
    if not name or " " in name or "\t" in name:
        return None
    return name, value.strip()


def parse_getvar_all(lines: Sequence[str]) -> dict[str, str]:
    """The variables of ``getvar all``'s INFO lines (later lines win, as printed last)."""
    out: dict[str, str] = {}
    for line in lines:
        pair = parse_var_line(line)
        if pair is not None:
            out[pair[0]] = pair[1]
    return out


def format_getvar_all(variables: Mapping[str, str]) -> list[str]:
    """INFO texts for ``getvar all`` (the simulator's side), in the ``name: value`` style."""
    return [f"{name}: {value}" for name, value in variables.items()]


# --------------------------------------------------------------------------------------------
# TCP


def parse_handshake(data: bytes) -> int:
    """The version of a ``FBnn`` handshake."""
    if len(data) != TCP_HANDSHAKE_BYTES or data[:2] != b"FB" or not data[2:].isdigit():
        raise FastbootProtocolError(
            f"handshake {data!r} is not FBnn",
            hint="the peer does not speak fastboot over TCP (wrong port?)",
        )
    version = int(data[2:])
    if version < TCP_VERSION:
        raise FastbootProtocolError(f"TCP fastboot version {version} is not supported")
    return version


def frame_header(length: int) -> bytes:
    if length < 0 or length >= 1 << 64:
        raise FastbootProtocolError(f"frame length {length} is out of range")
    return TCP_LENGTH.pack(length)


def encode_frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


def parse_frame_header(data: bytes) -> int:
    if len(data) != TCP_LENGTH_BYTES:
        raise FastbootProtocolError(f"frame header of {len(data)} bytes, expected 8")
    length: int = TCP_LENGTH.unpack(data)[0]
    return length


class FrameDecoder:
    """Incremental decoder of TCP messages no longer than ``max_frame`` bytes."""

    def __init__(self, max_frame: int = MAX_READ_RESPONSE_BYTES) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; the messages they complete, in order."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= TCP_LENGTH_BYTES:
            length = parse_frame_header(bytes(self._buf[:TCP_LENGTH_BYTES]))
            if length > self.max_frame:
                raise FastbootProtocolError(
                    f"message of {length} bytes is longer than {self.max_frame}"
                )
            end = TCP_LENGTH_BYTES + length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[TCP_LENGTH_BYTES:end]))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


# --------------------------------------------------------------------------------------------
# UDP


class PacketId(enum.IntEnum):
    ERROR = 0x00
    QUERY = 0x01
    INIT = 0x02
    FASTBOOT = 0x03


@dataclass(frozen=True)
class UdpPacket:
    """One UDP datagram. ``ident`` is kept as a number: unknown ids must be answered."""

    ident: int
    flags: int
    seq: int
    data: bytes = b""

    @property
    def continuation(self) -> bool:
        return bool(self.flags & FLAG_CONTINUATION)

    def encode(self) -> bytes:
        if not (0 <= self.ident < 256 and 0 <= self.flags < 256 and 0 <= self.seq < SEQ_MODULUS):
            raise FastbootProtocolError(f"UDP header {self.ident}/{self.flags}/{self.seq} invalid")
        if UDP_HEADER_BYTES + len(self.data) > UDP_MAX_PACKET_BYTES:
            raise FastbootProtocolError(f"UDP packet of {len(self.data)} data bytes is too large")
        return UDP_HEADER.pack(self.ident, self.flags, self.seq) + self.data

    def answers(self, request: UdpPacket) -> bool:
        """True when this packet is the device's answer to ``request``."""
        if self.seq != request.seq:
            return False
        return self.ident in (request.ident, PacketId.ERROR)


def decode_packet(datagram: bytes) -> UdpPacket:
    if len(datagram) < UDP_HEADER_BYTES:
        raise FastbootProtocolError(f"UDP packet of {len(datagram)} bytes has no full header")
    if len(datagram) > UDP_MAX_PACKET_BYTES:
        raise FastbootProtocolError(f"UDP packet of {len(datagram)} bytes is too large")
    ident, flags, seq = UDP_HEADER.unpack_from(datagram)
    return UdpPacket(ident, flags, seq, bytes(datagram[UDP_HEADER_BYTES:]))


def encode_init(version: int, max_packet: int) -> bytes:
    if not (0 <= version < SEQ_MODULUS and 0 <= max_packet < SEQ_MODULUS):
        raise FastbootProtocolError(f"init values {version}/{max_packet} out of range")
    return struct.pack(">HH", version, max_packet)


def parse_init(data: bytes) -> tuple[int, int]:
    """(version, largest packet) of an Init packet's data."""
    if len(data) < 4:
        raise FastbootProtocolError(f"init data of {len(data)} bytes, expected 4")
    version, max_packet = struct.unpack_from(">HH", data)
    if version < 1:
        raise FastbootProtocolError(f"UDP fastboot version {version} is not supported")
    if max_packet < UDP_MIN_PACKET_BYTES:
        raise FastbootProtocolError(f"packet size {max_packet} is below the minimum of 512")
    return version, max_packet


def encode_seq(seq: int) -> bytes:
    return struct.pack(">H", seq % SEQ_MODULUS)


def parse_query(data: bytes) -> int:
    """The device's next expected sequence number, from a Query answer."""
    if len(data) < 2:
        raise FastbootProtocolError(f"query answer of {len(data)} bytes, expected 2")
    seq: int = struct.unpack_from(">H", data)[0]
    return seq


def split_payload(data: bytes | memoryview, max_data: int) -> Iterator[tuple[int, memoryview]]:
    """(flags, piece) for each packet of a message: continuation on all but the last."""
    if max_data < 1:
        raise FastbootProtocolError(f"packet data size {max_data} is too small")
    view = memoryview(data)
    if not view:
        yield 0, view
        return
    for at in range(0, len(view), max_data):
        piece = view[at : at + max_data]
        last = at + max_data >= len(view)
        yield (0 if last else FLAG_CONTINUATION), piece
