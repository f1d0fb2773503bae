"""Block targets: the kernel's views parsed, the safety checks, and opening with O_EXCL."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.block.conftest import (
    FakeSys,
    MiB,
    fill,
    loop_device,
    mbr_with_partition,
    mounted,
    read,
    wait_for,
)
from tests.conftest import need
from unbrick.errors import PreflightError, SourceError, UsageError
from unbrick.transports.block.target import (
    BLOCK_CHECK_IDS,
    CHECK_IN_USE,
    CHECK_MOUNTED,
    CHECK_REMOVABLE,
    CHECK_SAME_FILE,
    CHECK_SIZE,
    CHECK_SYSTEM,
    TargetInfo,
    bus_of,
    check_target,
    inspect_target,
    open_target,
    parse_mountinfo,
    parse_swaps,
    refusal,
    validate_forced,
)

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 27 8:17 / /media/my\\040card rw,nosuid shared:7 - vfat /dev/sdb1 rw,fmask=0022
garbage line without fields
"""


@pytest.mark.unit
def test_mountinfo_parsed_with_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.dev, m.mount_point, m.fstype, m.source) for m in mounts] == [
        ((0, 21), "/proc", "proc", "proc"),
        ((254, 0), "/", "ext4", "/dev/vda"),
        ((8, 17), "/media/my card", "vfat", "/dev/sdb1"),
    ]


@pytest.mark.unit
def test_swaps_parsed() -> None:
    text = "Filename\tType\tSize\tUsed\tPriority\n/dev/zram0  partition\t4G\t0\t100\n"
    assert parse_swaps(text) == ["/dev/zram0"]
    assert parse_swaps("") == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("path", "name", "bus"),
    [
        (
            "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0",
            "sdb",
            "usb",
        ),
        ("/sys/devices/platform/fe320000.mmc/mmc_host/mmc1/mmc1:aaaa", "mmcblk1", "mmc"),
        ("/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0", "sda", "ata"),
        ("/sys/devices/pci0000:00/0000:00:02.0/virtio1", "vda", "virtio"),
        ("/sys/devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0", "nvme0n1", "nvme"),
        ("", "loop3", "loop"),
        ("", "zram0", "virtual"),
    ],
)
def test_bus_from_the_device_path(path: str, name: str, bus: str) -> None:
    assert bus_of(path, name) == bus


@pytest.mark.unit
@given(st.text(max_size=400))
@settings(max_examples=200, deadline=None)
def test_mountinfo_fuzz_never_raises(text: str) -> None:
    for m in parse_mountinfo(text):
        assert isinstance(m.dev, tuple)
    parse_swaps(text)


def _info(**kw: object) -> TargetInfo:
    base: dict[str, object] = {
        "path": "/dev/sdz",
        "kind": "disk",
        "exists": True,
        "size_bytes": 64 * MiB,
        "name": "sdz",
        "disk": "sdz",
        "bus": "usb",
        "removable": True,
    }
    base.update(kw)
    return TargetInfo(**base)  # type: ignore[arg-type]


@pytest.mark.unit
def test_checks_in_order_and_all_pass_for_a_usb_stick() -> None:
    results = check_target(_info(), image_size=32 * MiB)
    assert tuple(r.id for r in results) == BLOCK_CHECK_IDS
    assert all(r.passed for r in results)
    assert refusal(results) is None


@pytest.mark.unit
def test_fixed_disk_refused_unless_forced_with_a_reason() -> None:
    info = _info(bus="ata", removable=False)
    err = refusal(check_target(info))
    assert isinstance(err, PreflightError)
    assert err.check_id == CHECK_REMOVABLE and err.overridable
    assert "--force block.removable --reason" in err.hint
    forced = check_target(info, forced={CHECK_REMOVABLE: "internal eMMC of the board"})
    assert refusal(forced) is None
    r = next(r for r in forced if r.id == CHECK_REMOVABLE)
    assert r.forced and r.reason == "internal eMMC of the board"
    assert "[forced: internal eMMC of the board]" in r.message
    with pytest.raises(UsageError, match="needs --reason"):
        check_target(info, forced={CHECK_REMOVABLE: "  "})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kw", "check_id"),
    [
        ({"mounts": ("/dev/sdz1 on /media/x",)}, CHECK_MOUNTED),
        ({"swaps": ("/dev/sdz2",)}, CHECK_IN_USE),
        ({"holders": ("dm-0",)}, CHECK_IN_USE),
        ({"system_disk": True}, CHECK_SYSTEM),
    ],
)
def test_hard_refusals_cannot_be_forced(kw: dict[str, object], check_id: str) -> None:
    err = refusal(check_target(_info(**kw)))
    assert isinstance(err, PreflightError) and err.check_id == check_id
    assert not err.overridable
    with pytest.raises(UsageError, match="cannot be overridden"):
        validate_forced({check_id: "I know what I do"})


@pytest.mark.unit
def test_size_check_for_devices_not_files() -> None:
    err = refusal(check_target(_info(size_bytes=8 * MiB), image_size=8 * MiB + 1))
    assert isinstance(err, PreflightError) and err.check_id == CHECK_SIZE
    assert "larger than /dev/sdz" in err.message
    as_file = _info(kind="file", bus="file", size_bytes=0)
    assert refusal(check_target(as_file, image_size=1 << 40)) is None


# --------------------------------------------------------------------------------------------
# Fake sysfs trees: what a real machine would show


def _fake_block_node(tmp_path: Path, dev: tuple[int, int]) -> str:
    """A device node with the given numbers (inspection only: the kernel has no such disk)."""
    path = tmp_path / f"blk-{dev[0]}-{dev[1]}"
    try:
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(*dev))
    except PermissionError:
        pytest.skip("creating device nodes needs root")
    return str(path)


def test_fake_sata_disk_is_fixed_and_a_mounted_partition_blocks_it(tmp_path: Path) -> None:
    fake = FakeSys(tmp_path)
    fake.disk("sdz", (8, 240), parts=(("sdz1", (8, 241)),), model="Samsung SSD")
    node = _fake_block_node(tmp_path, (8, 240))
    info = inspect_target(node, system=fake.system())
    assert (info.kind, info.bus, info.removable, info.model) == (
        "disk",
        "ata",
        False,
        "Samsung SSD",
    )
    assert info.size_bytes == 64 * MiB and not info.mounts
    fake.mount((8, 241), "/data", "/dev/sdz1")
    info = inspect_target(node, system=fake.system())
    assert info.mounts == ("/dev/sdz1 on /data",)
    err = refusal(check_target(info))
    assert isinstance(err, PreflightError) and err.check_id == CHECK_MOUNTED
    assert "/data" in err.message and "umount" in err.hint


def test_fake_system_disk_behind_device_mapper(tmp_path: Path) -> None:
    """/ on dm-0 (LVM) whose slave is sdz2: sdz is the system disk, and it is held."""
    fake = FakeSys(tmp_path)
    fake.disk("sdz", (8, 240), parts=(("sdz1", (8, 241)), ("sdz2", (8, 242))), removable=True)
    fake.disk("dm-0", (253, 0), device_path=None, slaves=("sdz2",))
    (fake.sys / "class" / "block" / "sdz2" / "holders" / "dm-0").mkdir()
    fake.mount((253, 0), "/", "/dev/mapper/vg-root")
    info = inspect_target(_fake_block_node(tmp_path, (8, 240)), system=fake.system())
    assert info.system_disk and info.holders == ("dm-0",)
    assert info.mounts == ("/dev/mapper/vg-root on /",)
    ids = [r.id for r in check_target(info) if not r.passed]
    assert ids == [CHECK_MOUNTED, CHECK_IN_USE, CHECK_SYSTEM]


def test_fake_usb_and_mmc_cards_pass_and_swap_is_in_use(tmp_path: Path) -> None:
    fake = FakeSys(tmp_path)
    usb = "pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0"
    fake.disk("sdy", (8, 224), device_path=usb, vendor="SanDisk", model="Ultra")
    (fake.sys / "devices" / "pci0000:00/0000:00:14.0/usb2/2-1" / "idVendor").write_text("0781\n")
    (fake.sys / "devices" / "pci0000:00/0000:00:14.0/usb2/2-1" / "serial").write_text("4C53\n")
    fake.disk("mmcblk0", (179, 0), device_path="platform/mmc/mmc_host/mmc0/mmc0:0001")
    fake.disk("zram0", (252, 0), device_path=None)
    fake.swap("/dev/zram0")
    system = fake.system()
    usb_info = inspect_target(_fake_block_node(tmp_path, (8, 224)), system=system)
    assert (usb_info.bus, usb_info.serial, usb_info.vendor) == ("usb", "4C53", "SanDisk")
    assert usb_info.label == "SanDisk Ultra (sdy, usb, 64.0 MiB)"
    assert refusal(check_target(usb_info)) is None
    mmc_info = inspect_target(_fake_block_node(tmp_path, (179, 0)), system=system)
    assert mmc_info.bus == "mmc" and refusal(check_target(mmc_info)) is None
    zram = inspect_target(_fake_block_node(tmp_path, (252, 0)), system=system)
    assert zram.swaps == ("/dev/zram0",)
    ids = [r.id for r in check_target(zram) if not r.passed]
    assert ids == [CHECK_IN_USE, CHECK_REMOVABLE]


# --------------------------------------------------------------------------------------------
# Real files and loop devices


def test_regular_file_targets(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    fill(img, MiB)
    info = inspect_target(img)
    assert (info.kind, info.bus, info.size_bytes) == ("file", "file", MiB)
    missing = inspect_target(tmp_path / "new.img")
    assert missing.kind == "file" and not missing.exists
    with pytest.raises(SourceError):
        inspect_target(tmp_path / "no" / "dir" / "x.img")
    err = refusal(check_target(info, image_path=img))
    assert isinstance(err, PreflightError) and err.check_id == CHECK_SAME_FILE
    with open_target(tmp_path / "new.img") as t:
        assert t.size_bytes == 0 and not t.is_block
    assert (tmp_path / "new.img").exists()
    other = inspect_target("/dev/null")
    assert other.kind == "other"
    assert refusal(check_target(other)) is not None


def test_the_system_disk_is_refused_and_untouched() -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    root = next(m for m in mounts if m.mount_point == "/")
    node = Path("/sys/dev/block") / f"{root.dev[0]}:{root.dev[1]}"
    if root.dev[0] == 0 or not node.exists():
        pytest.skip("/ is not on a block device here")
    real = node.resolve()
    disk_name = real.parent.name if (real / "partition").exists() else real.name
    disk = Path("/dev") / disk_name
    if not disk.exists():
        pytest.skip(f"no device node {disk} for the root disk")
    info = inspect_target(disk)
    assert info.system_disk and info.disk == disk_name
    failed = {r.id for r in check_target(info) if not r.passed}
    assert {CHECK_SYSTEM, CHECK_MOUNTED} <= failed
    with pytest.raises(PreflightError) as e:
        open_target(disk, forced={CHECK_REMOVABLE: "even when forced"})
    assert e.value.check_id in (CHECK_MOUNTED, CHECK_SYSTEM)


@pytest.mark.peer
def test_loop_device_opened_exclusively_with_its_size(tmp_path: Path) -> None:
    backing = tmp_path / "card.img"
    fill(backing, 8 * MiB)
    with loop_device(backing) as dev:
        info = inspect_target(dev)
        assert (info.kind, info.bus, info.size_bytes) == ("disk", "loop", 8 * MiB)
        assert info.backing_file == str(backing)
        with open_target(dev, image_size=8 * MiB) as t:
            assert t.size_bytes == 8 * MiB and t.logical_block_bytes == 512
            # A second exclusive open is refused while we hold it.
            with pytest.raises(OSError):
                os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))
        # The backing file now backs a loop device: writing it directly is refused.
        err = refusal(check_target(inspect_target(backing)))
        assert isinstance(err, PreflightError) and err.check_id == CHECK_IN_USE
        assert dev in err.message


@pytest.mark.peer
def test_image_larger_than_the_loop_device_is_refused(tmp_path: Path) -> None:
    backing = tmp_path / "card.img"
    fill(backing, 4 * MiB)
    with loop_device(backing) as dev, pytest.raises(PreflightError) as e:
        open_target(dev, image_size=4 * MiB + 512)
    assert e.value.check_id == CHECK_SIZE
    assert read(backing) == read(backing)  # still readable; content checked in test_writer


@pytest.mark.peer
def test_fixed_disk_refused_on_a_real_device_until_forced(tmp_path: Path) -> None:
    """A real loop device presented by a fake sysfs as a SATA disk."""
    backing = tmp_path / "disk.img"
    fill(backing, 4 * MiB)
    with loop_device(backing) as dev:
        rdev = os.stat(dev).st_rdev
        fake = FakeSys(tmp_path / "fake")
        fake.disk("sdx", (os.major(rdev), os.minor(rdev)), size=4 * MiB)
        with pytest.raises(PreflightError) as e:
            open_target(dev, system=fake.system())
        assert e.value.check_id == CHECK_REMOVABLE
        assert "fixed disk" in e.value.message
        with open_target(dev, system=fake.system(), forced={CHECK_REMOVABLE: "bench disk"}) as t:
            r = next(r for r in t.checks if r.id == CHECK_REMOVABLE)
            assert r.forced and r.reason == "bench disk"
            assert t.size_bytes == 4 * MiB


@pytest.mark.peer
def test_mounted_filesystem_refused_and_nothing_written(tmp_path: Path) -> None:
    need("mkfs.ext4", "mount", "umount")
    backing = tmp_path / "card.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    with loop_device(backing) as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        with mounted(dev, tmp_path / "mnt"):
            with pytest.raises(PreflightError) as e:
                open_target(dev)
            assert e.value.check_id == CHECK_MOUNTED
            assert str(tmp_path / "mnt") in e.value.message
            from unbrick.transports.block.writer import write_image

            img = tmp_path / "new.img"
            fill(img, MiB, b"\x00\xff")
            with pytest.raises(PreflightError):
                write_image(img, [dev], bmap=None)
        after = read(backing, 2048)
        # ext4 leaves its first KiB zero and keeps its magic: the image never reached it.
        assert after[:1024] == bytes(1024) and after[0x438:0x43A] == b"\x53\xef"


@pytest.mark.peer
def test_mounted_partition_refuses_the_whole_disk(tmp_path: Path) -> None:
    need("mkfs.ext4", "mount", "umount")
    backing = tmp_path / "disk.img"
    mbr_with_partition(backing, 16 * MiB)
    with loop_device(backing, partscan=True) as dev:
        part = dev + "p1"
        wait_for(part)
        subprocess.run(["mkfs.ext4", "-q", "-F", part], check=True, capture_output=True)
        info = inspect_target(dev)
        assert info.kind == "disk" and not info.mounts
        with mounted(part, tmp_path / "mnt"):
            info = inspect_target(dev)
            assert any(str(tmp_path / "mnt") in m for m in info.mounts)
            with pytest.raises(PreflightError) as e:
                open_target(dev)
            assert e.value.check_id == CHECK_MOUNTED
            part_info = inspect_target(part)
            assert part_info.kind == "partition" and part_info.disk == os.path.basename(dev)
