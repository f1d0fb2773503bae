"""Block maps (bmaptool's ``.bmap`` XML): parse, check, verify an image against one, generate.

A bmap lists the blocks of an image that hold data ("mapped" ranges), so that a flasher copies
only those. Format 2.0 (bmap-tools 3.x)::

    <bmap version="2.0">
        <ImageSize> bytes </ImageSize>
        <BlockSize> bytes </BlockSize>
        <BlocksCount> ceil(ImageSize / BlockSize) </BlocksCount>
        <MappedBlocksCount> n </MappedBlocksCount>
        <ChecksumType> sha256 </ChecksumType>
        <BmapFileChecksum> hex </BmapFileChecksum>
        <BlockMap> <Range chksum="hex"> A-B </Range> <Range chksum="hex"> C </Range> </BlockMap>
    </bmap>

Versions 1.3 (and earlier 1.x) used SHA-1 only, with ``sha1`` attributes and ``BmapFileSHA1``;
1.0-1.2 have no checksums; 1.4 is 2.0 under an earlier number. The bmap file checksum is the
hash of the file with the first occurrence of the stored hex digest replaced by as many ASCII
zeros, which is how bmaptool checks it. A range checksum covers the range's bytes of the image,
shortened at the end of the image. XML is parsed with defusedxml: no DTDs, no entities.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats.base import Context, Counter, Findings, FormatSpec, MiB, Sniff, Source

FORMAT = "bmap"
#: Largest bmap file read (a 1 TiB image with a million fragments needs about 110 MiB).
MAX_BMAP_BYTES = 256 * MiB
#: How many mapped ranges ``details`` lists, and how many bad ranges become problems.
MAX_LISTED_RANGES = 100_000
MAX_RANGE_PROBLEMS = 20
#: Checksum types accepted in ``ChecksumType`` (fixed-length hashlib digests).
CHECKSUM_TYPES = ("sha1", "sha224", "sha256", "sha384", "sha512", "md5", "blake2b", "blake2s")

_SPACE = re.compile(rb"[ \t\r\n]*")
_DIGITS = re.compile(r"[0-9]{1,30}")
_IO = 4 * MiB


@dataclass(frozen=True)
class BmapRange:
    """Blocks ``first``..``last`` (inclusive) and their checksum (None when absent)."""

    first: int
    last: int
    checksum: str | None = None

    @property
    def blocks(self) -> int:
        return self.last - self.first + 1


@dataclass
class Bmap:
    """A parsed bmap file."""

    version: str
    image_size: int
    block_size: int
    blocks_count: int
    mapped_blocks: int
    #: hashlib name of the range and file checksums; None before format 1.3.
    checksum_type: str | None
    #: The stored BmapFileChecksum (BmapFileSHA1 in 1.3), and whether it matches the file.
    bmap_checksum: str | None
    bmap_checksum_ok: bool | None
    ranges: list[BmapRange] = field(default_factory=list)

    @property
    def mapped_ranges(self) -> list[tuple[int, int]]:
        return [(r.first, r.last) for r in self.ranges]

    def byte_range(self, r: BmapRange) -> tuple[int, int]:
        """(offset, length) of a range in the image, cut at ``image_size``."""
        start = r.first * self.block_size
        end = min((r.last + 1) * self.block_size, self.image_size)
        return start, max(0, end - start)


def _sniff(sn: Sniff) -> bool:
    text = sn.head
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    pos = 0
    for _ in range(256):
        m = _SPACE.match(text, pos)
        pos = m.end() if m else pos
        if text.startswith(b"<?", pos):
            opener, closer = b"<?", b"?>"
        elif text.startswith(b"<!--", pos):
            opener, closer = b"<!--", b"-->"
        else:
            break
        end = text.find(closer, pos + len(opener))
        if end < 0:
            return False
        pos = end + len(closer)
    after = text[pos + 5 : pos + 6]
    return text.startswith(b"<bmap", pos) and after != b"" and after in b" \t\r\n>/"


def _text(root: Element, tag: str) -> str | None:
    el = root.find(tag)
    if el is None:
        return None
    return (el.text or "").strip()


def _int(root: Element, tag: str) -> int:
    value = _text(root, tag)
    if value is None:
        raise ImageError(f"bmap has no <{tag}> element", format=FORMAT)
    if not _DIGITS.fullmatch(value):
        raise ImageError(
            f"bmap <{tag}> is not a non-negative integer: {value[:40]!r}", format=FORMAT
        )
    return int(value)


def _parse_range(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in text.split("-", 1)]
    if not all(_DIGITS.fullmatch(p) for p in parts):
        raise ImageError(f"bad bmap range {text[:60]!r}", format=FORMAT)
    first = int(parts[0])
    last = int(parts[1]) if len(parts) > 1 else first
    if first > last:
        raise ImageError(f"bad bmap range (first > last): {text[:60]!r}", format=FORMAT)
    return first, last


def _version(text: str | None) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,4})\.(\d{1,4})", (text or "").strip())
    if m is None:
        raise ImageError(f"bmap version {text!r} is not 'major.minor'", format=FORMAT)
    return int(m.group(1)), int(m.group(2))


def file_checksum(text: bytes, stored: str, checksum_type: str) -> str:
    """The bmap file checksum as bmaptool computes it: hash of ``text`` with the first
    occurrence of ``stored`` replaced by zeros (as many as the digest has hex digits)."""
    h = hashlib.new(checksum_type)
    width = len(h.hexdigest())
    pos = text.find(stored.encode("ascii", "replace")) if stored else -1
    if pos >= 0:
        text = text[:pos] + b"0" * width + text[pos + width :]
    h.update(text)
    return h.hexdigest()


def parse_bmap(text: bytes, ctx: Context | None = None) -> Bmap:
    """Parse a bmap file (ImageError when malformed) and check its own checksum."""
    ctx = ctx or Context()
    if len(text) > MAX_BMAP_BYTES:
        raise LimitError(f"bmap file is larger than {MAX_BMAP_BYTES} bytes")
    try:
        root = SafeET.fromstring(text, forbid_dtd=True)
    except (ParseError, defusedxml.DefusedXmlException) as e:
        raise ImageError(f"bmap is not well-formed XML: {e}", format=FORMAT) from e
    except ValueError as e:  # undecodable text
        raise ImageError(f"bmap text cannot be decoded: {e}", format=FORMAT) from e
    if root.tag != "bmap":
        raise ImageError(f"root element is <{root.tag[:40]}>, not <bmap>", format=FORMAT)
    version = (root.get("version") or "").strip()
    major, minor = _version(version)
    if major > 2:
        raise ImageError(
            f"bmap format version {version} is not supported (up to 2.x)", format=FORMAT
        )
    block_size = _int(root, "BlockSize")
    if block_size == 0:
        raise ImageError("bmap <BlockSize> is 0", format=FORMAT)
    checksum_type: str | None = None
    attr = file_tag = ""
    if major >= 2 or (major, minor) == (1, 4):
        checksum_type = (_text(root, "ChecksumType") or "").lower()
        if checksum_type not in CHECKSUM_TYPES:
            raise ImageError(
                f"bmap <ChecksumType> {checksum_type[:40]!r} is not supported", format=FORMAT
            )
        attr, file_tag = "chksum", "BmapFileChecksum"
    elif (major, minor) == (1, 3):
        checksum_type, attr, file_tag = "sha1", "sha1", "BmapFileSHA1"
    bmap = Bmap(
        version=version,
        image_size=_int(root, "ImageSize"),
        block_size=block_size,
        blocks_count=_int(root, "BlocksCount"),
        mapped_blocks=_int(root, "MappedBlocksCount"),
        checksum_type=checksum_type,
        bmap_checksum=_text(root, file_tag) if file_tag else None,
        bmap_checksum_ok=None,
    )
    if checksum_type and bmap.bmap_checksum is not None:
        bmap.bmap_checksum_ok = (
            file_checksum(text, bmap.bmap_checksum, checksum_type) == bmap.bmap_checksum
        )
    block_map = root.find("BlockMap")
    if block_map is None:
        raise ImageError("bmap has no <BlockMap> element", format=FORMAT)
    counter = Counter(ctx, "bmap ranges")
    for el in block_map.findall("Range"):
        counter.tick()
        first, last = _parse_range(el.text or "")
        bmap.ranges.append(BmapRange(first, last, el.get(attr) if attr else None))
    return bmap


def _hash_range(src: Source, bmap: Bmap, r: BmapRange, ctx: Context) -> str:
    h = hashlib.new(bmap.checksum_type or "sha256")
    start, length = bmap.byte_range(r)
    length = max(0, min(length, src.size - start))
    if length:
        for piece in src.chunks(start, length, _IO):
            h.update(piece)
            ctx.check_time()
    return h.hexdigest()


def check_ranges(bmap: Bmap, src: Source, ctx: Context) -> Iterator[tuple[BmapRange, bool]]:
    """Hash each mapped range of the image ``src``: (range, checksum matches) for each range
    that has a checksum, streaming, in bmap order."""
    if bmap.checksum_type is None:
        return
    for r in bmap.ranges:
        if r.checksum is not None:
            yield r, _hash_range(src, bmap, r, ctx) == r.checksum


def _consistency(f: Findings, bmap: Bmap) -> None:
    blocks = -(-bmap.image_size // bmap.block_size)
    if bmap.blocks_count != blocks:
        f.problem(
            f"BlocksCount {bmap.blocks_count} does not match ImageSize {bmap.image_size} "
            f"in blocks of {bmap.block_size} bytes ({blocks})"
        )
    mapped = sum(r.blocks for r in bmap.ranges)
    if mapped != bmap.mapped_blocks:
        f.problem(f"MappedBlocksCount is {bmap.mapped_blocks}, the ranges map {mapped} blocks")
    prev = -1
    for r in bmap.ranges:
        if r.first <= prev:
            f.problem(f"range {r.first}-{r.last} overlaps or precedes the range before it")
            break
        prev = r.last
    beyond = [r for r in bmap.ranges if r.last >= bmap.blocks_count]
    if beyond:
        f.problem(
            f"range {beyond[0].first}-{beyond[0].last} lies past the last block "
            f"({bmap.blocks_count - 1})"
        )
    if bmap.checksum_type:
        missing = sum(1 for r in bmap.ranges if r.checksum is None)
        if missing:
            f.warnings.append(f"{missing} ranges have no checksum and cannot be verified")


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format=FORMAT)
    if src.size > MAX_BMAP_BYTES:
        raise LimitError(f"bmap file is larger than {MAX_BMAP_BYTES} bytes")
    bmap = parse_bmap(src.read_at(0, src.size, "bmap file"), ctx)
    d: dict[str, Any] = f.details
    d["version"] = bmap.version
    d["image_size"] = bmap.image_size
    d["block_size"] = bmap.block_size
    d["blocks_count"] = bmap.blocks_count
    d["mapped_blocks"] = bmap.mapped_blocks
    d["range_count"] = len(bmap.ranges)
    d["mapped_ranges"] = [[r.first, r.last] for r in bmap.ranges[:MAX_LISTED_RANGES]]
    if len(bmap.ranges) > MAX_LISTED_RANGES:
        d["mapped_ranges_truncated"] = True
    d["checksum_type"] = bmap.checksum_type
    d["bmap_checksum_ok"] = bmap.bmap_checksum_ok
    if bmap.checksum_type and bmap.bmap_checksum is None:
        f.problem("bmap has no file checksum element although its version requires one")
    elif bmap.bmap_checksum_ok is False:
        f.problem("bmap file checksum mismatch: the bmap file was altered")
    _consistency(f, bmap)
    image = ctx.companion
    d["image_checked"] = image is not None
    if image is None:
        f.warnings.append("image not checked: give the image file to verify the mapped ranges")
        return f
    if image.size != bmap.image_size:
        f.problem(f"the image is {image.size} bytes, the bmap describes {bmap.image_size}")
    bad: list[list[int]] = []
    checked = 0
    for r, ok in check_ranges(bmap, image, ctx):
        checked += 1
        if not ok:
            if len(bad) < MAX_RANGE_PROBLEMS:
                f.problem(f"checksum mismatch for blocks range {r.first}-{r.last}")
            bad.append([r.first, r.last])
    if len(bad) > MAX_RANGE_PROBLEMS:
        f.problem(f"... and {len(bad) - MAX_RANGE_PROBLEMS} more ranges with a bad checksum")
    d["ranges_checked"] = checked
    d["ranges_ok"] = not bad if checked else None
    d["bad_ranges"] = bad[:MAX_LISTED_RANGES]
    if not checked and bmap.ranges:
        f.warnings.append("the bmap has no range checksums: the image content was not verified")
    return f


# --------------------------------------------------------------------------------------------
# Generation


def _nonzero_ranges(src: Source, ctx: Context, bs: int) -> list[tuple[int, int]]:
    """Ranges of blocks that hold a non-zero byte."""
    ranges: list[tuple[int, int]] = []
    counter = Counter(ctx, "bmap ranges")
    zero_block = bytes(bs)
    step = max(bs, (_IO // bs) * bs)
    zero_step = bytes(step)

    def mark(block: int) -> None:
        if ranges and ranges[-1][1] == block - 1:
            ranges[-1] = (ranges[-1][0], block)
        else:
            counter.tick()
            ranges.append((block, block))

    for offset in range(0, src.size, step):
        buf = src.read_at(offset, min(step, src.size - offset), "image data")
        ctx.check_time()
        if buf == zero_step[: len(buf)]:
            continue
        base = offset // bs
        for i in range(0, len(buf), bs):
            if not buf.startswith(zero_block[: len(buf) - i], i):
                mark(base + i // bs)
    return ranges


def _normalise(mapped: Sequence[tuple[int, int]], blocks: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in sorted(mapped):
        if not 0 <= first <= last < blocks:
            raise UsageError(f"mapped range {first}-{last} is not within blocks 0-{blocks - 1}")
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def generate_bmap(
    src: Source,
    ctx: Context,
    block_size: int = 4096,
    mapped: Sequence[tuple[int, int]] | None = None,
) -> str:
    """A bmap 2.0 file (sha256) for the image ``src``, as ``bmaptool create`` writes one.

    ``mapped`` lists the allocated extents as inclusive (first_block, last_block) pairs (from
    FIEMAP or SEEK_DATA, which this pure code cannot call); they are sorted and merged. Without
    it, every block holding a non-zero byte is mapped.
    """
    if block_size <= 0:
        raise UsageError(f"block size {block_size} must be positive")
    bs = block_size
    blocks = -(-src.size // bs)
    ranges = _nonzero_ranges(src, ctx, bs) if mapped is None else _normalise(mapped, blocks)
    probe = Bmap("2.0", src.size, bs, blocks, 0, "sha256", None, None)
    lines = []
    count = 0
    for first, last in ranges:
        r = BmapRange(first, last)
        digest = _hash_range(src, probe, r, ctx)
        count += r.blocks
        span = f"{first}-{last}" if first != last else f"{first}"
        lines.append(f'        <Range chksum="{digest}"> {span} </Range>\n')
    zeros = "0" * 64
    text = (
        '<?xml version="1.0" ?>\n'
        "<!-- Block map of an image: only the listed (mapped) blocks hold data and need\n"
        "     copying; each range carries the sha256 of its bytes. Generated by unbrick. -->\n"
        '<bmap version="2.0">\n'
        f"    <ImageSize> {src.size} </ImageSize>\n"
        f"    <BlockSize> {bs} </BlockSize>\n"
        f"    <BlocksCount> {blocks} </BlocksCount>\n"
        f"    <MappedBlocksCount> {count} </MappedBlocksCount>\n"
        "    <ChecksumType> sha256 </ChecksumType>\n"
        f"    <BmapFileChecksum> {zeros} </BmapFileChecksum>\n"
        "    <BlockMap>\n" + "".join(lines) + "    </BlockMap>\n"
        "</bmap>\n"
    )
    digest = hashlib.sha256(text.encode()).hexdigest()
    return text.replace(zeros, digest, 1)


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=FORMAT,
        sniff=_sniff,
        inspect=inspect,
        priority=60,
        summary="bmaptool block map (XML): mapped ranges, bmap checksum, image range checksums",
    ),
)
