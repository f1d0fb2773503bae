"""U-Boot Flattened Image Tree (FIT, ``.itb``): a device tree describing images and configs.

A FIT is an FDT (see :mod:`unbrick.formats.fdt`) with an ``/images`` node (one child per image:
``type``, ``arch``, ``os``, ``compression``, ``load``, ``entry``, the data, ``hash-*`` and
``signature-*`` subnodes) and a ``/configurations`` node (a ``default`` and one child per
configuration naming its ``kernel``, ``fdt``, ``ramdisk``, ``loadables``... images). Image data is
either embedded as the ``data`` property or stored after the tree (``mkimage -E``): at
``data-offset`` bytes past the end of the tree rounded up to 4 bytes, or at the absolute file
offset ``data-position`` (``mkimage -p``), ``data-size`` bytes long.

Every hash node is checked by streaming its image's data. Signature nodes are listed, not
verified: checking them needs the public key that the board's U-Boot holds.
"""

from __future__ import annotations

import binascii
import hashlib
import zlib
from typing import Protocol

from unbrick.errors import ImageError, LimitError
from unbrick.formats import fdt
from unbrick.formats.base import Context, Findings, FormatSpec, Sniff, Source
from unbrick.formats.uimage import inner_format

_FDT_MAGIC = fdt.FDT_MAGIC.to_bytes(4, "big")
#: Configuration properties that name images (U-Boot ``FIT_*_PROP``).
CONFIG_REFS = (
    "kernel",
    "fdt",
    "ramdisk",
    "loadables",
    "firmware",
    "setup",
    "fpga",
    "standalone",
    "script",
)
_HASHLIB_ALGOS = ("md5", "sha1", "sha256", "sha384", "sha512")
_TEXT_LIMIT = 64 * 1024


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self.crc = 0

    def update(self, data: bytes, /) -> None:
        self.crc = zlib.crc32(data, self.crc)

    def digest(self) -> bytes:
        return self.crc.to_bytes(4, "big")


class _Crc16Ccitt:
    """CRC-16/CCITT with initial value 0 (U-Boot's ``crc16-ccitt``), stored big-endian."""

    def __init__(self) -> None:
        self.crc = 0

    def update(self, data: bytes, /) -> None:
        self.crc = binascii.crc_hqx(data, self.crc)

    def digest(self) -> bytes:
        return self.crc.to_bytes(2, "big")


class _Budget:
    """Bytes that hash checks may read. Images of a real FIT do not overlap, so all of them
    together read the file at most once; hostile image nodes that all point at the same large
    range would otherwise make the check take hours."""

    def __init__(self, file_size: int) -> None:
        self.left = 2 * file_size + (1 << 20)

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise LimitError(
                "FIT image data ranges overlap: hashing would read the file many times"
            )


def _hasher(algo: str) -> _Hasher | None:
    if algo == "crc32":
        return _Crc32()
    if algo == "crc16-ccitt":
        return _Crc16Ccitt()
    if algo in _HASHLIB_ALGOS:
        return hashlib.new(algo)
    return None


def sniff(sn: Sniff) -> bool:
    return sn.head[:4] == _FDT_MAGIC and fdt.head_has_top_level_node(sn.head, "images")


def _int_prop(tree: fdt.Fdt, node: fdt.FdtNode, name: str, f: Findings) -> int | None:
    try:
        return tree.get_int(node, name)
    except ImageError as e:
        f.problem(e.message)
        return None


def _text(tree: fdt.Fdt, node: fdt.FdtNode, name: str) -> str | None:
    prop = node.prop(name)
    if prop is None:
        return None
    return tree.value(prop, _TEXT_LIMIT).split(b"\0", 1)[0].decode("utf-8", "replace")


def _signature(tree: fdt.Fdt, node: fdt.FdtNode) -> dict[str, object]:
    return {
        "where": node.path,
        "algo": _text(tree, node, "algo"),
        "key_name_hint": _text(tree, node, "key-name-hint"),
        "padding": _text(tree, node, "padding"),
        "sign_images": tree.get_strings(node, "sign-images"),
        "signer_name": _text(tree, node, "signer-name"),
        "signed": node.prop("value") is not None,
    }


def _data_range(
    tree: fdt.Fdt, node: fdt.FdtNode, f: Findings
) -> tuple[str, int | None, int | None]:
    """(location kind, absolute offset, size) of an image's data."""
    name = node.name
    prop = node.prop("data")
    if prop is not None:
        return "embedded", prop.offset, prop.size
    size = _int_prop(tree, node, "data-size", f)
    base: int | None = None
    kind = "missing"
    rel = _int_prop(tree, node, "data-offset", f)
    if rel is not None:
        kind = "data-offset"
        base = ((tree.header.totalsize + 3) & ~3) + rel
    else:
        pos = _int_prop(tree, node, "data-position", f)
        if pos is not None:
            kind, base = "data-position", pos
    if kind == "missing":
        f.problem(f"image '{name}' has no data (no data, data-offset or data-position)")
    elif size is None:
        f.problem(f"image '{name}' has external data but no data-size")
    return kind, base, size


def _check_hashes(
    tree: fdt.Fdt,
    ctx: Context,
    image: fdt.FdtNode,
    data: tuple[int, int] | None,
    f: Findings,
    budget: _Budget,
) -> list[dict[str, object]]:
    """Verify every hash node of ``image`` in one pass over its data."""
    results: list[dict[str, object]] = []
    pending: list[tuple[dict[str, object], _Hasher, bytes]] = []
    for node in image.children:
        if not node.name.startswith("hash"):
            continue
        algo = _text(tree, node, "algo")
        value = tree.get_bytes(node, "value", 1024)
        entry: dict[str, object] = {
            "name": node.name,
            "algo": algo,
            "value": value.hex() if value is not None else None,
            "ok": None,
        }
        results.append(entry)
        hasher = _hasher(algo or "")
        if hasher is None:
            f.warnings.append(
                f"image '{image.name}' {node.name}: hash algorithm {algo!r} is not supported, "
                "not checked"
            )
        elif value is None:
            entry["ok"] = False
            f.problem(f"image '{image.name}' {node.name} has no value (the FIT is unfinished)")
        elif data is None:
            entry["ok"] = False
        else:
            pending.append((entry, hasher, value))
    if pending and data is not None:
        offset, size = data
        budget.spend(size)
        for chunk in tree.src.chunks(offset, size):
            ctx.check_time()
            for _, hasher, _ in pending:
                hasher.update(chunk)
        for entry, hasher, value in pending:
            digest = hasher.digest()
            entry["ok"] = digest == value
            if digest != value:
                f.problem(
                    f"image '{image.name}' {entry['name']} ({entry['algo']}) mismatch: stored "
                    f"{value.hex()}, computed {digest.hex()}"
                )
    return results


def _image(
    tree: fdt.Fdt, ctx: Context, node: fdt.FdtNode, f: Findings, budget: _Budget
) -> tuple[dict[str, object], list[dict[str, object]]]:
    kind, offset, size = _data_range(tree, node, f)
    data: tuple[int, int] | None = None
    if offset is not None and size is not None:
        if offset + size > tree.src.size:
            f.problem(
                f"image '{node.name}' data at {offset}..{offset + size} is beyond the end of "
                f"the file ({tree.src.size} bytes)"
            )
        else:
            data = (offset, size)
    out: dict[str, object] = {
        "name": node.name,
        "description": _text(tree, node, "description"),
        "type": _text(tree, node, "type"),
        "arch": _text(tree, node, "arch"),
        "os": _text(tree, node, "os"),
        "compression": _text(tree, node, "compression"),
        "load": _int_prop(tree, node, "load", f),
        "entry": _int_prop(tree, node, "entry", f),
        "data_location": kind,
        "data_offset": offset,
        "data_size": size,
        "format": inner_format(tree.src, *data) if data is not None else None,
    }
    out["hashes"] = _check_hashes(tree, ctx, node, data, f, budget)
    cipher = [c for c in node.children if c.name.startswith("cipher")]
    if cipher:
        out["cipher"] = _text(tree, cipher[0], "algo")
        f.warnings.append(f"image '{node.name}' is encrypted; its hashes cover the ciphertext")
    sigs = [_signature(tree, c) for c in node.children if c.name.startswith("signature")]
    out["signatures"] = sigs
    if not out["hashes"] and not sigs:
        f.warnings.append(f"image '{node.name}' has no hash node: its data cannot be checked")
    return out, sigs


def _configurations(
    tree: fdt.Fdt, images: set[str], f: Findings
) -> tuple[dict[str, object], list[dict[str, object]]]:
    node = tree.node("/configurations")
    if node is None:
        f.warnings.append("FIT has no /configurations node")
        return {"default": None, "configs": []}, []
    default = _text(tree, node, "default")
    configs: list[dict[str, object]] = []
    all_sigs: list[dict[str, object]] = []
    for conf in node.children:
        refs: dict[str, list[str]] = {}
        for key in CONFIG_REFS:
            names = tree.get_strings(conf, key)
            if names is None:
                continue
            refs[key] = names
            for ref in names:
                if ref not in images:
                    f.problem(f"configuration '{conf.name}' {key} refers to missing image '{ref}'")
        sigs = [_signature(tree, c) for c in conf.children if c.name.startswith("signature")]
        all_sigs.extend(sigs)
        configs.append(
            {
                "name": conf.name,
                "description": _text(tree, conf, "description"),
                "compatible": tree.get_strings(conf, "compatible"),
                "refs": refs,
                "signatures": sigs,
            }
        )
    if default is not None and node.child(default) is None:
        f.problem(f"default configuration '{default}' does not exist")
    return {"default": default, "configs": configs}, all_sigs


def inspect(src: Source, ctx: Context) -> Findings:
    f = Findings(format="fit")
    tree = fdt.parse(src, ctx)
    images_node = tree.node("/images")
    if images_node is None:
        raise ImageError("device tree has no /images node: not a FIT image")
    d = f.details
    d["fdt_size"] = tree.header.totalsize
    d["description"] = _text(tree, tree.root, "description")
    d["timestamp"] = _int_prop(tree, tree.root, "timestamp", f)
    images: list[dict[str, object]] = []
    signatures: list[dict[str, object]] = []
    budget = _Budget(src.size)
    for node in images_node.children:
        ctx.check_time()
        image, sigs = _image(tree, ctx, node, f, budget)
        images.append(image)
        signatures.extend(sigs)
    d["images"] = images
    if not images:
        f.problem("FIT /images node is empty")
    names = {node.name for node in images_node.children}
    d["configurations"], conf_sigs = _configurations(tree, names, f)
    signatures.extend(conf_sigs)

    checks = [h["ok"] for image in images for h in _hashes(image)]
    if not checks:
        d["hashes_ok"] = None
        f.warnings.append("FIT has no hash nodes: image data integrity cannot be checked")
    else:
        d["hashes_ok"] = all(ok is True for ok in checks)
    d["signatures"] = signatures
    d["signature_verified"] = False
    if signatures:
        f.warnings.append(
            f"{len(signatures)} signature node(s) present; signatures are not verified here "
            "(that needs the public key U-Boot holds)"
        )
    end = tree.header.totalsize
    external = False
    for image in images:
        offset, size = image["data_offset"], image["data_size"]
        if image["data_location"] != "embedded" and isinstance(offset, int):
            external = True
            end = max(end, offset + (size if isinstance(size, int) else 0))
    d["external_data"] = external
    if src.size > (end + 3) & ~3:  # mkimage pads the last external image to 4 bytes
        f.warnings.append(f"{src.size - end} bytes follow the FIT and its data")
    return f


def _hashes(image: dict[str, object]) -> list[dict[str, object]]:
    hashes = image.get("hashes")
    return hashes if isinstance(hashes, list) else []


SPECS: tuple[FormatSpec, ...] = (
    FormatSpec(
        name="fit",
        sniff=sniff,
        inspect=inspect,
        priority=20,
        summary="U-Boot FIT image (.itb): device tree of images with crc32/sha hashes",
    ),
)
