"""The catalog of simulated device kinds and their flash layouts.

The layouts agree with the shipped profiles ``data/profiles/sim-router.toml``,
``sim-router-ab.toml``, ``sim-router-spi.toml`` and ``sim-router-nand.toml``; change both
together.

``router`` and ``router-ab`` boot from a parallel (CFI) NOR flash that the console shows at
CPU address 0; ``router-spi`` has the same layout on a SPI NOR chip (``sf`` commands);
``router-nand`` has a raw NAND chip (``nand`` and ``mtd`` commands) with 128 KiB erase blocks,
2 KiB pages and, optionally, factory-marked bad blocks in its firmware partition. Its firmware
is written skipping bad blocks, as ``nand write`` does from the partition's start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from unbrick.errors import SourceError, UsageError
from unbrick.model.profile import Region
from unbrick.sim.device import (
    DeviceConfig,
    Faults,
    SimDevice,
    default_env,
    device_paths,
    encode_env,
    env_copies,
    read_config,
    write_config,
)
from unbrick.sim.firmware import build_bootloader, build_calibration, build_firmware
from unbrick.sim.flash import Flash, FlashGeometry, pad_to_page, skip_bad_spans

KIB = 1024
MIB = 1024 * KIB

DEFAULT_HW_REVISION = "B2"
DEFAULT_REGION = "EU"
DEFAULT_SECURITY_VERSION = 1
DEFAULT_BOOTLOADER_VERSION = "2023.01-sim"
FACTORY_FIRMWARE_VERSION = "1.0.0"
#: Size of the factory firmware image (the slots are larger).
FACTORY_FIRMWARE_BYTES = 1 * MIB


@dataclass(frozen=True)
class SimKind:
    name: str
    model: str
    geometry: FlashGeometry
    regions: tuple[Region, ...]
    #: SPI face: the chip a clip-on programmer reads (name and JEDEC id).
    chip: str = "W25Q64JV"
    jedec_id: str = "ef4017"

    @property
    def ab(self) -> bool:
        return any(r.slot for r in self.regions)

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise UsageError(f"sim kind {self.name} has no region {name!r}")

    @property
    def slots(self) -> tuple[Region, ...]:
        """Firmware regions: one (single slot) or the A/B slots in slot order."""
        if self.ab:
            return tuple(sorted((r for r in self.regions if r.slot), key=lambda r: r.slot or ""))
        return tuple(r for r in self.regions if r.kind == "firmware")


def _common() -> tuple[Region, ...]:
    return (
        Region("bootloader", 0x000000, 0x040000, kind="bootloader", critical=True),
        Region("env", 0x040000, 0x020000, kind="env"),
        Region("calibration", 0x060000, 0x010000, kind="calibration"),
    )


_NOR_8M = FlashGeometry(type="nor", size_bytes=8 * MIB, erase_block_bytes=64 * KIB)
_SPI_8M = FlashGeometry(type="spi-nor", size_bytes=8 * MIB, erase_block_bytes=64 * KIB)
#: The NAND kind: 32 MiB, 128 KiB blocks of 64 pages of 2 KiB.
NAND_GEOMETRY = FlashGeometry(
    type="nand", size_bytes=32 * MIB, erase_block_bytes=128 * KIB, page_bytes=2 * KIB
)

KINDS: dict[str, SimKind] = {
    "router": SimKind(
        name="router",
        model="SimRouter",
        geometry=_NOR_8M,
        regions=(
            *_common(),
            Region("firmware", 0x080000, 0x380000, kind="firmware", formats=("uimage",)),
        ),
    ),
    "router-ab": SimKind(
        name="router-ab",
        model="SimRouterAB",
        geometry=_NOR_8M,
        regions=(
            *_common(),
            Region(
                "firmware_a",
                0x080000,
                0x380000,
                kind="firmware",
                slot="a",
                slot_group="firmware",
                formats=("uimage",),
            ),
            Region(
                "firmware_b",
                0x400000,
                0x380000,
                kind="firmware",
                slot="b",
                slot_group="firmware",
                formats=("uimage",),
            ),
        ),
    ),
}


KINDS["router-spi"] = SimKind(
    name="router-spi",
    model="SimRouterSPI",
    geometry=_SPI_8M,
    regions=KINDS["router"].regions,
)
KINDS["router-nand"] = SimKind(
    name="router-nand",
    model="SimRouterNAND",
    geometry=NAND_GEOMETRY,
    regions=(
        Region("bootloader", 0x000000, 0x100000, kind="bootloader", critical=True),
        Region("env", 0x100000, 0x040000, kind="env"),
        Region("calibration", 0x140000, 0x040000, kind="calibration"),
        # 30.5 MiB for images of up to about 24 MiB: the rest is room for bad blocks.
        Region("firmware", 0x180000, 0x1E80000, kind="firmware", formats=("uimage",)),
    ),
    chip="MX30LF1G18AC",
    jedec_id="c2f1",
)


def check_bad_blocks(kind: SimKind, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """The bad blocks to give a device of ``kind`` (sorted); UsageError when the kind has no
    NAND or a block is outside the chip or in a region that must be good (the bootloader,
    its environment and the calibration data: the sim's boot ROM does not skip bad blocks)."""
    if not blocks:
        return ()
    geo = kind.geometry
    if geo.type != "nand":
        raise UsageError(
            f"sim kind {kind.name} has {geo.type} flash: only NAND has bad blocks",
            hint="use --bad-blocks with router-nand",
        )
    eb = geo.erase_block_bytes
    for block in blocks:
        if not 0 <= block < geo.blocks:
            raise UsageError(f"bad block {block} is outside the chip (blocks 0-{geo.blocks - 1})")
        for r in kind.regions:
            if r.kind in ("bootloader", "env", "calibration") and r.offset <= block * eb < r.end:
                raise UsageError(
                    f"bad block {block} (offset 0x{block * eb:x}) is in region {r.name}, "
                    "which the sim needs good",
                    hint="choose blocks in the firmware partition",
                )
    return tuple(sorted(set(blocks)))


def get_kind(name: str) -> SimKind:
    try:
        return KINDS[name]
    except KeyError:
        raise UsageError(
            f"unknown sim device kind {name!r}", hint=f"use one of: {', '.join(sorted(KINDS))}"
        ) from None


def serial_for(name: str) -> str:
    """A stable serial number derived from the device name."""
    return "SIM" + hashlib.sha256(name.encode()).hexdigest()[:10].upper()


def mac_for(serial: str) -> str:
    """A locally administered MAC address derived from the serial."""
    raw = hashlib.sha256(b"mac:" + serial.encode()).digest()[:5]
    return ":".join(f"{b:02x}" for b in (0x02, *raw))


def create_device(
    kind: str,
    state_dir: Path,
    name: str,
    *,
    serial: str | None = None,
    hw_revision: str = DEFAULT_HW_REVISION,
    region: str = DEFAULT_REGION,
    security_version: int = DEFAULT_SECURITY_VERSION,
    bootloader_version: str = DEFAULT_BOOTLOADER_VERSION,
    firmware_version: str = FACTORY_FIRMWARE_VERSION,
    faults: Faults | None = None,
    power_on: bool = True,
    bad_blocks: tuple[int, ...] = (),
) -> SimDevice:
    """A factory-fresh device of ``kind`` in ``state_dir`` (any earlier state is replaced).

    The flash holds a valid bootloader, both env copies, the calibration block and firmware
    ``firmware_version`` (at ``security_version``) in every firmware slot. ``bad_blocks``
    (NAND kinds) are erase block indexes the chip reports bad.
    """
    spec = get_kind(kind)
    bad = check_bad_blocks(spec, bad_blocks)
    geometry = replace(spec.geometry, bad_blocks=bad)
    paths = device_paths(state_dir, name)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        paths.flash.unlink(missing_ok=True)
    except OSError as e:
        raise SourceError(f"cannot prepare {state_dir}: {e.strerror}") from e
    config = DeviceConfig(
        kind=spec.name,
        model=spec.model,
        serial=serial or serial_for(name),
        hw_revision=hw_revision,
        region=region,
        security_version=security_version,
        geometry=geometry,
        regions=spec.regions,
        chip=spec.chip,
        jedec_id=spec.jedec_id,
    )
    flash = Flash(paths.flash, geometry)
    try:
        _factory_program(flash, config, bootloader_version, firmware_version)
        flash.flush()
        write_config(paths.config, config)
    except BaseException:
        flash.close()
        raise
    device = SimDevice(name, config, flash, config_path=paths.config, faults=faults)
    if power_on:
        device.power_on()
    return device


def _factory_program(
    flash: Flash, config: DeviceConfig, bootloader_version: str, firmware_version: str
) -> None:
    geo = config.geometry
    eb = geo.erase_block_bytes
    boot = next(r for r in config.regions if r.kind == "bootloader")
    flash.program(boot.offset, pad_to_page(geo, build_bootloader(bootloader_version)))
    env = default_env(config)
    for seq, offset in enumerate(env_copies(config), start=1):
        flash.program(offset, pad_to_page(geo, encode_env(seq, env, eb)))
    cal = config.find_region("calibration")
    if cal is not None:
        fields = {
            "serial": config.serial,
            "mac": mac_for(config.serial),
            "hw_revision": config.hw_revision,
            "region": config.region,
        }
        flash.program(cal.offset, pad_to_page(geo, build_calibration(fields)))
    image = build_firmware(
        config.model,
        firmware_version,
        security_version=config.security_version,
        hw_revisions=(config.hw_revision,),
        regions=(config.region,),
        size_bytes=FACTORY_FIRMWARE_BYTES,
    )
    for r in config.regions:
        if r.kind == "firmware":
            # Skipping bad blocks from the partition's start, as ``nand write`` does.
            spans, _ = skip_bad_spans(geo, r.offset, len(image), r.end)
            pos = 0
            for start, n in spans:
                flash.program(start, pad_to_page(geo, image[pos : pos + n]))
                pos += n


def load_device(
    state_dir: Path, name: str, *, faults: Faults | None = None, power_on: bool = True
) -> SimDevice:
    """The device ``name`` as it was left in ``state_dir``."""
    paths = device_paths(state_dir, name)
    config = read_config(paths.config)
    if not paths.flash.exists():
        raise SourceError(
            f"flash file {paths.flash} is missing", hint="recreate the device with --reset-factory"
        )
    flash = Flash(paths.flash, config.geometry)
    device = SimDevice(name, config, flash, config_path=paths.config, faults=faults)
    if power_on:
        device.power_on()
    return device


def device_exists(state_dir: Path, name: str) -> bool:
    paths = device_paths(state_dir, name)
    return paths.config.exists() and paths.flash.exists()
