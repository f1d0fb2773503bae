"""Block maps for image files: which blocks hold data, found with SEEK_DATA/SEEK_HOLE.

The filesystem knows which parts of a sparse file were never written (holes): ``lseek`` with
``SEEK_DATA`` and ``SEEK_HOLE`` walks the allocated extents without reading them. Those extents,
rounded out to whole blocks, become the bmap's mapped ranges; with ``skip_zero_blocks`` the
blocks inside them that hold only zeros are left out as well (an image written without holes
still gets a useful map). The XML is written by :func:`unbrick.formats.bmap.generate_bmap`
(format 2.0, SHA-256 range checksums), which ``bmaptool copy`` accepts, and the file is written
atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unbrick.errors import SourceError, UsageError
from unbrick.formats import bmap as bmapfmt
from unbrick.formats.base import Context, MiB, Source
from unbrick.transports.block.image import FLASH_LIMITS

_SCAN = 4 * MiB


@dataclass(frozen=True)
class BmapReport:
    """What a generated bmap says about its image."""

    path: str
    image_size: int
    block_size: int
    mapped_blocks: int
    ranges: int
    #: "seek-data" (the filesystem's extents) or "whole-file" (no hole information).
    extents_from: str

    @property
    def mapped_bytes(self) -> int:
        return min(self.mapped_blocks * self.block_size, self.image_size)


def data_extents(fd: int, size: int) -> tuple[list[tuple[int, int]], str]:
    """Byte extents (offset, length) of ``fd`` that hold data, by SEEK_DATA/SEEK_HOLE.

    Returns the whole file as one extent (and "whole-file") where the filesystem cannot tell.
    """
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                out.append((start, end - start))
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return ([(0, size)] if size else []), "whole-file"
        raise
    return out, "seek-data"


def _blocks(extents: list[tuple[int, int]], bs: int) -> list[tuple[int, int]]:
    """Inclusive block ranges covering the byte extents, merged."""
    out: list[tuple[int, int]] = []
    for off, n in extents:
        first, last = off // bs, (off + n - 1) // bs
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def _nonzero(fd: int, size: int, ranges: list[tuple[int, int]], bs: int) -> list[tuple[int, int]]:
    """The blocks of ``ranges`` that hold a non-zero byte."""
    out: list[tuple[int, int]] = []
    zero_block = bytes(bs)
    step = max(bs, (_SCAN // bs) * bs)
    zero_step = bytes(step)

    def mark(block: int) -> None:
        if out and out[-1][1] == block - 1:
            out[-1] = (out[-1][0], block)
        else:
            out.append((block, block))

    for first, last in ranges:
        pos = first * bs
        end = min((last + 1) * bs, size)
        while pos < end:
            n = min(step, end - pos)
            buf = os.pread(fd, n, pos)
            if len(buf) != n:
                raise SourceError(f"the image ended early at offset {pos + len(buf)}")
            if buf != zero_step[:n]:
                base = pos // bs
                for i in range(0, n, bs):
                    k = min(bs, n - i)
                    if not buf.startswith(zero_block if k == bs else zero_block[:k], i):
                        mark(base + i // bs)
            pos += n
    return out


def generate_bmap_text(
    image: str | Path, *, block_size: int = 4096, skip_zero_blocks: bool = False
) -> tuple[str, BmapReport]:
    """The bmap (XML text) of the raw image file ``image`` and a summary of it."""
    if block_size <= 0 or block_size % 512:
        raise UsageError(f"block size {block_size} must be a positive multiple of 512")
    path = str(image)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise SourceError(f"{path}: cannot open: {e.strerror}") from e
    with f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        try:
            extents, how = data_extents(fd, size)
            ranges = _blocks(extents, block_size)
            if skip_zero_blocks:
                ranges = _nonzero(fd, size, ranges, block_size)
        except OSError as e:
            raise SourceError(f"{path}: cannot map its data: {e.strerror}") from e
        src = Source(f, size=size, name=path)
        text = bmapfmt.generate_bmap(src, Context(limits=FLASH_LIMITS), block_size, ranges)
    report = BmapReport(
        path=path,
        image_size=size,
        block_size=block_size,
        mapped_blocks=sum(last - first + 1 for first, last in ranges),
        ranges=len(ranges),
        extents_from=how,
    )
    return text, report


def write_bmap(
    image: str | Path,
    output: str | Path | None = None,
    *,
    block_size: int = 4096,
    skip_zero_blocks: bool = False,
) -> BmapReport:
    """Write the bmap of ``image`` to ``output`` (default ``IMAGE.bmap``), atomically."""
    out = Path(output) if output is not None else Path(str(image) + ".bmap")
    text, report = generate_bmap_text(
        image, block_size=block_size, skip_zero_blocks=skip_zero_blocks
    )
    try:
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise SourceError(f"{out}: cannot create: {e.strerror}") from e
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SourceError(f"{out}: cannot write: {e.strerror}") from e
    return report
