"""The U-Boot driver on the simulator's CFI NOR routers, through their console face, the way a
technician works a router on its UART: flash with the engine, back up over tftpput, and A/B
boot control through U-Boot's bootcount scheme (``upgrade_available``, ``bootcount``,
``altbootcmd``), with a rollback when the new slot boot-loops.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from unbrick.engine.events import ListSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, IntegrityRequest, Workbench
from unbrick.errors import DeviceError, RolledBack
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.model.uri import DeviceAddress, parse_device_uri
from unbrick.sim.device import Faults, SimDevice, load_env
from unbrick.sim.firmware import build_firmware, read_firmware_info
from unbrick.sim.kinds import create_device
from unbrick.sim.server import SimServer
from unbrick.sim.uboot_face import ConsoleConfig
from unbrick.transports.base import Capability, Device
from unbrick.transports.uboot import UBootDriver, open_uboot

pytestmark = pytest.mark.slow

FAST = Faults(power_on_delay_s=0.01)
QUICK = ConsoleConfig(autoboot_delay_s=0.3, xmodem_poll_s=0.1)
NET = "serverip=127.0.0.1&ipaddr=127.0.0.1&tftp_listen=127.0.0.1:0"


@dataclass
class Sim:
    device: SimDevice
    server: SimServer
    tmp: Path

    def uri(self, query: str = "") -> str:
        port = self.server.ports.console_port
        return f"uboot+tcp://127.0.0.1:{port}" + (f"?{query}" if query else "")


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Sim]:
    yield from _sim(tmp_path, "router")


@pytest.fixture
def router_ab(tmp_path: Path) -> Iterator[Sim]:
    yield from _sim(tmp_path, "router-ab")


def _sim(tmp: Path, kind: str, console: ConsoleConfig = QUICK) -> Iterator[Sim]:
    dev = create_device(kind, tmp / "state", kind, faults=FAST)
    server = SimServer(dev, console=console)
    server.start()
    try:
        yield Sim(dev, server, tmp)
    finally:
        server.stop()
        dev.close()


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp / "home")}).ensure()
        self.sink = ListSink()
        self.drivers: list[UBootDriver] = []

    def open(self, address: DeviceAddress) -> Device:
        driver = open_uboot(address, timeout_s=20.0)
        self.drivers.append(driver)
        return driver

    def flash(self, uri: str, image: Path, region: str | None, profile: str) -> object:
        wb = Workbench(
            store=SQLiteStore(self.paths.db_path),
            vault=BackupVault(self.paths.vault_dir, self.paths.key_file),
            profiles=ProfileSet.from_sources(builtin_profile_sources(), []),
            open_device=self.open,
            sink=self.sink,
            workdir=self.paths.state_dir / "work",
        )
        sha = hashlib.sha256(image.read_bytes()).hexdigest()
        return wb.flash(
            uri,
            FlashRequest(
                image=image,
                region=region,
                profile_id=profile,
                integrity=IntegrityRequest(sha256=sha),
            ),
        )

    def steps(self) -> dict[str, dict[str, object]]:
        return {e.name: dict(e.data) for e in self.sink.events if e.kind == "step-end"}


def firmware(tmp: Path, model: str, version: str, *, panic: bool = False) -> Path:
    path = tmp / f"{model}-{version}{'-panic' if panic else ''}.bin"
    path.write_bytes(
        build_firmware(
            model,
            version,
            security_version=1,
            hw_revisions=("B1", "B2"),
            regions=("EU", "US"),
            size_bytes=300_000,
            panic=panic,
        )
    )
    return path


def test_a_nor_router_is_flashed_through_its_console_and_boots_the_new_version(
    router: Sim,
) -> None:
    img = firmware(router.tmp, "SimRouter", "2.1.0")
    with open_uboot(parse_device_uri(router.uri()), timeout_s=20) as first:
        ident = first.identify()
    # The hardware revision and region come from U-Boot's environment (board_rev, region).
    assert (ident.model, ident.hw_revision, ident.region) == (
        "SimRouter",
        router.device.config.hw_revision,
        router.device.config.region,
    )
    bench = Bench(router.tmp)
    result = bench.flash(router.uri(NET), img, "firmware", "sim-router")
    assert result.outcome == "success"  # type: ignore[attr-defined]
    drv = bench.drivers[-1]
    # The profile's [link.uboot] table: the flash at address 0, and a backup of the target.
    assert drv.options.boot_bank is True
    started = {e.name: e.data for e in bench.sink.events if e.kind == "step-start"}
    assert started["backup"]["scope"] == "target"
    # Written by tftpboot, backed up by tftpput; both checked with crc32.
    assert drv.stats.net_loads >= 2 and drv.stats.net_reads >= 1
    assert drv.stats.net_failure == ""
    region = router.device.config.find_region("firmware")
    assert region is not None
    on_chip = router.device.spi_read(region.offset, img.stat().st_size)
    assert on_chip == img.read_bytes()
    # The version came from the boot log: the profile's version_pattern.
    assert "SimRouter firmware 2.1.0 booted" in result.boot.log  # type: ignore[attr-defined]
    info = read_firmware_info(router.device.spi_read(region.offset, region.size))
    assert info is not None and info.version == "2.1.0"


def test_ab_router_tries_the_new_slot_and_commits_it_through_uboots_environment(
    router_ab: Sim,
) -> None:
    img = firmware(router_ab.tmp, "SimRouterAB", "2.1.0")
    bench = Bench(router_ab.tmp)
    result = bench.flash(router_ab.uri(NET), img, None, "sim-router-ab")
    assert result.outcome == "success"  # type: ignore[attr-defined]
    drv = bench.drivers[-1]
    assert Capability.BOOT_CONTROL in drv.capabilities
    steps = bench.steps()
    assert steps["commit"]["active_slot"] == "b"
    assert "set-trial-slot" in steps
    env, _, _ = load_env(router_ab.device.flash, router_ab.device.config)
    assert env is not None
    assert (env["active_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "0", "0")
    typed = "\n".join(str(e.data) for e in bench.sink.events)
    assert "firmware_b" in typed


def test_ab_router_whose_new_slot_boot_loops_is_rolled_back_to_the_old_slot(
    router_ab: Sim,
) -> None:
    img = firmware(router_ab.tmp, "SimRouterAB", "2.1.0", panic=True)
    bench = Bench(router_ab.tmp)
    with pytest.raises(RolledBack) as e:
        bench.flash(router_ab.uri(NET), img, None, "sim-router-ab")
    assert "Kernel panic" in e.value.message
    steps = bench.steps()
    assert steps["rollback"]["active_slot"] == "a"
    env, _, _ = load_env(router_ab.device.flash, router_ab.device.config)
    assert env is not None
    assert (env["active_slot"], env["upgrade_available"]) == ("a", "0")


def test_boot_control_is_refused_where_the_environment_has_no_slots(router: Sim) -> None:
    with open_uboot(parse_device_uri(router.uri()), timeout_s=20) as drv:
        assert Capability.BOOT_CONTROL not in drv.capabilities
        with pytest.raises(DeviceError, match="no A/B boot control"):
            drv.boot_state()


@pytest.mark.parametrize("commands", [("md5sum", "hash"), ()])
def test_device_hashes_come_from_the_device_where_uboot_can_compute_them(
    tmp_path: Path, commands: tuple[str, ...]
) -> None:
    config = replace(QUICK, hash_commands=commands)
    for sim in _sim(tmp_path, "router", config):
        region = sim.device.config.find_region("firmware")
        assert region is not None
        data = sim.device.spi_read(region.offset, 0x10000)
        with open_uboot(parse_device_uri(sim.uri("boot_bank=on")), timeout_s=20) as drv:
            assert drv.device_hash(region.offset, 0x10000) == hashlib.sha256(data).hexdigest()
            assert drv.device_hash(region.offset, 0x10000, "md5") == hashlib.md5(data).hexdigest()
            assert drv.device_hash(region.offset, 0x10000, "crc32") == f"{zlib.crc32(data):08x}"
            # With hash/md5sum the device computes the digests; without, the host does, from
            # bytes read back and confirmed by the device's crc32.
            assert drv.stats.device_digests == (2 if commands else 0)
            assert (drv.stats.dumps > 0) == (not commands)
