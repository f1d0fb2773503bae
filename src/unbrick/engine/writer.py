"""Write an image to a device range and verify it, range by range.

Erase-block aligned: each step erases one group of erase blocks and programs it, then records a
checkpoint, so that an interrupted write resumes at the first unfinished group. Verification
uses the device's own hash when it has one, else reads back; a bad range is rewritten once and
then reported by its addresses.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

from unbrick.engine.events import Progress
from unbrick.errors import JobError, UsageError, VerifyError
from unbrick.transports.base import (
    Capability,
    Device,
    DeviceHash,
    FlashErase,
    FlashRead,
    FlashWrite,
    PartitionRead,
)

log = logging.getLogger(__name__)

#: Size of one verification range (a failure names a range of at most this size).
VERIFY_RANGE = 256 * 1024
#: Bytes read back from a partition per request (whole verification ranges).
PARTITION_READ_BYTES = 4 * VERIFY_RANGE


@dataclass(frozen=True)
class Target:
    """Where the image goes: ``size`` bytes at ``offset`` (inside a region of ``limit`` bytes)."""

    region: str
    offset: int
    size: int
    erase_block: int

    @property
    def erase_end(self) -> int:
        """End of the erased span: the image end rounded up to an erase block."""
        eb = self.erase_block
        return self.offset + -(-self.size // eb) * eb


class ImageData:
    """Positional reads of the (raw) image being written."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        data = self._f.read(length)
        if len(data) != length:
            raise UsageError(f"the image file changed while it was being written (offset {offset})")
        return data


def _group_size(device: Device, erase_block: int) -> int:
    transfer = cast(FlashWrite, device).max_transfer
    return max(erase_block, (transfer // erase_block) * erase_block)


def write_range(
    device: Device,
    target: Target,
    image: ImageData,
    *,
    start_at: int = 0,
    progress: Progress | None = None,
    checkpoint: Callable[[int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Erase and program ``target`` from ``image``, starting at relative offset ``start_at``."""
    if target.offset % target.erase_block or start_at % target.erase_block:
        raise UsageError(
            f"offset 0x{target.offset + start_at:x} is not aligned to the "
            f"{target.erase_block}-byte erase block"
        )
    eraser = cast(FlashErase, device)
    writer = cast(FlashWrite, device)
    group = _group_size(device, target.erase_block)
    transfer = writer.max_transfer
    if progress is not None:
        progress.set(start_at)
    pos = start_at
    while pos < target.size:
        if cancelled is not None and cancelled():
            raise JobError(f"cancelled at offset 0x{target.offset + pos:x}; resume to continue")
        n = min(group, target.size - pos)
        erase_len = -(-n // target.erase_block) * target.erase_block
        eraser.erase(target.offset + pos, erase_len)
        done = 0
        while done < n:
            k = min(transfer, n - done)
            writer.program(target.offset + pos + done, image.read(pos + done, k))
            done += k
            if progress is not None:
                progress.advance(k)
        pos += n
        if checkpoint is not None:
            checkpoint(pos)


def _ranges(size: int) -> list[tuple[int, int]]:
    return [(o, min(VERIFY_RANGE, size - o)) for o in range(0, size, VERIFY_RANGE)]


def range_digest(device: Device, offset: int, length: int) -> str:
    """SHA-256 of a device range: computed by the device when it can, else read back."""
    if Capability.DEVICE_HASH in device.capabilities:
        return cast(DeviceHash, device).device_hash(offset, length, "sha256")
    reader = cast(FlashRead, device)
    h = hashlib.sha256()
    pos = 0
    while pos < length:
        k = min(reader.max_transfer, length - pos)
        h.update(reader.read(offset + pos, k))
        pos += k
    return h.hexdigest()


def bad_ranges(
    device: Device,
    target: Target,
    image: ImageData,
    *,
    progress: Progress | None = None,
    only: list[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Relative ``(offset, length)`` ranges whose device content differs from the image."""
    bad = []
    for off, length in only if only is not None else _ranges(target.size):
        expected = hashlib.sha256(image.read(off, length)).hexdigest()
        got = range_digest(device, target.offset + off, length)
        if got != expected:
            bad.append((off, length))
        if progress is not None:
            progress.advance(length)
    return bad


def verify_range(
    device: Device,
    target: Target,
    image: ImageData,
    *,
    progress: Progress | None = None,
    rewrite: bool = True,
) -> str:
    """Verify the write; rewrite each bad range once; VerifyError naming what stays bad.

    Returns the method used ("device-hash" or "read-back").
    """
    method = "device-hash" if Capability.DEVICE_HASH in device.capabilities else "read-back"
    bad = bad_ranges(device, target, image, progress=progress)
    if bad and rewrite:
        log.warning("verify: %d bad range(s) in %s; rewriting them once", len(bad), target.region)
        for off, length in bad:
            start = (off // target.erase_block) * target.erase_block
            end = min(target.size, off + length)
            sub = Target(target.region, target.offset + start, end - start, target.erase_block)
            write_range(device, sub, _Shifted(image, start))
        bad = bad_ranges(device, target, image, only=bad)
    if bad:
        names = ", ".join(
            f"0x{target.offset + o:x}-0x{target.offset + o + n - 1:x}" for o, n in bad
        )
        raise VerifyError(
            f"{target.region}: {len(bad)} range(s) did not verify by {method} after a rewrite: "
            f"{names}",
            ranges=[(target.offset + o, n) for o, n in bad],
        )
    return method


def partition_bad_ranges(
    device: PartitionRead,
    partition: str,
    image: ImageData,
    *,
    progress: Progress | None = None,
) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges, relative to the start of ``partition``, whose content read
    back from the device differs from the first ``image.size`` bytes of the image."""
    bad = []
    pos = 0
    while pos < image.size:
        n = min(PARTITION_READ_BYTES, image.size - pos)
        got = device.read_partition(partition, pos, n)
        want = image.read(pos, n)
        for off in range(0, n, VERIFY_RANGE):
            k = min(VERIFY_RANGE, n - off)
            if got[off : off + k] != want[off : off + k]:
                bad.append((pos + off, k))
        if progress is not None:
            progress.advance(n)
        pos += n
    return bad


def partition_digest(device: PartitionRead, partition: str, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of ``partition``, read back from the device."""
    h = hashlib.sha256()
    for pos in range(0, size, PARTITION_READ_BYTES):
        h.update(device.read_partition(partition, pos, min(PARTITION_READ_BYTES, size - pos)))
    return h.hexdigest()


class _Shifted(ImageData):
    """The image seen from a relative offset (to rewrite a sub-range)."""

    def __init__(self, base: ImageData, shift: int) -> None:
        self._base = base
        self._shift = shift
        self.size = base.size - shift

    def read(self, offset: int, length: int) -> bytes:
        return self._base.read(offset + self._shift, length)
