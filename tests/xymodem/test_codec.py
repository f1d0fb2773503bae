"""The XMODEM/YMODEM frame codec: blocks, checks, block 0, U-Boot's padding rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbrick.errors import UsageError
from unbrick.transports.xymodem import (
    FileInfo,
    block_layout,
    checksum8,
    crc16_xmodem,
    encode_block,
    encode_header,
    parse_header,
    uboot_loadx_image,
)

pytestmark = pytest.mark.unit


def test_crc16_xmodem_check_value() -> None:
    # The catalogue check value of CRC-16/XMODEM.
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert crc16_xmodem(b"") == 0


def test_crc_block_layout() -> None:
    payload = bytes(range(128))
    frame = encode_block(1, payload, crc=True)
    assert frame[:3] == b"\x01\x01\xfe"
    assert frame[3:131] == payload
    assert int.from_bytes(frame[131:], "big") == crc16_xmodem(payload)
    assert len(frame) == 133


def test_1k_block_numbers_wrap() -> None:
    frame = encode_block(256, bytes(1024), crc=True)
    assert frame[:3] == b"\x02\x00\xff"
    assert len(frame) == 1029
    assert encode_block(257, bytes(1024), crc=True)[1:3] == b"\x01\xfe"


def test_checksum_block() -> None:
    payload = b"\xff" * 128
    frame = encode_block(3, payload, crc=False)
    assert len(frame) == 132
    assert frame[-1] == checksum8(payload) == (255 * 128) & 0xFF


def test_block_size_must_be_128_or_1024() -> None:
    with pytest.raises(UsageError, match="128 or 1024"):
        encode_block(1, bytes(100), crc=True)


@pytest.mark.parametrize(
    ("total", "layout"),
    [
        (0, []),
        (1, [(0, 1, 128)]),
        (128, [(0, 128, 128)]),
        (129, [(0, 129, 1024)]),
        (1024, [(0, 1024, 1024)]),
        (1025, [(0, 1024, 1024), (1024, 1, 128)]),
        (2048 + 200, [(0, 1024, 1024), (1024, 1024, 1024), (2048, 200, 1024)]),
    ],
)
def test_block_layout(total: int, layout: list[tuple[int, int, int]]) -> None:
    assert list(block_layout(total, 1024)) == layout


def test_header_like_lrzsz() -> None:
    payload = encode_header(FileInfo("fw.bin", 1234, 0o14000000000, 0o100644))
    assert len(payload) == 128
    assert payload.startswith(b"fw.bin\x00" + b"1234 14000000000 100644\x00")
    assert parse_header(payload) == FileInfo("fw.bin", 1234, 0o14000000000, 0o100644)


def test_header_from_sz_with_trailing_fields_and_block_counts() -> None:
    # sz adds "0 files-left bytes-left" and puts block counts in bytes 126..127.
    raw = bytearray(b"img.bin\x0070000 14731163024 100644 0 1 70000\x00".ljust(128, b"\x00"))
    raw[126], raw[127] = 1, 0x23
    assert parse_header(bytes(raw)) == FileInfo("img.bin", 70000, 0o14731163024, 0o100644)


def test_empty_header_ends_the_batch() -> None:
    assert encode_header(None) == bytes(128)
    assert parse_header(bytes(128)) is None


def test_long_name_takes_a_1k_header() -> None:
    name = "n" * 300
    payload = encode_header(FileInfo(name, 5))
    assert len(payload) == 1024
    info = parse_header(payload)
    assert info is not None and info.name == name and info.size_bytes == 5


def test_unparsable_numbers_are_not_given() -> None:
    info = parse_header(b"a\x00huge 9z 8\x00".ljust(128, b"\x00"))
    assert info == FileInfo("a", None, None, None)


@pytest.mark.parametrize("name", ["", "a\x00b", "x" * 1100])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(UsageError):
        encode_header(FileInfo(name, 1))


@given(
    name=st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=200,
    ),
    size=st.integers(0, 2**40),
    mtime=st.integers(0, 2**33),
    mode=st.integers(0, 0o177777),
)
def test_header_round_trip(name: str, size: int, mtime: int, mode: int) -> None:
    info = FileInfo(name, size, mtime, mode)
    assert parse_header(encode_header(info)) == info


@given(st.binary(max_size=300))
def test_parse_header_never_raises(raw: bytes) -> None:
    info = parse_header(raw)
    assert info is None or info.name


def test_uboot_loadx_keeps_ordinary_data() -> None:
    data = bytes(range(256)) * 10  # 2560 bytes: tail of 512 bytes padded with 0x1A
    assert uboot_loadx_image(data) == data


def test_uboot_loadx_drops_a_middle_block_ending_in_sub() -> None:
    data = b"a" * 1021 + b"\x1a\x1a\x1a" + b"b" * 100
    stored = uboot_loadx_image(data)
    assert stored != data
    assert stored == b"a" * 1021 + b"b" * 100


def test_uboot_loadx_drops_trailing_sub_of_the_data() -> None:
    data = b"x" * 300 + b"\x1a"
    assert uboot_loadx_image(data) == b"x" * 300
