"""The U-Boot driver on SPI NOR (``sf``) and NAND (``nand``) flash, against the simulator's
console face over TCP, and the NAND bad-block map on its own.

What is checked is what ends up in the simulated chip (read through its SPI face, the clip),
what the engine reports, and whether the device then boots the image.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbrick.cli.main import main
from unbrick.engine.events import ListSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, IntegrityRequest, Workbench
from unbrick.errors import DeviceError, RolledBack, VerifyError
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.model.uri import DeviceAddress, parse_device_uri
from unbrick.sim.device import Faults, SimDevice
from unbrick.sim.firmware import build_firmware
from unbrick.sim.flash import FlashGeometry, skip_bad_spans
from unbrick.sim.kinds import create_device
from unbrick.sim.server import SimServer
from unbrick.sim.uboot_face import ConsoleConfig
from unbrick.transports.base import Device
from unbrick.transports.uboot import UBootDriver, UBootOptions, open_uboot
from unbrick.transports.uboot import mtd as M
from unbrick.transports.uboot.console import CommandResult

KiB = 1024
EB = 128 * KiB
FW = 0x180000  # the NAND kind's firmware partition
FW_SPI = 0x80000
FAST = Faults(power_on_delay_s=0.01)
QUICK = ConsoleConfig(autoboot_delay_s=0.3, xmodem_poll_s=0.1)
#: The session TFTP server on loopback: the sim's tftpboot/tftpput move the data.
NET = "serverip=127.0.0.1&ipaddr=127.0.0.1&tftp_listen=127.0.0.1:0"


@dataclass
class Sim:
    device: SimDevice
    server: SimServer

    @property
    def uri(self) -> str:
        return f"uboot+tcp://127.0.0.1:{self.server.ports.console_port}"

    def open(self, query: str = "") -> UBootDriver:
        return open_uboot(parse_device_uri(self.uri + (f"?{query}" if query else "")))

    def physical(self, offset: int, length: int) -> bytes:
        return self.device.spi_read(offset, length)


def start(
    tmp: Path,
    kind: str,
    *,
    bad: tuple[int, ...] = (),
    config: ConsoleConfig = QUICK,
    blank_firmware: bool = True,
) -> Sim:
    dev = create_device(kind, tmp / "state", kind, faults=FAST, bad_blocks=bad)
    if blank_firmware:
        # A router whose firmware was wiped (and a quick backup of the target).
        region = dev.config.find_region("firmware")
        assert region is not None
        eb = dev.config.geometry.erase_block_bytes
        for block in range(region.offset // eb, region.end // eb):
            if block not in bad:
                dev.spi_erase(block * eb, eb)
    server = SimServer(dev, console=config)
    server.start()
    return Sim(dev, server)


@pytest.fixture
def nand(tmp_path: Path) -> Iterator[Sim]:
    sim = start(tmp_path, "router-nand", bad=(13, 14, 20))
    yield sim
    sim.server.stop()
    sim.device.close()


@pytest.fixture
def spi(tmp_path: Path) -> Iterator[Sim]:
    sim = start(tmp_path, "router-spi")
    yield sim
    sim.server.stop()
    sim.device.close()


def firmware(model: str, version: str, size: int) -> bytes:
    return build_firmware(
        model, version, security_version=1, hw_revisions=("B2",), regions=("EU",), size_bytes=size
    )


def flash_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp: Path,
    uri: str,
    image: bytes,
    profile: str,
    *extra: str,
) -> tuple[int, str]:
    monkeypatch.setenv("UNBRICK_HOME", str(tmp / "home"))
    path = tmp / "fw.bin"
    path.write_bytes(image)
    sha = hashlib.sha256(image).hexdigest()
    code = main(
        [
            *("flash", uri, str(path), "--profile", profile, "--partition", "firmware"),
            *("--yes", "--sha256", sha, *extra),
        ]
    )
    out, err = capsys.readouterr()
    return code, out + err


# -- the bad-block map ------------------------------------------------------------------------


@pytest.mark.unit
def test_logical_blocks_are_the_good_blocks_of_each_partition() -> None:
    layout = M.NandLayout.build(
        16 * EB, EB, 2048, [5 * EB, 6 * EB, 9 * EB], [("boot", 0, 4 * EB), ("fw", 4 * EB, 8 * EB)]
    )
    assert [(z.name, z.start, z.size) for z in layout.zones] == [
        ("boot", 0, 4 * EB),
        ("fw", 4 * EB, 8 * EB),
        ("(rest of the chip)", 12 * EB, 4 * EB),
    ]
    fw = layout.zones[1]
    assert fw.good == (4 * EB, 7 * EB, 8 * EB, 10 * EB, 11 * EB)
    # Logical block 1 of "fw" is its second good block; one access runs on over bad block 9.
    (piece,) = layout.pieces(5 * EB + 100, 2 * EB)
    assert (piece.physical, piece.length) == (7 * EB + 100, 2 * EB)
    assert layout.bad_between(7 * EB + 100, 2 * EB) == (9 * EB,)
    assert layout.physical_span(piece) == (7 * EB + 100, 10 * EB + 100)
    # The last three logical blocks of "fw" (as many as it has bad blocks) are not stored.
    tail = layout.pieces(8 * EB, 5 * EB)
    assert [(p.logical, p.length, p.physical, p.zone.name) for p in tail] == [
        (8 * EB, EB, 11 * EB, "fw"),
        (9 * EB, 3 * EB, None, "fw"),
        (12 * EB, EB, 12 * EB, "(rest of the chip)"),
    ]
    whole = M.NandLayout.build(4 * EB, EB, 2048, [EB])
    assert [z.name for z in whole.zones] == ["(whole chip)"]
    with pytest.raises(DeviceError, match="not aligned"):
        M.NandLayout.build(16 * EB, EB, 2048, [], [("x", 100, EB)])


@settings(max_examples=60, deadline=None)
@given(
    bad=st.sets(st.integers(0, 23), max_size=8),
    cuts=st.lists(st.integers(1, 23), max_size=4, unique=True),
    length=st.integers(1, 10 * 64 * KiB),
)
def test_the_map_puts_data_where_u_boots_nand_write_puts_it(
    bad: set[int], cuts: list[int], length: int
) -> None:
    """Writing a partition from its start with ``nand write`` (the sim's skip-bad model) and
    addressing it through the map give every byte the same physical place."""
    eb = 64 * KiB
    bounds = [0, *sorted(cuts), 24]
    parts = [(f"p{i}", a * eb, (b - a) * eb) for i, (a, b) in enumerate(pairwise(bounds))]
    layout = M.NandLayout.build(24 * eb, eb, 2048, [b * eb for b in bad], parts)
    geo = FlashGeometry("nand", 24 * eb, eb, 2048, tuple(sorted(bad)))
    for _, start, size in parts:
        n = min(length, size)
        spans, missing = skip_bad_spans(geo, start, n, start + size)
        by_uboot = [p for s, k in spans for p in range(s, s + k)]
        by_map: list[int] = []
        for piece in layout.pieces(start, n):
            if piece.physical is None:
                continue
            phys_start, _ = layout.physical_span(piece)
            pos, left = phys_start, piece.length
            while left:
                if pos - pos % eb in layout.bad:
                    pos += eb - pos % eb
                    continue
                by_map.append(pos)
                pos += 1
                left -= 1
        assert by_map == by_uboot
        assert missing == sum(p.length for p in layout.pieces(start, n) if p.physical is None)


@pytest.mark.unit
def test_nand_size_is_found_by_asking_for_offsets() -> None:
    size = 200 * EB
    asked: list[str] = []

    def run(
        command: str, *, timeout_s: float | None = None, check: bool = True, status: bool = False
    ) -> CommandResult:
        asked.append(command)
        off = int(command.split()[3], 16)
        text = "Offset exceeds device limit" if off >= size else " 0 bytes read: OK"
        return CommandResult(command, text, 1 if off >= size else 0, (), 0.0)

    assert M._nand_size(run, EB, 0x40000000) == size
    assert len(asked) < 20 and all(c.endswith(" 0") for c in asked)


# -- probing ----------------------------------------------------------------------------------


def test_probe_maps_the_spi_and_nand_chips_at_address_zero(spi: Sim, nand: Sim) -> None:
    with spi.open() as drv:
        assert drv.storage_map.describe() == "sf:0:0@0x0+0x800000"
        ident = drv.identify()
        assert ident.model == "SimRouterSPI"
        assert ident.storage is not None
        assert (ident.storage.type, ident.storage.size_bytes) == ("spi-nor", 8 << 20)
        assert ident.storage.erase_block_bytes == 64 * KiB
        assert ident.extra["mtd_flash"].startswith("sf:0:0 w25q64jv 0x800000 bytes")
        assert "flash_banks" not in ident.extra  # flinfo: "missing or unknown FLASH type"
    with nand.open() as drv:
        assert drv.storage_map.describe() == "nand0@0x0+0x2000000"
        ident = drv.identify()
        assert ident.storage is not None
        assert (ident.storage.type, ident.storage.page_bytes) == ("nand", 2048)
        assert ident.extra["mtd_flash"].endswith("bad blocks: 0x1a0000, 0x1c0000, 0x280000")
        flash = drv.probe.flash
        assert flash is not None and flash.layout is not None
        assert [z.name for z in flash.layout.zones] == [
            "bootloader",
            "env",
            "calibration",
            "firmware",
        ]


# -- flashing through the CLI -----------------------------------------------------------------


@pytest.mark.slow
def test_flash_spi_nor_writes_verifies_and_boots(
    spi: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = firmware("SimRouterSPI", "2.0.0", 300 * KiB + 17)
    code, out = flash_cli(
        monkeypatch, capsys, tmp_path, spi.uri, image, "sim-router-spi", "--backup-scope", "target"
    )
    assert code == 0, out
    assert "success: job" in out
    assert spi.physical(FW_SPI, len(image)) == image
    assert spi.physical(FW_SPI + len(image), 64) == b"\xff" * 64
    assert spi.device.firmware_version == "2.0.0" and spi.device.state == "firmware"


@pytest.mark.slow
def test_flash_nand_with_bad_blocks_in_the_firmware_partition(
    nand: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Full backup and transfers over the session's TFTP server (the sim's tftpput and
    tftpboot); the image skips bad blocks 13 and 14 (and 20) as ``nand write`` would."""
    before = {b: nand.physical(b * EB, EB) for b in (13, 14, 20)}
    image = firmware("SimRouterNAND", "2.0.0", 900 * KiB + 3)
    code, out = flash_cli(
        monkeypatch, capsys, tmp_path, f"{nand.uri}?{NET}", image, "sim-router-nand"
    )
    assert code == 0, out
    assert "success: job" in out
    good = [12, 15, 16, 17, 18, 19, 21, 22]  # the firmware partition's first good blocks
    for i, block in enumerate(good):
        chunk = image[i * EB : (i + 1) * EB]
        assert nand.physical(block * EB, len(chunk)) == chunk, f"block {block}"
    for block, old in before.items():
        assert nand.physical(block * EB, EB) == old  # bad blocks untouched
    assert nand.device.firmware_version == "2.0.0" and nand.device.state == "firmware"


def test_a_write_that_stays_wrong_is_never_reported_as_success(tmp_path: Path) -> None:
    """Both the write and its slower retry store a flipped bit: the driver's crc32 check fails
    twice, the engine restores the backup (factory firmware 1.0.0) and reports a rollback."""
    sim = start(tmp_path, "router-spi", blank_firmware=False,
                config=replace(QUICK, corrupt_writes=2))  # fmt: skip
    factory = sim.physical(FW_SPI, 256 * KiB)
    paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp_path / "home")}).ensure()
    quick = UBootOptions(boot_quiet_s=1.0)
    opened: list[UBootDriver] = []

    def open_device(address: DeviceAddress) -> Device:
        opened.append(open_uboot(address, options=quick))
        return opened[-1]

    bench = Workbench(
        store=SQLiteStore(paths.db_path),
        vault=BackupVault(paths.vault_dir, paths.key_file),
        profiles=ProfileSet.from_sources(builtin_profile_sources(), []),
        open_device=open_device,
        sink=ListSink(),
        workdir=paths.state_dir / "work",
    )
    image = firmware("SimRouterSPI", "2.0.0", 200 * KiB)
    path = tmp_path / "fw.bin"
    path.write_bytes(image)
    try:
        with pytest.raises(RolledBack, match="reads back with crc32"):
            bench.flash(
                f"{sim.uri}?{NET}",
                FlashRequest(
                    image=path,
                    region="firmware",
                    profile_id="sim-router-spi",
                    integrity=IntegrityRequest(sha256=hashlib.sha256(image).hexdigest()),
                    backup_scope="target",
                ),
            )
        assert any(r[2] is False for d in opened for r in d.stats.mtd_retries)
        assert sim.physical(FW_SPI, 256 * KiB) == factory
        assert sim.device.firmware_version == "1.0.0" and sim.device.state == "firmware"
    finally:
        for d in opened:
            d.close()
        sim.server.stop()
        sim.device.close()


# -- the driver's data path -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["router-spi", "router-nand"])
def test_a_write_that_reads_back_wrong_is_retried_in_small_pieces(
    tmp_path: Path, kind: str
) -> None:
    sim = start(tmp_path, kind, bad=(13,) if kind == "router-nand" else (),
                config=replace(QUICK, corrupt_writes=1))  # fmt: skip
    try:
        base = FW if kind == "router-nand" else FW_SPI
        data = random.Random(7).randbytes(256 * KiB)
        with sim.open() as drv:
            drv.erase(base, 256 * KiB)
            drv.program(base, data)
            assert drv.stats.mtd_retries == [(base, len(data), True)]
            assert drv.device_hash(base, len(data), "crc32") == f"{zlib.crc32(data):08x}"
            assert drv.device_hash(base, len(data)) == hashlib.sha256(data).hexdigest()
        if kind == "router-nand":
            assert sim.physical(FW, EB) == data[:EB]
            assert sim.physical(FW + 2 * EB, EB) == data[EB:]  # after bad block 13
        else:
            assert sim.physical(FW_SPI, len(data)) == data
    finally:
        sim.server.stop()
        sim.device.close()


def test_a_write_wrong_twice_raises_verify_error(tmp_path: Path) -> None:
    sim = start(tmp_path, "router-nand", config=replace(QUICK, corrupt_writes=2))
    try:
        data = random.Random(8).randbytes(64 * KiB)
        with sim.open() as drv:
            drv.erase(FW, EB)
            with pytest.raises(VerifyError, match="after a write and a slower rewrite") as err:
                drv.program(FW, data)
            assert err.value.ranges == [(FW, len(data))]
            assert drv.stats.mtd_retries == [(FW, len(data), False)]
            assert drv.shadow.get(FW, len(data)) is None  # nothing vouched for
    finally:
        sim.server.stop()
        sim.device.close()


def test_erase_skips_bad_blocks_and_erases_the_logical_blocks(nand: Sim) -> None:
    dev = nand.device
    for block in (12, 15, 16, 17):
        dev.spi_program(block * EB, b"\x00" * 2048)
    bad_before = nand.physical(13 * EB, EB)
    with nand.open() as drv:
        drv.erase(FW, 4 * EB)  # logical blocks 0-3 of "firmware": physical 12, 15, 16, 17
        assert drv.read(FW + 3 * EB, 4096) == b"\xff" * 4096
    for block in (12, 15, 16, 17):
        assert nand.physical(block * EB, 2048) == b"\xff" * 2048, block
    assert nand.physical(13 * EB, EB) == bad_before


def test_a_partition_that_runs_out_of_good_blocks(nand: Sim) -> None:
    """A 4-block partition with 2 bad blocks holds 2 blocks: the other two read as erased,
    erase as nothing, and refuse data with an error naming the partition."""
    with nand.open() as drv:
        drv.command(
            "setenv mtdparts mtdparts=sim-nand.0:1024k(bootloader)ro,256k(env),"
            "256k(calibration),512k(small),-(firmware)"
        )
    with nand.open() as drv:
        drv.erase(FW, 4 * EB)
        assert drv.read(FW + 3 * EB, 2048) == b"\xff" * 2048
        with pytest.raises(DeviceError, match="partition 'small' has 2 good blocks of 4"):
            drv.program(FW, b"\x5a" * (3 * EB))
        drv.program(FW, b"\x5a" * (2 * EB) + b"\xff" * EB)
        expected = zlib.crc32(b"\x5a" * (2 * EB) + b"\xff" * (2 * EB))
        assert drv.device_hash(FW, 4 * EB, "crc32") == f"{expected:08x}"
        # "firmware" now starts at block 16, and block 20 is its first bad one.
        drv.erase(0x200000, 5 * EB)
        drv.program(0x200000, b"\xa5" * (5 * EB))
    assert nand.physical(12 * EB, EB) == b"\x5a" * EB
    assert nand.physical(15 * EB, EB) == b"\x5a" * EB
    assert nand.physical(21 * EB, EB) == b"\xa5" * EB  # logical block 4 of "firmware"


def test_a_bad_block_table_that_changed_is_an_error(nand: Sim) -> None:
    with nand.open() as drv:
        dev = nand.device
        geo = replace(dev.config.geometry, bad_blocks=(13, 14, 15, 20))
        dev.config = replace(dev.config, geometry=geo)
        dev.flash.geometry = geo
        with pytest.raises(DeviceError, match="bad-block table"):
            drv.read(FW, 2 * EB)


def test_sf_is_probed_again_when_u_boot_forgot_the_chip(spi: Sim) -> None:
    with spi.open() as drv:
        assert "Failed to initialize SPI flash" in drv.command("sf probe 1:0")
        data = random.Random(9).randbytes(4096)
        drv.erase(FW_SPI, 64 * KiB)
        drv.program(FW_SPI, data)
        assert drv.read(FW_SPI, 4096) == data
    assert spi.physical(FW_SPI, 4096) == data
