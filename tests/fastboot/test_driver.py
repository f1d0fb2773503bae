"""FastbootDriver against the simulated phone: identify, partitions, lock, slots, update.zip."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.fastboot.conftest import MiB, Served, ServeFactory, padded, random_image, to_sparse
from unbrick.errors import DeviceError, ImageError, PreflightError, TransportError, UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.sim.fastboot_phone import PhoneFaults
from unbrick.transports.base import BootControl, Capability, Identify, Reboot
from unbrick.transports.fastboot.client import RebootTarget
from unbrick.transports.fastboot.driver import FastbootDriver, open_fastboot

LINKS = pytest.mark.parametrize("link", ["tcp", "udp"])


@contextmanager
def driver(served: Served, link: str = "tcp", **kw: object) -> Iterator[FastbootDriver]:
    drv = open_fastboot(parse_device_uri(served.url(link)), timeout_s=5.0, **kw)  # type: ignore[arg-type]
    try:
        yield drv
    finally:
        drv.close()


@LINKS
def test_identify(phone: Served, link: str) -> None:
    with driver(phone, link) as drv:
        assert isinstance(drv, Identify) and isinstance(drv, Reboot)
        assert isinstance(drv, BootControl)
        assert Capability.BOOT_CONTROL in drv.capabilities
        ident = drv.identify()
        assert (ident.model, ident.serial) == ("unbrick-phone", "UNBRICK0001")
        assert ident.bootloader_version == "unbrick-bl-1.0"
        assert ident.hw_revision == "rev1"
        for key, value in {
            "secure": "yes",
            "unlocked": "yes",
            "slot-count": "2",
            "current-slot": "a",
            "max-download-size": "0x10000000",
        }.items():
            assert ident.extra[key] == value
        assert not any(":" in key for key in ident.extra)


@LINKS
def test_flash_partition_with_slots(phone: Served, link: str, tmp_path: Path) -> None:
    boot = random_image(tmp_path / "boot.img", 1 * MiB + 4096)
    with driver(phone, link) as drv:
        assert drv.resolve_partition("boot") == "boot_a"
        assert drv.resolve_partition("boot", "b") == "boot_b"
        assert drv.resolve_partition("boot", "other") == "boot_b"
        assert drv.resolve_partition("misc") == "misc"
        assert drv.partition_size("system") == 16 * MiB
        assert drv.partition_size("boot_b") == 4 * MiB
        done: list[int] = []
        report = drv.flash_partition("boot", tmp_path / "boot.img", progress=done.append)
        assert report.partition == "boot_a" and sum(done) == len(boot)
        drv.flash_partition("boot", io.BytesIO(boot[:8192]), slot="_b")
        drv.flash_partition("misc", b"\x01" * 4096)
    assert phone.part("boot_a") == padded(boot, 4 * MiB)
    assert phone.part("boot_b") == padded(boot[:8192], 4 * MiB)
    assert phone.part("misc")[:4096] == b"\x01" * 4096


def test_partition_refusals(phone: Served, tmp_path: Path) -> None:
    with driver(phone) as drv:
        with pytest.raises(PreflightError) as e:
            drv.flash_partition("recovery", b"x" * 4096)
        assert e.value.check_id == "partition-exists"
        with pytest.raises(PreflightError) as e:
            drv.flash_partition("vbmeta", bytes(128 * 1024))
        assert e.value.check_id == "partition-size"
        raw = random_image(tmp_path / "big.raw", 20 * MiB, data_every=4 * MiB)
        to_sparse(tmp_path / "big.raw", tmp_path / "big.simg")
        assert len(raw) > 16 * MiB
        with pytest.raises(PreflightError, match="needs 20971520 bytes") as e:
            drv.flash_partition("system", tmp_path / "big.simg")
        assert e.value.check_id == "partition-size"
        with pytest.raises(UsageError, match="no A/B slots"):
            drv.flash_partition("misc", b"x" * 4096, slot="a")
        with pytest.raises(UsageError, match="not one of the device's slots"):
            drv.flash_partition("boot", b"x" * 4096, slot="c")
        for bad in ("", "boot a", "boot:a"):
            with pytest.raises(UsageError):
                drv.resolve_partition(bad)
    assert phone.part("vbmeta_a") == bytes(64 * 1024)
    assert phone.part("system_a") == bytes(16 * MiB)


@LINKS
def test_locked_bootloader_refused(serve: ServeFactory, link: str) -> None:
    served = serve(unlocked=False)
    with driver(served, link) as drv:
        assert drv.identify().extra["unlocked"] == "no"
        for attempt in (
            lambda: drv.flash_partition("boot", b"x" * 4096),
            lambda: drv.erase_partition("userdata"),
            lambda: drv.set_active("b"),
        ):
            with pytest.raises(PreflightError) as e:
                attempt()
            assert e.value.check_id == "bootloader-unlocked"
            assert not e.value.overridable
            assert "is locked" in e.value.message
            assert "fastboot flashing unlock" in e.value.hint
            assert "never unlocks" in e.value.hint
    assert served.part("boot_a") == bytes(4 * MiB)
    assert served.phone.state.current_slot == "a"
    assert not served.phone.state.unlocked


def test_locked_bootloader_found_by_its_fail(serve: ServeFactory) -> None:
    """A bootloader that does not answer 'unlocked' is found locked by its FAIL text."""
    served = serve(unlocked=False)
    with driver(served) as drv:
        drv._vars = {}
        drv._answers["unlocked"] = None
        with pytest.raises(PreflightError) as e:
            drv.flash_partition("boot", b"x" * 4096)
        assert e.value.check_id == "bootloader-unlocked"
        with pytest.raises(PreflightError):
            drv.erase_partition("boot")
    assert served.part("boot_a") == bytes(4 * MiB)


@LINKS
def test_read_partition(phone: Served, link: str, tmp_path: Path) -> None:
    data = random_image(tmp_path / "boot.img", 4 * MiB)
    phone.phone.state.max_fetch_size = 1 * MiB
    with driver(phone, link) as drv:
        drv.flash_partition("boot", tmp_path / "boot.img")
        assert drv.can_read
        out = io.BytesIO()
        assert drv.read_partition("boot", out) == 4 * MiB
        assert out.getvalue() == data
        part = io.BytesIO()
        drv.read_partition("boot", part, offset=100, size=1000)
        assert part.getvalue() == data[100:1100]
        with pytest.raises(UsageError):
            drv.read_partition("boot", part, offset=4 * MiB, size=1)


def test_no_fetch(serve: ServeFactory) -> None:
    served = serve(faults=PhoneFaults(no_fetch=True))
    with driver(served) as drv:
        assert not drv.can_read
        with pytest.raises(DeviceError, match="cannot read partitions back"):
            drv.read_partition("boot", io.BytesIO())


@LINKS
def test_slots_reboot_and_recovery(phone: Served, link: str) -> None:
    with driver(phone, link) as drv:
        state = drv.boot_state()
        assert (state.active_slot, state.trial_slot) == ("a", None)
        assert state.extra["slot-successful:a"] == "yes"
        drv.set_trial("b")
        state = drv.boot_state()
        assert (state.active_slot, state.trial_slot) == ("b", "b")
        assert state.extra["slot-retry-count:b"] == "7"
        report = drv.reboot(30.0)
        assert (report.state, report.booted_slot) == ("firmware", "b")
        assert phone.phone.state.boots[-1] == {"target": "system", "slot": "b"}
        drv.enter_recovery(5.0)
        assert drv.boot_state().extra["slot-successful:b"] == "yes"
        drv.commit("b")
        drv.commit("a")
        assert drv.getvar("current-slot") == "a"
        drv.reboot_to(RebootTarget.BOOTLOADER, wait_s=5.0)
        assert phone.phone.state.boots[-1]["target"] == "bootloader"
        assert drv.getvar("product") == "unbrick-phone"
        drv.enter_recovery(1.0)


def test_enter_recovery_gives_up(phone: Served) -> None:
    with driver(phone) as drv:
        drv.reboot(1.0)
        phone.server.stop()
        with pytest.raises(TransportError, match="did not come back in fastboot mode") as e:
            drv.enter_recovery(0.5)
        assert "Volume Down" in e.value.hint


def test_oem_allow_list_of_the_profile(phone: Served) -> None:
    with driver(phone, oem_allow=("device-info",)) as drv:
        assert "Current slot: a" in drv.oem("device-info").info
        with pytest.raises(UsageError):
            drv.oem("stage-log")


def test_uri_parameters(phone: Served) -> None:
    uri = f"fastboot+udp://127.0.0.1:{phone.port}?packet=1024&timeout=5&wait=2"
    drv = open_fastboot(parse_device_uri(uri))
    try:
        assert drv.options.udp_max_packet == 1024
        assert drv.options.client.command_timeout_s == 5
        link = drv.client.link
        assert link.max_packet == 1024  # type: ignore[attr-defined]
        drv.flash_partition("boot", b"\x07" * 9000)
    finally:
        drv.close()
    assert phone.part("boot_a")[:9000] == b"\x07" * 9000
    with pytest.raises(UsageError):
        open_fastboot(parse_device_uri(f"fastboot+udp://127.0.0.1:{phone.port}?packet=100"))
    with pytest.raises(UsageError):
        open_fastboot(parse_device_uri("sim://x"))


# ---------------------------------------------------------------------------------------------
# update.zip


def package(
    path: Path,
    info: str | None,
    images: dict[str, bytes | Path],
    fastboot_info: str | None = None,
) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if info is not None:
            zf.writestr("android-info.txt", info)
        if fastboot_info is not None:
            zf.writestr("fastboot-info.txt", fastboot_info)
        for name, data in images.items():
            if isinstance(data, Path):
                zf.write(data, name)
            else:
                zf.writestr(name, data)
    return path


@LINKS
def test_update_checked_then_flashed(serve: ServeFactory, link: str, tmp_path: Path) -> None:
    served = serve(max_download_size=1 * MiB)
    boot = random_image(tmp_path / "boot.img", 2 * MiB, seed=5)
    system = random_image(tmp_path / "system.raw", 16 * MiB, data_every=2 * MiB, seed=6)
    to_sparse(tmp_path / "system.raw", tmp_path / "system.simg")
    images: dict[str, bytes | Path] = {
        "boot.img": boot,
        "system.img": tmp_path / "system.simg",
        "boot_other.img": boot[: 1 * MiB],
    }
    bad = package(tmp_path / "bad.zip", "require board=sailfish|walleye\n", images)
    good = package(
        tmp_path / "good.zip",
        "require board=unbrick-phone\nrequire version-bootloader=unbrick-bl-*\n"
        "reject hw-revision=rev0\n",
        images,
    )
    with driver(served, link) as drv:
        with pytest.raises(PreflightError) as e:
            drv.prepare_update(bad)
        assert e.value.check_id == "android-info" and e.value.overridable
        assert "device product is 'unbrick-phone'" in e.value.message
        assert "'sailfish' or 'walleye'" in e.value.message
        forced = drv.prepare_update(bad, forced=("android-info",))
        assert forced.overridden and "sailfish" in forced.overridden[0]

        plan = drv.prepare_update(good)
        assert [s.describe() for s in plan.steps] == [
            "flash boot.img -> boot_a",
            "flash boot_other.img -> boot_b",
            "flash system.img -> system_a",
        ]
        assert plan.product == "unbrick-phone" and plan.slot == "a" and not plan.overridden
        assert [s.image_bytes for s in plan.steps] == [2 * MiB, 1 * MiB, 16 * MiB]
        summary = plan.to_dict()
        assert summary["product"] == "unbrick-phone"
        assert [s["target"] for s in summary["steps"]] == ["boot_a", "boot_b", "system_a"]
        # Nothing is written by planning.
        assert served.part("boot_a") == bytes(4 * MiB)
        seen: list[str] = []
        report = drv.apply_update(plan, on_step=lambda s: seen.append(s.target), workdir=tmp_path)
        assert seen == ["boot_a", "boot_b", "system_a"]
        assert [r.partition for r in report.flashed] == seen
    assert served.part("boot_a") == padded(boot, 4 * MiB)
    assert served.part("boot_b") == padded(boot[: 1 * MiB], 4 * MiB)
    assert served.part("system_a") == system
    assert not list(tmp_path.glob("fastboot-update-*"))


def test_update_on_the_slot_asked_for(phone: Served, tmp_path: Path) -> None:
    images: dict[str, bytes | Path] = {"boot.img": b"\x0b" * 8192, "system.img": b"\x05" * 8192}
    pkg = package(tmp_path / "u.zip", "require board=unbrick-phone\n", images)
    with driver(phone) as drv:
        plan = drv.prepare_update(pkg, slot="b", skip_secondary=True, wipe=True)
        assert [s.describe() for s in plan.steps] == [
            "flash boot.img -> boot_b",
            "flash system.img -> system_b",
            "erase userdata",
        ]
        (phone.dir / "userdata.img").write_bytes(b"\xff" * (1 * MiB))
        # A resumed job starts at the step that did not finish.
        report = drv.apply_update(plan, start_at=1)
        assert [r.partition for r in report.flashed] == ["system_b"]
        assert phone.part("boot_b") == bytes(4 * MiB)
        drv.apply_update(plan)
        assert drv.getvar("current-slot") == "b"
    assert phone.part("boot_b")[:8192] == b"\x0b" * 8192
    assert phone.part("system_b")[:8192] == b"\x05" * 8192
    assert phone.part("userdata") == bytes(1 * MiB)
    assert phone.part("boot_a") == bytes(4 * MiB)


def test_update_with_fastboot_info(phone: Served, tmp_path: Path) -> None:
    fb_info = (
        "version 1\n"
        "# boot first\n"
        "flash boot\n"
        "flash --slot-other system system_other.img\n"
        "reboot bootloader\n"
        "flash --apply-vbmeta vbmeta\n"
        "if-wipe erase userdata\n"
    )
    images: dict[str, bytes | Path] = {
        "boot.img": b"\x01" * 4096,
        "system_other.img": b"\x02" * 4096,
        "vbmeta.img": b"\x03" * 4096,
    }
    pkg = package(tmp_path / "u.zip", "require board=unbrick-phone\n", images, fb_info)
    (phone.dir / "userdata.img").write_bytes(b"\xff" * (1 * MiB))
    with driver(phone) as drv:
        plan = drv.prepare_update(pkg)
        assert [s.describe() for s in plan.steps] == [
            "flash boot.img -> boot_a",
            "flash system_other.img -> system_b",
            "reboot bootloader",
            "flash vbmeta.img -> vbmeta_a",
        ]
        drv.apply_update(plan)
    assert phone.part("boot_a")[:4096] == b"\x01" * 4096
    assert phone.part("system_b")[:4096] == b"\x02" * 4096
    assert phone.part("vbmeta_a")[:4096] == b"\x03" * 4096
    assert phone.part("userdata") == b"\xff" * (1 * MiB)
    assert phone.phone.state.boots[-1]["target"] == "bootloader"


def test_update_refusals(phone: Served, tmp_path: Path) -> None:
    ok_info = "require board=unbrick-phone\n"
    base: dict[str, bytes | Path] = {"boot.img": b"\1" * 4096, "system.img": b"\2" * 4096}
    with driver(phone) as drv:
        with pytest.raises(ImageError, match=r"no android-info\.txt"):
            drv.prepare_update(package(tmp_path / "a.zip", None, base))
        with pytest.raises(ImageError, match=r"no system\.img"):
            drv.prepare_update(package(tmp_path / "b.zip", ok_info, {"boot.img": b"\1" * 4096}))
        with pytest.raises(PreflightError) as e:
            drv.prepare_update(
                package(tmp_path / "c.zip", ok_info, {**base, "dtbo.img": b"\3" * 4096})
            )
        assert e.value.check_id == "partition-exists" and "dtbo" in e.value.message
        with pytest.raises(PreflightError) as e:
            drv.prepare_update(
                package(tmp_path / "d.zip", ok_info, {**base, "vbmeta.img": bytes(1 * MiB)})
            )
        assert e.value.check_id == "partition-size"
        with pytest.raises(PreflightError) as e:
            drv.prepare_update(
                package(tmp_path / "e.zip", "require partition-exists=recovery\n", base),
                forced=("android-info",),
            )
        assert e.value.check_id == "partition-exists" and not e.value.overridable
        with pytest.raises(UsageError, match="super partition"):
            drv.prepare_update(
                package(tmp_path / "f.zip", ok_info, base, "version 1\nupdate-super\n")
            )
        with pytest.raises(UsageError):
            drv.prepare_update(package(tmp_path / "g.zip", ok_info, base), slot="c")
        (tmp_path / "h.zip").write_bytes(b"not a zip")
        with pytest.raises(Exception, match="not a readable zip"):
            drv.prepare_update(tmp_path / "h.zip")
    assert phone.part("boot_a") == bytes(4 * MiB)
    assert phone.part("system_a") == bytes(16 * MiB)


def test_session_after_a_lost_link(serve: ServeFactory, tmp_path: Path) -> None:
    """A download cut by the device ends the session; the next call reconnects."""
    served = serve(faults=PhoneFaults(disconnect_after_bytes=1 * MiB, offline_s=0.3))
    data = random_image(tmp_path / "boot.img", 2 * MiB)
    drv = open_fastboot(parse_device_uri(served.url() + "?timeout=1"), timeout_s=5.0)
    with closing(drv):
        with pytest.raises(TransportError):
            drv.flash_partition("boot", tmp_path / "boot.img")
        assert drv._client is None
        drv.flash_partition("boot", tmp_path / "boot.img")
    assert served.part("boot_a") == padded(data, 4 * MiB)
