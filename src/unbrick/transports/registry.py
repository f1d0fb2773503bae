"""Open a device from its address: the one place that maps URI schemes to drivers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unbrick.errors import UsageError
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import Device

#: Protocols whose drivers ship in this release.
AVAILABLE = ("sim", "uboot")


@dataclass(frozen=True)
class OpenOptions:
    """How drivers are opened: where simulators register, how long to wait."""

    sim_registry: Path | None = None
    timeout_s: float = 10.0


def open_device(address: DeviceAddress, options: OpenOptions | None = None) -> Device:
    """Open the driver for ``address``; UsageError for protocols without a driver yet."""
    opts = options or OpenOptions()
    if address.protocol == "sim":
        from unbrick.transports.sim import open_sim  # noqa: PLC0415 - drivers load lazily

        return open_sim(address, registry_dir=opts.sim_registry, timeout_s=opts.timeout_s)
    if address.protocol == "uboot":
        from unbrick.transports.uboot import open_uboot  # noqa: PLC0415 - drivers load lazily

        return open_uboot(address, timeout_s=opts.timeout_s)
    raise UsageError(
        f"no driver for {address.scheme}:// devices in this version of unbrick",
        hint=f"available: {', '.join(p + '://' for p in AVAILABLE)}",
    )
