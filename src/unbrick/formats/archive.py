"""Archives: zip, tar and cpio, listed member by member with path-safety checks.

Every member is listed (name, type, size, mode, link target). Regular files are read once:
hashed, their format detected from their first bytes, and compressed or tar/cpio members are
described recursively by :func:`unbrick.formats.nested.inspect_stream`. A member whose path or
link target would land outside the extraction directory is a problem naming it.

* zip (PKWARE APPNOTE 6.3): the central directory is read with the standard library's
  :mod:`zipfile` over a read-only file view of the :class:`Source`; member data is located
  through its local header and decoded here (stored, deflate, bzip2, lzma) so that every
  member's output is bounded by its declared size and the expansion limits, and its CRC-32 is
  verified. Overlapping members (a known zip-bomb construction) are refused.
* tar (POSIX ustar and pax, GNU, v7): parsed here from the 512-byte headers, forward-only, so
  that the same code reads a tar file and the tar inside a compressed stream with bounded
  memory (the standard library's stream mode buffers whole extended headers).
* cpio: the "new" ASCII formats (070701, and 070702 whose checksum is the byte sum of the
  data), the portable ASCII format (070707) and the old binary format of either byte order.
"""

from __future__ import annotations

import io
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

from unbrick.errors import ImageError, LimitError
from unbrick.formats import compress, nested
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
from unbrick.formats.nested import (
    CONTAINERS,
    ExpansionBudget,
    Prefixed,
    Reader,
    SourceStream,
    Window,
    read_full,
)

#: Longest symlink target read from member data.
_MAX_LINK = 64 * KiB
#: Longest tar extended header (pax records, GNU long names) accepted.
_MAX_TAR_EXT = 1 * MiB
#: Longest cpio member name accepted.
_MAX_CPIO_NAME = 64 * KiB

_DRIVE = re.compile(r"^[A-Za-z]:")


# --- path safety ---------------------------------------------------------------------------


def _parts(path: str) -> list[str]:
    return [c for c in path.replace("\\", "/").split("/") if c not in ("", ".")]


def _is_absolute(path: str) -> bool:
    p = path.replace("\\", "/")
    return p.startswith("/") or bool(_DRIVE.match(p))


def safe_member_path(name: str, link_target: str | None = None, *, hardlink: bool = False) -> str:
    """The normalised relative path of archive member ``name``, or LimitError if it escapes.

    A name escapes when it is absolute (``/x``, ``C:x``, ``\\\\server\\x``), contains a ``..``
    component (backslashes count as separators), or contains a NUL byte. With ``link_target``,
    the link must also stay inside: a symlink target is resolved from the member's directory,
    a hard link target (``hardlink=True``) from the archive root; absolute targets escape.
    Returns the path with ``.`` and empty components removed (``"."`` for the root itself).
    """
    if "\x00" in name:
        raise LimitError(f"member {name!r} has a NUL byte in its name")
    if _is_absolute(name):
        raise LimitError(f"member '{name}' escapes the extraction directory (absolute path)")
    parts = _parts(name)
    if ".." in parts:
        raise LimitError(f"member '{name}' escapes the extraction directory ('..' component)")
    if link_target is not None:
        if "\x00" in link_target or not link_target:
            raise LimitError(f"member '{name}' has an empty or NUL-bearing link target")
        if _is_absolute(link_target):
            raise LimitError(
                f"member '{name}' links to '{link_target}', outside the extraction directory"
            )
        where = [] if hardlink else parts[:-1]
        for c in _parts(link_target):
            if c != "..":
                where.append(c)
            elif where:
                where.pop()
            else:
                raise LimitError(
                    f"member '{name}' links to '{link_target}', outside the extraction directory"
                )
    return "/".join(parts) or "."


def _check_path(f: Findings, name: str, link: str | None, kind: str) -> None:
    try:
        safe_member_path(
            name, link if kind in ("symlink", "hardlink") else None, hardlink=kind == "hardlink"
        )
    except LimitError as e:
        f.problem(e.message)


# --- shared listing ------------------------------------------------------------------------


class _Listing:
    """The member list of one archive, with totals, in ``f.details``."""

    def __init__(self, ctx: Context, f: Findings, budget: ExpansionBudget) -> None:
        self.ctx = ctx
        self.f = f
        self.budget = budget
        self.members: list[dict[str, Any]] = []
        self.counts = {"file": 0, "dir": 0, "symlink": 0, "hardlink": 0, "other": 0}
        f.details.update(members=self.members, member_count=0, total_size=0, counts=self.counts)

    def add(self, entry: dict[str, Any]) -> None:
        limit = self.ctx.limits.max_members
        if len(self.members) >= limit:
            raise LimitError(f"archive has more than {limit} members (max_members)")
        self.members.append(entry)
        self.counts[entry["type"]] += 1
        self.f.details["member_count"] = len(self.members)
        if entry["type"] == "file":
            self.f.details["total_size"] += entry["size"]
        _check_path(self.f, entry["name"], entry.get("link_target"), entry["type"])

    def content(self, entry: dict[str, Any], stream: Stream, size: int) -> None:
        """Read a regular member's data: hash, detect, and descend into containers."""
        inner = nested.inspect_stream(stream, self.ctx, size_hint=size, budget=self.budget)
        entry["sha256"] = inner["sha256"]
        entry["inner_format"] = inner["format"]
        if inner["format"] in CONTAINERS:
            entry["inner"] = inner
        nested.lift(self.f, inner, f"member '{entry['name']}'")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _cstr(raw: bytes) -> str:
    return _text(raw.split(b"\x00", 1)[0])


# --- tar -----------------------------------------------------------------------------------

_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_TAR_NODATA = frozenset(b"123456")
_TAR_KINDS = {
    ord("0"): "file",
    0: "file",
    ord("7"): "file",
    ord("S"): "file",
    ord("1"): "hardlink",
    ord("2"): "symlink",
    ord("5"): "dir",
    ord("D"): "dir",
}


def _tar_num(field: bytes, what: str, off: int) -> int:
    """A numeric tar field: octal ASCII (space/NUL padded) or base-256 (high bit set)."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    s = field.split(b"\x00", 1)[0].strip(b" ")
    if not s:
        return 0
    if s.strip(b"01234567"):
        raise ImageError(
            f"tar header at offset {off}: {what} field {field!r} is not an octal number",
            format="tar",
            offset=off,
        )
    return int(s, 8)


def _tar_checksum_ok(block: bytes) -> bool:
    try:
        stored = _tar_num(block[148:156], "checksum", 0)
    except ImageError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b & 0x80)
    return stored == signed


def _tar_sniff(head: bytes) -> bool:
    if len(head) < _TAR_BLOCK:
        return False
    block = head[:_TAR_BLOCK]
    if block == _ZERO_BLOCK or not block[0] or not _tar_checksum_ok(block):
        return False
    return block[257:262] == b"ustar" or block[156] in b"\x000123456"


def _pax(data: bytes, off: int) -> dict[str, str]:
    """pax extended header records: ``"<len> <key>=<value>\\n"``."""
    out: dict[str, str] = {}
    pos = 0
    n = len(data)
    while pos < n and data[pos]:
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp] if sp > pos else b""
        if not digits.isdigit():
            raise ImageError(
                f"tar pax header at offset {off}: malformed record at byte {pos}",
                format="tar",
                offset=off,
            )
        end = pos + int(digits)
        if end > n or end < sp + 3 or data[end - 1] != 0x0A:
            raise ImageError(
                f"tar pax header at offset {off}: record at byte {pos} has a bad length",
                format="tar",
                offset=off,
            )
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq:
            raise ImageError(
                f"tar pax header at offset {off}: record at byte {pos} has no '='",
                format="tar",
                offset=off,
            )
        out[_text(key)] = _text(value)
        pos = end
    return out


def _pax_int(ext: dict[str, str], key: str, off: int) -> int | None:
    if key not in ext:
        return None
    value = ext[key].strip()
    if not value.isdigit() or not value.isascii():
        raise ImageError(
            f"tar pax header before offset {off}: {key}={value!r} is not a number",
            format="tar",
            offset=off,
        )
    return int(value)


def _scan_tar(stream: Stream, ctx: Context, f: Findings, budget: ExpansionBudget) -> None:
    rd = Reader(stream)
    listing = _Listing(ctx, f, budget)
    d = f.details
    counter = Counter(ctx, "tar headers")
    ext: dict[str, str] = {}
    zeros = 0
    d["tar_format"] = None
    while True:
        counter.tick()
        off = rd.offset
        block = rd.read_upto(_TAR_BLOCK)
        if not block:
            if off == 0:
                raise ImageError("tar archive is empty", format="tar", offset=0)
            if ext:
                raise ImageError(
                    f"tar archive ends at offset {off} after an extended header with no member",
                    format="tar",
                    offset=off,
                )
            f.warnings.append(
                "tar archive has no end-of-archive marker (two zero blocks)"
                if not zeros
                else f"tar archive ends with a lone zero block at offset {off - _TAR_BLOCK}"
            )
            return
        if len(block) < _TAR_BLOCK:
            raise ImageError(
                f"tar archive truncated: {len(block)}-byte block at offset {off}",
                format="tar",
                offset=off,
            )
        if block == _ZERO_BLOCK:
            zeros += 1
            if zeros == 2:
                d["end_offset"] = rd.offset
                return
            continue
        if zeros:
            f.warnings.append(f"tar archive has a lone zero block at offset {off - _TAR_BLOCK}")
            zeros = 0
        if not _tar_checksum_ok(block):
            raise ImageError(
                f"tar header at offset {off}: checksum mismatch (not a tar header)",
                format="tar",
                offset=off,
            )
        typ = block[156]
        size = _tar_num(block[124:136], "size", off)
        if size < 0:
            raise ImageError(
                f"tar header at offset {off}: negative size {size}", format="tar", offset=off
            )
        magic = block[257:265]
        if d["tar_format"] is None:
            d["tar_format"] = (
                "gnu" if magic == b"ustar  \x00" else "ustar" if magic[:6] == b"ustar\x00" else "v7"
            )
        if typ in b"xgLK":
            if size > _MAX_TAR_EXT:
                raise ImageError(
                    f"tar extended header at offset {off} is {size} bytes, more than "
                    f"{_MAX_TAR_EXT}",
                    format="tar",
                    offset=off,
                )
            data = rd.read_exact(size, f"tar extended header at offset {off}")
            rd.skip(-size % _TAR_BLOCK, "tar archive")
            if typ == ord("x"):
                ext.update(_pax(data, off))
                d["tar_format"] = "pax"
            elif typ == ord("g"):
                _pax(data, off)
                d["tar_format"] = "pax"
            elif typ == ord("L"):
                ext["gnu.longname"] = _cstr(data)
            else:
                ext["gnu.longlink"] = _cstr(data)
            continue
        name = _cstr(block[0:100])
        if magic[:6] == b"ustar\x00" and block[345]:
            name = _cstr(block[345:500]) + "/" + name
        name = ext.get("GNU.sparse.name") or ext.get("path") or ext.get("gnu.longname") or name
        link = ext.get("linkpath") or ext.get("gnu.longlink") or _cstr(block[157:257])
        pax_size = _pax_int(ext, "size", off)
        data_size = size if pax_size is None else pax_size
        sparse = typ == ord("S") or any(k.startswith("GNU.sparse.") for k in ext)
        real_size = data_size
        if typ == ord("S"):
            real_size = _tar_num(block[483:495], "real size", off)
            more = block[482]
            while more:
                counter.tick()
                more = rd.read_exact(_TAR_BLOCK, f"tar sparse header after offset {off}")[504]
        for key in ("GNU.sparse.realsize", "GNU.sparse.size"):
            value = _pax_int(ext, key, off)
            if value is not None:
                real_size = value
                break
        ext = {}
        kind = _TAR_KINDS.get(typ, "other")
        if kind == "file" and typ in (0, ord("0")) and name.endswith("/"):
            kind = "dir"  # v7 tar marks directories with a trailing slash only
        has_data = typ not in _TAR_NODATA
        entry: dict[str, Any] = {
            "name": name,
            "type": kind,
            "size": real_size if has_data else 0,
            "mode": _tar_num(block[100:108], "mode", off) & 0o7777,
            "uid": _tar_num(block[108:116], "uid", off),
            "gid": _tar_num(block[116:124], "gid", off),
            "mtime": _tar_num(block[136:148], "mtime", off),
        }
        if kind in ("symlink", "hardlink"):
            entry["link_target"] = link
        if sparse:
            entry["sparse"] = True
        if kind == "other":
            entry["typeflag"] = chr(typ) if typ else "\\0"
        listing.add(entry)
        if not has_data:
            continue
        if kind == "file" and not sparse:
            what = f"tar member '{name}' (header at offset {off})"
            listing.content(entry, Window(rd, data_size, what), data_size)
        else:
            rd.skip(data_size, f"tar member '{name}'")
        rd.skip(-data_size % _TAR_BLOCK, "tar archive")


# --- cpio ----------------------------------------------------------------------------------

_CPIO_NEWC = b"070701"
_CPIO_CRC = b"070702"
_CPIO_ODC = b"070707"
_CPIO_BIN_LE = b"\xc7\x71"
_CPIO_BIN_BE = b"\x71\xc7"
_CPIO_TRAILER = "TRAILER!!!"
_HEX = b"0123456789abcdefABCDEF"


def _cpio_fields(raw: bytes, widths: tuple[int, ...], base: int, off: int) -> list[int]:
    digits = _HEX if base == 16 else b"01234567"
    out = []
    pos = 0
    for w in widths:
        field = raw[pos : pos + w]
        if len(field) != w or field.strip(digits):
            raise ImageError(
                f"cpio header at offset {off}: field {field!r} is not a base-{base} number",
                format="cpio",
                offset=off,
            )
        out.append(int(field, base))
        pos += w
    return out


def _cpio_header(magic: bytes, rest: bytes, off: int) -> dict[str, int]:
    """Header fields of one cpio entry; ``rest`` follows the 6 bytes of ``magic``."""
    if magic in (_CPIO_NEWC, _CPIO_CRC):
        v = _cpio_fields(rest, (8,) * 13, 16, off)
        keys = "ino mode uid gid nlink mtime filesize devmajor devminor rmaj rmin namesize check"
        h = dict(zip(keys.split(), v, strict=True))
        h["dev"] = (h["devmajor"] << 32) | h["devminor"]
        return h
    if magic == _CPIO_ODC:
        v = _cpio_fields(rest, (6, 6, 6, 6, 6, 6, 6, 11, 6, 11), 8, off)
        keys = "dev ino mode uid gid nlink rdev mtime namesize filesize"
        return dict(zip(keys.split(), v, strict=True))
    order = "<" if magic[:2] == _CPIO_BIN_LE else ">"
    v = list(struct.unpack(order + "13H", magic + rest))
    return {
        "dev": v[1],
        "ino": v[2],
        "mode": v[3],
        "uid": v[4],
        "gid": v[5],
        "nlink": v[6],
        "mtime": (v[8] << 16) | v[9],
        "namesize": v[10],
        "filesize": (v[11] << 16) | v[12],
    }


def _cpio_kind(magic: bytes) -> tuple[str, int, int]:
    """(format name, header length after the magic, alignment) of a cpio magic, or raise."""
    if magic == _CPIO_NEWC:
        return "newc", 104, 4
    if magic == _CPIO_CRC:
        return "crc", 104, 4
    if magic == _CPIO_ODC:
        return "odc", 70, 1
    if magic[:2] == _CPIO_BIN_LE:
        return "bin-le", 20, 2
    if magic[:2] == _CPIO_BIN_BE:
        return "bin-be", 20, 2
    raise KeyError(magic)


def _cpio_sniff(head: bytes) -> bool:
    try:
        _, length, _ = _cpio_kind(head[:6])
    except KeyError:
        return False
    if len(head) < 6 + length:
        return False
    try:
        h = _cpio_header(head[:6], head[6 : 6 + length], 0)
    except (ImageError, struct.error):
        return False
    n = h["namesize"]
    if not 1 <= n <= 4096 or stat.S_IFMT(h["mode"]) not in _CPIO_TYPES:
        return False
    end = 6 + length + n
    return end > len(head) or head[end - 1] == 0


class _Summing:
    """Passes reads through and adds up the bytes (the cpio "crc" checksum)."""

    def __init__(self, stream: Stream) -> None:
        self._s = stream
        self.total = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._s.read(n)
        self.total += sum(data)
        return data


_CPIO_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "other",
    stat.S_IFBLK: "other",
    stat.S_IFIFO: "other",
    stat.S_IFSOCK: "other",
    0: "other",
}


def _skip_zeros(rd: Reader, ctx: Context) -> int:
    """Skip 0x00 bytes; return how many (what follows is left unread)."""
    skipped = 0
    while True:
        ctx.check_time()
        data = rd.read(CHUNK)
        if not data:
            return skipped
        rest = data.lstrip(b"\x00")
        skipped += len(data) - len(rest)
        if rest:
            rd.unread(rest)
            return skipped


def _scan_cpio(stream: Stream, ctx: Context, f: Findings, budget: ExpansionBudget) -> None:
    rd = Reader(stream)
    listing = _Listing(ctx, f, budget)
    d = f.details
    counter = Counter(ctx, "cpio entries")
    inodes: dict[tuple[int, int], str] = {}
    d["cpio_format"] = None
    d["archive_count"] = 1
    base = 0
    while True:
        counter.tick()
        off = rd.offset
        magic = rd.read_upto(6)
        if not magic:
            raise ImageError(
                "cpio archive is empty"
                if off == 0
                else f"cpio archive ends at offset {off} without a {_CPIO_TRAILER} entry",
                format="cpio",
                offset=off,
            )
        if len(magic) < 6:
            raise ImageError(f"cpio header at offset {off} truncated", format="cpio", offset=off)
        try:
            fmt, length, align = _cpio_kind(magic)
        except KeyError:
            raise ImageError(
                f"cpio header at offset {off}: bad magic {magic!r}", format="cpio", offset=off
            ) from None
        d["cpio_format"] = d["cpio_format"] or fmt
        h = _cpio_header(magic, rd.read_exact(length, f"cpio header at offset {off}"), off)
        namesize, filesize = h["namesize"], h["filesize"]
        if not 1 <= namesize <= _MAX_CPIO_NAME:
            raise ImageError(
                f"cpio header at offset {off}: name size {namesize} is not 1..{_MAX_CPIO_NAME}",
                format="cpio",
                offset=off,
            )
        name_raw = rd.read_exact(namesize, f"cpio entry name at offset {off}")
        if name_raw[-1]:
            raise ImageError(
                f"cpio entry at offset {off}: name is not NUL-terminated",
                format="cpio",
                offset=off,
            )
        name = _cstr(name_raw)
        rd.skip(-(rd.offset - base) % align, "cpio archive")
        data_pad = -(rd.offset - base + filesize) % align
        if name == _CPIO_TRAILER:
            rd.skip(filesize + data_pad, "cpio trailer")
            _skip_zeros(rd, ctx)
            rest = rd.peek(6)
            if not rest:
                return
            after = rd.offset
            if rest in (_CPIO_NEWC, _CPIO_CRC, _CPIO_ODC):
                # Concatenated archives (as the Linux initramfs allows): keep listing.
                d["archive_count"] += 1
                base = after
                continue
            tail = nested.inspect_stream(rd, ctx, budget=budget)
            d["after_trailer"] = tail
            d["after_trailer_offset"] = after
            if tail["format"] == "raw":
                f.warnings.append(
                    f"{tail['size']} bytes of unrecognised data after the cpio trailer "
                    f"at offset {after}"
                )
            nested.lift(f, tail, f"after the cpio trailer (offset {after})")
            return
        mode = h["mode"]
        kind = _CPIO_TYPES.get(stat.S_IFMT(mode), "other")
        entry: dict[str, Any] = {
            "name": name,
            "type": kind,
            "size": filesize,
            "mode": mode & 0o7777,
            "uid": h["uid"],
            "gid": h["gid"],
            "mtime": h["mtime"],
        }
        key = (h["dev"], h["ino"])
        if kind == "file" and h["nlink"] > 1:
            first = inodes.get(key)
            if first is None:
                inodes[key] = name
            elif filesize == 0:
                entry["type"] = kind = "hardlink"
                entry["link_target"] = first
        what = f"cpio member '{name}' (header at offset {off})"
        if kind == "symlink":
            if filesize > _MAX_LINK:
                raise ImageError(
                    f"{what}: symlink target of {filesize} bytes", format="cpio", offset=off
                )
            entry["link_target"] = _text(rd.read_exact(filesize, what))
            listing.add(entry)
        elif kind == "file":
            listing.add(entry)
            window = Window(rd, filesize, what)
            if fmt != "crc":
                listing.content(entry, window, filesize)
                rd.skip(data_pad, "cpio archive")
                continue
            summed = _Summing(window)
            listing.content(entry, summed, filesize)
            if summed.total & 0xFFFFFFFF != h["check"]:
                f.problem(
                    f"member '{name}': checksum mismatch, header 0x{h['check']:08x}, "
                    f"data sums to 0x{summed.total & 0xFFFFFFFF:08x}"
                )
        else:
            listing.add(entry)
            rd.skip(filesize, what)
        rd.skip(data_pad, "cpio archive")


def scan_stream(
    fmt: str, stream: Stream, ctx: Context, f: Findings, *, budget: ExpansionBudget
) -> None:
    """List the tar or cpio archive read from ``stream`` into ``f``.

    Malformed structure raises ImageError (what was listed so far stays in ``f.details``);
    failed checks (path escapes, checksums, problems of nested members) go to ``f.problems``.
    """
    if fmt == "tar":
        _scan_tar(stream, ctx, f, budget)
    elif fmt == "cpio":
        _scan_cpio(stream, ctx, f, budget)
    else:
        raise ImageError(f"'{fmt}' is not a stream archive format")


def _stream_inspector(fmt: str) -> Callable[[Source, Context], Findings]:
    def inspect(src: Source, ctx: Context) -> Findings:
        f = Findings(format=fmt)
        try:
            scan_stream(fmt, SourceStream(src), ctx, f, budget=ExpansionBudget(ctx.limits))
        except LimitError:
            raise
        except ImageError as e:
            f.problem(e.message)
        return f

    return inspect


# --- zip -----------------------------------------------------------------------------------


class SourceFile(io.RawIOBase):
    """A read-only, seekable binary file over a :class:`Source` (what zipfile needs)."""

    def __init__(self, src: Source) -> None:
        super().__init__()
        self._src = src
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._src.size + offset
        else:
            raise OSError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1, /) -> bytes:
        left = max(0, self._src.size - self._pos)
        n = left if size is None or size < 0 else min(size, left)
        data = self._src.read_upto(self._pos, n)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


_ZIP_METHODS = {
    0: "stored",
    1: "shrunk",
    6: "imploded",
    8: "deflate",
    9: "deflate64",
    12: "bzip2",
    14: "lzma",
    93: "zstd",
    95: "xz",
    98: "ppmd",
    99: "aes",
}
_ZIP_DECODERS = {8: "deflate", 12: "bzip2", 14: "lzma-alone"}
_ZIP_EOCD = b"PK\x05\x06"
_ZIP_LOCATOR = b"PK\x06\x07"
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    OverflowError,
    IndexError,
    KeyError,
)


def _zip_sniff(sn: Sniff) -> bool:
    head = sn.head
    if head[:4] == _ZIP_EOCD:
        return 22 <= sn.size <= 22 + 0xFFFF
    if head[:4] != _ZIP_LOCAL or len(head) < 30:
        return False
    version, _, method = struct.unpack_from("<HHH", head, 4)
    name_len = struct.unpack_from("<H", head, 26)[0]
    return (version & 0xFF) <= 100 and method in _ZIP_METHODS and name_len > 0


def _zip_directory(src: Source, ctx: Context) -> dict[str, Any]:
    """The end record: entry count, zip64, and a count of the central directory's headers.

    Walking the directory headers before zipfile builds its list bounds the work a hostile
    directory of millions of tiny entries could cause.
    """
    n = min(src.size, 22 + 0xFFFF)
    tail = src.read_upto(src.size - n, n)
    i = tail.rfind(_ZIP_EOCD)
    while i >= 0 and i + 22 > len(tail):
        i = tail.rfind(_ZIP_EOCD, 0, i)
    if i < 0:
        raise ImageError("zip end of central directory record not found", format="zip")
    eocd_at = src.size - n + i
    entries, cd_size = struct.unpack_from("<HI", tail, i + 10)
    zip64 = i >= 20 and tail[i - 20 : i - 16] == _ZIP_LOCATOR
    out: dict[str, Any] = {"entries": None if zip64 or entries == 0xFFFF else entries}
    out["zip64"] = zip64
    if zip64:
        # Where zipfile looks for it: right before the locator.
        eocd_at -= 56 + 20
        rec = src.read_upto(eocd_at, 56) if eocd_at >= 0 else b""
        if len(rec) == 56 and rec[:4] == b"PK\x06\x06":
            cd_size = struct.unpack_from("<Q", rec, 40)[0]
    # Count the headers zipfile will read (the same start, allowing for prepended data).
    pos = eocd_at - cd_size
    end = eocd_at
    count = 0
    counter = Counter(ctx, "zip central directory entries")
    while pos >= 0 and pos + 46 <= end:
        counter.tick()
        hdr = src.read_upto(pos, 46)
        if hdr[:4] != _ZIP_CENTRAL:
            break
        count += 1
        if count > ctx.limits.max_members:
            raise LimitError(f"zip has more than {ctx.limits.max_members} members (max_members)")
        a, b, c = struct.unpack_from("<HHH", hdr, 28)
        pos += 46 + a + b + c
    return out


def _has_zip64_extra(extra: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(extra):
        hid, size = struct.unpack_from("<HH", extra, pos)
        if hid == 0x0001:
            return True
        pos += 4 + size
    return False


class _Checked:
    """A zip member's expanded data, bounded by its declared size, CRC-32 checked at the end."""

    def __init__(self, stream: Stream, size: int, crc: int, name: str) -> None:
        self._s = stream
        self._declared = size
        self._crc_expected = crc
        self._name = name
        self._crc = 0
        self.size = 0
        self._done = False

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            parts = []
            while data := self.read(CHUNK):
                parts.append(data)
            return b"".join(parts)
        if self._done:
            return b""
        data = self._s.read(n)
        if data:
            self.size += len(data)
            if self.size > self._declared:
                raise LimitError(
                    f"decompression bomb: zip member '{self._name}' expands beyond its "
                    f"declared {self._declared} bytes"
                )
            self._crc = zlib.crc32(data, self._crc)
            return data
        self._done = True
        if self.size != self._declared:
            raise ImageError(
                f"zip member '{self._name}' is {self.size} bytes, its header says {self._declared}",
                format="zip",
            )
        if self._crc != self._crc_expected:
            raise ImageError(
                f"zip member '{self._name}': CRC-32 mismatch, stored "
                f"0x{self._crc_expected:08x}, computed 0x{self._crc:08x}",
                format="zip",
            )
        return b""


def _zip_kind(zi: zipfile.ZipInfo) -> tuple[str, int | None]:
    unix = zi.create_system == 3
    mode = zi.external_attr >> 16 if unix else 0
    fmt = stat.S_IFMT(mode)
    if unix and fmt == stat.S_IFLNK:
        kind = "symlink"
    elif (
        zi.orig_filename.endswith("/")
        or (unix and fmt == stat.S_IFDIR)
        or (not unix and zi.external_attr & 0x10)
    ):
        kind = "dir"
    elif unix and fmt not in (0, stat.S_IFREG):
        kind = "other"
    else:
        kind = "file"
    return kind, (mode & 0o7777 if unix else None)


def _zip_data(src: Source, zi: zipfile.ZipInfo, f: Findings, name: str) -> tuple[int, int] | None:
    """(start of the local header, start of the data), or None after reporting a problem."""
    off = zi.header_offset
    if off < 0 or off >= src.size:
        f.problem(f"member '{name}': local header offset {off} is outside the file")
        return None
    lh = src.read_upto(off, 30)
    if len(lh) < 30 or lh[:4] != _ZIP_LOCAL:
        f.problem(f"member '{name}': no local file header at offset {off}")
        return None
    nlen, xlen = struct.unpack_from("<HH", lh, 26)
    local_name = src.read_upto(off + 30, nlen)
    encoding = "utf-8" if zi.flag_bits & 0x800 else "cp437"
    try:
        cd_name = zi.orig_filename.encode(encoding)
    except UnicodeEncodeError:
        cd_name = b""
    if local_name != cd_name:
        f.problem(
            f"member '{name}': local header name {_text(local_name)!r} differs from the "
            "central directory"
        )
        return None
    data = off + 30 + nlen + xlen
    if data + zi.compress_size > src.size:
        f.problem(
            f"member '{name}': data runs past the end of the file "
            f"({data + zi.compress_size} > {src.size})"
        )
        return None
    return off, data


def _zip_stream(
    src: Source,
    zi: zipfile.ZipInfo,
    data_off: int,
    ctx: Context,
    budget: ExpansionBudget,
    name: str,
) -> Stream:
    raw = SourceStream(src, data_off, zi.compress_size)
    what = f"zip member '{name}'"
    method = zi.compress_type
    if method == 0:
        return raw
    if method == 14:
        hdr = read_full(raw, 4)
        psize = int.from_bytes(hdr[2:4], "little") if len(hdr) == 4 else -1
        props = read_full(raw, 5) if psize == 5 else b""
        if len(props) != 5:
            raise ImageError(f"{what}: bad lzma properties header", format="zip")
        size = b"\xff" * 8 if zi.flag_bits & 0x02 else struct.pack("<Q", zi.file_size)
        return compress.open_decompressor(
            "lzma-alone",
            Prefixed(props + size, raw),
            ctx,
            zi.compress_size,
            budget=budget,
            what=what,
        )
    return compress.open_decompressor(
        _ZIP_DECODERS[method], raw, ctx, zi.compress_size, budget=budget, what=what
    )


def _inspect_zip(src: Source, ctx: Context) -> Findings:
    f = Findings(format="zip")
    d = f.details
    limits = ctx.limits
    budget = ExpansionBudget(limits)
    eocd = _zip_directory(src, ctx)
    try:
        with zipfile.ZipFile(SourceFile(src)) as zf:
            infos = zf.infolist()
            comment = zf.comment
    except _ZIP_ERRORS as e:
        raise ImageError(f"zip central directory is unreadable: {e}", format="zip") from e
    if len(infos) > limits.max_members:
        raise LimitError(f"zip has more than {limits.max_members} members (max_members)")
    listing = _Listing(ctx, f, budget)
    d.update(
        zip64=eocd["zip64"] or any(_has_zip64_extra(zi.extra) for zi in infos),
        comment=_text(comment) if comment else None,
        compressed_size_total=sum(zi.compress_size for zi in infos),
        encrypted_count=sum(1 for zi in infos if zi.flag_bits & 0x1),
    )
    if eocd["entries"] is not None and eocd["entries"] != len(infos):
        f.problem(
            f"the end record says {eocd['entries']} members, the central directory has {len(infos)}"
        )
    declared = sum(zi.file_size for zi in infos if zi.compress_type != 0)
    if declared > limits.max_expanded_bytes:
        raise LimitError(
            f"decompression bomb: zip members declare {declared} expanded bytes, more than "
            f"{limits.max_expanded_bytes} (max_expanded_bytes)"
        )
    # Locate every member's data; refuse overlapping members instead of reading them twice.
    located: dict[int, int] = {}
    spans: list[tuple[int, int, int]] = []
    for i, zi in enumerate(infos):
        ctx.check_time()
        loc = _zip_data(src, zi, f, zi.orig_filename)
        if loc is not None:
            located[i] = loc[1]
            spans.append((loc[0], loc[1] + zi.compress_size, i))
    spans.sort()
    reach, owner = 0, -1
    for start, end, i in spans:
        if start < reach:
            f.problem(
                f"member '{infos[i].orig_filename}' overlaps member "
                f"'{infos[owner].orig_filename}' (zip bomb or corrupt directory)"
            )
            located.pop(i, None)
        if end > reach:
            reach, owner = end, i
    counter = Counter(ctx, "zip members")
    for i, zi in enumerate(infos):
        counter.tick()
        name = zi.orig_filename
        kind, mode = _zip_kind(zi)
        entry: dict[str, Any] = {
            "name": name,
            "type": kind,
            "size": zi.file_size,
            "compressed_size": zi.compress_size,
            "method": _ZIP_METHODS.get(zi.compress_type, f"method-{zi.compress_type}"),
            "crc32": f"{zi.CRC:08x}",
            "mode": mode,
        }
        if zi.flag_bits & 0x1:
            entry["encrypted"] = True
        data_off = located.get(i)
        body: Stream | None = None
        added = False
        try:
            if data_off is not None and kind in ("file", "symlink"):
                body = _zip_body(src, zi, data_off, entry, ctx, budget, f)
            if body is not None and kind == "symlink":
                target = read_full(body, _MAX_LINK + 1)
                nested.drain(body, ctx)
                if len(target) > _MAX_LINK:
                    f.problem(f"member '{name}': symlink target longer than {_MAX_LINK} bytes")
                entry["link_target"] = _text(target[:_MAX_LINK])
            listing.add(entry)
            added = True
            if body is not None and kind == "file":
                listing.content(entry, body, zi.file_size)
        except LimitError:
            raise
        except ImageError as e:
            if not added:
                listing.add(entry)
            f.problem(e.message if name in e.message else f"member '{name}': {e.message}")
    return f


def _zip_body(
    src: Source,
    zi: zipfile.ZipInfo,
    data_off: int,
    entry: dict[str, Any],
    ctx: Context,
    budget: ExpansionBudget,
    f: Findings,
) -> Stream | None:
    """The checked expanded data of a member, or None (with the reason reported)."""
    name = zi.orig_filename
    limits = ctx.limits
    if zi.flag_bits & 0x1:
        f.warnings.append(f"member '{name}' is encrypted: its contents were not checked")
        return None
    method = zi.compress_type
    if method != 0 and method not in _ZIP_DECODERS:
        f.warnings.append(
            f"member '{name}' uses compression {entry['method']}, which is not supported: "
            "its contents were not checked"
        )
        return None
    if method == 0 and zi.compress_size != zi.file_size:
        f.problem(
            f"member '{name}' is stored but its sizes differ "
            f"({zi.compress_size} stored, {zi.file_size} declared)"
        )
        return None
    if zi.file_size > limits.ratio_grace_bytes:
        ratio = zi.file_size / max(zi.compress_size, 1)
        if ratio > limits.max_ratio:
            raise LimitError(
                f"decompression bomb: zip member '{name}' would expand to {zi.file_size} "
                f"bytes from {zi.compress_size} (ratio {ratio:.0f}), over the limit of "
                f"{limits.max_ratio:g} (max_ratio)"
            )
    stream = _zip_stream(src, zi, data_off, ctx, budget, name)
    return _Checked(stream, zi.file_size, zi.CRC, name)


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="zip",
        sniff=_zip_sniff,
        inspect=_inspect_zip,
        priority=20,
        summary="zip archive: members listed, CRC-checked, paths checked, contents described",
    ),
    FormatSpec(
        name="cpio",
        sniff=lambda sn: _cpio_sniff(sn.head),
        inspect=_stream_inspector("cpio"),
        priority=25,
        summary="cpio archive (newc, crc, odc, binary): members listed and checked",
    ),
    FormatSpec(
        name="tar",
        sniff=lambda sn: _tar_sniff(sn.head),
        inspect=_stream_inspector("tar"),
        priority=30,
        summary="tar archive (ustar, pax, GNU, v7): members listed, paths checked",
    ),
)
