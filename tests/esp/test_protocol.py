"""The pure codec of Espressif's serial protocol: SLIP, packets, checksum."""

from __future__ import annotations

import struct
from functools import reduce

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbrick.errors import TransportError
from unbrick.transports.esp.protocol import (
    SYNC_PAYLOAD,
    Command,
    DataBlock,
    EspProtocolError,
    Op,
    Response,
    SlipDecoder,
    checksum,
    op_name,
    slip_decode,
    slip_encode,
    status_bytes,
    words,
)

pytestmark = pytest.mark.unit


def naive_checksum(data: bytes) -> int:
    return reduce(lambda a, b: a ^ b, data, 0xEF)


@given(st.binary(max_size=5000))
def test_checksum_is_the_seeded_xor_of_all_bytes(data: bytes) -> None:
    assert checksum(data) == naive_checksum(data)


def test_checksum_examples() -> None:
    assert checksum(b"") == 0xEF
    assert checksum(b"\xef") == 0
    assert checksum(bytes(range(256)) * 64) == 0xEF  # every byte value an even number of times


def test_sync_command_is_the_documented_frame() -> None:
    frame = slip_encode(Command(Op.SYNC, SYNC_PAYLOAD).encode())
    assert frame == (
        bytes.fromhex("c0 00 08 24 00 00 00 00 00 07 07 12 20") + b"\x55" * 32 + b"\xc0"
    )


def test_read_reg_response_from_the_documented_trace() -> None:
    # "Received full packet: 010a0200620100000000" (an ESP8266: two status bytes).
    r = Response.parse(bytes.fromhex("010a0200620100000000"))
    assert (r.op, r.value, r.data) == (Op.READ_REG, 0x162, b"\x00\x00")
    assert r.status(2) == (0, 0)
    assert r.payload(2) == b""


@given(st.binary(max_size=3000))
def test_slip_round_trip(payload: bytes) -> None:
    frame = slip_encode(payload)
    assert frame.count(b"\xc0") == 2
    assert slip_decode(frame) == payload


def test_slip_escapes() -> None:
    assert slip_encode(b"\xc0\xdb") == b"\xc0\xdb\xdc\xdb\xdd\xc0"
    with pytest.raises(EspProtocolError, match="escape"):
        slip_decode(b"\xc0\xdb\x01\xc0")
    with pytest.raises(EspProtocolError, match="inside an escape"):
        slip_decode(b"\xc0ab\xdb\xc0")
    with pytest.raises(EspProtocolError):
        slip_decode(b"abc")


@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    st.binary(max_size=40).filter(lambda b: b"\xc0" not in b),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
)
def test_decoder_finds_frames_across_any_split(
    payloads: list[bytes], noise: bytes, cuts: list[int]
) -> None:
    stream = noise + b"".join(slip_encode(p) for p in payloads)
    decoder = SlipDecoder()
    got: list[bytes] = []
    start = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        got += decoder.feed(stream[start:cut])
        start = max(start, cut)
    got += decoder.feed(stream[start:])
    assert got == payloads
    assert decoder.noise_bytes == len(noise)
    assert decoder.bad_frames == 0


def test_decoder_drops_bad_and_oversized_frames_and_goes_on() -> None:
    decoder = SlipDecoder(max_frame_bytes=10)
    stream = b"\xc0\xdb\x01\xc0" + slip_encode(b"x" * 11) + slip_encode(b"ok")
    assert decoder.feed(stream) == [b"ok"]
    assert decoder.bad_frames == 2


@given(st.binary(max_size=2000))
def test_decoder_fuzz_never_raises(data: bytes) -> None:
    frames = SlipDecoder().feed(data)
    assert all(isinstance(f, bytes) and f for f in frames)


@given(st.binary(max_size=600))
def test_parsers_fuzz_give_typed_errors_only(data: bytes) -> None:
    for parse in (slip_decode, Command.parse, Response.parse, DataBlock.parse):
        try:
            parse(data)
        except EspProtocolError as e:
            assert isinstance(e, TransportError)
            assert e.message


@given(st.integers(0, 255), st.binary(max_size=2000), st.integers(0, 0xFFFFFFFF))
def test_command_round_trip(op: int, data: bytes, chk: int) -> None:
    assert Command.parse(Command(op, data, chk).encode()) == Command(op, data, chk)


@given(st.integers(0, 255), st.binary(max_size=2000), st.integers(0, 0xFFFFFFFF))
def test_response_round_trip(op: int, data: bytes, value: int) -> None:
    assert Response.parse(Response(op, value, data).encode()) == Response(op, value, data)


def test_packet_errors() -> None:
    with pytest.raises(EspProtocolError, match="direction"):
        Command.parse(Response(Op.SYNC).encode())
    with pytest.raises(EspProtocolError, match="direction"):
        Response.parse(Command(Op.SYNC).encode())
    with pytest.raises(EspProtocolError, match="size field"):
        Command.parse(struct.pack("<BBHI", 0, 8, 5, 0) + b"abc")
    with pytest.raises(EspProtocolError, match="shorter"):
        Command.parse(b"\x00\x08")
    with pytest.raises(EspProtocolError, match="too many"):
        Command(Op.MEM_DATA, bytes(0x10000)).encode()
    with pytest.raises(EspProtocolError, match="no status"):
        Response(Op.SYNC, 0, b"\x00").status(4)


def test_data_block() -> None:
    block = DataBlock(3, b"abcd")
    assert DataBlock.parse(block.encode()) == block
    with pytest.raises(EspProtocolError, match="header says 5"):
        DataBlock.parse(struct.pack("<IIII", 5, 0, 0, 0) + b"abcd")


def test_status_bytes_and_words() -> None:
    assert status_bytes(0, 4) == b"\x00\x00\x00\x00"
    assert status_bytes(0xC1, 2) == b"\x01\xc1"
    assert words(struct.pack("<III", 1, 2, 3), 2) == (1, 2)
    with pytest.raises(EspProtocolError, match="3 32-bit words"):
        words(b"12345678", 3)
    assert op_name(0x02) == "FLASH_BEGIN"
    assert op_name(0x42) == "0x42"
