"""Images: sizes stated by containers (xz indexes, zstd frames), detection, bmap discovery;
round trips and fuzzing."""

from __future__ import annotations

import io
import lzma
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.block.conftest import MiB, make_image
from unbrick.errors import UnbrickError
from unbrick.transports.block.image import (
    Image,
    find_bmap,
    xz_expanded_size,
    zstd_expanded_size,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pieces = st.lists(st.binary(max_size=3000), min_size=1, max_size=4)


@pytest.mark.unit
@given(parts=pieces, pad=st.lists(st.integers(0, 3), min_size=4, max_size=4))
@settings(max_examples=60, deadline=None)
def test_xz_index_size_round_trip(parts: list[bytes], pad: list[int]) -> None:
    blob = b"".join(lzma.compress(p) + b"\0\0\0\0" * pad[i] for i, p in enumerate(parts))
    assert xz_expanded_size(io.BytesIO(blob), len(blob)) == sum(len(p) for p in parts)


@pytest.mark.unit
@given(parts=pieces, skip=st.binary(max_size=40))
@settings(max_examples=60, deadline=None)
def test_zstd_frame_size_round_trip(parts: list[bytes], skip: bytes) -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True)
    skippable = b"\x50\x2a\x4d\x18" + len(skip).to_bytes(4, "little") + skip
    blob = skippable + b"".join(cctx.compress(p) for p in parts)
    assert zstd_expanded_size(io.BytesIO(blob), len(blob)) == sum(len(p) for p in parts)
    streamed = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    no_size = streamed.compress(parts[0]) + streamed.flush()
    assert zstd_expanded_size(io.BytesIO(no_size), len(no_size)) is None


@pytest.mark.unit
@given(data=st.binary(max_size=300), magic=st.sampled_from([b"", b"\xfd7zXZ\x00", b"YZ"]))
@FUZZ
def test_size_parsers_fuzz(data: bytes, magic: bytes) -> None:
    for blob in (magic + data, data + magic):
        for fn in (xz_expanded_size, zstd_expanded_size):
            got = fn(io.BytesIO(blob), len(blob))
            assert got is None or (isinstance(got, int) and got >= 0)


@given(
    magic=st.sampled_from(
        [
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03",
            b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4\x46",
            b"\x28\xb5\x2f\xfd\x24\x00",
            b"BZh91AY&SY",
            b"PK\x03\x04",
            b"\x3a\xff\x26\xed\x01\x00\x00\x00\x1c\x00\x0c\x00",
        ]
    ),
    data=st.binary(max_size=400),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_opening_garbage_gives_typed_errors(tmp_path: Path, magic: bytes, data: bytes) -> None:
    path = tmp_path / "fuzz.img"
    path.write_bytes(magic + data)
    try:
        with Image(path, bmap=None) as img:
            img.precheck()
            sink: list[tuple[int, int]] = []
            img.produce(lambda off, d: sink.append((off, len(d))), 65536, lambda: False)
    except UnbrickError:
        pass


def test_gzip_stream_opened_and_counted(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    content = make_image(raw, MiB + 3, [(0, 1000), (MiB, 3)])
    gz = tmp_path / "disk.img.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz.write_bytes(comp.compress(content) + comp.flush())
    with Image(gz, bmap=None) as img:
        assert (img.info.container, img.info.size_bytes, img.info.size_source) == (
            "gzip",
            None,
            "unknown",
        )
        assert img.needs_precheck()
        img.precheck()
        assert (img.info.size_bytes, img.info.size_source) == (MiB + 3, "counted")
        got = bytearray()
        img.produce(lambda off, d: got.extend(d), 65536, lambda: False)
    assert bytes(got) == content


@pytest.mark.unit
def test_find_bmap_by_bmaptool_names(tmp_path: Path) -> None:
    img = tmp_path / "core-image.wic.gz"
    img.write_bytes(b"")
    assert find_bmap(img) is None
    (tmp_path / "core-image.wic.bmap").write_text("x")
    assert find_bmap(img) == tmp_path / "core-image.wic.bmap"
    (tmp_path / "core-image.wic.gz.bmap").write_text("x")
    assert find_bmap(img) == tmp_path / "core-image.wic.gz.bmap"
    plain = tmp_path / "sd.img"
    (tmp_path / "sd.bmap").write_text("x")
    assert find_bmap(plain) == tmp_path / "sd.bmap"
