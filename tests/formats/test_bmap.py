"""bmaptool block maps: parse, verify images, generate; cross-checked with bmap-tools 3.6."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import ImageError, UsageError
from unbrick.formats import bmap
from unbrick.formats.base import Context, Findings, Limits, Sniff, Source

BS = 4096
SMALL = Limits(max_expanded_bytes=8 << 20, max_records=100_000, max_seconds=20.0)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def inspect(text: bytes, image: bytes | None = None) -> Findings:
    ctx = Context(limits=SMALL)
    if image is not None:
        ctx.companion = Source.from_bytes(image)
    return bmap.inspect(Source.from_bytes(text), ctx)


def generate(image: bytes, **kw: object) -> bytes:
    return bmap.generate_bmap(Source.from_bytes(image), Context(), **kw).encode()  # type: ignore[arg-type]


def sample_image(size: int = 64 * BS + 1000) -> bytes:
    data = bytearray(size)
    rng = random.Random(1)
    for block in (0, 1, 2, 10, 30, 31, 64):
        start = block * BS
        data[start : start + BS] = rng.randbytes(BS)[: max(0, size - start)]
    return bytes(data[:size])


def ranges_in(text: bytes) -> list[list[int]]:
    """The ranges written in a bmap file, read with a regex (independently of the parser)."""
    out = []
    for m in re.finditer(rb"<Range[^>]*>\s*(\d+)(?:\s*-\s*(\d+))?\s*</Range>", text):
        first = int(m.group(1))
        out.append([first, int(m.group(2) or first)])
    return out


def legacy_bmap(image: bytes, version: str, ranges: list[tuple[int, int]]) -> bytes:
    """A bmap 1.x file as bmap-tools 2.x wrote them (1.3: sha1, earlier: no checksums)."""
    with_sha = version == "1.3"
    lines = []
    for first, last in ranges:
        attr = ""
        if with_sha:
            chunk = image[first * BS : (last + 1) * BS]
            attr = f' sha1="{hashlib.sha1(chunk).hexdigest()}"'
        span = f"{first}-{last}" if first != last else f"{first}"
        lines.append(f"        <Range{attr}> {span} </Range>\n")
    blocks = -(-len(image) // BS)
    mapped = sum(last - first + 1 for first, last in ranges)
    zeros = "0" * 40
    text = (
        f'<?xml version="1.0" ?>\n<bmap version="{version}">\n'
        f"    <ImageSize> {len(image)} </ImageSize>\n"
        f"    <BlockSize> {BS} </BlockSize>\n"
        f"    <BlocksCount> {blocks} </BlocksCount>\n"
        f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n"
        + (f"    <BmapFileSHA1> {zeros} </BmapFileSHA1>\n" if with_sha else "")
        + "    <BlockMap>\n"
        + "".join(lines)
        + "    </BlockMap>\n</bmap>\n"
    )
    if with_sha:
        text = text.replace(zeros, hashlib.sha1(text.encode()).hexdigest(), 1)
    return text.encode()


# --------------------------------------------------------------------------------------------
# Parsing and checking


@pytest.mark.unit
def test_generated_bmap_details_and_verification() -> None:
    image = sample_image()
    text = generate(image)
    f = inspect(text, image)
    assert f.valid, f.problems
    d = f.details
    assert d["version"] == "2.0" and d["checksum_type"] == "sha256"
    assert d["image_size"] == len(image) and d["block_size"] == BS
    assert d["blocks_count"] == 65 and d["mapped_blocks"] == 7
    assert d["mapped_ranges"] == [[0, 2], [10, 10], [30, 31], [64, 64]] == ranges_in(text)
    assert d["bmap_checksum_ok"] is True
    assert d["image_checked"] is True and d["ranges_ok"] is True and d["bad_ranges"] == []
    assert d["ranges_checked"] == 4


@pytest.mark.unit
def test_without_the_image_only_a_warning() -> None:
    f = inspect(generate(sample_image()))
    assert f.valid
    assert f.details["image_checked"] is False and "ranges_ok" not in f.details
    assert "image not checked" in f.warnings[0]


@pytest.mark.unit
def test_bad_range_is_named() -> None:
    image = sample_image()
    text = generate(image)
    broken = bytearray(image)
    broken[30 * BS + 5000] ^= 1  # inside range 30-31
    broken[64 * BS + 999] ^= 1  # the short last block
    f = inspect(text, bytes(broken))
    assert f.problems == [
        "checksum mismatch for blocks range 30-31",
        "checksum mismatch for blocks range 64-64",
    ]
    assert f.details["ranges_ok"] is False
    assert f.details["bad_ranges"] == [[30, 31], [64, 64]]
    broken[5 * BS] = 1  # an unmapped block: not covered by the bmap
    assert inspect(text, bytes(broken)).details["bad_ranges"] == [[30, 31], [64, 64]]


@pytest.mark.unit
def test_image_size_mismatch() -> None:
    image = sample_image()
    f = inspect(generate(image), image[:-1000])
    assert f"the image is {len(image) - 1000} bytes, the bmap describes {len(image)}" in f.problems
    assert "checksum mismatch for blocks range 64-64" in f.problems


@pytest.mark.unit
def test_altered_bmap_file() -> None:
    text = generate(sample_image())
    altered = text.replace(b"<Range chksum=", b"<Range  chksum=", 1)
    f = inspect(altered)
    assert f.details["bmap_checksum_ok"] is False
    assert f.problems == ["bmap file checksum mismatch: the bmap file was altered"]
    no_sum = re.sub(rb"<BmapFileChecksum>.*</BmapFileChecksum>", b"", text)
    assert "no file checksum" in inspect(no_sum).problems[0]


@pytest.mark.unit
def test_consistency_problems() -> None:
    image = sample_image()
    text = generate(image)

    def sub(old: bytes, new: bytes) -> list[str]:
        return [p for p in inspect(text.replace(old, new)).problems if "bmap file" not in p]

    assert sub(b"<BlocksCount> 65 <", b"<BlocksCount> 66 <") == [
        "BlocksCount 66 does not match ImageSize 263144 in blocks of 4096 bytes (65)"
    ]
    assert sub(b"<MappedBlocksCount> 7 <", b"<MappedBlocksCount> 9 <") == [
        "MappedBlocksCount is 9, the ranges map 7 blocks"
    ]
    assert sub(b"> 10 </Range>", b"> 2-10 </Range>")[1] == (
        "range 2-10 overlaps or precedes the range before it"
    )
    assert sub(b"> 64 </Range>", b"> 64-70 </Range>")[1] == (
        "range 64-70 lies past the last block (64)"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"<bmap", "not well-formed"),
        (b'<bmap version="2.0"><ImageSize>1</ImageSize></bmap>', "no <BlockSize>"),
        (b'<bmap version="3.0"/>', "version 3.0 is not supported"),
        (b'<bmap version="two"/>', "not 'major.minor'"),
        (b"<notbmap/>", "root element is <notbmap>"),
        (b'<bmap version="1.2"><BlockSize>0</BlockSize></bmap>', "<BlockSize> is 0"),
        (b'<bmap version="1.2"><BlockSize>-4</BlockSize></bmap>', "not a non-negative integer"),
        (b'<bmap version="1.2"><BlockSize>\xc2\xb2</BlockSize></bmap>', "non-negative integer"),
        (
            b'<bmap version="2.0"><BlockSize>4</BlockSize><ChecksumType>crc9</ChecksumType></bmap>',
            "'crc9' is not supported",
        ),
    ],
)
def test_malformed_bmaps(text: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=re.escape(message)):
        inspect(text)


@pytest.mark.unit
def test_malformed_ranges_and_missing_block_map() -> None:
    text = generate(sample_image())
    with pytest.raises(ImageError, match="first > last"):
        inspect(text.replace(b"> 30-31 <", b"> 31-30 <"))
    with pytest.raises(ImageError, match="bad bmap range"):
        inspect(text.replace(b"> 30-31 <", b"> 30-x <"))
    with pytest.raises(ImageError, match="no <BlockMap>"):
        inspect(re.sub(rb"<BlockMap>.*</BlockMap>", b"", text, flags=re.S))


@pytest.mark.unit
def test_xml_bombs_and_entities_are_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?>\n<!DOCTYPE bmap [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n<bmap version="2.0">&b;</bmap>'
    )
    with pytest.raises(ImageError, match="not well-formed"):
        inspect(bomb)
    external = b'<!DOCTYPE bmap SYSTEM "file:///etc/passwd"><bmap version="2.0"/>'
    with pytest.raises(ImageError):
        inspect(external)


@pytest.mark.unit
@pytest.mark.parametrize("version", ["1.3", "1.2", "1.0"])
def test_legacy_versions(version: str) -> None:
    image = sample_image()
    text = legacy_bmap(image, version, [(0, 2), (10, 10), (30, 31), (64, 64)])
    f = inspect(text, image)
    assert f.valid, f.problems
    d = f.details
    assert d["mapped_ranges"] == [[0, 2], [10, 10], [30, 31], [64, 64]]
    if version == "1.3":
        assert d["checksum_type"] == "sha1" and d["bmap_checksum_ok"] is True
        assert d["ranges_ok"] is True and d["ranges_checked"] == 4
        broken = bytearray(image)
        broken[10 * BS] ^= 0xFF
        assert inspect(text, bytes(broken)).details["bad_ranges"] == [[10, 10]]
    else:
        assert d["checksum_type"] is None and d["bmap_checksum_ok"] is None
        assert d["ranges_ok"] is None and "no range checksums" in f.warnings[0]


@pytest.mark.unit
def test_sniff() -> None:
    sniff = bmap.SPECS[0].sniff
    good = [
        b'<bmap version="2.0">',
        b'\xef\xbb\xbf  \n<?xml version="1.0" ?>\n<!-- c -- c -->\n<!---->\n<bmap version="1.3">',
        b"<!-- <bmap -->\r\n\t<bmap>",
        generate(sample_image()),
    ]
    bad = [b"<bmapx>", b"<html><bmap>", b"<!-- unterminated <bmap ", b"<bmap", b"", b"bmap"]
    for head in good:
        assert sniff(Sniff(head, b"", len(head))), head
    for head in bad:
        assert not sniff(Sniff(head, b"", len(head))), head


# --------------------------------------------------------------------------------------------
# Generation


@pytest.mark.unit
def test_generate_with_given_extents() -> None:
    image = sample_image()
    text = generate(image, mapped=[(30, 33), (0, 0), (1, 2), (32, 40)])
    f = inspect(text, image)
    assert f.valid, f.problems
    assert f.details["mapped_ranges"] == [[0, 2], [30, 40]]
    assert f.details["mapped_blocks"] == 14
    with pytest.raises(UsageError, match="65-66"):
        generate(image, mapped=[(65, 66)])
    with pytest.raises(UsageError, match="positive"):
        generate(image, block_size=0)


@pytest.mark.unit
def test_generate_empty_and_all_zero_images() -> None:
    for image in (b"", bytes(3 * BS)):
        f = inspect(generate(image), image)
        assert f.valid, f.problems
        assert f.details["mapped_ranges"] == [] and f.details["ranges_ok"] is None


@pytest.mark.unit
@given(
    blocks=st.lists(st.sampled_from(["zero", "data", "sparse-byte"]), max_size=24),
    tail=st.integers(0, 1023),
    bs=st.sampled_from([512, 1024, 4096]),
    flip=st.integers(0, 1 << 20),
)
@settings(max_examples=100, deadline=None)
def test_round_trip(blocks: list[str], tail: int, bs: int, flip: int) -> None:
    rng = random.Random(len(blocks) * 7 + tail)
    parts = []
    for kind in blocks:
        if kind == "zero":
            parts.append(bytes(bs))
        elif kind == "data":
            parts.append(rng.randbytes(bs))
        else:
            block = bytearray(bs)
            block[rng.randrange(bs)] = 1 + rng.randrange(255)
            parts.append(bytes(block))
    parts.append(rng.randbytes(tail))
    image = b"".join(parts)
    text = generate(image, block_size=bs)
    parsed = bmap.parse_bmap(text)
    expected = []
    for i in range(-(-len(image) // bs)):
        if any(image[i * bs : (i + 1) * bs]):
            if expected and expected[-1][1] == i - 1:
                expected[-1] = (expected[-1][0], i)
            else:
                expected.append((i, i))
    assert parsed.mapped_ranges == expected
    assert parsed.bmap_checksum_ok is True
    assert parsed.image_size == len(image) and parsed.block_size == bs
    f = inspect(text, image)
    assert f.valid, f.problems
    if image:
        pos = flip % len(image)
        broken = bytearray(image)
        broken[pos] ^= 0x80
        block = pos // bs
        hit = [list(r) for r in expected if r[0] <= block <= r[1]]
        assert inspect(text, bytes(broken)).details["bad_ranges"] == hit


@pytest.mark.unit
@given(st.binary(max_size=2000), st.sampled_from([b"", b'<bmap version="2.0">']))
@FUZZ
def test_fuzz_random_bytes(data: bytes, prefix: bytes) -> None:
    check_junk(prefix + data)


def check_junk(text: bytes, image: bytes | None = None) -> None:
    try:
        f = inspect(text, image)
    except ImageError:
        return
    assert f.format == "bmap"


VALID = legacy_bmap(sample_image(8 * BS), "1.3", [(0, 2), (5, 5)])
VALID2 = generate(sample_image(12 * BS))


@pytest.mark.unit
@given(
    which=st.booleans(),
    edits=st.lists(
        st.tuples(st.integers(0, 4000), st.sampled_from(list(b'0123456789-<>/"= a\x00\xff'))),
        max_size=8,
    ),
    cut=st.integers(0, 4000),
)
@FUZZ
def test_fuzz_mutations(which: bool, edits: list[tuple[int, int]], cut: int) -> None:
    text = bytearray(VALID if which else VALID2)
    for pos, value in edits:
        text[pos % len(text)] = value
    check_junk(bytes(text[:cut] if cut > 10 else text), sample_image(12 * BS))


# --------------------------------------------------------------------------------------------
# Cross-checks with bmaptool


def sparse_file(path: Path) -> bytes:
    """A sparse image: truncate, then data written at several offsets (as dd conv=notrunc)."""
    size = 8 * 1024 * 1024 + 1234
    rng = random.Random(42)
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    for offset, length in ((5000, 5), (1 << 20, 20000), (3 << 20, 3 * BS), (size - 100, 100)):
        (path.parent / "chunk").write_bytes(rng.randbytes(length))
        subprocess.run(
            [
                "dd",
                f"if={path.parent / 'chunk'}",
                f"of={path}",
                "bs=1",
                f"seek={offset}",
                "conv=notrunc",
                "status=none",
            ],
            check=True,
        )
    return path.read_bytes()


@pytest.mark.peer
def test_bmaptool_create_parses_and_verifies(tmp_path: Path) -> None:
    need("bmaptool", "truncate", "dd")
    img = tmp_path / "disk.img"
    image = sparse_file(img)
    run(["bmaptool", "create", "-o", tmp_path / "disk.bmap", img])
    text = (tmp_path / "disk.bmap").read_bytes()
    f = inspect(text, image)
    assert f.valid, f.problems
    d = f.details
    assert d["mapped_ranges"] == ranges_in(text)
    assert [tuple(r) for r in d["mapped_ranges"]] == bmap.parse_bmap(text).mapped_ranges
    # The allocated extents are the blocks with data here, so ours agree.
    ours = bmap.parse_bmap(generate(image))
    assert ours.mapped_ranges == [tuple(r) for r in d["mapped_ranges"]]
    assert d["bmap_checksum_ok"] is True and d["ranges_ok"] is True
    assert d["ranges_checked"] == len(d["mapped_ranges"]) >= 4
    assert d["image_size"] == len(image)


@pytest.mark.peer
def test_corrupt_range_named_like_bmaptool(tmp_path: Path) -> None:
    need("bmaptool", "truncate", "dd")
    img = tmp_path / "disk.img"
    image = bytearray(sparse_file(img))
    run(["bmaptool", "create", "-o", tmp_path / "disk.bmap", img])
    image[(1 << 20) + 12345] ^= 0x55
    img.write_bytes(image)
    proc = subprocess.run(
        ["bmaptool", "copy", "--bmap", tmp_path / "disk.bmap", img, tmp_path / "out.img"],
        capture_output=True,
    )
    assert proc.returncode != 0
    m = re.search(rb"checksum mismatch for blocks range (\d+)-(\d+)", proc.stderr)
    assert m is not None, proc.stderr.decode()
    f = inspect((tmp_path / "disk.bmap").read_bytes(), bytes(image))
    named = f"checksum mismatch for blocks range {m.group(1).decode()}-{m.group(2).decode()}"
    assert f.problems == [named]
    assert f.details["bad_ranges"] == [[int(m.group(1)), int(m.group(2))]]


@pytest.mark.peer
def test_bmaptool_rejects_what_we_reject(tmp_path: Path) -> None:
    need("bmaptool")
    image = sample_image()
    (tmp_path / "disk.img").write_bytes(image)
    text = generate(image).replace(b"<Range chksum=", b"<Range  chksum=", 1)
    (tmp_path / "disk.bmap").write_bytes(text)
    proc = subprocess.run(
        [
            "bmaptool",
            "copy",
            "--bmap",
            tmp_path / "disk.bmap",
            tmp_path / "disk.img",
            tmp_path / "out.img",
        ],
        capture_output=True,
    )
    assert proc.returncode != 0 and b"checksum mismatch for bmap file" in proc.stderr
    assert inspect(text).details["bmap_checksum_ok"] is False


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["nonzero", "extents", "legacy-1.3", "legacy-1.2"])
def test_bmaptool_copy_accepts_our_bmaps(tmp_path: Path, kind: str) -> None:
    need("bmaptool")
    image = sample_image()
    img = tmp_path / "disk.img"
    img.write_bytes(image)
    if kind == "nonzero":
        text = generate(image)
    elif kind == "extents":
        text = generate(image, mapped=[(0, 5), (9, 40), (60, 64)])
    else:
        text = legacy_bmap(image, kind[-3:], [(0, 2), (10, 10), (30, 31), (64, 64)])
    (tmp_path / "disk.bmap").write_bytes(text)
    out = tmp_path / "out.img"
    run(["bmaptool", "copy", "--bmap", tmp_path / "disk.bmap", img, out])
    assert out.read_bytes() == image
    assert inspect(text, image).valid
