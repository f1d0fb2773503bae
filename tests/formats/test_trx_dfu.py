"""Broadcom TRX and USB DFU files.

No Debian package ships a TRX or DFU tool, so the files are built here from the published
layouts (OpenWrt's TRX documentation and ``otrx``; USB DFU 1.1 appendix B; ST UM0391 for
DfuSe) with a CRC implemented independently of zlib and checked against the CRC-32 check value.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.errors import ImageError
from unbrick.formats import dfu, trx
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source
from unbrick.formats.detect import detect, inspect_source, sniff_source

SMALL = Limits(max_records=100_000, max_seconds=10.0)


def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _table()


def crc32_no_final_xor(data: bytes) -> int:
    """Reflected CRC-32, initial value 0xffffffff, no final inversion (TRX and DFU)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def test_reference_crc_matches_the_crc32_check_value() -> None:
    # The CRC-32 check value of "123456789" is 0xcbf43926; without the final inversion it is
    # its complement.
    assert crc32_no_final_xor(b"123456789") == 0xCBF43926 ^ 0xFFFFFFFF
    assert dfu.dfu_crc(b"123456789") == 0xCBF43926 ^ 0xFFFFFFFF
    assert zlib.crc32(b"123456789") == 0xCBF43926


def sniff_of(blob: bytes) -> Sniff:
    return Sniff(head=blob[:65536], tail=blob[-64:], size=len(blob))


# --- TRX ----------------------------------------------------------------------------------------


def build_trx(
    parts: list[bytes], *, version: int = 1, flags: int = 0, offsets: list[int] | None = None
) -> bytes:
    n = 3 if version == 1 else 4
    hsize = 16 + 4 * n
    body = b""
    starts = []
    for p in parts:
        starts.append(hsize + len(body))
        body += p + bytes(-len(p) % 4)
    if offsets is None:
        offsets = starts + [0] * (n - len(parts))
    length = hsize + len(body)
    covered = struct.pack("<HH", flags, version) + struct.pack(f"<{n}I", *offsets) + body
    return b"HDR0" + struct.pack("<II", length, crc32_no_final_xor(covered)) + covered


def parse_trx(blob: bytes) -> Findings:
    return trx.inspect(Source.from_bytes(blob), Context(limits=SMALL))


UIMAGE = struct.pack(">7I4B32s", 0x27051956, 0, 0, 4, 0, 0, zlib.crc32(b"abcd"), 5, 2, 2, 0, b"k")
UIMAGE = UIMAGE[:4] + struct.pack(">I", zlib.crc32(UIMAGE)) + UIMAGE[8:] + b"abcd"


def test_trx_v1_with_three_partitions() -> None:
    loader, kernel, rootfs = os.urandom(101), UIMAGE, os.urandom(5000)
    blob = build_trx([loader, kernel, rootfs], flags=0x2)
    assert detect(sniff_source(Source.from_bytes(blob))).name == "trx"
    f = parse_trx(blob)
    assert f.valid, f.problems
    d = f.details
    assert (d["length"], d["version"], d["flags"], d["crc_ok"]) == (len(blob), 1, 2, True)
    parts = d["partitions"]
    assert [p["offset"] for p in parts] == [28, 28 + 104, 28 + 104 + len(UIMAGE)]
    assert [p["size"] for p in parts] == [104, len(UIMAGE), 5000]
    assert [p["format"] for p in parts] == ["raw", "uimage", "raw"]
    json.dumps(d)


def test_trx_v2_with_four_partitions() -> None:
    blob = build_trx([b"a" * 8, b"b" * 12, b"c" * 16, b"d" * 20], version=2)
    f = parse_trx(blob)
    assert f.valid
    assert f.details["header_size"] == 32
    assert [p["size"] for p in f.details["partitions"]] == [8, 12, 16, 20]
    assert [p["index"] for p in f.details["partitions"]] == [0, 1, 2, 3]


def test_trx_bad_crc_is_a_problem() -> None:
    blob = bytearray(build_trx([os.urandom(200)]))
    blob[100] ^= 0x80
    f = parse_trx(bytes(blob))
    assert f.details["crc_ok"] is False
    assert len(f.problems) == 1 and f.problems[0].startswith("TRX CRC mismatch: stored 0x")


def test_trx_flag_word_is_covered_by_the_crc() -> None:
    blob = bytearray(build_trx([os.urandom(200)]))
    blob[12] ^= 1
    assert parse_trx(bytes(blob)).details["crc_ok"] is False


def test_trx_truncated_is_a_problem() -> None:
    blob = build_trx([os.urandom(2000)])
    f = parse_trx(blob[:1000])
    assert f.details["crc_ok"] is False
    assert f.problems == [f"file truncated: TRX header says {len(blob)} bytes, file has 1000"]


def test_trx_trailing_bytes_are_a_warning() -> None:
    f = parse_trx(build_trx([b"abcd"]) + b"\xff" * 64)
    assert f.valid
    assert f.warnings == ["64 bytes follow the TRX length"]


def test_trx_length_smaller_than_header_is_an_error() -> None:
    blob = bytearray(build_trx([b"abcd"]))
    blob[4:8] = struct.pack("<I", 20)
    assert not trx.sniff(sniff_of(bytes(blob)))
    with pytest.raises(ImageError, match="smaller than its 28-byte header"):
        parse_trx(bytes(blob))


def test_trx_unknown_version_is_an_error() -> None:
    blob = build_trx([b"abcd"], version=1)
    blob = blob[:14] + struct.pack("<H", 3) + blob[16:]
    assert not trx.sniff(sniff_of(blob))
    with pytest.raises(ImageError, match="unsupported TRX version 3"):
        parse_trx(blob)


def test_trx_wrong_magic_and_short_header_are_errors() -> None:
    with pytest.raises(ImageError, match="not a TRX image"):
        parse_trx(b"HDR1" + bytes(40))
    with pytest.raises(ImageError, match="truncated"):
        parse_trx(b"HDR0" + bytes(8))


def test_trx_partition_inside_header_is_a_problem() -> None:
    f = parse_trx(build_trx([b"abcd"], offsets=[28, 8, 0]))
    assert "partition 1 offset 8 lies inside the 28-byte TRX header" in f.problems


def test_trx_partition_beyond_length_is_a_problem() -> None:
    f = parse_trx(build_trx([b"abcd"], offsets=[28, 0x10000, 0]))
    assert "partition 1 offset 65536 is beyond the TRX length 32" in f.problems
    assert f.details["partitions"][1]["format"] == "missing"


def test_trx_without_partitions_is_a_problem() -> None:
    f = parse_trx(build_trx([b"abcd"], offsets=[0, 0, 0]))
    assert f.problems == ["TRX header lists no partitions"]


@given(
    parts=st.lists(st.binary(min_size=1, max_size=500), min_size=1, max_size=4),
    flags=st.integers(0, 0xFFFF),
    extra=st.binary(max_size=8),
)
@settings(max_examples=150, deadline=None)
def test_trx_round_trip(parts: list[bytes], flags: int, extra: bytes) -> None:
    version = 2 if len(parts) == 4 else 1
    blob = build_trx(parts, version=version, flags=flags)
    assert trx.sniff(sniff_of(blob))
    f = parse_trx(blob + extra)
    assert f.valid, f.problems
    assert (f.details["flags"], f.details["version"]) == (flags, version)
    assert f.details["length"] == len(blob)
    got = [blob[p["offset"] : p["offset"] + p["size"]] for p in f.details["partitions"]]
    assert got == [p + bytes(-len(p) % 4) for p in parts]


def trx_or_error(blob: bytes) -> Findings | None:
    try:
        return parse_trx(blob)
    except ImageError:
        return None


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_trx_fuzz_random(data: bytes) -> None:
    result = trx_or_error(b"HDR0" + data)
    assert result is None or isinstance(json.dumps(result.details), str)
    assert trx.sniff(sniff_of(data)) in (True, False)


VALID_TRX = build_trx([os.urandom(64), UIMAGE, os.urandom(64)])


@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID_TRX) - 1), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, len(VALID_TRX)),
    extra=st.binary(max_size=32),
)
@settings(max_examples=300, deadline=None)
def test_trx_fuzz_mutations(flips: list[tuple[int, int]], cut: int, extra: bytes) -> None:
    buf = bytearray(VALID_TRX)
    for pos, x in flips:
        buf[pos] ^= x
    mutated = bytes(buf[:cut]) + extra
    result = trx_or_error(mutated)
    # Every byte from offset 12 to the end is covered by the CRC; bytes 4..12 hold the length
    # and the CRC themselves. Any change there must be caught.
    if result is not None and mutated[: len(VALID_TRX)] != VALID_TRX:
        assert not result.valid


# --- DFU ----------------------------------------------------------------------------------------


def build_dfu(
    payload: bytes,
    *,
    vendor: int = 0x0483,
    product: int = 0xDF11,
    device: int = 0x0200,
    bcd: int = 0x0100,
    crc: int | None = None,
) -> bytes:
    body = payload + struct.pack("<HHHH", device, product, vendor, bcd) + b"UFD" + bytes([16])
    return body + struct.pack("<I", crc32_no_final_xor(body) if crc is None else crc)


Element = tuple[int, bytes]
Target = tuple[int, str | None, list[Element]]


def dfuse_payload(targets: list[Target], *, image_size: int | None = None) -> bytes:
    body = b""
    for alt, name, elements in targets:
        elems = b"".join(struct.pack("<II", a, len(d)) + d for a, d in elements)
        raw_name = (name or "").encode().ljust(255, b"\0")
        body += (
            b"Target"
            + struct.pack("<BI", alt, 1 if name is not None else 0)
            + raw_name
            + struct.pack("<II", len(elems), len(elements))
            + elems
        )
    size = 11 + len(body) if image_size is None else image_size
    return b"DfuSe" + struct.pack("<BIB", 1, size, len(targets)) + body


def parse_dfu(blob: bytes) -> Findings:
    return dfu.inspect(Source.from_bytes(blob), Context(limits=SMALL))


def test_plain_dfu_file() -> None:
    payload = os.urandom(3000)
    blob = build_dfu(payload, vendor=0x1234, product=0x5678, device=0x0102)
    assert detect(sniff_source(Source.from_bytes(blob))).name == "dfu"
    f = parse_dfu(blob)
    assert f.valid, f.problems
    d = f.details
    assert (d["vendor_id"], d["product_id"], d["device"]) == (0x1234, 0x5678, 0x0102)
    assert d["dfu_version"] == "1.00"
    assert d["crc_ok"] is True
    assert d["payload_size"] == 3000
    assert d["payload_format"] == "raw"
    assert d["crc"] == crc32_no_final_xor(blob[:-4])


def test_dfu_payload_with_a_strong_magic_is_detected_as_that_format() -> None:
    blob = build_dfu(UIMAGE)
    # The uImage magic at offset 0 wins over the suffix at the end (priority 20 < 40) ...
    assert detect(sniff_source(Source.from_bytes(blob))).name == "uimage"
    assert inspect_source(Source.from_bytes(blob)).warnings == ["16 bytes follow the image data"]
    # ... and the DFU parser still names the payload.
    assert parse_dfu(blob).details["payload_format"] == "uimage"


def test_dfu_bad_crc_is_a_problem() -> None:
    blob = bytearray(build_dfu(os.urandom(100)))
    blob[50] ^= 4
    f = parse_dfu(bytes(blob))
    assert f.details["crc_ok"] is False
    assert f.problems[0].startswith("DFU suffix CRC mismatch: stored 0x")


def test_dfu_suffix_fields_are_covered_by_the_crc() -> None:
    blob = bytearray(build_dfu(os.urandom(100)))
    blob[-12] ^= 1  # idVendor
    assert parse_dfu(bytes(blob)).details["crc_ok"] is False


def test_dfu_truncated_file_loses_its_suffix() -> None:
    blob = build_dfu(os.urandom(100))[:-10]
    assert not dfu.sniff(sniff_of(blob))
    with pytest.raises(ImageError, match="no DFU suffix"):
        parse_dfu(blob)


def test_dfu_suffix_length_must_fit() -> None:
    blob = bytearray(build_dfu(b""))
    blob[-5] = 15
    assert not dfu.sniff(sniff_of(bytes(blob)))
    blob[-5] = 200
    assert not dfu.sniff(sniff_of(bytes(blob)))
    with pytest.raises(ImageError):
        parse_dfu(bytes(blob))


def test_dfu_longer_suffix_is_accepted() -> None:
    body = os.urandom(40) + b"EXTRA" + struct.pack("<HHHH", 1, 2, 3, 0x100) + b"UFD" + bytes([21])
    blob = body + struct.pack("<I", crc32_no_final_xor(body))
    f = parse_dfu(blob)
    assert f.valid
    assert (f.details["payload_size"], f.details["suffix_length"]) == (40, 21)


def test_dfu_empty_payload_is_a_problem() -> None:
    assert parse_dfu(build_dfu(b"")).problems == ["DFU file has an empty payload"]


def test_dfuse_file() -> None:
    targets: list[Target] = [
        (0, "Internal Flash", [(0x08000000, os.urandom(1024)), (0x08004000, os.urandom(100))]),
        (1, None, [(0x1FFF7800, b"\x00" * 16)]),
    ]
    blob = build_dfu(dfuse_payload(targets), bcd=0x011A)
    assert detect(sniff_source(Source.from_bytes(blob))).name == "dfu"
    f = parse_dfu(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["dfu_version"] == "1.1a"
    assert d["payload_format"] == "dfuse"
    ds = d["dfuse"]
    assert ds["image_size"] == d["payload_size"]
    assert [t["name"] for t in ds["targets"]] == ["Internal Flash", None]
    assert [t["alternate_setting"] for t in ds["targets"]] == [0, 1]
    elements = [(e["address"], e["size"]) for t in ds["targets"] for e in t["elements"]]
    assert elements == [(0x08000000, 1024), (0x08004000, 100), (0x1FFF7800, 16)]
    first = ds["targets"][0]["elements"][0]
    assert blob[first["offset"] : first["offset"] + 1024] == targets[0][2][0][1]
    json.dumps(d)


def test_dfuse_with_plain_dfu_version_is_a_warning() -> None:
    f = parse_dfu(build_dfu(dfuse_payload([(0, None, [(0, b"x")])])))
    assert f.valid
    assert f.warnings == ["DfuSe file whose suffix declares DFU version 1.00, not 1.1a"]


def test_dfuse_image_size_mismatch_is_a_problem() -> None:
    f = parse_dfu(build_dfu(dfuse_payload([(0, None, [(0, b"x")])], image_size=5), bcd=0x11A))
    assert any("DfuSe image size field says 5 bytes" in p for p in f.problems)


def test_dfuse_target_size_mismatch_is_a_problem() -> None:
    payload = bytearray(dfuse_payload([(0, None, [(0, b"abcd")])]))
    struct.pack_into("<I", payload, 11 + 6 + 1 + 4 + 255, 999)
    f = parse_dfu(build_dfu(bytes(payload), bcd=0x11A))
    assert f.problems == ["DfuSe target 0 size field says 999 bytes, its elements take 12"]


def test_dfuse_bytes_after_the_last_target_are_a_problem() -> None:
    payload = dfuse_payload([(0, None, [(0, b"abcd")])]) + b"junk"
    f = parse_dfu(build_dfu(payload, bcd=0x11A))
    assert "4 bytes lie between the last DfuSe target and the DFU suffix" in f.problems


def test_dfuse_element_past_the_end_is_an_error() -> None:
    payload = bytearray(dfuse_payload([(0, None, [(0, b"abcd")])]))
    struct.pack_into("<I", payload, len(payload) - 8, 0x7FFFFFFF)
    with pytest.raises(ImageError, match="element 0 at offset 285 claims 2147483647 bytes"):
        parse_dfu(build_dfu(bytes(payload), bcd=0x11A))


def test_dfuse_too_many_targets_is_an_error() -> None:
    payload = bytearray(dfuse_payload([(0, None, [(0, b"abcd")])]))
    payload[10] = 200
    with pytest.raises(ImageError, match="target 1 prefix"):
        parse_dfu(build_dfu(bytes(payload), bcd=0x11A))


def test_dfuse_huge_element_count_is_an_error() -> None:
    payload = bytearray(dfuse_payload([(0, None, [(0, b"abcd")])]))
    struct.pack_into("<I", payload, 11 + 6 + 1 + 4 + 255 + 4, 0xFFFFFFFF)
    with pytest.raises(ImageError, match="claims 4294967295 elements, more than 65536"):
        parse_dfu(build_dfu(bytes(payload), bcd=0x11A))
    struct.pack_into("<I", payload, 11 + 6 + 1 + 4 + 255 + 4, 5)
    with pytest.raises(ImageError, match="element 1 header"):
        parse_dfu(build_dfu(bytes(payload), bcd=0x11A))


def test_dfuse_bad_target_signature_and_version_are_errors() -> None:
    payload = bytearray(dfuse_payload([(0, None, [(0, b"abcd")])]))
    payload[11:17] = b"Targex"
    with pytest.raises(ImageError, match="target 0 signature missing"):
        parse_dfu(build_dfu(bytes(payload), bcd=0x11A))
    payload = bytearray(dfuse_payload([(0, None, [(0, b"abcd")])]))
    payload[5] = 2
    with pytest.raises(ImageError, match="unsupported DfuSe version 2"):
        parse_dfu(build_dfu(bytes(payload), bcd=0x11A))


def test_dfuse_without_suffix_is_a_problem() -> None:
    payload = dfuse_payload([(0, "x", [(0x8000000, b"abcd")])])
    assert dfu.sniff(sniff_of(payload))
    f = parse_dfu(payload)
    assert f.details["crc_ok"] is False
    assert f.problems == [
        "DfuSe file has no DFU suffix (the 'UFD' signature is missing at its end)"
    ]


def test_truncated_dfuse_is_an_error() -> None:
    blob = build_dfu(dfuse_payload([(0, None, [(0, os.urandom(500))])]), bcd=0x11A)
    with pytest.raises(ImageError, match="past the payload end"):
        parse_dfu(blob[:400])


@given(
    payload=st.binary(max_size=2000),
    vendor=st.integers(0, 0xFFFF),
    product=st.integers(0, 0xFFFF),
    device=st.integers(0, 0xFFFF),
)
@settings(max_examples=150, deadline=None)
def test_dfu_round_trip(payload: bytes, vendor: int, product: int, device: int) -> None:
    blob = build_dfu(payload, vendor=vendor, product=product, device=device)
    assert dfu.sniff(sniff_of(blob))
    f = parse_dfu(blob)
    assert f.details["crc_ok"] is True
    d = f.details
    assert (d["vendor_id"], d["product_id"], d["device"]) == (vendor, product, device)
    assert d["payload_size"] == len(payload)


elements = st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)), max_size=4)
targets_st = st.lists(
    st.tuples(
        st.integers(0, 255),
        st.one_of(st.none(), st.text("abcdefgh XYZ", max_size=20)),
        elements,
    ),
    max_size=3,
)


@given(targets=targets_st)
@settings(max_examples=150, deadline=None)
def test_dfuse_round_trip(targets: list[Target]) -> None:
    blob = build_dfu(dfuse_payload(targets), bcd=0x011A)
    f = parse_dfu(blob)
    assert f.valid, f.problems
    got = [
        (t["alternate_setting"], t["name"],
         [(e["address"], blob[e["offset"] : e["offset"] + e["size"]]) for e in t["elements"]])
        for t in f.details["dfuse"]["targets"]
    ]  # fmt: skip
    assert got == [(alt, name, list(els)) for alt, name, els in targets]


def dfu_or_error(blob: bytes) -> Findings | None:
    try:
        return parse_dfu(blob)
    except ImageError:
        return None


@given(st.binary(max_size=600), st.booleans())
@settings(max_examples=300, deadline=None)
def test_dfu_fuzz_random(data: bytes, dfuse: bool) -> None:
    blob = (b"DfuSe\x01" + data) if dfuse else build_dfu(data)[len(data) // 2 :]
    result = dfu_or_error(blob)
    assert result is None or isinstance(json.dumps(result.details), str)
    assert dfu.sniff(sniff_of(data)) in (True, False)


VALID_DFUSE = build_dfu(
    dfuse_payload([(0, "flash", [(0x08000000, os.urandom(64)), (0x08001000, os.urandom(32))])]),
    bcd=0x011A,
)


@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(VALID_DFUSE) - 1), st.integers(1, 255)), max_size=4
    ),
    cut=st.integers(0, len(VALID_DFUSE)),
    extra=st.binary(max_size=32),
)
@settings(max_examples=300, deadline=None)
def test_dfu_fuzz_mutations(flips: list[tuple[int, int]], cut: int, extra: bytes) -> None:
    buf = bytearray(VALID_DFUSE)
    for pos, x in flips:
        buf[pos] ^= x
    mutated = bytes(buf[:cut]) + extra
    result = dfu_or_error(mutated)
    if result is not None and mutated != VALID_DFUSE:
        # The CRC covers the whole file, so any change leaves a bad CRC or a broken layout.
        assert not result.valid
    if mutated == VALID_DFUSE:
        assert result is not None and result.valid
