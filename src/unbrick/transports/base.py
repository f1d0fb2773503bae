"""Capabilities a device driver may offer, one small Protocol each.

A driver declares the capabilities it has (``Device.capabilities``) instead of raising
NotImplementedError; the engine plans with what is there (device-side hash or read-back, A/B
boot control or backup-and-restore). All offsets are absolute byte offsets in the device's
storage. Drivers raise TransportError/DeviceError (unbrick.errors) and nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from unbrick.model.identity import DeviceIdentity
from unbrick.model.uri import DeviceAddress


class Capability(enum.Enum):
    IDENTIFY = "identify"
    READ = "read"
    ERASE = "erase"
    WRITE = "write"
    DEVICE_HASH = "device-hash"
    REBOOT = "reboot"
    BOOT_CONTROL = "boot-control"
    CONSOLE = "console"
    #: Writes a whole image in one operation with the link's own transfer and check
    #: (fastboot download+flash, flashrom with a layout, a bmap block writer, esptool).
    IMAGE_WRITE = "image-write"
    #: Storage is a set of named partitions the device locates itself (fastboot).
    PARTITIONS = "partitions"
    #: Named partitions can be read back (fastboot ``fetch``): backups and read-back checks.
    PARTITION_READ = "partition-read"
    #: Vendor ``oem`` commands, sent only from the profile's allow-list (fastboot).
    OEM = "oem"


@dataclass(frozen=True)
class BootReport:
    """What the device showed while booting after a reboot."""

    #: Console/log text of the boot (trimmed by the driver to a sensible size).
    log: str
    #: "firmware" (running), "bootloader" (stopped in recovery), "dead" (no answer).
    state: str
    firmware_version: str | None = None
    booted_slot: str | None = None


@dataclass(frozen=True)
class BootState:
    """A/B boot control state (U-Boot-style environment)."""

    active_slot: str
    #: Slot the bootloader tries next once (upgrade_available), or None.
    trial_slot: str | None = None
    bootcount: int = 0
    bootlimit: int = 3
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Identify(Protocol):
    def identify(self) -> DeviceIdentity: ...


@runtime_checkable
class FlashRead(Protocol):
    #: Largest ``length`` one read may ask for.
    max_transfer: int

    def read(self, offset: int, length: int) -> bytes: ...


@runtime_checkable
class FlashErase(Protocol):
    def erase(self, offset: int, length: int) -> None:
        """Erase whole erase blocks covering ``offset``..``offset+length`` (aligned)."""
        ...


@runtime_checkable
class FlashWrite(Protocol):
    max_transfer: int

    def program(self, offset: int, data: bytes) -> None:
        """Program erased flash; addressed and idempotent on erased blocks."""
        ...


@runtime_checkable
class DeviceHash(Protocol):
    def device_hash(self, offset: int, length: int, algorithm: str = "sha256") -> str:
        """Hex digest computed by the device itself."""
        ...


@dataclass(frozen=True)
class WriteTarget:
    """Where :meth:`ImageWrite.write_image` puts an image: a profile region (a partition name
    on devices with :attr:`Capability.PARTITIONS`) and, on address-based devices, its span."""

    region: str
    offset: int
    size: int
    slot: str | None = None


@dataclass(frozen=True)
class ImageWriteResult:
    bytes_written: int
    #: How the link checked what it wrote ("fastboot OKAY", "flashrom verify",
    #: "bmap sha256", "esptool md5"...); empty when it did not.
    verified_by: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ImageWrite(Protocol):
    def write_image(
        self,
        target: WriteTarget,
        image: Path,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ImageWriteResult:
        """Write the image file to ``target`` in one operation (``progress`` gets the bytes
        done so far). Nothing is reported as written that the link did not accept."""
        ...


@runtime_checkable
class Partitions(Protocol):
    def partition_size(self, name: str) -> int | None:
        """The size of a partition the device knows by name; None when it does not say."""
        ...


@runtime_checkable
class PartitionRead(Protocol):
    def read_partition(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of partition ``name`` from ``offset`` (inside the partition)."""
        ...


@dataclass(frozen=True)
class OemReply:
    """What the device answered an ``oem`` command: its message lines and final text."""

    command: str
    #: The INFO/TEXT lines the device sent before its final answer, in order.
    lines: tuple[str, ...]
    #: The text of the final OKAY (often empty).
    value: str = ""


@runtime_checkable
class OemCommands(Protocol):
    def oem(self, command: str, allowed: Collection[str]) -> OemReply:
        """Send ``oem COMMAND`` if its first word or the whole command is in ``allowed``;
        a command that would lock or unlock the bootloader is refused whatever ``allowed``
        says. A refusal is a UsageError raised before anything is sent."""
        ...


@runtime_checkable
class Reboot(Protocol):
    def reboot(self, timeout_s: float) -> BootReport:
        """Reset the device and report its boot (waits up to ``timeout_s``)."""
        ...

    def enter_recovery(self, timeout_s: float) -> None:
        """Bring a running device back into its bootloader/recovery mode."""
        ...


@runtime_checkable
class BootControl(Protocol):
    def boot_state(self) -> BootState: ...

    def set_trial(self, slot: str) -> None:
        """Boot ``slot`` once on the next reset (the bootloader falls back after bootlimit)."""
        ...

    def commit(self, slot: str) -> None:
        """Make ``slot`` the active slot and clear the trial state."""
        ...


class Device(Protocol):
    """An open device: what a driver returns. Capability methods come from the Protocols."""

    address: DeviceAddress
    capabilities: frozenset[Capability]

    def close(self) -> None: ...
