"""The real esptool against the simulated ESP32: the simulator is checked by esptool itself."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.esp.conftest import MiB, esptool, fill_flash, ok
from unbrick.sim.esp_rom import EspChip, EspFaults, EspRomSim

pytestmark = pytest.mark.peer


def compressible(size: int) -> bytes:
    """Firmware-like data: repetitive with some noise (zlib shrinks it a lot)."""
    base = (bytes(range(256)) * (size // 256 + 1))[:size]
    noise = os.urandom(size // 64)
    return noise + base[len(noise) :]


def test_chip_id_and_read_mac(sim: EspRomSim) -> None:
    proc = esptool(sim, "chip-id")
    out = ok(proc)
    assert "Detecting chip type... ESP32" in out
    assert "Chip type:          ESP32-D0WD-V3 (revision v3.0)" in out
    assert "Crystal frequency:  40MHz" in out
    assert "Stub flasher running." in out
    assert "ESP32 has no chip ID. Reading MAC address instead." in proc.stderr
    out = ok(esptool(sim, "read-mac"))
    assert "MAC:                24:0a:c4:a1:b2:c3" in out
    assert sim.stats.stub_starts == 2
    assert sim.stats.commands["MEM_END"] == 2


def test_flash_id(sim: EspRomSim) -> None:
    out = ok(esptool(sim, "flash-id"))
    assert "Manufacturer: ef" in out
    assert "Device: 4016" in out
    assert "Detected flash size: 4MB" in out
    assert sim.stats.commands["WRITE_REG"] > 0  # the SPI controller's user-command sequence


@pytest.mark.parametrize(
    ("options", "command"),
    [
        ((), "FLASH_DEFL_DATA"),
        (("--no-compress",), "FLASH_DATA"),
    ],
)
def test_write_flash_with_the_stub(
    sim: EspRomSim, flash_path: Path, tmp_path: Path, options: tuple[str, ...], command: str
) -> None:
    image = compressible(150_000)
    (tmp_path / "app.bin").write_bytes(image)
    out = ok(
        esptool(
            sim, "--baud", "921600", "write-flash", *options, "0x10000", "app.bin", cwd=tmp_path
        )
    )
    assert "Hash of data verified." in out
    flash = flash_path.read_bytes()
    assert flash[0x10000 : 0x10000 + len(image)] == image
    # The stub erased whole sectors: the rest of the last one is blank, the next untouched.
    end = 0x10000 + len(image)
    assert flash[end : -(-end // 4096) * 4096] == b"\xff" * (-end % 4096)
    assert sim.stats.commands[command] > 0
    assert sim.stats.commands["CHANGE_BAUDRATE"] == 1


@pytest.mark.parametrize("compress", ["--compress", "--no-compress"])
def test_write_flash_through_the_rom_loader(
    sim: EspRomSim, flash_path: Path, tmp_path: Path, compress: str
) -> None:
    image = compressible(40_000)
    (tmp_path / "app.bin").write_bytes(image)
    out = ok(esptool(sim, "--no-stub", "write-flash", compress, "0x20000", "app.bin", cwd=tmp_path))
    assert "Hash of data verified." in out
    assert flash_path.read_bytes()[0x20000 : 0x20000 + len(image)] == image
    assert sim.stats.stub_starts == 0
    assert sim.stats.commands["SPI_ATTACH"] == 1
    used = "FLASH_DEFL_DATA" if compress == "--compress" else "FLASH_DATA"
    assert sim.stats.commands[used] > 0


def test_verify_flash(sim: EspRomSim, flash_path: Path, tmp_path: Path) -> None:
    image = compressible(20_000)
    (tmp_path / "app.bin").write_bytes(image)
    ok(esptool(sim, "write-flash", "0x8000", "app.bin", cwd=tmp_path))
    out = ok(esptool(sim, "verify-flash", "0x8000", "app.bin", cwd=tmp_path))
    assert "Verification successful (digest matched)." in out
    # A bit flips in the flash itself: the chip's MD5 no longer matches.
    with flash_path.open("r+b") as f:
        f.seek(0x8000 + 1234)
        f.write(bytes([image[1234] ^ 0x01]))
    bad = esptool(sim, "verify-flash", "--diff", "0x8000", "app.bin", cwd=tmp_path)
    assert bad.returncode != 0
    assert "Verification failed" in bad.stdout + bad.stderr
    assert f"0x{0x8000 + 1234:08x}" in bad.stdout


def test_read_flash(sim: EspRomSim, flash_path: Path, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    sim.flash.program(0x30000, data)
    ok(
        esptool(
            sim,
            "--baud",
            "460800",
            "read-flash",
            "0x30000",
            str(len(data)),
            "out.bin",
            cwd=tmp_path,
        )
    )
    assert (tmp_path / "out.bin").read_bytes() == data
    assert sim.stats.commands["READ_FLASH"] == 1
    # The ROM loader's slow read, 64 bytes per command.
    ok(esptool(sim, "--no-stub", "read-flash", "0x30000", "1000", "rom.bin", cwd=tmp_path))
    assert (tmp_path / "rom.bin").read_bytes() == data[:1000]
    assert sim.stats.commands["READ_FLASH_SLOW"] == 16


def test_erase_region(flash_path: Path) -> None:
    data = os.urandom(3 * 4096)
    fill_flash(flash_path, data, offset=0x40000)
    with EspRomSim(flash_path) as sim:
        ok(esptool(sim, "erase-region", "0x41000", "0x1000"))
    flash = flash_path.read_bytes()
    assert flash[0x40000:0x41000] == data[:4096]
    assert flash[0x41000:0x42000] == b"\xff" * 4096
    assert flash[0x42000:0x43000] == data[8192:]


def test_erase_flash(sim: EspRomSim, flash_path: Path) -> None:
    sim.flash.program(0x123000, b"data")
    ok(esptool(sim, "erase-flash"))
    assert flash_path.read_bytes() == b"\xff" * (4 * MiB)


def test_not_in_download_mode(flash_path: Path) -> None:
    with EspRomSim(flash_path, faults=EspFaults(no_sync=True)) as sim:
        proc = esptool(sim, "--connect-attempts", "1", "chip-id")
    assert proc.returncode == 2
    assert "Failed to connect" in proc.stdout + proc.stderr
    assert "No serial data received" in proc.stdout + proc.stderr


def test_corrupted_write_is_caught_by_esptools_md5(flash_path: Path, tmp_path: Path) -> None:
    image = compressible(30_000)
    (tmp_path / "app.bin").write_bytes(image)
    with EspRomSim(flash_path, faults=EspFaults(corrupt_writes=-1)) as sim:
        proc = esptool(sim, "write-flash", "0x10000", "app.bin", cwd=tmp_path)
        assert sim.stats.corrupted_at
    assert proc.returncode == 2
    assert "MD5 of file does not match data in flash!" in proc.stdout + proc.stderr
    assert hashlib.md5(flash_path.read_bytes()[0x10000 : 0x10000 + len(image)]).digest() != (
        hashlib.md5(image).digest()
    )


def test_an_esp8266(flash_path: Path, tmp_path: Path) -> None:
    image = compressible(60_000)
    (tmp_path / "fw.bin").write_bytes(image)
    with EspRomSim(flash_path, chip=EspChip(model="esp8266")) as sim:
        out = ok(esptool(sim, "chip-id"))
        assert "Chip type:          ESP8266EX" in out
        assert "Crystal frequency:  26MHz" in out
        assert "Chip ID: 0x00a1b2c3" in out
        assert "Detected flash size: 4MB" in ok(esptool(sim, "flash-id"))
        # Through the stub (compressed), then through the ROM loader, which has no compressed
        # writes, no MD5 and the FLASH_BEGIN erase bug esptool works around.
        ok(esptool(sim, "--baud", "460800", "write-flash", "0x0", "fw.bin", cwd=tmp_path))
        ok(esptool(sim, "--no-stub", "write-flash", "0x43000", "fw.bin", cwd=tmp_path))
        out = ok(esptool(sim, "verify-flash", "0x0", "fw.bin", "0x43000", "fw.bin", cwd=tmp_path))
        assert out.count("Verification successful (digest matched).") == 2
        assert sim.stats.commands["FLASH_DEFL_DATA"] > 0
        assert sim.stats.commands["FLASH_DATA"] > 0
    flash = flash_path.read_bytes()
    assert flash[: len(image)] == image
    assert flash[0x43000 : 0x43000 + len(image)] == image
