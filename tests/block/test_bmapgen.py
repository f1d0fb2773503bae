"""bmap generation (SEEK_DATA/SEEK_HOLE, zero blocks), cross-checked with bmaptool copy, and a
property test of writing through generated bmaps."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.block.conftest import PATTERN, MiB, fill, make_image, read
from tests.conftest import need, run
from unbrick.formats.base import Context, Source
from unbrick.formats.bmap import check_ranges, parse_bmap
from unbrick.transports.block.bmapgen import data_extents, generate_bmap_text, write_bmap
from unbrick.transports.block.writer import WriteOptions, write_image


def test_extents_follow_the_holes(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 8 * MiB, [(0, 4096), (2 * MiB, 100_000), (8 * MiB - 4096, 4096)])
    with open(img, "rb") as f:
        extents, how = data_extents(f.fileno(), 8 * MiB)
    if how != "seek-data" or len(extents) == 1:
        pytest.skip("this filesystem does not report holes")
    covered = [(o, o + n) for o, n in extents]
    for off, n in [(0, 4096), (2 * MiB, 100_000), (8 * MiB - 4096, 4096)]:
        assert any(a <= off and off + n <= b for a, b in covered)
    assert sum(n for _, n in extents) < 2 * MiB


def test_generated_bmap_parses_and_matches_the_image(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 4 * MiB + 100, [(4096, 8192), (3 * MiB, 5000), (4 * MiB, 100)])
    report = write_bmap(img)
    bmap_path = tmp_path / "disk.img.bmap"
    bm = parse_bmap(bmap_path.read_bytes())
    assert bm.bmap_checksum_ok and bm.version == "2.0"
    assert bm.image_size == report.image_size == 4 * MiB + 100
    assert bm.mapped_blocks == report.mapped_blocks and len(bm.ranges) == report.ranges
    with open(img, "rb") as f:
        assert all(ok for _, ok in check_ranges(bm, Source(f), Context()))
    assert oct(bmap_path.stat().st_mode & 0o777) == "0o644"


def test_zero_blocks_inside_data_are_left_out(tmp_path: Path) -> None:
    img = tmp_path / "dense.img"
    data = bytearray(2 * MiB)  # written in full: no holes at all
    data[8192:8200] = b"nonzero!"
    data[MiB + 4095] = 1  # the last byte of block 256
    img.write_bytes(bytes(data))
    text, report = generate_bmap_text(img, skip_zero_blocks=True)
    bm = parse_bmap(text.encode())
    assert [(r.first, r.last) for r in bm.ranges] == [(2, 2), (256, 256)]
    assert report.mapped_bytes == 8192
    text, report = generate_bmap_text(img)
    assert report.mapped_bytes == 2 * MiB or report.extents_from == "seek-data"


@pytest.mark.peer
def test_bmaptool_copy_accepts_our_bmap(tmp_path: Path) -> None:
    need("bmaptool")
    img = tmp_path / "disk.img"
    content = make_image(img, 6 * MiB + 512, [(0, 70_000), (3 * MiB, 4096), (6 * MiB, 512)])
    write_bmap(img, tmp_path / "ours.bmap")
    out = tmp_path / "out.img"
    run(["bmaptool", "copy", "--bmap", tmp_path / "ours.bmap", img, out])
    assert read(out) == content


@pytest.mark.peer
def test_bmaptool_detects_corruption_with_our_bmap(tmp_path: Path) -> None:
    need("bmaptool")
    img = tmp_path / "disk.img"
    make_image(img, 2 * MiB, [(MiB, 8192)])
    write_bmap(img, tmp_path / "ours.bmap")
    with open(img, "r+b") as f:
        f.seek(MiB + 10)
        f.write(b"X")
    import subprocess

    proc = subprocess.run(
        ["bmaptool", "copy", "--bmap", str(tmp_path / "ours.bmap"), str(img), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "checksum mismatch for blocks range 256-257" in proc.stderr


@given(
    blocks=st.lists(st.integers(0, 63), max_size=12, unique=True),
    tail=st.integers(0, 4095),
    seed=st.integers(0, 1 << 16),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_round_trip_through_a_generated_bmap(
    tmp_path: Path, blocks: list[int], tail: int, seed: int
) -> None:
    """Any layout: the mapped blocks arrive, every other byte of the target is untouched."""
    size = 64 * 4096 + tail
    rng = random.Random(seed)
    extents = []
    for b in blocks:
        off = b * 4096 + rng.randrange(0, 4000)
        extents.append((off, min(rng.randrange(1, 9000), size - off)))
    name = f"img-{seed}-{tail}-{len(blocks)}"
    img = tmp_path / f"{name}.img"
    content = make_image(img, size, extents, seed)
    bmap = tmp_path / f"{name}.bmap"
    write_bmap(img, bmap)
    target = tmp_path / f"{name}.out"
    tsize = (size // 4096 + 2) * 4096
    fill(target, tsize)
    result = write_image(img, [target], bmap=bmap, options=WriteOptions(chunk_bytes=8192))
    assert result.ok, result.to_dict()
    got = read(target)
    bm = parse_bmap(bmap.read_bytes())
    mapped = bytearray(tsize)
    for r in bm.ranges:
        off, n = bm.byte_range(r)
        mapped[off : off + n] = b"\x01" * n
    assert len(got) == tsize
    for i in range(0, tsize, 512):
        j = i + 512
        if mapped[i] and i < size:
            assert got[i : min(j, size)] == content[i : min(j, size)]
        elif not any(mapped[i:j]):
            assert got[i:j] == (PATTERN * 256)[(i % 4) : (i % 4) + (j - i)]
    # Every byte with data is in a mapped block.
    assert all(mapped[k] for k in range(size) if content[k])
    for p in (img, bmap, target):
        os.unlink(p)
