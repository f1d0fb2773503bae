"""Android boot images (``ANDROID!``, header versions 0-4) and vendor_boot images (``VNDRBOOT``).

Layouts from AOSP's ``bootimg.h`` (all fields little-endian):

* v0-v2: magic, kernel_size/addr, ramdisk_size/addr, second_size/addr, tags_addr, page_size,
  header_version (v0: unused, some vendors store a device-tree size there), os_version,
  name[16], cmdline[512], id[32], extra_cmdline[1024]; v1 adds recovery_dtbo_size,
  recovery_dtbo_offset (u64), header_size; v2 adds dtb_size, dtb_addr (u64). The header takes
  one page, then kernel, ramdisk, second, recovery_dtbo, dtb, each padded to page_size.
* v3-v4: magic, kernel_size, ramdisk_size, os_version, header_size, reserved[4],
  header_version, cmdline[1536]; v4 adds signature_size. Pages are 4096 bytes: header, kernel,
  ramdisk, then (v4) the boot signature.
* vendor_boot v3-v4: magic, header_version, page_size, kernel_addr, ramdisk_addr,
  vendor_ramdisk_size, cmdline[2048], tags_addr, name[16], header_size, dtb_size,
  dtb_addr (u64); v4 adds the vendor ramdisk table (size, entry count, entry size) and the
  bootconfig size. Sections: header, vendor ramdisk, dtb, ramdisk table, bootconfig.

``os_version`` packs A.B.C (7 bits each) above a patch level of year-2000 (7 bits) and month
(4 bits). The v0-v2 ``id`` is mkbootimg's SHA-1 over each section followed by its size as a
u32: kernel, ramdisk, second, then recovery_dtbo from v1 and dtb from v2 (the 20-byte digest,
zero-padded to 32 bytes).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from unbrick.errors import ImageError
from unbrick.formats.base import Context, Findings, FormatSpec, Sniff, Source

FORMAT = "android-boot"
BOOT_MAGIC = b"ANDROID!"
VENDOR_MAGIC = b"VNDRBOOT"

V0 = struct.Struct("<8s10I16s512s32s1024s")  # 1632 bytes
V1_EXTRA = struct.Struct("<IQI")  # recovery_dtbo_size, recovery_dtbo_offset, header_size
V2_EXTRA = struct.Struct("<IQ")  # dtb_size, dtb_addr
V3 = struct.Struct("<8s4I4II1536s")  # 1580 bytes
VENDOR_V3 = struct.Struct("<8s5I2048sI16sIIQ")  # 2112 bytes
VENDOR_V4_EXTRA = struct.Struct("<4I")
HEADER_SIZES = {
    0: V0.size,
    1: V0.size + V1_EXTRA.size,
    2: V0.size + V1_EXTRA.size + V2_EXTRA.size,
    3: V3.size,
    4: V3.size + 4,
}
VENDOR_HEADER_SIZES = {3: VENDOR_V3.size, 4: VENDOR_V3.size + VENDOR_V4_EXTRA.size}
V3_PAGE_SIZE = 4096
_MIN_PAGE, _MAX_PAGE = 1024, 1 << 20
_HEAD = 0x210  # enough of a section's start to recognise its format

#: (offset, magic, name) for recognising kernels, ramdisks and the other sections.
_PAYLOAD_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0x38, b"ARM\x64", "arm64-image"),
    (0x24, b"\x18\x28\x6f\x01", "arm-zimage"),
    (0x202, b"HdrS", "x86-bzimage"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\x02\x21\x4c\x18", "lz4-legacy"),
    (0, b"\x04\x22\x4d\x18", "lz4"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (0, b"BZh", "bzip2"),
    (0, b"\x89LZO", "lzop"),
    (0, b"\x5d\x00\x00", "lzma"),
    (0, b"070701", "cpio"),
    (0, b"070702", "cpio"),
    (0, b"\x7fELF", "elf"),
    (0, b"\x27\x05\x19\x56", "uimage"),
    (0, b"\xd0\x0d\xfe\xed", "dtb"),
    (0, b"\xd7\xb7\xab\x1e", "dtbo"),
    (0, b"\x88\x16\x88\x58", "mtk-header"),
    (0, b"AVB0", "avb-vbmeta"),
    (0, b"MZ", "pe-efi"),
)


def payload_format(head: bytes) -> str:
    """The format of a section from its first bytes ("unknown" when not recognised)."""
    for offset, magic, name in _PAYLOAD_MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return "unknown"


def decode_os_version(field: int) -> tuple[str | None, str | None]:
    """("A.B.C", "YYYY-MM") from the packed os_version field; None for a zero part."""
    version = field >> 11
    patch = field & 0x7FF
    a, b, c = version >> 14, (version >> 7) & 0x7F, version & 0x7F
    os_version = f"{a}.{b}.{c}" if version else None
    os_patch = f"{(patch >> 4) + 2000:04d}-{patch & 0xF:02d}" if patch else None
    return os_version, os_patch


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pages(size: int, page: int) -> int:
    return -(-size // page)


def _valid_page(page: int) -> bool:
    return _MIN_PAGE <= page <= _MAX_PAGE and page & (page - 1) == 0


def _sniff(sn: Sniff) -> bool:
    head = sn.head
    if len(head) < 48:
        return False
    if head[:8] == BOOT_MAGIC:
        page, version = struct.unpack_from("<II", head, 36)
        return version in (3, 4) or _valid_page(page)
    if head[:8] == VENDOR_MAGIC:
        version, page = struct.unpack_from("<II", head, 8)
        return version in (3, 4) and _valid_page(page)
    return False


@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    size: int


def _check_sections(
    f: Findings, src: Source, sections: list[Section], page: int
) -> tuple[int, bool]:
    """Record sections, formats and truncation; (expected image size, all present)."""
    complete = True
    expected = 0
    listed = []
    for s in sections:
        listed.append({"name": s.name, "offset": s.offset, "size": s.size})
        f.details[f"{s.name}_format"] = None
        if s.size == 0:
            continue
        end = s.offset + s.size
        expected = max(expected, s.offset + _pages(s.size, page) * page)
        if end > src.size:
            f.problem(
                f"image is truncated: the {s.name} (bytes {s.offset}..{end}) runs past the end "
                f"of the file ({src.size} bytes)"
            )
            complete = False
        f.details[f"{s.name}_format"] = payload_format(src.read_upto(s.offset, min(_HEAD, s.size)))
    f.details["sections"] = listed
    expected = max(expected, page)
    f.details["expected_size"] = expected
    if src.size > expected:
        f.details["trailing_bytes"] = src.size - expected
    return expected, complete


def _avb_footer(f: Findings, src: Source) -> None:
    f.details["avb_footer"] = src.tail(64)[:4] == b"AVBf" and src.size >= 64


def _id_digest(src: Source, parts: list[tuple[int, int]], ctx: Context) -> bytes:
    """mkbootimg's image id: SHA-1 over each (data, u32 size) in turn."""
    h = hashlib.sha1(usedforsecurity=False)
    for offset, size in parts:
        if size:
            for piece in src.chunks(offset, size):
                h.update(piece)
                ctx.check_time()
        h.update(struct.pack("<I", size))
    return h.digest()


def _inspect_v0_2(src: Source, ctx: Context, f: Findings, version: int, legacy_dt: int) -> None:
    d = f.details
    fields = V0.unpack(src.read_at(0, V0.size, "boot image header"))
    (
        _,
        kernel_size,
        kernel_addr,
        ramdisk_size,
        ramdisk_addr,
        second_size,
        second_addr,
        tags_addr,
        page,
        _,
        os_field,
        name,
        cmdline,
        image_id,
        extra_cmdline,
    ) = fields
    if not _valid_page(page):
        raise ImageError(
            f"page_size {page} is not a power of two between {_MIN_PAGE} and {_MAX_PAGE}",
            format=FORMAT,
            offset=36,
        )
    d.update(
        kernel_size=kernel_size,
        ramdisk_size=ramdisk_size,
        second_size=second_size,
        page_size=page,
        kernel_addr=kernel_addr,
        ramdisk_addr=ramdisk_addr,
        second_addr=second_addr,
        tags_addr=tags_addr,
        name=_cstr(name),
        cmdline=_cstr(cmdline) + _cstr(extra_cmdline),
    )
    d["os_version"], d["os_patch_level"] = decode_os_version(os_field)
    pos = page
    sections = []
    for sname, size in (
        ("kernel", kernel_size),
        ("ramdisk", ramdisk_size),
        ("second", second_size),
    ):
        sections.append(Section(sname, pos, size))
        pos += _pages(size, page) * page
    id_parts = [(s.offset, s.size) for s in sections]
    if legacy_dt:
        sections.append(Section("dt", pos, legacy_dt))
        id_parts.append((pos, legacy_dt))
        pos += _pages(legacy_dt, page) * page
    if version >= 1:
        dtbo_size, dtbo_offset, header_size = V1_EXTRA.unpack(
            src.read_at(V0.size, V1_EXTRA.size, "boot image v1 header")
        )
        d.update(
            recovery_dtbo_size=dtbo_size, recovery_dtbo_offset=dtbo_offset, header_size=header_size
        )
        _check_header_size(f, version, header_size, page)
        at = pos
        if dtbo_size:
            if dtbo_offset != pos:
                f.warnings.append(
                    f"recovery_dtbo_offset is {dtbo_offset}, the layout puts it at {pos}"
                )
            at = dtbo_offset
        sections.append(Section("recovery_dtbo", at, dtbo_size))
        id_parts.append((at, dtbo_size))
        pos += _pages(dtbo_size, page) * page
    if version >= 2:
        dtb_size, dtb_addr = V2_EXTRA.unpack(
            src.read_at(V0.size + V1_EXTRA.size, V2_EXTRA.size, "boot image v2 header")
        )
        d.update(dtb_size=dtb_size, dtb_addr=dtb_addr)
        sections.append(Section("dtb", pos, dtb_size))
        id_parts.append((pos, dtb_size))
        if dtb_size == 0:
            f.warnings.append("header version 2 without a dtb")
    if kernel_size == 0:
        f.warnings.append("the boot image has no kernel")
    _, complete = _check_sections(f, src, sections, page)
    d["id"] = image_id.hex() if any(image_id) else None
    d["id_ok"] = None
    if not any(image_id):
        return
    if not complete:
        f.warnings.append("image id not checked: the image is truncated")
        return
    digest = _id_digest(src, id_parts, ctx)
    ok = image_id == digest.ljust(32, b"\0")
    d["id_ok"] = ok
    if ok:
        d["id"] = image_id[:20].hex()
    else:
        f.problem(
            f"image id {image_id.hex()} does not match the SHA-1 of the sections "
            f"({digest.hex()}): the kernel, ramdisk or another section was altered"
        )


def _check_header_size(f: Findings, version: int, header_size: int, page: int) -> None:
    need = HEADER_SIZES[version]
    if header_size < need:
        f.problem(f"header_size {header_size} is smaller than a version {version} header ({need})")
    elif header_size > page:
        f.problem(f"header_size {header_size} is larger than the {page}-byte header page")
    elif header_size != need:
        f.warnings.append(
            f"header_size {header_size} differs from the version {version} layout ({need})"
        )


def _inspect_v3_4(src: Source, f: Findings, version: int) -> None:
    d = f.details
    _, kernel_size, ramdisk_size, os_field, header_size, *_, cmdline = V3.unpack(
        src.read_at(0, V3.size, "boot image header")
    )
    page = V3_PAGE_SIZE
    d.update(
        kernel_size=kernel_size,
        ramdisk_size=ramdisk_size,
        page_size=page,
        header_size=header_size,
        cmdline=_cstr(cmdline),
    )
    d["os_version"], d["os_patch_level"] = decode_os_version(os_field)
    _check_header_size(f, version, header_size, page)
    sections = [Section("kernel", page, kernel_size)]
    pos = page + _pages(kernel_size, page) * page
    sections.append(Section("ramdisk", pos, ramdisk_size))
    pos += _pages(ramdisk_size, page) * page
    if version == 4:
        (signature_size,) = struct.unpack("<I", src.read_at(V3.size, 4, "boot image v4 header"))
        d["signature_size"] = signature_size
        sections.append(Section("signature", pos, signature_size))
    _check_sections(f, src, sections, page)


def _inspect_vendor(src: Source, f: Findings) -> None:
    d = f.details
    (
        _,
        version,
        page,
        kernel_addr,
        ramdisk_addr,
        ramdisk_size,
        cmdline,
        tags_addr,
        name,
        header_size,
        dtb_size,
        dtb_addr,
    ) = VENDOR_V3.unpack(src.read_at(0, VENDOR_V3.size, "vendor boot header"))
    if version not in VENDOR_HEADER_SIZES:
        raise ImageError(
            f"vendor boot header version {version} is not supported (3, 4)", format=FORMAT, offset=8
        )
    if not _valid_page(page):
        raise ImageError(
            f"page_size {page} is not a power of two between {_MIN_PAGE} and {_MAX_PAGE}",
            format=FORMAT,
            offset=12,
        )
    d.update(
        image_type="vendor_boot",
        header_version=version,
        page_size=page,
        kernel_addr=kernel_addr,
        ramdisk_addr=ramdisk_addr,
        vendor_ramdisk_size=ramdisk_size,
        cmdline=_cstr(cmdline),
        tags_addr=tags_addr,
        name=_cstr(name),
        header_size=header_size,
        dtb_size=dtb_size,
        dtb_addr=dtb_addr,
    )
    need = VENDOR_HEADER_SIZES[version]
    if header_size < need - 4 or header_size > page * 4:
        # mkbootimg of Android 11 wrote 2108 for the 2112-byte v3 header; tolerate that.
        f.problem(
            f"header_size {header_size} does not fit a version {version} vendor header "
            f"({need} bytes)"
        )
    pos = _pages(max(header_size, need), page) * page
    sections = [Section("vendor_ramdisk", pos, ramdisk_size)]
    pos += _pages(ramdisk_size, page) * page
    sections.append(Section("dtb", pos, dtb_size))
    pos += _pages(dtb_size, page) * page
    if version == 4:
        table_size, entries, entry_size, bootconfig_size = VENDOR_V4_EXTRA.unpack(
            src.read_at(VENDOR_V3.size, VENDOR_V4_EXTRA.size, "vendor boot v4 header")
        )
        d.update(
            vendor_ramdisk_table_size=table_size,
            vendor_ramdisk_table_entries=entries,
            vendor_ramdisk_table_entry_size=entry_size,
            bootconfig_size=bootconfig_size,
        )
        if entries * entry_size > table_size:
            f.problem(
                f"vendor ramdisk table: {entries} entries of {entry_size} bytes do not "
                f"fit in {table_size} bytes"
            )
        sections.append(Section("vendor_ramdisk_table", pos, table_size))
        pos += _pages(table_size, page) * page
        sections.append(Section("bootconfig", pos, bootconfig_size))
    _check_sections(f, src, sections, page)


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format=FORMAT)
    magic = src.read_at(0, 48, "boot image header")
    if magic[:8] == VENDOR_MAGIC:
        _inspect_vendor(src, f)
        _avb_footer(f, src)
        return f
    if magic[:8] != BOOT_MAGIC:
        raise ImageError("not an Android boot image (no ANDROID! magic)", format=FORMAT)
    (version,) = struct.unpack_from("<I", magic, 40)
    (page,) = struct.unpack_from("<I", magic, 36)
    legacy_dt = 0
    if version > 4:
        if not _valid_page(page):
            raise ImageError(
                f"boot image header version {version} is not supported (0-4)",
                format=FORMAT,
                offset=40,
            )
        # Before version 1 the field was unused; Qualcomm's mkbootimg keeps a dt size there.
        f.warnings.append(
            f"header_version field is {version}: read as version 0 with a {version}-byte "
            "device tree after the second stage (vendor extension)"
        )
        legacy_dt, version = version, 0
        f.details["dt_size"] = legacy_dt
    d: dict[str, Any] = f.details
    d["image_type"] = "boot"
    d["header_version"] = version
    if version <= 2:
        _inspect_v0_2(src, ctx, f, version, legacy_dt)
    else:
        _inspect_v3_4(src, f, version)
    _avb_footer(f, src)
    return f


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name=FORMAT,
        sniff=_sniff,
        inspect=inspect,
        priority=20,
        summary="Android boot/recovery/vendor_boot image (header v0-v4): sections, id, cmdline",
    ),
)
