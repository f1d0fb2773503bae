"""U-Boot legacy images (uImage): a 64-byte big-endian header in front of the payload.

Header (U-Boot ``include/image.h``, ``struct legacy_img_hdr``): magic ``0x27051956``, header
CRC32, creation time, data size, load address, entry point, data CRC32, then one byte each for
OS, architecture, image type and compression, and a 32-byte NUL-padded name. Both CRCs are the
ordinary CRC-32 (as zlib computes it); the header CRC is taken with its own field zeroed.

Multi-file images (type ``multi``, and ``script``, which U-Boot lays out the same way) start
their payload with a table of big-endian 32-bit sub-image sizes ended by a zero entry; the
sub-images follow, each padded to a multiple of 4 bytes except the last.
"""

from __future__ import annotations

import struct
import zlib

from unbrick.errors import ImageError
from unbrick.formats.base import HEAD_SIZE, Context, Counter, Findings, FormatSpec, Sniff, Source

IH_MAGIC = 0x27051956
HEADER_SIZE = 64
NAME_SIZE = 32
_HEADER = struct.Struct(">7I4B32s")

# Id -> short name, as ``mkimage -A/-O/-T/-C list`` prints them (ids from U-Boot's image.h,
# which only ever appends). Ids that mkimage has no table entry for get the enum's name.
ARCHES: dict[int, str] = dict(
    enumerate(
        (
            "invalid", "alpha", "arm", "x86", "ia64", "mips", "mips64", "powerpc", "s390",
            "sh", "sparc", "sparc64", "m68k", "nios", "microblaze", "nios2", "blackfin",
            "avr32", "st200", "sandbox", "nds32", "or1k", "arm64", "arc", "x86_64", "xtensa",
            "riscv", "loongarch",
        )
    )
)  # fmt: skip
OSES: dict[int, str] = dict(
    enumerate(
        (
            "invalid", "openbsd", "netbsd", "freebsd", "4_4bsd", "linux", "svr4", "esix",
            "solaris", "irix", "sco", "dell", "ncr", "lynxos", "vxworks", "psos", "qnx",
            "u-boot", "rtems", "artos", "unity", "integrity", "ose", "plan9", "openrtos",
            "arm-trusted-firmware", "tee", "opensbi", "efi", "elf",
        )
    )
)  # fmt: skip
TYPES: dict[int, str] = dict(
    enumerate(
        (
            "invalid", "standalone", "kernel", "ramdisk", "multi", "firmware", "script",
            "filesystem", "flat_dt", "kwbimage", "imximage", "ublimage", "omapimage",
            "aisimage", "kernel_noload", "pblimage", "mxsimage", "gpimage", "atmelimage",
            "socfpgaimage", "x86_setup", "lpc32xximage", "loadable", "rkimage", "rksd",
            "rkspi", "zynqimage", "zynqmpimage", "zynqmpbif", "fpga", "vybridimage", "tee",
            "firmware_ivt", "pmmc", "stm32image", "socfpgaimage_v1", "mtk_image",
            "imx8mimage", "imx8image", "copro", "sunxi_egon", "sunxi_toc0", "fdt_legacy",
            "spkgimage", "sfspl", "tfa-bl31", "stm32imagev2",
        )
    )
)  # fmt: skip
COMPRESSIONS: dict[int, str] = dict(
    enumerate(("none", "gzip", "bzip2", "lzma", "lzo", "lz4", "zstd"))
)

#: More sub-images than any real multi-file image has; bounds the table walk.
MAX_SUB_IMAGES = 4096
#: Types whose payload starts with a sub-image size table.
_TABLE_TYPES = {4, 6}


def _name(table: dict[int, str], value: int) -> str:
    return table.get(value, f"unknown({value})")


def inner_format(src: Source, offset: int, size: int) -> str:
    """The format detected from the first bytes of ``size`` bytes at ``offset``."""
    # Imported here: detect imports the registry, which imports this module.
    from unbrick.formats.detect import detect_head  # noqa: PLC0415

    head = src.read_upto(offset, min(size, HEAD_SIZE))
    return detect_head(head, size)


def header_crc(header: bytes) -> int:
    """CRC32 of a 64-byte header with its CRC field (bytes 4..8) zeroed."""
    return zlib.crc32(header[:4] + bytes(4) + header[8:HEADER_SIZE])


def sniff(sn: Sniff) -> bool:
    head = sn.head
    if len(head) < HEADER_SIZE or head[:4] != IH_MAGIC.to_bytes(4, "big"):
        return False
    if header_crc(head) == int.from_bytes(head[4:8], "big"):
        return True
    # A damaged header CRC: still a uImage if the id bytes look like U-Boot's tables.
    os_id, arch, typ, comp = head[28:32]
    return os_id < 64 and arch < 64 and typ < 64 and comp < 16


def _crc_stream(src: Source, offset: int, length: int, ctx: Context) -> int:
    crc = 0
    for chunk in src.chunks(offset, length):
        ctx.check_time()
        crc = zlib.crc32(chunk, crc)
    return crc


def _sub_images(src: Source, ctx: Context, data_size: int, f: Findings) -> list[dict[str, object]]:
    """Read the size table of a multi-file or script payload and locate each sub-image."""
    avail = min(data_size, src.size - HEADER_SIZE)
    counter = Counter(ctx, "multi-file image entries")
    sizes: list[int] = []
    pos = HEADER_SIZE
    end = HEADER_SIZE + avail
    terminated = False
    while not terminated:
        block = src.read_upto(pos, min(4096, end - pos) & ~3)
        if not block:
            f.problem(
                f"sub-image size table starting at offset {HEADER_SIZE} has no zero "
                "terminator inside the image data"
            )
            return []
        for (value,) in struct.iter_unpack(">I", block):
            counter.tick()
            pos += 4
            if value == 0:
                terminated = True
                break
            sizes.append(value)
            if len(sizes) > MAX_SUB_IMAGES:
                f.problem(f"sub-image size table lists more than {MAX_SUB_IMAGES} entries")
                return []
    data_end = HEADER_SIZE + data_size
    out: list[dict[str, object]] = []
    off = pos
    for i, size in enumerate(sizes):
        entry: dict[str, object] = {"index": i, "offset": off, "size": size}
        if off + size > data_end:
            f.problem(
                f"sub-image {i} ({size} bytes at offset {off}) extends past the end of the "
                f"image data at offset {data_end}"
            )
        entry["format"] = inner_format(src, off, size) if off < src.size else "missing"
        out.append(entry)
        off += size if i == len(sizes) - 1 else (size + 3) & ~3
    if sizes and off < data_end:
        f.warnings.append(f"{data_end - off} bytes of image data follow the last sub-image")
    return out


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format="uimage")
    header = src.read_at(0, HEADER_SIZE, "uImage header")
    magic, hcrc, timestamp, size, load, entry, dcrc, os_id, arch, typ, comp, raw_name = (
        _HEADER.unpack(header)
    )
    if magic != IH_MAGIC:
        raise ImageError(f"not a uImage: magic 0x{magic:08x} at offset 0", offset=0)
    computed_hcrc = header_crc(header)
    d = f.details
    d["name"] = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
    d["type"] = _name(TYPES, typ)
    d["arch"] = _name(ARCHES, arch)
    d["os"] = _name(OSES, os_id)
    d["compression"] = _name(COMPRESSIONS, comp)
    d["type_id"], d["arch_id"], d["os_id"], d["compression_id"] = typ, arch, os_id, comp
    d["load_address"] = load
    d["entry_point"] = entry
    d["data_size"] = size
    d["timestamp"] = timestamp
    d["header_crc"] = hcrc
    d["data_crc"] = dcrc
    d["header_crc_ok"] = computed_hcrc == hcrc
    if not d["header_crc_ok"]:
        f.problem(f"header CRC mismatch: stored 0x{hcrc:08x}, computed 0x{computed_hcrc:08x}")
    avail = src.size - HEADER_SIZE
    if size > avail:
        d["data_crc_ok"] = False
        f.problem(
            f"image data truncated: header says {size} bytes, file has {avail} after the header"
        )
    else:
        computed = _crc_stream(src, HEADER_SIZE, size, ctx)
        d["data_crc_ok"] = computed == dcrc
        if computed != dcrc:
            f.problem(f"data CRC mismatch: stored 0x{dcrc:08x}, computed 0x{computed:08x}")
        if avail > size:
            f.warnings.append(f"{avail - size} bytes follow the image data")
    if typ in _TABLE_TYPES:
        d["images"] = _sub_images(src, ctx, size, f)
    else:
        d["payload_format"] = inner_format(src, HEADER_SIZE, size)
    return f


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="uimage",
        sniff=sniff,
        inspect=inspect,
        priority=20,
        summary="U-Boot legacy image (mkimage): 64-byte header with header and data CRC32",
    ),
)
