"""The engine's flash and backup jobs on a flashrom dummy chip, through the FlashromDriver.

The Workbench gets ``open_flashrom`` as its device opener (what the registry will hand it for
``flashrom://``) and a profile for the emulated W25Q128FV written here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import need
from unbrick.engine.events import ListSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, Workbench
from unbrick.errors import PreflightError
from unbrick.model.profile_toml import ProfileSet
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import Device
from unbrick.transports.flashrom import FlashromOptions, open_flashrom

pytestmark = pytest.mark.peer

MiB = 1 << 20

PROFILE = b"""
id = "w25q128-chip"
name = "Winbond W25Q128 SPI NOR on a flashrom programmer, whole chip"
family = "other"
default_region = "flash"
verify = "read-back"

[match]
model = "W25Q128.V"

[storage]
type = "spi-nor"
size = "16MiB"
erase_block = "4KiB"

[[region]]
name = "flash"
offset = 0
size = "rest"
kind = "firmware"

[recovery]
instructions = ["Clip the programmer onto the chip with the board powered off."]
wait_s = 5
"""


def workbench(tmp_path: Path) -> tuple[Workbench, SQLiteStore]:
    paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp_path / "home")})
    paths.ensure()
    store = SQLiteStore(paths.db_path)

    def opener(address: DeviceAddress) -> Device:
        return open_flashrom(address, options=FlashromOptions(workdir=tmp_path / "work"))

    wb = Workbench(
        store=store,
        vault=BackupVault(paths.vault_dir, paths.key_file),
        profiles=ProfileSet.from_sources([], [("test:w25q128.toml", PROFILE)]),
        open_device=opener,
        sink=ListSink(),
        workdir=paths.state_dir / "work",
    )
    return wb, store


@pytest.mark.slow
def test_flash_then_backup_through_the_workbench(tmp_path: Path) -> None:
    need("flashrom")
    chip = tmp_path / "chip.bin"
    old = random.Random(1).randbytes(16 * MiB)
    chip.write_bytes(old)
    new = random.Random(2).randbytes(16 * MiB)
    image = tmp_path / "new.bin"
    image.write_bytes(new)
    uri = f"flashrom://dummy?emulate=W25Q128FV&image={chip}"
    wb, store = workbench(tmp_path)
    try:
        result = wb.flash(uri, FlashRequest(image=image))
        assert (result.state.value, result.outcome) == ("done", "success")
        assert chip.read_bytes() == new
        # the verified backup taken before writing holds the old chip
        assert result.backup_id is not None
        assert b"".join(wb.vault.open(result.backup_id)) == old
        backup = wb.backup(uri)
        assert backup.backup_id is not None
        assert b"".join(wb.vault.open(backup.backup_id)) == new
    finally:
        store.close()


def test_write_protected_chip_is_refused_by_the_workbench(tmp_path: Path) -> None:
    need("flashrom")
    chip = tmp_path / "chip.bin"
    old = random.Random(3).randbytes(16 * MiB)
    chip.write_bytes(old)
    image = tmp_path / "new.bin"
    image.write_bytes(random.Random(4).randbytes(16 * MiB))
    uri = f"flashrom://dummy?emulate=W25Q128FV&image={chip}&hwwp=yes&spi_status=0x9c"
    wb, store = workbench(tmp_path)
    try:
        with pytest.raises(PreflightError) as e:
            wb.flash(uri, FlashRequest(image=image))
        # Refused at pre-flight from the reported protection (before any backup is read); the
        # driver's own refusal (spi.write_protect) stays behind it for a chip protected later.
        assert e.value.check_id == "device.write_protect"
        (job,) = store.list_jobs()
        assert job.state == "refused" and "backup_id" not in job.data
        assert chip.read_bytes() == old
    finally:
        store.close()
