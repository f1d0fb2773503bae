"""Disk images to write: detection, expanded size, block maps, and the stream of pieces.

An image is a raw disk image or an Android sparse image, possibly compressed (gzip, xz, zstd,
bzip2; see :mod:`unbrick.formats.compress`) or inside a zip archive, optionally described by a
bmaptool block map (``.bmap``). Compressed images are read as streams, once per pass, never
copied to a temporary file.

:class:`Image` opens one and produces its *pieces* — ``(offset, bytes)`` in increasing offset
order — through a callback, from one thread:

- a raw file: the mapped ranges of its bmap, or everything, read with ``pread``;
- a compressed raw image: the stream, with unmapped bytes read and dropped;
- an Android sparse file: its RAW and FILL chunks (DONT_CARE blocks are not written); inside a
  compressed stream it is expanded in full (DONT_CARE blocks become zeros);

Before writing, :meth:`Image.precheck` makes sure that nothing is written from a bad image:
every range checksum of the bmap is checked (a seekable file is hashed on two threads; a stream
is read once more), and a stream whose expanded size no header states is counted. A failure
names the ranges, in bmaptool's words: ``checksum mismatch for blocks range A-B``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from unbrick.errors import ImageError, IntegrityError, LimitError, SourceError, UsageError
from unbrick.formats import bmap as bmapfmt
from unbrick.formats.base import HEAD_SIZE, Context, Limits, MiB, Source, Stream
from unbrick.formats.nested import Prefixed, SourceStream, read_full

if TYPE_CHECKING:
    import zipfile

log = logging.getLogger(__name__)

#: Limits for flashing: the target's size bounds the output, not a ratio or a clock (a slow
#: card may take hours; a disk image of zeros compresses 30 000:1).
FLASH_LIMITS = Limits(max_expanded_bytes=1 << 62, max_ratio=1e15, max_seconds=1e9)

COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2")
#: File name endings dropped when looking for the bmap of a compressed image.
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".xz", ".zst", ".zstd", ".bz2", ".zip")
#: Names a disk image inside a zip archive usually has.
_IMAGE_SUFFIXES = (".img", ".raw", ".iso", ".wic", ".sdcard", ".bin", ".dd", ".simg", ".hddimg")
_ZIP_LOCAL = b"PK\x03\x04"
_SPARSE_MAGIC = struct.pack("<I", 0xED26FF3A)
#: bytes -> a piece handed on for writing; returns nothing, may block.
Emit = Callable[[int, bytes], None]
#: (phase, done_bytes, total_bytes) while checking or counting.
CheckProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ImageInfo:
    """What was found out about an image before writing it."""

    path: str
    #: "raw", "gzip", "xz", "zstd", "bzip2" or "zip" (the outer container).
    container: str
    #: The zip member written, when ``container`` is "zip".
    member: str | None
    #: Compressions unwrapped inside the container, outermost first (e.g. ["gzip"]).
    compressions: tuple[str, ...]
    #: "raw" or "android-sparse".
    layout: str
    #: Bytes of the expanded image; None until counted.
    size_bytes: int | None
    #: Where the size came from: "file", "sparse-header", "zip-directory", "xz-index",
    #: "zstd-frames", "bmap", "counted" or "unknown".
    size_source: str
    bmap_path: str | None = None
    #: Bytes written to each target (the mapped bytes); None while the size is unknown.
    mapped_bytes: int | None = None
    #: Whether the bmap's range checksums were checked before writing.
    prechecked: bool = False

    @property
    def seekable(self) -> bool:
        return self.container == "raw"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "container": self.container,
            "member": self.member,
            "compressions": list(self.compressions),
            "layout": self.layout,
            "size_bytes": self.size_bytes,
            "size_source": self.size_source,
            "bmap_path": self.bmap_path,
            "mapped_bytes": self.mapped_bytes,
            "prechecked": self.prechecked,
        }


def find_bmap(image: Path) -> Path | None:
    """The bmap beside ``image``, by bmaptool's naming: ``IMAGE.bmap``, then the name without
    its compression suffix (``disk.img.gz`` -> ``disk.img.bmap``), then without its extension."""
    name = image.name
    candidates = [image.with_name(name + ".bmap")]
    stripped = name
    for suffix in _COMPRESSED_SUFFIXES:
        if stripped.endswith(suffix):
            stripped = stripped[: -len(suffix)]
            candidates.append(image.with_name(stripped + ".bmap"))
            break
    stem, dot, _ = stripped.rpartition(".")
    if dot and stem:
        candidates.append(image.with_name(stem + ".bmap"))
    return next((c for c in candidates if c.is_file()), None)


# ---------------------------------------------------------------------------------------------
# Sizes stated by containers (no decompression)


def _mbi(data: bytes, pos: int) -> tuple[int, int]:
    """An xz multibyte integer at ``pos``: (value, next position)."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            raise ValueError("truncated integer")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise ValueError("integer longer than 9 bytes")


def xz_expanded_size(f: BinaryIO, size: int) -> int | None:
    """The uncompressed size recorded in the indexes of an .xz file (all its streams), read
    backwards from the end; None when the file does not have the expected structure."""
    total = 0
    pos = size
    try:
        for _ in range(10_000):
            if pos == 0:
                return total
            while pos >= 4:  # stream padding: groups of four zero bytes
                f.seek(pos - 4)
                if f.read(4) != b"\0\0\0\0":
                    break
                pos -= 4
            if pos < 24:
                return None
            f.seek(pos - 12)
            footer = f.read(12)
            if footer[10:12] != b"YZ":
                return None
            index_size = (int.from_bytes(footer[4:8], "little") + 1) * 4
            index_at = pos - 12 - index_size
            if index_at < 12 or index_size > 64 * MiB:
                return None
            f.seek(index_at)
            index = f.read(index_size)
            if not index or index[0] != 0:
                return None
            count, p = _mbi(index, 1)
            blocks = 0
            for _ in range(count):
                unpadded, p = _mbi(index, p)
                uncompressed, p = _mbi(index, p)
                blocks += (unpadded + 3) & ~3
                total += uncompressed
            start = index_at - blocks - 12
            if start < 0:
                return None
            f.seek(start)
            if f.read(6) != b"\xfd7zXZ\x00":
                return None
            pos = start
    except (ValueError, OSError):
        return None
    return None


def zstd_expanded_size(f: BinaryIO, size: int) -> int | None:
    """The sum of the content sizes the frames of a .zst file declare, walking frame and block
    headers (no decompression); None when a frame does not declare its size."""
    total = 0
    pos = 0
    try:
        while pos < size:
            f.seek(pos)
            head = f.read(18)
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528 or len(head) < 6:
                return None
            fhd = head[4]
            single = bool(fhd & 0x20)
            fcs_len = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            did_len = (0, 1, 2, 4)[fhd & 3]
            at = 5 + (0 if single else 1) + did_len
            if fcs_len == 0:
                return None
            fcs = int.from_bytes(head[at : at + fcs_len], "little")
            total += fcs + (256 if fcs_len == 2 else 0)
            pos += at + fcs_len
            while True:
                f.seek(pos)
                bh = f.read(3)
                if len(bh) < 3:
                    return None
                v = int.from_bytes(bh, "little")
                btype = (v >> 1) & 3
                pos += 3 + (1 if btype == 1 else v >> 3)
                if btype == 3:
                    return None
                if v & 1:
                    break
            if fhd & 4:
                pos += 4
        return total if pos == size else None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Streams


def _zip_errors() -> tuple[type[BaseException], ...]:
    """What zipfile (and the codecs under it) raise for damaged or unsupported archives."""
    import lzma  # noqa: PLC0415 - only for zip archives
    import zipfile  # noqa: PLC0415 - only for zip archives
    import zlib  # noqa: PLC0415 - only for zip archives

    return (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,  # compression methods zipfile lacks
        RuntimeError,  # encrypted members
        OSError,
        EOFError,
        ValueError,
        struct.error,
        OverflowError,
        IndexError,
        KeyError,
        zlib.error,
        lzma.LZMAError,
    )


class _ZipStream:
    """A zip member's bytes; zipfile's errors (bad CRC, truncation) become ImageError."""

    def __init__(self, member: Any, name: str) -> None:
        self._m = member
        self._name = name
        self._errors = _zip_errors()

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self._m.read(n)
        except self._errors as e:
            raise ImageError(f"zip member '{self._name}': {e}", format="zip") from e
        return data


def _zip_member(zf: zipfile.ZipFile, wanted: str | None, path: str) -> zipfile.ZipInfo:
    files = [zi for zi in zf.infolist() if not zi.is_dir()]
    if wanted is not None:
        for zi in files:
            if zi.filename == wanted:
                return zi
        raise UsageError(
            f"{path} has no member '{wanted}'",
            hint="members: " + ", ".join(zi.filename for zi in files[:20]),
        )
    if len(files) == 1:
        return files[0]
    images = [
        zi
        for zi in files
        if zi.filename.lower().removesuffix(".gz").removesuffix(".xz").endswith(_IMAGE_SUFFIXES)
    ]
    if len(images) == 1:
        return images[0]
    names = ", ".join(zi.filename for zi in (images or files)[:20])
    raise UsageError(
        f"{path} holds {len(files)} files and it is not clear which one is the disk image: {names}",
        hint="name the member to write (zip_member)",
    )


@dataclass
class _Opened:
    """One pass over the expanded image: the stream and what to close afterwards."""

    stream: Stream
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: Compressions unwrapped, outermost first (a zip container is not one of them).
    kinds: list[str] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except OSError:  # closing a read-only file: nothing to lose
                log.debug("close failed", exc_info=True)


# ---------------------------------------------------------------------------------------------
# The image


class Image:
    """An image opened for writing to block targets; see the module notes.

    ``bmap``: a path to a bmap file, ``None`` for no bmap, or ``"auto"`` to use the one found
    beside the image (:func:`find_bmap`). Raises SourceError (unreadable file), ImageError
    (not a usable image or bmap), IntegrityError (a bmap that does not match the image).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        bmap: str | Path | None = "auto",
        limits: Limits = FLASH_LIMITS,
        zip_member: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.limits = limits
        self._zip_member_name = zip_member
        try:
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError as e:
            raise SourceError(f"{self.path}: no such file") from e
        except IsADirectoryError as e:
            raise SourceError(f"{self.path}: is a directory, not an image file") from e
        except OSError as e:
            raise SourceError(f"{self.path}: cannot open: {e.strerror}") from e
        try:
            self._fd = self._f.fileno()
            self.file_size = self._size()
            self.bmap: bmapfmt.Bmap | None = None
            self._sparse_runs: list[tuple[int, int, bytes | None, int]] | None = None
            self._sparse_block = 0
            self._kept: dict[int, list[bytes]] | None = None
            self._kept_chunk = 0
            self.info = self._detect()
            if bmap == "auto":
                found = find_bmap(self.path)
                if found is not None:
                    log.info("using the bmap found beside the image: %s", found)
                    self._load_bmap(found)
            elif bmap is not None:
                self._load_bmap(Path(bmap))
        except BaseException:
            self._f.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _size(self) -> int:
        from unbrick.transports.block.target import device_size  # noqa: PLC0415 - one helper

        try:
            return device_size(self._fd)
        except OSError as e:
            raise SourceError(f"{self.path}: cannot read its size: {e.strerror}") from e

    def _ctx(self) -> Context:
        return Context(limits=self.limits)

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise SourceError(f"{self.path}: read failed at offset {offset}: {e.strerror}") from e
        if len(data) != length:
            raise ImageError(
                f"{self.path} ended at offset {offset + len(data)}, expected {offset + length} "
                "bytes (did the file change?)",
                offset=offset + len(data),
            )
        return data

    def _detect(self) -> ImageInfo:
        from unbrick.formats.compress import compression_of  # noqa: PLC0415 - lazy: zstandard

        head = self._pread(0, min(HEAD_SIZE, self.file_size))
        name = str(self.path)
        if head[:4] == _ZIP_LOCAL:
            return self._detect_stream("zip", name)
        kind = compression_of(head)
        if kind is not None:
            return self._detect_stream(kind, name)
        if head[:4] == _SPARSE_MAGIC:
            return self._detect_sparse(name)
        return ImageInfo(
            path=name,
            container="raw",
            member=None,
            compressions=(),
            layout="raw",
            size_bytes=self.file_size,
            size_source="file",
            mapped_bytes=self.file_size,
        )

    def _detect_sparse(self, name: str) -> ImageInfo:
        from unbrick.formats import sparse  # noqa: PLC0415 - only for sparse images

        layout = sparse.scan_sparse(Source(self._f, size=self.file_size, name=name), self._ctx())
        self._sparse_runs = layout.runs
        self._sparse_block = layout.block_size
        mapped = sum(count for _, count, _, _ in layout.runs) * layout.block_size
        return ImageInfo(
            path=name,
            container="raw",
            member=None,
            compressions=(),
            layout="android-sparse",
            size_bytes=layout.total_blocks * layout.block_size,
            size_source="sparse-header",
            mapped_bytes=mapped,
        )

    def _detect_stream(self, container: str, name: str) -> ImageInfo:
        member: str | None = None
        size: int | None = None
        source = "unknown"
        if container == "zip":
            zi = self._zip_info()
            member, size, source = zi.filename, zi.file_size, "zip-directory"
        elif container == "xz":
            size = xz_expanded_size(self._f, self.file_size)
            source = "xz-index" if size is not None else source
        elif container == "zstd":
            size = zstd_expanded_size(self._f, self.file_size)
            source = "zstd-frames" if size is not None else source
        opened = self._open_stream(container, member)
        try:
            head = read_full(opened.stream, 28)
            compressions = tuple(opened.kinds)
        finally:
            opened.close()
        layout = "raw"
        if head[:4] == _SPARSE_MAGIC:
            from unbrick.formats import sparse  # noqa: PLC0415 - only for sparse images

            hdr = sparse.parse_header(head)
            layout, size, source = "android-sparse", hdr.expanded_size, "sparse-header"
        elif len(compressions) > (0 if container == "zip" else 1):
            # A compressed stream inside the container: the size the container states is
            # that of the compressed data, not of the image.
            size, source = None, "unknown"
        return ImageInfo(
            path=name,
            container=container,
            member=member,
            compressions=compressions,
            layout=layout,
            size_bytes=size,
            size_source=source,
            mapped_bytes=size,
        )

    def _zip_info(self) -> zipfile.ZipInfo:
        import zipfile  # noqa: PLC0415 - only for zip archives

        try:
            with zipfile.ZipFile(self.path) as zf:
                return _zip_member(zf, self._zip_member_name, str(self.path))
        except _zip_errors() as e:
            raise ImageError(f"{self.path}: unreadable zip archive: {e}", format="zip") from e

    def _open_stream(self, container: str, member: str | None) -> _Opened:
        """A fresh pass over the expanded bytes (compressions inside unwrapped)."""
        from unbrick.formats.compress import compression_of, open_decompressor  # noqa: PLC0415

        ctx = self._ctx()
        bad_zip: tuple[type[BaseException], ...] = ()
        if container == "zip":
            import zipfile  # noqa: PLC0415 - only for zip archives

            bad_zip = _zip_errors()
        f = open(self.path, "rb")  # noqa: SIM115 - closed by _Opened.close
        opened = _Opened(stream=SourceStream(Source(f, size=self.file_size)), closers=[f.close])
        kinds = opened.kinds
        try:
            if container == "zip":
                zf = zipfile.ZipFile(f)
                opened.closers.append(zf.close)
                name = member or _zip_member(zf, self._zip_member_name, str(self.path)).filename
                m = zf.open(name)
                opened.closers.append(m.close)
                opened.stream = _ZipStream(m, name)
            else:
                dec = open_decompressor(
                    container, opened.stream, ctx, self.file_size, what=f"{self.path}"
                )
                kinds.append(container)
                opened.stream = dec
            for _ in range(self.limits.max_depth):
                head = read_full(opened.stream, 64)
                inner = compression_of(head)
                opened.stream = Prefixed(head, opened.stream)
                if inner is None:
                    break
                kinds.append(inner)
                opened.stream = open_decompressor(
                    inner, opened.stream, ctx, None, what=f"{inner} data inside {self.path}"
                )
            else:
                raise LimitError(f"{self.path}: compressed more than {self.limits.max_depth} times")
        except bad_zip as e:
            opened.close()
            raise ImageError(f"{self.path}: unreadable zip archive: {e}", format="zip") from e
        except BaseException:
            opened.close()
            raise
        return opened

    def _load_bmap(self, path: Path) -> None:
        if self.info.layout == "android-sparse":
            raise UsageError(
                f"{self.path} is an Android sparse image: it carries its own map, "
                f"a bmap ({path}) cannot describe it",
                hint="write it without --bmap",
            )
        try:
            text = path.read_bytes()
        except OSError as e:
            raise SourceError(f"{path}: cannot read the bmap: {e.strerror}") from e
        bm = bmapfmt.parse_bmap(text, self._ctx())
        if bm.bmap_checksum_ok is False:
            raise IntegrityError(
                f"{path}: bmap file checksum mismatch: the bmap file was altered",
                hint="download the bmap again; nothing was written",
            )
        prev = -1
        for r in bm.ranges:
            if r.first <= prev or r.last >= bm.blocks_count:
                raise ImageError(
                    f"{path}: range {r.first}-{r.last} overlaps the previous one or lies past "
                    f"block {bm.blocks_count - 1}",
                    format="bmap",
                )
            prev = r.last
        size = self.info.size_bytes
        if size is not None and size != bm.image_size:
            raise IntegrityError(
                f"the image {self.path} is {size} bytes, its bmap {path} describes {bm.image_size}",
                hint="the bmap belongs to another image; nothing was written",
            )
        self.bmap = bm
        mapped = sum(bm.byte_range(r)[1] for r in bm.ranges)
        self.info = replace(
            self.info,
            bmap_path=str(path),
            size_bytes=bm.image_size,
            size_source=self.info.size_source if size is not None else "bmap",
            mapped_bytes=mapped,
        )

    # -- what gets written ---------------------------------------------------------------------

    def extents(self) -> list[tuple[int, int]]:
        """(offset, length) of what each target receives, in order; empty while unknown."""
        if self.bmap is not None:
            out = []
            for r in self.bmap.ranges:
                off, n = self.bmap.byte_range(r)
                if n:
                    out.append((off, n))
            return out
        if self._sparse_runs is not None:
            bs = self._sparse_block
            merged: list[tuple[int, int]] = []
            for first, count, _, _ in self._sparse_runs:
                off, n = first * bs, count * bs
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((off, n))
            return merged
        size = self.info.size_bytes
        return [(0, size)] if size else []

    def _range_name(self, r: bmapfmt.BmapRange) -> str:
        return f"{r.first}-{r.last}" if r.first != r.last else f"{r.first}"

    def _mismatch(self, bad: list[bmapfmt.BmapRange], written: bool) -> IntegrityError:
        assert self.bmap is not None
        names = ", ".join(self._range_name(r) for r in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        rng = "range" if len(bad) == 1 else "ranges"
        first = self.bmap.byte_range(bad[0])
        hint = (
            "the image does not match its bmap (damaged download?); the target was written "
            "up to that range"
            if written
            else "the image does not match its bmap (damaged download?); nothing was written"
        )
        return IntegrityError(
            f"checksum mismatch for blocks {rng} {names}{more} of {self.path} "
            f"(blocks of {self.bmap.block_size} bytes; first bad range at bytes "
            f"{first[0]}..{first[0] + first[1] - 1})",
            hint=hint,
        )

    def needs_precheck(self) -> bool:
        """True when a pass is needed before writing: bmap checksums, or an unknown size."""
        has_sums = self.bmap is not None and self.bmap.checksum_type is not None
        return (has_sums and not self.info.prechecked) or self.info.size_bytes is None

    def precheck(
        self,
        *,
        max_size: int | None = None,
        progress: CheckProgress | None = None,
        cancelled: Callable[[], bool] | None = None,
        chunk_bytes: int = 4 * MiB,
        retain_bytes: int = 0,
    ) -> None:
        """Check the bmap's range checksums and count an unknown size, before writing.

        ``max_size`` stops counting once the image is known to be larger than that; the size
        is then a lower bound (``size_source`` "counted (at least)") and the caller refuses.
        A file's mapped data, when it is at most ``retain_bytes``, is kept (in pieces of
        ``chunk_bytes``) for :meth:`produce`, which then does not read it again.
        """
        if not self.needs_precheck():
            return
        try:
            if self.info.seekable:
                self._check_file(progress, chunk_bytes, retain_bytes)
            else:
                self._check_stream(max_size, progress, cancelled)
        except OSError as e:
            raise SourceError(f"{self.path}: read failed: {e.strerror or e}") from e

    def _check_file(
        self, progress: CheckProgress | None, chunk_bytes: int, retain_bytes: int
    ) -> None:
        bm = self.bmap
        assert bm is not None and bm.checksum_type is not None
        ranges = [r for r in bm.ranges if r.checksum is not None]
        total = sum(bm.byte_range(r)[1] for r in ranges)
        done = [0]
        lock = threading.Lock()
        algo = bm.checksum_type
        # Small enough to keep: the write pass then needs no second read of the image.
        keep: dict[int, list[bytes]] | None = (
            {} if len(ranges) == len(bm.ranges) and total <= retain_bytes else None
        )

        def one(r: bmapfmt.BmapRange) -> bool:
            off, n = bm.byte_range(r)
            h = hashlib.new(algo)
            pos, end = off, off + n
            pieces: list[bytes] = []
            while pos < end:
                k = min(chunk_bytes, end - pos)
                data = self._pread(pos, k)
                h.update(data)
                if keep is not None:
                    pieces.append(data)
                pos += k
                if progress is not None:
                    with lock:
                        done[0] += k
                        progress("check", done[0], total)
            if keep is not None:
                keep[r.first] = pieces
            return h.hexdigest() == r.checksum

        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only with a bmap

        # hashlib releases the GIL on large buffers: two threads use both cores.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="unbrick-bmap") as pool:
            results = list(pool.map(one, ranges))
        bad = [r for r, ok in zip(ranges, results, strict=True) if not ok]
        if bad:
            raise self._mismatch(bad, written=False)
        self._kept = keep
        self._kept_chunk = chunk_bytes
        self.info = replace(self.info, prechecked=True)

    def _check_stream(
        self,
        max_size: int | None,
        progress: CheckProgress | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        bm = self.bmap
        bad: list[bmapfmt.BmapRange] = []
        hasher = _RangeHasher(bm) if bm is not None and bm.checksum_type else None
        opened = self._open_stream(self.info.container, self.info.member)
        total = self.info.size_bytes or 0
        pos = 0
        too_big = False
        try:
            while True:
                if cancelled is not None and cancelled():
                    raise UsageError("cancelled while checking the image")
                data = opened.stream.read(4 * MiB)
                if not data:
                    break
                if hasher is not None:
                    bad.extend(hasher.feed(pos, data))
                pos += len(data)
                if progress is not None:
                    progress("check" if hasher else "count", pos, total)
                if hasher is None and max_size is not None and pos > max_size:
                    too_big = True  # no need to read the rest: it cannot fit
                    break
        finally:
            opened.close()
        if hasher is not None:
            bad.extend(hasher.finish())
        if bad:
            raise self._mismatch(bad, written=False)
        size = self.info.size_bytes
        if size is not None and pos != size:
            raise ImageError(
                f"{self.path} expands to {pos} bytes, but its {self.info.size_source} says {size}"
            )
        if size is None:
            source = "counted (at least)" if too_big else "counted"
            self.info = replace(self.info, size_bytes=pos, size_source=source, mapped_bytes=pos)
        self.info = replace(self.info, prechecked=hasher is not None)

    def produce(self, emit: Emit, chunk_bytes: int, cancelled: Callable[[], bool]) -> int:
        """Hand every piece of the image to ``emit`` in offset order; return the image size.

        Bmap ranges not checked by :meth:`precheck` are checked here, before the last piece
        of each range is handed on.
        """
        if self.info.layout == "android-sparse":
            if self.info.seekable:
                return self._produce_sparse_file(emit, chunk_bytes, cancelled)
            return self._produce_sparse_stream(emit, chunk_bytes, cancelled)
        if self.info.seekable:
            return self._produce_file(emit, chunk_bytes, cancelled)
        return self._produce_stream(emit, chunk_bytes, cancelled)

    def _produce_file(self, emit: Emit, chunk: int, cancelled: Callable[[], bool]) -> int:
        bm = self.bmap
        check = bm is not None and bm.checksum_type is not None and not self.info.prechecked
        if bm is None:
            self._copy_extent(0, self.file_size, emit, chunk, cancelled, None)
            return self.file_size
        kept, self._kept = self._kept, None
        if kept is not None and self._kept_chunk <= chunk:
            for r in bm.ranges:
                pos = bm.byte_range(r)[0]
                for data in kept.pop(r.first, []):
                    if cancelled():
                        return bm.image_size
                    emit(pos, data)
                    pos += len(data)
            return bm.image_size
        for r in bm.ranges:
            off, n = bm.byte_range(r)
            h = hashlib.new(bm.checksum_type) if check and r.checksum and bm.checksum_type else None
            self._copy_extent(off, n, emit, chunk, cancelled, (h, r) if h else None)
        return bm.image_size

    def _copy_extent(
        self,
        off: int,
        n: int,
        emit: Emit,
        chunk: int,
        cancelled: Callable[[], bool],
        check: tuple[Any, bmapfmt.BmapRange] | None,
    ) -> None:
        pos, end = off, off + n
        while pos < end:
            if cancelled():
                return
            k = min(chunk, end - pos)
            data = self._pread(pos, k)
            if check is not None:
                h, r = check
                h.update(data)
                if pos + k == end and h.hexdigest() != r.checksum:
                    raise self._mismatch([r], written=pos > off)
            emit(pos, data)
            pos += k

    def _produce_stream(self, emit: Emit, chunk: int, cancelled: Callable[[], bool]) -> int:
        bm = self.bmap
        extents = self.extents() if bm is not None else None
        hasher = (
            _RangeHasher(bm)
            if bm is not None and bm.checksum_type and not self.info.prechecked
            else None
        )
        opened = self._open_stream(self.info.container, self.info.member)
        pos = 0
        i = 0
        try:
            while not cancelled():
                if extents is None:
                    data = read_full(opened.stream, chunk)
                    if not data:
                        break
                    emit(pos, data)
                    pos += len(data)
                    continue
                # With a bmap: drop bytes up to the next extent, then hand the extent on.
                want = chunk
                if i < len(extents):
                    start, n = extents[i]
                    want = start - pos if pos < start else min(chunk, start + n - pos)
                data = read_full(opened.stream, min(want, chunk))
                if not data:
                    break
                inside = i < len(extents) and pos >= extents[i][0]
                if hasher is not None:
                    bad = hasher.feed(pos, data)
                    if bad:
                        raise self._mismatch(bad, written=True)
                if inside:
                    emit(pos, data)
                pos += len(data)
                if i < len(extents) and pos >= extents[i][0] + extents[i][1]:
                    i += 1
        finally:
            opened.close()
        if cancelled():
            return pos
        if hasher is not None:
            bad = hasher.finish()
            if bad:
                raise self._mismatch(bad, written=True)
        size = self.info.size_bytes
        if size is not None and pos != size:
            raise ImageError(f"{self.path} expanded to {pos} bytes, expected {size}")
        return pos

    def _produce_sparse_file(self, emit: Emit, chunk: int, cancelled: Callable[[], bool]) -> int:
        assert self._sparse_runs is not None
        bs = self._sparse_block
        fills: dict[bytes, bytes] = {}
        for first, count, pattern, src_off in self._sparse_runs:
            off, n = first * bs, count * bs
            if pattern is None:
                done = 0
                while done < n and not cancelled():
                    k = min(chunk, n - done)
                    emit(off + done, self._pread(src_off + done, k))
                    done += k
                continue
            if pattern not in fills:
                fills[pattern] = pattern * (chunk // 4)
            full = fills[pattern]
            done = 0
            while done < n and not cancelled():
                k = min(chunk, n - done)
                emit(off + done, full if k == len(full) else full[:k])
                done += k
        return self.info.size_bytes or 0

    def _produce_sparse_stream(self, emit: Emit, chunk: int, cancelled: Callable[[], bool]) -> int:
        from unbrick.formats import sparse  # noqa: PLC0415 - only for sparse images

        opened = self._open_stream(self.info.container, self.info.member)
        sink = _ChunkSink(emit, chunk, cancelled)
        try:
            # A write-only sink: the expander writes zeros for DONT_CARE (nothing seekable).
            size = sparse.expand(opened.stream, cast(BinaryIO, sink), self._ctx(), holes=False)
        except _Cancelled:
            return sink.pos
        finally:
            opened.close()
        sink.flush()
        return size

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Cancelled(Exception):
    """Raised inside a push-style expansion when the job is cancelled."""


class _ChunkSink(io.RawIOBase):
    """A write-only file that gathers what the sparse expander writes into pieces."""

    def __init__(self, emit: Emit, chunk: int, cancelled: Callable[[], bool]) -> None:
        super().__init__()
        self._emit = emit
        self._chunk = chunk
        self._cancelled = cancelled
        self._buf = bytearray()
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b: Any, /) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        self._buf += view
        while len(self._buf) >= self._chunk:
            if self._cancelled():
                raise _Cancelled
            piece = bytes(self._buf[: self._chunk])
            del self._buf[: self._chunk]
            self._emit(self.pos, piece)
            self.pos += len(piece)
        return n

    def flush(self) -> None:
        if self._buf:
            piece = bytes(self._buf)
            self._buf.clear()
            self._emit(self.pos, piece)
            self.pos += len(piece)


class _RangeHasher:
    """Hashes the bmap ranges of a stream read front to back; reports the bad ones."""

    def __init__(self, bm: bmapfmt.Bmap) -> None:
        self.bm = bm
        self.ranges = [r for r in bm.ranges if r.checksum is not None]
        self.i = 0
        self.h: Any = None

    def _bounds(self) -> tuple[int, int]:
        off, n = self.bm.byte_range(self.ranges[self.i])
        return off, off + n

    def feed(self, pos: int, data: bytes) -> list[bmapfmt.BmapRange]:
        bad: list[bmapfmt.BmapRange] = []
        end = pos + len(data)
        view = memoryview(data)
        while self.i < len(self.ranges):
            start, stop = self._bounds()
            if start >= end:
                break
            a, b = max(start, pos), min(stop, end)
            if a < b:
                if self.h is None:
                    self.h = hashlib.new(self.bm.checksum_type or "sha256")
                self.h.update(view[a - pos : b - pos])
            if stop > end:
                break
            r = self.ranges[self.i]
            digest = (self.h or hashlib.new(self.bm.checksum_type or "sha256")).hexdigest()
            if digest != r.checksum:
                bad.append(r)
            self.h = None
            self.i += 1
        return bad

    def finish(self) -> list[bmapfmt.BmapRange]:
        """The ranges the stream ended before completing (they are bad)."""
        bad = self.ranges[self.i :]
        self.i = len(self.ranges)
        return bad
