"""Helpers for the block transport tests: images with holes, loop devices, fake sysfs trees."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import need

MiB = 1024 * 1024
PATTERN = b"\xa5\x5a\xc3\x3c"


def need_root() -> None:
    if os.geteuid() != 0:
        msg = "needs root (loop devices)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def make_image(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> bytes:
    """A sparse file of ``size`` bytes with random data at ``extents``; returns its content."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            data = rng.randbytes(n)
            f.seek(off)
            f.write(data)
            content[off : off + n] = data
    return bytes(content)


def fill(path: Path, size: int, pattern: bytes = PATTERN) -> None:
    """A file of ``size`` bytes repeating ``pattern`` (to prove which blocks were written)."""
    with open(path, "wb") as f:
        f.write(pattern * (size // len(pattern)))


def read(path: Path | str, size: int | None = None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if size is None else f.read(size)


@contextmanager
def loop_device(backing: Path, *, partscan: bool = False) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; always detached afterwards."""
    need_root()
    need("losetup")
    args = ["losetup", "-f", "--show"] + (["-P"] if partscan else []) + [str(backing)]
    dev = subprocess.run(args, capture_output=True, check=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            proc = subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
            if proc.returncode == 0:
                break
            time.sleep(0.1)


@contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    """``device`` mounted on ``where`` (created); always unmounted afterwards."""
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", device, str(where)], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, check=False)


def mbr_with_partition(path: Path, size: int, start_sector: int = 2048) -> None:
    """A disk image with an MBR holding one Linux partition from ``start_sector`` to the end."""
    sectors = size // 512 - start_sector
    entry = bytes([0x00, 0, 0, 0, 0x83, 0, 0, 0])
    entry += start_sector.to_bytes(4, "little") + sectors.to_bytes(4, "little")
    mbr = bytearray(512)
    mbr[446 : 446 + 16] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(mbr)


def wait_for(path: str, timeout_s: float = 2.0) -> None:
    end = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            pytest.skip(f"{path} did not appear (no partition scanning here)")
        time.sleep(0.05)


class FakeSys:
    """A fake /sys and /proc for :class:`unbrick.transports.block.target.System`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        (self.sys / "dev" / "block").mkdir(parents=True)
        (self.sys / "class" / "block").mkdir(parents=True)
        (self.sys / "block").mkdir(parents=True)
        self.mountinfo = root / "mountinfo"
        self.swaps = root / "swaps"
        self.mountinfo.write_text("")
        self.swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n")
        self._mount_id = 20

    def system(self):  # type: ignore[no-untyped-def]
        from unbrick.transports.block.target import System

        return System(sys_root=self.sys, mountinfo=self.mountinfo, swaps=self.swaps)

    def _link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    def disk(
        self,
        name: str,
        dev: tuple[int, int],
        *,
        size: int = 64 * MiB,
        removable: bool = False,
        device_path: str | None = "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
        vendor: str = "ATA",
        model: str = "Fixed Disk",
        parts: tuple[tuple[str, tuple[int, int]], ...] = (),
        holders: tuple[str, ...] = (),
        slaves: tuple[str, ...] = (),
    ) -> Path:
        base = self.sys / "devices"
        if device_path is None:
            node = base / "virtual" / "block" / name
        else:
            node = base / device_path / "block" / name
            dev_dir = base / device_path
            dev_dir.mkdir(parents=True, exist_ok=True)
            (dev_dir / "vendor").write_text(vendor + "\n")
            (dev_dir / "model").write_text(model + "\n")
        node.mkdir(parents=True)
        if device_path is not None:
            self._link(node / "device", base / device_path)
        (node / "dev").write_text(f"{dev[0]}:{dev[1]}\n")
        (node / "removable").write_text("1\n" if removable else "0\n")
        (node / "ro").write_text("0\n")
        (node / "size").write_text(f"{size // 512}\n")
        (node / "queue").mkdir()
        (node / "queue" / "logical_block_size").write_text("512\n")
        (node / "holders").mkdir()
        (node / "slaves").mkdir()
        for h in holders:
            (node / "holders" / h).mkdir()
        for s in slaves:
            (node / "slaves" / s).mkdir()
        self._link(self.sys / "block" / name, node)
        self._link(self.sys / "class" / "block" / name, node)
        self._link(self.sys / "dev" / "block" / f"{dev[0]}:{dev[1]}", node)
        for pname, pdev in parts:
            p = node / pname
            p.mkdir()
            (p / "partition").write_text("1\n")
            (p / "dev").write_text(f"{pdev[0]}:{pdev[1]}\n")
            (p / "size").write_text(f"{size // 1024}\n")
            (p / "ro").write_text("0\n")
            (p / "holders").mkdir()
            self._link(self.sys / "class" / "block" / pname, p)
            self._link(self.sys / "dev" / "block" / f"{pdev[0]}:{pdev[1]}", p)
        return node

    def mount(self, dev: tuple[int, int], mount_point: str, source: str) -> None:
        self._mount_id += 1
        escaped = mount_point.replace(" ", "\\040")
        line = (
            f"{self._mount_id} 1 {dev[0]}:{dev[1]} / {escaped} "
            f"rw,relatime shared:1 - ext4 {source} rw\n"
        )
        with open(self.mountinfo, "a") as f:
            f.write(line)

    def swap(self, path: str) -> None:
        with open(self.swaps, "a") as f:
            f.write(f"{path}\tpartition\t1048572\t0\t-2\n")
