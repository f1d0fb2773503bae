"""Compressed streams: gzip, xz, zstd and bzip2, decoded forward-only with bomb limits.

:func:`open_decompressor` turns a compressed :class:`Stream` into a stream of its expanded
bytes. It walks the container framing itself (gzip members, xz streams and their padding, zstd
frames and blocks, bzip2 streams), so that it can report header facts, tell trailing garbage
from a next member, and bound the output of every call into the codec. Every byte produced is
charged to an :class:`~unbrick.formats.nested.ExpansionBudget` (``max_expanded_bytes``) and the
expansion ratio is checked once ``ratio_grace_bytes`` have been produced; either limit raises
LimitError. Corrupt or truncated data raises ImageError.

The ``inspect`` of each format decompresses the whole file (streaming), hashes the result and
describes the content with :func:`unbrick.formats.nested.inspect_stream`.

Formats: RFC 1952 (gzip), the .xz file format 1.2.1, RFC 8878 (zstd), and the bzip2 stream
header ("BZh" and a block size digit, followed by a block or end-of-stream magic).
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Any

import zstandard

from unbrick.errors import ImageError, LimitError, UsageError
from unbrick.formats import nested
from unbrick.formats.base import (
    CHUNK,
    Context,
    Counter,
    Findings,
    FormatSpec,
    KiB,
    MiB,
    Sniff,
    Source,
    Stream,
)
from unbrick.formats.nested import ExpansionBudget, SourceStream

NAMES = ("gzip", "xz", "zstd", "bzip2")

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
_BZ_BLOCK = bytes.fromhex("314159265359")
_BZ_EOS = bytes.fromhex("177245385090")

#: Compressed bytes read from the input at a time.
_IN_CHUNK = 64 * KiB
#: Expanded bytes one call into a codec may produce.
_OUT_STEP = 256 * KiB
#: Longest gzip FNAME/FCOMMENT we accept (the format has no limit; paths are far shorter).
_MAX_GZIP_STRING = 64 * KiB
#: Memory the xz decoder may use (presets need at most 65 MiB; 1.5 GiB dictionaries exist).
_XZ_MEMLIMIT = 256 * MiB
#: Largest zstd window accepted (the zstd CLI's default limit, 2^27).
_ZSTD_MAX_WINDOW = 1 << 27
_ZSTD_MAX_BLOCK = 128 * KiB
#: zstd blocks fed to the codec per call: bounds the output of one call to 8 x 128 KiB.
_ZSTD_BLOCKS_PER_CALL = 8

_GZIP_OS = {
    0: "fat",
    1: "amiga",
    2: "vms",
    3: "unix",
    4: "vm/cms",
    5: "atari-tos",
    6: "hpfs",
    7: "macintosh",
    8: "z-system",
    9: "cp/m",
    10: "tops-20",
    11: "ntfs",
    12: "qdos",
    13: "acorn-riscos",
    255: "unknown",
}
_XZ_CHECKS = {0: "none", 1: "crc32", 4: "crc64", 10: "sha256"}


def _xz_header_ok(head: bytes) -> bool:
    if len(head) < 12 or head[:6] != XZ_MAGIC:
        return False
    flags = head[6:8]
    if flags[0] != 0 or flags[1] & 0xF0:
        return False
    return zlib.crc32(flags) == int.from_bytes(head[8:12], "little")


def _is_skippable(magic: bytes) -> bool:
    return len(magic) == 4 and magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50


def compression_of(head: bytes) -> str | None:
    """The compression format that ``head`` (the first bytes of a file) starts with, or None."""
    if len(head) >= 10 and head[:3] == b"\x1f\x8b\x08" and not head[3] & 0xE0:
        return "gzip"
    if _xz_header_ok(head):
        return "xz"
    if len(head) >= 6 and head[:4] == ZSTD_MAGIC and not head[4] & 0x08:
        return "zstd"
    if len(head) >= 8 and _is_skippable(head[:4]):
        return "zstd"
    if (
        len(head) >= 10
        and head[:3] == BZIP2_MAGIC
        and 0x31 <= head[3] <= 0x39
        and head[4:10] in (_BZ_BLOCK, _BZ_EOS)
    ):
        return "bzip2"
    return None


class _Input:
    """Buffered compressed input with peek, take and unread."""

    def __init__(self, stream: Stream) -> None:
        self._s = stream
        self._buf = b""
        self._pos = 0
        self._eof = False
        #: Bytes taken from the input so far (its offset in the compressed stream).
        self.offset = 0
        self.failed: ImageError | None = None

    def _more(self) -> bool:
        if self._eof:
            return False
        try:
            data = self._s.read(_IN_CHUNK)
        except ImageError as e:
            self.failed = e
            raise
        if not data:
            self._eof = True
            return False
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True

    def available(self) -> int:
        return len(self._buf) - self._pos

    def peek(self, n: int) -> bytes:
        while self.available() < n and self._more():
            pass
        return self._buf[self._pos : self._pos + n]

    def take(self, n: int) -> bytes:
        data = self.peek(n)
        self._pos += len(data)
        self.offset += len(data)
        return data

    def take_some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes, or b"" at the end of the input."""
        if not self.available():
            self._more()
        return self.take(min(n, self.available()))

    def unread(self, data: bytes) -> None:
        if data:
            self._buf = data + self._buf[self._pos :]
            self._pos = 0
            self.offset -= len(data)


class Decompressor:
    """A forward-only stream of the expanded bytes of a compressed stream.

    After :meth:`read` has returned b"", ``facts`` holds the header facts, ``trailing_bytes``
    counts bytes after the last stream and ``trailing_padding`` tells whether they were all
    0x00 or all 0xFF.
    """

    def __init__(
        self,
        name: str,
        stream: Stream,
        ctx: Context,
        compressed_size: int | None,
        budget: ExpansionBudget,
        what: str | None = None,
    ) -> None:
        self.name = name
        self.what = what or f"{name} stream"
        self._in = _Input(stream)
        self._ctx = ctx
        self._csize = compressed_size
        self._budget = budget
        self._records = Counter(ctx, f"{name} members, frames or blocks")
        self._out = b""
        self._out_pos = 0
        self.finished = False
        self.expanded_bytes = 0
        self.streams = 0
        self.trailing_bytes = 0
        self.trailing_padding = True
        self.facts: dict[str, Any] = {}

    @property
    def compressed_bytes(self) -> int:
        """Bytes of input consumed so far (all of it, trailing data included, once finished)."""
        return self._in.offset

    @property
    def input_error(self) -> ImageError | None:
        """The error the input stream raised, if that is why decoding stopped."""
        return self._in.failed

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            parts = []
            while data := self.read(CHUNK):
                parts.append(data)
            return b"".join(parts)
        while self._out_pos >= len(self._out):
            if self.finished or n == 0:
                return b""
            self._ctx.check_time()
            self._records.tick()
            out = self._step()
            if out:
                self._produced(len(out))
                self._out = out
                self._out_pos = 0
        data = self._out[self._out_pos : self._out_pos + n]
        self._out_pos += len(data)
        return data

    def _produced(self, n: int) -> None:
        self.expanded_bytes += n
        budget = self._budget
        budget.used += n
        limits = self._ctx.limits
        if budget.used > budget.limit:
            total = "" if budget.used == self.expanded_bytes else " (with the other streams)"
            raise LimitError(
                self._bomb(f"past the limit of {budget.limit} bytes{total} (max_expanded_bytes)")
            )
        grace = self.expanded_bytes > limits.ratio_grace_bytes
        if grace and self.expanded_bytes / self._ratio_base() > limits.max_ratio:
            raise LimitError(self._bomb(f"over the limit of {limits.max_ratio:g} (max_ratio)"))

    def _ratio_base(self) -> int:
        return max(self._csize or 0, self._in.offset, 1)

    def _bomb(self, why: str) -> str:
        base = self._ratio_base()
        return (
            f"decompression bomb: {self.what} expanded to {self.expanded_bytes} bytes from "
            f"{base} (ratio {self.expanded_bytes / base:.0f}), {why}"
        )

    def _step(self) -> bytes:
        """Produce some output (possibly none), or set ``finished``."""
        raise NotImplementedError

    def _truncated(self) -> ImageError:
        return ImageError(
            f"{self.what} truncated after {self._in.offset} bytes "
            f"({self.expanded_bytes} bytes expanded so far)",
            format=self.name,
            offset=self._in.offset,
        )

    def _corrupt(self, detail: object) -> ImageError:
        return ImageError(
            f"{self.what} is corrupt near offset {self._in.offset}: {detail}",
            format=self.name,
            offset=self._in.offset,
        )

    def _finish(self, counted: int = 0, padding: bool = True) -> None:
        """Consume what follows the last stream as trailing data, and stop."""
        self.trailing_bytes += counted
        self.trailing_padding = self.trailing_padding and padding
        while True:
            data = self._in.take_some(CHUNK)
            if not data:
                break
            self._ctx.check_time()
            self.trailing_bytes += len(data)
            if self.trailing_padding:
                self.trailing_padding = not data.translate(None, b"\x00") or not data.translate(
                    None, b"\xff"
                )
        self.finished = True


class _Gzip(Decompressor):
    """RFC 1952: members of header, raw deflate data, CRC-32 and ISIZE; any number of them."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._z: Any = None
        self._pending = b""
        self._crc = 0
        self._isize = 0
        self._member_start = 0
        self.facts["member_count"] = 0

    def _step(self) -> bytes:
        while True:
            if self._z is None and not self._start_member():
                return b""
            out = self._inflate()
            if out or self._z is not None:
                return out
            # The member ended (its trailer is checked): loop to the next one.

    def _start_member(self) -> bool:
        members = self.facts["member_count"]
        magic = self._in.peek(2)
        if members and magic != GZIP_MAGIC:
            self._finish()
            return False
        self._member_start = off = self._in.offset
        if not magic:
            raise ImageError("gzip stream is empty", format="gzip", offset=0)
        fixed = self._in.peek(10)
        if fixed[:2] != GZIP_MAGIC:
            raise ImageError(f"not a gzip stream: magic {fixed[:2].hex()}", format="gzip")
        if len(fixed) < 10:
            raise self._truncated()
        cm, flg, mtime, xfl, os_id = struct.unpack_from("<BBIBB", fixed, 2)
        if cm != 8:
            raise ImageError(
                f"gzip member at offset {off}: compression method {cm} is not deflate (8)",
                format="gzip",
                offset=off,
            )
        if flg & 0xE0:
            raise ImageError(
                f"gzip member at offset {off}: reserved flag bits set (0x{flg:02x})",
                format="gzip",
                offset=off,
            )
        pos = 10
        if flg & 0x04:  # FEXTRA
            xlen_b = self._in.peek(pos + 2)[pos:]
            if len(xlen_b) < 2:
                raise self._truncated()
            pos += 2 + int.from_bytes(xlen_b, "little")
            if len(self._in.peek(pos)) < pos:
                raise self._truncated()
        fname = comment = None
        if flg & 0x08:  # FNAME
            fname, pos = self._cstring(pos, "file name")
        if flg & 0x10:  # FCOMMENT
            comment, pos = self._cstring(pos, "comment")
        if flg & 0x02:  # FHCRC
            header = self._in.peek(pos + 2)
            if len(header) < pos + 2:
                raise self._truncated()
            stored = int.from_bytes(header[pos : pos + 2], "little")
            if zlib.crc32(header[:pos]) & 0xFFFF != stored:
                raise ImageError(
                    f"gzip member at offset {off}: header CRC-16 mismatch",
                    format="gzip",
                    offset=off,
                )
            pos += 2
        self._in.take(pos)
        if not members:
            self.facts.update(
                original_name=fname,
                comment=comment,
                mtime=mtime,
                os=_GZIP_OS.get(os_id, f"os-{os_id}"),
                xfl=xfl,
                text_flag=bool(flg & 0x01),
                header_crc=bool(flg & 0x02),
            )
        self.facts["member_count"] = members + 1
        self._z = zlib.decompressobj(-15)
        self._crc = 0
        self._isize = 0
        return True

    def _cstring(self, pos: int, what: str) -> tuple[str, int]:
        data = self._in.peek(pos + _MAX_GZIP_STRING + 1)
        end = data.find(b"\x00", pos)
        if end < 0:
            if len(data) < pos + _MAX_GZIP_STRING + 1:
                raise self._truncated()
            raise ImageError(
                f"gzip {what} at offset {self._in.offset + pos} is longer than "
                f"{_MAX_GZIP_STRING} bytes",
                format="gzip",
            )
        return data[pos:end].decode("latin-1"), end + 1

    def _inflate(self) -> bytes:
        z = self._z
        if not self._pending:
            self._pending = self._in.take_some(_IN_CHUNK)
        try:
            out: bytes = z.decompress(self._pending, _OUT_STEP)
        except zlib.error as e:
            raise self._corrupt(e) from e
        self._pending = z.unconsumed_tail
        self._crc = zlib.crc32(out, self._crc)
        self._isize += len(out)
        if z.eof:
            # After the end, the leftover input is unused_data; unconsumed_tail may repeat it
            # when the output limit was reached on the last call.
            self._in.unread(z.unused_data)
            self._pending = b""
            self._z = None
            self._end_member()
        elif not out and not self._pending and not self._in.available() and not self._in.peek(1):
            raise self._truncated()
        return out

    def _end_member(self) -> None:
        trailer = self._in.take(8)
        if len(trailer) < 8:
            raise self._truncated()
        crc, isize = struct.unpack("<II", trailer)
        member = self.facts["member_count"]
        if crc != self._crc:
            raise ImageError(
                f"gzip member {member} (offset {self._member_start}): CRC-32 mismatch, "
                f"stored 0x{crc:08x}, computed 0x{self._crc:08x}",
                format="gzip",
                offset=self._member_start,
            )
        if isize != self._isize & 0xFFFFFFFF:
            raise ImageError(
                f"gzip member {member} (offset {self._member_start}): length mismatch, "
                f"stored {isize}, expanded {self._isize} (mod 2^32)",
                format="gzip",
                offset=self._member_start,
            )
        self.streams += 1


class _Pumped(Decompressor):
    """Codecs with ``needs_input``/``max_length`` (lzma, bz2): one stream at a time."""

    _dec: Any = None
    _errors: tuple[type[Exception], ...] = (lzma.LZMAError, OSError, EOFError, ValueError)

    def _step(self) -> bytes:
        while True:
            if self._dec is None and (self.finished or not self._start()):
                return b""
            out = self._pump()
            if out or self._dec is not None:
                return out

    def _start(self) -> bool:
        raise NotImplementedError

    def _new_codec(self) -> Any:
        raise NotImplementedError

    def _pump(self) -> bytes:
        dec = self._dec
        data = b""
        if dec.needs_input:
            data = self._in.take_some(_IN_CHUNK)
            if not data:
                raise self._truncated()
        try:
            out: bytes = dec.decompress(data, _OUT_STEP)
        except lzma.LZMAError as e:
            if "memory usage limit" in str(e).lower():
                raise LimitError(
                    f"{self.what} needs more than {_XZ_MEMLIMIT // MiB} MiB of memory to decode"
                ) from e
            raise self._corrupt(e) from e
        except self._errors as e:
            raise self._corrupt(e) from e
        if dec.eof:
            self._in.unread(dec.unused_data)
            self._dec = None
            self.streams += 1
            self._stream_done()
        return out

    def _stream_done(self) -> None:
        pass


class _Xz(_Pumped):
    """One or more .xz streams, with stream padding (multiples of four 0x00 bytes) between."""

    def _start(self) -> bool:
        padding = 0
        if self.streams:
            while True:
                chunk = self._in.peek(min(max(self._in.available(), 1), CHUNK))
                zeros = len(chunk) - len(chunk.lstrip(b"\x00"))
                if not zeros:
                    break
                self._in.take(zeros)
                padding += zeros
                self._ctx.check_time()
        head = self._in.peek(12)
        if self.streams and not head:
            if padding % 4:
                self.trailing_bytes = padding
                self.trailing_padding = True
            self.finished = True
            return False
        if head[:6] != XZ_MAGIC:
            if not self.streams:
                if not head:
                    raise ImageError("xz stream is empty", format="xz", offset=0)
                raise ImageError(f"not an xz stream: magic {head[:6].hex()}", format="xz")
            self._finish(padding)
            return False
        if padding % 4:
            raise ImageError(
                f"xz stream padding of {padding} bytes before offset {self._in.offset} "
                "is not a multiple of 4",
                format="xz",
                offset=self._in.offset,
            )
        if len(head) < 12:
            raise self._truncated()
        if not _xz_header_ok(head):
            raise ImageError(
                f"xz stream header at offset {self._in.offset} is corrupt or uses unknown flags",
                format="xz",
                offset=self._in.offset,
            )
        check = _XZ_CHECKS.get(head[7] & 0x0F, f"check-{head[7] & 0x0F}")
        checks = self.facts.setdefault("checks", [])
        if check not in checks:
            checks.append(check)
        self.facts.setdefault("check", check)
        self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
        return True

    def _stream_done(self) -> None:
        self.facts["stream_count"] = self.streams


class _Bzip2(_Pumped):
    """One or more bzip2 streams ("BZh" + block size digit), as bzip2 -d accepts them."""

    def _start(self) -> bool:
        head = self._in.peek(4)
        if self.streams and (head[:3] != BZIP2_MAGIC or not head):
            self._finish()
            return False
        if not head:
            raise ImageError("bzip2 stream is empty", format="bzip2", offset=0)
        if head[:3] != BZIP2_MAGIC:
            raise ImageError(f"not a bzip2 stream: magic {head[:3].hex()}", format="bzip2")
        if len(head) < 4:
            raise self._truncated()
        if not 0x31 <= head[3] <= 0x39:
            raise ImageError(
                f"bzip2 stream at offset {self._in.offset}: block size digit {head[3]:#x} "
                "is not 1..9",
                format="bzip2",
                offset=self._in.offset,
            )
        if not self.streams:
            level = head[3] - 0x30
            self.facts["block_size_level"] = level
            self.facts["block_size"] = level * 100_000
        self._dec = bz2.BZ2Decompressor()
        return True

    def _stream_done(self) -> None:
        self.facts["stream_count"] = self.streams


class _RawDeflate(_Gzip):
    """A single raw deflate stream (zip method 8); what follows it is trailing data."""

    def _step(self) -> bytes:
        if self._z is None:
            if self.streams:
                self._finish()
                return b""
            self._z = zlib.decompressobj(-15)
        return self._inflate()

    def _end_member(self) -> None:
        self.streams += 1


class _LzmaAlone(_Pumped):
    """A .lzma ("alone") stream: zip method 14 once its header is rewritten."""

    def _start(self) -> bool:
        if self.streams:
            self._finish()
            return False
        self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_XZ_MEMLIMIT)
        return True


class _Zstd(Decompressor):
    """RFC 8878 frames and skippable frames; blocks are delimited here and fed a few at a time."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        self._dobj: Any = None
        self._prefix = b""
        self._frame_out = 0
        self._fcs: int | None = None
        self._checksum = False
        self._frame_start = 0
        self.facts.update(frame_count=0, skippable_frame_count=0)
        self._sizes: list[int | None] = []

    def _step(self) -> bytes:
        if self._dobj is None and not self._start_frame():
            return b""
        return self._blocks()

    def _start_frame(self) -> bool:
        while True:
            self._records.tick()
            magic = self._in.peek(4)
            seen = self.facts["frame_count"] + self.facts["skippable_frame_count"]
            if not magic:
                if not seen:
                    raise ImageError("zstd stream is empty", format="zstd", offset=0)
                self.finished = True
                return False
            if _is_skippable(magic):
                head = self._in.peek(8)
                if len(head) < 8:
                    raise self._truncated()
                size = int.from_bytes(head[4:8], "little")
                self._in.take(8)
                self._skip(size)
                self.facts["skippable_frame_count"] += 1
                continue
            if magic != ZSTD_MAGIC:
                if not seen:
                    raise ImageError(f"not a zstd stream: magic {magic.hex()}", format="zstd")
                self._finish()
                return False
            self._parse_frame_header()
            return True

    def _skip(self, n: int) -> None:
        while n > 0:
            data = self._in.take(min(n, CHUNK))
            if not data:
                raise self._truncated()
            n -= len(data)
            self._ctx.check_time()

    def _parse_frame_header(self) -> None:
        off = self._in.offset
        head = self._in.peek(18)
        if len(head) < 5:
            raise self._truncated()
        fhd = head[4]
        fcs_flag = fhd >> 6
        single = bool(fhd & 0x20)
        if fhd & 0x08:
            raise ImageError(
                f"zstd frame at offset {off}: reserved header bit set", format="zstd", offset=off
            )
        checksum = bool(fhd & 0x04)
        did_size = (0, 1, 2, 4)[fhd & 0x03]
        fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
        pos = 5
        window: int | None = None
        if not single:
            if len(head) < 6:
                raise self._truncated()
            wd = head[pos]
            log = 10 + (wd >> 3)
            window = (1 << log) + ((1 << log) >> 3) * (wd & 7)
            pos += 1
        need = pos + did_size + fcs_size
        if len(head) < need:
            raise self._truncated()
        did = int.from_bytes(head[pos : pos + did_size], "little")
        pos += did_size
        fcs: int | None = None
        if fcs_size:
            fcs = int.from_bytes(head[pos : pos + fcs_size], "little")
            if fcs_size == 2:
                fcs += 256
        if single:
            window = fcs
        if did:
            raise ImageError(
                f"zstd frame at offset {off} needs dictionary {did}, which is not available",
                format="zstd",
                offset=off,
            )
        if window is not None and window > _ZSTD_MAX_WINDOW:
            raise LimitError(
                f"zstd frame at offset {off} needs a {window}-byte window, more than "
                f"{_ZSTD_MAX_WINDOW}"
            )
        if not self.facts["frame_count"]:
            self.facts.update(window_size=window, checksum_flag=checksum)
        self.facts["frame_count"] += 1
        self._sizes.append(fcs)
        self._prefix = self._in.take(need)
        self._frame_start = off
        self._fcs = fcs
        self._checksum = checksum
        self._frame_out = 0
        self._dobj = self._dctx.decompressobj()

    def _blocks(self) -> bytes:
        parts = [self._prefix]
        self._prefix = b""
        last = False
        for _ in range(_ZSTD_BLOCKS_PER_CALL):
            self._records.tick()
            bh = self._in.take(3)
            if len(bh) < 3:
                raise self._truncated()
            v = int.from_bytes(bh, "little")
            last = bool(v & 1)
            btype = (v >> 1) & 3
            bsize = v >> 3
            if btype == 3:
                raise self._corrupt("reserved block type")
            if bsize > _ZSTD_MAX_BLOCK:
                raise self._corrupt(f"block of {bsize} bytes is larger than 128 KiB")
            body = self._in.take(1 if btype == 1 else bsize)
            if len(body) < (1 if btype == 1 else bsize):
                raise self._truncated()
            parts.append(bh)
            parts.append(body)
            if last:
                if self._checksum:
                    crc = self._in.take(4)
                    if len(crc) < 4:
                        raise self._truncated()
                    parts.append(crc)
                break
        try:
            out: bytes = self._dobj.decompress(b"".join(parts))
        except zstandard.ZstdError as e:
            raise self._corrupt(e) from e
        self._frame_out += len(out)
        if last:
            if not self._dobj.eof or self._dobj.unused_data:
                raise self._corrupt("the frame does not end with its last block")
            if self._fcs is not None and self._fcs != self._frame_out:
                raise ImageError(
                    f"zstd frame at offset {self._frame_start} declares {self._fcs} bytes of "
                    f"content but expands to {self._frame_out}",
                    format="zstd",
                    offset=self._frame_start,
                )
            self._dobj = None
            self.streams += 1
            sizes = self._sizes
            self.facts["content_size"] = (
                sum(s for s in sizes if s is not None) if None not in sizes else None
            )
        return out


_KINDS: dict[str, type[Decompressor]] = {
    "gzip": _Gzip,
    "xz": _Xz,
    "zstd": _Zstd,
    "bzip2": _Bzip2,
    "deflate": _RawDeflate,
    "lzma-alone": _LzmaAlone,
}


def open_decompressor(
    name: str,
    stream: Stream,
    ctx: Context,
    compressed_size: int | None = None,
    *,
    budget: ExpansionBudget | None = None,
    what: str | None = None,
) -> Decompressor:
    """A forward-only reader of the expanded bytes of ``stream``, compressed as ``name``.

    ``name`` is one of :data:`NAMES` (or ``deflate``/``lzma-alone``, the raw forms zip uses).
    ``compressed_size`` (when known) is the denominator of the ratio check; otherwise the bytes
    consumed so far are. ``budget`` is shared with the other decompressors of one inspection
    (a fresh one is made if not given). ``what`` names the stream in messages.
    Reading raises ImageError on corrupt or truncated data and LimitError on a bomb.
    """
    cls = _KINDS.get(name)
    if cls is None:
        raise UsageError(f"unknown compression '{name}'", hint=f"use one of {', '.join(NAMES)}")
    return cls(name, stream, ctx, compressed_size, budget or ExpansionBudget(ctx.limits), what)


def inspect_decompressor(
    dec: Decompressor, ctx: Context, f: Findings, *, budget: ExpansionBudget
) -> None:
    """Decompress ``dec`` to its end, describing the result in ``f``.

    Corrupt data becomes a problem in ``f``; an error of ``dec``'s own input propagates.
    """
    inner: dict[str, Any] | None = None
    try:
        inner = nested.inspect_stream(dec, ctx, budget=budget)
    except LimitError:
        raise
    except ImageError as e:
        if e is dec.input_error:
            raise
        f.problem(e.message)
    d = f.details
    d.update(dec.facts)
    d["compressed_size"] = dec.compressed_bytes
    if inner is None:
        d.update(
            expanded_size=None,
            expanded_sha256=None,
            expanded_before_error=dec.expanded_bytes,
            ratio=None,
            inner_format=None,
            inner=None,
        )
        return
    size = inner["size"]
    d.update(
        expanded_size=size,
        expanded_sha256=inner["sha256"],
        ratio=round(size / dec.compressed_bytes, 3) if dec.compressed_bytes else None,
        inner_format=inner["format"],
        inner=inner,
        trailing_bytes=dec.trailing_bytes,
    )
    last = {"gzip": "member", "zstd": "frame"}.get(dec.name, "stream")
    if dec.trailing_bytes:
        if dec.trailing_padding:
            f.warnings.append(
                f"{dec.trailing_bytes} bytes of padding (all 0x00 or all 0xFF) after the last "
                f"{dec.name} {last}"
            )
        else:
            f.problem(
                f"{dec.trailing_bytes} bytes of trailing data after the last {dec.name} {last} "
                f"(at offset {dec.compressed_bytes - dec.trailing_bytes})"
            )
    nested.lift(f, inner, f"inside the {dec.name} data")


def _inspector(name: str) -> Callable[[Source, Context], Findings]:
    def inspect(src: Source, ctx: Context) -> Findings:
        f = Findings(format=name)
        budget = ExpansionBudget(ctx.limits)
        dec = open_decompressor(name, SourceStream(src), ctx, src.size, budget=budget)
        inspect_decompressor(dec, ctx, f, budget=budget)
        return f

    return inspect


def _sniffer(name: str) -> Callable[[Sniff], bool]:
    def sniff(sn: Sniff) -> bool:
        return compression_of(sn.head) == name

    return sniff


_SUMMARIES = {
    "gzip": "gzip (RFC 1952), any number of members; expanded and described",
    "xz": "xz (LZMA2), any number of streams; expanded and described",
    "zstd": "Zstandard (RFC 8878) frames and skippable frames; expanded and described",
    "bzip2": "bzip2, any number of streams; expanded and described",
}

SPECS: tuple[FormatSpec, ...] = tuple(
    FormatSpec(
        name=n,
        sniff=_sniffer(n),
        inspect=_inspector(n),
        priority=10,
        summary=_SUMMARIES[n],
    )
    for n in NAMES
)
