"""`unbrick flash block:///PATH IMAGE --yes` through the whole workflow, as acceptance scripts
run it: compressed images streamed (no expanded copy), a `.bmap` beside the image or named
with `--bmap` (only mapped ranges written), several targets at once, and an image larger than
the target refused with the target untouched."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need
from unbrick.cli.main import main
from unbrick.engine.paths import WorkbenchPaths

pytestmark = pytest.mark.slow

MiB = 1 << 20
PATTERN = b"\xa5" * 4096


def target(path: Path, size: int = 16 * MiB) -> Path:
    with path.open("wb") as f:
        for _ in range(size // len(PATTERN)):
            f.write(PATTERN)
    return path


def sparse_image(path: Path) -> bytes:
    """An 8 MiB image with data at 1 MiB and 5 MiB and holes elsewhere."""
    rng = random.Random(1)
    with path.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(1 * MiB)
        f.write(rng.randbytes(300_000))
        f.seek(5 * MiB)
        f.write(rng.randbytes(200_000))
    return path.read_bytes()


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: Path, *args: str
) -> tuple[int, str]:
    monkeypatch.setenv("UNBRICK_HOME", str(home))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out + err


def test_a_compressed_image_is_streamed_and_read_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    need("zstd")
    disk = target(tmp_path / "disk.img")
    raw = tmp_path / "os.img"
    data = sparse_image(raw)
    subprocess.run(["zstd", "-q", str(raw)], check=True)
    home = tmp_path / "h"
    code, out = run(capsys, monkeypatch, home, "flash", f"block://{disk}", f"{raw}.zst", "--yes")
    assert code == 0, out
    assert "profile block-device" in out
    assert "read-back (O_DIRECT)" in out or "read-back (page cache dropped)" in out
    assert disk.read_bytes()[: len(data)] == data
    assert disk.read_bytes()[len(data) :] == PATTERN * ((16 * MiB - len(data)) // len(PATTERN))
    # Streamed: no expanded copy of the image was made.
    expanded = WorkbenchPaths.from_env({"UNBRICK_HOME": str(home)}).state_dir / "work"
    assert not list(expanded.glob("expanded/*"))


def test_a_bmap_writes_only_the_mapped_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    need("bmaptool")
    raw = tmp_path / "os.img"
    data = sparse_image(raw)
    bmap = tmp_path / "os.img.bmap"
    subprocess.run(
        [shutil.which("bmaptool") or "bmaptool", "create", "-o", str(bmap), str(raw)],
        check=True,
        capture_output=True,
    )
    for how in ("beside", "option"):
        disk = target(tmp_path / f"disk-{how}.img")
        args = ["flash", f"block://{disk}", str(raw), "--yes"]
        if how == "option":
            moved = tmp_path / "elsewhere.bmap"
            shutil.copy(bmap, moved)
            bmap.unlink()
            args += ["--bmap", str(moved)]
        code, out = run(capsys, monkeypatch, tmp_path / "h", *args)
        assert code == 0, out
        got = disk.read_bytes()
        assert got[1 * MiB : 1 * MiB + 300_000] == data[1 * MiB : 1 * MiB + 300_000]
        assert got[5 * MiB : 5 * MiB + 200_000] == data[5 * MiB : 5 * MiB + 200_000]
        # Holes are not written: the target's old pattern is still there.
        assert got[:4096] == PATTERN
        assert got[3 * MiB : 3 * MiB + 4096] == PATTERN


def test_two_targets_at_once_and_an_oversize_image_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "os.img"
    data = sparse_image(raw)
    a, b = target(tmp_path / "a.img"), target(tmp_path / "b.img")
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        f"block://{a}",
        f"block://{b}",
        str(raw),
        "--yes",
    )
    assert code == 0, out
    assert out.count("success: block://") == 2
    # Each target's steps, on lines of their own.
    assert f"block://{a}: ok   write" in out and f"block://{b}: ok   verify" in out
    assert a.read_bytes()[: len(data)] == data and b.read_bytes()[: len(data)] == data
    small = target(tmp_path / "small.img", 4 * MiB)
    before = small.read_bytes()
    code, out = run(
        capsys, monkeypatch, tmp_path / "h", "flash", f"block://{small}", str(raw), "--yes"
    )
    assert code == 3, out
    assert small.read_bytes() == before


def test_image_bmap_is_accepted_by_bmaptool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    need("bmaptool")
    raw = tmp_path / "os.img"
    data = sparse_image(raw)
    code, out = run(capsys, monkeypatch, tmp_path / "h", "image", "bmap", str(raw))
    assert code == 0, out
    assert "ranges (block size 4096)" in out
    bmap = tmp_path / "os.img.bmap"
    assert bmap.is_file()
    copy = tmp_path / "copy.img"
    subprocess.run(
        [shutil.which("bmaptool") or "bmaptool", "copy", "--bmap", str(bmap), str(raw), str(copy)],
        check=True,
        capture_output=True,
    )
    assert copy.read_bytes()[: len(data)] == data


def test_several_targets_share_one_read_of_the_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three cards, one too small: it is refused untouched, and the compressed image is
    checked once for the three jobs and decompressed once for the two others (one
    write_to_targets call with both)."""
    need("zstd")
    import unbrick.transports.block.group as group_mod

    calls: list[list[str]] = []
    real = group_mod.write_to_targets

    def counting(img, targets, **kw):  # type: ignore[no-untyped-def]
        calls.append(sorted(t.path for t in targets))
        return real(img, targets, **kw)

    monkeypatch.setattr(group_mod, "write_to_targets", counting)
    import unbrick.ops.images as images_mod

    inspected: list[str] = []
    real_inspect = images_mod.inspect_path

    def inspect_counting(path, **kw):  # type: ignore[no-untyped-def]
        inspected.append(str(path))
        return real_inspect(path, **kw)

    monkeypatch.setattr(images_mod, "inspect_path", inspect_counting)
    raw = tmp_path / "os.img"
    data = sparse_image(raw)
    subprocess.run(["zstd", "-q", str(raw)], check=True)
    a, b = target(tmp_path / "a.img"), target(tmp_path / "b.img")
    small = target(tmp_path / "small.img", 4 * MiB)
    before = small.read_bytes()
    code, out = run(
        capsys,
        monkeypatch,
        tmp_path / "h",
        "flash",
        f"block://{a}",
        f"block://{small}",
        f"block://{b}",
        f"{raw}.zst",
        "--yes",
    )
    assert code == 3, out
    assert out.count("success: block://") == 1 + 1
    assert f"failed: block://{small}" in out
    assert calls == [sorted([str(a), str(b)])]
    assert inspected == [f"{raw}.zst"]  # decompressed and hashed once for the three jobs
    assert a.read_bytes()[: len(data)] == data and b.read_bytes()[: len(data)] == data
    assert small.read_bytes() == before
