"""What a device says about itself, read over its link."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Storage kinds a profile or a device may declare.
STORAGE_TYPES = ("nor", "spi-nor", "nand", "emmc", "block")


@dataclass(frozen=True)
class StorageInfo:
    """The device's flash as the device reports it."""

    type: str
    size_bytes: int
    erase_block_bytes: int = 4096
    #: Smallest programmable unit (NAND page, NOR word); 1 for byte-programmable.
    page_bytes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "size_bytes": self.size_bytes,
            "erase_block_bytes": self.erase_block_bytes,
            "page_bytes": self.page_bytes,
        }


@dataclass(frozen=True)
class DeviceIdentity:
    """Identity fields read from a device. ``None`` means the device did not say."""

    model: str
    serial: str
    hw_revision: str | None = None
    region: str | None = None
    bootloader_version: str | None = None
    firmware_version: str | None = None
    #: The device's anti-rollback counter: images with a lower security version are refused.
    security_version: int | None = None
    storage: StorageInfo | None = None
    #: Anything else the transport read (board name, MAC, env variables...), as strings.
    extra: dict[str, str] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        """Flat string fields for profile identification rules (``extra`` keys included)."""
        out = dict(self.extra)
        for key in (
            "model",
            "serial",
            "hw_revision",
            "region",
            "bootloader_version",
            "firmware_version",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = str(value)
        if self.security_version is not None:
            out["security_version"] = str(self.security_version)
        if self.storage is not None:
            out["storage_type"] = self.storage.type
            out["storage_size"] = str(self.storage.size_bytes)
        return out

    def same_device(self, other: DeviceIdentity) -> bool:
        """True when ``other`` is the same physical device (model and serial agree)."""
        return self.model == other.model and self.serial == other.serial

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "serial": self.serial,
            "hw_revision": self.hw_revision,
            "region": self.region,
            "bootloader_version": self.bootloader_version,
            "firmware_version": self.firmware_version,
            "security_version": self.security_version,
            "storage": self.storage.to_dict() if self.storage else None,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceIdentity:
        st = d.get("storage")
        return cls(
            model=str(d["model"]),
            serial=str(d["serial"]),
            hw_revision=d.get("hw_revision"),
            region=d.get("region"),
            bootloader_version=d.get("bootloader_version"),
            firmware_version=d.get("firmware_version"),
            security_version=d.get("security_version"),
            storage=StorageInfo(**st) if isinstance(st, dict) else None,
            extra={str(k): str(v) for k, v in (d.get("extra") or {}).items()},
        )
