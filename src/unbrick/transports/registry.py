"""Open a device from its address: the one place that maps URI schemes to drivers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from unbrick.errors import UsageError
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import Device

if TYPE_CHECKING:
    from unbrick.transports.block.group import WriteGroup

#: Protocols whose drivers ship in this release.
AVAILABLE = ("sim", "uboot", "fastboot", "flashrom", "block", "esp")


@dataclass(frozen=True)
class OpenOptions:
    """How drivers are opened: where simulators register, how long to wait."""

    sim_registry: Path | None = None
    timeout_s: float = 10.0
    #: Overridable checks a driver makes when it opens (``block.removable``) -> the reason.
    forced: Mapping[str, str] = field(default_factory=dict)
    #: Block devices of one command that take the same image: it is read once for all.
    block_group: WriteGroup | None = None


def open_device(address: DeviceAddress, options: OpenOptions | None = None) -> Device:
    """Open the driver for ``address``; UsageError for protocols without a driver yet."""
    opts = options or OpenOptions()
    if address.protocol == "sim":
        from unbrick.transports.sim import open_sim  # noqa: PLC0415 - drivers load lazily

        return open_sim(address, registry_dir=opts.sim_registry, timeout_s=opts.timeout_s)
    if address.protocol == "uboot":
        from unbrick.transports.uboot import open_uboot  # noqa: PLC0415 - drivers load lazily

        return open_uboot(address, timeout_s=opts.timeout_s)
    if address.protocol == "flashrom":
        from unbrick.transports.flashrom import open_flashrom  # noqa: PLC0415

        return open_flashrom(address, timeout_s=opts.timeout_s)
    if address.protocol == "esp":
        from unbrick.transports.esp import open_esp  # noqa: PLC0415

        return open_esp(address, timeout_s=opts.timeout_s)
    if address.protocol == "fastboot":
        from unbrick.transports.fastboot.engine import open_fastboot_device  # noqa: PLC0415

        return open_fastboot_device(address, timeout_s=opts.timeout_s)
    if address.protocol == "block":
        from unbrick.transports.block.engine import open_block_device  # noqa: PLC0415

        return open_block_device(address, forced=opts.forced, group=opts.block_group)
    raise UsageError(
        f"no driver for {address.scheme}:// devices in this version of unbrick",
        hint=f"available: {', '.join(p + '://' for p in AVAILABLE)}",
    )
