"""Espressif's serial bootloader protocol (ESP32 ROM loader and flasher stub), as a pure codec.

No I/O: the functions here turn bytes into typed packets and back, so they can be fuzzed and
shared by anything that speaks the protocol (the simulated ROM loader in
:mod:`unbrick.sim.esp_rom` uses them; the ``esp://`` driver itself talks through esptool).

The wire format (Espressif, esptool documentation, "Serial Protocol"):

* every packet travels in a SLIP frame: ``0xC0 payload 0xC0``, with ``0xC0`` inside the payload
  sent as ``0xDB 0xDC`` and ``0xDB`` as ``0xDB 0xDD``;
* a command is ``direction=0x00, op, size (u16), checksum (u32), data``; a response is
  ``direction=0x01, op, size (u16), value (u32), data``; all little-endian;
* the data of a response ends in status bytes: ``status, error`` (0/0 on success), followed by
  two reserved bytes on the ESP32 ROM loader (4 status bytes) but not on the stub (2 bytes);
* the checksum of a command covers only the payload of the ``*_DATA`` commands (after their
  16-byte header ``length, sequence, 0, 0``): the XOR of its bytes, seeded with ``0xEF``;
* SYNC carries ``07 07 12 20`` and 32 times ``0x55``; the ROM answers it several times with a
  non-zero value, the stub with zero;
* the flasher stub announces itself with an unsolicited frame ``OHAI`` once it runs.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from unbrick.errors import TransportError

SLIP_END = 0xC0
SLIP_ESC = 0xDB
SLIP_ESC_END = 0xDC
SLIP_ESC_ESC = 0xDD

DIRECTION_COMMAND = 0x00
DIRECTION_RESPONSE = 0x01

HEADER = struct.Struct("<BBHI")
DATA_HEADER = struct.Struct("<IIII")

CHECKSUM_SEED = 0xEF
SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
STUB_GREETING = b"OHAI"

#: Status bytes after the data of a response: ESP32 ROM loader and flasher stub.
ROM_STATUS_BYTES = 4
STUB_STATUS_BYTES = 2

#: The largest data field a packet can carry (its size field is 16 bits).
MAX_DATA_BYTES = 0xFFFF


class Op(enum.IntEnum):
    """Command opcodes (ROM loader and stub; 0xD0 and up are stub-only)."""

    FLASH_BEGIN = 0x02
    FLASH_DATA = 0x03
    FLASH_END = 0x04
    MEM_BEGIN = 0x05
    MEM_END = 0x06
    MEM_DATA = 0x07
    SYNC = 0x08
    WRITE_REG = 0x09
    READ_REG = 0x0A
    SPI_SET_PARAMS = 0x0B
    SPI_ATTACH = 0x0D
    READ_FLASH_SLOW = 0x0E
    CHANGE_BAUDRATE = 0x0F
    FLASH_DEFL_BEGIN = 0x10
    FLASH_DEFL_DATA = 0x11
    FLASH_DEFL_END = 0x12
    SPI_FLASH_MD5 = 0x13
    GET_SECURITY_INFO = 0x14
    ERASE_FLASH = 0xD0
    ERASE_REGION = 0xD1
    READ_FLASH = 0xD2
    RUN_USER_CODE = 0xD3


class RomError(enum.IntEnum):
    """Error codes of the ROM loader (second status byte when the first is 1)."""

    INVALID_MESSAGE = 0x05
    FAILED_TO_ACT = 0x06
    BAD_CRC = 0x07
    FLASH_WRITE = 0x08
    FLASH_READ = 0x09
    READ_LENGTH = 0x0A
    DEFLATE = 0x0B


class StubError(enum.IntEnum):
    """Error codes of the flasher stub."""

    BAD_DATA_LEN = 0xC0
    BAD_DATA_CHECKSUM = 0xC1
    BAD_BLOCKSIZE = 0xC2
    INVALID_COMMAND = 0xC3
    FAILED_SPI_OP = 0xC4
    FAILED_SPI_UNLOCK = 0xC5
    NOT_IN_FLASH_MODE = 0xC6
    INFLATE_ERROR = 0xC7
    NOT_ENOUGH_DATA = 0xC8
    TOO_MUCH_DATA = 0xC9
    CMD_NOT_IMPLEMENTED = 0xFF


class EspProtocolError(TransportError):
    """A frame or packet that does not follow the serial protocol."""

    default_hint = "the serial line is noisy or the peer is not an ESP bootloader"


def op_name(op: int) -> str:
    """``FLASH_BEGIN`` for 0x02; ``0x42`` for an opcode the protocol does not define."""
    try:
        return Op(op).name
    except ValueError:
        return f"0x{op:02x}"


# -- checksum ------------------------------------------------------------------------------------


def checksum(data: bytes, seed: int = CHECKSUM_SEED) -> int:
    """XOR of all bytes of ``data`` and ``seed`` (the checksum of the ``*_DATA`` commands)."""
    width = len(data)
    if width == 0:
        return seed & 0xFF
    # Fold the bytes as one big integer: log2(n) wide XORs instead of n byte operations.
    x = int.from_bytes(data, "little")
    while width > 1:
        half = (width + 1) // 2
        x = (x ^ (x >> (half * 8))) & ((1 << (half * 8)) - 1)
        width = half
    return (x ^ seed) & 0xFF


# -- SLIP ----------------------------------------------------------------------------------------


def slip_encode(payload: bytes) -> bytes:
    """One SLIP frame carrying ``payload``."""
    body = payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    return b"\xc0" + body + b"\xc0"


def slip_decode(frame: bytes) -> bytes:
    """The payload of exactly one SLIP frame (``0xC0 ... 0xC0``); EspProtocolError otherwise."""
    if len(frame) < 2 or frame[0] != SLIP_END or frame[-1] != SLIP_END:
        raise EspProtocolError("a SLIP frame starts and ends with 0xC0")
    body = frame[1:-1]
    if SLIP_END in body:
        raise EspProtocolError("0xC0 inside a SLIP frame")
    return _unescape(body)


def _unescape(body: bytes) -> bytes:
    if SLIP_ESC not in body:
        return body
    out = bytearray()
    i = 0
    n = len(body)
    while i < n:
        j = body.find(SLIP_ESC, i)
        if j < 0:
            out += body[i:]
            break
        out += body[i:j]
        if j + 1 >= n:
            raise EspProtocolError("SLIP frame ends inside an escape")
        code = body[j + 1]
        if code == SLIP_ESC_END:
            out.append(SLIP_END)
        elif code == SLIP_ESC_ESC:
            out.append(SLIP_ESC)
        else:
            raise EspProtocolError(f"invalid SLIP escape 0xdb 0x{code:02x}")
        i = j + 2
    return bytes(out)


class SlipDecoder:
    """Incremental SLIP receiver: feed bytes as they arrive, get the complete payloads.

    Bytes outside frames (a boot log, line noise) are skipped and counted in ``noise_bytes``;
    a frame with a bad escape or longer than ``max_frame_bytes`` is dropped and counted in
    ``bad_frames``. It never raises: a receiver keeps going, as the ROM loader does. Empty
    frames (two 0xC0 in a row, which also resynchronise) yield nothing.
    """

    def __init__(self, max_frame_bytes: int = 2 * (HEADER.size + MAX_DATA_BYTES)) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.noise_bytes = 0
        self.bad_frames = 0
        self._buf = bytearray()
        self._in_frame = False
        self._overflow = False

    def reset(self) -> None:
        self._buf.clear()
        self._in_frame = False
        self._overflow = False

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            if not self._in_frame:
                start = data.find(SLIP_END, pos)
                if start < 0:
                    self.noise_bytes += n - pos
                    return frames
                self.noise_bytes += start - pos
                self._in_frame = True
                self._buf.clear()
                self._overflow = False
                pos = start + 1
                continue
            end = data.find(SLIP_END, pos)
            chunk = data[pos:] if end < 0 else data[pos:end]
            if not self._overflow:
                if len(self._buf) + len(chunk) > self.max_frame_bytes:
                    self._overflow = True
                    self._buf.clear()
                else:
                    self._buf += chunk
            if end < 0:
                return frames
            pos = end + 1
            self._finish_frame(frames)
        return frames

    def _finish_frame(self, frames: list[bytes]) -> None:
        body = bytes(self._buf)
        self._buf.clear()
        if self._overflow:
            self._overflow = False
            self._in_frame = False
            self.bad_frames += 1
            return
        if not body:
            # "C0 C0": the end of nothing and the start of the next frame.
            return
        self._in_frame = False
        try:
            frames.append(_unescape(body))
        except EspProtocolError:
            self.bad_frames += 1


# -- packets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A request from the host."""

    op: int
    data: bytes = b""
    checksum: int = 0

    def encode(self) -> bytes:
        if len(self.data) > MAX_DATA_BYTES:
            raise EspProtocolError(f"{op_name(self.op)}: {len(self.data)} data bytes, too many")
        return HEADER.pack(DIRECTION_COMMAND, self.op, len(self.data), self.checksum) + self.data

    @classmethod
    def parse(cls, packet: bytes) -> Command:
        direction, op, _size, chk = _header(packet)
        if direction != DIRECTION_COMMAND:
            raise EspProtocolError(f"not a command packet (direction 0x{direction:02x})")
        return cls(op, packet[HEADER.size :], chk)

    @property
    def name(self) -> str:
        return op_name(self.op)


@dataclass(frozen=True)
class Response:
    """An answer from the device. ``data`` includes the trailing status bytes."""

    op: int
    value: int = 0
    data: bytes = b""

    def encode(self) -> bytes:
        if len(self.data) > MAX_DATA_BYTES:
            raise EspProtocolError(f"{op_name(self.op)}: {len(self.data)} data bytes, too many")
        return HEADER.pack(DIRECTION_RESPONSE, self.op, len(self.data), self.value) + self.data

    @classmethod
    def parse(cls, packet: bytes) -> Response:
        direction, op, _size, value = _header(packet)
        if direction != DIRECTION_RESPONSE:
            raise EspProtocolError(f"not a response packet (direction 0x{direction:02x})")
        return cls(op, value, packet[HEADER.size :])

    def status(self, status_bytes: int) -> tuple[int, int]:
        """``(status, error)`` from the status bytes at the end of ``data``."""
        if len(self.data) < status_bytes:
            raise EspProtocolError(
                f"{op_name(self.op)}: response of {len(self.data)} bytes has no status"
            )
        tail = self.data[len(self.data) - status_bytes :]
        return tail[0], tail[1]

    def payload(self, status_bytes: int) -> bytes:
        """``data`` without its status bytes."""
        return self.data[: max(0, len(self.data) - status_bytes)]


def _header(packet: bytes) -> tuple[int, int, int, int]:
    if len(packet) < HEADER.size:
        raise EspProtocolError(f"packet of {len(packet)} bytes is shorter than its header")
    direction, op, size, word = HEADER.unpack_from(packet)
    if size != len(packet) - HEADER.size:
        raise EspProtocolError(
            f"{op_name(op)}: size field says {size} bytes, the packet carries "
            f"{len(packet) - HEADER.size}"
        )
    return direction, op, size, word


def status_bytes(error: int, count: int) -> bytes:
    """The status bytes of a response: success when ``error`` is 0, else failure + code."""
    head = bytes([0, 0]) if error == 0 else bytes([1, error & 0xFF])
    return head + bytes(count - 2)


@dataclass(frozen=True)
class DataBlock:
    """The payload of FLASH_DATA, FLASH_DEFL_DATA and MEM_DATA."""

    sequence: int
    data: bytes

    def encode(self) -> bytes:
        return DATA_HEADER.pack(len(self.data), self.sequence, 0, 0) + self.data

    @classmethod
    def parse(cls, payload: bytes) -> DataBlock:
        if len(payload) < DATA_HEADER.size:
            raise EspProtocolError(
                f"data block of {len(payload)} bytes is shorter than its 16-byte header"
            )
        length, seq, _, _ = DATA_HEADER.unpack_from(payload)
        data = payload[DATA_HEADER.size :]
        if length != len(data):
            raise EspProtocolError(
                f"data block {seq}: header says {length} bytes, the block carries {len(data)}"
            )
        return cls(seq, data)


def words(data: bytes, count: int) -> tuple[int, ...]:
    """The first ``count`` little-endian 32-bit words of ``data``; EspProtocolError if short."""
    if len(data) < 4 * count:
        raise EspProtocolError(f"expected {count} 32-bit words, got {len(data)} bytes")
    return struct.unpack_from(f"<{count}I", data)
