"""The esp:// driver (esptool's Python API) against the simulated ESP32."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.esp.conftest import MiB, fill_flash, need_esptool
from unbrick.engine.backup import take_backup
from unbrick.engine.events import ListSink
from unbrick.engine.vault import BackupVault
from unbrick.engine.writer import ImageData, Target, verify_range, write_range
from unbrick.errors import DeviceError, TransportError, UsageError, VerifyError
from unbrick.model.uri import parse_device_uri
from unbrick.sim.esp_rom import EspChip, EspFaults, EspRomSim
from unbrick.transports.base import (
    Capability,
    DeviceHash,
    FlashErase,
    FlashRead,
    FlashWrite,
    Identify,
    Reboot,
)
from unbrick.transports.esp import EspDriver, EspOptions, open_esp

pytestmark = pytest.mark.peer


def open_sim(sim: EspRomSim, query: str = "") -> EspDriver:
    need_esptool()
    sep = "&" if query else ""
    return open_esp(parse_device_uri(f"esp://{sim.port}?boot_log=0.2{sep}{query}"))


@pytest.fixture
def driver(sim: EspRomSim) -> Iterator[EspDriver]:
    d = open_sim(sim)
    yield d
    d.close()


def test_identify(driver: EspDriver, sim: EspRomSim) -> None:
    ident = driver.identify()
    assert ident.model == "ESP32"
    assert ident.serial == "24:0a:c4:a1:b2:c3"
    assert ident.hw_revision == "v3.0"
    assert ident.storage is not None
    assert (ident.storage.type, ident.storage.size_bytes) == ("spi-nor", 4 * MiB)
    assert ident.storage.erase_block_bytes == 4096
    assert ident.extra["chip"] == "ESP32-D0WD-V3 (revision v3.0)"
    assert ident.extra["flash_id"] == "0x1640ef"
    assert ident.extra["flash_size"] == "4MB"
    assert ident.extra["crystal_mhz"] == "40"
    assert ident.extra["flash_encryption"] == "no"
    assert "Dual Core" in ident.extra["features"]
    assert sim.stats.stub_starts == 1
    assert sim.stats.commands["CHANGE_BAUDRATE"] == 1  # 115200 -> 460800


def test_an_esp8266(flash_path: Path) -> None:
    with EspRomSim(flash_path, chip=EspChip(model="esp8266")) as sim:
        d = open_sim(sim, "chip=esp8266")
        try:
            ident = d.identify()
            assert (ident.model, ident.serial, ident.hw_revision) == (
                "ESP8266",
                "24:0a:c4:a1:b2:c3",
                None,
            )
            assert ident.extra["chip"] == "ESP8266EX"
            assert ident.extra["crystal_mhz"] == "26"
            image = b"esp8266!" * 3000
            d.erase(0, 0x6000)
            d.program(0, image)
            assert d.read(0, len(image)) == image
            assert d.device_hash(0, len(image)) == hashlib.sha256(image).hexdigest()
        finally:
            d.close()


def test_driver_implements_its_capabilities(driver: EspDriver) -> None:
    for proto in (Identify, FlashRead, FlashErase, FlashWrite, DeviceHash, Reboot):
        assert isinstance(driver, proto)
    assert driver.capabilities == {
        Capability.IDENTIFY,
        Capability.READ,
        Capability.ERASE,
        Capability.WRITE,
        Capability.DEVICE_HASH,
        Capability.REBOOT,
    }
    assert driver.hash_algorithms == ("md5", "sha256")


def test_backup_read(flash_path: Path) -> None:
    content = os.urandom(300_000)
    fill_flash(flash_path, content, offset=0x1000)
    with EspRomSim(flash_path) as sim:
        d = open_sim(sim, "max_transfer=65536")
        try:
            got = b"".join(
                d.read(0x1000 + pos, min(d.max_transfer, len(content) - pos))
                for pos in range(0, len(content), d.max_transfer)
            )
        finally:
            d.close()
        assert got == content
        assert sim.stats.commands["READ_FLASH"] == 5


def test_erase_program_and_verify(driver: EspDriver, sim: EspRomSim, flash_path: Path) -> None:
    old = os.urandom(8192)
    sim.flash.program(0x52000, old)
    image = (b"firmware" * 9000)[:70_000]
    driver.erase(0x40000, 0x12000)
    assert sim.read_flash(0x40000, 0x12000) == b"\xff" * 0x12000
    driver.program(0x40000, image)
    flash = flash_path.read_bytes()
    assert flash[0x40000 : 0x40000 + len(image)] == image
    assert flash[0x52000:0x54000] == old  # beyond the written sectors: untouched
    assert sim.stats.commands["FLASH_DEFL_DATA"] > 0  # compressed through the stub
    assert driver.device_hash(0x40000, len(image), "md5") == hashlib.md5(image).hexdigest()
    assert driver.device_hash(0x40000, len(image), "sha256") == hashlib.sha256(image).hexdigest()
    assert driver.device_hash(0, 0, "md5") == hashlib.md5(b"").hexdigest()


def test_uncompressed_writes(sim: EspRomSim) -> None:
    d = open_sim(sim, "compress=0")
    try:
        d.program(0x1000, b"boot" * 1000)
    finally:
        d.close()
    assert sim.read_flash(0x1000, 4000) == b"boot" * 1000
    assert sim.stats.commands["FLASH_DATA"] > 0
    assert sim.stats.commands["FLASH_DEFL_DATA"] == 0


def test_the_rom_loader_without_the_stub(sim: EspRomSim) -> None:
    d = open_sim(sim, "stub=0&baud=115200")
    try:
        assert d.identify().extra["loader"] == "rom"
        d.erase(0x3000, 0x1000)
        d.program(0x3000, b"rom!" * 100)
        assert d.read(0x3000, 400) == b"rom!" * 100
        assert d.device_hash(0x3000, 400, "md5") == hashlib.md5(b"rom!" * 100).hexdigest()
    finally:
        d.close()
    assert sim.stats.stub_starts == 0
    assert sim.stats.commands["READ_FLASH_SLOW"] == 7


def test_engine_writes_and_verifies_through_the_driver(driver: EspDriver, sim: EspRomSim) -> None:
    image = os.urandom(40_000) + b"\x00" * 400_000
    target = Target("app", 0x10000, len(image), 4096)
    data = ImageData(io.BytesIO(image), len(image))
    write_range(driver, target, data)
    assert sim.read_flash(0x10000, len(image)) == image
    assert verify_range(driver, target, data, rewrite=False) == "device-hash"
    # The verify cost one MD5 on the chip per range: nothing was read back.
    assert sim.stats.commands["READ_FLASH"] == 0
    assert driver.stats.known_hits == 2  # two 256 KiB verify ranges


def test_sha256_follows_the_flash_not_the_session(driver: EspDriver, sim: EspRomSim) -> None:
    data = driver.read(0x8000, 8192)
    assert driver.device_hash(0x8000, 8192) == hashlib.sha256(data).hexdigest()
    assert sim.stats.commands["READ_FLASH"] == 1
    # Something else changes the flash behind the driver's back (the firmware, a bad cell).
    sim.flash.program(0x9000, b"\x00" * 16)
    changed = sim.read_flash(0x8000, 8192)
    assert driver.device_hash(0x8000, 8192) == hashlib.sha256(changed).hexdigest()
    assert sim.stats.commands["READ_FLASH"] == 2  # the chip's MD5 disagreed: read back


def test_a_corrupted_write_is_retried_once(flash_path: Path) -> None:
    image = b"app." * 5000
    with EspRomSim(flash_path, faults=EspFaults(corrupt_writes=1)) as sim:
        d = open_sim(sim)
        try:
            d.program(0x20000, image)
        finally:
            d.close()
        assert len(sim.stats.corrupted_at) == 1
        assert sim.read_flash(0x20000, len(image)) == image


def test_a_write_that_stays_corrupt_is_a_verify_error(flash_path: Path) -> None:
    image = b"app." * 5000
    with EspRomSim(flash_path, faults=EspFaults(corrupt_writes=-1)) as sim:
        d = open_sim(sim)
        try:
            with pytest.raises(VerifyError, match="MD5") as err:
                d.program(0x20000, image)
            assert err.value.ranges == [(0x20000, len(image))]
            # The engine's verify sees it too: the chip's MD5 differs from the image's.
            assert d.device_hash(0x20000, len(image), "md5") != hashlib.md5(image).hexdigest()
        finally:
            d.close()
        assert len(sim.stats.corrupted_at) == 2


def test_reboot_resets_and_the_next_call_reconnects(driver: EspDriver, sim: EspRomSim) -> None:
    report = driver.reboot(timeout_s=30)
    assert report.state == "firmware"
    assert report.log == ""  # a pty carries no RTS: the simulated chip did not restart
    deadline = time.monotonic() + 2
    while sim.host_connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.state == "rom"  # the port was closed (reset_on_close)
    assert driver.identify().model == "ESP32"
    assert sim.stats.stub_starts == 2


def test_reboot_without_a_session_pulses_the_port(sim: EspRomSim) -> None:
    need_esptool()
    d = EspDriver(parse_device_uri(f"esp://{sim.port}?boot_log=0.1"), EspOptions(boot_log_s=0.1))
    try:
        assert d.reboot(timeout_s=5).state == "firmware"
        d.enter_recovery(timeout_s=10)
        assert d.identify().model == "ESP32"
    finally:
        d.close()


def test_a_board_that_goes_away_is_a_transport_error(sim: EspRomSim) -> None:
    d = open_sim(sim)
    try:
        assert d.read(0, 16) == b"\xff" * 16
        sim.stop()  # unplugged: the port is gone
        with pytest.raises(TransportError, match="read 0x0\\+0x10 on") as err:
            d.read(0, 16)
        assert "resume" in err.value.hint
        assert not d.connected  # the session is closed; the next call reconnects
    finally:
        d.close()


def test_no_sync_gives_the_download_mode_hint(flash_path: Path) -> None:
    with EspRomSim(flash_path, faults=EspFaults(no_sync=True)) as sim:
        start = time.monotonic()
        with pytest.raises(TransportError, match="no answer from the ESP bootloader") as err:
            open_sim(sim, "connect_attempts=1")
        assert time.monotonic() - start < 5
    hint = err.value.hint
    assert "BOOT (GPIO0)" in hint and "EN" in hint
    assert "baud" in hint
    assert "USB cable" in hint and "power" in hint


def test_a_missing_port_names_the_usual_causes(tmp_path: Path) -> None:
    need_esptool()
    with pytest.raises(TransportError, match="cannot open") as err:
        open_esp(parse_device_uri(f"esp://{tmp_path}/ttyUSB9?connect_attempts=1"))
    assert "dialout" in err.value.hint


def test_the_wrong_chip_is_refused(sim: EspRomSim) -> None:
    with pytest.raises(DeviceError, match="is an ESP32, not esp32s3"):
        open_sim(sim, "chip=esp32s3")
    d = open_sim(sim, "chip=esp32")
    d.close()


def test_bad_ranges_and_alignment(driver: EspDriver) -> None:
    with pytest.raises(UsageError, match="4 KiB sector"):
        driver.program(0x1001, b"x")
    with pytest.raises(UsageError, match="whole 4 KiB sectors"):
        driver.erase(0x1000, 100)
    with pytest.raises(UsageError, match="outside the 4MB flash"):
        driver.read(4 * MiB - 10, 20)
    with pytest.raises(UsageError, match="cannot hash with 'crc32'"):
        driver.device_hash(0, 16, "crc32")


def test_flash_size_override(sim: EspRomSim) -> None:
    d = open_sim(sim, "flash_size=2MB")
    try:
        assert d.identify().storage.size_bytes == 2 * MiB  # type: ignore[union-attr]
        with pytest.raises(UsageError, match="2MB flash"):
            d.read(3 * MiB, 16)
    finally:
        d.close()


def test_the_engine_backs_up_the_whole_flash(tmp_path: Path, flash_path: Path) -> None:
    content = os.urandom(100_000) + b"\x00" * 300_000
    fill_flash(flash_path, content, size=MiB // 2)
    with EspRomSim(flash_path, flash_size_bytes=MiB // 2) as sim:
        d = open_sim(sim, "max_transfer=0x20000")
        try:
            vault = BackupVault(tmp_path / "vault", tmp_path / "vault.key")
            record = take_backup(
                d, None, vault=vault, identity=d.identify(), progress=None, sink=ListSink()
            )
        finally:
            d.close()
        # Each window was read once and confirmed by the chip's MD5, not read twice.
        assert sim.stats.commands["READ_FLASH"] == 4
        assert d.stats.known_hits >= 1
    assert record.meta["verified_by"] == "device-hash"
    assert b"".join(vault.open(record.id)) == flash_path.read_bytes()
