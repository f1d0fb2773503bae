"""A flash chip backed by a file, with the semantics of real NOR and NAND parts.

NOR (and SPI NOR): erase works on whole erase blocks and sets them to 0xFF; programming can
only clear bits (``new = old & data``), so programming over data that was not erased corrupts it
silently, as on a real chip. NAND: programming is page-granular and each page may be programmed
once per erase; blocks listed as bad refuse erase and program with a DeviceError naming the
block.

The contents live in a file (created 0xFF-filled when absent), so a device keeps its flash
across restarts of the simulator. Every erase and program call is counted; a power cut can be
armed to strike the Nth operation, which is then applied only partly (the first half of its
bytes) before :class:`PowerLoss` is raised.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from unbrick.errors import DeviceError, SourceError

log = logging.getLogger(__name__)

FLASH_TYPES = ("nor", "spi-nor", "nand")
#: Largest read or program one call may ask for.
MAX_OP_BYTES = 4 * 1024 * 1024
#: Largest chip the model accepts (the file is mapped into memory).
MAX_FLASH_BYTES = 1024 * 1024 * 1024
HASH_ALGORITHMS = ("sha256", "sha512", "sha1", "md5")
_HASH_CHUNK = 1024 * 1024


class PowerLoss(DeviceError):
    """The device lost power during a flash operation (an armed power cut struck)."""

    default_hint = "the device powers back on by itself and runs its boot chain"


@dataclass(frozen=True)
class FlashGeometry:
    """Size and granularity of a chip. ``page_bytes`` is the NAND page (1 for NOR)."""

    type: str
    size_bytes: int
    erase_block_bytes: int
    page_bytes: int = 1
    #: NAND: indexes of the blocks that are bad (erase and program fail there).
    bad_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in FLASH_TYPES:
            raise DeviceError(f"unknown flash type {self.type!r}", hint=f"use {FLASH_TYPES}")
        if not 0 < self.erase_block_bytes <= self.size_bytes <= MAX_FLASH_BYTES:
            raise DeviceError(f"flash size {self.size_bytes} or erase block is out of range")
        if self.size_bytes % self.erase_block_bytes:
            raise DeviceError("flash size is not a multiple of the erase block")
        if self.page_bytes < 1 or self.erase_block_bytes % self.page_bytes:
            raise DeviceError("the erase block is not a multiple of the page size")
        if self.bad_blocks and self.type != "nand":
            raise DeviceError("only NAND flash has bad blocks")
        if any(not 0 <= b < self.blocks for b in self.bad_blocks):
            raise DeviceError("a bad block index is outside the chip")

    @property
    def blocks(self) -> int:
        return self.size_bytes // self.erase_block_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "size_bytes": self.size_bytes,
            "erase_block_bytes": self.erase_block_bytes,
            "page_bytes": self.page_bytes,
            "bad_blocks": list(self.bad_blocks),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlashGeometry:
        return cls(
            type=str(d["type"]),
            size_bytes=int(d["size_bytes"]),
            erase_block_bytes=int(d["erase_block_bytes"]),
            page_bytes=int(d.get("page_bytes", 1)),
            bad_blocks=tuple(int(b) for b in d.get("bad_blocks", ())),
        )


def skip_bad_spans(
    geometry: FlashGeometry, offset: int, length: int, limit: int | None = None
) -> tuple[list[tuple[int, int]], int]:
    """Where ``length`` bytes go when they are written (or read) from ``offset`` skipping bad
    blocks, as U-Boot's ``nand write``/``nand read`` do: the data continues in the next good
    block. Returns the physical ``(offset, length)`` spans and the bytes that did not fit
    before ``limit`` (the end of the partition, or of the chip)."""
    eb = geometry.erase_block_bytes
    end = geometry.size_bytes if limit is None else min(limit, geometry.size_bytes)
    bad = frozenset(geometry.bad_blocks)
    spans: list[tuple[int, int]] = []
    pos, left = offset, length
    while left > 0 and pos < end:
        block = pos // eb
        block_end = min((block + 1) * eb, end)
        if block in bad:
            pos = block_end
            continue
        n = min(left, block_end - pos)
        if spans and spans[-1][0] + spans[-1][1] == pos:
            spans[-1] = (spans[-1][0], spans[-1][1] + n)
        else:
            spans.append((pos, n))
        pos += n
        left -= n
    return spans, left


def pad_to_page(geometry: FlashGeometry, data: bytes) -> bytes:
    """``data`` padded with 0xFF to a whole NAND page (NOR data is returned as it is), as
    NAND drivers pad a partial last page."""
    if geometry.type != "nand":
        return data
    return data + b"\xff" * (-len(data) % geometry.page_bytes)


def _and_bytes(old: bytes, data: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(old, "big") & int.from_bytes(data, "big")).to_bytes(n, "big")


class Flash:
    """One chip, its contents in ``path``. Not thread-safe: the device serialises access."""

    def __init__(self, path: Path, geometry: FlashGeometry) -> None:
        self.path = path
        self.geometry = geometry
        #: Erase and program calls made so far (reads are not counted).
        self.ops = 0
        self._cut_in: int | None = None
        try:
            if not path.exists():
                self._create(path, geometry.size_bytes)
            size = path.stat().st_size
            if size != geometry.size_bytes:
                raise SourceError(
                    f"{path} holds {size} bytes, the chip has {geometry.size_bytes}",
                    hint="delete the file (or use --reset-factory) to start from a blank chip",
                )
            self._fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise SourceError(f"cannot open flash file {path}: {e.strerror}") from e
        try:
            self._mm = mmap.mmap(self._fd, geometry.size_bytes)
        except (OSError, ValueError) as e:
            os.close(self._fd)
            raise SourceError(f"cannot map flash file {path}: {e}") from e
        self._closed = False

    @staticmethod
    def _create(path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        block = b"\xff" * min(size, 1024 * 1024)
        with tmp.open("wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- fault injection -------------------------------------------------------------------

    def arm_power_cut(self, after_ops: int | None) -> None:
        """Make the ``after_ops``-th erase/program from now strike a power cut (None: disarm)."""
        if after_ops is not None and after_ops < 1:
            raise DeviceError(f"power cut after {after_ops} operations: must be 1 or more")
        self._cut_in = after_ops

    @property
    def power_cut_armed(self) -> bool:
        return self._cut_in is not None

    def _count(self) -> bool:
        """Count one operation; True when a power cut strikes it."""
        self.ops += 1
        if self._cut_in is None:
            return False
        self._cut_in -= 1
        if self._cut_in > 0:
            return False
        self._cut_in = None
        return True

    # -- checks ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("the flash is closed")

    def _check_range(self, what: str, offset: int, length: int) -> None:
        self._check_open()
        size = self.geometry.size_bytes
        if offset < 0 or length < 0 or offset + length > size:
            raise DeviceError(
                f"{what} of {length} bytes at 0x{offset:x} is outside the flash (0x{size:x} bytes)",
                hint="check the region offsets against the device's storage size",
            )

    def _check_bad(self, what: str, offset: int, length: int) -> None:
        if not self.geometry.bad_blocks or length == 0:
            return
        eb = self.geometry.erase_block_bytes
        first, last = offset // eb, (offset + length - 1) // eb
        for block in self.geometry.bad_blocks:
            if first <= block <= last:
                raise DeviceError(
                    f"{what} failed: NAND block {block} (offset 0x{block * eb:x}) is bad",
                    hint="skip bad blocks (the profile's storage must declare bad_blocks)",
                )

    # -- operations ------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range("read", offset, length)
        if length > MAX_OP_BYTES:
            raise DeviceError(f"read of {length} bytes exceeds the {MAX_OP_BYTES}-byte limit")
        return bytes(self._mm[offset : offset + length])

    def erase(self, offset: int, length: int) -> None:
        """Erase whole blocks: ``offset`` and ``length`` must be erase-block aligned."""
        self._check_range("erase", offset, length)
        eb = self.geometry.erase_block_bytes
        if offset % eb or length % eb:
            raise DeviceError(
                f"erase of {length} bytes at 0x{offset:x} is not aligned to the "
                f"{eb}-byte erase block",
                hint="erase whole erase blocks",
            )
        if length == 0:
            return
        self._check_bad("erase", offset, length)
        if self._count():
            half = length // 2
            self._mm[offset : offset + half] = b"\xff" * half
            log.info("power cut during erase at 0x%x (%d of %d bytes erased)", offset, half, length)
            raise PowerLoss(f"power lost while erasing 0x{offset:x}+0x{length:x}")
        self._mm[offset : offset + length] = b"\xff" * length

    def program(self, offset: int, data: bytes) -> None:
        """Program ``data`` at ``offset``: bits can only go from 1 to 0."""
        length = len(data)
        self._check_range("program", offset, length)
        if length > MAX_OP_BYTES:
            raise DeviceError(f"program of {length} bytes exceeds the {MAX_OP_BYTES}-byte limit")
        if length == 0:
            return
        if self.geometry.type == "nand":
            self._check_nand_pages(offset, data)
        self._check_bad("program", offset, length)
        cut = self._count()
        n = length // 2 if cut else length
        old = self._mm[offset : offset + n]
        self._mm[offset : offset + n] = _and_bytes(old, data[:n])
        if cut:
            log.info("power cut during program at 0x%x (%d of %d bytes)", offset, n, length)
            raise PowerLoss(f"power lost while programming 0x{offset:x}+0x{length:x}")

    def _check_nand_pages(self, offset: int, data: bytes) -> None:
        page = self.geometry.page_bytes
        if offset % page or len(data) % page:
            raise DeviceError(
                f"NAND program of {len(data)} bytes at 0x{offset:x} is not aligned to the "
                f"{page}-byte page",
                hint="program whole pages",
            )
        erased = b"\xff" * page
        for pos in range(0, len(data), page):
            current = self._mm[offset + pos : offset + pos + page]
            # A page programmed with exactly this data again is accepted as a no-op, so that
            # a retried transfer is harmless; any other second program is refused.
            if current not in (erased, data[pos : pos + page]):
                raise DeviceError(
                    f"NAND page at 0x{offset + pos:x} was already programmed since its last erase",
                    hint="erase the block before programming it again",
                )

    def read_skip_bad(self, offset: int, length: int, limit: int | None = None) -> bytes:
        """``length`` bytes from ``offset``, skipping bad blocks (as ``nand read`` does);
        what does not fit before ``limit`` reads as erased (0xFF)."""
        spans, missing = skip_bad_spans(self.geometry, offset, length, limit)
        parts = []
        for start, n in spans:
            for pos in range(start, start + n, MAX_OP_BYTES):
                parts.append(self.read(pos, min(MAX_OP_BYTES, start + n - pos)))
        return b"".join(parts) + b"\xff" * missing

    def hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        self._check_range("hash", offset, length)
        if algorithm not in HASH_ALGORITHMS:
            raise DeviceError(
                f"unsupported hash algorithm {algorithm!r}", hint=f"use one of {HASH_ALGORITHMS}"
            )
        h = hashlib.new(algorithm)
        for pos in range(offset, offset + length, _HASH_CHUNK):
            h.update(self._mm[pos : min(pos + _HASH_CHUNK, offset + length)])
        return h.hexdigest()

    # -- life cycle ------------------------------------------------------------------------

    def flush(self) -> None:
        if not self._closed:
            self._mm.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._mm.flush()
        finally:
            self._mm.close()
            os.close(self._fd)

    def __enter__(self) -> Flash:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
