"""NMRP (NETGEAR Router Management Protocol) messages and their Ethernet frames: a pure codec.

NMRP runs directly on Ethernet with ethertype 0x0912. Every frame carries one message::

    u16 reserved | u8 code | u8 id | u16 length | options...

all big-endian; ``length`` counts the 6-byte header plus the options. Each option is::

    u16 type | u16 length | value

where the option's ``length`` includes its own 4-byte header. Frames shorter than Ethernet's
60-byte minimum are padded with zeros after the message; the message length tells the
receiver where the padding begins.

The conversation (server = the host with the firmware, client = the router's bootloader)::

    server -> broadcast   ADVERTISE      MAGIC_NO "NTGR"
    client -> server      CONF_REQ
    server -> client      CONF_ACK       DEV_IP (address, netmask), FW_UP [, DEV_REGION]
    client -> server      TFTP_UL_REQ    [FILE_NAME]
    server -> client      (TFTP write request and data to the client's TFTP server, port 69)
    client -> server      KEEP_ALIVE_REQ (repeated while the client writes its flash)
    server -> client      KEEP_ALIVE_ACK
    client -> server      CLOSE_REQ
    server -> client      CLOSE_ACK

Everything here is pure: bytes in, typed values out, :class:`NmrpProtocolError` for anything
malformed.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from unbrick.errors import TransportError

ETHERTYPE_NMRP = 0x0912
ETH_HEADER_BYTES = 14
#: Ethernet's minimum frame length without the frame check sequence.
MIN_FRAME_BYTES = 60
#: Largest frame this codec builds or accepts (a standard 1500-byte payload).
MAX_FRAME_BYTES = ETH_HEADER_BYTES + 1500
HEADER_BYTES = 6
OPTION_HEADER_BYTES = 4
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES - ETH_HEADER_BYTES
#: The magic a NETGEAR bootloader expects in ADVERTISE.
DEFAULT_MAGIC = b"NTGR"
BROADCAST_MAC = b"\xff" * 6
MAC_BYTES = 6
#: Longest FILE_NAME value accepted (TFTP file names of routers are short).
MAX_FILE_NAME_BYTES = 255

_HEADER = struct.Struct(">HBBH")
_OPTION = struct.Struct(">HH")
_ETH = struct.Struct(">6s6sH")


class Code(enum.IntEnum):
    """Message codes."""

    ADVERTISE = 1
    CONF_REQ = 2
    CONF_ACK = 3
    CLOSE_REQ = 4
    CLOSE_ACK = 5
    KEEP_ALIVE_REQ = 6
    KEEP_ALIVE_ACK = 7
    TFTP_UL_REQ = 16


class OptionType(enum.IntEnum):
    """Option types."""

    MAGIC_NO = 0x0001
    DEV_IP = 0x0002
    DEV_REGION = 0x0004
    FW_UP = 0x0101
    ST_UP = 0x0102
    FILE_NAME = 0x0181


#: Region codes a CONF_ACK may set (DEV_REGION value, u16 big-endian).
REGIONS: dict[str, int] = {
    "NA": 0x0001,
    "WW": 0x0002,
    "GR": 0x0003,
    "PR": 0x0004,
    "RU": 0x0005,
    "BZ": 0x0006,
    "IN": 0x0007,
    "KO": 0x0008,
    "JP": 0x0009,
    "AU": 0x000A,
}


class NmrpProtocolError(TransportError):
    """A frame or message could not be decoded, or a value cannot be encoded."""

    default_hint = "the peer does not speak NMRP or the frame was damaged"


def code_name(code: int) -> str:
    """``CONF_REQ`` for a known code, ``0x2a`` for an unknown one."""
    try:
        return Code(code).name
    except ValueError:
        return f"0x{code:02x}"


def region_code(name: str) -> int:
    """The DEV_REGION code of a region name (``NA``, ``WW``... case-insensitive)."""
    try:
        return REGIONS[name.upper()]
    except KeyError:
        raise NmrpProtocolError(
            f"unknown NMRP region {name!r}", hint=f"use one of {', '.join(REGIONS)}"
        ) from None


def region_name(code: int) -> str | None:
    return next((name for name, value in REGIONS.items() if value == code), None)


# -- addresses -----------------------------------------------------------------------------


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or with dashes) into 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != MAC_BYTES or any(len(p) != 2 for p in parts):
        raise NmrpProtocolError(
            f"{text!r} is not a MAC address", hint="write it as xx:xx:xx:xx:xx:xx"
        )
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise NmrpProtocolError(
            f"{text!r} is not a MAC address", hint="write it as xx:xx:xx:xx:xx:xx"
        ) from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_ipv4(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise NmrpProtocolError(f"{text!r} is not an IPv4 address") from None


def netmask_prefix(netmask: str) -> int:
    """Prefix length of a dotted netmask; contiguous masks only (``255.255.255.0`` -> 24)."""
    mask = int(parse_ipv4(netmask))
    prefix = bin(mask).count("1")
    if mask != ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF):
        raise NmrpProtocolError(f"{netmask} is not a contiguous netmask")
    return prefix


# -- options and messages ------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option: its type and value (the length is derived)."""

    type: int
    value: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFFFF:
            raise NmrpProtocolError(f"option type {self.type} is out of range")
        if len(self.value) > MAX_MESSAGE_BYTES - HEADER_BYTES - OPTION_HEADER_BYTES:
            raise NmrpProtocolError(f"option value of {len(self.value)} bytes is too long")

    def encode(self) -> bytes:
        return _OPTION.pack(self.type, OPTION_HEADER_BYTES + len(self.value)) + self.value


@dataclass(frozen=True)
class Message:
    """One NMRP message. ``code`` is kept as a plain int so unknown codes survive a decode."""

    code: int
    options: tuple[Option, ...] = ()
    id: int = 0
    reserved: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF:
            raise NmrpProtocolError(f"message code {self.code} is out of range")
        if not 0 <= self.id <= 0xFF:
            raise NmrpProtocolError(f"message id {self.id} is out of range")
        if not 0 <= self.reserved <= 0xFFFF:
            raise NmrpProtocolError(f"reserved field {self.reserved} is out of range")
        if self.size_bytes > MAX_MESSAGE_BYTES:
            raise NmrpProtocolError(
                f"message of {self.size_bytes} bytes exceeds {MAX_MESSAGE_BYTES} bytes"
            )

    @property
    def size_bytes(self) -> int:
        return HEADER_BYTES + sum(OPTION_HEADER_BYTES + len(o.value) for o in self.options)

    @property
    def name(self) -> str:
        return code_name(self.code)

    def encode(self) -> bytes:
        head = _HEADER.pack(self.reserved, self.code, self.id, self.size_bytes)
        return head + b"".join(o.encode() for o in self.options)

    def find(self, type: int) -> Option | None:
        """The first option of ``type``, or None."""
        return next((o for o in self.options if o.type == type), None)

    def has(self, type: int) -> bool:
        return self.find(type) is not None

    @property
    def magic(self) -> bytes | None:
        opt = self.find(OptionType.MAGIC_NO)
        return opt.value if opt else None

    @property
    def file_name(self) -> str | None:
        """FILE_NAME as text (NUL padding stripped, undecodable bytes replaced)."""
        opt = self.find(OptionType.FILE_NAME)
        if opt is None:
            return None
        return opt.value.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def dev_ip(self) -> tuple[str, str] | None:
        """(address, netmask) of DEV_IP; NmrpProtocolError when its value is not 8 bytes."""
        opt = self.find(OptionType.DEV_IP)
        if opt is None:
            return None
        if len(opt.value) != 8:
            raise NmrpProtocolError(f"DEV_IP option of {len(opt.value)} bytes, expected 8")
        return (
            str(ipaddress.IPv4Address(opt.value[:4])),
            str(ipaddress.IPv4Address(opt.value[4:])),
        )

    @property
    def region(self) -> int | None:
        opt = self.find(OptionType.DEV_REGION)
        if opt is None:
            return None
        if len(opt.value) != 2:
            raise NmrpProtocolError(f"DEV_REGION option of {len(opt.value)} bytes, expected 2")
        return int.from_bytes(opt.value, "big")


def decode_message(data: bytes) -> Message:
    """Decode one message from an Ethernet payload (trailing padding is ignored)."""
    if len(data) < HEADER_BYTES:
        raise NmrpProtocolError(f"NMRP message of {len(data)} bytes is shorter than its header")
    reserved, code, msg_id, length = _HEADER.unpack_from(data)
    if length < HEADER_BYTES or length > len(data):
        raise NmrpProtocolError(
            f"NMRP message length {length} does not fit the {len(data)} bytes received"
        )
    options: list[Option] = []
    pos = HEADER_BYTES
    while pos < length:
        if length - pos < OPTION_HEADER_BYTES:
            raise NmrpProtocolError(f"truncated option header at byte {pos} of the message")
        opt_type, opt_len = _OPTION.unpack_from(data, pos)
        if opt_len < OPTION_HEADER_BYTES or pos + opt_len > length:
            raise NmrpProtocolError(
                f"option 0x{opt_type:04x} at byte {pos} has a bad length {opt_len}"
            )
        options.append(Option(opt_type, bytes(data[pos + OPTION_HEADER_BYTES : pos + opt_len])))
        pos += opt_len
    return Message(code=code, options=tuple(options), id=msg_id, reserved=reserved)


# -- the messages of the conversation --------------------------------------------------------


def advertise(magic: bytes = DEFAULT_MAGIC) -> Message:
    return Message(Code.ADVERTISE, (Option(OptionType.MAGIC_NO, magic),))


def conf_req() -> Message:
    return Message(Code.CONF_REQ)


def conf_ack(
    ip: str,
    netmask: str,
    *,
    region: int | None = None,
    firmware: bool = True,
    string_table: bool = False,
) -> Message:
    """The configuration for the client: its address and netmask, what will be uploaded."""
    netmask_prefix(netmask)
    value = parse_ipv4(ip).packed + parse_ipv4(netmask).packed
    options = [Option(OptionType.DEV_IP, value)]
    if firmware:
        options.append(Option(OptionType.FW_UP))
    if string_table:
        options.append(Option(OptionType.ST_UP))
    if region is not None:
        if not 0 <= region <= 0xFFFF:
            raise NmrpProtocolError(f"region code {region} is out of range")
        options.append(Option(OptionType.DEV_REGION, region.to_bytes(2, "big")))
    return Message(Code.CONF_ACK, tuple(options))


def tftp_ul_req(file_name: str | None = None) -> Message:
    if file_name is None:
        return Message(Code.TFTP_UL_REQ)
    raw = file_name.encode("ascii", "replace")
    if not raw or len(raw) > MAX_FILE_NAME_BYTES:
        raise NmrpProtocolError(f"file name of {len(raw)} bytes is not allowed (1 to 255)")
    return Message(Code.TFTP_UL_REQ, (Option(OptionType.FILE_NAME, raw),))


def simple(code: Code) -> Message:
    """A message without options (KEEP_ALIVE_REQ/ACK, CLOSE_REQ/ACK, CONF_REQ)."""
    return Message(code)


# -- Ethernet framing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """An NMRP message with its Ethernet addresses."""

    dst: bytes
    src: bytes
    message: Message

    def __post_init__(self) -> None:
        if len(self.dst) != MAC_BYTES or len(self.src) != MAC_BYTES:
            raise NmrpProtocolError("an Ethernet address must be 6 bytes")

    def encode(self, *, min_bytes: int = MIN_FRAME_BYTES) -> bytes:
        raw = _ETH.pack(self.dst, self.src, ETHERTYPE_NMRP) + self.message.encode()
        return raw.ljust(min_bytes, b"\0")


def decode_frame(data: bytes) -> Frame:
    """Decode an Ethernet frame carrying NMRP; NmrpProtocolError for anything else."""
    if len(data) < ETH_HEADER_BYTES:
        raise NmrpProtocolError(f"frame of {len(data)} bytes is shorter than an Ethernet header")
    if len(data) > MAX_FRAME_BYTES:
        raise NmrpProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    dst, src, ethertype = _ETH.unpack_from(data)
    if ethertype != ETHERTYPE_NMRP:
        raise NmrpProtocolError(f"ethertype 0x{ethertype:04x} is not NMRP (0x0912)")
    return Frame(dst=dst, src=src, message=decode_message(data[ETH_HEADER_BYTES:]))
