"""UF2: writer round trips, hand-built edge cases and fuzzing.

No Debian package reads or writes UF2, so the cross-checks here are structural: every block our
writer makes is checked field by field against the published layout, independently of the
parser.
"""

from __future__ import annotations

import io
import json
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats import uf2
from unbrick.formats.base import Context, Findings, Sniff, Source
from unbrick.formats.memmap import RawLayout

RP2040 = 0xE48BFF56
SAMD21 = 0x68ED2B88
NRF52840 = 0xADA52840


def block(
    number: int,
    count: int,
    address: int,
    payload: bytes,
    *,
    flags: int = uf2.FLAG_FAMILY_ID,
    word: int = RP2040,
    size: int | None = None,
    after: bytes = b"",
    magic0: int = uf2.MAGIC_START0,
    magic1: int = uf2.MAGIC_START1,
    magic_end: int = uf2.MAGIC_END,
) -> bytes:
    """One 512-byte block built from the specification's table."""
    head = struct.pack(
        "<8I",
        magic0,
        magic1,
        flags,
        address,
        len(payload) if size is None else size,
        number,
        count,
        word,
    )
    data = (payload + after).ljust(476, b"\x00")
    assert len(data) == 476
    return head + data + struct.pack("<I", magic_end)


def image(n: int, *, base: int = 0x10000000, size: int = 256, word: int = RP2040) -> list[bytes]:
    return [block(i, n, base + i * size, bytes([i]) * size, word=word) for i in range(n)]


def parse(data: bytes) -> Findings:
    return uf2.inspect(Source.from_bytes(data), Context())


def convert(data: bytes, **kw: int) -> tuple[RawLayout, bytes]:
    out = io.BytesIO()
    layout = uf2.to_raw(Source.from_bytes(data), out, Context(), **kw)
    return layout, out.getvalue()


# --- the writer against the specification ------------------------------------------------------


def test_write_uf2_blocks_follow_the_specification() -> None:
    data = random.Random(5).randbytes(1000)
    out = io.BytesIO()
    n = uf2.write_uf2(Source.from_bytes(data), out, base_address=0x10000000, family_id=RP2040)
    raw = out.getvalue()
    assert n == 4
    assert len(raw) == 4 * 512
    for i in range(n):
        blk = raw[i * 512 : (i + 1) * 512]
        m0, m1, flags, addr, size, number, count, fam = struct.unpack_from("<8I", blk)
        assert (m0, m1) == (0x0A324655, 0x9E5D5157)
        assert blk[:4] == b"UF2\n"
        assert struct.unpack_from("<I", blk, 508)[0] == 0x0AB16F30
        assert flags == 0x2000
        assert (addr, size, number, count, fam) == (0x10000000 + 256 * i, 256, i, 4, RP2040)
        expected = data[256 * i : 256 * (i + 1)].ljust(256, b"\xff")
        assert blk[32 : 32 + 256] == expected
        assert blk[32 + 256 : 508] == bytes(476 - 256)


def test_write_uf2_without_family() -> None:
    out = io.BytesIO()
    uf2.write_uf2(Source.from_bytes(b"\x01" * 10), out, base_address=0x2000, family_id=None)
    flags, word = struct.unpack_from("<I", out.getvalue(), 8)[0], out.getvalue()[28:32]
    assert flags == 0
    assert word == bytes(4)
    f = parse(out.getvalue())
    assert f.valid
    assert f.details["family_id"] is None
    assert f.details["family_name"] is None


def test_write_uf2_round_trip_details() -> None:
    data = bytes(range(256)) * 5 + b"xyz"
    out = io.BytesIO()
    n = uf2.write_uf2(
        Source.from_bytes(data), out, base_address=0x10000000, family_id=RP2040, payload_size=476
    )
    assert n == 3
    f = parse(out.getvalue())
    assert f.valid, f.problems
    d = f.details
    assert d["family_id"] == "0xe48bff56"
    assert d["family_name"] == "RP2040"
    assert "families" not in d
    assert d["block_count"] == 3
    assert d["num_blocks_declared"] == 3
    assert d["payload_size"] == 476
    assert d["ranges"] == [[0x10000000, 0x10000000 + 3 * 476]]
    assert d["missing_blocks"] == []
    assert d["duplicate_blocks"] == []
    layout, raw = convert(out.getvalue())
    assert layout == RawLayout(0x10000000, 3 * 476, [(0x10000000, 0x10000000 + 3 * 476)])
    assert raw[: len(data)] == data
    assert raw[len(data) :] == b"\xff" * (3 * 476 - len(data))


def test_writer_patches_block_count() -> None:
    out = io.BytesIO()
    out.write(b"PRE")
    w = uf2.Uf2Writer(out, family_id=SAMD21, payload_size=256)
    w.data(0x2000, bytes(600))
    w.data(0x8000, b"\x01" * 4)
    assert w.close() == 4
    assert out.getvalue()[:3] == b"PRE"
    assert out.tell() == 3 + 4 * 512
    f = parse(out.getvalue()[3:])
    assert f.valid, f.problems
    assert f.details["num_blocks_declared"] == 4
    assert f.details["family_name"] == "SAMD21"
    assert f.details["ranges"] == [[0x2000, 0x2000 + 600], [0x8000, 0x8004]]
    assert f.details["gaps"] == [[0x2000 + 600, 0x8000]]
    assert f.details["payload_size"] is None
    assert f.details["payload_sizes"] == [4, 88, 256]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"payload_size": 0}, "payload_size"),
        ({"payload_size": 477}, "payload_size"),
        ({"payload_size": 250}, "payload_size"),
        ({"base_address": 0xFFFFFF00}, "32-bit"),
        ({"family_id": 1 << 32}, "family_id"),
    ],
)
def test_write_uf2_rejects_bad_parameters(kw: dict[str, int], message: str) -> None:
    args: dict[str, int | None] = {"base_address": 0, "family_id": None, "payload_size": 256}
    args.update(kw)
    with pytest.raises(UsageError, match=message):
        uf2.write_uf2(Source.from_bytes(bytes(512)), io.BytesIO(), **args)  # type: ignore[arg-type]


def test_write_uf2_rejects_empty_source() -> None:
    with pytest.raises(UsageError, match="empty"):
        uf2.write_uf2(Source.from_bytes(b""), io.BytesIO(), base_address=0, family_id=None)


def test_uf2_writer_rejects_bad_parameters() -> None:
    with pytest.raises(UsageError):
        uf2.Uf2Writer(io.BytesIO(), family_id=None, payload_size=3)
    w = uf2.Uf2Writer(io.BytesIO(), family_id=None)
    with pytest.raises(UsageError):
        w.data(0xFFFFFFFF, b"\x01\x02")


# --- hand-built edge cases -----------------------------------------------------------------------


def test_missing_block() -> None:
    blocks = image(4)
    del blocks[2]
    f = parse(b"".join(blocks))
    assert f.problems == ["1 of 4 blocks are missing (2)"]
    assert f.details["missing_blocks"] == [2]
    assert f.details["block_count"] == 3
    with pytest.raises(ImageError, match="missing"):
        convert(b"".join(blocks))


def test_many_missing_blocks_are_listed_briefly() -> None:
    f = parse(block(0, 100, 0, b"\x00" * 256))
    assert f.problems == ["99 of 100 blocks are missing (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)"]
    assert f.details["missing_blocks"] == list(range(1, 100))


def test_wrong_magic_in_block_3() -> None:
    blocks = image(5)
    blocks[3] = block(3, 5, 0x10000300, bytes(256), magic1=0x12345678)
    f = parse(b"".join(blocks))
    assert f.problems == [
        "block 3 at offset 0x600: bad start magic",
        "1 of 5 blocks are missing (3)",
    ]
    assert f.details["bad_blocks"] == 1
    assert f.details["missing_blocks"] == [3]


def test_bad_end_magic_and_oversized_payload() -> None:
    blocks = image(3)
    blocks[1] = block(1, 3, 0x10000100, bytes(256), magic_end=0)
    blocks[2] = block(2, 3, 0x10000200, bytes(256), size=477)
    f = parse(b"".join(blocks))
    assert f.problems[:2] == [
        "block 1 at offset 0x200: bad end magic",
        "block 2 at offset 0x400: payload size 477 is larger than 476",
    ]


def test_inconsistent_num_blocks() -> None:
    blocks = image(3)
    blocks[2] = block(2, 4, 0x10000200, bytes([2]) * 256)
    f = parse(b"".join(blocks))
    assert (
        "block 2: numBlocks is 4, earlier blocks of family 0xe48bff56 (RP2040) say 3" in f.problems
    )


def test_block_number_out_of_range() -> None:
    blocks = image(2)
    blocks.append(block(7, 2, 0x10000200, bytes(256)))
    f = parse(b"".join(blocks))
    assert f.problems == ["block 2: block number 7 is not below numBlocks 2"]


def test_duplicate_block_with_same_data_is_a_warning() -> None:
    blocks = image(3)
    blocks.append(blocks[1])
    f = parse(b"".join(blocks))
    assert f.valid
    assert f.details["duplicate_blocks"] == [1]
    assert f.warnings == [
        "1 blocks appear more than once",
        "256 bytes are written more than once (with the same values)",
    ]


def test_duplicate_block_with_different_data_is_a_problem() -> None:
    blocks = image(3)
    blocks.append(block(1, 3, 0x10000100, b"\x55" * 256))
    f = parse(b"".join(blocks))
    assert f.problems == [
        "block 3: data at 0x10000100 differs from data written earlier at the same address"
    ]
    with pytest.raises(ImageError):
        convert(b"".join(blocks))


def test_mixed_families() -> None:
    a = image(3, base=0x10000000, word=RP2040)
    b = [block(i, 2, 0x10000000 + 256 * i, b"\xaa" * 256, word=0xE48BFF59) for i in range(2)]
    data = b"".join(a + b)
    f = parse(data)
    assert f.valid, f.problems
    d = f.details
    assert d["family_id"] == "0xe48bff56"
    assert d["families"] == [
        {
            "family_id": "0xe48bff56",
            "name": "RP2040",
            "blocks": 3,
            "num_blocks_declared": 3,
            "ranges": [[0x10000000, 0x10000300]],
        },
        {
            "family_id": "0xe48bff59",
            "name": "RP2350_ARM_S",
            "blocks": 2,
            "num_blocks_declared": 2,
            "ranges": [[0x10000000, 0x10000200]],
        },
    ]
    assert d["ranges"] == [[0x10000000, 0x10000300]]
    with pytest.raises(UsageError, match="several families"):
        convert(data)
    _, raw = convert(data, family_id=0xE48BFF59)
    assert raw == b"\xaa" * 512
    _, raw = convert(data, family_id=RP2040)
    assert raw == bytes([0]) * 256 + bytes([1]) * 256 + bytes([2]) * 256
    with pytest.raises(UsageError, match="no data for family"):
        convert(data, family_id=SAMD21)
    pieces = list(uf2.iter_data(Source.from_bytes(data), Context(), family_id=0xE48BFF59))
    assert pieces == [(0x10000000, b"\xaa" * 256), (0x10000100, b"\xaa" * 256)]
    with pytest.raises(UsageError):
        list(uf2.iter_data(Source.from_bytes(data), Context()))


def test_missing_block_in_one_family_is_named() -> None:
    a = image(3, word=RP2040)
    b = image(2, word=SAMD21)
    f = parse(b"".join(a + b[:1]))
    assert f.problems == ["1 of 2 blocks of family 0x68ed2b88 (SAMD21) are missing (1)"]


def test_not_main_flash_blocks_are_excluded() -> None:
    blocks = [block(i, 4, 0x10000000 + i * 256, bytes([i]) * 256) for i in range(3)]
    blocks.append(block(3, 4, 0x30000000, b"source", flags=uf2.FLAG_NOT_MAIN_FLASH | 0x2000))
    f = parse(b"".join(blocks))
    assert f.valid, f.problems
    assert f.details["not_main_flash_blocks"] == 1
    assert f.details["ranges"] == [[0x10000000, 0x10000300]]
    layout, _ = convert(b"".join(blocks))
    assert layout.size == 0x300


def test_file_container_blocks() -> None:
    content = b"print('hello')\n" * 30
    blocks = [
        block(
            i,
            2,
            i * 256,
            content[i * 256 : (i + 1) * 256],
            flags=uf2.FLAG_FILE_CONTAINER,
            word=len(content),
            after=b"code.py\0",
        )
        for i in range(2)
    ]
    f = parse(b"".join(blocks))
    assert f.valid, f.problems
    assert f.details["file_container_blocks"] == 2
    assert f.details["files"] == [{"name": "code.py", "size": len(content)}]
    assert f.details["ranges"] == []
    with pytest.raises(ImageError, match="no main-flash data"):
        convert(b"".join(blocks))


def test_file_container_data_past_file_size() -> None:
    blk = block(0, 1, 256, b"x" * 256, flags=uf2.FLAG_FILE_CONTAINER, word=300, after=b"a\0")
    f = parse(blk)
    assert f.problems == ["block 0: file 'a' data at offset 256+256 is past its size 300"]


def test_md5_and_extension_tags() -> None:
    tags = (
        bytes([9]) + (0x9FC7BC).to_bytes(3, "little") + b"0.1.2" + bytes(3)
        + bytes([20]) + (0x650D9D).to_bytes(3, "little") + b"ACME Toaster mk3"
        + bytes([8]) + (0x0BE9F7).to_bytes(3, "little") + (4096).to_bytes(4, "little")
        + b"\xff\xff\xff\xff"
    )  # fmt: skip
    flags = uf2.FLAG_FAMILY_ID | uf2.FLAG_EXTENSION_TAGS | uf2.FLAG_MD5
    blk = block(0, 1, 0x1000, b"\x01" * 256, flags=flags, after=tags)
    f = parse(blk)
    assert f.valid, f.problems
    assert f.details["md5_blocks"] == 1
    assert f.details["tags"] == {
        "version": "0.1.2",
        "description": "ACME Toaster mk3",
        "page_size": 4096,
    }


def test_extension_tag_overrun_is_a_problem() -> None:
    tag = bytes([250]) + (0x9FC7BC).to_bytes(3, "little") + b"1.0"
    blk = block(0, 1, 0, b"\x01" * 256, flags=uf2.FLAG_EXTENSION_TAGS | 0x2000, after=tag)
    f = parse(blk)
    assert f.problems == ["block 0: extension tag 0x9fc7bc runs past the data area"]


def test_md5_area_overlap_is_a_problem() -> None:
    blk = block(0, 1, 0, b"\x01" * 460, flags=uf2.FLAG_MD5 | 0x2000)
    with pytest.raises(ImageError, match="no valid UF2 block"):
        parse(blk)


def test_trailing_partial_block_is_a_problem() -> None:
    f = parse(b"".join(image(2)) + b"junk")
    assert f.problems == ["file size 1028 is not a multiple of 512: 4 trailing bytes"]


def test_short_and_blockless_files_are_image_errors() -> None:
    with pytest.raises(ImageError, match="512-byte blocks"):
        parse(b"UF2\n")
    with pytest.raises(ImageError, match="no valid UF2 block"):
        parse(bytes(1024))


def test_payload_past_4gib_is_a_bad_block() -> None:
    blocks = [*image(1, base=0x1000), block(0, 1, 0xFFFFFF80, bytes(256), word=SAMD21)]
    f = parse(b"".join(blocks))
    assert "block 1 at offset 0x200: payload runs past the 4 GiB address space" in f.problems


def test_misaligned_blocks_warn() -> None:
    f = parse(block(0, 1, 0x1001, b"\x01" * 7))
    assert f.valid
    assert f.warnings == ["1 blocks have an address or payload size that is not a multiple of 4"]


def test_unknown_family_has_no_name() -> None:
    f = parse(b"".join(image(1, word=0x12345678)))
    assert f.details["family_id"] == "0x12345678"
    assert f.details["family_name"] is None
    assert uf2.family_name(NRF52840) == "NRF52840"
    assert uf2.family_name(0xBFDD4EEE) == "ESP32S2"
    assert uf2.family_name(0x57755A57) == "STM32F4"


def test_to_raw_bounds_the_span() -> None:
    data = block(0, 2, 0, b"\x01" * 4) + block(1, 2, 0x1000, b"\x02" * 4)
    with pytest.raises(LimitError, match="max_span"):
        convert(data, max_span=0x1000)
    layout, raw = convert(data, max_span=0x1004)
    assert layout.size == 0x1004
    assert raw == b"\x01" * 4 + b"\xff" * 0xFFC + b"\x02" * 4
    far = block(0, 2, 0, b"\x01" * 4) + block(1, 2, 0x40000000, b"\x02" * 4)
    with pytest.raises(LimitError, match="256 MiB"):
        convert(far)


def test_sniff() -> None:
    good = b"".join(image(2))
    assert uf2.sniff(Sniff(head=good, tail=good[-64:], size=len(good)))
    bad = [
        b"UF2\n" + bytes(508),
        good[:511],
        block(0, 1, 0, bytes(256), magic_end=0),
        block(0, 1, 0, bytes(256), size=500),
    ]
    for b in bad:
        assert not uf2.sniff(Sniff(head=b, tail=b[-64:], size=len(b)))


def test_registered() -> None:
    from unbrick.formats import detect

    good = b"".join(image(2))
    assert detect.detect(Sniff(head=good, tail=good[-64:], size=len(good))).name == "uf2"


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=5000),
    base=st.integers(0, 0xFFF00000).map(lambda x: x & ~3),
    family=st.none() | st.sampled_from([RP2040, SAMD21, NRF52840]) | st.integers(0, 0xFFFFFFFF),
    payload_size=st.integers(1, 119).map(lambda x: 4 * x),
    shuffle=st.randoms(use_true_random=False),
)
def test_round_trip_write_uf2(
    data: bytes, base: int, family: int | None, payload_size: int, shuffle: random.Random
) -> None:
    out = io.BytesIO()
    n = uf2.write_uf2(
        Source.from_bytes(data),
        out,
        base_address=base,
        family_id=family,
        payload_size=payload_size,
    )
    padded = n * payload_size
    assert n == -(-len(data) // payload_size)
    # Blocks are independent: any order gives the same image.
    blocks = [out.getvalue()[i : i + 512] for i in range(0, n * 512, 512)]
    shuffle.shuffle(blocks)
    f = parse(b"".join(blocks))
    assert f.valid, f.problems
    assert f.details["family_id"] == (None if family is None else f"0x{family:08x}")
    assert f.details["block_count"] == n
    assert f.details["num_blocks_declared"] == n
    assert f.details["payload_size"] == payload_size
    assert f.details["ranges"] == [[base, base + padded]]
    layout, raw = convert(b"".join(blocks))
    assert layout == RawLayout(base, padded, [(base, base + padded)])
    assert raw == data + b"\xff" * (padded - len(data))


@settings(max_examples=100, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(
            st.integers(0, 1 << 20).map(lambda x: x * 4), st.binary(min_size=1, max_size=900)
        ),
        min_size=1,
        max_size=5,
    ),
    fill=st.integers(0, 255),
)
def test_round_trip_writer_pieces(pieces: list[tuple[int, bytes]], fill: int) -> None:
    # Keep pieces apart so that later ones do not overwrite earlier ones.
    placed: list[tuple[int, bytes]] = []
    for addr, data in sorted(pieces):
        if placed and addr < placed[-1][0] + len(placed[-1][1]):
            continue
        placed.append((addr, data))
    out = io.BytesIO()
    w = uf2.Uf2Writer(out, family_id=RP2040)
    for addr, data in placed:
        w.data(addr, data)
    w.close()
    layout, raw = convert(out.getvalue(), fill=fill)
    lo = placed[0][0]
    assert layout.base_address == lo
    expected = bytearray([fill]) * (placed[-1][0] + len(placed[-1][1]) - lo)
    for addr, data in placed:
        expected[addr - lo : addr - lo + len(data)] = data
    assert raw == bytes(expected)


def _check_parse(data: bytes) -> None:
    try:
        f = parse(data)
    except ImageError:
        return
    json.dumps(f.details)
    assert isinstance(f.details["ranges"], list)
    assert isinstance(f.details["missing_blocks"], list)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_parse(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 600),
            st.integers(0, 8),
            st.integers(0, 8),
            st.integers(0, 0xFFFFFFFF),
            st.binary(max_size=476),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_structured_blocks(
    fields: list[tuple[int, int, int, int, int, int, bytes]],
) -> None:
    data = b"".join(
        block(number, count, addr, body, flags=flags, word=word, size=size)
        for flags, addr, size, number, count, word, body in fields
    )
    _check_parse(data)
    try:
        layout, raw = convert(data, max_span=1 << 20)
    except (ImageError, UsageError):
        return
    assert len(raw) == layout.size


_VALID = b"".join(
    [
        *image(3),
        block(3, 4, 0x30000000, b"src", flags=uf2.FLAG_NOT_MAIN_FLASH | 0x2000),
        block(0, 1, 0, b"abc", flags=uf2.FLAG_FILE_CONTAINER | uf2.FLAG_EXTENSION_TAGS, word=3,
              after=b"\0" + bytes([8, 1, 2, 3, 1, 2, 3, 4])),
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]),
            st.integers(0, len(_VALID)),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_file(edits: list[tuple[str, int, int]]) -> None:
    data = bytearray(_VALID)
    for op, where, val in edits:
        pos = min(where, len(data))
        if op == "flip" and pos < len(data):
            data[pos] ^= val or 1
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = bytes((val,)) * 512
    _check_parse(bytes(data))
