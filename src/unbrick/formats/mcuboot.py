"""MCUboot application images (the bootloader of Zephyr, Mynewt, TF-M and many MCUs).

Layout (MCUboot ``docs/design.md`` and ``bootutil/image.h``): a 32-byte header (magic
``0x96f3b83d``, load address, header size, protected TLV area size, image size, flags, version
``major.minor.revision+build``), padding up to ``hdr_size``, the image, then an optional
protected TLV area (info magic ``0x6908``) and the TLV area (info magic ``0x6907``). Each area
starts with a 4-byte info header (magic, total size including the info header); each TLV is a
16-bit type, a 16-bit length and the value. imgtool writes little-endian images by default
and big-endian ones on request; both are read.

The hash TLV (SHA-256/384/512) covers the header, the image and the protected TLV area: the
first ``hdr_size + img_size + protect_tlv_size`` bytes of the file, which is how both the
bootloader (``bootutil_img_hash``) and ``imgtool verify`` compute it. Signatures are listed,
not verified.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from unbrick.errors import ImageError
from unbrick.formats.base import Context, Counter, Findings, FormatSpec, Sniff, Source
from unbrick.formats.uimage import inner_format

IMAGE_MAGIC = 0x96F3B83D
HEADER_SIZE = 32
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_INFO_SIZE = 4

TLV_NAMES: dict[int, str] = {
    0x01: "KEYHASH",
    0x02: "PUBKEY",
    0x10: "SHA256",
    0x11: "SHA384",
    0x12: "SHA512",
    0x20: "RSA2048_PSS",
    0x21: "ECDSA224",
    0x22: "ECDSA_SIG",
    0x23: "RSA3072_PSS",
    0x24: "ED25519",
    0x25: "SIG_PURE",
    0x30: "ENC_RSA2048",
    0x31: "ENC_KW",
    0x32: "ENC_EC256",
    0x33: "ENC_X25519",
    0x34: "ENC_X25519_SHA512",
    0x40: "DEPENDENCY",
    0x50: "SEC_CNT",
    0x60: "BOOT_RECORD",
    0x70: "DECOMP_SIZE",
    0x71: "DECOMP_SHA",
    0x72: "DECOMP_SIGNATURE",
    0x73: "COMP_DEC_SIZE",
    0x74: "UUID_VID",
    0x75: "UUID_CID",
}
HASH_TLVS: dict[int, str] = {0x10: "sha256", 0x11: "sha384", 0x12: "sha512"}
SIGNATURE_TLVS = {0x20, 0x21, 0x22, 0x23, 0x24}
SEC_CNT = 0x50
SIG_PURE = 0x25

FLAGS: dict[int, str] = {
    0x001: "PIC",
    0x004: "ENCRYPTED_AES128",
    0x008: "ENCRYPTED_AES256",
    0x010: "NON_BOOTABLE",
    0x020: "RAM_LOAD",
    0x100: "ROM_FIXED",
    0x200: "COMPRESSED_LZMA1",
    0x400: "COMPRESSED_LZMA2",
    0x800: "COMPRESSED_ARM_THUMB",
}
_ENCRYPTED = 0x004 | 0x008

#: The last 16 bytes of a padded slot whose trailer is initialised (MCUboot's boot magic).
BOOT_MAGIC = bytes.fromhex("77c295f360d2ef7f3552500f2cb67980")
#: TLV values up to this size are shown in full (hashes, key hashes, counters).
_SHOWN = 64


@dataclass(frozen=True)
class Tlv:
    area: str
    kind: int
    length: int
    #: Offset of the value in the file.
    offset: int
    #: The value when at most 64 bytes long (hashes, key hashes, counters), else None.
    value: bytes | None

    @property
    def name(self) -> str:
        return TLV_NAMES.get(self.kind, "UNKNOWN")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "area": self.area,
            "type": self.kind,
            "type_name": self.name,
            "length": self.length,
            "offset": self.offset,
        }
        if self.value is not None:
            out["value"] = self.value.hex()
        return out


def _endian(head: bytes) -> str | None:
    if head[:4] == IMAGE_MAGIC.to_bytes(4, "little"):
        return "<"
    if head[:4] == IMAGE_MAGIC.to_bytes(4, "big"):
        return ">"
    return None


def sniff(sn: Sniff) -> bool:
    head = sn.head
    if len(head) < HEADER_SIZE:
        return False
    e = _endian(head)
    if e is None:
        return False
    hdr_size = struct.unpack_from(e + "H", head, 8)[0]
    return bool(hdr_size >= HEADER_SIZE)


def _read_area(
    src: Source,
    e: str,
    off: int,
    magic: int,
    area: str,
    counter: Counter,
) -> tuple[int, list[Tlv]] | None:
    """The TLVs of the area whose info header is at ``off``: (total size, entries), or None
    when its magic is not there."""
    info = src.read_upto(off, TLV_INFO_SIZE)
    if len(info) < TLV_INFO_SIZE:
        return None
    found, total = struct.unpack(e + "HH", info)
    if found != magic:
        return None
    if total < TLV_INFO_SIZE:
        raise ImageError(f"{area} TLV area at offset {off} has size {total}", offset=off)
    end = off + total
    if end > src.size:
        raise ImageError(
            f"{area} TLV area at offset {off} ({total} bytes) runs past the end of the file",
            offset=off,
        )
    entries: list[Tlv] = []
    pos = off + TLV_INFO_SIZE
    while pos < end:
        counter.tick()
        if pos + 4 > end:
            raise ImageError(f"{area} TLV header at offset {pos} crosses its area end", offset=pos)
        raw = src.read_at(pos, 4, "TLV header")
        kind, length = struct.unpack(e + "HH", raw)
        if e == ">" and raw[1] == 0 and raw[0] in TLV_NAMES:
            # imgtool writes the standard TLV types of big-endian images as a type byte and a
            # zero pad byte (the original ``uint8_t it_type, _pad`` layout), not as a 16-bit
            # big-endian number.
            kind = raw[0]
        if length > end - pos - 4:
            raise ImageError(
                f"{area} TLV 0x{kind:02x} at offset {pos} claims {length} bytes, past the "
                f"area end at {end}",
                offset=pos,
            )
        value = src.read_at(pos + 4, length, "TLV value") if length <= _SHOWN else None
        entries.append(Tlv(area, kind, length, pos + 4, value))
        pos += 4 + length
    return total, entries


def _digest(src: Source, ctx: Context, algo: str, length: int) -> bytes:
    h = hashlib.new(algo)
    for chunk in src.chunks(0, length):
        ctx.check_time()
        h.update(chunk)
    return h.digest()


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format="mcuboot")
    raw = src.read_at(0, HEADER_SIZE, "MCUboot header")
    e = _endian(raw)
    if e is None:
        raise ImageError("not an MCUboot image: magic missing at offset 0", offset=0)
    (_, load_addr, hdr_size, prot_size, img_size, flags, major, minor, revision, build, _) = (
        struct.unpack(e + "IIHHIIBBHII", raw)
    )
    if hdr_size < HEADER_SIZE:
        raise ImageError(f"MCUboot header size {hdr_size} is smaller than {HEADER_SIZE}")
    version = f"{major}.{minor}.{revision}+{build}"
    d = f.details
    d["endian"] = "little" if e == "<" else "big"
    d["header"] = {
        "load_addr": load_addr,
        "hdr_size": hdr_size,
        "protect_tlv_size": prot_size,
        "img_size": img_size,
        "flags": flags,
        "flag_names": [name for bit, name in FLAGS.items() if flags & bit],
        "version": version,
    }
    d["version"] = version
    d["hash_ok"] = False
    d["tlvs"] = []
    d["signature_types"] = []
    image_end = hdr_size + img_size
    if image_end > src.size:
        f.problem(
            f"image truncated: header says {hdr_size} + {img_size} bytes, file has {src.size}"
        )
        return f
    d["payload_format"] = inner_format(src, hdr_size, img_size)

    counter = Counter(ctx, "MCUboot TLVs")
    tlvs: list[Tlv] = []
    off = image_end
    if prot_size:
        prot = _read_area(src, e, off, TLV_PROT_INFO_MAGIC, "protected", counter)
        if prot is None:
            raise ImageError(
                f"header declares a {prot_size}-byte protected TLV area, but its magic 0x6908 "
                f"is not at offset {off}",
                offset=off,
            )
        total, entries = prot
        if total != prot_size:
            raise ImageError(
                f"protected TLV area at offset {off} is {total} bytes, header says {prot_size}",
                offset=off,
            )
        tlvs.extend(entries)
        off += total
    elif _read_area(src, e, off, TLV_PROT_INFO_MAGIC, "protected", counter) is not None:
        raise ImageError(
            f"protected TLV area at offset {off} but the header declares none", offset=off
        )
    main = _read_area(src, e, off, TLV_INFO_MAGIC, "unprotected", counter)
    if main is None:
        d["tlvs"] = [t.to_dict() for t in tlvs]
        f.problem(f"no TLV area (magic 0x6907) at offset {off}: the image is not signed/hashed")
        return f
    total, entries = main
    tlvs.extend(entries)
    tlv_end = off + total
    d["tlvs"] = [t.to_dict() for t in tlvs]
    d["tlv_end"] = tlv_end

    sec = [t for t in tlvs if t.kind == SEC_CNT]
    if sec:
        if sec[0].value is not None and len(sec[0].value) == 4:
            d["security_counter"] = int.from_bytes(sec[0].value, d["endian"])
        else:
            f.problem(f"security counter TLV is {sec[0].length} bytes, expected 4")
    d["signature_types"] = [t.name for t in tlvs if t.kind in SIGNATURE_TLVS]
    keyhash = [t for t in tlvs if t.kind == 0x01 and t.value is not None]
    if keyhash and keyhash[0].value is not None:
        d["key_hash"] = keyhash[0].value.hex()

    # The bootloader only trusts hash TLVs of the unprotected area.
    hashed = [t for t in entries if t.kind in HASH_TLVS]
    if flags & _ENCRYPTED:
        d["hash_ok"] = None
        f.warnings.append(
            "image is encrypted: its hash covers the plaintext and cannot be checked without "
            "the decryption key"
        )
    elif not hashed:
        if any(t.kind == SIG_PURE for t in entries):
            d["hash_ok"] = None
            f.warnings.append(
                "image uses a pure signature over its bytes and has no hash TLV; the signature "
                "is not verified here"
            )
        else:
            f.problem("no hash TLV (SHA256/SHA384/SHA512) in the TLV area")
    else:
        ok = True
        digests: dict[str, bytes] = {}
        for t in hashed:
            algo = HASH_TLVS[t.kind]
            expected = hashlib.new(algo).digest_size
            if t.length != expected or t.value is None:
                f.problem(f"{t.name} TLV is {t.length} bytes, expected {expected}")
                ok = False
                continue
            if algo not in digests:
                digests[algo] = _digest(src, ctx, algo, image_end + prot_size)
            digest = digests[algo]
            if digest != t.value:
                f.problem(
                    f"image hash mismatch ({t.name}): stored {t.value.hex()}, "
                    f"computed {digest.hex()}"
                )
                ok = False
        d["hash_ok"] = ok
        d["hash_algorithm"] = HASH_TLVS[hashed[0].kind]

    if tlv_end < src.size:
        d["trailing_size"] = src.size - tlv_end
        d["trailer_magic"] = src.read_upto(max(0, src.size - len(BOOT_MAGIC)), 16) == BOOT_MAGIC
    return f


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="mcuboot",
        sniff=sniff,
        inspect=inspect,
        priority=20,
        summary="MCUboot image (imgtool): header, image and TLVs with SHA-256/384/512 hash",
    ),
)
