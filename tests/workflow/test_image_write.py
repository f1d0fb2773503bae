"""Links that write a whole image themselves (Capability.IMAGE_WRITE) and cannot read the
device back: a phone-like device with named A/B partitions, in memory.

The engine must plan with the partition the device names, skip the backup it cannot take
(saying why), let the link write and check the image, take the link's check as the
verification, and use the device's slots for the first boot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from unbrick.engine.events import ListSink
from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.store import SQLiteStore
from unbrick.engine.vault import BackupVault
from unbrick.engine.workflow import FlashRequest, IntegrityRequest, Workbench
from unbrick.errors import DeviceError, PreflightError, RolledBack, TransportError, VerifyError
from unbrick.model.identity import DeviceIdentity, StorageInfo
from unbrick.model.profile_toml import ProfileSet
from unbrick.model.uri import DeviceAddress
from unbrick.transports.base import (
    BootReport,
    BootState,
    Capability,
    Device,
    ImageWriteResult,
    WriteTarget,
)

PROFILE = b"""
id = "fake-phone"
name = "A phone in fastboot mode"
family = "phone"
default_region = "boot"

[match]
model = "FakePhone"

[storage]
type = "emmc"
size = "device"
erase_block = "4KiB"

[[region]]
name = "boot_a"
slot = "a"
slot_group = "boot"

[[region]]
name = "boot_b"
slot = "b"
slot_group = "boot"

[[region]]
name = "misc"

[recovery]
instructions = ["Hold volume down while powering on."]
methods = ["fastboot"]

[boot]
success_pattern = "booted slot"
expect_version = false
"""


class FakePhone:
    def __init__(self, address: DeviceAddress, *, verified_by: str = "fastboot OKAY") -> None:
        self.address = address
        self.capabilities = frozenset(
            {
                Capability.IDENTIFY,
                Capability.IMAGE_WRITE,
                Capability.PARTITIONS,
                Capability.REBOOT,
                Capability.BOOT_CONTROL,
            }
        )
        self.max_transfer = 1 << 20
        self.partitions: dict[str, bytes] = {"boot_a": b"old-a", "boot_b": b"", "misc": b""}
        self.sizes = {"boot_a": 65536, "boot_b": 65536, "misc": 4096}
        self.active = "a"
        self.trial: str | None = None
        self.verified_by = verified_by
        self.fail_write = False
        self.boots_good = True
        self.writes: list[WriteTarget] = []

    def identify(self) -> DeviceIdentity:
        extra = {f"partition-size:{k}": hex(v) for k, v in self.sizes.items()}
        return DeviceIdentity(
            model="FakePhone",
            serial="FP0001",
            bootloader_version="1.0",
            storage=StorageInfo(type="emmc", size_bytes=0, erase_block_bytes=4096, page_bytes=1),
            extra=extra,
        )

    def partition_size(self, name: str) -> int | None:
        return self.sizes.get(name)

    def write_image(
        self,
        target: WriteTarget,
        image: Path,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ImageWriteResult:
        if self.fail_write:
            raise TransportError("device disappeared during download")
        data = image.read_bytes()
        self.writes.append(target)
        self.partitions[target.region] = data
        if progress is not None:
            progress(len(data))
        return ImageWriteResult(len(data), verified_by=self.verified_by)

    def boot_state(self) -> BootState:
        return BootState(active_slot=self.active, trial_slot=self.trial)

    def set_trial(self, slot: str) -> None:
        self.trial = slot

    def commit(self, slot: str) -> None:
        self.active, self.trial = slot, None

    def reboot(self, timeout_s: float) -> BootReport:
        slot = self.trial or self.active
        if not self.boots_good and self.trial:
            return BootReport(log="Kernel panic", state="bootloader")
        return BootReport(log=f"booted slot {slot}", state="firmware", booted_slot=slot)

    def enter_recovery(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


class Rig:
    def __init__(self, tmp: Path, phone_kw: dict[str, object] | None = None) -> None:
        self.paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp / "home")}).ensure()
        self.sink = ListSink()
        self.tmp = tmp
        self.phone: FakePhone | None = None
        self.kw = phone_kw or {}

    def open(self, address: DeviceAddress) -> Device:
        if self.phone is None:
            self.phone = FakePhone(address, **self.kw)  # type: ignore[arg-type]
        return self.phone

    def workbench(self) -> Workbench:
        return Workbench(
            store=SQLiteStore(self.paths.db_path),
            vault=BackupVault(self.paths.vault_dir, self.paths.key_file),
            profiles=ProfileSet.from_sources([("test:fake-phone.toml", PROFILE)], []),
            open_device=self.open,
            sink=self.sink,
            workdir=self.paths.state_dir / "work",
        )

    def image(self, data: bytes) -> tuple[Path, IntegrityRequest]:
        path = self.tmp / "boot.img"
        path.write_bytes(data)
        return path, IntegrityRequest(sha256=hashlib.sha256(data).hexdigest())

    def steps(self) -> dict[str, dict[str, object]]:
        return {e.name: dict(e.data) for e in self.sink.events if e.kind == "step-end"}


URI = "fastboot+tcp://127.0.0.1:5554"


def test_the_link_writes_the_inactive_slot_and_its_check_is_the_verification(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    img, integrity = rig.image(b"new boot image" * 100)
    result = rig.workbench().flash(URI, FlashRequest(image=img, integrity=integrity))
    assert result.outcome == "success"
    phone = rig.phone
    assert phone is not None
    assert phone.partitions["boot_b"] == img.read_bytes()
    assert phone.partitions["boot_a"] == b"old-a"
    assert phone.writes == [WriteTarget("boot_b", 0, img.stat().st_size, slot="b")]
    assert phone.active == "b"
    steps = rig.steps()
    assert steps["backup"] == {
        "skipped": "the device cannot send its partitions back (a fastboot bootloader without "
        "'fetch')"
    }
    assert steps["verify"]["method"] == "link (fastboot OKAY)"
    assert steps["write"]["verified_by"] == "fastboot OKAY"
    plan_checks = {c["id"]: c for c in rig.workbench().store.get_job(result.job_id).plan["checks"]}
    assert plan_checks["backup.verified"]["passed"] is True
    assert "cannot send its partitions back" in plan_checks["backup.verified"]["message"]


def test_an_image_larger_than_the_partition_the_device_reports_is_refused(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    img, integrity = rig.image(b"x" * 5000)
    with pytest.raises(PreflightError) as e:
        rig.workbench().flash(URI, FlashRequest(image=img, region="misc", integrity=integrity))
    assert e.value.check_id == "image.size"
    assert rig.phone is not None and rig.phone.writes == []


def test_a_link_that_did_not_check_its_write_fails_verification(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"verified_by": ""})
    img, integrity = rig.image(b"y" * 1000)
    wb = rig.workbench()
    with pytest.raises(VerifyError) as e:
        wb.flash(URI, FlashRequest(image=img, region="misc", integrity=integrity))
    assert "can neither read back nor hash 'misc'" in e.value.message
    assert e.value.hint is not None and "no backup was taken" in e.value.hint
    (job,) = wb.store.list_jobs()
    assert (job.state, job.outcome) == ("failed", "failed")


def test_a_link_that_fails_mid_write_is_a_clean_transport_error(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    img, integrity = rig.image(b"w" * 1000)
    rig.open(DeviceAddress(uri=URI, scheme="fastboot+tcp", protocol="fastboot", link="tcp"))
    assert rig.phone is not None
    rig.phone.fail_write = True
    wb = rig.workbench()
    with pytest.raises(DeviceError) as e:
        wb.flash(URI, FlashRequest(image=img, region="misc", integrity=integrity))
    assert "interrupted in step 'write': device disappeared during download" in e.value.message
    assert rig.phone.partitions["misc"] == b""
    # The device is back: resume writes the whole image again, and the link checks it.
    rig.phone.fail_write = False
    (job,) = wb.store.list_jobs()
    result = wb.resume(job.id)
    assert result.outcome == "success"
    assert rig.phone.partitions["misc"] == img.read_bytes()


def test_a_bad_first_boot_goes_back_to_the_old_slot(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {})
    img, integrity = rig.image(b"z" * 2048)
    wb = rig.workbench()
    rig.open(DeviceAddress(uri=URI, scheme="fastboot+tcp", protocol="fastboot", link="tcp"))
    assert rig.phone is not None
    rig.phone.boots_good = False
    with pytest.raises(RolledBack):
        wb.flash(URI, FlashRequest(image=img, integrity=integrity))
    assert rig.phone.active == "a"
    assert rig.steps()["rollback"]["active_slot"] == "a"
