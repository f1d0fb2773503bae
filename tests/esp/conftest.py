"""Fixtures of the ESP tests: a simulated ESP32 on a pty, esptool as a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from unbrick.sim.esp_rom import EspRomSim

MiB = 1 << 20


def need_esptool() -> None:
    """esptool (the test extra) drives the simulator; missing: fail in CI, skip locally."""
    if importlib.util.find_spec("esptool") is None:
        msg = "esptool is not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def esptool(
    sim: EspRomSim, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real esptool against the simulator (its port first)."""
    need_esptool()
    return subprocess.run(
        [sys.executable, "-m", "esptool", "--port", sim.port, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """esptool's stdout; the test fails with its output when it did not exit 0."""
    if proc.returncode != 0:
        pytest.fail(f"esptool exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def fill_flash(path: Path, data: bytes, offset: int = 0, size: int = 4 * MiB) -> None:
    """Create the flash file the simulator will use: erased, with ``data`` at ``offset``."""
    image = bytearray(b"\xff" * size)
    image[offset : offset + len(data)] = data
    path.write_bytes(bytes(image))


@pytest.fixture
def flash_path(tmp_path: Path) -> Path:
    return tmp_path / "flash.bin"


@pytest.fixture
def sim(flash_path: Path) -> Iterator[EspRomSim]:
    with EspRomSim(flash_path) as s:
        yield s
