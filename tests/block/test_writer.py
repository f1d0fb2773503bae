"""The streaming writer: formats, bmaps (cross-checked with bmaptool), verification, refusals,
several targets at once."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from tests.block.conftest import PATTERN, MiB, fill, loop_device, make_image, read
from tests.conftest import need, run
from unbrick.errors import (
    ImageError,
    IntegrityError,
    JobError,
    PreflightError,
    UsageError,
    VerifyError,
)
from unbrick.formats.bmap import parse_bmap
from unbrick.transports.block.image import Image, find_bmap
from unbrick.transports.block.target import CHECK_SIZE, open_target
from unbrick.transports.block.writer import (
    WriteOptions,
    WriteProgress,
    write_image,
    write_to_targets,
)

#: 6 MiB and a bit: data, holes, a zero run, text, and an unaligned tail.
SIZE = 6 * MiB + 1234
EXTENTS = [(0, 64 * 1024), (1 * MiB, 300 * 1024), (3 * MiB + 4096, 5000), (6 * MiB, 1234)]
SMALL = WriteOptions(chunk_bytes=256 * 1024, verify_window_bytes=1 * MiB)


def _image(tmp_path: Path, name: str = "disk.img", size: int = SIZE) -> tuple[Path, bytes]:
    path = tmp_path / name
    content = bytearray(make_image(path, size, [(o, n) for o, n in EXTENTS if o + n <= size]))
    text = b"unbrick writes cards " * 2000
    content[2 * MiB : 2 * MiB + len(text)] = text
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(text)
    return path, bytes(content)


def _compress(path: Path, kind: str) -> Path:
    if kind == "raw":
        return path
    if kind == "zip":
        out = path.with_name(path.name + ".zip")
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(path, path.name)
            zf.writestr("README.txt", "how to flash this")
        return out
    prog, suffix = {
        "gz": ("gzip", ".gz"),
        "xz": ("xz", ".xz"),
        "zst": ("zstd", ".zst"),
        "bz2": ("bzip2", ".bz2"),
    }[kind]
    need(prog)
    out = path.with_name(path.name + suffix)
    with open(out, "wb") as f:
        subprocess.run([prog, "-c", str(path)], stdout=f, check=True)
    return out


def _bmaptool_bmap(img: Path) -> Path:
    need("bmaptool")
    out = img.with_name(img.name + ".bmap")
    run(["bmaptool", "create", "-o", out, img])
    return out


def _mapped(bmap_path: Path) -> list[tuple[int, int]]:
    bm = parse_bmap(bmap_path.read_bytes())
    return [bm.byte_range(r) for r in bm.ranges]


# --------------------------------------------------------------------------------------------
# Formats


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["raw", "gz", "xz", "zst", "bz2", "zip"])
def test_formats_to_a_file(tmp_path: Path, kind: str) -> None:
    img, content = _image(tmp_path)
    src = _compress(img, kind)
    out = tmp_path / "out.img"
    result = write_image(src, [out], bmap=None, options=SMALL)
    assert result.ok, result.to_dict()
    assert read(out) == content
    t = result.targets[0]
    assert t.written_bytes == SIZE and t.verified_bytes == SIZE
    assert t.verify_method in ("o-direct", "fadvise")
    info = result.image
    assert info.size_bytes == SIZE and info.layout == "raw"
    expected_source = {
        "raw": "file",
        "xz": "xz-index",
        "zst": "zstd-frames",
        "zip": "zip-directory",
        "gz": "counted",
        "bz2": "counted",
    }[kind]
    assert info.size_source == expected_source
    if kind == "zip":
        assert info.member == "disk.img"


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["raw", "zst"])
def test_formats_to_a_loop_device(tmp_path: Path, kind: str) -> None:
    img, content = _image(tmp_path)
    src = _compress(img, kind)
    backing = tmp_path / "card.img"
    fill(backing, 8 * MiB)
    with loop_device(backing) as dev:
        result = write_image(src, [dev], bmap=None, options=SMALL)
        assert result.ok, result.to_dict()
        assert result.targets[0].verify_method == "o-direct"
    data = read(backing)
    assert data[:SIZE] == content
    assert data[SIZE + 512 :] == read(backing)[SIZE + 512 :]  # the rest is still the pattern
    assert data[-4:] == PATTERN


@pytest.mark.peer
@pytest.mark.parametrize("compressed", [False, True])
def test_android_sparse_images(tmp_path: Path, compressed: bool) -> None:
    need("img2simg")
    img, content = _image(tmp_path, size=6 * MiB)
    simg = tmp_path / "disk.simg"
    run(["img2simg", img, simg])
    src = _compress(simg, "gz") if compressed else simg
    out = tmp_path / "out.img"
    fill(out, 8 * MiB)
    result = write_image(src, [out], bmap=None, options=SMALL)
    assert result.ok, result.to_dict()
    assert result.image.layout == "android-sparse"
    assert result.image.size_source == "sparse-header"
    assert read(out)[: 6 * MiB] == content
    assert read(out)[6 * MiB :] == PATTERN * (2 * MiB // 4)


def test_sparse_dont_care_blocks_are_not_written(tmp_path: Path) -> None:
    """A sparse image made with DONT_CARE chunks for its zero blocks leaves them alone."""
    from unbrick.formats.base import Context, Source
    from unbrick.formats.sparse import write_sparse

    img, content = _image(tmp_path, size=6 * MiB)
    simg = tmp_path / "holes.simg"
    with open(img, "rb") as f, open(simg, "wb") as out:
        write_sparse(Source(f), out, Context(), zeros_as_dont_care=True)
    target = tmp_path / "out.img"
    fill(target, 6 * MiB)
    result = write_image(simg, [target], bmap=None, options=SMALL)
    assert result.ok, result.to_dict()
    got = read(target)
    for off in range(0, 6 * MiB, 4096):
        block = content[off : off + 4096]
        assert got[off : off + 4096] == (PATTERN * 1024 if block == bytes(4096) else block)
    assert result.targets[0].written_bytes < 6 * MiB


def test_zip_with_several_files_needs_a_member_name(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    z = tmp_path / "bundle.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(img, "a.img")
        zf.write(img, "b.img")
    with pytest.raises(UsageError, match=r"a\.img, b\.img"):
        write_image(z, [tmp_path / "out.img"], bmap=None)
    result = write_image(
        z, [tmp_path / "out.img"], bmap=None, options=WriteOptions(zip_member="b.img")
    )
    assert result.ok and read(tmp_path / "out.img") == content


def test_damaged_zip_member_is_an_image_error(tmp_path: Path) -> None:
    img, _ = _image(tmp_path)
    z = _compress(img, "zip")
    data = bytearray(read(z))
    for i in range(2000, 2400):  # inside the deflate data of the image member
        data[i] ^= 0x5A
    z.write_bytes(bytes(data))
    result = write_image(z, [tmp_path / "out.img"], bmap=None, options=SMALL)
    assert isinstance(result.source_error, ImageError)
    assert "zip member 'disk.img'" in result.source_error.message
    assert not result.targets[0].ok


@pytest.mark.peer
def test_damaged_compressed_image_stops_with_an_image_error(tmp_path: Path) -> None:
    img, _ = _image(tmp_path)
    gz = _compress(img, "gz")
    data = bytearray(read(gz))
    data[len(data) // 2] ^= 0xFF
    gz.write_bytes(bytes(data))
    out = tmp_path / "out.img"
    with pytest.raises(ImageError):
        write_image(gz, [out], bmap=None)
    assert not out.exists()  # the file it had created for the target is gone again


# --------------------------------------------------------------------------------------------
# bmap


def _holes_untouched(target: Path, content: bytes, mapped: list[tuple[int, int]]) -> None:
    got = read(target)
    pos = 0
    for off, n in mapped:
        gap = got[pos:off]
        assert gap == (PATTERN * (len(gap) // 4 + 1))[(pos % 4) : (pos % 4) + len(gap)]
        assert got[off : off + n] == content[off : off + n]
        pos = off + n


@pytest.mark.peer
@pytest.mark.parametrize("retain", [0, 64 * MiB])
def test_bmaptool_bmap_writes_only_mapped_ranges(tmp_path: Path, retain: int) -> None:
    """With the checked data kept in memory for writing, or read again."""
    img, content = _image(tmp_path)
    bmap = _bmaptool_bmap(img)
    mapped = _mapped(bmap)
    target = tmp_path / "out.img"
    fill(target, 8 * MiB)
    opts = WriteOptions(chunk_bytes=256 * 1024, verify_window_bytes=MiB, retain_bytes=retain)
    result = write_image(img, [target], bmap=bmap, options=opts)
    assert result.ok, result.to_dict()
    assert result.image.prechecked and result.image.bmap_path == str(bmap)
    assert result.targets[0].written_bytes == sum(n for _, n in mapped) < SIZE
    _holes_untouched(target, content, mapped)


@pytest.mark.peer
def test_bmap_beside_a_compressed_image_on_a_loop_device(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    bmap = _bmaptool_bmap(img)
    mapped = _mapped(bmap)
    xz = _compress(img, "xz")
    assert find_bmap(xz) == bmap
    backing = tmp_path / "card.img"
    fill(backing, 8 * MiB)
    with loop_device(backing) as dev:
        result = write_image(xz, [dev], options=SMALL)  # bmap="auto"
    assert result.ok, result.to_dict()
    assert result.image.bmap_path == str(bmap) and result.image.container == "xz"
    _holes_untouched(backing, content, mapped)


def _corrupt_mapped(img: Path, mapped: list[tuple[int, int]], bs: int) -> tuple[int, int]:
    """Flip a byte in the second mapped range; the range's blocks (first, last)."""
    off, n = mapped[1]
    with open(img, "r+b") as f:
        f.seek(off + n // 2)
        b = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([b[0] ^ 0x01]))
    return off // bs, (off + n - 1) // bs


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["raw", "gz"])
def test_corrupted_range_is_named_and_nothing_written(tmp_path: Path, kind: str) -> None:
    img, _ = _image(tmp_path)
    bmap = _bmaptool_bmap(img)
    mapped = _mapped(bmap)
    first, last = _corrupt_mapped(img, mapped, 4096)
    src = _compress(img, kind)
    target = tmp_path / "out.img"
    fill(target, 8 * MiB)
    before = read(target)
    with pytest.raises(IntegrityError) as e:
        write_image(src, [target], bmap=bmap, options=SMALL)
    assert f"checksum mismatch for blocks range {first}-{last}" in e.value.message
    assert "nothing was written" in e.value.hint
    assert read(target) == before
    # bmaptool names the same range.
    proc = subprocess.run(
        ["bmaptool", "copy", "--bmap", str(bmap), str(img), str(tmp_path / "bt.img")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert re.search(rf"checksum mismatch for blocks range {first}-{last}", proc.stderr)


@pytest.mark.peer
def test_corrupted_range_without_precheck_says_the_target_was_written(tmp_path: Path) -> None:
    img, _ = _image(tmp_path)
    bmap = _bmaptool_bmap(img)
    first, last = _corrupt_mapped(img, _mapped(bmap), 4096)
    gz = _compress(img, "gz")
    result = write_image(
        gz, [tmp_path / "out.img"], bmap=bmap, options=WriteOptions(precheck=False)
    )
    assert not result.ok
    err = result.source_error
    assert isinstance(err, IntegrityError)
    assert f"range {first}-{last}" in err.message and "written up to" in err.hint
    assert result.targets[0].error is err
    with pytest.raises(IntegrityError):
        result.raise_for_failure()


def test_bmap_that_does_not_fit_the_image(tmp_path: Path) -> None:
    from unbrick.transports.block.bmapgen import write_bmap

    img, _ = _image(tmp_path)
    other, _ = _image(tmp_path, "other.img", size=SIZE - 4096)
    bmap = tmp_path / "other.bmap"
    write_bmap(other, bmap)
    with pytest.raises(IntegrityError, match="describes"):
        write_image(img, [tmp_path / "out.img"], bmap=bmap)
    text = bmap.read_bytes().replace(b"<BlockSize> 4096", b"<BlockSize>  4096")
    altered = tmp_path / "altered.bmap"
    altered.write_bytes(text)
    with pytest.raises(IntegrityError, match="altered"):
        write_image(other, [tmp_path / "out.img"], bmap=altered)
    simg = tmp_path / "x.simg"
    simg.write_bytes(bytes.fromhex("3aff26ed010000001c000c000010000000000000") + bytes(8))
    with pytest.raises(UsageError, match="sparse"):
        write_image(simg, [tmp_path / "out.img"], bmap=bmap)


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.peer
def test_image_larger_than_the_card_is_refused_untouched(tmp_path: Path) -> None:
    backing = tmp_path / "card.img"
    fill(backing, 4 * MiB)
    before = read(backing)
    img, _ = _image(tmp_path)  # 6 MiB
    bz2 = _compress(img, "bz2")  # size unknown until counted
    zst = _compress(img, "zst")  # size from the frame header
    with loop_device(backing) as dev:
        for src in (img, bz2, zst):
            with pytest.raises(PreflightError) as e:
                write_image(src, [dev], bmap=None)
            assert e.value.check_id == CHECK_SIZE, src
            assert "larger than" in e.value.message
    assert read(backing) == before


def test_two_targets_named_twice_or_none(tmp_path: Path) -> None:
    img, _ = _image(tmp_path)
    out = tmp_path / "out.img"
    with pytest.raises(UsageError, match="twice"):
        write_image(img, [out, tmp_path / "." / "out.img"], bmap=None)
    with pytest.raises(UsageError, match="no target"):
        write_image(img, [], bmap=None)


# --------------------------------------------------------------------------------------------
# Several targets


@pytest.mark.peer
def test_two_targets_at_once_each_with_progress_and_result(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    zst = _compress(img, "zst")
    backing = tmp_path / "card.img"
    fill(backing, 8 * MiB)
    events: list[WriteProgress] = []
    lock = threading.Lock()

    def progress(p: WriteProgress) -> None:
        with lock:
            events.append(p)

    with loop_device(backing) as dev:
        file_target = tmp_path / "copy.img"
        opts = WriteOptions(chunk_bytes=256 * 1024, verify_window_bytes=MiB, progress_interval_s=0)
        result = write_image(zst, [dev, file_target], bmap=None, options=opts, progress=progress)
    assert result.ok, result.to_dict()
    assert [t.target for t in result.targets] == [dev, str(file_target)]
    assert read(backing)[:SIZE] == content and read(file_target) == content
    for target in (dev, str(file_target)):
        mine = [e for e in events if e.target == target]
        phases = [e.phase for e in mine]
        assert "write" in phases and "verify" in phases and phases[-1] == "done"
        writes = [e.done_bytes for e in mine if e.phase == "write"]
        assert writes == sorted(writes) and writes[-1] == SIZE
        assert all(e.total_bytes == SIZE for e in mine)


def test_one_bad_target_does_not_stop_the_other(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    good, bad = tmp_path / "good.img", tmp_path / "bad.img"

    def corrupt_bad(path: str, off: int, n: int) -> None:
        if path == str(bad):
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(b"\xee" * 10)
                f.flush()
                os.fsync(f.fileno())

    opts = WriteOptions(chunk_bytes=MiB, before_verify=corrupt_bad)
    result = write_image(img, [good, bad], bmap=None, options=opts)
    ok, failed = result.targets
    assert ok.ok and read(good) == content
    assert not failed.ok and isinstance(failed.error, VerifyError)
    assert not result.ok
    with pytest.raises(VerifyError):
        result.raise_for_failure()


# --------------------------------------------------------------------------------------------
# Verification


def _corrupter(at: int, times: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def hook(path: str, off: int, n: int) -> None:
        if off <= at < off + n and len(calls) < times:
            calls.append(off)
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(b"\x00\x11\x22")
                f.flush()
                os.fsync(f.fileno())

    return calls, hook


def test_corruption_after_writing_is_rewritten_once(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    at = 1 * MiB + 5000  # inside data
    calls, hook = _corrupter(at, times=1)
    opts = WriteOptions(chunk_bytes=MiB, before_verify=hook)  # type: ignore[arg-type]
    result = write_image(img, [tmp_path / "out.img"], bmap=None, options=opts)
    assert result.ok and len(calls) == 1
    assert result.targets[0].rewritten == ((at - at % 4096, 4096),)
    assert read(tmp_path / "out.img") == content


@pytest.mark.parametrize(
    ("rewrite", "how", "schedule"),
    [(True, "direct", "auto"), (False, "direct", "alongside"), (True, "drop-cache", "auto")],
)
def test_persistent_corruption_fails_naming_the_range(
    tmp_path: Path, rewrite: bool, how: str, schedule: str
) -> None:
    img, _ = _image(tmp_path)
    at = 3 * MiB + 4096 + 4094  # the 3 bytes straddle two 4 KiB blocks
    _, hook = _corrupter(at, times=99)
    opts = WriteOptions(
        chunk_bytes=MiB,
        before_verify=hook,  # type: ignore[arg-type]
        rewrite_bad=rewrite,
        verify_read=how,  # type: ignore[arg-type]
        verify_schedule=schedule,  # type: ignore[arg-type]
    )
    result = write_image(img, [tmp_path / "out.img"], bmap=None, options=opts)
    t = result.targets[0]
    assert not t.ok and isinstance(t.error, VerifyError)
    block = at - at % 4096
    assert t.bad_ranges == ((block, 8192),)
    assert t.error.ranges == [(block, 8192)]
    assert f"bytes {block}..{block + 8191}" in t.error.message
    assert ("after a rewrite" in t.error.message) == rewrite


@pytest.mark.peer
def test_bad_range_named_in_bmap_blocks(tmp_path: Path) -> None:
    img, _ = _image(tmp_path)
    bmap = _bmaptool_bmap(img)
    at = 1 * MiB + 8192 + 7
    _, hook = _corrupter(at, times=99)
    opts = WriteOptions(before_verify=hook, rewrite_bad=False)  # type: ignore[arg-type]
    result = write_image(img, [tmp_path / "out.img"], bmap=bmap, options=opts)
    err = result.targets[0].error
    assert isinstance(err, VerifyError)
    block = at // 4096
    assert f"(blocks {block})" in err.message


@pytest.mark.peer
@pytest.mark.parametrize("how", ["direct", "drop-cache"])
def test_read_back_bypasses_the_page_cache(tmp_path: Path, how: str) -> None:
    """The card's storage changes under a loop device whose page cache still holds what was
    written: a cached read would see good data, the verifier sees the corruption."""
    img, content = _image(tmp_path)
    backing = tmp_path / "card.img"
    fill(backing, 8 * MiB)
    at = 2 * MiB + 100
    seen: list[bytes] = []

    def hook(path: str, off: int, n: int) -> None:
        if not off <= at < off + n or seen:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the loop device's dirty pages reach the backing file first
            with open(backing, "r+b") as f:  # then the "card" changes underneath
                f.seek(at)
                f.write(b"\xba\xad")
                f.flush()
                os.fsync(f.fileno())
            seen.append(os.pread(fd, 2, at))  # through the device's page cache
        finally:
            os.close(fd)

    with loop_device(backing) as dev:
        opts = WriteOptions(
            chunk_bytes=MiB,
            before_verify=hook,
            rewrite_bad=False,
            verify_read=how,  # type: ignore[arg-type]
        )
        result = write_image(img, [dev], bmap=None, options=opts)
    assert seen == [content[at : at + 2]], "the page cache should still hold the good bytes"
    t = result.targets[0]
    assert t.verify_method == {"direct": "o-direct", "drop-cache": "drop-cache"}[how]
    assert isinstance(t.error, VerifyError)
    assert t.bad_ranges == ((at - at % 4096, 4096),)


def test_without_verification_nothing_is_read_back(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    calls: list[int] = []
    opts = WriteOptions(verify=False, before_verify=lambda p, o, n: calls.append(o))
    result = write_image(img, [tmp_path / "out.img"], bmap=None, options=opts)
    assert result.ok and not calls
    assert result.targets[0].verify_method == "none" and result.targets[0].verified_bytes == 0
    assert read(tmp_path / "out.img") == content


# --------------------------------------------------------------------------------------------
# Control


def test_cancel_stops_every_target(tmp_path: Path) -> None:
    img, _ = _image(tmp_path)
    stop = threading.Event()

    def progress(p: WriteProgress) -> None:
        if p.phase == "write":
            stop.set()

    opts = WriteOptions(chunk_bytes=64 * 1024, progress_interval_s=0, queue_pieces=1)
    result = write_image(
        img,
        [tmp_path / "out.img"],
        bmap=None,
        options=opts,
        progress=progress,
        cancelled=stop.is_set,
    )
    assert isinstance(result.source_error, JobError)
    assert result.targets[0].written_bytes < SIZE


def test_opened_targets_and_images_can_be_passed_in(tmp_path: Path) -> None:
    img, content = _image(tmp_path)
    with Image(img, bmap=None) as image, open_target(tmp_path / "out.img") as t:
        result = write_to_targets(image, [t], options=SMALL)
        assert not t.closed
    assert result.ok and read(tmp_path / "out.img") == content
