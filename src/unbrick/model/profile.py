"""Device profiles: per-device facts as data (the types; loading lives in profile_toml.py).

A profile says how to recognise a device from the identity read over its link, what its
storage and regions are, how to put it into recovery mode, which transfer methods it offers,
what a good first boot looks like, and which firmware it accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from unbrick.model.identity import DeviceIdentity


@dataclass(frozen=True)
class MatchRule:
    """One identification rule over an identity field (``DeviceIdentity.fields()``).

    Exactly one of ``equals``, ``one_of`` or ``pattern`` (a full-match regular expression) is set.
    """

    field: str
    equals: str | None = None
    one_of: tuple[str, ...] = ()
    pattern: str | None = None

    def matches(self, identity: DeviceIdentity) -> bool:
        value = identity.fields().get(self.field)
        if value is None:
            return False
        if self.equals is not None:
            return value == self.equals
        if self.one_of:
            return value in self.one_of
        if self.pattern is not None:
            return re.fullmatch(self.pattern, value) is not None
        return False


@dataclass(frozen=True)
class Region:
    """A named range of the device's storage."""

    name: str
    offset: int
    size: int
    #: firmware | bootloader | env | data | calibration | loader
    kind: str = "firmware"
    #: Critical regions (the bootloader) need a verified backup and --allow-critical.
    critical: bool = False
    #: A/B: the slot letter ("a", "b") and the group the slots belong to ("firmware").
    slot: str | None = None
    slot_group: str | None = None
    #: Image formats this region accepts (format names of unbrick.formats); empty: any.
    formats: tuple[str, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class StorageSpec:
    type: str
    size_bytes: int
    erase_block_bytes: int
    #: NAND: bad blocks are expected and skipped.
    bad_blocks: bool = False


@dataclass(frozen=True)
class Recovery:
    """How a person puts the device into recovery mode, and what happens then."""

    #: Steps shown to the technician, in order.
    instructions: tuple[str, ...]
    #: Transfer methods in order of preference (e.g. "sim", "uboot-tftp", "uboot-ymodem").
    methods: tuple[str, ...] = ()
    #: Seconds to wait for the device to appear.
    wait_s: float = 60.0


@dataclass(frozen=True)
class BootCheck:
    """What marks a good first boot."""

    success_pattern: str | None = None
    failure_patterns: tuple[str, ...] = ()
    #: The booted firmware must report the image's version.
    expect_version: bool = True
    timeout_s: float = 60.0
    #: Where a link cannot ask the firmware its version (a serial console), the boot log
    #: tells it: the first group of this pattern's first match.
    version_pattern: str | None = None


@dataclass(frozen=True)
class Compatibility:
    """Which firmware fits: empty tuples mean "any"."""

    models: tuple[str, ...] = ()
    hw_revisions: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    #: Oldest bootloader version that can boot current firmware.
    min_bootloader: str | None = None


@dataclass(frozen=True)
class Loader:
    """Two-pass flashing: a loader staged first (to RAM or a loader region)."""

    region: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    #: router | nas | phone | sbc | mcu | iot | other
    family: str
    match: tuple[MatchRule, ...]
    storage: StorageSpec
    regions: tuple[Region, ...]
    recovery: Recovery
    boot: BootCheck = field(default_factory=BootCheck)
    compat: Compatibility = field(default_factory=Compatibility)
    #: Region written when the user names none.
    default_region: str | None = None
    loader: Loader | None = None
    #: "auto" (device hash if offered, else read-back), "device-hash", "read-back".
    verify: str = "auto"
    #: Where the profile was loaded from (a path, or "builtin:NAME").
    source: str = ""
    #: Per link protocol ("uboot", "sim", ...): defaults for the device URI's query
    #: parameters (the URI's own win), and ``backup_scope`` ("full" or "target").
    link: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Per link protocol: the ``oem`` commands the device may be sent (``[link.fastboot]
    #: oem_allow``), each a first word or a whole command. Never a URI parameter: a device
    #: URI cannot widen it.
    oem: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def link_params(self, protocol: str) -> dict[str, str]:
        """The URI parameters this profile sets by default on links of ``protocol``."""
        params = dict(self.link.get(protocol, {}))
        params.pop("backup_scope", None)
        return params

    def backup_scope(self, protocol: str) -> str:
        """What a flash backs up on links of ``protocol`` unless asked: "full" or "target"."""
        return self.link.get(protocol, {}).get("backup_scope", "full")

    def oem_allow(self, protocol: str) -> tuple[str, ...]:
        """The ``oem`` commands this profile allows on links of ``protocol`` (empty: none)."""
        return self.oem.get(protocol, ())

    def matches(self, identity: DeviceIdentity) -> bool:
        return bool(self.match) and all(rule.matches(identity) for rule in self.match)

    def region(self, name: str) -> Region | None:
        return next((r for r in self.regions if r.name == name), None)

    def slots(self, group: str) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.slot_group == group)

    @property
    def is_ab(self) -> bool:
        return any(r.slot for r in self.regions)
