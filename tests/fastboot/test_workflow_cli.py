"""`unbrick flash fastboot+tcp://...` through the whole workflow, against the fastboot phone
simulator, as the acceptance scripts run it: a partition by name, a slot group, a sparse
image, an update.zip; and the refusals (missing or small partition, android-info.txt
mismatch, locked bootloader) with the device untouched."""

from __future__ import annotations

import random
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import need
from unbrick.cli.main import main
from unbrick.sim.fastboot_phone import FastbootPhone, FastbootServer, PhoneFaults

pytestmark = pytest.mark.slow


@dataclass
class Phone:
    phone: FastbootPhone
    server: FastbootServer
    state_dir: Path

    @property
    def uri(self) -> str:
        return f"fastboot+tcp://127.0.0.1:{self.server.port}"

    def partition(self, name: str) -> bytes:
        return (self.state_dir / f"{name}.img").read_bytes()


def start(tmp: Path, **kw: object) -> Phone:
    state = tmp / "phone"
    phone = FastbootPhone.open(state, **kw)  # type: ignore[arg-type]
    server = FastbootServer(phone)
    ports = server.start()
    server.port = ports.tcp_port
    return Phone(phone, server, state)


@pytest.fixture
def phone(tmp_path: Path) -> Iterator[Phone]:
    p = start(tmp_path)
    yield p
    p.server.stop()


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, *args: str
) -> tuple[int, str]:
    monkeypatch.setenv("UNBRICK_HOME", str(home))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out + err


def boot_image(tmp: Path) -> Path:
    need("mkbootimg")
    kernel = tmp / "kernel"
    kernel.write_bytes(random.Random(1).randbytes(150_000))
    out = tmp / "boot.img"
    subprocess.run(
        [shutil.which("mkbootimg") or "mkbootimg", "--kernel", str(kernel), "--output", str(out)],
        check=True,
    )
    return out


def test_a_partition_by_name_and_a_slot_group(
    phone: Phone,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = tmp_path / "misc.bin"
    raw.write_bytes(random.Random(2).randbytes(100_000))
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        phone.uri,
        str(raw),
        "--partition",
        "misc",
        "--yes",
    )
    assert code == 0, out
    # The phone answers fetch: the partition is backed up first and read back after the write.
    assert "backup_id=" in out and "verified_by=read-twice" in out
    assert "method=read-back" in out
    assert phone.partition("misc")[: len(raw.read_bytes())] == raw.read_bytes()
    # The slot group: the inactive slot is written and made active; the active slot, left
    # as it was, is the way back (no backup).
    boot = boot_image(tmp_path)
    before_a = phone.partition("boot_a")
    code, out = run(capsys, monkeypatch, tmp_path / "h", "flash", phone.uri, str(boot), "--yes")
    assert code == 0, out
    assert "skipped=the other slot keeps what the device runs now" in " ".join(out.split())
    assert phone.partition("boot_b")[: boot.stat().st_size] == boot.read_bytes()
    assert phone.partition("boot_a") == before_a
    assert phone.phone.state.current_slot == "b"


def test_a_sparse_image_goes_in_its_sparse_form(
    phone: Phone,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    need("img2simg")
    raw = tmp_path / "data.raw"
    with raw.open("wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(random.Random(3).randbytes(300_000))
    simg = tmp_path / "data.simg"
    subprocess.run(["img2simg", str(raw), str(simg)], check=True)
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        phone.uri,
        str(simg),
        "--partition",
        "userdata",
        "--yes",
    )
    assert code == 0, out
    assert "sparse=True" in out
    assert f"sent_bytes={simg.stat().st_size}" in out.replace("\n", "")
    assert phone.partition("userdata")[: 8 << 20] == raw.read_bytes()


def test_refusals_leave_the_phone_untouched(
    phone: Phone,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {p.name: p.read_bytes() for p in phone.state_dir.glob("*.img")}
    img = tmp_path / "x.bin"
    img.write_bytes(random.Random(4).randbytes(5000))
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        phone.uri,
        str(img),
        "--partition",
        "nosuch",
        "--yes",
    )
    assert code == 3 and "has no partition 'nosuch'" in out
    huge = tmp_path / "huge.bin"
    size = len(files["misc.img"]) + 4096
    huge.write_bytes(random.Random(5).randbytes(size))
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        phone.uri,
        str(huge),
        "--partition",
        "misc",
        "--yes",
    )
    assert code == 3 and "FAIL image.size" in out and "(4096 too many)" in out, out
    assert {p.name: p.read_bytes() for p in phone.state_dir.glob("*.img")} == files


def test_update_zip_checked_against_the_device_then_flashed(
    phone: Phone,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    boot = boot_image(tmp_path)
    system = random.Random(6).randbytes(64_000)
    product = phone.phone.state.product

    def package(name: str, board: str) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("android-info.txt", f"require board={board}\n")
            z.write(boot, "boot.img")
            z.writestr("system.img", system)
        return path

    files = {p.name: p.read_bytes() for p in phone.state_dir.glob("*.img")}
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        phone.uri,
        str(package("bad.zip", "another-phone")),
        "--yes",
    )
    assert code == 3 and "this package is not for this device" in out
    assert {p.name: p.read_bytes() for p in phone.state_dir.glob("*.img")} == files
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        phone.uri,
        str(package("good.zip", product)),
        "--yes",
    )
    assert code == 0, out
    slot = phone.phone.state.current_slot
    assert phone.partition(f"boot_{slot}")[: boot.stat().st_size] == boot.read_bytes()
    assert phone.partition(f"system_{slot}")[: len(system)] == system


def test_a_locked_bootloader_is_refused_with_instructions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = start(tmp_path, unlocked=False)
    try:
        files = {f.name: f.read_bytes() for f in p.state_dir.glob("*.img")}
        img = tmp_path / "x.bin"
        img.write_bytes(random.Random(7).randbytes(4096))
        code, out = run(
            capsys,
            monkeypatch,
            tmp_path / "h",
            "flash",
            p.uri,
            str(img),
            "--partition",
            "misc",
            "--yes",
        )
        assert code == 3, out
        assert "FAIL device.unlocked" in out and "never unlocks it" in out
        assert {f.name: f.read_bytes() for f in p.state_dir.glob("*.img")} == files
    finally:
        p.server.stop()


def test_a_phone_that_vanishes_mid_download_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = start(tmp_path, faults=PhoneFaults(disconnect_after_bytes=40_000, offline_s=0.5))
    try:
        img = tmp_path / "x.bin"
        img.write_bytes(random.Random(8).randbytes(100_000))
        code, out = run(
            capsys,
            monkeypatch,
            tmp_path / "h",
            "flash",
            p.uri,
            str(img),
            "--partition",
            "misc",
            "--yes",
        )
        assert code == 5 and "interrupted in step 'write'" in out, out
        job = out.split("resume ")[1].split("'")[0] if "resume " in out else None
        code, out = run(capsys, monkeypatch, tmp_path / "h", "log", "--json")
        job = job or out.split('"id": "')[1].split('"')[0]
        code, out = run(capsys, monkeypatch, tmp_path / "h", "resume", job)
        assert code == 0, out
        assert p.partition("misc")[:100_000] == img.read_bytes()
    finally:
        p.server.stop()
