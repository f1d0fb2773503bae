"""Broadcom TRX firmware containers (many Broadcom-based routers; OpenWrt's ``otrx``).

Header, little-endian: magic ``"HDR0"`` (0x30524448), total length including the header, a
CRC32, then a 32-bit ``flag_version`` word (flags in the low 16 bits, version in the high 16)
and the offsets of 3 (version 1) or 4 (version 2) partitions from the start of the header; an
offset of 0 means the partition is absent.

The CRC covers bytes 12 (``flag_version``) up to ``length``. It starts from 0xffffffff like the
usual CRC-32 but has no final inversion, so it equals ``zlib.crc32(data) ^ 0xffffffff``
(OpenWrt's ``otrx check`` and Broadcom's CFE compute it this way).
"""

from __future__ import annotations

import struct
import zlib

from unbrick.errors import ImageError
from unbrick.formats.base import Context, Findings, FormatSpec, Sniff, Source
from unbrick.formats.uimage import inner_format

TRX_MAGIC = b"HDR0"
CRC_START = 12
_FIXED = struct.Struct("<4sIIHH")
_PARTS = {1: 3, 2: 4}


def header_size(version: int) -> int:
    return _FIXED.size + 4 * _PARTS[version]


def sniff(sn: Sniff) -> bool:
    head = sn.head
    if len(head) < header_size(1) or head[:4] != TRX_MAGIC:
        return False
    _, length, _, _, version = _FIXED.unpack_from(head)
    return version in _PARTS and length >= header_size(version)


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format="trx")
    fixed = src.read_at(0, _FIXED.size, "TRX header")
    magic, length, stored_crc, flags, version = _FIXED.unpack(fixed)
    if magic != TRX_MAGIC:
        raise ImageError(f"not a TRX image: magic {magic!r} at offset 0", offset=0)
    if version not in _PARTS:
        raise ImageError(f"unsupported TRX version {version} (known: 1, 2)", offset=14)
    hsize = header_size(version)
    if length < hsize:
        raise ImageError(f"TRX length {length} is smaller than its {hsize}-byte header")
    offsets = list(struct.unpack(f"<{_PARTS[version]}I", src.read_at(16, hsize - 16, "TRX header")))
    d = f.details
    d["length"] = length
    d["version"] = version
    d["flags"] = flags
    d["header_size"] = hsize
    d["crc"] = stored_crc
    if src.size < length:
        d["crc_ok"] = False
        f.problem(f"file truncated: TRX header says {length} bytes, file has {src.size}")
    else:
        crc = 0
        for chunk in src.chunks(CRC_START, length - CRC_START):
            ctx.check_time()
            crc = zlib.crc32(chunk, crc)
        crc ^= 0xFFFFFFFF
        d["crc_ok"] = crc == stored_crc
        if crc != stored_crc:
            f.problem(f"TRX CRC mismatch: stored 0x{stored_crc:08x}, computed 0x{crc:08x}")
        if src.size > length:
            f.warnings.append(f"{src.size - length} bytes follow the TRX length")

    # A partition runs to the next partition's start, the last one to the TRX length.
    starts = sorted(off for off in offsets if off)
    parts: list[dict[str, object]] = []
    for i, off in enumerate(offsets):
        if not off:
            continue
        later = [s for s in starts if s > off]
        size = (later[0] if later else max(off, length)) - off
        entry: dict[str, object] = {"index": i, "offset": off, "size": size}
        if off < hsize:
            f.problem(f"partition {i} offset {off} lies inside the {hsize}-byte TRX header")
        elif off >= length:
            f.problem(f"partition {i} offset {off} is beyond the TRX length {length}")
        entry["format"] = inner_format(src, off, size) if off < src.size else "missing"
        parts.append(entry)
    d["partitions"] = parts
    if not parts:
        f.problem("TRX header lists no partitions")
    return f


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="trx",
        sniff=sniff,
        inspect=inspect,
        priority=25,
        summary="Broadcom TRX firmware (HDR0): CRC32 over the image, up to 4 partitions",
    ),
)
