"""The ``block://`` driver: a disk, partition, loop device or image file as an unbrick device.

:func:`open_block` checks the target (:func:`~unbrick.transports.block.target.open_target`:
not mounted, not the system disk, removable unless forced) and holds it open with ``O_EXCL``
until :meth:`BlockDriver.close`. The driver offers the engine's capability Protocols:

- Identify: vendor, model and serial from sysfs, size, bus and removability;
- FlashRead / DeviceHash: direct (``O_DIRECT``) reads, so that what is read or hashed is what
  the device holds, not the page cache;
- FlashErase: block storage needs no erase before writing; ``erase`` only checks the range;
- FlashWrite: ``pwrite`` at any offset (``flush`` or ``close`` makes it durable).

and the fast whole-image path :meth:`BlockDriver.write_image` (compressed, sparse and bmap
images, verified read-back), and :func:`write_many` for several targets at once.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from unbrick.errors import DeviceError, UsageError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import Capability
from unbrick.transports.block.target import (
    BlockTarget,
    System,
    open_reader,
    open_target,
)
from unbrick.transports.block.writer import (
    ALIGN,
    ProgressFn,
    TargetResult,
    WriteOptions,
    WriteResult,
    write_image,
)

log = logging.getLogger(__name__)

#: Largest read or write the engine asks for at once.
MAX_TRANSFER = 8 * 1024 * 1024


class BlockDriver:
    """An open block target; see the module notes."""

    capabilities = frozenset(
        {
            Capability.IDENTIFY,
            Capability.READ,
            Capability.ERASE,
            Capability.WRITE,
            Capability.DEVICE_HASH,
        }
    )

    def __init__(self, address: DeviceAddress, target: BlockTarget) -> None:
        self.address = address
        self.target = target
        self.max_transfer = MAX_TRANSFER
        self._dfd = -1
        self._buf: mmap.mmap | None = None

    @property
    def size_bytes(self) -> int:
        return self.target.size_bytes

    # -- Identify ----------------------------------------------------------------------------

    def identify(self) -> DeviceIdentity:
        info = self.target.info
        if info.is_block:
            model = " ".join(x for x in (info.vendor, info.model) if x) or f"{info.bus} disk"
        else:
            model = "image file"
        serial = info.serial or os.path.realpath(info.path)
        extra = {
            "path": info.path,
            "kind": info.kind,
            "bus": info.bus,
            "removable": "yes" if info.removable else "no",
            "logical_block_bytes": str(self.target.logical_block_bytes),
        }
        for key, value in (("kernel_name", info.name), ("disk", info.disk)):
            if value:
                extra[key] = value
        if info.backing_file:
            extra["backing_file"] = info.backing_file
        return DeviceIdentity(
            model=model,
            serial=serial,
            storage=StorageInfo(
                type="block",
                size_bytes=self.target.size_bytes,
                erase_block_bytes=max(512, self.target.logical_block_bytes),
                page_bytes=self.target.logical_block_bytes,
            ),
            extra=extra,
        )

    # -- FlashRead / DeviceHash --------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise UsageError(f"negative range {offset}+{length}")
        if self.target.is_block and offset + length > self.target.size_bytes:
            raise DeviceError(
                f"{self.target.path}: range {offset}..{offset + length} is past the end of the "
                f"device ({self.target.size_bytes} bytes)",
                hint="the image or region is larger than the card",
            )

    def _read_direct(self, offset: int, length: int) -> bytes:
        """Bytes ``offset``..``offset+length`` from the device, bypassing the page cache."""
        if self._dfd < 0:
            self._dfd = open_reader(self.target.path)
        if self._dfd < 0:  # no O_DIRECT here: flush and drop the cache, then read
            os.fsync(self.target.fd)
            os.posix_fadvise(self.target.fd, offset, length, os.POSIX_FADV_DONTNEED)
            return os.pread(self.target.fd, length, offset)
        start = offset - offset % ALIGN
        end = -(-(offset + length) // ALIGN) * ALIGN
        if self._buf is None or len(self._buf) < end - start:
            if self._buf is not None:
                self._buf.close()
            self._buf = mmap.mmap(-1, max(end - start, MAX_TRANSFER + 2 * ALIGN))
        got = 0
        with memoryview(self._buf) as view:
            while got < end - start:
                n = os.preadv(self._dfd, [view[got : end - start]], start + got)
                if n <= 0:
                    break
                got += n
            skip = offset - start
            return view[skip : max(skip, min(got, skip + length))].tobytes()

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        try:
            data = self._read_direct(offset, length)
        except OSError as e:
            raise DeviceError(
                f"{self.target.path}: read failed at offset {offset}: {e.strerror}"
            ) from e
        if len(data) != length:
            raise DeviceError(
                f"{self.target.path}: read at offset {offset} returned {len(data)} of "
                f"{length} bytes (end of the file?)"
            )
        return data

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        """Digest of a range read directly from the device (computed here, not cached data)."""
        try:
            h = hashlib.new(algorithm)
        except ValueError as e:
            raise UsageError(f"unknown hash algorithm '{algorithm}'") from e
        pos = 0
        while pos < length:
            k = min(self.max_transfer, length - pos)
            h.update(self.read(offset + pos, k))
            pos += k
        return h.hexdigest()

    # -- FlashErase / FlashWrite -------------------------------------------------------------

    def erase(self, offset: int, length: int) -> None:
        """Nothing to do on block storage (writes overwrite); the range is checked."""
        self._check_range(offset, length)

    def program(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.target.fd, view[done:], offset + done)
            except OSError as e:
                raise DeviceError(
                    f"{self.target.path}: write failed at offset {offset + done}: {e.strerror}"
                ) from e
            if n <= 0:
                raise DeviceError(f"{self.target.path}: write at {offset + done} wrote nothing")
            done += n

    def flush(self) -> None:
        """Make every write so far durable (fsync)."""
        try:
            os.fsync(self.target.fd)
        except OSError as e:
            raise DeviceError(f"{self.target.path}: flush failed: {e.strerror}") from e

    # -- the whole-image path ----------------------------------------------------------------

    def write_image(
        self,
        source: str | Path,
        bmap: str | Path | Literal["auto"] | None = "auto",
        verify: bool = True,
        progress: ProgressFn | None = None,
        *,
        options: WriteOptions | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> TargetResult:
        """Write the image file ``source`` to this target; the result, or the error raised.

        ``verify`` overrides ``options.verify``. Raises PreflightError (does not fit: nothing
        written), IntegrityError (bad bmap range: nothing written), ImageError, DeviceError,
        VerifyError (bad ranges named) or JobError (cancelled).
        """
        opts = replace(options or WriteOptions(), verify=verify)
        result = write_image(
            source, [self.target], bmap=bmap, options=opts, progress=progress, cancelled=cancelled
        )
        result.raise_for_failure()
        return result.targets[0]

    def close(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        if not self.target.closed:
            try:
                os.fsync(self.target.fd)
            except OSError:
                log.warning("%s: fsync on close failed", self.target.path, exc_info=True)
            self.target.close()

    def __enter__(self) -> BlockDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _path_of(address: DeviceAddress) -> str:
    if address.protocol != "block" or not address.path:
        raise UsageError(f"{address.uri} is not a block:// address", hint="use block:///dev/sdX")
    return address.path


def open_block(
    address: DeviceAddress,
    *,
    forced: Mapping[str, str] | None = None,
    system: System | None = None,
    image_path: str | Path | None = None,
) -> BlockDriver:
    """Check and open the target of ``block:///PATH``; PreflightError when refused.

    ``forced`` maps overridable check ids (``block.removable``) to the user's reason.
    """
    path = _path_of(address)
    target = open_target(path, forced=forced, system=system, image_path=image_path)
    return BlockDriver(address, target)


def write_many(
    image: str | Path,
    addresses: Sequence[DeviceAddress],
    *,
    bmap: str | Path | Literal["auto"] | None = "auto",
    options: WriteOptions | None = None,
    forced: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    system: System | None = None,
) -> WriteResult:
    """Write ``image`` to every ``block://`` address at once: the image is read once, each
    target gets its own progress reports (``WriteProgress.target``) and its own result.

    Every target is checked before any is written (PreflightError names the first refusal).
    """
    paths = [_path_of(a) for a in addresses]
    return write_image(
        image,
        paths,
        bmap=bmap,
        options=options,
        forced=forced,
        progress=progress,
        cancelled=cancelled,
        system=system,
    )
