"""The block:// driver: capabilities for the engine, the whole-image path, several targets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.block.conftest import MiB, fill, loop_device, make_image, read
from unbrick.errors import DeviceError, PreflightError, UsageError, VerifyError
from unbrick.model.uri import parse_device_uri
from unbrick.transports.base import (
    Capability,
    DeviceHash,
    FlashErase,
    FlashRead,
    FlashWrite,
    Identify,
)
from unbrick.transports.block.driver import BlockDriver, open_block, write_many
from unbrick.transports.block.writer import WriteOptions, WriteProgress


def _addr(path: Path | str) -> object:
    return parse_device_uri(f"block://{path}")


@pytest.mark.peer
def test_protocols_on_a_loop_device(tmp_path: Path) -> None:
    backing = tmp_path / "card.img"
    fill(backing, 4 * MiB)
    with loop_device(backing) as dev:
        drv = open_block(parse_device_uri(f"block://{dev}"))
        try:
            for proto in (Identify, FlashRead, FlashErase, FlashWrite, DeviceHash):
                assert isinstance(drv, proto)
            assert drv.capabilities >= {Capability.READ, Capability.WRITE, Capability.DEVICE_HASH}
            ident = drv.identify()
            assert ident.storage is not None
            assert (ident.storage.type, ident.storage.size_bytes) == ("block", 4 * MiB)
            assert ident.extra["bus"] == "loop" and ident.extra["backing_file"] == str(backing)
            assert ident.fields()["storage_size"] == str(4 * MiB)
            drv.erase(0, 4 * MiB)
            data = bytes(range(256)) * 40 + b"tail"
            drv.program(5000, data)
            assert drv.read(5000, len(data)) == data  # direct read: the write reached the device
            assert drv.device_hash(5000, len(data)) == hashlib.sha256(data).hexdigest()
            assert drv.device_hash(0, 100, "md5") == hashlib.md5(read(backing, 100)).hexdigest()
            with pytest.raises(DeviceError, match="past the end"):
                drv.program(4 * MiB - 2, b"abc")
            with pytest.raises(DeviceError, match="past the end"):
                drv.read(4 * MiB, 1)
            with pytest.raises(UsageError):
                drv.device_hash(0, 1, "nonsense")
        finally:
            drv.close()
    assert read(backing)[5000 : 5000 + len(data)] == data


def test_identify_a_file_and_refuse_other_addresses(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with open_block(parse_device_uri(f"block://{path}")) as drv:
        ident = drv.identify()
        assert ident.model == "image file" and ident.serial == str(path)
        assert ident.extra["kind"] == "file"
        drv.program(10, b"hello")
        drv.flush()
    assert read(path) == bytes(10) + b"hello"
    with pytest.raises(UsageError):
        open_block(parse_device_uri("esp:///dev/ttyUSB0"))


@pytest.mark.peer
def test_write_image_returns_the_result_or_raises(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    content = make_image(img, 3 * MiB, [(0, 5000), (2 * MiB, 9000)])
    backing = tmp_path / "card.img"
    fill(backing, 4 * MiB)
    seen: list[str] = []
    with loop_device(backing) as dev, open_block(parse_device_uri(f"block://{dev}")) as drv:
        result = drv.write_image(img, bmap=None, progress=lambda p: seen.append(p.phase))
        assert result.ok and result.written_bytes == 3 * MiB
        assert result.verify_method == "o-direct" and "done" in seen
        assert drv.read(0, 3 * MiB) == content
        big = tmp_path / "big.img"
        make_image(big, 5 * MiB, [(0, 10)])
        with pytest.raises(PreflightError):
            drv.write_image(big, bmap=None)

        def hook(path: str, off: int, n: int) -> None:
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(b"!")

        with pytest.raises(VerifyError):
            drv.write_image(
                img, bmap=None, options=WriteOptions(before_verify=hook, rewrite_bad=False)
            )
        quick = drv.write_image(img, bmap=None, verify=False)
        assert quick.verify_method == "none"


def test_write_many_reads_once_and_reports_each(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    content = make_image(img, 2 * MiB, [(0, MiB), (MiB + 100, 200)])
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    fill(b, 3 * MiB)
    targets: set[str] = set()

    def progress(p: WriteProgress) -> None:
        if p.target:
            targets.add(p.target)

    result = write_many(
        img,
        [parse_device_uri(f"block://{a}"), parse_device_uri(f"block://{b}")],
        bmap=None,
        progress=progress,
    )
    assert result.ok and targets == {str(a), str(b)}
    assert read(a) == content and read(b)[: 2 * MiB] == content
    assert len(read(b)) == 3 * MiB
    assert [t.target for t in result.targets] == [str(a), str(b)]
    assert isinstance(BlockDriver.capabilities, frozenset)
