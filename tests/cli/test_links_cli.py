"""The command line on the programmer and MCU links, as acceptance scripts use it: the
device URI and the image, no profile named (the generic profiles match by link or model)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need
from unbrick.sim.esp_rom import EspRomSim

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UNBRICK_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "unbrick", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_flashrom_dummy_chip_flash_and_backup_to_a_file(tmp_path: Path) -> None:
    need("flashrom")
    chip = tmp_path / "chip.bin"
    chip.write_bytes(b"\xff" * (16 << 20))
    image = tmp_path / "bios.bin"
    image.write_bytes(random.Random(5).randbytes(16 << 20))
    uri = f"flashrom://dummy?emulate=W25Q128FV&image={chip}"
    done = cli(tmp_path / "home", "flash", uri, str(image), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "profile spi-flash" in done.stdout
    assert chip.read_bytes() == image.read_bytes()
    dump = tmp_path / "dump.bin"
    backup = cli(tmp_path / "home", "backup", uri, "-o", str(dump))
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert dump.read_bytes() == image.read_bytes()


def test_flashrom_write_protected_chip_is_refused_untouched(tmp_path: Path) -> None:
    need("flashrom")
    chip = tmp_path / "chip.bin"
    chip.write_bytes(b"\xa5" * (16 << 20))
    image = tmp_path / "bios.bin"
    image.write_bytes(random.Random(7).randbytes(16 << 20))
    uri = f"flashrom://dummy?emulate=W25Q128FV&image={chip}&hwwp=yes&spi_status=0x9c"
    done = cli(tmp_path / "home", "flash", uri, str(image), "--yes")
    assert done.returncode == 3, done.stdout + done.stderr
    # Refused at pre-flight, before any backup is read.
    assert "FAIL device.write_protect" in done.stdout
    assert "backup-read" not in done.stdout
    assert chip.read_bytes() == b"\xa5" * (16 << 20)


def test_esp32_app_flashed_over_its_rom_loader(tmp_path: Path) -> None:
    flash = tmp_path / "esp-flash.bin"
    app = tmp_path / "app.bin"
    app.write_bytes(random.Random(6).randbytes(200_000))
    with EspRomSim(flash) as sim:
        done = cli(tmp_path / "home", "flash", f"esp://{sim.port}", str(app), "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "profile esp32-devkitc" in done.stdout
        assert sim.read_flash(0x10000, len(app.read_bytes())) == app.read_bytes()
