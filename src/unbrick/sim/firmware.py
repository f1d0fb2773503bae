"""Images of the simulated devices, in real formats, and the bootloader's check of them.

A firmware image is a U-Boot legacy uImage (type kernel, arch arm, os linux, no compression)
whose payload starts with an info block::

    b"UBFWINFO" | u32 big-endian length | JSON {"model", "version", "security_version",
                                               "hw_revisions", "regions"[, "panic"]}

followed by filler bytes (pseudo-random, derived from model and version, so that two versions
differ everywhere). A bootloader image is the sim's own small layout::

    b"SIMBOOT1" | version (32 bytes, NUL-padded) | u32 body length | u32 crc32 | body

with the CRC taken over the version field, the length field and the body. The calibration
region holds ``b"SIMCAL01" | u32 length | JSON | u32 crc32`` (serial, MAC address...).

Everything here is pure: bytes in, bytes or decisions out.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from unbrick.errors import UsageError
from unbrick.formats.uimage import ARCHES, HEADER_SIZE, IH_MAGIC, OSES, TYPES, header_crc

INFO_MAGIC = b"UBFWINFO"
BOOT_MAGIC = b"SIMBOOT1"
CAL_MAGIC = b"SIMCAL01"
MANIFEST_FORMAT = "unbrick-manifest-1"

#: Ids of U-Boot's image.h used by the sim's firmware.
IH_OS_LINUX = 5
IH_ARCH_ARM = 2
IH_TYPE_KERNEL = 2
IH_COMP_NONE = 0
LOAD_ADDRESS = 0x80008000
#: Where the bootloader copies the image before checking it (shown in the boot log).
RAM_ADDRESS = 0x82000000
#: Creation time written into the headers (fixed, so that builds are reproducible).
BUILD_TIME = 1_700_000_000

DEFAULT_FIRMWARE_BYTES = 1024 * 1024
DEFAULT_BOOTLOADER_BYTES = 128 * 1024
MAX_INFO_BYTES = 64 * 1024
_UIMAGE = struct.Struct(">7I4B32s")
_BOOT_HEADER = struct.Struct(">8s32sII")
_VERSION_FIELD = 32


@dataclass(frozen=True)
class FirmwareInfo:
    """The info block at the start of a sim firmware payload."""

    model: str
    version: str
    security_version: int = 0
    hw_revisions: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    #: The firmware panics right after it starts (a boot-loop image).
    panic: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "security_version": self.security_version,
            "hw_revisions": list(self.hw_revisions),
            "regions": list(self.regions),
        }
        if self.panic:
            d["panic"] = True
        return d


def _filler(seed: str, n: int) -> bytes:
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    return rng.randbytes(n)


def build_uimage(
    payload: bytes,
    *,
    name: str,
    os_id: int = IH_OS_LINUX,
    arch: int = IH_ARCH_ARM,
    image_type: int = IH_TYPE_KERNEL,
    compression: int = IH_COMP_NONE,
    load_address: int = LOAD_ADDRESS,
    entry_point: int = LOAD_ADDRESS,
) -> bytes:
    """A U-Boot legacy image around ``payload``, laid out as U-Boot's image.h."""
    raw_name = name.encode()[:31]
    header = _UIMAGE.pack(
        IH_MAGIC,
        0,
        BUILD_TIME,
        len(payload),
        load_address,
        entry_point,
        zlib.crc32(payload),
        os_id,
        arch,
        image_type,
        compression,
        raw_name,
    )
    header = header[:4] + struct.pack(">I", header_crc(header)) + header[8:]
    return header + payload


def build_firmware(
    model: str,
    version: str,
    *,
    security_version: int = 0,
    hw_revisions: tuple[str, ...] = (),
    regions: tuple[str, ...] = (),
    size_bytes: int = DEFAULT_FIRMWARE_BYTES,
    panic: bool = False,
) -> bytes:
    """A firmware image of exactly ``size_bytes`` bytes (header, info block and filler).

    ``panic=True`` builds an image that boots and then panics (a boot loop).
    """
    info = FirmwareInfo(
        model=model,
        version=version,
        security_version=security_version,
        hw_revisions=tuple(hw_revisions),
        regions=tuple(regions),
        panic=panic,
    )
    blob = json.dumps(info.to_dict(), sort_keys=True).encode()
    head = INFO_MAGIC + struct.pack(">I", len(blob)) + blob
    need = HEADER_SIZE + len(head)
    if size_bytes < need:
        raise UsageError(f"a firmware image of {model} {version} needs at least {need} bytes")
    payload = head + _filler(f"{model}/{version}/{security_version}", size_bytes - need)
    return build_uimage(payload, name=f"{model} {version}")


def read_firmware_info(data: bytes) -> FirmwareInfo | None:
    """The info block of a sim firmware image (or of a region holding one); None if absent.

    Only the structure is read; the CRCs are the bootloader's business (:func:`check_boot`).
    """
    if len(data) < HEADER_SIZE + len(INFO_MAGIC) + 4:
        return None
    if int.from_bytes(data[:4], "big") != IH_MAGIC:
        return None
    start = HEADER_SIZE
    if data[start : start + len(INFO_MAGIC)] != INFO_MAGIC:
        return None
    start += len(INFO_MAGIC)
    (length,) = struct.unpack_from(">I", data, start)
    start += 4
    if length > MAX_INFO_BYTES or start + length > len(data):
        return None
    try:
        obj = json.loads(data[start : start + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return _info_from_obj(obj)


def _info_from_obj(obj: object) -> FirmwareInfo | None:
    if not isinstance(obj, dict):
        return None
    model, version = obj.get("model"), obj.get("version")
    sv = obj.get("security_version", 0)
    hw, regions = obj.get("hw_revisions", []), obj.get("regions", [])
    panic = obj.get("panic", False)
    if not (isinstance(model, str) and isinstance(version, str)):
        return None
    if not isinstance(sv, int) or isinstance(sv, bool) or sv < 0:
        return None
    if not (isinstance(hw, list) and all(isinstance(x, str) for x in hw)):
        return None
    if not (isinstance(regions, list) and all(isinstance(x, str) for x in regions)):
        return None
    if not isinstance(panic, bool):
        return None
    return FirmwareInfo(model, version, sv, tuple(hw), tuple(regions), panic)


# -- bootloader ---------------------------------------------------------------------------


def build_bootloader(version: str, *, size_bytes: int = DEFAULT_BOOTLOADER_BYTES) -> bytes:
    """A bootloader image of exactly ``size_bytes`` bytes."""
    raw = version.encode()
    if not raw or len(raw) >= _VERSION_FIELD:
        raise UsageError(f"bootloader version {version!r} must be 1 to 31 bytes")
    body_len = size_bytes - _BOOT_HEADER.size
    if body_len < 0:
        raise UsageError(f"a bootloader image needs at least {_BOOT_HEADER.size} bytes")
    body = _filler(f"boot/{version}", body_len)
    vfield = raw.ljust(_VERSION_FIELD, b"\0")
    crc = zlib.crc32(vfield + struct.pack(">I", body_len) + body)
    return _BOOT_HEADER.pack(BOOT_MAGIC, vfield, body_len, crc) + body


def check_bootloader(data: bytes) -> tuple[str | None, str]:
    """(version, "") for a good bootloader image at the start of ``data``; (None, reason)."""
    if len(data) < _BOOT_HEADER.size:
        return None, "region too small"
    magic, vfield, body_len, crc = _BOOT_HEADER.unpack_from(data)
    if magic != BOOT_MAGIC:
        return None, "bad magic"
    if _BOOT_HEADER.size + body_len > len(data):
        return None, "image longer than its region"
    body = data[_BOOT_HEADER.size : _BOOT_HEADER.size + body_len]
    if zlib.crc32(vfield + struct.pack(">I", body_len) + body) != crc:
        return None, "bad CRC"
    try:
        version = vfield.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return None, "bad version field"
    return version, ""


# -- calibration --------------------------------------------------------------------------


def build_calibration(fields: dict[str, str]) -> bytes:
    """The calibration block: per-device facts (serial, MAC address...)."""
    blob = json.dumps(fields, sort_keys=True).encode()
    body = CAL_MAGIC + struct.pack(">I", len(blob)) + blob
    return body + struct.pack(">I", zlib.crc32(body))


def read_calibration(data: bytes) -> dict[str, str] | None:
    if len(data) < len(CAL_MAGIC) + 8 or not data.startswith(CAL_MAGIC):
        return None
    (length,) = struct.unpack_from(">I", data, len(CAL_MAGIC))
    end = len(CAL_MAGIC) + 4 + length
    if length > MAX_INFO_BYTES or end + 4 > len(data):
        return None
    (crc,) = struct.unpack_from(">I", data, end)
    if zlib.crc32(data[:end]) != crc:
        return None
    try:
        obj = json.loads(data[len(CAL_MAGIC) + 4 : end].decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    return {str(k): str(v) for k, v in obj.items()}


# -- manifest -----------------------------------------------------------------------------


def _toml_str(s: str) -> str:
    # A JSON string is a valid TOML basic string for everything json.dumps emits.
    return json.dumps(s, ensure_ascii=True)


def build_manifest_toml(
    *,
    model: str,
    version: str,
    security_version: int,
    target: str,
    sha256: str,
    hw_revisions: tuple[str, ...] = (),
    regions: tuple[str, ...] = (),
    min_bootloader: str | None = None,
) -> str:
    """The TOML text of a firmware manifest sidecar (format ``unbrick-manifest-1``)."""
    lines = [
        f"format = {_toml_str(MANIFEST_FORMAT)}",
        f"model = {_toml_str(model)}",
        f"version = {_toml_str(version)}",
        f"security_version = {int(security_version)}",
        f"hw_revisions = [{', '.join(_toml_str(h) for h in hw_revisions)}]",
        f"regions = [{', '.join(_toml_str(r) for r in regions)}]",
    ]
    if min_bootloader is not None:
        lines.append(f"min_bootloader = {_toml_str(min_bootloader)}")
    lines += [f"target = {_toml_str(target)}", f"sha256 = {_toml_str(sha256.lower())}"]
    return "\n".join(lines) + "\n"


def manifest_for_image(image: bytes, *, target: str, min_bootloader: str | None = None) -> str:
    """The manifest of a sim firmware image, from its info block and its SHA-256."""
    info = read_firmware_info(image)
    if info is None:
        raise UsageError("the image has no sim firmware info block")
    return build_manifest_toml(
        model=info.model,
        version=info.version,
        security_version=info.security_version,
        hw_revisions=info.hw_revisions,
        regions=info.regions,
        min_bootloader=min_bootloader,
        target=target,
        sha256=hashlib.sha256(image).hexdigest(),
    )


# -- the bootloader's check of a firmware image --------------------------------------------


@dataclass(frozen=True)
class BootImage:
    """What the bootloader made of the image in one region.

    ``outcome``: "boot" (starts and runs), "panic" (starts, then the kernel panics) or "bad"
    (refused; ``lines`` hold U-Boot's messages).
    """

    outcome: str
    lines: tuple[str, ...]
    info: FirmwareInfo | None = None
    name: str = ""


def _looks_like_uimage_but_magic(header: bytes) -> bool:
    fixed = IH_MAGIC.to_bytes(4, "big") + header[4:]
    return header_crc(fixed) == int.from_bytes(header[4:8], "big")


def _size_text(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB".replace(".0 MiB", " MiB")
    if n >= 1024:
        return f"{n / 1024:.1f} KiB".replace(".0 KiB", " KiB")
    return f"{n} Bytes"


def check_boot(
    region: bytes,
    *,
    min_security_version: int,
    model: str,
    hw_revision: str,
) -> BootImage:
    """Check the image at the start of ``region`` the way ``bootm`` does, then "run" it."""
    lines: list[str] = []
    fail = "ERROR: can't get kernel image!"
    header = region[:HEADER_SIZE]
    if len(header) < HEADER_SIZE:
        return BootImage("bad", ("Wrong Image Format for bootm command", fail))
    (magic, hcrc, _ts, size, load, entry, dcrc, os_id, arch, typ, comp, raw_name) = _UIMAGE.unpack(
        header
    )
    if magic != IH_MAGIC:
        if _looks_like_uimage_but_magic(header):
            lines += [
                f"## Booting kernel from Legacy Image at {RAM_ADDRESS:08x} ...",
                "Bad Magic Number",
                fail,
            ]
        else:
            lines += ["Wrong Image Format for bootm command", fail]
        return BootImage("bad", tuple(lines))
    lines.append(f"## Booting kernel from Legacy Image at {RAM_ADDRESS:08x} ...")
    if header_crc(header) != hcrc:
        return BootImage("bad", (*lines, "Bad Header Checksum", fail))
    name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
    kind = TYPES.get(typ, "unknown")
    lines += [
        f"   Image Name:   {name}",
        f"   Image Type:   {ARCHES.get(arch, 'unknown').upper()} "
        f"{OSES.get(os_id, 'unknown').capitalize()} {kind.capitalize()} Image "
        f"({'uncompressed' if comp == IH_COMP_NONE else 'compressed'})",
        f"   Data Size:    {size} Bytes = {_size_text(size)}",
        f"   Load Address: {load:08x}",
        f"   Entry Point:  {entry:08x}",
    ]
    data = region[HEADER_SIZE : HEADER_SIZE + size]
    if len(data) < size or zlib.crc32(data) != dcrc:
        return BootImage("bad", (*lines, "   Verifying Checksum ... Bad Data CRC", fail), name=name)
    lines.append("   Verifying Checksum ... OK")
    if arch != IH_ARCH_ARM:
        return BootImage("bad", (*lines, f"Unsupported Architecture 0x{arch:x}", fail), name=name)
    if typ != IH_TYPE_KERNEL:
        return BootImage("bad", (*lines, "Wrong Image Type for bootm command", fail), name=name)
    if os_id != IH_OS_LINUX:
        msg = f"ERROR: booting os '{OSES.get(os_id, 'unknown')}' ({os_id}) is not supported"
        return BootImage("bad", (*lines, msg), name=name)
    if comp != IH_COMP_NONE:
        return BootImage("bad", (*lines, "Unimplemented compression type " + str(comp)), name=name)
    info = read_firmware_info(region[: HEADER_SIZE + size])
    sv = info.security_version if info else 0
    if sv < min_security_version:
        msg = (
            f"ERROR: anti-rollback: image security version {sv} is below the device's "
            f"minimum {min_security_version}"
        )
        return BootImage("bad", (*lines, msg, fail), info=info, name=name)
    lines += ["   Loading Kernel Image", "", "Starting kernel ...", ""]
    if info is None:
        lines.append("Kernel panic - not syncing: No working init found.")
        return BootImage("panic", tuple(lines), name=name)
    if info.panic:
        lines.append("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        return BootImage("panic", tuple(lines), info=info, name=name)
    if info.model != model or (info.hw_revisions and hw_revision not in info.hw_revisions):
        lines.append(f"{info.model} firmware {info.version}: unsupported board {model}")
        lines.append("Kernel panic - not syncing: No working init found.")
        return BootImage("panic", tuple(lines), info=info, name=name)
    lines += [f"{model} firmware {info.version} booted", "", "login: "]
    return BootImage("boot", tuple(lines), info=info, name=name)
