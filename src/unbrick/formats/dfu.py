"""USB DFU files: a payload followed by the DFU 1.1 suffix, optionally with a DfuSe prefix.

Suffix (USB DFU 1.1 specification, appendix B), the last ``bLength`` (16) bytes of the file,
little-endian: ``bcdDevice``, ``idProduct``, ``idVendor``, ``bcdDFU``, the signature bytes
``"UFD"``, ``bLength`` and ``dwCRC``. The CRC covers everything but its own 4 bytes; like
dfu-util, it starts from 0xffffffff and has no final inversion (``zlib.crc32(data) ^
0xffffffff``).

DfuSe (ST's extension, UM0391): the payload starts with ``"DfuSe"``, a version byte (1), the
size of the file without its suffix and a target count; each target has a 274-byte prefix
(``"Target"``, alternate setting, a named flag, a 255-byte name, the size of its elements and
their count) followed by elements, each an address, a size and that many bytes.
"""

from __future__ import annotations

import struct
import zlib

from unbrick.errors import ImageError
from unbrick.formats.base import Context, Counter, Findings, FormatSpec, Sniff, Source
from unbrick.formats.uimage import inner_format

SUFFIX_SIZE = 16
SIGNATURE = b"UFD"
DFUSE_MAGIC = b"DfuSe"
DFUSE_BCD = 0x011A
_SUFFIX = struct.Struct("<HHHH3sBI")
_DFUSE_PREFIX = struct.Struct("<5sBIB")
_TARGET = struct.Struct("<6sBI255sII")
_ELEMENT = struct.Struct("<II")
#: Elements per target accepted. Real files have a handful (one per flash region).
MAX_ELEMENTS = 65536


def bcd_text(value: int) -> str:
    """``0x011a`` -> ``"1.1a"``, ``0x0100`` -> ``"1.00"`` (as the USB descriptors write it)."""
    return f"{value >> 8:x}.{value & 0xFF:02x}"


def dfu_crc(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Continue a DFU CRC (initial value 0xffffffff, no final inversion) over ``data``."""
    return zlib.crc32(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _has_suffix(tail: bytes, size: int) -> bool:
    return len(tail) >= SUFFIX_SIZE and tail[-8:-5] == SIGNATURE and SUFFIX_SIZE <= tail[-5] <= size


def sniff(sn: Sniff) -> bool:
    return sn.head.startswith(DFUSE_MAGIC) or _has_suffix(sn.tail, sn.size)


def _parse_dfuse(src: Source, ctx: Context, end: int, f: Findings) -> dict[str, object]:
    """Parse the DfuSe prefix, targets and elements inside ``[0, end)``."""
    magic, version, image_size, n_targets = _DFUSE_PREFIX.unpack(
        src.read_at(0, _DFUSE_PREFIX.size, "DfuSe prefix")
    )
    if magic != DFUSE_MAGIC:
        raise ImageError("DfuSe prefix signature missing at offset 0", offset=0)
    if version != 1:
        raise ImageError(f"unsupported DfuSe version {version} at offset 5", offset=5)
    if image_size != end:
        f.problem(
            f"DfuSe image size field says {image_size} bytes, but the file has {end} bytes "
            "before its DFU suffix"
        )
    counter = Counter(ctx, "DfuSe elements")
    targets: list[dict[str, object]] = []
    off = _DFUSE_PREFIX.size
    for t in range(n_targets):
        if off + _TARGET.size > end:
            raise ImageError(
                f"DfuSe target {t} prefix at offset {off} runs past the payload end {end}",
                offset=off,
            )
        sig, alt, named, raw_name, target_size, n_elements = _TARGET.unpack(
            src.read_at(off, _TARGET.size, f"DfuSe target {t}")
        )
        if sig != b"Target":
            raise ImageError(f"DfuSe target {t} signature missing at offset {off}", offset=off)
        if n_elements > MAX_ELEMENTS:
            raise ImageError(
                f"DfuSe target {t} at offset {off} claims {n_elements} elements, more than "
                f"{MAX_ELEMENTS}",
                offset=off,
            )
        off += _TARGET.size
        start = off
        elements: list[dict[str, int]] = []
        for e in range(n_elements):
            counter.tick()
            if off + _ELEMENT.size > end:
                raise ImageError(
                    f"DfuSe target {t} element {e} header at offset {off} runs past the "
                    f"payload end {end}",
                    offset=off,
                )
            address, size = _ELEMENT.unpack(src.read_at(off, _ELEMENT.size, "DfuSe element"))
            if size > end - off - _ELEMENT.size:
                raise ImageError(
                    f"DfuSe target {t} element {e} at offset {off} claims {size} bytes, past "
                    f"the payload end {end}",
                    offset=off,
                )
            elements.append({"address": address, "size": size, "offset": off + _ELEMENT.size})
            off += _ELEMENT.size + size
        if off - start != target_size:
            f.problem(
                f"DfuSe target {t} size field says {target_size} bytes, its elements take "
                f"{off - start}"
            )
        target: dict[str, object] = {
            "alternate_setting": alt,
            "name": raw_name.split(b"\0", 1)[0].decode("utf-8", "replace") if named else None,
            "size": target_size,
            "elements": elements,
        }
        targets.append(target)
    if off != end:
        f.problem(f"{end - off} bytes lie between the last DfuSe target and the DFU suffix")
    return {"version": version, "image_size": image_size, "targets": targets}


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format="dfu")
    d = f.details
    is_dfuse = src.read_upto(0, len(DFUSE_MAGIC)) == DFUSE_MAGIC
    tail = src.read_upto(max(0, src.size - SUFFIX_SIZE), SUFFIX_SIZE)
    if not _has_suffix(tail, src.size):
        if not is_dfuse:
            raise ImageError("no DFU suffix: the file does not end with the 'UFD' signature")
        f.problem("DfuSe file has no DFU suffix (the 'UFD' signature is missing at its end)")
        d["suffix"] = False
        d["crc_ok"] = False
        d["payload_size"] = src.size
        d["payload_format"] = "dfuse"
        d["dfuse"] = _parse_dfuse(src, ctx, src.size, f)
        return f
    device, product, vendor, bcd_dfu, _, length, stored_crc = _SUFFIX.unpack(tail)
    payload_size = src.size - length
    d["suffix"] = True
    d["vendor_id"] = vendor
    d["product_id"] = product
    d["device"] = device
    d["dfu_version"] = bcd_text(bcd_dfu)
    d["suffix_length"] = length
    d["crc"] = stored_crc
    crc = 0xFFFFFFFF
    for chunk in src.chunks(0, src.size - 4):
        ctx.check_time()
        crc = dfu_crc(chunk, crc)
    d["crc_ok"] = crc == stored_crc
    if crc != stored_crc:
        f.problem(f"DFU suffix CRC mismatch: stored 0x{stored_crc:08x}, computed 0x{crc:08x}")
    d["payload_size"] = payload_size
    if is_dfuse:
        d["payload_format"] = "dfuse"
        if bcd_dfu != DFUSE_BCD:
            f.warnings.append(
                f"DfuSe file whose suffix declares DFU version {bcd_text(bcd_dfu)}, not 1.1a"
            )
        d["dfuse"] = _parse_dfuse(src, ctx, payload_size, f)
    else:
        d["payload_format"] = inner_format(src, 0, payload_size)
        if payload_size == 0:
            f.problem("DFU file has an empty payload")
    return f


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="dfu",
        sniff=sniff,
        inspect=inspect,
        # The DFU suffix is found at the end of the file, where it is only 4 bytes of signature
        # and length, and a DFU payload often starts with another format's magic (a uImage,
        # an ELF). Formats with a strong offset-0 magic (10-30) therefore go first and report
        # the suffix as trailing bytes; the suffix still beats the text formats (60) and raw.
        priority=40,
        summary="USB DFU 1.1 file: payload + 16-byte suffix with CRC32 (also ST DfuSe)",
    ),
)
