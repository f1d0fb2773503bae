"""Compressed streams: gzip, xz, zstd, bzip2 (decoding, header facts, limits, nesting)."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats import compress
from unbrick.formats.base import Context, Findings, Limits, Source
from unbrick.formats.compress import compression_of, open_decompressor
from unbrick.formats.detect import inspect_source
from unbrick.formats.nested import ExpansionBudget, inspect_stream

MiB = 1 << 20
FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_expanded_bytes=16 * MiB, max_records=500_000, max_seconds=20.0)


def inspect(data: bytes, limits: Limits | None = None) -> Findings:
    return inspect_source(Source.from_bytes(data), Context(limits=limits or Limits()))


def expand(name: str, data: bytes, limits: Limits | None = None) -> bytes:
    return open_decompressor(name, io.BytesIO(data), Context(limits=limits or Limits())).read()


def sample(n: int = 200_000, seed: int = 1) -> bytes:
    """Compressible but not trivial data."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{i // 7}".encode()).hexdigest().encode() + b"\n"
        i += 1
    return bytes(out[:n])


def compress_with(name: str, data: bytes) -> bytes:
    if name == "gzip":
        return gzip.compress(data, mtime=0)
    if name == "xz":
        return lzma.compress(data)
    if name == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return bz2.compress(data)


NAMES = ("gzip", "xz", "zstd", "bzip2")


# --- detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_compression_of_recognises_each_format(name: str) -> None:
    blob = compress_with(name, b"some data")
    assert compression_of(blob[:64]) == name
    assert inspect(blob).format == name


def test_compression_of_rejects_near_misses() -> None:
    assert compression_of(b"") is None
    assert compression_of(b"\x1f\x8b\x07" + bytes(20)) is None  # not deflate
    assert compression_of(b"\x1f\x8b\x08\xe0" + bytes(20)) is None  # reserved flags
    assert compression_of(b"\xfd7zXZ\x00\x00\x01" + b"\x00\x00\x00\x00") is None  # bad CRC
    assert compression_of(b"\x28\xb5\x2f\xfd\x08\x00") is None  # reserved bit
    assert compression_of(b"BZh0" + bytes.fromhex("314159265359")) is None
    assert compression_of(b"BZh9" + bytes(6)) is None
    assert compression_of(b"\x50\x2a\x4d\x18" + bytes(4)) == "zstd"  # skippable frame


def test_unknown_compression_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        open_decompressor("lz4", io.BytesIO(b""), Context())


# --- decoding and details -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inspect_reports_size_hash_and_ratio(name: str) -> None:
    data = sample()
    blob = compress_with(name, data)
    f = inspect(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["compressed_size"] == len(blob)
    assert d["expanded_size"] == len(data)
    assert d["expanded_sha256"] == hashlib.sha256(data).hexdigest()
    assert d["ratio"] == round(len(data) / len(blob), 3)
    assert d["inner_format"] == "raw"
    assert d["inner"]["size"] == len(data)


def test_small_reads_and_read_all_agree() -> None:
    data = sample(50_000)
    dec = open_decompressor("gzip", io.BytesIO(gzip.compress(data)), Context())
    assert dec.read(0) == b""
    parts = [dec.read(7) for _ in range(10)]
    rest = dec.read()
    assert b"".join(parts) + rest == data
    assert dec.read(10) == b""
    assert dec.compressed_bytes == len(gzip.compress(data))


def test_gzip_header_facts() -> None:
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = raw.compress(b"payload") + raw.flush()
    header = b"\x1f\x8b\x08" + bytes([0x08 | 0x10 | 0x02 | 0x04 | 0x01])
    header += struct.pack("<IBB", 1_700_000_000, 2, 11)
    header += struct.pack("<H", 4) + b"ab\x00\x00" + "fïle.bin".encode("latin-1") + b"\x00"
    header += b"a comment\x00"
    header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    blob = header + body + struct.pack("<II", zlib.crc32(b"payload"), 7)
    f = inspect(blob)
    assert f.valid, f.problems
    d = f.details
    assert d["original_name"] == "fïle.bin"
    assert d["comment"] == "a comment"
    assert d["mtime"] == 1_700_000_000
    assert d["os"] == "ntfs"
    assert d["header_crc"] and d["text_flag"]
    assert d["member_count"] == 1
    bad = bytearray(blob)
    bad[len(header) - 1] ^= 0xFF
    f = inspect(bytes(bad))
    assert not f.valid and "header CRC-16 mismatch" in f.problems[0]


def test_multi_member_gzip_is_one_stream() -> None:
    parts = [sample(10_000, seed=i) for i in range(3)]
    blob = b"".join(gzip.compress(p) for p in parts)
    assert expand("gzip", blob) == b"".join(parts)
    f = inspect(blob)
    assert f.valid and f.details["member_count"] == 3


def test_concatenated_xz_with_padding_and_checks() -> None:
    a = lzma.compress(b"first ", check=lzma.CHECK_CRC32)
    b = lzma.compress(b"second", check=lzma.CHECK_SHA256)
    f = inspect(a + bytes(8) + b + bytes(4))
    assert f.valid, f.problems
    assert f.details["stream_count"] == 2
    assert f.details["check"] == "crc32"
    assert f.details["checks"] == ["crc32", "sha256"]
    assert f.details["expanded_size"] == 12
    assert f.warnings == []
    # Padding that is not a multiple of four between streams is corrupt.
    f = inspect(a + bytes(3) + b)
    assert not f.valid and "not a multiple of 4" in f.problems[0]


def test_zstd_frames_skippable_frames_and_content_size() -> None:
    c = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    skip = struct.pack("<II", 0x184D2A53, 5) + b"hello"
    blob = c.compress(b"abc" * 1000) + skip + c.compress(b"xyz" * 10)
    f = inspect(blob)
    assert f.valid, f.problems
    d = f.details
    assert (d["frame_count"], d["skippable_frame_count"]) == (2, 1)
    assert d["content_size"] == 3030 == d["expanded_size"]
    assert d["checksum_flag"] is True
    nocheck = zstandard.ZstdCompressor(write_checksum=False, write_content_size=False)
    f = inspect(nocheck.compress(b"abc"))
    assert f.details["checksum_flag"] is False and f.details["content_size"] is None


def test_multi_stream_bzip2() -> None:
    blob = bz2.compress(b"one", 1) + bz2.compress(b"two", 9)
    f = inspect(blob)
    assert f.valid
    assert f.details["stream_count"] == 2
    assert f.details["block_size_level"] == 1
    assert f.details["block_size"] == 100_000
    assert expand("bzip2", blob) == b"onetwo"


@pytest.mark.parametrize("name", NAMES)
def test_trailing_garbage_is_a_problem_and_padding_a_warning(name: str) -> None:
    blob = compress_with(name, b"data " * 100)
    f = inspect(blob + b"GARBAGE!")
    assert not f.valid
    assert "8 bytes of trailing data" in f.problems[0]
    assert f.details["expanded_size"] == 500
    f = inspect(blob + bytes(5))
    assert f.valid
    assert "5 bytes of padding" in f.warnings[0]
    f = inspect(blob + b"\xff" * 512)
    assert f.valid and f.warnings


@pytest.mark.parametrize("name", NAMES)
def test_truncated_stream_is_invalid(name: str) -> None:
    blob = compress_with(name, sample(30_000))
    for cut in (len(blob) - 1, len(blob) // 2, 12):
        f = inspect(blob[:cut])
        assert f.format == name
        assert not f.valid
        assert f.details["expanded_size"] is None
        with pytest.raises(ImageError):
            expand(name, blob[:cut])
    f = inspect(blob[: len(blob) // 2])
    assert re.search(r"(truncated after \d+ bytes|corrupt)", f.problems[0]), f.problems


def test_gzip_truncation_message() -> None:
    blob = gzip.compress(sample(30_000))
    with pytest.raises(ImageError, match=r"gzip stream truncated after \d+ bytes"):
        expand("gzip", blob[:-3])


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_payload_is_invalid(name: str) -> None:
    data = sample(60_000)
    blob = bytearray(compress_with(name, data))
    blob[len(blob) // 2] ^= 0x55
    f = inspect(bytes(blob))
    assert f.format == name
    assert not f.valid


def test_gzip_crc_and_length_mismatch() -> None:
    blob = bytearray(gzip.compress(b"hello world"))
    blob[-8] ^= 1
    with pytest.raises(ImageError, match="CRC-32 mismatch"):
        expand("gzip", bytes(blob))
    blob = bytearray(gzip.compress(b"hello world"))
    blob[-4] ^= 1
    with pytest.raises(ImageError, match="length mismatch"):
        expand("gzip", bytes(blob))


def test_gzip_header_errors() -> None:
    good = gzip.compress(b"x")
    with pytest.raises(ImageError, match="empty"):
        expand("gzip", b"")
    with pytest.raises(ImageError, match="not deflate"):
        expand("gzip", good[:2] + b"\x07" + good[3:])
    with pytest.raises(ImageError, match="reserved flag"):
        expand("gzip", good[:3] + b"\x20" + good[4:])
    with pytest.raises(ImageError, match="not a gzip stream"):
        expand("gzip", b"PK\x03\x04" + bytes(20))
    long_name = b"\x1f\x8b\x08\x08" + bytes(6) + b"n" * 70_000 + b"\x00"
    with pytest.raises(ImageError, match="longer than"):
        expand("gzip", long_name)
    with pytest.raises(ImageError, match="truncated"):
        expand("gzip", b"\x1f\x8b\x08\x08" + bytes(6) + b"name")


def test_xz_header_errors_and_memory_limit() -> None:
    good = lzma.compress(b"x" * 100)
    with pytest.raises(ImageError, match="empty"):
        expand("xz", b"")
    with pytest.raises(ImageError, match="corrupt or uses unknown flags"):
        expand("xz", good[:7] + b"\x03" + good[8:])
    with pytest.raises(ImageError, match="not an xz stream"):
        expand("xz", b"\x00" * 20)
    # Rewrite the LZMA2 dictionary size of the first block to 3 GiB (and fix its CRC).
    blob = bytearray(good)
    size = (blob[12] + 1) * 4
    header = blob[12 : 12 + size - 4]
    assert header[2] == 0x21  # LZMA2 filter id, props size 1, then the dictionary byte
    header[4] = 39
    blob[12 : 12 + size] = bytes(header) + struct.pack("<I", zlib.crc32(header))
    with pytest.raises(LimitError, match="MiB of memory"):
        expand("xz", bytes(blob))


def test_zstd_header_errors() -> None:
    good = zstandard.ZstdCompressor().compress(b"x" * 100)
    with pytest.raises(ImageError, match="empty"):
        expand("zstd", b"")
    with pytest.raises(ImageError, match="reserved header bit"):
        expand("zstd", good[:4] + bytes([good[4] | 0x08]) + good[5:])
    with pytest.raises(ImageError, match="needs dictionary 7"):
        # single segment, 1-byte dictionary id, 1-byte content size
        expand("zstd", compress.ZSTD_MAGIC + b"\x21\x07\x03" + b"\x01\x00\x00")
    with pytest.raises(LimitError, match="window"):
        # window descriptor: exponent 31 -> 2^41 bytes
        expand("zstd", compress.ZSTD_MAGIC + b"\x00" + bytes([31 << 3]) + b"\x01\x00\x00")
    frame = compress.ZSTD_MAGIC + b"\x20\x03"  # single segment, content size 3
    with pytest.raises(ImageError, match="reserved block type"):
        expand("zstd", frame + struct.pack("<I", 1 | (3 << 1) | (3 << 3))[:3])
    with pytest.raises(ImageError, match="larger than 128 KiB"):
        expand("zstd", frame + struct.pack("<I", 1 | (200_000 << 3))[:3])
    raw_block = struct.pack("<I", 1 | (0 << 1) | (3 << 3))[:3] + b"abc"
    assert expand("zstd", frame + raw_block) == b"abc"
    wrong = compress.ZSTD_MAGIC + b"\x20\x05" + raw_block  # declares 5 bytes
    with pytest.raises(ImageError):
        expand("zstd", wrong)
    with pytest.raises(ImageError, match="truncated"):
        expand("zstd", struct.pack("<II", 0x184D2A50, 100) + b"short")
    with pytest.raises(ImageError, match="not a zstd stream"):
        expand("zstd", b"\x00" * 8)


def test_bzip2_header_errors() -> None:
    good = bz2.compress(b"x" * 100)
    with pytest.raises(ImageError, match="empty"):
        expand("bzip2", b"")
    with pytest.raises(ImageError, match="block size digit"):
        expand("bzip2", b"BZh0" + good[4:])
    with pytest.raises(ImageError, match="not a bzip2 stream"):
        expand("bzip2", b"XYZ" + good[3:])


# --- limits -------------------------------------------------------------------------------


def zeros_bomb(name: str, size: int) -> bytes:
    chunk = bytes(MiB)
    if name == "zstd":
        cobj = zstandard.ZstdCompressor(level=1).compressobj()
    elif name == "xz":
        cobj = lzma.LZMACompressor(preset=0)
    elif name == "bzip2":
        cobj = bz2.BZ2Compressor(9)
    else:
        cobj = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [cobj.compress(chunk) for _ in range(size // MiB)]
    out.append(cobj.flush())
    return b"".join(out)


@pytest.mark.parametrize("name", NAMES)
def test_bomb_over_max_expanded_bytes(name: str) -> None:
    blob = zeros_bomb(name, 48 * MiB)
    limits = Limits(max_expanded_bytes=8 * MiB)
    with pytest.raises(LimitError) as err:
        inspect(blob, limits)
    msg = err.value.message
    assert msg.startswith("decompression bomb:")
    assert re.search(r"expanded to \d+ bytes from \d+ \(ratio \d+\)", msg), msg
    assert "max_expanded_bytes" in msg


@pytest.mark.parametrize("name", NAMES)
def test_bomb_over_max_ratio(name: str) -> None:
    blob = zeros_bomb(name, 48 * MiB)
    limits = Limits(max_ratio=50.0, ratio_grace_bytes=4 * MiB)
    with pytest.raises(LimitError, match=r"ratio.*max_ratio"):
        inspect(blob, limits)
    # Within the grace allowance nothing is refused.
    small = zeros_bomb(name, 2 * MiB)
    assert inspect(small, limits).valid


def test_budget_is_shared_between_streams() -> None:
    ctx = Context(limits=Limits(max_expanded_bytes=3 * MiB))
    budget = ExpansionBudget(ctx.limits)
    blob = gzip.compress(bytes(2 * MiB))
    assert len(open_decompressor("gzip", io.BytesIO(blob), ctx, budget=budget).read()) == 2 * MiB
    with pytest.raises(LimitError, match="other streams"):
        open_decompressor("gzip", io.BytesIO(blob), ctx, budget=budget).read()


def nest_gzip(data: bytes, levels: int) -> bytes:
    for _ in range(levels):
        data = gzip.compress(data, mtime=0)
    return data


def test_nesting_depth_is_limited() -> None:
    limits = Limits(max_depth=4)
    ok = inspect(nest_gzip(b"core", 5), limits)
    assert ok.valid
    inner = ok.details["inner"]
    for _ in range(3):
        assert inner["format"] == "gzip"
        inner = inner["details"]["inner"]
    assert inner["format"] == "gzip"
    assert inner["details"]["inner_format"] == "raw"
    with pytest.raises(LimitError, match="nested deeper than 4"):
        inspect(nest_gzip(b"core", 6), limits)


def test_nested_corruption_is_reported_by_the_inner_level() -> None:
    inner = bytearray(gzip.compress(sample(20_000)))
    inner[len(inner) // 2] ^= 0xFF
    f = inspect(xz_of(bytes(inner)))
    assert f.format == "xz"
    assert not f.valid
    assert f.details["inner_format"] == "gzip"
    assert f.problems[0].startswith("inside the xz data: ")
    assert f.details["inner"]["problems"]
    # The outer stream was fine: it was read to the end and hashed.
    assert f.details["expanded_sha256"] == hashlib.sha256(inner).hexdigest()


def test_outer_corruption_is_not_blamed_on_the_inner_stream() -> None:
    inner = gzip.compress(sample(300_000))
    outer = bytearray(bz2.compress(inner))
    outer[len(outer) // 2] ^= 0xFF
    f = inspect(bytes(outer))
    assert not f.valid
    assert f.problems[0].startswith("bzip2 stream is corrupt"), f.problems


def xz_of(data: bytes) -> bytes:
    return lzma.compress(data)


def test_inspect_stream_of_plain_data() -> None:
    result = inspect_stream(io.BytesIO(b"\x7fELF" + bytes(100)), Context())
    assert result["size"] == 104
    assert result["sha256"] == hashlib.sha256(b"\x7fELF" + bytes(100)).hexdigest()
    assert result["problems"] == []


# --- Hypothesis round trips and fuzzing ---------------------------------------------------


@given(
    name=st.sampled_from(NAMES),
    pieces=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    level=st.integers(1, 9),
)
@FAST
def test_round_trip_multi_member(name: str, pieces: list[bytes], level: int) -> None:
    if name == "gzip":
        blob = b"".join(gzip.compress(p, compresslevel=level, mtime=0) for p in pieces)
    elif name == "xz":
        blob = b"".join(lzma.compress(p, preset=level) for p in pieces)
    elif name == "zstd":
        blob = b"".join(zstandard.ZstdCompressor(level=level).compress(p) for p in pieces)
    else:
        blob = b"".join(bz2.compress(p, level) for p in pieces)
    data = b"".join(pieces)
    assert expand(name, blob) == data
    f = inspect(blob)
    assert f.valid, f.problems
    assert f.details["expanded_size"] == len(data)
    count = {"gzip": "member_count", "xz": "stream_count", "zstd": "frame_count"}
    assert f.details[count.get(name, "stream_count")] == len(pieces)
    if name == "bzip2":
        assert f.details["block_size_level"] == level


@given(
    name=st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=40),
    mtime=st.integers(0, 2**32 - 1),
    os_id=st.sampled_from([0, 3, 7, 11, 255]),
    data=st.binary(max_size=500),
)
@FAST
def test_round_trip_gzip_header(name: str, mtime: int, os_id: int, data: bytes) -> None:
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = raw.compress(data) + raw.flush()
    flags = 0x08 if name else 0
    header = b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<IBB", mtime, 0, os_id)
    if name:
        header += name.encode("latin-1") + b"\x00"
    blob = header + body + struct.pack("<II", zlib.crc32(data), len(data))
    f = inspect(blob)
    assert f.valid, f.problems
    assert f.details["original_name"] == (name or None)
    assert f.details["mtime"] == mtime
    assert f.details["expanded_size"] == len(data)


def check(name: str, data: bytes) -> None:
    with contextlib.suppress(ImageError):
        assert isinstance(expand(name, data, SMALL), bytes)
    try:
        f = inspect_source(Source.from_bytes(data), Context(limits=SMALL))
    except ImageError:
        return
    assert isinstance(f, Findings)


@given(name=st.sampled_from(NAMES), data=st.binary(max_size=2048))
@FUZZ
def test_fuzz_random_bytes(name: str, data: bytes) -> None:
    prefix = {"gzip": b"\x1f\x8b\x08", "xz": compress.XZ_MAGIC, "zstd": compress.ZSTD_MAGIC}
    check(name, data)
    check(name, prefix.get(name, b"BZh9") + data)


VALID = {n: compress_with(n, sample(3000)) for n in NAMES}


@given(
    name=st.sampled_from(NAMES),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, 10**6),
    extra=st.binary(max_size=64),
)
@FUZZ
def test_fuzz_mutated_streams(
    name: str, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    blob = bytearray(VALID[name])
    for pos, x in flips:
        blob[pos % len(blob)] ^= x
    blob = blob[: max(1, cut % (len(blob) + 1))] + extra
    check(name, bytes(blob))
    f = None
    try:
        f = inspect_source(Source.from_bytes(bytes(blob)), Context(limits=SMALL))
    except ImageError:
        return
    if f.valid and f.format == name:
        # A stream that passes its checks expands to something, with a hash.
        assert f.details["expanded_sha256"]


# --- cross-checks against the real tools --------------------------------------------------


def tool_expand(argv: list[str], path: Path) -> bytes:
    return run([*argv, str(path)]).stdout


def sha256sum(data: bytes, tmp: Path) -> str:
    """What ``sha256sum`` says of ``data`` (the tools' decompressed output)."""
    out = tmp.with_suffix(".out")
    out.write_bytes(data)
    return run(["sha256sum", out]).stdout.decode().split()[0]


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.bin"
    p.write_bytes(sample(300_000) + bytes(100_000) + sample(50_000, seed=9))
    return p


@pytest.mark.peer
def test_peer_gzip(tmp_path: Path, payload: Path) -> None:
    need("gzip")
    named = tmp_path / "named.gz"
    named.write_bytes(run(["gzip", "-c", "-9", payload]).stdout)
    anon = tmp_path / "anon.gz"
    anon.write_bytes(run(["gzip", "-n", "-c", payload]).stdout)
    both = tmp_path / "both.gz"
    both.write_bytes(named.read_bytes() + anon.read_bytes())
    for path in (named, anon, both):
        f = inspect(path.read_bytes())
        assert f.valid, f.problems
        out = tool_expand(["gzip", "-dc"], path)
        assert f.details["expanded_size"] == len(out)
        assert f.details["expanded_sha256"] == sha256sum(out, path)
    listing = run(["gzip", "-l", "-N", named]).stdout.decode().splitlines()[1].split()
    f = inspect(named.read_bytes())
    assert int(listing[0]) == f.details["compressed_size"]
    assert int(listing[1]) == f.details["expanded_size"]
    assert listing[3].endswith("payload.bin")
    assert f.details["original_name"] == "payload.bin"
    assert f.details["mtime"] == int(payload.stat().st_mtime)
    anon_f = inspect(anon.read_bytes())
    assert anon_f.details["original_name"] is None and anon_f.details["mtime"] == 0
    assert inspect(both.read_bytes()).details["member_count"] == 2


def xz_robot(path: Path) -> list[str]:
    out = run(["xz", "-l", "--robot", path]).stdout.decode()
    return next(line for line in out.splitlines() if line.startswith("file\t")).split("\t")


@pytest.mark.peer
@pytest.mark.parametrize("check_type", ["crc32", "crc64", "sha256", "none"])
def test_peer_xz(tmp_path: Path, payload: Path, check_type: str) -> None:
    need("xz")
    one = tmp_path / "one.xz"
    one.write_bytes(run(["xz", "-c", f"--check={check_type}", payload]).stdout)
    two = tmp_path / "two.xz"
    two.write_bytes(one.read_bytes() + run(["xz", "-c", "-0", payload]).stdout)
    for path, streams in ((one, 1), (two, 2)):
        f = inspect(path.read_bytes())
        assert f.valid, f.problems
        robot = xz_robot(path)
        # file, streams, blocks, compressed, uncompressed, ratio, check, padding
        assert int(robot[1]) == streams == f.details["stream_count"]
        assert int(robot[3]) == f.details["compressed_size"]
        assert int(robot[4]) == f.details["expanded_size"]
        assert set(robot[6].lower().replace("-", "").split(",")) == set(f.details["checks"])
        assert f.details["check"] == check_type
        out = tool_expand(["xz", "-dc"], path)
        assert f.details["expanded_sha256"] == sha256sum(out, path)


@pytest.mark.peer
@pytest.mark.parametrize("flags", [[], ["--no-check"], ["-19"]])
def test_peer_zstd(tmp_path: Path, payload: Path, flags: list[str]) -> None:
    need("zstd")
    one = tmp_path / "one.zst"
    one.write_bytes(run(["zstd", "-q", "-c", *flags, payload]).stdout)
    two = tmp_path / "two.zst"
    two.write_bytes(one.read_bytes() + run(["zstd", "-q", "-c", "-1", payload]).stdout)
    for path, frames in ((one, 1), (two, 2)):
        f = inspect(path.read_bytes())
        assert f.valid, f.problems
        verbose = run(["zstd", "-lv", path]).stdout.decode()
        assert f"# Zstandard Frames: {frames}" in verbose
        m = re.search(r"Decompressed Size:.*\((\d+) B\)", verbose)
        assert m and int(m.group(1)) == f.details["expanded_size"] == f.details["content_size"]
        c = re.search(r"Compressed Size:.*\((\d+) B\)", verbose)
        assert c and int(c.group(1)) == f.details["compressed_size"]
        assert f.details["frame_count"] == frames
        out = tool_expand(["zstd", "-dc"], path)
        assert f.details["expanded_sha256"] == sha256sum(out, path)
    check_line = re.search(r"Check: (\S+)", run(["zstd", "-lv", one]).stdout.decode())
    assert check_line is not None
    assert (check_line.group(1) == "XXH64") == inspect(one.read_bytes()).details["checksum_flag"]


@pytest.mark.peer
@pytest.mark.parametrize("level", ["-1", "-9"])
def test_peer_bzip2(tmp_path: Path, payload: Path, level: str) -> None:
    need("bzip2")
    one = tmp_path / "one.bz2"
    one.write_bytes(run(["bzip2", "-c", level, payload]).stdout)
    two = tmp_path / "two.bz2"
    two.write_bytes(one.read_bytes() * 2)
    for path, streams in ((one, 1), (two, 2)):
        f = inspect(path.read_bytes())
        assert f.valid, f.problems
        assert f.details["stream_count"] == streams
        assert f.details["block_size_level"] == int(level[1:])
        out = tool_expand(["bzip2", "-dc"], path)
        assert f.details["expanded_sha256"] == sha256sum(out, path)


TOOLS = {
    "gzip": (["gzip", "-c"], ["gzip", "-t"]),
    "xz": (["xz", "-c"], ["xz", "-t"]),
    "zstd": (["zstd", "-q", "-c"], ["zstd", "-q", "-t"]),
    "bzip2": (["bzip2", "-c"], ["bzip2", "-t"]),
}


@pytest.mark.peer
@pytest.mark.parametrize("name", NAMES)
def test_peer_corruption_is_caught_by_both(tmp_path: Path, payload: Path, name: str) -> None:
    make, test = TOOLS[name]
    need(make[0])
    blob = run([*make, payload]).stdout
    good = tmp_path / f"good.{name}"
    good.write_bytes(blob)
    run([*test, good])
    assert inspect(blob).valid
    for where in (len(blob) // 3, len(blob) // 2, len(blob) - 6):
        bad = bytearray(blob)
        bad[where] ^= 0x21
        path = tmp_path / f"bad-{where}.{name}"
        path.write_bytes(bytes(bad))
        proc = subprocess.run([*test, str(path)], capture_output=True, check=False)
        assert proc.returncode != 0, f"{name} -t accepted a corrupt file"
        f = inspect(bytes(bad))
        assert f.format == name
        assert not f.valid, f"corruption at {where} went unnoticed"
    truncated = tmp_path / f"cut.{name}"
    truncated.write_bytes(blob[:-10])
    assert subprocess.run([*test, str(truncated)], capture_output=True).returncode != 0
    assert not inspect(blob[:-10]).valid


@pytest.mark.peer
def test_peer_gzip_trailing_garbage(tmp_path: Path, payload: Path) -> None:
    need("gzip")
    path = tmp_path / "tail.gz"
    path.write_bytes(run(["gzip", "-c", payload]).stdout + b"trailing garbage")
    proc = subprocess.run(["gzip", "-t", str(path)], capture_output=True, check=False)
    assert proc.returncode != 0 and b"trailing garbage" in proc.stderr
    f = inspect(path.read_bytes())
    assert not f.valid and "16 bytes of trailing data" in f.problems[0]


@pytest.mark.peer
@pytest.mark.parametrize("name", ["gzip", "zstd"])
def test_peer_bomb_300mib(tmp_path: Path, name: str) -> None:
    need(name)
    zero = subprocess.run(
        ["head", "-c", str(300 * MiB), "/dev/zero"], capture_output=True, check=True
    ).stdout
    blob = subprocess.run([name, "-c", "-1"], input=zero, capture_output=True, check=True).stdout
    del zero
    assert len(blob) < 2 * MiB
    with pytest.raises(LimitError, match="decompression bomb"):
        inspect(blob, Limits(max_expanded_bytes=32 * MiB))
    with pytest.raises(LimitError, match="max_ratio"):
        inspect(blob, Limits(max_ratio=100.0, ratio_grace_bytes=8 * MiB))


@pytest.mark.peer
def test_peer_nested_gzip_depth(tmp_path: Path) -> None:
    need("gzip")
    data = b"innermost"
    for _ in range(6):
        data = subprocess.run(["gzip", "-c"], input=data, capture_output=True).stdout
    with pytest.raises(LimitError, match="nested deeper"):
        inspect(data, Limits(max_depth=4))
    assert inspect(data, Limits(max_depth=5)).valid
