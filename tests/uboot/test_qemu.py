"""The U-Boot console driver against Debian's real U-Boot in QEMU (see tests/uboot/qemu.py).

Images are small (U-Boot's loadx moves 30-90 KiB/s here) and each machine lives in its own
network namespace. What is checked is what ends up in the disk and flash files after QEMU
exits, what the engine reports, and what the host typed on the console.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.uboot.qemu import qemu_uboot
from unbrick.engine.events import ListSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, IntegrityRequest, Workbench
from unbrick.engine.writer import ImageData, Target, verify_range
from unbrick.errors import DeviceError, TransportError, VerifyError
from unbrick.model.profile_toml import ProfileSet, builtin_profile_sources
from unbrick.model.uri import DeviceAddress, parse_device_uri
from unbrick.transports.base import Capability, Device
from unbrick.transports.uboot import UBootDriver, UBootOptions, open_uboot
from unbrick.transports.uboot.console import ConsoleOptions

pytestmark = [pytest.mark.peer, pytest.mark.slow]

MiB = 1 << 20
FIRMWARE = 0x100000
NOR_FIRMWARE = 0x04040000


def image(tmp: Path, size: int, seed: int, name: str = "fw.bin") -> Path:
    path = tmp / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Bench:
    """A workbench whose device opener keeps the drivers it opened (to read their stats)."""

    def __init__(self, tmp: Path, options: UBootOptions | None = None) -> None:
        self.paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp / "home")}).ensure()
        self.sink = ListSink()
        self.options = options
        self.drivers: list[UBootDriver] = []
        self.store = SQLiteStore(self.paths.db_path)

    def open(self, address: DeviceAddress) -> Device:
        driver = open_uboot(address, timeout_s=20.0, options=self.options)
        self.drivers.append(driver)
        return driver

    def workbench(self) -> Workbench:
        return Workbench(
            store=self.store,
            vault=BackupVault(self.paths.vault_dir, self.paths.key_file),
            profiles=ProfileSet.from_sources(builtin_profile_sources(), []),
            open_device=self.open,
            sink=self.sink,
            workdir=self.paths.state_dir / "work",
        )


def flash(
    bench: Bench, uri: str, img: Path, region: str, profile: str = "qemu-virt-arm64"
) -> object:
    return bench.workbench().flash(
        uri,
        FlashRequest(
            image=img,
            region=region,
            profile_id=profile,
            integrity=IntegrityRequest(sha256=sha256(img)),
            backup_scope="target",
        ),
    )


def cli(*args: str, home: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UNBRICK_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "unbrick", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------


def test_probe_reports_uboot_version_board_and_storage(tmp_path: Path) -> None:
    with qemu_uboot(tmp_path) as q:
        with open_uboot(parse_device_uri(q.uri), timeout_s=20) as dev:
            ident = dev.identify()
            assert Capability.DEVICE_HASH in dev.capabilities
            assert dev.storage_map.describe() == (
                "virtio:0@0x0+0x4000000; nor:0x04000000@0x4000000+0x2000000"
            )
            # Reads: blank flash is recognised without dumping; data is dumped and checked.
            assert dev.read(NOR_FIRMWARE, 0x1000) == b"\xff" * 0x1000
            assert dev.read(0x04000000 - 0x800, 0x1000) == bytes(0x800) + b"\xff" * 0x800
            assert dev.stats.dumps == 0 and dev.stats.fill_hits >= 2
            blank = f"{zlib.crc32(bytes(3 * MiB)):08x}"
            assert dev.device_hash(0x200000, 3 * MiB, "crc32") == blank
        assert q.relay is not None and q.relay.connections == 1
    assert ident.model == "qemu-arm"
    assert ident.bootloader_version is not None
    assert ident.bootloader_version.startswith("2023.01")
    assert ident.extra["board"] == "qemu-arm" and ident.extra["cpu"] == "armv8"
    assert ident.extra["uboot_release"] == "2023.01"
    assert ident.extra["build"] == "64-bit"
    assert ident.storage is not None and ident.storage.size_bytes == 0x06000000
    assert ident.storage.erase_block_bytes == 0x20000


def test_flash_virtio_firmware_partition_verifies_boots_and_persists(tmp_path: Path) -> None:
    img = image(tmp_path, 300 * 1024 + 7, seed=1)  # a partial last block: read-modify-write
    bench = Bench(tmp_path)
    with qemu_uboot(tmp_path) as q:
        # Something after the image in the same 512-byte block must survive.
        disk = tmp_path / "disk.img"
        result = flash(bench, q.uri, img, "firmware")
        assert result.outcome == "success"  # type: ignore[attr-defined]
        assert result.boot.state == "firmware"  # type: ignore[attr-defined]
        assert "Hit any key to stop autoboot" in result.boot.log  # type: ignore[attr-defined]
        drv = bench.drivers[-1]
        assert drv.stats.loads == 2  # 256 KiB + the rest
        assert drv.stats.dumps == 0  # verified by the device's crc32, not by dumps
        steps = {e.name: e.data for e in bench.sink.events if e.kind == "step-end"}
        assert steps["verify"]["method"] == "device-hash"
        assert steps["backup"]["verified_by"] == "device-hash"
        # A fresh session (nothing remembered) confirms the crc32 on the device itself.
        with open_uboot(parse_device_uri(q.uri), timeout_s=20) as dev:
            want = f"{zlib.crc32(img.read_bytes()):08x}"
            assert dev.device_hash(FIRMWARE, img.stat().st_size, "crc32") == want
            # and a few bytes read back through md dumps, cross-checked by crc32
            assert dev.read(FIRMWARE + 1000, 64) == img.read_bytes()[1000:1064]
            assert dev.stats.dumps == 1
            assert (
                dev.device_hash(FIRMWARE + 1000, 64)
                == hashlib.sha256(img.read_bytes()[1000:1064]).hexdigest()
            )
            assert dev.stats.shadow_hits == 1
        assert q.stop() == 0
    data = disk.read_bytes()
    assert data[FIRMWARE : FIRMWARE + img.stat().st_size] == img.read_bytes()
    assert data[:FIRMWARE] == bytes(FIRMWARE)
    assert data[FIRMWARE + img.stat().st_size : FIRMWARE + 2 * MiB] == bytes(
        2 * MiB - img.stat().st_size
    )


def test_flash_nor_catches_the_cp_b_corruption_and_recovers_word_by_word(tmp_path: Path) -> None:
    img = image(tmp_path, 132 * 1024 + 5, seed=2)  # two sectors, odd tail
    bench = Bench(tmp_path)
    with qemu_uboot(tmp_path) as q:
        result = flash(bench, q.uri, img, "nor-firmware")
        drv = bench.drivers[-1]
        assert q.stop() == 0
    assert result.outcome == "success"  # type: ignore[attr-defined]
    # cp.b kept only the first 4 KiB of the sector: the driver saw it and programmed the rest.
    size = img.stat().st_size
    assert drv.stats.nor_mismatches == [(NOR_FIRMWARE + 4096, size - 4096)]
    assert drv.stats.nor_fallbacks == [(NOR_FIRMWARE, size, True)]
    nor = (tmp_path / "nor.img").read_bytes()
    base = NOR_FIRMWARE - 0x04000000
    assert nor[base : base + img.stat().st_size] == img.read_bytes()
    assert nor[base + img.stat().st_size : base + 256 * 1024] == b"\xff" * (
        256 * 1024 - img.stat().st_size
    )


def test_a_bad_nor_write_is_never_reported_as_success(tmp_path: Path) -> None:
    """Without the fallback the cp.b corruption stays: the job ends rolled back (exit 7) with
    the flash as it was, and verification names the bad range."""
    img = image(tmp_path, 40 * 1024, seed=3)
    size = img.stat().st_size
    base = NOR_FIRMWARE - 0x04000000
    with qemu_uboot(tmp_path) as q:
        proc = cli(
            "flash",
            q.uri + "?nor_fallback=off",
            str(img),
            "--profile",
            "qemu-virt-arm64",
            "--partition",
            "nor-firmware",
            "--backup-scope",
            "target",
            "--sha256",
            sha256(img),
            "--yes",
            home=tmp_path / "home",
        )
        assert proc.returncode == 7, proc.stdout + proc.stderr
        assert "did not verify by device-hash" in proc.stdout + proc.stderr
        assert "success" not in proc.stdout
        with open_uboot(parse_device_uri(q.uri + "?nor_fallback=off"), timeout_s=20) as dev:
            # Restored: erased, as before the job.
            assert dev.read(NOR_FIRMWARE, 0x20000) == b"\xff" * 0x20000
            target = Target("nor-firmware", NOR_FIRMWARE, size, 0x20000)
            dev.erase(NOR_FIRMWARE, 0x20000)
            with open(img, "rb") as f:
                dev.program(NOR_FIRMWARE, f.read())
                with pytest.raises(VerifyError, match="did not verify by device-hash") as bad:
                    verify_range(dev, target, ImageData(f, size), rewrite=False)
            assert bad.value.ranges == [(NOR_FIRMWARE, size)]
            assert dev.stats.nor_mismatches == [(NOR_FIRMWARE + 4096, size - 4096)]
            assert dev.stats.nor_fallbacks == []
        assert q.stop() == 0
    nor = (tmp_path / "nor.img").read_bytes()
    assert nor[base : base + 4096] == img.read_bytes()[:4096]
    assert nor[base + 4096 : base + size] == b"\xff" * (size - 4096)


def test_a_console_that_stops_answering_is_a_timeout_naming_the_step(tmp_path: Path) -> None:
    img = image(tmp_path, 64 * 1024, seed=4)
    quick = UBootOptions(
        console=ConsoleOptions(command_timeout_s=2.0, attach_timeout_s=15.0),
        transfer_timeout_s=2.0,
        transfer_retries=1,
    )
    with qemu_uboot(tmp_path) as q:
        assert q.relay is not None
        with open_uboot(parse_device_uri(q.uri), timeout_s=20, options=quick) as dev:
            dev.identify()
            q.relay.stall()
            with pytest.raises(TransportError, match=r"did not answer 'crc32 0x4010000 0x1000'"):
                dev.device_hash(0x04010000, 0x1000, "crc32")
        q.relay.stalled.clear()
        q.relay.stall_on(b"loadx")
        bench = Bench(tmp_path, options=quick)
        with pytest.raises(DeviceError) as cut:
            flash(bench, q.uri, img, "firmware")
    message = cut.value.one_line()
    assert "interrupted in step 'write'" in message
    assert "loadx" in message and "unbrick resume" in message
    assert "virtio write" not in q.relay.host_text()
    assert (tmp_path / "disk.img").read_bytes()[FIRMWARE : FIRMWARE + 4096] == bytes(4096)


def test_a_different_board_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    img = image(tmp_path, 16 * 1024, seed=5)
    env = {"board": "acme-r1", "board_name": "acme-r1", "bootdelay": "2", "cpu": "armv8"}
    with qemu_uboot(tmp_path, nor_env=env) as q:
        proc = cli(
            "flash",
            q.uri,
            str(img),
            "--profile",
            "qemu-virt-arm64",
            "--partition",
            "firmware",
            "--sha256",
            sha256(img),
            "--yes",
            home=tmp_path / "home",
        )
        assert q.relay is not None
        typed = q.relay.host_text()
    assert proc.returncode == 3, proc.stderr
    assert "device does not match profile 'qemu-virt-arm64'" in proc.stderr
    assert "'acme-r1'" in proc.stderr and "nothing was written" not in proc.stdout
    for command in ("loadx", "loady", "write", "erase", "cp.b", "mw."):
        assert command not in typed
    assert (tmp_path / "disk.img").read_bytes() == bytes(64 * MiB)


def test_cli_probe_and_flash_end_to_end(tmp_path: Path) -> None:
    """The acceptance commands, with a manifest sidecar as the image's integrity source."""
    img = image(tmp_path, 200 * 1024, seed=6, name="firmware-1.2.bin")
    manifest = img.with_name(img.name + ".manifest.toml")
    manifest.write_text(
        'format = "unbrick-manifest-1"\nmodel = "qemu-arm"\nversion = "1.2"\n'
        f'sha256 = "{sha256(img)}"\ntarget = "firmware"\n'
    )
    home = tmp_path / "home"
    with qemu_uboot(tmp_path) as q:
        probe = cli("device", "probe", q.uri, "--json", home=home)
        assert probe.returncode == 0, probe.stderr
        done = cli(
            "flash",
            q.uri,
            str(img),
            "--profile",
            "qemu-virt-arm64",
            "--partition",
            "firmware",
            "--yes",
            home=home,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert q.stop() == 0
    shown = json.loads(probe.stdout)
    assert shown["profile"] == "qemu-virt-arm64"
    assert shown["identity"]["model"] == "qemu-arm"
    assert shown["identity"]["bootloader_version"].startswith("2023.01")
    assert shown["identity"]["extra"]["board"] == "qemu-arm"
    assert "success: job" in done.stdout
    disk = (tmp_path / "disk.img").read_bytes()
    assert disk[FIRMWARE : FIRMWARE + img.stat().st_size] == img.read_bytes()


@pytest.mark.parametrize(
    ("arch", "profile", "disk_kw"),
    [("arm", "qemu-virt-arm", {"disk": True}), ("arm64", "qemu-virt-arm64", {"nvme": True})],
    ids=["arm32-virtio", "arm64-nvme"],
)
def test_other_builds_and_disks(
    tmp_path: Path, arch: str, profile: str, disk_kw: dict[str, bool]
) -> None:
    img = image(tmp_path, 48 * 1024 + 100, seed=7)
    bench = Bench(tmp_path)
    kw = {"disk": False, "nvme": False, **disk_kw}
    with qemu_uboot(tmp_path, arch=arch, **kw) as q:
        ident, matched = bench.workbench().probe(q.uri)
        assert matched is not None and matched.id == profile
        result = flash(bench, q.uri, img, "firmware", profile=profile)
        assert result.outcome == "success"  # type: ignore[attr-defined]
        assert q.stop() == 0
    name = "nvme.img" if kw["nvme"] else "disk.img"
    disk = (tmp_path / name).read_bytes()
    assert disk[FIRMWARE : FIRMWARE + img.stat().st_size] == img.read_bytes()
    assert ident.extra["build"] == ("32-bit" if arch == "arm" else "64-bit")
    assert ident.extra["storage_map"].startswith("nvme:0" if kw["nvme"] else "virtio:0")
