"""The real ``fastboot`` client (Debian package, 29.0.6) against the simulated phone.

This checks the simulator's side of the protocol against the reference host, over TCP and UDP:
getvar all, flash raw and sparse (split by max-download-size), erase, set_active, reboot,
upload, update with android-info.txt, and the locked bootloader.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import need
from tests.fastboot.conftest import MiB, Served, ServeFactory, padded, random_image, to_sparse

pytestmark = pytest.mark.peer


def fastboot(
    served: Served, link: str, *args: str, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    need("fastboot")
    return subprocess.run(
        ["fastboot", "-s", f"{link}:127.0.0.1:{served.port}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


LINKS = pytest.mark.parametrize("link", ["tcp", "udp"])


@LINKS
def test_getvar_all(phone: Served, link: str) -> None:
    out = ok(fastboot(phone, link, "getvar", "all"))
    assert "(bootloader) product: unbrick-phone" in out
    assert "(bootloader) max-download-size: 0x10000000" in out
    assert "(bootloader) partition-size:system_a: 0x1000000" in out
    assert "(bootloader) has-slot:boot: yes" in out
    assert "(bootloader) current-slot: a" in out
    out = ok(fastboot(phone, link, "getvar", "unlocked"))
    assert "unlocked: yes" in out


@LINKS
def test_flash_raw(phone: Served, link: str, tmp_path: Path) -> None:
    data = random_image(tmp_path / "boot.img", 3 * MiB)
    out = ok(fastboot(phone, link, "flash", "boot", str(tmp_path / "boot.img")))
    assert "Writing 'boot_a'" in out
    assert phone.part("boot_a") == padded(data, 4 * MiB)
    assert phone.part("boot_b") == bytes(4 * MiB)


@LINKS
def test_flash_sparse_split_by_max_download_size(
    serve: ServeFactory, link: str, tmp_path: Path
) -> None:
    served = serve(max_download_size=1 * MiB)
    raw = random_image(tmp_path / "system.raw", 16 * MiB, data_every=1 * MiB)
    to_sparse(tmp_path / "system.raw", tmp_path / "system.simg")
    assert (tmp_path / "system.simg").stat().st_size > 1 * MiB
    out = ok(fastboot(served, link, "flash", "system", str(tmp_path / "system.simg")))
    assert "Sending sparse 'system_a' 1/" in out
    assert served.part("system_a") == raw


def test_flash_raw_larger_than_max_download_size(serve: ServeFactory, tmp_path: Path) -> None:
    served = serve(max_download_size=512 * 1024)
    data = random_image(tmp_path / "boot.img", 3 * MiB, data_every=256 * 1024)
    out = ok(fastboot(served, "tcp", "flash", "boot_b", str(tmp_path / "boot.img")))
    assert "Sending sparse 'boot_b'" in out
    assert served.part("boot_b") == padded(data, 4 * MiB)


@LINKS
def test_erase_set_active_reboot(phone: Served, link: str, tmp_path: Path) -> None:
    random_image(tmp_path / "b.img", 1 * MiB)
    ok(fastboot(phone, link, "flash", "boot_b", str(tmp_path / "b.img")))
    ok(fastboot(phone, link, "erase", "boot_b"))
    assert phone.part("boot_b") == bytes(4 * MiB)
    ok(fastboot(phone, link, "set_active", "b"))
    assert "current-slot: b" in ok(fastboot(phone, link, "getvar", "current-slot"))
    ok(fastboot(phone, link, "reboot"))
    state = json.loads((phone.dir / "fastboot-phone.json").read_text())
    assert state["current_slot"] == "b"
    assert state["boots"][-1] == {"target": "system", "slot": "b"}
    assert phone.phone.wait_online(5.0)
    ok(fastboot(phone, link, "reboot", "bootloader"))
    assert phone.phone.state.boots[-1]["target"] == "bootloader"


def test_upload_staged(phone: Served, tmp_path: Path) -> None:
    ok(fastboot(phone, "tcp", "reboot", "recovery"))
    assert phone.phone.wait_online(5.0)
    ok(fastboot(phone, "udp", "oem", "stage-log"))
    ok(fastboot(phone, "udp", "get_staged", str(tmp_path / "log.txt")))
    assert (tmp_path / "log.txt").read_text().splitlines()[1:] == ["boot recovery slot a"]


def _package(path: Path, info: str, boot: bytes, system: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("android-info.txt", info)
        zf.writestr("boot.img", boot)
        zf.write(system, "system.img")
    return path


@LINKS
def test_update(serve: ServeFactory, link: str, tmp_path: Path) -> None:
    served = serve(max_download_size=2 * MiB)
    boot = random_image(tmp_path / "boot.img", 2 * MiB + 8192, seed=3)
    system = random_image(tmp_path / "system.raw", 16 * MiB, data_every=2 * MiB, seed=4)
    to_sparse(tmp_path / "system.raw", tmp_path / "system.simg")
    bad = _package(
        tmp_path / "bad.zip", "require board=other-phone\n", boot, tmp_path / "system.simg"
    )
    proc = fastboot(served, link, "update", str(bad))
    assert proc.returncode != 0
    assert "requirements not met" in proc.stderr
    assert "Update requires 'other-phone'" in proc.stderr
    assert served.part("boot_a") == bytes(4 * MiB)
    assert served.part("system_a") == bytes(16 * MiB)

    good = _package(
        tmp_path / "good.zip",
        "require board=unbrick-phone\nrequire version-bootloader=unbrick-bl-1.0\n",
        boot,
        tmp_path / "system.simg",
    )
    ok(fastboot(served, link, "--skip-reboot", "update", str(good)))
    assert served.part("boot_a") == padded(boot, 4 * MiB)
    assert served.part("system_a") == system
    assert served.part("boot_b") == bytes(4 * MiB)


@LINKS
def test_locked_bootloader_refuses(serve: ServeFactory, link: str, tmp_path: Path) -> None:
    served = serve(unlocked=False)
    random_image(tmp_path / "boot.img", 1 * MiB)
    proc = fastboot(served, link, "flash", "boot", str(tmp_path / "boot.img"))
    assert proc.returncode != 0
    assert "Flashing is not allowed in Lock State" in proc.stderr
    assert served.part("boot_a") == bytes(4 * MiB)
    proc = fastboot(served, link, "erase", "userdata")
    assert "not allowed in Lock State" in proc.stderr
