"""Android sparse images: parse, expand, create, split; cross-checked with libsparse's tools."""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, IntegrityError, LimitError, UsageError
from unbrick.formats import sparse
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source

BS = 4096
SMALL = Limits(max_expanded_bytes=8 << 20, max_records=100_000, max_seconds=20.0)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Builders


def chunk(ctype: int, blocks: int, data: bytes = b"", *, extra: int = 0) -> bytes:
    return struct.pack("<HHII", ctype, 0, blocks, 12 + extra + len(data)) + b"E" * extra + data


def raw_chunk(data: bytes, bs: int = BS, extra: int = 0) -> bytes:
    return chunk(sparse.CHUNK_RAW, len(data) // bs, data, extra=extra)


def fill_chunk(pattern: bytes, blocks: int, extra: int = 0) -> bytes:
    return chunk(sparse.CHUNK_FILL, blocks, pattern, extra=extra)


def skip_chunk(blocks: int, extra: int = 0) -> bytes:
    return chunk(sparse.CHUNK_DONT_CARE, blocks, extra=extra)


def crc_chunk(value: int, extra: int = 0) -> bytes:
    return chunk(sparse.CHUNK_CRC32, 0, struct.pack("<I", value), extra=extra)


def image(
    chunks: Sequence[bytes],
    *,
    bs: int = BS,
    total_blocks: int | None = None,
    total_chunks: int | None = None,
    file_extra: int = 0,
    chunk_extra: int = 0,
    checksum: int = 0,
    major: int = 1,
    minor: int = 0,
) -> bytes:
    """A sparse file from encoded chunks; block total derived from them unless given."""
    if total_blocks is None:
        total_blocks = 0
        for c in chunks:
            ctype, _, n, _ = struct.unpack_from("<HHII", c)
            if ctype != sparse.CHUNK_CRC32:
                total_blocks += n
    header = struct.pack(
        "<IHHHHIIII",
        sparse.MAGIC,
        major,
        minor,
        28 + file_extra,
        12 + chunk_extra,
        bs,
        total_blocks,
        len(chunks) if total_chunks is None else total_chunks,
        checksum,
    )
    return header + b"H" * file_extra + b"".join(chunks)


def inspect(data: bytes, limits: Limits = SMALL) -> Findings:
    return sparse.inspect(Source.from_bytes(data), Context(limits=limits))


def expand(data: bytes, *, verify_crc: bool = True, holes: bool = True) -> bytes:
    out = io.BytesIO()
    n = sparse.expand(
        io.BytesIO(data), out, Context(limits=SMALL), verify_crc=verify_crc, holes=holes
    )
    assert n == len(out.getvalue())
    return out.getvalue()


def to_sparse(raw: bytes, **kw: object) -> tuple[bytes, sparse.SparseStats]:
    out = io.BytesIO()
    stats = sparse.write_sparse(Source.from_bytes(raw), out, Context(), **kw)  # type: ignore[arg-type]
    assert stats.output_size == len(out.getvalue())
    return out.getvalue(), stats


def padded(raw: bytes, bs: int = BS) -> bytes:
    return raw + bytes(-len(raw) % bs)


def chunk_list(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, blocks, data) of each chunk of a standard-header sparse file."""
    hdr = sparse.parse_header(data)
    pos = hdr.file_header_size
    out = []
    for _ in range(hdr.total_chunks):
        ctype, _, n, total = struct.unpack_from("<HHII", data, pos)
        out.append((ctype, n, data[pos + hdr.chunk_header_size : pos + total]))
        pos += total
    assert pos == len(data)
    return out


def sample_raw(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    return b"".join(
        [
            rng.randbytes(3 * BS),
            bytes(2 * BS),
            b"\x01\x02\x03\x04" * 1024 * 3,
            rng.randbytes(BS),
            bytes(BS),
            b"\xff" * BS * 2,
            rng.randbytes(100),
        ]
    )


class Forward:
    """A forward-only stream that hands out at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self._f = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = self._step
        return self._f.read(min(n, self._step))


class WriteOnly(io.RawIOBase):
    """An output that cannot seek (a pipe, a socket)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        data = bytes(b)  # type: ignore[call-overload]
        self.buf += data
        return len(data)


# --------------------------------------------------------------------------------------------
# CRC arithmetic


@pytest.mark.unit
@pytest.mark.parametrize("n", [0, 4, 4096, 4100, 1 << 20, 5 * (1 << 20) + 12, 9 * (1 << 20)])
@pytest.mark.parametrize("start", [0, 0xDEADBEEF])
def test_crc_of_zero_and_fill_runs_match_zlib(n: int, start: int) -> None:
    assert sparse.crc32_zeros(start, n) == zlib.crc32(bytes(n), start)
    assert sparse.crc32_fill(start, b"\xa5\x01\xff\x10", n) == zlib.crc32(
        b"\xa5\x01\xff\x10" * (n // 4), start
    )


@pytest.mark.unit
def test_crc32_combine() -> None:
    a, b = b"hello, ", b"sparse world" * 1000
    assert sparse.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


# --------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.unit
def test_inspect_details_of_a_hand_built_image() -> None:
    rnd = random.Random(3).randbytes(2 * BS)
    crc = zlib.crc32(rnd + b"\x01\x02\x03\x04" * 1024 * 3 + bytes(BS))
    data = image(
        [
            raw_chunk(rnd),
            fill_chunk(b"\x01\x02\x03\x04", 3),
            skip_chunk(1),
            crc_chunk(crc),
        ]
    )
    f = inspect(data)
    assert f.valid, f.problems
    d = f.details
    assert d["block_size"] == BS
    assert d["total_blocks"] == 6
    assert d["expanded_size"] == 6 * BS
    assert d["chunk_count"] == d["total_chunks"] == 4
    assert d["chunks_by_type"] == {
        "raw": {"chunks": 1, "blocks": 2},
        "fill": {"chunks": 1, "blocks": 3},
        "dont_care": {"chunks": 1, "blocks": 1},
        "crc32": {"chunks": 1, "blocks": 0},
    }
    assert d["data_blocks"] == 5
    assert d["crc32"] == {"present": True, "ok": True}
    assert "image_checksum_ok" not in d
    assert expand(data) == rnd + b"\x01\x02\x03\x04" * 1024 * 3 + bytes(BS)


@pytest.mark.unit
def test_crc_chunks_check_the_running_crc_and_are_not_reset() -> None:
    a, b = b"\x11" * BS, random.Random(4).randbytes(BS)
    data = image(
        [raw_chunk(a), crc_chunk(zlib.crc32(a)), raw_chunk(b), crc_chunk(zlib.crc32(a + b))]
    )
    assert inspect(data).details["crc32"] == {"present": True, "ok": True}
    assert expand(data) == a + b


@pytest.mark.unit
def test_bad_crc_chunk_is_a_problem_and_stops_expansion() -> None:
    a = random.Random(5).randbytes(2 * BS)
    data = image([raw_chunk(a), skip_chunk(1), crc_chunk(zlib.crc32(a + bytes(BS)) ^ 1)])
    f = inspect(data)
    assert not f.valid
    assert f.details["crc32"] == {"present": True, "ok": False}
    assert "CRC32 chunk says" in f.problems[0] and "offset" in f.problems[0]
    with pytest.raises(IntegrityError, match="CRC32 chunk"):
        expand(data)
    assert expand(data, verify_crc=False) == a + bytes(BS)


@pytest.mark.unit
def test_crc_over_large_chunks_runs_beside_the_writes() -> None:
    """Pieces of 256 KiB and more are summed on a helper thread; the result is the same."""
    big = random.Random(8).randbytes(3 << 20)
    expanded = big + b"\x10\x20\x30\x40" * 1024 * 2000 + bytes(900 * BS)
    crc = zlib.crc32(expanded)
    for delta in (0, 1):
        body = [raw_chunk(big), fill_chunk(b"\x10\x20\x30\x40", 2000), skip_chunk(900)]
        data = image([*body, crc_chunk(crc ^ delta), raw_chunk(big)])
        limits = Limits(max_expanded_bytes=64 << 20)
        assert inspect(data, limits).valid is (delta == 0)
        out = io.BytesIO()
        if delta:
            with pytest.raises(IntegrityError):
                sparse.expand(io.BytesIO(data), out, Context(limits=limits))
        else:
            sparse.expand(io.BytesIO(data), out, Context(limits=limits))
            assert out.getvalue() == expanded + big


@pytest.mark.unit
def test_header_image_checksum_checked_when_non_zero() -> None:
    body = [raw_chunk(b"\x5a" * BS), fill_chunk(b"\x00\x00\x00\x07", 2)]
    expanded = b"\x5a" * BS + b"\x00\x00\x00\x07" * 2048
    good = image(body, checksum=zlib.crc32(expanded))
    bad = image(body, checksum=zlib.crc32(expanded) ^ 0x100)
    assert inspect(good).details["image_checksum_ok"] is True
    f = inspect(bad)
    assert f.details["image_checksum_ok"] is False
    assert any("image_checksum" in p for p in f.problems)
    assert expand(good) == expanded
    with pytest.raises(IntegrityError, match="image_checksum"):
        expand(bad)


@pytest.mark.unit
def test_longer_headers_are_honoured() -> None:
    rnd = random.Random(6).randbytes(BS)
    data = image(
        [raw_chunk(rnd, extra=4), fill_chunk(b"abcd", 2, extra=4), skip_chunk(1, extra=4)],
        file_extra=8,
        chunk_extra=4,
    )
    f = inspect(data)
    assert f.valid, f.problems
    assert f.details["file_header_size"] == 36 and f.details["chunk_header_size"] == 16
    assert expand(data) == rnd + b"abcd" * 2048 + bytes(BS)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([chunk(sparse.CHUNK_RAW, 2, b"x" * BS)], "RAW chunk of 2 blocks must hold 8192 bytes"),
        ([chunk(sparse.CHUNK_FILL, 1, b"abcdef")], "FILL chunk holds 6 bytes, not 4"),
        ([chunk(sparse.CHUNK_DONT_CARE, 1, b"ab")], "DONT_CARE chunk holds 2 bytes, not 0"),
        ([fill_chunk(b"abcd", 1), chunk(sparse.CHUNK_CRC32, 0, b"ab")], "CRC32 chunk holds 2"),
        ([chunk(0xCAFE, 1, b"")], "unknown chunk type 0xcafe"),
    ],
)
def test_chunk_size_inconsistent_with_type(chunks: list[bytes], message: str) -> None:
    data = image(chunks)
    f = inspect(data)
    assert any(message in p for p in f.problems), f.problems
    assert any("chunk 0 at offset 28" in p or "chunk 1 at offset" in p for p in f.problems)
    with pytest.raises(ImageError):
        expand(data)


@pytest.mark.unit
def test_block_sum_differs_from_total_blocks() -> None:
    data = image([fill_chunk(b"abcd", 2)], total_blocks=3)
    f = inspect(data)
    assert f.problems == ["chunks cover 2 blocks, the header says total_blks 3"]
    with pytest.raises(ImageError, match="cover only 2 of the 3 blocks"):
        expand(data)
    over = image([fill_chunk(b"abcd", 4)], total_blocks=3)
    assert inspect(over).problems == ["chunks cover 4 blocks, the header says total_blks 3"]
    with pytest.raises(ImageError, match="more than the 3 blocks"):
        expand(over)


@pytest.mark.unit
def test_total_chunks_mismatch() -> None:
    chunks = [fill_chunk(b"abcd", 1), fill_chunk(b"efgh", 1)]
    fewer = image(chunks, total_chunks=1, total_blocks=2)
    f = inspect(fewer)
    assert any("more chunks follow the 1 that total_chunks declares" in p for p in f.problems)
    more = image(chunks, total_chunks=3)
    f = inspect(more)
    assert any("truncated" in p and "chunk 2 of 3" in p for p in f.problems), f.problems
    with pytest.raises(ImageError, match="truncated"):
        expand(more)


@pytest.mark.unit
def test_truncated_raw_data() -> None:
    data = image([raw_chunk(random.Random(7).randbytes(2 * BS))])[:-10]
    f = inspect(data)
    assert any(p.startswith("truncated: chunk 0 at offset 28 needs 8192") for p in f.problems)
    with pytest.raises(ImageError, match="truncated"):
        expand(data)


@pytest.mark.unit
def test_trailing_bytes_are_a_warning() -> None:
    data = image([fill_chunk(b"abcd", 1)]) + b"\x00" * 5
    f = inspect(data)
    assert f.valid
    assert f.warnings == ["5 bytes follow the last chunk (offset 44)"]


@pytest.mark.unit
def test_header_errors() -> None:
    good = image([fill_chunk(b"abcd", 1)])
    with pytest.raises(ImageError, match="major version 2"):
        inspect(image([fill_chunk(b"abcd", 1)], major=2))
    with pytest.raises(ImageError, match="block size 4095"):
        inspect(image([fill_chunk(b"abcd", 1)], bs=4095))
    with pytest.raises(ImageError, match="file_hdr_sz 20"):
        inspect(good[:8] + struct.pack("<H", 20) + good[10:])
    with pytest.raises(ImageError, match="chunk_hdr_sz 8"):
        inspect(good[:10] + struct.pack("<H", 8) + good[12:])
    with pytest.raises(ImageError, match="truncated"):
        inspect(good[:20])
    f = inspect(image([fill_chunk(b"abcd", 1)], minor=3))
    assert f.valid and "minor version 3" in f.warnings[0]


@pytest.mark.unit
def test_sniff() -> None:
    good = image([fill_chunk(b"abcd", 1)])
    spec = sparse.SPECS[0]
    assert spec.name == "android-sparse"
    assert spec.sniff(Sniff(good, good[-64:], len(good)))
    assert not spec.sniff(Sniff(good[:27], b"", 27))
    assert not spec.sniff(Sniff(b"\x3a\xff\x26\xed" + bytes(60), b"", 64))
    assert not spec.sniff(Sniff(random.Random(1).randbytes(64), b"", 64))


# --------------------------------------------------------------------------------------------
# Expansion


@pytest.mark.unit
def test_expand_from_a_trickling_stream_to_a_pipe() -> None:
    data, _ = to_sparse(sample_raw())
    out = WriteOnly()
    size = sparse.expand(Forward(data, 5), out, Context())  # type: ignore[arg-type]
    assert size == len(out.buf)
    assert bytes(out.buf) == padded(sample_raw())


@pytest.mark.unit
def test_expand_makes_holes_and_replaces_old_content(tmp_path: Path) -> None:
    data = image([skip_chunk(300), raw_chunk(b"\x07" * BS), fill_chunk(b"\0\0\0\0", 300)])
    target = tmp_path / "out.raw"
    target.write_bytes(b"\xee" * 5_000_000)
    with open(target, "r+b") as out:
        assert sparse.expand(io.BytesIO(data), out, Context()) == 601 * BS
    content = target.read_bytes()
    assert content == bytes(300 * BS) + b"\x07" * BS + bytes(300 * BS)
    assert target.stat().st_blocks * 512 < 100 * BS  # holes, not written zeros
    assert expand(data, holes=False) == content
    assert expand(data) == content  # BytesIO cannot grow by truncate(): last byte written


@pytest.mark.unit
def test_expand_refuses_more_than_the_limit_before_writing() -> None:
    # A header claiming 2^40 bytes (2^28 blocks of 4 KiB) in DONT_CARE chunks of 2^27 blocks.
    data = image([skip_chunk(1 << 27), skip_chunk(1 << 27)])
    out = io.BytesIO()
    with pytest.raises(LimitError, match="1099511627776 bytes"):
        sparse.expand(io.BytesIO(data), out, Context())
    assert out.getvalue() == b""
    assert inspect(data).details["expanded_size"] == 1 << 40


@pytest.mark.unit
def test_expand_many_overlays_pieces() -> None:
    a = image([raw_chunk(b"\x01" * BS), skip_chunk(2)])
    b = image([skip_chunk(1), fill_chunk(b"\x02\x02\x02\x02", 1), skip_chunk(1)])
    c = image([skip_chunk(2), raw_chunk(b"\x03" * BS)])
    out = io.BytesIO()
    size = sparse.expand_many([io.BytesIO(x) for x in (a, b, c)], out, Context())
    assert size == 3 * BS
    assert out.getvalue() == b"\x01" * BS + b"\x02" * BS + b"\x03" * BS
    later_wins = io.BytesIO()
    sparse.expand_many(
        [io.BytesIO(a), io.BytesIO(image([fill_chunk(b"zzzz", 3)]))], later_wins, Context()
    )
    assert later_wins.getvalue() == b"z" * 3 * BS


@pytest.mark.unit
def test_expand_many_refuses_mismatched_pieces() -> None:
    a = image([skip_chunk(2)])
    b = image([skip_chunk(3)])
    with pytest.raises(ImageError, match="piece 1 describes 3 blocks"):
        sparse.expand_many([io.BytesIO(a), io.BytesIO(b)], io.BytesIO(), Context())
    with pytest.raises(UsageError):
        sparse.expand_many([], io.BytesIO(), Context())


# --------------------------------------------------------------------------------------------
# Creation and splitting


@pytest.mark.unit
def test_write_sparse_chunks_like_img2simg() -> None:
    raw = sample_raw()
    data, stats = to_sparse(raw)
    kinds = [(t, n, d if t == sparse.CHUNK_FILL else b"") for t, n, d in chunk_list(data)]
    assert kinds == [
        (sparse.CHUNK_RAW, 3, b""),
        (sparse.CHUNK_FILL, 2, b"\0\0\0\0"),
        (sparse.CHUNK_FILL, 3, b"\x01\x02\x03\x04"),
        (sparse.CHUNK_RAW, 1, b""),
        (sparse.CHUNK_FILL, 1, b"\0\0\0\0"),
        (sparse.CHUNK_FILL, 2, b"\xff\xff\xff\xff"),
        (sparse.CHUNK_RAW, 1, b""),  # the partial last block, padded
    ]
    assert (stats.raw_chunks, stats.fill_chunks, stats.dont_care_chunks) == (3, 4, 0)
    assert (stats.raw_blocks, stats.fill_blocks, stats.total_blocks) == (5, 8, 13)
    assert stats.to_dict()["chunks"] == 7
    assert expand(data) == padded(raw)


@pytest.mark.unit
def test_write_sparse_zeros_as_dont_care() -> None:
    raw = bytes(2 * BS) + b"\x09" * BS + bytes(BS)
    data, stats = to_sparse(raw, zeros_as_dont_care=True)
    assert [(t, n) for t, n, _ in chunk_list(data)] == [
        (sparse.CHUNK_DONT_CARE, 2),
        (sparse.CHUNK_FILL, 1),
        (sparse.CHUNK_DONT_CARE, 1),
    ]
    assert stats.dont_care_blocks == 3
    assert expand(data) == raw


@pytest.mark.unit
def test_write_sparse_rejects_bad_block_size() -> None:
    with pytest.raises(UsageError):
        to_sparse(b"x" * 100, block_size=512)
    with pytest.raises(UsageError):
        to_sparse(b"x" * 100, block_size=4098)


@pytest.mark.unit
def test_empty_image() -> None:
    data, stats = to_sparse(b"")
    assert stats.total_blocks == 0 and stats.chunks == 0
    assert inspect(data).valid
    assert expand(data) == b""
    (piece,) = sparse.split_sparse(Source.from_bytes(b""), 1 << 20, Context())
    out = io.BytesIO()
    piece.write(out, Context())
    assert expand(out.getvalue()) == b""


def write_pieces(pieces: Sequence[sparse.SparsePiece]) -> list[bytes]:
    blobs = []
    for p in pieces:
        out = io.BytesIO()
        stats = p.write(out, Context())
        assert len(out.getvalue()) == p.size == stats.output_size
        assert sparse.parse_header(out.getvalue()).total_chunks == p.chunks
        # What a sender builds from the segments (copying the ranges itself) is the same file.
        src = p.layout.source
        rebuilt = b"".join(
            seg if isinstance(seg, bytes) else src.read_at(seg[0], seg[1]) for seg in p.segments()
        )
        assert rebuilt == out.getvalue()
        blobs.append(out.getvalue())
    return blobs


def join(blobs: Sequence[bytes]) -> bytes:
    out = io.BytesIO()
    sparse.expand_many([io.BytesIO(b) for b in blobs], out, Context(limits=SMALL))
    return out.getvalue()


@pytest.mark.unit
@pytest.mark.parametrize("max_size", [BS + 64, 2 * BS + 100, 3 * BS, 10 * BS, 1 << 20])
def test_split_raw_and_sparse_images(max_size: int) -> None:
    raw = sample_raw()
    for src in (raw, to_sparse(raw)[0]):
        pieces = sparse.split_sparse(Source.from_bytes(src), max_size, Context())
        blobs = write_pieces(pieces)
        assert all(len(b) <= max_size for b in blobs)
        assert all(inspect(b).valid for b in blobs)
        assert join(blobs) == padded(raw)
    with pytest.raises(UsageError, match="too small"):
        sparse.split_sparse(Source.from_bytes(raw), BS + 63, Context())


@pytest.mark.unit
def test_split_keeps_dont_care_gaps() -> None:
    data = image(
        [skip_chunk(2), raw_chunk(b"\x01" * 2 * BS), skip_chunk(3), fill_chunk(b"qqqq", 1)]
    )
    pieces = sparse.split_sparse(Source.from_bytes(data), BS + 64, Context())
    assert [(p.first_block, p.end_block) for p in pieces] == [(2, 3), (3, 4), (7, 8)]
    assert join(write_pieces(pieces)) == expand(data)


# --------------------------------------------------------------------------------------------
# Properties


def make_raw(spec: list[tuple[str, int, int]], tail: int, bs: int) -> bytes:
    parts = []
    for kind, seed, count in spec:
        rng = random.Random(seed)
        if kind == "zero":
            parts.append(bytes(bs * count))
        elif kind == "fill":
            parts.append(rng.randbytes(4) * (bs // 4) * count)
        elif kind == "nearly":  # a pattern block with one byte changed
            for _ in range(count):
                block = bytearray(rng.randbytes(4) * (bs // 4))
                block[rng.randrange(bs)] ^= 1 + rng.randrange(255)
                parts.append(bytes(block))
        else:
            parts.append(rng.randbytes(bs * count))
    parts.append(random.Random(tail).randbytes(tail))
    return b"".join(parts)


raw_specs = st.lists(
    st.tuples(
        st.sampled_from(["zero", "fill", "nearly", "data"]),
        st.integers(0, 2**32),
        st.integers(1, 3),
    ),
    max_size=10,
)


@pytest.mark.unit
@given(spec=raw_specs, tail=st.integers(0, 1500), bs=st.sampled_from([1024, 2048, 4096]))
@settings(max_examples=120, deadline=None)
def test_write_sparse_round_trip(spec: list[tuple[str, int, int]], tail: int, bs: int) -> None:
    raw = make_raw(spec, tail, bs)
    data, stats = to_sparse(raw, block_size=bs)
    f = inspect(data)
    assert f.valid, f.problems
    assert f.details["block_size"] == bs
    assert f.details["expanded_size"] == len(padded(raw, bs)) == stats.expanded_size
    by_type = f.details["chunks_by_type"]
    assert by_type["raw"] == {"chunks": stats.raw_chunks, "blocks": stats.raw_blocks}
    assert by_type["fill"] == {"chunks": stats.fill_chunks, "blocks": stats.fill_blocks}
    assert expand(data) == padded(raw, bs)
    # Consecutive blocks of one kind share a chunk.
    chunks = chunk_list(data)
    for (t1, _, d1), (t2, _, d2) in itertools.pairwise(chunks):
        assert not (t1 == t2 == sparse.CHUNK_RAW)
        assert not (t1 == t2 == sparse.CHUNK_FILL and d1 == d2)


@pytest.mark.unit
@given(
    spec=raw_specs,
    tail=st.integers(0, 1500),
    max_blocks=st.integers(1, 6),
    slack=st.integers(0, 1023),
)
@settings(max_examples=80, deadline=None)
def test_split_round_trip(
    spec: list[tuple[str, int, int]], tail: int, max_blocks: int, slack: int
) -> None:
    bs = 1024
    raw = make_raw(spec, tail, bs)
    max_size = 64 + max_blocks * bs + slack
    pieces = sparse.split_sparse(Source.from_bytes(raw), max_size, Context(), block_size=bs)
    blobs = write_pieces(pieces)
    assert all(len(b) <= max_size for b in blobs)
    assert join(blobs) == padded(raw, bs)


@pytest.mark.unit
@given(st.binary(max_size=3000))
@FUZZ
def test_fuzz_random_bytes(data: bytes) -> None:
    check_junk(data)
    check_junk(image([])[:16] + data)


def check_junk(data: bytes) -> None:
    try:
        f = inspect(data)
    except ImageError:
        pass
    else:
        assert f.format == "android-sparse"
    with contextlib.suppress(ImageError, IntegrityError):
        expand(data)


def valid_sample() -> bytes:
    rnd = random.Random(9).randbytes(2 * 1024)
    return image(
        [
            raw_chunk(rnd, 1024),
            fill_chunk(b"abcd", 2),
            skip_chunk(1),
            crc_chunk(zlib.crc32(rnd + b"abcd" * 512 + bytes(1024))),
        ],
        bs=1024,
    )


@pytest.mark.unit
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=6),
    cut=st.integers(0, 10_000),
    extra=st.binary(max_size=40),
)
@FUZZ
def test_fuzz_mutations_of_a_valid_image(
    flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    data = bytearray(valid_sample())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    mutated = bytes(data[: max(cut, 28)]) + extra
    check_junk(mutated)
    # Header fields alone: counts and sizes at their extremes.
    for field, value in ((16, 0xFFFFFFFF), (20, 0xFFFFFFFF), (12, 0xFFFFFFFC)):
        check_junk(mutated[:field] + struct.pack("<I", value) + mutated[field + 4 :])


# --------------------------------------------------------------------------------------------
# Cross-checks with libsparse's img2simg / simg2img


def make_disk(path: Path, seed: int = 2, tail: int = 0) -> bytes:
    rng = random.Random(seed)
    parts = []
    for _ in range(40):
        kind = rng.randrange(4)
        n = rng.randint(1, 40)
        if kind == 0:
            parts.append(rng.randbytes(n * BS))
        elif kind == 1:
            parts.append(bytes(n * BS))
        elif kind == 2:
            parts.append(rng.randbytes(4) * 1024 * n)
        else:
            parts.append(b"\xff" * BS * n)
    parts.append(rng.randbytes(tail))
    raw = b"".join(parts)
    path.write_bytes(raw)
    return raw


@pytest.mark.peer
@pytest.mark.parametrize("tail", [0, 1000])
def test_img2simg_output_parses_expands_and_equals_ours(tmp_path: Path, tail: int) -> None:
    need("img2simg")
    raw_path, simg = tmp_path / "disk.img", tmp_path / "disk.simg"
    raw = make_disk(raw_path, tail=tail)
    run(["img2simg", raw_path, simg])
    theirs = simg.read_bytes()
    f = inspect(theirs, Limits())
    assert f.valid, f.problems
    assert f.details["block_size"] == BS
    assert f.details["expanded_size"] == len(padded(raw))
    kinds = [t for t, _, _ in chunk_list(theirs)]
    assert f.details["chunks_by_type"]["raw"]["chunks"] == kinds.count(sparse.CHUNK_RAW)
    assert f.details["chunks_by_type"]["fill"]["chunks"] == kinds.count(sparse.CHUNK_FILL)
    assert f.details["chunk_count"] == len(kinds)
    assert expand(theirs) == padded(raw)
    ours, _ = to_sparse(raw)
    assert ours == theirs  # byte for byte what img2simg writes


@pytest.mark.peer
def test_img2simg_custom_block_size(tmp_path: Path) -> None:
    need("img2simg")
    raw_path, simg = tmp_path / "disk.img", tmp_path / "disk.simg"
    raw = make_disk(raw_path, seed=5, tail=333)
    run(["img2simg", raw_path, simg, "1024"])
    f = inspect(simg.read_bytes(), Limits())
    assert f.valid and f.details["block_size"] == 1024
    assert expand(simg.read_bytes()) == padded(raw, 1024)
    assert to_sparse(raw, block_size=1024)[0] == simg.read_bytes()


@pytest.mark.peer
def test_simg2img_expands_our_output(tmp_path: Path) -> None:
    need("simg2img")
    raw = make_disk(tmp_path / "disk.img", seed=7, tail=77)
    for zeros_as_dont_care in (False, True):
        ours, _ = to_sparse(raw, zeros_as_dont_care=zeros_as_dont_care)
        (tmp_path / "ours.simg").write_bytes(ours)
        back = tmp_path / f"back{zeros_as_dont_care}.raw"
        run(["simg2img", tmp_path / "ours.simg", back])
        assert back.read_bytes() == padded(raw)


@pytest.mark.peer
def test_simg2img_joins_our_split_pieces(tmp_path: Path) -> None:
    need("simg2img")
    raw = make_disk(tmp_path / "disk.img", seed=11)
    pieces = sparse.split_sparse(Source.from_bytes(raw), 40 * BS, Context())
    blobs = write_pieces(pieces)
    assert len(blobs) > 3
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"part{i}.simg")
        paths[-1].write_bytes(blob)
    run(["simg2img", *paths, tmp_path / "joined.raw"])
    assert (tmp_path / "joined.raw").read_bytes() == raw == join(blobs)


@pytest.mark.peer
def test_crc_chunks_versus_simg2img(tmp_path: Path) -> None:
    """simg2img does not check CRC32 chunks (it imports without CRC); we do, and report."""
    need("simg2img")
    a = random.Random(12).randbytes(2 * BS)
    expanded = a + b"\x01\x02\x03\x04" * 1024 + bytes(BS)
    for delta in (0, 1):
        data = image(
            [
                raw_chunk(a),
                fill_chunk(b"\x01\x02\x03\x04", 1),
                skip_chunk(1),
                crc_chunk(zlib.crc32(expanded) ^ delta),
            ]
        )
        path = tmp_path / f"crc{delta}.simg"
        path.write_bytes(data)
        run(["simg2img", path, tmp_path / "out.raw"])
        assert (tmp_path / "out.raw").read_bytes() == expanded
        assert inspect(data).valid is (delta == 0)
        assert expand(data, verify_crc=False) == expanded
        if delta:
            with pytest.raises(IntegrityError):
                expand(data)
        else:
            assert expand(data) == expanded


@pytest.mark.peer
def test_longer_headers_versus_simg2img(tmp_path: Path) -> None:
    need("simg2img")
    rnd = random.Random(13).randbytes(BS)
    data = image(
        [raw_chunk(rnd, extra=4), fill_chunk(b"abcd", 2, extra=4), skip_chunk(1, extra=4)],
        file_extra=8,
        chunk_extra=4,
    )
    (tmp_path / "ext.simg").write_bytes(data)
    run(["simg2img", tmp_path / "ext.simg", tmp_path / "ext.raw"])
    assert (tmp_path / "ext.raw").read_bytes() == expand(data)


class _NoSeek(io.RawIOBase):
    """A write-only stream that cannot seek (a pipe, a socket)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += bytes(b)
        return len(b)


@given(
    st.lists(
        st.tuples(st.sampled_from(["zero", "fill", "data", "ff"]), st.integers(1, 40)),
        max_size=12,
    ),
    st.integers(0, 4095),
    st.sampled_from([1024, 4096]),
    st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_one_pass_writer_equals_two_pass_writer(
    spec: list[tuple[str, int]], tail: int, bs: int, dont_care: bool
) -> None:
    parts = []
    for i, (kind, n) in enumerate(spec):
        if kind == "zero":
            parts.append(bytes(n * bs))
        elif kind == "ff":
            parts.append(b"\xff" * (n * bs))
        elif kind == "fill":
            parts.append(b"\x01\x02\x03\x04" * (n * bs // 4))
        else:
            parts.append(bytes([i + 1, 7, 9]) * (n * bs // 3) + bytes(n * bs % 3))
    raw = b"".join(parts) + bytes(range(256))[: tail % 256] * (tail // 256 + 1)
    raw = raw[: len(raw) - (len(raw) % bs) + tail % bs] if raw else raw
    seekable = io.BytesIO()
    pipe = _NoSeek()
    kw: dict[str, Any] = {"block_size": bs, "zeros_as_dont_care": dont_care}
    s1 = sparse.write_sparse(Source.from_bytes(raw), seekable, Context(), **kw)
    s2 = sparse.write_sparse(Source.from_bytes(raw), pipe, Context(), **kw)  # type: ignore[arg-type]
    assert seekable.getvalue() == bytes(pipe.buf)
    assert s1 == s2
    assert expand(seekable.getvalue()) == padded(raw, bs)
