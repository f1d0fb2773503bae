"""The block driver as the flash workflow sees it: besides offset reads and writes, it takes
whole images (``Capability.IMAGE_WRITE``) through the streaming writer, so a compressed or
sparse image is written as it is decompressed (no temporary copy), only the ranges a ``.bmap``
maps are written, and each piece is read back past the page cache.

The workflow hands over the image as given (``image_formats``); a ``.bmap`` beside it, or the
one named with ``--bmap`` (``bmap=`` in the device URI), is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from unbrick.errors import UsageError
from unbrick.model.identity import DeviceIdentity
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import Capability, ImageWriteResult, WriteTarget
from unbrick.transports.block.driver import BlockDriver, open_block
from unbrick.transports.block.group import WriteGroup
from unbrick.transports.block.writer import WriteProgress

log = logging.getLogger(__name__)

#: Formats the streaming writer expands itself.
STREAMED_FORMATS = frozenset({"gzip", "xz", "zstd", "bzip2", "zip", "android-sparse"})


class BlockDevice:
    """Wraps :class:`BlockDriver` for :class:`unbrick.engine.workflow.Workbench`."""

    def __init__(
        self, driver: BlockDriver, *, bmap: str | None = None, group: WriteGroup | None = None
    ) -> None:
        self.driver = driver
        #: Set when the same image goes to several targets at once (read once for all).
        self.group = group
        self.address: DeviceAddress = driver.address
        self.capabilities: frozenset[Capability] = driver.capabilities | {Capability.IMAGE_WRITE}
        self.max_transfer = driver.max_transfer
        self.image_formats = STREAMED_FORMATS
        self.bmap = bmap

    def identify(self) -> DeviceIdentity:
        return self.driver.identify()

    def read(self, offset: int, length: int) -> bytes:
        return self.driver.read(offset, length)

    def erase(self, offset: int, length: int) -> None:
        self.driver.erase(offset, length)

    def program(self, offset: int, data: bytes) -> None:
        self.driver.program(offset, data)

    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        return self.driver.device_hash(offset, length, algorithm)

    def write_image(
        self,
        target: WriteTarget,
        image: Path,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ImageWriteResult:
        if target.offset != 0:
            raise UsageError(
                "a whole image goes at the start of the disk",
                hint="use --offset only with raw images written through the workflow's ranges",
            )

        def report(p: WriteProgress) -> None:
            if progress is not None and p.phase in ("write", "verify"):
                progress(p.done_bytes)

        if self.group is not None:
            result = self.group.write(
                group_key(self.address),
                self.driver.target,
                image,
                bmap=self.bmap or "auto",
                progress=report,
            )
        else:
            result = self.driver.write_image(image, bmap=self.bmap or "auto", progress=report)
        how = {
            "o-direct": "read-back (O_DIRECT)",
            "direct": "read-back (O_DIRECT)",
            "fadvise": "read-back (page cache dropped)",
            "drop-cache": "read-back (page cache dropped)",
        }.get(result.verify_method, "")
        return ImageWriteResult(
            bytes_written=result.written_bytes,
            verified_by=how,
            detail={
                "verified_bytes": result.verified_bytes,
                "rewritten": [list(r) for r in result.rewritten],
                "seconds": round(result.elapsed_s, 3),
            },
        )

    def close(self) -> None:
        if self.group is not None:  # closed without writing: the others need not wait
            self.group.leave(group_key(self.address))
        self.driver.close()


def group_key(address: DeviceAddress) -> str:
    """How a ``block://`` device is named in a :class:`WriteGroup` (its resolved path)."""
    return os.path.realpath(address.path or address.uri)


def open_block_device(
    address: DeviceAddress,
    *,
    forced: Mapping[str, str] | None = None,
    group: WriteGroup | None = None,
) -> BlockDevice:
    """Open ``block:///PATH[?bmap=FILE]`` for the flash workflow; with ``group``, its image
    write joins the other targets of the same command."""
    return BlockDevice(open_block(address, forced=forced), bmap=address.param("bmap"), group=group)


__all__ = ["STREAMED_FORMATS", "BlockDevice", "group_key", "open_block_device"]
