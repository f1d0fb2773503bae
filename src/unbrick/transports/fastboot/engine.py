"""The fastboot driver as the flash workflow sees it: a device of named partitions that takes
whole images (``Capability.PARTITIONS`` and ``Capability.IMAGE_WRITE``) and vendor ``oem``
commands from an allow-list (``Capability.OEM``).

A device that answers ``fetch`` (it reports ``max-fetch-size``: fastbootd of Android 12+, the
simulator) also has ``Capability.PARTITION_READ``: the workflow backs up the partition it is
about to write, checks the write by reading it back, and restores the backup when the check
or the first boot fails. Without ``fetch`` nothing can be read back: the workflow takes no
backup and verifies by the device's answer to ``flash`` (OKAY after it wrote and, for sparse
images, checked every chunk). Partition sizes from ``getvar all`` (``partition-size:NAME``) go
into the identity's ``extra``, where the ``image.size`` pre-flight check finds them.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Collection
from pathlib import Path

from unbrick.errors import DeviceError, PreflightError
from unbrick.model.identity import DeviceIdentity
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import (
    BootReport,
    BootState,
    Capability,
    ImageWriteResult,
    OemReply,
    WriteTarget,
)
from unbrick.transports.fastboot.driver import FastbootDriver, UpdateReport, open_fastboot
from unbrick.transports.fastboot.update import UpdatePlan, UpdateStep

log = logging.getLogger(__name__)

_SIZE_PREFIX = "partition-size:"


class FastbootDevice:
    """Wraps :class:`FastbootDriver` for :class:`unbrick.engine.workflow.Workbench`."""

    def __init__(self, driver: FastbootDriver) -> None:
        self.driver = driver
        self.address: DeviceAddress = driver.address
        caps = {Capability.IMAGE_WRITE, Capability.PARTITIONS, Capability.OEM}
        if driver.can_read:
            caps.add(Capability.PARTITION_READ)
        self.capabilities: frozenset[Capability] = driver.capabilities | caps
        self.max_transfer = 1 << 20
        #: Formats written as they are: sparse images go in pieces of max-download-size.
        self.image_formats = frozenset({"android-sparse"})

    def identify(self) -> DeviceIdentity:
        identity = self.driver.identify()
        sizes = {k: v for k, v in self.driver.variables().items() if k.startswith(_SIZE_PREFIX)}
        return DeviceIdentity(
            model=identity.model,
            serial=identity.serial,
            hw_revision=identity.hw_revision,
            region=identity.region,
            bootloader_version=identity.bootloader_version,
            firmware_version=identity.firmware_version,
            security_version=identity.security_version,
            storage=identity.storage,
            extra={**identity.extra, **sizes},
        )

    def partition_size(self, name: str) -> int | None:
        """The partition's size; None when the device has no such partition or will not say."""
        try:
            return self.driver.partition_size(name)
        except (PreflightError, DeviceError):
            return None

    def read_partition(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of the partition from ``offset``, with ``fetch``."""
        out = io.BytesIO()
        got = self.driver.read_partition(name, out, offset=offset, size=size)
        data = out.getvalue()
        if got != size or len(data) != size:
            raise DeviceError(
                f"the device sent {len(data)} bytes of '{name}' for a {size}-byte read at {offset}"
            )
        return data

    def write_image(
        self,
        target: WriteTarget,
        image: Path,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ImageWriteResult:
        report = self.driver.flash_partition(target.region, image, progress=progress)
        return ImageWriteResult(
            bytes_written=report.image_bytes,
            verified_by="fastboot OKAY",
            detail={
                "partition": report.partition,
                "sparse": report.sparse,
                "download_pieces": report.pieces,
                "sent_bytes": report.sent_bytes,
            },
        )

    def oem(self, command: str, allowed: Collection[str]) -> OemReply:
        """``oem COMMAND`` when ``allowed`` (the profile's list) has it; never lock/unlock."""
        self.driver.options = dataclasses.replace(self.driver.options, oem_allow=tuple(allowed))
        result = self.driver.oem(command)
        return OemReply(command=" ".join(command.split()), lines=result.info, value=result.value)

    def prepare_update(self, package: Path, *, forced: Collection[str] = ()) -> UpdatePlan:
        """Check an update.zip against the device (android-info.txt, partitions, sizes)."""
        return self.driver.prepare_update(package, forced=forced)

    def apply_update(
        self,
        plan: UpdatePlan,
        *,
        progress: Callable[[int], None] | None = None,
        on_step: Callable[[UpdateStep], None] | None = None,
        workdir: Path | None = None,
    ) -> UpdateReport:
        return self.driver.apply_update(plan, progress=progress, on_step=on_step, workdir=workdir)

    def reboot(self, timeout_s: float) -> BootReport:
        return self.driver.reboot(timeout_s)

    def enter_recovery(self, timeout_s: float) -> None:
        self.driver.enter_recovery(timeout_s)

    def boot_state(self) -> BootState:
        return self.driver.boot_state()

    def set_trial(self, slot: str) -> None:
        self.driver.set_trial(slot)

    def commit(self, slot: str) -> None:
        self.driver.commit(slot)

    def close(self) -> None:
        self.driver.close()


def open_fastboot_device(address: DeviceAddress, *, timeout_s: float = 10.0) -> FastbootDevice:
    """Open ``fastboot+tcp|udp|usb://...`` for the flash workflow."""
    return FastbootDevice(open_fastboot(address, timeout_s=timeout_s))


__all__ = ["FastbootDevice", "open_fastboot_device"]
