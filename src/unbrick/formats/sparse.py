"""Android sparse images: inspect, expand to raw, create from raw, split for fastboot.

Layout (libsparse's ``sparse_format.h``; every field little-endian)::

    file header, file_hdr_sz bytes (28 in format 1.0):
        u32 magic 0xED26FF3A, u16 major 1, u16 minor 0, u16 file_hdr_sz, u16 chunk_hdr_sz,
        u32 blk_sz, u32 total_blks, u32 total_chunks, u32 image_checksum
    total_chunks chunks, each a chunk_hdr_sz-byte header (12 in 1.0):
        u16 chunk_type, u16 reserved, u32 chunk_sz (output blocks), u32 total_sz (header + data)
    followed by its data:
        RAW 0xCAC1        chunk_sz * blk_sz bytes copied to the output
        FILL 0xCAC2       a 4-byte pattern repeated over chunk_sz blocks
        DONT_CARE 0xCAC3  nothing; the blocks are not written (zeros in a fresh file)
        CRC32 0xCAC4      CRC-32 of everything expanded so far, covers no blocks

Behaviour follows libsparse where the format leaves room: headers longer than 28/12 bytes
are accepted and their extra bytes skipped; a CRC32 chunk checks the running CRC-32 (zlib's
polynomial, starting from 0) of all blocks before it, with FILL blocks counted as their pattern
and DONT_CARE blocks as zeros; the running CRC is not reset by a CRC32 chunk.

``write_sparse`` produces what ``img2simg`` produces: blocks that repeat one 4-byte pattern
(zero blocks included) become FILL chunks, the rest RAW chunks, consecutive blocks of one kind
one chunk; a last partial block is padded with zeros and always stored RAW. The output has no
DONT_CARE chunks unless ``zeros_as_dont_care`` asks for them (smaller for the flasher, but then
zero blocks keep whatever the target held before).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from unbrick.errors import ImageError, IntegrityError, LimitError, UsageError
from unbrick.formats.base import Context, Counter, Findings, FormatSpec, MiB, Sniff, Source, Stream

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

FORMAT = "android-sparse"
MAGIC = 0xED26FF3A
MAJOR_VERSION = 1
FILE_HEADER = struct.Struct("<IHHHHIIII")
CHUNK_HEADER = struct.Struct("<HHII")
FILE_HEADER_SIZE = FILE_HEADER.size  # 28
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 12

CHUNK_RAW = 0xCAC1
CHUNK_FILL = 0xCAC2
CHUNK_DONT_CARE = 0xCAC3
CHUNK_CRC32 = 0xCAC4
CHUNK_NAMES = {
    CHUNK_RAW: "raw",
    CHUNK_FILL: "fill",
    CHUNK_DONT_CARE: "dont_care",
    CHUNK_CRC32: "crc32",
}

_U32 = 0xFFFFFFFF
#: Streaming read size: large enough for Python overhead to vanish, small enough for RSS.
_IO = 4 * MiB
#: Most blocks one RAW chunk holds: total_sz is a u32 that includes the 12-byte header.
_MAX_RAW_BYTES = _U32 - CHUNK_HEADER_SIZE
_ZEROS = bytes(_IO)
_ZERO_RUNS = re.compile(rb"\x00+")


# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class SparseHeader:
    """The file header of an Android sparse image."""

    major: int
    minor: int
    file_header_size: int
    chunk_header_size: int
    block_size: int
    total_blocks: int
    total_chunks: int
    image_checksum: int

    @property
    def expanded_size(self) -> int:
        return self.total_blocks * self.block_size


def parse_header(data: bytes) -> SparseHeader:
    """Decode and check the 28-byte file header; ImageError when it cannot be used."""
    if len(data) < FILE_HEADER_SIZE:
        raise ImageError(
            f"sparse header truncated: {len(data)} of {FILE_HEADER_SIZE} bytes", format=FORMAT
        )
    magic, major, minor, fhs, chs, bs, blocks, chunks, checksum = FILE_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"not an Android sparse image (magic 0x{magic:08x})", format=FORMAT)
    if major != MAJOR_VERSION:
        raise ImageError(
            f"sparse format major version {major} is not supported (only 1)",
            format=FORMAT,
            offset=4,
        )
    if fhs < FILE_HEADER_SIZE:
        raise ImageError(
            f"file_hdr_sz {fhs} is smaller than the {FILE_HEADER_SIZE}-byte header",
            format=FORMAT,
            offset=8,
        )
    if chs < CHUNK_HEADER_SIZE:
        raise ImageError(
            f"chunk_hdr_sz {chs} is smaller than the {CHUNK_HEADER_SIZE}-byte chunk header",
            format=FORMAT,
            offset=10,
        )
    if bs == 0 or bs % 4:
        raise ImageError(
            f"block size {bs} is not a positive multiple of 4", format=FORMAT, offset=12
        )
    return SparseHeader(major, minor, fhs, chs, bs, blocks, chunks, checksum)


def _sniff(sn: Sniff) -> bool:
    try:
        parse_header(sn.head[:FILE_HEADER_SIZE])
    except ImageError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# CRC-32 arithmetic: the CRC of long runs of zeros or of a repeated pattern without feeding
# every byte through zlib. Polynomials are in zlib's reflected bit order (bit 31 is x^0).

_POLY = 0xEDB88320


def _mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial."""
    product = 0
    for i in range(32):
        if a & (0x80000000 >> i):
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(63):
        table.append(_mulmod(table[-1], table[-1]))
    return table


#: _X2N[k] is x^(2^k) modulo the polynomial.
_X2N = _powers()
_shift_cache: dict[int, int] = {}


def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial: appending n bytes shifts a CRC register by this."""
    hit = _shift_cache.get(n)
    if hit is not None:
        return hit
    p = 0x80000000  # x^0
    k = 3
    m = n
    while m:
        if m & 1:
            p = _mulmod(_X2N[k], p)
        m >>= 1
        k += 1
    if len(_shift_cache) < 4096:
        _shift_cache[n] = p
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B)."""
    return _mulmod(_x8n(len2), crc1) ^ crc2


def crc32_zeros(crc: int, n: int) -> int:
    """``zlib.crc32(bytes(n), crc)`` without the bytes."""
    if n <= 4096:
        return zlib.crc32(_ZEROS[:n], crc)
    return _mulmod(_x8n(n), crc ^ _U32) ^ _U32


_units: dict[bytes, tuple[bytes, int]] = {}


def _unit(pattern: bytes) -> tuple[bytes, int]:
    """A 4 MiB buffer of ``pattern`` and its CRC-32 (a few are kept)."""
    hit = _units.get(pattern)
    if hit is None:
        if len(_units) >= 4:
            _units.clear()
        buf = pattern * (_IO // 4)
        hit = _units[pattern] = (buf, zlib.crc32(buf))
    return hit


def crc32_fill(crc: int, pattern: bytes, n: int) -> int:
    """``zlib.crc32(pattern * (n // 4), crc)`` for a 4-byte pattern and n a multiple of 4."""
    if pattern == b"\0\0\0\0":
        return crc32_zeros(crc, n)
    unit, unit_crc = _unit(pattern)
    if n <= len(unit):
        return zlib.crc32(memoryview(unit)[:n], crc)
    # Square-and-multiply over (crc, length) pairs: crc of the unit repeated k times.
    k, rest = divmod(n, len(unit))
    acc_crc, acc_len = 0, 0
    base_crc, base_len = unit_crc, len(unit)
    while k:
        if k & 1:
            acc_crc, acc_len = crc32_combine(acc_crc, base_crc, base_len), acc_len + base_len
        k >>= 1
        if k:
            base_crc, base_len = crc32_combine(base_crc, base_crc, base_len), 2 * base_len
    body = crc32_combine(acc_crc, zlib.crc32(memoryview(unit)[:rest]), rest)
    return crc32_combine(crc, body, n)


class _RunningCrc:
    """The CRC-32 of an image being expanded.

    Large pieces are summed on one helper thread (zlib releases the GIL), so that checking
    overlaps with writing; at most two pieces wait, which bounds memory. Zero runs are only
    counted and folded in arithmetically.
    """

    def __init__(self) -> None:
        self._crc = 0
        self._zeros = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()

    def _step(self, zeros: int, piece: bytes | None, pattern: bytes, n: int) -> None:
        crc = self._crc
        if zeros:
            crc = crc32_zeros(crc, zeros)
        if piece is not None:
            crc = zlib.crc32(piece, crc)
        elif n:
            crc = crc32_fill(crc, pattern, n)
        self._crc = crc

    def _submit(self, piece: bytes | None, pattern: bytes, n: int) -> None:
        zeros, self._zeros = self._zeros, 0
        if not self._pending and (piece is None or len(piece) < 256 * 1024):
            self._step(zeros, piece, pattern, n)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only when needed

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparse-crc")
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._step, zeros, piece, pattern, n))

    def data(self, piece: bytes) -> None:
        self._submit(piece, b"", 0)

    def zeros(self, n: int) -> None:
        self._zeros += n

    def fill(self, pattern: bytes, n: int) -> None:
        if pattern == b"\0\0\0\0":
            self._zeros += n
        else:
            self._submit(None, pattern, n)

    def value(self) -> int:
        while self._pending:
            self._pending.popleft().result()
        if self._zeros:
            self._crc = crc32_zeros(self._crc, self._zeros)
            self._zeros = 0
        return self._crc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


# --------------------------------------------------------------------------------------------
# Inspection (lenient: reports problems, goes on where the file still makes sense)


@dataclass
class _Survey:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    chunks: int = 0
    blocks: int = 0
    by_type: dict[str, dict[str, int]] = field(
        default_factory=lambda: {n: {"chunks": 0, "blocks": 0} for n in CHUNK_NAMES.values()}
    )
    unknown_chunks: int = 0
    crc_chunks: int = 0
    crc_ok: bool | None = None
    crc_reliable: bool = True
    #: CRC-32 of the whole expansion (when computed and the layout allowed it).
    image_crc: int | None = None
    truncated: bool = False


def _survey(src: Source, hdr: SparseHeader, ctx: Context, with_crc: bool) -> _Survey:
    sv = _Survey()
    counter = Counter(ctx, "sparse chunks")
    bs = hdr.block_size
    chs = hdr.chunk_header_size
    pos = hdr.file_header_size
    crc = 0
    if pos > src.size:
        sv.problems.append(f"truncated: file_hdr_sz is {pos} but the file has {src.size} bytes")
        sv.truncated = True
        return sv
    for i in range(hdr.total_chunks):
        counter.tick()
        if pos + chs > src.size:
            sv.problems.append(
                f"truncated: the file ends at {src.size} where chunk {i} of "
                f"{hdr.total_chunks} should start (offset {pos})"
            )
            sv.truncated = True
            break
        ctype, _, nblocks, total = CHUNK_HEADER.unpack(src.read_at(pos, CHUNK_HEADER_SIZE))
        where = f"chunk {i} at offset {pos}"
        if total < chs:
            sv.problems.append(
                f"{where}: total_sz {total} is smaller than the chunk header ({chs})"
            )
            sv.truncated = True
            break
        data_at = pos + chs
        data_size = total - chs
        if data_at + data_size > src.size:
            sv.problems.append(
                f"truncated: {where} needs {data_size} data bytes, the file ends "
                f"{src.size - data_at} bytes after its header"
            )
            sv.truncated = True
            break
        name = CHUNK_NAMES.get(ctype)
        sv.chunks += 1
        if name is None:
            sv.unknown_chunks += 1
            sv.crc_reliable = False
            sv.problems.append(f"{where}: unknown chunk type 0x{ctype:04x}")
            pos = data_at + data_size
            continue
        stat = sv.by_type[name]
        stat["chunks"] += 1
        if ctype == CHUNK_CRC32:
            sv.crc_chunks += 1
            if data_size != 4:
                sv.problems.append(f"{where}: CRC32 chunk holds {data_size} bytes, not 4")
            elif with_crc and sv.crc_reliable:
                (stored,) = struct.unpack("<I", src.read_at(data_at, 4))
                if stored != crc:
                    sv.problems.append(
                        f"{where}: CRC32 chunk says 0x{stored:08x}, the {sv.blocks} blocks "
                        f"before it have CRC-32 0x{crc:08x}"
                    )
                    sv.crc_ok = False
                elif sv.crc_ok is None:
                    sv.crc_ok = True
            if nblocks:
                sv.warnings.append(f"{where}: CRC32 chunk claims {nblocks} blocks (ignored)")
            pos = data_at + data_size
            continue
        stat["blocks"] += nblocks
        sv.blocks += nblocks
        length = nblocks * bs
        if ctype == CHUNK_RAW:
            if data_size != length:
                sv.problems.append(
                    f"{where}: RAW chunk of {nblocks} blocks must hold {length} bytes, "
                    f"it holds {data_size}"
                )
                sv.crc_reliable = False
            elif with_crc and sv.crc_reliable:
                for piece in src.chunks(data_at, length, _IO):
                    crc = zlib.crc32(piece, crc)
                    ctx.check_time()
        elif ctype == CHUNK_FILL:
            if data_size != 4:
                sv.problems.append(f"{where}: FILL chunk holds {data_size} bytes, not 4")
                sv.crc_reliable = False
            elif with_crc and sv.crc_reliable:
                crc = crc32_fill(crc, src.read_at(data_at, 4), length)
        else:  # DONT_CARE
            if data_size:
                sv.problems.append(f"{where}: DONT_CARE chunk holds {data_size} bytes, not 0")
            if with_crc and sv.crc_reliable:
                crc = crc32_zeros(crc, length)
        pos = data_at + data_size
    if not sv.truncated:
        if sv.blocks != hdr.total_blocks:
            sv.problems.append(
                f"chunks cover {sv.blocks} blocks, the header says total_blks {hdr.total_blocks}"
            )
        extra = src.size - pos
        if extra > 0:
            if _looks_like_chunk(src.read_upto(pos, CHUNK_HEADER_SIZE), chs):
                sv.problems.append(
                    f"more chunks follow the {hdr.total_chunks} that total_chunks declares "
                    f"(offset {pos})"
                )
            else:
                sv.warnings.append(f"{extra} bytes follow the last chunk (offset {pos})")
        if with_crc and sv.crc_reliable and sv.blocks == hdr.total_blocks:
            sv.image_crc = crc
    return sv


def _looks_like_chunk(head: bytes, chunk_header_size: int) -> bool:
    if len(head) < CHUNK_HEADER_SIZE:
        return False
    ctype, _, _, total = CHUNK_HEADER.unpack(head)
    return ctype in CHUNK_NAMES and total >= chunk_header_size


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format=FORMAT)
    hdr = parse_header(src.read_at(0, FILE_HEADER_SIZE, "sparse header"))
    sv = _survey(src, hdr, ctx, with_crc=False)
    if sv.crc_chunks or hdr.image_checksum:
        sv = _survey(src, hdr, ctx, with_crc=True)
    d = f.details
    d["version"] = f"{hdr.major}.{hdr.minor}"
    d["file_header_size"] = hdr.file_header_size
    d["chunk_header_size"] = hdr.chunk_header_size
    d["block_size"] = hdr.block_size
    d["total_blocks"] = hdr.total_blocks
    d["expanded_size"] = hdr.expanded_size
    d["total_chunks"] = hdr.total_chunks
    d["chunk_count"] = sv.chunks
    d["chunks_by_type"] = sv.by_type
    data_blocks = sv.by_type["raw"]["blocks"] + sv.by_type["fill"]["blocks"]
    d["data_blocks"] = data_blocks
    d["unknown_chunks"] = sv.unknown_chunks
    d["crc32"] = {"present": sv.crc_chunks > 0, "ok": sv.crc_ok}
    if sv.crc_chunks and sv.crc_ok is None and not sv.crc_reliable:
        f.warnings.append("CRC32 chunks not checked: the chunks before them are malformed")
    d["image_checksum"] = hdr.image_checksum
    if hdr.image_checksum:
        ok: bool | None = None
        if sv.image_crc is not None:
            ok = sv.image_crc == hdr.image_checksum
            if not ok:
                f.problem(
                    f"header image_checksum 0x{hdr.image_checksum:08x} does not match the "
                    f"expanded image (CRC-32 0x{sv.image_crc:08x})"
                )
        else:
            f.warnings.append("header image_checksum not checked: the chunk list is damaged")
        d["image_checksum_ok"] = ok
    if hdr.minor != 0:
        f.warnings.append(f"sparse format minor version {hdr.minor} (this reader knows 1.0)")
    f.problems.extend(sv.problems)
    f.warnings.extend(sv.warnings)
    return f


# --------------------------------------------------------------------------------------------
# Expansion (strict: any inconsistency stops the conversion)


class _Reader:
    """Exact reads from a forward-only stream, with the position for messages."""

    def __init__(self, stream: Stream, label: str) -> None:
        self._stream = stream
        self.label = label
        self.pos = 0

    def _fail(self, what: str) -> ImageError:
        return ImageError(
            f"{self.label}{what} truncated: the stream ends at offset {self.pos}",
            format=FORMAT,
            offset=self.pos,
        )

    def read(self, n: int, what: str) -> bytes:
        data = self._stream.read(n)
        if len(data) == n:
            self.pos += n
            return data
        parts = [data]
        got = len(data)
        while got < n:
            if not data:
                self.pos += got
                raise self._fail(what)
            data = self._stream.read(n - got)
            parts.append(data)
            got += len(data)
        self.pos += n
        return b"".join(parts)

    def pieces(self, n: int, what: str) -> Iterator[bytes]:
        while n > 0:
            data = self._stream.read(min(n, _IO))
            if not data:
                raise self._fail(what)
            self.pos += len(data)
            n -= len(data)
            yield data

    def skip(self, n: int, what: str) -> None:
        for _ in self.pieces(n, what):
            pass


class _Cursor:
    """One sparse stream decoded chunk by chunk; ``kind``/``left`` describe the current chunk."""

    def __init__(self, stream: Stream, ctx: Context, label: str, verify_crc: bool) -> None:
        self.rd = _Reader(stream, label)
        self.ctx = ctx
        self.hdr = parse_header(self.rd.read(FILE_HEADER_SIZE, "sparse header"))
        if self.hdr.file_header_size > FILE_HEADER_SIZE:
            self.rd.skip(self.hdr.file_header_size - FILE_HEADER_SIZE, "sparse header")
        self.crc = _RunningCrc() if verify_crc else None
        self.counter = Counter(ctx, "sparse chunks")
        self.chunks_read = 0
        self.block = 0  # first block of the current chunk's remainder
        self.kind = CHUNK_DONT_CARE
        self.left = 0
        self.fill = b""

    def next_chunk(self) -> bool:
        """Load the next chunk that covers blocks; False when the chunk list is exhausted."""
        hdr = self.hdr
        bs = hdr.block_size
        while self.chunks_read < hdr.total_chunks:
            self.counter.tick()
            at = self.rd.pos
            index = self.chunks_read
            raw = self.rd.read(hdr.chunk_header_size, f"chunk {index} header")
            self.chunks_read += 1
            ctype, _, nblocks, total = CHUNK_HEADER.unpack_from(raw)
            where = f"{self.rd.label}chunk {index} at offset {at}"
            if total < hdr.chunk_header_size:
                raise ImageError(
                    f"{where}: total_sz {total} is smaller than its header",
                    format=FORMAT,
                    offset=at,
                )
            data_size = total - hdr.chunk_header_size
            if ctype == CHUNK_CRC32:
                if data_size != 4:
                    raise ImageError(
                        f"{where}: CRC32 chunk holds {data_size} bytes, not 4",
                        format=FORMAT,
                        offset=at,
                    )
                (stored,) = struct.unpack("<I", self.rd.read(4, f"chunk {index}"))
                if self.crc is not None and stored != (actual := self.crc.value()):
                    raise IntegrityError(
                        f"{where}: CRC32 chunk says 0x{stored:08x}, the data before it has "
                        f"CRC-32 0x{actual:08x}"
                    )
                continue
            if ctype == CHUNK_RAW:
                if data_size != nblocks * bs:
                    raise ImageError(
                        f"{where}: RAW chunk of {nblocks} blocks must hold {nblocks * bs} "
                        f"bytes, it holds {data_size}",
                        format=FORMAT,
                        offset=at,
                    )
            elif ctype == CHUNK_FILL:
                if data_size != 4:
                    raise ImageError(
                        f"{where}: FILL chunk holds {data_size} bytes, not 4",
                        format=FORMAT,
                        offset=at,
                    )
                self.fill = self.rd.read(4, f"chunk {index}")
            elif ctype == CHUNK_DONT_CARE:
                if data_size:
                    raise ImageError(
                        f"{where}: DONT_CARE chunk holds {data_size} bytes",
                        format=FORMAT,
                        offset=at,
                    )
            else:
                raise ImageError(
                    f"{where}: unknown chunk type 0x{ctype:04x}", format=FORMAT, offset=at
                )
            if self.block + nblocks > hdr.total_blocks:
                raise ImageError(
                    f"{where}: chunks cover more than the {hdr.total_blocks} blocks "
                    "the header declares",
                    format=FORMAT,
                    offset=at,
                )
            if nblocks:
                self.kind = ctype
                self.left = nblocks
                return True
        return False

    def ensure(self) -> None:
        """Make sure the current chunk has blocks left (the image is not finished)."""
        if self.left == 0 and not self.next_chunk():
            raise ImageError(
                f"{self.rd.label}chunks cover only {self.block} of the "
                f"{self.hdr.total_blocks} blocks the header declares",
                format=FORMAT,
            )

    def raw_pieces(self, n: int) -> Iterator[bytes]:
        """The data of the next n blocks of the current RAW chunk."""
        for piece in self.rd.pieces(n * self.hdr.block_size, "RAW chunk data"):
            if self.crc is not None:
                self.crc.data(piece)
            yield piece
            self.ctx.check_time()
        self.advance(n)

    def pass_over(self, n: int) -> None:
        """Consume n blocks of the current chunk without producing output."""
        if self.kind == CHUNK_RAW:
            for _ in self.raw_pieces(n):
                pass
            return
        if self.crc is not None:
            length = n * self.hdr.block_size
            if self.kind == CHUNK_FILL:
                self.crc.fill(self.fill, length)
            else:
                self.crc.zeros(length)
        self.advance(n)

    def advance(self, n: int) -> None:
        self.left -= n
        self.block += n

    def finish(self) -> None:
        """Read the chunks after the last block (CRC32 chunks) and check the image checksum."""
        if self.next_chunk():
            raise ImageError(
                f"{self.rd.label}chunks cover more than the {self.hdr.total_blocks} blocks "
                "the header declares",
                format=FORMAT,
            )
        if self.crc is not None and self.hdr.image_checksum:
            crc = self.crc.value()
            if crc != self.hdr.image_checksum:
                raise IntegrityError(
                    f"{self.rd.label}header image_checksum 0x{self.hdr.image_checksum:08x} "
                    f"does not match the expanded image (CRC-32 0x{crc:08x})"
                )


def _seekable(out: BinaryIO) -> bool:
    try:
        return bool(out.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class _Writer:
    """Writes the expanded image; zero runs become holes when the output can seek."""

    def __init__(self, out: BinaryIO, holes: bool) -> None:
        self.out = out
        self.holes = False
        self.start = 0
        self.pending = 0  # bytes of hole not yet skipped over
        self._pattern = b""
        self._pattern_buf = b""
        if holes and _seekable(out):
            try:
                self.start = out.tell()
                out.truncate(self.start)
                self.holes = True
            except OSError:
                self.holes = False

    def data(self, piece: bytes | memoryview) -> None:
        if self.pending:
            self.out.seek(self.pending, io.SEEK_CUR)
            self.pending = 0
        self.out.write(piece)

    def zeros(self, n: int) -> None:
        if self.holes:
            self.pending += n
            return
        view = memoryview(_ZEROS)
        while n > 0:
            k = min(n, _IO)
            self.out.write(view[:k])
            n -= k

    def fill(self, pattern: bytes, n: int) -> None:
        if pattern == b"\0\0\0\0":
            self.zeros(n)
            return
        if pattern != self._pattern:
            self._pattern = pattern
            self._pattern_buf = pattern * (_IO // 4)
        view = memoryview(self._pattern_buf)
        while n > 0:
            k = min(n, _IO)
            self.data(view[:k])
            n -= k

    def close(self, size: int) -> None:
        if not self.holes:
            return
        end = self.start + size
        self.out.truncate(end)
        if self.out.seek(0, io.SEEK_END) < end:  # truncate() that cannot grow (BytesIO)
            self.out.seek(end - 1)
            self.out.write(b"\0")
        self.out.seek(end)


def expand(
    stream: Stream, out: BinaryIO, ctx: Context, *, verify_crc: bool = True, holes: bool = True
) -> int:
    """Expand the sparse image read sequentially from ``stream`` into ``out``.

    Returns the size of the raw image (total_blks * blk_sz). ``stream`` may be any forward-only
    stream (a decompressor). DONT_CARE and zero FILL blocks are written as zeros, or, when
    ``out`` can seek and ``holes`` is true, skipped over so that ``out`` becomes a sparse file
    with the same content (``out`` is then truncated at its current position first and to the
    image size at the end). CRC32 chunks and a non-zero header checksum are verified unless
    ``verify_crc`` is false (IntegrityError on mismatch). Raises ImageError for a malformed
    image and LimitError when the image is larger than ``ctx.limits.max_expanded_bytes``.
    """
    return expand_many([stream], out, ctx, verify_crc=verify_crc, holes=holes)


def expand_many(
    streams: Sequence[Stream],
    out: BinaryIO,
    ctx: Context,
    *,
    verify_crc: bool = True,
    holes: bool = True,
) -> int:
    """Expand several sparse images that together describe one image (fastboot's split
    images, as ``simg2img a b c raw`` accepts) into ``out``.

    The pieces are overlaid in order: a block takes its content from the last piece that does
    not mark it DONT_CARE (zeros when none does). All pieces must share block size and block
    count. The streams are read in step, so each is read once, front to back.
    """
    if not streams:
        raise UsageError("expand_many needs at least one sparse stream")
    many = len(streams) > 1
    cursors = [
        _Cursor(s, ctx, f"piece {i}: " if many else "", verify_crc) for i, s in enumerate(streams)
    ]
    first = cursors[0].hdr
    for i, c in enumerate(cursors[1:], 1):
        if (c.hdr.block_size, c.hdr.total_blocks) != (first.block_size, first.total_blocks):
            raise ImageError(
                f"piece {i} describes {c.hdr.total_blocks} blocks of {c.hdr.block_size} bytes, "
                f"piece 0 {first.total_blocks} blocks of {first.block_size} bytes",
                format=FORMAT,
            )
    size = first.expanded_size
    if size > ctx.limits.max_expanded_bytes:
        raise LimitError(
            f"the sparse image expands to {size} bytes, more than the limit of "
            f"{ctx.limits.max_expanded_bytes}"
        )
    try:
        return _merge(cursors, out, ctx, holes)
    finally:
        for c in cursors:
            if c.crc is not None:
                c.crc.close()


def _merge(cursors: list[_Cursor], out: BinaryIO, ctx: Context, holes: bool) -> int:
    first = cursors[0].hdr
    size = first.expanded_size
    bs = first.block_size
    writer = _Writer(out, holes)
    block = 0
    while block < first.total_blocks:
        for c in cursors:
            c.ensure()
        n = min(c.left for c in cursors)
        winner = None
        for c in reversed(cursors):
            if c.kind != CHUNK_DONT_CARE:
                winner = c
                break
        for c in cursors:
            if c is not winner:
                c.pass_over(n)
        if winner is None:
            writer.zeros(n * bs)
        elif winner.kind == CHUNK_RAW:
            for piece in winner.raw_pieces(n):
                writer.data(piece)
        else:
            writer.fill(winner.fill, n * bs)
            winner.pass_over(n)
        block += n
        ctx.check_time()
    for c in cursors:
        c.finish()
    writer.close(size)
    return size


# --------------------------------------------------------------------------------------------
# Creation: classify the blocks of a raw image, then write chunks


@dataclass
class SparseStats:
    """What ``write_sparse`` (or one split piece) wrote."""

    block_size: int
    total_blocks: int
    raw_blocks: int = 0
    fill_blocks: int = 0
    dont_care_blocks: int = 0
    raw_chunks: int = 0
    fill_chunks: int = 0
    dont_care_chunks: int = 0
    output_size: int = 0

    @property
    def chunks(self) -> int:
        return self.raw_chunks + self.fill_chunks + self.dont_care_chunks

    @property
    def expanded_size(self) -> int:
        return self.total_blocks * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "total_blocks": self.total_blocks,
            "expanded_size": self.expanded_size,
            "chunks": self.chunks,
            "raw_chunks": self.raw_chunks,
            "fill_chunks": self.fill_chunks,
            "dont_care_chunks": self.dont_care_chunks,
            "raw_blocks": self.raw_blocks,
            "fill_blocks": self.fill_blocks,
            "dont_care_blocks": self.dont_care_blocks,
            "output_size": self.output_size,
        }


#: A run of output blocks: (first_block, block_count, fill, source_offset). ``fill`` is the
#: 4-byte pattern of a FILL run, or None for RAW data read from ``source_offset``.
Run = tuple[int, int, bytes | None, int]


@dataclass
class SparseLayout:
    """The data runs of an image; blocks no run covers are DONT_CARE."""

    source: Source
    block_size: int
    total_blocks: int
    runs: list[Run]


def _check_block_size(block_size: int) -> None:
    if block_size < 1024 or block_size % 4:
        raise UsageError(
            f"block size {block_size} must be a multiple of 4 and at least 1024 (as img2simg)"
        )


def _sample_offsets(bs: int) -> tuple[int, ...]:
    """Where to compare a block's 4-byte words with their neighbours to find pattern blocks."""
    offsets = {0, 1, 2, 3, bs - 8, bs - 7, bs - 6, bs - 5}
    mid = (bs // 2) & ~3
    offsets.update({mid, mid + 1})
    return tuple(sorted(o for o in offsets if 0 <= o <= bs - 5))


def _classify(
    buf: bytes | bytearray, bs: int, samples: tuple[int, ...]
) -> list[tuple[int, int, bytes | None]]:
    """Runs (first, count, pattern or None) of the whole blocks of ``buf``.

    A block is a FILL block when it repeats its first 4 bytes. Sampled word pairs of all blocks
    are compared at once (extended slices, big-int XOR) to find the few candidate blocks; only
    those are compared in full, whole candidate runs at a time.
    """
    n = len(buf)
    nb = n // bs
    if n == _IO and buf == _ZEROS:
        return [(0, nb, b"\0\0\0\0")]
    diff = 0
    for i in samples:
        diff |= int.from_bytes(buf[i:n:bs], "little") ^ int.from_bytes(
            buf[i + 4 : n : bs], "little"
        )
    marks = diff.to_bytes(nb, "little")
    out: list[tuple[int, int, bytes | None]] = []
    view = memoryview(buf)
    pos = 0

    def add(first: int, count: int, pattern: bytes | None) -> None:
        if out and out[-1][2] == pattern:
            prev = out[-1]
            out[-1] = (prev[0], prev[1] + count, pattern)
        else:
            out.append((first, count, pattern))

    for m in _ZERO_RUNS.finditer(marks):
        j, k = m.span()
        if j > pos:
            add(pos, j - pos, None)
        s, e = j * bs, k * bs
        if buf.startswith(view[s : e - 4], s + 4):
            add(j, k - j, bytes(buf[s : s + 4]))
        else:
            for b in range(j, k):
                s = b * bs
                if buf.startswith(view[s : s + bs - 4], s + 4):
                    add(b, 1, bytes(buf[s : s + 4]))
                else:
                    add(b, 1, None)
        pos = k
    if pos < nb:
        add(pos, nb - pos, None)
    return out


def scan_raw(
    src: Source, ctx: Context, *, block_size: int = 4096, zeros_as_dont_care: bool = False
) -> SparseLayout:
    """Classify the blocks of a raw image into RAW and FILL runs (img2simg's choices)."""
    _check_block_size(block_size)
    bs = block_size
    total = -(-src.size // bs)
    if total > _U32:
        raise UsageError(f"the image has {total} blocks of {bs} bytes; the format allows {_U32}")
    runs: list[Run] = []
    counter = Counter(ctx, "sparse runs")
    max_raw = _MAX_RAW_BYTES // bs
    samples = _sample_offsets(bs)
    step = max(bs, (_IO // bs) * bs)
    whole = (src.size // bs) * bs

    def add(first: int, count: int, pattern: bytes | None) -> None:
        if pattern == b"\0\0\0\0" and zeros_as_dont_care:
            return
        if runs:
            p_first, p_count, p_pattern, p_off = runs[-1]
            if (
                p_first + p_count == first
                and p_pattern == pattern
                and (pattern is not None or p_count + count <= max_raw)
            ):
                runs[-1] = (p_first, p_count + count, pattern, p_off)
                return
        while pattern is None and count > max_raw:
            counter.tick()
            runs.append((first, max_raw, None, first * bs))
            first += max_raw
            count -= max_raw
        counter.tick()
        runs.append((first, count, pattern, first * bs))

    for offset in range(0, whole, step):
        buf = src.read_at(offset, min(step, whole - offset), "image data")
        base = offset // bs
        for first, count, pattern in _classify(buf, bs, samples):
            add(base + first, count, pattern)
        ctx.check_time()
    base = whole // bs
    if whole < src.size:  # the last, partial block: RAW, padded with zeros on output
        add(base, 1, None)
    return SparseLayout(src, bs, total, runs)


def scan_sparse(src: Source, ctx: Context) -> SparseLayout:
    """The runs of an Android sparse image (strict; CRC32 chunks are not checked here)."""
    hdr = parse_header(src.read_at(0, FILE_HEADER_SIZE, "sparse header"))
    bs = hdr.block_size
    counter = Counter(ctx, "sparse chunks")
    runs: list[Run] = []
    pos = hdr.file_header_size
    block = 0
    for i in range(hdr.total_chunks):
        counter.tick()
        ctype, _, nblocks, total = CHUNK_HEADER.unpack(
            src.read_at(pos, CHUNK_HEADER_SIZE, f"chunk {i} header")
        )
        where = f"chunk {i} at offset {pos}"
        if total < hdr.chunk_header_size:
            raise ImageError(
                f"{where}: total_sz {total} is smaller than its header", format=FORMAT, offset=pos
            )
        data_at = pos + hdr.chunk_header_size
        data_size = total - hdr.chunk_header_size
        if data_at + data_size > src.size:
            raise ImageError(
                f"truncated: {where} runs past the end of the file", format=FORMAT, offset=pos
            )
        expected = {CHUNK_RAW: nblocks * bs, CHUNK_FILL: 4, CHUNK_DONT_CARE: 0, CHUNK_CRC32: 4}
        if ctype not in expected:
            raise ImageError(
                f"{where}: unknown chunk type 0x{ctype:04x}", format=FORMAT, offset=pos
            )
        if data_size != expected[ctype]:
            raise ImageError(
                f"{where}: {CHUNK_NAMES[ctype]} chunk holds {data_size} bytes, "
                f"not {expected[ctype]}",
                format=FORMAT,
                offset=pos,
            )
        if ctype != CHUNK_CRC32 and nblocks:
            if block + nblocks > hdr.total_blocks:
                raise ImageError(
                    f"{where}: chunks cover more than total_blks {hdr.total_blocks}",
                    format=FORMAT,
                    offset=pos,
                )
            if ctype == CHUNK_RAW:
                runs.append((block, nblocks, None, data_at))
            elif ctype == CHUNK_FILL:
                runs.append((block, nblocks, src.read_at(data_at, 4), 0))
            block += nblocks
        pos = data_at + data_size
    if block != hdr.total_blocks:
        raise ImageError(
            f"chunks cover {block} blocks, the header says {hdr.total_blocks}", format=FORMAT
        )
    return SparseLayout(src, bs, hdr.total_blocks, runs)


def _run_cost(run: Run, bs: int) -> int:
    return CHUNK_HEADER_SIZE + (run[1] * bs if run[2] is None else 4)


@dataclass
class SparsePiece:
    """One sparse file of a split image: covers some runs, DONT_CARE elsewhere."""

    index: int
    layout: SparseLayout
    runs: list[Run]
    #: Exact size in bytes of the sparse file ``write`` produces.
    size: int
    #: Number of chunks, DONT_CARE chunks included.
    chunks: int

    @property
    def first_block(self) -> int:
        return self.runs[0][0] if self.runs else 0

    @property
    def end_block(self) -> int:
        return self.runs[-1][0] + self.runs[-1][1] if self.runs else 0

    def write(self, out: BinaryIO, ctx: Context) -> SparseStats:
        """Write this piece to ``out`` (sequentially; ``out`` need not seek)."""
        return _write_runs(self.layout, self.runs, out, ctx)

    def segments(self) -> Iterator[Segment]:
        """This piece as it would be written, without reading the source: literal bytes and
        ``(offset, length)`` ranges of the source (for a sender that copies them itself)."""
        layout = self.layout
        stats = SparseStats(block_size=layout.block_size, total_blocks=layout.total_blocks)
        return _segments(layout, self.runs, stats)


def _plan(runs: Sequence[Run], total: int) -> tuple[int, int]:
    """(chunks, dont_care_chunks) for a file with these runs covering ``total`` blocks."""
    chunks = len(runs)
    gaps = 0
    at = 0
    for first, count, _, _ in runs:
        if first > at:
            gaps += 1
        at = first + count
    if at < total:
        gaps += 1
    return chunks + gaps, gaps


#: One piece of a sparse file being written: literal bytes (headers, fill patterns, padding)
#: or ``(offset, length)``, a range of the source to copy as it is.
Segment = bytes | tuple[int, int]


def _segments(layout: SparseLayout, runs: Sequence[Run], stats: SparseStats) -> Iterator[Segment]:
    """The sparse file for ``runs`` as segments, in order; counts what it yields in ``stats``."""
    bs = layout.block_size
    src = layout.source
    nchunks, _ = _plan(runs, layout.total_blocks)
    header = FILE_HEADER.pack(
        MAGIC,
        MAJOR_VERSION,
        0,
        FILE_HEADER_SIZE,
        CHUNK_HEADER_SIZE,
        bs,
        layout.total_blocks,
        nchunks,
        0,
    )
    yield header
    written = len(header)

    def skip(blocks: int) -> bytes:
        stats.dont_care_chunks += 1
        stats.dont_care_blocks += blocks
        return CHUNK_HEADER.pack(CHUNK_DONT_CARE, 0, blocks, CHUNK_HEADER_SIZE)

    at = 0
    for first, count, pattern, offset in runs:
        if first > at:
            yield skip(first - at)
            written += CHUNK_HEADER_SIZE
        if pattern is None:
            length = count * bs
            yield CHUNK_HEADER.pack(CHUNK_RAW, 0, count, CHUNK_HEADER_SIZE + length)
            have = max(0, min(length, src.size - offset))
            if have:
                yield (offset, have)
            if have < length:  # the partial last block of a raw image
                yield bytes(length - have)
            stats.raw_chunks += 1
            stats.raw_blocks += count
            written += CHUNK_HEADER_SIZE + length
        else:
            yield CHUNK_HEADER.pack(CHUNK_FILL, 0, count, CHUNK_HEADER_SIZE + 4) + pattern
            stats.fill_chunks += 1
            stats.fill_blocks += count
            written += CHUNK_HEADER_SIZE + 4
        at = first + count
    if at < layout.total_blocks:
        yield skip(layout.total_blocks - at)
        written += CHUNK_HEADER_SIZE
    stats.output_size = written


def _write_runs(
    layout: SparseLayout, runs: Sequence[Run], out: BinaryIO, ctx: Context
) -> SparseStats:
    stats = SparseStats(block_size=layout.block_size, total_blocks=layout.total_blocks)
    for seg in _segments(layout, runs, stats):
        if isinstance(seg, bytes):
            out.write(seg)
            continue
        offset, length = seg
        for piece in layout.source.chunks(offset, length, _IO):
            out.write(piece)
            ctx.check_time()
    return stats


def write_sparse(
    src: Source,
    out: BinaryIO,
    ctx: Context,
    *,
    block_size: int = 4096,
    zeros_as_dont_care: bool = False,
) -> SparseStats:
    """Write the raw image ``src`` to ``out`` as an Android sparse image, as img2simg does.

    Pattern blocks (zeros included) become FILL chunks, others RAW chunks; a raw size that is
    not a multiple of ``block_size`` is padded with zeros to a whole block (expanding the result
    gives the padded size, as with img2simg). ``zeros_as_dont_care`` writes zero runs as
    DONT_CARE instead. ``out`` is written sequentially and need not seek. The image is read
    twice: once to classify blocks, once to copy RAW data.
    """
    if _seekable(out):
        return _OnePassWriter(src, out, ctx, block_size, zeros_as_dont_care).run()
    layout = scan_raw(src, ctx, block_size=block_size, zeros_as_dont_care=zeros_as_dont_care)
    return _write_runs(layout, layout.runs, out, ctx)


class _OnePassWriter:
    """``write_sparse`` for a seekable output: classify and copy in one read of the image.

    Chunks are emitted as runs end, with the same merging rules as ``scan_raw`` (so the output
    is identical to the two-pass path and to img2simg's). A RAW chunk's header is written as a
    placeholder and patched when the run ends; the file header's chunk count last.
    """

    def __init__(
        self, src: Source, out: BinaryIO, ctx: Context, bs: int, zeros_as_dont_care: bool
    ) -> None:
        _check_block_size(bs)
        self.src, self.out, self.ctx, self.bs = src, out, ctx, bs
        self.zeros_as_dont_care = zeros_as_dont_care
        self.total = -(-src.size // bs)
        if self.total > _U32:
            raise UsageError(
                f"the image has {self.total} blocks of {bs} bytes; the format allows {_U32}"
            )
        self.stats = SparseStats(block_size=bs, total_blocks=self.total)
        self.counter = Counter(ctx, "sparse chunks")
        self.max_raw = _MAX_RAW_BYTES // bs
        self.chunks = 0
        # The open run: kind "raw" | "fill" | "skip" | "" (none), first block, block count.
        self.kind = ""
        self.first = 0
        self.count = 0
        self.pattern = b""
        self.raw_header_at = 0

    def run(self) -> SparseStats:
        src, bs = self.src, self.bs
        self.start = self.out.tell()
        self.out.write(bytes(FILE_HEADER_SIZE))
        samples = _sample_offsets(bs)
        step = max(bs, (_IO // bs) * bs)
        whole = (src.size // bs) * bs
        offset = 0
        # Buffers are reused: RAW data is written out before the next buffer is asked for.
        for buf in src.prefetch(0, whole, step, "image data"):
            view = memoryview(buf)
            base = offset // bs
            offset += len(buf)
            for first, count, pattern in _classify(buf, bs, samples):
                self.add(base + first, count, pattern, view[first * bs : (first + count) * bs])
            self.ctx.check_time()
        if whole < src.size:  # the partial last block: RAW, padded with zeros
            tail = src.read_at(whole, src.size - whole, "image data")
            self.add(whole // bs, 1, None, memoryview(tail + bytes(bs - len(tail))))
        self.close_run()
        at = self.first + self.count if self.kind else 0
        if at < self.total:
            self.open_skip(at, self.total - at)
            self.close_run()
        end = self.out.tell()
        self.out.seek(self.start)
        self.out.write(
            FILE_HEADER.pack(
                MAGIC,
                MAJOR_VERSION,
                0,
                FILE_HEADER_SIZE,
                CHUNK_HEADER_SIZE,
                bs,
                self.total,
                self.chunks,
                0,
            )
        )
        self.out.seek(end)
        self.stats.output_size = end - self.start
        return self.stats

    def add(self, first: int, count: int, pattern: bytes | None, data: memoryview) -> None:
        if pattern == b"\0\0\0\0" and self.zeros_as_dont_care:
            kind = "skip"
        else:
            kind = "raw" if pattern is None else "fill"
        at = self.first + self.count if self.kind else 0
        if first > at:
            if self.kind == "skip":
                self.count += first - at
            else:
                self.close_run()
                self.open_skip(at, first - at)
        if self.kind == kind and (kind == "skip" or (kind == "fill" and pattern == self.pattern)):
            self.count += count
            return
        if kind == "raw":
            if self.kind == "raw" and self.count < self.max_raw:
                take = min(count, self.max_raw - self.count)
                self.out.write(data[: take * self.bs])
                self.count += take
                first, count, data = first + take, count - take, data[take * self.bs :]
            while count:
                self.close_run()
                take = min(count, self.max_raw)
                self.kind, self.first, self.count = "raw", first, take
                self.raw_header_at = self.out.tell()
                self.out.write(bytes(CHUNK_HEADER_SIZE))
                self.out.write(data[: take * self.bs])
                first, count, data = first + take, count - take, data[take * self.bs :]
            return
        self.close_run()
        self.kind, self.first, self.count = kind, first, count
        self.pattern = pattern or b""

    def open_skip(self, first: int, count: int) -> None:
        self.kind, self.first, self.count = "skip", first, count

    def close_run(self) -> None:
        kind, count, out = self.kind, self.count, self.out
        if not kind:
            return
        self.counter.tick()
        self.chunks += 1
        if kind == "raw":
            end = out.tell()
            out.seek(self.raw_header_at)
            out.write(CHUNK_HEADER.pack(CHUNK_RAW, 0, count, CHUNK_HEADER_SIZE + count * self.bs))
            out.seek(end)
            self.stats.raw_chunks += 1
            self.stats.raw_blocks += count
        elif kind == "fill":
            out.write(CHUNK_HEADER.pack(CHUNK_FILL, 0, count, CHUNK_HEADER_SIZE + 4))
            out.write(self.pattern)
            self.stats.fill_chunks += 1
            self.stats.fill_blocks += count
        else:
            out.write(CHUNK_HEADER.pack(CHUNK_DONT_CARE, 0, count, CHUNK_HEADER_SIZE))
            self.stats.dont_care_chunks += 1
            self.stats.dont_care_blocks += count
        # The next run starts where this one ended; keep first+count for gap detection.
        self.first, self.count = self.first + count, 0
        self.kind = "closed"


def split_sparse(
    src: Source, max_size: int, ctx: Context, *, block_size: int = 4096
) -> list[SparsePiece]:
    """Split an image into sparse files of at most ``max_size`` bytes each (fastboot's
    max-download-size), which together expand to the image.

    ``src`` is an Android sparse image (its chunks are kept, a RAW chunk split where needed) or
    a raw image (classified as by ``write_sparse`` with ``block_size``). Each piece declares the
    whole image's block count; blocks outside it are DONT_CARE. The pieces' exact sizes are
    known before any is written; write them with ``SparsePiece.write``. CRC32 chunks of a
    sparse input are not carried over (``inspect`` checks them).
    """
    if src.size >= FILE_HEADER_SIZE and _sniff(Sniff(src.head(FILE_HEADER_SIZE), b"", src.size)):
        layout = scan_sparse(src, ctx)
    else:
        layout = scan_raw(src, ctx, block_size=block_size)
    bs = layout.block_size
    total = layout.total_blocks
    smallest = FILE_HEADER_SIZE + 3 * CHUNK_HEADER_SIZE + bs
    if max_size < smallest:
        raise UsageError(
            f"max size {max_size} is too small: a piece with one {bs}-byte block needs "
            f"{smallest} bytes"
        )
    pieces: list[SparsePiece] = []
    runs = layout.runs
    i = 0
    pending: Run | None = runs[0] if runs else None
    while pending is not None:
        members: list[Run] = []
        size = FILE_HEADER_SIZE + (CHUNK_HEADER_SIZE if pending[0] > 0 else 0)
        at = pending[0]
        while pending is not None:
            first, count, pattern, offset = pending
            gap = CHUNK_HEADER_SIZE if first > at else 0
            end = first + count
            trail = CHUNK_HEADER_SIZE if end < total else 0
            cost = _run_cost(pending, bs)
            if size + gap + cost + trail <= max_size:
                members.append(pending)
                size += gap + cost
                at = end
                i += 1
                pending = runs[i] if i < len(runs) else None
                continue
            if pattern is None:
                fit = (max_size - size - gap - 2 * CHUNK_HEADER_SIZE) // bs
                if fit >= 1:
                    members.append((first, fit, None, offset))
                    size += gap + CHUNK_HEADER_SIZE + fit * bs
                    at = first + fit
                    pending = (first + fit, count - fit, None, offset + fit * bs)
            if not members:  # cannot happen given ``smallest``; guards the loop
                raise UsageError(f"max size {max_size} cannot hold one chunk")
            break
        if at < total:
            size += CHUNK_HEADER_SIZE
        nchunks, _ = _plan(members, total)
        pieces.append(SparsePiece(len(pieces), layout, members, size, nchunks))
    if not pieces:  # nothing but DONT_CARE
        nchunks, _ = _plan([], total)
        pieces.append(
            SparsePiece(0, layout, [], FILE_HEADER_SIZE + CHUNK_HEADER_SIZE * nchunks, nchunks)
        )
    return pieces


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=FORMAT,
        sniff=_sniff,
        inspect=inspect,
        priority=20,
        summary="Android sparse image (img2simg, fastboot): chunks, block counts, CRC32 chunks",
    ),
)
