"""Backups through fastboot `fetch`, in the whole workflow, against the simulated phone: the
partition about to be written is backed up first (read twice and compared), the write is read
back, a write that does not read back is rolled back to the backup (exit 7), a phone without
fetch still flashes without a backup and the plan says why, and resume keeps the backup."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fastboot.conftest import FAST, Served, ServeFactory
from unbrick.cli.main import main

pytestmark = pytest.mark.slow


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, *args: str
) -> tuple[int, str]:
    monkeypatch.setenv("UNBRICK_HOME", str(home))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, " ".join((out + err).split())


def fill(served: Served, name: str, seed: int) -> bytes:
    """Give a partition random content (what the phone holds before the flash)."""
    path = served.dir / f"{name}.img"
    data = random.Random(seed).randbytes(path.stat().st_size)
    path.write_bytes(data)
    return data


def image(tmp_path: Path, size: int, seed: int) -> Path:
    path = tmp_path / f"image-{seed}.bin"
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def exported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, out: str
) -> bytes:
    """The content of the backup a job's output names (``backup XXXXXXXXXXXX``)."""
    found = re.search(r"backup ([0-9a-f]{12})", out)
    assert found, out
    target = home.parent / f"{found.group(1)}.bin"
    code, text = run(
        capsys, monkeypatch, home, "backups", "export", found.group(1), "-o", str(target)
    )
    assert code == 0, text
    return target.read_bytes()


def test_a_flash_backs_up_the_partition_through_fetch_first(
    serve: ServeFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = serve()
    old = fill(served, "userdata", 1)
    img = image(tmp_path, 300_000, 2)
    home = tmp_path / "h"
    code, out = run(
        capsys,
        monkeypatch,
        home,
        "flash",
        served.url(),
        str(img),
        "--partition",
        "userdata",
        "--yes",
    )
    assert code == 0, out
    assert "steps preflight -> backup -> write -> verify" in out
    assert "a backup of the target will be taken and verified before writing" in out
    assert "backup-read region=userdata offset=0 size_bytes=1048576 method=read-twice" in out
    assert "method=read-back link_check=fastboot OKAY" in out
    assert served.part("userdata") == img.read_bytes() + old[300_000:]
    # Read twice to back it up, once more to check the write.
    assert served.phone.received["fetch"] == 3
    assert exported(capsys, monkeypatch, home, out) == old


def test_a_write_that_does_not_read_back_is_rolled_back_to_the_backup(
    serve: ServeFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = serve(faults=replace(FAST, corrupt_partition="userdata"))
    old = fill(served, "userdata", 3)
    img = image(tmp_path, 200_000, 4)
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        served.url(),
        str(img),
        "--partition",
        "userdata",
        "--yes",
    )
    assert code == 7, out
    assert "userdata: 1 range(s) read back differently from the image" in out
    assert "the device was restored" in out
    assert served.part("userdata") == old
    # The image, then the backup written back; one reboot, after the restore.
    assert served.phone.received["flash"] == 2
    assert [b["target"] for b in served.phone.state.boots] == ["system"]
    code, log = run(capsys, monkeypatch, tmp_path / "h", "log")
    assert " flash rolled_back " in log, log


def test_a_phone_without_fetch_flashes_without_a_backup_and_says_why(
    serve: ServeFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = serve(faults=replace(FAST, no_fetch=True))
    old = fill(served, "userdata", 11)
    img = image(tmp_path, 100_000, 5)
    args = ("flash", served.url(), str(img), "--partition", "userdata", "--yes")
    code, out = run(capsys, monkeypatch, tmp_path / "h", *args, "--dry-run")
    assert code == 0, out
    why = "the device cannot send its partitions back (a fastboot bootloader without 'fetch')"
    assert f"backup.verified no backup: {why}" in out
    assert "steps preflight -> write -> verify" in out
    code, out = run(capsys, monkeypatch, tmp_path / "h", *args)
    assert code == 0, out
    assert f"backup skipped={why}" in out
    assert "method=link (fastboot OKAY)" in out
    assert served.part("userdata") == img.read_bytes() + old[100_000:]
    assert served.phone.received["fetch"] == 0


def test_resume_after_the_phone_vanished_mid_download_keeps_the_backup(
    serve: ServeFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = serve(faults=replace(FAST, disconnect_after_bytes=40_000, offline_s=0.5))
    old = fill(served, "userdata", 6)
    img = image(tmp_path, 100_000, 7)
    home = tmp_path / "h"
    code, out = run(
        capsys,
        monkeypatch,
        home,
        "flash",
        served.url(),
        str(img),
        "--partition",
        "userdata",
        "--yes",
    )
    assert code == 5 and "interrupted in step 'write'" in out, out
    assert "backup_id=" in out
    job = re.search(r"unbrick resume (\w+)", out)
    assert job, out
    code, out = run(capsys, monkeypatch, home, "resume", job.group(1))
    assert code == 0, out
    assert served.part("userdata") == img.read_bytes() + old[100_000:]
    assert exported(capsys, monkeypatch, home, out) == old


def test_backup_command_reads_named_partitions(
    serve: ServeFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = serve()
    misc, userdata = fill(served, "misc", 8), fill(served, "userdata", 9)
    home = tmp_path / "h"
    out_file = tmp_path / "parts.bin"
    args = ("backup", served.url(), "--region", "misc", "--region", "userdata")
    code, out = run(capsys, monkeypatch, home, *args, "-o", str(out_file))
    assert code == 0, out
    assert out_file.read_bytes() == misc + userdata
    backup_id = re.search(r"backup ([0-9a-f]{12})", out)
    assert backup_id, out
    # Another phone does not take this one's partitions: refused, nothing written.
    other = serve(product="other-phone", name="other")
    theirs = fill(other, "misc", 11)
    code, out = run(capsys, monkeypatch, home, "restore", other.url(), backup_id.group(1), "--yes")
    assert code == 3 and "backup.device" in out, out
    assert other.part("misc") == theirs and other.phone.received.get("flash", 0) == 0
    # restore writes back, whole, only the partitions that changed since, and reads them back.
    (served.dir / "misc.img").write_bytes(bytes(len(misc)))
    flashes = served.phone.received.get("flash", 0)
    code, out = run(capsys, monkeypatch, home, "restore", served.url(), backup_id.group(1), "--yes")
    assert code == 0, out
    assert served.part("misc") == misc and served.part("userdata") == userdata
    assert served.phone.received.get("flash", 0) == flashes + 1  # misc only
    # The state before the restore was kept: a second restore brings the zeros back.
    before = re.search(r"backup_id=([0-9a-f]{12})", out) or re.search(r"backup ([0-9a-f]{12})", out)
    assert before and before.group(1) != backup_id.group(1), out
    code, out = run(capsys, monkeypatch, home, "restore", served.url(), before.group(1), "--yes")
    assert code == 0, out
    assert served.part("misc") == bytes(len(misc))
    # Nothing differs: nothing is written.
    flashes = served.phone.received.get("flash", 0)
    code, out = run(capsys, monkeypatch, home, "restore", served.url(), before.group(1), "--yes")
    assert code == 0, out
    assert served.phone.received.get("flash", 0) == flashes
    code, out = run(capsys, monkeypatch, home, "backup", served.url())
    assert code == 2 and "backed up partition by partition" in out and "--region NAME" in out
    img = image(tmp_path, 4096, 10)
    code, out = run(
        capsys,
        monkeypatch,
        home,
        "flash",
        served.url(),
        str(img),
        "--partition",
        "misc",
        "--backup-scope",
        "full",
        "--yes",
    )
    assert code == 2 and "--backup-scope full is not possible" in out, out
    assert served.part("misc") == bytes(len(misc))
